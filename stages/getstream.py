"""GetStream video edge (optional extra ``[getstream]``): the interviewer joins a Stream call.

The agent joins the Stream call ``default:{callId}`` as an agent user, hears the candidate,
speaks, and sends the live events (DESIGN.md §7) as custom call events, as the original
service did. Three parts, because only some of it can run offline:

* :class:`StreamRest`: Stream's REST API through the official SDK (``getstream``): upsert the
  agent user, get or create the call, join it (SFU credentials), send custom events. Tested
  against ``tests/fakes/stream.py``.
* :class:`StreamMedia`: the media boundary (SFU websocket, WebRTC). :class:`RtcMedia`
  implements it with Stream's native client (``getstream_rtc``), which joins through the
  coordinator itself; tests inject a double. The SFU cannot be faked offline (docs/GETSTREAM.md).
* :class:`GetStreamTransport`: a session transport (``realtime``, ``ingress``, ``egress``, like
  ``interview/session.py``'s ``Transport``) plus :meth:`~GetStreamTransport.send_event`, a
  listener for the session's live events.

The SDK is imported lazily and in a worker thread: importing ``getstream`` takes seconds, which
on the event loop would stall every other call's pacer.
"""

from __future__ import annotations

import importlib
import logging
import re
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import anyio
import numpy as np

from pipeline.audio import Resampler
from pipeline.frames import AudioChunk
from pipeline.stage import CallContext, Inbox, Outbox, Stage
from stages.pacer import EgressFrame
from stages.webrtc import CaptureClock

log = logging.getLogger("synchire.getstream")

INSTALL_HINT = "install the optional extra: pip install 'synchire-agent[getstream]'"
_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_JOIN_PATH = "/api/v2/video/call/{type}/{id}/join"


class GetStreamError(RuntimeError):
    """A Stream request failed; the message says which and why, never a secret or token."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class GetStreamAuthError(GetStreamError):
    """Stream refused the credentials (HTTP 401/403): the key, the secret or a token."""


class GetStreamUnavailable(ImportError):
    """The optional extra is not installed."""


# ----------------------------------------------------------------------------------------------
# Options


@dataclass(frozen=True)
class GetStreamOptions:
    """How the agent reaches Stream and joins calls."""

    api_key: str
    """``STREAM_API_KEY``: identifies the Stream app (not secret; sent as ``?api_key=``)."""
    api_secret: str = field(repr=False)
    """``STREAM_API_SECRET``: signs the server and user tokens (HS256). Never sent or logged."""
    base_url: str | None = None
    """``STREAM_BASE_URL``: the REST base URL (proxies, tests). None: the SDK's default."""
    ws_url: str | None = None
    """The coordinator websocket the native media client connects to. None: its default."""
    call_type: str = "default"
    """The call type of ``{call_type}:{callId}`` (the web app creates ``default`` calls)."""
    agent_user_id: str = "synchire-interviewer"
    """The Stream user the interviewer joins as (upserted before each join)."""
    agent_name: str = "AI Interviewer"
    """The name the candidate's client shows for the interviewer."""
    token_ttl_s: int = 4 * 3600
    """Lifetime of the agent's user token (limited to this call): beyond any interview."""
    request_timeout_s: float = 10.0
    """Per REST request."""
    location: str = "auto"
    """Preferred SFU location sent with the REST join (``auto``: Stream chooses)."""
    ingress_rate: int = 16000
    """Rate of the ingress's ``AudioChunk`` frames (what the VAD wants)."""
    egress_rate: int = 48000
    """Rate of the pacer's frames handed to the media (Opus works at 48 kHz)."""
    max_capture_lag_s: float = 1.0
    """Inbound audio lagging the call clock more than this re-anchors capture times."""
    event_queue: int = 512
    """Live events held while Stream is slow or unreachable; beyond it the oldest are dropped."""
    event_flush_s: float = 2.0
    """At the end of the call, how long the event in flight, then the queued ones, may take."""

    def __post_init__(self) -> None:
        for name in ("api_key", "api_secret"):
            if not getattr(self, name):
                raise ValueError(f"GetStreamOptions.{name} must not be empty")
        for name, scheme in (("base_url", "http"), ("ws_url", "ws")):
            url = getattr(self, name)
            if url is not None and not re.match(rf"^{scheme}s?://[^/\s]+", url):
                raise ValueError(
                    f"GetStreamOptions.{name} must be an absolute {scheme}(s) URL, got {url!r}"
                )
        for name in ("call_type", "agent_user_id"):
            if not _ID.match(getattr(self, name)):
                raise ValueError(
                    f"GetStreamOptions.{name} must be 1-64 letters, digits, '_' or '-'"
                )
        if self.token_ttl_s <= 0 or self.request_timeout_s <= 0 or self.event_flush_s < 0:
            raise ValueError("GetStreamOptions: token_ttl_s/request_timeout_s out of range")
        if self.ingress_rate <= 0 or self.egress_rate <= 0 or self.event_queue < 1:
            raise ValueError("GetStreamOptions: rates and event_queue must be positive")

    @classmethod
    def from_settings(cls, settings: Any, **overrides: Any) -> GetStreamOptions:
        """From the service settings (``stream_api_key``, ``stream_api_secret``,
        ``stream_base_url``); a missing key or secret is named in the error."""
        values = {
            name: _plain(getattr(settings, f"stream_{name}", None))
            for name in ("api_key", "api_secret", "base_url")
        }
        missing = [f"STREAM_{k.upper()}" for k in ("api_key", "api_secret") if not values[k]]
        if missing:
            raise ValueError(f"GetStream needs {' and '.join(missing)}")
        return cls(**values, **overrides)


def check_call_id(call_id: str) -> str:
    """Stream call ids: 1-64 letters, digits, ``_`` or ``-``."""
    if not isinstance(call_id, str) or not _ID.match(call_id):
        raise ValueError(f"callId {call_id!r} is not a valid Stream call id (1-64 [A-Za-z0-9_-])")
    return call_id


def _plain(value: Any) -> Any:
    return value.get_secret_value() if hasattr(value, "get_secret_value") else value


async def _import(module: str) -> Any:
    """Import a vendor module in a worker thread (``getstream`` takes seconds to import)."""
    try:
        return await anyio.to_thread.run_sync(importlib.import_module, module)
    except ImportError as err:
        raise GetStreamUnavailable(f"GetStream needs {module!r}: {INSTALL_HINT}") from err


# ----------------------------------------------------------------------------------------------
# REST


@dataclass(frozen=True)
class SfuCredentials:
    """What Stream's join answers: where the call's SFU is and the token to present there."""

    url: str
    ws_endpoint: str
    token: str = field(repr=False)
    edge_name: str = ""
    ice_servers: tuple[dict[str, Any], ...] = ()

    @classmethod
    def from_join(cls, body: Any) -> SfuCredentials:
        try:
            creds = body["credentials"]
            server = creds["server"]
            return cls(
                url=str(server["url"]),
                ws_endpoint=str(server["ws_endpoint"]),
                token=str(creds["token"]),
                edge_name=str(server.get("edge_name", "")),
                ice_servers=tuple(creds.get("ice_servers") or ()),
            )
        except (KeyError, TypeError) as err:
            raise GetStreamError(f"Stream's join answer has no SFU credentials ({err!r})") from None


class StreamRest:
    """Stream's REST API through the official SDK. Build with :meth:`create` (imports the SDK
    off the event loop); every failure becomes a :class:`GetStreamError`."""

    def __init__(self, options: GetStreamOptions, sdk: Any) -> None:
        self.options = options
        self._sdk = sdk
        kwargs: dict[str, Any] = {"timeout": options.request_timeout_s}
        if options.base_url:
            kwargs["base_url"] = options.base_url
        self._client = sdk.AsyncStream(
            api_key=options.api_key, api_secret=options.api_secret, **kwargs
        )

    @classmethod
    async def create(cls, options: GetStreamOptions) -> StreamRest:
        return cls(options, await _import("getstream"))

    def user_token(self, call_id: str) -> str:
        """The agent's user token, limited to this call, expiring after ``token_ttl_s``."""
        o = self.options
        token: str = self._client.create_call_token(
            o.agent_user_id, call_cids=[f"{o.call_type}:{call_id}"], expiration=o.token_ttl_s
        )
        return token

    async def upsert_agent(self) -> None:
        o = self.options
        user = self._models().UserRequest(
            id=o.agent_user_id, name=o.agent_name, custom={"synchire": "interviewer"}
        )
        await self._guard("upsert the agent user", self._client.upsert_users(user))

    async def get_or_create_call(self, call_id: str) -> bool:
        """Get the call, creating it (by the agent) if needed; True when it was created."""
        call = self._client.video.call(self.options.call_type, check_call_id(call_id))
        data = self._models().CallRequest(created_by_id=self.options.agent_user_id)
        response = await self._guard("get or create the call", call.get_or_create(data=data))
        return bool(getattr(response.data, "created", False))

    async def join(self, call_id: str, user_token: str) -> SfuCredentials:
        """Join as the agent (with its user token): the SFU to connect to and its token."""
        user_client = self._client.clone_for_token(user_token)
        try:
            response = await self._guard(
                "join the call",
                user_client.post(
                    _JOIN_PATH,
                    dict[str, Any],
                    path_params={"type": self.options.call_type, "id": check_call_id(call_id)},
                    json={"create": False, "location": self.options.location},
                ),
                user_token,
            )
        finally:
            await user_client.aclose()
        return SfuCredentials.from_join(response.data)

    async def send_event(self, call_id: str, custom: dict[str, Any]) -> None:
        """A custom call event from the agent (how the live events reach the call)."""
        call = self._client.video.call(self.options.call_type, check_call_id(call_id))
        await self._guard(
            "send a custom event",
            call.send_call_event(user_id=self.options.agent_user_id, custom=custom),
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    def _models(self) -> Any:
        return self._sdk.models

    async def _guard(self, what: str, request: Awaitable[Any], *secrets: str) -> Any:
        exceptions = self._sdk.exceptions
        try:
            return await request
        except exceptions.StreamApiException as err:
            status = err.status_code
            detail = _redact(f"HTTP {status}, code {err.code}: {err.message}", *secrets)
            if status in (401, 403):
                raise GetStreamAuthError(
                    f"Stream refused the credentials to {what} ({detail}); "
                    "check STREAM_API_KEY and STREAM_API_SECRET",
                    status=status,
                ) from None
            raise GetStreamError(f"Stream could not {what} ({detail})", status=status) from None
        except exceptions.StreamTransportException as err:
            raise GetStreamError(
                f"Stream could not {what}: {err.error_type} ({_redact(str(err), *secrets)})"
            ) from None


def _redact(text: str, *secrets: str) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text


# ----------------------------------------------------------------------------------------------
# The media boundary


@dataclass(frozen=True)
class JoinTicket:
    """Everything media needs to join, without the API secret."""

    api_key: str
    base_url: str | None
    ws_url: str | None
    call_type: str
    call_id: str
    user_id: str
    user_token: str = field(repr=False)
    credentials: SfuCredentials | None = None
    """From the REST join; None when the media joins through the coordinator itself."""

    @property
    def cid(self) -> str:
        return f"{self.call_type}:{self.call_id}"


@dataclass(frozen=True, slots=True)
class RemoteAudio:
    """A piece of a remote participant's audio: 16-bit PCM, interleaved."""

    pcm: bytes
    sample_rate: int
    channels: int = 1
    user_id: str = ""
    media_time: float | None = None
    """Seconds on the sender's media clock (RTP), if known: keeps network jitter out of
    capture times."""


AudioSink = Callable[[RemoteAudio], Awaitable[None]]


class StreamMedia(Protocol):
    """The SFU side of a Stream call: one instance per call."""

    joins_call: bool
    """True when :meth:`connect` joins through Stream's coordinator itself (the native client
    does); the transport then skips its REST join and the ticket carries no credentials."""

    async def connect(self, ticket: JoinTicket) -> None: ...

    async def receive(self, sink: AudioSink) -> None:
        """Hand every remote participant's audio to ``sink`` until the call ends."""
        ...

    async def send_audio(self, pcm: bytes, sample_rate: int) -> None: ...

    async def close(self) -> None: ...


@dataclass(frozen=True)
class RtcMediaOptions:
    """Tuning of the native media client."""

    queue_s: float = 1.0
    """Outbound audio the native track may queue (the pacer already paces in real time, so
    more only adds latency after a stall)."""
    log_level: int = logging.INFO
    """Least severe native log record forwarded to the ``getstream`` logger; never below INFO
    (the native client's debug records can carry tokens)."""


class RtcMedia:
    """The real media: Stream's native client (``getstream_rtc``, Rust): coordinator websocket,
    REST join, SFU websocket and WebRTC. Needs the extra; cannot run offline (it also asks
    ``hint.stream-io-video.com`` for the nearest SFU)."""

    joins_call = True

    def __init__(self, options: RtcMediaOptions | None = None) -> None:
        self.options = options or RtcMediaOptions()
        self.dropped_samples = 0
        self._rtc: Any = None
        self._call: Any = None
        self._tracks: Any = None
        self._track: Any = None
        self._user_id = ""

    async def connect(self, ticket: JoinTicket) -> None:
        rtc = self._rtc = await _import("getstream_rtc")
        rtc.configure_logging(
            logging.getLogger("getstream"), max(logging.INFO, self.options.log_level)
        )
        self._user_id = ticket.user_id
        kwargs = {k: v for k, v in (("base_url", ticket.base_url), ("ws_url", ticket.ws_url)) if v}
        try:
            client = rtc.Client(ticket.api_key, token=ticket.user_token, **kwargs)
            call = self._call = client.call(ticket.call_type, ticket.call_id)
            self._tracks = call.tracks()  # before the join, so the join's tracks are kept
            await call.join(ticket.user_id, False)
            self._track = rtc.LocalAudioTrack(self.options.queue_s)
            await call.publish_audio(self._track)
        except rtc.RustError as err:
            await self._abandon()
            auth = isinstance(err, rtc.ApiError) and err.status_code in (401, 403)
            kind = GetStreamAuthError if auth else GetStreamError
            raise kind(
                f"could not join {ticket.cid} through Stream's native client: "
                f"{_redact(str(err), ticket.user_token)}"
            ) from None

    async def receive(self, sink: AudioSink) -> None:
        rtc, tracks = self._rtc, self._tracks
        if tracks is None:
            return
        async with anyio.create_task_group() as tg:
            async for track in tracks:  # ends when the call ends
                audio = track.track_type == rtc.TrackType.AUDIO
                if audio and track.participant.user_id != self._user_id:
                    tg.start_soon(self._read, track, sink)

    async def _read(self, track: Any, sink: AudioSink) -> None:
        user_id = track.participant.user_id
        while (frame := await track.next_pcm()) is not None:
            pts = frame.pts
            await sink(
                RemoteAudio(
                    np.ascontiguousarray(frame.samples, dtype="<i2").tobytes(),
                    frame.sample_rate,
                    frame.channels,
                    user_id,
                    None if pts is None else pts / 48000,
                )
            )

    async def send_audio(self, pcm: bytes, sample_rate: int) -> None:
        try:
            await self._track.write_pcm(np.frombuffer(pcm, dtype="<i2"), sample_rate, 1)
        except self._rtc.PcmQueueOverflowError as err:
            self.dropped_samples += err.dropped_samples

    async def close(self) -> None:
        call, self._call = self._call, None
        if call is None:
            return
        try:
            if self._track is not None:
                await call.stop_publish_audio(self._track)
        finally:
            await call.leave()

    async def _abandon(self) -> None:
        """Leave after a failed join, keeping the join's error as the one reported."""
        try:
            await self.close()
        except Exception as err:
            log.debug("leaving after a failed join: %s", type(err).__name__)


# ----------------------------------------------------------------------------------------------
# The transport


@dataclass
class GetStreamStats:
    """Counters of one call's transport."""

    chunks_in: int = 0  # AudioChunk frames sent to the VAD
    frames_out: int = 0  # egress frames handed to the media
    frames_unsent: int = 0  # egress frames before the join (or after a failed one)
    frames_lost: int = 0  # pacer frames lost before the egress (index gaps)
    events_sent: int = 0
    events_failed: int = 0  # refused or unreachable (logged, not retried)
    events_dropped: int = 0  # pushed out of a full queue


RestFactory = Callable[[GetStreamOptions], Awaitable[StreamRest]]


class GetStreamTransport:
    """A live session transport over one Stream call.

    The ingress stage joins (upsert the agent, get or create the call, join, connect the
    media) and turns the candidate's audio into 16 kHz ``AudioChunk`` frames with capture
    times on the call clock; a failed join fails it with a :class:`GetStreamError`. The egress
    stage hands the pacer's frames to the media and sends the queued live events. The last
    stage to finish flushes the events (``event_flush_s``) and leaves the call.
    ``muted``: send silence in place of the pacer's audio (an avatar speaks instead).
    """

    realtime = True

    def __init__(
        self,
        call_id: str,
        options: GetStreamOptions,
        *,
        media: StreamMedia | None = None,
        rest: RestFactory = StreamRest.create,
    ) -> None:
        self.call_id = check_call_id(call_id)
        self.options = options
        self.media: StreamMedia = media if media is not None else RtcMedia()
        self.muted = False
        self.stats = GetStreamStats()
        self.last_audio_at: float | None = None
        self.failure: GetStreamError | None = None
        self._rest_factory = rest
        self._rest: StreamRest | None = None
        self._settled = anyio.Event()
        self._connected = False
        self._media_opened = False  # connect was called: close it, even if cut short
        self._users = 0
        self._events: deque[dict[str, Any]] = deque()
        self._wake = anyio.Event()

    @property
    def connected(self) -> bool:
        return self._connected

    async def wait_connected(self) -> bool:
        """Wait until the join has succeeded (True) or failed (False)."""
        await self._settled.wait()
        return self._connected

    # -- live events ---------------------------------------------------------------------------

    def send_event(self, event: dict[str, Any]) -> None:
        """Queue a live event for the call (a ``session.subscribe`` listener; never blocks)."""
        if not isinstance(event, dict) or not isinstance(event.get("type"), str):
            raise ValueError(f"a live event must be a dict with a 'type', got {event!r}")
        if len(self._events) >= self.options.event_queue:
            self._events.popleft()
            self.stats.events_dropped += 1
        self._events.append(dict(event))
        self._wake.set()

    async def _pump_events(self, closing: anyio.Event) -> None:
        """Send queued events until ``closing`` (the rest go out when the call is left)."""
        if not await self.wait_connected():
            return
        while not closing.is_set():
            if self._events:
                await self._send_head(shield=True)
            else:
                self._wake = anyio.Event()
                await self._wake.wait()

    async def _send_head(self, *, shield: bool = False) -> None:
        """Send the oldest queued event, then drop it from the queue (sent or refused).

        ``shield``: a cancellation (the end of the call) lets the request in flight finish,
        for up to ``event_flush_s``, so an event is never cut off half-sent and then sent
        again out of order; the final flush sends the rest.
        """
        assert self._rest is not None
        event = self._events[0]
        with anyio.move_on_after(self.options.event_flush_s, shield=shield) as scope:
            try:
                await self._rest.send_event(self.call_id, event)
                self.stats.events_sent += 1
            except GetStreamError as err:
                self.stats.events_failed += 1
                log.warning("live event %s not sent: %s", event.get("type"), err)
        if scope.cancelled_caught:
            self.stats.events_failed += 1
            log.warning("live event %s not sent: the call ended first", event.get("type"))
        if self._events and self._events[0] is event:
            self._events.popleft()

    # -- joining and leaving -------------------------------------------------------------------

    async def _join(self, ctx: CallContext) -> None:
        o = self.options
        try:
            rest = self._rest = await self._rest_factory(o)
            await rest.upsert_agent()
            created = await rest.get_or_create_call(self.call_id)
            token = rest.user_token(self.call_id)
            joins = getattr(self.media, "joins_call", False)
            credentials = None if joins else await rest.join(self.call_id, token)
            ticket = JoinTicket(
                api_key=o.api_key,
                base_url=o.base_url,
                ws_url=o.ws_url,
                call_type=o.call_type,
                call_id=self.call_id,
                user_id=o.agent_user_id,
                user_token=token,
                credentials=credentials,
            )
            self._media_opened = True
            await self.media.connect(ticket)
        except GetStreamError as err:
            self.failure = err
            raise
        finally:
            self._settled.set()
        self._connected = True
        ctx.log.info(
            "joined Stream call %s:%s as %s (%s call)",
            o.call_type,
            self.call_id,
            o.agent_user_id,
            "new" if created else "existing",
        )

    @asynccontextmanager
    async def _in_use(self, ctx: CallContext) -> AsyncIterator[None]:
        self._users += 1
        try:
            yield
        finally:
            self._users -= 1
            if self._users == 0:
                with ctx.cleanup_scope():
                    await self._leave()

    async def _leave(self) -> None:
        try:
            if self._connected and self._events:
                with anyio.move_on_after(self.options.event_flush_s):
                    while self._events:
                        await self._send_head()
            self._connected = False
            if self._media_opened:
                self._media_opened = False
                await self.media.close()
        except Exception as err:  # leaving must not turn a finished call into a failed one
            log.warning("leaving the Stream call %s: %s", self.call_id, err)
        finally:
            rest, self._rest = self._rest, None
            if rest is not None:
                try:
                    await rest.aclose()
                except Exception as err:
                    log.debug("closing the Stream client: %s", type(err).__name__)

    # -- stages --------------------------------------------------------------------------------

    def ingress(self, floor: Any = None) -> Stage:
        return _Ingress(self)

    def egress(self) -> Stage:
        return _Egress(self)


class _Ingress:
    """Joins the call, then reads the remote participants' audio until the call ends."""

    name = "ingress"

    def __init__(self, transport: GetStreamTransport) -> None:
        self.transport = transport

    async def run(self, ctx: CallContext, inbox: Inbox, outbox: Outbox) -> None:
        t = self.transport
        async with t._in_use(ctx):
            await t._join(ctx)
            rate = t.options.ingress_rate
            lag = t.options.max_capture_lag_s
            streams: dict[str, tuple[CaptureClock, Resampler]] = {}

            async def deliver(audio: RemoteAudio) -> None:
                if audio.user_id == t.options.agent_user_id:
                    return  # our own voice, if the media ever hands it back
                now = ctx.clock.now()
                t.last_audio_at = now
                stream = streams.get(audio.user_id)
                fmt = (audio.sample_rate, audio.channels)
                if stream is None or (stream[1].in_rate, stream[1].in_channels) != fmt:
                    resampler = Resampler(audio.sample_rate, rate, audio.channels, 1)
                    stream = streams[audio.user_id] = (CaptureClock(lag), resampler)
                capture, resampler = stream
                duration = len(audio.pcm) / (2 * audio.channels) / audio.sample_rate
                start = capture.map(audio.media_time, duration, now)
                ctx.usage.audio_in_seconds += duration
                out = resampler.process(audio.pcm)
                if out:
                    t.stats.chunks_in += 1
                    await outbox.send(AudioChunk(out, rate, start))

            await t.media.receive(deliver)


class _Egress:
    """Hands the pacer's frames to the media; sends the live events alongside."""

    name = "egress"

    def __init__(self, transport: GetStreamTransport) -> None:
        self.transport = transport

    async def run(self, ctx: CallContext, inbox: Inbox, outbox: Outbox) -> None:
        t = self.transport
        stats, rate = t.stats, t.options.egress_rate
        last_index: int | None = None
        closing = anyio.Event()
        async with t._in_use(ctx), anyio.create_task_group() as tg:
            tg.start_soon(t._pump_events, closing)
            async for frame in inbox:
                if not isinstance(frame, EgressFrame):
                    continue
                if frame.sample_rate != rate:
                    raise ValueError(f"egress frames must be {rate} Hz, got {frame.sample_rate} Hz")
                if last_index is not None and frame.index > last_index + 1:
                    stats.frames_lost += frame.index - last_index - 1
                last_index = frame.index
                if not t.connected:
                    stats.frames_unsent += 1
                    continue
                pcm = bytes(len(frame.pcm)) if t.muted and not frame.silent else frame.pcm
                await t.media.send_audio(pcm, rate)
                stats.frames_out += 1
            closing.set()
            t._wake.set()
            if not t._settled.is_set():
                tg.cancel_scope.cancel()
