"""Barge-in: user speech over the agent's voice interrupts it; coughs and short sounds do not.

The pure policy gets hypothesis properties; the stage runs in a graph on a virtual clock, with
the microphone played at capture pace and the agent's playback driven by a schedule.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.audio import WavAudio, read_wav
from pipeline.clock import VirtualClock
from pipeline.control import Interrupt
from pipeline.frames import AudioChunk, UserSpeechStarted, UserTurn
from pipeline.graph import Graph
from pipeline.stage import CallContext, Collect, Inbox, Outbox
from pipeline.supervisor import Supervisor
from stages.vad import (
    BLOCK_MS,
    FRAME_S,
    AgentSpeech,
    BargeInPolicy,
    VadFrame,
    VadOptions,
    VadStage,
    VadStateMachine,
)

FIXTURES = Path(__file__).parent / "fixtures"
LAYOUT = json.loads((FIXTURES / "layout.json").read_text())
RATE = 16000
TOLERANCE_S = 0.060  # the fixtures' boundary tolerance


# ----------------------------------------------------------------------------------------------
# The pure policy

FULL = (0.0, FRAME_S)  # a frame loud from its first block to its last
Loud = tuple[float, float] | None


def frame(i: int, voiced: bool, loud: Loud = None) -> VadFrame:
    return VadFrame(i * FRAME_S, b"", voiced, loud if loud is not None or not voiced else FULL)


def drive(
    options: VadOptions, frames: list[VadFrame], agent_at: float | None = 0.0
) -> tuple[VadStateMachine, BargeInPolicy, list[int]]:
    """Feed frames; returns the machine, the policy and the indices of the frames that fired."""
    machine, policy = VadStateMachine(options), BargeInPolicy(options)
    fired = []
    for i, f in enumerate(frames):
        machine.push(f.voiced, f.t)
        speaking = agent_at if agent_at is not None and f.t >= agent_at - 1e-9 else None
        if policy.push(machine, f, speaking):
            fired.append(i)
    return machine, policy, fired


@settings(max_examples=300, deadline=None)
@given(
    runs=st.lists(st.tuples(st.booleans(), st.integers(1, 40)), min_size=1, max_size=30),
    agent_frame=st.integers(0, 200),
    guard_frames=st.integers(0, 30),
    min_frames=st.integers(0, 40),
    lookback_ms=st.integers(0, 200),
    tail_ms=st.integers(0, 200),
)
def test_policy_fires_once_per_long_enough_utterance(
    runs: list[tuple[bool, int]],
    agent_frame: int,
    guard_frames: int,
    min_frames: int,
    lookback_ms: int,
    tail_ms: int,
) -> None:
    """When the energy agrees with webrtcvad (every voiced frame loud, the rest quiet), the
    utterance's counted speech runs from its first to its last voiced frame."""
    flags = [v for v, n in runs for _ in range(n)]
    options = VadOptions(
        start_ms=100,
        stop_ms=200,
        interrupt_min_ms=min_frames * 20,
        echo_guard_ms=guard_frames * 20,
        interrupt_lookback_ms=lookback_ms,
        interrupt_tail_ms=tail_ms,
    )
    machine, policy = VadStateMachine(options), BargeInPolicy(options)
    agent_at = agent_frame * FRAME_S
    guard_end = agent_at + options.echo_guard_ms / 1000
    need = options.interrupt_min_ms / 1000
    fired: dict[int, float] = {}  # utterance → frame end at which it fired
    extent: dict[int, float] = {}  # utterance → longest counted speech seen
    for i, voiced in enumerate(flags):
        t = i * FRAME_S
        machine.push(voiced, t)
        speaking_agent = agent_at if t >= agent_at else None
        fire = policy.push(machine, frame(i, voiced), speaking_agent)
        u = machine.utterances
        if machine.in_speech and speaking_agent is not None:
            assert machine.run_start is not None and machine.last_voiced_end is not None
            counted = machine.last_voiced_end - max(machine.run_start, guard_end)
            extent[u] = max(extent.get(u, -1.0), counted)
        if fire:
            assert u not in fired, "at most one interrupt per utterance"
            fired[u] = t + FRAME_S
            assert extent[u] >= need - 1e-9, "never for speech shorter than interrupt_min_ms"
        elif machine.in_speech and u in extent and u not in fired:
            assert extent[u] < need - 1e-9 or not voiced, (
                "fires as soon as the speech is long enough"
            )
    for u, longest in extent.items():
        assert (u in fired) == (longest >= need - 1e-9)


@st.composite
def loud_frames(draw: Any) -> tuple[bool, Loud]:
    """One frame of a sound: quiet, or loud over some of its 5 ms blocks, maybe voiced."""
    if not draw(st.booleans()):
        return False, None
    a, b = sorted(draw(st.tuples(st.integers(0, 3), st.integers(0, 3))))
    return draw(st.booleans()), (a * BLOCK_MS / 1000, (b + 1) * BLOCK_MS / 1000)


def extent_s(sound: list[tuple[bool, Loud]]) -> float:
    """From the first loud instant of a sound to its last."""
    spans = [
        (i * FRAME_S + loud[0], i * FRAME_S + loud[1]) for i, (_, loud) in enumerate(sound) if loud
    ]
    return spans[-1][1] - spans[0][0] if spans else 0.0


@settings(max_examples=400, deadline=None)
@given(
    sounds=st.lists(st.lists(loud_frames(), min_size=1, max_size=20), min_size=1, max_size=4),
    slack_ms=st.integers(1, 40),
    start_frames=st.integers(1, 6),
    stop_frames=st.integers(1, 15),
    lookback_ms=st.integers(0, 200),
    tail_ms=st.integers(0, 200),
    guard_ms=st.sampled_from([0, 0, 100]),
    agent_frame=st.integers(0, 30),
)
def test_a_sound_shorter_than_interrupt_min_never_interrupts(
    sounds: list[list[tuple[bool, Loud]]],
    slack_ms: int,
    start_frames: int,
    stop_frames: int,
    lookback_ms: int,
    tail_ms: int,
    guard_ms: int,
    agent_frame: int,
) -> None:
    """Whatever webrtcvad says and however the energy rises and falls inside a sound: if the
    sound's loud part, first instant to last, is shorter than interrupt_min_ms, no interrupt.
    The sounds are apart by more than the hangover, the look-back and the tail."""
    longest = max(extent_s(sound) for sound in sounds)
    options = VadOptions(
        start_ms=start_frames * 20,
        stop_ms=stop_frames * 20,
        start_gap_ms=40,
        interrupt_min_ms=round(longest * 1000) + slack_ms,
        interrupt_lookback_ms=lookback_ms,
        interrupt_tail_ms=tail_ms,
        echo_guard_ms=guard_ms,
    )
    apart = [(False, None)] * (stop_frames + (max(lookback_ms, tail_ms) + 59) // 20)
    track = apart + [f for sound in sounds for f in sound + apart]
    frames = [
        VadFrame(i * FRAME_S, b"", voiced and loud is not None, loud)
        for i, (voiced, loud) in enumerate(track)
    ]
    _, _, fired = drive(options, frames, agent_frame * FRAME_S)
    assert fired == []


@settings(max_examples=300, deadline=None)
@given(
    track=st.lists(loud_frames(), min_size=1, max_size=120),
    min_frames=st.integers(0, 20),
    lookback_ms=st.integers(0, 200),
    tail_ms=st.integers(0, 200),
    agent_frame=st.integers(0, 60),
)
def test_policy_counts_only_loud_audio_next_to_the_utterance(
    track: list[tuple[bool, Loud]],
    min_frames: int,
    lookback_ms: int,
    tail_ms: int,
    agent_frame: int,
) -> None:
    """The onset is the start of an unbroken run of loud frames ending at the utterance's
    first voiced frame, within the look-back; the end is within the tail of a voiced frame;
    it fires exactly when that span reaches interrupt_min_ms, once per utterance."""
    options = VadOptions(
        start_ms=60,
        stop_ms=100,
        interrupt_min_ms=min_frames * 20,
        interrupt_lookback_ms=lookback_ms,
        interrupt_tail_ms=tail_ms,
    )
    frames = [
        VadFrame(i * FRAME_S, b"", v and loud is not None, loud)
        for i, (v, loud) in enumerate(track)
    ]
    machine, policy = VadStateMachine(options), BargeInPolicy(options)
    agent_at = agent_frame * FRAME_S
    fired: set[int] = set()
    for f in frames:
        machine.push(f.voiced, f.t)
        speaking = agent_at if f.t >= agent_at else None
        fire = policy.push(machine, f, speaking)
        if machine.run_start is None:
            assert not fire
            continue
        onset, end = policy.onset, policy.sound_end
        assert onset is not None and end is not None and machine.last_voiced_end is not None
        first = round(machine.run_start / FRAME_S)
        assert frames[first].voiced
        j = math.floor((onset + 1e-9) / FRAME_S)  # the frame the onset lies in
        loud = frames[j].loud
        assert loud is not None and onset == pytest.approx(j * FRAME_S + loud[0])
        assert machine.run_start - j * FRAME_S <= lookback_ms / 1000 + 1e-9
        assert all(frames[k].loud is not None for k in range(j, first)), "an unbroken loud run"
        if j > 0 and frames[j - 1].loud is not None:
            assert machine.run_start - (j - 1) * FRAME_S > lookback_ms / 1000, "as far as allowed"
        assert end <= f.t + FRAME_S + 1e-9
        assert end <= machine.last_voiced_end + tail_ms / 1000 + 1e-9
        u = machine.utterances
        due = (
            machine.in_speech
            and speaking is not None
            and u not in fired
            and end - max(onset, agent_at) >= options.interrupt_min_ms / 1000 - 1e-9
        )
        assert fire == due
        if fire:
            fired.add(u)


def test_a_quiet_onset_counts_from_its_energy() -> None:
    """webrtcvad voices the sound only from frame 3; the energy rose in frame 0, 10 ms in."""
    options = VadOptions(start_ms=100, interrupt_min_ms=300)
    lead = [frame(0, False, (0.010, FRAME_S)), frame(1, False, FULL), frame(2, False, FULL)]
    frames = lead + [frame(i, True) for i in range(3, 40)]
    _, policy, fired = drive(options, frames)
    assert policy.onset == pytest.approx(0.010)
    assert fired == [15]  # frame 15 ends at 320 ms: the first frame end ≥ 10 + 300 ms
    # counted from the first voiced frame instead: 60 ms + 300 ms
    _, _, fired = drive(VadOptions(start_ms=100, interrupt_lookback_ms=0), frames)
    assert fired == [17]


def test_the_look_back_is_bounded_and_needs_unbroken_loud_audio() -> None:
    options = VadOptions(start_ms=100, interrupt_min_ms=300, interrupt_lookback_ms=100)
    frames = [frame(i, False, FULL) for i in range(10)] + [frame(i, True) for i in range(10, 40)]
    _, policy, fired = drive(options, frames)
    assert policy.onset == pytest.approx(0.100)  # 5 frames back from the first voiced one
    assert fired == [19]
    broken = [*frames[:7], frame(7, False), *frames[8:]]  # a quiet frame 60 ms before speech
    _, policy, fired = drive(options, broken)
    assert policy.onset == pytest.approx(0.160)
    assert fired == [22]
    # lost audio between the lead-in and the speech: not one sound
    gap = [VadFrame(f.t + (0.5 if f.voiced else 0.0), f.pcm, f.voiced, f.loud) for f in frames]
    _, policy, _ = drive(options, gap)
    assert policy.onset == pytest.approx(0.700)


def test_loud_frames_after_voiced_ones_carry_the_count() -> None:
    """An unvoiced consonant right where the count reaches interrupt_min_ms."""
    options = VadOptions(start_ms=100, interrupt_min_ms=300, interrupt_tail_ms=100)
    speech = [frame(i, True) for i in range(12)]  # 240 ms voiced
    consonant = [frame(12, False, FULL), frame(13, False), frame(14, False, (0.0, 0.015))]
    frames = speech + consonant + [frame(i, False) for i in range(15, 30)]
    _, policy, fired = drive(options, frames)
    assert fired == [] and policy.sound_end == pytest.approx(0.295)  # 295 ms is not enough
    frames[14] = frame(14, False, (0.0, FRAME_S))
    _, _, fired = drive(options, frames)
    assert fired == [14]
    # two quiet frames in a row end the sound
    two_holes = [*speech, frame(12, False, FULL), frame(13, False), frame(14, False)]
    later = [*two_holes, frame(15, False, FULL)] + [frame(i, False) for i in range(16, 30)]
    assert drive(options, later)[2] == []
    # frame 14 starts 60 ms after the last voiced frame: inside a 60 ms tail, not a 40 ms one
    for tail_ms, expected in ((60, [14]), (40, []), (0, [])):
        tail = VadOptions(start_ms=100, interrupt_min_ms=300, interrupt_tail_ms=tail_ms)
        assert drive(tail, frames)[2] == expected, tail_ms


def test_policy_ignores_silence_and_agent_not_speaking() -> None:
    options = VadOptions(start_ms=40, interrupt_min_ms=40)
    machine, policy = VadStateMachine(options), BargeInPolicy(options)
    for i in range(10):
        machine.push(True, i * FRAME_S)
        assert not policy.push(machine, frame(i, True), None)
    machine.push(True, 10 * FRAME_S)
    assert policy.push(machine, frame(10, True), 0.0)


def test_agent_speech_keeps_the_first_start() -> None:
    agent = AgentSpeech()
    agent.started(5.0)
    agent.started(6.0)
    assert (agent.speaking, agent.started_at) == (True, 5.0)
    agent.stopped()
    assert (agent.speaking, agent.started_at) == (False, None)
    vad = VadStage(agent=agent)
    vad.agent_started(7.0)
    assert agent.started_at == 7.0
    vad.agent_stopped()
    assert not agent.speaking


# ----------------------------------------------------------------------------------------------
# Through a graph on a virtual clock


class Mic:
    """Plays 16 kHz mono PCM in 20 ms chunks at capture pace; capture_time = clock at start."""

    name = "mic"

    def __init__(self, pcm: bytes, t0: float) -> None:
        self.pcm, self.t0 = pcm, t0

    async def run(self, ctx: CallContext, inbox: Inbox, outbox: Outbox) -> None:
        step = RATE // 50 * 2
        for offset in range(0, len(self.pcm), step):
            start = self.t0 + offset / (2 * RATE)
            piece = self.pcm[offset : offset + step]
            await ctx.clock.sleep_until(start + len(piece) / (2 * RATE))
            await outbox.send(AudioChunk(piece, RATE, start))


class AgentPlayback:
    """Stands in for the pacer: marks the agent speaking over ``[start, end)`` (seconds from
    t0) and, like the pacer, stops speaking when interrupted (unless ``keep_talking``)."""

    name = "agent"

    def __init__(
        self, agent: AgentSpeech, t0: float, spans: list[tuple[float, float]], keep_talking: bool
    ) -> None:
        self.agent, self.t0, self.spans, self.keep_talking = agent, t0, spans, keep_talking

    async def run(self, ctx: CallContext, inbox: Inbox, outbox: Outbox) -> None:
        if not self.keep_talking:
            ctx.control.subscribe(lambda _: self.agent.stopped())
        for start, end in self.spans:
            await ctx.clock.sleep_until(self.t0 + start)
            self.agent.started(ctx.clock.now())
            await ctx.clock.sleep_until(self.t0 + end)
            self.agent.stopped()


def run_call(
    pcm: bytes,
    agent_spans: list[tuple[float, float]],
    options: VadOptions | None = None,
    keep_talking: bool = False,
) -> tuple[CallContext, list[Interrupt], list[Any], float]:
    clock = VirtualClock()
    ctx = CallContext(clock=clock)
    interrupts: list[Interrupt] = []
    ctx.control.subscribe(interrupts.append)
    sink = Collect()

    async def main() -> float:
        t0 = clock.now()
        agent = AgentSpeech()
        graph = Graph().chain(Mic(pcm, t0), VadStage(options, agent=agent), sink)
        graph.add(AgentPlayback(agent, t0, agent_spans, keep_talking))
        with anyio.fail_after(120):
            result = await Supervisor(ctx, graph).run()
        assert result.status == "completed", result.reason
        return t0

    t0 = clock.run(main)
    return ctx, interrupts, sink.frames, t0


def fixture(name: str) -> tuple[WavAudio, dict[str, Any]]:
    return read_wav(FIXTURES / name), LAYOUT["files"][name]


def utterance_pcm(name: str, index: int = 0) -> bytes:
    audio, spec = fixture(name)
    u = spec["utterances"][index]
    a, b = round(u["start_ms"] * RATE / 1000), round(u["end_ms"] * RATE / 1000)
    return audio.pcm[2 * a : 2 * b]


def silence_s(seconds: float) -> bytes:
    return bytes(round(seconds * RATE) * 2)


def test_bargein_fixture_interrupts_once_after_interrupt_min_ms() -> None:
    audio, spec = fixture("bargein.wav")
    playback = spec["agent_playback"][0]
    span = (playback["start_ms"] / 1000, playback["end_ms"] / 1000)
    options = VadOptions()
    ctx, interrupts, frames, t0 = run_call(audio.pcm, [span], options)
    assert ctx.control.interrupts == 1 and ctx.control.epoch == 1
    (event,) = interrupts
    assert event.reason == "barge-in"
    speech_start = spec["utterances"][0]["start_ms"] / 1000
    reaction = event.at - t0 - speech_start
    low = options.interrupt_min_ms / 1000 - TOLERANCE_S
    assert low <= reaction <= options.interrupt_min_ms / 1000 + TOLERANCE_S + FRAME_S
    # the cough during playback started nothing: the only turn is the interruption
    assert len([f for f in frames if isinstance(f, UserTurn)]) == 1


def test_no_interrupt_while_the_agent_is_silent() -> None:
    audio, _ = fixture("bargein.wav")
    ctx, interrupts, frames, _ = run_call(audio.pcm, [])
    assert ctx.control.interrupts == 0 and not interrupts
    assert len([f for f in frames if isinstance(f, UserTurn)]) == 1
    ctx, _, _, _ = run_call(audio.pcm, [(0.2, 0.6)])  # the agent finished before the user spoke
    assert ctx.control.interrupts == 0


def test_speech_shorter_than_interrupt_min_does_not_interrupt() -> None:
    clip = utterance_pcm("answer_single.wav")
    short = clip[: round(0.26 * RATE) * 2]  # long enough to start a turn, not to interrupt
    pcm = silence_s(1.0) + short + silence_s(1.5)
    ctx, _, frames, _ = run_call(pcm, [(0.5, 3.0)])
    assert any(isinstance(f, UserSpeechStarted) for f in frames)
    assert ctx.control.interrupts == 0
    longer = clip[: round(0.6 * RATE) * 2]
    ctx, _, _, _ = run_call(silence_s(1.0) + longer + silence_s(1.5), [(0.5, 3.0)])
    assert ctx.control.interrupts == 1


def test_a_cough_during_playback_does_not_interrupt() -> None:
    audio, spec = fixture("cough_blip.wav")
    blip = spec["blips"][0]
    a, b = round(blip["start_ms"] * 16) * 2, round(blip["end_ms"] * 16) * 2
    pcm = silence_s(0.8) + audio.pcm[a:b] + silence_s(0.3) + audio.pcm[a:b] + silence_s(1.0)
    ctx, _, frames, _ = run_call(pcm, [(0.2, 2.5)], VadOptions(interrupt_min_ms=0))
    assert ctx.control.interrupts == 0
    assert not any(isinstance(f, UserSpeechStarted) for f in frames)


def test_echo_guard_holds_off_barge_in_after_the_agent_starts() -> None:
    clip = utterance_pcm("answer_single.wav")
    pcm = silence_s(1.0) + clip + silence_s(1.0)
    agent_start = 0.9  # the user starts talking 100 ms after the agent
    speech_start = 1.0  # where the clip is placed in this track
    unguarded = VadOptions(interrupt_min_ms=300)
    _, (event,), _, t0 = run_call(pcm, [(agent_start, 6.0)], unguarded)
    assert abs(event.at - t0 - (speech_start + 0.3)) <= TOLERANCE_S + FRAME_S
    guarded = VadOptions(interrupt_min_ms=300, echo_guard_ms=1000)
    _, (event,), _, t0 = run_call(pcm, [(agent_start, 6.0)], guarded)
    # counted from the guard's end (agent start + 1 s), not from the speech start
    expected = agent_start + 1.0 + 0.3
    assert expected - 1e-6 <= event.at - t0 <= expected + FRAME_S + 1e-6
    short = silence_s(1.0) + clip[: round(0.9 * RATE) * 2] + silence_s(1.0)
    ctx, _, _, _ = run_call(short, [(agent_start, 6.0)], guarded)
    assert ctx.control.interrupts == 0  # the speech was over before guard end + 300 ms


def test_one_interrupt_per_utterance() -> None:
    clip = utterance_pcm("answer_single.wav")
    ctx, _, _, _ = run_call(silence_s(1.0) + clip + silence_s(1.0), [(0.5, 6.0)], keep_talking=True)
    assert ctx.control.interrupts == 1  # a 3.7 s utterance still interrupts once
    two, _ = fixture("answers_two.wav")
    ctx, interrupts, _, t0 = run_call(two.pcm, [(0.2, 7.0)], keep_talking=True)
    assert ctx.control.interrupts == 2 and ctx.control.epoch == 2
    starts = [u["start_ms"] / 1000 for u in LAYOUT["files"]["answers_two.wav"]["utterances"]]
    for event, start in zip(interrupts, starts, strict=True):
        assert abs(event.at - t0 - (start + 0.3)) <= TOLERANCE_S + FRAME_S
    # a pacer that stops on interrupt is not interrupted again by the rest of the answer
    ctx, _, _, _ = run_call(two.pcm, [(0.2, 7.0)], keep_talking=False)
    assert ctx.control.interrupts == 1


def test_quiet_room_noise_never_interrupts() -> None:
    rng = np.random.default_rng(7)
    noise = rng.normal(0, 10 ** (-45 / 20) * 32768, 5 * RATE)
    pcm = np.clip(np.rint(noise), -32768, 32767).astype("<i2").tobytes()
    ctx, _, frames, _ = run_call(pcm, [(0.0, 5.0)])
    assert ctx.control.interrupts == 0 and not frames


def noisy(pcm: bytes, kind: str, seed: int) -> bytes:
    """``pcm`` with white (-45 dBFS) or pink (-42 dBFS) room noise added, as in the benchmark."""
    from fixtures.make_fixtures import pink_noise, white_noise

    x = np.frombuffer(pcm, "<i2").astype(np.float64)
    rng = np.random.default_rng(seed)
    if kind == "white":
        x = x + white_noise(len(x), -45.0, rng)
    elif kind == "pink":
        x = x + pink_noise(len(x), -42.0, rng)
    return np.clip(np.rint(x), -32768, 32767).astype("<i2").tobytes()


def placed(clip: bytes, at_s: float, total_s: float) -> bytes:
    lead = round(at_s * RATE) * 2
    return bytes(lead) + clip + bytes(round(total_s * RATE) * 2 - lead - len(clip))


def test_a_late_webrtcvad_onset_in_noise_is_timed_from_the_speech_itself() -> None:
    """In white noise webrtcvad voices "Sorry" 80 ms late and then misses a consonant near the
    300 ms mark; barge-in still reacts one frame at most after interrupt_min_ms of speech."""
    clip = utterance_pcm("bargein.wav")
    for start in (1.0, 1.007, 1.019):  # phases of the 20 ms frame grid
        pcm = noisy(placed(clip, start, 4.0), "white", seed=1)
        _, (event,), _, t0 = run_call(pcm, [(0.3, 4.0)])
        reaction = event.at - t0 - start
        assert 0.300 - 1e-6 <= reaction <= 0.300 + FRAME_S + 1e-6, (start, reaction)
    # counted from webrtcvad's voiced frames only, the same speech interrupts 240 ms later
    frames_only = VadOptions(interrupt_lookback_ms=0, interrupt_tail_ms=0)
    pcm = noisy(placed(clip, 1.0, 4.0), "white", seed=1)
    _, (event,), _, t0 = run_call(pcm, [(0.3, 4.0)], frames_only)
    assert event.at - t0 - 1.0 > 0.300 + 0.2


def fragment(clip: bytes, start_s: float, length_s: float) -> bytes:
    """A piece of speech with 5 ms fades: a sound exactly ``length_s`` long."""
    a = round(start_s * RATE)
    x = np.frombuffer(clip, "<i2")[a : a + round(length_s * RATE)].astype(np.float64)
    ramp = np.linspace(0.0, 1.0, RATE // 200)
    x[: len(ramp)] *= ramp
    x[-len(ramp) :] *= ramp[::-1]
    return np.rint(x).astype("<i2").tobytes()


def test_speech_just_shorter_than_interrupt_min_never_interrupts_over_echo_and_noise() -> None:
    """290 ms pieces of speech (word onsets and mid-sentence) over the agent's echo (bargein.wav
    before the candidate speaks, with its cough), in quiet, white and pink noise: never an
    interrupt. Half-second pieces of the same speech are one."""
    audio, spec = fixture("bargein.wav")
    echo = np.frombuffer(audio.pcm[: round(2.35 * RATE) * 2], "<i2").astype(np.int32)
    span = [(spec["agent_playback"][0]["start_ms"] / 1000, 2.35)]
    pieces = [
        ("answer_single.wav", 0.0, 0.29, 0),
        ("answers_two.wav", 0.0, 0.29, 0),
        ("answers_two.wav", 0.4, 0.29, 0),
        ("pause_short.wav", 0.0, 0.29, 0),
        ("answer_single.wav", 0.0, 0.5, 1),
        ("pause_short.wav", 0.0, 0.5, 1),
    ]
    for name, start, length, interrupts in pieces:
        piece = fragment(utterance_pcm(name), start, length)
        speech = np.frombuffer(placed(piece, 1.4, 2.35), "<i2")
        mixed = np.clip(echo + speech, -32768, 32767).astype("<i2").tobytes()
        for kind in ("quiet", "white", "pink"):
            ctx, _, _, _ = run_call(noisy(mixed, kind, seed=3), span)
            assert ctx.control.interrupts == interrupts, (name, start, length, kind)
