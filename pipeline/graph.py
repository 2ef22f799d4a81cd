"""Graph: wires stages together with bounded frame channels (pipeline/channel.py).

Each stage owns one inbox (a bounded memory stream). An edge ``a → b`` gives ``a``'s outbox a
send handle on ``b``'s inbox. A stage with several outgoing edges fans out: every frame goes to
every edge (taps for observers such as the transcript or metrics). A stage with several
incoming edges merges them in arrival order; its inbox ends when every upstream stage has
finished. A stage with no outgoing edge is a sink: its outbox discards.

Overflow policy is a property of the inbox (so all edges into one stage share it):

* ``block``: the producer waits for space (text and control: nothing may be lost);
* ``drop_oldest``: the producer never waits; when the inbox is full the oldest queued frame is
  dropped and counted (real-time audio: late audio is worse than lost audio).

Stale frames (stamped with an epoch older than the control lane's) are dropped when sent and
again when received, so they never reach the sink after an interrupt.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Literal

import anyio

from pipeline.channel import Channel
from pipeline.control import ControlLane
from pipeline.stage import Stage

Policy = Literal["block", "drop_oldest"]
DEFAULT_CAPACITY = 64


@dataclass
class InboxSpec:
    policy: Policy = "block"
    capacity: int = DEFAULT_CAPACITY


@dataclass
class EdgeStats:
    """Counters of one stage's inbox."""

    delivered: int = 0
    dropped_overflow: int = 0
    dropped_stale: int = 0


class GraphError(ValueError):
    """The graph is wired wrongly (unknown stage, duplicate name, conflicting policy)."""


class _Edge:
    """The send side of one edge into a destination inbox, applying that inbox's policy."""

    __slots__ = ("_chan", "_closed", "policy", "stats")

    def __init__(self, chan: Channel, policy: Policy, stats: EdgeStats) -> None:
        chan.add_sender()
        self._chan = chan
        self._closed = False
        self.policy = policy
        self.stats = stats

    async def send(self, frame: Any) -> None:
        chan = self._chan
        try:
            if self.policy == "block":
                try:
                    chan.send_nowait(frame)
                except anyio.WouldBlock:
                    await chan.send(frame)
            elif chan.send_drop_oldest(frame):
                self.stats.dropped_overflow += 1
        except anyio.BrokenResourceError:
            pass  # the destination has finished; nothing downstream wants this frame

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._chan.close_sender()


class GraphInbox:
    """The receive side of a stage's inbox; skips frames of stale epochs."""

    __slots__ = ("_chan", "_control", "stats")

    def __init__(self, chan: Channel, control: ControlLane, stats: EdgeStats) -> None:
        self._chan = chan
        self._control = control
        self.stats = stats

    async def receive(self) -> Any:
        """The next current frame; raises ``anyio.EndOfStream`` when every feeder has ended."""
        chan, control, stats = self._chan, self._control, self.stats
        while True:
            frame = await chan.receive()
            epoch = getattr(frame, "epoch", None)
            if epoch is not None and epoch < control._epoch:
                stats.dropped_stale += 1
                continue
            stats.delivered += 1
            return frame

    def receive_nowait(self) -> Any:
        """Like :meth:`receive` but raises ``anyio.WouldBlock`` instead of waiting."""
        while True:
            frame = self._chan.receive_nowait()
            epoch = getattr(frame, "epoch", None)
            if epoch is not None and epoch < self._control._epoch:
                self.stats.dropped_stale += 1
                continue
            self.stats.delivered += 1
            return frame

    def __aiter__(self) -> GraphInbox:
        return self

    async def __anext__(self) -> Any:
        try:
            return await self.receive()
        except anyio.EndOfStream:
            raise StopAsyncIteration from None

    def pending(self) -> int:
        return len(self._chan)

    def close(self) -> None:
        self._chan.close_receiver()


class _EmptyInbox:
    """The inbox of a source stage: ends at once."""

    def __init__(self) -> None:
        self.stats = EdgeStats()

    async def receive(self) -> Any:
        raise anyio.EndOfStream

    def receive_nowait(self) -> Any:
        raise anyio.EndOfStream

    def __aiter__(self) -> _EmptyInbox:
        return self

    async def __anext__(self) -> Any:
        raise StopAsyncIteration

    def pending(self) -> int:
        return 0

    def close(self) -> None:
        pass


class GraphOutbox:
    """Sends each frame to every outgoing edge; drops stale frames; a sink's outbox discards."""

    __slots__ = ("_control", "_edges", "_single", "discarded")

    def __init__(self, edges: list[_Edge], control: ControlLane) -> None:
        self._edges = edges
        self._single = edges[0] if len(edges) == 1 else None
        self._control = control
        self.discarded = 0

    async def send(self, frame: Any) -> None:
        epoch = getattr(frame, "epoch", None)
        if epoch is not None and epoch < self._control._epoch:
            return
        single = self._single
        if single is not None:
            await single.send(frame)
            return
        if not self._edges:
            self.discarded += 1
            return
        for edge in self._edges:
            await edge.send(frame)

    def close(self) -> None:
        for edge in self._edges:
            edge.close()


@dataclass
class Ports:
    """One stage's wiring, as opened for a run."""

    inbox: GraphInbox | _EmptyInbox
    outbox: GraphOutbox


@dataclass
class Graph:
    """A set of named stages and the edges between them. Build, then :meth:`open` per run."""

    stages: dict[str, Stage] = field(default_factory=dict)
    edges: list[tuple[str, str]] = field(default_factory=list)
    inboxes: dict[str, InboxSpec] = field(default_factory=dict)

    def add(
        self, stage: Stage, *, policy: Policy | None = None, capacity: int | None = None
    ) -> Stage:
        """Add a stage; ``policy``/``capacity`` configure its inbox."""
        if stage.name in self.stages:
            raise GraphError(f"duplicate stage name {stage.name!r}")
        self.stages[stage.name] = stage
        spec = InboxSpec()
        if policy is not None:
            spec.policy = policy
        if capacity is not None:
            if capacity < 1:
                raise GraphError(f"stage {stage.name!r}: capacity must be at least 1")
            spec.capacity = capacity
        self.inboxes[stage.name] = spec
        return stage

    def connect(self, src: Stage | str, dst: Stage | str) -> None:
        a, b = _name(src), _name(dst)
        for n in (a, b):
            if n not in self.stages:
                raise GraphError(f"unknown stage {n!r}; add it first")
        if a == b:
            raise GraphError(f"stage {a!r} cannot feed itself")
        if (a, b) in self.edges:
            raise GraphError(f"edge {a!r} → {b!r} already exists")
        self.edges.append((a, b))

    def chain(
        self, *stages: Stage, policy: Policy | None = None, capacity: int | None = None
    ) -> Graph:
        """Add (if new) and connect ``stages`` in a line; returns the graph."""
        for stage in stages:
            if stage.name not in self.stages:
                self.add(stage, policy=policy, capacity=capacity)
        for a, b in itertools.pairwise(stages):
            self.connect(a, b)
        return self

    def tap(
        self,
        src: Stage | str,
        observer: Stage,
        *,
        policy: Policy = "block",
        capacity: int | None = None,
    ) -> Stage:
        """Fan ``src``'s output out to an observer stage (added if new)."""
        if observer.name not in self.stages:
            self.add(observer, policy=policy, capacity=capacity)
        self.connect(src, observer)
        return observer

    def open(self, control: ControlLane) -> dict[str, Ports]:
        """Create the streams for one run."""
        ports: dict[str, Ports] = {}
        feeders = {name: [a for a, b in self.edges if b == name] for name in self.stages}
        sends: dict[str, list[_Edge]] = {name: [] for name in self.stages}
        inboxes: dict[str, GraphInbox | _EmptyInbox] = {}
        for name in self.stages:
            spec = self.inboxes[name]
            if not feeders[name]:
                inboxes[name] = _EmptyInbox()
                continue
            chan = Channel(spec.capacity)
            stats = EdgeStats()
            inboxes[name] = GraphInbox(chan, control, stats)
            for src in feeders[name]:
                sends[src].append(_Edge(chan, spec.policy, stats))
        for name in self.stages:
            ports[name] = Ports(inboxes[name], GraphOutbox(sends[name], control))
        return ports


def _name(stage: Stage | str) -> str:
    return stage if isinstance(stage, str) else stage.name
