"""The durable outbox and the signed webhook delivery of interview results (DESIGN.md §7).

:class:`ResultsService` checkpoints running interviews and delivers their results (built and
signed by :mod:`interview.results`) with retries. Layout of ``OUTBOX_DIR``::

    active/<callId>.json                 checkpoint of a running interview (admit → submit)
    pending/<callId>.<resultId>.json     a result waiting for a 2xx (written before attempt 1)
    dead/<callId>.<resultId>.json        refused for good (a 4xx other than 408/429), kept

Every file is written whole (temp file, fsync, ``os.replace``) and belongs to one interview, so
instances sharing a Cloud Storage volume never write the same object (docs/OUTBOX.md).
"""

from __future__ import annotations

import json
import logging
import os
import random
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import anyio
import anyio.to_thread
import httpx
import tenacity
from anyio.abc import TaskGroup

from interview.results import (
    IDEMPOTENCY_HEADER,
    SIGNATURE_HEADER,
    Transcript,
    _check_call_id,
    completion_payload,
    idempotency_key,
    sign,
    webhook_url,
)

# The logger keeps the name it had before the split, so log configuration and filters still apply.
log = logging.getLogger("synchire.results")

_RETRYABLE_STATUS = frozenset({408, 429})


# --------------------------------------------------------------------------- files


def _dump(data: Mapping[str, Any]) -> bytes:
    return json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode()


def _write_atomic(path: Path, data: Mapping[str, Any]) -> None:
    """Write whole or not at all: temp file, fsync, rename over the target."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(_dump(data))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable where the file system supports it
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def _read_json(path: Path) -> dict[str, Any]:
    """The file's JSON object; ValueError naming the file if it is not one."""
    try:
        data = json.loads(path.read_bytes())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc.msg})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not a JSON object")
    return data


def _list_json(directory: Path) -> list[Path]:
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if p.suffix == ".json" and p.name[0] != ".")


def _move(path: Path, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    os.replace(path, directory / path.name)


def _remove_stale_temps(directories: Sequence[Path], older_than: float) -> None:
    """Temp files left by a process killed mid-write (never read; just clutter)."""
    for directory in directories:
        if directory.is_dir():
            for p in directory.glob(".*.tmp"):
                try:
                    if p.stat().st_mtime < older_than:
                        p.unlink()
                except OSError:
                    pass


# --------------------------------------------------------------------------- service


@dataclass(frozen=True)
class DeliveryOptions:
    """How hard one delivery run tries before leaving the result in ``pending/``."""

    max_attempts: int = 6  # attempts per run; then the result waits for the next sweep / start
    backoff_initial_s: float = 0.5  # first wait; doubles each attempt, with jitter
    backoff_max_s: float = 30.0  # cap on one wait (also on a server's Retry-After)
    request_timeout_s: float = 10.0  # connect / read / write / pool timeout of one attempt
    concurrency: int = 4  # results delivered at once

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts: must be at least 1")
        if not 0 < self.backoff_initial_s <= self.backoff_max_s:
            raise ValueError("backoff_initial_s: must be > 0 and <= backoff_max_s")
        if self.request_timeout_s <= 0:
            raise ValueError("request_timeout_s: must be > 0")
        if self.concurrency < 1:
            raise ValueError("concurrency: must be at least 1")


@dataclass(frozen=True)
class OutboxOptions:
    """Checkpoint cadence and when another process's files count as orphaned."""

    checkpoint_interval_s: float = 1.0  # at most one round of checkpoint writes per interval
    heartbeat_s: float = 30.0  # live checkpoints are rewritten this often even when unchanged
    # A checkpoint or pending result of another process untouched this long is taken over.
    # Must exceed heartbeat_s plus the volume's metadata cache TTL; 0 suits a single process.
    orphan_after_s: float = 180.0
    sweep_interval_s: float = 60.0  # a running service looks for orphans and retries this often

    def __post_init__(self) -> None:
        for name in ("checkpoint_interval_s", "heartbeat_s", "sweep_interval_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be > 0")
        if self.orphan_after_s < 0:
            raise ValueError("orphan_after_s: must be >= 0")


Outcome = Literal["delivered", "dead", "pending", "no_webhook"]


@dataclass(frozen=True)
class DeliveryReport:
    """What one delivery run did with one result."""

    call_id: str
    result_id: str
    outcome: Outcome
    attempts: int
    status_code: int | None  # the last HTTP status, None if no answer (or no attempt)


@dataclass(frozen=True)
class PendingResult:
    """A result written to the outbox by :meth:`ResultsService.submit`."""

    call_id: str
    result_id: str
    idempotency_key: str
    path: Path


@dataclass
class _Live:
    """A running interview's checkpoint state (mutated only on the event loop)."""

    call_id: str
    result_id: str
    candidate_name: str
    job_title: str
    started_at: float
    total_questions: int
    questions_asked: int = 0
    transcript: list[dict[str, Any]] = field(default_factory=list)
    dirty: bool = False
    finished: bool = False
    lock: anyio.Lock = field(default_factory=anyio.Lock)

    def record(self, owner: str, now: float) -> dict[str, Any]:
        return {
            "version": 1,
            "callId": self.call_id,
            "resultId": self.result_id,
            "owner": owner,
            "candidateName": self.candidate_name,
            "jobTitle": self.job_title,
            "startedAt": self.started_at,
            "updatedAt": now,
            "questionsAsked": self.questions_asked,
            "totalQuestions": self.total_questions,
            "transcript": list(self.transcript),
        }


class _Retry(Exception):
    """A failed attempt worth repeating (network error, timeout, 408, 429, 5xx)."""

    def __init__(self, status: int | None, error: str, retry_after: float | None = None) -> None:
        super().__init__(error)
        self.status = status
        self.error = error
        self.retry_after = retry_after


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after", "").strip()
    return float(value) if value.isdigit() else None


class ResultsService:
    """The durable outbox and the signed webhook delivery, one per process.

    Run it for the process's lifetime (``async with ResultsService(...) as results``); it owns a
    task group for background deliveries, the checkpoint writer, the heartbeat and the sweep.
    Leaving the block cancels deliveries still in flight: call :meth:`flush` first to give them
    time. What is cancelled stays in ``pending/`` and is delivered after the next start.

    ``secret`` is :func:`signing_secret` of the settings; without one requests go unsigned (a
    warning is logged). Without ``webhook_base_url`` results stay in the outbox (development).
    ``sleep`` is used between attempts, ``wall_clock`` for timestamps; both are injectable for
    tests. File I/O runs in worker threads, so a slow volume never stalls the audio.
    """

    def __init__(
        self,
        outbox_dir: str | os.PathLike[str],
        *,
        webhook_base_url: str | None,
        secret: str | None,
        delivery: DeliveryOptions | None = None,
        outbox: OutboxOptions | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
        wall_clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        instance_id: str | None = None,
    ) -> None:
        self.outbox_dir = Path(outbox_dir)
        self.active_dir = self.outbox_dir / "active"
        self.pending_dir = self.outbox_dir / "pending"
        self.dead_dir = self.outbox_dir / "dead"
        self.webhook_url = webhook_url(webhook_base_url) if webhook_base_url else None
        self.instance_id = instance_id or f"{os.getpid()}-{secrets.token_hex(4)}"
        self._secret = secret or None
        self._delivery = delivery or DeliveryOptions()
        self._outbox = outbox or OutboxOptions()
        self._transport = transport
        self._sleep = sleep
        self._wall_clock = wall_clock
        self._rng = rng or random.Random()
        self._live: dict[str, _Live] = {}
        self._inflight: set[str] = set()
        self._idle = anyio.Event()
        self._idle.set()
        self._wake = anyio.Event()
        self._tg: TaskGroup | None = None
        self._client: httpx.AsyncClient | None = None
        self._limiter = anyio.CapacityLimiter(self._delivery.concurrency)

    def __repr__(self) -> str:  # never shows the secret
        return f"ResultsService({str(self.outbox_dir)!r}, instance_id={self.instance_id!r})"

    # ---- lifetime

    async def __aenter__(self) -> ResultsService:
        if self.webhook_url and not self._secret:
            log.warning("no WEBHOOK_SECRET or API_SECRET_KEY: webhooks will be sent unsigned")
        self._client = self._new_client()
        tg = anyio.create_task_group()
        await tg.__aenter__()
        self._tg = tg
        for loop in (self._checkpoint_loop, self._heartbeat_loop, self._sweep_loop):
            tg.start_soon(loop)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        tg, self._tg = self._tg, None
        try:
            if tg is not None:
                tg.cancel_scope.cancel()
                await tg.__aexit__(None, None, None)
        finally:
            if self._client is not None:
                await self._client.aclose()
                self._client = None

    def _new_client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            timeout=self._delivery.request_timeout_s,
            transport=self._transport,
            follow_redirects=False,
            headers={"User-Agent": "synchire-agent"},
        )

    def _running(self) -> TaskGroup:
        if self._tg is None:
            raise RuntimeError(
                "ResultsService is not running: use 'async with ResultsService(...)'"
            )
        return self._tg

    async def _io(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await anyio.to_thread.run_sync(fn, *args)

    # ---- checkpoints

    async def admit(
        self,
        call_id: str,
        *,
        candidate_name: str,
        job_title: str,
        total_questions: int = 0,
        started_at: float | None = None,
    ) -> str:
        """Checkpoint a newly admitted interview (durably, before returning); its result id.

        A checkpoint already there for this callId (a previous run that died) is turned into
        its ``abandoned`` result first. Raises OSError if the outbox cannot be written.
        """
        self._running()
        _check_call_id(call_id, "callId")
        if call_id in self._live:
            raise ValueError(f"callId: {call_id} is already admitted")
        live = _Live(
            call_id=call_id,
            result_id=secrets.token_hex(8),
            candidate_name=candidate_name,
            job_title=job_title,
            started_at=self._wall_clock() if started_at is None else started_at,
            total_questions=total_questions,
        )
        self._live[call_id] = live
        path = self.active_dir / f"{call_id}.json"
        try:
            async with live.lock:
                if await self._io(path.exists):
                    await self._take_over(path, admitting=True)
                await self._io(_write_atomic, path, live.record(self.instance_id, self._now()))
        except BaseException:
            self._live.pop(call_id, None)
            raise
        log.info("interview %s admitted to the outbox", call_id, extra={"callId": call_id})
        return live.result_id

    def checkpoint(
        self,
        call_id: str,
        *,
        transcript: Transcript | Sequence[Mapping[str, Any]],
        questions_asked: int | None = None,
        total_questions: int | None = None,
    ) -> None:
        """Record an admitted interview's progress. Cheap and never blocks: the state is kept in
        memory and written by the background writer, at most once per ``checkpoint_interval_s``
        and only when it changed. Unknown or finished interviews are ignored."""
        live = self._live.get(call_id)
        if live is None or live.finished:
            return
        entries = (
            transcript.entries()
            if isinstance(transcript, Transcript)
            else [dict(e) for e in transcript]
        )
        asked = live.questions_asked if questions_asked is None else questions_asked
        total = live.total_questions if total_questions is None else total_questions
        if (entries, asked, total) == (live.transcript, live.questions_asked, live.total_questions):
            return
        live.transcript, live.questions_asked, live.total_questions = entries, asked, total
        live.dirty = True
        self._wake.set()

    async def _checkpoint_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake = anyio.Event()
            for live in list(self._live.values()):
                if live.dirty:
                    await self._write_checkpoint(live)
            await anyio.sleep(self._outbox.checkpoint_interval_s)

    async def _write_checkpoint(self, live: _Live) -> None:
        async with live.lock:
            if live.finished or not live.dirty:
                return
            live.dirty = False
            record = live.record(self.instance_id, self._now())
            try:
                await self._io(_write_atomic, self.active_dir / f"{live.call_id}.json", record)
            except OSError as exc:
                live.dirty = True
                log.warning(
                    "checkpoint of %s not written: %s",
                    live.call_id,
                    type(exc).__name__,
                    extra={"callId": live.call_id},
                )

    async def _heartbeat_loop(self) -> None:
        while True:
            await anyio.sleep(self._outbox.heartbeat_s)
            for live in self._live.values():
                live.dirty = True
            self._wake.set()

    # ---- results

    async def submit(self, payload: Mapping[str, Any]) -> PendingResult:
        """Write the result to ``pending/`` (durably), drop its checkpoint, deliver it in the
        background. :meth:`flush` waits for the delivery. Raises ValueError for a payload
        without a valid ``interviewId`` or that is not JSON, OSError if it cannot be written."""
        self._running()
        call_id = _check_call_id(payload.get("interviewId"), "interviewId")
        try:
            _dump(payload)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"payload: not JSON-serialisable ({exc})") from None
        live = self._live.get(call_id)
        result_id = live.result_id if live else secrets.token_hex(8)
        path = self._pending_path(call_id, result_id)
        envelope = self._envelope(call_id, result_id, dict(payload))
        if live is None:
            await self._io(_write_atomic, path, envelope)
        else:
            async with live.lock:  # the checkpoint writer cannot resurrect the file afterwards
                live.finished = True
                try:
                    await self._io(_write_atomic, path, envelope)
                except BaseException:
                    live.finished = False  # keep checkpointing; the caller may submit again
                    raise
                self._live.pop(call_id, None)
                await self._io((self.active_dir / f"{call_id}.json").unlink, True)
        log.info(
            "result of %s written to the outbox (%s)",
            call_id,
            payload.get("status"),
            extra={"callId": call_id},
        )
        if self.webhook_url is None:
            self._log_no_webhook(call_id, path)
        else:
            self._schedule(path)
        return PendingResult(call_id, result_id, idempotency_key(call_id, result_id), path)

    async def recover(self) -> list[str]:
        """At startup: turn orphaned checkpoints into ``abandoned`` results (endReason
        ``crashed``, the candidate, job and partial transcript, ``completedAt`` = the last
        checkpoint), then deliver every pending result in the background. Returns the callIds
        recovered. A checkpoint of another live process (younger than ``orphan_after_s``) is
        left alone; the periodic sweep takes it over if that process is really gone."""
        self._running()
        recovered = await self._recover_orphans()
        for path in await self._io(_list_json, self.pending_dir):
            self._schedule(path)
        return recovered

    async def deliver_pending(self) -> list[DeliveryReport]:
        """Deliver every pending result now and wait (works without ``async with`` too)."""
        reports: list[DeliveryReport] = []
        client = self._client or self._new_client()

        async def one(path: Path) -> None:
            try:
                async with self._limiter:
                    report = await self._deliver(path, client)
            finally:
                self._release(path)
            if report is not None:
                reports.append(report)

        try:
            async with anyio.create_task_group() as tg:
                for path in await self._io(_list_json, self.pending_dir):
                    if self._claim(path):  # else a background run is delivering it already
                        tg.start_soon(one, path)
        finally:
            if client is not self._client:
                await client.aclose()
        return reports

    async def flush(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for background deliveries; True if none is left in flight."""
        with anyio.move_on_after(timeout_s):
            while self._inflight:
                await self._idle.wait()
        return not self._inflight

    # ---- internals

    def _now(self) -> float:
        return float(self._wall_clock())

    def _pending_path(self, call_id: str, result_id: str) -> Path:
        return self.pending_dir / f"{call_id}.{result_id}.json"

    def _envelope(self, call_id: str, result_id: str, payload: dict[str, Any]) -> dict[str, Any]:
        return {
            "version": 1,
            "callId": call_id,
            "resultId": result_id,
            "owner": self.instance_id,
            "createdAt": self._now(),
            "updatedAt": self._now(),
            "attempts": 0,
            "lastStatus": None,
            "lastError": None,
            "payload": payload,
        }

    def _log_no_webhook(self, call_id: str, path: Path) -> None:
        log.warning(
            "NEXTJS_WEBHOOK_URL is not set: the result of %s stays in the outbox at %s",
            call_id,
            path,
            extra={"callId": call_id},
        )

    def _claim(self, path: Path) -> bool:
        """Mark a pending file as being delivered here; False if it already is."""
        if path.name in self._inflight:
            return False
        if not self._inflight:
            self._idle = anyio.Event()
        self._inflight.add(path.name)
        return True

    def _release(self, path: Path) -> None:
        self._inflight.discard(path.name)
        if not self._inflight:
            self._idle.set()

    def _schedule(self, path: Path, min_age_s: float = 0.0) -> None:
        tg = self._running()
        if self._claim(path):
            tg.start_soon(self._background_delivery, path, min_age_s)

    async def _background_delivery(self, path: Path, min_age_s: float) -> None:
        try:
            async with self._limiter:
                assert self._client is not None
                await self._deliver(path, self._client, min_age_s)
        except Exception:  # a background task must never take the service down
            log.exception("delivery of %s failed unexpectedly; it stays pending", path.name)
        finally:
            self._release(path)

    async def _sweep_loop(self) -> None:
        while True:
            await anyio.sleep(self._outbox.sweep_interval_s)
            try:
                await self._recover_orphans()
                if self.webhook_url is not None:  # else recover() already said where they wait
                    for path in await self._io(_list_json, self.pending_dir):
                        self._schedule(path, self._outbox.orphan_after_s)
                dirs = (self.active_dir, self.pending_dir, self.dead_dir)
                await self._io(_remove_stale_temps, dirs, time.time() - 3600)
            except Exception:
                log.exception("outbox sweep failed; trying again later")

    async def _recover_orphans(self) -> list[str]:
        recovered: list[str] = []
        now = self._now()
        for path in await self._io(_list_json, self.active_dir):
            call_id = path.name[: -len(".json")]
            if call_id in self._live:
                continue  # ours, running
            try:
                record = await self._io(_read_json, path)
            except FileNotFoundError:
                continue
            except (OSError, ValueError) as exc:
                await self._quarantine(path, exc)
                continue
            ours = record.get("owner") == self.instance_id
            age = now - float(record.get("updatedAt") or 0)
            if ours or age >= self._outbox.orphan_after_s:
                if await self._take_over(path, record):
                    recovered.append(call_id)
        return recovered

    async def _take_over(
        self, path: Path, record: dict[str, Any] | None = None, *, admitting: bool = False
    ) -> bool:
        """Turn a dead process's checkpoint into its ``abandoned`` result; True if written."""
        try:
            if record is None:
                record = await self._io(_read_json, path)
            call_id = _check_call_id(record.get("callId"), "callId")
            result_id = str(record.get("resultId") or secrets.token_hex(8))
            target = self._pending_path(call_id, result_id)
            written = await self._io(target.exists) or await self._io(
                (self.dead_dir / target.name).exists
            )
            if not written:  # else the process died between writing its result and cleaning up
                payload = completion_payload(
                    call_id=call_id,
                    candidate_name=str(record.get("candidateName", "")),
                    job_title=str(record.get("jobTitle", "")),
                    started_at=float(record.get("startedAt") or 0),
                    ended_at=float(record.get("updatedAt") or 0),
                    end_reason="crashed",
                    transcript=record.get("transcript") or [],
                    questions_asked=int(record.get("questionsAsked") or 0),
                    total_questions=int(record.get("totalQuestions") or 0),
                )
                await self._io(_write_atomic, target, self._envelope(call_id, result_id, payload))
            if call_id in self._live and not admitting:
                return False  # admitted here meanwhile: the file is its new checkpoint now
            await self._io(path.unlink, True)
        except FileNotFoundError:
            return False
        except (OSError, ValueError, TypeError) as exc:
            await self._quarantine(path, exc)
            return False
        if not written:
            log.warning(
                "interview %s was interrupted (process gone): delivering it as abandoned",
                call_id,
                extra={"callId": call_id},
            )
        return not written

    async def _quarantine(self, path: Path, exc: BaseException) -> None:
        log.error("outbox file %s is unusable (%s); moved to dead/", path.name, exc)
        try:
            await self._io(_move, path, self.dead_dir)
        except OSError:
            pass

    async def _deliver(
        self, path: Path, client: httpx.AsyncClient, min_age_s: float = 0.0
    ) -> DeliveryReport | None:
        """One delivery run of one pending file; None if it is gone or not due."""
        try:
            envelope = await self._io(_read_json, path)
            call_id = _check_call_id(envelope.get("callId"), "callId")
            result_id = str(envelope["resultId"])
            payload = envelope["payload"]
            if not isinstance(payload, dict):
                raise ValueError("payload: not a JSON object")
        except FileNotFoundError:
            return None  # delivered meanwhile (by another instance)
        except (OSError, ValueError, KeyError) as exc:
            await self._quarantine(path, exc)
            return DeliveryReport(path.stem, "", "dead", 0, None)
        if min_age_s and self._now() - float(envelope.get("updatedAt") or 0) < min_age_s:
            return None
        if self.webhook_url is None:
            self._log_no_webhook(call_id, path)
            return DeliveryReport(call_id, result_id, "no_webhook", 0, None)

        body = _dump(payload)
        key = idempotency_key(call_id, result_id)
        attempts, status, error = 0, None, None
        retrying = tenacity.AsyncRetrying(
            stop=tenacity.stop_after_attempt(self._delivery.max_attempts),
            wait=self._backoff,
            retry=tenacity.retry_if_exception_type(_Retry),
            sleep=self._sleep,
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    attempts = attempt.retry_state.attempt_number
                    status = await self._attempt(client, call_id, body, key, attempts)
        except _Retry as exc:
            status, error = exc.status, exc.error
        outcome: Outcome
        if error is None and status is not None and 200 <= status < 300:
            outcome = "delivered"
            await self._io(path.unlink, True)
            log.info("result of %s delivered", call_id, extra={"callId": call_id})
        else:
            outcome = "pending" if error is not None else "dead"
            envelope.update(
                attempts=int(envelope.get("attempts") or 0) + attempts,
                lastStatus=status,
                lastError=error or f"HTTP {status}",
                updatedAt=self._now(),
            )
            if outcome == "dead":
                await self._io(_write_atomic, self.dead_dir / path.name, envelope)
                await self._io(path.unlink, True)
                log.error(
                    "webhook refused the result of %s with %s: kept in dead/, not retried",
                    call_id,
                    status,
                    extra={"callId": call_id, "status": status},
                )
            else:
                if await self._io(path.exists):
                    await self._io(_write_atomic, path, envelope)
                log.warning(
                    "result of %s not delivered after %d attempts (%s): it stays pending",
                    call_id,
                    attempts,
                    error,
                    extra={"callId": call_id, "attempt": attempts},
                )
        return DeliveryReport(call_id, result_id, outcome, attempts, status)

    async def _attempt(
        self, client: httpx.AsyncClient, call_id: str, body: bytes, key: str, attempt: int
    ) -> int:
        assert self.webhook_url is not None
        headers = {"Content-Type": "application/json", IDEMPOTENCY_HEADER: key}
        if self._secret:
            headers[SIGNATURE_HEADER] = sign(self._secret, body, int(self._wall_clock()))
        extra: dict[str, Any] = {"callId": call_id, "attempt": attempt}
        try:
            response = await client.post(self.webhook_url, content=body, headers=headers)
        except httpx.TransportError as exc:  # connect/read errors, timeouts, dropped connections
            log.warning(
                "webhook for %s attempt %d: %s", call_id, attempt, type(exc).__name__, extra=extra
            )
            raise _Retry(None, type(exc).__name__) from None
        status = response.status_code
        extra["status"] = status
        log.info("webhook for %s attempt %d: HTTP %d", call_id, attempt, status, extra=extra)
        if status >= 500 or status in _RETRYABLE_STATUS:
            raise _Retry(status, f"HTTP {status}", _retry_after(response))
        return status

    def _backoff(self, state: tenacity.RetryCallState) -> float:
        """Exponential with jitter: between half and all of initial * 2^(n-1), capped; a server's
        Retry-After (429/503) is honoured up to the cap."""
        opts = self._delivery
        high = min(opts.backoff_max_s, opts.backoff_initial_s * 2 ** (state.attempt_number - 1))
        delay = self._rng.uniform(high / 2, high)
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, _Retry) and exc.retry_after:
            delay = max(delay, min(exc.retry_after, opts.backoff_max_s))
        return delay
