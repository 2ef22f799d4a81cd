"""VAD endpointing: state machine properties, the energy gate, the front end, fixture accuracy
and the stage in a graph on a virtual clock."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.audio import WavAudio, read_wav, resample
from pipeline.clock import VirtualClock
from pipeline.frames import (
    AgentTextDelta,
    AudioChunk,
    UserSpeechStarted,
    UserSpeechStopped,
    UserTurn,
)
from pipeline.graph import Graph
from pipeline.stage import CallContext, Collect, Inbox, Outbox
from pipeline.supervisor import Supervisor
from stages.vad import (
    BLOCK_MS,
    FRAME_S,
    NOISE_WINDOW_S,
    EnergyGate,
    SpeechEnd,
    SpeechStart,
    VadFrontEnd,
    VadOptions,
    VadStage,
    VadState,
    VadStateMachine,
    detect_segments,
)

FIXTURES = Path(__file__).parent / "fixtures"
LAYOUT = json.loads((FIXTURES / "layout.json").read_text())
TOLERANCE_MS = 60.0
T0 = 1000.0  # capture times start here, not at 0, to catch offset mistakes


# ----------------------------------------------------------------------------------------------
# The pure state machine: properties over random voiced/unvoiced sequences


def run_machine(
    flags: list[bool], options: VadOptions, t0: float = T0
) -> list[SpeechStart | SpeechEnd]:
    machine = VadStateMachine(options)
    events: list[SpeechStart | SpeechEnd] = []
    for i, voiced in enumerate(flags):
        events.extend(machine.push(voiced, t0 + i * FRAME_S))
    events.extend(machine.flush())
    return events


def frame_index(t: float, t0: float = T0) -> int:
    """The index of the frame starting at ``t`` (or ending at it, for ends)."""
    return round((t - t0) / FRAME_S)


@st.composite
def sequences(draw: Any) -> tuple[list[bool], VadOptions]:
    """Bursty voiced/unvoiced sequences (runs of random lengths) and options to match."""
    runs = draw(st.lists(st.tuples(st.booleans(), st.integers(1, 60)), min_size=1, max_size=40))
    flags = [voiced for voiced, n in runs for _ in range(n)]
    stop_ms = draw(st.integers(1, 50)) * 20 + draw(st.sampled_from([0, 0, 7]))
    options = VadOptions(
        start_ms=draw(st.integers(1, 15)) * 20,
        stop_ms=stop_ms,
        start_gap_ms=draw(st.integers(0, 300)),
        max_turn_s=1e6,
    )
    return flags, options


def segments_of(events: list[SpeechStart | SpeechEnd]) -> list[SpeechEnd]:
    starts = [e for e in events if isinstance(e, SpeechStart)]
    ends = [e for e in events if isinstance(e, SpeechEnd)]
    # events alternate start, end, start, end …, and each end belongs to the start before it
    assert [type(e) for e in events] == [SpeechStart, SpeechEnd] * len(ends)
    assert [s.start for s in starts] == [e.start for e in ends]
    return ends


@settings(max_examples=300, deadline=None)
@given(sequences())
def test_segments_never_overlap_and_last_at_least_start_ms(case: Any) -> None:
    flags, options = case
    segments = segments_of(run_machine(flags, options))
    for seg in segments:
        assert seg.end - seg.start >= options.start_ms / 1000 - 1e-9
        assert seg.committed_at >= seg.end
    for a, b in itertools.pairwise(segments):
        assert b.start >= a.committed_at - 1e-9  # the next turn begins after this one is done


@settings(max_examples=300, deadline=None)
@given(sequences())
def test_boundaries_are_voiced_frames_and_silence_shorter_than_stop_never_splits(
    case: Any,
) -> None:
    flags, options = case
    segments = segments_of(run_machine(flags, options))
    stop_frames = math.ceil(options.stop_ms / 20)
    for seg in segments:
        assert flags[frame_index(seg.start)], "a turn starts on a voiced frame"
        assert flags[frame_index(seg.end) - 1], "a turn ends at the end of a voiced frame"
        inside = flags[frame_index(seg.start) : frame_index(seg.end)]
        longest_silence = max((len(r) for r in "".join("x "[v] for v in inside).split()), default=0)
        assert longest_silence < stop_frames, "a pause shorter than stop_ms stays inside a turn"
    for a, b in itertools.pairwise(segments):
        assert frame_index(b.start) - frame_index(a.end) >= stop_frames


@settings(max_examples=300, deadline=None)
@given(sequences())
def test_turn_is_committed_stop_ms_after_the_last_voiced_frame(case: Any) -> None:
    flags, options = case
    segments = segments_of(run_machine(flags, options))
    for seg in segments:
        if seg.reason == "silence":
            hangover = seg.committed_at - seg.end
            assert options.stop_ms / 1000 - 1e-9 <= hangover < options.stop_ms / 1000 + FRAME_S
            assert not any(flags[frame_index(seg.end) : frame_index(seg.committed_at)])
        else:
            assert seg.reason == "end_of_stream"
            assert frame_index(seg.committed_at) == len(flags)


@settings(max_examples=300, deadline=None)
@given(sequences())
def test_no_speech_is_missed(case: Any) -> None:
    """Every voiced stretch of start_ms without a long gap lies inside some turn."""
    flags, options = case
    segments = segments_of(run_machine(flags, options))
    need = options.start_frames
    covered = [False] * len(flags)
    for seg in segments:
        for i in range(frame_index(seg.start), frame_index(seg.end)):
            covered[i] = True
    for i in range(len(flags) - need + 1):
        if all(flags[i : i + need]):
            assert all(covered[i : i + need]), f"voiced frames {i}..{i + need} not in a turn"


@settings(max_examples=200, deadline=None)
@given(sequences(), st.integers(1, 40))
def test_max_turn_cuts_long_turns(case: Any, max_frames: int) -> None:
    flags, options = case
    max_turn_s = max(max_frames * 20, options.longest_start_ms + 1) / 1000
    options = VadOptions(
        start_ms=options.start_ms,
        stop_ms=options.stop_ms,
        start_gap_ms=options.start_gap_ms,
        max_turn_s=max_turn_s,
    )
    segments = segments_of(run_machine(flags, options))
    for seg in segments:
        assert seg.committed_at - seg.start < max_turn_s + FRAME_S  # cut on a frame edge
        if seg.reason == "max_turn":
            assert seg.committed_at - seg.start >= max_turn_s - FRAME_S


def test_states_in_order() -> None:
    machine = VadStateMachine(VadOptions(start_ms=60, stop_ms=60, start_gap_ms=0))
    seen = []
    for i, voiced in enumerate([1, 1, 1, 0, 1, 0, 0, 0, 0]):
        machine.push(bool(voiced), i * FRAME_S)
        seen.append(machine.state)
    q, a, s, p = VadState.QUIET, VadState.STARTING, VadState.SPEAKING, VadState.STOPPING
    assert seen == [a, a, s, p, s, p, p, q, q]


def test_start_gap_bridges_short_gaps_only() -> None:
    options = VadOptions(start_ms=100, start_gap_ms=40)
    bridged = [True, True, False, False, True, True, True] + [False] * 40
    assert [e.start for e in segments_of(run_machine(bridged, options))] == [T0]
    broken = [True, True, False, False, False, True, True, True, True, True] + [False] * 40
    assert [e.start for e in segments_of(run_machine(broken, options))] == [T0 + 5 * FRAME_S]
    # a gap as long as the hangover would end a turn: it does not join a starting run either
    short_stop = VadOptions(start_ms=100, start_gap_ms=40, stop_ms=40)
    assert [e.start for e in segments_of(run_machine(bridged, short_stop))] == []


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("aggressiveness", 4),
        ("aggressiveness", -1),
        ("aggressiveness", 1.5),
        ("start_ms", 10),
        ("stop_ms", 0),
        ("start_gap_ms", -20),
        ("max_turn_s", 0.2),
        ("max_turn_s", float("nan")),
        ("preroll_ms", -20),
        ("energy_floor_dbfs", 3.0),
        ("noise_margin_db", -1.0),
        ("interrupt_min_ms", -1),
        ("echo_guard_ms", -5),
        ("interrupt_lookback_ms", -20),
        ("interrupt_lookback_ms", 1.5),
        ("interrupt_tail_ms", -1),
    ],
)
def test_bad_options_name_the_field(field: str, value: Any) -> None:
    with pytest.raises(ValueError, match=f"VadOptions.{field} must be"):
        VadOptions(**{field: value})


# ----------------------------------------------------------------------------------------------
# Energy gate and front end


def noise_frame(dbfs: float, seed: int) -> bytes:
    x = np.random.default_rng(seed).normal(0, 10 ** (dbfs / 20) * 32768, 320)
    return np.clip(np.rint(x), -32768, 32767).astype("<i2").tobytes()


def test_energy_gate_floor_and_noise_margin() -> None:
    gate = EnergyGate(VadOptions(energy_floor_dbfs=-50, noise_margin_db=6))
    assert not gate.passes(noise_frame(-60, 1))  # below the floor
    assert gate.noise_dbfs is not None and gate.noise_dbfs < -59
    # steady room noise above the floor becomes the background once the quiet frame is older
    # than the gate's window
    for seed in range(round(NOISE_WINDOW_S / FRAME_S) + 1):
        gate.passes(noise_frame(-40, seed))
    assert gate.noise_dbfs is not None and -42 < gate.noise_dbfs < -39
    assert not gate.passes(noise_frame(-39, 99))  # within the margin of the background
    assert gate.passes(noise_frame(-25, 100))  # clearly above it
    floor_only = EnergyGate(VadOptions(energy_floor_dbfs=-50, noise_margin_db=None))
    assert all(floor_only.passes(noise_frame(-40, seed)) for seed in range(20))


def blocks_frame(levels_dbfs: list[float | None], seed: int = 0) -> bytes:
    """A 20 ms frame of four 5 ms blocks of noise at the given levels (None: digital silence)."""
    rng = np.random.default_rng(seed)
    parts = [
        np.zeros(80) if db is None else rng.normal(0, 10 ** (db / 20) * 32768, 80)
        for db in levels_dbfs
    ]
    return np.clip(np.rint(np.concatenate(parts)), -32768, 32767).astype("<i2").tobytes()


def test_energy_gate_locates_the_sound_inside_a_frame() -> None:
    """Barge-in times sounds to BLOCK_MS: the gate says which blocks of a passing frame are
    above its threshold (the floor here: the background is silence)."""
    block = BLOCK_MS / 1000
    gate = EnergyGate(VadOptions(energy_floor_dbfs=-50, noise_margin_db=6))
    assert gate.measure(blocks_frame([None] * 4)) is None
    assert gate.measure(blocks_frame([None, None, -30, -30])) == pytest.approx((2 * block, FRAME_S))
    assert gate.measure(blocks_frame([-30, None, None, None])) == pytest.approx((0.0, block))
    # a quiet block between loud ones stays inside the span; quiet edges are trimmed
    assert gate.measure(blocks_frame([-60, -30, -70, -30])) == pytest.approx((block, FRAME_S))
    assert gate.measure(blocks_frame([-55, -55, -55, -55])) is None  # below the floor
    # loud enough in one block, not over the whole frame: the frame does not pass
    assert gate.measure(blocks_frame([None, None, None, -47])) is None
    assert gate.passes(blocks_frame([None, -30, None, None])) is True
    # over room noise the threshold is the background plus the margin
    noisy = EnergyGate(VadOptions(energy_floor_dbfs=-60, noise_margin_db=6))
    for seed in range(20):
        noisy.measure(blocks_frame([-45] * 4, seed))
    assert noisy.measure(blocks_frame([-45, -45, -20, -45], 99)) == pytest.approx(
        (2 * block, 3 * block)
    )


def fixture_audio(name: str) -> WavAudio:
    return read_wav(FIXTURES / name)


def test_front_end_frames_any_rate_and_chunking_with_capture_times() -> None:
    audio = fixture_audio("answer_single.wav")
    stereo48 = resample(audio.pcm, 16000, 48000, 1, 2)
    front = VadFrontEnd()
    frames = []
    step = 48 * 2 * 2 * 7  # 7 ms chunks of 48 kHz stereo
    for i in range(0, len(stereo48), step):
        frames += front.push(stereo48[i : i + step], 48000, 2, T0 + i / (48000 * 4))
    frames += front.flush()
    assert all(len(f.pcm) == 640 for f in frames)
    assert [round((f.t - T0) / FRAME_S, 6) for f in frames] == list(range(len(frames)))
    assert abs(len(frames) * FRAME_S - audio.duration) <= FRAME_S
    for f in frames:  # every voiced frame is loud somewhere inside it
        assert f.loud is not None or not f.voiced
        if f.loud is not None:
            assert 0.0 <= f.loud[0] < f.loud[1] <= FRAME_S
    native = [f.voiced for f in VadFrontEnd().push(audio.pcm, 16000, 1, T0)]
    differing = sum(a != b for a, b in zip(native, [f.voiced for f in frames], strict=False))
    assert differing <= 6  # resampling moves a few decisions at word edges, no more


def test_front_end_moves_frame_times_over_a_gap_in_capture_time() -> None:
    front = VadFrontEnd()
    chunk = bytes(640)
    first = front.push(chunk, 16000, 1, 5.0)
    later = front.push(chunk, 16000, 1, 5.5)  # 480 ms of audio went missing
    jitter = front.push(chunk, 16000, 1, 5.515)  # 5 ms early: jitter, ignored
    assert [f.t for f in first + later + jitter] == pytest.approx([5.0, 5.5, 5.52])


def test_front_end_rejects_impossible_chunks() -> None:
    with pytest.raises(ValueError, match="positive rate"):
        VadFrontEnd().push(bytes(640), 0, 1, 0.0)


# ----------------------------------------------------------------------------------------------
# Accuracy on the generated fixtures


CASES = [
    (name, expect["stop_ms"], expect["segments"])
    for name, spec in LAYOUT["files"].items()
    for expect in spec["expect"]
]


@pytest.mark.parametrize(("name", "stop_ms", "expected"), CASES)
def test_fixture_utterances_found_once_within_60_ms(
    name: str, stop_ms: int, expected: list[dict[str, float]]
) -> None:
    found = detect_segments(fixture_audio(name), VadOptions(stop_ms=stop_ms))
    assert len(found) == len(expected), (name, [s.as_ms() for s in found], expected)
    for seg, truth in zip(found, expected, strict=True):
        assert abs(seg.start * 1000 - truth["start_ms"]) <= TOLERANCE_MS, (name, seg, truth)
        assert abs(seg.end * 1000 - truth["end_ms"]) <= TOLERANCE_MS, (name, seg, truth)


def test_layout_describes_the_fixture_files() -> None:
    assert LAYOUT["sample_rate"] == 16000
    for name, spec in LAYOUT["files"].items():
        audio = fixture_audio(name)
        assert (audio.sample_rate, audio.channels) == (16000, 1)
        assert abs(audio.duration * 1000 - spec["duration_ms"]) < 1
        spans = [(u["start_ms"], u["end_ms"]) for u in spec["utterances"]]
        assert spans == sorted(spans) and all(0 <= a < b <= spec["duration_ms"] for a, b in spans)
    sizes = sum(p.stat().st_size for p in FIXTURES.glob("*.wav"))
    assert sizes < 2_500_000


def test_longer_hangover_joins_a_long_thinking_pause() -> None:
    audio = fixture_audio("pause_long.wav")
    assert len(detect_segments(audio, VadOptions(stop_ms=700))) == 2
    assert len(detect_segments(audio, VadOptions(stop_ms=2000))) == 1


# ----------------------------------------------------------------------------------------------
# The stage in a graph, on a virtual clock


class RealtimeSource:
    """Plays PCM as 20 ms ``AudioChunk`` frames at capture pace on the call's clock.

    Each chunk is sent once fully captured; its ``capture_time`` is the clock time at its start.
    ``extra`` frames are sent after the chunk with the given index.
    """

    def __init__(
        self,
        audio: WavAudio,
        t0: float,
        chunk_ms: int = 20,
        extra: dict[int, Any] | None = None,
        name: str = "mic",
    ) -> None:
        self.audio, self.t0, self.name = audio, t0, name
        self.chunk = audio.sample_rate * chunk_ms // 1000 * 2 * audio.channels
        self.extra = extra or {}

    async def run(self, ctx: CallContext, inbox: Inbox, outbox: Outbox) -> None:
        pcm, rate, ch = self.audio.pcm, self.audio.sample_rate, self.audio.channels
        for i, offset in enumerate(range(0, len(pcm), self.chunk)):
            piece = pcm[offset : offset + self.chunk]
            start = self.t0 + offset / (2 * ch * rate)
            await ctx.clock.sleep_until(start + len(piece) / (2 * ch * rate))
            await outbox.send(AudioChunk(piece, rate, start, ch))
            if i in self.extra:
                await outbox.send(self.extra[i])


def run_stage(audio: WavAudio, options: VadOptions, extra: dict[int, Any] | None = None) -> Any:
    clock = VirtualClock()
    ctx = CallContext(clock=clock)
    sink = Collect()

    async def main() -> Any:
        t0 = clock.now()
        graph = Graph().chain(RealtimeSource(audio, t0, extra=extra), VadStage(options), sink)
        with anyio.fail_after(60):
            result = await Supervisor(ctx, graph).run()
        return t0, result

    t0, result = clock.run(main)
    assert result.status == "completed", result.reason
    return t0, ctx, sink.frames


def test_stage_emits_turns_with_capture_times_preroll_and_timeline_marks() -> None:
    audio = fixture_audio("answers_two.wav")
    options = VadOptions()
    marker = AgentTextDelta(epoch=0, text="passes through")
    t0, ctx, frames = run_stage(audio, options, extra={10: marker})
    assert marker in frames
    vad_frames = [f for f in frames if not isinstance(f, AgentTextDelta)]
    assert [type(f) for f in vad_frames] == [UserSpeechStarted, UserSpeechStopped, UserTurn] * 2
    turns = [f for f in vad_frames if isinstance(f, UserTurn)]
    expected = detect_segments(audio, options)
    assert [t.turn_id for t in turns] == [1, 2]
    for turn, seg in zip(turns, expected, strict=True):
        assert turn.start - t0 == pytest.approx(seg.start, abs=1e-6)
        assert turn.end - t0 == pytest.approx(seg.end, abs=1e-6)
        assert turn.sample_rate == 16000
        # the audio runs from preroll_ms before the start to the end of the speech
        assert turn.duration == pytest.approx(turn.end - turn.start + 0.3, abs=1e-6)
        record = ctx.timeline.get(turn.turn_id)
        assert record.marks["speech_end"] == pytest.approx(turn.end)
        # chunks arrive once captured, so the commit lands exactly the hangover later
        assert record.figures()["endpointing_ms"] == pytest.approx(options.stop_ms, abs=1e-3)
    started = [f for f in vad_frames if isinstance(f, UserSpeechStarted)]
    stopped = [f for f in vad_frames if isinstance(f, UserSpeechStopped)]
    assert [f.at for f in started] == [t.start for t in turns]
    assert [f.at for f in stopped] == [t.end for t in turns]


def test_turn_audio_is_the_speech_itself() -> None:
    audio = fixture_audio("answer_single.wav")
    t0, _, frames = run_stage(audio, VadOptions(preroll_ms=0))
    (turn,) = [f for f in frames if isinstance(f, UserTurn)]
    a = round((turn.start - t0) * 16000) * 2
    assert turn.pcm == audio.pcm[a : a + len(turn.pcm)]


def test_stage_takes_48k_stereo_and_commits_a_turn_open_at_the_end() -> None:
    audio = fixture_audio("answer_single.wav")
    cut = audio.pcm[: int(4.5 * 16000) * 2]  # ends 230 ms after the speech: no hangover yet
    stereo = WavAudio(resample(cut, 16000, 48000, 1, 2), 48000, 2)
    t0, ctx, frames = run_stage(stereo, VadOptions())
    (turn,) = [f for f in frames if isinstance(f, UserTurn)]
    truth = LAYOUT["files"]["answer_single.wav"]["utterances"][0]
    assert abs((turn.start - t0) * 1000 - truth["start_ms"]) <= TOLERANCE_MS
    assert abs((turn.end - t0) * 1000 - truth["end_ms"]) <= TOLERANCE_MS
    assert ctx.timeline.get(1).marks["turn_committed"] >= turn.end
