"""Whole interviews in ElevenLabs' voice with a LiveAvatar face, all three providers faked.

``GEMINI_*``, ``ELEVENLABS_*`` and ``HEYGEN_*`` point at the local fakes (tests/fakes/), so the
session picks the real stages (:class:`stages.gemini.GeminiBrain` over google-genai,
:class:`stages.elevenlabs.ElevenLabsVoice`, :class:`stages.heygen.AvatarStage`) exactly as it
would in production. Batch runs go through :func:`interview.run.run_interview`; live ones
through the real service (``create_app``) and an aiortc candidate on loopback.

The fake voice is a 220 Hz tone, ``ms_per_char`` long per character, so what a listener
hears can be told apart from silence (muted) and from espeak-ng (the offline voice).

Covered: a batch run (``--out`` keeps the voice while the avatar speaks every reply); a live
interview with a barge-in in the middle of the greeting (the voice's context closed, the
avatar interrupted, the transcript keeping what was heard, our egress silent while the avatar
is live); and the faults of issue 7 ending as described (the avatar dying mid-interview, the
ElevenLabs websocket refused, a bad or revoked ElevenLabs key); and an avatar that connects
while a reply is being played never cuts that reply (the bug this file first found).
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import numpy as np
import pytest
from aiortc_client import SPEECH_DBFS, CandidateClient, loopback_only
from fakes.elevenlabs import FakeElevenLabs, WsFault, wait_for
from fakes.gemini import FakeGemini, InterviewerModel, Recorded, Reply
from fakes.liveavatar import LIVEKIT_URL, FakeLiveAvatar
from fakes.webhook import FakeWebhook

from interview.config import Settings
from interview.run import run_interview
from pipeline.audio import WavAudio, read_wav, resample, rms_dbfs, silence
from server import create_app
from stages.local import EspeakOptions, EspeakSynthesizer

pytestmark = [
    pytest.mark.realclock,
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore:Inheritance class AiohttpClientSession:DeprecationWarning"),
]

KEY = "test-api-key-0123456789"
SECRET = "hook-secret-0123456789"
GEMINI_KEY = "test-key"  # what the Gemini fake accepts
H = {"X-API-Key": KEY}
ANSWER = "I build payment services in Python."
HEARD = "I build payment services, mostly in Python."
"""What the Gemini fake's transcription says the candidate said."""
TONE_HZ = 220.0  # the fake voice's tone (fakes.elevenlabs.pcm_tone)
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
GREETING_START_S = 0.5
"""The model's time to first token on the greeting: long enough for the avatar's socket (on
loopback) to connect first, so the avatar speaks the interview from its first word. (An avatar
that connects while the greeting is being played cuts the greeting short: see
:func:`test_an_avatar_connecting_mid_greeting_never_cuts_the_greeting`.)"""


def join_body(call_id: str, questions: int) -> dict[str, Any]:
    return {
        "callId": call_id,
        "candidateName": "Ada Lovelace",
        "jobTitle": "Backend Engineer",
        "questions": QUESTIONS[:questions],
    }


# --- fixtures and helpers ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gemini() -> Iterator[FakeGemini]:
    with FakeGemini(api_key=GEMINI_KEY) as server:
        yield server


@pytest.fixture(autouse=True)
def _gemini_interviewer(gemini: FakeGemini, monkeypatch: pytest.MonkeyPatch) -> None:
    gemini.reset()
    monkeypatch.setenv("SSL_CERT_FILE", gemini.ca_file)
    gemini.transcript = HEARD
    gemini.responder = slow_greeting(InterviewerModel().chat)


def slow_greeting(
    chat: Callable[[Recorded], Reply], first: Reply | None = None
) -> Callable[[Recorded], Reply]:
    """The model's answers, the first one (the greeting) ``first`` if given, and after
    :data:`GREETING_START_S`."""
    calls = 0

    def respond(rec: Recorded) -> Reply:
        nonlocal calls
        calls += 1
        if calls > 1:
            return chat(rec)
        reply = first if first is not None else chat(rec)
        reply.delay_s = GREETING_START_S
        return reply

    return respond


@pytest.fixture(scope="module")
def answer() -> bytes:
    """The spoken answer, 16 kHz mono."""
    synth = EspeakSynthesizer(EspeakOptions(voice="en-us"))
    return resample(synth.render(ANSWER), synth.sample_rate, 16000)


def candidate_audio(answer: bytes, answers: int) -> WavAudio:
    """``answers`` spoken answers separated by silences (a batch run's input)."""
    parts = [silence(1.0, 16000)]
    for _ in range(answers):
        parts += [answer, silence(2.0, 16000)]
    return WavAudio(b"".join(parts), 16000, 1)


def settings(
    tmp: Path,
    gemini: FakeGemini,
    voice: FakeElevenLabs,
    face: FakeLiveAvatar,
    hook: FakeWebhook | None = None,
    **extra: Any,
) -> Settings:
    """Development settings with every provider's key and base URL pointing at a fake."""
    env = {name.lower(): value for name, value in {**voice.env(), **face.env()}.items()}
    values: dict[str, Any] = {
        "environment": "development",
        "api_secret_key": KEY,
        "webhook_secret": SECRET,
        "nextjs_webhook_url": hook.url if hook is not None else None,
        "outbox_dir": str(tmp / "outbox"),
        "gemini_api_key": GEMINI_KEY,
        "gemini_base_url": gemini.base_url,
        **env,
        **extra,
    }
    return Settings(**values)


def batch(
    tmp: Path,
    s: Settings,
    answer: bytes,
    questions: int,
    call_id: str,
    during: Callable[[], Coroutine[Any, Any, None]] | None = None,
) -> tuple[dict[str, Any], Path]:
    """A batch run (``python -m interview.run --out``), with ``during`` running beside it
    (a fault injector); returns the payload and the WAV."""
    out = tmp / "agent.wav"

    async def main() -> dict[str, Any]:
        with anyio.fail_after(60):  # a hang guard
            async with anyio.create_task_group() as tg:
                if during is not None:
                    tg.start_soon(during)
                payload = await run_interview(
                    join_body(call_id, questions),
                    candidate_audio(answer, questions),
                    settings=s,
                    out=out,
                )
                tg.cancel_scope.cancel()
            return payload

    return anyio.run(main), out


def norm(text: str) -> str:
    return " ".join(text.split())


def spoken_contexts(voice: FakeElevenLabs) -> list[str]:
    """The text of every context that got any, over every connection, in order."""
    return [
        norm(conn.sent_text(cid))
        for conn in voice.connections
        for cid, record in conn.contexts.items()
        if record.texts
    ]


def tone_share(pcm: bytes, rate: int) -> float:
    """The share of the signal's energy within 10 Hz of the fake voice's tone."""
    x = np.frombuffer(pcm, "<i2").astype(np.float64)
    power = np.abs(np.fft.rfft(x)) ** 2
    freqs = np.fft.rfftfreq(len(x), 1 / rate)
    return float(power[np.abs(freqs - TONE_HZ) <= 10].sum() / power.sum())


def agent_lines(payload: dict[str, Any]) -> list[str]:
    return [e["text"] for e in payload["transcript"] if e["speaker"] == "agent"]


# --- batch ---------------------------------------------------------------------------------------


def test_batch_interview_in_elevenlabs_voice_with_the_avatar_driven(
    gemini: FakeGemini, answer: bytes, tmp_path: Path
) -> None:
    with FakeElevenLabs() as voice, FakeLiveAvatar() as face:
        payload, out = batch(tmp_path, settings(tmp_path, gemini, voice, face), answer, 2, "vf-1")
        kinds_at_return = face.kinds()
    assert payload["status"] == "completed" and payload["endReason"] == "completed"
    assert payload["questionsAsked"] == 2
    lines = agent_lines(payload)
    assert [e["speaker"] for e in payload["transcript"]] == [
        "agent",
        "user",
        "agent",
        "user",
        "agent",
    ]
    assert "Hello, welcome to your interview." in lines[0]  # Gemini's words
    assert [e["text"] for e in payload["transcript"] if e["speaker"] == "user"] == [HEARD] * 2
    # ElevenLabs: one socket, one context per reply, holding that reply's words
    assert len(voice.connections) == 1
    (conn,) = voice.connections
    assert conn.key_ok and conn.query["output_format"] == "pcm_24000"
    assert conn.query["model_id"] == "eleven_flash_v2_5"
    assert spoken_contexts(voice) == [norm(line) for line in lines]
    assert voice.http_requests == []
    # LiveAvatar: token, start, each reply's audio then its speak_end, stop before returning
    (session,) = face.sessions.values()
    assert session.stopped and kinds_at_return[-1] == "stop"
    kinds = [k for k in kinds_at_return if k != "session.keep_alive"]
    shape = " ".join("S" if k == "agent.speak" else k for k in kinds)
    assert re.fullmatch(r"token start( (S )+agent\.speak_end){3} stop", shape), shape
    assert session.interrupts == 0
    # --out holds the interviewer's (fake ElevenLabs) voice although the avatar was live
    wav = read_wav(out)
    assert wav.sample_rate == 24000
    assert rms_dbfs(wav.pcm) > -40
    assert tone_share(wav.pcm, wav.sample_rate) > 0.9  # the fake's tone, not espeak-ng
    # the avatar got the same audio, resampled to its 24 kHz
    assert session.audio_bytes / 2 / 24000 == pytest.approx(wav.duration, abs=0.1)


# --- live, over WebRTC ---------------------------------------------------------------------------


@asynccontextmanager
async def service(s: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """The app as ``python -m server`` builds it, with its lifespan, and a client to it."""
    app = create_app(s, configure_logging=False)
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


@asynccontextmanager
async def candidate(
    http: httpx.AsyncClient, call_id: str, questions: int
) -> AsyncIterator[tuple[dict[str, Any], CandidateClient]]:
    """Join an interview as the web app does, and connect a candidate to it; yields the join
    answer and the connected client."""
    r = await http.post("/join-interview", json=join_body(call_id, questions), headers=H)
    assert r.status_code == 200, r.text
    joined = r.json()
    client = CandidateClient(keep_audio=True)
    try:
        r = await client.connect(http, joined["webrtcUrl"], token=joined["clientToken"])
        assert r.status_code == 201, r.text
        yield joined, client
    finally:
        await client.close()


def ended(event: dict[str, Any]) -> bool:
    return event.get("type") == "ended"


def avatar_events(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if e.get("type") == "avatar"]


def transcript_lines(events: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(e["speaker"], e["text"]) for e in events if e.get("type") == "transcript"]


GREETING = [
    "Hello Ada, and welcome to your interview for the backend engineer role today. ",
    *(
        f"Part {n} of this introduction explains how the conversation is going to go. "
        for n in range(1, 16)
    ),
]
"""A long greeting the model streams slowly (a sentence every ``interval_s``): the candidate
cuts in while it is still being written, and spoken."""


def test_barge_in_mid_reply_with_voice_and_face_over_webrtc(
    gemini: FakeGemini, answer: bytes, tmp_path: Path
) -> None:
    call_id = "vf-barge-in"
    gemini.responder = slow_greeting(
        InterviewerModel().chat, Reply(parts=[{"text": t} for t in GREETING], interval_s=0.3)
    )
    answer_48k = resample(answer, 16000, 48000)

    async def main(s: Settings, face: FakeLiveAvatar, hook: FakeWebhook) -> tuple[Any, ...]:
        async with service(s) as http:
            root = (await http.get("/", headers=H)).json()
            async with candidate(http, call_id, 1) as (joined, client):
                # the greeting's audio is flowing (to the avatar, and paced to our egress)
                await wait_for(lambda: "agent.speak" in face.kinds(), 20)
                await anyio.sleep(1.5)  # a few words in, the candidate cuts in
                await client.say(answer_48k)
                await client.wait_until(lambda: len(client.agent_lines()) >= 2)
                await client.say(answer_48k)  # answers the question
                await client.wait_event(ended)
                events, levels = list(client.events), list(client.levels)
            result = await webhook_result(hook, call_id)
        return root, joined, events, levels, result

    with (
        FakeElevenLabs() as voice,
        FakeLiveAvatar() as face,
        FakeWebhook(secret=SECRET) as hook,
        loopback_only(),
    ):
        s = settings(tmp_path, gemini, voice, face, hook)
        root, joined, events, levels, result = anyio.run(main, s, face, hook)

    # the join answer and the live event gave the client the avatar's room
    (session,) = face.sessions.values()
    room = {"sessionId": session.id, "livekitUrl": LIVEKIT_URL, "token": f"client-{session.id}"}
    assert root["avatar"] == "heygen 00000000-0000-4000-8000-000000000001"
    assert joined["videoAvatarEnabled"] is True and joined["avatar"] == room
    assert avatar_events(events) == [
        {"type": "avatar", "state": "live", "livekitUrl": LIVEKIT_URL, "token": room["token"]}
    ]
    # ElevenLabs: the greeting's context was closed by the barge-in, before its text was all
    # in (a finished reply ends with an empty flush, then close_context)
    (conn, *_) = voice.connections
    cid = next(iter(conn.contexts))
    greeting_msgs = [m for m in conn.messages if m.get("context_id") == cid]
    assert greeting_msgs[-1] == {"context_id": cid, "close_context": True}
    assert {"text": "", "context_id": cid, "flush": True} not in greeting_msgs
    sent = norm(conn.sent_text(cid))
    assert conn.contexts[cid].closed and len(sent) < len(norm("".join(GREETING)))
    # LiveAvatar: told to stop talking; the cut reply has no speak_end, the two others do
    assert session.interrupts == 1 and len(session.speak_ends) == 2
    kinds = [k for k in face.kinds() if k not in ("agent.speak", "session.keep_alive")]
    assert kinds == [
        "token",
        "start",
        "agent.interrupt",
        "agent.speak_end",
        "agent.speak_end",
        "stop",
    ]
    # the transcript keeps the words heard before the cut, and the interview went on
    lines = transcript_lines(events)
    assert [speaker for speaker, _ in lines] == ["agent", "user", "agent", "user", "agent"]
    heard = lines[0][1].split()
    assert heard and heard == sent.split()[: len(heard)] and len(heard) < len(sent.split())
    assert "Tell me about a project you are proud of." in lines[2][1]
    assert next(e for e in events if ended(e))["reason"] == "completed"
    assert result["status"] == "completed" and result["questionsAsked"] == 1
    assert [(e["speaker"], e["text"]) for e in result["transcript"]] == lines
    # while the avatar was live (all along) our own egress sent silence, at the call's pace
    assert len(levels) > 200  # frames kept arriving: 4 s and more of audio
    assert max(db for _, db in levels) < SPEECH_DBFS


def test_avatar_dying_mid_interview_unmutes_the_agent_and_the_interview_completes(
    gemini: FakeGemini, answer: bytes, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    call_id = "vf-avatar-dies"
    answer_48k = resample(answer, 16000, 48000)

    async def main(s: Settings, face: FakeLiveAvatar, hook: FakeWebhook) -> tuple[Any, ...]:
        async with service(s) as http:
            async with candidate(http, call_id, 1) as (joined, client):
                await client.wait_until(lambda: len(client.agent_lines()) >= 1)  # the greeting
                face.die_after_speaks = 0  # the next agent.speak kills the avatar's session
                answered = await client.say(answer_48k)
                await client.wait_event(ended)
                events, levels = list(client.events), list(client.levels)
                audio = bytes(client.audio or b"")
            result = await webhook_result(hook, call_id)
        return joined, events, levels, answered, audio, result

    with (
        FakeElevenLabs() as voice,
        FakeLiveAvatar() as face,
        FakeWebhook(secret=SECRET) as hook,
        loopback_only(),
    ):
        s = settings(tmp_path, gemini, voice, face, hook)
        joined, events, levels, answered, audio, result = anyio.run(main, s, face, hook)

    assert joined["videoAvatarEnabled"] is True
    (session,) = face.sessions.values()
    assert session.closed_by == "died" and session.stopped  # and still stopped at the end
    live, failed = avatar_events(events)
    assert live["state"] == "live"
    assert failed["state"] == "failed" and "LiveAvatar" in failed["reason"]
    assert any("carrying on audio-only" in r.getMessage() for r in caplog.records)
    # the greeting was the avatar's (our egress muted); the reply after the failure is heard,
    # and it is the interviewer's voice (the fake's tone)
    before = [db for t, db in levels if t <= answered]
    assert before and max(before) < SPEECH_DBFS
    assert any(db > SPEECH_DBFS for t, db in levels if t > answered)
    assert tone_share(audio, 48000) > 0.8
    # the interview completed, every line whole
    lines = transcript_lines(events)
    assert [speaker for speaker, _ in lines] == ["agent", "user", "agent"]
    assert "Goodbye." in lines[2][1]
    assert next(e for e in events if ended(e))["reason"] == "completed"
    assert result["status"] == "completed"
    assert [(e["speaker"], e["text"]) for e in result["transcript"]] == lines


def test_an_avatar_connecting_mid_greeting_never_cuts_the_greeting(
    gemini: FakeGemini, tmp_path: Path
) -> None:
    """The avatar says ``connected`` a second into the greeting (LiveAvatar boots slowly):
    the greeting must be heard whole, from the agent (it began alone) or from the avatar."""
    gemini.responder = InterviewerModel().chat  # the greeting comes at once

    async def main(s: Settings, face: FakeLiveAvatar) -> tuple[Any, ...]:
        async with service(s) as http:
            async with candidate(http, "vf-late-avatar", 1) as (_, client):
                await client.wait_until(lambda: len(client.agent_lines()) >= 1)
                return client.agent_lines()[0], list(client.levels), face.kinds()

    with (
        FakeElevenLabs() as voice,
        FakeLiveAvatar(connect_delay_s=1.0) as face,
        loopback_only(),
    ):
        s = settings(tmp_path, gemini, voice, face)
        greeting, levels, kinds = anyio.run(main, s, face)
    greeting_s = len(greeting) * voice.ms_per_char / 1000
    heard_s = sum(0.02 for _, db in levels if db > SPEECH_DBFS)
    if "agent.speak" in kinds:  # the avatar spoke the greeting: our egress must not have
        assert heard_s == 0
    else:  # the agent began it alone: all of it must be heard
        assert heard_s >= 0.9 * greeting_s, f"heard {heard_s:.2f} s of {greeting_s:.2f} s"


# --- faults ending as described (batch runs: quicker, same session and stages) -----------------


def test_elevenlabs_websocket_refused_falls_back_to_http_and_completes(
    gemini: FakeGemini, answer: bytes, tmp_path: Path
) -> None:
    refused = [WsFault(refuse=503)] * 50  # every attempt during the interview
    with FakeElevenLabs(ws_faults=list(refused)) as voice, FakeLiveAvatar() as face:
        payload, out = batch(
            tmp_path, settings(tmp_path, gemini, voice, face), answer, 1, "vf-http"
        )
    assert payload["status"] == "completed" and payload["endReason"] == "completed"
    assert voice.connections and {c.closed_by for c in voice.connections} == {"refused"}
    # every reply went over /stream, phrase by phrase, with our key, and nothing else was said
    lines = agent_lines(payload)
    assert len(lines) == 2 and "Goodbye." in lines[1]
    requests = voice.http_requests
    assert {r.status for r in requests} == {200}
    assert {r.headers["xi-api-key"] for r in requests} == {voice.api_key}
    assert norm(" ".join(r.json["text"] for r in requests)) == norm(" ".join(lines))
    # the avatar still spoke each reply, and the --out WAV holds the voice
    (session,) = face.sessions.values()
    assert len(session.speak_ends) == 2 and session.stopped
    wav = read_wav(out)
    assert tone_share(wav.pcm, wav.sample_rate) > 0.9


def revoke_after_first_reply(
    voice: FakeElevenLabs, face: FakeLiveAvatar
) -> Callable[[], Coroutine[Any, Any, None]]:
    """A fault injector: once the greeting has been spoken (the avatar got its speak_end),
    the key is revoked and the socket dropped, so the voice's reconnection is refused."""

    async def revoke() -> None:
        await wait_for(lambda: "agent.speak_end" in face.kinds(), 30)
        voice.api_key = "revoked-key"
        voice.drop_all()

    return revoke


@pytest.mark.parametrize("when", ["at_start", "mid_interview"])
def test_a_bad_elevenlabs_key_fails_the_interview_and_delivers_its_transcript(
    gemini: FakeGemini, answer: bytes, tmp_path: Path, when: str
) -> None:
    wrong = "wrong-eleven-key-0123"
    with (
        FakeElevenLabs() as voice,
        FakeLiveAvatar() as face,
        FakeWebhook(secret=SECRET) as hook,
    ):
        extra = {"elevenlabs_api_key": wrong} if when == "at_start" else {}
        s = settings(tmp_path, gemini, voice, face, hook, **extra)
        during = revoke_after_first_reply(voice, face) if when == "mid_interview" else None
        payload, _ = batch(tmp_path, s, answer, 1, f"vf-key-{when}", during)
    assert payload["status"] == "failed" and payload["endReason"] == "failed"
    error = payload["error"]
    assert error["stage"] == "voice" and "ElevenLabsAuthError" in error["message"]
    assert "ELEVENLABS_API_KEY" in error["message"] and wrong not in error["message"]
    assert {c.closed_by for c in voice.connections[-2:]} == {"auth"}
    # the result, with what was held, reached the web app, signed
    (delivered,) = hook.received
    assert delivered == payload and all(r.signature_valid for r in hook.requests)
    if when == "at_start":
        assert payload["transcript"] == []  # nothing was ever said
    else:
        assert agent_lines(payload) == [
            "Hello, welcome to your interview. Tell me about a project you are proud of."
        ]
    (session,) = face.sessions.values()
    assert session.stopped  # the avatar was stopped with the failed interview
