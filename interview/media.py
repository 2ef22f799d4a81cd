"""The candidate's media for one interview: WebRTC peers, their lifecycle and live events.

One :class:`InterviewMedia` per interview, created by the manager with the session. It owns
the session's :class:`~stages.webrtc.WebRtcTransport`, answers the candidate's offers
(``POST /interviews/{callId}/webrtc``), hangs peers up (``DELETE``), forwards the session's
live events to the candidate's ``events`` data channel, and ends the interview when the
candidate does not come or does not come back. docs/WEBRTC.md is the operator's version.

Lifecycle (:class:`Presence`, checked every ``poll_s``):

* nobody connects within ``join_timeout_s`` of admission: the interview ends as
  ``candidate_left`` (its result is still delivered). The interview itself only starts (the
  greeting) once a peer has connected.
* the candidate is *present* while the attached peer is *live*: connected, with audio
  received within ``stale_after_s`` (a crashed tab or a dead network stops the audio at once,
  long before ICE consent checks notice).
* gone (not live) for longer than ``leave_grace_s``: the interview ends as ``candidate_left``.
  Back within the grace, it simply continues.

Reconnect rule: one candidate peer at a time. An offer is answered when no peer is attached or
the attached one is not live (connecting, disconnected, failed, closed, or silent for
``stale_after_s``): the new peer replaces it. That is a reconnect: the same candidate after a
reload, a network change or a crash. While the attached peer is live, a second offer gets 409;
hanging the first up with ``DELETE`` frees the slot at once. Both the API key and the
interview's client token may offer; the token is the candidate's, so ``409`` in practice means
a second tab or device while the first is still talking.

Live events: on open, the channel first carries every event of the interview so far, in order
(so a reconnecting page rebuilds its view), then each new one as it happens: JSON text in the
DESIGN.md §7 shapes (``transcript``, ``progress``, ``ended``, ...).
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import anyio

from pipeline.clock import Clock, MonotonicClock
from stages.webrtc import (
    IceServerSpec,
    Peer,
    SdpError,
    WebRtcError,
    WebRtcOptions,
    WebRtcTransport,
    ice_url_problems,
)

log = logging.getLogger("synchire.media")

MAX_OFFER_BYTES = 64 * 1024
"""Offers larger than this are refused with 413 (a browser's offer is a few KiB)."""


class SignalingError(Exception):
    """A refused signaling request with its HTTP status (answered ``{"success": false}``)."""

    def __init__(self, status: int, error: str) -> None:
        super().__init__(error)
        self.status = status
        self.error = error


@dataclass(frozen=True)
class MediaOptions:
    """Peer lifecycle tuning. Defaults suit a live interview."""

    join_timeout_s: float = 120.0
    """No peer connected this long after admission: the interview ends (``candidate_left``)."""
    leave_grace_s: float = 20.0
    """The candidate gone this long: the interview ends (``candidate_left``)."""
    stale_after_s: float = 3.0
    """A connected peer with no audio for this long counts as gone (and may be replaced)."""
    poll_s: float = 0.25
    """How often presence is checked."""
    close_flush_s: float = 1.0
    """On hang-up, how long queued events (the ``ended`` event) get to leave."""
    max_history: int = 5000
    """Events kept for replay to a (re)connecting client."""
    webrtc: WebRtcOptions = field(default_factory=WebRtcOptions)

    def __post_init__(self) -> None:
        for name in ("join_timeout_s", "leave_grace_s", "stale_after_s", "poll_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"MediaOptions.{name} must be positive")

    @classmethod
    def from_settings(cls, settings: Any) -> MediaOptions:
        """Options from :class:`interview.config.Settings` (``ICE_SERVERS``, ``WEBRTC_*``)."""
        return cls(
            join_timeout_s=float(getattr(settings, "webrtc_join_timeout_s", 120.0)),
            leave_grace_s=float(getattr(settings, "webrtc_leave_grace_s", 20.0)),
            webrtc=WebRtcOptions(ice_servers=ice_servers(settings)),
        )


def ice_servers(settings: Any) -> tuple[IceServerSpec, ...]:
    """The configured ``ICE_SERVERS`` as :class:`~stages.webrtc.IceServerSpec`."""
    out = []
    for server in getattr(settings, "ice_servers", None) or ():
        credential = server.credential
        if credential is not None and hasattr(credential, "get_secret_value"):
            credential = credential.get_secret_value()
        out.append(IceServerSpec(tuple(server.urls), server.username, credential))
    return tuple(out)


def client_ice_servers(settings: Any) -> list[dict[str, Any]]:
    """``ICE_SERVERS`` for the browser (``RTCPeerConnection({iceServers})``). TURN credentials
    are included: the browser needs them to allocate its own relay (see docs/WEBRTC.md)."""
    out: list[dict[str, Any]] = []
    for spec in ice_servers(settings):
        entry: dict[str, Any] = {"urls": list(spec.urls)}
        if spec.username is not None:
            entry["username"] = spec.username
        if spec.credential is not None:
            entry["credential"] = spec.credential
        out.append(entry)
    return out


def log_ice_problems(settings: Any) -> None:
    for problem in ice_url_problems(ice_servers(settings)):
        log.warning("ICE_SERVERS: %s", problem)


# ----------------------------------------------------------------------------------------------
# Signaling bodies


@dataclass(frozen=True)
class Offer:
    sdp: str
    as_json: bool
    """The offer came as JSON, so the answer goes back as JSON."""


@dataclass(frozen=True)
class Answer:
    sdp: str
    peer_id: str
    as_json: bool
    replaced: str | None = None
    """The peer this one replaced (a reconnect), if any."""


def read_offer(content_type: str | None, body: bytes) -> Offer:
    """The offer in a signaling body: ``application/sdp`` (WHIP) or JSON ``{"sdp", "type"}``."""
    kind = (content_type or "").split(";", 1)[0].strip().lower()
    if len(body) > MAX_OFFER_BYTES:
        raise SignalingError(413, f"SDP offer is larger than {MAX_OFFER_BYTES // 1024} KiB")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise SignalingError(400, "Malformed SDP offer: not UTF-8 text") from None
    if kind == "application/sdp":
        return Offer(text, as_json=False)
    if kind == "application/json":
        try:
            data = json.loads(text)
        except ValueError:
            raise SignalingError(400, "Request body is not valid JSON") from None
        if not isinstance(data, dict):
            raise SignalingError(400, 'Body must be a JSON object {"sdp", "type": "offer"}')
        if data.get("type") != "offer":
            raise SignalingError(400, 'type: must be "offer"')
        sdp = data.get("sdp")
        if not isinstance(sdp, str):
            raise SignalingError(400, "sdp: must be a string holding the SDP offer")
        return Offer(sdp, as_json=True)
    raise SignalingError(415, "Content-Type must be application/sdp or application/json")


# ----------------------------------------------------------------------------------------------
# Presence (pure)


class Presence:
    """Whether the candidate came and stayed; decides ``candidate_left`` (no I/O).

    Feed it one observation at a time with :meth:`observe` (is a live peer attached, and the
    time); it answers ``"candidate_left"`` once, at the first observation that shows nobody
    connected ``join_timeout_s`` after ``start``, or nobody live for ``leave_grace_s`` after
    the first observation of an absence.
    """

    def __init__(self, start: float, join_timeout_s: float, leave_grace_s: float) -> None:
        self.start = start
        self.join_timeout_s = join_timeout_s
        self.leave_grace_s = leave_grace_s
        self.state = "waiting"  # waiting → present ⇄ absent → ended
        self.absent_since: float | None = None
        self.absences = 0

    @property
    def deadline(self) -> float | None:
        """When the interview ends unless the candidate (re)appears; None while present."""
        if self.state == "waiting":
            return self.start + self.join_timeout_s
        if self.state == "absent" and self.absent_since is not None:
            return self.absent_since + self.leave_grace_s
        return None

    def observe(self, live: bool, now: float) -> str | None:
        if self.state == "ended":
            return None
        if live:
            self.state, self.absent_since = "present", None
            return None
        if self.state == "present":
            self.state, self.absent_since = "absent", now
            self.absences += 1
        deadline = self.deadline
        if deadline is not None and now >= deadline:
            self.state = "ended"
            return "candidate_left"
        return None


# ----------------------------------------------------------------------------------------------
# The interview's media


class Stoppable(Protocol):
    def stop(self, reason: str) -> None: ...


class InterviewMedia:
    """See the module docstring. ``run()`` is the watchdog; ``close()`` hangs everyone up."""

    def __init__(
        self, call_id: str, options: MediaOptions | None = None, clock: Clock | None = None
    ) -> None:
        self.call_id = call_id
        self.options = options = options or MediaOptions()
        self.clock = clock or MonotonicClock()
        self.transport = WebRtcTransport(options.webrtc, self.clock)
        self.presence = Presence(self.clock.now(), options.join_timeout_s, options.leave_grace_s)
        self.history: list[str] = []
        self.peers_answered = 0
        self.end_reason: str | None = None
        self._session: Stoppable | None = None
        self._lock: anyio.Lock | None = None
        self._closed = False
        self._ended = False

    # -- the session ---------------------------------------------------------------------------

    def bind(self, session: Any) -> None:
        """Follow ``session``: forward its live events, stop it when the candidate leaves."""
        self._session = session
        subscribe: Callable[[Callable[[dict[str, Any]], None]], None] | None = getattr(
            session, "subscribe", None
        )
        if subscribe is not None:
            subscribe(self.publish)

    def publish(self, event: dict[str, Any]) -> None:
        """Send one live event to the candidate (and keep it for replay)."""
        text = json.dumps(event, separators=(",", ":"), default=str)
        if event.get("type") == "ended":
            self._ended = True
        if len(self.history) < self.options.max_history:
            self.history.append(text)
        peer = self.transport.peer
        if peer is not None:
            peer.send_event(text)

    def _replay(self, peer: Peer) -> None:
        if peer is not self.transport.peer:
            return
        for text in list(self.history):
            if not peer.send_event(text):
                break

    # -- signaling -----------------------------------------------------------------------------

    async def offer(self, offer: Offer) -> Answer:
        """Answer a candidate's offer (see the reconnect rule in the module docstring)."""
        if self._closed or self._ended:
            raise SignalingError(409, "The interview is ending; it takes no new connection")
        if self._lock is None:
            self._lock = anyio.Lock()
        async with self._lock:
            current = self.transport.peer
            if current is not None and current.live(self.clock.now(), self.options.stale_after_s):
                raise SignalingError(
                    409,
                    "A candidate is already connected to this interview; hang that peer up "
                    f"(DELETE .../webrtc/{current.id}) or retry once it has dropped",
                )
            peer = Peer(secrets.token_urlsafe(9), self.options.webrtc, self.clock)
            try:
                sdp = await peer.answer(offer.sdp)
            except SdpError as err:
                await self._close_peer(peer)
                raise SignalingError(400, f"Malformed SDP offer: {err}") from None
            except WebRtcError as err:
                await self._close_peer(peer)
                raise SignalingError(503, str(err)) from None
            except BaseException:
                await self._close_peer(peer)
                raise
            if self._closed:
                await self._close_peer(peer)
                raise SignalingError(409, "The interview is ending; it takes no new connection")
            peer.on_channel = self._replay
            peer.observers.append(self._peer_changed)
            previous = self.transport.attach(peer)
            self.peers_answered += 1
        log.info(
            "candidate peer answered%s",
            f" (replaces {previous.id})" if previous is not None else "",
            extra={"callId": self.call_id, "peerId": peer.id},
        )
        if previous is not None:
            await self._close_peer(previous)
        return Answer(sdp, peer.id, offer.as_json, previous.id if previous else None)

    async def hangup(self, peer_id: str, *, end: bool = False) -> None:
        """Hang up the attached peer ``peer_id`` (404 for any other id). ``end``: the candidate
        is leaving for good; the interview ends now (``candidate_left``) instead of after the
        leave grace."""
        peer = self.transport.peer
        if peer is None or peer.id != peer_id:
            raise SignalingError(404, "No such peer in this interview")
        self.transport.detach(peer)
        log.info("candidate hung up", extra={"callId": self.call_id, "peerId": peer_id})
        if end:
            self._end("candidate_left")
        await self._close_peer(peer)

    def _peer_changed(self, peer: Peer) -> None:
        log.info(
            "candidate peer %s",
            peer.state,
            extra={"callId": self.call_id, "peerId": peer.id},
        )

    # -- lifecycle -----------------------------------------------------------------------------

    def live(self, now: float | None = None) -> bool:
        peer = self.transport.peer
        now = self.clock.now() if now is None else now
        return peer is not None and peer.live(now, self.options.stale_after_s)

    async def run(self) -> None:
        """The watchdog: ends the interview when the candidate never came or left; closes
        failed peers. Runs until cancelled or until it has ended the interview."""
        while not self._closed:
            now = self.clock.now()
            peer = self.transport.peer
            if peer is not None and peer.state == "failed":
                self.transport.detach(peer)
                await self._close_peer(peer)
            reason = self.presence.observe(self.live(now), now)
            if reason is not None:
                log.info(
                    "candidate %s; ending the interview",
                    "never connected" if self.presence.absences == 0 else "did not come back",
                    extra={"callId": self.call_id},
                )
                self._end(reason)
                return
            await self.clock.sleep(self.options.poll_s)

    def _end(self, reason: str) -> None:
        if self.end_reason is None:
            self.end_reason = reason
            if self._session is not None:
                self._session.stop(reason)

    async def close(self) -> None:
        """Hang everyone up (after letting queued events leave); the interview is over."""
        self._closed = True
        peer = self.transport.peer
        self.transport.close()
        if peer is not None:
            self.transport.detach(peer)
            await self._close_peer(peer, flush_s=self.options.close_flush_s)

    async def _close_peer(self, peer: Peer, flush_s: float = 0.0) -> None:
        with anyio.CancelScope(shield=True), anyio.move_on_after(flush_s + 3.0):
            try:
                await peer.close(flush_s)
            except Exception:
                log.exception("closing peer %s failed", peer.id, extra={"callId": self.call_id})

    def view(self) -> dict[str, Any]:
        """Transport state for ``GET /interviews/{callId}`` (operators, the benchmark)."""
        now = self.clock.now()
        peer = self.transport.peer
        stats = self.transport.stats
        return {
            "presence": self.presence.state,
            "peersAnswered": self.peers_answered,
            "peer": peer.view(now) if peer is not None else None,
            "chunksIn": stats.chunks_in,
            "framesOut": stats.frames_out,
            "framesUnsent": stats.frames_unsent,
            "framesLost": stats.frames_lost,
            "captureReanchors": self.transport.capture.reanchors,
        }
