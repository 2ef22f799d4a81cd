"""Chat mode of the Gemini brain: one streamed ``generate_content`` request per model turn.

The history lives here: each candidate turn (its audio as WAV until its transcript is known,
then the text; the director's notes), each model turn as received (text runs merged, function
calls kept with their thought signatures) and each tool result. A request renders it as the
model should see it: a reply the candidate only partly heard is cut to what was heard (its tool
calls kept) and followed by a note saying so. See :mod:`stages.gemini` for the whole picture.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncGenerator, AsyncIterator
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
    TRANSCRIBE_PROMPT,
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
    uses_thinking_level,
    wav_bytes,
)

if TYPE_CHECKING:
    from google.genai import Client

log = logging.getLogger("stages.gemini")


@dataclass
class _UserEntry:
    turn_id: int | None
    wav: bytes | None = None
    text: str | None = None
    transcript: str | None = None
    notes: list[str] = field(default_factory=list)


@dataclass
class _ModelEntry:
    epoch: int
    parts: list[Any] = field(default_factory=list)  # types.Part, as received


@dataclass
class _ToolEntry:
    parts: list[Any] = field(default_factory=list)  # functionResponse parts


_Entry = _UserEntry | _ModelEntry | _ToolEntry


class ChatEngine:
    """Chat mode: history kept here, one streamed request per model turn."""

    def __init__(
        self, client: Client, model: str, options: GeminiOptions, clock: Clock, rng: random.Random
    ) -> None:
        self.client = client
        self.model = model
        self.options = options
        self.clock = clock
        self.rng = rng
        self.history: list[_Entry] = []
        self.heard_text: dict[int, tuple[str, bool]] = {}
        self.failures = FailureCounter(options.max_failed_turns)
        self._setup: BrainSetup | None = None
        self._tools: ToolHandler | None = None
        self._config: Any = None
        self._transcriptions: set[asyncio.Task[Any]] = set()
        self._pending: list[tuple[_UserEntry, asyncio.Task[Any]]] = []
        self._deferred: list[_UserEntry] = []

    async def start(self, setup: BrainSetup, tools: ToolHandler) -> None:
        from google.genai import types

        self._setup, self._tools = setup, tools
        thinking = None
        if self.options.thinking_level and uses_thinking_level(self.model):
            thinking = types.ThinkingConfig(
                thinking_level=types.ThinkingLevel(self.options.thinking_level.upper())
            )
        self._config = types.GenerateContentConfig(
            system_instruction=setup.system_instruction,
            tools=[types.Tool(function_declarations=function_declarations(setup.tools))]
            if setup.tools
            else None,
            automatic_function_calling=types.AutomaticFunctionCallingConfig(disable=True),
            thinking_config=thinking,
            temperature=self.options.temperature,
        )

    def heard(self, epoch: int, text: str, completed: bool) -> None:
        self.heard_text[epoch] = (text, completed)

    async def speech_started(self) -> None: ...

    async def stream_audio(self, pcm: bytes, sample_rate: int) -> None: ...

    async def speech_ended(self) -> None: ...

    async def aclose(self) -> None:
        for task in list(self._transcriptions):
            task.cancel()
        with anyio.move_on_after(2, shield=True):
            await self.client.aio.aclose()

    # -- one reply ------------------------------------------------------------------------------

    async def reply(self, turn: BrainTurn) -> AsyncIterator[BrainEvent]:
        if self._tools is None:
            raise BrainError("GeminiBrain.reply called before start()")
        for event in self._finished_transcripts():
            yield event
        entry = _UserEntry(turn.turn_id, text=turn.text)
        if turn.audio:
            entry.wav = wav_bytes(turn.audio, turn.sample_rate)
        if turn.instruction:
            entry.notes.append(note(turn.instruction))
        if not turn.audio and not turn.text and not turn.instruction:
            entry.notes.append(note("the candidate has said nothing yet."))
        self.history.append(entry)
        if entry.wav is not None and entry.text is None and self.options.transcribe:
            self._deferred.append(entry)  # started once the reply's first chunk is in

        usage = UsageSum()
        spoken = False  # some text has been yielded in this reply
        question: str | None = None  # the last question next_question gave in this reply
        for _round in range(self.options.max_tool_rounds + 1):
            model_entry = _ModelEntry(turn.epoch)
            self.history.append(model_entry)
            outcome = "failed"
            async with contextlib.aclosing(self._model_turn(model_entry, usage)) as events:
                async for step in events:
                    if isinstance(step, TextDelta):
                        spoken = True
                        yield step
                    else:
                        outcome = step
                    for transcript in self._finished_transcripts():
                        yield transcript
            if outcome == "failed":
                # degrade gracefully: ask the question we were given, else ask to repeat
                line: str | None = None
                if any(p.text for p in model_entry.parts):
                    line = None  # cut mid-sentence: nothing sensible to add
                elif question:
                    line = " " + question
                elif not spoken:
                    line = self.options.fallback_line
                if line:
                    _add_part(model_entry, _text_part(line))
                    yield TextDelta(line)
                for event in await self._end_of_reply(usage):
                    yield event
                self.failures.failed(self.model)
                return
            calls = [p.function_call for p in model_entry.parts if p.function_call]
            if not calls:
                break
            tool_entry = _ToolEntry()
            self.history.append(tool_entry)
            for call in calls:
                name, args = str(call.name or ""), dict(call.args or {})
                result = await self._tools(name, args)
                tool_entry.parts.append(_function_response(call, result))
                if result.get("status") == "ok" and result.get("question"):
                    question = str(result["question"])
                yield ToolCalled(name, args, result)
        self.failures.succeeded()
        for event in await self._end_of_reply(usage):
            yield event

    async def _end_of_reply(self, usage: UsageSum) -> list[BrainEvent]:
        self._start_deferred()
        out: list[BrainEvent] = []
        if self._pending:
            with anyio.move_on_after(self.options.transcript_wait_s):
                await asyncio.wait([t for _, t in self._pending])  # never cancels them
            out.extend(self._finished_transcripts(usage))
        event = usage.event()
        if event is not None:
            out.append(event)
        return out

    async def _model_turn(
        self, entry: _ModelEntry, usage: UsageSum
    ) -> AsyncGenerator[TextDelta | str, None]:
        """One model request, retried within the budget. Yields text deltas, then "ok" or
        "failed". Parts are recorded into ``entry`` as they arrive."""
        opts = self.options
        budget = RetryBudget(opts, self.clock.now(), self.rng)
        continuation = False
        while True:
            contents = self._contents(continuation=continuation)
            pump: _Pump | None = None
            got_first = False
            meta: Any = None  # the stream's usage (each chunk may repeat the running total)
            try:
                pump = _Pump(self.client, self.model, contents, self._config)
                while True:
                    if got_first:
                        timeout = opts.stall_timeout_s
                    else:
                        timeout = min(
                            opts.first_token_timeout_s, budget.remaining(self.clock.now())
                        )
                    with anyio.fail_after(max(timeout, 0.001)):
                        chunk = await pump.next()
                    if chunk is None:
                        break
                    if not got_first:
                        self._start_deferred()  # off the path to the first token
                    got_first = True
                    meta = chunk.usage_metadata or meta
                    for part in _parts(chunk):
                        if part.thought:
                            continue
                        _add_part(entry, part)
                        if part.text:
                            yield TextDelta(part.text)
                usage.add(meta)
                yield "ok"
                return
            except Exception as exc:
                kind, what = classify(exc)
                if kind == "fatal":
                    log.error("Gemini (%s): %s", self.model, what)
                    raise BrainError(f"Gemini ({self.model}): {what}") from None
                delay = None
                if kind == "retry":
                    delay = budget.next_delay(self.clock.now(), retry_after(exc))
                if delay is None:
                    log.warning(
                        "Gemini (%s): %s; giving up on this reply after %d attempt(s)",
                        self.model,
                        what,
                        budget.attempts,
                    )
                    yield "failed"
                    return
                log.warning(
                    "Gemini (%s): %s; retry %d in %.2f s", self.model, what, budget.attempts, delay
                )
                continuation = any(p.text for p in entry.parts)
            finally:
                if pump is not None:
                    await pump.close()
            await self.clock.sleep(delay)  # the failed attempt is closed first

    # -- history ----------------------------------------------------------------------------------

    def _contents(self, *, continuation: bool = False) -> list[Any]:
        """The history as the model should see it: what was heard, transcripts for audio."""
        from google.genai import types

        out: list[Any] = []
        pending_note: str | None = None
        heard_left: dict[int, int | None] = {}
        users = [i for i, e in enumerate(self.history) if isinstance(e, _UserEntry)]
        cut = users[-self.options.history_turns] if len(users) > self.options.history_turns else 0
        if cut:
            summary = self._condensed(self.history[:cut], heard_left)
            if summary:
                _append(out, "user", [types.Part(text=summary)])
        for entry in self.history[cut:]:
            if isinstance(entry, _UserEntry):
                parts = []
                if pending_note:
                    parts.append(types.Part(text=pending_note))
                    pending_note = None
                parts.extend(_user_parts(entry))
                _append(out, "user", parts)
            elif isinstance(entry, _ToolEntry):
                _append(out, "user", list(entry.parts))
            else:
                parts, note_text = self._heard_parts(entry, heard_left)
                pending_note = note_text or pending_note
                _append(out, "model", parts)
        if continuation:
            _append(
                out,
                "user",
                [
                    types.Part(
                        text=note(
                            "your reply was cut off by a network error after the "
                            "text above; continue exactly from there, without "
                            "repeating it."
                        )
                    )
                ],
            )
        return _drop_dangling_calls(out)

    def _condensed(self, entries: list[_Entry], heard_left: dict[int, int | None]) -> str:
        """Older turns as a plain transcript: the SDK's per-part conversion grows with the
        history, so long interviews would otherwise get slower turn by turn."""
        lines: list[str] = []
        last_epoch: int | None = None
        for entry in entries:
            if isinstance(entry, _UserEntry):
                text = entry.text or entry.transcript
                if text is None and entry.wav is not None:
                    text = "(a spoken answer, not transcribed)"
                if text:
                    lines.append(f"Candidate: {text}")
                last_epoch = None
            elif isinstance(entry, _ModelEntry):
                parts, _ = self._heard_parts(entry, heard_left)
                text = "".join(p.text or "" for p in parts).strip()
                if not text:
                    continue
                if entry.epoch == last_epoch and lines:
                    lines[-1] += " " + text
                else:
                    lines.append(f"Interviewer: {text}")
                last_epoch = entry.epoch
        if not lines:
            return ""
        return note("the interview so far, before the latest turns:\n" + "\n".join(lines))

    def _heard_parts(
        self, entry: _ModelEntry, left: dict[int, int | None]
    ) -> tuple[list[Any], str | None]:
        """The entry's parts cut to what was heard of its reply (tool calls always kept)."""
        from google.genai import types

        heard = self.heard_text.get(entry.epoch)
        if heard is None or heard[1]:
            return list(entry.parts), None
        text, _ = heard
        if entry.epoch not in left:
            full = "".join(
                p.text or ""
                for e in self.history
                if isinstance(e, _ModelEntry) and e.epoch == entry.epoch
                for p in e.parts
            )
            left[entry.epoch] = heard_prefix_len(full, text)
        remaining = left[entry.epoch]
        parts: list[Any] = []
        for part in entry.parts:
            if not part.text:
                parts.append(part)
                continue
            if remaining is None:  # not a prefix: the heard text once, in place of the first
                parts.append(types.Part(text=text))
                left[entry.epoch] = remaining = 0
                continue
            keep = part.text[:remaining]
            remaining -= len(keep)
            left[entry.epoch] = remaining
            if keep:
                parts.append(types.Part(text=keep))
        return parts, truncation_note(text)

    # -- transcription ----------------------------------------------------------------------------

    def _start_deferred(self) -> None:
        for entry in self._deferred:
            task = asyncio.ensure_future(self._transcribe(entry))
            self._transcriptions.add(task)
            task.add_done_callback(self._transcriptions.discard)
            self._pending.append((entry, task))
        self._deferred.clear()

    async def _transcribe(self, entry: _UserEntry) -> tuple[str, UsageSum]:
        from google.genai import types

        assert entry.wav is not None
        usage = UsageSum()
        config = types.GenerateContentConfig(
            temperature=0,
            automatic_function_calling=types.AutomaticFunctionCallingConfig(disable=True),
            thinking_config=types.ThinkingConfig(thinking_level=types.ThinkingLevel.LOW)
            if uses_thinking_level(self.options.transcription_model or self.model)
            else None,
        )
        contents = [
            types.Content(
                role="user",
                parts=[
                    types.Part.from_bytes(data=entry.wav, mime_type="audio/wav"),
                    types.Part(text=TRANSCRIBE_PROMPT),
                ],
            )
        ]
        for attempt in range(2):
            try:
                with anyio.fail_after(self.options.turn_budget_s * 2):
                    response = await self.client.aio.models.generate_content(
                        model=self.options.transcription_model or self.model,
                        contents=contents,
                        config=config,
                    )
                usage.add(response.usage_metadata)
                text = (response.text or "").strip()
                entry.transcript = text
                return text, usage
            except Exception as exc:
                kind, what = classify(exc)
                log.warning("Gemini transcription of turn %s: %s", entry.turn_id, what)
                if kind != "retry" or attempt:
                    break
                await self.clock.sleep(self.options.backoff_initial_s)
        return "", usage

    def _finished_transcripts(self, usage: UsageSum | None = None) -> list[BrainEvent]:
        out: list[BrainEvent] = []
        still: list[tuple[_UserEntry, asyncio.Task[Any]]] = []
        for entry, task in self._pending:
            if not task.done():
                still.append((entry, task))
                continue
            if task.cancelled() or task.exception() is not None:
                continue
            text, t_usage = task.result()
            if usage is not None:
                usage.input_tokens += t_usage.input_tokens
                usage.output_tokens += t_usage.output_tokens
            if text:
                out.append(UserTranscript(entry.turn_id, text))
        self._pending = still
        return out


class _Pump:
    """Reads one SDK stream in its own asyncio task into an unbounded queue.

    Why: the SDK's stream is a chain of async generators in a reference cycle; closing the
    outer one while it is suspended at a ``yield`` leaves the HTTP response open until the
    garbage collector runs. The pump is always awaiting the network, so cancelling it unwinds
    the whole chain and releases the connection at once (an interruption closes the stream
    promptly, whatever the reply's consumer was doing)."""

    _END = object()

    def __init__(self, client: Client, model: str, contents: list[Any], config: Any) -> None:
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._task = asyncio.ensure_future(self._run(client, model, contents, config))

    async def _run(self, client: Client, model: str, contents: list[Any], config: Any) -> None:
        try:
            stream = await client.aio.models.generate_content_stream(
                model=model, contents=contents, config=config
            )
            async for chunk in stream:
                self._queue.put_nowait(chunk)
            self._queue.put_nowait(self._END)
        except Exception as exc:
            self._queue.put_nowait(exc)

    async def next(self) -> Any:
        """The next chunk, None at the end; raises what the stream raised."""
        item = await self._queue.get()
        if item is self._END:
            return None
        if isinstance(item, Exception):
            raise item
        return item

    async def close(self) -> None:
        if not self._task.done():
            self._task.cancel()
            with anyio.move_on_after(1, shield=True):
                await asyncio.wait([self._task])


def _parts(chunk: Any) -> list[Any]:
    candidates = getattr(chunk, "candidates", None) or []
    if not candidates or candidates[0].content is None:
        return []
    return list(candidates[0].content.parts or [])


def _add_part(entry: _ModelEntry, part: Any) -> None:
    """Record a received part; plain text runs are merged (signatures are kept apart)."""
    from google.genai import types

    last = entry.parts[-1] if entry.parts else None
    if _plain_text(part) and last is not None and _plain_text(last):
        entry.parts[-1] = types.Part(text=(last.text or "") + (part.text or ""))
    else:
        entry.parts.append(part)


def _plain_text(part: Any) -> bool:
    return bool(part.text) and not part.thought_signature and not part.function_call


def _text_part(text: str) -> Any:
    from google.genai import types

    return types.Part(text=text)


def _function_response(call: Any, result: dict[str, Any]) -> Any:
    from google.genai import types

    return types.Part(
        function_response=types.FunctionResponse(id=call.id, name=call.name, response=result)
    )


def _user_parts(entry: _UserEntry) -> list[Any]:
    from google.genai import types

    parts: list[Any] = []
    if entry.text:
        parts.append(types.Part(text=entry.text))
    elif entry.transcript is not None and entry.wav is not None:
        parts.append(types.Part(text=entry.transcript or "(inaudible)"))
    elif entry.wav is not None:
        parts.append(types.Part.from_bytes(data=entry.wav, mime_type="audio/wav"))
    parts.extend(types.Part(text=n) for n in entry.notes)
    return parts


def _append(out: list[Any], role: str, parts: list[Any]) -> None:
    """Add a content, merged into the previous one of the same role (an unheard reply leaves
    none, and the API wants a turn per role)."""
    from google.genai import types

    if not parts:
        return
    if out and out[-1].role == role:
        out[-1].parts.extend(parts)
    else:
        out.append(types.Content(role=role, parts=parts))


def _drop_dangling_calls(contents: list[Any]) -> list[Any]:
    """Remove function calls never answered (a reply cut between the call and its result)."""
    answered = {
        (p.function_response.id, p.function_response.name)
        for c in contents
        for p in c.parts or []
        if p.function_response
    }
    for c in contents:
        if c.role == "model":
            c.parts = [
                p
                for p in c.parts or []
                if not p.function_call or (p.function_call.id, p.function_call.name) in answered
            ]
    return [c for c in contents if c.parts]
