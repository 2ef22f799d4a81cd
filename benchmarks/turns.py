"""Turn-taking figures: VAD cost, endpointing delay, barge-in reaction, pacer jitter.

    python benchmarks/turns.py --json
    python benchmarks/turns.py --pacer-seconds 5 --json

* ``vad_us_per_frame``: CPU time (``time.process_time``) per 20 ms frame of the energy gate,
  webrtcvad and the state machine, over every fixture in ``tests/fixtures`` (16 kHz mono, so no
  resampling); the median of ``--repeat`` passes. ``vad_us_per_frame_48k_stereo`` adds the front
  end's downmix, resampling and re-framing for 48 kHz stereo input in 20 ms chunks.
* ``endpointing_delay_ms``: turn committed minus the true end of the speech, for every
  expected turn of the fixtures at the default ``stop_ms`` (700), from the ``VadStage`` in a
  graph on a virtual clock with the audio played at capture pace in 20 ms chunks (each chunk
  arrives once captured). ``endpointing_excess_ms`` is the same minus ``stop_ms``, over every
  ``stop_ms`` the fixtures list: what the VAD adds to the configured hangover.
* ``bargein_reaction_ms``: the interrupt's time on the control lane minus the true start of
  the overlapping speech, on ``bargein.wav`` and on synthetic variants: each fixture utterance
  of at least 0.6 s, brought to a common level and placed during the agent's playback at four
  sub-frame offsets, in silence, white noise (-45 dBFS), pink noise (-42 dBFS), and 12 dB
  quieter in silence. Same graph and clock as above.
* ``pacer_jitter_ms``: ``benchmarks.pacer_jitter.measure_pacer_jitter`` (frame-interval jitter
  of the real-time pacer), unloaded and with the other core busy.

Times on the virtual clock are exact and repeatable; they measure the algorithm (decision
points, frame granularity), not scheduling. Processing cost is ``vad_us_per_frame``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "fixtures"))

from pipeline.audio import read_wav, resample  # noqa: E402
from pipeline.clock import VirtualClock  # noqa: E402
from pipeline.control import Interrupt  # noqa: E402
from pipeline.frames import AudioChunk  # noqa: E402
from pipeline.graph import Graph  # noqa: E402
from pipeline.metrics import percentile  # noqa: E402
from pipeline.stage import CallContext, Collect, Inbox, Outbox  # noqa: E402
from pipeline.supervisor import Supervisor  # noqa: E402
from stages.vad import (  # noqa: E402
    FRAME_S,
    AgentSpeech,
    VadFrontEnd,
    VadOptions,
    VadStage,
    VadStateMachine,
)

FIXTURES = ROOT / "tests" / "fixtures"
RATE = 16000
SPEECH_RMS = 10 ** (-21 / 20) * 32768
"""Synthetic variants bring every clip to this level (-21 dBFS RMS over the utterance, the
fixtures' normal speaking level) before the condition's gain and background."""


def _stats(values: list[float]) -> dict[str, float | int | None]:
    if not values:
        return {"p50": None, "p95": None, "max": None, "n": 0}
    v = sorted(values)
    return {
        "p50": round(percentile(v, 50), 2),
        "p95": round(percentile(v, 95), 2),
        "max": round(v[-1], 2),
        "n": len(v),
    }


def _layout() -> dict[str, Any]:
    return json.loads((FIXTURES / "layout.json").read_text())["files"]


# ----------------------------------------------------------------------------------------------
# CPU per frame


def vad_cost(repeat: int) -> tuple[float, float, int]:
    """(µs per frame at 16 kHz mono, µs per frame from 48 kHz stereo chunks, frames per pass)."""
    audios = [read_wav(FIXTURES / name) for name in _layout()]
    frames = [a.pcm[i : i + 640] for a in audios for i in range(0, len(a.pcm) - 639, 640)]
    stereo = [resample(a.pcm, RATE, 48000, 1, 2) for a in audios]
    native, full = [], []
    for _ in range(repeat):
        front, machine = VadFrontEnd(), VadStateMachine()
        is_voiced, push = front.is_voiced, machine.push
        start = time.process_time()
        for i, frame in enumerate(frames):
            push(is_voiced(frame), i * FRAME_S)
        native.append((time.process_time() - start) / len(frames) * 1e6)
        count = 0
        start = time.process_time()
        for pcm in stereo:
            front, machine = VadFrontEnd(), VadStateMachine()
            step = 48000 * 4 // 50  # 20 ms of 48 kHz stereo
            for k in range(0, len(pcm), step):
                for f in front.push(pcm[k : k + step], 48000, 2, k / (48000 * 4)):
                    machine.push(f.voiced, f.t)
                    count += 1
        full.append((time.process_time() - start) / count * 1e6)
    return statistics.median(native), statistics.median(full), len(frames)


# ----------------------------------------------------------------------------------------------
# The stage in a graph on a virtual clock


class _Mic:
    name = "mic"

    def __init__(self, pcm: bytes, t0: float) -> None:
        self.pcm, self.t0 = pcm, t0

    async def run(self, ctx: CallContext, inbox: Inbox, outbox: Outbox) -> None:
        step = RATE // 50 * 2
        for offset in range(0, len(self.pcm), step):
            start = self.t0 + offset / (2 * RATE)
            piece = self.pcm[offset : offset + step]
            await ctx.clock.sleep_until(start + len(piece) / (2 * RATE))
            await outbox.send(AudioChunk(piece, RATE, start))


class _Agent:
    name = "agent"

    def __init__(self, agent: AgentSpeech, t0: float, span: tuple[float, float] | None) -> None:
        self.agent, self.t0, self.span = agent, t0, span

    async def run(self, ctx: CallContext, inbox: Inbox, outbox: Outbox) -> None:
        if self.span is None:
            return
        ctx.control.subscribe(lambda _: self.agent.stopped())  # as the pacer does
        await ctx.clock.sleep_until(self.t0 + self.span[0])
        self.agent.started(ctx.clock.now())
        await ctx.clock.sleep_until(self.t0 + self.span[1])
        self.agent.stopped()


def run_call(
    pcm: bytes, options: VadOptions, agent_span: tuple[float, float] | None = None
) -> tuple[float, CallContext, list[Interrupt]]:
    """Play ``pcm`` through a VadStage; returns (t0, the call context, the interrupts)."""
    clock = VirtualClock()
    ctx = CallContext(clock=clock)
    interrupts: list[Interrupt] = []
    ctx.control.subscribe(interrupts.append)

    async def main() -> float:
        t0 = clock.now()
        agent = AgentSpeech()
        graph = Graph().chain(_Mic(pcm, t0), VadStage(options, agent=agent), Collect())
        graph.add(_Agent(agent, t0, agent_span))
        await Supervisor(ctx, graph).run()
        return t0

    t0 = clock.run(main)
    return t0, ctx, interrupts


def endpointing() -> tuple[list[float], list[float]]:
    """(delays at stop_ms 700, excess over stop_ms at every listed stop_ms), in ms."""
    delays, excess = [], []
    for name, spec in _layout().items():
        pcm = read_wav(FIXTURES / name).pcm
        for expect in spec["expect"]:
            stop = expect["stop_ms"]
            t0, ctx, _ = run_call(pcm, VadOptions(stop_ms=stop))
            turns = ctx.timeline.turns()
            for record, truth in zip(turns, expect["segments"], strict=False):
                delay = (record.marks["turn_committed"] - t0) * 1000 - truth["end_ms"]
                excess.append(delay - stop)
                if stop == 700:
                    delays.append(delay)
    return delays, excess


def bargein(options: VadOptions) -> dict[str, Any]:
    """Reaction times (ms) from the true start of overlapping speech to the interrupt."""
    layout = _layout()
    reactions: list[float] = []
    by_condition: dict[str, list[float]] = {}
    misses = 0
    false_interrupts = 0
    # the fixture itself
    spec = layout["bargein.wav"]
    play = spec["agent_playback"][0]
    t0, _, events = run_call(
        read_wav(FIXTURES / "bargein.wav").pcm,
        options,
        (play["start_ms"] / 1000, play["end_ms"] / 1000),
    )
    start = spec["utterances"][0]["start_ms"]
    early = [e for e in events if (e.at - t0) * 1000 < start]
    false_interrupts += len(early)
    if len(events) > len(early):
        reactions.append((events[len(early)].at - t0) * 1000 - start)
    else:
        misses += 1
    # synthetic variants: utterances of every fixture over the agent's voice
    clips = []
    for name, spec in layout.items():
        pcm = read_wav(FIXTURES / name).pcm
        for u in spec["utterances"]:
            a, b = round(u["start_ms"] * 16), round(u["end_ms"] * 16)
            if b - a >= 0.6 * RATE:
                clip = np.frombuffer(pcm[2 * a : 2 * b], "<i2").astype(np.float64)
                clips.append(clip * (SPEECH_RMS / np.sqrt(np.mean(clip**2))))
    rng = np.random.default_rng(11)
    from make_fixtures import pink_noise, white_noise

    conditions = {  # (speech gain, background)
        "silence": (1.0, lambda n: np.zeros(n)),
        "white-45": (1.0, lambda n: white_noise(n, -45.0, rng)),
        "pink-42": (1.0, lambda n: pink_noise(n, -42.0, rng)),
        "quiet-12dB": (10 ** (-12 / 20), lambda n: np.zeros(n)),
    }
    for clip in clips:
        for offset_ms in (1000, 1007, 1013, 1019):  # sub-frame phases of the 20 ms grid
            for condition, (gain, make) in conditions.items():
                lead = round(offset_ms * 16)
                x = make(lead + len(clip) + RATE)
                x[lead : lead + len(clip)] += clip * gain
                pcm = np.clip(np.rint(x), -32768, 32767).astype("<i2").tobytes()
                t0, _, events = run_call(pcm, options, (0.3, len(x) / RATE))
                early = [e for e in events if (e.at - t0) * 1000 < offset_ms]
                false_interrupts += len(early)
                if len(events) > len(early):
                    reaction = (events[len(early)].at - t0) * 1000 - offset_ms
                    reactions.append(reaction)
                    by_condition.setdefault(condition, []).append(reaction)
                else:
                    misses += 1
    return {
        "reactions": reactions,
        "by_condition": {k: _stats(v) for k, v in by_condition.items()},
        "misses": misses,
        "false_interrupts": false_interrupts,
        "cases": 1 + len(clips) * 4 * len(conditions),
    }


# ----------------------------------------------------------------------------------------------
# Pacer jitter (another module measures it)


def pacer_jitter(seconds: float) -> tuple[dict[str, Any] | None, str | None]:
    try:
        from benchmarks.pacer_jitter import measure_pacer_jitter
    except ImportError as exc:
        return None, f"benchmarks.pacer_jitter is not available: {exc}"
    out = {
        "unloaded": anyio.run(measure_pacer_jitter, seconds, False),
        "loaded": anyio.run(measure_pacer_jitter, seconds, True),
    }
    return out, None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Turn-taking benchmark: VAD CPU per frame, endpointing delay, barge-in "
        "reaction time and pacer frame jitter (see the module docstring for definitions)."
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--repeat", type=int, default=5, help="passes for the CPU figure")
    parser.add_argument(
        "--pacer-seconds", type=float, default=10.0, help="length of each pacer jitter run"
    )
    parser.add_argument("--no-pacer", action="store_true", help="skip the pacer jitter runs")
    args = parser.parse_args(argv)
    if args.repeat < 1 or args.pacer_seconds <= 0:
        parser.error("--repeat must be at least 1 and --pacer-seconds positive")

    options = VadOptions()
    us, us_full, frames = vad_cost(args.repeat)
    delays, excess = endpointing()
    barge = bargein(options)
    reaction = _stats(barge["reactions"])
    jitter, note = (
        (None, "skipped (--no-pacer)") if args.no_pacer else pacer_jitter(args.pacer_seconds)
    )
    result: dict[str, Any] = {
        "vad_us_per_frame": round(us, 2),
        "vad_us_per_frame_48k_stereo": round(us_full, 2),
        "vad_frames_per_pass": frames,
        "endpointing_delay_ms": {**_stats(delays), "stop_ms": 700},
        "endpointing_excess_ms": _stats(excess),
        "bargein_reaction_ms": {
            **reaction,
            "interrupt_min_ms": options.interrupt_min_ms,
            "target_p95_ms": options.interrupt_min_ms + 40,
            "cases": barge["cases"],
            "misses": barge["misses"],
            "false_interrupts": barge["false_interrupts"],
            "by_condition": barge["by_condition"],
        },
        "pacer_jitter_ms": jitter,
        "targets": {
            "vad_us_per_frame": 50,
            "bargein_reaction_p95_ms": options.interrupt_min_ms + 40,
            "pacer_jitter_p99_ms_unloaded": 5,
        },
        "python": platform.python_version(),
        "machine": platform.machine(),
    }
    if note:
        result["pacer_jitter_note"] = note
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"VAD CPU per 20 ms frame   {us:.1f} µs (16 kHz mono), {us_full:.1f} µs (48 kHz stereo)")
    d = result["endpointing_delay_ms"]
    print(f"endpointing delay (700)   p50 {d['p50']} ms, p95 {d['p95']} ms over {d['n']} turns")
    e = result["endpointing_excess_ms"]
    print(f"  beyond the hangover     p50 {e['p50']} ms, p95 {e['p95']} ms")
    b = result["bargein_reaction_ms"]
    print(
        f"barge-in reaction         p50 {b['p50']} ms, p95 {b['p95']} ms over {b['n']} cases "
        f"({b['misses']} missed, {b['false_interrupts']} false)"
    )
    print(f"pacer jitter              {json.dumps(jitter) if jitter else note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
