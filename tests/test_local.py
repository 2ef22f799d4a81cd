"""The offline stand-ins: espeak-ng voice, pocketsphinx transcriber, scripted interviewer."""

from __future__ import annotations

import re
import threading
from typing import Any

import anyio
import numpy as np
import pytest

from pipeline.audio import rms_dbfs, silence
from pipeline.clock import VirtualClock
from pipeline.frames import AgentAudio, AgentTextDelta
from pipeline.graph import Graph
from pipeline.stage import CallContext, Collect
from pipeline.supervisor import Supervisor
from stages import local
from stages.brain import (
    Brain,
    BrainError,
    BrainEvent,
    BrainSetup,
    BrainTurn,
    TextDelta,
    ToolCalled,
    UserTranscript,
)
from stages.local import (
    EspeakOptions,
    EspeakSynthesizer,
    OfflineUnavailable,
    PocketsphinxTranscriber,
    ScriptedBrain,
    Transcriber,
)
from stages.voice import PhraseChunker, Synthesizer, VoiceStage

# --- espeak-ng -----------------------------------------------------------------------------------


async def speak(synth: EspeakSynthesizer, text: str) -> list[bytes]:
    return [chunk async for chunk in synth.synthesize(text)]


def test_espeak_speaks_and_longer_text_takes_longer() -> None:
    synth = EspeakSynthesizer()
    assert isinstance(synth, Synthesizer)
    assert synth.name == "espeak-ng (offline)"
    assert synth.sample_rate == 22050

    async def main() -> tuple[list[bytes], list[bytes]]:
        return await speak(synth, "Hello."), await speak(synth, "Hello, and welcome to the team.")

    short, long = anyio.run(main)
    short_pcm, long_pcm = b"".join(short), b"".join(long)
    assert rms_dbfs(short_pcm) > -40  # speech, not silence
    assert len(long_pcm) > 1.5 * len(short_pcm)
    # Chunks of chunk_ms (100 ms) each, the last one possibly shorter.
    step = synth.sample_rate // 10 * 2
    assert all(len(c) == step for c in long[:-1]) and 0 < len(long[-1]) <= step
    # Voiced and unvoiced stretches: not a flat tone or noise.
    frames = np.frombuffer(long_pcm, np.int16).astype(np.float64)[: len(long_pcm) // 2 // 441 * 441]
    energy = np.sqrt(np.mean(frames.reshape(-1, 441) ** 2, axis=1))
    assert energy.max() > 10 * max(energy.min(), 1.0)


class CancelAfter(threading.Event):
    """A cancel flag that turns itself on after ``n`` checks (espeak-ng checks it per chunk)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n = n

    def is_set(self) -> bool:
        self.n -= 1
        return self.n < 0 or super().is_set()


def test_espeak_is_serialised_and_survives_cancellation() -> None:
    synth = EspeakSynthesizer(EspeakOptions(voice="en-us", rate_wpm=200))
    text = "The quick brown fox jumps over the lazy dog."
    expected = synth.render(text)
    long_text = text * 10
    full = synth.render(long_text)
    aborted = synth.render(long_text, CancelAfter(3))
    assert 0 < len(aborted) < len(full) / 5

    async def main() -> list[bytes]:
        # A synthesis abandoned mid-way (wherever the cancel lands) must not disturb the next.
        async with anyio.create_task_group() as tg:
            tg.start_soon(speak, synth, long_text)
            await anyio.sleep(0.002)
            tg.cancel_scope.cancel()
        results: list[bytes] = [b""] * 3

        async def one(i: int) -> None:
            results[i] = b"".join(await speak(synth, text))

        async with anyio.create_task_group() as tg:
            for i in range(3):
                tg.start_soon(one, i)
        return results

    # espeak-ng's pitch flutter carries over between calls, so renders differ by a few samples;
    # unserialised calls would interleave into one garbled buffer and leave the others empty.
    for pcm in anyio.run(main):
        assert abs(len(pcm) - len(expected)) < 0.05 * len(expected)
        assert rms_dbfs(pcm) == pytest.approx(rms_dbfs(expected), abs=1.5)
    assert synth.render("   ") == b""


def test_espeak_bad_options_and_missing_library_are_named(monkeypatch: Any) -> None:
    with pytest.raises(ValueError, match=r"EspeakOptions\.voice"):
        EspeakSynthesizer(EspeakOptions(voice="no-such-voice-xx"))
    with pytest.raises(ValueError, match="rate_wpm"):
        EspeakOptions(rate_wpm=10)
    import espeakng_loader

    monkeypatch.setattr(espeakng_loader, "get_library_path", lambda: "/nonexistent/libespeak.so")
    with pytest.raises(OfflineUnavailable, match="espeakng-loader"):
        local._Espeak()


# --- pocketsphinx --------------------------------------------------------------------------------

NUMBERS = {"two", "three", "four", "five"}


def test_pocketsphinx_recognises_espeak_speech_but_not_silence_or_noise() -> None:
    voice = EspeakSynthesizer(EspeakOptions(voice="en-us"))
    speech = voice.render("Two three four five.")
    noise = np.random.default_rng(7).normal(0, 4000, 16000 * 2).clip(-32768, 32767)
    transcriber = PocketsphinxTranscriber()
    assert isinstance(transcriber, Transcriber)

    async def main() -> list[str]:
        return [
            await transcriber.transcribe(speech, voice.sample_rate),  # resampled to 16 kHz
            await transcriber.transcribe(silence(2.0, 16000)),
            await transcriber.transcribe(noise.astype(np.int16).tobytes()),
            await transcriber.transcribe(b""),
        ]

    heard, quiet, noisy, empty = anyio.run(main)
    # pocketsphinx on a synthetic voice is rough: at least two of the four numbers, in order.
    words = heard.split()
    assert len(NUMBERS & set(words)) >= 2, heard
    found = [w for w in words if w in NUMBERS]
    assert found == sorted(found, key=["two", "three", "four", "five"].index)
    assert not NUMBERS & set(quiet.split()), quiet
    assert not NUMBERS & set(noisy.split()), noisy
    assert empty == ""


def test_pocketsphinx_rejects_bad_input() -> None:
    transcriber = PocketsphinxTranscriber()
    with pytest.raises(ValueError, match="pcm"):
        transcriber.transcribe_blocking(b"\x00\x01\x02", 16000)
    with pytest.raises(ValueError, match="sample_rate"):
        transcriber.transcribe_blocking(b"\x00\x01", 0)


# --- scripted interviewer ------------------------------------------------------------------------

QUESTIONS = ["Tell me about yourself.", "Describe a hard bug you fixed."]


class FakeDirector:
    """The tool contract of the interview director, for two questions."""

    def __init__(self, questions: list[str]) -> None:
        self.questions = questions
        self.asked = 0
        self.calls: list[tuple[str, dict[str, Any]]] = []

    async def handle(self, name: str, args: dict[str, Any]) -> dict[str, Any]:
        self.calls.append((name, args))
        assert isinstance(args.get("reason"), str) and args["reason"]
        if name == "end_interview":
            return {"status": "ok"}
        assert name == "next_question"
        if self.asked >= len(self.questions):
            return {
                "status": "no_more_questions",
                "instruction": "Thank the candidate, close the interview, then call end_interview.",
            }
        i, self.asked = self.asked, self.asked + 1
        return {
            "status": "ok",
            "questionIndex": i,
            "totalQuestions": len(self.questions),
            "question": self.questions[i],
            "category": "general",
            "keyPoints": [],
            "timeBudgetSeconds": 120,
        }


class FakeTranscriber:
    name = "fake"

    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []

    async def transcribe(self, pcm: bytes, sample_rate: int = 16000) -> str:
        self.calls.append((len(pcm), sample_rate))
        return "I once fixed a race condition"


SETUP = BrainSetup(
    system_instruction="Interview the candidate.",
    context={"candidateName": "Ana Lima", "jobTitle": "Backend Engineer"},
)


async def collect(brain: ScriptedBrain, turn: BrainTurn) -> list[BrainEvent]:
    return [event async for event in brain.reply(turn)]


def text_of(events: list[BrainEvent]) -> str:
    return "".join(e.text for e in events if isinstance(e, TextDelta))


def kinds(events: list[BrainEvent]) -> list[str]:
    """Event kinds with consecutive text deltas collapsed: e.g. ["text", "tool:next_question"]."""
    out: list[str] = []
    for e in events:
        kind = f"tool:{e.name}" if isinstance(e, ToolCalled) else type(e).__name__
        kind = "text" if kind == "TextDelta" else kind
        if not out or out[-1] != kind or kind != "text":
            out.append(kind)
    return out


def test_scripted_interview_greets_asks_acknowledges_and_closes() -> None:
    director = FakeDirector(QUESTIONS)
    transcriber = FakeTranscriber()
    clock = VirtualClock()
    brain = ScriptedBrain(transcriber, think_s=0.5, clock=clock)
    assert isinstance(brain, Brain)
    assert brain.name == "scripted (offline)"

    async def main() -> list[tuple[float, list[BrainEvent]]]:
        await brain.start(SETUP, director.handle)
        replies = []
        turns = [
            BrainTurn(epoch=1),
            BrainTurn(epoch=2, turn_id=1, audio=b"\x00\x00" * 800, text="I build APIs."),
            BrainTurn(epoch=3, turn_id=2, audio=b"\x00\x00" * 1600, sample_rate=8000),
        ]
        for turn in turns:
            start = clock.now()
            replies.append((clock.now() - start, await collect(brain, turn)))
            brain.heard(turn.epoch, text_of(replies[-1][1]), completed=True)
        return replies

    (_, opening), (_, second), (_, closing) = clock.run(main)

    assert kinds(opening) == ["text", "tool:next_question", "text"]
    said = text_of(opening)
    assert "Ana Lima" in said and "Backend Engineer" in said
    assert said.endswith(" " + QUESTIONS[0])
    assert sum(isinstance(e, TextDelta) for e in opening) >= 4  # streamed in pieces

    assert kinds(second) == ["text", "tool:next_question", "text"]
    assert text_of(second) == "Thank you. " + QUESTIONS[1]

    # the transcript comes last: transcribing never delays the interviewer's words
    assert kinds(closing) == [
        "text",
        "tool:next_question",
        "text",
        "tool:end_interview",
        "UserTranscript",
    ]
    transcript = closing[-1]
    assert transcript == UserTranscript(2, "I once fixed a race condition")
    assert transcriber.calls == [(3200, 8000)]  # the turn with text was not transcribed
    assert "Ana Lima" in text_of(closing) and "last question" in text_of(closing)
    assert [name for name, _ in director.calls] == ["next_question"] * 3 + ["end_interview"]
    tool_results = [e.result["status"] for e in closing if isinstance(e, ToolCalled)]
    assert tool_results == ["no_more_questions", "ok"]
    assert [(h.epoch, h.completed) for h in brain.history] == [(1, True), (2, True), (3, True)]
    assert brain.history[1].text == text_of(second)


def test_scripted_brain_thinks_on_its_clock() -> None:
    clock = VirtualClock()
    brain = ScriptedBrain(think_s=1.25, clock=clock)

    async def main() -> float:
        await brain.start(SETUP, FakeDirector(QUESTIONS).handle)
        start = clock.now()
        async for event in brain.reply(BrainTurn(epoch=1)):
            assert isinstance(event, TextDelta)
            return clock.now() - start
        raise AssertionError("no event")

    assert clock.run(main) == pytest.approx(1.25)


def test_scripted_brain_repeats_the_question_on_an_empty_turn_and_checks_its_inputs() -> None:
    director = FakeDirector(QUESTIONS)
    brain = ScriptedBrain()

    async def main() -> list[BrainEvent]:
        with pytest.raises(BrainError, match="start"):
            await collect(brain, BrainTurn(epoch=1))
        await brain.start(SETUP, director.handle)
        await collect(brain, BrainTurn(epoch=1))
        return await collect(brain, BrainTurn(epoch=2))

    nudge = anyio.run(main)
    assert kinds(nudge) == ["text"]
    assert text_of(nudge).endswith(QUESTIONS[0])
    assert len(director.calls) == 1

    async def broken(name: str, args: dict[str, Any]) -> dict[str, Any]:
        return {"status": "error", "error": "boom"}

    async def main2() -> None:
        other = ScriptedBrain()
        await other.start(SETUP, broken)
        await collect(other, BrainTurn(epoch=1))

    with pytest.raises(BrainError, match="'error'"):
        anyio.run(main2)
    with pytest.raises(ValueError, match="think_s"):
        ScriptedBrain(think_s=-1)


def test_scripted_reply_spoken_by_espeak_through_a_graph() -> None:
    """Brain → voice stage → sink, on the real clock with the real voice."""
    director = FakeDirector(QUESTIONS)
    brain = ScriptedBrain()
    synth = EspeakSynthesizer()
    sink = Collect("sink")

    class BrainSource:
        name = "brain"

        async def run(self, ctx: CallContext, inbox: Any, outbox: Any) -> None:
            await brain.start(SETUP, director.handle)
            epoch = ctx.control.next_epoch()
            async for event in brain.reply(BrainTurn(epoch=epoch)):
                if isinstance(event, TextDelta):
                    await outbox.send(AgentTextDelta(epoch, event.text))
            await outbox.send(AgentTextDelta(epoch, "", final=True))

    graph = Graph().chain(BrainSource(), VoiceStage(synth), sink)

    async def main() -> Any:
        with anyio.fail_after(10):
            return await Supervisor(CallContext(), graph).run()

    result = anyio.run(main)
    assert result.status == "completed"
    audio = [f for f in sink.frames if isinstance(f, AgentAudio)]
    assert audio[-1].final and sum(f.final for f in audio) == 1
    said = "".join(f.text + " " for f in audio if f.text)
    chunker = PhraseChunker()
    expected = chunker.feed(said) + chunker.flush()
    assert [f.text for f in audio if f.text] == expected
    assert re.sub(r"\s+", " ", said).strip().endswith(QUESTIONS[0])
    assert rms_dbfs(b"".join(f.pcm for f in audio)) > -40
