"""ElevenLabs streaming speech: the agent's reply text in, its voice out, while it is written.

Same contract as :class:`stages.voice.VoiceStage` (``AgentTextDelta`` in, ``AgentAudio`` out, a
closing empty ``final`` frame per reply, ``voice_request``/``first_audio`` marks, characters in
``ctx.usage.tts_characters``), so it replaces that stage without the rest of the graph noticing.

**One multi-context websocket per call, one context per reply.** A socket per reply would pay a
TCP + TLS + websocket handshake (one to three round trips) before every reply's first audio; on
one long-lived socket a reply only costs a message. Barge-in closes the reply's context
(``close_context``) and the next reply opens a fresh one on the same socket, at once. Between
replies a spare context is kept open and kept alive (``{"text": ""}`` resets the server's
inactivity timer), so the socket survives a candidate's long answer.

**Phrases are flushed as they come.** The reply is cut by :class:`~stages.voice.PhraseChunker`
(first phrase at the first clause, later ones by sentence) and every phrase is sent with
``flush: true``: the server would otherwise hold back audio until 120 characters had arrived
(its default ``chunk_length_schedule``), and the first phrase is usually shorter than that.

**What was heard.** The server's ``alignment`` (characters of the sent text per audio chunk) is
mapped back onto the reply by :class:`AlignmentTracker`: each ``AgentAudio.text`` holds the whole
words whose audio that chunk completes, so the pacer's ``text_played`` is what the candidate
actually heard, to the word.

**Faults.** A socket that drops is reopened at once (then with backoff); a reply in flight is
re-sent on the new socket from its first word not yet heard (it keeps the streamed input, the
alignment and the prosody that the HTTP endpoint would lose). When no socket can be had
(refused, timed out, dropped too often within one reply) the reply goes over the HTTP
``/stream`` endpoint through the official SDK, phrase by phrase. A rejected key (HTTP 401/403,
or the socket closed for an invalid key) raises :class:`ElevenLabsAuthError`; the key is never
logged.
"""

from __future__ import annotations

import base64
import binascii
import itertools
import json
import math
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import anyio

from pipeline.frames import AgentAudio
from pipeline.stage import CallContext, Inbox, Outbox
from stages.voice import ChunkerOptions, ReplyPhrases, dispatch_replies

DEFAULT_BASE_URL = "https://api.elevenlabs.io"
DEFAULT_VOICE_ID = "21m00Tcm4TlvDq8ikWAM"  # "Rachel", the original service's voice
DEFAULT_MODEL = "eleven_flash_v2_5"
PCM_RATES = (8000, 16000, 22050, 24000, 44100, 48000)
MAX_CONTEXTS = 5
"""Contexts the server allows open on one socket (it closes the socket beyond that)."""
FULL_WAIT_S = 1.0
"""At that limit, how long a new reply waits for an interrupted context's ``isFinal`` before
it stops counting that context (the server frees a closed context once its audio is out)."""


class ElevenLabsError(RuntimeError):
    """ElevenLabs could not speak a reply (neither over the websocket nor over HTTP)."""


class ElevenLabsAuthError(ElevenLabsError):
    """ElevenLabs rejected the API key. Never carries the key itself."""


@dataclass(frozen=True)
class ElevenLabsOptions:
    """How :class:`ElevenLabsVoice` talks to ElevenLabs. Defaults suit a live interview."""

    api_key: str = field(repr=False)
    """``ELEVENLABS_API_KEY``; sent as the ``xi-api-key`` header, never logged."""
    voice_id: str = DEFAULT_VOICE_ID
    """``ELEVENLABS_VOICE_ID``; default "Rachel", as in the original service."""
    model_id: str = DEFAULT_MODEL
    """``ELEVENLABS_MODEL``; ``eleven_flash_v2_5`` has the lowest latency."""
    base_url: str = DEFAULT_BASE_URL
    """``ELEVENLABS_BASE_URL``: a root without ``/v1``; ``ws``/``wss`` follow ``http``/``https``."""
    sample_rate: int = 24000
    """PCM rate asked for (``output_format=pcm_<rate>``). 24 kHz is what the LiveAvatar avatar
    takes as is, and the pacer's 48 kHz is an exact multiple of it."""
    chunker: ChunkerOptions = field(default_factory=ChunkerOptions)
    """How a reply is cut into phrases (see :class:`~stages.voice.PhraseChunker`)."""
    voice_settings: dict[str, Any] | None = None
    """Optional ``stability``/``similarity_boost``/``style``/``speed``...; None: the voice's own."""
    flush_each_phrase: bool = True
    """Send every phrase with ``flush: true`` so its audio starts at once (see the module doc)."""
    websocket: bool = True
    """Use the websocket; False speaks every reply over the HTTP ``/stream`` endpoint."""
    inactivity_timeout_s: int = 60
    """``inactivity_timeout`` asked of the server (1-180 s): an idle socket is closed after it."""
    keepalive_interval_s: float = 20.0
    """How often open contexts are kept alive; must be shorter than the inactivity timeout."""
    connect_timeout_s: float = 5.0
    """Longest a reply waits for the socket (or a free context) before going over HTTP."""
    reconnect_backoff_s: float = 0.5
    """First wait before reconnecting after a failed attempt or repeated drops (doubles)."""
    reconnect_backoff_max_s: float = 10.0
    """Longest wait between reconnection attempts."""
    max_resends: int = 2
    """Socket drops one reply survives by re-sending over a new socket; then it goes over HTTP."""
    http_timeout_s: float = 30.0
    """Timeout of one HTTP ``/stream`` request."""

    def __post_init__(self) -> None:
        def bad(name: str, reason: str) -> ValueError:
            return ValueError(f"ElevenLabsOptions.{name}: {reason}")

        if not self.api_key or not self.api_key.strip():
            raise bad("api_key", "must not be empty (set ELEVENLABS_API_KEY)")
        if not self.voice_id.strip():
            raise bad("voice_id", "must not be empty")
        if not self.model_id.strip():
            raise bad("model_id", "must not be empty")
        if not self.base_url.startswith(("http://", "https://")):
            raise bad("base_url", f"must be an http(s) URL, got {self.base_url!r}")
        if self.base_url.rstrip("/").endswith("/v1"):
            raise bad("base_url", "must be the root, without /v1")
        if self.sample_rate not in PCM_RATES:
            raise bad("sample_rate", f"must be one of {PCM_RATES}")
        if not 1 <= self.inactivity_timeout_s <= 180:
            raise bad("inactivity_timeout_s", "must be between 1 and 180 seconds")
        if not 0 < self.keepalive_interval_s < self.inactivity_timeout_s:
            raise bad("keepalive_interval_s", "must be positive and below inactivity_timeout_s")
        for name in ("connect_timeout_s", "reconnect_backoff_s", "http_timeout_s"):
            if getattr(self, name) <= 0:
                raise bad(name, "must be positive")
        if self.reconnect_backoff_max_s < self.reconnect_backoff_s:
            raise bad("reconnect_backoff_max_s", "must be at least reconnect_backoff_s")
        if self.max_resends < 0:
            raise bad("max_resends", "must not be negative")

    @classmethod
    def from_settings(cls, settings: Any, **overrides: Any) -> ElevenLabsOptions:
        """Options from :class:`interview.config.Settings` (``ELEVENLABS_*``), then overrides."""
        key = settings.elevenlabs_api_key
        values: dict[str, Any] = {
            "api_key": key.get_secret_value() if key is not None else "",
            "voice_id": settings.elevenlabs_voice_id,
            "model_id": settings.elevenlabs_model,
            "base_url": settings.elevenlabs_base_url or DEFAULT_BASE_URL,
        }
        values.update(overrides)
        return cls(**values)

    @property
    def output_format(self) -> str:
        return f"pcm_{self.sample_rate}"

    @property
    def root(self) -> str:
        return self.base_url.rstrip("/")

    @property
    def websocket_url(self) -> str:
        """The multi-context address, with the scheme following the base URL's."""
        root = self.root
        scheme = "wss" if root.startswith("https://") else "ws"
        query = (
            f"model_id={self.model_id}&output_format={self.output_format}"
            f"&inactivity_timeout={self.inactivity_timeout_s}"
        )
        host = root.split("://", 1)[1]
        return f"{scheme}://{host}/v1/text-to-speech/{self.voice_id}/multi-stream-input?{query}"


@dataclass
class ElevenLabsStats:
    """Counters of one :class:`ElevenLabsVoice` (for logs, tests and the benchmark)."""

    connects: int = 0
    connect_failures: int = 0
    drops: int = 0
    contexts_opened: int = 0
    contexts_abandoned: int = 0
    resends: int = 0
    http_replies: int = 0
    keepalives: int = 0
    late_audio_dropped: int = 0


# --- what was heard ----------------------------------------------------------------------------


class AlignmentTracker:
    """Maps the provider's alignment back onto the reply's text, in whole words. Pure.

    :meth:`sent` records each phrase as it is sent; :meth:`heard` takes one audio chunk's
    alignment characters and returns the words whose audio is now complete (a word cut between
    two chunks goes with the chunk that ends it). Joined with spaces, everything returned by
    :meth:`heard` and :meth:`rest` gives back the sent words, in order. Matching skips
    whitespace, so the provider may add or drop spaces without the words shifting.
    """

    def __init__(self) -> None:
        self.text = ""
        self._heard = 0  # index in text just past the last character heard
        self._given = 0  # index in text up to which words have been handed out

    def sent(self, phrase: str) -> str:
        """Record ``phrase`` as sent; returns the text to send (ending with a space)."""
        piece = phrase.strip() + " "
        self.text += piece
        return piece

    def heard(self, chars: Sequence[str]) -> str:
        """Advance over one chunk's aligned characters; the words it completes."""
        text, pos, end = self.text, self._heard, len(self.text)
        for ch in "".join(chars):
            if ch.isspace():
                continue
            while pos < end and text[pos].isspace():
                pos += 1
            if pos >= end:
                break
            pos += 1
        self._heard = pos
        if pos >= end or text[pos].isspace():
            return self._give(pos)
        for space in range(pos - 1, self._given, -1):  # the end of the last whole word
            if text[space].isspace():
                return self._give(space)
        return ""

    def heard_all(self) -> str:
        """Everything sent so far is heard (a path without alignment, per phrase)."""
        self._heard = len(self.text)
        return self._give(self._heard)

    def rest(self) -> str:
        """The words not handed out yet (the reply's audio is complete)."""
        return self._give(len(self.text))

    def resend(self) -> str:
        """The text from the first word not fully heard (to send again after a drop)."""
        self._heard = self._given
        return self.text[self._given :].strip()

    @property
    def given_text(self) -> str:
        """The words handed out so far (heard), as one string."""
        return self.text[: self._given].strip()

    def _give(self, end: int) -> str:
        if end <= self._given:
            return ""
        piece, self._given = self.text[self._given : end].strip(), end
        return piece


def alignment_chars(message: dict[str, Any]) -> list[str] | None:
    """The characters one audio message covers: ``alignment`` (the text as sent) first, since
    ``normalizedAlignment`` spells numbers out and would not match the reply's characters."""
    for key in ("alignment", "normalizedAlignment"):
        value = message.get(key)
        if isinstance(value, dict) and isinstance(value.get("chars"), list):
            return [str(c) for c in value["chars"]]
    return None


# --- the socket --------------------------------------------------------------------------------


class _Dropped(Exception):
    """The socket went away while a reply was using it."""


_DROPPED = object()


class _Context:
    """One context on the socket: a reply's (or the spare one kept alive between replies)."""

    def __init__(self, cid: str) -> None:
        self.id = cid
        self.inbox, self.messages = anyio.create_memory_object_stream[Any](math.inf)
        self.last_sent = 0.0  # clock time of the last message sent on it
        self.closing = False  # close_context sent
        self.abandoned = False  # its audio is no longer wanted (interrupt, drop)
        self.final = False  # the server said isFinal

    def put(self, msg: Any) -> None:
        try:
            self.inbox.send_nowait(msg)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            pass  # nobody listens any more

    def close(self) -> None:
        self.inbox.close()
        self.messages.close()


class _Socket:
    """The call's one websocket: connects, keeps alive, routes messages, reconnects."""

    def __init__(self, options: ElevenLabsOptions, ctx: CallContext, stats: ElevenLabsStats):
        self.options = options
        self.ctx = ctx
        self.stats = stats
        self.state: Literal["connecting", "open", "down"] = "connecting"
        self._ws: Any = None
        self._contexts: dict[str, _Context] = {}
        self._spare: _Context | None = None
        self._ids = itertools.count(1)
        self._changed = anyio.Event()
        self._making_spare = False
        self._auth_error: str | None = None

    # -- lifetime

    async def run(self) -> None:
        """Keep a socket for the stage's lifetime. Raises only :class:`ElevenLabsAuthError`."""
        opts, clock = self.options, self.ctx.clock
        failures = 0
        while True:
            self._set_state("connecting")
            try:
                ws = await self._connect()
            except ElevenLabsAuthError:
                self._set_state("down")
                raise
            except Exception as exc:
                failures += 1
                self.stats.connect_failures += 1
                self._set_state("down")
                delay = self._backoff(failures)
                self.ctx.log.warning(
                    "elevenlabs: websocket unavailable (%s); HTTP for now, retrying in %.1f s",
                    _describe(exc),
                    delay,
                )
                await clock.sleep(delay)
                continue
            self.stats.connects += 1
            lived = clock.now()
            try:
                await self._serve(ws)
            finally:
                self._lost()
                with self.ctx.cleanup_scope():
                    await ws.close()
            self.stats.drops += 1
            code, reason = ws.close_code, ws.close_reason or ""
            if _is_auth_failure(code, reason) or self._auth_error is not None:
                self._set_state("down")
                said = (self._auth_error or f"{code} {reason}")[:160]
                raise ElevenLabsAuthError(
                    f"ElevenLabs closed the websocket: the API key was rejected ({said}); "
                    "check ELEVENLABS_API_KEY"
                )
            # A socket that lived a while is reopened at once; one that keeps dying backs off.
            failures = 0 if clock.now() - lived > opts.inactivity_timeout_s / 2 else failures + 1
            self.ctx.log.warning("elevenlabs: websocket closed (%s %s); reopening", code, reason)
            await clock.sleep(self._backoff(failures) if failures > 1 else 0)

    def _backoff(self, failures: int) -> float:
        opts = self.options
        return min(
            opts.reconnect_backoff_s * 2 ** max(failures - 1, 0), opts.reconnect_backoff_max_s
        )

    async def _connect(self) -> Any:
        from websockets.asyncio.client import connect
        from websockets.exceptions import InvalidStatus

        opts = self.options
        try:
            with anyio.fail_after(opts.connect_timeout_s):
                return await connect(
                    opts.websocket_url,
                    additional_headers={"xi-api-key": opts.api_key},
                    open_timeout=None,
                    close_timeout=1,
                    max_size=16 * 2**20,
                    compression=None,  # base64 audio barely compresses; zlib costs latency
                )
        except InvalidStatus as exc:
            status = exc.response.status_code
            if status in (401, 403):
                raise ElevenLabsAuthError(
                    f"ElevenLabs rejected the API key (HTTP {status} on the websocket "
                    "handshake); check ELEVENLABS_API_KEY"
                ) from None
            raise ElevenLabsError(f"websocket handshake answered HTTP {status}") from None

    async def _serve(self, ws: Any) -> None:
        from websockets.exceptions import ConnectionClosed

        self._ws = ws
        self._set_state("open")
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._keepalive)
            tg.start_soon(self.ensure_spare)
            try:
                async for raw in ws:
                    self._dispatch(raw)
            except ConnectionClosed:
                pass
            tg.cancel_scope.cancel()

    def _lost(self) -> None:
        """The socket is gone: every reply using it learns so; nothing of it is kept."""
        self._ws = None
        for context in self._contexts.values():
            context.put(_DROPPED)
            if context is self._spare or context.abandoned:
                context.close()  # nobody reads it
            else:
                context.inbox.close()  # its reply reads the drop, then closes the rest
        self._contexts.clear()
        self._spare = None
        self._set_state("connecting")

    async def _keepalive(self) -> None:
        """Every context that has been quiet for an interval gets ``{"text": ""}``, which
        resets the server's inactivity timer without adding text."""
        clock, interval = self.ctx.clock, self.options.keepalive_interval_s
        while True:
            await clock.sleep(interval / 2)
            for context in list(self._contexts.values()):
                if not context.closing and clock.now() - context.last_sent >= interval / 2:
                    await self.send({"text": "", "context_id": context.id}, quiet=True)
                    self.stats.keepalives += 1

    # -- messages

    def _dispatch(self, raw: str | bytes) -> None:
        try:
            msg = json.loads(raw)
        except ValueError:
            self.ctx.log.warning("elevenlabs: ignoring a message that is not JSON")
            return
        if not isinstance(msg, dict):
            return
        cid = msg.get("contextId") or msg.get("context_id")
        context = self._contexts.get(cid) if isinstance(cid, str) else None
        error = msg.get("error")
        if error is not None and "audio" not in msg:
            said = f"{error}: {msg.get('message', '')}"
            self.ctx.log.warning("elevenlabs: server error %s", said[:200])
            if _is_auth_failure(1008, said):
                self._auth_error = said
            if context is not None and not context.abandoned:
                context.put(_DROPPED)  # the reply goes on over another path
            return
        if context is None or context.abandoned:
            if msg.get("audio"):
                self.stats.late_audio_dropped += 1
            if context is not None and msg.get("isFinal"):
                self._forget(context)
            return
        context.put(msg)
        if msg.get("isFinal"):
            self._forget(context)

    def _forget(self, context: _Context) -> None:
        context.final = True
        context.inbox.close()
        self._contexts.pop(context.id, None)
        self._set_state(self.state)  # a slot is free: wake whoever waits for one

    async def send(self, msg: dict[str, Any], *, quiet: bool = False) -> None:
        """Send one message; raises :class:`_Dropped` (unless ``quiet``) if the socket is gone."""
        from websockets.exceptions import ConnectionClosed

        ws = self._ws
        context = self._contexts.get(msg.get("context_id", ""))
        if context is not None:
            context.last_sent = self.ctx.clock.now()
        try:
            if ws is None:
                raise _Dropped
            await ws.send(json.dumps(msg))  # whole messages: safe from several tasks
        except (_Dropped, ConnectionClosed):
            if not quiet:
                raise _Dropped from None

    # -- contexts

    async def open_context(self) -> _Context | None:
        """A context for a reply, or None when no socket can be had soon (use HTTP)."""
        clock = self.ctx.clock
        patience = clock.now() + FULL_WAIT_S
        with anyio.move_on_after(self.options.connect_timeout_s):
            while True:
                if self.state == "down":
                    return None
                if self.state == "open":
                    if self._spare is not None:
                        context, self._spare = self._spare, None
                        return context
                    if len(self._contexts) >= MAX_CONTEXTS and clock.now() >= patience:
                        self._forget_oldest_abandoned()
                    if len(self._contexts) < MAX_CONTEXTS:
                        context = self._new_context()
                        try:
                            await self._init(context)
                            return context
                        except BaseException as exc:
                            context.close()
                            self._contexts.pop(context.id, None)
                            if not isinstance(exc, _Dropped):
                                raise
                        # The socket is closing: wait for the reader to say so (or reconnect).
                # Wait for a change (connected, closed, a context freed); never spin.
                with anyio.move_on_after(max(patience - clock.now(), 0.01)):
                    await self._changed.wait()
        return None

    def _forget_oldest_abandoned(self) -> None:
        """At the server's limit, stop waiting for the ``isFinal`` of the oldest interrupted
        context (if the server still counts it, it closes the socket and we reopen one)."""
        for context in self._contexts.values():
            if context.abandoned:
                self._forget(context)
                return

    async def ensure_spare(self) -> None:
        """Keep one initialized context waiting (and kept alive) for the next reply."""
        if self._making_spare or self._spare is not None or self.state != "open":
            return
        if len(self._contexts) >= MAX_CONTEXTS:
            return
        self._making_spare = True
        context = self._new_context()
        try:
            await self._init(context)
        except BaseException as exc:
            context.close()
            self._contexts.pop(context.id, None)
            if isinstance(exc, _Dropped):
                return
            raise
        finally:
            self._making_spare = False
        if context.id in self._contexts:  # still on the same socket
            self._spare = context
            self._set_state(self.state)

    async def finish(self, context: _Context) -> None:
        """The reply is done with ``context``: close it unless it ended; drop its late audio."""
        context.messages.close()
        if context.final:
            return
        context.abandoned = True
        self.stats.contexts_abandoned += 1
        if not context.closing and context.id in self._contexts:
            context.closing = True
            with self.ctx.cleanup_scope():
                await self.send({"context_id": context.id, "close_context": True}, quiet=True)

    def _new_context(self) -> _Context:
        context = _Context(f"c{next(self._ids)}")
        self._contexts[context.id] = context
        self.stats.contexts_opened += 1
        return context

    async def _init(self, context: _Context) -> None:
        msg: dict[str, Any] = {"text": " ", "context_id": context.id}
        if self.options.voice_settings:
            msg["voice_settings"] = dict(self.options.voice_settings)
        await self.send(msg)

    def _set_state(self, state: Literal["connecting", "open", "down"]) -> None:
        self.state = state
        changed, self._changed = self._changed, anyio.Event()
        changed.set()


def _is_auth_failure(code: int | None, reason: str) -> bool:
    text = reason.lower()
    return code in (1008, 4001, 4003) and any(
        word in text for word in ("api key", "api_key", "unauthori", "authenticat", "forbidden")
    )


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# --- the stage ---------------------------------------------------------------------------------


class ElevenLabsVoice:
    """Speaks the agent's replies with ElevenLabs; a drop-in for :class:`VoiceStage`.

    Replies are spoken one at a time, in order; other frames pass through unchanged. See the
    module docstring for the protocol choices. ``stats`` counts connections, drops, resends,
    HTTP fallbacks and late audio dropped after an interrupt.
    """

    def __init__(self, options: ElevenLabsOptions, *, name: str = "voice") -> None:
        self.options = options
        self.name = name
        self.sample_rate = options.sample_rate
        self.stats = ElevenLabsStats()
        self._socket: _Socket | None = None
        self._http: Any = None
        self._client: Any = None

    async def run(self, ctx: CallContext, inbox: Inbox, outbox: Outbox) -> None:
        socket = _Socket(self.options, ctx, self.stats) if self.options.websocket else None
        self._socket = socket
        try:
            async with anyio.create_task_group() as tg:
                if socket is not None:
                    tg.start_soon(socket.run)
                await self._replies(ctx, inbox, outbox)
                tg.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            found = _find(group, ElevenLabsError)
            if found is not None:
                raise found from None
            raise
        finally:
            self._socket = None
            if self._http is not None:
                http, self._http, self._client = self._http, None, None
                with ctx.cleanup_scope():
                    await http.aclose()

    async def _replies(self, ctx: CallContext, inbox: Inbox, outbox: Outbox) -> None:
        await dispatch_replies(ctx, inbox, outbox, self.options.chunker, self._speak)

    async def _speak(
        self, ctx: CallContext, reply: ReplyPhrases, previous: ReplyPhrases | None, outbox: Outbox
    ) -> None:
        rate = self.sample_rate
        try:
            with reply.scope, ctx.control.epoch_scope(reply.epoch):
                if previous is not None and not previous.done.is_set():
                    await previous.done.wait()
                tracker = AlignmentTracker()
                await self._say(ctx, reply, tracker, outbox)
                rest = tracker.rest()
                await outbox.send(
                    AgentAudio(reply.epoch, b"", rate, reply.turn_id, final=True, text=rest)
                )
        finally:
            reply.phrases_out.close()
            reply.done.set()

    async def _say(
        self, ctx: CallContext, reply: ReplyPhrases, tracker: AlignmentTracker, outbox: Outbox
    ) -> None:
        socket, drops = self._socket, 0
        while socket is not None and drops <= self.options.max_resends:
            context = await socket.open_context()
            if context is None:
                break
            try:
                if await self._over_socket(ctx, reply, context, tracker, outbox):
                    await socket.ensure_spare()
                    return
            finally:
                await socket.finish(context)
            drops += 1
            self.stats.resends += 1
            ctx.log.warning("elevenlabs: socket dropped during reply %d; re-sending", reply.epoch)
        self.stats.http_replies += 1
        await self._over_http(ctx, reply, tracker, outbox)

    async def _over_socket(
        self,
        ctx: CallContext,
        reply: ReplyPhrases,
        context: _Context,
        tracker: AlignmentTracker,
        outbox: Outbox,
    ) -> bool:
        """Speak the reply on one context. True when it ended; False if the socket dropped."""
        rate, epoch = self.sample_rate, reply.epoch
        dropped = False
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._feed_socket, ctx, reply, context, tracker)
            async for msg in context.messages:
                if msg is _DROPPED:
                    dropped = True
                    break
                audio = _decode(msg.get("audio"))
                if audio:
                    chars = alignment_chars(msg)
                    text = tracker.heard(chars) if chars is not None else ""
                    ctx.mark(reply.turn_id, "first_audio")
                    await outbox.send(AgentAudio(epoch, audio, rate, reply.turn_id, text=text))
                if msg.get("isFinal"):
                    break
            else:
                dropped = not context.final  # the stream closed without isFinal
            tg.cancel_scope.cancel()
        return not dropped

    async def _feed_socket(
        self, ctx: CallContext, reply: ReplyPhrases, context: _Context, tracker: AlignmentTracker
    ) -> None:
        socket = self._socket
        assert socket is not None
        flush = self.options.flush_each_phrase
        try:
            again = tracker.resend()
            if again:
                ctx.usage.add(tts_characters=len(again))
                await socket.send({"text": again + " ", "context_id": context.id, "flush": True})
            while (phrase := await _next(reply.phrases_out)) is not None:
                piece = tracker.sent(phrase)
                ctx.mark(reply.turn_id, "voice_request")
                ctx.usage.add(tts_characters=len(phrase))
                msg: dict[str, Any] = {
                    "text": piece,
                    "context_id": context.id,
                    "try_trigger_generation": True,
                }
                if flush:
                    msg["flush"] = True
                await socket.send(msg)
            # The reply's text is all in: flush what is buffered, then end the context
            # (its remaining audio and isFinal follow).
            await socket.send({"text": "", "context_id": context.id, "flush": True})
            context.closing = True
            await socket.send({"context_id": context.id, "close_context": True})
        except _Dropped:
            pass  # the reader tells the reply (the socket is gone for it too)

    # -- HTTP fallback

    def _sdk(self) -> Any:
        if self._client is None:
            import httpx
            from elevenlabs import AsyncElevenLabs

            opts = self.options
            self._http = httpx.AsyncClient(timeout=opts.http_timeout_s)
            self._client = AsyncElevenLabs(
                api_key=opts.api_key,
                base_url=opts.root,
                timeout=opts.http_timeout_s,
                httpx_client=self._http,
            )
        return self._client

    async def _over_http(
        self, ctx: CallContext, reply: ReplyPhrases, tracker: AlignmentTracker, outbox: Outbox
    ) -> None:
        """Speak the rest of the reply phrase by phrase over ``/stream`` (no alignment there:
        a phrase's text rides on its first chunk, as in :class:`VoiceStage`)."""
        rate, epoch = self.sample_rate, reply.epoch
        again = tracker.resend()
        pending = [(again, tracker.given_text)] if again else []
        while True:
            if pending:
                text, before = pending.pop()
            else:
                try:
                    text = await reply.phrases_out.receive()
                except (anyio.EndOfStream, anyio.ClosedResourceError):
                    return
                before = tracker.text.strip()
                tracker.sent(text)
                ctx.mark(reply.turn_id, "voice_request")
            ctx.usage.add(tts_characters=len(text))
            async for pcm in self._http_stream(ctx, text, before or None):
                ctx.mark(reply.turn_id, "first_audio")
                said = tracker.heard_all()
                await outbox.send(AgentAudio(epoch, pcm, rate, reply.turn_id, text=said))

    async def _http_stream(
        self, ctx: CallContext, text: str, previous_text: str | None
    ) -> AsyncIterator[bytes]:
        from elevenlabs.core.api_error import ApiError

        opts = self.options
        kwargs: dict[str, Any] = {
            "text": text,
            "model_id": opts.model_id,
            "output_format": opts.output_format,
        }
        if previous_text:
            kwargs["previous_text"] = previous_text
        if opts.voice_settings:
            from elevenlabs import VoiceSettings

            kwargs["voice_settings"] = VoiceSettings(**opts.voice_settings)
        stream = self._sdk().text_to_speech.stream(opts.voice_id, **kwargs)
        carry = b""
        try:
            async for chunk in stream:
                data = carry + chunk
                cut = len(data) - len(data) % 2  # whole 16-bit samples only
                carry = data[cut:]
                if cut:
                    yield data[:cut]
        except ApiError as exc:
            status = exc.status_code
            if status in (401, 403):
                raise ElevenLabsAuthError(
                    f"ElevenLabs rejected the API key (HTTP {status}); check ELEVENLABS_API_KEY"
                ) from None
            raise ElevenLabsError(f"ElevenLabs /stream answered HTTP {status}") from None
        except Exception as exc:
            if isinstance(exc, ElevenLabsError):
                raise
            raise ElevenLabsError(f"ElevenLabs /stream failed: {_describe(exc)}") from None
        finally:
            with ctx.cleanup_scope():
                await stream.aclose()


async def _next(stream: Any) -> str | None:
    """The next phrase, or None at the reply's end; no event-loop turn when one is waiting."""
    try:
        return str(stream.receive_nowait())
    except anyio.WouldBlock:
        try:
            return str(await stream.receive())
        except (anyio.EndOfStream, anyio.ClosedResourceError):
            return None
    except (anyio.EndOfStream, anyio.ClosedResourceError):
        return None


def _decode(audio: Any) -> bytes:
    if not isinstance(audio, str) or not audio:
        return b""
    try:
        return base64.b64decode(audio)
    except (binascii.Error, ValueError):
        return b""


def _find(group: BaseExceptionGroup, kind: type[Exception]) -> Exception | None:
    for exc in group.exceptions:
        if isinstance(exc, kind):
            return exc
        if isinstance(exc, BaseExceptionGroup):
            found = _find(exc, kind)
            if found is not None:
                return found
    return None
