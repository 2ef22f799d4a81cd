"""A local HeyGen LiveAvatar: the REST envelope and the LITE-mode websocket.

A real server (Starlette under uvicorn in its own thread, 127.0.0.1, ephemeral port, plain
http/ws) following PROVIDERS.md: ``POST /v1/sessions/token`` (``X-API-KEY``, ``mode: LITE``) →
``{"code": 100, "data": {session_id, session_token}}``; ``POST /v1/sessions/start`` (``Bearer``)
→ ``{session_id, livekit_url, livekit_client_token, livekit_agent_token, ws_url,
max_session_duration}``; ``POST /v1/sessions/stop``; and the session's websocket, which says
``session.state_updated {state: connected}`` first, then takes ``agent.speak`` (base64 PCM16,
at most 1 MB), ``agent.speak_end``, ``agent.interrupt`` and ``session.keep_alive``, answering
``agent.speak_started`` / ``agent.speak_ended``. The LiveKit room itself (media) cannot be faked
offline; ``livekit_url`` points nowhere.

Everything is recorded in :attr:`FakeLiveAvatar.events` (one list for REST and socket, in
order) and per session. Faults: ``refuse_token`` / ``refuse_start`` (an HTTP status),
``refuse_ws`` (a handshake status), ``die_after_speaks`` (the session closes after that many
``agent.speak`` messages: ``state_updated closed`` then close 1011), ``idle_timeout_s`` (the
session closes when nothing arrives for that long, as the real one does after 5 minutes),
``connect_delay_s`` (the avatar takes that long to say ``connected``).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import uuid
from dataclasses import dataclass, field
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from fakes.elevenlabs import AsgiServerThread, receive_text

LIVEKIT_URL = "wss://livekit.fake.invalid"
MAX_MESSAGE = 1_000_000


@dataclass
class Event:
    """One thing the fake received: a REST call or a websocket message."""

    kind: str  # "token", "start", "stop", or the message type ("agent.speak", ...)
    session_id: str | None
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    audio_bytes: int = 0
    status: int = 200


@dataclass
class FakeSession:
    id: str
    token: str
    body: dict[str, Any]
    started: bool = False
    stopped: bool = False
    connected: bool = False
    closed_by: str = ""
    speaks: int = 0
    audio_bytes: int = 0
    speak_ends: list[str] = field(default_factory=list)
    interrupts: int = 0
    keepalives: int = 0


@dataclass
class FakeLiveAvatar:
    """The fake service; use as a context manager (``url`` is ``HEYGEN_BASE_URL``)."""

    api_key: str = "fake-heygen-key"
    refuse_token: int | None = None
    refuse_start: int | None = None
    refuse_ws: int | None = None
    die_after_speaks: int | None = None
    idle_timeout_s: float = 300.0
    connect_delay_s: float = 0.0

    events: list[Event] = field(default_factory=list, init=False)
    sessions: dict[str, FakeSession] = field(default_factory=dict, init=False)
    url: str = field(default="", init=False)

    def __post_init__(self) -> None:
        self._server = AsgiServerThread(
            Starlette(
                routes=[
                    Route("/v1/sessions/token", self._token, methods=["POST"]),
                    Route("/v1/sessions/start", self._start, methods=["POST"]),
                    Route("/v1/sessions/stop", self._stop, methods=["POST"]),
                    WebSocketRoute("/v1/sessions/{session_id}/ws", self._ws),
                ]
            )
        )

    def __enter__(self) -> FakeLiveAvatar:
        self._server.start()
        self.url = self._server.url
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._server.stop()

    def env(self) -> dict[str, str]:
        """The environment that points the service at this fake."""
        return {
            "HEYGEN_API_KEY": self.api_key,
            "HEYGEN_BASE_URL": self.url,
            "HEYGEN_AVATAR_ID": "00000000-0000-4000-8000-000000000001",
        }

    def kinds(self, session_id: str | None = None) -> list[str]:
        """The kinds of every event (of one session), in order."""
        return [e.kind for e in self.events if session_id is None or e.session_id == session_id]

    # -- REST

    @staticmethod
    def _envelope(data: Any, status: int = 200, code: int = 100, message: str = "ok") -> Response:
        return JSONResponse({"code": code, "data": data, "message": message}, status_code=status)

    async def _body(self, request: Request) -> Any:
        raw = await request.body()
        if not raw:
            return None
        try:
            return await request.json()
        except ValueError:
            return None

    async def _token(self, request: Request) -> Response:
        headers = {k.lower(): v for k, v in request.headers.items()}
        body = await self._body(request)
        event = Event("token", None, body, headers)
        self.events.append(event)
        if headers.get("x-api-key") != self.api_key:
            event.status = 401
            return self._envelope(None, 401, 401, "Invalid API key")
        if self.refuse_token is not None:
            event.status = self.refuse_token
            return self._envelope(None, self.refuse_token, self.refuse_token, "refused")
        if not isinstance(body, dict) or body.get("mode") != "LITE" or not body.get("avatar_id"):
            event.status = 422
            return self._envelope(None, 422, 422, "mode LITE and avatar_id are required")
        session = FakeSession(uuid.uuid4().hex, uuid.uuid4().hex, body)
        self.sessions[session.id] = session
        event.session_id = session.id
        return self._envelope({"session_id": session.id, "session_token": session.token})

    async def _start(self, request: Request) -> Response:
        headers = {k.lower(): v for k, v in request.headers.items()}
        auth = headers.get("authorization", "")
        session = next((s for s in self.sessions.values() if auth == f"Bearer {s.token}"), None)
        event = Event("start", session.id if session else None, None, headers)
        self.events.append(event)
        if session is None:
            event.status = 401
            return self._envelope(None, 401, 401, "Invalid session token")
        if self.refuse_start is not None:
            event.status = self.refuse_start
            return self._envelope(None, self.refuse_start, self.refuse_start, "no capacity")
        session.started = True
        ws_url = self.url.replace("http://", "ws://") + f"/v1/sessions/{session.id}/ws"
        data = {
            "session_id": session.id,
            "livekit_url": LIVEKIT_URL,
            "livekit_client_token": f"client-{session.id}",
            "livekit_agent_token": f"agent-{session.id}",
            "ws_url": ws_url,
            "max_session_duration": 1200,
        }
        return self._envelope(data)

    async def _stop(self, request: Request) -> Response:
        headers = {k.lower(): v for k, v in request.headers.items()}
        body = await self._body(request)
        sid = body.get("session_id") if isinstance(body, dict) else None
        event = Event("stop", sid, body, headers)
        self.events.append(event)
        if headers.get("x-api-key") != self.api_key:
            event.status = 401
            return self._envelope(None, 401, 401, "Invalid API key")
        session = self.sessions.get(str(sid))
        if session is None:
            event.status = 404
            return self._envelope(None, 404, 404, "no such session")
        session.stopped = True
        return self._envelope(None)

    # -- the LITE websocket

    async def _ws(self, ws: WebSocket) -> None:
        self._server.active += 1
        try:
            await self._session(ws)
        finally:
            self._server.active -= 1

    async def _session(self, ws: WebSocket) -> None:
        session = self.sessions.get(ws.path_params["session_id"])
        if session is None or not session.started or session.stopped:
            await ws.send_denial_response(Response(status_code=404))
            return
        if self.refuse_ws is not None:
            session.closed_by = "refused"
            await ws.send_denial_response(Response(status_code=self.refuse_ws))
            return
        await ws.accept()
        await ws.send_json({"type": "session.state_updated", "state": "connecting"})
        await asyncio.sleep(self.connect_delay_s)
        session.connected = True
        await ws.send_json({"type": "session.state_updated", "state": "connected"})
        speaking: str | None = None
        while True:
            text: str | None = None
            with anyio.move_on_after(self.idle_timeout_s) as idle:
                try:
                    text = await receive_text(ws)
                except (WebSocketDisconnect, RuntimeError):
                    text = None
                if text is None:
                    session.closed_by = session.closed_by or "client"
                    return
            if idle.cancelled_caught:
                await self._close(ws, session, "idle")
                return
            if text is None:
                continue
            if len(text) > MAX_MESSAGE:
                await self._close(ws, session, "too large", code=1009)
                return
            try:
                msg = json.loads(text)
            except ValueError:
                continue
            kind = str(msg.get("type"))
            event = Event(kind, session.id, msg)
            self.events.append(event)
            if kind == "agent.speak":
                try:
                    pcm = base64.b64decode(msg.get("audio", ""), validate=True)
                except (binascii.Error, ValueError):
                    pcm = b""
                event.audio_bytes = len(pcm)
                event.body = {k: v for k, v in msg.items() if k != "audio"}
                session.speaks += 1
                session.audio_bytes += len(pcm)
                if speaking is None:
                    speaking = str(msg.get("event_id") or uuid.uuid4().hex)
                    await self._send(ws, "agent.speak_started", speaking)
                if self.die_after_speaks is not None and session.speaks >= self.die_after_speaks:
                    await self._close(ws, session, "died")
                    return
            elif kind == "agent.speak_end":
                session.speak_ends.append(str(msg.get("event_id")))
                if speaking is not None:
                    await self._send(ws, "agent.speak_ended", speaking)
                speaking = None
            elif kind == "agent.interrupt":
                session.interrupts += 1
                if speaking is not None:
                    await self._send(ws, "agent.speak_ended", speaking)
                speaking = None
            elif kind == "session.keep_alive":
                session.keepalives += 1

    async def _send(self, ws: WebSocket, kind: str, event_id: str) -> None:
        with contextlib.suppress(Exception):
            await ws.send_json({"type": kind, "event_id": event_id, "task": {"id": event_id}})

    async def _close(self, ws: WebSocket, session: FakeSession, why: str, code: int = 1011) -> None:
        session.closed_by = why
        with contextlib.suppress(Exception):
            await ws.send_json({"type": "session.state_updated", "state": "closed"})
            await asyncio.sleep(0)
            await ws.close(code, why)
