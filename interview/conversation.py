"""The conversation stage: user turns in, the interviewer's reply text out.

It ties the director (plan, tools, end conditions) to a brain (scripted or Gemini). Each reply
is an epoch: a new user turn starts a new reply, interrupting the one in flight if any. The
reply's text deltas go downstream to the voice as they arrive.

What the candidate heard is only known once playback has finished or been cut short: the
session calls :meth:`Conversation.playback_changed` from the pacer's callbacks, and each
finished reply is then recorded (the transcript gets what was heard, the brain's history too)
and reported to the director, which ends the interview after its closing reply.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
from anyio.abc import TaskGroup

from interview.director import Director
from pipeline.audio import to_mono
from pipeline.frames import (
    AgentTextDelta,
    AudioChunk,
    UserSpeechStarted,
    UserSpeechStopped,
    UserTurn,
)
from pipeline.stage import CallContext, Inbox, Outbox
from stages.brain import Brain, BrainTurn, BrainUsage, TextDelta, ToolCalled, UserTranscript
from stages.pacer import PlaybackReport


@dataclass
class _Reply:
    epoch: int
    turn_id: int | None
    text: list[str] = field(default_factory=list)
    generated: bool = False  # the brain has finished producing it


class Conversation:
    """A stage; see the module docstring. ``played`` reports playback of an epoch."""

    def __init__(
        self,
        director: Director,
        brain: Brain,
        played: Callable[[int], PlaybackReport],
        *,
        name: str = "conversation",
    ) -> None:
        self.name = name
        self.director = director
        self.brain = brain
        self.played = played
        self.replies_started = 0
        self._pending: dict[int, _Reply] = {}
        self._active: _Reply | None = None
        self._idle = anyio.Event()
        self._idle.set()
        self._end_after: tuple[int, str] | None = None
        self._turn_at: dict[int, float] = {}  # when each user turn was committed
        self._started = anyio.Event()
        self._tg: TaskGroup | None = None
        self._outbox: Outbox | None = None

    @property
    def agent_idle(self) -> bool:
        """No reply is being generated or waiting to be heard."""
        return not self._pending

    async def wait_idle(self) -> None:
        """Return once the opening has started and every reply so far has been generated and
        played (or cut)."""
        await self._started.wait()
        while self._pending:
            await self._idle.wait()

    async def run(self, ctx: CallContext, inbox: Inbox, outbox: Outbox) -> None:
        self._ctx = ctx
        await self.brain.start(self.director.setup(), self.director.handle_tool)
        try:
            async with anyio.create_task_group() as tg:
                self._tg, self._outbox = tg, outbox
                self._start(tg, ctx, outbox, self.director.opening_turn(ctx.control.next_epoch()))
                streams = bool(getattr(self.brain, "streams_audio", False))
                async for frame in inbox:
                    if streams and await self._stream(frame):
                        continue
                    if isinstance(frame, UserTurn) and not self.director.ended:
                        active = self._active is not None and not self._active.generated
                        epoch = (
                            ctx.control.interrupt("new user turn").epoch
                            if active
                            else ctx.control.next_epoch()
                        )
                        self.playback_changed()
                        self._turn_at[frame.turn_id] = ctx.clock.now()
                        turn = self.director.turn_for(
                            frame.turn_id, frame.pcm, epoch, text=frame.text or None
                        )
                        self._start(tg, ctx, outbox, turn)
                # the inbox ended (the candidate's audio is over): let the last reply finish
        finally:
            self._tg = self._outbox = None  # say() after this point just ends the interview
            with ctx.cleanup_scope():
                await self.brain.aclose()

    async def _stream(self, frame: object) -> bool:
        """For a brain that listens while the candidate speaks (Gemini Live): hand it the
        live audio and the VAD's activity edges. True if the frame was consumed."""
        brain: Any = self.brain
        if isinstance(frame, AudioChunk):
            await brain.stream_audio(to_mono(frame.pcm, frame.channels), frame.sample_rate)
            return True
        if isinstance(frame, UserSpeechStarted):
            await brain.speech_started()
        elif isinstance(frame, UserSpeechStopped):
            await brain.speech_ended()
        return False

    def say(self, text: str, *, then_end: str, within_s: float = 6.0) -> None:
        """Speak a fixed line now (interrupting any reply), then end the interview.

        Used for shutdown: the candidate hears why the interview stops. The end comes when the
        line has been played, or after ``within_s`` whatever happens (the drain has a grace).
        """
        ctx, tg, outbox = getattr(self, "_ctx", None), self._tg, self._outbox
        if ctx is None or tg is None or outbox is None:
            self.director.end(then_end)
            return
        epoch = ctx.control.interrupt("announcement").epoch
        self.playback_changed()
        self._end_after = (epoch, then_end)
        reply = _Reply(epoch, None)
        self._pending[epoch] = reply
        self._active = reply
        self._idle = anyio.Event()

        async def speak() -> None:
            reply.text.append(text)
            await outbox.send(AgentTextDelta(epoch, text, None))
            await outbox.send(AgentTextDelta(epoch, "", None, final=True))
            reply.generated = True
            self.playback_changed()

        async def deadline() -> None:
            await ctx.clock.sleep(within_s)
            self.director.end(then_end)

        tg.start_soon(speak)
        tg.start_soon(deadline)

    def _start(self, tg: TaskGroup, ctx: CallContext, outbox: Outbox, turn: BrainTurn) -> None:
        reply = _Reply(turn.epoch, turn.turn_id)
        self._pending[turn.epoch] = reply
        self._active = reply
        self._idle = anyio.Event()
        self.replies_started += 1
        self._started.set()
        tg.start_soon(self._reply, ctx, outbox, turn, reply)

    async def _reply(
        self, ctx: CallContext, outbox: Outbox, turn: BrainTurn, reply: _Reply
    ) -> None:
        with ctx.control.epoch_scope(turn.epoch):
            ctx.mark(turn.turn_id, "brain_request")
            async for event in self.brain.reply(turn):
                if isinstance(event, TextDelta):
                    if not event.text:
                        continue
                    ctx.mark(turn.turn_id, "first_token")
                    reply.text.append(event.text)
                    await outbox.send(AgentTextDelta(turn.epoch, event.text, turn.turn_id))
                elif isinstance(event, UserTranscript):
                    at = self._turn_at.pop(event.turn_id, None) if event.turn_id else None
                    self.director.user_said(event.text, event.turn_id, at=at)
                elif isinstance(event, BrainUsage):
                    ctx.usage.add(
                        llm_input_tokens=event.input_tokens, llm_output_tokens=event.output_tokens
                    )
                elif isinstance(event, ToolCalled):
                    ctx.log.info("tool %s(%s) -> %s", event.name, event.args, event.result)
                    if reply.text and not reply.text[-1][-1:].isspace():
                        # The text so far is complete until the model writes again (a second
                        # request after the tool): let the voice's chunker cut it now, rather
                        # than wait for the next words' whitespace (measured: ~220 ms).
                        reply.text.append(" ")
                        await outbox.send(AgentTextDelta(turn.epoch, " ", turn.turn_id))
            await outbox.send(AgentTextDelta(turn.epoch, "", turn.turn_id, final=True))
        reply.generated = True
        if not reply.text:  # nothing to play: it is finished as soon as it is generated
            self._finish(reply, "", completed=True)
        self.playback_changed()

    def playback_changed(self, _at: float | None = None) -> None:
        """Pacer callback: record every reply that finished playing or was cut short."""
        ctx = getattr(self, "_ctx", None)
        for epoch, reply in list(self._pending.items()):
            stale = ctx is not None and ctx.control.is_stale(epoch)
            report = self.played(epoch)
            if report.completed and reply.generated:
                self._finish(reply, "".join(reply.text), completed=True)
            elif stale:
                self._finish(reply, report.text_played, completed=False)

    def _finish(self, reply: _Reply, heard: str, *, completed: bool) -> None:
        if self._pending.pop(reply.epoch, None) is None:
            return
        heard = " ".join(heard.split())  # deltas and separators may double the spaces
        if heard:
            self.director.agent_said(heard, reply.epoch, completed)
        self.brain.heard(reply.epoch, heard, completed)
        self.director.reply_finished(reply.epoch)
        if self._end_after is not None and self._end_after[0] == reply.epoch:
            self.director.end(self._end_after[1])
        if not self._pending:
            self._idle.set()
