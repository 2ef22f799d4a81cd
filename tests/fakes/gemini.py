"""A local Gemini API: REST + SSE and the Live websocket, over TLS, scriptable, with faults.

The real google-genai SDK talks to it unchanged: point ``base_url`` at :attr:`FakeGemini.base_url`
and trust :attr:`FakeGemini.ca_file` through ``SSL_CERT_FILE`` (the SDK always uses ``wss`` for
Live, so the fake serves TLS with a certificate from a throwaway ``trustme`` CA). It runs
uvicorn in a background thread on 127.0.0.1 and an ephemeral port::

    with FakeGemini() as fake:
        fake.script(text_reply("Hello ", "there."), call_reply("next_question", {"reason": "x"}))
        fake.script_live(live_reply(say("Hi."), live_call("next_question")), ...)
        ...
    fake.requests   # every REST request: kind "stream" | "unary", path, headers, json
    fake.live       # every Live connection: its setup and the client messages, in order

Routes (the SDK's own paths): ``POST /{ver}/models/{model}:streamGenerateContent?alt=sse``,
``POST /{ver}/models/{model}:generateContent`` and a websocket whose path ends in
``GenerativeService.BidiGenerateContent``. Keys arrive camelCase or snake_case; both are read.

Scripted replies are used in order, per kind; once a queue is empty a ``responder`` (if set)
answers, else a default (a short text, or :attr:`FakeGemini.transcript` for unary calls).
Faults per reply: ``delay_s`` before the first chunk (the time to first token), an error
``status`` (429, 500, 400 + ``API_KEY_INVALID``), ``drop_after`` (the connection is cut after
that many chunks) and ``stall_after`` (the server goes silent after that many chunks, until
the client leaves). A request whose ``x-goog-api-key`` is not :attr:`FakeGemini.api_key` gets
400 ``API_KEY_INVALID`` (REST) or a close with code 1008 (Live).

Live: each client trigger (``activityEnd``, ``clientContent`` with ``turnComplete``,
``toolResponse``) plays the next scripted :class:`LiveReply`. Text is rendered as the setup
asks: ``modelTurn`` text parts for the TEXT modality, or an audio part plus
``outputTranscription`` for AUDIO. After ``activityEnd`` the fake sends an
``inputTranscription`` (:attr:`FakeGemini.transcript`) when the setup asked for one. When the
setup asked for session resumption, every completed turn is followed by a
``sessionResumptionUpdate`` with a new handle; a connection whose setup carries a known handle
is a resumed session (:attr:`LiveConnection.resumed_from`), an unknown handle is refused.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import json
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trustme
import uvicorn
from starlette.websockets import WebSocket, WebSocketDisconnect

DEFAULT_USAGE = {"promptTokenCount": 100, "candidatesTokenCount": 12, "totalTokenCount": 112}
KEY_INVALID_MESSAGE = "API key not valid. Please pass a valid API key."


def b64decode(data: str) -> bytes:
    """Standard or URL-safe base64 (the SDK sends the URL-safe alphabet)."""
    return base64.urlsafe_b64decode(data.replace("+", "-").replace("/", "_"))


def get(d: Any, *names: str) -> Any:
    """``d[name]`` for the first of ``names`` present (camelCase / snake_case), else None."""
    if not isinstance(d, dict):
        return None
    for name in names:
        if name in d:
            return d[name]
    return None


# --- scripts -------------------------------------------------------------------------------------


@dataclass
class Reply:
    """One scripted answer to a REST call: each model part is one SSE chunk (streaming), or all
    parts in one response (unary). The last chunk carries ``finishReason`` and the usage."""

    parts: list[dict[str, Any]] = field(default_factory=list)
    status: int = 200
    error: dict[str, Any] | None = None
    delay_s: float = 0.0
    interval_s: float = 0.0
    drop_after: int | None = None
    stall_after: int | None = None
    usage: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_USAGE))


def text_reply(*chunks: str, **kw: Any) -> Reply:
    return Reply(parts=[{"text": c} for c in chunks], **kw)


def function_call(
    name: str, args: dict[str, Any] | None = None, *, call_id: str | None = None, sig: str = ""
) -> dict[str, Any]:
    """A model part calling ``name``; ``sig`` adds a thought signature (Gemini 3 sends them)."""
    call: dict[str, Any] = {"name": name, "args": args if args is not None else {"reason": "x"}}
    if call_id:
        call["id"] = call_id
    part: dict[str, Any] = {"functionCall": call}
    if sig:
        part["thoughtSignature"] = base64.b64encode(sig.encode()).decode()
    return part


def call_reply(
    name: str, args: dict[str, Any] | None = None, *, text: tuple[str, ...] = (), **kw: Any
) -> Reply:
    """Text chunks, then a function call."""
    sig = kw.pop("sig", "")
    parts = [{"text": t} for t in text] + [function_call(name, args, sig=sig)]
    return Reply(parts=parts, **kw)


def error_reply(status: int, message: str = "", *, reason: str | None = None, **kw: Any) -> Reply:
    names = {
        400: "INVALID_ARGUMENT",
        401: "UNAUTHENTICATED",
        403: "PERMISSION_DENIED",
        404: "NOT_FOUND",
        429: "RESOURCE_EXHAUSTED",
        500: "INTERNAL",
        503: "UNAVAILABLE",
    }
    error: dict[str, Any] = {
        "code": status,
        "message": message or names.get(status, "error"),
        "status": names.get(status, "UNKNOWN"),
    }
    if reason:
        error["details"] = [{"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": reason}]
    return Reply(status=status, error=error, **kw)


def bad_key_reply() -> Reply:
    return error_reply(400, KEY_INVALID_MESSAGE, reason="API_KEY_INVALID")


@dataclass(frozen=True)
class Say:
    """Model text in a Live reply, rendered per the setup's response modality."""

    text: str


@dataclass
class LiveReply:
    """What the fake sends for one Live trigger: ``Say`` items and raw server messages."""

    events: list[Say | dict[str, Any]] = field(default_factory=list)
    delay_s: float = 0.0
    interval_s: float = 0.0
    drop_after: int | None = None
    stall_after: int | None = None
    input_transcript: str | None = None


def say(*chunks: str) -> list[Say]:
    return [Say(c) for c in chunks]


def live_call(name: str, args: dict[str, Any] | None = None, call_id: str = "") -> dict[str, Any]:
    call = {"id": call_id or f"call-{name}", "name": name, "args": args or {"reason": "x"}}
    return {"toolCall": {"functionCalls": [call]}}


def turn_complete(usage: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "serverContent": {"turnComplete": True},
        "usageMetadata": usage or {"promptTokenCount": 50, "responseTokenCount": 9},
    }


def go_away(time_left: str = "5s") -> dict[str, Any]:
    return {"goAway": {"timeLeft": time_left}}


def live_reply(
    *items: Say | list[Say] | dict[str, Any], complete: bool = True, **kw: Any
) -> LiveReply:
    """Events in order (``say(...)`` lists are flattened), then ``turnComplete`` unless told not."""
    events: list[Say | dict[str, Any]] = []
    for item in items:
        events.extend(item if isinstance(item, list) else [item])
    if complete:
        events.append(turn_complete())
    return LiveReply(events=events, **kw)


# --- records -------------------------------------------------------------------------------------


@dataclass
class Recorded:
    """One REST request as received."""

    kind: str  # "stream" | "unary"
    path: str
    headers: dict[str, str]
    json: dict[str, Any]
    at: float
    outcome: str = ""  # "ok", "error 429", "dropped", "stalled", "disconnected"

    @property
    def contents(self) -> list[dict[str, Any]]:
        return list(get(self.json, "contents") or [])


@dataclass
class LiveConnection:
    """One Live websocket: its setup and every client message after it."""

    path: str
    headers: dict[str, str]
    setup: dict[str, Any] = field(default_factory=dict)
    messages: list[dict[str, Any]] = field(default_factory=list)
    resumed_from: str | None = None
    handles: list[str] = field(default_factory=list)
    closed_by: str = ""  # "client", "server", "refused"
    outbox: asyncio.Queue[Any] | None = None
    gone: asyncio.Event | None = None

    def realtime(self, key: str) -> list[Any]:
        """Values of ``realtimeInput.<key>`` in order (``audio``, ``activityStart``, ...)."""
        snake = "".join("_" + c.lower() if c.isupper() else c for c in key)
        out: list[Any] = []
        for m in self.messages:
            ri = get(m, "realtimeInput", "realtime_input")
            value = get(ri, key, snake)
            if value is not None:
                out.append(value)
        return out

    def kinds(self) -> list[str]:
        """A compact trace: activityStart, audio, activityEnd, clientContent, toolResponse."""
        out: list[str] = []
        for m in self.messages:
            ri = get(m, "realtimeInput", "realtime_input")
            if ri is not None:
                out.extend(
                    k
                    for k in ("activityStart", "audio", "activityEnd", "text")
                    if get(ri, k, _snake(k)) is not None
                )
            elif get(m, "clientContent", "client_content") is not None:
                out.append("clientContent")
            elif get(m, "toolResponse", "tool_response") is not None:
                out.append("toolResponse")
            else:
                out.append(next(iter(m), "?"))
        return out

    def audio_bytes(self) -> int:
        total = 0
        for blob in self.realtime("audio"):
            total += len(b64decode(get(blob, "data") or ""))
        return total

    @property
    def response_modality(self) -> str:
        gc = get(self.setup, "generationConfig", "generation_config") or {}
        mods = get(gc, "responseModalities", "response_modalities") or ["TEXT"]
        return str(mods[0]).upper()


def _snake(key: str) -> str:
    return "".join("_" + c.lower() if c.isupper() else c for c in key)


# --- the server ----------------------------------------------------------------------------------


class FakeGemini:
    """See the module docstring. Thread-safe enough for tests: scripts are deques."""

    def __init__(
        self,
        *,
        api_key: str | None = "test-key",
        transcript: str = "I have five years of experience with Python.",
        tool_call_turn_complete: bool = False,
    ) -> None:
        self.api_key = api_key
        self.transcript = transcript
        self._defaults = (api_key, transcript, tool_call_turn_complete)
        self.tool_call_turn_complete = tool_call_turn_complete
        """Live: send ``turnComplete`` right after a ``toolCall`` (some Live models do)."""
        self.requests: list[Recorded] = []
        self.live: list[LiveConnection] = []
        self.responder: Callable[[Recorded], Reply] | None = None
        self.unary_responder: Callable[[Recorded], Reply] | None = None
        self.live_responder: Callable[[LiveConnection, str, dict[str, Any]], LiveReply] | None = (
            None
        )
        self._stream: collections.deque[Reply] = collections.deque()
        self._unary: collections.deque[Reply] = collections.deque()
        self._live: collections.deque[LiveReply] = collections.deque()
        self._handles: set[str] = set()
        self._handle_seq = 0
        self._lock = threading.Lock()
        self._tmp = tempfile.TemporaryDirectory(prefix="fake-gemini-")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self.base_url = ""
        self.ca_file = ""

    # -- scripting --------------------------------------------------------------------------------

    def script(self, *replies: Reply) -> None:
        """Answers for the next streaming calls, in order."""
        self._stream.extend(replies)

    def script_unary(self, *replies: Reply) -> None:
        self._unary.extend(replies)

    def script_live(self, *replies: LiveReply) -> None:
        self._live.extend(replies)

    def reset(self) -> None:
        """Forget scripts, responders and records (between tests sharing one server)."""
        self._stream.clear()
        self._unary.clear()
        self._live.clear()
        self.responder = self.unary_responder = self.live_responder = None
        self.api_key, self.transcript, self.tool_call_turn_complete = self._defaults
        self.requests.clear()
        self.live.clear()

    def push_live(self, message: dict[str, Any]) -> None:
        """Send ``message`` now on the newest open Live connection."""
        conn = next((c for c in reversed(self.live) if not c.closed_by), None)
        if conn is None or conn.outbox is None or self._loop is None:
            raise RuntimeError("no open Live connection")
        self._loop.call_soon_threadsafe(conn.outbox.put_nowait, ("push", message))

    def stream_requests(self) -> list[Recorded]:
        return [r for r in self.requests if r.kind == "stream"]

    def unary_requests(self) -> list[Recorded]:
        return [r for r in self.requests if r.kind == "unary"]

    def wait_until(self, predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
        """Poll ``predicate`` (server-side effects land a moment after the client moves on)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if predicate():
                return True
            time.sleep(0.01)
        return predicate()

    # -- lifecycle --------------------------------------------------------------------------------

    def __enter__(self) -> FakeGemini:
        ca = trustme.CA()
        cert = ca.issue_cert("127.0.0.1", "localhost")
        tmp = Path(self._tmp.name)
        self.ca_file = str(tmp / "ca.pem")
        ca.cert_pem.write_to_path(self.ca_file)
        cert_file, key_file = tmp / "cert.pem", tmp / "key.pem"
        cert.cert_chain_pems[0].write_to_path(cert_file)
        cert.private_key_pem.write_to_path(key_file)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        config = uvicorn.Config(
            self._app,
            ssl_certfile=str(cert_file),
            ssl_keyfile=str(key_file),
            ws="websockets-sansio",
            ws_ping_interval=None,
            lifespan="off",
            interface="asgi3",
            log_level="critical",
            access_log=False,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, daemon=True
        )
        self._thread.start()
        if not self.wait_until(lambda: bool(self._server and self._server.started), 10):
            raise RuntimeError("the fake Gemini server did not start")
        self.base_url = f"https://127.0.0.1:{port}"
        return self

    def __exit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.should_exit = True
            self._server.force_exit = True
        if self._thread is not None:
            self._thread.join(10)
        self._tmp.cleanup()

    # -- ASGI -------------------------------------------------------------------------------------

    async def _app(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        self._loop = asyncio.get_running_loop()
        if scope["type"] == "websocket":
            await self._websocket(WebSocket(scope, receive, send))
        elif scope["type"] == "http":
            await self._http(scope, receive, send)

    async def _http(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        path: str = scope["path"]
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        if path.endswith(":streamGenerateContent"):
            kind = "stream"
        elif path.endswith(":generateContent"):
            kind = "unary"
        else:
            await _send_json(send, 404, {"error": {"code": 404, "message": f"no route {path}"}})
            return
        try:
            payload = json.loads(body or b"{}")
        except json.JSONDecodeError:
            await _send_json(send, 400, {"error": {"code": 400, "message": "bad JSON"}})
            return
        rec = Recorded(kind, path, headers, payload, time.monotonic())
        with self._lock:
            self.requests.append(rec)
        if self.api_key is not None and headers.get("x-goog-api-key") != self.api_key:
            reply = bad_key_reply()
        else:
            reply = self._next_reply(rec)
        if reply.delay_s:
            await asyncio.sleep(reply.delay_s)
        if reply.status != 200:
            rec.outcome = f"error {reply.status}"
            await _send_json(send, reply.status, {"error": reply.error or {}})
            return
        if kind == "unary":
            rec.outcome = "ok"
            await _send_json(send, 200, _response(reply.parts, reply.usage, last=True))
            return
        await self._sse(rec, reply, receive, send)

    def _next_reply(self, rec: Recorded) -> Reply:
        queue = self._stream if rec.kind == "stream" else self._unary
        try:
            return queue.popleft()
        except IndexError:
            pass
        responder = self.responder if rec.kind == "stream" else self.unary_responder
        if responder is not None:
            return responder(rec)
        if rec.kind == "unary":
            return text_reply(self.transcript)
        return text_reply("OK.")

    async def _sse(self, rec: Recorded, reply: Reply, receive: Any, send: Any) -> None:
        disconnected = asyncio.Event()

        async def watch() -> None:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    disconnected.set()
                    return

        watcher = asyncio.ensure_future(watch())
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")],
                }
            )
            parts = reply.parts or [{"text": ""}]
            for i in range(len(parts) + 1):  # the faults may also strike after the last part
                if disconnected.is_set():
                    rec.outcome = "disconnected"
                    return
                if reply.drop_after is not None and i >= reply.drop_after:
                    rec.outcome = "dropped"
                    return  # an incomplete response: uvicorn cuts the connection
                if reply.stall_after is not None and i >= reply.stall_after:
                    rec.outcome = "stalled"
                    await disconnected.wait()
                    rec.outcome = "stalled, disconnected"
                    return
                if i == len(parts):
                    break
                part = parts[i]
                if i and reply.interval_s:
                    try:
                        await asyncio.wait_for(disconnected.wait(), reply.interval_s)
                        rec.outcome = "disconnected"
                        return
                    except TimeoutError:
                        pass
                chunk = _response([part], reply.usage, last=i == len(parts) - 1)
                data = b"data: " + json.dumps(chunk).encode() + b"\r\n\r\n"
                await send({"type": "http.response.body", "body": data, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            rec.outcome = "ok"
        finally:
            watcher.cancel()

    # -- Live -------------------------------------------------------------------------------------

    async def _websocket(self, ws: WebSocket) -> None:
        path = ws.scope["path"]
        headers = {k.decode().lower(): v.decode() for k, v in ws.scope["headers"]}
        if not path.endswith("GenerativeService.BidiGenerateContent"):
            await ws.close(code=1008, reason=f"no route {path}")
            return
        conn = LiveConnection(
            path=path, headers=headers, outbox=asyncio.Queue(), gone=asyncio.Event()
        )
        with self._lock:
            self.live.append(conn)
        await ws.accept()
        try:
            first = json.loads(await ws.receive_text())
        except (WebSocketDisconnect, json.JSONDecodeError):
            conn.closed_by = "client"
            return
        conn.setup = get(first, "setup") or {}
        if self.api_key is not None and headers.get("x-goog-api-key") != self.api_key:
            conn.closed_by = "refused"
            await ws.close(code=1008, reason=KEY_INVALID_MESSAGE)
            return
        resumption = get(conn.setup, "sessionResumption", "session_resumption")
        handle = get(resumption, "handle") if resumption is not None else None
        if handle:
            if handle not in self._handles:
                conn.closed_by = "refused"
                await ws.close(code=1008, reason="Invalid session resumption handle.")
                return
            conn.resumed_from = handle
        await ws.send_text(json.dumps({"setupComplete": {}}))
        reader = asyncio.ensure_future(self._live_reader(ws, conn))
        try:
            await self._live_writer(ws, conn)
        except _Drop:
            conn.closed_by = "server"
            transport = getattr(getattr(ws._send, "__self__", None), "transport", None)
            if transport is not None:
                transport.abort()  # no close frame: the client sees a dead socket (1006)
            else:
                await ws.close(code=1011, reason="fake Gemini: connection dropped")
        except Exception:  # the client left while we were sending
            conn.closed_by = conn.closed_by or "client"
        finally:
            reader.cancel()

    async def _live_reader(self, ws: WebSocket, conn: LiveConnection) -> None:
        assert conn.outbox is not None
        try:
            while True:
                message = json.loads(await ws.receive_text())
                conn.messages.append(message)
                ri = get(message, "realtimeInput", "realtime_input")
                cc = get(message, "clientContent", "client_content")
                if ri is not None and get(ri, "activityEnd", "activity_end") is not None:
                    await conn.outbox.put(("activity_end", message))
                elif cc is not None and get(cc, "turnComplete", "turn_complete"):
                    await conn.outbox.put(("client_content", message))
                elif get(message, "toolResponse", "tool_response") is not None:
                    await conn.outbox.put(("tool_response", message))
        except Exception:
            conn.closed_by = conn.closed_by or "client"
            assert conn.gone is not None
            conn.gone.set()
            await conn.outbox.put(("closed", {}))

    async def _live_writer(self, ws: WebSocket, conn: LiveConnection) -> None:
        assert conn.outbox is not None
        while True:
            trigger, message = await conn.outbox.get()
            if trigger == "closed":
                return
            if trigger == "push":
                await ws.send_text(json.dumps(message))
                continue
            reply = self._next_live(conn, trigger, message)
            if trigger == "activity_end" and _wants(conn.setup, "inputAudioTranscription"):
                text = (
                    reply.input_transcript
                    if reply.input_transcript is not None
                    else (self.transcript)
                )
                await _send(ws, {"serverContent": {"inputTranscription": {"text": text}}})
            if reply.delay_s:
                await asyncio.sleep(reply.delay_s)
            for i in range(len(reply.events) + 1):  # faults may also strike after the last
                if reply.drop_after is not None and i >= reply.drop_after:
                    raise _Drop
                if reply.stall_after is not None and i >= reply.stall_after:
                    assert conn.gone is not None
                    await conn.gone.wait()  # silent until the client leaves
                    return
                if i == len(reply.events):
                    break
                event = reply.events[i]
                if i and reply.interval_s:
                    await asyncio.sleep(reply.interval_s)
                for out in self._render(conn, event):
                    await _send(ws, out)
                if self.tool_call_turn_complete and "toolCall" in _keys(event):
                    await _send(ws, turn_complete())
                if _is_turn_complete(event) and _wants(conn.setup, "sessionResumption"):
                    await _send(ws, self._new_handle(conn))

    def _next_live(self, conn: LiveConnection, trigger: str, message: dict[str, Any]) -> LiveReply:
        try:
            return self._live.popleft()
        except IndexError:
            pass
        if self.live_responder is not None:
            return self.live_responder(conn, trigger, message)
        return live_reply(say("OK."))

    def _render(self, conn: LiveConnection, event: Say | dict[str, Any]) -> list[dict[str, Any]]:
        if not isinstance(event, Say):
            return [event]
        if conn.response_modality == "AUDIO":
            audio = base64.b64encode(b"\0\0" * 240).decode()
            return [
                {
                    "serverContent": {
                        "modelTurn": {
                            "parts": [
                                {"inlineData": {"mimeType": "audio/pcm;rate=24000", "data": audio}}
                            ]
                        },
                        "outputTranscription": {"text": event.text},
                    }
                }
            ]
        return [{"serverContent": {"modelTurn": {"parts": [{"text": event.text}]}}}]

    def _new_handle(self, conn: LiveConnection) -> dict[str, Any]:
        with self._lock:
            self._handle_seq += 1
            handle = f"handle-{self._handle_seq}"
            self._handles.add(handle)
        conn.handles.append(handle)
        return {"sessionResumptionUpdate": {"newHandle": handle, "resumable": True}}


class _Drop(Exception):
    """Cut the Live connection now."""


def _keys(event: Say | dict[str, Any]) -> set[str]:
    return set(event) if isinstance(event, dict) else set()


def _is_turn_complete(event: Say | dict[str, Any]) -> bool:
    return isinstance(event, dict) and bool(get(get(event, "serverContent"), "turnComplete"))


def _wants(setup: dict[str, Any], key: str) -> bool:
    return get(setup, key, _snake(key)) is not None


async def _send(ws: WebSocket, message: dict[str, Any]) -> None:
    await ws.send_text(json.dumps(message))


async def _send_json(send: Any, status: int, payload: dict[str, Any]) -> None:
    body = json.dumps(payload).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": body, "more_body": False})


def _response(parts: list[dict[str, Any]], usage: dict[str, Any], *, last: bool) -> dict[str, Any]:
    candidate: dict[str, Any] = {"content": {"role": "model", "parts": parts}, "index": 0}
    out: dict[str, Any] = {"candidates": [candidate]}
    if last:
        candidate["finishReason"] = "STOP"
        out["usageMetadata"] = usage
    return out


# --- a model that holds an interview -------------------------------------------------------------


class InterviewerModel:
    """A stateless stand-in for the model in whole-interview tests: greets (or acknowledges),
    calls ``next_question``, asks what it returns, and closes with ``end_interview``. Works
    for chat (``fake.responder = model.chat``) and Live (``fake.live_responder = model.live``).
    """

    def __init__(
        self,
        ack: str = "Thank you.",
        closing: str = "That was my last question. Thank you for your time. Goodbye.",
    ) -> None:
        self.ack = ack
        self.closing = closing

    def chat(self, rec: Recorded) -> Reply:
        contents = rec.contents
        last = contents[-1] if contents else {}
        responses = [get(p, "functionResponse", "function_response") for p in last.get("parts", [])]
        responses = [r for r in responses if r]
        if responses:
            name, result = responses[-1].get("name"), responses[-1].get("response") or {}
            return Reply(parts=self._after_tool(name, result, chat=True))
        users = [c for c in contents if c.get("role") == "user"]
        hello = "Hello, welcome to your interview." if len(users) <= 1 else self.ack
        return call_reply("next_question", {"reason": "next"}, text=(hello,))

    def live(self, conn: LiveConnection, trigger: str, message: dict[str, Any]) -> LiveReply:
        if trigger == "tool_response":
            tr = get(message, "toolResponse", "tool_response") or {}
            fr = (get(tr, "functionResponses", "function_responses") or [{}])[-1]
            events = self._after_tool(fr.get("name"), fr.get("response") or {}, chat=False)
            return LiveReply(events=events)
        turns = sum(1 for m in conn.messages if _starts_turn(m))
        hello = (
            "Hello, welcome to your interview."
            if turns <= 1 and not conn.resumed_from
            else (self.ack)
        )
        return live_reply(
            say(hello), live_call("next_question", {"reason": "next"}), complete=False
        )

    def _after_tool(self, name: Any, result: dict[str, Any], *, chat: bool) -> list[Any]:
        if name == "next_question" and result.get("status") == "ok":
            text = " " + str(result.get("question"))
            return [{"text": text}] if chat else [Say(text), turn_complete()]
        if name == "next_question":
            if chat:
                return [{"text": " " + self.closing}, function_call("end_interview")]
            return [Say(" " + self.closing), live_call("end_interview")]
        return [{"text": ""}] if chat else [turn_complete()]


def _starts_turn(message: dict[str, Any]) -> bool:
    ri = get(message, "realtimeInput", "realtime_input")
    cc = get(message, "clientContent", "client_content")
    return (ri is not None and get(ri, "activityEnd", "activity_end") is not None) or bool(
        cc is not None and get(cc, "turnComplete", "turn_complete")
    )
