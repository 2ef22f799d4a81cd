"""One supervisor per call: a task group, failure policies, a deadline, bounded cancellation.

Every stage of the call runs as a task in the supervisor's single task group. When a stage
raises, its policy decides:

* ``restart``: run the stage again on the same inbox and outbox after a backoff (doubling from
  ``backoff_s`` up to ``backoff_max_s``), at most ``max_restarts`` times; then ``then``
  (``fail`` by default, or ``degrade``);
* ``degrade``: the stage is removed and the call carries on; its inbox is forwarded unchanged
  to its outbox (a sink's is drained), so neighbours never block on it;
* ``fail``: the call ends at once with status ``failed``, naming the stage and the error.

The call also ends when every stage has returned (``completed``), when :meth:`Supervisor.stop`
is called (``stopped``, with the caller's reason), or when the deadline passes (``deadline``).
Ending cancels every task; stages bound their own cleanup with ``ctx.cleanup_scope()``, so the
supervisor returns within ``cleanup_bound_s`` of the end whatever the stages were awaiting.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import anyio

from pipeline.graph import Graph, Ports
from pipeline.stage import CallContext, PassThrough, Stage

PolicyKind = Literal["restart", "degrade", "fail"]
Status = Literal["completed", "stopped", "deadline", "failed"]


@dataclass(frozen=True)
class FailurePolicy:
    """What to do when a stage raises. Defaults: fail the call."""

    kind: PolicyKind = "fail"
    max_restarts: int = 3
    backoff_s: float = 0.1
    backoff_max_s: float = 2.0
    then: Literal["fail", "degrade"] = "fail"


RESTART = FailurePolicy("restart")
DEGRADE = FailurePolicy("degrade")
FAIL = FailurePolicy("fail")


@dataclass(frozen=True)
class StageFailure:
    stage: str
    error: str
    error_type: str
    at: float


@dataclass
class CallResult:
    """How the call ended and why."""

    status: Status
    reason: str
    started_at: float
    ended_at: float
    failed_stage: str | None = None
    error: str | None = None
    failures: list[StageFailure] = field(default_factory=list)
    restarts: dict[str, int] = field(default_factory=dict)
    degraded: list[str] = field(default_factory=list)

    @property
    def duration(self) -> float:
        return self.ended_at - self.started_at

    def as_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "reason": self.reason,
            "duration_s": round(self.duration, 3),
            "failed_stage": self.failed_stage,
            "error": self.error,
            "restarts": dict(self.restarts),
            "degraded": list(self.degraded),
            "failures": [f.__dict__ for f in self.failures],
        }


class _CallFailed(Exception):
    def __init__(self, stage: str, error: BaseException) -> None:
        super().__init__(stage)
        self.stage = stage
        self.error = error


class Supervisor:
    """Runs one call's graph. Create, then ``await run()``; ``stop()`` ends it early."""

    def __init__(
        self,
        ctx: CallContext,
        graph: Graph,
        *,
        policies: dict[str, FailurePolicy] | None = None,
        default_policy: FailurePolicy = FAIL,
        deadline_s: float | None = None,
    ) -> None:
        unknown = set(policies or {}) - set(graph.stages)
        if unknown:
            raise ValueError(f"policies for unknown stages: {sorted(unknown)}")
        self.ctx = ctx
        self.graph = graph
        self.policies = dict(policies or {})
        self.default_policy = default_policy
        self.deadline_s = deadline_s
        self._scope: anyio.CancelScope | None = None
        self._stop_reason: str | None = None
        self._failures: list[StageFailure] = []
        self._restarts: dict[str, int] = {}
        self._degraded: list[str] = []
        self._running: set[str] = set()
        self.result: CallResult | None = None

    @property
    def running_stages(self) -> set[str]:
        return set(self._running)

    def stop(self, reason: str = "stopped") -> None:
        """End the call now (status ``stopped``). Safe to call from any task, more than once."""
        if self._stop_reason is None:
            self._stop_reason = reason
        if self._scope is not None:
            self._scope.cancel()

    async def run(self) -> CallResult:
        ctx = self.ctx
        started = ctx.clock.now()
        ports = self.graph.open(ctx.control)
        status: Status = "completed"
        reason = "all stages finished"
        failed_stage: str | None = None
        error: str | None = None
        with anyio.CancelScope() as scope:
            self._scope = scope
            if self._stop_reason is not None:
                scope.cancel()
            if self.deadline_s is not None:
                scope.deadline = anyio.current_time() + self.deadline_s
            try:
                async with anyio.create_task_group() as tg:
                    for name, stage in self.graph.stages.items():
                        tg.start_soon(self._run_stage, name, stage, ports[name], name=name)
            except _CallFailed as failed:
                status, failed_stage = "failed", failed.stage
                error = _describe(failed.error)
                reason = f"stage {failed.stage!r} failed: {error}"
            except BaseException as group:  # an ExceptionGroup holding our _CallFailed
                found = _find_failure(group)
                if found is None:
                    raise
                status, failed_stage = "failed", found.stage
                error = _describe(found.error)
                reason = f"stage {found.stage!r} failed: {error}"
        for p in ports.values():
            p.outbox.close()
            p.inbox.close()
        if status != "failed" and scope.cancelled_caught:
            if self._stop_reason is not None:
                status, reason = "stopped", self._stop_reason
            else:
                status, reason = "deadline", f"call deadline of {self.deadline_s} s passed"
        self._scope = None
        self.result = CallResult(
            status=status,
            reason=reason,
            started_at=started,
            ended_at=ctx.clock.now(),
            failed_stage=failed_stage,
            error=error,
            failures=list(self._failures),
            restarts=dict(self._restarts),
            degraded=list(self._degraded),
        )
        return self.result

    async def _run_stage(self, name: str, stage: Stage, ports: Ports) -> None:
        policy = self.policies.get(name, self.default_policy)
        ctx = self.ctx
        self._running.add(name)
        try:
            attempt = 0
            while True:
                try:
                    await stage.run(ctx, ports.inbox, ports.outbox)
                    return
                except anyio.get_cancelled_exc_class():
                    raise
                except Exception as exc:
                    self._failures.append(
                        StageFailure(name, _describe(exc), type(exc).__name__, ctx.clock.now())
                    )
                    ctx.log.warning(
                        "stage %s failed: %s", name, _describe(exc), extra={"stage": name}
                    )
                    kind = policy.kind
                    if kind == "restart" and attempt >= policy.max_restarts:
                        kind = policy.then
                    if kind == "restart":
                        delay = min(policy.backoff_s * (2**attempt), policy.backoff_max_s)
                        attempt += 1
                        self._restarts[name] = attempt
                        await ctx.clock.sleep(delay)
                        continue
                    if kind == "degrade":
                        self._degraded.append(name)
                        ctx.log.warning("stage %s degraded: carrying on without it", name)
                        await PassThrough(name).run(ctx, ports.inbox, ports.outbox)
                        return
                    raise _CallFailed(name, exc) from exc
        finally:
            self._running.discard(name)
            ports.outbox.close()


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _find_failure(exc: BaseException) -> _CallFailed | None:
    if isinstance(exc, _CallFailed):
        return exc
    for sub in getattr(exc, "exceptions", ()):
        found = _find_failure(sub)
        if found is not None:
            return found
    return None
