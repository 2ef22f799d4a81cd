"""Whole offline interviews: the batch CLI, and the service from join to a signed webhook."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from fakes.webhook import FakeWebhook

from interview.config import Settings
from interview.results import verify_signature
from interview.session import SHUTDOWN_LINE, InterviewSession
from pipeline.audio import read_wav, resample, rms_dbfs, silence, write_wav
from server import create_app
from stages.local import EspeakOptions, EspeakSynthesizer

ROOT = Path(__file__).resolve().parent.parent
QUESTIONS = {
    "callId": "batch-1",
    "candidateName": "Ada Lovelace",
    "jobTitle": "Backend Engineer",
    "questions": [
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
            "keyPoints": ["indexes"],
        },
    ],
    "someFieldTheWebAppAdds": True,
}
ANSWERS = [
    "I built a payment service that handles two thousand requests per second.",
    "First I look at the query plan, then I check the indexes.",
]


@pytest.fixture(scope="module")
def candidate_wav(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two spoken answers separated by long silences, 16 kHz mono."""
    synth = EspeakSynthesizer(EspeakOptions(voice="en-us"))
    parts = [silence(1.0, 16000)]
    for text in ANSWERS:
        parts += [resample(synth.render(text), synth.sample_rate, 16000), silence(2.0, 16000)]
    path = tmp_path_factory.mktemp("candidate") / "candidate.wav"
    write_wav(path, b"".join(parts), 16000)
    return path


def _run(args: list[str], tmp: Path, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {**os.environ, "OUTBOX_DIR": str(tmp / "outbox"), "ENVIRONMENT": "development"}
    environ.pop("NEXTJS_WEBHOOK_URL", None)
    environ.update(env)
    return subprocess.run(
        [sys.executable, "-m", "interview.run", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=environ,
    )


def test_batch_run_holds_a_whole_offline_interview(candidate_wav: Path, tmp_path: Path) -> None:
    q = tmp_path / "q.json"
    q.write_text(json.dumps(QUESTIONS))
    out = tmp_path / "agent.wav"
    proc = _run(
        ["--questions", str(q), "--audio", str(candidate_wav), "--out", str(out), "--json"],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    payload = json.loads(proc.stdout)  # stdout is the payload alone; logs went to stderr
    assert payload["interviewId"] == "batch-1"
    assert payload["status"] == "completed" and payload["endReason"] == "completed"
    assert payload["questionsAsked"] == payload["totalQuestions"] == 2
    speakers = [e["speaker"] for e in payload["transcript"]]
    assert speakers == ["agent", "user", "agent", "user", "agent"]
    agent = [e["text"] for e in payload["transcript"] if e["speaker"] == "agent"]
    assert "Ada Lovelace" in agent[0] and QUESTIONS["questions"][0]["text"] in agent[0]
    assert QUESTIONS["questions"][1]["text"] in agent[1]
    user = [e["text"] for e in payload["transcript"] if e["speaker"] == "user"]
    assert all(user)  # pocketsphinx heard something in each answer
    stamps = [e["timestamp"] for e in payload["transcript"]]
    assert stamps == sorted(stamps)
    latency = payload["latency"]
    assert latency["turns"] == 2
    assert latency["endpointing_ms"]["n"] == 2 and latency["voice_to_voice_ms"]["n"] == 2
    # what the interviewer said was written, and is speech, not silence
    voice = read_wav(out)
    assert voice.sample_rate == 24000 and voice.duration > 5
    assert rms_dbfs(voice.pcm) > -40
    # and the result was kept in the outbox (no webhook configured)
    pending = list((tmp_path / "outbox" / "pending").glob("batch-1.*.json"))
    assert len(pending) == 1


def test_batch_run_ends_as_candidate_left_when_answers_run_out(
    candidate_wav: Path, tmp_path: Path
) -> None:
    body = dict(QUESTIONS, callId="batch-2")
    body["questions"] = [
        *QUESTIONS["questions"],
        {
            "id": "q3",
            "text": "Any questions for us?",
            "type": "open",
            "duration": 2,
            "category": "closing",
        },
    ]
    q = tmp_path / "q.json"
    q.write_text(json.dumps(body))
    proc = _run(["--questions", str(q), "--audio", str(candidate_wav), "--json"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    payload = json.loads(proc.stdout)
    assert payload["endReason"] == "candidate_left"
    assert payload["status"] == "completed"  # the candidate did speak
    assert payload["questionsAsked"] == 3 and payload["totalQuestions"] == 3


@pytest.mark.parametrize(
    ("content", "audio", "expected"),
    [
        ("{not json", None, "not valid JSON"),
        (json.dumps({**QUESTIONS, "questions": []}), None, "questions"),
        (json.dumps(QUESTIONS), "text", "not a WAV"),
        (json.dumps(QUESTIONS), "missing", "no such file"),
    ],
)
def test_batch_run_bad_input_is_one_line_and_exit_2(
    tmp_path: Path, candidate_wav: Path, content: str, audio: str | None, expected: str
) -> None:
    q = tmp_path / "q.json"
    q.write_text(content)
    wav = candidate_wav
    if audio == "text":
        wav = tmp_path / "notes.wav"
        wav.write_text("hello")
    elif audio == "missing":
        wav = tmp_path / "nope.wav"
    proc = _run(["--questions", str(q), "--audio", str(wav), "--json"], tmp_path)
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0]


def test_service_join_then_shutdown_delivers_a_signed_result(tmp_path: Path) -> None:
    """The web app's payload starts an offline interview; shutting it down delivers its result."""
    from starlette.testclient import TestClient

    key, secret = "test-key-0123456789", "hook-secret-0123456789"
    with FakeWebhook(secret=secret) as hook:
        settings = Settings(
            environment="development",
            api_secret_key=key,
            webhook_secret=secret,
            nextjs_webhook_url=hook.url,
            outbox_dir=str(tmp_path / "outbox"),
        )
        # no media transport: the interview starts at once (the WebRTC path, which waits for
        # the candidate's peer, is tested end to end in tests/test_signaling.py)
        app = create_app(
            settings,
            configure_logging=False,
            session_factory=lambda request, s, results, transport=None: InterviewSession(
                request, s, results
            ),
        )
        headers = {"X-API-Key": key}
        with TestClient(app) as client:
            body = dict(QUESTIONS, callId="live-1")
            r = client.post("/python-api/join-interview", json=body, headers=headers)
            assert r.status_code == 200, r.text
            assert r.json()["success"] is True and r.json()["callId"] == "live-1"
            _wait(lambda: _agent_said(client, headers), what="the greeting")
            r = client.post("/agents/live-1/shutdown", headers=headers)
            assert r.status_code == 200 and r.json()["success"] is True
            _wait(lambda: bool(hook.received), what="the webhook", timeout=30)
        request = hook.requests[-1]
        assert request.signature_valid
        assert verify_signature(secret, request.headers["x-synchire-signature"], request.body)
        payload = request.json
        assert payload["interviewId"] == "live-1" and payload["endReason"] == "shutdown"
        assert payload["status"] == "abandoned"  # nobody answered
        assert "Ada Lovelace" in payload["transcript"][0]["text"]
        # the candidate was told why the interview stopped before it ended
        assert SHUTDOWN_LINE in payload["transcript"][-1]["text"]
        assert request.idempotency_key


def _agent_said(client: Any, headers: dict[str, str]) -> bool:
    view = client.get("/interviews/live-1", headers=headers).json()
    return any(e["speaker"] == "agent" for e in view.get("transcript", []))


def _wait(check: Any, *, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout  # a hang guard, not a performance assertion
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)
