"""Logging: Cloud Logging JSON fields, readable development lines, levels, trace, redaction."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from datetime import datetime

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from interview.config import Settings
from interview.logs import (
    REDACTED,
    REDACTOR,
    CloudJsonFormatter,
    Redactor,
    TraceContext,
    bind_call_id,
    parse_trace_header,
    setup_logging,
    trace_context,
)

GEMINI_KEY = "AIzaSy-gemini-secret-0001"
API_KEY = "api-secret-key-0002"
ELEVEN_KEY = "sk_eleven_secret_0003"


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    levels = {n: logging.getLogger(n).level for n in ("aiortc", "aioice", "httpx")}
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    for name, lvl in levels.items():
        logging.getLogger(name).setLevel(lvl)


def production(**kw: object) -> Settings:
    values: dict[str, object] = {
        "environment": "production",
        "gemini_api_key": GEMINI_KEY,
        "api_secret_key": API_KEY,
        "elevenlabs_api_key": ELEVEN_KEY,
        "nextjs_webhook_url": "https://app.example.com",
        "google_cloud_project": "synchire-prod",
    }
    values.update(kw)
    return Settings(**values)


def lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_json_lines_have_the_cloud_logging_fields() -> None:
    out = io.StringIO()
    setup_logging(production(), out)
    log = logging.getLogger("synchire.test")
    token = trace_context.set(parse_trace_header("4bf92f3577b34da6a3ce929d0e0e4736/42;o=1"))
    try:
        log.warning("turn %d answered", 3, extra={"callId": "call-7", "turnId": 3})
    finally:
        trace_context.reset(token)
    (line,) = lines(out)
    assert line["severity"] == "WARNING"
    assert line["message"] == "turn 3 answered"
    assert line["callId"] == "call-7"
    assert line["logger"] == "synchire.test"
    assert line["turnId"] == 3
    assert isinstance(line["time"], str) and line["time"].endswith("Z")
    datetime.fromisoformat(line["time"].replace("Z", "+00:00"))
    assert (
        line["logging.googleapis.com/trace"]
        == "projects/synchire-prod/traces/4bf92f3577b34da6a3ce929d0e0e4736"
    )
    assert line["logging.googleapis.com/spanId"] == f"{42:016x}"
    assert line["logging.googleapis.com/trace_sampled"] is True
    assert line["logging.googleapis.com/sourceLocation"]["function"] == (  # type: ignore[index]
        "test_json_lines_have_the_cloud_logging_fields"
    )


def test_no_trace_field_without_a_project_or_a_request() -> None:
    out = io.StringIO()
    setup_logging(production(google_cloud_project=None), out)
    token = trace_context.set(TraceContext("abc123"))
    try:
        logging.getLogger("t").info("inside a request")
    finally:
        trace_context.reset(token)
    logging.getLogger("t").info("outside")
    assert all("logging.googleapis.com/trace" not in line for line in lines(out))


def test_call_id_from_the_bound_context() -> None:
    out = io.StringIO()
    setup_logging(production(), out)
    with bind_call_id("call-9"):
        logging.getLogger("t").info("in the interview")
        logging.getLogger("t").info("explicit", extra={"callId": "call-10"})  # no clash
    logging.getLogger("t").info("outside")
    first, explicit, outside = lines(out)
    assert first["callId"] == "call-9"
    assert explicit["callId"] == "call-10"
    assert "callId" not in outside


def test_exceptions_go_to_stack_trace() -> None:
    out = io.StringIO()
    setup_logging(production(), out)
    try:
        raise ValueError("bad thing")
    except ValueError:
        logging.getLogger("t").exception("failed")
    (line,) = lines(out)
    assert line["severity"] == "ERROR"
    assert "ValueError: bad thing" in str(line["stack_trace"])


def test_development_lines_are_readable() -> None:
    out = io.StringIO()
    setup_logging(Settings(), out)
    logging.getLogger("synchire.x").info("hello %s", "there", extra={"callId": "c-1", "n": 2})
    text = out.getvalue().strip()
    assert not text.startswith("{")
    assert "INFO" in text and "synchire.x" in text
    assert "[c-1] hello there n=2" in text


def test_levels_apply(caplog: pytest.LogCaptureFixture) -> None:
    out = io.StringIO()
    setup_logging(Settings(log_level="WARNING", log_level_webrtc="DEBUG"), out)
    assert logging.getLogger().level == logging.WARNING
    assert logging.getLogger("aiortc").level == logging.DEBUG
    assert logging.getLogger("aioice").level == logging.DEBUG
    logging.getLogger("synchire.a").info("hidden")
    logging.getLogger("synchire.a").warning("shown")
    assert "hidden" not in out.getvalue() and "shown" in out.getvalue()


def test_setup_is_idempotent_and_leaves_other_handlers() -> None:
    other = logging.NullHandler()
    logging.getLogger().addHandler(other)
    first, second = io.StringIO(), io.StringIO()
    setup_logging(Settings(), first)
    setup_logging(Settings(), second)
    logging.getLogger("t").warning("once")
    assert first.getvalue() == "" and "once" in second.getvalue()
    assert other in logging.getLogger().handlers
    assert sum(1 for h in logging.getLogger().handlers if getattr(h, "_synchire", False)) == 1


def test_uvicorn_lines_use_our_format() -> None:
    uv = logging.getLogger("uvicorn.error")
    uv.addHandler(logging.NullHandler())
    uv.propagate = False
    out = io.StringIO()
    setup_logging(production(), out)
    uv.info("Started server process", extra={"color_message": "\x1b[32mStarted\x1b[0m"})
    (line,) = lines(out)
    assert line["message"] == "Started server process" and "color_message" not in line


# --- redaction -------------------------------------------------------------------------------


def test_no_secret_in_any_captured_line(caplog: pytest.LogCaptureFixture) -> None:
    out = io.StringIO()
    setup_logging(production(), out)
    caplog.set_level(logging.DEBUG)
    log = logging.getLogger("synchire.leaky")
    log.info("calling gemini with %s", GEMINI_KEY)
    log.info("headers", extra={"headers": {"xi-api-key": ELEVEN_KEY, "x-api-key": API_KEY}})
    log.info({"event": "dict message", "key": GEMINI_KEY})
    log.warning("GET https://generativelanguage.example/v1/models?key=%s&alt=sse", "zz-other-1")
    log.warning("Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.e30.sig-value")
    try:
        raise RuntimeError(f"provider said no to {API_KEY}")
    except RuntimeError:
        log.exception("request failed")
    captured = out.getvalue() + caplog.text + "".join(str(r.__dict__) for r in caplog.records)
    for secret in (GEMINI_KEY, API_KEY, ELEVEN_KEY, "zz-other-1", "sig-value"):
        assert secret not in captured, secret
    assert captured.count(REDACTED) >= 7
    failed = [r for r in caplog.records if r.getMessage() == "request failed"]
    assert failed and "RuntimeError: provider said no to [REDACTED]" in str(failed[0].exc_text)


def test_exception_without_a_secret_keeps_its_exc_info(caplog: pytest.LogCaptureFixture) -> None:
    setup_logging(production(), io.StringIO())
    caplog.set_level(logging.INFO)
    try:
        raise KeyError("plain")
    except KeyError:
        logging.getLogger("t").exception("lookup")
    assert caplog.records[-1].exc_info is not None


def test_ordinary_words_are_left_alone() -> None:
    r = Redactor(["s3cret-value"])
    text = "Missing X-API-Key header; missing API_SECRET_KEY, GEMINI_API_KEY; tokens=42"
    assert r.scrub(text) == text
    assert r.scrub("xi-api-key: abc123") == f"xi-api-key: {REDACTED}"
    assert r.scrub("{'x-goog-api-key': 'abc123'}") == f"{{'x-goog-api-key': '{REDACTED}'}}"
    assert r.scrub("short ab") == "short ab"


def test_short_secrets_are_not_scrubbed() -> None:
    # a one-letter "secret" would scrub every "a" from the logs
    assert Redactor(["a", "abc"]).scrub("a cab") == "a cab"


API_KEY_CHARS = st.text(
    alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-", min_size=8
)


@given(secret=API_KEY_CHARS, before=st.text(max_size=40), after=st.text(max_size=40))
def test_a_configured_secret_never_survives(secret: str, before: str, after: str) -> None:
    assume(secret not in f"[{REDACTED}]")
    r = Redactor([secret])
    assert secret not in r.scrub(before + secret + after + secret)


@given(token=API_KEY_CHARS, text=st.text(max_size=40))
def test_bearer_tokens_never_survive(token: str, text: str) -> None:
    assume(token not in f"Bearer [{REDACTED}]" + text)
    assert token not in Redactor().scrub(f"{text} Authorization: Bearer {token}")


# --- trace header ----------------------------------------------------------------------------


def test_trace_headers() -> None:
    assert parse_trace_header("105445aa7843bc8bf206b12000100000/1;o=1") == TraceContext(
        "105445aa7843bc8bf206b12000100000", "0000000000000001", True
    )
    assert parse_trace_header("105445aa7843bc8bf206b12000100000") == TraceContext(
        "105445aa7843bc8bf206b12000100000", None, False
    )
    w3c = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    assert parse_trace_header(None, w3c) == TraceContext(
        "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7", True
    )
    assert parse_trace_header("not a trace\n{injected}") is None
    assert parse_trace_header("", "garbage") is None


def test_json_formatter_alone() -> None:
    record = logging.LogRecord("n", logging.INFO, __file__, 1, "m %s", ("x",), None)
    record._synchire_trace = TraceContext("abc", "def", False)
    line = json.loads(CloudJsonFormatter("p").format(record))
    assert line["message"] == "m x"
    assert line["logging.googleapis.com/trace"] == "projects/p/traces/abc"
    assert not any(key.startswith("_") for key in line)


def test_redactor_keeps_what_it_learned() -> None:
    setup_logging(production(), io.StringIO())
    assert REDACTOR.scrub(f"x {GEMINI_KEY} y") == f"x {REDACTED} y"
