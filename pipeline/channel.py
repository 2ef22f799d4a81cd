"""A bounded, single-consumer, multi-producer frame channel for the graph's edges.

It keeps anyio's memory-object-stream semantics and exceptions (``anyio.WouldBlock``,
``anyio.EndOfStream`` once every sender has closed and the buffer is empty,
``anyio.BrokenResourceError`` when the receiver has gone) and anyio's cancellation (a task
cancelled by a cancel scope leaves its wait cleanly), but waits on one bare future per blocked
task instead of an ``anyio.Event`` plus a checkpoint per receive. On this 2-core machine that
cut the per-hop latency of an idle 9-hop chain from about 20 µs to about 7 µs (p50), which is
what the pacer-to-transport path needs (benchmarks/RESULTS.md). Everything else in the pipeline
(task groups, cancel scopes, timeouts) is anyio.

Not thread-safe: every producer and the consumer live on the call's event loop.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any

import anyio


class Channel:
    __slots__ = ("_buf", "_getter", "_putters", "_recv_closed", "_senders", "capacity")

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self._buf: deque[Any] = deque()
        self._getter: asyncio.Future[None] | None = None
        self._putters: deque[asyncio.Future[None]] = deque()
        self._senders = 0
        self._recv_closed = False

    # -- producers -------------------------------------------------------------------------
    def add_sender(self) -> None:
        self._senders += 1

    def close_sender(self) -> None:
        """One producer is done; the receiver sees end-of-stream when all are."""
        if self._senders > 0:
            self._senders -= 1
            if self._senders == 0:
                self._wake_getter()

    def send_nowait(self, item: Any) -> None:
        if self._recv_closed:
            raise anyio.BrokenResourceError
        if len(self._buf) >= self.capacity:
            raise anyio.WouldBlock
        self._buf.append(item)
        self._wake_getter()

    def send_drop_oldest(self, item: Any) -> bool:
        """Append without ever waiting; returns True if the oldest item was dropped for it."""
        if self._recv_closed:
            raise anyio.BrokenResourceError
        dropped = False
        if len(self._buf) >= self.capacity:
            self._buf.popleft()
            dropped = True
        self._buf.append(item)
        self._wake_getter()
        return dropped

    async def send(self, item: Any) -> None:
        """Wait for room (backpressure), then append."""
        while True:
            try:
                self.send_nowait(item)
                return
            except anyio.WouldBlock:
                pass
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._putters.append(fut)
            try:
                await fut
            except BaseException:
                if fut in self._putters:
                    self._putters.remove(fut)
                elif fut.done() and not fut.cancelled():
                    self._wake_putter()  # pass on the room we were given
                raise

    # -- the consumer ----------------------------------------------------------------------
    def receive_nowait(self) -> Any:
        if self._buf:
            item = self._buf.popleft()
            if self._putters:
                self._wake_putter()
            return item
        if self._senders == 0:
            raise anyio.EndOfStream
        raise anyio.WouldBlock

    async def receive(self) -> Any:
        while True:
            if self._buf:
                item = self._buf.popleft()
                if self._putters:
                    self._wake_putter()
                return item
            if self._senders == 0 or self._recv_closed:
                raise anyio.EndOfStream
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._getter = fut
            try:
                await fut
            finally:
                self._getter = None

    def close_receiver(self) -> None:
        """The consumer is gone: queued items are dropped and producers get BrokenResource."""
        self._recv_closed = True
        self._buf.clear()
        while self._putters:
            fut = self._putters.popleft()
            if not fut.done():
                fut.set_result(None)
        self._wake_getter()

    def __len__(self) -> int:
        return len(self._buf)

    # -- internals -------------------------------------------------------------------------
    def _wake_getter(self) -> None:
        getter = self._getter
        if getter is not None and not getter.done():
            getter.set_result(None)

    def _wake_putter(self) -> None:
        while self._putters:
            fut = self._putters.popleft()
            if not fut.done():
                fut.set_result(None)
                return
