"""The control API: every route and status code (also under /python-api), the key check,
race-free admission, capacity, drain on shutdown, body limits, production refusal, metrics,
OpenAPI, and no secret in any log line. Interviews are fake sessions; results are a fake."""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import anyio
import httpx
import pytest
from starlette.testclient import TestClient

from interview.config import Settings, env_name
from interview.logs import setup_logging
from interview.manager import InterviewManager, ManagerOptions
from interview.plan import JoinRequest
from server import DrainingServer, create_app, openapi_document, server_config

ROOT = Path(__file__).resolve().parent.parent
KEY = "test-api-key-0123456789"
OLD_KEY = "old-api-key-9876543210"
GEMINI_KEY = "AIzaSy-test-gemini-key-42"
PREFIXES = ("", "/python-api")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for field in Settings.model_fields:
        monkeypatch.delenv(env_name(field), raising=False)


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


# --- fakes -----------------------------------------------------------------------------------


class FakeSession:
    """Runs until stopped; records how it was created and stopped."""

    created: ClassVar[list[FakeSession]] = []

    def __init__(
        self, request: JoinRequest, settings: Settings, results: Any, *, transport: Any = None
    ) -> None:
        self.request = request
        self.settings = settings
        self.call_id = request.call_id
        self.candidate_name = request.candidate_name
        self.job_title = request.job_title
        self.started_at = time.time()
        self.video_avatar_enabled = settings.video_avatar_enabled
        self.stop_reasons: list[str] = []
        self._stopped = anyio.Event()
        FakeSession.created.append(self)

    async def run(self) -> dict[str, Any]:
        logging.getLogger("synchire.session").info("interview running")
        await self._stopped.wait()
        return {"interviewId": self.call_id, "endReason": self.stop_reasons[0]}

    def stop(self, reason: str) -> None:
        self.stop_reasons.append(reason)
        self._stopped.set()

    def view(self) -> dict[str, Any]:
        return {
            "callId": self.call_id,
            "state": "ending" if self.stop_reasons else "running",
            "progress": {"questionIndex": 0, "totalQuestions": len(self.request.questions)},
            "transcript": [{"speaker": "agent", "text": "Hello", "timestamp": 0.5}],
            "latency": {"turns": 0},
            "endReason": None,
        }


class StubbornSession(FakeSession):
    """Ignores stop requests (a provider call that hangs)."""

    cancelled = False

    async def run(self) -> dict[str, Any]:
        try:
            await anyio.sleep_forever()
        except anyio.get_cancelled_exc_class():
            StubbornSession.cancelled = True
            raise
        return {}


class CrashingSession(FakeSession):
    async def run(self) -> dict[str, Any]:
        raise RuntimeError("bug in the session")


class FakeResults:
    def __init__(self) -> None:
        self.recovered = 0
        self.flushes: list[float] = []
        self.admitted: list[dict[str, Any]] = []

    async def admit(self, call_id: str, **facts: Any) -> str:
        self.admitted.append({"callId": call_id, **facts})
        return "result-id"

    async def recover(self) -> list[str]:
        self.recovered += 1
        return []

    async def flush(self, timeout_s: float) -> bool:
        self.flushes.append(timeout_s)
        return True


def settings(**kw: Any) -> Settings:
    values: dict[str, Any] = {"api_secret_key": KEY, "api_secret_key_previous": OLD_KEY}
    values.update(kw)
    return Settings(**values)


def make_app(s: Settings | None = None, factory: Any = FakeSession, **kw: Any) -> Any:
    FakeSession.created = []
    return create_app(
        s if s is not None else settings(),
        results=kw.pop("results", None) or FakeResults(),
        session_factory=factory,
        configure_logging=False,
        **kw,
    )


def body(call_id: str = "call-1", **extra: Any) -> dict[str, Any]:
    out: dict[str, Any] = {
        "callId": call_id,
        "candidateName": "Ada Lovelace",
        "jobTitle": "Engineer",
        "questions": [
            {
                "id": "q1",
                "text": "Tell me about yourself.",
                "type": "open",
                "duration": 2,
                "category": "Introduction",
            }
        ],
    }
    out.update(extra)
    return out


H = {"X-API-Key": KEY}


@pytest.fixture
def client() -> Iterator[TestClient]:
    with TestClient(make_app()) as c:
        yield c


def wait_until(predicate: Any, what: str) -> None:
    """Hang guard for background work in the app's thread (not a timing assertion)."""
    deadline = time.monotonic() + 10
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


# --- public routes and the key check ---------------------------------------------------------


@pytest.mark.parametrize("prefix", PREFIXES)
def test_health_is_public(client: TestClient, prefix: str) -> None:
    r = client.get(f"{prefix}/health")
    assert r.status_code == 200
    data = r.json()
    assert set(data) >= {
        "status",
        "service",
        "version",
        "timestamp",
        "config_valid",
        "active_interviews",
    }
    assert data["status"] == "healthy" and data["config_valid"] is True
    assert data["active_interviews"] == 0
    assert "offline stand-ins" in data["mode"]


KEYED = [
    ("GET", "/"),
    ("POST", "/join-interview"),
    ("GET", "/agents/status"),
    ("POST", "/agents/call-1/shutdown"),
    ("GET", "/interviews/call-1"),
    ("GET", "/metrics"),
]


@pytest.mark.parametrize("prefix", PREFIXES)
@pytest.mark.parametrize(("method", "path"), KEYED)
def test_key_check(client: TestClient, prefix: str, method: str, path: str) -> None:
    url = (prefix + path).rstrip("/") or "/"
    r = client.request(method, url)
    assert r.status_code == 401 and r.json() == {"detail": "Missing X-API-Key header"}
    r = client.request(method, url, headers={"X-API-Key": "wrong"})
    assert r.status_code == 403 and r.json() == {"detail": "Invalid API key"}
    r = client.request(method, url, headers=[(b"x-api-key", "ünïcödé".encode("latin-1"))])
    assert r.status_code == 403


@pytest.mark.parametrize("key", [KEY, OLD_KEY])
def test_current_and_previous_keys_are_accepted(client: TestClient, key: str) -> None:
    for prefix in PREFIXES:
        assert client.get(f"{prefix}/", headers={"X-API-Key": key}).status_code == 200


def test_root_says_what_is_in_use(client: TestClient) -> None:
    for url in ("/", "/python-api", "/python-api/"):
        data = client.get(url, headers=H).json()
        assert data["llm"] == "scripted (offline)"
        assert data["avatar"] == "none"
        assert data["config_valid"] is True and data["active_interviews"] == 0
        assert data["mode"].startswith("development (offline stand-ins: scripted interviewer")
        assert set(data) >= {"service", "version", "status", "framework", "endpoints"}
    with TestClient(
        make_app(settings(gemini_api_key=GEMINI_KEY, heygen_api_key="heygen-key-123"))
    ) as c:
        data = c.get("/", headers=H).json()
        assert data["llm"] == "gemini-3.8-flash"
        assert data["avatar"].startswith("heygen")
        assert "scripted interviewer" not in data["mode"]


def test_development_without_a_key_generates_one(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    app = create_app(Settings(), results=FakeResults())
    (key,) = app.state.settings.api_keys()
    with TestClient(app) as c:
        assert c.get("/", headers={"X-API-Key": key}).status_code == 200
        assert c.get("/").status_code == 401  # never switched off
    assert sum(key in r.getMessage() for r in caplog.records) == 1  # logged once, at startup


def test_production_without_any_key_accepts_none() -> None:
    with TestClient(make_app(Settings(environment="production"))) as c:
        assert c.get("/", headers={"X-API-Key": ""}).status_code == 401
        assert c.get("/", headers={"X-API-Key": "anything"}).status_code == 403
        assert c.get("/health").json()["config_valid"] is False


def test_metrics_accepts_a_bearer_token(client: TestClient) -> None:
    r = client.get("/metrics", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    assert client.get("/", headers={"Authorization": f"Bearer {KEY}"}).status_code == 401
    r = client.get("/metrics", headers={"Authorization": "Bearer nope"})
    assert r.status_code == 403


def test_unknown_routes_and_methods(client: TestClient) -> None:
    assert client.get("/nope").status_code == 404
    assert client.get("/nope").json() == {"detail": "Not Found"}
    assert client.get("/join-interview", headers=H).status_code == 405


# --- interviews ------------------------------------------------------------------------------


@pytest.mark.parametrize("prefix", PREFIXES)
def test_join_status_view_shutdown(client: TestClient, prefix: str) -> None:
    r = client.post(f"{prefix}/join-interview", json=body(), headers=H)
    assert r.status_code == 200
    joined = r.json()
    # the original fields, unchanged ...
    assert {k: joined[k] for k in ("success", "message", "callId", "videoAvatarEnabled")} == {
        "success": True,
        "message": "Agent will join interview shortly",
        "callId": "call-1",
        "videoAvatarEnabled": False,
    }
    # ... and what the candidate's browser needs to connect
    assert set(joined) >= {"clientToken", "clientTokenExpiresAt", "webrtcUrl", "iceServers"}
    assert joined["webrtcUrl"] == "/interviews/call-1/webrtc"
    status = client.get(f"{prefix}/agents/status", headers=H).json()
    assert status["active_count"] == 1
    (agent,) = status["agents"]
    assert agent["call_id"] == "call-1"
    assert agent["candidate_name"] == "Ada Lovelace" and agent["job_title"] == "Engineer"
    assert agent["started_at"].endswith("+00:00") and agent["duration_seconds"] >= 0
    view = client.get(f"{prefix}/interviews/call-1", headers=H).json()
    assert view["callId"] == "call-1" and view["state"] == "running"
    assert view["transcript"] == [{"speaker": "agent", "text": "Hello", "timestamp": 0.5}]
    assert client.get(f"{prefix}/health").json()["active_interviews"] == 1

    r = client.post(f"{prefix}/agents/call-1/shutdown", headers=H)
    assert r.status_code == 200 and r.json()["success"] is True
    assert FakeSession.created[0].stop_reasons == ["shutdown"]
    wait_until(lambda: client.get("/health").json()["active_interviews"] == 0, "the end")
    view = client.get(f"{prefix}/interviews/call-1", headers=H).json()
    assert view["state"] == "ended" and view["endReason"] == "shutdown"

    r = client.post(f"{prefix}/agents/call-1/shutdown", headers=H)
    assert r.status_code == 404 and r.json()["success"] is False
    r = client.get(f"{prefix}/interviews/unknown", headers=H)
    assert r.status_code == 404 and r.json() == {
        "success": False,
        "error": "No interview for callId unknown",
    }
    # an ended callId may join again
    assert client.post(f"{prefix}/join-interview", json=body(), headers=H).status_code == 200


@pytest.mark.parametrize("prefix", PREFIXES)
def test_duplicate_join_is_409(client: TestClient, prefix: str) -> None:
    assert client.post(f"{prefix}/join-interview", json=body(), headers=H).status_code == 200
    r = client.post(f"{prefix}/join-interview", json=body(), headers=H)
    assert r.status_code == 409
    assert r.json() == {
        "success": False,
        "error": "An interview is already running for callId call-1",
    }
    assert len(FakeSession.created) == 1


def test_concurrent_duplicate_joins_start_exactly_one() -> None:
    app = make_app(settings(max_interviews=100))

    async def main() -> list[int]:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
                codes: list[int] = []

                async def join(i: int) -> None:
                    prefix = PREFIXES[i % 2]
                    r = await http.post(f"{prefix}/join-interview", json=body(), headers=H)
                    codes.append(r.status_code)

                with anyio.fail_after(10):
                    async with anyio.create_task_group() as tg:
                        for i in range(40):
                            tg.start_soon(join, i)
                return codes

    codes = anyio.run(main)
    assert sorted(codes) == [200] + [409] * 39
    assert len(FakeSession.created) == 1


@pytest.mark.parametrize("prefix", PREFIXES)
def test_capacity_is_503_with_retry_after(prefix: str) -> None:
    with TestClient(make_app(settings(max_interviews=2))) as c:
        for i in range(2):
            r = c.post(f"{prefix}/join-interview", json=body(f"c{i}"), headers=H)
            assert r.status_code == 200
        r = c.post(f"{prefix}/join-interview", json=body("c2"), headers=H)
        assert r.status_code == 503
        assert int(r.headers["Retry-After"]) > 0
        assert r.json()["success"] is False and "capacity" in r.json()["error"]
        # a duplicate at capacity is still a duplicate
        assert c.post(f"{prefix}/join-interview", json=body("c0"), headers=H).status_code == 409
        c.post(f"{prefix}/agents/c0/shutdown", headers=H)
        wait_until(lambda: c.get("/health").json()["active_interviews"] == 1, "a free slot")
        assert c.post(f"{prefix}/join-interview", json=body("c2"), headers=H).status_code == 200


@pytest.mark.parametrize("prefix", PREFIXES)
@pytest.mark.parametrize(
    ("payload", "error"),
    [
        (
            body(questions=[{"id": "q1", "text": "", "type": "t", "duration": 2, "category": "c"}]),
            "questions[0].text",
        ),
        (body(callId="bad id!"), "callId"),
        (body(questions=[]), "questions"),
        ([1, 2], "body: must be a JSON object"),
        ({k: v for k, v in body().items() if k != "jobTitle"}, "jobTitle"),
    ],
)
def test_invalid_body_is_422_naming_the_field(
    client: TestClient, prefix: str, payload: Any, error: str
) -> None:
    r = client.post(f"{prefix}/join-interview", json=payload, headers=H)
    assert r.status_code == 422
    assert r.json()["success"] is False
    assert r.json()["error"].startswith(error)
    assert FakeSession.created == []


@pytest.mark.parametrize("prefix", PREFIXES)
def test_non_json_is_400(client: TestClient, prefix: str) -> None:
    for raw in (b"{not json", b"", b"\xff\xfe\x00garbage"):
        r = client.post(f"{prefix}/join-interview", content=raw, headers=H)
        assert r.status_code == 400
        assert r.json() == {"success": False, "error": "Request body is not valid JSON"}


@pytest.mark.parametrize("prefix", PREFIXES)
def test_body_over_1_mib_is_413(client: TestClient, prefix: str) -> None:
    big = json.dumps(body(padding="x" * (1024 * 1024))).encode()
    r = client.post(f"{prefix}/join-interview", content=big, headers=H)
    assert r.status_code == 413
    assert r.json()["success"] is False and "1 MiB" in r.json()["error"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: the streamed bytes are counted
        for _ in range(20):
            yield b" " * 65536
        yield b"{}"

    r = client.post(f"{prefix}/join-interview", content=chunks(), headers=H)
    assert r.status_code == 413
    assert FakeSession.created == []
    # just under the limit is read (and then judged on its content)
    ok = json.dumps(body(padding="x" * (1024 * 1024 - 1000))).encode()
    assert len(ok) <= 1024 * 1024
    assert client.post(f"{prefix}/join-interview", content=ok, headers=H).status_code == 200


@pytest.mark.parametrize("prefix", PREFIXES)
def test_production_refuses_listing_everything_missing(prefix: str) -> None:
    s = Settings(environment="production", api_secret_key_previous=OLD_KEY)
    with TestClient(make_app(s)) as c:
        r = c.post(f"{prefix}/join-interview", json=body(), headers={"X-API-Key": OLD_KEY})
        assert r.status_code == 503
        assert int(r.headers["Retry-After"]) > 0
        assert r.json() == {
            "success": False,
            "error": "The service is not configured: missing API_SECRET_KEY, GEMINI_API_KEY, "
            "ELEVENLABS_API_KEY, NEXTJS_WEBHOOK_URL",
        }
        data = c.get(f"{prefix}/", headers={"X-API-Key": OLD_KEY}).json()
        assert data["config_valid"] is False and "GEMINI_API_KEY" in data["missing"]
        assert data["llm"] == "gemini-3.8-flash"  # never the offline stand-in
        assert c.get(f"{prefix}/health").json()["config_valid"] is False
    assert FakeSession.created == []


def test_a_crashing_session_touches_nothing_else(client: TestClient) -> None:
    assert client.post("/join-interview", json=body("ok"), headers=H).status_code == 200
    app = client.app
    app.state.manager._factory = CrashingSession  # type: ignore[attr-defined]
    assert client.post("/join-interview", json=body("bad"), headers=H).status_code == 200
    wait_until(
        lambda: client.get("/interviews/bad", headers=H).json()["state"] == "ended", "the crash"
    )
    assert client.get("/interviews/bad", headers=H).json()["endReason"] == "failed"
    assert client.get("/interviews/ok", headers=H).json()["state"] == "running"
    metrics = client.get("/metrics", headers=H).text
    assert 'synchire_interviews_ended_total{reason="failed"} 1.0' in metrics


def test_the_real_results_service_checkpoints_admitted_interviews(tmp_path: Path) -> None:
    app = create_app(
        settings(outbox_dir=str(tmp_path)), session_factory=FakeSession, configure_logging=False
    )
    checkpoint = tmp_path / "active" / "call-1.json"
    with TestClient(app) as c:
        assert c.post("/join-interview", json=body(), headers=H).status_code == 200
        wait_until(checkpoint.exists, "the checkpoint")
        saved = json.loads(checkpoint.read_text())
        assert "Ada Lovelace" in json.dumps(saved) and "Engineer" in json.dumps(saved)


# --- drain -----------------------------------------------------------------------------------


def test_lifespan_recovers_then_drains() -> None:
    results = FakeResults()
    app = make_app(results=results)
    with TestClient(app) as c:
        wait_until(lambda: results.recovered == 1, "recovery at startup")
        for i in range(3):
            assert c.post("/join-interview", json=body(f"c{i}"), headers=H).status_code == 200
        wait_until(lambda: len(results.admitted) == 3, "the admission checkpoints")
        assert results.admitted[0] == {
            "callId": "c0",
            "candidate_name": "Ada Lovelace",
            "job_title": "Engineer",
            "total_questions": 1,
            "started_at": FakeSession.created[0].started_at,
        }
    assert [s.stop_reasons for s in FakeSession.created] == [["shutdown"]] * 3
    assert len(results.flushes) == 1 and 0 < results.flushes[0] <= 8
    assert app.state.manager.active_count == 0


def test_joins_while_draining_are_503() -> None:
    app = make_app()
    with TestClient(app) as c:
        assert c.post("/join-interview", json=body("c0"), headers=H).status_code == 200
        c.portal.call(app.state.manager.request_drain)  # type: ignore[union-attr]
        wait_until(lambda: FakeSession.created[0].stop_reasons == ["shutdown"], "the drain")
        for prefix in PREFIXES:
            r = c.post(f"{prefix}/join-interview", json=body("c1"), headers=H)
            assert r.status_code == 503 and int(r.headers["Retry-After"]) > 0
            assert "shutting down" in r.json()["error"]
        assert c.get("/health").json()["status"] == "draining"


def test_drain_cancels_what_outlives_the_grace() -> None:
    StubbornSession.cancelled = False
    results = FakeResults()

    async def main() -> tuple[bool, int, dict[str, Any]]:
        manager = InterviewManager(
            settings(), results, StubbornSession, options=ManagerOptions(flush_reserve_s=0.05)
        )
        async with manager:
            await manager.join(body("slow"))
            await manager.join(body("slow-2"))
            with anyio.fail_after(10):
                ok = await manager.drain(grace_s=0.2)
                await anyio.wait_all_tasks_blocked()
            left = manager.active_count  # cancelled by the drain, not by the exit
        return ok, left, manager.view("slow")

    ok, left, view = anyio.run(main)
    assert ok is False and left == 0
    assert StubbornSession.cancelled
    assert view["state"] == "ended"
    assert results.flushes  # the flush was still given its share of the grace


def test_sigterm_drains_a_real_server() -> None:
    """uvicorn on an ephemeral port: concurrent duplicate joins over the loopback, then
    SIGTERM's handler: interviews end with reason shutdown and the server exits."""
    results = FakeResults()
    app = make_app(settings(max_interviews=50), results=results)
    config = server_config(app, settings(host="127.0.0.1"))
    config.port = 0
    config.timeout_graceful_shutdown = 60  # longer than any wait below
    server = DrainingServer(config, app.state.manager.request_drain)
    thread = threading.Thread(target=server.run, daemon=True)  # not the main thread: uvicorn
    thread.start()  # leaves the process's signal handlers alone
    wait_until(lambda: server.started, "uvicorn to start")
    port = server.servers[0].sockets[0].getsockname()[1]

    async def joins() -> list[int]:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            codes: list[int] = []

            async def join(i: int) -> None:
                r = await http.post(f"{PREFIXES[i % 2]}/join-interview", json=body(), headers=H)
                codes.append(r.status_code)

            with anyio.fail_after(10):
                async with anyio.create_task_group() as tg:
                    for i in range(20):
                        tg.start_soon(join, i)
            return codes

    codes = anyio.run(joins)
    assert sorted(codes) == [200] + [409] * 19
    # A request still in flight keeps uvicorn waiting for its connection...
    slow = socket.create_connection(("127.0.0.1", port))
    slow.sendall(
        b"POST /join-interview HTTP/1.1\r\nHost: t\r\nX-API-Key: "
        + KEY.encode()
        + b"\r\nContent-Length: 100\r\n\r\n{"
    )
    wait_until(lambda: len(server.server_state.tasks) == 1, "the slow request")
    server.handle_exit(signal.SIGTERM, None)
    # ...but the drain does not wait for it: the interviews are told at once.
    wait_until(lambda: FakeSession.created[0].stop_reasons == ["shutdown"], "the drain")
    assert thread.is_alive()
    slow.close()
    thread.join(timeout=15)
    assert not thread.is_alive()
    assert [s.stop_reasons for s in FakeSession.created] == [["shutdown"]]
    assert len(results.flushes) == 1


# --- metrics, OpenAPI ------------------------------------------------------------------------


def test_metrics_count_interviews_per_app() -> None:
    with TestClient(make_app()) as a, TestClient(make_app()) as b:
        a.post("/join-interview", json=body(), headers=H)
        a.post("/join-interview", json=body(), headers=H)  # refused: duplicate
        text_a = a.get("/python-api/metrics", headers=H).text
        text_b = b.get("/metrics", headers=H).text
    assert "synchire_active_interviews 1.0" in text_a
    assert 'synchire_joins_refused_total{cause="duplicate"} 1.0' in text_a
    assert "synchire_active_interviews 0.0" in text_b  # separate registries
    for name in (
        "synchire_turns_total",
        "synchire_voice_to_voice_seconds_bucket",
        "synchire_llm_ttft_seconds_bucket",
        "synchire_tts_ttfb_seconds_bucket",
        "synchire_endpointing_seconds_bucket",
    ):
        assert name in text_b
    assert "synchire_provider_errors" in text_b


def test_telemetry_reaches_code_inside_an_interview() -> None:
    from interview import telemetry

    class TurnSession(FakeSession):
        async def run(self) -> dict[str, Any]:
            telemetry.current().observe_turn({"voice_to_voice_ms": 850.0, "llm_ttft_ms": None})
            telemetry.current().provider_error("gemini")
            return {"endReason": "completed"}

    with TestClient(make_app(factory=TurnSession)) as c:
        c.post("/join-interview", json=body(), headers=H)
        wait_until(lambda: c.get("/health").json()["active_interviews"] == 0, "the end")
        text = c.get("/metrics", headers=H).text
    assert "synchire_turns_total 1.0" in text
    assert 'synchire_voice_to_voice_seconds_bucket{le="1.0"} 1.0' in text
    assert "synchire_llm_ttft_seconds_count 0.0" in text
    assert 'synchire_provider_errors_total{provider="gemini"} 1.0' in text


def test_openapi_document(client: TestClient) -> None:
    for prefix in PREFIXES:
        r = client.get(f"{prefix}/openapi.json")
        assert r.status_code == 200
    doc = r.json()
    assert doc == json.loads(json.dumps(openapi_document()))
    assert doc["openapi"].startswith("3.")
    served = {
        (route.path, method)
        for route in client.app.routes  # type: ignore[attr-defined]
        if hasattr(route, "methods") and route.methods
        for method in route.methods - {"HEAD"}
    }
    assert ("/", "GET") in served and ("/join-interview", "POST") in served
    for path, method in served:
        assert method.lower() in doc["paths"][path], (path, method)
        if not path.startswith("/python-api"):
            prefixed = "/python-api" + path.rstrip("/")
            assert method.lower() in doc["paths"][prefixed], (path, method)
    join = doc["paths"]["/join-interview"]["post"]["responses"]
    assert set(join) >= {"200", "400", "401", "403", "409", "413", "422", "503"}
    assert doc["paths"]["/health"]["get"]["security"] == []

    def refs(node: Any) -> Iterator[str]:
        if isinstance(node, dict):
            for k, v in node.items():
                if k == "$ref":
                    yield v
                else:
                    yield from refs(v)
        elif isinstance(node, list):
            for v in node:
                yield from refs(v)

    for ref in refs(doc):
        assert ref.removeprefix("#/components/schemas/") in doc["components"]["schemas"]
    try:
        from openapi_spec_validator import validate
    except ImportError:
        return
    validate(doc)


# --- logs ------------------------------------------------------------------------------------


def test_no_secret_in_any_log_line(caplog: pytest.LogCaptureFixture) -> None:
    """Everything the service logs while serving, captured twice (caplog and the JSON
    handler), holds no key: not the API keys, not the provider keys."""
    s = settings(
        environment="production",
        gemini_api_key=GEMINI_KEY,
        elevenlabs_api_key="sk_eleven_test_key_77",
        nextjs_webhook_url="https://app.example.com",
        webhook_secret="whsec_test_secret_55",
        google_cloud_project="synchire-test",
        log_level="DEBUG",
    )
    stream = io.StringIO()
    setup_logging(s, stream)
    caplog.set_level(logging.DEBUG)

    class LeakySession(FakeSession):
        async def run(self) -> dict[str, Any]:
            key = self.settings.gemini_api_key
            assert key is not None
            log = logging.getLogger("synchire.session")
            log.info("connecting with key %s", key.get_secret_value())  # a careless line
            log.debug("headers %s", {"x-goog-api-key": key.get_secret_value()})
            return await super().run()

    with TestClient(make_app(s, factory=LeakySession)) as c:
        headers = {
            "X-API-Key": KEY,
            "X-Cloud-Trace-Context": "0af7651916cd43dd8448eb211c80319c/7;o=1",
        }
        assert c.post("/join-interview", json=body(), headers=headers).status_code == 200
        c.get("/", headers={"X-API-Key": OLD_KEY})
        c.get("/", headers={"X-API-Key": "a-wrong-key-xyz"})
        c.post("/join-interview", json=body("x", questions=[]), headers=H)
        wait_until(lambda: "connecting with key" in stream.getvalue(), "the session's log")
    captured = stream.getvalue() + caplog.text
    assert "connecting with key [REDACTED]" in captured
    secrets = (KEY, OLD_KEY, GEMINI_KEY, "sk_eleven_test_key_77", "whsec_test_secret_55")
    for secret in secrets:
        assert secret not in captured, secret
        for record in caplog.records:
            assert secret not in record.getMessage() and secret not in str(record.__dict__)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    admitted = next(line for line in lines if line["message"] == "interview admitted")
    assert admitted["callId"] == "call-1" and admitted["severity"] == "INFO"
    assert admitted["logging.googleapis.com/trace"] == (
        "projects/synchire-test/traces/0af7651916cd43dd8448eb211c80319c"
    )
    running = next(line for line in lines if line["message"] == "interview running")
    assert running["callId"] == "call-1"  # the session's own lines, from the bound context


# --- the entry point -------------------------------------------------------------------------


def test_python_m_server_refuses_bad_config() -> None:
    env = {**os.environ, "PORT": "abc"}
    r = subprocess.run(
        [sys.executable, "-m", "server"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "server: invalid configuration: PORT: Input should be a valid integer, unable to parse "
        "string as an integer (got 'abc')"
    ]


def test_python_m_server_runs_and_stops_on_sigterm(tmp_path: Path) -> None:
    """What ``make demo`` does: development, no key set, so one is generated and logged; the
    real results service and manager start; SIGTERM drains and the process exits."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {
        **os.environ,
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "OUTBOX_DIR": str(tmp_path / "outbox"),
        "GEMINI_API_KEY": GEMINI_KEY,
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "server"],
        cwd=ROOT,
        env=env,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stderr is not None
        key = None
        for line in proc.stderr:  # ends if the process dies
            if "this run's key is " in line:
                key = line.split("this run's key is ")[1].split()[0]
            if "Uvicorn running" in line or "Application startup complete" in line:
                break
        assert key is not None
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
            assert http.get("/health").json()["status"] == "healthy"
            data = http.get("/python-api/", headers={"X-API-Key": key}).json()
            assert data["llm"] == "gemini-3.8-flash" and data["avatar"] == "none"
            assert "espeak-ng voice" in data["mode"]
            assert http.get("/", headers={"X-API-Key": "wrong"}).status_code == 403
        proc.send_signal(signal.SIGTERM)
        rest = proc.communicate(timeout=30)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "drained" in rest
    assert GEMINI_KEY not in rest
    assert proc.returncode in (0, -signal.SIGTERM)
