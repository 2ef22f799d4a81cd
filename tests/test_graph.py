"""Graph wiring, overflow policies, fan-out taps, end-of-stream and stale-epoch dropping."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.clock import VirtualClock
from pipeline.graph import Graph, GraphError, GraphOutbox
from pipeline.stage import CallContext, Collect, FilterStage, MapStage, PassThrough
from pipeline.supervisor import Supervisor


@dataclass(frozen=True)
class Item:
    n: int
    epoch: int | None = None


class Source:
    def __init__(self, items: list[Any], name: str = "src") -> None:
        self.items = items
        self.name = name

    async def run(self, ctx: CallContext, inbox: Any, outbox: Any) -> None:
        for item in self.items:
            await outbox.send(item)


class SlowSink(Collect):
    """Collects, yielding between frames so queues fill up behind it."""

    def __init__(self, name: str, delay: float) -> None:
        super().__init__(name)
        self.delay = delay

    async def run(self, ctx: CallContext, inbox: Any, outbox: Any) -> None:
        async for frame in inbox:
            self.frames.append(frame)
            await ctx.clock.sleep(self.delay)


def run_graph(graph: Graph, ctx: CallContext | None = None) -> Any:
    clock = VirtualClock()

    async def main() -> Any:
        c = ctx or CallContext(clock=clock)
        return await Supervisor(c, graph).run()

    return clock.run(main)


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(0, 200),
    hops=st.integers(0, 6),
    capacity=st.integers(1, 8),
    tap_at=st.lists(st.integers(0, 6), max_size=3, unique=True),
)
def test_block_edges_deliver_every_frame_once_in_order(
    n: int, hops: int, capacity: int, tap_at: list[int]
) -> None:
    graph = Graph()
    src = Source([Item(i) for i in range(n)])
    chain = [src, *[PassThrough(f"p{i}") for i in range(hops)]]
    sink = Collect("sink")
    graph.chain(*chain, sink, capacity=capacity)
    taps = []
    for i in tap_at:
        if i < len(chain):
            taps.append(graph.tap(chain[i], Collect(f"tap{i}"), capacity=capacity))
    result = run_graph(graph)
    assert result.status == "completed"
    assert [f.n for f in sink.frames] == list(range(n))
    for tap in taps:
        assert isinstance(tap, Collect)
        assert [f.n for f in tap.frames] == list(range(n))


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 300), capacity=st.integers(1, 16))
def test_drop_oldest_never_blocks_and_counts_drops_exactly(n: int, capacity: int) -> None:
    """A producer pushes n frames without the consumer running: exactly n - capacity drop."""

    async def main() -> None:
        ctx = CallContext()
        graph = Graph()
        src, sink = PassThrough("src"), Collect("sink")
        graph.add(src)
        graph.add(sink, policy="drop_oldest", capacity=capacity)
        graph.connect(src, sink)
        ports = graph.open(ctx.control)
        outbox = ports["src"].outbox
        with anyio.fail_after(5):  # would hang if the producer blocked
            for i in range(n):
                await outbox.send(Item(i))
        inbox = ports["sink"].inbox
        kept = [inbox.receive_nowait().n for _ in range(inbox.pending())]
        assert kept == list(range(max(0, n - capacity), n))
        assert inbox.stats.dropped_overflow == max(0, n - capacity)

    anyio.run(main)


def test_drop_oldest_with_a_slow_consumer_keeps_newest_and_counts() -> None:
    graph = Graph()
    src = Source([Item(i) for i in range(100)])
    sink = SlowSink("sink", delay=0.02)
    graph.add(src)
    graph.add(sink, policy="drop_oldest", capacity=4)
    graph.connect(src, sink)
    clock = VirtualClock()

    async def main() -> tuple[Any, Any]:
        ctx = CallContext(clock=clock)
        sup = Supervisor(ctx, graph)
        return await sup.run(), ctx

    result, _ = clock.run(main)
    assert result.status == "completed"
    got = [f.n for f in sink.frames]
    assert got == sorted(got)
    assert got[-1] == 99
    assert len(got) < 100


def test_stale_epoch_frames_never_reach_the_sink() -> None:
    """Frames queued before an interrupt vanish; frames of the new epoch flow."""
    clock = VirtualClock()
    sink = SlowSink("sink", delay=0.01)

    class Producer:
        name = "producer"

        async def run(self, ctx: CallContext, inbox: Any, outbox: Any) -> None:
            for i in range(20):
                await outbox.send(Item(i, epoch=0))
            ctx.control.interrupt("test")
            for i in range(20, 25):
                await outbox.send(Item(i, epoch=ctx.control.epoch))

    graph = Graph().chain(Producer(), PassThrough("a"), PassThrough("b"), sink, capacity=32)

    async def main() -> None:
        ctx = CallContext(clock=clock)
        await Supervisor(ctx, graph).run()

    clock.run(main)
    epochs = [f.epoch for f in sink.frames]
    # whatever was delivered before the interrupt is epoch 0; after the first epoch-1 frame,
    # no epoch-0 frame ever appears.
    first_new = epochs.index(1)
    assert all(e == 1 for e in epochs[first_new:])
    assert [f.n for f in sink.frames[first_new:]] == list(range(20, 25))
    assert len(sink.frames) < 25  # some stale frames were dropped in the queues


@settings(max_examples=40, deadline=None)
@given(
    epochs=st.lists(st.integers(0, 5), min_size=1, max_size=80),
    interrupt_after=st.integers(0, 80),
    bumps=st.integers(1, 3),
)
def test_property_no_older_epoch_after_interrupt(
    epochs: list[int], interrupt_after: int, bumps: int
) -> None:
    """After an interrupt to epoch n, no frame of an older epoch reaches the sink."""
    clock = VirtualClock()
    sink = Collect("sink")
    seen_after: list[tuple[int, int]] = []  # (epoch of frame, lane epoch when received)

    class Producer:
        name = "producer"

        async def run(self, ctx: CallContext, inbox: Any, outbox: Any) -> None:
            for i, e in enumerate(epochs):
                if i == interrupt_after:
                    for _ in range(bumps):
                        ctx.control.interrupt()
                await outbox.send(Item(i, epoch=e))
                await anyio.lowlevel.checkpoint()

    class Recorder:
        name = "recorder"

        async def run(self, ctx: CallContext, inbox: Any, outbox: Any) -> None:
            async for frame in inbox:
                seen_after.append((frame.epoch, ctx.control.epoch))
                await outbox.send(frame)

    graph = Graph().chain(Producer(), PassThrough("a"), Recorder(), sink, capacity=4)

    async def main() -> None:
        await Supervisor(CallContext(clock=clock), graph).run()

    clock.run(main)
    for frame_epoch, lane_epoch in seen_after:
        assert frame_epoch >= lane_epoch
    if interrupt_after < len(epochs):
        assert all(f.epoch >= bumps for f in sink.frames if f.n >= interrupt_after)


def test_fan_in_merges_and_ends_when_all_feeders_end() -> None:
    graph = Graph()
    a = Source([Item(i) for i in range(10)], name="a")
    b = Source([Item(100 + i) for i in range(5)], name="b")
    sink = Collect("sink")
    graph.add(a)
    graph.add(b)
    graph.add(sink)
    graph.connect(a, sink)
    graph.connect(b, sink)
    result = run_graph(graph)
    assert result.status == "completed"
    assert sorted(f.n for f in sink.frames) == [*range(10), *range(100, 105)]
    assert [f.n for f in sink.frames if f.n < 100] == list(range(10))


def test_map_and_filter_helpers() -> None:
    graph = Graph()
    src = Source([Item(i) for i in range(10)])

    async def double(item: Item) -> Item:
        return Item(item.n * 2)

    sink = Collect("sink")
    graph.chain(
        src,
        MapStage(double, name="double"),
        FilterStage(lambda f: f.n % 4 == 0, name="fours"),
        MapStage(lambda f: Item(f.n + 1), name="inc", types=(Item,)),
        sink,
    )
    run_graph(graph)
    assert [f.n for f in sink.frames] == [1, 5, 9, 13, 17]


def test_sink_outbox_discards_and_counts() -> None:
    async def main() -> None:
        ctx = CallContext()
        out = GraphOutbox([], ctx.control)
        await out.send(Item(1))
        await out.send(Item(2))
        assert out.discarded == 2

    anyio.run(main)


def test_wiring_errors_are_clear() -> None:
    graph = Graph()
    a = PassThrough("a")
    graph.add(a)
    with pytest.raises(GraphError, match="duplicate stage name 'a'"):
        graph.add(PassThrough("a"))
    with pytest.raises(GraphError, match="unknown stage 'b'"):
        graph.connect(a, "b")
    with pytest.raises(GraphError, match="cannot feed itself"):
        graph.connect(a, a)
    with pytest.raises(GraphError, match="capacity must be at least 1"):
        graph.add(PassThrough("c"), capacity=0)
