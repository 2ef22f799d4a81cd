"""Admission, registry and draining of interviews (DESIGN.md §5, issue 4 item 6).

One :class:`InterviewManager` per process owns every interview in one task group, opened by
the app's lifespan (``async with manager:``). It

* admits a join request or refuses it with a :class:`ServiceError` carrying the HTTP status:
  503 + ``Retry-After`` while draining, when production config is incomplete (naming what is
  missing) or at ``MAX_INTERVIEWS``; 422 for an invalid body (the field and why); 409 when an
  interview already runs for that ``callId``. The check and the registration happen in one
  synchronous stretch with no ``await`` in between, so two simultaneous joins for one callId
  start exactly one interview (the original service checked, awaited, then registered);
* keeps the registry behind ``GET /agents/status``, ``GET /interviews/{callId}`` and
  ``POST /agents/{callId}/shutdown``, plus the last views of recently ended interviews;
* drains on shutdown: stops admitting, asks every interview to end with reason ``shutdown``
  (the session says a short goodbye), waits for them and for the results flush within the
  grace period, then cancels whatever is left. :meth:`request_drain` starts that at once
  (``python -m server`` calls it on SIGTERM), so the drain runs while the HTTP server is
  still closing its connections, and all of it fits in Cloud Run's 10 seconds.

One interview failing never touches another or the manager: each runs in its own task with
its own cancel scope, and anything it raises is logged and counted as ``failed``.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol, Self

import anyio
from anyio.abc import TaskGroup

from interview import telemetry as telemetry_mod
from interview.config import Settings
from interview.logs import bind_call_id
from interview.media import InterviewMedia, MediaOptions, client_ice_servers, log_ice_problems
from interview.plan import JoinRequest, RequestError, parse_join_request
from interview.telemetry import Telemetry
from interview.tokens import ClientTokens, TokenClaims, TokenError

log = logging.getLogger("synchire.manager")


class ServiceError(Exception):
    """A refusal with its HTTP status: the server answers ``{"success": false, "error"}``."""

    def __init__(self, status: int, error: str, retry_after: int | None = None) -> None:
        super().__init__(error)
        self.status = status
        self.error = error
        self.retry_after = retry_after


class Results(Protocol):
    """What the manager needs of :class:`interview.outbox.ResultsService`."""

    async def admit(
        self,
        call_id: str,
        *,
        candidate_name: str,
        job_title: str,
        total_questions: int = 0,
        started_at: float | None = None,
    ) -> Any:
        """Checkpoint a newly admitted interview durably (delivered as abandoned if lost)."""
        ...

    async def recover(self) -> Any:
        """Replay pending results and deliver interrupted interviews as ``abandoned``."""
        ...

    async def flush(self, timeout_s: float) -> Any:
        """Wait (at most ``timeout_s``) for deliveries in progress."""
        ...


class Session(Protocol):
    """What the manager needs of :class:`interview.session.InterviewSession`."""

    call_id: str
    candidate_name: str
    job_title: str
    started_at: float
    video_avatar_enabled: bool

    async def run(self) -> dict[str, Any]: ...

    def stop(self, reason: str) -> None: ...

    def view(self) -> dict[str, Any]: ...


SessionFactory = Callable[..., Session]
"""``factory(request, settings, results, *, transport=None) -> Session``."""


@dataclass(frozen=True, slots=True)
class ManagerOptions:
    """Admission and drain tuning. Defaults suit Cloud Run."""

    retry_after_capacity_s: int = 30
    """Retry-After at capacity: about the time Cloud Run takes to add an instance."""
    retry_after_draining_s: int = 10
    """Retry-After while draining: the next request reaches a fresh instance."""
    retry_after_config_s: int = 300
    """Retry-After when production config is incomplete (it needs a redeploy)."""
    keep_ended: int = 200
    """Ended interviews whose last view ``GET /interviews/{callId}`` still answers."""
    flush_reserve_s: float = 2.0
    """Part of the grace kept for the results flush (at most a quarter of the grace)."""
    media: MediaOptions | None = None
    """The candidates' WebRTC peers (timeouts, ICE). None: from the settings
    (``ICE_SERVERS``, ``WEBRTC_JOIN_TIMEOUT_S``, ``WEBRTC_LEAVE_GRACE_S``)."""


@dataclass(eq=False)
class _Entry:
    session: Session
    media: InterviewMedia | None = None
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    media_scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)


def _default_factory() -> SessionFactory:
    from interview.session import InterviewSession  # the lead's module; imported when needed

    return InterviewSession


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=UTC).isoformat()


def _clip(text: str, limit: int = 128) -> str:
    return text if len(text) <= limit else text[:limit] + "…"


class InterviewManager:
    """Admission, registry and drain of this process's interviews."""

    def __init__(
        self,
        settings: Settings,
        results: Results,
        session_factory: SessionFactory | None = None,
        *,
        telemetry: Telemetry | None = None,
        options: ManagerOptions | None = None,
    ) -> None:
        self.settings = settings
        self.results = results
        self.telemetry = telemetry if telemetry is not None else Telemetry()
        self.options = options if options is not None else ManagerOptions()
        self._factory = session_factory
        self.media_options = self.options.media or MediaOptions.from_settings(settings)
        keys = settings.api_keys()
        self.tokens = ClientTokens.from_api_keys(keys) if keys else None
        self._active: dict[str, _Entry] = {}
        self._ended: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._tg: TaskGroup | None = None
        self._idle: anyio.Event | None = None  # set when the last interview ends (drain)
        self._draining = False
        self._drain_requested: anyio.Event | None = None
        self._drained: anyio.Event | None = None

    # --- lifecycle -----------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        tg = anyio.create_task_group()
        await tg.__aenter__()
        self._tg = tg
        self._drain_requested = anyio.Event()
        tg.start_soon(self._recover, name="results recovery")
        tg.start_soon(self._watch_drain_request, name="drain watcher")
        log_ice_problems(self.settings)
        return self

    async def __aexit__(self, *exc_info: Any) -> bool | None:
        assert self._tg is not None, "manager not started"
        with anyio.CancelScope(shield=True):  # the drain is bounded by its own grace
            await self.drain()
        self._tg.cancel_scope.cancel()
        tg, self._tg = self._tg, None
        return await tg.__aexit__(*exc_info)

    async def _recover(self) -> None:
        try:
            await self.results.recover()
        except Exception:
            log.exception("recovering pending results failed; they stay in the outbox")

    async def _watch_drain_request(self) -> None:
        assert self._drain_requested is not None
        await self._drain_requested.wait()
        await self.drain()

    def request_drain(self) -> None:
        """Start draining now, without waiting for the lifespan's shutdown.

        Call it on the event loop's thread; from a signal handler, schedule it with
        ``loop.call_soon_threadsafe(manager.request_drain)`` (``python -m server`` does).
        """
        self._draining = True
        if self._drain_requested is not None:
            self._drain_requested.set()

    @property
    def draining(self) -> bool:
        return self._draining

    @property
    def active_count(self) -> int:
        return len(self._active)

    # --- admission -----------------------------------------------------------------------

    async def join(self, body: Any) -> dict[str, Any]:
        """Admit a join request (the decoded JSON body) and start its interview.

        Returns the success body; raises :class:`ServiceError` for a refusal.
        """
        session = self._admit(body)
        # The avatar (when configured) is started now, so the join answer can carry its
        # LiveKit address and token; if it cannot start, the interview is audio-only.
        prepare = getattr(session, "prepare", None)
        avatar = await prepare() if prepare is not None else None
        out: dict[str, Any] = {
            "success": True,
            "message": "Agent will join interview shortly",
            "callId": session.call_id,
            "videoAvatarEnabled": bool(
                getattr(session, "video_avatar_enabled", self.settings.video_avatar_enabled)
            ),
        }
        out.update(self._client_access(session.call_id))
        if avatar is not None:
            out["avatar"] = avatar
        return out

    def _client_access(self, call_id: str) -> dict[str, Any]:
        """What the candidate's browser needs to connect its media (through the web app):
        a client token for this interview only, the signaling path, the ICE servers."""
        if self.tokens is None:
            return {}
        s = self.settings
        ttl = s.webrtc_join_timeout_s + s.max_interview_minutes * 60 + s.webrtc_leave_grace_s
        token, expires = self.tokens.issue(call_id, ttl)
        return {
            "clientToken": token,
            "clientTokenExpiresAt": _iso(expires),
            "webrtcUrl": f"/interviews/{call_id}/webrtc",
            "iceServers": client_ice_servers(s),
        }

    def _admit(self, body: Any) -> Session:
        # Synchronous from the first check to the registration: no other task runs between.
        if self._tg is None:
            raise self._refuse(
                "starting",
                503,
                "The service is starting; try again shortly.",
                self.options.retry_after_draining_s,
            )
        if self._draining:
            raise self._refuse(
                "draining",
                503,
                "The service is shutting down; try again shortly.",
                self.options.retry_after_draining_s,
            )
        missing = self.settings.missing
        if missing:
            raise self._refuse(
                "config",
                503,
                "The service is not configured: missing " + ", ".join(missing),
                self.options.retry_after_config_s,
            )
        try:
            request = parse_join_request(body)
        except RequestError as err:
            raise self._refuse("invalid", 422, str(err)) from None
        call_id = request.call_id
        if call_id in self._active:
            raise self._refuse(
                "duplicate", 409, f"An interview is already running for callId {call_id}"
            )
        if len(self._active) >= self.settings.max_interviews:
            raise self._refuse(
                "capacity",
                503,
                f"At capacity ({self.settings.max_interviews} interviews); try again shortly.",
                self.options.retry_after_capacity_s,
            )
        session, media = self._create(request)
        entry = _Entry(session, media)
        self._active[call_id] = entry
        self._ended.pop(call_id, None)
        self.telemetry.active_interviews.set(len(self._active))
        self.telemetry.interviews_started.inc()
        self._tg.start_soon(self._run, request, entry, name=f"interview {call_id}")
        if media is not None:
            self._tg.start_soon(self._watch_media, media, entry, name=f"media {call_id}")
        log.info(
            "interview admitted",
            extra={
                "callId": call_id,
                "questions": len(request.questions),
                "active": len(self._active),
            },
        )
        return session

    def _create(self, request: JoinRequest) -> tuple[Session, InterviewMedia]:
        factory = self._factory if self._factory is not None else _default_factory()
        try:
            media = InterviewMedia(request.call_id, self.media_options)
            session = factory(request, self.settings, self.results, transport=media.transport)
            media.bind(session)
            return session, media
        except Exception:
            log.exception("could not create the interview", extra={"callId": request.call_id})
            raise ServiceError(500, "Could not start the interview") from None

    def _refuse(
        self, cause: str, status: int, error: str, retry_after: int | None = None
    ) -> ServiceError:
        self.telemetry.joins_refused.labels(cause=cause).inc()
        log.info("join refused (%s): %s", cause, error)
        return ServiceError(status, error, retry_after)

    async def _run(self, request: JoinRequest, entry: _Entry) -> None:
        call_id, reason = request.call_id, "failed"
        with bind_call_id(call_id), telemetry_mod.bind(self.telemetry), entry.scope:
            try:
                await self._checkpoint(request, entry.session)
                payload = await entry.session.run()
                reason = str((payload or {}).get("endReason") or "unknown")
            except Exception:
                log.exception("interview raised instead of ending; counted as failed")
            finally:
                self._finish(call_id, entry, reason)
                entry.media_scope.cancel()
                if entry.media is not None:
                    await entry.media.close()  # shielded and bounded inside

    async def _watch_media(self, media: InterviewMedia, entry: _Entry) -> None:
        """The media's watchdog (join timeout, leave grace), for as long as the interview."""
        with bind_call_id(media.call_id), entry.media_scope:
            try:
                await media.run()
            except Exception:
                log.exception("media watchdog failed", extra={"callId": media.call_id})

    async def _checkpoint(self, request: JoinRequest, session: Session) -> None:
        """The interview's first checkpoint, from the moment it is admitted. If the outbox
        cannot take it the interview still runs (its result is written when it ends)."""
        try:
            await self.results.admit(
                request.call_id,
                candidate_name=request.candidate_name,
                job_title=request.job_title,
                total_questions=len(request.questions),
                started_at=session.started_at,
            )
        except (OSError, ValueError) as err:
            log.error("no admission checkpoint: %s", err)

    def _finish(self, call_id: str, entry: _Entry, reason: str) -> None:
        if self._active.get(call_id) is entry:
            del self._active[call_id]
        if not self._active and self._idle is not None:
            self._idle.set()
        try:
            last = dict(entry.session.view())
        except Exception:
            last = {"callId": call_id}
        last["state"] = "ended"
        if last.get("endReason") is None:
            last["endReason"] = reason
        if entry.media is not None:
            last["media"] = entry.media.view()  # the transport's figures stay readable
        self._ended[call_id] = last
        while len(self._ended) > self.options.keep_ended:
            self._ended.popitem(last=False)
        self.telemetry.active_interviews.set(len(self._active))
        self.telemetry.interviews_ended.labels(reason=reason).inc()
        log.info("interview ended (%s)", reason, extra={"callId": call_id})

    # --- registry ------------------------------------------------------------------------

    def agents_status(self) -> dict[str, Any]:
        """``GET /agents/status`` in the original shape."""
        now = time.time()
        agents = []
        for entry in list(self._active.values()):
            s = entry.session
            agents.append(
                {
                    "call_id": s.call_id,
                    "candidate_name": s.candidate_name,
                    "job_title": s.job_title,
                    "started_at": _iso(s.started_at),
                    "duration_seconds": round(max(0.0, now - s.started_at), 1),
                }
            )
        return {"active_count": len(agents), "agents": agents}

    def view(self, call_id: str) -> dict[str, Any]:
        """State, progress, transcript so far and latency of one interview (running or
        recently ended); :class:`ServiceError` 404 when unknown."""
        entry = self._active.get(call_id)
        if entry is not None:
            view = {"callId": call_id, **entry.session.view()}
            if entry.media is not None:
                view["media"] = entry.media.view()
            return view
        if call_id in self._ended:
            return dict(self._ended[call_id])
        raise ServiceError(404, f"No interview for callId {_clip(call_id)}")

    def media(self, call_id: str) -> InterviewMedia:
        """The media of a running interview (signaling); :class:`ServiceError` 404 if none."""
        entry = self._active.get(call_id)
        if entry is None or entry.media is None:
            raise ServiceError(404, f"No interview for callId {_clip(call_id)}")
        return entry.media

    def verify_client_token(self, token: str, call_id: str) -> TokenClaims:
        """The claims of a client token valid for ``call_id`` now; :class:`TokenError` if not."""
        if self.tokens is None:
            raise TokenError(401, "Client tokens are not available (no API key configured)")
        return self.tokens.verify(token, call_id)

    def shutdown(self, call_id: str) -> dict[str, Any]:
        """Ask one interview to end (reason ``shutdown``); 404 when none is running."""
        entry = self._active.get(call_id)
        if entry is None:
            raise ServiceError(404, f"No active agent for {_clip(call_id)}")
        entry.session.stop("shutdown")
        log.info("shutdown requested", extra={"callId": call_id})
        return {"success": True, "message": f"Agent for {call_id} is shutting down"}

    # --- drain ---------------------------------------------------------------------------

    async def drain(self, grace_s: float | None = None) -> bool:
        """Stop admitting, end every interview (reason ``shutdown``), flush results.

        Waits at most ``grace_s`` (default ``SHUTDOWN_GRACE_SECONDS``, 8 s); interviews still
        running after it are cancelled (their checkpoints are delivered as ``abandoned`` after
        the next start). Returns True when everything ended and flushed in time. A second
        call waits for the first.
        """
        self._draining = True
        if self._drained is not None:
            await self._drained.wait()
            return not self._active
        self._drained = done = anyio.Event()
        grace = self.settings.shutdown_grace_seconds if grace_s is None else grace_s
        deadline = anyio.current_time() + grace
        try:
            return await self._drain(deadline, grace)
        finally:
            done.set()

    async def _drain(self, deadline: float, grace: float) -> bool:
        entries = list(self._active.items())
        log.info("draining: stopping %d interview(s), grace %.1f s", len(entries), grace)
        for call_id, entry in entries:
            try:
                entry.session.stop("shutdown")
            except Exception:
                log.exception("stop failed", extra={"callId": call_id})
        reserve = min(self.options.flush_reserve_s, grace / 4)
        if self._active:
            self._idle = idle = anyio.Event()
            with anyio.move_on_at(deadline - reserve):
                await idle.wait()
        flushed = False
        with anyio.move_on_at(deadline):
            try:
                await self.results.flush(max(0.0, deadline - anyio.current_time()))
                flushed = True
            except Exception:
                log.exception("flushing results failed; they stay in the outbox")
        left = list(self._active.items())
        for call_id, entry in left:
            log.warning(
                "still running after the grace period; cancelled", extra={"callId": call_id}
            )
            entry.scope.cancel()
        log.info("drained", extra={"interviewsLeft": len(left), "flushed": flushed})
        return not left and flushed
