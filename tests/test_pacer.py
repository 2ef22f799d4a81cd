"""The egress pacer: exact frames, pacing, jitter buffer, underruns, interrupt flush, reports.

Pacing itself is only real on the real clock (``realclock`` tests); they assert behaviour
(frames are never early, the mean spacing is one frame, silence follows an interrupt), never a
speed. The schedule's arithmetic is checked exactly on the virtual clock.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import pytest
from anyio.streams.memory import MemoryObjectSendStream

from pipeline.audio import resample, tone
from pipeline.clock import VirtualClock
from pipeline.frames import AgentAudio, TranscriptEntry
from pipeline.stage import CallContext
from stages.pacer import EgressFrame, Pacer, PacerOptions

RATE = 48000
FRAME = 960 * 2  # bytes in 20 ms at 48 kHz
Send = MemoryObjectSendStream[Any]
Producer = Callable[[Send], Awaitable[None]]


class Sink:
    """An outbox that timestamps every frame (time.monotonic, or the given clock)."""

    def __init__(
        self,
        now: Callable[[], float] = time.monotonic,
        on_frame: Callable[[Any], None] | None = None,
    ) -> None:
        self.now = now
        self.on_frame = on_frame
        self.items: list[tuple[float, Any]] = []

    async def send(self, frame: Any) -> None:
        self.items.append((self.now(), frame))
        if self.on_frame is not None:
            self.on_frame(frame)

    @property
    def frames(self) -> list[EgressFrame]:
        return [f for _, f in self.items if isinstance(f, EgressFrame)]

    @property
    def audio(self) -> list[EgressFrame]:
        return [f for f in self.frames if not f.silent]


async def run_pacer(pacer: Pacer, ctx: CallContext, produce: Producer, sink: Any) -> None:
    """Run the pacer until it ends (inbox closed by the producer and audio played out)."""
    send, recv = anyio.create_memory_object_stream[Any](10_000)

    async def producer() -> None:
        async with send:
            await produce(send)

    with anyio.fail_after(10):  # hang guard only
        async with recv, anyio.create_task_group() as tg:
            tg.start_soon(producer)
            await pacer.run(ctx, recv, sink)


def chunks(pcm: bytes, samples: int) -> list[bytes]:
    size = samples * 2
    return [pcm[i : i + size] for i in range(0, len(pcm), size)]


def padded(pcm: bytes) -> bytes:
    return pcm + bytes(-len(pcm) % FRAME)


# -- real clock ---------------------------------------------------------------------------------


@pytest.mark.realclock
def test_exact_frames_reproduce_the_resampled_input_without_loss() -> None:
    a = tone(440, 0.3, 24000)
    b = tone(660, 0.25, 16000)
    ctx = CallContext()
    pacer = Pacer()
    sink = Sink()

    async def produce(send: Send) -> None:
        for i, piece in enumerate(chunks(a, 333)):
            await send.send(AgentAudio(0, piece, 24000, turn_id=1))
            if i == 3:
                await send.send(TranscriptEntry("agent", "hello", 0.0))
        await send.send(AgentAudio(0, b"", 24000, turn_id=1, final=True))
        ctx.control.next_epoch()  # a new reply without an interrupt: reply 0 still plays out
        for piece in chunks(b, 333):
            await send.send(AgentAudio(1, piece, 16000, turn_id=2))
        await send.send(AgentAudio(1, b"", 16000, turn_id=2, final=True))

    anyio.run(run_pacer, pacer, ctx, produce, sink)

    frames = sink.frames
    assert all(len(f.pcm) == FRAME and f.sample_rate == RATE for f in frames)
    assert [f.index for f in frames] == list(range(len(frames)))
    got = {e: b"".join(f.pcm for f in frames if f.epoch == e and not f.silent) for e in (0, 1)}
    assert got[0] == padded(resample(a, 24000, RATE))
    assert got[1] == padded(resample(b, 16000, RATE))
    assert all(f.turn_id == (1 if f.epoch == 0 else 2) for f in sink.audio)
    assert all(f.epoch is None and f.pcm == bytes(FRAME) for f in frames if f.silent)
    assert any(isinstance(f, TranscriptEntry) for _, f in sink.items)  # passed straight through
    assert pacer.played(0).completed and pacer.played(1).completed
    assert ctx.usage.audio_out_seconds == pytest.approx(0.55, abs=1e-6)


@pytest.mark.realclock
def test_frames_are_paced_never_early_and_one_frame_apart_on_average() -> None:
    ctx = CallContext()
    pacer = Pacer()
    sink = Sink()
    audio = tone(440, 0.6, RATE)

    async def produce(send: Send) -> None:
        await send.send(AgentAudio(0, audio, RATE, turn_id=1, final=True))  # one burst

    anyio.run(run_pacer, pacer, ctx, produce, sink)

    frames = sink.items
    assert len(sink.audio) == 30
    assert pacer.origin is not None
    for at, frame in frames:  # frame n is never handed out before its slot in the schedule
        assert at >= pacer.origin + frame.index * 0.020 - 1e-6
    mean = (frames[-1][0] - frames[0][0]) / (len(frames) - 1)
    assert 0.019 <= mean <= 0.040  # paced (a burst would be ~0), loosely one frame apart


@pytest.mark.realclock
def test_interrupt_flushes_at_once_and_reports_what_was_played() -> None:
    ctx = CallContext()
    events: list[str] = []
    pacer = Pacer(
        on_playback_start=lambda t: events.append("start"),
        on_playback_stop=lambda t: events.append("stop"),
    )
    interrupted = anyio.Event()

    def on_frame(frame: Any) -> None:
        if isinstance(frame, EgressFrame) and frame.epoch == 0:
            if sum(1 for f in sink.audio if f.epoch == 0) == 10:
                ctx.control.interrupt()
                interrupted.set()

    sink = Sink(on_frame=on_frame)
    words = [f"w{i}" for i in range(10)]

    async def produce(send: Send) -> None:
        for i, word in enumerate(words):  # ten chunks of 100 ms, each with its text
            await send.send(AgentAudio(0, tone(440, 0.1, RATE), RATE, 1, i == 9, word))
        await interrupted.wait()
        await anyio.sleep(0.05)
        await send.send(AgentAudio(0, tone(440, 0.1, RATE), RATE, 1))  # stale: dropped
        await send.send(AgentAudio(1, tone(550, 0.1, RATE), RATE, 2, final=True))

    anyio.run(run_pacer, pacer, ctx, produce, sink)

    frames = sink.frames
    old = [i for i, f in enumerate(frames) if f.epoch == 0]
    assert len(old) == 10
    after = frames[old[-1] + 1 :]
    assert after[0].silent  # silent within one frame
    assert all(f.epoch != 0 for f in after)  # nothing of the old reply follows
    assert sum(1 for f in after if f.epoch == 1) == 5  # the next reply plays normally
    assert pacer.stats.dropped_on_interrupt == 40
    assert pacer.stats.dropped_stale == 1
    report = pacer.played(0)
    assert report.seconds_played == pytest.approx(0.2)
    assert report.seconds_total == pytest.approx(1.0)
    assert not report.completed
    assert report.text_played == "w0 w1"
    assert pacer.played(1).completed
    assert events == ["start", "stop", "start", "stop"]


@pytest.mark.realclock
def test_jitter_buffer_holds_playback_until_enough_audio_unless_final() -> None:
    ctx = CallContext()
    pacer = Pacer(PacerOptions(jitter_buffer_ms=60))
    sent: dict[int, float] = {0: 0.0, 1: 0.0}
    at_first_audio: dict[int, float] = {}

    def on_frame(frame: Any) -> None:
        if isinstance(frame, EgressFrame) and frame.epoch is not None:
            at_first_audio.setdefault(frame.epoch, sent[frame.epoch])

    sink = Sink(on_frame=on_frame)

    async def produce(send: Send) -> None:
        for i in range(5):  # 20 ms chunks every 50 ms: slower than real time
            sent[0] += 0.02
            await send.send(AgentAudio(0, tone(440, 0.02, RATE), RATE, 1, final=i == 4))
            await anyio.sleep(0.05)
        ctx.control.next_epoch()
        sent[1] += 0.02  # a short reply: its final chunk comes with less than the buffer
        await send.send(AgentAudio(1, tone(440, 0.02, RATE), RATE, 2, final=True))

    anyio.run(run_pacer, pacer, ctx, produce, sink)

    assert [f.epoch for f in sink.audio] == [0] * 5 + [1]
    assert at_first_audio[0] >= 0.06 - 1e-9  # waited for three chunks before playing
    assert at_first_audio[1] == pytest.approx(0.02)  # played at once: its final had arrived


@pytest.mark.realclock
def test_underruns_are_counted_only_while_a_reply_is_in_progress() -> None:
    ctx = CallContext()
    pacer = Pacer(PacerOptions(jitter_buffer_ms=0))
    sink = Sink()

    async def produce(send: Send) -> None:
        await anyio.sleep(0.1)  # idle: not an underrun
        for i in range(5):  # 20 ms of audio every 60 ms
            await send.send(AgentAudio(0, tone(440, 0.02, RATE), RATE, 1, final=i == 4))
            if i < 4:
                await anyio.sleep(0.06)
        await anyio.sleep(0.1)  # idle again after the reply ended

    anyio.run(run_pacer, pacer, ctx, produce, sink)

    frames = sink.frames
    first = next(i for i, f in enumerate(frames) if not f.silent)
    last = max(i for i, f in enumerate(frames) if not f.silent)
    gaps = sum(1 for f in frames[first:last] if f.silent)
    assert len(sink.audio) == 5
    assert gaps > 0
    assert pacer.stats.underruns == gaps == ctx.usage.underruns
    assert any(f.silent for f in frames[:first]) and any(f.silent for f in frames[last:])


@pytest.mark.realclock
def test_first_egress_is_marked_on_the_turn_timeline() -> None:
    ctx = CallContext()
    pacer = Pacer()
    sink = Sink()
    sent_at: list[float] = []

    async def produce(send: Send) -> None:
        await anyio.sleep(0.03)
        sent_at.append(time.monotonic())
        await send.send(AgentAudio(0, tone(440, 0.1, RATE), RATE, turn_id=7, final=True))

    anyio.run(run_pacer, pacer, ctx, produce, sink)

    record = ctx.timeline.get(7)
    assert record is not None and "first_egress" in record.marks
    first_audio_at = next(at for at, f in sink.items if not f.silent)
    assert sent_at[0] <= record.marks["first_egress"] <= first_audio_at


# -- virtual clock ------------------------------------------------------------------------------


def run_virtual(pacer: Pacer, produce: Callable[[Send, VirtualClock], Awaitable[None]]) -> Sink:
    clock = VirtualClock()
    sink = Sink(now=clock.now)
    ctx = CallContext(clock=clock)

    async def main() -> None:
        await run_pacer(pacer, ctx, lambda send: produce(send, clock), sink)

    clock.run(main)
    return sink


def test_schedule_is_exact_on_the_virtual_clock() -> None:
    n = 50
    pacer = Pacer()

    async def produce(send: Send, clock: VirtualClock) -> None:
        await send.send(AgentAudio(0, tone(440, 0.5, RATE), RATE, 1, final=True))
        await clock.sleep(n * 0.02 + 0.01)

    sink = run_virtual(pacer, produce)
    assert pacer.origin is not None
    times = [at - pacer.origin for at, _ in sink.items]
    assert len([t for t in times if t < n * 0.02 - 1e-9]) == n
    assert times[:n] == pytest.approx([k * 0.02 for k in range(n)], abs=1e-9)
    assert len(sink.audio) == 25
    assert pacer.stats.late_ticks == 0


def test_a_stalled_transport_makes_the_ticker_skip_ahead_not_burst() -> None:
    pacer = Pacer()
    clock_box: list[VirtualClock] = []

    class StallingSink(Sink):
        async def send(self, frame: Any) -> None:
            await super().send(frame)
            if frame.index == 5:
                await clock_box[0].sleep(0.1)

    async def produce(send: Send, clock: VirtualClock) -> None:
        await clock.sleep(0.3)

    clock = VirtualClock()
    clock_box.append(clock)
    sink = StallingSink(now=clock.now)

    async def main() -> None:
        await run_pacer(pacer, CallContext(clock=clock), lambda s: produce(s, clock), sink)

    clock.run(main)
    times = [at for at, _ in sink.items]
    assert len(times) == len(set(times))  # never two frames at the same instant
    assert pacer.stats.late_ticks == 4
    assert pacer.origin is not None
    slots = [round((t - pacer.origin) / 0.02, 6) for t in times]
    assert all(s == int(s) for s in slots)  # still on the original grid


def test_emit_silence_false_sends_nothing_while_idle() -> None:
    pacer = Pacer(PacerOptions(emit_silence=False))

    async def produce(send: Send, clock: VirtualClock) -> None:
        await clock.sleep(0.2)
        await send.send(AgentAudio(0, tone(440, 0.1, RATE), RATE, 1, final=True))
        await clock.sleep(0.3)

    sink = run_virtual(pacer, produce)
    assert len(sink.frames) == 5 and not any(f.silent for f in sink.frames)
    times = [at for at, _ in sink.items]
    assert [b - a for a, b in itertools.pairwise(times)] == pytest.approx([0.02] * 4)


def test_overflow_drops_the_oldest_audio_and_counts_it() -> None:
    pacer = Pacer(PacerOptions(max_buffer_s=0.1))
    audio = tone(440, 0.5, RATE)

    async def produce(send: Send, clock: VirtualClock) -> None:
        await send.send(AgentAudio(0, audio, RATE, 1, final=True))

    sink = run_virtual(pacer, produce)
    assert pacer.stats.dropped_overflow == 20
    assert b"".join(f.pcm for f in sink.audio) == audio[-5 * FRAME :]


def test_a_reply_without_final_ends_after_the_stall_timeout() -> None:
    stops: list[float] = []
    pacer = Pacer(PacerOptions(stall_timeout_s=0.2), on_playback_stop=stops.append)

    async def produce(send: Send, clock: VirtualClock) -> None:
        await send.send(AgentAudio(0, tone(440, 0.1, RATE), RATE, 1))  # never final
        await clock.sleep(1.0)

    sink = run_virtual(pacer, produce)
    assert len(sink.audio) == 5
    assert len(stops) == 1
    assert pacer.played(0).completed
    assert 0 < pacer.stats.underruns <= 11  # counted only until the reply was given up


def test_played_report_of_a_completed_and_an_unknown_reply() -> None:
    pacer = Pacer()

    async def produce(send: Send, clock: VirtualClock) -> None:
        await send.send(AgentAudio(3, tone(440, 0.05, 16000), 16000, 1, False, "Hello there."))
        await send.send(AgentAudio(3, tone(440, 0.05, 16000), 16000, 1, True, "How are you?"))

    run_virtual(pacer, produce)
    report = pacer.played(3)
    assert report.completed
    assert report.seconds_total == pytest.approx(0.1)
    assert report.seconds_played == pytest.approx(0.1)
    assert report.text_played == "Hello there. How are you?"
    unknown = pacer.played(99)
    assert (unknown.seconds_played, unknown.completed, unknown.text_played) == (0.0, False, "")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("sample_rate", 0),
        ("frame_ms", 25),
        ("jitter_buffer_ms", -1),
        ("max_buffer_s", 0),
        ("max_lag_frames", 0),
        ("stall_timeout_s", 0.0),
    ],
)
def test_bad_options_name_the_field(field: str, value: Any) -> None:
    with pytest.raises(ValueError, match=field):
        PacerOptions(**{field: value})
