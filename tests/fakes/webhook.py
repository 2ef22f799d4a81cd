"""A local stand-in for the web app's completion webhook receiver.

A real HTTP server (stdlib ``ThreadingHTTPServer`` on 127.0.0.1, ephemeral port, in a thread)
that does what a careful receiver does: verifies ``X-SyncHire-Signature`` with
:func:`interview.results.verify_signature` (401 when it fails) and deduplicates by
``Idempotency-Key``. It records every request and can inject faults from a script::

    with FakeWebhook(secret="s", script=[500, Reply(drop=True), 200]) as hook:
        service = ResultsService(dir, webhook_base_url=hook.url, secret="s")
        ...
    hook.requests   # every request, in order (headers, body, json, signature_valid, answer)
    hook.received   # accepted payloads, one per idempotency key

Script items apply to successive requests; once the script is used up every request gets the
normal treatment (verify, dedupe, 200).
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from interview.results import IDEMPOTENCY_HEADER, SIGNATURE_HEADER, WEBHOOK_PATH, verify_signature


@dataclass(frozen=True)
class Reply:
    """One scripted answer."""

    status: int = 200  # the status to answer with
    delay_s: float = 0.0  # wait this long before answering (or dropping)
    drop: bool = False  # close the connection without any answer
    accept: bool = False  # process the payload normally first (an acknowledgement then lost)


@dataclass
class RecordedRequest:
    """What the receiver saw and what it answered."""

    method: str
    path: str
    headers: dict[str, str]  # names lower-cased
    body: bytes
    json: Any
    signature_valid: bool
    answer: str = ""  # "200", "401", "500", "dropped", ...

    @property
    def idempotency_key(self) -> str | None:
        return self.headers.get(IDEMPOTENCY_HEADER.lower())


@dataclass
class FakeWebhook:
    """The receiver. Use as a context manager; ``url`` is the base to configure as
    ``NEXTJS_WEBHOOK_URL``. ``on_request`` runs in the server thread before the answer (to look
    at the sender's state while its request is in flight)."""

    secret: str
    script: list[int | Reply] = field(default_factory=list)
    on_request: Callable[[RecordedRequest], None] | None = None
    tolerance_s: float = 300.0

    requests: list[RecordedRequest] = field(default_factory=list, init=False)
    received: list[Any] = field(default_factory=list, init=False)
    url: str = field(default="", init=False)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._keys: set[str] = set()
        self._script: list[Reply] = [r if isinstance(r, Reply) else Reply(r) for r in self.script]
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> FakeWebhook:
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                hook._handle(self)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        server.handle_error = lambda request, client_address: None  # type: ignore[method-assign]
        self._server = server
        self.url = f"http://127.0.0.1:{server.server_address[1]}"
        self._thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    @property
    def keys(self) -> list[str | None]:
        """The Idempotency-Key of every request, in order."""
        return [r.idempotency_key for r in self.requests]

    def push(self, replies: Iterable[int | Reply]) -> None:
        """Add scripted answers for the next requests."""
        with self._lock:
            self._script.extend(r if isinstance(r, Reply) else Reply(r) for r in replies)

    # ---- request handling (server thread)

    def _handle(self, handler: BaseHTTPRequestHandler) -> None:
        length = int(handler.headers.get("Content-Length") or 0)
        body = handler.rfile.read(length)
        headers = {k.lower(): v for k, v in handler.headers.items()}
        try:
            parsed = json.loads(body)
        except ValueError:
            parsed = None
        signature = headers.get(SIGNATURE_HEADER.lower())
        request = RecordedRequest(
            method="POST",
            path=handler.path,
            headers=headers,
            body=body,
            json=parsed,
            signature_valid=verify_signature(self.secret, signature, body, self.tolerance_s),
        )
        with self._lock:
            self.requests.append(request)
            reply = self._script.pop(0) if self._script else None
        if self.on_request is not None:
            self.on_request(request)
        if reply is not None and reply.delay_s:
            time.sleep(reply.delay_s)
        if reply is not None and reply.drop:
            if reply.accept:
                self._accept(request)
            request.answer = "dropped"
            handler.close_connection = True
            try:
                handler.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return
        if reply is not None and reply.status != 200:
            self._answer(handler, request, reply.status, {"error": "injected fault"})
        elif handler.path != WEBHOOK_PATH:
            self._answer(handler, request, 404, {"error": "not found"})
        elif not request.signature_valid:
            self._answer(handler, request, 401, {"error": "invalid signature"})
        elif not isinstance(parsed, dict):
            self._answer(handler, request, 400, {"error": "invalid JSON"})
        else:
            duplicate = not self._accept(request)
            self._answer(handler, request, 200, {"success": True, "duplicate": duplicate})

    def _accept(self, request: RecordedRequest) -> bool:
        """Record the payload unless its key was seen; True if new."""
        key = request.idempotency_key or ""
        with self._lock:
            if key and key in self._keys:
                return False
            self._keys.add(key)
            self.received.append(request.json)
            return True

    def _answer(
        self, handler: BaseHTTPRequestHandler, request: RecordedRequest, status: int, body: Any
    ) -> None:
        data = json.dumps(body).encode()
        request.answer = str(status)
        try:
            handler.send_response(status)
            handler.send_header("Content-Type", "application/json")
            handler.send_header("Content-Length", str(len(data)))
            handler.end_headers()
            handler.wfile.write(data)
        except OSError:
            pass  # the client gave up (a timeout test)
