"""The control lane: interrupts and epochs, kept outside the data queues.

Each agent reply is an epoch. A barge-in calls :meth:`ControlLane.interrupt`, which raises the
epoch at once and notifies every subscriber synchronously, so no stage waits behind queued
audio to learn about it. Stages then:

* cancel in-flight work for the old epoch (:meth:`ControlLane.epoch_scope` does it for them);
* drop frames stamped with an older epoch (the graph's inboxes do it before a stage sees them).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import anyio

log = logging.getLogger("pipeline.control")


@dataclass(frozen=True, slots=True)
class Interrupt:
    """An interrupt moved the call from ``old_epoch`` to ``epoch``."""

    epoch: int
    old_epoch: int
    reason: str
    at: float


Listener = Callable[[Interrupt], None]


class ControlLane:
    """Epoch counter plus synchronous interrupt fan-out. One per call."""

    def __init__(self, now: Callable[[], float] | None = None) -> None:
        self._epoch = 0
        self._listeners: list[Listener] = []
        self._changed = anyio.Event()
        self._now = now or (lambda: 0.0)
        self.interrupts = 0

    @property
    def epoch(self) -> int:
        """The current epoch; frames stamped with a lower one are stale."""
        return self._epoch

    def is_stale(self, epoch: int | None) -> bool:
        return epoch is not None and epoch < self._epoch

    def next_epoch(self) -> int:
        """Start a new agent reply without interrupting (no listeners are told)."""
        self._epoch += 1
        return self._epoch

    def interrupt(self, reason: str = "barge-in") -> Interrupt:
        """Raise the epoch and tell every listener now (synchronously)."""
        old = self._epoch
        self._epoch += 1
        self.interrupts += 1
        event = Interrupt(epoch=self._epoch, old_epoch=old, reason=reason, at=self._now())
        for listener in list(self._listeners):
            try:
                listener(event)
            except Exception:  # a broken listener must not stop the others hearing it
                log.exception("interrupt listener failed")
        changed, self._changed = self._changed, anyio.Event()
        changed.set()
        return event

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Call ``listener`` on every interrupt; returns the unsubscribe function."""
        self._listeners.append(listener)

        def unsubscribe() -> None:
            if listener in self._listeners:
                self._listeners.remove(listener)

        return unsubscribe

    async def wait_interrupt(self) -> None:
        """Return at the next interrupt."""
        await self._changed.wait()

    @contextmanager
    def epoch_scope(self, epoch: int | None = None) -> Iterator[anyio.CancelScope]:
        """A cancel scope that is cancelled as soon as the lane moves past ``epoch``.

        Wrap a reply's in-flight work (a provider stream, a playback loop) in it::

            with ctx.control.epoch_scope(frame.epoch):
                async for chunk in provider.stream(...):
                    ...
        """
        target = self._epoch if epoch is None else epoch
        scope = anyio.CancelScope()
        if target < self._epoch:
            scope.cancel()

        def on_interrupt(event: Interrupt) -> None:
            if event.epoch > target:
                scope.cancel()

        unsubscribe = self.subscribe(on_interrupt)
        try:
            with scope:
                yield scope
        finally:
            unsubscribe()
