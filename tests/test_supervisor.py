"""Supervision: restart with bounded backoff, degrade, fail, deadline, bounded cancellation."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import anyio
import pytest

from pipeline.clock import VirtualClock
from pipeline.graph import Graph
from pipeline.stage import CallContext, Collect, PassThrough
from pipeline.supervisor import DEGRADE, FailurePolicy, Supervisor


class Numbers:
    def __init__(self, n: int, name: str = "src", gap: float = 0.0) -> None:
        self.n, self.name, self.gap = n, name, gap

    async def run(self, ctx: CallContext, inbox: Any, outbox: Any) -> None:
        for i in range(self.n):
            await outbox.send(i)
            if self.gap:
                await ctx.clock.sleep(self.gap)


class Flaky:
    """Fails on its first ``failures`` runs (after forwarding one frame), then passes through."""

    def __init__(self, failures: int, name: str = "flaky") -> None:
        self.failures, self.name = failures, name
        self.runs: list[float] = []

    async def run(self, ctx: CallContext, inbox: Any, outbox: Any) -> None:
        self.runs.append(ctx.clock.now())
        async for frame in inbox:
            await outbox.send(frame)
            if len(self.runs) <= self.failures:
                raise RuntimeError(f"boom {len(self.runs)}")


def test_restart_is_bounded_with_doubling_backoff_then_fails() -> None:
    clock = VirtualClock()
    flaky = Flaky(failures=10)
    graph = Graph().chain(Numbers(50, gap=0.001), flaky, Collect("sink"))
    policy = FailurePolicy("restart", max_restarts=3, backoff_s=0.1, backoff_max_s=1.0)

    async def main() -> Any:
        ctx = CallContext(clock=clock)
        return await Supervisor(ctx, graph, policies={"flaky": policy}).run()

    result = clock.run(main)
    assert len(flaky.runs) == 4  # the first run and 3 restarts
    gaps = [round(b - a, 3) for a, b in zip(flaky.runs, flaky.runs[1:], strict=False)]
    # each gap is the backoff plus the wait for the next frame (1 ms gaps at the source)
    assert [round(g, 1) for g in gaps] == [0.1, 0.2, 0.4]
    assert result.status == "failed"
    assert result.failed_stage == "flaky"
    assert "boom 4" in (result.error or "")
    assert result.restarts == {"flaky": 3}
    assert len(result.failures) == 4


def test_restart_recovers_and_keeps_the_queue() -> None:
    clock = VirtualClock()
    sink = Collect("sink")
    graph = Graph().chain(Numbers(20), Flaky(failures=2), sink)

    async def main() -> Any:
        ctx = CallContext(clock=clock)
        pol = FailurePolicy("restart", max_restarts=5)
        return await Supervisor(ctx, graph, policies={"flaky": pol}).run()

    result = clock.run(main)
    assert result.status == "completed"
    assert sink.frames == list(range(20))
    assert result.restarts == {"flaky": 2}


def test_restart_exhausted_can_degrade() -> None:
    clock = VirtualClock()
    sink = Collect("sink")
    graph = Graph().chain(Numbers(10), Flaky(failures=99), sink)
    pol = FailurePolicy("restart", max_restarts=1, then="degrade")

    async def main() -> Any:
        return await Supervisor(CallContext(clock=clock), graph, policies={"flaky": pol}).run()

    result = clock.run(main)
    assert result.status == "completed"
    assert result.degraded == ["flaky"]
    assert sink.frames == list(range(10))


def test_degrade_removes_only_that_stage() -> None:
    """A failing side branch (an avatar) is dropped; the main path carries on untouched."""
    clock = VirtualClock()
    main_sink = Collect("main_sink")

    class Avatar:
        name = "avatar"

        async def run(self, ctx: CallContext, inbox: Any, outbox: Any) -> None:
            async for frame in inbox:
                if frame == 3:
                    raise ConnectionError("avatar session died")

    graph = Graph().chain(Numbers(30, gap=0.01), PassThrough("voice"), main_sink, capacity=2)
    graph.tap("voice", Avatar(), capacity=2)

    async def main() -> Any:
        ctx = CallContext(clock=clock)
        return await Supervisor(ctx, graph, policies={"avatar": DEGRADE}).run()

    result = clock.run(main)
    assert result.status == "completed"
    assert result.degraded == ["avatar"]
    assert main_sink.frames == list(range(30))
    assert result.failures[0].stage == "avatar"
    assert "avatar session died" in result.failures[0].error


def test_fail_ends_the_call_with_stage_and_error() -> None:
    clock = VirtualClock()

    class Forever:
        name = "forever"

        async def run(self, ctx: CallContext, inbox: Any, outbox: Any) -> None:
            await ctx.clock.sleep(10_000)

    class Bad:
        name = "bad"

        async def run(self, ctx: CallContext, inbox: Any, outbox: Any) -> None:
            await ctx.clock.sleep(5)
            raise ValueError("bad key")

    graph = Graph()
    graph.add(Forever())
    graph.add(Bad())

    async def main() -> Any:
        return await Supervisor(CallContext(clock=clock), graph).run()

    result = clock.run(main)
    assert result.status == "failed"
    assert result.failed_stage == "bad"
    assert result.error == "ValueError: bad key"
    assert result.duration == pytest.approx(5)


def test_deadline_ends_a_30_minute_call_in_virtual_time() -> None:
    clock = VirtualClock()
    sink = Collect("sink")
    graph = Graph().chain(Numbers(10**9, gap=0.02), PassThrough("p"), sink)

    async def main() -> Any:
        return await Supervisor(CallContext(clock=clock), graph, deadline_s=30 * 60).run()

    result = clock.run(main)
    assert result.status == "deadline"
    assert result.duration == pytest.approx(1800)
    assert len(sink.frames) == pytest.approx(1800 / 0.02, abs=2)


def test_stop_reports_the_reason() -> None:
    clock = VirtualClock()

    class Stopper:
        name = "stopper"

        def __init__(self) -> None:
            self.sup: Supervisor | None = None

        async def run(self, ctx: CallContext, inbox: Any, outbox: Any) -> None:
            await ctx.clock.sleep(3)
            assert self.sup is not None
            self.sup.stop("candidate_left")
            await ctx.clock.sleep(100)

    stopper = Stopper()
    graph = Graph()
    graph.add(stopper)
    graph.add(Numbers(10**9, name="n", gap=0.5))

    async def main() -> Any:
        sup = Supervisor(CallContext(clock=clock), graph)
        stopper.sup = sup
        return await sup.run()

    result = clock.run(main)
    assert result.status == "stopped"
    assert result.reason == "candidate_left"
    assert result.duration == pytest.approx(3)


def test_cancellation_is_bounded_whatever_stages_await() -> None:
    """Stages stuck in every kind of await; one even cleans up slowly. Stop returns in bound."""
    clock = VirtualClock()
    release = threading.Event()
    cleaned: list[str] = []

    class Stuck:
        def __init__(self, name: str, how: str) -> None:
            self.name, self.how = name, how

        async def run(self, ctx: CallContext, inbox: Any, outbox: Any) -> None:
            try:
                if self.how == "sleep":
                    await anyio.sleep(10**6)
                elif self.how == "event":
                    await anyio.Event().wait()
                elif self.how == "inbox":
                    async for _ in inbox:
                        pass
                elif self.how == "lock":
                    sem = anyio.Semaphore(1)
                    await sem.acquire()
                    await sem.acquire()
                elif self.how == "future":
                    await asyncio.get_running_loop().create_future()
                elif self.how == "thread":
                    await anyio.to_thread.run_sync(release.wait, abandon_on_cancel=True)
                elif self.how == "slow-cleanup":
                    await anyio.sleep(10**6)
            finally:
                if self.how == "slow-cleanup":
                    with ctx.cleanup_scope():
                        await anyio.sleep(10**6)  # a provider that never answers "stop"
                cleaned.append(self.name)

    hows = ["sleep", "event", "inbox", "lock", "future", "thread", "slow-cleanup"]
    graph = Graph()
    graph.add(Numbers(0, name="silent"))
    for how in hows:
        graph.add(Stuck(how, how))
    graph.connect("silent", "inbox")
    # keep the inbox stage's inbox open: a second feeder that never ends
    graph.add(Stuck("feeder", "sleep"))
    graph.connect("feeder", "inbox")

    async def main() -> tuple[Any, int, float]:
        before = len(asyncio.all_tasks())
        ctx = CallContext(clock=clock, cleanup_bound_s=2.0)
        sup = Supervisor(ctx, graph)
        async with anyio.create_task_group() as tg:
            tg.start_soon(_stop_later, sup, clock)
            result = await sup.run()
        after = len(asyncio.all_tasks())
        return result, after - before, clock.now()

    try:
        result, leftover, _ = clock.run(main)
    finally:
        release.set()
    assert result.status == "stopped"
    assert leftover == 0
    assert sorted(cleaned) == sorted([*hows, "feeder"])
    # stopped at t0+1, and the slowest cleanup is cut at the 2 s bound
    assert result.duration == pytest.approx(3.0)


async def _stop_later(sup: Supervisor, clock: VirtualClock) -> None:
    await clock.sleep(1)
    sup.stop("shutdown")


def test_policies_for_unknown_stages_are_refused() -> None:
    graph = Graph()
    graph.add(PassThrough("a"))
    with pytest.raises(ValueError, match="unknown stages"):
        Supervisor(CallContext(), graph, policies={"b": DEGRADE})
