"""Live mode of the Gemini brain: one Live API websocket for the whole interview.

Setup (asked from the first connection): the response modality of
:attr:`GeminiOptions.live_response_modality` (``AUDIO`` with the output transcription as the
reply text, the audio discarded; or ``TEXT``), manual activity detection
(``automaticActivityDetection.disabled``: our VAD says when the candidate speaks, with
``activityStart`` / ``activityEnd``), ``NO_INTERRUPTION`` (our barge-in policy decides what
interrupts, not the server's), input transcription on (the candidate's words for the
transcript), session resumption, a sliding context window (long interviews) and the director's
tools as BLOCKING functions.

Turn input. When the session wires the streaming hooks (:meth:`LiveEngine.speech_started`,
:meth:`LiveEngine.stream_audio`, :meth:`LiveEngine.speech_ended`), the candidate's audio goes to
Gemini while they speak, so the model has heard the answer by the time the turn ends, and
:meth:`LiveEngine.reply` only reads. Without them, ``reply`` sends the whole turn's audio
between ``activityStart`` and ``activityEnd``. The opening and text turns go as
``clientContent`` with ``turnComplete``; the director's instructions and "you were interrupted"
notes as ``clientContent`` without it, ahead of the next turn.

Connection trouble. Every ``sessionResumptionUpdate`` that is resumable keeps its handle. A
``goAway`` makes the brain reconnect with the latest handle at its next step (the end of the
reply in which it came, the next ``speech_started`` or reply), before the deadline. A dead
socket (a close, a send that fails, a missed keepalive pong, or no message within
``first_token_timeout_s`` / ``stall_timeout_s`` during a reply) is replaced by a resumed one
and the turn is sent again, with a note of what was already said and which tools were already
called so the model carries on instead of starting over. If the handle is refused, a fresh
session is opened and the conversation so far (what was said and heard, as text) is replayed
into it. The reply's retries and its fallback line follow the chat mode's budget rules.

What was heard: the server's context keeps the whole reply; :meth:`LiveEngine.heard` queues a
note (sent as ``clientContent`` without ``turnComplete`` before the next turn) telling the
model what the candidate actually heard. With streamed audio the next turn may have begun by
then, so the note reaches the model one turn late.

Reading happens only while a reply is being produced (no background task): between replies the
websocket keeps receiving into memory (``max_queue=None``) and answering pings, and the next
reply reads what came first (the end of an interrupted generation is skipped; tool calls in it
are answered "cancelled" without reaching the director).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re
from collections import deque
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anyio

from pipeline.clock import Clock
from stages.brain import (
    BrainError,
    BrainEvent,
    BrainSetup,
    BrainTurn,
    TextDelta,
    ToolCalled,
    ToolHandler,
    UserTranscript,
)
from stages.gemini import (
    FailureCounter,
    GeminiOptions,
    RetryBudget,
    UsageSum,
    classify,
    function_declarations,
    heard_prefix_len,
    note,
    retry_after,
    truncation_note,
)

if TYPE_CHECKING:
    from google.genai import Client

log = logging.getLogger("stages.gemini")

LIVE_RATE = 16000


def parse_duration(text: str | None) -> float | None:
    """``"5s"`` / ``"1.5s"`` (protobuf Duration JSON) to seconds."""
    if not text:
        return None
    found = re.fullmatch(r"\s*([0-9.]+)s?\s*", str(text))
    return float(found.group(1)) if found else None


@dataclass
class _Said:
    """One line of the conversation, for replaying it into a fresh session."""

    role: str  # "user" | "model"
    text: str
    epoch: int | None = None


@dataclass
class _Reading:
    """The state of reading one reply."""

    turn_id: int | None
    text: list[str] = field(default_factory=list)
    tools: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    after_tool: bool = False  # the last thing received was a tool call
    triggered: bool = False  # the server has been asked for this reply
    done: bool = False  # read to its end


class _Dead(Exception):
    """The connection is unusable (closed, or silent for too long)."""


class LiveEngine:
    """See the module docstring. Used by :class:`stages.gemini.GeminiBrain` in live mode."""

    def __init__(
        self, client: Client, model: str, options: GeminiOptions, clock: Clock, rng: random.Random
    ) -> None:
        self.client = client
        self.model = model
        self.options = options
        self.clock = clock
        self.rng = rng
        self.failures = FailureCounter(options.max_failed_turns)
        self.connections = 0
        """Connections opened so far (1 + reconnects)."""
        self._setup: BrainSetup | None = None
        self._tools: ToolHandler | None = None
        self._cm: Any = None
        self._session: Any = None
        self._rx: Any = None
        self._handle: str | None = None
        self._handle_fresh = True  # the handle covers every turn sent so far
        self._expect = 0  # turnCompletes still to come for turns sent
        self._dead = False
        self._go_away_at: float | None = None
        self._stale = False
        self._notes: list[str] = []
        self._said: list[_Said] = []
        self._heard: dict[int, tuple[str, bool]] = {}
        self._transcript: list[str] = []
        self._conn_lock = asyncio.Lock()
        self._read_lock = asyncio.Lock()
        # streamed turn (hooks)
        self._ring: deque[bytes] = deque()
        self._ring_bytes = 0
        self._activity: bytearray | None = None
        self._streamed: bytes | None = None  # a whole turn sent by the hooks, not yet replied to
        self._streamed_ok = False
        self._streamed_conn = 0  # the connection the streamed turn went to
        self._unsent = bytearray()  # streamed audio not sent yet (batched)
        self._stream_chunk = LIVE_RATE * 2 * options.live_stream_chunk_ms // 1000
        self._resampler: Any = None
        self._resampler_rate = 0

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self, setup: BrainSetup, tools: ToolHandler) -> None:
        """Connect now (a bad key fails here); a transient failure is left to the first reply."""
        self._setup, self._tools = setup, tools
        try:
            async with self._conn_lock:
                await self._connect()
        except BrainError:
            raise
        except Exception as exc:
            log.warning("Gemini Live (%s): could not connect yet: %s", self.model, classify(exc)[1])
            self._dead = True

    async def aclose(self) -> None:
        with anyio.move_on_after(2, shield=True):
            await self._disconnect()
            await self.client.aio.aclose()

    def heard(self, epoch: int, text: str, completed: bool) -> None:
        said = next((s for s in reversed(self._said) if s.epoch == epoch), None)
        if said is None:  # the reply is still being recorded: applied when it is
            self._heard[epoch] = (text, completed)
            return
        if completed:
            return
        cut = heard_prefix_len(said.text, text)
        said.text = said.text[:cut] if cut is not None else text
        self._notes.append(truncation_note(text))

    # -- connection -----------------------------------------------------------------------------

    def _config(self) -> Any:
        from google.genai import types

        setup = self._setup
        assert setup is not None
        audio = self.options.live_response_modality == "AUDIO"
        decls = function_declarations(setup.tools, blocking=True) if setup.tools else []
        return types.LiveConnectConfig(
            response_modalities=[types.Modality.AUDIO if audio else types.Modality.TEXT],
            system_instruction=setup.system_instruction,
            tools=[types.Tool(function_declarations=decls)] if decls else None,
            temperature=self.options.temperature,
            input_audio_transcription=types.AudioTranscriptionConfig(),
            output_audio_transcription=types.AudioTranscriptionConfig() if audio else None,
            realtime_input_config=types.RealtimeInputConfig(
                automatic_activity_detection=types.AutomaticActivityDetection(disabled=True),
                activity_handling=types.ActivityHandling.NO_INTERRUPTION,
            ),
            session_resumption=types.SessionResumptionConfig(handle=self._handle),
            context_window_compression=types.ContextWindowCompressionConfig(
                sliding_window=types.SlidingWindow()
            ),
        )

    async def _open(self) -> None:
        cm = self.client.aio.live.connect(model=self.model, config=self._config())
        with anyio.fail_after(self.options.first_token_timeout_s):
            session = await cm.__aenter__()
        self._cm, self._session, self._rx = cm, session, None
        self._dead, self._stale, self._go_away_at, self._expect = False, False, None, 0
        self.connections += 1

    async def _connect(self) -> None:
        """Open (or resume) the session. Caller holds ``_conn_lock``."""
        await self._disconnect()
        resumed = self._handle
        try:
            await self._open()
        except Exception as exc:
            kind, what = classify(exc)
            if kind == "fatal":
                log.error("Gemini Live (%s): %s", self.model, what)
                raise BrainError(f"Gemini Live ({self.model}): {what}") from None
            if resumed is None:
                raise
            log.warning("Gemini Live: resuming failed (%s); opening a fresh session", what)
            self._handle = None
            await self._open()
            await self._replay()
            return
        if resumed:
            log.info("Gemini Live (%s): session resumed", self.model)

    async def _replay(self) -> None:
        """A fresh session after a lost one: give it the conversation so far, as text."""
        from google.genai import types

        turns = [
            types.Content(role=s.role, parts=[types.Part(text=s.text)])
            for s in self._said
            if s.text.strip()
        ]
        if turns:
            await self._session.send_client_content(turns=turns, turn_complete=False)
        self._stale = False

    async def _disconnect(self) -> None:
        cm, self._cm, self._session, self._rx = self._cm, None, None, None
        if cm is not None:
            with anyio.move_on_after(1, shield=True):
                with contextlib.suppress(Exception):
                    await cm.__aexit__(None, None, None)

    def _usable(self) -> bool:
        return self._session is not None and not self._dead and self._go_away_at is None

    async def _ensure_connected(self) -> None:
        """Reconnect when the socket is gone or a ``goAway`` asked for it. Caller reads (holds
        ``_read_lock``): what the old socket already received is read first, for the newest
        resumption handle."""
        async with self._conn_lock:
            if self._usable():
                return
            if self._session is not None and not self._handle_fresh:
                await self._drain_for_handle()
            if self._go_away_at is not None:
                log.info("Gemini Live: goAway: reconnecting with the latest handle")
            await self._connect()

    async def _drain_for_handle(self) -> None:
        """Read the old socket until a resumable handle newer than our last input arrives (it
        follows each turnComplete), the socket ends, or a short wait passes."""
        wait = 1.0
        if self._go_away_at is not None:
            wait = min(wait, max(0.05, self._go_away_at - self.clock.now()))
        end = self.clock.now() + wait
        self._dead = False  # read what it holds, even if it can no longer send
        try:
            while not self._handle_fresh and self.clock.now() < end:
                msg = await self._next(max(0.01, end - self.clock.now()))
                self._bookkeeping(msg, None)
        except Exception:
            pass

    async def _send(self, **kwargs: Any) -> None:
        if self._session is None or self._dead:
            raise _Dead("not connected")
        await self._session.send_realtime_input(**kwargs)

    async def _send_notes(self) -> None:
        from google.genai import types

        if not self._notes:
            return
        parts = [types.Part(text=n) for n in self._notes]
        await self._session.send_client_content(
            turns=[types.Content(role="user", parts=parts)], turn_complete=False
        )
        self._notes.clear()

    # -- streaming hooks --------------------------------------------------------------------------

    async def speech_started(self) -> None:
        from google.genai import types

        self._activity = bytearray(b"".join(self._ring))
        self._unsent = bytearray()
        self._ring.clear()
        self._ring_bytes = 0
        self._streamed, self._streamed_ok = None, False
        if not self._usable():  # reconnecting is the reply's job: it sends the whole turn
            return
        try:
            await self._send_notes()
            await self._send(activity_start=types.ActivityStart())
            if self._activity:
                await self._send_audio(bytes(self._activity))
            self._streamed_ok, self._streamed_conn = True, self.connections
        except BrainError:
            raise
        except Exception as exc:  # the reply resends the turn on a new connection
            log.info("Gemini Live: streaming the turn failed (%s)", type(exc).__name__)
            self._streamed_ok = False
            self._dead = True

    async def stream_audio(self, pcm: bytes, sample_rate: int) -> None:
        pcm = self._to_16k(pcm, sample_rate)
        if self._activity is None:
            self._ring.append(pcm)
            self._ring_bytes += len(pcm)
            limit = LIVE_RATE * 2 * self.options.live_preroll_ms // 1000
            while self._ring and self._ring_bytes - len(self._ring[0]) >= limit:
                self._ring_bytes -= len(self._ring.popleft())
            return
        self._activity += pcm
        self._unsent += pcm
        if self._streamed_ok and len(self._unsent) >= self._stream_chunk:
            await self._flush_stream()

    async def _flush_stream(self) -> None:
        """Send what the candidate said since the last message (batched: fewer messages)."""
        pcm, self._unsent = bytes(self._unsent), bytearray()
        if not pcm or not self._streamed_ok:
            return
        try:
            await self._send_audio(pcm)
        except Exception as exc:
            log.info("Gemini Live: streaming the turn failed (%s)", type(exc).__name__)
            self._streamed_ok = False

    async def speech_ended(self) -> None:
        from google.genai import types

        if self._activity is None:
            return
        await self._flush_stream()
        self._streamed, self._activity = bytes(self._activity), None
        if self._streamed_ok:
            try:
                self._sent_turn()
                await self._send(activity_end=types.ActivityEnd())
            except Exception as exc:
                log.info("Gemini Live: ending the turn failed (%s)", type(exc).__name__)
                self._streamed_ok = False

    def _to_16k(self, pcm: bytes, rate: int) -> bytes:
        if rate == LIVE_RATE:
            return pcm
        from pipeline.audio import Resampler

        if self._resampler is None or self._resampler_rate != rate:
            self._resampler, self._resampler_rate = Resampler(rate, LIVE_RATE), rate
        return bytes(self._resampler.process(pcm))

    async def _send_audio(self, pcm: bytes, rate: int = LIVE_RATE) -> None:
        from google.genai import types

        step = max(2, rate * 2 * self.options.live_chunk_ms // 1000 // 2 * 2)
        for i in range(0, len(pcm), step):
            blob = types.Blob(data=pcm[i : i + step], mime_type=f"audio/pcm;rate={rate}")
            await self._send(audio=blob)

    # -- one reply --------------------------------------------------------------------------------

    async def reply(self, turn: BrainTurn) -> AsyncGenerator[BrainEvent, None]:
        if self._tools is None:
            raise BrainError("GeminiBrain.reply called before start()")
        streamed = self._streamed if self._streamed_ok else None
        audio = turn.audio if turn.audio else self._streamed
        self._streamed, self._streamed_ok = None, False
        if turn.instruction:
            self._notes.append(note(turn.instruction))
        user_line = _Said("user", turn.text or "")  # recorded at the end: not replayed twice
        reading = _Reading(turn.turn_id)
        usage = UsageSum()
        budget = RetryBudget(self.options, self.clock.now(), self.rng)
        need_send = streamed is None
        try:
            with anyio.fail_after(self.options.first_token_timeout_s):
                await self._read_lock.acquire()
        except TimeoutError:  # a previous reply still holds the socket: start afresh
            self._dead = True
            self._read_lock = asyncio.Lock()
            await self._read_lock.acquire()
        lock = self._read_lock
        try:
            while True:
                try:
                    await self._ensure_connected()
                    if streamed is not None and self._streamed_conn != self.connections:
                        need_send = True  # streamed to a connection since replaced
                    if self._stale:
                        await self._skip_stale()
                    if need_send:
                        await self._send_turn(turn, audio, reading)
                        need_send = False
                    reading.triggered = True
                    async with contextlib.aclosing(self._read(reading, usage)) as events:
                        async for event in events:
                            yield event
                    break
                except BrainError:
                    raise
                except Exception as exc:
                    kind, what = ("retry", str(exc)) if isinstance(exc, _Dead) else classify(exc)
                    if kind == "fatal":
                        log.error("Gemini Live (%s): %s", self.model, what)
                        raise BrainError(f"Gemini Live ({self.model}): {what}") from None
                    self._dead = True  # reconnect (resume) before trying again
                    delay = budget.next_delay(self.clock.now(), retry_after(exc))
                    if kind != "retry" or delay is None:
                        log.warning(
                            "Gemini Live (%s): %s; giving up on this reply", self.model, what
                        )
                        for event in self._fallback(turn, reading):
                            yield event
                        self.failures.failed(self.model)
                        return
                    log.warning(
                        "Gemini Live (%s): %s; resuming, retry %d in %.2f s",
                        self.model,
                        what,
                        budget.attempts,
                        delay,
                    )
                    need_send = True
                    await self.clock.sleep(delay)
            self.failures.succeeded()
            if self._transcript:
                user_line.text = user_line.text or "".join(self._transcript).strip()
                yield UserTranscript(turn.turn_id, "".join(self._transcript).strip())
                self._transcript.clear()
            spent = usage.event()
            if spent is not None:
                yield spent
            if self._go_away_at is not None:
                with anyio.move_on_after(self.options.first_token_timeout_s):
                    await self._ensure_connected()
        finally:
            if reading.triggered and not reading.done:
                self._stale = True
            self._said.append(user_line)
            self._said.append(_Said("model", "".join(reading.text), turn.epoch))
            if turn.epoch in self._heard:  # heard before the reply was recorded
                text, completed = self._heard.pop(turn.epoch)
                self.heard(turn.epoch, text, completed)
            lock.release()

    def _fallback(self, turn: BrainTurn, reading: _Reading) -> list[BrainEvent]:
        """Never silent: the question the director just gave, else ask to repeat."""
        questions = [r["question"] for _, r in reading.tools if r.get("question")]
        if reading.after_tool and questions:
            line = " " + str(questions[-1])
        elif not reading.text:
            line = self.options.fallback_line
        else:
            return []  # cut mid-sentence: nothing sensible to add
        reading.text.append(line)
        return [TextDelta(line)]

    async def _send_turn(self, turn: BrainTurn, audio: bytes | None, reading: _Reading) -> None:
        from google.genai import types

        if reading.text or reading.tools:  # a retry after part of the reply was produced
            self._notes.append(self._resume_note(reading))
        self._sent_turn()
        if audio:
            self._transcript.clear()  # it is transcribed again
            await self._send_notes()
            await self._send(activity_start=types.ActivityStart())
            await self._send_audio(audio, turn.sample_rate if turn.audio else LIVE_RATE)
            await self._send(activity_end=types.ActivityEnd())
            return
        parts = [types.Part(text=n) for n in self._notes]
        self._notes.clear()
        if turn.text:
            parts.append(types.Part(text=turn.text))
        if not parts:
            parts.append(types.Part(text=note("the candidate has said nothing yet.")))
        await self._session.send_client_content(
            turns=[types.Content(role="user", parts=parts)], turn_complete=True
        )

    def _sent_turn(self) -> None:
        """A turn goes to the server: its state moves past the last handle."""
        self._expect += 1
        self._handle_fresh = False

    def _resume_note(self, reading: _Reading) -> str:
        said = "".join(reading.text).strip()
        text = "the connection dropped while you were replying."
        if said:
            text += f' You had already said: "{said[-300:]}".'
        for name, result in reading.tools:
            text += (
                f" You had already called {name}, which returned {result}; do not call it again."
            )
        return note(text + " Continue from there without repeating yourself.")

    async def _next(self, wait_s: float) -> Any:
        """The next server message; raises _Dead when none comes within ``wait_s``."""
        if self._session is None or self._dead:
            raise _Dead("not connected")
        while True:
            if self._rx is None:
                self._rx = self._session.receive()
            try:
                with anyio.fail_after(wait_s):
                    return await anext(self._rx)
            except StopAsyncIteration:  # receive() ends after each turnComplete
                self._rx = None
            except TimeoutError:
                self._rx = None
                raise _Dead(f"no message for {wait_s:.1f} s") from None
            except BaseException:
                self._rx = None
                raise

    def _bookkeeping(self, msg: Any, usage: UsageSum | None) -> None:
        """What every message may carry, whoever reads it."""
        update = msg.session_resumption_update
        if update is not None and update.resumable and update.new_handle:
            self._handle = update.new_handle
            self._handle_fresh = self._expect == 0
        if msg.go_away is not None:
            left = parse_duration(msg.go_away.time_left) or 0.0
            self._go_away_at = self.clock.now() + max(
                0.0, left - self.options.live_go_away_margin_s
            )
            log.info("Gemini Live: goAway (%s left)", msg.go_away.time_left)
        if usage is not None:
            usage.add(msg.usage_metadata)
        sc = msg.server_content
        if sc is not None and sc.turn_complete:
            self._expect = max(0, self._expect - 1)
        if sc is not None and sc.input_transcription is not None:
            if sc.input_transcription.text:
                self._transcript.append(sc.input_transcription.text)

    async def _skip_stale(self) -> None:
        """Read the rest of an interrupted generation (answering its tool calls "cancelled")."""
        after_tool = False
        while True:
            wait = (
                self.options.live_tool_continuation_s
                if after_tool
                else self.options.stall_timeout_s
            )
            try:
                msg = await self._next(wait)
            except _Dead:
                if after_tool:
                    break
                raise
            self._bookkeeping(msg, None)
            if msg.tool_call is not None:
                await self._answer(msg.tool_call, cancelled=True)
                after_tool = True
            elif msg.server_content is not None:
                if _model_text(msg.server_content, self.options):
                    after_tool = False
                if msg.server_content.turn_complete and not after_tool:
                    break
        self._stale = False

    async def _answer(
        self, tool_call: Any, *, cancelled: bool, reading: _Reading | None = None
    ) -> list[ToolCalled]:
        """Run the calls through the director (shielded: the model must get its answers) and
        send the results back."""
        from google.genai import types

        assert self._tools is not None
        out: list[ToolCalled] = []
        responses = []
        with anyio.CancelScope(shield=True):
            for fc in tool_call.function_calls or []:
                name, args = str(fc.name or ""), dict(fc.args or {})
                if cancelled:
                    result: dict[str, Any] = {
                        "status": "cancelled",
                        "error": "the candidate interrupted this reply; ignore this call",
                    }
                else:
                    result = await self._tools(name, args)
                    out.append(ToolCalled(name, args, result))
                    if reading is not None:
                        reading.tools.append((name, result))
                responses.append(types.FunctionResponse(id=fc.id, name=fc.name, response=result))
            if responses and self._session is not None and not self._dead:
                with anyio.move_on_after(self.options.stall_timeout_s):
                    await self._session.send_tool_response(function_responses=responses)
        return out

    async def _read(self, reading: _Reading, usage: UsageSum) -> AsyncGenerator[BrainEvent, None]:
        opts = self.options
        got_any = bool(reading.text)
        waiting_continuation = False
        while True:
            if waiting_continuation:
                wait = opts.live_tool_continuation_s
            else:
                wait = opts.stall_timeout_s if got_any else opts.first_token_timeout_s
            try:
                msg = await self._next(wait)
            except _Dead:
                if waiting_continuation:  # the model had nothing to add after its tool call
                    reading.done = True
                    return
                raise
            self._bookkeeping(msg, usage)
            if msg.tool_call is not None:
                got_any = True
                for event in await self._answer(msg.tool_call, cancelled=False, reading=reading):
                    yield event
                reading.after_tool = True
                continue
            sc = msg.server_content
            if sc is None:
                continue
            text = _model_text(sc, opts)
            if text:
                got_any = True
                reading.after_tool = waiting_continuation = False
                reading.text.append(text)
                yield TextDelta(text)
            if sc.turn_complete:
                final = bool(reading.tools) and reading.tools[-1][0] in opts.live_final_tools
                if reading.after_tool and not final:
                    waiting_continuation = True  # some models complete the turn at the call
                    continue
                reading.done = True
                return


def _model_text(sc: Any, options: GeminiOptions) -> str:
    if options.live_response_modality == "AUDIO":
        ot = sc.output_transcription
        return str(ot.text) if ot is not None and ot.text else ""
    turn = sc.model_turn
    if turn is None:
        return ""
    return "".join(p.text for p in turn.parts or [] if p.text and not p.thought)
