"""A local Stream (GetStream video): the REST endpoints the agent uses, plus the coordinator
websocket and a stub SFU websocket for Stream's native media client.

A real server (Starlette under uvicorn in its own thread, 127.0.0.1, ephemeral port, plain
http/ws) following PROVIDERS.md and what the SDKs send:

* every REST request carries ``?api_key=``, ``stream-auth-type: jwt`` and ``Authorization:
  <jwt>`` (no ``Bearer``), an HS256 token verified with the app secret: empty claims for a
  server-side request, ``user_id`` (and maybe ``call_cids``, ``exp``) for a user;
* ``POST /api/v2/users`` upserts users (server tokens only);
* ``POST /api/v2/video/call/{type}/{id}`` gets or creates a call (server-side requests must
  name ``created_by_id``);
* ``POST /api/v2/video/call/{type}/{id}/join`` (a user token allowed on this call) answers the
  call and SFU credentials: ``credentials.server.url``/``ws_endpoint`` point at this fake's
  stub SFU and ``credentials.token`` is a token the fake issued (:attr:`FakeStream.sfu_tokens`);
* ``POST /api/v2/video/call/{type}/{id}/event`` records a custom event;
* ``/video/connect`` (websocket): the coordinator's handshake (``{"token", "user_details"}`` →
  ``connection.ok`` with a ``connection_id``), which the native client opens before joining;
* ``/sfu/ws`` (websocket): records the query and the first (protobuf) message, then closes:
  there is no SFU here, so media never flows.

Responses are built from the SDK's own model classes (``getstream.models``), with timestamps
as unix nanoseconds as Stream sends them; errors use Stream's envelope (``code``, ``message``,
``StatusCode``, ...). Everything is recorded in :attr:`FakeStream.requests`. Faults:
:meth:`FakeStream.inject` queues, per endpoint (``users``, ``call``, ``join``, ``event``), an
error status and/or a delay for successive requests.

:attr:`FakeStream.proxy_url` is a refusing HTTP proxy that records what was asked of it: point
``HTTPS_PROXY`` at it when running the native client, which also asks
``hint.stream-io-video.com`` for the nearest SFU, so that nothing leaves the machine.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import json
import types
import typing
import uuid
from dataclasses import dataclass, field
from typing import Any

import anyio
import jwt
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from fakes.elevenlabs import AsgiServerThread

SFU_SECRET = "fake-sfu-secret-for-issued-sfu-tokens"  # signs issued SFU tokens (not the app's)


# --- responses from the SDK's models -------------------------------------------------------------


def _models() -> Any:
    import getstream.models

    return getstream.models


def synth(cls: type, **values: Any) -> Any:
    """An instance of an SDK model with ``values``; other required fields get neutral values
    (nested models recursively), so a response has every field the real one has."""
    hints = typing.get_type_hints(cls, vars(_models()))
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name in values:
            kwargs[f.name] = values[f.name]
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            kwargs[f.name] = _neutral(hints[f.name])
    return cls(**kwargs)


def _neutral(tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return None
    if origin is list:
        return []
    if origin is dict:
        return {}
    if tp is dt.datetime:
        return dt.datetime.now(dt.UTC)
    if dataclasses.is_dataclass(tp):
        return synth(tp)  # type: ignore[arg-type]
    return {str: "", bool: False, int: 0, float: 0.0}.get(tp)


def to_wire(value: Any) -> Any:
    """JSON as Stream sends it: the models' wire names, timestamps in unix nanoseconds,
    unset optional fields left out."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out: dict[str, Any] = {}
        for f in dataclasses.fields(value):
            item = getattr(value, f.name)
            if item is None:
                continue
            rename = f.metadata.get("dataclasses_json", {}).get("letter_case")
            out[rename(f.name) if rename else f.name] = to_wire(item)
        return out
    if isinstance(value, dt.datetime):
        return int(value.timestamp() * 1_000_000_000)
    if isinstance(value, dict):
        return {k: to_wire(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_wire(v) for v in value]
    return value


# --- records and faults --------------------------------------------------------------------------


@dataclass(frozen=True)
class Fault:
    """One injected fault: answer ``status`` (Stream's error envelope) and/or wait first."""

    status: int | None = None
    delay_s: float = 0.0
    message: str = "injected fault"


@dataclass
class Recorded:
    """One request the fake received (REST, or a websocket handshake and its first message)."""

    endpoint: str  # users | call | join | event | coordinator | sfu
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: Any
    claims: dict[str, Any] | None  # the verified token's claims; None when refused
    status: int = 200


@dataclass
class FakeStream:
    """The fake service; use as a context manager (``url`` is ``STREAM_BASE_URL``)."""

    api_key: str = "fake-stream-key"
    api_secret: str = "fake-stream-secret-5b3c8f0e7d41a9c6b2"
    ice_servers: list[dict[str, Any]] = field(default_factory=list)

    requests: list[Recorded] = field(default_factory=list, init=False)
    users: dict[str, dict[str, Any]] = field(default_factory=dict, init=False)
    calls: dict[str, dict[str, Any]] = field(default_factory=dict, init=False)
    events: list[dict[str, Any]] = field(default_factory=list, init=False)
    sfu_tokens: list[str] = field(default_factory=list, init=False)
    proxied: list[str] = field(default_factory=list, init=False)
    url: str = field(default="", init=False)
    proxy_url: str = field(default="", init=False)

    def __post_init__(self) -> None:
        call = "/api/v2/video/call/{type}/{id}"
        self._faults: dict[str, list[Fault]] = {}
        self._server = AsgiServerThread(
            Starlette(
                routes=[
                    Route("/api/v2/users", self._users, methods=["POST"]),
                    Route(call, self._call, methods=["POST"]),
                    Route(call + "/join", self._join, methods=["POST"]),
                    Route(call + "/event", self._event, methods=["POST"]),
                    WebSocketRoute("/video/connect", self._coordinator),
                    WebSocketRoute("/sfu/ws", self._sfu),
                ]
            )
        )
        self._proxy: asyncio.AbstractServer | None = None

    def __enter__(self) -> FakeStream:
        self._server.start()
        self.url = self._server.url
        loop = self._server.loop
        assert loop is not None
        self._proxy = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._refuse_proxy, "127.0.0.1", 0), loop
        ).result(5)
        self.proxy_url = f"http://127.0.0.1:{self._proxy.sockets[0].getsockname()[1]}"
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._proxy is not None and self._server.loop is not None:
            self._server.loop.call_soon_threadsafe(self._proxy.close)
        self._server.stop()

    @property
    def ws_url(self) -> str:
        """The coordinator websocket (the native client's ``ws_url``)."""
        return self.url.replace("http://", "ws://") + "/video/connect"

    def env(self) -> dict[str, str]:
        """The environment that points the service at this fake."""
        return {
            "STREAM_API_KEY": self.api_key,
            "STREAM_API_SECRET": self.api_secret,
            "STREAM_BASE_URL": self.url,
        }

    def inject(self, endpoint: str, *faults: Fault) -> None:
        """Faults for the next requests to ``endpoint`` (one each, in order)."""
        self._faults.setdefault(endpoint, []).extend(faults)

    def of(self, endpoint: str) -> list[Recorded]:
        return [r for r in self.requests if r.endpoint == endpoint]

    def custom_events(self, cid: str | None = None) -> list[dict[str, Any]]:
        """The ``custom`` payload of every event (of one call), in order."""
        return [e["custom"] for e in self.events if cid is None or e["cid"] == cid]

    # -- auth and envelopes

    def _error(self, rec: Recorded, status: int, code: int, message: str) -> Response:
        rec.status = status
        err = synth(
            _models().APIError,
            code=code,
            message=message,
            status_code=status,
            duration="0.01ms",
            more_info="https://getstream.io/video/docs/api/errors",
        )
        return JSONResponse(to_wire(err), status_code=status)

    def _ok(self, rec: Recorded, model: Any, status: int = 201) -> Response:
        rec.status = status
        return JSONResponse(to_wire(model), status_code=status)

    async def _record(self, endpoint: str, request: Request) -> tuple[Recorded, Response | None]:
        raw = await request.body()
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = raw.decode("utf-8", "replace")
        rec = Recorded(
            endpoint,
            request.url.path,
            dict(request.query_params),
            {k.lower(): v for k, v in request.headers.items()},
            body,
            None,
        )
        self.requests.append(rec)
        faults = self._faults.get(endpoint)
        if faults:
            fault = faults.pop(0)
            if fault.delay_s:
                await anyio.sleep(fault.delay_s)
            if fault.status is not None:
                return rec, self._error(rec, fault.status, 0, fault.message)
        if rec.query.get("api_key") != self.api_key:
            return rec, self._error(rec, 401, 2, "api_key not found")
        if rec.headers.get("stream-auth-type") != "jwt":
            return rec, self._error(rec, 401, 5, "stream-auth-type header must be jwt")
        claims, why = self._verify(rec.headers.get("authorization", ""))
        if claims is None:
            return rec, self._error(rec, 401, 5, f"JWTAuth error: {why}")
        if not isinstance(body, dict):
            return rec, self._error(rec, 400, 4, "the body must be a JSON object")
        rec.claims = claims
        return rec, None

    def _verify(self, token: str) -> tuple[dict[str, Any] | None, str]:
        if not token:
            return None, "missing Authorization header"
        if token.lower().startswith("bearer "):
            return None, "the token must be sent without the Bearer prefix"
        try:
            return jwt.decode(token, self.api_secret, algorithms=["HS256"]), ""
        except jwt.ExpiredSignatureError:
            return None, "token has expired"
        except jwt.InvalidTokenError as err:
            return None, f"token is not valid ({type(err).__name__})"

    def _call_response(self, cid: str) -> Any:
        call_type, call_id = cid.split(":", 1)
        state = self.calls[cid]
        m = _models()
        creator = synth(m.UserResponse, id=state["created_by"], role="user")
        return synth(
            m.CallResponse,
            cid=cid,
            id=call_id,
            type=call_type,
            created_by=creator,
            created_at=state["created_at"],
            updated_at=state["created_at"],
            custom={},
            current_session_id=state.get("session_id", ""),
        )

    # -- REST

    async def _users(self, request: Request) -> Response:
        rec, refused = await self._record("users", request)
        if refused:
            return refused
        assert rec.claims is not None
        if "user_id" in rec.claims:
            return self._error(rec, 403, 17, "only server-side tokens may upsert users")
        users = rec.body.get("users")
        if not isinstance(users, dict) or not users:
            return self._error(rec, 400, 4, "users is a required field")
        m = _models()
        out = {}
        for key, user in users.items():
            if not isinstance(user, dict) or user.get("id") != key:
                return self._error(rec, 400, 4, f"users[{key}].id must be {key!r}")
            self.users[key] = user
            now = dt.datetime.now(dt.UTC)
            out[key] = synth(
                m.FullUserResponse,
                id=key,
                name=user.get("name"),
                custom=user.get("custom") or {},
                role=user.get("role") or "user",
                created_at=now,
                updated_at=now,
            )
        return self._ok(rec, synth(m.UpdateUsersResponse, users=out, duration="0.42ms"))

    async def _call(self, request: Request) -> Response:
        rec, refused = await self._record("call", request)
        if refused:
            return refused
        assert rec.claims is not None
        cid = f"{request.path_params['type']}:{request.path_params['id']}"
        data = rec.body.get("data") or {}
        creator = rec.claims.get("user_id") or data.get("created_by_id")
        creator = creator or (data.get("created_by") or {}).get("id")
        created = cid not in self.calls
        if created:
            if not creator:
                return self._error(
                    rec, 400, 4, "data.created_by_id is required for server-side requests"
                )
            self.calls[cid] = {"created_by": creator, "created_at": dt.datetime.now(dt.UTC)}
        m = _models()
        response = synth(
            m.GetOrCreateCallResponse,
            created=created,
            call=self._call_response(cid),
            members=[],
            own_capabilities=[],
            duration="0.73ms",
        )
        return self._ok(rec, response, 201 if created else 200)

    async def _join(self, request: Request) -> Response:
        rec, refused = await self._record("join", request)
        if refused:
            return refused
        assert rec.claims is not None
        user_id = rec.claims.get("user_id")
        cid = f"{request.path_params['type']}:{request.path_params['id']}"
        if not user_id:
            return self._error(rec, 403, 17, "joining a call needs a user token")
        if "call_cids" in rec.claims and cid not in rec.claims["call_cids"]:
            return self._error(rec, 403, 17, f"the token does not allow call {cid}")
        if cid not in self.calls:
            if not rec.body.get("create"):
                return self._error(rec, 404, 16, f"call {cid} not found")
            self.calls[cid] = {"created_by": user_id, "created_at": dt.datetime.now(dt.UTC)}
        session = self.calls[cid].setdefault("session_id", str(uuid.uuid4()))
        token = jwt.encode(
            {"user_id": user_id, "call_cid": cid, "session_id": session}, SFU_SECRET, "HS256"
        )
        self.sfu_tokens.append(token)
        ws = self.url.replace("http://", "ws://")
        body = {
            "call": to_wire(self._call_response(cid)),
            "members": [],
            "own_capabilities": ["join-call", "send-audio"],
            "credentials": {
                "server": {
                    "edge_name": "fake-edge",
                    "url": f"{self.url}/sfu",
                    "ws_endpoint": f"{ws}/sfu/ws",
                },
                "token": token,
                "ice_servers": self.ice_servers,
            },
            "stats_options": {"reporting_interval_ms": 10000, "enable_rtc_stats": False},
            "duration": "1.10ms",
        }
        rec.status = 201
        return JSONResponse(body, status_code=201)

    async def _event(self, request: Request) -> Response:
        rec, refused = await self._record("event", request)
        if refused:
            return refused
        assert rec.claims is not None
        cid = f"{request.path_params['type']}:{request.path_params['id']}"
        sender = rec.claims.get("user_id") or rec.body.get("user_id")
        sender = sender or (rec.body.get("user") or {}).get("id")
        if not sender:
            return self._error(rec, 400, 4, "user_id is required for server-side requests")
        if cid not in self.calls:
            return self._error(rec, 404, 16, f"call {cid} not found")
        custom = rec.body.get("custom")
        if not isinstance(custom, dict):
            return self._error(rec, 400, 4, "custom must be an object")
        self.events.append({"cid": cid, "user_id": sender, "custom": custom})
        return self._ok(rec, synth(_models().SendCallEventResponse, duration="0.31ms"))

    # -- websockets (the native client's path)

    def _ws_record(self, endpoint: str, ws: WebSocket) -> Recorded:
        rec = Recorded(
            endpoint,
            ws.url.path,
            dict(ws.query_params),
            {k.lower(): v for k, v in ws.headers.items()},
            None,
            None,
        )
        self.requests.append(rec)
        return rec

    async def _coordinator(self, ws: WebSocket) -> None:
        rec = self._ws_record("coordinator", ws)
        self._server.active += 1
        try:
            if rec.query.get("api_key") != self.api_key:
                rec.status = 401
                await ws.close(code=1008)
                return
            await ws.accept()
            try:
                rec.body = json.loads(await ws.receive_text())
            except (ValueError, WebSocketDisconnect):
                return
            token = rec.body.get("token", "") if isinstance(rec.body, dict) else ""
            claims, why = self._verify(token)
            if claims is None or "user_id" not in claims:
                rec.status = 401
                error = {"code": 5, "message": f"JWTAuth error: {why or 'no user_id'}"}
                await ws.send_text(json.dumps({"type": "connection.error", "error": error}))
                await ws.close(code=1000)
                return
            rec.claims = claims
            now = dt.datetime.now(dt.UTC).isoformat().replace("+00:00", "Z")
            me = {"id": claims["user_id"], "role": "user", "created_at": now, "updated_at": now}
            ok = {"type": "connection.ok", "connection_id": str(uuid.uuid4()), "me": me}
            await ws.send_text(json.dumps({**ok, "created_at": now}))
            while True:  # health checks and subscriptions: nothing to answer
                await ws.receive_text()
        except WebSocketDisconnect:
            pass
        finally:
            self._server.active -= 1

    async def _sfu(self, ws: WebSocket) -> None:
        rec = self._ws_record("sfu", ws)
        self._server.active += 1
        try:
            await ws.accept()
            message = await ws.receive()
            rec.body = message.get("bytes") or message.get("text")
            await ws.close(code=1011, reason="the fake has no SFU")
        except WebSocketDisconnect:
            pass
        finally:
            self._server.active -= 1

    async def _refuse_proxy(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        line = await reader.readline()
        self.proxied.append(line.decode("latin-1").strip())
        writer.write(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        await writer.drain()
        writer.close()


# --- the SFU side, in memory ---------------------------------------------------------------------


class MediaDouble:
    """An injected :class:`stages.getstream.StreamMedia`: the SFU cannot be faked offline.

    It wants the REST join's credentials (``joins_call = False``) and keeps the ticket it got.
    :meth:`feed` hands it remote audio (as the SFU would deliver the candidate's), :meth:`hang_up`
    ends the call; what the agent sends is kept in :attr:`sent`. ``on_close`` runs when the
    transport leaves (to check what had happened by then).
    """

    joins_call = False

    def __init__(self, *, fail_connect: Exception | None = None) -> None:
        from stages.getstream import RemoteAudio

        self.fail_connect = fail_connect
        self.ticket: Any = None
        self.sent: list[tuple[bytes, int]] = []
        self.closed = False
        self.on_close: Any = None
        self.connected = anyio.Event()
        self._tx, self._rx = anyio.create_memory_object_stream[RemoteAudio](10_000)

    async def connect(self, ticket: Any) -> None:
        if self.fail_connect is not None:
            raise self.fail_connect
        self.ticket = ticket
        self.connected.set()

    def feed(self, audio: Any) -> None:
        self._tx.send_nowait(audio)

    def hang_up(self) -> None:
        self._tx.close()

    async def receive(self, sink: Any) -> None:
        async with self._rx:
            async for audio in self._rx:
                await sink(audio)

    async def send_audio(self, pcm: bytes, sample_rate: int) -> None:
        if self.closed or self.ticket is None:
            raise RuntimeError("audio sent outside the call")
        self.sent.append((pcm, sample_rate))

    async def close(self) -> None:
        self.closed = True
        if self.on_close is not None:
            self.on_close()
