"""Voice overhead: first text delta in → first audio frame out, minus the provider's wait.

    python benchmarks/voice_overhead.py --json
    python benchmarks/voice_overhead.py --replies 100 --first-byte-ms 80 --json

:class:`stages.elevenlabs.ElevenLabsVoice` runs against the local ElevenLabs fake
(tests/fakes/elevenlabs.py, a real server on 127.0.0.1, here in a child process so that it never
holds this interpreter's GIL) configured with a fixed first-byte delay. For each reply the first
delta (a whole first clause, so the chunker cuts at once) goes into the stage's inbox at t0; t1
is when the first audio frame reaches a sink right after the stage. Reported per path (the
websocket, and the HTTP ``/stream`` fallback):

* ``overhead_ms``: t1 - t0 - the configured first-byte delay (the issue's figure; it also holds
  the fake's own work and its timer overshoot, so it is an upper bound of ours);
* ``client_overhead_ms``: t1 - t0 - the wait the fake measured from the moment it had the text
  to the moment its first audio left (what our code, the loopback and the fake's parsing and
  framing cost);
* ``stage_ms``: the stage's own share, from the turn timeline: t0 → ``voice_request`` (the
  first phrase goes out) plus ``first_audio`` (the first audio is in the reply's hands) → t1.

The websocket is opened when the stage starts (in an interview, before the greeting is
written), so the replies measured find it warm; the first ``--warmup`` replies are not counted.

Also: the phrase chunker's first-chunk size in characters and words on real interviewer
sentences (the opening words of replies), the figure that decides how soon speech can start.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import anyio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.frames import AgentAudio, AgentTextDelta  # noqa: E402
from pipeline.graph import Graph  # noqa: E402
from pipeline.metrics import percentile  # noqa: E402
from pipeline.stage import CallContext, Inbox, Outbox  # noqa: E402
from pipeline.supervisor import Supervisor  # noqa: E402
from stages.elevenlabs import ElevenLabsOptions, ElevenLabsVoice  # noqa: E402
from stages.voice import PhraseChunker  # noqa: E402

TARGET_P95_MS = 5.0

SENTENCES = [
    "Thank you, that's a really helpful overview of your background.",
    "Great, let's move on to the next question.",
    "Hello Ada, thanks for joining us today for the Senior Data Engineer interview.",
    "I appreciate the detail there.",
    "That makes sense; many teams run into the same trade-off.",
    "Could you walk me through a data pipeline you designed from end to end?",
    "Tell me about a time you disagreed with a teammate and how you resolved it.",
    "Thanks for sharing that.",
    "Interesting — what would you do differently if you started that project again today?",
    "Let's talk about system design for a moment.",
    "How do you decide between batch and streaming processing for a new use case?",
    "Okay, and what metrics did you use to know the migration had succeeded?",
    "Sure, take your time.",
    "No problem at all, we can come back to that one later if you like.",
    "You mentioned Kafka earlier, so how did you handle schema changes in your topics?",
    "Right, so the next question is about leadership.",
    "What's the hardest production incident you've been part of, and what was your role?",
    "That's a good example of ownership.",
    "Now, imagine our nightly job started taking three times as long; where would you look first?",
    "Thank you, that covers the technical section.",
    "Before we wrap up, do you have any questions for us about the team or the role?",
    "Can you explain how you would test a pipeline that depends on an external API?",
    "In your experience, what makes a code review genuinely useful?",
    "Good, let me ask you something a little different.",
    "How would you explain a data quality problem to a non-technical stakeholder?",
    "I see, so you were the one who proposed the change.",
    "Tell me more about how you prioritised the backlog when everything seemed urgent.",
    "Excellent, we're almost at the end of our time.",
    "What attracted you to this position in the first place?",
    "Thank you so much for your time today, Ada; the team will be in touch with next steps.",
]

FIRST = "Thank you, "
REST = "that's a helpful overview of your background. Could you tell me more about it?"


class _Feed:
    """Sends whatever the benchmark puts into its stream."""

    name = "feed"

    def __init__(self, receive: Any) -> None:
        self.receive = receive

    async def run(self, ctx: CallContext, inbox: Inbox, outbox: Outbox) -> None:
        async with self.receive:
            async for frame in self.receive:
                await outbox.send(frame)


class _Probe:
    """Stamps the first audio of each reply and notes when each reply has finished."""

    name = "probe"

    def __init__(self) -> None:
        self.first: dict[int, float] = {}
        self.done: dict[int, anyio.Event] = {}

    async def run(self, ctx: CallContext, inbox: Inbox, outbox: Outbox) -> None:
        async for frame in inbox:
            if not isinstance(frame, AgentAudio):
                continue
            if frame.pcm and frame.epoch not in self.first:
                self.first[frame.epoch] = time.monotonic()
            if frame.final:
                self.done.setdefault(frame.epoch, anyio.Event()).set()


def _stats(values: list[float]) -> dict[str, float]:
    values = sorted(values)
    return {
        "p50": round(percentile(values, 50), 3),
        "p95": round(percentile(values, 95), 3),
        "max": round(values[-1], 3),
        "min": round(values[0], 3),
        "n": len(values),
    }


class FakeProcess:
    """The ElevenLabs fake in a child process, so that its work never holds our interpreter's
    GIL (in a thread it would, and its pauses would be counted as ours)."""

    def __init__(self, first_byte_ms: float) -> None:
        self.first_byte_ms = first_byte_ms
        self.api_key = "fake-eleven-key"  # the fake's default
        self.url = ""

    def __enter__(self) -> FakeProcess:
        script = ROOT / "tests" / "fakes" / "elevenlabs.py"
        env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
        args = ["--first-byte-ms", str(self.first_byte_ms), "--ms-per-char", "5"]
        self.proc = subprocess.Popen(
            [sys.executable, str(script), *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        assert self.proc.stdout is not None
        self.url = self.proc.stdout.readline().strip()
        if not self.url.startswith("http://"):
            raise SystemExit("the ElevenLabs fake did not start")
        return self

    def holds(self, path: str) -> list[float]:
        with urllib.request.urlopen(self.url + "/_fake/holds") as answer:
            return [float(h) for h in json.load(answer)[path]]

    def __exit__(self, *exc_info: object) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=10)


def measure(fake: FakeProcess, websocket: bool, replies: int, warmup: int) -> dict[str, Any]:
    delay_ms = fake.first_byte_ms
    options = ElevenLabsOptions(api_key=fake.api_key, base_url=fake.url, websocket=websocket)
    voice = ElevenLabsVoice(options)
    probe = _Probe()
    send, receive = anyio.create_memory_object_stream[Any](64)
    ctx = CallContext(call_id="bench")
    graph = Graph().chain(_Feed(receive), voice, probe)
    latency: list[float] = []
    own: list[float] = []

    async def drive() -> None:
        async with send:
            if websocket:
                with anyio.fail_after(10):
                    while voice.stats.connects == 0:  # noqa: ASYNC110 (a warm socket, as live)
                        await anyio.sleep(0.01)
            for _ in range(warmup + replies):
                epoch = ctx.control.next_epoch()
                probe.done[epoch] = anyio.Event()
                t0 = time.monotonic()
                await send.send(AgentTextDelta(epoch, FIRST, turn_id=epoch))
                await send.send(AgentTextDelta(epoch, REST, turn_id=epoch, final=True))
                with anyio.fail_after(10):
                    await probe.done[epoch].wait()
                latency.append((probe.first[epoch] - t0) * 1000)
                record = ctx.timeline.get(epoch)
                assert record is not None
                marks = record.marks
                own.append(
                    (marks["voice_request"] - t0 + probe.first[epoch] - marks["first_audio"]) * 1000
                )
                await anyio.sleep(0.02)  # replies do not overlap in an interview

    async def main() -> None:
        supervisor = Supervisor(ctx, graph)
        async with anyio.create_task_group() as tg:
            tg.start_soon(drive)
            result = await supervisor.run()
            if result.status != "completed":
                raise SystemExit(f"voice failed: {result.reason}")

    anyio.run(main)
    path = "websocket" if websocket else "http"
    holds = [h * 1000 for h in fake.holds(path)]
    if len(holds) != len(latency):
        raise SystemExit(f"{len(holds)} provider waits recorded for {len(latency)} replies")
    client = [total - hold for total, hold in zip(latency, holds, strict=True)][warmup:]
    latency = latency[warmup:]
    return {
        "path": path,
        "latency_ms": _stats(latency),
        "overhead_ms": _stats([v - delay_ms for v in latency]),
        "client_overhead_ms": _stats(client),
        "stage_ms": _stats(own[warmup:]),
        "stats": dict(voice.stats.__dict__),
    }


def chunker_figures() -> dict[str, Any]:
    chars, words, cuts = [], [], {"clause": 0, "words": 0, "sentence": 0}
    for sentence in SENTENCES:
        chunker = PhraseChunker()
        phrases: list[str] = []
        for token in sentence.split(" "):  # streamed word by word, as a brain writes
            phrases += chunker.feed(token + " ")
            if phrases:
                break
        first = phrases[0] if phrases else (chunker.flush() or [sentence])[0]
        chars.append(float(len(first)))
        words.append(float(len(first.split())))
        if first.rstrip("\"')”’").endswith((".", "!", "?", "…")):
            cuts["sentence"] += 1
        elif first.endswith((",", ";", ":", "—")):
            cuts["clause"] += 1
        else:
            cuts["words"] += 1
    return {
        "sentences": len(SENTENCES),
        "first_chunk_chars": {**_stats(chars), "mean": round(sum(chars) / len(chars), 1)},
        "first_chunk_words": _stats(words),
        "sentence_chars": _stats([float(len(s)) for s in SENTENCES]),
        "cut_at": cuts,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--replies", type=int, default=50, help="replies measured per path")
    parser.add_argument("--warmup", type=int, default=3, help="replies not counted")
    parser.add_argument("--first-byte-ms", type=float, default=50.0, help="the fake's delay")
    parser.add_argument("--no-http", action="store_true", help="measure the websocket only")
    parser.add_argument("--json", action="store_true", help="print JSON only")
    args = parser.parse_args(argv)
    out: dict[str, Any] = {
        "command": "python benchmarks/voice_overhead.py " + " ".join(sys.argv[1:]),
        "python": platform.python_version(),
        "first_byte_delay_ms": args.first_byte_ms,
        "target_overhead_p95_ms": TARGET_P95_MS,
        "paths": [],
    }
    with FakeProcess(args.first_byte_ms) as fake:
        out["paths"].append(measure(fake, True, args.replies, args.warmup))
    if not args.no_http:
        with FakeProcess(args.first_byte_ms) as fake:
            out["paths"].append(measure(fake, False, args.replies, args.warmup))
    ws = out["paths"][0]
    out["websocket_overhead_p95_ms"] = ws["overhead_ms"]["p95"]
    out["target_met"] = ws["overhead_ms"]["p95"] <= TARGET_P95_MS
    out["chunker"] = chunker_figures()
    if args.json:
        print(json.dumps(out))
    else:
        print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
