"""Logging: JSON lines for Cloud Logging, readable lines in development, secrets scrubbed.

:func:`setup_logging` configures the root logger once per process (calling it again replaces
only what it installed). In production each line is one JSON object that Cloud Logging
understands: ``severity``, ``message``, ``time``, ``logger``, ``callId`` when the record has one
(from ``extra={"callId": ...}``, the call logger, or :func:`bind_call_id`), and the request's
trace (``logging.googleapis.com/trace``, ``.../spanId``) taken from ``X-Cloud-Trace-Context``
(or W3C ``traceparent``) by :class:`TraceMiddleware`, when ``GOOGLE_CLOUD_PROJECT`` is known.

Secrets never reach a handler: a record factory scrubs every record when it is created (so
every handler sees the clean record, test captures included) of each configured secret value
and of credential-looking patterns (``Bearer ...``, ``xi-api-key: ...``, ``?key=...``).
"""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TextIO

from pythonjsonlogger.json import JsonFormatter

from interview.config import MIN_SECRET_LEN, Settings

REDACTED = "[REDACTED]"

WEBRTC_LOGGERS: tuple[str, ...] = ("aiortc", "aioice")
"""Loggers ``LOG_LEVEL_WEBRTC`` applies to."""

_CHATTY_LOGGERS: tuple[str, ...] = ("httpx", "httpx2", "httpcore", "websockets", "hpack")
"""Log every request (URLs with query strings); kept at WARNING unless LOG_LEVEL is DEBUG."""

_UVICORN_LOGGERS: tuple[str, ...] = ("uvicorn", "uvicorn.error", "uvicorn.access")


# --- context ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TraceContext:
    """The Cloud Trace context of the current request."""

    trace_id: str
    span_id: str | None = None
    sampled: bool = False


trace_context: ContextVar[TraceContext | None] = ContextVar("trace_context", default=None)
call_id_context: ContextVar[str | None] = ContextVar("call_id_context", default=None)

_HEX_TRACE = re.compile(r"[0-9a-fA-F]{1,32}")
_TRACEPARENT = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")


def parse_trace_header(cloud: str | None, traceparent: str | None = None) -> TraceContext | None:
    """Parse ``X-Cloud-Trace-Context: TRACE/SPAN;o=1`` (or W3C ``traceparent``).

    Malformed values are ignored rather than logged, so a client cannot inject text into logs.
    """
    if cloud:
        head, _, options = cloud.strip().partition(";")
        trace, _, span = head.partition("/")
        if _HEX_TRACE.fullmatch(trace):
            span_hex = None
            if span.isdigit() and len(span) <= 20:
                span_hex = f"{int(span) & 0xFFFFFFFFFFFFFFFF:016x}"
            return TraceContext(trace.lower(), span_hex, options.strip() == "o=1")
    if traceparent:
        m = _TRACEPARENT.fullmatch(traceparent.strip().lower())
        if m:
            return TraceContext(m.group(1), m.group(2), int(m.group(3), 16) & 1 == 1)
    return None


class TraceMiddleware:
    """ASGI middleware: the request's trace context in :data:`trace_context` while it runs."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or ())
        ctx = parse_trace_header(
            _header(headers, b"x-cloud-trace-context"), _header(headers, b"traceparent")
        )
        token = trace_context.set(ctx)
        try:
            await self.app(scope, receive, send)
        finally:
            trace_context.reset(token)


def _header(headers: dict[bytes, bytes], name: bytes) -> str | None:
    value = headers.get(name)
    return value.decode("latin-1") if value is not None else None


@contextmanager
def bind_call_id(call_id: str) -> Iterator[None]:
    """Stamp ``callId`` on every record logged in this context (one interview's task)."""
    token = call_id_context.set(call_id)
    try:
        yield
    finally:
        call_id_context.reset(token)


# --- redaction -------------------------------------------------------------------------------

_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"(?i)\b(bearer)\s+[A-Za-z0-9._~+/=-]+"), rf"\1 {REDACTED}"),
    (
        re.compile(
            r"(?i)\b((?:x-goog-|xi-|x-)?api[-_]?key|authorization|access[-_]?token|token"
            r"|secret|password|credential|client[-_]?secret)"
            r"([\"']?\s*[:=]\s*[\"']?)(?!\[REDACTED\])([^\s\"',;&}\]]+)"
        ),
        rf"\1\2{REDACTED}",
    ),
    (
        re.compile(r"(?i)([?&](?:key|api_key|apikey|token|access_token|auth|sig)=)[^&\s\"'#]+"),
        rf"\1{REDACTED}",
    ),
)

_STANDARD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
}


class Redactor:
    """Scrubs known secret values and credential-looking patterns from text and records."""

    def __init__(self, secrets: tuple[str, ...] | list[str] = ()) -> None:
        self._lock = threading.Lock()
        self._secrets: set[str] = set()
        self._regex: re.Pattern[str] | None = None
        self.add(*secrets)

    def add(self, *secrets: str) -> None:
        """Scrub these values from now on (values shorter than 4 characters are ignored)."""
        with self._lock:
            self._secrets.update(s for s in secrets if s and len(s) >= MIN_SECRET_LEN)
            ordered = sorted(self._secrets, key=len, reverse=True)
            self._regex = re.compile("|".join(map(re.escape, ordered))) if ordered else None

    def scrub(self, text: str) -> str:
        regex = self._regex
        if regex is not None:
            text = regex.sub(REDACTED, text)
        for pattern, repl in _PATTERNS:
            text = pattern.sub(repl, text)
        return text

    def scrub_value(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.scrub(value)
        if isinstance(value, dict):
            return {k: self.scrub_value(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return type(value)(self.scrub_value(v) for v in value)
        return value

    def scrub_record(self, record: logging.LogRecord) -> None:
        """Scrub a record in place: message, extra fields, exception text, stack."""
        if isinstance(record.msg, dict):
            record.msg = self.scrub_value(record.msg)
        else:
            try:
                message = record.getMessage()
            except Exception:  # a bad format string: logging reports it at emit time
                message = None
            if message is not None:
                clean = self.scrub(message)
                if clean != message:
                    record.msg, record.args = clean, None
        for key, value in list(vars(record).items()):
            if key not in _STANDARD_ATTRS and isinstance(value, str | dict | list | tuple):
                setattr(record, key, self.scrub_value(value))
        if record.exc_info and record.exc_info[0] is not None:
            text = logging.Formatter().formatException(record.exc_info)
            clean = self.scrub(text)
            if clean != text:  # keep the traceback as clean text only
                record.exc_info, record.exc_text = None, clean
        elif record.exc_text:
            record.exc_text = self.scrub(record.exc_text)
        if record.stack_info:
            record.stack_info = self.scrub(record.stack_info)


class RedactingFilter(logging.Filter):
    """The redactor as a filter, for handlers outside :func:`setup_logging`'s reach."""

    def __init__(self, redactor: Redactor) -> None:
        super().__init__()
        self.redactor = redactor

    def filter(self, record: logging.LogRecord) -> bool:
        self.redactor.scrub_record(record)
        return True


REDACTOR = Redactor()
"""The process's redactor; :func:`setup_logging` adds the configured secrets to it."""

_factory_lock = threading.Lock()
_installed = False


def _install_record_factory() -> None:
    """Scrub and stamp every record at creation, whatever handler later sees it."""
    global _installed
    with _factory_lock:
        if _installed:
            return
        previous = logging.getLogRecordFactory()

        def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
            record = previous(*args, **kwargs)
            # Private names: ``extra`` keys may not clash with attributes set here.
            record._synchire_call_id = call_id_context.get()
            record._synchire_trace = trace_context.get()
            REDACTOR.scrub_record(record)
            return record

        logging.setLogRecordFactory(factory)
        _installed = True


# --- formatters ------------------------------------------------------------------------------

_HIDDEN_EXTRAS = frozenset({"color_message", "callId"})
"""Record attributes never copied as extra fields (``color_message`` is uvicorn's ANSI copy)."""


def _call_id(record: logging.LogRecord) -> Any:
    """``extra={"callId": ...}`` wins over the context's call id."""
    call_id = getattr(record, "callId", None)
    return call_id if call_id is not None else getattr(record, "_synchire_call_id", None)


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {
        k: v
        for k, v in vars(record).items()
        if k not in _STANDARD_ATTRS and k not in _HIDDEN_EXTRAS and not k.startswith("_")
    }


class CloudJsonFormatter(JsonFormatter):
    """One JSON object per line in the shape Cloud Logging reads from stdout/stderr."""

    def __init__(self, project: str | None = None) -> None:
        super().__init__(json_ensure_ascii=False)
        self.project = project

    def add_fields(
        self, log_data: dict[str, Any], record: logging.LogRecord, message_dict: dict[str, Any]
    ) -> None:
        log_data["severity"] = record.levelname
        log_data["message"] = record.message if not isinstance(record.msg, dict) else ""
        log_data["time"] = (
            datetime.fromtimestamp(record.created, tz=UTC).isoformat(timespec="microseconds")
        ).replace("+00:00", "Z")
        log_data["logger"] = record.name
        call_id = _call_id(record)
        if call_id is not None:
            log_data["callId"] = call_id
        trace = getattr(record, "_synchire_trace", None)
        if isinstance(trace, TraceContext) and self.project:
            log_data["logging.googleapis.com/trace"] = (
                f"projects/{self.project}/traces/{trace.trace_id}"
            )
            if trace.span_id:
                log_data["logging.googleapis.com/spanId"] = trace.span_id
            log_data["logging.googleapis.com/trace_sampled"] = trace.sampled
        log_data["logging.googleapis.com/sourceLocation"] = {
            "file": record.pathname,
            "line": record.lineno,
            "function": record.funcName,
        }
        for key, value in message_dict.items():
            if key == "exc_info":
                log_data["stack_trace"] = value
            elif key == "stack_info":
                log_data["stack_info"] = value
            else:
                log_data[key] = value
        for key, value in _extras(record).items():
            log_data.setdefault(key, value)


class DevFormatter(logging.Formatter):
    """``14:41:14.123 INFO    synchire.manager [callId] message key=value``."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s.%(msecs)03d %(levelname)-7s %(name)s %(message)s", "%H:%M:%S")

    def formatMessage(self, record: logging.LogRecord) -> str:
        message = record.message
        call_id = _call_id(record)
        if call_id is not None:
            message = f"[{call_id}] {message}"
        extras = _extras(record)
        if extras:
            message += " " + " ".join(f"{k}={_short(v)}" for k, v in extras.items())
        return self._style._fmt % {**vars(record), "message": message}


def _short(value: Any) -> str:
    if isinstance(value, str):
        return value if value and " " not in value else json.dumps(value)
    try:
        return json.dumps(value, default=str)
    except (TypeError, ValueError):
        return repr(value)


# --- setup -----------------------------------------------------------------------------------


def setup_logging(settings: Settings, stream: TextIO | None = None) -> Redactor:
    """Configure the root logger for this process; returns the redactor in use.

    JSON lines in production, readable lines in development, to ``stream`` (stderr by default:
    the batch run keeps stdout for its result). Idempotent: a second call replaces the handler
    the first one installed and leaves other handlers (a test's capture) alone.
    """
    REDACTOR.add(*settings.secret_values())
    _install_record_factory()
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(
        CloudJsonFormatter(settings.google_cloud_project)
        if settings.is_production
        else DevFormatter()
    )
    handler.addFilter(RedactingFilter(REDACTOR))
    handler._synchire = True  # type: ignore[attr-defined]
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "_synchire", False)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(settings.log_level)
    for name in WEBRTC_LOGGERS:
        logging.getLogger(name).setLevel(settings.log_level_webrtc)
    chatty = logging.DEBUG if settings.log_level == "DEBUG" else logging.WARNING
    for name in _CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(chatty)
    for name in _UVICORN_LOGGERS:  # one format for every line, whoever started uvicorn
        uv = logging.getLogger(name)
        uv.handlers.clear()
        uv.propagate = True
        uv.disabled = False  # a dictConfig (uvicorn's own log_config) may have disabled it
        uv.setLevel(logging.NOTSET)
    return REDACTOR
