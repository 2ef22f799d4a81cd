"""Graph: wires stages together with bounded anyio memory object streams.

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
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

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

    __slots__ = ("_drain", "_send", "policy", "stats")

    def __init__(
        self,
        send: MemoryObjectSendStream[Any],
        drain: MemoryObjectReceiveStream[Any],
        policy: Policy,
        stats: EdgeStats,
    ) -> None:
        self._send = send
        self._drain = drain
        self.policy = policy
        self.stats = stats

    async def send(self, frame: Any) -> None:
        try:
            self._send.send_nowait(frame)
            return
        except anyio.WouldBlock:
            pass
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            return  # the destination has finished; nothing downstream wants this frame
        if self.policy == "block":
            try:
                await self._send.send(frame)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                return
            return
        # drop_oldest: make room by discarding the oldest queued frame, never wait.
        while True:
            try:
                self._drain.receive_nowait()
                self.stats.dropped_overflow += 1
            except (anyio.WouldBlock, anyio.EndOfStream):
                pass
            try:
                self._send.send_nowait(frame)
                return
            except anyio.WouldBlock:
                continue
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                return

    def close(self) -> None:
        self._send.close()


class GraphInbox:
    """The receive side of a stage's inbox; skips frames of stale epochs."""

    __slots__ = ("_control", "_recv", "stats")

    def __init__(
        self, recv: MemoryObjectReceiveStream[Any], control: ControlLane, stats: EdgeStats
    ) -> None:
        self._recv = recv
        self._control = control
        self.stats = stats

    async def receive(self) -> Any:
        recv, control, stats = self._recv, self._control, self.stats
        while True:
            try:
                frame = recv.receive_nowait()
            except anyio.WouldBlock:
                frame = await recv.receive()
            epoch = getattr(frame, "epoch", None)
            if epoch is not None and epoch < control._epoch:
                stats.dropped_stale += 1
                continue
            stats.delivered += 1
            return frame

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Any]:
        while True:
            try:
                frame = await self.receive()
            except (anyio.EndOfStream, anyio.ClosedResourceError):
                return
            yield frame

    def pending(self) -> int:
        return self._recv.statistics().current_buffer_used

    def close(self) -> None:
        self._recv.close()


class _EmptyInbox:
    """The inbox of a source stage: ends at once."""

    stats = EdgeStats()

    async def receive(self) -> Any:
        raise anyio.EndOfStream

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Any]:
        return
        yield  # pragma: no cover

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
            send, recv = anyio.create_memory_object_stream[Any](spec.capacity)
            stats = EdgeStats()
            inboxes[name] = GraphInbox(recv, control, stats)
            handles = [send] + [send.clone() for _ in feeders[name][1:]]
            send_iter = iter(handles)
            for src in feeders[name]:
                sends[src].append(_Edge(next(send_iter), recv, spec.policy, stats))
        for name in self.stages:
            ports[name] = Ports(inboxes[name], GraphOutbox(sends[name], control))
        return ports


def _name(stage: Stage | str) -> str:
    return stage if isinstance(stage, str) else stage.name
