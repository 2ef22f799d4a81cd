"""Pacer frame-interval jitter on the real clock, optionally with the other core kept busy.

A bursty producer (200 ms chunks of 24 kHz speech-like audio, every 200 ms ± 30 ms, like a
streaming TTS provider) feeds a :class:`~stages.pacer.Pacer`; a sink timestamps every frame as
it leaves the pacer with ``time.perf_counter``. Jitter is ``|interval − frame period|`` between
consecutive frames. With ``load=True`` a separate process spins on another core for the whole
measurement (pinned there where the OS allows), to see how the pacer holds up on a busy box.

    python benchmarks/pacer_jitter.py --seconds 5 [--load] --json

Target (issue 3): p99 ≤ 5 ms unloaded.
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing
import os
import random
import time
from typing import Any

import anyio

from pipeline.audio import tone
from pipeline.frames import AgentAudio
from pipeline.metrics import percentile
from pipeline.stage import CallContext
from stages.pacer import EgressFrame, Pacer, PacerOptions

CHUNK_S = 0.2  # the producer's chunk length and mean period
CHUNK_JITTER_S = 0.03  # each chunk arrives up to this much early or late
PRODUCER_RATE = 24000  # a common TTS output rate; the pacer resamples it to 48 kHz


async def measure_pacer_jitter(seconds: float = 5.0, load: bool = False) -> dict[str, Any]:
    """Measure the pacer's egress jitter for about ``seconds`` of audio.

    Returns ``p50_ms``, ``p99_ms``, ``max_ms`` (jitter of frame intervals), ``underruns``,
    ``frames`` (intervals measured), plus ``late_ticks``, ``mean_interval_ms`` and ``load``.
    """
    if seconds <= 0:
        raise ValueError(f"seconds must be positive, got {seconds}")
    busy = await _start_load() if load else None
    try:
        return await _measure(seconds, load)
    finally:
        if busy is not None:
            _stop_load(*busy)


async def _measure(seconds: float, load: bool) -> dict[str, Any]:
    options = PacerOptions()
    period = options.frame_ms / 1000.0
    ctx = CallContext(call_id="pacer-jitter")
    pacer = Pacer(options)
    stamps: list[float] = []

    class Sink:
        async def send(self, frame: Any) -> None:
            if isinstance(frame, EgressFrame):
                stamps.append(time.perf_counter())

    chunk = tone(220.0, CHUNK_S, PRODUCER_RATE, amplitude=0.3)
    n_chunks = max(1, round(seconds / CHUNK_S))
    rng = random.Random(1234)
    send, recv = anyio.create_memory_object_stream[Any](1000)

    async def produce() -> None:
        async with send:
            start = ctx.clock.now()
            for k in range(n_chunks):
                due = start + k * CHUNK_S + rng.uniform(-CHUNK_JITTER_S, CHUNK_JITTER_S)
                await ctx.clock.sleep_until(due)
                final = k == n_chunks - 1
                await send.send(AgentAudio(0, chunk, PRODUCER_RATE, turn_id=1, final=final))

    with anyio.fail_after(seconds * 3 + 10):
        async with recv, anyio.create_task_group() as tg:
            tg.start_soon(produce)
            await pacer.run(ctx, recv, Sink())

    intervals = [b - a for a, b in itertools.pairwise(stamps)]
    jitter = sorted(abs(dt - period) * 1000.0 for dt in intervals)
    if not jitter:
        raise RuntimeError("the pacer emitted fewer than two frames")
    return {
        "p50_ms": round(percentile(jitter, 50), 3),
        "p99_ms": round(percentile(jitter, 99), 3),
        "max_ms": round(jitter[-1], 3),
        "underruns": pacer.stats.underruns,
        "frames": len(intervals),
        "late_ticks": pacer.stats.late_ticks,
        "mean_interval_ms": round(sum(intervals) / len(intervals) * 1000.0, 4),
        "load": load,
    }


# -- background load ------------------------------------------------------------------------------


def _busy(cpu: int | None, ready: Any, stop: Any) -> None:
    """Spin until told to stop (runs in a separate process)."""
    if cpu is not None:
        try:
            os.sched_setaffinity(0, {cpu})
        except OSError:
            pass
    ready.set()
    x = 0
    while not stop.is_set():
        for _ in range(20000):
            x += 1


async def _start_load() -> tuple[Any, Any]:
    """Start the busy process on the last CPU we may use; returns (process, stop event)."""
    mp = multiprocessing.get_context("spawn")
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    cpu = cpus[-1] if len(cpus) >= 2 else None
    ready, stop = mp.Event(), mp.Event()
    proc = mp.Process(target=_busy, args=(cpu, ready, stop), name="pacer-jitter-load", daemon=True)
    proc.start()
    if not await anyio.to_thread.run_sync(ready.wait, 30.0):
        _stop_load(proc, stop)
        raise RuntimeError("the load process did not start within 30 s")
    return proc, stop


def _stop_load(proc: Any, stop: Any) -> None:
    stop.set()
    proc.join(timeout=5.0)
    if proc.is_alive():
        proc.terminate()
        proc.join(timeout=5.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=5.0, help="audio to pace (default 5)")
    parser.add_argument("--load", action="store_true", help="keep another core busy meanwhile")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    if args.seconds <= 0:
        parser.error("--seconds must be positive")
    result = anyio.run(measure_pacer_jitter, args.seconds, args.load)
    if args.json:
        print(json.dumps(result))
    else:
        label = "loaded" if args.load else "unloaded"
        print(
            f"pacer jitter ({label}, {result['frames']} intervals): p50 {result['p50_ms']} ms, "
            f"p99 {result['p99_ms']} ms, max {result['max_ms']} ms; "
            f"underruns {result['underruns']}, late ticks {result['late_ticks']}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
