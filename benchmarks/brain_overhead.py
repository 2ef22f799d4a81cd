"""Brain overhead: a user turn in to the first text delta out, minus the model's own time.

    python benchmarks/brain_overhead.py --json
    python benchmarks/brain_overhead.py --turns 50 --ttft-ms 100 --audio-s 3 --modes chat,live

For each mode the Gemini brain (the real google-genai SDK) runs ``--turns`` replies against
the local fake Gemini (tests/fakes/gemini.py, TLS on loopback), served from a separate process
so its own work does not share this process's interpreter. Each turn carries ``--audio-s``
seconds of 16 kHz audio. The fake waits exactly ``--ttft-ms`` before the first chunk of each
reply; the overhead of a turn is ``(first TextDelta - reply() called) - ttft``: building the
request (history, WAV, JSON, base64), TLS on loopback, the SDK, SSE or websocket parsing and
our own reading. Modes:

* ``chat``: one streamed request per reply with the turn's audio inline (a transcription
  request runs beside it, as in production);
* ``live``: the whole turn's audio sent over the open websocket when the reply starts;
* ``live-streamed``: the audio already streamed while the candidate spoke (the session's
  hooks), so the reply only sends nothing and reads;
* ``sdk``: for reference, no brain at all: the bare SDK streaming call with the same
  instruction, tools and audio (the floor the SDK, TLS and the fake put under ``chat``).

Target: p95 ≤ 5 ms of overhead.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.metrics import percentile
from stages.brain import BrainSetup, BrainTurn, TextDelta, ToolSpec
from stages.gemini import GeminiBrain, GeminiOptions

TOOLS = (
    ToolSpec("next_question", "Next question.", {"type": "object", "properties": {}}),
    ToolSpec("end_interview", "End.", {"type": "object", "properties": {}}),
)
SETUP = BrainSetup("You are an interviewer. " * 200, TOOLS)  # a plan-sized instruction


def _serve(ttft_s: float, conn: Any) -> None:
    """The fake in its own process: every reply waits ``ttft_s`` before its first chunk."""
    from tests.fakes.gemini import FakeGemini, LiveReply, say, text_reply, turn_complete

    with FakeGemini() as fake:
        fake.responder = lambda rec: text_reply("Thank you. ", "Next question?", delay_s=ttft_s)
        fake.unary_responder = lambda rec: text_reply("An answer.", delay_s=0.05)

        def live(*_: Any) -> LiveReply:
            return LiveReply([*say("Thank you. ", "Next question?"), turn_complete()], ttft_s)

        fake.live_responder = live
        conn.send((fake.base_url, fake.ca_file))
        conn.recv()  # until told to stop


async def _tools(name: str, args: dict[str, Any]) -> dict[str, Any]:
    return {"status": "ok"}


async def _measure_sdk(base_url: str, turns: int, audio: bytes, ttft: float) -> list[float]:
    from google.genai import types

    from stages.gemini import function_declarations, make_client, wav_bytes

    client = make_client("test-key", base_url, GeminiOptions())
    config = types.GenerateContentConfig(
        system_instruction=SETUP.system_instruction,
        tools=[types.Tool(function_declarations=function_declarations(SETUP.tools))],
    )
    out: list[float] = []
    try:
        for i in range(turns + 2):
            t0 = time.perf_counter()
            contents = [
                types.Content(
                    role="user",
                    parts=[
                        types.Part.from_bytes(data=wav_bytes(audio, 16000), mime_type="audio/wav")
                    ],
                )
            ]
            first = None
            stream = await client.aio.models.generate_content_stream(
                model="gemini-3.8-flash", contents=contents, config=config
            )
            async for _chunk in stream:  # read to the end: the connection is reused
                first = first or time.perf_counter()
            assert first is not None
            if i >= 2:
                out.append(first - t0 - ttft)
    finally:
        await client.aio.aclose()
    return out


async def _measure(
    mode: str, base_url: str, turns: int, audio: bytes, ttft: float, history_turns: int
) -> list[float]:
    if mode == "sdk":
        return await _measure_sdk(base_url, turns, audio, ttft)
    brain = GeminiBrain(
        "test-key",
        mode="chat" if mode == "chat" else "live",
        base_url=base_url,
        options=GeminiOptions(history_turns=history_turns),
    )
    await brain.start(SETUP, _tools)
    out: list[float] = []
    try:
        for i in range(turns + 2):  # two warm-up turns
            if mode == "live-streamed":
                await brain.speech_started()
                for k in range(0, len(audio), 640):
                    await brain.stream_audio(audio[k : k + 640], 16000)
                await brain.speech_ended()
            turn = BrainTurn(epoch=i + 1, turn_id=i + 1, audio=audio)
            t0 = time.perf_counter()
            first = None
            async for event in brain.reply(turn):
                if first is None and isinstance(event, TextDelta):
                    first = time.perf_counter()
            assert first is not None
            brain.heard(i + 1, "Thank you. Next question?", completed=True)
            if i >= 2:
                out.append(first - t0 - ttft)
    finally:
        await brain.aclose()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--turns", type=int, default=50, help="turns per mode (default 50)")
    parser.add_argument("--ttft-ms", type=float, default=100.0, help="fake time to first token")
    parser.add_argument("--audio-s", type=float, default=3.0, help="seconds of audio per turn")
    parser.add_argument("--modes", default="sdk,chat,live,live-streamed", help="comma-separated")
    parser.add_argument(
        "--history-turns",
        type=int,
        default=GeminiOptions().history_turns,
        help="chat: turns sent in full (GeminiOptions.history_turns)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON only")
    args = parser.parse_args(argv)
    if args.turns < 1 or args.ttft_ms < 0 or args.audio_s <= 0 or args.history_turns < 1:
        parser.error("--turns and --history-turns must be ≥ 1, --ttft-ms ≥ 0, --audio-s > 0")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in ("sdk", "chat", "live", "live-streamed")]
    if bad:
        parser.error(f"--modes: unknown {', '.join(bad)}")
    ttft = args.ttft_ms / 1000
    audio = (b"\x10\x00\xf0\xff" * 8000)[: int(args.audio_s * 16000) * 2]

    parent, child = mp.Pipe()
    server = mp.get_context("spawn").Process(target=_serve, args=(ttft, child), daemon=True)
    server.start()
    base_url, ca_file = parent.recv()
    os.environ["SSL_CERT_FILE"] = ca_file
    results: dict[str, Any] = {}
    try:
        for mode in modes:
            lat = sorted(
                anyio.run(_measure, mode, base_url, args.turns, audio, ttft, args.history_turns)
            )
            results[mode] = {
                "turns": len(lat),
                "overhead_p50_ms": round(percentile(lat, 50) * 1000, 2),
                "overhead_p95_ms": round(percentile(lat, 95) * 1000, 2),
                "overhead_max_ms": round(lat[-1] * 1000, 2),
            }
    finally:
        parent.send("stop")
        server.join(10)
    out = {
        "benchmark": "brain_overhead",
        "ttft_ms": args.ttft_ms,
        "audio_s": args.audio_s,
        "history_turns": args.history_turns,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "target_p95_ms": 5.0,
        "modes": results,
    }
    if args.json:
        print(json.dumps(out))
    else:
        for mode, r in results.items():
            print(
                f"{mode:14s} overhead p50 {r['overhead_p50_ms']:.2f} ms  "
                f"p95 {r['overhead_p95_ms']:.2f} ms  max {r['overhead_max_ms']:.2f} ms "
                f"({r['turns']} turns, ttft {args.ttft_ms:g} ms, {args.audio_s:g} s audio)"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
