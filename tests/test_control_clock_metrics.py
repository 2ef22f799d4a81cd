"""Control lane, clocks and the latency timeline."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from pipeline.clock import MonotonicClock, VirtualClock
from pipeline.control import ControlLane, Interrupt
from pipeline.metrics import TurnTimeline, Usage, percentile
from pipeline.stage import CallContext


def test_interrupt_raises_epoch_and_tells_listeners_synchronously() -> None:
    lane = ControlLane()
    seen: list[Interrupt] = []
    unsubscribe = lane.subscribe(seen.append)
    assert lane.next_epoch() == 1 and seen == []
    event = lane.interrupt("barge-in")
    assert (event.old_epoch, event.epoch, lane.epoch) == (1, 2, 2)
    assert seen == [event]  # delivered before interrupt() returned
    assert lane.is_stale(1) and not lane.is_stale(2) and not lane.is_stale(None)
    unsubscribe()
    lane.interrupt()
    assert len(seen) == 1


def test_a_broken_listener_does_not_stop_the_others() -> None:
    lane = ControlLane()
    got: list[int] = []

    def broken(_: Interrupt) -> None:
        raise RuntimeError("x")

    lane.subscribe(broken)
    lane.subscribe(lambda e: got.append(e.epoch))
    lane.interrupt()
    assert got == [1]


def test_epoch_scope_cancels_in_flight_work_for_the_old_epoch_only() -> None:
    clock = VirtualClock()
    log: list[str] = []

    async def main() -> None:
        ctx = CallContext(clock=clock)
        epoch = ctx.control.next_epoch()

        async def reply() -> None:
            with ctx.control.epoch_scope(epoch) as scope:
                await ctx.clock.sleep(100)
                log.append("finished")
            log.append("cancelled" if scope.cancelled_caught else "not cancelled")

        async with anyio.create_task_group() as tg:
            tg.start_soon(reply)
            await ctx.clock.sleep(1)
            ctx.control.interrupt()
        # a scope for the new epoch is untouched by the next_epoch() of a later reply
        with ctx.control.epoch_scope() as scope2:
            ctx.control.next_epoch()
            await ctx.clock.sleep(1)
        assert not scope2.cancel_called
        # a scope for an epoch that is already stale is cancelled at once
        with ctx.control.epoch_scope(0) as scope3:
            await ctx.clock.sleep(1)
        assert scope3.cancelled_caught

    clock.run(main)
    assert log == ["cancelled"]


def test_wait_interrupt_wakes_waiters() -> None:
    async def main() -> int:
        lane = ControlLane()
        woke = 0

        async def waiter() -> None:
            nonlocal woke
            await lane.wait_interrupt()
            woke += 1

        async with anyio.create_task_group() as tg:
            for _ in range(3):
                tg.start_soon(waiter)
            await anyio.sleep(0.01)
            lane.interrupt()
        return woke

    assert anyio.run(main) == 3


def test_virtual_clock_jumps_to_timers_and_drives_anyio_timeouts() -> None:
    clock = VirtualClock(start=0.0)

    async def main() -> list[Any]:
        out: list[Any] = []
        await clock.sleep(3600)
        out.append(clock.now())
        with anyio.move_on_after(10) as scope:
            await clock.sleep(20)
        out.append((scope.cancelled_caught, clock.now()))
        await clock.sleep_until(5000)
        out.append(clock.now())
        return out

    result = clock.run(main)
    assert result == [3600, (True, 3610), 5000]


def test_virtual_clock_refuses_to_go_backwards() -> None:
    with pytest.raises(ValueError):
        VirtualClock().advance(-1)


def test_monotonic_clock_moves_forward() -> None:
    clock = MonotonicClock()

    async def main() -> tuple[float, float]:
        a = clock.now()
        await clock.sleep(0.01)
        return a, clock.now()

    a, b = anyio.run(main)
    assert b > a


def test_timeline_derives_figures_and_first_mark_wins() -> None:
    tl = TurnTimeline()
    t = 100.0
    marks = {
        "speech_end": 0.0,
        "turn_committed": 0.7,
        "brain_request": 0.71,
        "first_token": 1.01,
        "voice_request": 1.02,
        "first_audio": 1.22,
        "first_egress": 1.25,
    }
    for name, offset in marks.items():
        assert tl.mark(1, name, t + offset)  # type: ignore[arg-type]
    assert not tl.mark(1, "first_egress", t + 9)  # later marks of the same kind are ignored
    assert not tl.mark(None, "first_egress", t)
    figures = tl.get(1).figures()  # type: ignore[union-attr]
    assert figures["endpointing_ms"] == pytest.approx(700)
    assert figures["llm_ttft_ms"] == pytest.approx(300)
    assert figures["tts_ttfb_ms"] == pytest.approx(200)
    assert figures["voice_to_voice_ms"] == pytest.approx(1250)
    assert figures["overhead_ms"] == pytest.approx(50)
    summary = tl.summary()
    assert summary["turns"] == 1
    assert summary["voice_to_voice_ms"]["p50"] == pytest.approx(1250)  # type: ignore[index]


def test_incomplete_turns_have_no_overhead_figure() -> None:
    tl = TurnTimeline()
    tl.mark(2, "speech_end", 0)
    tl.mark(2, "first_egress", 1)
    f = tl.get(2).figures()  # type: ignore[union-attr]
    assert f["voice_to_voice_ms"] == 1000 and f["overhead_ms"] is None


def test_percentile_and_usage() -> None:
    assert percentile([1, 2, 3, 4, 5], 50) == 3
    assert percentile([1.0, 2.0], 100) == 2.0
    assert percentile([10.0], 95) == 10.0
    with pytest.raises(ValueError):
        percentile([], 50)
    usage = Usage()
    usage.add(llm_input_tokens=10, tts_characters=5, audio_in_seconds=1.5)
    usage.add(llm_input_tokens=2)
    assert usage.as_dict()["llm_input_tokens"] == 12
    assert usage.as_dict()["audio_in_seconds"] == 1.5
    with pytest.raises(KeyError):
        usage.add(nonsense=1)
