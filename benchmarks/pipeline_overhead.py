"""Pipeline overhead: F audio frames through N pass-through stages into a sink.

    python benchmarks/pipeline_overhead.py --stages 8 --frames 20000 --json
    python benchmarks/pipeline_overhead.py --stages 8 --frames 5000 --paced --json
    python benchmarks/pipeline_overhead.py --stages 8 --frames 20000 --compare pipecat --json

Frames are 20 ms of 16 kHz mono PCM (640 bytes). Latency is from the moment the source sends a
frame to the moment the sink receives it (``time.perf_counter``), so with N stages a frame makes
N + 1 hops. Unpaced, the source sends as fast as the graph takes frames (throughput); paced, it
sends one frame per millisecond on absolute deadlines (latency with idle queues).

``--compare pipecat`` runs the same workload through a Pipecat pipeline of N pass-through
FrameProcessors in the same process and run, and prints both and the ratios. Pipecat is not a
dependency of this project: install the ``bench`` extra (``make bench-compare``).
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.frames import AudioChunk
from pipeline.graph import Graph
from pipeline.metrics import percentile
from pipeline.stage import CallContext, PassThrough
from pipeline.supervisor import Supervisor

PCM = bytes(640)


def _summary(name: str, stages: int, frames: int, elapsed: float, lat: list[float]) -> dict:
    lat.sort()
    return {
        "framework": name,
        "stages": stages,
        "frames": frames,
        "received": len(lat),
        "throughput_fps": round(len(lat) / elapsed, 1) if elapsed > 0 else None,
        "latency_p50_ms": round(percentile(lat, 50) * 1000, 4) if lat else None,
        "latency_p99_ms": round(percentile(lat, 99) * 1000, 4) if lat else None,
        "latency_max_ms": round(lat[-1] * 1000, 4) if lat else None,
    }


async def _pace(i: int, t0: float, paced: bool) -> None:
    if paced:
        delay = t0 + i * 0.001 - time.perf_counter()
        if delay > 0:
            await anyio.sleep(delay)


class _Source:
    name = "source"

    def __init__(self, frames: int, paced: bool) -> None:
        self.frames, self.paced = frames, paced
        self.t0 = 0.0

    async def run(self, ctx: CallContext, inbox: Any, outbox: Any) -> None:
        clock = time.perf_counter
        self.t0 = t0 = clock()
        for i in range(self.frames):
            await _pace(i, t0, self.paced)
            await outbox.send(AudioChunk(PCM, 16000, clock()))


class _Sink:
    name = "sink"

    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.t_last = 0.0

    async def run(self, ctx: CallContext, inbox: Any, outbox: Any) -> None:
        clock = time.perf_counter
        lat = self.latencies
        async for frame in inbox:
            now = clock()
            lat.append(now - frame.capture_time)
        self.t_last = clock()


async def run_ours(stages: int, frames: int, paced: bool) -> dict:
    source, sink = _Source(frames, paced), _Sink()
    graph = Graph().chain(source, *[PassThrough(f"p{i}") for i in range(stages)], sink)
    await Supervisor(CallContext(call_id="bench"), graph).run()
    return _summary("synchire", stages, frames, sink.t_last - source.t0, sink.latencies)


async def run_pipecat(stages: int, frames: int, paced: bool) -> dict:
    from loguru import logger

    logger.remove()  # Pipecat logs every frame processor's start at DEBUG on stderr
    warnings.simplefilter("ignore", DeprecationWarning)
    from pipecat.frames.frames import EndFrame, InputAudioRawFrame
    from pipecat.pipeline.pipeline import Pipeline
    from pipecat.pipeline.runner import PipelineRunner
    from pipecat.pipeline.task import PipelineParams, PipelineTask
    from pipecat.processors.frame_processor import FrameDirection, FrameProcessor

    sent: dict[int, float] = {}
    latencies: list[float] = []
    done = anyio.Event()
    t_last = 0.0

    class Pass(FrameProcessor):
        async def process_frame(self, frame: Any, direction: FrameDirection) -> None:
            await super().process_frame(frame, direction)
            await self.push_frame(frame, direction)

    class Sink(FrameProcessor):
        async def process_frame(self, frame: Any, direction: FrameDirection) -> None:
            nonlocal t_last
            await super().process_frame(frame, direction)
            if isinstance(frame, InputAudioRawFrame):
                now = time.perf_counter()
                latencies.append(now - sent.pop(frame.id))
                if len(latencies) == frames:
                    t_last = now
                    done.set()
            await self.push_frame(frame, direction)

    pipeline = Pipeline([*[Pass() for _ in range(stages)], Sink()])
    warnings.simplefilter("ignore", DeprecationWarning)
    task = PipelineTask(
        pipeline,
        params=PipelineParams(enable_metrics=False, enable_usage_metrics=False),
        enable_rtvi=False,
        enable_turn_tracking=False,
        enable_tracing=False,
        idle_timeout_secs=None,
        cancel_on_idle_timeout=False,
    )
    runner = PipelineRunner(handle_sigint=False, handle_sigterm=False)
    t0 = 0.0

    async def feed() -> None:
        nonlocal t0
        await anyio.sleep(0.2)  # let the pipeline start
        t0 = time.perf_counter()
        for i in range(frames):
            await _pace(i, t0, paced)
            frame = InputAudioRawFrame(audio=PCM, sample_rate=16000, num_channels=1)
            sent[frame.id] = time.perf_counter()
            await task.queue_frame(frame)
        await done.wait()
        await task.queue_frame(EndFrame())

    with warnings.catch_warnings():  # PipelineTask/Runner: deprecated names, same machinery
        warnings.simplefilter("ignore", DeprecationWarning)
        async with anyio.create_task_group() as tg:
            tg.start_soon(feed)
            await runner.run(task)
    return _summary("pipecat", stages, frames, t_last - t0, latencies)


def _machine() -> dict:
    return {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": __import__("os").cpu_count(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stages", type=int, default=8, help="pass-through stages (default 8)")
    parser.add_argument("--frames", type=int, default=20000, help="frames to push (default 20000)")
    parser.add_argument("--paced", action="store_true", help="one frame per millisecond")
    parser.add_argument("--compare", choices=["pipecat"], help="also run Pipecat, same workload")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each; best is reported")
    parser.add_argument("--json", action="store_true", help="print JSON only")
    args = parser.parse_args(argv)
    if args.stages < 0 or args.frames < 1:
        parser.error("--stages must be >= 0 and --frames >= 1")

    runners: list[tuple[str, Callable[[int, int, bool], Any]]] = [("synchire", run_ours)]
    if args.compare == "pipecat":
        try:
            import pipecat  # noqa: F401
        except ImportError:
            print("pipecat-ai is not installed: run `make bench-compare`", file=sys.stderr)
            return 2
        runners.append(("pipecat", run_pipecat))

    results: dict[str, dict] = {}
    for name, fn in runners:
        best: dict | None = None
        for _ in range(args.repeat):
            gc.collect()
            r = anyio.run(fn, args.stages, args.frames, args.paced)
            key = "latency_p99_ms" if args.paced else "throughput_fps"
            better = (
                (r[key] or 0) < (best or {}).get(key, float("inf"))
                if args.paced
                else ((r[key] or 0) > (best or {}).get(key, 0))
            )
            if best is None or better:
                best = r
        assert best is not None
        results[name] = best

    out: dict[str, Any] = dict(results["synchire"])
    out["paced"] = args.paced
    out["machine"] = _machine()
    if "pipecat" in results:
        pc = results["pipecat"]
        out["pipecat"] = pc
        out["ratio"] = {
            "throughput_vs_pipecat": round(out["throughput_fps"] / pc["throughput_fps"], 2),
            "p99_latency_pipecat_over_ours": round(pc["latency_p99_ms"] / out["latency_p99_ms"], 2),
        }
    if args.json:
        print(json.dumps(out))
    else:
        print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
