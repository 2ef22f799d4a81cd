"""Capacity: how many concurrent WebRTC interviews one server process holds on this machine.

A ramp (N = 4, 8, 12, 16, 24, 32, ...): the real service (``create_app`` under uvicorn, one
process, 127.0.0.1) and N aiortc candidates on loopback (in worker processes of at most
``--clients-per-process``), each joining, connecting through the signaling route, speaking
espeak-ng answers in real time and listening to the interviewer through a whole interview.
Clients and server share the machine's cores: on a 2-core box the clients' own Opus and
SRTP work takes CPU the server would otherwise have, so the figures are a floor.

Per step: server CPU (% of one core), machine CPU, server RSS per interview, egress
frame-interval jitter (the worst interview's p99, measured where frames are handed to aiortc's
encoder), underruns (the pacer's), frames the transport filled with silence,
voice-to-voice p50/p95 as the candidate hears it (end of its speech → first loud frame of the
reply, through Opus both ways) and as the server measures it (speech end → first egress frame).
A step passes when every interview completed, jitter p99 ≤ 20 ms and the pacer had no underrun
(a reply in progress with no audio ready). Frames the transport filled with silence because the
pacer's frame was over 20 ms late are reported apart (``late_frames``): they are the jitter
tail. The ramp stops at the first failing step or when the time budget would be exceeded.

Two provider sets: ``offline`` (scripted interviewer, espeak-ng, pocketsphinx: what
development runs) and ``tone`` (the scripted interviewer with a fixed transcript and a tone for
a voice), which measures the transport and pipeline without the offline stand-ins' CPU.

    python benchmarks/capacity.py --json                     # both provider sets
    python benchmarks/capacity.py --providers tone --ramp 8,16,24,32 --json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

KEY = "capacity-bench-key-0123456789"
JITTER_LIMIT_MS = 20.0
QUESTIONS = [
    {
        "id": f"q{i}",
        "text": text,
        "type": "technical",
        "duration": 3,
        "category": "bench",
    }
    for i, text in enumerate(
        ["Tell me about a project you are proud of.", "How do you debug a slow query?"]
    )
]
ANSWERS = [
    "I built a payment service that handles two thousand requests per second.",
    "First I look at the query plan, then I check the indexes.",
]


# --- the server (a subprocess) ---------------------------------------------------------------


class ToneSynthesizer:
    """A voice that costs nothing: a 220 Hz tone, 0.25 s a word."""

    name = "tone (benchmark)"
    sample_rate = 16000

    async def synthesize(self, text: str) -> AsyncIterator[bytes]:
        from pipeline.audio import tone

        pcm = tone(220, 0.25 * max(1, len(text.split())), self.sample_rate, 0.3)
        step = self.sample_rate // 10 * 2
        for i in range(0, len(pcm), step):
            yield pcm[i : i + step]


class FixedTranscriber:
    name = "fixed (benchmark)"

    async def transcribe(self, pcm: bytes, sample_rate: int = 16000) -> str:
        return "an answer"


def tone_providers(settings: Any) -> Any:
    from interview.session import Providers
    from stages.local import ScriptedBrain

    return Providers(
        brain=ScriptedBrain(transcriber=FixedTranscriber()), synthesizer=ToneSynthesizer()
    )


def serve(port: int, providers: str, outbox: str) -> None:
    import uvicorn
    from aiortc_client import loopback_only

    from interview.config import Settings
    from interview.manager import ManagerOptions
    from interview.media import MediaOptions
    from interview.session import InterviewSession
    from server import create_app

    settings = Settings(
        environment="development",
        api_secret_key=KEY,
        outbox_dir=outbox,
        max_interviews=10_000,
        log_level="WARNING",
    )
    factory = InterviewSession
    if providers == "tone":
        factory = functools.partial(InterviewSession, providers=tone_providers)  # type: ignore[assignment]
    app = create_app(
        settings,
        session_factory=factory,
        manager_options=ManagerOptions(media=MediaOptions(join_timeout_s=60)),
        configure_logging=False,
    )
    import logging

    logging.basicConfig(level=logging.ERROR)
    with loopback_only():
        uvicorn.run(app, host="127.0.0.1", port=port, log_level="error", log_config=None)


# --- the candidates (worker processes) -------------------------------------------------------


def trailing_quiet_s(pcm: bytes, rate: int = 48000, threshold: float = -45.0) -> float:
    """How long the clip ends in near-silence (espeak leaves some): the candidate's speech
    really ended that much before its last frame was sent."""
    from pipeline.audio import rms_dbfs

    step = rate // 50 * 2
    quiet = 0
    for end in range(len(pcm), 0, -step):
        if rms_dbfs(pcm[max(0, end - step) : end]) > threshold:
            break
        quiet += 1
    return quiet * 0.02


async def candidate(
    http: Any, call_id: str, answers: list[bytes], questions: int, delay: float
) -> dict[str, Any]:
    from aiortc_client import CandidateClient

    await asyncio.sleep(delay)
    out: dict[str, Any] = {"callId": call_id, "ok": False, "v2v_ms": []}
    body = {
        "callId": call_id,
        "candidateName": "Bench Candidate",
        "jobTitle": "Engineer",
        "questions": QUESTIONS[:questions],
    }
    client = CandidateClient()
    try:
        r = await http.post("/join-interview", json=body, headers={"X-API-Key": KEY})
        if r.status_code != 200:
            out["error"] = f"join {r.status_code}: {r.text[:200]}"
            return out
        joined = r.json()
        r = await client.connect(http, joined["webrtcUrl"], token=joined["clientToken"])
        if r.status_code != 201:
            out["error"] = f"offer {r.status_code}: {r.text[:200]}"
            return out
        ends: list[float] = []
        for i in range(questions):
            await client.wait_until(lambda n=i: len(client.agent_lines()) > n, within=120)
            answer = answers[i % len(answers)]
            ends.append(await client.say(answer) - trailing_quiet_s(answer))
        ended = await client.wait_event(lambda e: e.get("type") == "ended", within=120)
        for end in ends:
            heard = client.heard_at(end)
            if heard is not None:
                out["v2v_ms"].append(round((heard - end) * 1000, 1))
        out.update(ok=ended.get("reason") == "completed", endReason=ended.get("reason"))
        out["heard_dbfs"] = round(client.loudest(), 1)
    except Exception as err:  # a failed interview is a result, not a crash of the bench
        out["error"] = f"{type(err).__name__}: {err}"
    finally:
        await client.close()
    return out


async def run_candidates(url: str, ids: list[str], questions: int, stagger: float) -> list[Any]:
    import httpx
    from aiortc_client import loopback_only

    from pipeline.audio import resample
    from stages.local import EspeakOptions, EspeakSynthesizer

    synth = EspeakSynthesizer(EspeakOptions(voice="en-us"))
    answers = [resample(synth.render(t), synth.sample_rate, 48000) for t in ANSWERS]
    with loopback_only():
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            tasks = [
                candidate(http, call_id, answers, questions, i * stagger)
                for i, call_id in enumerate(ids)
            ]
            return list(await asyncio.gather(*tasks))


def client_main(url: str, ids: list[str], questions: int, stagger: float) -> None:
    results = asyncio.run(run_candidates(url, ids, questions, stagger))
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"results": results, "cpu_s": usage.ru_utime + usage.ru_stime}))


# --- the ramp --------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _proc_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _proc_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _machine_cpu() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


def _pct(values: list[float], p: float) -> float | None:
    from pipeline.metrics import percentile

    return round(percentile(sorted(values), p), 1) if values else None


class Server:
    def __init__(self, providers: str, tmp: str) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        args = [sys.executable, __file__, "--serve", "--port", str(self.port)]
        args += ["--providers", providers, "--outbox", str(Path(tmp) / providers)]
        self.proc = subprocess.Popen(args, cwd=ROOT)

    def wait_ready(self) -> None:
        import httpx

        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            if self.proc.poll() is not None:
                raise RuntimeError("the server exited")
            time.sleep(0.2)
        raise RuntimeError("the server did not start")

    def views(self, ids: list[str]) -> list[dict[str, Any]]:
        import httpx

        out = []
        with httpx.Client(base_url=self.url, headers={"X-API-Key": KEY}, timeout=10) as http:
            for call_id in ids:
                r = http.get(f"/interviews/{call_id}")
                out.append(r.json() if r.status_code == 200 else {"callId": call_id})
        return out

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def run_step(
    server: Server, n: int, tag: str, questions: int, per_process: int, stagger: float
) -> dict[str, Any]:
    ids = [f"{tag}-{i}" for i in range(n)]
    groups = [ids[i : i + per_process] for i in range(0, n, per_process)]
    pid = server.proc.pid
    rss0, cpu0, machine0, wall0 = _proc_rss_mb(pid), _proc_cpu_s(pid), _machine_cpu(), time.time()
    workers = []
    for k, group in enumerate(groups):
        args = [sys.executable, __file__, "--client", "--url", server.url, "--questions"]
        args += [str(questions), "--ids", ",".join(group), "--stagger", str(stagger * len(groups))]
        workers.append(subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, text=True))
        time.sleep(stagger)  # interleave the processes' joins
        del k
    rss_peak = rss0
    while any(w.poll() is None for w in workers):
        rss_peak = max(rss_peak, _proc_rss_mb(pid))
        time.sleep(0.5)
    wall = time.time() - wall0
    cpu = _proc_cpu_s(pid) - cpu0
    machine1 = _machine_cpu()
    busy = (machine1[0] - machine0[0]) / max(1, machine1[1] - machine0[1])
    results: list[dict[str, Any]] = []
    client_cpu = 0.0
    for w in workers:
        out = w.stdout.read() if w.stdout else ""
        try:
            data = json.loads(out.strip().splitlines()[-1])
            results += data["results"]
            client_cpu += data["cpu_s"]
        except (ValueError, IndexError, KeyError):
            results.append({"ok": False, "error": "client process failed"})
    time.sleep(1.0)  # let the last interviews finish on the server
    views = server.views(ids)
    jitter = [v["media"]["peer"]["jitterP99Ms"] for v in views if v.get("media", {}).get("peer")]
    peers = [v["media"]["peer"] for v in views if v.get("media", {}).get("peer")]
    late = sum(p["lateFrames"] for p in peers)
    frames_out = sum(p["framesOut"] for p in peers)
    pacer_underruns = sum(v.get("usage", {}).get("underruns", 0) for v in views)
    v2v_client = [x for r in results for x in r.get("v2v_ms", [])]
    v2v_server = [
        v["latency"]["voice_to_voice_ms"]["p50"]
        for v in views
        if isinstance(v.get("latency", {}).get("voice_to_voice_ms"), dict)
    ]
    completed = sum(1 for r in results if r.get("ok"))
    worst_jitter = max(jitter) if jitter else None
    ok = (
        completed == n
        and worst_jitter is not None
        and worst_jitter <= JITTER_LIMIT_MS
        and pacer_underruns == 0
    )
    return {
        "n": n,
        "ok": ok,
        "completed": completed,
        "errors": sorted({r["error"] for r in results if r.get("error")})[:5],
        "end_reasons": sorted({str(r.get("endReason")) for r in results}),
        "wall_s": round(wall, 1),
        "server_cpu_pct_of_one_core": round(100 * cpu / wall, 1),
        "clients_cpu_pct_of_one_core": round(100 * client_cpu / wall, 1),
        "machine_cpu_pct": round(100 * busy, 1),
        "server_rss_mb": round(rss_peak, 1),
        "rss_per_interview_mb": round((rss_peak - rss0) / n, 2),
        "jitter_p99_ms_worst": worst_jitter,
        "jitter_p99_ms_median": _pct(jitter, 50),
        "underruns": pacer_underruns,
        "late_frames": late,
        "late_frames_pct": round(100 * late / frames_out, 3) if frames_out else None,
        "v2v_client_ms": {"p50": _pct(v2v_client, 50), "p95": _pct(v2v_client, 95)},
        "v2v_server_ms_p50_median": _pct(v2v_server, 50),
    }


def ramp(
    providers: str, steps: list[int], budget_end: float, args: argparse.Namespace, tmp: str
) -> dict[str, Any]:
    server = Server(providers, tmp)
    out: dict[str, Any] = {"providers": providers, "steps": []}
    try:
        server.wait_ready()
        warm = run_step(server, 1, f"{providers}-warm", 1, 1, 0.0)  # load models, spawn workers
        out["warmup_s"] = warm["wall_s"]
        out["server_rss_idle_mb"] = round(_proc_rss_mb(server.proc.pid), 1)
        step_s = warm["wall_s"] * (1 + 0.6 * (args.questions - 1)) + 15
        for n in steps:
            if time.monotonic() + step_s * (1 + n / 16) > budget_end:
                out["stopped"] = f"time budget (before N={n})"
                break
            step = run_step(server, n, f"{providers}-{n}", args.questions, args.per_process, 0.1)
            out["steps"].append(step)
            print(json.dumps({"providers": providers, **step}), file=sys.stderr)
            if not step["ok"]:
                out["stopped"] = f"N={n} failed"
                break
        passed = [s["n"] for s in out["steps"] if s["ok"]]
        out["max_n"] = max(passed) if passed else 0
    finally:
        server.stop()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--providers", choices=["offline", "tone", "both"], default="both")
    parser.add_argument("--ramp", default="4,8,12,16,24,32,40,48", help="values of N")
    parser.add_argument("--budget-s", type=float, default=600.0, help="total time budget")
    parser.add_argument("--questions", type=int, default=2, choices=[1, 2])
    parser.add_argument("--per-process", type=int, default=6, help="candidates per worker")
    # internal: the server and the client workers
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--outbox", default="", help=argparse.SUPPRESS)
    parser.add_argument("--url", default="", help=argparse.SUPPRESS)
    parser.add_argument("--ids", default="", help=argparse.SUPPRESS)
    parser.add_argument("--stagger", type=float, default=0.1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        serve(args.port, args.providers, args.outbox)
        return 0
    if args.client:
        client_main(args.url, args.ids.split(","), args.questions, args.stagger)
        return 0
    try:
        steps = sorted({int(v) for v in args.ramp.split(",") if v.strip()})
    except ValueError:
        parser.error(f"--ramp: not a list of integers: {args.ramp!r}")
    if not steps or steps[0] < 1:
        parser.error("--ramp: values must be positive")
    modes = ["tone", "offline"] if args.providers == "both" else [args.providers]
    start = time.monotonic()
    report: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
        "note": "server and clients share the machine's cores (clients run in worker "
        "processes); criterion: every interview completed, egress jitter p99 <= 20 ms "
        "(worst interview), no pacer underrun",
        "runs": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        for i, providers in enumerate(modes):
            share = (args.budget_s - (time.monotonic() - start)) / (len(modes) - i)
            report["runs"].append(ramp(providers, steps, time.monotonic() + share, args, tmp))
    report["wall_s"] = round(time.monotonic() - start, 1)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for run in report["runs"]:
            print(f"{run['providers']}: max N = {run['max_n']} ({run.get('stopped', 'ramp done')})")
            for s in run["steps"]:
                v2v = s["v2v_client_ms"]
                print(
                    f"  N={s['n']:3d} ok={s['ok']!s:5} jitter p99 {s['jitter_p99_ms_worst']} ms, "
                    f"underruns {s['underruns']}, server CPU {s['server_cpu_pct_of_one_core']}%, "
                    f"v2v p50/p95 {v2v['p50']}/{v2v['p95']} ms"
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
