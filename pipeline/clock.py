"""Clocks: the monotonic clock of a live call and a virtual clock for deterministic tests.

Stages never call ``time.monotonic()`` or ``anyio.sleep()`` directly; they use the call's
clock. Both clocks read the running event loop's time, so anyio's own timeouts
(``fail_after``, ``move_on_after``) agree with them.

The virtual clock replaces the loop's notion of time: whenever every task is waiting and the
loop would block until its next timer, time jumps straight to that timer instead. A 30-minute
interview made of sleeps and timeouts therefore runs in milliseconds, and always the same way.
Real I/O still works (the selector is polled without blocking first), but a test that waits on a
thread or a socket while timers are pending will see time jump; keep virtual-time tests to pure
logic and in-memory streams.
"""

from __future__ import annotations

import asyncio
import selectors
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar, runtime_checkable

import anyio

T = TypeVar("T")


@runtime_checkable
class Clock(Protocol):
    """What a stage needs of time."""

    def now(self) -> float:
        """Seconds on a monotonic scale (only differences mean anything)."""
        ...

    async def sleep(self, seconds: float) -> None: ...

    async def sleep_until(self, deadline: float) -> None: ...


class MonotonicClock:
    """The real clock: ``time.monotonic`` (the same scale as asyncio's loop time)."""

    def now(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await anyio.sleep(max(0.0, seconds))

    async def sleep_until(self, deadline: float) -> None:
        await anyio.sleep(max(0.0, deadline - self.now()))


class _VirtualSelector(selectors.BaseSelector):
    """Wraps the loop's selector: never blocks while a timer is pending; jumps time instead."""

    def __init__(self, inner: selectors.BaseSelector, clock: VirtualClock) -> None:
        self._inner = inner
        self._clock = clock

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        events = self._inner.select(0)
        if events:
            return events
        if timeout is None:
            # Nothing scheduled: only real I/O (a thread finishing, a socket) can wake us.
            return self._inner.select(None)
        if timeout > 0:
            self._clock.advance(timeout)
        return []

    def register(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        return self._inner.register(fileobj, events, data)

    def unregister(self, fileobj: Any) -> selectors.SelectorKey:
        return self._inner.unregister(fileobj)

    def modify(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        return self._inner.modify(fileobj, events, data)

    def close(self) -> None:
        self._inner.close()

    def get_key(self, fileobj: Any) -> selectors.SelectorKey:
        return self._inner.get_key(fileobj)

    def get_map(self) -> Any:
        return self._inner.get_map()


class VirtualClock:
    """Deterministic time for tests: the event loop's time jumps to the next timer.

    Use :meth:`run` (or :meth:`loop_factory` with ``anyio.run``) to run a coroutine function
    on a loop driven by this clock::

        clock = VirtualClock()
        result = clock.run(main, clock)
    """

    def __init__(self, start: float = 1000.0) -> None:
        self._now = start

    def now(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("time cannot go backwards")
        self._now += seconds

    async def sleep(self, seconds: float) -> None:
        await anyio.sleep(max(0.0, seconds))

    async def sleep_until(self, deadline: float) -> None:
        await anyio.sleep(max(0.0, deadline - self._now))

    def loop_factory(self) -> asyncio.AbstractEventLoop:
        """A new selector event loop whose time is this clock."""
        selector = _VirtualSelector(selectors.DefaultSelector(), self)
        loop = asyncio.SelectorEventLoop(selector)
        loop.time = self.now  # type: ignore[method-assign]
        return loop

    def run(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        return anyio.run(
            fn, *args, backend="asyncio", backend_options={"loop_factory": self.loop_factory}
        )
