"""A WebRTC interview held by the Gemini brain, in chat and in live mode, through the real service.

The app is built the way ``python -m server`` builds it (its default session factory, providers
chosen from the settings): ``GEMINI_API_KEY`` and ``GEMINI_BASE_URL`` point at the local fake
(tests/fakes/gemini.py, trusted through ``SSL_CERT_FILE``), so the interviewer is
:class:`stages.gemini.GeminiBrain` over the real google-genai SDK, with the espeak-ng voice.
An aiortc candidate on loopback joins, hears the question, answers aloud (espeak-ng, real
Opus), gets the live events over the data channel, and the signed result reaches the webhook.
The fake's records show it really held the interview.
"""

from __future__ import annotations

import io
import wave
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from aiortc_client import CandidateClient, loopback_only
from fakes.gemini import FakeGemini, InterviewerModel, b64decode, get
from fakes.webhook import FakeWebhook

from interview.config import GEMINI_DEFAULT_MODELS, Settings
from pipeline.audio import resample
from server import create_app
from stages.local import EspeakOptions, EspeakSynthesizer

pytestmark = [
    pytest.mark.realclock,
    pytest.mark.filterwarnings("ignore:Inheritance class AiohttpClientSession:DeprecationWarning"),
]

KEY = "test-api-key-0123456789"
SECRET = "hook-secret-0123456789"
GEMINI_KEY = "test-key"  # what the fake accepts
H = {"X-API-Key": KEY}
QUESTION = "Tell me about yourself."
ANSWER = "I build payment services in Python."
HEARD = "I build payment services, mostly in Python."
"""What the fake's transcription says the candidate said: not the spoken words, so the user's
line in the transcript can only have come from Gemini."""


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeGemini]:
    with FakeGemini(api_key=GEMINI_KEY) as server:
        yield server


@pytest.fixture(autouse=True)
def _trust_fake(fake: FakeGemini, monkeypatch: pytest.MonkeyPatch) -> None:
    fake.reset()
    monkeypatch.setenv("SSL_CERT_FILE", fake.ca_file)


@pytest.fixture(scope="module")
def answer() -> bytes:
    """The spoken answer, 48 kHz mono (what a microphone track carries)."""
    synth = EspeakSynthesizer(EspeakOptions(voice="en-us"))
    return resample(synth.render(ANSWER), synth.sample_rate, 48000)


@asynccontextmanager
async def service(
    tmp: Path, hook: FakeWebhook, fake: FakeGemini, mode: str
) -> AsyncIterator[httpx.AsyncClient]:
    """The app (default providers and media options) with its lifespan, and a client to it."""
    settings = Settings(
        environment="development",
        api_secret_key=KEY,
        webhook_secret=SECRET,
        nextjs_webhook_url=hook.url,
        outbox_dir=str(tmp / "outbox"),
        gemini_api_key=GEMINI_KEY,
        gemini_base_url=fake.base_url,
        gemini_mode=mode,
    )
    app = create_app(settings, configure_logging=False)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://agent") as http:
            yield http


async def webhook_result(hook: FakeWebhook, call_id: str) -> dict[str, Any]:
    with anyio.fail_after(30):  # a hang guard
        while True:
            for payload in hook.received:
                if payload.get("interviewId") == call_id:
                    return dict(payload)
            await anyio.sleep(0.05)


def interview(
    fake: FakeGemini, mode: str, answer: bytes, tmp: Path
) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, Any], float, FakeWebhook]:
    """One whole one-question interview over WebRTC; returns what ``/`` said, the data channel
    events, the webhook payload, the loudest frame heard and the webhook receiver."""
    call_id = f"gemini-rtc-{mode}"
    body = {
        "callId": call_id,
        "candidateName": "Ada Lovelace",
        "jobTitle": "Backend Engineer",
        "questions": [
            {"id": "q1", "text": QUESTION, "type": "intro", "duration": 2, "category": "intro"}
        ],
    }

    async def main(hook: FakeWebhook) -> tuple[Any, ...]:
        async with service(tmp, hook, fake, mode) as http:
            root = (await http.get("/", headers=H)).json()
            r = await http.post("/python-api/join-interview", json=body, headers=H)
            assert r.status_code == 200, r.text
            joined = r.json()
            client = CandidateClient()
            try:
                r = await client.connect(http, joined["webrtcUrl"], token=joined["clientToken"])
                assert r.status_code == 201, r.text
                await client.wait_until(lambda: len(client.agent_lines()) >= 1, within=30)
                heard = client.loudest()  # the greeting and question, spoken
                await client.say(answer)
                await client.wait_event(lambda e: e.get("type") == "ended", within=30)
                events = list(client.events)
            finally:
                await client.close()
            result = await webhook_result(hook, call_id)
        return root, events, result, heard

    with FakeWebhook(secret=SECRET) as hook, loopback_only():
        root, events, result, heard = anyio.run(main, hook)
    return root, events, result, heard, hook


def check_interview(
    root: dict[str, Any],
    events: list[dict[str, Any]],
    result: dict[str, Any],
    heard: float,
    hook: FakeWebhook,
    mode: str,
) -> None:
    """What the candidate and the web app see of an interview the Gemini model held."""
    assert root["llm"] == GEMINI_DEFAULT_MODELS[mode]
    assert root["transcriber"] == "gemini"
    assert heard > -30  # the interviewer's voice arrived
    ended = next(e for e in events if e["type"] == "ended")
    assert ended["reason"] == "completed"
    progress = [
        (e["questionIndex"], e["totalQuestions"]) for e in events if e["type"] == "progress"
    ]
    assert progress == [(0, 1)]
    lines = [e for e in events if e["type"] == "transcript"]
    assert [e["speaker"] for e in lines] == ["agent", "user", "agent"]
    # the model's words (InterviewerModel), not the scripted interviewer's
    assert "Hello, welcome to your interview." in lines[0]["text"]
    assert QUESTION in lines[0]["text"]
    assert lines[1]["text"] == HEARD  # Gemini's transcription of the answer
    assert "Thank you." in lines[2]["text"] and "Goodbye." in lines[2]["text"]
    # the signed result, with the same transcript
    assert all(r.signature_valid for r in hook.requests)
    assert result["status"] == "completed" and result["endReason"] == "completed"
    assert result["questionsAsked"] == 1
    assert [(e["speaker"], e["text"]) for e in result["transcript"]] == [
        (e["speaker"], e["text"]) for e in lines
    ]


def test_a_webrtc_interview_held_by_gemini_in_chat_mode(
    fake: FakeGemini, answer: bytes, tmp_path: Path
) -> None:
    fake.responder = InterviewerModel().chat
    fake.transcript = HEARD
    root, events, result, heard, hook = interview(fake, "chat", answer, tmp_path)
    check_interview(root, events, result, heard, hook, "chat")
    # the fake held it: streamed replies, with our key, for the chat model
    streams = fake.stream_requests()
    assert len(streams) >= 4  # greeting, its tool result, the answer, its tool results
    model = GEMINI_DEFAULT_MODELS["chat"]
    assert {r.path for r in streams} == {f"/v1/models/{model}:streamGenerateContent"}
    assert {r.headers["x-goog-api-key"] for r in fake.requests} == {GEMINI_KEY}
    assert all(r.outcome == "ok" for r in fake.requests)
    # the candidate's answer went to Gemini as WAV, and was transcribed beside the reply
    blobs = [
        get(p, "inlineData", "inline_data")
        for r in streams
        for p in (r.contents[-1]["parts"] if r.contents else [])
    ]
    wavs = [b for b in blobs if b and get(b, "mimeType", "mime_type") == "audio/wav"]
    assert len(wavs) == 1
    with wave.open(io.BytesIO(b64decode(wavs[0]["data"]))) as w:
        seconds = w.getnframes() / w.getframerate()
    assert seconds >= 0.5 * len(answer) / 2 / 48000  # most of the spoken answer, at least
    (transcription,) = fake.unary_requests()
    assert get(transcription.contents[0]["parts"][0], "inlineData", "inline_data") == wavs[0]


def test_a_webrtc_interview_held_by_gemini_in_live_mode(
    fake: FakeGemini, answer: bytes, tmp_path: Path
) -> None:
    fake.live_responder = InterviewerModel().live
    fake.transcript = HEARD
    root, events, result, heard, hook = interview(fake, "live", answer, tmp_path)
    check_interview(root, events, result, heard, hook, "live")
    # one Live session held the whole interview, with our key, for the live model
    assert fake.requests == []  # no REST call
    (conn,) = fake.live
    assert conn.headers["x-goog-api-key"] == GEMINI_KEY
    assert conn.setup["model"] == f"models/{GEMINI_DEFAULT_MODELS['live']}"
    # the answer streamed as realtime audio between our VAD's activityStart and activityEnd
    kinds = conn.kinds()
    assert kinds.count("activityStart") == 1 and kinds.count("activityEnd") == 1
    start, end = kinds.index("activityStart"), kinds.index("activityEnd")
    assert start < end and set(kinds[start + 1 : end]) == {"audio"}
    assert "audio" not in kinds[:start] + kinds[end + 1 :]
    mime = {get(b, "mimeType", "mime_type") for b in conn.realtime("audio")}
    assert mime == {"audio/pcm;rate=16000"}
    sent_s = conn.audio_bytes() / 2 / 16000
    assert sent_s >= 0.5 * len(answer) / 2 / 48000  # most of the spoken answer, at least
    assert "toolResponse" in kinds  # the director's answers went back to the model
