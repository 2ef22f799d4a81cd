"""The service over WebRTC: an aiortc candidate on loopback joins through the signaling route
and holds a whole offline interview (real Opus both ways, the agent's VAD finds the turns,
live events over the data channel, the result at the webhook); peers that vanish mid-turn,
come back or never come; one peer at a time; bad offers, keys and client tokens.

The app runs in-process (httpx's ASGI transport) on the same event loop as the client, with
the offline stand-ins (scripted interviewer, espeak-ng, pocketsphinx) and real time.
"""

from __future__ import annotations

import functools
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from aiortc_client import CandidateClient, loopback_only
from fakes.webhook import FakeWebhook

from interview.config import Settings
from interview.manager import ManagerOptions
from interview.media import MediaOptions
from interview.session import InterviewSession, Providers
from pipeline.audio import resample
from server import create_app
from stages.local import (
    EspeakOptions,
    EspeakSynthesizer,
    PocketsphinxTranscriber,
    ScriptedBrain,
)

pytestmark = pytest.mark.realclock

KEY = "test-api-key-0123456789"
SECRET = "hook-secret-0123456789"
H = {"X-API-Key": KEY}
QUESTIONS = [
    {
        "id": "q1",
        "text": "Tell me about a project you are proud of.",
        "type": "behavioral",
        "duration": 3,
        "category": "experience",
    },
    {
        "id": "q2",
        "text": "How do you debug a slow database query?",
        "type": "technical",
        "duration": 3,
        "category": "technical",
    },
]
ANSWERS = [
    "I built a payment service that handles two thousand requests per second.",
    "First I look at the query plan, then I check the indexes.",
]


def join_body(call_id: str, questions: int = 2) -> dict[str, Any]:
    return {
        "callId": call_id,
        "candidateName": "Ada Lovelace",
        "jobTitle": "Backend Engineer",
        "questions": QUESTIONS[:questions],
    }


@pytest.fixture(scope="module")
def answers() -> list[bytes]:
    """The spoken answers, 48 kHz mono (what a microphone track carries)."""
    synth = EspeakSynthesizer(EspeakOptions(voice="en-us"))
    return [resample(synth.render(text), synth.sample_rate, 48000) for text in ANSWERS]


def brisk_offline_providers(settings: Settings) -> Providers:
    """The offline stand-ins with a faster-speaking interviewer (shorter tests)."""
    return Providers(
        brain=ScriptedBrain(transcriber=PocketsphinxTranscriber()),
        synthesizer=EspeakSynthesizer(EspeakOptions(rate_wpm=300)),
    )


@asynccontextmanager
async def service(
    tmp: Path, hook: FakeWebhook, **media: Any
) -> AsyncIterator[tuple[httpx.AsyncClient, Any]]:
    """The app with its lifespan, and an HTTP client talking to it in-process."""
    settings = Settings(
        environment="development",
        api_secret_key=KEY,
        webhook_secret=SECRET,
        nextjs_webhook_url=hook.url,
        outbox_dir=str(tmp / "outbox"),
    )
    options = MediaOptions(**{"stale_after_s": 1.0, "poll_s": 0.05, **media})
    app = create_app(
        settings,
        configure_logging=False,
        manager_options=ManagerOptions(media=options),
        session_factory=functools.partial(InterviewSession, providers=brisk_offline_providers),
    )
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://agent") as http:
            yield http, app


async def join(http: httpx.AsyncClient, call_id: str, questions: int = 2) -> dict[str, Any]:
    r = await http.post("/python-api/join-interview", json=join_body(call_id, questions), headers=H)
    assert r.status_code == 200, r.text
    return dict(r.json())


async def webhook_result(hook: FakeWebhook, call_id: str) -> dict[str, Any]:
    with anyio.fail_after(30):  # a hang guard
        while True:
            for payload in hook.received:
                if payload.get("interviewId") == call_id:
                    return dict(payload)
            await anyio.sleep(0.05)


async def agent_lines(client: CandidateClient, n: int, within: float = 60) -> dict[str, Any]:
    """Wait for the n-th (1-based) agent transcript event; returns it."""
    await client.wait_until(lambda: len(client.agent_lines()) >= n, within=within)
    lines = [e for e in client.events if e.get("type") == "transcript"]
    return [e for e in lines if e["speaker"] == "agent"][n - 1]


def is_type(kind: str) -> Any:
    return lambda event: event.get("type") == kind


# --- the whole interview ---------------------------------------------------------------------


def test_whole_offline_interview_over_webrtc(answers: list[bytes], tmp_path: Path) -> None:
    async def main(hook: FakeWebhook) -> None:
        async with service(tmp_path, hook) as (http, _app):
            joined = await join(http, "rtc-1")
            assert joined["webrtcUrl"] == "/interviews/rtc-1/webrtc"
            assert joined["clientTokenExpiresAt"].endswith("+00:00")
            assert joined["iceServers"] == []
            client = CandidateClient()
            try:
                url = "/python-api" + joined["webrtcUrl"]
                r = await client.connect(http, url, token=joined["clientToken"])
                assert r.status_code == 201, r.text
                assert r.headers["content-type"].startswith("application/sdp")
                assert "opus/48000" in r.text  # real Opus
                assert client.location is not None
                assert client.location.startswith("/python-api/interviews/rtc-1/webrtc/")
                for i, answer in enumerate(answers):
                    await agent_lines(client, i + 1)  # question i asked
                    assert client.loudest() > -30  # and heard: the interviewer's voice arrived
                    if i == 1:
                        view = (await http.get("/interviews/rtc-1", headers=H)).json()
                    await client.say(answer)
                ended = await client.wait_event(is_type("ended"), within=60)
                events = list(client.events)
            finally:
                await client.close()
            result = await webhook_result(hook, "rtc-1")
        assert ended["reason"] == "completed"
        progress = [e for e in events if e["type"] == "progress"]
        assert [(p["questionIndex"], p["totalQuestions"]) for p in progress] == [(0, 2), (1, 2)]
        lines = [e for e in events if e["type"] == "transcript"]
        assert [e["speaker"] for e in lines] == ["agent", "user", "agent", "user", "agent"]
        assert all(e["text"] for e in lines)  # the transcriber heard each answer
        assert "Ada Lovelace" in lines[0]["text"] and QUESTIONS[1]["text"] in lines[2]["text"]
        assert [e["timestamp"] for e in lines] == sorted(e["timestamp"] for e in lines)
        # the server's side while it ran: our audio came in, its audio went out
        media = view["media"]
        assert media["presence"] == "present" and media["peersAnswered"] == 1
        assert media["peer"]["state"] == "connected" and media["peer"]["framesIn"] > 100
        assert media["peer"]["framesOutFromPacer"] > 100 and media["framesLost"] == 0
        # the result reached the webhook, with the same transcript
        assert result["endReason"] == "completed" and result["questionsAsked"] == 2
        assert [e["text"] for e in result["transcript"]] == [e["text"] for e in lines]
        assert result["latency"]["turns"] == 2
        assert result["latency"]["voice_to_voice_ms"]["n"] == 2

    with FakeWebhook(secret=SECRET) as hook, loopback_only():
        anyio.run(main, hook)


# --- peers that vanish -----------------------------------------------------------------------


def test_a_peer_vanishing_mid_answer_can_reconnect_and_finish(
    answers: list[bytes], tmp_path: Path
) -> None:
    """The candidate's tab dies half-way through the answer (no goodbye: the sockets just
    close). The same candidate reconnects (JSON offer this time), gets the interview so far
    replayed on the data channel, and the interview carries on to the end."""

    async def main(hook: FakeWebhook) -> None:
        async with service(tmp_path, hook, leave_grace_s=20.0) as (http, _app):
            joined = await join(http, "rtc-vanish", questions=1)
            url, token = joined["webrtcUrl"], joined["clientToken"]
            first = CandidateClient()
            second = CandidateClient()
            try:
                assert (await first.connect(http, url, token=token)).status_code == 201
                await agent_lines(first, 1)
                first.mic.say(answers[0])
                await first.wait_until(lambda: first.mic.speech_frames >= 75)  # 1.5 s in
                first.crash()  # mid-answer
                statuses = []
                with anyio.fail_after(20):
                    while True:  # 409 while the vanished peer still looks live, then 201
                        r = await second.connect(http, url, token=token, as_json=True)
                        statuses.append(r.status_code)
                        if r.status_code != 409:
                            break
                        await anyio.sleep(0.2)
                assert statuses[-1] == 201, r.text
                assert set(statuses) <= {409, 201}
                body = r.json()
                assert body["type"] == "answer" and body["peerId"] in r.headers["location"]
                replayed = await agent_lines(second, 1, within=10)
                assert "Ada Lovelace" in replayed["text"]  # the history came first
                ended = await second.wait_event(is_type("ended"), within=60)
                view = (await http.get("/interviews/rtc-vanish", headers=H)).json()
            finally:
                await first.close()
                await second.close()
            result = await webhook_result(hook, "rtc-vanish")
        assert ended["reason"] == "completed"
        assert second.loudest() > -30  # the new peer heard the interviewer
        assert result["endReason"] == "completed"
        assert [e["speaker"] for e in result["transcript"]] == ["agent", "user", "agent"]
        assert view["state"] in ("ending", "ended")

    with FakeWebhook(secret=SECRET) as hook, loopback_only():
        anyio.run(main, hook)


def test_a_peer_that_vanishes_for_good_ends_the_interview_as_candidate_left(
    tmp_path: Path,
) -> None:
    async def main(hook: FakeWebhook) -> None:
        async with service(tmp_path, hook, leave_grace_s=1.0) as (http, _app):
            joined = await join(http, "rtc-gone")
            client = CandidateClient()
            try:
                r = await client.connect(http, joined["webrtcUrl"], token=joined["clientToken"])
                assert r.status_code == 201
                await client.wait_event(is_type("progress"), within=30)  # the greeting began
                client.crash()
                result = await webhook_result(hook, "rtc-gone")
            finally:
                await client.close()
            view = (await http.get("/interviews/rtc-gone", headers=H)).json()
        assert result["endReason"] == "candidate_left"
        assert result["questionsAsked"] == 1
        assert view["state"] == "ended" and view["endReason"] == "candidate_left"

    with FakeWebhook(secret=SECRET) as hook, loopback_only():
        anyio.run(main, hook)


def test_an_interview_nobody_joins_ends_as_candidate_left_with_its_result(
    tmp_path: Path,
) -> None:
    async def main(hook: FakeWebhook) -> None:
        async with service(tmp_path, hook, join_timeout_s=0.5) as (http, _app):
            await join(http, "rtc-nobody")
            result = await webhook_result(hook, "rtc-nobody")
            r = await http.post("/interviews/rtc-nobody/webrtc", content=b"v=0", headers=H)
        assert result["endReason"] == "candidate_left" and result["transcript"] == []
        assert r.status_code == 404  # over: no more offers

    with FakeWebhook(secret=SECRET) as hook, loopback_only():
        anyio.run(main, hook)


# --- one peer at a time, hang-up, bad requests -----------------------------------------------


def test_one_live_peer_at_a_time_hangup_and_refusals(tmp_path: Path) -> None:
    async def main(hook: FakeWebhook) -> None:
        async with service(tmp_path, hook) as (http, app):
            joined = await join(http, "rtc-409")
            other = await join(http, "rtc-other")
            url, token = joined["webrtcUrl"], joined["clientToken"]
            bearer = {"Authorization": f"Bearer {token}"}
            sdp_headers = {**bearer, "Content-Type": "application/sdp"}
            offer = await _offer()

            async def post(headers: dict[str, str], body: bytes = offer) -> httpx.Response:
                return await http.post(url, content=body, headers=headers)

            # who may offer
            r = await post({"Content-Type": "application/sdp"})
            assert r.status_code == 401 and "client token" in r.json()["detail"]
            r = await post({"X-API-Key": "wrong", "Content-Type": "application/sdp"})
            assert r.status_code == 403 and r.json() == {"detail": "Invalid API key"}
            r = await post({"Authorization": f"Bearer {other['clientToken']}"})
            assert r.status_code == 403 and "another interview" in r.json()["detail"]
            expired, _ = app.state.manager.tokens.issue("rtc-409", 60, now=time.time() - 120)
            r = await post({"Authorization": f"Bearer {expired}"})
            assert r.status_code == 401 and r.json()["detail"] == "Client token has expired"
            assert 'error="invalid_token"' in r.headers["www-authenticate"]
            r = await post({"Authorization": f"Bearer {token[:-3]}abc"})
            assert r.status_code == 401 and "signature" in r.json()["detail"]
            r = await http.post("/interviews/nope/webrtc", content=offer, headers=H)
            assert r.status_code == 404
            assert r.json() == {"success": False, "error": "No interview for callId nope"}
            # what may be offered
            r = await post(sdp_headers, b"hello")
            assert r.status_code == 400
            assert r.json()["error"] == ("Malformed SDP offer: the SDP offer must start with 'v=0'")
            r = await post(sdp_headers, offer.replace(b"a=sendrecv", b"a=recvonly"))
            assert r.status_code == 400 and "must be sendrecv" in r.json()["error"]
            r = await post({**bearer, "Content-Type": "text/plain"})
            assert r.status_code == 415
            # one live peer at a time
            first, second = CandidateClient(), CandidateClient()
            try:
                r = await first.connect(http, url, token=token)
                assert r.status_code == 201
                await first.wait_event(is_type("progress"), within=30)  # connected, talking
                r = await second.connect(http, url, api_key=KEY)
                assert r.status_code == 409 and "already connected" in r.json()["error"]
                r = await http.delete(url + "/not-a-peer", headers=bearer)
                assert r.status_code == 404
                assert first.location is not None
                r = await http.delete(first.location, headers=bearer)
                assert r.status_code == 200 and r.json()["success"] is True
                r = await http.delete(first.location, headers=bearer)
                assert r.status_code == 404  # already hung up
                second = CandidateClient()  # a fresh offer (the refused one was spent)
                r = await second.connect(http, url, api_key=KEY)
                assert r.status_code == 201  # the slot was freed at once
                await second.wait_event(is_type("progress"), within=30)  # history replayed
                assert second.location is not None
                r = await http.delete(second.location + "?end=true", headers=bearer)
                assert r.status_code == 200
                result = await webhook_result(hook, "rtc-409")
            finally:
                await first.close()
                await second.close()
            await http.post("/agents/rtc-other/shutdown", headers=H)
        assert result["endReason"] == "candidate_left"

    with FakeWebhook(secret=SECRET) as hook, loopback_only():
        anyio.run(main, hook)


async def _offer() -> bytes:
    client = CandidateClient()
    try:
        return (await client.offer()).encode()
    finally:
        await client.close()


def test_the_demo_page_is_served_only_when_enabled(tmp_path: Path) -> None:
    from starlette.testclient import TestClient

    for environment, enabled, status in (
        ("development", None, 200),
        ("production", None, 404),
        ("production", True, 200),
    ):
        settings = Settings(
            environment=environment,
            api_secret_key=KEY,
            enable_demo=enabled,
            outbox_dir=str(tmp_path),
        )
        with TestClient(create_app(settings, configure_logging=False)) as client:
            for path in ("/demo", "/python-api/demo"):
                r = client.get(path)
                assert r.status_code == status, (environment, enabled, path)
                if status == 200:
                    assert r.headers["content-type"].startswith("text/html")
            assert client.get("/demo/../server.py").status_code == 404
