"""stages/webrtc.py and its pure parts: offer checks, capture times, presence, client tokens,
the outbound track's cadence (virtual clock), the ingress/egress stages, and media relayed
through a local TURN server (Debian's coturn) over UDP, TCP and TLS."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import av
import pytest
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from aiortc_client import CandidateClient, loopback_only
from hypothesis import given, settings
from hypothesis import strategies as st

from interview.media import Presence, SignalingError, read_offer
from interview.tokens import ClientTokens, TokenError, derive_key
from pipeline.audio import rms_dbfs, to_av_frame, tone
from pipeline.clock import VirtualClock
from pipeline.frames import AudioChunk
from pipeline.stage import CallContext
from stages.pacer import EgressFrame
from stages.webrtc import (
    CaptureClock,
    IceServerSpec,
    OutboundAudio,
    Peer,
    SdpError,
    WebRtcOptions,
    WebRtcTransport,
    check_offer,
    ice_url_problems,
)

# --- offers ----------------------------------------------------------------------------------


def _real_offer() -> str:
    async def main() -> str:
        client = CandidateClient()
        try:
            return await client.offer()
        finally:
            await client.close()

    with loopback_only():
        return anyio.run(main)


@pytest.fixture(scope="module")
def offer() -> str:
    return _real_offer()


def test_a_real_offer_passes(offer: str) -> None:
    assert check_offer(offer) == offer
    assert check_offer(offer.replace("\r\n", "\n")).startswith("v=0\r\n")  # curl-friendly


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda o: "", "empty"),
        (lambda o: "hello world", "must start with 'v=0'"),
        (lambda o: "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\n", "no audio section"),
        (lambda o: o.replace("a=sendrecv", "a=recvonly"), "recvonly; it must be sendrecv"),
        (lambda o: _drop_lines(o, "a=ice-ufrag", "a=ice-pwd"), "no ICE credentials"),
        (lambda o: _drop_lines(o, "a=fingerprint"), "no DTLS fingerprint"),
        (lambda o: _only_codec(o, "G729"), "no supported codec"),
        (lambda o: "v=0\r\n" + "a=x\r\n" * 20000, "longer than"),
    ],
)
def test_bad_offers_are_refused_with_a_reason(offer: str, mutate: Any, reason: str) -> None:
    with pytest.raises(SdpError, match=reason):
        check_offer(mutate(offer))


def _drop_lines(sdp: str, *prefixes: str) -> str:
    return "\r\n".join(line for line in sdp.split("\r\n") if not line.startswith(prefixes))


def _only_codec(sdp: str, name: str) -> str:
    out = []
    for line in sdp.split("\r\n"):
        if line.startswith("m=audio"):
            line = " ".join([*line.split()[:3], "18"])
        elif line.startswith(("a=rtpmap", "a=fmtp", "a=rtcp-fb")):
            continue
        out.append(line)
        if line.startswith("m=audio"):
            out.append(f"a=rtpmap:18 {name}/8000")
    return "\r\n".join(out)


@pytest.mark.parametrize(
    ("content_type", "body", "status", "reason"),
    [
        ("text/plain", b"v=0", 415, "Content-Type"),
        ("application/json", b"{nope", 400, "not valid JSON"),
        ("application/json", b'{"sdp": "v=0", "type": "answer"}', 400, 'type: must be "offer"'),
        ("application/json", b'{"type": "offer"}', 400, "sdp: must be a string"),
        ("application/json", b"[1]", 400, "JSON object"),
        ("application/sdp", b"\xff\xfe", 400, "not UTF-8"),
        ("application/sdp", b"v" * 70000, 413, "larger than"),
    ],
)
def test_signaling_bodies(content_type: str, body: bytes, status: int, reason: str) -> None:
    with pytest.raises(SignalingError) as err:
        read_offer(content_type, body)
    assert err.value.status == status and reason in err.value.error


def test_read_offer_accepts_both_forms() -> None:
    assert read_offer("application/sdp; charset=utf-8", b"v=0\r\n").as_json is False
    offer = read_offer("application/json", b'{"sdp": "v=0", "type": "offer"}')
    assert offer.sdp == "v=0" and offer.as_json


def test_ice_url_problems_name_what_aiortc_ignores() -> None:
    servers = [
        IceServerSpec(("stun:stun.example.org", "stun:second.example.org")),
        IceServerSpec(("turn:turn.example.org?transport=udp",), "u", "p"),
        IceServerSpec(("turns:turn.example.org?transport=udp",), "u", "p"),
        IceServerSpec(("turn:other.example.org",)),
        IceServerSpec(("http://nope",)),
    ]
    problems = ice_url_problems(servers)
    assert len(problems) == 4
    assert "only the first STUN" in problems[0]
    assert "turns needs transport=tcp" in problems[1]
    assert "needs a username and a credential" in problems[2]
    assert "http://nope" in problems[3]
    assert ice_url_problems(servers[:2]) == [problems[0]]


# --- capture times (pure) --------------------------------------------------------------------

_frames = st.lists(
    st.tuples(
        st.floats(min_value=0.0, max_value=0.2),  # arrival delay since the previous frame
        st.one_of(st.none(), st.floats(min_value=-0.5, max_value=0.5)),  # pts jump (None: no pts)
        st.booleans(),  # a new stream starts here (a reconnect)
    ),
    min_size=1,
    max_size=60,
)


@given(_frames)
def test_capture_times_never_go_back_nor_into_the_future(frames: list[Any]) -> None:
    clock = CaptureClock(max_lag_s=1.0)
    now, media, last_end, had_pts = 100.0, 0.0, float("-inf"), False
    for delay, jump, new_stream in frames:
        now += delay
        if new_stream:
            clock.new_stream()
        media_time = None if jump is None else media + jump
        if media_time is not None:
            media = media_time + 0.02
        start = clock.map(media_time, 0.02, now)
        assert start + 0.02 <= now + 1e-9  # nothing is captured in the future
        assert start + 0.02 >= now - 1.0 - 1e-9  # nor long before it arrived
        assert start >= last_end - 0.02 - 1e-9  # back by one frame at most (jitter)
        if jump == 0.0 and had_pts and not new_stream and start + 0.02 < now - 1e-9:
            assert start == pytest.approx(last_end)  # contiguous media stays contiguous
        last_end, had_pts = start + 0.02, jump is not None


def test_capture_times_keep_media_spacing_despite_network_jitter() -> None:
    clock = CaptureClock()
    arrivals = [10.0, 10.05, 10.05, 10.07, 10.12, 10.12]  # bursty arrival, 20 ms frames
    starts = [clock.map(i * 0.02, 0.02, t) for i, t in enumerate(arrivals)]
    assert starts[0] == pytest.approx(9.98)
    assert [round(b - a, 6) for a, b in itertools.pairwise(starts)] == [0.02] * 5
    # a frame whose media time says it was captured a second after the last: a gap is kept
    assert clock.map(1.1, 0.02, 11.1) == pytest.approx(starts[0] + 1.1)
    # a discontinuity (media time far behind the clock) re-anchors on now
    assert clock.map(1.12, 0.02, 15.0) == pytest.approx(14.98)
    assert clock.reanchors == 1


# --- presence (pure) -------------------------------------------------------------------------


@settings(max_examples=300)
@given(
    st.lists(
        st.tuples(st.floats(min_value=0.0, max_value=3.0), st.booleans()), min_size=1, max_size=40
    ),
    st.floats(min_value=0.5, max_value=5.0),
    st.floats(min_value=0.5, max_value=5.0),
)
def test_presence_ends_exactly_when_the_candidate_never_came_or_did_not_come_back(
    steps: list[tuple[float, bool]], join_timeout: float, grace: float
) -> None:
    presence = Presence(0.0, join_timeout, grace)
    now, ever_live, absent_since, ended = 0.0, False, None, False
    for delay, live in steps:
        now += delay
        result = presence.observe(live, now)
        if live:
            ever_live, absent_since = True, None
        elif ever_live and absent_since is None:
            absent_since = now
        expected = (
            not ended
            and not live
            and (
                (not ever_live and now >= join_timeout)
                or (absent_since is not None and now >= absent_since + grace)
            )
        )
        assert (result == "candidate_left") == expected, (steps, join_timeout, grace)
        ended = ended or expected
        assert (presence.state == "ended") == ended


def test_presence_reconnect_within_the_grace_continues() -> None:
    p = Presence(0.0, join_timeout_s=10, leave_grace_s=5)
    assert p.observe(False, 9.0) is None and p.deadline == 10.0
    assert p.observe(True, 9.5) is None and p.deadline is None
    assert p.observe(False, 20.0) is None and p.deadline == 25.0
    assert p.observe(True, 24.9) is None  # back just in time
    assert p.observe(False, 30.0) is None
    assert p.observe(False, 35.0) == "candidate_left"
    assert p.observe(False, 99.0) is None  # said once
    assert p.absences == 2


# --- client tokens ---------------------------------------------------------------------------


def test_tokens_authorise_one_interview_until_they_expire() -> None:
    tokens = ClientTokens.from_api_keys(["current-key-123"])
    token, expires = tokens.issue("call-1", 60, now=1000.0)
    assert expires == 1060.0
    claims = tokens.verify(token, "call-1", now=1059.0)
    assert claims.call_id == "call-1" and claims.expires_at == 1060.0 and claims.token_id
    assert "current-key-123" not in token and derive_key("current-key-123") != b"current-key-123"
    with pytest.raises(TokenError, match="expired") as err:
        tokens.verify(token, "call-1", now=1060.0)
    assert err.value.status == 401
    with pytest.raises(TokenError, match="another interview") as err:
        tokens.verify(token, "call-2", now=1000.0)
    assert err.value.status == 403
    other, _ = tokens.issue("call-1", 60, now=1000.0)
    assert other != token  # every token has its own id


def test_tokens_survive_a_key_rotation_and_die_with_the_old_key() -> None:
    old = ClientTokens.from_api_keys(["old-key-123"])
    token, _ = old.issue("c", 60, now=0.0)
    rotated = ClientTokens.from_api_keys(["new-key-456", "old-key-123"])
    assert rotated.verify(token, "c", now=1.0).call_id == "c"
    with pytest.raises(TokenError, match="signature"):
        ClientTokens.from_api_keys(["new-key-456"]).verify(token, "c", now=1.0)


@pytest.mark.parametrize("bad", ["", "abc", "a.b.c", "!!!.###", "x" * 2000, "e30.AAAA"])
def test_malformed_tokens_are_refused(bad: str) -> None:
    with pytest.raises(TokenError) as err:
        ClientTokens([b"k"]).verify(bad, "c", now=0.0)
    assert err.value.status == 401


@given(st.integers(min_value=0), st.sampled_from("ABCDEFGHabcdefgh0123456789-_"))
def test_any_changed_character_invalidates_a_token(position: int, char: str) -> None:
    tokens = ClientTokens([b"secret"])
    token, _ = tokens.issue("call", 60, now=0.0)
    i = position % len(token)
    forged = token[:i] + char + token[i + 1 :]
    if forged == token:
        return
    with pytest.raises(TokenError):
        claims = tokens.verify(forged, "call", now=1.0)
        # base64 padding bits may decode to the same bytes: then nothing really changed
        if claims.call_id == "call":
            raise TokenError(401, "same token")


# --- the outbound track's cadence (virtual clock) --------------------------------------------


def test_outbound_track_paces_silence_and_counts_late_frames() -> None:
    clock = VirtualClock()

    async def main() -> dict[str, Any]:
        track = OutboundAudio(48000, 20, max_queue=3, late_s=0.02)
        loud = tone(440, 0.02, 48000)
        out: dict[str, Any] = {}
        t0 = clock.now()
        first = await track.recv()  # nothing queued, first frame: silence at once
        second = await track.recv()  # idle cadence: one period later
        out["idle"] = (clock.now() - t0, rms_dbfs(bytes(first.planes[0])))
        out["pts"] = (first.pts, second.pts, first.time_base)
        for _ in range(5):
            track.push(loud)  # more than max_queue: the oldest are dropped
        got = [await track.recv() for _ in range(3)]
        out["burst"] = (clock.now() - t0, [rms_dbfs(bytes(f.planes[0])) > -10 for f in got])
        t1 = clock.now()
        late = await track.recv()  # fed before, now nothing: waits a period + late_s
        out["late"] = (clock.now() - t1, rms_dbfs(bytes(late.planes[0])))
        out["stats"] = (track.stats.dropped, track.stats.late, track.stats.fed)
        track.stop()
        with pytest.raises(MediaStreamError):
            await track.recv()
        return out

    out = clock.run(main)
    assert out["idle"][0] == pytest.approx(0.02) and out["idle"][1] == -120.0
    assert out["pts"][:2] == (0, 960) and out["pts"][2].denominator == 48000
    assert out["burst"] == (pytest.approx(0.02), [True, True, True])
    assert out["late"] == (pytest.approx(0.04), -120.0)
    assert out["stats"] == (2, 1, 3)


def test_outbound_track_refuses_frames_of_the_wrong_size() -> None:
    with pytest.raises(ValueError, match="expected 1920"):
        OutboundAudio(48000, 20).push(bytes(100))


# --- ingress and egress stages ---------------------------------------------------------------


class _FakeTrack(MediaStreamTrack):
    """48 kHz stereo frames every 20 ms of the clock; a 100 ms gap after frame 10."""

    kind = "audio"

    def __init__(self, frames: int) -> None:
        super().__init__()
        self.frames, self.n = frames, 0

    async def recv(self) -> av.AudioFrame:
        if self.n >= self.frames:
            raise MediaStreamError
        await anyio.sleep(0.12 if self.n == 11 else 0.02)  # 100 ms of packets lost
        pts = self.n * 960 + (4800 if self.n > 10 else 0)
        self.n += 1
        return to_av_frame(bytes(960 * 4), 48000, 2, pts=pts)


class _Sink:
    def __init__(self) -> None:
        self.frames: list[Any] = []

    async def send(self, frame: Any) -> None:
        self.frames.append(frame)


def test_ingress_turns_a_track_into_16k_mono_chunks_on_the_call_clock() -> None:
    clock = VirtualClock()

    async def main() -> tuple[list[AudioChunk], float]:
        transport = WebRtcTransport(clock=clock)
        peer = Peer("p1", clock=clock)
        peer.inbound = _FakeTrack(20)
        transport.attach(peer)
        ctx = CallContext(clock=clock)
        sink = _Sink()
        start = clock.now()
        async with anyio.create_task_group() as tg:
            tg.start_soon(transport.ingress().run, ctx, _Inbox([]), sink)
            await anyio.sleep(1.0)
            transport.close()  # no more peers: the ingress ends
        await peer.close()
        return sink.frames, start

    chunks, start = clock.run(main)
    assert len(chunks) == 20
    assert all(c.sample_rate == 16000 and c.channels == 1 for c in chunks)
    total = sum(len(c.pcm) for c in chunks) // 2
    assert 20 * 320 - 32 <= total <= 20 * 320  # 20 ms each at 16 kHz, less the filter's delay
    times = [c.capture_time for c in chunks]
    assert times[0] == pytest.approx(start)  # captured during the first 20 ms
    steps = [round(b - a, 6) for a, b in itertools.pairwise(times)]
    assert steps[:10] == [0.02] * 10 and steps[10] == pytest.approx(0.12)  # the gap is kept


def test_egress_hands_frames_to_the_connected_peer_and_mutes() -> None:
    async def main() -> tuple[list[bytes], Any]:
        transport = WebRtcTransport()
        peer = Peer("p1")
        transport.attach(peer)
        egress = transport.egress()
        loud = tone(440, 0.02, 48000)
        frames = [EgressFrame(loud, 48000, 1, 1, False, i) for i in (0, 1, 3)]  # 2 was lost
        peer.state = "connected"  # as aiortc would say
        await egress.run(CallContext(), _Inbox(frames), _Sink())
        egress.muted = True  # type: ignore[attr-defined]
        await egress.run(CallContext(), _Inbox([*frames, frames[-1]]), _Sink())
        queued = list(peer.outbound._queue)
        peer.state = "new"
        await peer.close()
        return queued, transport.stats

    queued, stats = anyio.run(main)
    levels = [rms_dbfs(pcm) > -10 for pcm in queued]
    assert levels == [True, True, True, False, False, False, False]
    assert stats.frames_out == 7 and stats.frames_lost == 2  # index 2, in each run


class _Inbox:
    def __init__(self, frames: list[Any]) -> None:
        self._frames = list(frames)

    def __aiter__(self) -> _Inbox:
        return self

    async def __anext__(self) -> Any:
        if not self._frames:
            raise StopAsyncIteration
        return self._frames.pop(0)

    async def receive(self) -> Any:
        return await self.__anext__()


# --- media relayed through TURN (coturn) -----------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def _coturn(tmp: Path) -> Iterator[dict[str, int]]:
    """Debian's turnserver on 127.0.0.1: a plain port (UDP+TCP) and a TLS port."""
    binary = shutil.which("turnserver")
    if binary is None:
        if os.environ.get("CI") == "true":
            pytest.fail("coturn is missing (apt-get install -y coturn): CI must test TURN")
        pytest.skip("coturn is not installed (apt-get install -y coturn)")
    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    ca.cert_pem.write_to_path(str(tmp / "ca.pem"))
    cert.private_key_pem.write_to_path(str(tmp / "key.pem"))
    cert.cert_chain_pems[0].write_to_path(str(tmp / "cert.pem"))
    ports = {"plain": _free_port(), "tls": _free_port()}
    args = [
        binary, "-n", "--no-cli", "--no-dtls", "--simple-log", "--log-file", "stdout",
        "--listening-ip", "127.0.0.1", "--relay-ip", "127.0.0.1", "--allow-loopback-peers",
        "--listening-port", str(ports["plain"]), "--tls-listening-port", str(ports["tls"]),
        "--cert", str(tmp / "cert.pem"), "--pkey", str(tmp / "key.pem"),
        "--lt-cred-mech", "--user", "candidate:turn-secret", "--realm", "synchire.test",
    ]  # fmt: skip
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10  # hang guard while coturn starts
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", ports["tls"])) == 0:
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail("coturn did not start")
            time.sleep(0.05)
        yield ports
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.mark.realclock
@pytest.mark.parametrize("kind", ["turn-udp", "turn-tcp", "turns-tls"])
def test_media_flows_both_ways_through_a_turn_relay(
    kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with _coturn(tmp_path) as ports:
        url = {
            "turn-udp": f"turn:127.0.0.1:{ports['plain']}?transport=udp",
            "turn-tcp": f"turn:127.0.0.1:{ports['plain']}?transport=tcp",
            "turns-tls": f"turns:127.0.0.1:{ports['tls']}?transport=tcp",
        }[kind]
        monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "ca.pem"))  # trust our TLS TURN
        servers = (IceServerSpec((url,), "candidate", "turn-secret"),)
        with loopback_only():
            result = asyncio.run(asyncio.wait_for(_relay_call(servers), 30))
    answer, heard_db, spoken_db = result
    candidates = [line for line in answer.splitlines() if line.startswith("a=candidate")]
    assert candidates and all(" typ relay " in line for line in candidates)
    assert heard_db > -20  # the interviewer's tone reached the client, through the relay
    assert spoken_db > -20  # and the candidate's reached the server


async def _relay_call(servers: tuple[IceServerSpec, ...]) -> tuple[str, float, float]:
    options = WebRtcOptions(ice_servers=servers, relay_only=True)
    peer = Peer("relay", options)
    client = CandidateClient(servers, relay_only=True)
    try:
        answer = await peer.answer(await client.offer())
        await client.accept(answer)
        connected = asyncio.Event()
        peer.observers.append(lambda p: connected.set() if p.state == "connected" else None)
        await asyncio.wait_for(connected.wait(), 10)
        assert peer.inbound is not None
        loud = tone(440, 0.02, 48000)
        for _ in range(25):
            peer.outbound.push(loud)
        client.mic.say(tone(300, 0.5, 48000))
        spoken = -120.0
        for _ in range(60):
            frame = await peer.inbound.recv()
            spoken = max(spoken, rms_dbfs(bytes(frame.planes[0])))  # type: ignore[union-attr]
            if spoken > -20 and client.loudest() > -20:
                break
        return answer, client.loudest(), spoken
    finally:
        await client.close()
        await peer.close()
