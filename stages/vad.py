"""webrtcvad endpointing and barge-in: hear when the candidate starts, stops and interrupts.

Four small pieces, so that every decision can be tested without audio, tasks or I/O:

* :class:`VadStateMachine` (pure): one voiced/unvoiced decision per 20 ms frame in, speech
  start and speech end events out; states quiet → starting → speaking → stopping.
* :class:`BargeInPolicy` (pure): decides when speech over the agent's voice is an interruption.
* :class:`VadFrontEnd`: any 16-bit PCM (any rate, any channels, chunks of any size) → 16 kHz
  mono 20 ms frames, each with its capture time, a voiced flag and where in it the sound is
  loud: webrtcvad, behind an :class:`EnergyGate` (an absolute floor, and a margin over the
  background noise that hides webrtcvad's own ~100 ms hangover in noisy rooms). Shared by the
  stage and the CLI, so both run exactly the same logic.
* :class:`VadStage`: the pipeline stage. Emits ``UserSpeechStarted``, ``UserSpeechStopped`` and
  ``UserTurn`` (with pre-roll audio), marks ``speech_end``/``turn_committed`` on the turn
  timeline, and raises barge-in interrupts on the control lane.

Times are in the audio's own capture clock (``AudioChunk.capture_time`` plus the offset within
the chunk), never the wall clock: a file processed in a millisecond still reports where in
the file the speech was. The speech start is the first voiced frame of the run that reached
``start_ms``; the speech end is the end of the last voiced frame; the turn is committed at the
end of the first frame at which ``stop_ms`` of silence has followed it (exactly ``stop_ms``
after the end when ``stop_ms`` is a multiple of 20 ms, otherwise rounded up to the next frame).

Barge-in interface (for whoever plays the agent's audio, i.e. the pacer)::

    agent = AgentSpeech()                 # share one instance between the VAD and the pacer
    vad = VadStage(options, agent=agent)
    pacer = Pacer(..., on_playback_start=agent.started, on_playback_stop=agent.stopped)
    # by hand: agent.started(ctx.clock.now()) when the first frame of a reply goes out,
    #          agent.stopped() when the reply finished playing or was flushed

``agent.started(at)`` keeps the first start while already speaking. ``at`` is on the call
clock, which live ingress uses as the capture clock, so the two compare directly. While the
agent speaks, user speech lasting ``interrupt_min_ms`` calls ``ctx.control.interrupt("barge-in")``,
once per utterance. It is measured in capture time, to ``BLOCK_MS``, over the loud audio of the
utterance: from its energy onset (which webrtcvad notices 20-80 ms late in noise or on a soft
first word; see ``interrupt_lookback_ms``), or ``agent start + echo_guard_ms`` if later, to the
end of its latest loud part (see ``interrupt_tail_ms``); speech must have been declared first.
``VadStage.agent_started(at)`` and ``VadStage.agent_stopped()`` are shortcuts for the calls.

Run ``python -m stages.vad FILE.wav --json`` to print the speech segments of a WAV file.
"""

from __future__ import annotations

import argparse
import enum
import json
import math
import sys
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, NoReturn

import numpy as np
import webrtcvad

from pipeline.audio import AudioFileError, Reframer, Resampler, WavAudio, read_wav, to_mono
from pipeline.frames import AudioChunk, UserSpeechStarted, UserSpeechStopped, UserTurn
from pipeline.stage import CallContext, Inbox, Outbox

VAD_RATE = 16000
"""webrtcvad runs on 16 kHz mono."""
FRAME_MS = 20
"""One decision per 20 ms frame."""
FRAME_S = FRAME_MS / 1000.0
REANCHOR_S = 0.1
"""The audio clock may run this far ahead of the capture clock (jitter) before the VAD follows
the capture clock back, between utterances only (so turn times stay monotonic)."""
BLOCK_MS = 5
"""Resolution at which the energy gate locates a sound inside a frame (for barge-in timing)."""
_BLOCK = VAD_RATE * BLOCK_MS // 1000  # samples per block
NOISE_WINDOW_S = 3.0
"""How far back the energy gate looks for the background level. Speech has gaps within a few
seconds, so the quietest frame is the noise between words; a filler longer than this ("uhhh…")
would start to count as background."""
_EPS = 1e-6  # seconds: absorbs float error in capture times built from sums of 0.02


@dataclass(frozen=True)
class VadOptions:
    """Endpointing and barge-in settings. Durations are rounded up to whole 20 ms frames."""

    aggressiveness: int = 2
    """webrtcvad mode, 0 (least aggressive about filtering non-speech) to 3 (most)."""
    start_ms: int = 200
    """Voiced time needed to declare speech: shorter blips (a cough) are ignored."""
    start_gap_ms: int = 140
    """Unvoiced gaps up to this long inside the starting run do not reset it: a short first
    word ("I … have") or an unvoiced consonant masked by noise would otherwise delay the start
    by a word. Longer gaps start the count again, and so do gaps of ``stop_ms``."""
    stop_ms: int = 700
    """Hangover: silence needed to end a turn. Interviews have thinking pauses; make it longer."""
    max_turn_s: float = 120.0
    """A turn is cut and committed after this long, speech or not."""
    preroll_ms: int = 300
    """Audio kept from before the speech start in the turn's PCM (soft onsets, the ASR's sake)."""
    energy_floor_dbfs: float = -50.0
    """Frames quieter than this (RMS, dBFS) count as silence whatever webrtcvad says."""
    noise_margin_db: float | None = 6.0
    """Frames less than this far above the background (the quietest frame of the last
    ``NOISE_WINDOW_S``) count as silence: in noise, webrtcvad keeps saying "speech" for up to
    100 ms after the speech ends. ``None`` keeps only the absolute floor."""
    interrupt_min_ms: int = 300
    """User speech over the agent's voice must last this long to interrupt ("mm-hmm" doesn't)."""
    echo_guard_ms: int = 0
    """Ignore barge-in for this long after the agent starts speaking (echo of its own onset)."""
    interrupt_lookback_ms: int = 100
    """Barge-in counts ``interrupt_min_ms`` from the sound's energy onset: the first loud
    ``BLOCK_MS`` block of the unbroken run of frames the energy gate passes just before
    webrtcvad's first voiced frame, at most this long before that frame (webrtcvad notices soft
    first words and speech in noise 20-80 ms late). Only frames the gate passes count: its noise
    margin keeps room noise out, its absolute floor faint echo. 0 counts from the first voiced
    frame."""
    interrupt_tail_ms: int = 100
    """Frames the energy gate passes up to this long after a voiced frame (with at most one
    quiet frame between them) still count as the same sound for barge-in: an unvoiced consonant
    webrtcvad misses ("f") does not hold the interrupt back until voicing resumes. 0 counts to
    the last voiced frame only."""

    def __post_init__(self) -> None:
        def need(ok: bool, field: str, rule: str, value: Any) -> None:
            if not ok:
                raise ValueError(f"VadOptions.{field} must be {rule}, got {value!r}")

        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v: Any) -> bool:
            return is_int(v) or (isinstance(v, float) and math.isfinite(v))

        a = self.aggressiveness
        need(is_int(a) and 0 <= a <= 3, "aggressiveness", "an integer from 0 to 3", a)
        for name in ("start_ms", "stop_ms"):
            v = getattr(self, name)
            need(is_int(v) and v >= FRAME_MS, name, f"an integer of at least {FRAME_MS} ms", v)
        for name in (
            "start_gap_ms",
            "preroll_ms",
            "interrupt_min_ms",
            "echo_guard_ms",
            "interrupt_lookback_ms",
            "interrupt_tail_ms",
        ):
            v = getattr(self, name)
            need(is_int(v) and v >= 0, name, "a non-negative integer (ms)", v)
        m = self.max_turn_s
        longest_start = self.longest_start_ms
        need(
            is_num(m) and m * 1000 > longest_start,
            "max_turn_s",
            f"longer than the longest starting run ({longest_start} ms)",
            m,
        )
        f = self.energy_floor_dbfs
        need(is_num(f) and f <= 0, "energy_floor_dbfs", "a number of at most 0 (dBFS)", f)
        n = self.noise_margin_db
        need(n is None or (is_num(n) and n >= 0), "noise_margin_db", "None or a number ≥ 0", n)

    @property
    def longest_start_ms(self) -> int:
        """The longest a starting run can last: its voiced frames with gaps between them."""
        return self.start_frames * FRAME_MS + (self.start_frames - 1) * self.start_gap_ms

    @property
    def start_frames(self) -> int:
        return _frames(self.start_ms)

    @property
    def preroll_frames(self) -> int:
        return _frames(self.preroll_ms)


def _frames(ms: float) -> int:
    return math.ceil(ms / FRAME_MS - 1e-9)


# ----------------------------------------------------------------------------------------------
# The pure state machine


class VadState(enum.Enum):
    QUIET = "quiet"
    STARTING = "starting"
    SPEAKING = "speaking"
    STOPPING = "stopping"


@dataclass(frozen=True, slots=True)
class SpeechStart:
    """Speech was declared; ``start`` is the first voiced frame of the run (capture clock)."""

    start: float


@dataclass(frozen=True, slots=True)
class SpeechEnd:
    """A turn ended: ``end`` is the end of its last voiced frame; ``committed_at`` the decision."""

    start: float
    end: float
    committed_at: float
    reason: Literal["silence", "max_turn", "end_of_stream"]


VadEvent = SpeechStart | SpeechEnd


class VadStateMachine:
    """quiet → starting → speaking → stopping, on one voiced/unvoiced decision per frame.

    ``push(voiced, t)`` takes the decision for the 20 ms frame starting at ``t`` (capture
    clock) and returns the events it caused. Speech is declared once a run holds
    ``start_ms`` of voiced frames; the run may contain gaps of up to ``start_gap_ms`` (the stop
    consonant after a short first word), and a longer gap goes back to quiet. Once speaking, a
    voiced frame during the hangover resumes the turn, so a pause shorter than ``stop_ms`` never
    splits it. Gaps, the stop and the ``max_turn_s`` cut are decided on capture time, so missing
    audio counts as silence.
    """

    def __init__(self, options: VadOptions | None = None) -> None:
        self.options = options = options or VadOptions()
        self._start_frames = options.start_frames
        self._gap_s = options.start_gap_ms / 1000.0
        self._stop_s = options.stop_ms / 1000.0
        self._max_s = options.max_turn_s
        self.state = VadState.QUIET
        self.run_start: float | None = None
        """First voiced frame of the current run (starting) or turn (speaking, stopping)."""
        self.last_voiced_end: float | None = None
        """End of the last voiced frame of the current run or turn."""
        self.utterances = 0
        """Speech starts so far: identifies the current utterance."""
        self._voiced = 0  # voiced frames in the starting run
        self._last_end = 0.0  # end of the last frame pushed

    @property
    def in_speech(self) -> bool:
        """True between a speech start and its end (speaking or in the hangover)."""
        return self.state is VadState.SPEAKING or self.state is VadState.STOPPING

    def push(self, voiced: bool, t: float) -> list[VadEvent]:
        end = t + FRAME_S
        self._last_end = end
        state = self.state
        if state is VadState.QUIET:
            if voiced:
                self.state, self.run_start, self._voiced = VadState.STARTING, t, 0
                return self._starting_voiced(end)
            return []
        last = self.last_voiced_end
        if state is VadState.STARTING:
            if voiced:
                return self._starting_voiced(end)
            assert last is not None
            # a gap of stop_ms would end a turn, so it cannot be bridged while starting either
            if end - last > self._gap_s + _EPS or end - last >= self._stop_s - _EPS:
                self._reset()
            return []
        # speaking or stopping
        start = self.run_start
        assert start is not None and last is not None
        if voiced:
            self.state, self.last_voiced_end, last = VadState.SPEAKING, end, end
        else:
            self.state = VadState.STOPPING
            if end - last >= self._stop_s - _EPS:
                return [self._commit(start, last, end, "silence")]
        if end - start >= self._max_s - _EPS:
            return [self._commit(start, last, end, "max_turn")]
        return []

    def flush(self) -> list[VadEvent]:
        """End of the audio: commit a turn still open (its end is its last voiced frame)."""
        if not self.in_speech:
            self._reset()
            return []
        start, last = self.run_start, self.last_voiced_end
        assert start is not None and last is not None
        return [self._commit(start, last, self._last_end, "end_of_stream")]

    def _starting_voiced(self, end: float) -> list[VadEvent]:
        self._voiced += 1
        self.last_voiced_end = end
        if self._voiced < self._start_frames:
            return []
        self.state = VadState.SPEAKING
        self.utterances += 1
        assert self.run_start is not None
        return [SpeechStart(self.run_start)]

    def _reset(self) -> None:
        self.state, self.run_start, self.last_voiced_end, self._voiced = (
            VadState.QUIET,
            None,
            None,
            0,
        )

    def _commit(
        self,
        start: float,
        last: float,
        at: float,
        reason: Literal["silence", "max_turn", "end_of_stream"],
    ) -> SpeechEnd:
        self._reset()
        return SpeechEnd(start, last, at, reason)


# ----------------------------------------------------------------------------------------------
# Barge-in


@dataclass(frozen=True, slots=True)
class VadFrame:
    """One 20 ms frame of 16 kHz mono PCM starting at ``t`` (capture clock)."""

    t: float
    pcm: bytes
    voiced: bool
    """Speech for endpointing: the energy gate passes it and webrtcvad says speech."""
    loud: tuple[float, float] | None = None
    """The frame passes the energy gate: from the start of its first to the end of its last
    ``BLOCK_MS`` block above the gate's threshold, in seconds from ``t``; None when it does
    not. Barge-in times sounds with it; a voiced frame without it counts as loud throughout."""


def _loud(frame: VadFrame) -> tuple[float, float] | None:
    if frame.loud is None and frame.voiced:
        return (0.0, FRAME_S)
    return frame.loud


class AgentSpeech:
    """Whether the agent's voice is playing now, told by whoever plays it (the pacer).

    ``started_at`` is on the call clock (the capture clock of live audio). Shared, not copied:
    the pacer and the VAD hold the same instance.
    """

    def __init__(self) -> None:
        self.speaking = False
        self.started_at: float | None = None

    def started(self, at: float) -> None:
        """The agent's audio began playing at ``at``; a repeat call while speaking is ignored."""
        if not self.speaking:
            self.speaking, self.started_at = True, at

    def stopped(self, at: float | None = None) -> None:
        """The agent's audio stopped (finished or flushed); ``at`` is accepted and unused, so
        this fits the pacer's ``on_playback_stop(t)`` callback directly."""
        self.speaking, self.started_at = False, None


class BargeInPolicy:
    """Pure: is the user's current utterance, over the agent's voice, an interruption?

    It is once the sound has lasted ``interrupt_min_ms``, from its onset to the end of its
    latest part, counted from no earlier than the end of the echo guard; at most once per
    utterance, and only once the state machine has declared speech. The onset is the start of
    the first loud block of the unbroken run of loud frames (``VadFrame.loud``) just before the
    utterance's first voiced frame, at most ``interrupt_lookback_ms`` before it; the end is the
    end of the last loud block of the latest voiced frame, or of a loud frame up to
    ``interrupt_tail_ms`` after one (one quiet frame may come between). Only loud audio is ever
    counted, so a sound shorter than ``interrupt_min_ms`` never interrupts, whatever webrtcvad
    says about it.
    """

    def __init__(self, options: VadOptions | None = None) -> None:
        options = options or VadOptions()
        self._min_s = options.interrupt_min_ms / 1000.0
        self._guard_s = options.echo_guard_ms / 1000.0
        self._lookback_s = options.interrupt_lookback_ms / 1000.0
        self._tail_s = options.interrupt_tail_ms / 1000.0
        self._recent: deque[VadFrame] = deque(maxlen=_frames(options.interrupt_lookback_ms))
        self._run: float | None = None  # the machine's run_start that onset/end belong to
        self.onset: float | None = None
        """Where the current utterance's sound began (capture clock), None between runs."""
        self.sound_end: float | None = None
        """Where the latest counted part of the current utterance's sound ended."""
        self._last_voiced = 0.0  # start of the latest voiced frame of the run
        self._last_sound = 0.0  # start of the latest frame counted in sound_end
        self._fired_for = -1

    def push(
        self, machine: VadStateMachine, frame: VadFrame, agent_started_at: float | None
    ) -> bool:
        """Call for every frame, right after ``machine.push(frame.voiced, frame.t)``; True
        means interrupt now. ``agent_started_at`` is None while the agent is silent."""
        self._track(machine, frame)
        self._recent.append(frame)
        if agent_started_at is None or not machine.in_speech:
            return False
        if self._fired_for == machine.utterances:
            return False
        onset, end = self.onset, self.sound_end
        assert onset is not None and end is not None
        counted_from = max(onset, agent_started_at + self._guard_s)
        if end - counted_from < self._min_s - _EPS:
            return False
        self._fired_for = machine.utterances
        return True

    def _track(self, machine: VadStateMachine, frame: VadFrame) -> None:
        run, t, loud = machine.run_start, frame.t, _loud(frame)
        if run is None:
            self._run = self.onset = self.sound_end = None
            return
        if run != self._run:  # this frame is the first voiced frame of a new run
            assert loud is not None, "a run starts on a voiced frame"
            self._run, self._last_voiced, self._last_sound = run, t, t
            self.onset, self.sound_end = t + loud[0], t + loud[1]
            after = t
            for before in reversed(self._recent):
                span = _loud(before)
                if (
                    span is None
                    or abs(after - before.t - FRAME_S) > _EPS  # not adjacent: lost audio
                    or t - before.t > self._lookback_s + _EPS
                ):
                    break
                self.onset, after = before.t + span[0], before.t
            return
        if loud is None:
            return
        if frame.voiced:
            self._last_voiced = t
        elif (
            t - self._last_voiced > self._tail_s + _EPS
            or t - self._last_sound > 2 * FRAME_S + _EPS  # more than one quiet frame between
        ):
            return
        self._last_sound, self.sound_end = t, t + loud[1]


# ----------------------------------------------------------------------------------------------
# Front end: any PCM → 16 kHz mono 20 ms frames with times and voiced flags


class EnergyGate:
    """Frames too quiet to be speech: below the absolute floor or not clearly above the noise.

    The noise level is the quietest frame of the last ``NOISE_WINDOW_S`` (a running minimum),
    so it follows a louder room within that window and a quieter one at once.
    """

    def __init__(self, options: VadOptions | None = None) -> None:
        options = options or VadOptions()
        self.floor_dbfs = options.energy_floor_dbfs
        self.margin_db = options.noise_margin_db
        self._span = round(NOISE_WINDOW_S / FRAME_S)
        self._minima: deque[tuple[int, float]] = deque()  # (frame index, level), increasing
        self._index = 0

    @property
    def noise_dbfs(self) -> float | None:
        """The current background level, or None before the first frame."""
        return self._minima[0][1] if self._minima else None

    def passes(self, frame: bytes) -> bool:
        """Whether ``frame`` (16-bit PCM) is loud enough to be speech; updates the background."""
        return self.measure(frame) is not None

    def measure(self, frame: bytes) -> tuple[float, float] | None:
        """Like :meth:`passes`, but a passing frame gives where in it the sound is: from the
        start of its first to the end of its last ``BLOCK_MS`` block above the threshold, in
        seconds from the frame's start (16 kHz). None when the frame does not pass."""
        x = np.frombuffer(frame, dtype="<i2").astype(np.float32)
        level = _dbfs(float(np.dot(x, x)) / max(len(x), 1))
        threshold = self.floor_dbfs
        if self.margin_db is not None:
            index, minima = self._index, self._minima
            self._index += 1
            while minima and minima[-1][1] >= level:
                minima.pop()
            minima.append((index, level))
            if minima[0][0] <= index - self._span:
                minima.popleft()
            threshold = max(threshold, minima[0][1] + self.margin_db)
        if level < threshold:
            return None
        blocks = len(x) // _BLOCK
        if blocks < 2 or len(x) % _BLOCK:
            return (0.0, len(x) / VAD_RATE)  # not whole blocks: the frame as a whole
        b = x.reshape(blocks, _BLOCK)
        energies = (b * b).sum(axis=1).tolist()
        least = _BLOCK * 32768.0**2 * 10.0 ** (threshold / 10.0)
        above = [i for i, e in enumerate(energies) if e >= least]
        if not above:  # rounding: the mean passed, so the loudest block is at the threshold
            above = [energies.index(max(energies))]
        return (above[0] * BLOCK_MS / 1000.0, (above[-1] + 1) * BLOCK_MS / 1000.0)


def _dbfs(power: float) -> float:
    """Mean square of 16-bit samples → dBFS (-120 for digital silence)."""
    return 10.0 * math.log10(power / 32768.0**2) if power > 0 else -120.0


class VadFrontEnd:
    """Resamples, re-frames and classifies audio; keeps each frame's capture time.

    Frame times count 20 ms steps from the first chunk's ``capture_time``. A chunk that starts
    more than one frame later than the audio so far reaches (lost audio, a paused stream) moves
    the count forward; smaller differences are capture jitter and are ignored.
    """

    def __init__(self, options: VadOptions | None = None) -> None:
        options = options or VadOptions()
        self._vad = webrtcvad.Vad(options.aggressiveness)
        self.gate = EnergyGate(options)
        self._reframer = Reframer(VAD_RATE, FRAME_MS)
        self._resampler: Resampler | None = None
        self._format: tuple[int, int] | None = None
        self._t0: float | None = None  # capture time of frame 0
        self._frames = 0  # frames emitted so far
        self._in_expected = 0.0  # capture time where the next input chunk should begin

    def is_voiced(self, frame: bytes) -> bool:
        """Both the energy gate and webrtcvad must say speech."""
        return self.classify(frame)[0]

    def classify(self, frame: bytes) -> tuple[bool, tuple[float, float] | None]:
        """(voiced, loud) for one 20 ms frame: see :class:`VadFrame`.

        webrtcvad sees every frame, gated or not: it adapts its own noise model and hangover
        to the continuous signal, and skipping frames makes its decisions worse.
        """
        speech = self._vad.is_speech(frame, VAD_RATE)
        loud = self.gate.measure(frame)
        return loud is not None and bool(speech), loud

    def push(
        self, pcm: bytes, sample_rate: int, channels: int, capture_time: float
    ) -> list[VadFrame]:
        """Add one chunk of 16-bit interleaved PCM captured at ``capture_time``."""
        if sample_rate <= 0 or channels <= 0:
            raise ValueError(
                f"audio chunk needs a positive rate and channels, got {sample_rate} Hz × {channels}"
            )
        out: list[bytes] = []
        if self._t0 is None:
            self._t0 = capture_time
            self._in_expected = capture_time
        elif capture_time - self._in_expected > FRAME_S + _EPS:
            self._t0 += capture_time - self._in_expected
            self._in_expected = capture_time
        if self._format != (sample_rate, channels):
            if self._resampler is not None:
                out.append(self._resampler.flush())
            self._resampler = Resampler(sample_rate, VAD_RATE)
            self._format = (sample_rate, channels)
        assert self._resampler is not None
        mono = to_mono(pcm, channels)
        self._in_expected += len(mono) / 2 / sample_rate
        out.append(self._resampler.process(mono))
        return self._frame(b"".join(out))

    def behind_by(self, capture_time: float) -> float:
        """How far ``capture_time`` is behind where this front end expects the next chunk."""
        return 0.0 if self._t0 is None else self._in_expected - capture_time

    def reanchor(self, capture_time: float) -> None:
        """Follow a capture clock that moved back (a burst of queued packets stamped on arrival
        ran the audio clock ahead of it): frames from now on are timed from ``capture_time``."""
        if self._t0 is not None:
            self._t0 -= self._in_expected - capture_time
            self._in_expected = capture_time

    def flush(self) -> list[VadFrame]:
        """Drain the resampler and pad the last partial frame with silence."""
        tail = self._resampler.flush() if self._resampler is not None else b""
        frames = self._frame(tail)
        last = self._reframer.flush(pad=True)
        if last is not None:
            frames.extend(self._classified([last]))
        return frames

    def _frame(self, pcm: bytes) -> list[VadFrame]:
        return self._classified(self._reframer.push(pcm)) if pcm else []

    def _classified(self, frames: list[bytes]) -> list[VadFrame]:
        t0 = self._t0 or 0.0
        out = []
        for pcm in frames:
            voiced, loud = self.classify(pcm)
            out.append(VadFrame(t0 + self._frames * FRAME_S, pcm, voiced, loud))
            self._frames += 1
        return out


# ----------------------------------------------------------------------------------------------
# The stage


class VadStage:
    """Endpointing and barge-in on the candidate's audio.

    Takes ``AudioChunk`` frames of any rate and channel count; emits ``UserSpeechStarted``,
    ``UserSpeechStopped`` and ``UserTurn`` (16 kHz mono PCM from ``preroll_ms`` before the
    speech start to its end). Other frames pass through unchanged; audio chunks pass through
    too only with ``forward_audio`` (for a downstream that wants the live stream).
    """

    def __init__(
        self,
        options: VadOptions | None = None,
        *,
        agent: AgentSpeech | None = None,
        name: str = "vad",
        forward_audio: bool = False,
    ) -> None:
        self.name = name
        self.options = options or VadOptions()
        self.agent = agent if agent is not None else AgentSpeech()
        self.forward_audio = forward_audio
        self.turns = 0
        """User turns started so far; turn ids are 1, 2, … and go on across restarts."""

    def agent_started(self, at: float) -> None:
        """Shortcut for ``self.agent.started(at)``."""
        self.agent.started(at)

    def agent_stopped(self, at: float | None = None) -> None:
        """Shortcut for ``self.agent.stopped(at)``."""
        self.agent.stopped(at)

    async def run(self, ctx: CallContext, inbox: Inbox, outbox: Outbox) -> None:
        front = VadFrontEnd(self.options)
        turns = _TurnBuilder(self, ctx)
        async for frame in inbox:
            if isinstance(frame, AudioChunk):
                if self.forward_audio:
                    await outbox.send(frame)
                if (
                    front.behind_by(frame.capture_time) > REANCHOR_S
                    and turns.machine.state is VadState.QUIET
                ):
                    front.reanchor(frame.capture_time)
                vad_frames = front.push(
                    frame.pcm, frame.sample_rate, frame.channels, frame.capture_time
                )
                for out in turns.feed(vad_frames):
                    await outbox.send(out)
            else:
                await outbox.send(frame)
        for out in turns.feed(front.flush()) + turns.finish():
            await outbox.send(out)


class _TurnBuilder:
    """One run's state: the machine, the pre-roll ring, the open turn's audio, barge-in."""

    def __init__(self, stage: VadStage, ctx: CallContext) -> None:
        options = stage.options
        self.stage, self.ctx = stage, ctx
        self.machine = VadStateMachine(options)
        self.barge_in = BargeInPolicy(options)
        self.preroll_s = options.preroll_ms / 1000.0
        self.ring: deque[tuple[float, bytes]] = deque(
            # the starting run (voiced frames and the gaps between them) plus the pre-roll
            maxlen=options.preroll_frames
            + options.start_frames * (_frames(options.start_gap_ms) + 1)
        )
        self.audio: list[tuple[float, bytes]] | None = None
        self.turn_id = 0

    def feed(self, frames: list[VadFrame]) -> list[Any]:
        out: list[Any] = []
        machine, agent = self.machine, self.stage.agent
        for f in frames:
            events = machine.push(f.voiced, f.t)
            (self.ring if self.audio is None else self.audio).append((f.t, f.pcm))
            for event in events:
                out.extend(self._on_event(event))
            if self.barge_in.push(machine, f, agent.started_at if agent.speaking else None):
                self.ctx.log.info("barge-in on user turn %d", self.turn_id)
                self.ctx.control.interrupt("barge-in")
        return out

    def finish(self) -> list[Any]:
        return [frame for event in self.machine.flush() for frame in self._on_event(event)]

    def _on_event(self, event: VadEvent) -> list[Any]:
        if isinstance(event, SpeechStart):
            self.stage.turns += 1
            self.turn_id = self.stage.turns
            cut = event.start - self.preroll_s - _EPS
            self.audio = [(t, pcm) for t, pcm in self.ring if t >= cut]
            self.ring.clear()
            return [UserSpeechStarted(self.turn_id, event.start)]
        turn_id, ctx = self.turn_id, self.ctx
        audio, self.audio = self.audio or [], None
        pcm = b"".join(p for t, p in audio if t < event.end - _EPS)
        self.ring.extend(x for x in audio if x[0] >= event.end - _EPS)  # the next pre-roll
        ctx.timeline.mark(turn_id, "speech_end", event.end)
        ctx.mark(turn_id, "turn_committed")
        ctx.log.debug(
            "user turn %d: %.3f-%.3f s (%s)", turn_id, event.start, event.end, event.reason
        )
        return [
            UserSpeechStopped(turn_id, event.end),
            UserTurn(turn_id, pcm, VAD_RATE, event.start, event.end),
        ]


# ----------------------------------------------------------------------------------------------
# Offline: segments of a whole file (the CLI, tests, benchmarks)


@dataclass(frozen=True, slots=True)
class Segment:
    """One detected utterance, in seconds from the start of the audio."""

    start: float
    end: float
    committed_at: float

    def as_ms(self) -> dict[str, int]:
        return {"start_ms": round(self.start * 1000), "end_ms": round(self.end * 1000)}


def detect_segments(audio: WavAudio, options: VadOptions | None = None) -> list[Segment]:
    """Run the stage's exact front end and state machine over decoded audio, as fast as it goes."""
    front = VadFrontEnd(options)
    machine = VadStateMachine(options)
    frames = front.push(audio.pcm, audio.sample_rate, audio.channels, 0.0) + front.flush()
    events = [e for f in frames for e in machine.push(f.voiced, f.t)] + machine.flush()
    return [Segment(e.start, e.end, e.committed_at) for e in events if isinstance(e, SpeechEnd)]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, exit status 2
        self.exit(2, f"{self.prog}: error: {message}\n")


def _parser() -> argparse.ArgumentParser:
    d = VadOptions()
    p = _Parser(
        prog="python -m stages.vad",
        description="Print the speech segments of a WAV file (any rate, mono or stereo), "
        "found by the same webrtcvad endpointing the live pipeline uses.",
    )
    p.add_argument("file", metavar="FILE.wav", help="the WAV file to analyse")
    p.add_argument(
        "--stop-ms",
        type=int,
        default=d.stop_ms,
        help=f"hangover: silence that ends a turn (default {d.stop_ms})",
    )
    p.add_argument(
        "--start-ms",
        type=int,
        default=d.start_ms,
        help=f"voiced time that starts speech (default {d.start_ms})",
    )
    p.add_argument(
        "--aggressiveness",
        type=int,
        default=d.aggressiveness,
        help=f"webrtcvad mode 0-3 (default {d.aggressiveness})",
    )
    p.add_argument(
        "--energy-floor-dbfs",
        type=float,
        default=d.energy_floor_dbfs,
        help=f"frames below this RMS level are silence (default {d.energy_floor_dbfs})",
    )
    p.add_argument(
        "--json",
        action="store_true",
        help='print {"segments": [{"start_ms", "end_ms"}, ...]} instead of a table',
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status (2 for bad arguments or an unusable file)."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        options = VadOptions(
            aggressiveness=args.aggressiveness,
            start_ms=args.start_ms,
            stop_ms=args.stop_ms,
            energy_floor_dbfs=args.energy_floor_dbfs,
        )
    except ValueError as exc:
        parser.error(str(exc).replace("VadOptions.", "--").replace("_", "-"))
    try:
        audio = read_wav(args.file)
    except (AudioFileError, OSError, ValueError) as exc:
        print(f"{parser.prog}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    segments = detect_segments(audio, options)
    if args.json:
        print(json.dumps({"segments": [s.as_ms() for s in segments]}))
        return 0
    print(
        f"{args.file}: {audio.duration:.2f} s, {audio.sample_rate} Hz, "
        f"{audio.channels} channel(s); {len(segments)} segment(s)"
    )
    if segments:
        print(f"{'#':>3}  {'start':>9}  {'end':>9}  {'length':>8}")
        for i, s in enumerate(segments, 1):
            print(f"{i:>3}  {s.start:>8.3f}s  {s.end:>8.3f}s  {s.end - s.start:>7.3f}s")
    return 0


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


if __name__ == "__main__":
    sys.exit(main())
