"""The voice stage: the agent's reply text in, its speech out, phrase by phrase.

Vendor-neutral. Any text-to-speech engine behind the small :class:`Synthesizer` protocol
(ElevenLabs, the offline espeak-ng voice) plugs in. Speaking starts before the brain has finished
its reply: :class:`PhraseChunker` cuts the streamed text into phrases, the first one short (so the
candidate hears something soon), later ones by sentence (so the prosody stays natural).

A reply is an epoch. When the control lane moves past it (barge-in), the in-flight synthesis is
cancelled at once and the rest of the reply's text is dropped.
"""

from __future__ import annotations

import math
import re
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import anyio
from anyio.abc import ObjectSendStream

from pipeline.frames import AgentAudio, AgentTextDelta
from pipeline.stage import CallContext, Inbox, Outbox


@runtime_checkable
class Synthesizer(Protocol):
    """A text-to-speech engine."""

    name: str
    """What `/` reports as the voice, e.g. ``"espeak-ng (offline)"``."""
    sample_rate: int
    """The rate of the PCM that :meth:`synthesize` yields."""

    def synthesize(self, text: str) -> AsyncIterator[bytes]:
        """Speak ``text``: yield 16-bit mono little-endian PCM chunks as they are produced.

        Cancelling the iteration must stop the engine's work promptly (barge-in).
        """
        ...


# --- phrase chunking ---------------------------------------------------------------------------

_CLOSERS = re.escape("\"'”’)]")
# Punctuation that ends a sentence or a clause counts only once whitespace follows it, so that
# "3.5" or "e.g.x" is not cut in the middle before the next delta arrives.
_SENTENCE = re.compile(rf"[.!?…]+[{_CLOSERS}]*(?=\s)|\n")
_CLAUSE = re.compile(rf"[,;:][{_CLOSERS}]*(?=\s)|—")
_WORD = re.compile(r"\S+(?=\s)")
_SPACE = re.compile(r"\s")


@dataclass(frozen=True)
class ChunkerOptions:
    """How :class:`PhraseChunker` cuts a reply."""

    first_words: int = 6
    """The first phrase ends at the first clause or sentence boundary, or after this many words
    (whichever comes first): the shorter it is, the sooner the candidate hears the reply."""
    max_chars: int = 250
    """A later phrase with no sentence end within this many characters is cut at its last clause
    boundary (or word break) instead, so a run-on sentence does not hold the voice back."""

    def __post_init__(self) -> None:
        if self.first_words < 1:
            raise ValueError("ChunkerOptions.first_words: must be at least 1")
        if self.max_chars < 1:
            raise ValueError("ChunkerOptions.max_chars: must be at least 1")


class PhraseChunker:
    """Cuts streamed reply text into phrases to synthesize. Pure: no I/O, no clock.

    Feed text deltas with :meth:`feed`, which returns the phrases completed so far; call
    :meth:`flush` at the end of the reply for the rest. Phrases are stripped and never empty;
    joined, they hold every non-whitespace character of the input, in order. The result does not
    depend on how the text was split into deltas.
    """

    def __init__(self, options: ChunkerOptions | None = None) -> None:
        self.options = options or ChunkerOptions()
        self._buf = ""
        self._first = True

    def feed(self, text: str) -> list[str]:
        self._buf += text
        phrases: list[str] = []
        while (cut := self._cut()) is not None:
            phrases.extend(self._take(cut))
        return phrases

    def flush(self) -> list[str]:
        """The rest of the reply (at most one phrase; none if only whitespace is left)."""
        return self._take(len(self._buf))

    def _take(self, cut: int) -> list[str]:
        phrase, self._buf = self._buf[:cut].strip(), self._buf[cut:]
        if not phrase:
            return []
        self._first = False
        return [phrase]

    def _cut(self) -> int | None:
        """Where the next phrase ends in the buffer, or None to wait for more text."""
        buf, opts = self._buf, self.options
        if not buf.strip():
            return None
        ends: list[int] = []
        if m := _SENTENCE.search(buf):
            ends.append(m.end())
        if self._first:
            if m := _CLAUSE.search(buf):
                ends.append(m.end())
            words = _WORD.finditer(buf)
            for i, m in enumerate(words, start=1):
                if i == opts.first_words:
                    ends.append(m.end())
                    break
        if ends and (end := min(ends)) <= opts.max_chars:
            return end
        if len(buf) > opts.max_chars:
            return _long_cut(buf, opts.max_chars)
        return None


def _long_cut(buf: str, limit: int) -> int:
    """Cut a run-on phrase: the last clause boundary, else the last word break, within limit."""
    head = buf[: limit + 1]  # one more, so a boundary's look-ahead sees the next character
    clauses = [m.end() for m in _CLAUSE.finditer(head) if m.end() <= limit]
    if clauses:
        return clauses[-1]
    spaces = [m.start() for m in _SPACE.finditer(head) if 0 < m.start() <= limit]
    for pos in reversed(spaces):
        if head[:pos].strip():
            return pos
    return limit


# --- the stage ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class VoiceOptions:
    """Options of :class:`VoiceStage`."""

    chunker: ChunkerOptions = field(default_factory=ChunkerOptions)
    """How replies are cut into phrases."""
    prefetch_chunks: int = 256
    """Audio chunks buffered between synthesis and emission: while one phrase is being sent on
    (the pacer may hold it back to real time), the next one is already being synthesized."""

    def __post_init__(self) -> None:
        if self.prefetch_chunks < 1:
            raise ValueError("VoiceOptions.prefetch_chunks: must be at least 1")


class ReplyPhrases:
    """One reply in progress: its chunker, its phrase queue, its cancel scope (shared by the
    voice stages: the offline one here and ElevenLabs')."""

    def __init__(self, frame: AgentTextDelta, options: ChunkerOptions) -> None:
        self.epoch = frame.epoch
        self.turn_id = frame.turn_id
        self.chunker = PhraseChunker(options)
        self.scope = anyio.CancelScope()
        self.phrases_in, self.phrases_out = anyio.create_memory_object_stream[str](math.inf)
        self.finished = False
        self.done = anyio.Event()

    def feed(self, frame: AgentTextDelta) -> None:
        if self.turn_id is None:
            self.turn_id = frame.turn_id
        self._queue(self.chunker.feed(frame.text))
        if frame.final:
            self.finish()

    def finish(self) -> None:
        """The reply's text is complete: queue the rest and let it be spoken to the end."""
        if not self.finished:
            self.finished = True
            self._queue(self.chunker.flush())
            self.phrases_in.close()

    def cancel(self) -> None:
        self.finished = True
        self.phrases_in.close()
        self.scope.cancel()

    def _queue(self, phrases: list[str]) -> None:
        for phrase in phrases:
            try:
                self.phrases_in.send_nowait(phrase)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                return  # the reply was cut short: nobody will speak the rest


SpeakFn = Callable[
    [CallContext, ReplyPhrases, "ReplyPhrases | None", Outbox], Coroutine[Any, Any, None]
]


async def dispatch_replies(
    ctx: CallContext, inbox: Inbox, outbox: Outbox, chunker: ChunkerOptions, speak: SpeakFn
) -> None:
    """The reply bookkeeping every voice stage shares: text deltas are grouped by reply
    (epoch) and fed to that reply's phrase queue; each new reply gets a ``speak`` task that
    waits for the previous reply to finish first; stale text is dropped; other frames pass."""
    reply: ReplyPhrases | None = None
    async with anyio.create_task_group() as tg:
        try:
            async for frame in inbox:
                if not isinstance(frame, AgentTextDelta):
                    await outbox.send(frame)
                    continue
                if ctx.control.is_stale(frame.epoch):
                    continue  # the reply was interrupted: drop the rest of its text
                if reply is None or frame.epoch > reply.epoch:
                    previous, reply = reply, ReplyPhrases(frame, chunker)
                    if previous is not None and ctx.control.is_stale(previous.epoch):
                        previous.cancel()  # the lane moved on: nobody will hear it
                    elif previous is not None:
                        previous.finish()  # a newer reply began: the older one's text is all in
                    tg.start_soon(speak, ctx, reply, previous, outbox)
                elif frame.epoch < reply.epoch or reply.finished:
                    continue  # text of an older reply, or after its final delta
                reply.feed(frame)
        finally:
            # The inbox ended (or we are being cancelled): say what is left of the reply.
            if reply is not None:
                reply.finish()


class VoiceStage:
    """Speaks the agent's replies: :class:`AgentTextDelta` in, :class:`AgentAudio` out.

    Per reply (epoch): the text is cut into phrases, synthesized one after another in order, and
    sent on as audio chunks; the first chunk of each phrase carries the phrase's text (so egress
    knows what the candidate has heard), and a closing empty ``final`` frame ends the reply.
    Replies are spoken one at a time, in order. Marks ``voice_request`` and ``first_audio`` on
    the reply's turn and counts the characters sent to the engine in ``ctx.usage``. Other frames
    pass through unchanged.
    """

    def __init__(
        self, synth: Synthesizer, name: str = "voice", options: VoiceOptions | None = None
    ) -> None:
        self.synth = synth
        self.name = name
        self.options = options or VoiceOptions()

    async def run(self, ctx: CallContext, inbox: Inbox, outbox: Outbox) -> None:
        await dispatch_replies(ctx, inbox, outbox, self.options.chunker, self._speak)

    async def _speak(
        self, ctx: CallContext, reply: ReplyPhrases, previous: ReplyPhrases | None, outbox: Outbox
    ) -> None:
        rate = self.synth.sample_rate
        send, receive = anyio.create_memory_object_stream[AgentAudio](self.options.prefetch_chunks)
        try:
            with reply.scope, ctx.control.epoch_scope(reply.epoch):
                if previous is not None:
                    await previous.done.wait()
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._synthesize, ctx, reply, send)
                    async for audio in receive:
                        await outbox.send(audio)
                await outbox.send(AgentAudio(reply.epoch, b"", rate, reply.turn_id, final=True))
        finally:
            send.close()
            receive.close()
            reply.phrases_out.close()
            reply.done.set()

    async def _synthesize(
        self, ctx: CallContext, reply: ReplyPhrases, send: ObjectSendStream[AgentAudio]
    ) -> None:
        rate, epoch = self.synth.sample_rate, reply.epoch
        async with send:
            async for phrase in reply.phrases_out:
                turn_id = reply.turn_id
                ctx.mark(turn_id, "voice_request")
                ctx.usage.add(tts_characters=len(phrase))
                text = phrase
                stream = self.synth.synthesize(phrase)
                try:
                    async for pcm in stream:
                        if not pcm:
                            continue
                        ctx.mark(turn_id, "first_audio")
                        await send.send(AgentAudio(epoch, pcm, rate, turn_id, text=text))
                        text = ""
                finally:
                    await _aclose(ctx, stream)
                if text:
                    # Rendered as silence: still report the text, so the transcript stays whole.
                    await send.send(AgentAudio(epoch, b"", rate, turn_id, text=text))


async def _aclose(ctx: CallContext, stream: AsyncIterator[bytes]) -> None:
    """Close an engine's stream now (not at garbage collection), so its cleanup runs promptly."""
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        with ctx.cleanup_scope():
            await aclose()
