"""The voice stage: phrase chunking (properties), ordering, marks, usage and barge-in."""

from __future__ import annotations

import dataclasses
import itertools
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.clock import VirtualClock
from pipeline.frames import AgentAudio, AgentTextDelta, UserSpeechStarted
from pipeline.stage import CallContext
from stages.voice import ChunkerOptions, PhraseChunker, Synthesizer, VoiceOptions, VoiceStage

# --- PhraseChunker -------------------------------------------------------------------------------

ALPHABET = "abc XYZ  ..,;:!?—\n\t'\")é3"


def squash(text: str) -> str:
    return re.sub(r"\s+", "", text)


def chunk(text: str, cuts: list[int], options: ChunkerOptions | None = None) -> list[str]:
    chunker = PhraseChunker(options)
    phrases: list[str] = []
    bounds = sorted({0, len(text), *(c % (len(text) + 1) for c in cuts)})
    for a, b in itertools.pairwise(bounds):
        phrases += chunker.feed(text[a:b])
    return phrases + chunker.flush()


texts = st.text(alphabet=ALPHABET, max_size=300)
cut_lists = st.lists(st.integers(0, 400), max_size=30)
option_sets = st.builds(ChunkerOptions, first_words=st.integers(1, 8), max_chars=st.integers(1, 80))


@settings(max_examples=300, deadline=None)
@given(text=texts, cuts=cut_lists, options=option_sets)
def test_phrases_keep_every_character_and_are_never_empty(
    text: str, cuts: list[int], options: ChunkerOptions
) -> None:
    phrases = chunk(text, cuts, options)
    assert squash("".join(phrases)) == squash(text)
    for phrase in phrases:
        assert phrase.strip() == phrase != ""
        assert len(phrase) <= options.max_chars
    if phrases:
        assert len(phrases[0].split()) <= options.first_words


@settings(max_examples=300, deadline=None)
@given(text=texts, cuts=cut_lists, options=option_sets)
def test_phrases_do_not_depend_on_how_the_text_was_streamed(
    text: str, cuts: list[int], options: ChunkerOptions
) -> None:
    assert chunk(text, cuts, options) == chunk(text, [], options)


def test_first_phrase_at_clause_later_ones_by_sentence() -> None:
    text = "Hello Ana, welcome to the interview for the role. It will take, say, ten minutes!"
    assert chunk(text, list(range(0, len(text), 3))) == [
        "Hello Ana,",
        "welcome to the interview for the role.",
        "It will take, say, ten minutes!",
    ]


def test_first_phrase_after_six_words_without_punctuation() -> None:
    text = "one two three four five six seven eight. Next one"
    assert chunk(text, [4, 9, 30]) == [
        "one two three four five six",
        "seven eight.",
        "Next one",
    ]


def test_no_cut_inside_numbers_and_dash_is_a_clause() -> None:
    chunker = PhraseChunker()
    assert chunker.feed("It grew 3.") == []  # the "." may be part of a number
    assert chunker.feed("5 percent—quite a lot. Then") == ["It grew 3.5 percent—", "quite a lot."]
    assert chunker.flush() == ["Then"]
    assert chunker.flush() == []


def test_run_on_sentence_is_cut_at_a_clause_within_max_chars() -> None:
    chunker = PhraseChunker(ChunkerOptions(max_chars=30))
    first = chunker.feed("Well. ")
    rest = chunker.feed("this goes on, and on and on and on and on and on ")
    assert first == ["Well."]
    assert rest == ["this goes on,", "and on and on and on and on"]


def test_bad_options_are_named() -> None:
    with pytest.raises(ValueError, match="first_words"):
        ChunkerOptions(first_words=0)
    with pytest.raises(ValueError, match="prefetch_chunks"):
        VoiceOptions(prefetch_chunks=0)


# --- VoiceStage ----------------------------------------------------------------------------------


class FakeSynth:
    """Yields one chunk per word (the word's bytes, padded to whole samples) after a delay."""

    name = "fake"
    sample_rate = 8000

    def __init__(self, clock: VirtualClock, delay: float = 0.05) -> None:
        self.clock = clock
        self.delay = delay
        self.requests: list[tuple[str, float]] = []
        self.completed: list[str] = []
        self.cancelled: list[tuple[str, float]] = []

    async def synthesize(self, text: str) -> AsyncIterator[bytes]:
        self.requests.append((text, self.clock.now()))
        done = False
        try:
            for word in text.split():
                await self.clock.sleep(self.delay)
                yield pad(word)
            done = True
            self.completed.append(text)
        finally:
            if not done:
                self.cancelled.append((text, self.clock.now()))


def pad(word: str) -> bytes:
    raw = word.encode() + b"|"
    return raw + b"|" * (len(raw) % 2)


def words_of(frames: list[AgentAudio]) -> list[str]:
    pcm = b"".join(f.pcm for f in frames)
    return [w for w in pcm.decode().split("|") if w]


class Out:
    """An outbox recording each frame with the virtual time it was sent."""

    def __init__(self, clock: VirtualClock, delay: float = 0.0) -> None:
        self.clock = clock
        self.delay = delay
        self.sent: list[tuple[Any, float]] = []

    async def send(self, frame: Any) -> None:
        if self.delay:
            await self.clock.sleep(self.delay)
        self.sent.append((frame, self.clock.now()))

    def audio(self, epoch: int | None = None) -> list[AgentAudio]:
        return [
            f
            for f, _ in self.sent
            if isinstance(f, AgentAudio) and (epoch is None or f.epoch == epoch)
        ]


Driver = Callable[[CallContext, Any], Awaitable[None]]


def run_stage(
    synth_delay: float, driver: Driver, out_delay: float = 0.0
) -> tuple[CallContext, FakeSynth, Out]:
    clock = VirtualClock()
    synth = FakeSynth(clock, synth_delay)
    out = Out(clock, out_delay)
    ctx = CallContext(clock=clock)

    async def main() -> None:
        send, receive = anyio.create_memory_object_stream[Any](100)
        stage = VoiceStage(synth)
        assert isinstance(synth, Synthesizer)
        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                tg.start_soon(stage.run, ctx, receive, out)
                async with send:
                    await driver(ctx, send)
        receive.close()

    clock.run(main)
    return ctx, synth, out


def deltas(epoch: int, text: str, turn_id: int | None = None) -> list[AgentTextDelta]:
    pieces = re.findall(r"\S+\s*", text)
    return [
        AgentTextDelta(epoch, p, turn_id, final=i == len(pieces) - 1) for i, p in enumerate(pieces)
    ]


REPLY = "Thank you, that was clear. Now tell me about a project you led. What went wrong?"


def test_reply_is_spoken_in_order_with_marks_usage_and_a_final_frame() -> None:
    marker = UserSpeechStarted(turn_id=3, at=1.0)

    async def driver(ctx: CallContext, send: Any) -> None:
        for i, delta in enumerate(deltas(1, REPLY, turn_id=3)):
            await send.send(delta)
            if i == 2:
                await send.send(marker)
            await ctx.clock.sleep(0.01)

    ctx, synth, out = run_stage(0.05, driver)
    audio = out.audio(1)
    phrases = chunk(REPLY, [])
    assert [t for t, _ in synth.requests] == phrases
    assert words_of(audio) == REPLY.split()
    # The first chunk of each phrase carries its text, in order.
    assert [f.text for f in audio if f.text] == phrases
    assert all(f.sample_rate == 8000 and f.turn_id == 3 for f in audio)
    assert audio[-1].final and audio[-1].pcm == b""
    assert sum(f.final for f in audio) == 1
    assert marker in [f for f, _ in out.sent]
    record = ctx.timeline.get(3)
    assert record is not None
    assert record.marks["voice_request"] == synth.requests[0][1]
    assert record.marks["first_audio"] == pytest.approx(record.marks["voice_request"] + 0.05)
    assert ctx.usage.tts_characters == sum(len(p) for p in phrases)


def test_next_phrase_is_synthesized_while_the_previous_one_is_sent_on() -> None:
    async def driver(ctx: CallContext, send: Any) -> None:
        for delta in deltas(1, REPLY):
            await send.send(delta)

    _, synth, out = run_stage(0.01, driver, out_delay=0.2)
    audio = out.audio(1)
    first_phrase_words = len(synth.requests[0][0].split())
    last_of_first_sent_at = [t for f, t in out.sent if f.pcm][first_phrase_words - 1]
    assert synth.requests[1][1] < last_of_first_sent_at
    assert words_of(audio) == REPLY.split()


def test_interrupt_cancels_synthesis_at_once_and_drops_the_rest_of_the_reply() -> None:
    interrupted_at: list[float] = []
    first, second = "Let me explain this slowly, ", "with a long tail that nobody hears."

    async def driver(ctx: CallContext, send: Any) -> None:
        ctx.control.next_epoch()  # the director starts reply 1
        for delta in deltas(1, first):
            await send.send(delta)
        await ctx.clock.sleep(0.25)  # a few words of the first phrase are out
        ctx.control.interrupt()
        interrupted_at.append(ctx.clock.now())
        await ctx.clock.sleep(0.5)  # nothing new arrives: the interrupt alone must stop it
        for delta in deltas(1, second):  # the brain was still streaming: stale now
            await send.send(delta)
        for delta in deltas(ctx.control.epoch, "Sorry, go ahead."):
            await send.send(delta)

    ctx, synth, out = run_stage(0.1, driver)
    assert ctx.control.epoch == 2
    assert synth.cancelled == [("Let me explain this slowly,", interrupted_at[0])]
    assert [t for t, _ in synth.requests] == ["Let me explain this slowly,", "Sorry,", "go ahead."]
    old = out.audio(1)
    assert words_of(old) == ["Let", "me"]
    assert not any(f.final for f in old)
    assert all(t <= interrupted_at[0] for f, t in out.sent if f.epoch == 1)
    new = out.audio(2)
    assert words_of(new) == ["Sorry,", "go", "ahead."]
    assert new[-1].final


def test_replies_are_spoken_one_after_another() -> None:
    async def driver(ctx: CallContext, send: Any) -> None:
        for delta in deltas(1, "First reply, with two phrases. And a third, but no final flag."):
            await send.send(dataclasses.replace(delta, final=False))
        for delta in deltas(2, "Second reply."):  # the lane has not moved: not stale
            await send.send(delta)

    _, _, out = run_stage(0.05, driver)
    epochs = [f.epoch for f in out.audio()]
    assert epochs == sorted(epochs) and set(epochs) == {1, 2}
    assert sum(f.final for f in out.audio()) == 2
    assert [f.text for f in out.audio(1) if f.text] == [
        "First reply,",
        "with two phrases.",
        "And a third, but no final flag.",
    ]
    assert words_of(out.audio(2)) == ["Second", "reply."]


def test_stale_older_reply_is_abandoned_when_a_newer_one_starts() -> None:
    async def driver(ctx: CallContext, send: Any) -> None:
        ctx.control.next_epoch()
        for delta in deltas(1, "An old reply that goes on and on."):
            await send.send(delta)
        await ctx.clock.sleep(0.12)
        ctx.control.next_epoch()  # a new reply without an interrupt
        for delta in deltas(2, "New."):
            await send.send(delta)

    _, synth, out = run_stage(0.05, driver)
    assert [t for t, _ in synth.cancelled] == ["An old reply that goes on"]
    assert [t for t, _ in synth.requests] == ["An old reply that goes on", "New."]
    assert not any(f.final for f in out.audio(1))
    assert words_of(out.audio(2)) == ["New."] and out.audio(2)[-1].final


def test_unfinished_reply_is_flushed_when_the_inbox_ends() -> None:
    async def driver(ctx: CallContext, send: Any) -> None:
        await send.send(AgentTextDelta(4, "No final flag here", turn_id=None))

    ctx, synth, out = run_stage(0.05, driver)
    assert [t for t, _ in synth.requests] == ["No final flag here"]
    assert out.audio(4)[-1].final
    assert ctx.usage.tts_characters == len("No final flag here")


def test_deltas_after_the_final_one_are_ignored() -> None:
    async def driver(ctx: CallContext, send: Any) -> None:
        await send.send(AgentTextDelta(1, "Done.", final=True))
        await send.send(AgentTextDelta(1, "Late text.", final=True))

    _, synth, out = run_stage(0.05, driver)
    assert [t for t, _ in synth.requests] == ["Done."]
    assert sum(f.final for f in out.audio()) == 1
