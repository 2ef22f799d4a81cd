"""aiortc ingress and egress: the candidate's WebRTC peer connection, audio both ways.

* :class:`Peer` wraps one ``RTCPeerConnection``: it answers an SDP offer (after ICE gathering
  has completed: aiortc does not trickle), sends the interviewer's audio on an
  :class:`OutboundAudio` track, exposes the candidate's inbound audio track, and sends live
  events as JSON text on the data channel the client opened with the label ``events``.
* :class:`WebRtcTransport` is a session transport (see ``interview/session.py``): its ingress
  stage turns the attached peer's audio into :class:`~pipeline.frames.AudioChunk` frames
  (16 kHz mono, capture times on the call clock through :class:`CaptureClock`), its egress
  stage hands the pacer's 48 kHz frames to the attached peer's outbound track. A new peer
  (a reconnect) can be attached at any time; the stages carry on with it.
* :func:`check_offer` refuses malformed offers with a reason a person can act on, and
  :func:`rtc_configuration` turns STUN/TURN servers into aiortc's configuration.

Who may connect, when a reconnect is allowed and how long a vanished candidate is waited for
is the interview's business (``interview/media.py``), not this module's.

aiortc pulls outbound frames at its own pace; :class:`OutboundAudio` gives it the pacer's
frame as soon as one is queued, and if the pacer is late by more than ``late_s`` it sends
silence instead (counted as ``late``), so the stream never stalls and latency never builds up.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
import av
from aiortc import (
    RTCConfiguration,
    RTCIceServer,
    RTCIceTransportPolicy,
    RTCPeerConnection,
    RTCSessionDescription,
)
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from aiortc.sdp import SessionDescription

from pipeline.audio import Resampler, from_av_frame, to_av_frame
from pipeline.clock import Clock, MonotonicClock
from pipeline.frames import AudioChunk
from pipeline.stage import CallContext, Inbox, Outbox, Stage
from stages.pacer import EgressFrame

log = logging.getLogger("synchire.webrtc")

EVENTS_LABEL = "events"
"""Label of the data channel the client opens for live events."""
SUPPORTED_CODECS = frozenset({"opus", "pcmu", "pcma"})
"""Audio codecs aiortc can answer with (Opus is what browsers and our tests use)."""
MAX_SDP_CHARS = 64 * 1024


class SdpError(ValueError):
    """An offer that cannot be answered; ``str(err)`` says why (answered 400)."""


class WebRtcError(RuntimeError):
    """The answer could not be produced (ICE gathering timed out, ...)."""


# ----------------------------------------------------------------------------------------------
# Options, ICE configuration and offer checks


@dataclass(frozen=True)
class IceServerSpec:
    """One STUN/TURN server (the browser's ``RTCIceServer`` shape)."""

    urls: tuple[str, ...]
    username: str | None = None
    credential: str | None = None


@dataclass(frozen=True)
class WebRtcOptions:
    """How peers connect and how audio crosses the transport."""

    ice_servers: tuple[IceServerSpec, ...] = ()
    """STUN/TURN servers. None by default: host candidates only. aiortc uses the first STUN
    URL and the first TURN URL it supports (``turn:`` over UDP or TCP, ``turns:`` over TLS)."""
    relay_only: bool = False
    """Gather relay candidates only (``iceTransportPolicy: "relay"``): all media through TURN."""
    answer_timeout_s: float = 15.0
    """Longest wait for ICE gathering (a TURN allocation) before the offer is refused."""
    ingress_rate: int = 16000
    """Rate of the ingress's ``AudioChunk`` frames (what the VAD and transcribers want)."""
    egress_rate: int = 48000
    """Rate of the pacer's frames handed to the outbound track (Opus works at 48 kHz)."""
    frame_ms: int = 20
    """Length of one egress frame (the pacer's ``frame_ms``)."""
    egress_queue_frames: int = 10
    """Most frames queued for the encoder; older ones are dropped (``dropped``) so that a
    stalled sender never turns into latency."""
    late_s: float = 0.02
    """How late the pacer's next frame may be before silence is sent in its place."""
    max_capture_lag_s: float = 1.0
    """Inbound frames whose media time falls further behind the call clock than this are a
    discontinuity: the capture clock is re-anchored (see :class:`CaptureClock`)."""

    def __post_init__(self) -> None:
        if self.answer_timeout_s <= 0:
            raise ValueError("WebRtcOptions.answer_timeout_s must be positive")
        if self.ingress_rate <= 0 or self.egress_rate <= 0:
            raise ValueError("WebRtcOptions rates must be positive")
        if self.egress_rate * self.frame_ms % 1000:
            raise ValueError("WebRtcOptions.frame_ms must be whole samples at egress_rate")
        if self.egress_queue_frames < 1:
            raise ValueError("WebRtcOptions.egress_queue_frames must be at least 1")
        if self.late_s < 0 or self.max_capture_lag_s <= 0:
            raise ValueError("WebRtcOptions.late_s / max_capture_lag_s out of range")


def rtc_configuration(servers: Sequence[IceServerSpec], relay_only: bool = False) -> Any:
    """aiortc's ``RTCConfiguration``. An empty list stays empty: aiortc would otherwise fall
    back to a public STUN server, and no traffic may leave unless configured."""
    return RTCConfiguration(
        iceServers=[RTCIceServer(list(s.urls), s.username, s.credential) for s in servers],
        iceTransportPolicy=RTCIceTransportPolicy.RELAY if relay_only else RTCIceTransportPolicy.ALL,
    )


def ice_url_problems(servers: Sequence[IceServerSpec]) -> list[str]:
    """URLs aiortc will ignore, with why (logged at startup: a silent TURN misconfiguration
    is the commonest reason media never flows on Cloud Run)."""
    from aiortc.rtcicetransport import parse_stun_turn_uri

    problems: list[str] = []
    seen = {"stun": False, "turn": False}
    for server in servers:
        for url in server.urls:
            try:
                parsed = parse_stun_turn_uri(url)
            except ValueError as err:
                problems.append(f"{url}: {err}")
                continue
            scheme, transport = parsed["scheme"], parsed.get("transport")
            kind = "turn" if scheme.startswith("turn") else "stun"
            if scheme == "stuns":
                problems.append(f"{url}: stuns is not supported by aiortc")
            elif scheme == "turns" and transport != "tcp":
                problems.append(f"{url}: turns needs transport=tcp (TLS over TCP)")
            elif kind == "turn" and not (server.username and server.credential):
                problems.append(f"{url}: a TURN server needs a username and a credential")
            elif seen[kind]:
                problems.append(f"{url}: only the first {kind.upper()} URL is used by aiortc")
            else:
                seen[kind] = True
    return problems


def check_offer(sdp: Any) -> str:
    """The offer's text if it can be answered; :class:`SdpError` saying why not otherwise."""
    if not isinstance(sdp, str) or not sdp.strip():
        raise SdpError("the SDP offer is empty")
    if len(sdp) > MAX_SDP_CHARS:
        raise SdpError(f"the SDP offer is longer than {MAX_SDP_CHARS} characters")
    if not sdp.lstrip().startswith("v=0"):
        raise SdpError("the SDP offer must start with 'v=0'")
    if "\r\n" not in sdp:
        sdp = sdp.replace("\n", "\r\n")  # hand-written offers (curl) often lack CRLF
    try:
        parsed = SessionDescription.parse(sdp)
    except Exception as err:  # aiortc's parser raises whatever it trips on
        raise SdpError(f"the SDP offer could not be parsed ({type(err).__name__})") from None
    audio = [m for m in parsed.media if m.kind == "audio"]
    if not audio:
        raise SdpError("the SDP offer has no audio section (m=audio)")
    m = audio[0]
    if m.direction not in (None, "sendrecv"):
        raise SdpError(
            f"the offer's audio is {m.direction}; it must be sendrecv "
            "(the candidate speaks and hears the interviewer)"
        )
    names = {c.name.lower() for c in m.rtp.codecs}
    if not names & SUPPORTED_CODECS:
        raise SdpError("the offer's audio has no supported codec (Opus, PCMU or PCMA)")
    if not (m.ice and m.ice.usernameFragment and m.ice.password):
        raise SdpError("the SDP offer has no ICE credentials (a=ice-ufrag, a=ice-pwd)")
    if not (m.dtls and m.dtls.fingerprints):
        raise SdpError("the SDP offer has no DTLS fingerprint (a=fingerprint)")
    return sdp


# ----------------------------------------------------------------------------------------------
# Capture times


class CaptureClock:
    """Maps an inbound track's media time onto the call clock (pure logic, no I/O).

    The first frame of a stream is taken to have just been captured (it ends ``now``); later
    frames keep their media-time spacing, so network jitter does not jitter capture times and
    a gap in the media (lost packets) stays a gap. Nothing is ever captured in the future: a
    frame that would end after ``now`` (it came faster than the ones before) pulls the mapping
    back to end at ``now``, so the mapping settles on the least-delayed path, and a frame can
    then start up to one frame before the previous one ended (the VAD takes that as jitter). A
    frame that lags ``now`` by more than ``max_lag_s``, or whose media time went back by more
    than a frame, is a discontinuity: the mapping is re-anchored on it. A reconnect starts a
    new stream (:meth:`new_stream`).
    """

    def __init__(self, max_lag_s: float = 1.0) -> None:
        self.max_lag_s = max_lag_s
        self._offset: float | None = None  # call time = media time + offset
        self._next: float | None = None  # where a contiguous frame without media time starts
        self.reanchors = 0

    def new_stream(self) -> None:
        """The next frame starts a new stream (its media time has a new origin)."""
        self._offset = None
        self._next = None

    def map(self, media_time: float | None, duration: float, now: float) -> float:
        """The capture start, on the call clock, of a frame of ``duration`` seconds."""
        if media_time is not None and self._offset is not None:
            start = media_time + self._offset
        elif media_time is None and self._next is not None:
            start = self._next
        else:
            start = now - duration
        behind = self._next is not None and start < self._next - duration - 1e-9
        if start + duration > now:  # cannot have been captured in the future
            start = now - duration
        elif behind or start + duration < now - self.max_lag_s:  # a discontinuity
            self.reanchors += 1
            start = now - duration
        if media_time is not None:
            self._offset = start - media_time
        self._next = start + duration
        return start


# ----------------------------------------------------------------------------------------------
# Outbound audio


class JitterHistogram:
    """Deviation of frame intervals from the period, in 0.5 ms bins (whole-call p99, cheap)."""

    BIN_S = 0.0005
    BINS = 400  # up to 200 ms; beyond goes in the last bin

    def __init__(self) -> None:
        self.counts = [0] * self.BINS
        self.n = 0
        self.max_s = 0.0

    def add(self, deviation_s: float) -> None:
        deviation_s = abs(deviation_s)
        self.counts[min(self.BINS - 1, int(deviation_s / self.BIN_S))] += 1
        self.n += 1
        self.max_s = max(self.max_s, deviation_s)

    def percentile(self, pct: float) -> float:
        """Upper edge of the bin holding the ``pct`` percentile (0.0 when empty)."""
        if not self.n:
            return 0.0
        rank = pct / 100.0 * self.n
        seen = 0
        for i, c in enumerate(self.counts):
            seen += c
            if seen >= rank and c:
                return min((i + 1) * self.BIN_S, self.max_s)
        return self.max_s


@dataclass
class EgressStats:
    """Counters of one outbound track."""

    frames: int = 0  # frames handed to the encoder
    fed: int = 0  # of which came from the pacer (the rest is silence)
    late: int = 0  # the pacer was late: silence sent in its place
    dropped: int = 0  # queued frames dropped because the encoder did not keep up
    jitter: JitterHistogram = field(default_factory=JitterHistogram)


class OutboundAudio(MediaStreamTrack):
    """The interviewer's audio track: 16-bit mono frames pushed by the egress stage.

    ``recv`` (called by aiortc's sender) returns the oldest queued frame at once; with none
    queued it waits for the next one until it is ``late_s`` overdue (one period after the
    previous frame, plus ``late_s``), then sends silence. With no producer at all it sends
    silence every period, so the stream keeps its cadence.
    """

    kind = "audio"

    def __init__(self, sample_rate: int = 48000, frame_ms: int = 20, **opts: Any) -> None:
        super().__init__()
        self.sample_rate = sample_rate
        self.samples = sample_rate * frame_ms // 1000
        self.period = frame_ms / 1000.0
        self.max_queue: int = opts.get("max_queue", 10)
        self.late_s: float = opts.get("late_s", 0.02)
        self.stats = EgressStats()
        self._silence = bytes(self.samples * 2)
        self._queue: deque[bytes] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._last: float | None = None  # loop time of the previous frame
        self._fed = False  # the previous frame came from the pacer
        self._pts = 0

    def push(self, pcm: bytes) -> None:
        """Queue one frame (exactly ``frame_ms`` of mono PCM at ``sample_rate``)."""
        if len(pcm) != len(self._silence):
            raise ValueError(f"egress frame of {len(pcm)} bytes, expected {len(self._silence)}")
        if len(self._queue) >= self.max_queue:
            self._queue.popleft()
            self.stats.dropped += 1
        self._queue.append(pcm)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        loop = asyncio.get_running_loop()
        was_fed = self._fed
        if not self._queue and self._last is not None:
            due = self._last + self.period + (self.late_s if was_fed else 0.0)
            delay = due - loop.time()
            if delay > 0:
                waiter = self._waiter = loop.create_future()
                timer = loop.call_later(delay, _settle, waiter)
                try:
                    await waiter
                finally:
                    timer.cancel()
                    self._waiter = None
        if self.readyState != "live":
            raise MediaStreamError
        stats = self.stats
        if self._queue:
            pcm = self._queue.popleft()
            self._fed = True
            stats.fed += 1
        else:
            pcm = self._silence
            self._fed = False
            if was_fed:
                stats.late += 1
        now = loop.time()
        if was_fed and self._last is not None:
            stats.jitter.add(now - self._last - self.period)
        self._last = now
        stats.frames += 1
        frame = to_av_frame(pcm, self.sample_rate, pts=self._pts)
        self._pts += self.samples
        return frame

    def stop(self) -> None:
        super().stop()
        if self._waiter is not None:
            _settle(self._waiter)


def _settle(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


# ----------------------------------------------------------------------------------------------
# One peer connection


class Peer:
    """One candidate peer connection. Create it, :meth:`answer` the offer, then attach it to
    a :class:`WebRtcTransport`. ``observers`` are called on every state change."""

    def __init__(
        self, peer_id: str, options: WebRtcOptions | None = None, clock: Clock | None = None
    ) -> None:
        self.id = peer_id
        self.options = options = options or WebRtcOptions()
        self.clock = clock or MonotonicClock()
        self.pc = RTCPeerConnection(rtc_configuration(options.ice_servers, options.relay_only))
        self.outbound = OutboundAudio(
            options.egress_rate,
            options.frame_ms,
            max_queue=options.egress_queue_frames,
            late_s=options.late_s,
        )
        self.inbound: MediaStreamTrack | None = None
        self.channel: Any = None
        self.state = "new"
        self.created_at = self.clock.now()
        self.connected_at: float | None = None
        self.last_media: float | None = None
        self.frames_in = 0
        self.events_sent = 0
        self.observers: list[Callable[[Peer], None]] = []
        self.on_track: Callable[[Peer, MediaStreamTrack], None] | None = None
        self.on_channel: Callable[[Peer], None] | None = None
        self.pc.on("connectionstatechange", self._state_changed)
        self.pc.on("track", self._track)
        self.pc.on("datachannel", self._datachannel)

    # -- signaling -----------------------------------------------------------------------------

    async def answer(self, offer_sdp: str) -> str:
        """Answer ``offer_sdp`` (checked with :func:`check_offer`); returns the answer SDP with
        every local candidate in it."""
        sdp = check_offer(offer_sdp)
        try:
            await self.pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
        except (ValueError, KeyError, IndexError, AssertionError) as err:
            raise SdpError(f"the SDP offer was refused: {err or type(err).__name__}") from None
        self.pc.addTrack(self.outbound)
        timeout = self.options.answer_timeout_s
        try:
            with anyio.fail_after(timeout):
                await self.pc.setLocalDescription(await self.pc.createAnswer())
        except TimeoutError:
            raise WebRtcError(
                f"ICE gathering did not complete within {timeout:g} s (is the TURN server "
                "reachable?)"
            ) from None
        except (ValueError, AssertionError) as err:
            raise SdpError(f"no answer to this offer: {err or type(err).__name__}") from None
        local = self.pc.localDescription
        if local is None:
            raise WebRtcError("aiortc produced no local description")
        return str(local.sdp)

    # -- state ---------------------------------------------------------------------------------

    def live(self, now: float, stale_after_s: float) -> bool:
        """Connected, and audio (or the connection itself) seen within ``stale_after_s``."""
        if self.state != "connected" or self.connected_at is None:
            return False
        seen = max(self.connected_at, self.last_media or self.connected_at)
        return now - seen <= stale_after_s

    def _state_changed(self) -> None:
        state = str(self.pc.connectionState)
        if state == self.state:
            return
        self.state = state
        if state == "connected" and self.connected_at is None:
            self.connected_at = self.clock.now()
        for observer in list(self.observers):
            try:
                observer(self)
            except Exception:
                log.exception("peer observer failed")

    def _track(self, track: MediaStreamTrack) -> None:
        if track.kind != "audio" or self.inbound is not None:
            return
        self.inbound = track
        if self.on_track is not None:
            self.on_track(self, track)

    def _datachannel(self, channel: Any) -> None:
        if channel.label != EVENTS_LABEL:
            return
        self.channel = channel

        def opened() -> None:
            if self.on_channel is not None:
                self.on_channel(self)

        if channel.readyState == "open":
            opened()
        else:
            channel.on("open", opened)

    # -- events --------------------------------------------------------------------------------

    def send_event(self, event: dict[str, Any] | str) -> bool:
        """Send one event as JSON text on the ``events`` channel; False if it is not open."""
        channel = self.channel
        if channel is None or channel.readyState != "open":
            return False
        text = event if isinstance(event, str) else json.dumps(event, separators=(",", ":"))
        try:
            channel.send(text)
        except Exception:  # the channel closed under us
            return False
        self.events_sent += 1
        return True

    async def close(self, flush_s: float = 0.0) -> None:
        """Hang up. Waits up to ``flush_s`` for queued events to leave first."""
        if flush_s > 0 and self.channel is not None:
            with anyio.move_on_after(flush_s):
                # aiortc has no "drained" event (bufferedamountlow fires only on a crossing)
                while self.channel.readyState == "open" and self.channel.bufferedAmount > 0:  # noqa: ASYNC110
                    await anyio.sleep(0.02)
        self.outbound.stop()
        await self.pc.close()
        self._state_changed()

    def view(self, now: float) -> dict[str, Any]:
        stats = self.outbound.stats
        return {
            "peerId": self.id,
            "state": self.state,
            "connectedFor": round(now - self.connected_at, 3) if self.connected_at else None,
            "framesIn": self.frames_in,
            "framesOut": stats.frames,
            "framesOutFromPacer": stats.fed,
            "lateFrames": stats.late,
            "droppedFrames": stats.dropped,
            "jitterP99Ms": round(stats.jitter.percentile(99) * 1000, 2),
            "jitterMaxMs": round(stats.jitter.max_s * 1000, 2),
            "eventsSent": self.events_sent,
        }


# ----------------------------------------------------------------------------------------------
# The transport


@dataclass
class TransportStats:
    chunks_in: int = 0  # AudioChunk frames sent to the VAD
    frames_out: int = 0  # egress frames handed to a peer
    frames_unsent: int = 0  # egress frames with no connected peer to take them
    frames_lost: int = 0  # pacer frames lost before the egress (index gaps)


class WebRtcTransport:
    """A live session transport over one attached :class:`Peer` at a time.

    ``muted``: while True the egress sends silence in place of the pacer's audio (for when
    another stage, such as an avatar, speaks for the agent).
    """

    realtime = True

    def __init__(self, options: WebRtcOptions | None = None, clock: Clock | None = None) -> None:
        self.options = options or WebRtcOptions()
        self.clock = clock or MonotonicClock()
        self.peer: Peer | None = None
        self.muted = False
        self.stats = TransportStats()
        self.capture = CaptureClock(self.options.max_capture_lag_s)
        self._tracks_tx, self._tracks_rx = anyio.create_memory_object_stream[
            tuple[Peer, MediaStreamTrack]
        ](8)
        self._connected: anyio.Event | None = None

    # -- peers ---------------------------------------------------------------------------------

    def attach(self, peer: Peer) -> Peer | None:
        """Make ``peer`` the candidate's connection; returns the one it replaces (if any)."""
        previous, self.peer = self.peer, peer
        peer.on_track = self._track
        peer.observers.append(self._observe)
        if peer.inbound is not None:
            self._track(peer, peer.inbound)
        self._observe(peer)
        return previous

    def detach(self, peer: Peer) -> None:
        if self.peer is peer:
            self.peer = None

    def _track(self, peer: Peer, track: MediaStreamTrack) -> None:
        if peer is self.peer:
            try:
                self._tracks_tx.send_nowait((peer, track))
            except (anyio.WouldBlock, anyio.BrokenResourceError, anyio.ClosedResourceError):
                log.warning("inbound track of peer %s not taken", peer.id)

    def _observe(self, peer: Peer) -> None:
        if peer is self.peer and peer.state == "connected" and self._connected is not None:
            self._connected.set()

    @property
    def connected_once(self) -> bool:
        peer = self.peer
        return (self._connected is not None and self._connected.is_set()) or (
            peer is not None and peer.connected_at is not None
        )

    async def wait_connected(self) -> None:
        """Return once a peer has connected (at once if one already has)."""
        if self._connected is None:
            self._connected = anyio.Event()
        if self.connected_once:
            self._connected.set()
        await self._connected.wait()

    def close(self) -> None:
        self._tracks_tx.close()

    # -- stages --------------------------------------------------------------------------------

    def ingress(self, floor: Any = None) -> Stage:
        return _Ingress(self)

    def egress(self) -> Stage:
        return _Egress(self)


class _Ingress:
    """Reads the attached peer's audio track; a new peer's track replaces the old reader."""

    name = "ingress"

    def __init__(self, transport: WebRtcTransport) -> None:
        self.transport = transport

    async def run(self, ctx: CallContext, inbox: Inbox, outbox: Outbox) -> None:
        async with anyio.create_task_group() as tg:
            reader: anyio.CancelScope | None = None
            async for peer, track in self.transport._tracks_rx:
                if reader is not None:
                    reader.cancel()
                reader = anyio.CancelScope()
                tg.start_soon(self._read, ctx, outbox, peer, track, reader)

    async def _read(
        self,
        ctx: CallContext,
        outbox: Outbox,
        peer: Peer,
        track: MediaStreamTrack,
        scope: anyio.CancelScope,
    ) -> None:
        transport = self.transport
        rate = transport.options.ingress_rate
        capture = transport.capture
        capture.new_stream()
        resampler: Resampler | None = None
        with scope:
            while True:
                try:
                    frame = await track.recv()
                except MediaStreamError:
                    return
                now = ctx.clock.now()
                peer.last_media = now
                peer.frames_in += 1
                if not isinstance(frame, av.AudioFrame):
                    continue
                pcm, in_rate, channels = from_av_frame(frame)
                if resampler is None or (resampler.in_rate, resampler.in_channels) != (
                    in_rate,
                    channels,
                ):
                    resampler = Resampler(in_rate, rate, channels, 1)
                duration = frame.samples / in_rate
                media_time = (
                    float(frame.pts * frame.time_base)
                    if frame.pts is not None and frame.time_base is not None
                    else None
                )
                start = capture.map(media_time, duration, now)
                ctx.usage.audio_in_seconds += duration
                out = resampler.process(pcm)
                if out:
                    transport.stats.chunks_in += 1
                    await outbox.send(AudioChunk(out, rate, start))


class _Egress:
    """Hands the pacer's frames to the attached peer's outbound track."""

    name = "egress"

    def __init__(self, transport: WebRtcTransport) -> None:
        self.transport = transport

    @property
    def muted(self) -> bool:
        return self.transport.muted

    @muted.setter
    def muted(self, value: bool) -> None:
        self.transport.muted = value

    async def run(self, ctx: CallContext, inbox: Inbox, outbox: Outbox) -> None:
        transport = self.transport
        stats = transport.stats
        rate = transport.options.egress_rate
        last_index: int | None = None
        async for frame in inbox:
            if not isinstance(frame, EgressFrame):
                continue
            if frame.sample_rate != rate:
                raise ValueError(f"egress frames must be {rate} Hz, got {frame.sample_rate} Hz")
            if last_index is not None and frame.index > last_index + 1:
                stats.frames_lost += frame.index - last_index - 1
            last_index = frame.index
            peer = transport.peer
            if peer is None or peer.state != "connected":
                stats.frames_unsent += 1
                continue
            pcm = frame.pcm
            if transport.muted and not frame.silent:
                pcm = bytes(len(pcm))
            peer.outbound.push(pcm)
            stats.frames_out += 1
