"""End-to-end voice-to-voice with the three provider fakes at fixed delays (DESIGN.md §6).

    python benchmarks/e2e_latency.py --json
    python benchmarks/e2e_latency.py --turns 10 --ttft-ms 200 --ttfb-ms 150 --paths batch,webrtc
    python benchmarks/e2e_latency.py --json --ack "Thank you. "   # see ``spans_ms`` below

Whole interviews of ``--turns`` questions and as many spoken answers (espeak-ng) are held
through the real session graph, configured through the environment and ``Settings`` as the
service is: ``GEMINI_*`` point at the Gemini fake (tests/fakes/gemini.py, TLS, the google-genai
SDK; ``InterviewerModel`` holds the interview, every streamed reply waits exactly ``--ttft-ms``
before its first chunk), ``ELEVENLABS_*`` at the ElevenLabs fake (its websocket; every
generation waits ``--ttfb-ms`` before its first audio) and ``HEYGEN_*`` at the LiveAvatar fake
(no delay of its own). The three fakes run in one child process, so their work never holds this
interpreter's GIL (their clock is the same ``CLOCK_MONOTONIC``, so their records line up with
ours). Paths (``--paths``):

* ``batch``: ``interview.run.run_interview`` (what ``python -m interview.run`` does): answers
  played in at real-time pace, so endpointing is real, but the pacer is not real time (no jitter
  buffer, no 20 ms tick), so its voice-to-voice is a little short of a live call's;
* ``webrtc``: the real server app (``create_app`` from the environment, under uvicorn, in a
  subprocess) and an aiortc candidate on loopback (tests/aiortc_client.py) in this process. The
  avatar is live, so the candidate's own audio from us is muted (it would hear the avatar
  through LiveKit, which cannot be faked offline): the server's figures and the avatar's;
* ``webrtc-audio``: the same without ``HEYGEN_*``: what the candidate hears, through Opus both
  ways, when there is no avatar.

Figures per turn (p50/p95 over the turns): the session's own (``endpointing_ms``,
``llm_ttft_ms``, ``tts_ttfb_ms``, ``voice_to_voice_ms`` = speech end → first egress frame,
``overhead_ms`` = voice-to-voice minus endpointing and the *measured* provider waits) and:

* ``framework_share_ms``: voice-to-voice minus endpointing minus the *configured* TTFT and TTFB
  (what the framework, the SDKs, loopback and the fakes' timer overshoot add). Speech end
  cancels out of it, so it holds over WebRTC too, where the session's speech-end mark can be
  off (see below);
* ``avatar_ms``: speech end → the reply's first ``agent.speak`` received by the LiveAvatar fake;
  ``avatar_share_ms`` is that minus endpointing and the configured waits (over WebRTC the
  speech end is the candidate's and endpointing is the configured ``VAD_STOP_MS``);
* ``client_heard_ms`` (``webrtc-audio``): the end of the candidate's speech at its microphone
  → the first frame of the reply louder than -45 dBFS at the candidate; ``client_heard_share_ms``
  is that minus ``VAD_STOP_MS`` and the configured waits (transport both ways included);
* ``spans_ms`` (batch): the gaps between consecutive timeline marks, where the time goes. The
  fake model says ``--ack`` ("Thank you.") and then calls ``next_question``; the phrase chunker
  cuts a sentence only once whitespace follows it, which here comes with the text of the next
  model request, after the tool round-trip and a second TTFT (``first_token->voice_request``).
  ``--ack "Thank you. "`` (a model that ends its words with a space) shows the share without it;
* ``tts_fake_hold_ms``: the ElevenLabs fake's own wait before each reply's first audio.

Over WebRTC the session's ``speech_end`` (and so its ``endpointing_ms`` and
``voice_to_voice_ms``) is stamped by the VAD's own frame clock, which follows the capture clock
forwards but not backwards: when a stream starts with a burst (packets held up during the
DTLS handshake) it stays ahead by the size of the burst, so those two figures read low there.
``client_heard_ms`` does not depend on it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import platform
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any
from unittest import mock

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

KEY = "e2e-bench-key-0123456789"
SPEECH_DBFS = -45.0
PATHS = ("batch", "webrtc", "webrtc-audio")
QUESTION_TEXTS = [
    "Tell me about a project you are proud of.",
    "How do you debug a slow database query?",
    "What would you change in your last team's process?",
    "How do you review a colleague's code?",
    "Describe a production incident you handled.",
    "How do you decide what to test?",
]
ANSWERS = [
    "I built a payment service in Python.",
    "I look at the query plan first.",
    "We moved the nightly jobs to a queue.",
    "I write a failing test before the fix.",
    "I talk to the team and agree on a plan.",
    "We cached the results for an hour.",
]
MARK_SPANS = (
    ("speech_end", "turn_committed"),
    ("turn_committed", "brain_request"),
    ("brain_request", "first_token"),
    ("first_token", "voice_request"),
    ("voice_request", "first_audio"),
    ("first_audio", "first_egress"),
)
FIGURES = ("endpointing_ms", "llm_ttft_ms", "tts_ttfb_ms", "voice_to_voice_ms", "overhead_ms")


@dataclass(frozen=True)
class Delays:
    """The fakes' fixed waits, in seconds, and what the fake model says."""

    ttft_s: float
    """Gemini: before the first chunk of every streamed reply."""
    ttfb_s: float
    """ElevenLabs: before the first audio of every generation."""
    ack: str = "Thank you."
    """The model's words before it calls ``next_question`` (``InterviewerModel.ack``)."""

    @property
    def total_ms(self) -> float:
        return (self.ttft_s + self.ttfb_s) * 1000


# --- the three fakes (a child process) ---------------------------------------------------------


class _TimedEvents(list[Any]):
    """The LiveAvatar fake's event list, with the monotonic time each event arrived."""

    def __init__(self) -> None:
        super().__init__()
        self.times: list[float] = []

    def append(self, item: Any) -> None:
        self.times.append(time.monotonic())
        super().append(item)


def _serve_fakes(ttft_s: float, ttfb_s: float, ack: str, conn: Connection) -> None:
    """Gemini, ElevenLabs and LiveAvatar fakes; answers ``records`` until told ``stop``."""
    from fakes.elevenlabs import FakeElevenLabs
    from fakes.gemini import FakeGemini, InterviewerModel, Recorded, Reply
    from fakes.liveavatar import FakeLiveAvatar

    model = InterviewerModel(ack=ack)

    def respond(rec: Recorded) -> Reply:
        reply = model.chat(rec)
        reply.delay_s = ttft_s  # a fixed time to first token on every streamed reply
        return reply

    gemini = FakeGemini()
    voice = FakeElevenLabs(first_byte_delay_s=ttfb_s)
    avatar = FakeLiveAvatar()
    events = _TimedEvents()
    avatar.events = events
    with gemini, voice, avatar:
        gemini.responder = respond
        env = {
            "GEMINI_API_KEY": gemini.api_key or "",
            "GEMINI_BASE_URL": gemini.base_url,
            **voice.env(),
            **avatar.env(),
        }
        conn.send({"env": env, "ca_file": gemini.ca_file})
        while (command := conn.recv()) != "stop":
            if command == "records":
                speaks = [
                    (at, e.session_id)
                    for at, e in zip(events.times, list(events), strict=False)
                    if e.kind == "agent.speak"
                ]
                conn.send({"speaks": speaks, "tts_holds": voice.first_holds()["websocket"]})


class Fakes:
    """The child process holding the fakes; ``env`` points a service at them."""

    def __init__(self, delays: Delays) -> None:
        self.delays = delays
        self.env: dict[str, str] = {}
        self.ca_file = ""

    def __enter__(self) -> Fakes:
        self._conn, child = mp.Pipe()
        self._proc = mp.get_context("spawn").Process(
            target=_serve_fakes,
            args=(self.delays.ttft_s, self.delays.ttfb_s, self.delays.ack, child),
            daemon=True,
        )
        self._proc.start()
        if not self._conn.poll(60):
            raise SystemExit("the provider fakes did not start")
        started = self._conn.recv()
        self.env, self.ca_file = started["env"], started["ca_file"]
        return self

    def records(self) -> dict[str, Any]:
        self._conn.send("records")
        return dict(self._conn.recv())

    def __exit__(self, *exc_info: object) -> None:
        with contextlib.suppress(OSError):
            self._conn.send("stop")
        self._proc.join(15)


def avatar_arrivals(
    speaks: list[tuple[float, str | None]], ends: list[float]
) -> list[float | None]:
    """For each speech end, how long until the avatar received its next ``agent.speak`` (s);
    None if it received none."""
    out: list[float | None] = []
    for end in ends:
        first = next((at for at, _sid in speaks if at > end), None)
        out.append(None if first is None else first - end)
    return out


# --- the interview -------------------------------------------------------------------------------


def join_body(call_id: str, turns: int) -> dict[str, Any]:
    questions = [
        {
            "id": f"q{i + 1}",
            "text": QUESTION_TEXTS[i % len(QUESTION_TEXTS)],
            "type": "technical",
            "duration": 3,
            "category": "bench",
        }
        for i in range(turns)
    ]
    return {
        "callId": call_id,
        "candidateName": "Ada Lovelace",
        "jobTitle": "Backend Engineer",
        "questions": questions,
    }


def spoken_answers(turns: int, rate: int) -> list[bytes]:
    """``turns`` short espeak-ng answers, mono 16-bit PCM at ``rate``."""
    from pipeline.audio import resample
    from stages.local import EspeakOptions, EspeakSynthesizer

    synth = EspeakSynthesizer(EspeakOptions(voice="en-us"))
    rendered = [synth.render(text) for text in ANSWERS[: min(turns, len(ANSWERS))]]
    return [resample(rendered[i % len(rendered)], synth.sample_rate, rate) for i in range(turns)]


def trailing_quiet_s(pcm: bytes, rate: int) -> float:
    """How long the clip ends in near-silence: its speech really ended that much earlier."""
    from pipeline.audio import rms_dbfs

    step = rate // 50 * 2
    quiet = 0
    for end in range(len(pcm), 0, -step):
        if rms_dbfs(pcm[max(0, end - step) : end]) > SPEECH_DBFS:
            break
        quiet += 1
    return quiet * 0.02


def stats(values: list[float]) -> dict[str, float] | None:
    from pipeline.metrics import percentile

    if not values:
        return None
    ordered = sorted(values)
    return {
        "p50": round(percentile(ordered, 50), 1),
        "p95": round(percentile(ordered, 95), 1),
        "max": round(ordered[-1], 1),
        "n": len(ordered),
    }


def summarize(turns: list[dict[str, Any]], delays: Delays) -> dict[str, Any]:
    """p50/p95 of the session's figures over the turns, and the framework's share."""
    out: dict[str, Any] = {"turns": len(turns)}
    for key in FIGURES:
        out[key] = stats([t[key] for t in turns if t.get(key) is not None])
    share = [
        t["voice_to_voice_ms"] - t["endpointing_ms"] - delays.total_ms
        for t in turns
        if t.get("voice_to_voice_ms") is not None and t.get("endpointing_ms") is not None
    ]
    out["framework_share_ms"] = stats(share)
    return out


async def batch_interview(
    turns: int, tmp: Path
) -> tuple[list[dict[str, Any]], list[float], dict[str, Any]]:
    """One interview through ``interview.run.run_interview``; per-turn figures and marks."""
    import interview.run as batch
    from interview.config import load_settings
    from interview.session import InterviewSession
    from pipeline.audio import WavAudio, silence

    sessions: list[InterviewSession] = []

    class Kept(InterviewSession):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            sessions.append(self)

    parts = [silence(1.0, 16000)]
    for answer in spoken_answers(turns, 16000):
        parts += [answer, silence(2.5, 16000)]
    audio = WavAudio(b"".join(parts), 16000, 1)
    settings = load_settings(environment="development", outbox_dir=str(tmp / "outbox-batch"))
    with mock.patch.object(batch, "InterviewSession", Kept):
        payload = await batch.run_interview(
            join_body("e2e-batch", turns), audio, settings=settings, out=None
        )
    if payload.get("status") != "completed":
        raise SystemExit(f"the batch interview did not complete: {payload.get('status')}")
    records = [
        r
        for r in sessions[0].ctx.timeline.turns()
        if "speech_end" in r.marks and "first_egress" in r.marks
    ]
    per_turn = []
    for record in records:
        marks = record.marks
        spans = {
            f"{a}->{b}": round((marks[b] - marks[a]) * 1000, 2)
            for a, b in MARK_SPANS
            if a in marks and b in marks
        }
        per_turn.append({**record.figures(), "spans_ms": spans})
    ends = [r.marks["speech_end"] for r in records]
    return per_turn, ends, {"llm": settings.llm_name, "voice": settings.voice_name}


# --- over WebRTC ---------------------------------------------------------------------------------


def serve(port: int) -> None:
    """The service as ``python -m server`` builds it (settings from the environment), with
    ICE kept on loopback."""
    import logging

    import uvicorn
    from aiortc_client import loopback_only

    from interview.config import load_settings
    from server import create_app

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    app = create_app(load_settings(), configure_logging=False)
    with loopback_only():
        uvicorn.run(app, host="127.0.0.1", port=port, log_level="error", log_config=None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def server_process(env: dict[str, str]) -> Iterator[str]:
    import httpx

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    args = [sys.executable, __file__, "--serve", "--port", str(port)]
    proc = subprocess.Popen(args, cwd=ROOT, env=env)
    try:
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the server did not start")
            time.sleep(0.2)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


async def webrtc_interview(
    url: str, call_id: str, turns: int
) -> tuple[list[dict[str, Any]], list[float], list[float], dict[str, Any]]:
    """One interview as an aiortc candidate: the session's per-turn figures (its ``latency``
    events), the candidate's speech ends (monotonic), what it heard and what ``/`` said."""
    import httpx
    from aiortc_client import CandidateClient, loopback_only

    answers = spoken_answers(turns, 48000)
    ends: list[float] = []
    heard: list[float] = []
    with loopback_only():
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            root = (await http.get("/", headers={"X-API-Key": KEY})).json()
            r = await http.post(
                "/join-interview", json=join_body(call_id, turns), headers={"X-API-Key": KEY}
            )
            if r.status_code != 200:
                raise SystemExit(f"join {r.status_code}: {r.text[:300]}")
            joined = r.json()
            client = CandidateClient()
            try:
                r = await client.connect(http, joined["webrtcUrl"], token=joined["clientToken"])
                if r.status_code != 201:
                    raise SystemExit(f"offer {r.status_code}: {r.text[:300]}")
                for i, answer in enumerate(answers):
                    # the interviewer's line is in the transcript once it has been played
                    await client.wait_until(lambda n=i: len(client.agent_lines()) > n, within=60)
                    ends.append(await client.say(answer) - trailing_quiet_s(answer, 48000))
                ended = await client.wait_event(lambda e: e.get("type") == "ended", within=60)
                if ended.get("reason") != "completed":
                    raise SystemExit(f"the interview ended with {ended.get('reason')}")
                for end in ends:
                    at = client.heard_at(end, SPEECH_DBFS)
                    if at is not None:
                        heard.append(at - end)
                events = list(client.events)
            finally:
                await client.close()
    latency = sorted(
        (e for e in events if e.get("type") == "latency"), key=lambda e: int(e["turnId"])
    )
    per_turn = [{k: e.get(k) for k in FIGURES} for e in latency]
    info = {"llm": root.get("llm"), "avatar": root.get("avatar")}
    return per_turn, ends, heard, info


# --- main ----------------------------------------------------------------------------------------


def run_path(path: str, fakes: Fakes, turns: int, stop_ms: int, tmp: Path) -> dict[str, Any]:
    import anyio

    delays = fakes.delays
    before = len(fakes.records()["tts_holds"])
    heard: list[float] = []
    if path == "batch":
        os.environ.update(fakes.env)
        per_turn, ends, info = anyio.run(batch_interview, turns, tmp)
        # the batch VAD's clock is the call clock: the turn's own endpointing is exact
        hangovers = [float(t["endpointing_ms"]) for t in per_turn]
    else:
        env = {**os.environ, **fakes.env}
        if path == "webrtc-audio":
            for name in ("HEYGEN_API_KEY", "HEYGEN_BASE_URL", "HEYGEN_AVATAR_ID"):
                env.pop(name, None)
        env.update(
            ENVIRONMENT="development",
            API_SECRET_KEY=KEY,
            OUTBOX_DIR=str(tmp / f"outbox-{path}"),
            SSL_CERT_FILE=fakes.ca_file,
        )
        with server_process(env) as url:
            per_turn, ends, heard, info = asyncio.run(webrtc_interview(url, f"e2e-{path}", turns))
        # measured from the candidate's clock: the configured hangover stands for endpointing
        hangovers = [float(stop_ms)] * len(ends)
    records = fakes.records()
    out = {"path": path, **info, **summarize(per_turn, delays)}
    if path != "webrtc-audio":
        arrivals = avatar_arrivals(records["speaks"], ends)
        pairs = [(a * 1000, h) for a, h in zip(arrivals, hangovers, strict=True) if a is not None]
        out["avatar_ms"] = stats([a for a, _h in pairs])
        out["avatar_share_ms"] = stats([a - h - delays.total_ms for a, h in pairs])
    if heard:
        ms = [h * 1000 for h in heard]
        out["client_heard_ms"] = stats(ms)
        out["client_heard_share_ms"] = stats([h - stop_ms - delays.total_ms for h in ms])
    out["tts_fake_hold_ms"] = stats([h * 1000 for h in records["tts_holds"][before:]])
    if path == "batch":
        keys = [f"{a}->{b}" for a, b in MARK_SPANS]
        out["spans_ms"] = {k: stats([t["spans_ms"][k] for t in per_turn]) for k in keys}
    out["per_turn"] = per_turn
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--turns", type=int, default=10, help="questions and answers (10)")
    parser.add_argument("--ttft-ms", type=float, default=200.0, help="Gemini fake's TTFT (200)")
    parser.add_argument("--ttfb-ms", type=float, default=150.0, help="ElevenLabs fake's TTFB (150)")
    parser.add_argument("--paths", default=",".join(PATHS), help="of " + ", ".join(PATHS))
    parser.add_argument(
        "--ack",
        default="Thank you.",
        help="the fake model's words before it calls next_question (default 'Thank you.'; "
        "with a trailing space the chunker can cut them before the tool round-trip)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON only")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        serve(args.port)
        return 0
    if not 1 <= args.turns <= 50:
        parser.error("--turns must be between 1 and 50")
    if args.ttft_ms < 0 or args.ttfb_ms < 0:
        parser.error("--ttft-ms and --ttfb-ms must not be negative")
    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    bad = [p for p in paths if p not in PATHS]
    if bad or not paths:
        parser.error(f"--paths: unknown {', '.join(bad) or '(none)'}; choose from {PATHS}")
    if not args.ack.strip():
        parser.error("--ack must hold some words")
    for name in ("NEXTJS_WEBHOOK_URL", "GEMINI_MODE", "GEMINI_MODEL", "VAD_STOP_MS"):
        os.environ.pop(name, None)  # this benchmark's configuration only
    from interview.config import load_settings

    stop_ms = load_settings().vad_stop_ms
    delays = Delays(args.ttft_ms / 1000, args.ttfb_ms / 1000, args.ack)
    out: dict[str, Any] = {
        "benchmark": "e2e_latency",
        "command": "python benchmarks/e2e_latency.py " + shlex.join(sys.argv[1:]),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "loadavg_start": [round(v, 2) for v in os.getloadavg()],
        "configured": {
            "llm_ttft_ms": args.ttft_ms,
            "tts_ttfb_ms": args.ttfb_ms,
            "vad_stop_ms": stop_ms,
            "avatar": "LiveAvatar fake, no delay",
            "gemini_mode": "chat",
            "model_ack": args.ack,
        },
        "turns": args.turns,
        "notes": [
            "framework_share_ms = voice_to_voice - endpointing - configured TTFT and TTFB",
            "over WebRTC the session's endpointing and voice_to_voice read low when the VAD's "
            "frame clock ran ahead of the capture clock (see the module docstring); "
            "framework_share_ms, overhead_ms and client_heard_ms do not depend on it",
        ],
        "paths": {},
    }
    with Fakes(delays) as fakes:
        os.environ["SSL_CERT_FILE"] = fakes.ca_file
        with tempfile.TemporaryDirectory(prefix="e2e-latency-") as tmp:
            for path in paths:
                started = time.monotonic()
                result = run_path(path, fakes, args.turns, stop_ms, Path(tmp))
                result["wall_s"] = round(time.monotonic() - started, 1)
                out["paths"][path] = result
    out["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    out["summary"] = {
        path: {
            key: {"p50": (r.get(key) or {}).get("p50"), "p95": (r.get(key) or {}).get("p95")}
            for key in (
                "voice_to_voice_ms",
                "framework_share_ms",
                "overhead_ms",
                "avatar_ms",
                "avatar_share_ms",
                "client_heard_ms",
                "client_heard_share_ms",
            )
            if r.get(key)
        }
        for path, r in out["paths"].items()
    }
    if args.json:
        print(json.dumps(out))
    else:
        print(json.dumps({k: v for k, v in out.items() if k != "paths"}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
