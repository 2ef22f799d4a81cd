"""HeyGen LiveAvatar (LITE mode): the interviewer's face, lip-synced to its own voice.

In LITE mode LiveAvatar renders video from audio we send; it does no speech of its own. The
flow (PROVIDERS.md): ``POST /v1/sessions/token`` (``X-API-KEY``) → ``POST /v1/sessions/start``
(``Bearer`` session token) → a LiveKit room the candidate's client joins with
``livekit_url`` + ``livekit_client_token``, and a websocket (``ws_url``) that takes the reply's
audio as ``agent.speak`` messages (base64 PCM16 mono 24 kHz), ``agent.speak_end`` per reply,
``agent.interrupt`` on barge-in and ``session.keep_alive``; ``POST /v1/sessions/stop`` at the end.

:class:`AvatarStage` is a sink tapped on the voice's output: it takes the same ``AgentAudio``
the pacer takes, resamples it to 24 kHz and sends it on as fast as it comes (the avatar buffers
and plays it at real time, as the pacer does for the audio-only path). Audio is batched up to
``chunk_ms`` while frames are queued, and sent at once when the voice pauses, so the face never
waits on a batch. It emits nothing.

The avatar goes live at a reply boundary (a reply is never split between the agent's own audio
and the avatar's); until then its inbox is read and dropped, so a slow start never holds the
voice up. It is meant to run under the supervisor's DEGRADE policy: any failure (refused at
start, the socket or the session dying mid-interview) raises :class:`AvatarError` after
``on_state(False, reason)`` has told the session, which unmutes its own audio
(:class:`MuteWhileAvatarLive`) and the interview carries on audio-only. The API key is never
logged.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
import math
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import anyio

from pipeline.audio import Resampler
from pipeline.control import Interrupt
from pipeline.frames import AgentAudio
from pipeline.stage import CallContext, Inbox, Outbox
from stages.pacer import EgressFrame

DEFAULT_BASE_URL = "https://api.liveavatar.com"
AVATAR_RATE = 24000
"""LiveAvatar takes PCM16 mono at 24 kHz."""
MAX_MESSAGE_BYTES = 1_000_000
"""LiveAvatar closes the socket on a larger message."""

log = logging.getLogger("synchire.avatar")

StateCallback = Callable[[bool, str], None]
"""``on_state(live, reason)``: ``(True, "connected")`` once the avatar can speak; ``(False,
reason)`` when it failed (the reason says why). A normal end is not reported."""


class AvatarError(RuntimeError):
    """The avatar could not be started or died. Never carries the API key."""


class AvatarAuthError(AvatarError):
    """LiveAvatar rejected ``HEYGEN_API_KEY``."""


@dataclass(frozen=True)
class AvatarOptions:
    """How :class:`AvatarStage` drives LiveAvatar. Defaults suit a live interview."""

    api_key: str = field(repr=False)
    """``HEYGEN_API_KEY``: sent as ``X-API-KEY``, never logged."""
    avatar_id: str
    """``HEYGEN_AVATAR_ID``: the LiveAvatar avatar (a UUID)."""
    base_url: str = DEFAULT_BASE_URL
    """``HEYGEN_BASE_URL``: a root without ``/v1``."""
    quality: str = "low"
    """``HEYGEN_VIDEO_QUALITY``: ``low``, ``medium``, ``high`` or ``very_high``."""
    encoding: Literal["H264", "VP8"] = "VP8"
    """Video codec in the LiveKit room; VP8 plays in every browser."""
    is_sandbox: bool = False
    """Sandbox sessions are free and short (development only)."""
    max_session_duration_s: int | None = None
    """Asked of LiveAvatar; None: the account's limit."""
    chunk_ms: int = 1000
    """Audio per ``agent.speak`` while frames are queued (LiveAvatar suggests about 1 s)."""
    keepalive_interval_s: float = 60.0
    """``session.keep_alive`` period; LiveAvatar ends a session after 5 idle minutes."""
    request_timeout_s: float = 10.0
    """Timeout of each REST call."""
    connect_timeout_s: float = 15.0
    """Longest wait for the websocket to open and the session to say ``connected``."""
    stop_reason: str = "USER_CLOSED"
    """The ``reason`` sent with ``/v1/sessions/stop``."""

    def __post_init__(self) -> None:
        def bad(name: str, reason: str) -> ValueError:
            return ValueError(f"AvatarOptions.{name}: {reason}")

        if not self.api_key or not self.api_key.strip():
            raise bad("api_key", "must not be empty (set HEYGEN_API_KEY)")
        if not self.avatar_id.strip():
            raise bad("avatar_id", "must not be empty (set HEYGEN_AVATAR_ID)")
        if not self.base_url.startswith(("http://", "https://")):
            raise bad("base_url", f"must be an http(s) URL, got {self.base_url!r}")
        if self.base_url.rstrip("/").endswith("/v1"):
            raise bad("base_url", "must be the root, without /v1")
        if self.quality not in ("low", "medium", "high", "very_high"):
            raise bad("quality", "must be low, medium, high or very_high")
        if self.encoding not in ("H264", "VP8"):
            raise bad("encoding", "must be H264 or VP8")
        if not 20 <= self.chunk_ms <= 10_000:
            raise bad("chunk_ms", "must be between 20 and 10000")
        for name in ("keepalive_interval_s", "request_timeout_s", "connect_timeout_s"):
            if getattr(self, name) <= 0:
                raise bad(name, "must be positive")

    @classmethod
    def from_settings(cls, settings: Any, **overrides: Any) -> AvatarOptions:
        """Options from :class:`interview.config.Settings` (``HEYGEN_*``), then overrides."""
        key = settings.heygen_api_key
        values: dict[str, Any] = {
            "api_key": key.get_secret_value() if key is not None else "",
            "avatar_id": settings.heygen_avatar_id,
            "quality": settings.heygen_video_quality,
            "base_url": settings.heygen_base_url or DEFAULT_BASE_URL,
        }
        values.update(overrides)
        return cls(**values)

    @property
    def root(self) -> str:
        return self.base_url.rstrip("/")


@dataclass(frozen=True)
class AvatarSession:
    """A started LiveAvatar session: what the candidate's client needs, and the socket."""

    session_id: str
    livekit_url: str
    livekit_client_token: str = field(repr=False)
    ws_url: str = field(repr=False)
    max_session_duration: int | None = None

    def client_info(self) -> dict[str, str]:
        """For the join response and the ``avatar`` live event."""
        return {
            "sessionId": self.session_id,
            "livekitUrl": self.livekit_url,
            "token": self.livekit_client_token,
        }


@dataclass
class AvatarStats:
    speaks: int = 0
    speak_ends: int = 0
    interrupts: int = 0
    keepalives: int = 0
    audio_seconds: float = 0.0
    dropped_stale: int = 0


class LiveAvatarClient:
    """The REST half: token, start, stop. One per avatar session."""

    def __init__(self, options: AvatarOptions) -> None:
        import httpx

        self.options = options
        self._http = httpx.AsyncClient(timeout=options.request_timeout_s)

    async def create(self) -> AvatarSession:
        """Token, then start; the session's LiveKit and websocket addresses."""
        opts = self.options
        body: dict[str, Any] = {
            "mode": "LITE",
            "avatar_id": opts.avatar_id,
            "is_sandbox": opts.is_sandbox,
            "video_settings": {"quality": opts.quality, "encoding": opts.encoding},
        }
        if opts.max_session_duration_s is not None:
            body["max_session_duration"] = opts.max_session_duration_s
        token = await self._post("/v1/sessions/token", body, {"X-API-KEY": opts.api_key})
        session_token = _field(token, "session_token", "/v1/sessions/token")
        started = await self._post(
            "/v1/sessions/start", None, {"Authorization": f"Bearer {session_token}"}
        )
        where = "/v1/sessions/start"
        duration = started.get("max_session_duration")
        return AvatarSession(
            session_id=_field(started, "session_id", where),
            livekit_url=_field(started, "livekit_url", where),
            livekit_client_token=_field(started, "livekit_client_token", where),
            ws_url=_field(started, "ws_url", where),
            max_session_duration=duration if isinstance(duration, int) else None,
        )

    async def stop(self, session_id: str) -> None:
        body = {"session_id": session_id, "reason": self.options.stop_reason}
        await self._post("/v1/sessions/stop", body, {"X-API-KEY": self.options.api_key})

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _post(
        self, path: str, body: dict[str, Any] | None, headers: dict[str, str]
    ) -> dict[str, Any]:
        import httpx

        try:
            resp = await self._http.post(self.options.root + path, json=body, headers=headers)
        except httpx.HTTPError as exc:
            raise AvatarError(f"LiveAvatar {path} unreachable: {type(exc).__name__}") from None
        status = resp.status_code
        try:
            envelope = resp.json()
        except ValueError:
            envelope = None
        message = envelope.get("message") if isinstance(envelope, dict) else None
        said = f" ({str(message)[:160]})" if message else ""
        if status in (401, 403):
            raise AvatarAuthError(
                f"LiveAvatar rejected HEYGEN_API_KEY on {path}: HTTP {status}{said}"
            )
        if status >= 400 or not isinstance(envelope, dict):
            raise AvatarError(f"LiveAvatar {path} failed: HTTP {status}{said}")
        code = envelope.get("code")
        if code is not None and code != 100:
            raise AvatarError(f"LiveAvatar {path} failed: code {code}{said}")
        data = envelope.get("data")
        return data if isinstance(data, dict) else {}


def _field(data: dict[str, Any], name: str, where: str) -> str:
    value = data.get(name)
    if not isinstance(value, str) or not value:
        raise AvatarError(f"LiveAvatar {where}: the answer has no {name}")
    return value


class AvatarStage:
    """A sink that drives a LiveAvatar LITE session with the voice's audio; see the module doc.

    Call :meth:`start` before the graph runs to get the LiveKit address and client token for
    the join response (``run`` starts the session itself otherwise). If ``start`` succeeded but
    ``run`` never happens, call :meth:`stop`.

    ``live`` is True while the avatar speaks for the agent. It turns on at a reply boundary only
    (once the socket is up and no reply is half spoken), so a reply is never split between the
    agent's own audio and the avatar's; until then frames are read and dropped, so the voice is
    never held up by a slow start.
    """

    def __init__(
        self,
        options: AvatarOptions,
        *,
        name: str = "avatar",
        on_state: StateCallback | None = None,
    ) -> None:
        self.options = options
        self.name = name
        self.on_state = on_state
        self.session: AvatarSession | None = None
        self.live = False
        self.failure: str | None = None
        self.stats = AvatarStats()
        self._client: LiveAvatarClient | None = None
        self._stopped = False
        self._connected = False
        self._ws: Any = None
        self._queue_in: Any = None
        self._solo: int | None = None  # a reply in progress before going live (not ours)
        self._last_solo: int | None = None  # the last reply the agent spoke alone
        self.live_from = 0
        """The first reply (epoch) the avatar speaks: replies before it are the agent's alone
        and must stay audible to the end, even if the avatar goes live while they play."""
        self._epoch: int | None = None  # the reply being sent to the avatar
        self._event_id = ""
        self._buf = bytearray()
        self._resampler: Resampler | None = None

    # -- session lifetime

    async def start(self) -> AvatarSession:
        """Create the LiveAvatar session (token, start). Idempotent; raises AvatarError."""
        if self.session is not None:
            return self.session
        if self._client is None:
            self._client = LiveAvatarClient(self.options)
        self.session = await self._client.create()
        return self.session

    async def stop(self) -> None:
        """End the LiveAvatar session (``/v1/sessions/stop``). Idempotent; never raises."""
        self.live = False
        client, session = self._client, self.session
        if self._stopped or client is None:
            return
        self._stopped = True
        try:
            if session is not None:
                await client.stop(session.session_id)
        except AvatarError as exc:
            log.warning("avatar: stop failed: %s", exc)
        finally:
            await client.aclose()

    def _go_live(self, first_epoch: int | None) -> None:
        """Live from reply ``first_epoch`` on (None: whatever comes next)."""
        self.live_from = first_epoch if first_epoch is not None else 0
        self._set_state(True, "connected")

    def _set_state(self, live: bool, reason: str) -> None:
        self.live = live
        if self.on_state is not None:
            try:
                self.on_state(live, reason)
            except Exception:  # the session's observer must not take the avatar down
                log.exception("avatar: on_state callback failed")

    # -- the stage

    async def run(self, ctx: CallContext, inbox: Inbox, outbox: Outbox) -> None:
        send, receive = anyio.create_memory_object_stream[tuple[int | None, str, str]](math.inf)
        self._queue_in = send
        writer_done = anyio.Event()
        unsubscribe = ctx.control.subscribe(self._on_interrupt)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._drive, ctx, receive, writer_done)
                await self._consume(inbox)
                if self.live:  # the inbox ended: finish what was sent, let the writer drain
                    self._end_reply()
                    send.close()
                    with anyio.move_on_after(ctx.cleanup_bound_s):
                        await writer_done.wait()
                tg.cancel_scope.cancel()
        except BaseException as exc:
            error = _unwrap(exc)
            if error is None:
                raise
            self.failure = str(error)
            ctx.log.warning("avatar: failed, carrying on audio-only: %s", error)
            self._set_state(False, f"failed: {error}")
            raise error from None
        finally:
            unsubscribe()
            send.close()
            receive.close()
            self._queue_in = None
            self.live = False
            with ctx.cleanup_scope():
                if self._ws is not None:
                    await self._ws.close()
                await self.stop()

    async def _drive(self, ctx: CallContext, receive: Any, writer_done: anyio.Event) -> None:
        """Start (if need be) and connect; then write, read and keep alive until the end."""
        if self.session is None:
            await self.start()
        assert self.session is not None
        ws = self._ws = await self._connect(ctx, self.session)
        self._connected = True
        ctx.log.info("avatar: LiveAvatar session %s connected", self.session.session_id)
        if self._solo is None:
            self._go_live(None if self._last_solo is None else self._last_solo + 1)
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._read, ws)
            tg.start_soon(self._keepalive, ctx)
            await self._write(ctx, ws, receive, writer_done)
            tg.cancel_scope.cancel()

    async def _connect(self, ctx: CallContext, session: AvatarSession) -> Any:
        from websockets.asyncio.client import connect

        try:
            with anyio.fail_after(self.options.connect_timeout_s):
                ws = await connect(
                    session.ws_url,
                    open_timeout=None,
                    close_timeout=1,
                    compression=None,  # base64 PCM barely compresses; zlib would cost CPU
                )
                try:
                    async for raw in ws:
                        msg = _json(raw)
                        if msg.get("type") == "session.state_updated":
                            state = msg.get("state")
                            if state == "connected":
                                return ws
                            if state in ("closed", "closing"):
                                raise AvatarError(f"LiveAvatar session {state} before it began")
                except BaseException:
                    with ctx.cleanup_scope():
                        await ws.close()
                    raise
        except TimeoutError:
            raise AvatarError("LiveAvatar session did not connect in time") from None
        except AvatarError:
            raise
        except Exception as exc:
            raise AvatarError(f"LiveAvatar websocket failed: {type(exc).__name__}") from None
        raise AvatarError("LiveAvatar websocket closed before the session connected")

    async def _consume(self, inbox: Inbox) -> None:
        pending = getattr(inbox, "pending", None)
        chunk = AVATAR_RATE * 2 * self.options.chunk_ms // 1000
        async for frame in inbox:
            if not isinstance(frame, AgentAudio):
                continue
            if not self.live:
                boundary = self._solo is None or frame.epoch != self._solo
                if self._connected and self.failure is None and boundary:
                    self._solo = None
                    self._go_live(frame.epoch)
                else:  # the agent speaks this reply alone
                    self._solo = None if frame.final else frame.epoch
                    self._last_solo = frame.epoch
                    if frame.final and self._connected and self.failure is None:
                        self._go_live(frame.epoch + 1)  # live from the next reply on
                    continue
            if frame.epoch != self._epoch:
                self._end_reply()
                self._epoch, self._event_id = frame.epoch, uuid.uuid4().hex
            resampler = self._resampler
            if resampler is None or resampler.in_rate != frame.sample_rate:
                if resampler is not None:
                    self._buf += resampler.flush()
                resampler = self._resampler = Resampler(frame.sample_rate, AVATAR_RATE)
            self._buf += resampler.process(frame.pcm)
            while len(self._buf) >= chunk:
                self._speak(bytes(self._buf[:chunk]))
                del self._buf[:chunk]
            if frame.final:
                self._end_reply()
            elif self._buf and (pending is None or pending() == 0):
                self._speak(bytes(self._buf))  # the voice paused: do not hold audio back
                self._buf.clear()

    def _speak(self, pcm: bytes) -> None:
        usable = len(pcm) - len(pcm) % 2
        if usable:
            msg = {
                "type": "agent.speak",
                "audio": base64.b64encode(pcm[:usable]).decode(),
                "event_id": self._event_id,
            }
            self._queue(self._epoch, msg)
            self.stats.audio_seconds += usable / 2 / AVATAR_RATE

    def _end_reply(self) -> None:
        """Send the rest of the current reply and ``agent.speak_end``."""
        if self._epoch is None:
            return
        if self._resampler is not None:
            self._buf += self._resampler.flush()
        if self._buf:
            self._speak(bytes(self._buf))
        self._queue(self._epoch, {"type": "agent.speak_end", "event_id": self._event_id})
        self._reset()

    def _reset(self) -> None:
        self._epoch, self._resampler = None, None
        self._buf.clear()

    def _on_interrupt(self, event: Interrupt) -> None:
        """Runs inside ``ControlLane.interrupt()``: forget the cut reply, tell the avatar now."""
        self._solo = None
        if not self.live:
            return
        if self._epoch is not None and self._epoch < event.epoch:
            self._reset()
        self._queue(None, {"type": "agent.interrupt"})

    def _queue(self, epoch: int | None, msg: dict[str, Any]) -> None:
        if self._queue_in is None:
            return
        try:
            self._queue_in.send_nowait((epoch, msg["type"], json.dumps(msg)))
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            pass

    async def _write(self, ctx: CallContext, ws: Any, receive: Any, done: anyio.Event) -> None:
        from websockets.exceptions import ConnectionClosed

        stats = self.stats
        counters = {
            "agent.speak": "speaks",
            "agent.speak_end": "speak_ends",
            "agent.interrupt": "interrupts",
            "session.keep_alive": "keepalives",
        }
        try:
            async for epoch, kind, text in receive:
                if epoch is not None and ctx.control.is_stale(epoch):
                    stats.dropped_stale += 1  # audio of a reply cut by barge-in
                    continue
                if len(text) > MAX_MESSAGE_BYTES:
                    raise AvatarError("an agent.speak message would exceed LiveAvatar's 1 MB")
                try:
                    await ws.send(text)
                except ConnectionClosed:
                    raise AvatarError(_closed("websocket closed", ws)) from None
                name = counters[kind]
                setattr(stats, name, getattr(stats, name) + 1)
        finally:
            done.set()

    async def _read(self, ws: Any) -> None:
        from websockets.exceptions import ConnectionClosed

        try:
            async for raw in ws:
                msg = _json(raw)
                if msg.get("type") == "session.state_updated" and msg.get("state") in (
                    "closed",
                    "closing",
                ):
                    raise AvatarError(f"LiveAvatar session {msg.get('state')} mid-interview")
        except ConnectionClosed:
            pass
        raise AvatarError(_closed("websocket closed mid-interview", ws))

    async def _keepalive(self, ctx: CallContext) -> None:
        while True:
            await ctx.clock.sleep(self.options.keepalive_interval_s)
            self._queue(None, {"type": "session.keep_alive", "event_id": uuid.uuid4().hex})


def _closed(what: str, ws: Any) -> str:
    code, reason = getattr(ws, "close_code", None), getattr(ws, "close_reason", "") or ""
    return f"LiveAvatar {what} ({code} {reason[:120]})".replace(" )", ")")


def _json(raw: str | bytes) -> dict[str, Any]:
    try:
        msg = json.loads(raw)
    except ValueError:
        return {}
    return msg if isinstance(msg, dict) else {}


def _unwrap(exc: BaseException) -> AvatarError | None:
    """The AvatarError behind ``exc`` (task groups wrap exceptions in groups)."""
    if isinstance(exc, AvatarError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for sub in exc.exceptions:
            found = _unwrap(sub)
            if found is not None:
                return found
    return None


# --- muting the agent's own audio while the avatar speaks for it --------------------------------


class MuteWhileAvatarLive:
    """Between the pacer and a live transport's egress: while the avatar is live the candidate
    hears the avatar's lip-synced voice from its LiveKit room, so the agent's own frames go out
    silent (same cadence, index and epoch: the transport's timing and the playback reports are
    untouched). Replies from before the avatar went live are heard to their end. The moment the
    avatar fails, frames are heard again, mid-reply if need be."""

    def __init__(self, avatar: AvatarStage, name: str = "avatar_mute") -> None:
        self.avatar = avatar
        self.name = name
        self.muted = 0

    async def run(self, ctx: CallContext, inbox: Inbox, outbox: Outbox) -> None:
        avatar = self.avatar
        async for frame in inbox:
            if (
                avatar.live
                and isinstance(frame, EgressFrame)
                and not frame.silent
                and frame.epoch is not None
                and frame.epoch >= avatar.live_from
            ):
                frame = dataclasses.replace(frame, pcm=bytes(len(frame.pcm)))
                self.muted += 1
            await outbox.send(frame)
