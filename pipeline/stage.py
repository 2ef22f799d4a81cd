"""The stage contract (DESIGN.md §4) and helpers for simple stages.

A stage reads frames from its inbox until the inbox ends, writes frames to its outbox, and
returns. The graph closes the outbox afterwards, so end-of-stream flows downstream by itself.
A stage never starts a task that outlives it: it opens its own task group inside ``run``.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import anyio

from pipeline.clock import Clock, MonotonicClock
from pipeline.control import ControlLane
from pipeline.metrics import TurnTimeline, Usage


class CallLogger(logging.LoggerAdapter):  # type: ignore[type-arg,unused-ignore]
    """A logger that stamps every record with the call id (``extra={"callId": ...}``)."""

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        extra = dict(self.extra or {})
        extra.update(kwargs.get("extra") or {})
        kwargs["extra"] = extra
        return msg, kwargs


@dataclass
class CallContext:
    """What every stage of one call shares."""

    call_id: str = "call"
    clock: Clock = field(default_factory=MonotonicClock)
    control: ControlLane = field(default_factory=ControlLane)
    timeline: TurnTimeline = field(default_factory=TurnTimeline)
    usage: Usage = field(default_factory=Usage)
    settings: Any = None
    cleanup_bound_s: float = 2.0
    log: logging.LoggerAdapter = field(init=False)  # type: ignore[type-arg,unused-ignore]

    def __post_init__(self) -> None:
        self.log = CallLogger(logging.getLogger("synchire.call"), {"callId": self.call_id})
        if isinstance(self.control, ControlLane):
            self.control._now = self.clock.now

    def mark(self, turn_id: int | None, name: Any) -> bool:
        """Mark ``name`` on the turn's timeline at the clock's current time."""
        return self.timeline.mark(turn_id, name, self.clock.now())

    @contextmanager
    def cleanup_scope(self) -> Iterator[anyio.CancelScope]:
        """A shielded scope for cleanup after cancellation, bounded by ``cleanup_bound_s``.

        Use it for the awaits in a stage's ``finally`` (closing a socket, telling a provider
        to stop), so that cancelling a call always finishes within a fixed time.
        """
        with anyio.move_on_after(self.cleanup_bound_s, shield=True) as scope:
            yield scope


class Inbox(Protocol):
    """A stage's input: iterate it until it ends. Stale-epoch frames never appear."""

    def __aiter__(self) -> AsyncIterator[Any]: ...

    async def receive(self) -> Any:
        """The next frame; raises ``anyio.EndOfStream`` when the inbox has ended."""
        ...


class Outbox(Protocol):
    """A stage's output; ``send`` applies each edge's overflow policy."""

    async def send(self, frame: Any) -> None: ...


@runtime_checkable
class Stage(Protocol):
    """Anything with a ``name`` and this ``run`` coroutine is a stage."""

    name: str

    async def run(self, ctx: CallContext, inbox: Inbox, outbox: Outbox) -> None: ...


class MapStage:
    """Applies ``fn`` to each frame; ``None`` results are dropped (so it also filters).

    ``fn`` may be sync or async. Frames of types not in ``types`` pass through untouched.
    """

    def __init__(
        self,
        fn: Callable[[Any], Any],
        *,
        name: str | None = None,
        types: tuple[type, ...] | None = None,
    ) -> None:
        self.fn = fn
        self.name = name or getattr(fn, "__name__", "map")
        self.types = types
        self._async = _is_async(fn)

    async def run(self, ctx: CallContext, inbox: Inbox, outbox: Outbox) -> None:
        fn, types, is_async = self.fn, self.types, self._async
        async for frame in inbox:
            if types is not None and not isinstance(frame, types):
                await outbox.send(frame)
                continue
            out = await fn(frame) if is_async else fn(frame)
            if out is not None:
                await outbox.send(out)


class FilterStage(MapStage):
    """Keeps frames for which ``predicate`` is true."""

    def __init__(self, predicate: Callable[[Any], bool], *, name: str | None = None) -> None:
        super().__init__(lambda f: f if predicate(f) else None, name=name or "filter")


class PassThrough:
    """Forwards every frame unchanged (also what a degraded stage becomes)."""

    def __init__(self, name: str = "pass") -> None:
        self.name = name

    async def run(self, ctx: CallContext, inbox: Inbox, outbox: Outbox) -> None:
        async for frame in inbox:
            await outbox.send(frame)


class Collect:
    """A sink that keeps every frame it receives (tests, batch runs, observers)."""

    def __init__(self, name: str = "collect", types: tuple[type, ...] | None = None) -> None:
        self.name = name
        self.types = types
        self.frames: list[Any] = []

    async def run(self, ctx: CallContext, inbox: Inbox, outbox: Outbox) -> None:
        async for frame in inbox:
            if self.types is None or isinstance(frame, self.types):
                self.frames.append(frame)


def _is_async(fn: Callable[..., Any]) -> bool:
    import inspect

    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)  # noqa: B004
    )


AsyncFrameFn = Callable[[Any], Awaitable[Any]]
