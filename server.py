"""The control API the SyncHire web app calls (DESIGN.md §8). Routes only: the interview logic
lives in interview/ (admission and registry in :mod:`interview.manager`).

Run it with ``python -m server`` (uvicorn on ``PORT``; on SIGTERM interviews are drained at
once, and everything ends within Cloud Run's 10 seconds) or ``uvicorn server:app``.

Every route is also served under ``/python-api`` (Firebase Hosting forwards the full path).
All but ``/health`` and ``/openapi.json`` need ``X-API-Key`` (``API_SECRET_KEY`` or
``API_SECRET_KEY_PREVIOUS``, compared in constant time); ``/metrics`` also accepts the key as
``Authorization: Bearer`` for Prometheus scrapers, since Cloud Run has no private network to
hide it on. In development without ``API_SECRET_KEY`` a key is generated and logged at startup:
the check is never switched off.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any
from urllib.parse import quote

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from interview.config import ConfigError, Settings, load_settings, with_api_key
from interview.logs import REDACTOR, TraceMiddleware, setup_logging
from interview.manager import (
    InterviewManager,
    ManagerOptions,
    Results,
    ServiceError,
    SessionFactory,
)
from interview.media import MAX_OFFER_BYTES, SignalingError, read_offer
from interview.telemetry import Telemetry
from interview.tokens import TokenError

log = logging.getLogger("synchire.server")

SERVICE = "SyncHire AI Interview Agent"
SERVICE_ID = "synchire-agent"
PREFIX = "/python-api"
MAX_BODY_BYTES = 1024 * 1024
"""Join requests larger than 1 MiB are refused with 413 (100 questions fit in far less)."""
GRACEFUL_SHUTDOWN_S = 9
"""uvicorn's limit for open connections after SIGTERM; the drain (8 s) runs alongside it."""
WEB_DIR = Path(__file__).resolve().parent / "web"
"""The demo page's files, served at ``/demo`` when ``Settings.demo_enabled``."""

try:
    VERSION = version(SERVICE_ID)
except PackageNotFoundError:  # running from a checkout that was never installed
    VERSION = "0.0.0"


def _error(status: int, error: str, retry_after: int | None = None) -> JSONResponse:
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    return JSONResponse({"success": False, "error": error}, status_code=status, headers=headers)


# --- key check -------------------------------------------------------------------------------

Handler = Callable[[Request], Awaitable[Response]]


def _key_ok(given: str, keys: tuple[str, ...]) -> bool:
    ok = False
    for key in keys:  # no short cut: the time taken does not depend on which key matched
        ok |= hmac.compare_digest(given.encode(), key.encode())
    return ok


def keyed(handler: Handler, *, bearer: bool = False) -> Handler:
    """Wrap a route so it answers 401/403 (``{"detail": ...}``) without a valid key."""

    async def checked(request: Request) -> Response:
        given = request.headers.get("x-api-key")
        if not given and bearer:
            scheme, _, token = request.headers.get("authorization", "").partition(" ")
            given = token.strip() if scheme.lower() == "bearer" else None
        if not given:
            return JSONResponse({"detail": "Missing X-API-Key header"}, status_code=401)
        if not _key_ok(given, request.app.state.settings.api_keys()):
            return JSONResponse({"detail": "Invalid API key"}, status_code=403)
        return await handler(request)

    checked.__name__ = handler.__name__
    checked.__doc__ = handler.__doc__
    return checked


def keyed_or_client_token(handler: Handler) -> Handler:
    """Wrap a route of one interview (``{call_id}`` in the path): ``X-API-Key`` or that
    interview's client token as ``Authorization: Bearer`` (what a candidate's browser has)."""
    with_key = keyed(handler)

    async def checked(request: Request) -> Response:
        if request.headers.get("x-api-key"):
            return await with_key(request)
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return JSONResponse(
                {"detail": "Missing X-API-Key header or client token (Authorization: Bearer)"},
                status_code=401,
                headers={"WWW-Authenticate": "Bearer"},
            )
        try:
            _manager(request).verify_client_token(token.strip(), request.path_params["call_id"])
        except TokenError as err:
            code = "invalid_token" if err.status == 401 else "insufficient_scope"
            return JSONResponse(
                {"detail": err.reason},
                status_code=err.status,
                headers={"WWW-Authenticate": f'Bearer error="{code}"'},
            )
        return await handler(request)

    checked.__name__ = handler.__name__
    checked.__doc__ = handler.__doc__
    return checked


# --- routes ----------------------------------------------------------------------------------


def _manager(request: Request) -> InterviewManager:
    manager: InterviewManager = request.app.state.manager
    return manager


async def health(request: Request) -> Response:
    """Liveness and readiness, public (no key)."""
    settings: Settings = request.app.state.settings
    manager = _manager(request)
    return JSONResponse(
        {
            "status": "draining" if manager.draining else "healthy",
            "service": SERVICE_ID,
            "version": VERSION,
            "timestamp": datetime.now(UTC).isoformat(),
            "config_valid": settings.config_valid,
            "active_interviews": manager.active_count,
            "mode": settings.mode,
        }
    )


async def root(request: Request) -> Response:
    """What this service is, which providers (or offline stand-ins) it uses, its routes."""
    settings: Settings = request.app.state.settings
    manager = _manager(request)
    return JSONResponse(
        {
            "service": SERVICE,
            "version": VERSION,
            "status": "draining" if manager.draining else "running",
            "framework": "synchire-agent pipeline (anyio stages)",
            "llm": settings.llm_name,
            "voice": settings.voice_name,
            "transcriber": settings.transcriber_name,
            "avatar": settings.avatar,
            "environment": settings.environment,
            "mode": settings.mode,
            "config_valid": settings.config_valid,
            "missing": settings.missing,
            "active_interviews": manager.active_count,
            "max_interviews": settings.max_interviews,
            "endpoints": {
                "health": "/health",
                "join_interview": "/join-interview (POST)",
                "agents_status": "/agents/status",
                "shutdown_agent": "/agents/{call_id}/shutdown (POST)",
                "interview": "/interviews/{callId}",
                "webrtc": "/interviews/{callId}/webrtc (POST SDP offer; DELETE .../{peerId})",
                **({"demo": "/demo"} if settings.demo_enabled else {}),
                "metrics": "/metrics",
                "docs": "/openapi.json",
            },
        }
    )


async def join_interview(request: Request) -> Response:
    """Start an interview for the web app's join request (DESIGN.md §7)."""
    body = await _read_json(request)
    return JSONResponse(await _manager(request).join(body))


async def agents_status(request: Request) -> Response:
    """The interviews running now."""
    return JSONResponse(_manager(request).agents_status())


async def shutdown_agent(request: Request) -> Response:
    """End one interview (reason ``shutdown``; the interviewer says goodbye first)."""
    return JSONResponse(_manager(request).shutdown(request.path_params["call_id"]))


async def interview_view(request: Request) -> Response:
    """State, progress, transcript so far and latency of one interview."""
    return JSONResponse(_manager(request).view(request.path_params["call_id"]))


async def webrtc_offer(request: Request) -> Response:
    """Answer the candidate's SDP offer (WHIP-style); ``Location`` is the peer to hang up."""
    call_id = request.path_params["call_id"]
    media = _manager(request).media(call_id)
    body = await _read_body(request, MAX_OFFER_BYTES, "SDP offer")
    answer = await media.offer(read_offer(request.headers.get("content-type"), body))
    root = request.scope.get("root_path", "")
    headers = {"Location": f"{root}/interviews/{quote(call_id)}/webrtc/{answer.peer_id}"}
    if answer.as_json:
        content = {"sdp": answer.sdp, "type": "answer", "peerId": answer.peer_id}
        return JSONResponse(content, status_code=201, headers=headers)
    return Response(answer.sdp, status_code=201, media_type="application/sdp", headers=headers)


async def webrtc_hangup(request: Request) -> Response:
    """Hang up a candidate peer; ``?end=true`` also ends the interview (candidate left)."""
    media = _manager(request).media(request.path_params["call_id"])
    end = request.query_params.get("end", "").lower() in ("1", "true", "yes")
    await media.hangup(request.path_params["peer_id"], end=end)
    return JSONResponse({"success": True, "message": "Hung up"})


async def demo_page(request: Request) -> Response:
    """The demo page (development, or ENABLE_DEMO=true)."""
    return FileResponse(WEB_DIR / "index.html", headers={"Cache-Control": "no-cache"})


async def metrics(request: Request) -> Response:
    """Prometheus text: interviews, turns, latency histograms, provider errors."""
    telemetry: Telemetry = request.app.state.telemetry
    data, content_type = telemetry.render(request.headers.get("accept"))
    return Response(data, headers={"Content-Type": content_type})


async def openapi(request: Request) -> Response:
    """This API as an OpenAPI 3.1 document."""
    return JSONResponse(openapi_document())


class _BodyError(Exception):
    def __init__(self, status: int, error: str) -> None:
        super().__init__(error)
        self.status, self.error = status, error


async def _read_json(request: Request) -> Any:
    """The decoded JSON body; 413 past :data:`MAX_BODY_BYTES` (declared or streamed), 400 if
    it is not JSON."""
    body = await _read_body(request, MAX_BODY_BYTES, "Request body")
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise _BodyError(400, "Request body is not valid JSON") from None


async def _read_body(request: Request, limit: int, what: str) -> bytes:
    """The raw body; 413 past ``limit`` bytes (declared or streamed)."""
    size = f"{limit // (1024 * 1024)} MiB" if limit >= 1024 * 1024 else f"{limit // 1024} KiB"
    too_large = f"{what} is larger than {size}"
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.strip().isdigit():
            raise _BodyError(400, "Invalid Content-Length header")
        if int(declared) > limit:
            raise _BodyError(413, too_large)
    chunks: list[bytes] = []
    received = 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > limit:
                raise _BodyError(413, too_large)
            chunks.append(chunk)
    except ClientDisconnect:  # nobody to answer; not a server error worth a traceback
        raise _BodyError(400, "Client disconnected") from None
    return b"".join(chunks)


# --- errors ----------------------------------------------------------------------------------


async def _service_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ServiceError)
    return _error(exc.status, exc.error, exc.retry_after)


async def _signaling_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, SignalingError)
    return _error(exc.status, exc.error)


async def _body_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, _BodyError)
    return _error(exc.status, exc.error)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return JSONResponse(
        {"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers or None
    )


async def _internal_error(request: Request, exc: Exception) -> Response:
    return _error(500, "Internal error")


# --- the app ---------------------------------------------------------------------------------


def _routes(demo: bool = False) -> list[BaseRoute]:
    routes: list[BaseRoute] = [
        Route("/health", health, methods=["GET"]),
        Route("/", keyed(root), methods=["GET"]),
        Route("/join-interview", keyed(join_interview), methods=["POST"]),
        Route("/agents/status", keyed(agents_status), methods=["GET"]),
        Route("/agents/{call_id}/shutdown", keyed(shutdown_agent), methods=["POST"]),
        Route("/interviews/{call_id}", keyed(interview_view), methods=["GET"]),
        Route(
            "/interviews/{call_id}/webrtc", keyed_or_client_token(webrtc_offer), methods=["POST"]
        ),
        Route(
            "/interviews/{call_id}/webrtc/{peer_id}",
            keyed_or_client_token(webrtc_hangup),
            methods=["DELETE"],
        ),
        Route("/metrics", keyed(metrics, bearer=True), methods=["GET"]),
        Route("/openapi.json", openapi, methods=["GET"]),
    ]
    if demo:  # public, like any web page: it holds no secret and asks for the key
        routes += [
            Route("/demo", demo_page, methods=["GET"]),
            Mount("/demo", StaticFiles(directory=WEB_DIR, check_dir=False), name="demo"),
        ]
    return routes


def _default_results(settings: Settings) -> Results:
    from interview.outbox import ResultsService
    from interview.results import signing_secret

    def secret(value: Any) -> str | None:
        return value.get_secret_value() if value is not None else None

    return ResultsService(
        settings.outbox_dir,
        webhook_base_url=settings.nextjs_webhook_url,
        secret=signing_secret(secret(settings.webhook_secret), secret(settings.api_secret_key)),
    )


def create_app(
    settings: Settings | None = None,
    *,
    results: Results | None = None,
    session_factory: SessionFactory | None = None,
    telemetry: Telemetry | None = None,
    manager_options: ManagerOptions | None = None,
    configure_logging: bool = True,
) -> Starlette:
    """The Starlette app. Everything defaults to the environment and the real services; tests
    pass fakes. The lifespan runs the results service and the manager, and drains on exit."""
    configured = settings if settings is not None else load_settings()
    if results is None:  # signed with the configured key only, never a generated one
        results = _default_results(configured)
    settings, generated_key = with_api_key(configured)
    telemetry = telemetry if telemetry is not None else Telemetry()
    manager = InterviewManager(
        settings, results, session_factory, telemetry=telemetry, options=manager_options
    )

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if configure_logging:
            setup_logging(configured)  # the generated key is not a secret yet: logged once
        if generated_key is not None:
            log.warning(
                "API_SECRET_KEY is not set: this run's key is %s (send it as X-API-Key)",
                generated_key,
            )
        REDACTOR.add(*settings.secret_values())  # from now on the generated key is scrubbed too
        _log_startup(settings)
        async with AsyncExitStack() as stack:
            if hasattr(results, "__aenter__"):
                await stack.enter_async_context(results)  # type: ignore[arg-type]
            await stack.enter_async_context(manager)
            yield

    routes = _routes(demo=settings.demo_enabled)
    app = Starlette(
        routes=[*routes, Route(PREFIX, keyed(root), methods=["GET"]), Mount(PREFIX, routes=routes)],
        middleware=[Middleware(TraceMiddleware)],
        exception_handlers={
            ServiceError: _service_error,
            SignalingError: _signaling_error,
            _BodyError: _body_error,
            HTTPException: _http_error,
            Exception: _internal_error,
        },
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.manager = manager
    app.state.telemetry = telemetry
    return app


def _log_startup(settings: Settings) -> None:
    log.info(
        "%s %s starting: %s; llm %s, voice %s, avatar %s, at most %d interviews",
        SERVICE,
        VERSION,
        settings.mode,
        settings.llm_name,
        settings.voice_name,
        settings.avatar,
        settings.max_interviews,
    )
    if not settings.config_valid:
        log.error(
            "configuration incomplete for production: missing %s; interviews will be refused",
            ", ".join(settings.missing),
        )


# --- OpenAPI ---------------------------------------------------------------------------------


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _retry_after(description: str) -> dict[str, Any]:
    out = _json(_ref("Error"), description)
    out["headers"] = {
        "Retry-After": {"description": "Seconds to wait", "schema": {"type": "integer"}}
    }
    return out


def openapi_document() -> dict[str, Any]:
    """OpenAPI 3.1 for the routes above (written by hand: small, and exact about errors)."""
    string, boolean, number = {"type": "string"}, {"type": "boolean"}, {"type": "number"}
    integer = {"type": "integer"}
    auth = {
        "401": _json(_ref("Detail"), "Missing X-API-Key header"),
        "403": _json(_ref("Detail"), "Invalid API key"),
    }
    call_id = {"name": "call_id", "in": "path", "required": True, "schema": string}

    def op(summary: str, ok: dict[str, Any], *, keyed: bool = True, **extra: Any) -> dict:
        responses = {"200": ok, **(auth if keyed else {}), **extra.pop("responses", {})}
        out: dict[str, Any] = {"summary": summary, "responses": responses, **extra}
        if not keyed:
            out["security"] = []
        return out

    paths: dict[str, Any] = {
        "/health": {"get": op("Health (public)", _json(_ref("Health"), "OK"), keyed=False)},
        "/": {"get": op("Service information", _json({"type": "object"}, "OK"))},
        "/join-interview": {
            "post": op(
                "Start an interview",
                _json(_ref("JoinSuccess"), "Admitted; the interview starts now"),
                requestBody={
                    "required": True,
                    "content": {"application/json": {"schema": _ref("JoinRequest")}},
                },
                responses={
                    "400": _json(_ref("Error"), "Body is not JSON"),
                    "409": _json(_ref("Error"), "An interview already runs for this callId"),
                    "413": _json(_ref("Error"), "Body over 1 MiB"),
                    "422": _json(_ref("Error"), "Invalid field (named in the error)"),
                    "503": _retry_after("At capacity, draining, or configuration incomplete"),
                },
            )
        },
        "/agents/status": {"get": op("Running interviews", _json(_ref("AgentsStatus"), "OK"))},
        "/agents/{call_id}/shutdown": {
            "post": op(
                "End one interview",
                _json(_ref("Message"), "Ending"),
                parameters=[call_id],
                responses={"404": _json(_ref("Error"), "No such running interview")},
            )
        },
        "/interviews/{call_id}": {
            "get": op(
                "One interview's state, progress, transcript and latency",
                _json(_ref("InterviewView"), "OK"),
                parameters=[call_id],
                responses={"404": _json(_ref("Error"), "Unknown interview")},
            )
        },
        "/interviews/{call_id}/webrtc": {
            "post": {
                "summary": "Answer the candidate's WebRTC SDP offer (WHIP-style)",
                "description": "Auth: X-API-Key, or the interview's clientToken from "
                "/join-interview as Authorization: Bearer. One candidate peer at a time: a "
                "second offer while the first is live gets 409 (see docs/WEBRTC.md).",
                "security": [{"apiKey": []}, {"bearer": []}],
                "parameters": [call_id],
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/sdp": {"schema": string},
                        "application/json": {"schema": _ref("SdpOffer")},
                    },
                },
                "responses": {
                    "201": {
                        "description": "The answer (same content type as the offer)",
                        "headers": {
                            "Location": {
                                "description": "The peer: DELETE it to hang up",
                                "schema": string,
                            }
                        },
                        "content": {
                            "application/sdp": {"schema": string},
                            "application/json": {"schema": _ref("SdpAnswer")},
                        },
                    },
                    "400": _json(_ref("Error"), "Malformed SDP offer (the reason is given)"),
                    "401": _json(_ref("Detail"), "No key or token; invalid or expired token"),
                    "403": _json(_ref("Detail"), "Wrong key, or a token for another interview"),
                    "404": _json(_ref("Error"), "Unknown interview"),
                    "409": _json(_ref("Error"), "A candidate peer is already live"),
                    "413": _json(_ref("Error"), "Offer over 64 KiB"),
                    "415": _json(_ref("Error"), "Not application/sdp or application/json"),
                    "503": _json(_ref("Error"), "ICE gathering failed (TURN unreachable)"),
                },
            }
        },
        "/interviews/{call_id}/webrtc/{peer_id}": {
            "delete": {
                "summary": "Hang up a candidate peer (?end=true also ends the interview)",
                "security": [{"apiKey": []}, {"bearer": []}],
                "parameters": [
                    call_id,
                    {"name": "peer_id", "in": "path", "required": True, "schema": string},
                    {"name": "end", "in": "query", "required": False, "schema": boolean},
                ],
                "responses": {
                    "200": _json(_ref("Message"), "Hung up"),
                    **auth,
                    "404": _json(_ref("Error"), "Unknown interview or peer"),
                },
            }
        },
        "/demo": {
            "get": op(
                "The demo page (404 unless ENABLE_DEMO or development)",
                {"description": "HTML", "content": {"text/html": {"schema": string}}},
                keyed=False,
            )
        },
        "/metrics": {
            "get": op(
                "Prometheus metrics",
                {"description": "Prometheus text", "content": {"text/plain": {"schema": string}}},
                security=[{"apiKey": []}, {"bearer": []}],
            )
        },
        "/openapi.json": {
            "get": op("This document", _json({"type": "object"}, "OpenAPI"), keyed=False)
        },
    }
    for path in list(paths):
        paths[PREFIX + (path if path != "/" else "")] = paths[path]
    question = {
        "type": "object",
        "required": ["id", "text", "type", "duration", "category"],
        "properties": {
            "id": string,
            "text": string,
            "type": string,
            "duration": {"type": "integer", "minimum": 1, "description": "minutes"},
            "category": string,
            "keyPoints": {"type": "array", "items": string},
        },
    }
    schemas = {
        "Question": question,
        "JoinRequest": {
            "type": "object",
            "required": ["callId", "candidateName", "jobTitle", "questions"],
            "properties": {
                "callId": {"type": "string", "pattern": "^[A-Za-z0-9_\\-:.]{1,128}$"},
                "candidateName": string,
                "jobTitle": string,
                "questions": {"type": "array", "minItems": 1, "items": _ref("Question")},
            },
        },
        "JoinSuccess": {
            "type": "object",
            "properties": {
                "success": boolean,
                "message": string,
                "callId": string,
                "videoAvatarEnabled": boolean,
                "clientToken": {
                    "type": "string",
                    "description": "For this interview's WebRTC routes only (Bearer)",
                },
                "clientTokenExpiresAt": {"type": "string", "format": "date-time"},
                "webrtcUrl": {"type": "string", "description": "Where to POST the SDP offer"},
                "iceServers": {"type": "array", "items": {"type": "object"}},
            },
        },
        "Error": {"type": "object", "properties": {"success": boolean, "error": string}},
        "SdpOffer": {
            "type": "object",
            "required": ["sdp", "type"],
            "properties": {"sdp": string, "type": {"const": "offer"}},
        },
        "SdpAnswer": {
            "type": "object",
            "properties": {"sdp": string, "type": {"const": "answer"}, "peerId": string},
        },
        "Detail": {"type": "object", "properties": {"detail": string}},
        "Message": {"type": "object", "properties": {"success": boolean, "message": string}},
        "Health": {
            "type": "object",
            "properties": {
                "status": string,
                "service": string,
                "version": string,
                "timestamp": string,
                "config_valid": boolean,
                "active_interviews": integer,
                "mode": string,
            },
        },
        "AgentsStatus": {
            "type": "object",
            "properties": {
                "active_count": integer,
                "agents": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {
                            "call_id": string,
                            "candidate_name": string,
                            "job_title": string,
                            "started_at": {"type": "string", "format": "date-time"},
                            "duration_seconds": number,
                        },
                    },
                },
            },
        },
        "InterviewView": {
            "type": "object",
            "properties": {
                "callId": string,
                "state": {"enum": ["starting", "running", "ending", "ended"]},
                "progress": {"type": "object"},
                "transcript": {"type": "array", "items": {"type": "object"}},
                "latency": {"type": "object"},
                "endReason": {"type": ["string", "null"]},
            },
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": SERVICE,
            "version": VERSION,
            "description": "Control API of the SyncHire interview agent. Every path is also "
            "served under /python-api.",
        },
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
                "bearer": {"type": "http", "scheme": "bearer"},
            },
        },
        "security": [{"apiKey": []}],
    }


# --- entry point -----------------------------------------------------------------------------


class DrainingServer(uvicorn.Server):
    """uvicorn, plus: the first SIGTERM/SIGINT starts the interviews' drain at once, while
    uvicorn closes its connections (``timeout_graceful_shutdown``), instead of after it."""

    def __init__(self, config: uvicorn.Config, on_exit: Callable[[], None]) -> None:
        super().__init__(config)
        self._on_exit = on_exit
        self._loop: asyncio.AbstractEventLoop | None = None

    async def startup(self, sockets: Any = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets)

    def handle_exit(self, sig: int, frame: Any) -> None:
        # A signal handler may not touch the loop's state: schedule the drain on the loop.
        if self._loop is not None and not self.should_exit:
            try:
                self._loop.call_soon_threadsafe(self._on_exit)
            except RuntimeError:  # the loop is already closed
                pass
        super().handle_exit(sig, frame)


def server_config(application: Starlette, settings: Settings) -> uvicorn.Config:
    """uvicorn's configuration for this app: logs through ours, proxy headers trusted (Cloud
    Run's front end), connections given one second more than the drain."""
    return uvicorn.Config(
        application,
        host=settings.host,
        port=settings.port,
        log_config=None,
        proxy_headers=True,
        forwarded_allow_ips="*",
        timeout_graceful_shutdown=max(1, math.ceil(settings.shutdown_grace_seconds) + 1),
    )


def main() -> None:
    """``python -m server``: uvicorn on ``PORT``; SIGTERM starts the drain at once."""
    try:
        settings = load_settings()
    except ConfigError as err:
        print(f"server: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    setup_logging(settings)
    application = create_app(settings)
    manager: InterviewManager = application.state.manager
    DrainingServer(server_config(application, settings), manager.request_drain).run()


if __name__ == "__main__":
    main()
else:  # ``uvicorn server:app``
    app = create_app()
