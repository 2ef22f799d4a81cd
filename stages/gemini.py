"""The Gemini brain: streamed interviewer replies from the candidate's speech, with tools.

:class:`GeminiBrain` implements :class:`stages.brain.Brain` on the official google-genai SDK
(imported lazily, inside functions, so the server starts fast), in one of two modes:

* ``chat`` (default, :mod:`stages.gemini_chat`): one ``generate_content_stream`` call per
  reply with the system instruction, the conversation so far and the new turn's audio inline
  as WAV. Text deltas are yielded as the chunks arrive. Function calls (the director's
  ``next_question`` and
  ``end_interview``) are executed through the :data:`~stages.brain.ToolHandler` and fed back
  within the same reply: the model's content (with its thought signatures) and a user
  ``functionResponse`` part are appended and the model is asked again.
* ``live``: the Live API over one websocket (see :mod:`stages.gemini_live`).

The candidate's words reach the transcript without delaying the reply: in ``chat`` mode a
second, unary ``generate_content`` call asking for a verbatim transcript of the same audio runs
beside the reply, started as soon as the reply's first chunk is in (so that none of its work
stands between the turn and the first words); its :class:`UserTranscript` is
yielded as soon as it is known (between chunks, or at the end of the reply, waiting at most
``transcript_wait_s``; a later result is yielded by the next reply). Once a turn's transcript is
known, the history carries the text instead of the audio, so later requests stay small. (The
SDK is asyncio-only; the transcription is an asyncio task owned by the brain, cancelled by
:meth:`GeminiBrain.aclose`.)

Failures. A request that fails with 429, 408, 5xx, a connection error or no first chunk within
``first_token_timeout_s`` is retried with exponential backoff and jitter (or the server's
``retryDelay``) while the reply's ``turn_budget_s`` lasts; past it the brain says
``fallback_line`` instead of going silent (and, after ``max_failed_turns`` such replies in a
row, gives up with :class:`BrainError`). A stream cut after some text is retried with that text
kept and a note asking the model to go on from there. A rejected key (401, 403, 400
``API_KEY_INVALID``) or an unknown model (404) raises :class:`BrainError` at once, logged
without the key.

What was heard. :meth:`GeminiBrain.heard` records what the candidate heard of each reply; the
next request carries only that (the model's later text is dropped, its tool calls kept) plus a
note that it was interrupted.

Custom certificate authorities (a corporate proxy, the tests' fake) are trusted through
``SSL_CERT_FILE``: the SDK builds its aiohttp, httpx and websocket SSL contexts from it.
"""

from __future__ import annotations

import io
import json
import logging
import random
import re
import wave
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from pipeline.clock import Clock, MonotonicClock
from stages.brain import (
    BrainError,
    BrainEvent,
    BrainSetup,
    BrainTurn,
    BrainUsage,
    ToolHandler,
    ToolSpec,
)

if TYPE_CHECKING:
    from google.genai import Client

log = logging.getLogger("stages.gemini")

GeminiMode = Literal["chat", "live", "live-audio"]
MODES: tuple[str, ...] = ("chat", "live", "live-audio")

DEFAULT_MODELS: dict[str, str] = {
    "chat": "gemini-3.8-flash",
    "live": "gemini-3.8-live",
    "live-audio": "gemini-3.8-live",
}
"""``GEMINI_MODEL`` when unset. ``gemini-3.8-flash`` is the current stable Flash (thinking
level LOW keeps its first token quick); ``gemini-3.8-live`` is the current stable Live model
(it answers in audio only: text comes from its output transcription, see GeminiOptions)."""

FALLBACK_LINE = "Sorry, could you say that again?"

TRANSCRIBE_PROMPT = (
    "Transcribe the speech in this audio verbatim, in the language spoken. Output only the "
    "words, with no labels, notes or timestamps. If there is no intelligible speech, output "
    "nothing."
)


@dataclass(frozen=True)
class GeminiOptions:
    """Tuning of :class:`GeminiBrain`. Defaults are for a live spoken interview."""

    turn_budget_s: float = 8.0
    """Time one model request of a reply may take to get going (attempts, backoff and waits for
    the first chunk, together); past it the fallback line is said."""
    first_token_timeout_s: float = 4.0
    """An attempt with no first chunk (or Live message) after this long is abandoned."""
    stall_timeout_s: float = 6.0
    """A stream silent this long after its first chunk is treated as dropped."""
    max_attempts: int = 4
    """Attempts per model request, the first included."""
    backoff_initial_s: float = 0.25
    """First retry delay; doubles per attempt, with jitter (50–100 % of the value)."""
    backoff_max_s: float = 2.0
    """Cap of one retry delay (a server ``retryDelay`` may ask for more, within the budget)."""
    fallback_line: str = FALLBACK_LINE
    """Said when a reply cannot be had within the budget, so the candidate never hears
    silence."""
    max_failed_turns: int = 3
    """After this many fallback replies in a row the brain raises BrainError (interview fails)."""
    max_tool_rounds: int = 4
    """Function-call round trips allowed within one reply."""
    history_turns: int = 3
    """Chat mode: the latest candidate turns sent in full (with their tool calls); earlier ones
    go as a condensed transcript, so requests stay small and quick in long interviews."""
    transcribe: bool = True
    """Chat mode: transcribe each audio turn with a parallel request (for the transcript)."""
    transcription_model: str | None = None
    """Model for those transcriptions; None: the reply model."""
    transcript_wait_s: float = 2.0
    """At the end of a reply, wait this long at most for its transcription."""
    thinking_level: str | None = "low"
    """Thinking level for Gemini 3 models (``low`` keeps the first token quick); not sent to
    other models (2.x uses thinking budgets). None: the model's default."""
    temperature: float | None = None
    """None: the model's default."""
    api_version: str | None = None
    """None: the SDK's default API version."""
    live_response_modality: Literal["AUDIO", "TEXT"] = "AUDIO"
    """Live mode: ``AUDIO`` (what current native-audio Live models answer in; the reply text is
    taken from the output transcription and the audio is discarded) or ``TEXT`` (models with
    text output)."""
    live_chunk_ms: int = 250
    """Live mode: size of the audio messages when a whole turn is sent at once."""
    live_stream_chunk_ms: int = 100
    """Live mode, streamed audio: the candidate's audio is sent in messages of this length."""
    live_preroll_ms: int = 500
    """Live mode, streamed audio: audio kept from before the VAD's speech start and sent with
    ``activityStart`` (the VAD only says speech started once it has heard some)."""
    live_ping_interval_s: float = 10.0
    """Live mode: websocket keepalive; a socket that misses a pong for as long is dead."""
    live_go_away_margin_s: float = 1.0
    """Live mode: reconnect this long before a ``goAway``'s deadline at the latest."""
    live_tool_continuation_s: float = 4.0
    """Live mode: after a tool call, how long a ``turnComplete`` with nothing after the call
    waits for the model to go on (some Live models complete the turn at the call)."""
    live_final_tools: tuple[str, ...] = ("end_interview",)
    """Live mode: tools after which the model is not expected to go on (no such wait)."""

    def __post_init__(self) -> None:
        positive = (
            "turn_budget_s",
            "first_token_timeout_s",
            "stall_timeout_s",
            "backoff_initial_s",
            "backoff_max_s",
            "live_ping_interval_s",
        )
        for name in positive:
            if not getattr(self, name) > 0:
                raise ValueError(f"GeminiOptions.{name}: must be positive")
        for name in (
            "max_attempts",
            "max_failed_turns",
            "max_tool_rounds",
            "history_turns",
            "live_chunk_ms",
            "live_stream_chunk_ms",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"GeminiOptions.{name}: must be at least 1")
        for name in ("transcript_wait_s", "live_preroll_ms", "live_go_away_margin_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"GeminiOptions.{name}: must not be negative")
        if not self.fallback_line.strip():
            raise ValueError("GeminiOptions.fallback_line: must not be empty")
        if self.live_response_modality not in ("AUDIO", "TEXT"):
            raise ValueError("GeminiOptions.live_response_modality: must be AUDIO or TEXT")


# --- failures ------------------------------------------------------------------------------------

ErrorKind = Literal["fatal", "retry", "fail"]


def classify(exc: BaseException) -> tuple[ErrorKind, str]:
    """How a failed request is handled, and a short description for the log (never the key).

    ``fatal``: the brain cannot go on (bad key, unknown model); ``retry``: transient (429,
    408, 5xx, timeouts, connections, Live sockets closed); ``fail``: this request is bad
    (other 4xx): no retry, the fallback line.
    """
    from google.genai import errors

    if isinstance(exc, errors.APIError):
        code, status = int(exc.code or 0), str(exc.status or "")
        text = f"{exc.message or ''} {json.dumps(exc.details, default=str)}"
        what = f"{code} {status}".strip()
        if code in (401, 403) or "API_KEY_INVALID" in text or "API key not valid" in text:
            return "fatal", f"{what}: the API key was rejected (check GEMINI_API_KEY)"
        if code == 404:
            return "fatal", f"{what}: model or endpoint not found (check GEMINI_MODEL)"
        if code in (408, 429) or 500 <= code < 600 or code >= 1000:
            return "retry", what  # >= 1000: a Live websocket close code
        return "fail", f"{what}: {(exc.message or '')[:200]}"
    if isinstance(exc, errors.UnknownApiResponseError):
        return "retry", "unreadable response"
    if isinstance(exc, TimeoutError):
        return "retry", "timed out"
    if isinstance(exc, OSError | EOFError | ConnectionError):
        return "retry", f"connection: {type(exc).__name__}"
    module = type(exc).__module__
    if module.startswith(("aiohttp", "httpx", "httpcore", "websockets", "ssl")):
        return "retry", f"connection: {type(exc).__name__}"
    raise exc


def retry_after(exc: BaseException) -> float | None:
    """The server's ``RetryInfo.retryDelay`` (e.g. ``"1.5s"``) in seconds, if it sent one."""
    details = getattr(exc, "details", None)
    found = re.search(r'"retryDelay":\s*"([0-9.]+)s"', json.dumps(details, default=str))
    return float(found.group(1)) if found else None


class RetryBudget:
    """Attempts and waits of one model request, within ``turn_budget_s`` from ``start``.

    Pure (time is passed in), so its promises are property-tested: a granted delay is never
    negative, never runs past the deadline, and at most ``max_attempts`` attempts are made.
    """

    def __init__(self, options: GeminiOptions, start: float, rng: random.Random) -> None:
        self.options = options
        self.deadline = start + options.turn_budget_s
        self.attempts = 1
        self.rng = rng

    def remaining(self, now: float) -> float:
        return max(0.0, self.deadline - now)

    def next_delay(self, now: float, hint: float | None = None) -> float | None:
        """The wait before the next attempt, or None when the budget does not allow one."""
        opts = self.options
        if self.attempts >= opts.max_attempts:
            return None
        base = min(opts.backoff_max_s, opts.backoff_initial_s * 2 ** (self.attempts - 1))
        delay = base * self.rng.uniform(0.5, 1.0)
        if hint is not None and hint > delay:
            delay = hint
        # leave the next attempt at least a moment to get its first chunk
        if now + delay + min(0.25, opts.first_token_timeout_s) > self.deadline:
            return None
        self.attempts += 1
        return delay


# --- shared helpers ------------------------------------------------------------------------------


def wav_bytes(pcm: bytes, sample_rate: int) -> bytes:
    """16-bit mono PCM wrapped in a WAV header (what generateContent takes for raw audio)."""
    if len(pcm) % 2:
        raise ValueError("BrainTurn.audio: must be whole 16-bit samples (an even length)")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(pcm)
    return buf.getvalue()


def uses_thinking_level(model: str) -> bool:
    return re.match(r"(models/)?gemini-([3-9]|\d\d)", model) is not None


def function_declarations(tools: tuple[ToolSpec, ...], *, blocking: bool = False) -> list[Any]:
    """The director's tools as SDK declarations; ``blocking`` for Live (which defaults some
    models to non-blocking calls: the interview must wait for ``next_question``'s answer)."""
    from google.genai import types

    return [
        types.FunctionDeclaration(
            name=t.name,
            description=t.description,
            parameters_json_schema=t.parameters or {"type": "object", "properties": {}},
            behavior=types.Behavior.BLOCKING if blocking else None,
        )
        for t in tools
    ]


def make_client(api_key: str, base_url: str | None, options: GeminiOptions) -> Client:
    """A google-genai client: our own retries only (the SDK's are off), keepalive for Live.

    ``max_queue=None`` lets the websocket keep reading (and answering pings) between replies,
    while nobody is receiving; the messages wait in memory until the next reply reads them.
    """
    from google import genai
    from google.genai import types

    http = types.HttpOptions(
        base_url=base_url,
        api_version=options.api_version,
        retry_options=types.HttpRetryOptions(attempts=1),
        async_client_args={
            "max_queue": None,
            "ping_interval": options.live_ping_interval_s,
            "ping_timeout": options.live_ping_interval_s,
        },
    )
    return genai.Client(api_key=api_key, http_options=http)


def note(text: str) -> str:
    return f"(Note from the interview system, not from the candidate: {text})"


def heard_prefix_len(original: str, heard: str) -> int | None:
    """How many characters of ``original`` the candidate heard, given ``heard`` (a prefix of it
    as the voice reports it: whitespace may differ). None when ``heard`` is not such a prefix."""
    i = j = 0
    n, m = len(original), len(heard)
    while True:
        while j < m and heard[j].isspace():
            j += 1
        if j >= m:
            return i
        while i < n and original[i].isspace():
            i += 1
        if i >= n or original[i] != heard[j]:
            return None
        i += 1
        j += 1


def truncation_note(heard: str) -> str:
    if not heard.strip():
        return note("the candidate interrupted you before hearing any of your last reply.")
    tail = " ".join(heard.split())[-160:]
    return note(f'the candidate interrupted you; they heard your last reply only up to "{tail}".')


@dataclass
class UsageSum:
    input_tokens: int = 0
    output_tokens: int = 0

    def add(self, meta: Any) -> None:
        if meta is None:
            return
        self.input_tokens += int(getattr(meta, "prompt_token_count", None) or 0)
        out = getattr(meta, "candidates_token_count", None) or getattr(
            meta, "response_token_count", None
        )
        self.output_tokens += int(out or 0) + int(getattr(meta, "thoughts_token_count", None) or 0)

    def event(self) -> BrainUsage | None:
        if not (self.input_tokens or self.output_tokens):
            return None
        return BrainUsage(self.input_tokens, self.output_tokens)


@dataclass
class FailureCounter:
    """Consecutive fallback replies; too many in a row end the interview."""

    limit: int
    count: int = 0

    def failed(self, model: str) -> None:
        self.count += 1
        if self.count >= self.limit:
            log.error("Gemini (%s) failed %d replies in a row: giving up", model, self.count)
            raise BrainError(f"Gemini ({model}) failed {self.count} replies in a row")

    def succeeded(self) -> None:
        self.count = 0


# --- the brain -----------------------------------------------------------------------------------


class GeminiBrain:
    """A :class:`stages.brain.Brain` on Google Gemini; see the module docstring.

    ``model`` empty: :data:`DEFAULT_MODELS` for the mode. ``base_url``: a root URL such as
    ``https://host:port`` used for REST and Live alike (None: Google's). ``clock`` times the
    budgets and backoff (network timeouts run on the event loop's clock, which it shares).

    Live mode, optional streaming while the candidate speaks (see :mod:`stages.gemini_live`):
    :meth:`speech_started`, :meth:`stream_audio`, :meth:`speech_ended`. They do nothing in
    chat mode, so a session may call them whatever the mode.
    """

    def __init__(
        self,
        api_key: str,
        model: str = "",
        *,
        mode: GeminiMode = "chat",
        base_url: str | None = None,
        options: GeminiOptions | None = None,
        clock: Clock | None = None,
        rng: random.Random | None = None,
    ) -> None:
        if not api_key or not api_key.strip():
            raise ValueError("GEMINI_API_KEY: must not be empty")
        if mode not in MODES:
            raise ValueError(f"GEMINI_MODE: must be one of {', '.join(MODES)}, got {mode!r}")
        if mode == "live-audio":
            raise ValueError(
                "GEMINI_MODE=live-audio is not implemented yet (Gemini's own voice needs an "
                "audio event in the brain protocol); use chat or live"
            )
        if base_url is not None and not base_url.startswith(("http://", "https://")):
            raise ValueError(f"GEMINI_BASE_URL: must be an http(s) URL, got {base_url!r}")
        self.mode = mode
        self.model = model.strip() or DEFAULT_MODELS[mode]
        self.name = self.model
        self.options = options or GeminiOptions()
        self.clock = clock or MonotonicClock()
        self._api_key = api_key.strip()
        self._base_url = base_url.rstrip("/") if base_url else None
        self._rng = rng or random.Random()
        self._engine: Any = None

    @property
    def streams_audio(self) -> bool:
        """True when the session should feed the streaming hooks (live modes)."""
        return self.mode != "chat"

    def __repr__(self) -> str:  # never the key
        return f"GeminiBrain(model={self.model!r}, mode={self.mode!r}, base_url={self._base_url!r})"

    async def start(self, setup: BrainSetup, tools: ToolHandler) -> None:
        client = make_client(self._api_key, self._base_url, self.options)
        if self.mode == "chat":
            from stages.gemini_chat import ChatEngine

            self._engine = ChatEngine(client, self.model, self.options, self.clock, self._rng)
        else:
            from stages.gemini_live import LiveEngine

            self._engine = LiveEngine(client, self.model, self.options, self.clock, self._rng)
        await self._engine.start(setup, tools)

    def reply(self, turn: BrainTurn) -> AsyncIterator[BrainEvent]:
        if self._engine is None:
            raise BrainError("GeminiBrain.reply called before start()")
        events: AsyncIterator[BrainEvent] = self._engine.reply(turn)
        return events

    def heard(self, epoch: int, text: str, completed: bool) -> None:
        if self._engine is not None:
            self._engine.heard(epoch, text, completed)

    async def speech_started(self) -> None:
        """Live: the VAD heard the candidate start (sends ``activityStart`` and the pre-roll)."""
        if self.mode != "chat" and self._engine is not None:
            await self._engine.speech_started()

    async def stream_audio(self, pcm: bytes, sample_rate: int) -> None:
        """Live: the candidate's audio as it arrives (16-bit mono PCM, any rate)."""
        if self.mode != "chat" and self._engine is not None:
            await self._engine.stream_audio(pcm, sample_rate)

    async def speech_ended(self) -> None:
        """Live: the VAD ended the candidate's turn (sends ``activityEnd``)."""
        if self.mode != "chat" and self._engine is not None:
            await self._engine.speech_ended()

    async def aclose(self) -> None:
        engine, self._engine = self._engine, None
        if engine is not None:
            await engine.aclose()
