"""Headless Chromium opens /demo and holds a spoken interview with the offline interviewer.

The real service runs as a subprocess (``python -m server``, development, offline stand-ins);
Debian's chromium runs headless with a fake microphone that plays a WAV of spoken answers, and
is driven over the Chrome DevTools Protocol (``--remote-debugging-port=0``, the port read from
``DevToolsActivePort``, commands sent with ``websockets``). The page itself must prove both
directions: its transcript shows the candidate's answers (our audio reached the server's VAD
and transcriber) and the interviewer's lines, and ``getStats()`` reports received audio energy
(the interviewer's Opus reached the browser and was decoded).

Chromium is a system package (``apt-get install -y chromium``; ``.ci/run`` installs it). When it
is missing the test is skipped, except under ``CI=true``, where it fails.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.sync.client import ClientConnection, connect

from pipeline.audio import resample, silence, write_wav
from stages.local import EspeakOptions, EspeakSynthesizer

ROOT = Path(__file__).resolve().parent.parent
KEY = "browser-test-key-0123456789"
SCREENSHOT = Path(tempfile.gettempdir()) / "synchire-demo.png"
"""Where the page is captured once the exchanges are done (to look at; not compared)."""
HANG_GUARD_S = 120.0
"""Upper bound for anything to happen; a hang guard, not a performance assertion."""

CANDIDATE = "Ada"
JOB_TITLE = "Engineer"
QUESTIONS = [
    {
        "id": "q1",
        "text": "Tell me about a project you are proud of.",
        "type": "behavioral",
        "duration": 2,
        "category": "experience",
    },
    {
        "id": "q2",
        "text": "How do you debug a slow database query?",
        "type": "technical",
        "duration": 2,
        "category": "technical",
    },
]
ANSWERS = [
    "I built a payment service that handles two thousand requests per second.",
    "First I look at the query plan, then I check the indexes.",
]
LEAD_IN_S = 12.0
"""Silence before the first answer: the microphone opens before the join, then come the
connection and the greeting with the first question (about 9.5 s of espeak). Answering after
the interviewer has finished keeps the run free of barge-ins."""
GAP_S = 8.0
"""Silence between the answers: endpointing (0.7 s), the reply, and the acknowledgement with the
second question (about 4 s)."""
TAIL_S = 20.0
"""Silence after the second answer; Chromium loops the file, and the test is done before."""
WAV_RATE = 48000


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes")


def _require_chromium() -> str:
    """The chromium binary; skip without it, but fail under CI=true (it must be installed)."""
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path is not None:
            return path
    reason = "chromium is not installed (apt-get install -y chromium; .ci/run installs it)"
    if _truthy(os.environ.get("CI")):
        pytest.fail(f"CI=true: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def answers_wav(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fake microphone: silence, an answer, silence, an answer, silence (48 kHz mono)."""
    synth = EspeakSynthesizer(EspeakOptions(voice="en-us"))
    parts = [silence(LEAD_IN_S, WAV_RATE)]
    for i, text in enumerate(ANSWERS):
        parts.append(resample(synth.render(text), synth.sample_rate, WAV_RATE))
        parts.append(silence(GAP_S if i < len(ANSWERS) - 1 else TAIL_S, WAV_RATE))
    path = tmp_path_factory.mktemp("microphone") / "answers.wav"
    write_wav(path, b"".join(parts), WAV_RATE)
    return path


# --- the service ------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _tail(path: Path, chars: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


@contextmanager
def serve(tmp: Path) -> Iterator[str]:
    """``python -m server`` in development on a free loopback port; yields its base URL."""
    port = _free_port()
    env = {
        **os.environ,
        "ENVIRONMENT": "development",
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "API_SECRET_KEY": KEY,
        "OUTBOX_DIR": str(tmp / "outbox"),
        "MAX_INTERVIEW_MINUTES": "3",
        "SHUTDOWN_GRACE_SECONDS": "2",
    }
    for name in (  # offline stand-ins only, nothing leaves the machine, the demo on
        "GEMINI_API_KEY",
        "ELEVENLABS_API_KEY",
        "HEYGEN_API_KEY",
        "STREAM_API_KEY",
        "STREAM_API_SECRET",
        "NEXTJS_WEBHOOK_URL",
        "ICE_SERVERS",
        "ENABLE_DEMO",
    ):
        env.pop(name, None)
    log = tmp / "server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "server"], cwd=ROOT, env=env, stdout=out, stderr=out
        )
    base = f"http://127.0.0.1:{port}"
    try:
        _until(lambda: _healthy(base, proc, log), what="the server to start", timeout=30)
        yield base
    finally:
        proc.terminate()  # SIGTERM: the server drains its interviews and exits
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _healthy(base: str, proc: subprocess.Popen[bytes], log: Path) -> bool:
    if proc.poll() is not None:
        raise AssertionError(f"the server exited ({proc.returncode}):\n{_tail(log)}")
    try:
        return httpx.get(f"{base}/health", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def _until(check: Callable[[], Any], *, what: str, timeout: float = HANG_GUARD_S) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.25)


# --- the browser, over the DevTools protocol ---------------------------------------------------


class DevToolsError(RuntimeError):
    """A DevTools command failed, or the page threw."""


class DevTools:
    """A minimal Chrome DevTools Protocol client: one websocket to the browser, commands sent
    to one page through a flattened session. Events are recorded, not dispatched."""

    def __init__(self, ws: ClientConnection) -> None:
        self._ws = ws
        self._next_id = 0
        self.session: str | None = None
        self.exceptions: list[str] = []
        """Uncaught exceptions in the page (``Runtime.exceptionThrown``)."""
        self.console: list[str] = []
        """Console messages of the page, ``level: text``."""
        self.requests: list[str] = []
        """URL of every request the page made (``Network.requestWillBeSent``)."""

    def call(self, method: str, *, timeout: float = 30.0, **params: Any) -> dict[str, Any]:
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params}
        if self.session is not None and not method.startswith(("Target.", "Browser.")):
            message["sessionId"] = self.session
        self._ws.send(json.dumps(message))
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DevToolsError(f"{method}: no answer within {timeout:.0f} s")
            reply = json.loads(self._ws.recv(timeout=remaining))
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise DevToolsError(f"{method}: {reply['error']}")
                result: dict[str, Any] = reply.get("result", {})
                return result
            self._record(reply)

    def _record(self, event: dict[str, Any]) -> None:
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            text = details.get("exception", {}).get("description") or details.get("text")
            self.exceptions.append(str(text))
        elif method == "Runtime.consoleAPICalled":
            args = " ".join(str(a.get("value", a.get("description", ""))) for a in params["args"])
            self.console.append(f"{params.get('type')}: {args}")
        elif method == "Network.requestWillBeSent":
            self.requests.append(params["request"]["url"])

    def open_page(self) -> None:
        """A new tab, attached; runtime, page and network events on."""
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)[
            "sessionId"
        ]
        for domain in ("Runtime", "Page", "Network"):
            self.call(f"{domain}.enable")

    def evaluate(self, expression: str) -> Any:
        """The JSON value of a JavaScript expression in the page (promises awaited)."""
        result = self.call(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text")
            raise DevToolsError(f"evaluating {expression[:80]!r}: {text}")
        return result.get("result", {}).get("value")

    def navigate(self, url: str) -> None:
        answer = self.call("Page.navigate", url=url)
        if answer.get("errorText"):
            raise DevToolsError(f"navigating to {url}: {answer['errorText']}")
        _until(
            lambda: self.evaluate("document.readyState") == "complete",
            what=f"{url} to load",
            timeout=30,
        )

    def screenshot(self, path: Path) -> None:
        data = self.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        path.write_bytes(base64.b64decode(data["data"]))


def chromium_args(binary: str, profile: Path, microphone: Path) -> list[str]:
    """Headless, no network of its own, a fake microphone playing ``microphone`` (looped)."""
    return [
        binary,
        "--headless=new",
        "--no-sandbox",  # we run as root in a container
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--autoplay-policy=no-user-gesture-required",
        "--use-fake-ui-for-media-stream",  # grant the microphone without asking
        "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-audio-capture={microphone}",
        "--remote-debugging-port=0",
        "--window-size=1000,1300",
        "about:blank",
    ]


@contextmanager
def launch(binary: str, profile: Path, microphone: Path) -> Iterator[DevTools]:
    """Start chromium and connect to its DevTools websocket; stop it afterwards."""
    profile.mkdir(parents=True, exist_ok=True)
    log = profile.parent / "chromium.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            chromium_args(binary, profile, microphone),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
        )
    try:
        port_file = profile / "DevToolsActivePort"

        def endpoint() -> str | None:
            if proc.poll() is not None:
                raise AssertionError(f"chromium exited ({proc.returncode}):\n{_tail(log)}")
            lines = port_file.read_text().split() if port_file.exists() else []
            return f"ws://127.0.0.1:{lines[0]}{lines[1]}" if len(lines) >= 2 else None

        url = _until(endpoint, what="chromium's DevTools port", timeout=30)
        with connect(url, max_size=None, open_timeout=10) as ws:
            yield DevTools(ws)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# --- the test ---------------------------------------------------------------------------------


STATE = """(() => {
  const s = window.demoState;
  const shown = (who) => document.querySelectorAll(`#transcript li.${who}`).length;
  return {
    phase: s.phase, error: s.error, callId: s.callId, connectionState: s.connectionState,
    dataChannelState: s.dataChannelState, transcript: s.transcript, progress: s.progress,
    latency: s.latency, eventTypes: s.events.map((e) => e && e.type), audio: s.audio,
    mic: s.mic, endedReason: s.endedReason, userShown: shown("user"),
    agentShown: shown("agent"), progressText: document.getElementById("progress").textContent,
    latencyRows: document.querySelectorAll("#latency tbody tr").length,
  };
})()"""


def _exchanges_done(state: dict[str, Any]) -> bool:
    if state["error"] or state["phase"] in ("error", "ended"):
        raise AssertionError(f"the page stopped: {state['phase']}: {state['error']}")
    return bool(
        state["userShown"] >= 2 and state["agentShown"] >= 2 and state["audio"]["totalAudioEnergy"]
    )


def test_demo_page_holds_two_spoken_exchanges(tmp_path: Path, answers_wav: Path) -> None:
    binary = _require_chromium()
    with serve(tmp_path) as base, launch(binary, tmp_path / "profile", answers_wav) as browser:
        browser.open_page()
        browser.navigate(f"{base}/demo?key={KEY}")
        # the key was read from the address, then removed from it
        assert browser.evaluate("document.getElementById('api-key').value") == KEY
        assert browser.evaluate("location.search") == ""
        fill = {"candidate-name": CANDIDATE, "job-title": JOB_TITLE}
        fill["questions"] = json.dumps(QUESTIONS, indent=2)
        for element, value in fill.items():
            browser.evaluate(f"document.getElementById('{element}').value = {json.dumps(value)}")
        browser.evaluate("document.getElementById('join-form').requestSubmit()")

        state: dict[str, Any] = {}

        def progressed() -> bool:
            state.update(browser.evaluate(STATE))
            return _exchanges_done(state)

        try:
            _until(progressed, what="two exchanges on the page")
        finally:
            browser.screenshot(SCREENSHOT)
            if browser.exceptions or state.get("error"):
                print("page:", state, browser.exceptions, browser.console, sep="\n")

        # the page showed both sides, as the data channel delivered them
        speakers = [e["speaker"] for e in state["transcript"]]
        assert speakers.count("user") >= 2 and speakers.count("agent") >= 2
        assert all(e["text"].strip() for e in state["transcript"])
        assert CANDIDATE in state["transcript"][0]["text"]  # the greeting
        assert "transcript" in state["eventTypes"] and "progress" in state["eventTypes"]
        assert state["progressText"].startswith("Question 2 of 2")
        assert state["connectionState"] == "connected" and state["dataChannelState"] == "open"
        # both directions of media: we sent the microphone, we received and decoded speech
        assert state["mic"]["packetsSent"] > 0
        assert state["audio"]["packetsReceived"] > 0 and state["audio"]["totalAudioEnergy"] > 0
        assert state["audio"]["maxAudioLevel"] > 0.05  # speech (above -26 dBFS), not codec noise
        # the server holds the same interview
        headers = {"X-API-Key": KEY}
        view = httpx.get(f"{base}/interviews/{state['callId']}", headers=headers).json()
        assert sum(e["speaker"] == "user" for e in view["transcript"]) >= 2

        # hanging up ends the interview on the server too
        browser.evaluate("document.getElementById('hangup').click()")
        _until(
            lambda: (
                httpx.get(f"{base}/interviews/{state['callId']}", headers=headers).json()["state"]
                == "ended"
            ),
            what="the interview to end after hanging up",
        )
        assert browser.evaluate("window.demoState.phase") == "ended"
        # the page needs nothing but this server (no CDN: it works offline)
        origin = base + "/"
        foreign = [u for u in browser.requests if not u.startswith((origin, "data:", "blob:"))]
        assert foreign == [] and browser.exceptions == []
        # each answered turn's latency was shown as it happened
        assert "latency" in state["eventTypes"], "no latency event came over the data channel"
        assert state["latencyRows"] >= 1
