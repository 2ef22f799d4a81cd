"""A loopback candidate: an aiortc peer that speaks into an interview and listens to it.

Used by the WebRTC tests and ``benchmarks/capacity.py``. It offers audio (sendrecv, Opus) and
an ``events`` data channel, like the demo page; :class:`Microphone` plays queued speech in
real time (silence otherwise), the interviewer's audio is decoded and its level recorded per
frame, and every data channel event is collected::

    with loopback_only():
        client = CandidateClient()
        r = await client.connect(http, f"/interviews/{call_id}/webrtc", token=token)
        await client.wait_event(lambda e: e.get("type") == "transcript")  # the greeting
        await client.say(pcm_48k)                                          # an answer
        ...
        await client.close()

:func:`loopback_only` keeps ICE on 127.0.0.1 (aioice otherwise offers every interface's
address, and skips loopback), so no test traffic reaches any other address.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import httpx
from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from pipeline.audio import from_av_frame, rms_dbfs, to_av_frame, to_mono
from stages.webrtc import IceServerSpec, rtc_configuration

RATE = 48000
FRAME = 960  # 20 ms at 48 kHz
SPEECH_DBFS = -45.0
"""A received frame louder than this counts as the interviewer speaking."""


@contextlib.contextmanager
def loopback_only() -> Iterator[None]:
    """ICE host candidates on 127.0.0.1 only, for every peer in this process."""
    import aioice.ice

    original = aioice.ice.get_host_addresses
    aioice.ice.get_host_addresses = lambda use_ipv4, use_ipv6: ["127.0.0.1"]
    try:
        yield
    finally:
        aioice.ice.get_host_addresses = original


class Microphone(MediaStreamTrack):
    """The candidate's microphone: 20 ms frames at real-time pace, queued speech or silence."""

    kind = "audio"

    def __init__(self) -> None:
        super().__init__()
        self._pending = bytearray()
        self._start: float | None = None
        self._n = 0
        self._done: asyncio.Future[float] | None = None
        self.speech_ends: list[float] = []
        """Loop time at which each utterance's last frame was sent."""
        self.speech_frames = 0
        """Frames of speech sent so far (20 ms each)."""

    @property
    def speaking(self) -> bool:
        return bool(self._pending)

    def say(self, pcm: bytes) -> asyncio.Future[float]:
        """Queue 48 kHz mono speech; the future gives the loop time its last frame was sent."""
        loop = asyncio.get_running_loop()
        if self._done is not None and not self._done.done():
            self._done.cancel()
        self._pending += pcm
        self._done = loop.create_future()
        return self._done

    def cut(self) -> None:
        """Stop speaking at once (the rest of the utterance is dropped)."""
        self._pending.clear()

    async def recv(self) -> Any:
        if self.readyState != "live":
            raise MediaStreamError
        loop = asyncio.get_running_loop()
        if self._start is None:
            self._start = loop.time()
        due = self._start + self._n * FRAME / RATE
        delay = due - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        pts = self._n * FRAME
        self._n += 1
        size = FRAME * 2
        if self._pending:
            chunk = bytes(self._pending[:size]).ljust(size, b"\0")
            del self._pending[:size]
            self.speech_frames += 1
            if not self._pending:
                end = loop.time()
                self.speech_ends.append(end)
                if self._done is not None and not self._done.done():
                    self._done.set_result(end)
        else:
            chunk = bytes(size)
        return to_av_frame(chunk, RATE, pts=pts)


class CandidateClient:
    """One candidate peer (see the module docstring)."""

    def __init__(
        self,
        ice_servers: Sequence[IceServerSpec] = (),
        *,
        relay_only: bool = False,
        keep_audio: bool = False,
    ) -> None:
        self.pc = RTCPeerConnection(rtc_configuration(ice_servers, relay_only))
        self.mic = Microphone()
        self.pc.addTrack(self.mic)
        self.channel = self.pc.createDataChannel("events")
        self.events: list[dict[str, Any]] = []
        self.levels: list[tuple[float, float]] = []
        """(loop time, dBFS) of every received frame of the interviewer's audio."""
        self.audio = bytearray() if keep_audio else None
        """The received audio (48 kHz mono) when ``keep_audio``."""
        self.location: str | None = None
        self._changed = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None
        self.channel.on("message", self._message)
        self.pc.on("track", self._track)

    # -- signaling -----------------------------------------------------------------------------

    async def offer(self) -> str:
        await self.pc.setLocalDescription(await self.pc.createOffer())
        assert self.pc.localDescription is not None
        return str(self.pc.localDescription.sdp)

    async def accept(self, answer_sdp: str) -> None:
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=answer_sdp, type="answer"))

    async def connect(
        self,
        http: httpx.AsyncClient,
        url: str,
        *,
        token: str | None = None,
        api_key: str | None = None,
        as_json: bool = False,
    ) -> httpx.Response:
        """POST the offer; on 201 apply the answer. Returns the response either way."""
        headers: dict[str, str] = {}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        if api_key is not None:
            headers["X-API-Key"] = api_key
        sdp = self.pc.localDescription.sdp if self.pc.localDescription else await self.offer()
        if as_json:
            r = await http.post(url, json={"sdp": sdp, "type": "offer"}, headers=headers)
        else:
            headers["Content-Type"] = "application/sdp"
            r = await http.post(url, content=sdp.encode(), headers=headers)
        if r.status_code == 201:
            answer = r.json()["sdp"] if as_json else r.text
            self.location = r.headers.get("location")
            await self.accept(answer)
        return r

    # -- what arrives --------------------------------------------------------------------------

    def _message(self, message: Any) -> None:
        if isinstance(message, str):
            self.events.append(json.loads(message))
            self._changed.set()

    def _track(self, track: MediaStreamTrack) -> None:
        if track.kind == "audio" and self._reader is None:
            self._reader = asyncio.ensure_future(self._read(track))

    async def _read(self, track: MediaStreamTrack) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            pcm, _rate, channels = from_av_frame(frame)  # type: ignore[arg-type]
            mono = to_mono(pcm, channels)
            self.levels.append((loop.time(), rms_dbfs(mono)))
            if self.audio is not None:
                self.audio += mono
            self._changed.set()

    async def wait_event(
        self, predicate: Callable[[dict[str, Any]], bool], within: float = 30.0, start: int = 0
    ) -> dict[str, Any]:
        """The first event (from index ``start``) matching ``predicate``; waits for it (a hang
        guard of ``within`` seconds)."""
        async with asyncio.timeout(within):
            while True:
                for event in self.events[start:]:
                    if predicate(event):
                        return event
                self._changed.clear()
                await self._changed.wait()

    async def wait_until(self, check: Callable[[], bool], within: float = 30.0) -> None:
        async with asyncio.timeout(within):
            while not check():
                self._changed.clear()
                await self._changed.wait()

    def agent_lines(self) -> list[str]:
        return [
            e["text"]
            for e in self.events
            if e.get("type") == "transcript" and e.get("speaker") == "agent"
        ]

    def loudest(self, since: float = -math.inf) -> float:
        """The loudest received frame (dBFS) since loop time ``since``."""
        return max((db for t, db in self.levels if t >= since), default=-120.0)

    def heard_at(self, since: float, threshold: float = SPEECH_DBFS) -> float | None:
        """Loop time of the first received frame louder than ``threshold`` after ``since``."""
        return next((t for t, db in self.levels if t >= since and db > threshold), None)

    # -- speaking ------------------------------------------------------------------------------

    async def say(self, pcm_48k: bytes) -> float:
        """Speak and wait until the last frame has been sent; returns that loop time."""
        return await self.mic.say(pcm_48k)

    # -- leaving -------------------------------------------------------------------------------

    def crash(self) -> None:
        """Vanish without a goodbye: stop the media and close the ICE sockets (no DTLS close,
        no SCTP abort), as a killed tab or a dropped network would."""
        self.mic.cut()
        self.mic.stop()
        for transceiver in self.pc.getTransceivers():
            dtls = transceiver.sender.transport
            ice = getattr(dtls, "transport", None)
            connection = getattr(ice, "_connection", None)
            for protocol in getattr(connection, "_protocols", []):
                transport = getattr(protocol, "transport", None)
                if transport is not None:
                    transport.close()

    async def close(self) -> None:
        self.mic.stop()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(5):
                await self.pc.close()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(BaseException):
                await self._reader
