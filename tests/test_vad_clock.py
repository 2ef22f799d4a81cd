"""The VAD follows the capture clock back when a burst of queued audio ran it ahead."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.audio import read_wav
from pipeline.clock import VirtualClock
from pipeline.frames import AudioChunk, UserSpeechStarted, UserSpeechStopped
from pipeline.graph import Graph
from pipeline.stage import CallContext, Collect
from pipeline.supervisor import Supervisor
from stages.vad import VadStage

FIXTURES = Path(__file__).parent / "fixtures"
BASE = 100.0
CHUNK = 320 * 2  # 20 ms at 16 kHz


def run(burst: int) -> tuple[float, float, float, float]:
    """Play answer_single.wav; its first ``burst`` chunks arrive at once (all stamped BASE, as a
    transport stamps packets queued during a handshake), the rest at their real pace."""
    audio = read_wav(FIXTURES / "answer_single.wav")
    truth = json.loads((FIXTURES / "layout.json").read_text())["files"]["answer_single.wav"]
    utterance = truth["utterances"][0]
    chunks = [audio.pcm[i : i + CHUNK] for i in range(0, len(audio.pcm), CHUNK)]

    def stamp(i: int) -> float:
        return BASE if i < burst else BASE + (i - burst + 1) * 0.02

    class Source:
        name = "src"

        async def run(self, ctx: CallContext, inbox: Any, outbox: Any) -> None:
            for i, pcm in enumerate(chunks):
                await outbox.send(AudioChunk(pcm, 16000, stamp(i)))

    sink = Collect("sink")
    graph = Graph().chain(Source(), VadStage(), sink)
    clock = VirtualClock()

    async def main() -> None:
        await Supervisor(CallContext(clock=clock), graph).run()

    clock.run(main)
    start = next(f.at for f in sink.frames if isinstance(f, UserSpeechStarted))
    end = next(f.at for f in sink.frames if isinstance(f, UserSpeechStopped))
    # where the capture clock says the utterance was
    true_start = stamp(int(utterance["start_ms"] / 20))
    true_end = stamp(int(utterance["end_ms"] / 20))
    return start, end, true_start, true_end


def test_speech_times_follow_the_capture_clock_after_a_burst() -> None:
    start, end, true_start, true_end = run(burst=20)  # 400 ms of audio arrived at once
    assert abs(start - true_start) <= 0.06
    assert abs(end - true_end) <= 0.06


def test_without_a_burst_nothing_moves() -> None:
    start, end, true_start, true_end = run(burst=0)
    assert abs(start - true_start) <= 0.06
    assert abs(end - true_end) <= 0.06
