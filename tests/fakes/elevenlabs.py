"""A local ElevenLabs: the HTTP ``/stream`` endpoint and the multi-context websocket.

A real server (Starlette under uvicorn, in its own thread and event loop, on 127.0.0.1 at an
ephemeral port; plain http/ws) that speaks the wire protocol of PROVIDERS.md closely enough for
the official SDK and our websocket client, records everything it gets and injects faults::

    with FakeElevenLabs(first_byte_delay_s=0.05, ws_faults=[WsFault(drop_after_audio=3)]) as el:
        options = ElevenLabsOptions(api_key=el.api_key, base_url=el.url)
        ...
    el.connections[0].messages     # every client message on the first socket, in order
    el.connections[0].closed_contexts, el.http_requests, ...

Audio is a tone whose length is proportional to the text (``ms_per_char``), at the rate of
``output_format=pcm_<rate>``. On the websocket each audio message covers ``chars_per_chunk``
characters (cut anywhere, even inside a word, as the real service does) and carries their
``alignment``/``normalizedAlignment``. Generation follows the real buffering: text waits in the
context's buffer until a ``flush`` or until ``chunk_length_schedule`` characters have arrived
(120 by default); ``close_context`` drops unflushed text but lets flushed text finish (audio a
client must then drop), and ends with ``isFinal``.

Faults: ``first_byte_delay_s`` (before each generation's first audio, both endpoints),
``ws_faults`` (one per successive connection: refuse the handshake with a status, or drop the
socket after some audio messages), ``http_faults`` (statuses for successive ``/stream``
requests), a wrong key (401 on HTTP; on the websocket an error message and close 1008, or a
401 handshake with ``bad_key_http``), and the server's own limits (inactivity timeout from the
query, at most ``max_contexts`` contexts per socket).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import math
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import numpy as np
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

DEFAULT_SCHEDULE = (120, 160, 250, 290)


# --- a small ASGI server in a thread (shared with the LiveAvatar fake) ------------------------


class AsgiServerThread:
    """Runs an ASGI app under uvicorn in a daemon thread; ``url`` is ``http://127.0.0.1:port``."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.url = ""
        self.loop: asyncio.AbstractEventLoop | None = None
        self.active = 0  # websocket handlers running
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        config = uvicorn.Config(
            self.app,
            lifespan="off",
            log_level="warning",
            ws="websockets-sansio",
            ws_ping_interval=None,
            timeout_graceful_shutdown=1,
        )
        server = self._server = uvicorn.Server(config)
        started = threading.Event()

        def serve() -> None:
            async def main() -> None:
                self.loop = asyncio.get_running_loop()
                task = asyncio.create_task(server.serve(sockets=[sock]))
                while not server.started and not task.done():  # noqa: ASYNC110 (uvicorn has no event)
                    await asyncio.sleep(0.005)
                started.set()
                await task

            asyncio.run(main())

        self._thread = threading.Thread(target=serve, name="fake-server", daemon=True)
        self._thread.start()
        if not started.wait(10):
            raise RuntimeError("the fake server did not start")

    def stop(self) -> None:
        """Stop after the handlers in flight have finished (so their records are complete)."""
        deadline = time.monotonic() + 5
        while self.active and time.monotonic() < deadline:
            time.sleep(0.005)
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=5)


async def wait_for(predicate: Callable[[], bool], limit_s: float = 10.0) -> None:
    """Wait until ``predicate()`` holds (it reads another thread's records, so it polls);
    ``limit_s`` is a hang guard, not a timing assertion."""
    with anyio.fail_after(limit_s):
        while not predicate():  # noqa: ASYNC110
            await anyio.sleep(0.005)


async def receive_text(ws: WebSocket) -> str | None:
    """The next text message, or None once the client has gone. Reads the ASGI messages
    directly: Starlette's ``receive_text`` refuses to read once one of our own sends has
    failed, and would lose what the client sent just before closing."""
    while True:
        message = await ws.receive()
        if message["type"] == "websocket.disconnect":
            return None
        if message.get("text") is not None:
            return str(message["text"])
        if message.get("bytes") is not None:
            return bytes(message["bytes"]).decode("utf-8", "replace")


def pcm_tone(seconds: float, rate: int, freq: float = 220.0) -> bytes:
    n = round(seconds * rate)
    t = np.arange(n) / rate
    return (np.sin(2 * np.pi * freq * t) * 8000).astype("<i2").tobytes()


# --- records and faults ------------------------------------------------------------------------


@dataclass(frozen=True)
class WsFault:
    """What to do to one websocket connection (faults apply to successive connections)."""

    refuse: int | None = None  # answer the handshake with this HTTP status
    drop_after_audio: int | None = None  # close (1011) after sending this many audio messages


@dataclass
class ContextRecord:
    """One context as the fake saw it."""

    id: str
    texts: list[str] = field(default_factory=list)  # text of every text message, in order
    generated: list[str] = field(default_factory=list)  # text of every generation, in order
    keepalives: int = 0
    flushes: int = 0
    closed: bool = False
    audio_sent: int = 0
    audio_after_close: int = 0  # audio messages sent after close_context arrived
    final_sent: bool = False
    holds: list[float] = field(default_factory=list)  # s from a generation's trigger to its audio


@dataclass
class Connection:
    """One websocket connection as the fake saw it."""

    path: str
    query: dict[str, str]
    headers: dict[str, str]
    key_ok: bool
    messages: list[dict[str, Any]] = field(default_factory=list)
    contexts: dict[str, ContextRecord] = field(default_factory=dict)
    audio_sent: int = 0
    closed_by: str = ""  # "client", "fault", "inactivity", "limit", "auth", "refused"
    close_code: int | None = None

    @property
    def closed_contexts(self) -> list[str]:
        return [c.id for c in self.contexts.values() if c.closed]

    def sent_text(self, cid: str) -> str:
        return "".join(self.contexts[cid].texts)


@dataclass
class HttpRequest:
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    json: Any
    status: int
    hold_s: float | None = None  # from the request's arrival to its first audio byte


# --- the fake ----------------------------------------------------------------------------------


@dataclass
class FakeElevenLabs:
    """The fake service; use as a context manager (``url`` is the base URL to configure)."""

    api_key: str = "fake-eleven-key"
    first_byte_delay_s: float = 0.0
    chunk_delay_s: float = 0.0
    ms_per_char: float = 40.0
    chars_per_chunk: int = 7
    alignment: bool = True
    ws_faults: list[WsFault] = field(default_factory=list)
    http_faults: list[int] = field(default_factory=list)
    bad_key_http: bool = False
    max_contexts: int = 5

    connections: list[Connection] = field(default_factory=list, init=False)
    http_requests: list[HttpRequest] = field(default_factory=list, init=False)
    url: str = field(default="", init=False)

    def __post_init__(self) -> None:
        self._droppers: list[Callable[[], None]] = []
        self._server = AsgiServerThread(
            Starlette(
                routes=[
                    Route("/v1/text-to-speech/{voice_id}/stream", self._stream, methods=["POST"]),
                    WebSocketRoute("/v1/text-to-speech/{voice_id}/multi-stream-input", self._multi),
                    Route("/_fake/holds", self._holds, methods=["GET"]),
                ]
            )
        )

    def __enter__(self) -> FakeElevenLabs:
        self._server.start()
        self.url = self._server.url
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._server.stop()

    def env(self) -> dict[str, str]:
        """The environment that points the service at this fake."""
        return {"ELEVENLABS_API_KEY": self.api_key, "ELEVENLABS_BASE_URL": self.url}

    def drop_all(self) -> None:
        """Fault injected from outside: close every open socket now (1011)."""
        loop = self._server.loop
        for drop in list(self._droppers):
            if loop is not None:
                loop.call_soon_threadsafe(drop)

    def first_holds(self) -> dict[str, list[float]]:
        """The provider's own wait before each reply's first audio, in seconds, in order: the
        first generation of each context (websocket), each request without ``previous_text``
        (HTTP: a reply's first phrase)."""
        ws = [c.holds[0] for conn in self.connections for c in conn.contexts.values() if c.holds]
        http = [
            r.hold_s
            for r in self.http_requests
            if r.hold_s is not None and not r.json.get("previous_text")  # a reply's first
        ]
        return {"websocket": ws, "http": http}

    async def _holds(self, request: Request) -> Response:
        return JSONResponse(self.first_holds())

    # -- audio

    def _rate(self, output_format: str | None) -> int | None:
        if not output_format:
            return 44100  # the service's default is mp3_44100_128; we only fake pcm
        if output_format.startswith("pcm_") and output_format[4:].isdigit():
            return int(output_format[4:])
        return None

    def _audio(self, text: str, rate: int) -> bytes:
        return pcm_tone(len(text) * self.ms_per_char / 1000, rate)

    # -- HTTP /stream

    async def _stream(self, request: Request) -> Response:
        arrived = time.monotonic()
        headers = {k.lower(): v for k, v in request.headers.items()}
        try:
            body = await request.json()
        except ValueError:
            body = None
        query = dict(request.query_params)
        status = 200
        if headers.get("xi-api-key") != self.api_key:
            status = 401
        elif self.http_faults:
            status = self.http_faults.pop(0)
        rate = self._rate(query.get("output_format"))
        if status == 200 and (rate is None or not isinstance(body, dict) or not body.get("text")):
            status = 422
        record = HttpRequest(request.url.path, query, headers, body, status)
        self.http_requests.append(record)
        if status == 401:
            detail = {"status": "invalid_api_key", "message": "Invalid API key"}
            return JSONResponse({"detail": detail}, status_code=401)
        if status != 200:
            return JSONResponse({"detail": {"status": "fake_error", "message": "fault"}}, status)
        assert rate is not None and isinstance(body, dict)
        pcm = self._audio(body["text"], rate)
        step = max(2, round(rate * 0.1) * 2)  # 100 ms per chunk

        async def chunks() -> Any:
            await asyncio.sleep(self.first_byte_delay_s)
            for i in range(0, len(pcm), step):
                if i == 0:
                    record.hold_s = time.monotonic() - arrived
                yield pcm[i : i + step]
                if self.chunk_delay_s:
                    await asyncio.sleep(self.chunk_delay_s)

        return StreamingResponse(chunks(), media_type="application/octet-stream")

    # -- websocket

    async def _multi(self, ws: WebSocket) -> None:
        self._server.active += 1
        try:
            await self._multi_session(ws)
        finally:
            self._server.active -= 1

    async def _multi_session(self, ws: WebSocket) -> None:
        headers = {k.lower(): v for k, v in ws.headers.items()}
        query = dict(ws.query_params)
        conn = Connection(ws.url.path, query, headers, headers.get("xi-api-key") == self.api_key)
        self.connections.append(conn)
        fault = self.ws_faults.pop(0) if self.ws_faults else WsFault()
        if fault.refuse is not None:
            conn.closed_by = "refused"
            await ws.send_denial_response(Response(status_code=fault.refuse))
            return
        if not conn.key_ok:
            conn.closed_by = "auth"
            if self.bad_key_http:
                await ws.send_denial_response(Response(status_code=401))
                return
            await ws.accept()
            await ws.send_json({"message": "Invalid API key", "error": "invalid_api_key"})
            await ws.close(1008, "invalid_api_key: Invalid API key")
            return
        rate = self._rate(query.get("output_format"))
        if rate is None:
            await ws.send_denial_response(Response(status_code=422))
            return
        await ws.accept()
        await _Session(self, ws, conn, fault, rate).run()


class _Session:
    """One websocket connection: the receive loop and one generator per context."""

    def __init__(
        self, fake: FakeElevenLabs, ws: WebSocket, conn: Connection, fault: WsFault, rate: int
    ) -> None:
        self.fake, self.ws, self.conn, self.fault, self.rate = fake, ws, conn, fault, rate
        self.lock = asyncio.Lock()
        self.jobs: dict[str, asyncio.Queue[tuple[str, float] | None]] = {}
        self.buffers: dict[str, str] = {}
        self.schedules: dict[str, list[int]] = {}
        self.open_contexts: set[str] = set()
        self.closed = False
        self.timeout = float(conn.query.get("inactivity_timeout", 20))

    async def run(self) -> None:
        async with anyio.create_task_group() as tg:
            self.tg = tg
            self.fake._droppers.append(self._drop_now)
            try:
                await self._receive()
            finally:
                self.fake._droppers.remove(self._drop_now)
                tg.cancel_scope.cancel()

    def _drop_now(self) -> None:
        self.tg.start_soon(self._close, 1011, "fake: dropped", "fault")

    async def _close(self, code: int, reason: str, by: str) -> None:
        if self.closed:
            return
        self.closed = True
        self.conn.closed_by, self.conn.close_code = by, code
        with contextlib.suppress(Exception):
            await self.ws.close(code, reason)
        self.tg.cancel_scope.cancel()

    async def _receive(self) -> None:
        while not self.closed:
            text: str | None = None
            with anyio.move_on_after(self.timeout) as idle:
                try:
                    text = await receive_text(self.ws)
                except (WebSocketDisconnect, RuntimeError):
                    text = None
                if text is None:
                    if not self.closed:
                        self.conn.closed_by = "client"
                    self.closed = True
                    return
            if idle.cancelled_caught:
                reason = f"Inactivity timeout: no input within {self.timeout:g} seconds"
                await self._close(1008, reason, "inactivity")
                return
            if text is None:
                continue
            try:
                msg = json.loads(text)
            except ValueError:
                continue
            self.conn.messages.append(msg)
            await self._handle(msg)

    async def _handle(self, msg: dict[str, Any]) -> None:
        if msg.get("close_socket"):
            for cid in list(self.open_contexts):
                self._end_context(cid, flush=True)
            return
        cid = str(msg.get("context_id") or "default")
        record = self.conn.contexts.get(cid)
        if record is None or (record.closed and cid not in self.open_contexts):
            if msg.get("close_context"):
                return
            if len(self.open_contexts) >= self.fake.max_contexts:
                await self._send(
                    {
                        "message": "Maximum simultaneous contexts exceeded (5).",
                        "error": "max_active_conversations",
                    }
                )
                await self._close(1008, "max_active_conversations", "limit")
                return
            record = self.conn.contexts[cid] = ContextRecord(cid)
            self.open_contexts.add(cid)
            self.buffers[cid] = ""
            schedule = (msg.get("generation_config") or {}).get("chunk_length_schedule")
            self.schedules[cid] = list(schedule or DEFAULT_SCHEDULE)
            queue: asyncio.Queue[tuple[str, float] | None] = asyncio.Queue()
            self.jobs[cid] = queue
            self.tg.start_soon(self._generate, cid, queue)
            if isinstance(msg.get("text"), str) and not msg["text"].strip():
                return  # the initializing " " only opens the context
        if msg.get("close_context"):
            self._end_context(cid, flush=False)
            return
        text = msg.get("text")
        if text == "" and not msg.get("flush"):
            record.keepalives += 1
            return
        if isinstance(text, str) and text:
            record.texts.append(text)
            self.buffers[cid] += text
        if msg.get("flush"):
            record.flushes += 1
            self._flush(cid)
        elif len(self.buffers[cid].strip()) >= self.schedules[cid][0]:
            if len(self.schedules[cid]) > 1:
                self.schedules[cid].pop(0)
            self._flush(cid)

    def _flush(self, cid: str) -> None:
        text, self.buffers[cid] = self.buffers[cid], ""
        if text.strip():
            self.jobs[cid].put_nowait((text, time.monotonic()))

    def _end_context(self, cid: str, flush: bool) -> None:
        record = self.conn.contexts[cid]
        if record.closed:
            return
        record.closed = True
        if flush:
            self._flush(cid)
        self.buffers[cid] = ""  # unflushed text is dropped
        self.jobs[cid].put_nowait(None)

    async def _generate(self, cid: str, queue: asyncio.Queue[tuple[str, float] | None]) -> None:
        record = self.conn.contexts[cid]
        fake, rate = self.fake, self.rate
        per_char = round(fake.ms_per_char * rate / 1000) * 2  # bytes of audio per character
        while True:
            job = await queue.get()
            if job is None:
                break
            text, queued_at = job
            record.generated.append(text)
            if fake.first_byte_delay_s:
                await asyncio.sleep(fake.first_byte_delay_s)
            pcm = fake._audio(text, rate)
            n = fake.chars_per_chunk
            for i in range(0, len(text), n):
                piece = text[i : i + n]
                msg: dict[str, Any] = {
                    "audio": base64.b64encode(pcm[i * per_char : (i + n) * per_char]).decode(),
                    "isFinal": None,
                    "contextId": cid,
                }
                if fake.alignment:
                    times = [round(k * fake.ms_per_char) for k in range(len(piece))]
                    align = {
                        "chars": list(piece),
                        "charStartTimesMs": times,
                        "charDurationsMs": [math.ceil(fake.ms_per_char)] * len(piece),
                    }
                    msg["alignment"] = align
                    msg["normalizedAlignment"] = dict(align)
                if i == 0:
                    record.holds.append(time.monotonic() - queued_at)
                await self._send(msg)
                record.audio_sent += 1
                self.conn.audio_sent += 1
                if record.closed:
                    record.audio_after_close += 1
                drop = self.fault.drop_after_audio
                if drop is not None and self.conn.audio_sent >= drop:
                    await self._close(1011, "fake: connection dropped", "fault")
                    return
                if fake.chunk_delay_s:
                    await asyncio.sleep(fake.chunk_delay_s)
        await self._send({"isFinal": True, "contextId": cid})
        record.final_sent = True
        self.open_contexts.discard(cid)

    async def _send(self, msg: dict[str, Any]) -> None:
        if self.closed:
            return
        async with self.lock:
            with contextlib.suppress(Exception):
                await self.ws.send_json(msg)


def main() -> None:
    """Run the fake in its own process (benchmarks): prints its URL, serves until stdin ends."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(description="a local ElevenLabs")
    parser.add_argument("--first-byte-ms", type=float, default=0.0)
    parser.add_argument("--ms-per-char", type=float, default=40.0)
    args = parser.parse_args()
    fake = FakeElevenLabs(
        first_byte_delay_s=args.first_byte_ms / 1000, ms_per_char=args.ms_per_char
    )
    with fake:
        print(fake.url, flush=True)
        sys.stdin.read()


if __name__ == "__main__":
    main()
