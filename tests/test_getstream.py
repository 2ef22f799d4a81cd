"""The GetStream edge at the SDK boundary: the official SDK against a local fake of Stream's
REST endpoints, audio through an injected media double in a real graph, and (when the native
client is installed) its coordinator join against the same fake up to the SFU handshake.

The SFU's media path (protobuf signalling, WebRTC) cannot be exercised offline.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import jwt
import numpy as np
import pytest
from pydantic import SecretStr

if importlib.util.find_spec("getstream") is None:
    if os.environ.get("CI") == "true":
        raise RuntimeError("the [getstream] extra is not installed (required under CI=true)")
    pytest.skip("the [getstream] extra is not installed", allow_module_level=True)

from fakes.stream import FakeStream, Fault, MediaDouble

from pipeline.audio import dominant_frequency, tone
from pipeline.frames import AudioChunk
from pipeline.graph import Graph
from pipeline.stage import CallContext, Collect, Inbox, Outbox
from pipeline.supervisor import CallResult, Supervisor
from stages.getstream import (
    GetStreamAuthError,
    GetStreamError,
    GetStreamOptions,
    GetStreamTransport,
    RemoteAudio,
    StreamRest,
    check_call_id,
)
from stages.pacer import EgressFrame

AGENT = "synchire-interviewer"
TRANSCRIPT = {"type": "transcript", "speaker": "agent", "text": "Hello, Ada.", "timestamp": 0.42}
PROGRESS = {"type": "progress", "questionIndex": 0, "category": "technical", "totalQuestions": 3}
ANSWER = {"type": "transcript", "speaker": "user", "text": "Hi!", "timestamp": 3.5}


def options(fake: FakeStream, **kw: Any) -> GetStreamOptions:
    values: dict[str, Any] = {
        "api_key": fake.api_key,
        "api_secret": fake.api_secret,
        "base_url": fake.url,
        "ws_url": fake.ws_url,
    }
    return GetStreamOptions(**(values | kw))


# --- options ----------------------------------------------------------------------------------


def test_options_name_the_bad_field_and_hide_the_secret() -> None:
    with pytest.raises(ValueError, match="api_secret"):
        GetStreamOptions(api_key="k", api_secret="")
    with pytest.raises(ValueError, match="base_url"):
        GetStreamOptions(api_key="k", api_secret="s", base_url="stream.example")
    with pytest.raises(ValueError, match="call_type"):
        GetStreamOptions(api_key="k", api_secret="s", call_type="default call")
    with pytest.raises(ValueError, match="callId"):
        check_call_id("../admin")
    assert "hunter2-secret" not in repr(GetStreamOptions(api_key="k", api_secret="hunter2-secret"))

    class Settings:
        stream_api_key = SecretStr("key-1")
        stream_api_secret: SecretStr | None = None
        stream_base_url = "http://127.0.0.1:9"

    with pytest.raises(ValueError, match="STREAM_API_SECRET") as err:
        GetStreamOptions.from_settings(Settings())
    assert "STREAM_API_KEY" not in str(err.value)
    Settings.stream_api_secret = SecretStr("s3cret")
    made = GetStreamOptions.from_settings(Settings(), agent_name="Interviewer")
    assert (made.api_key, made.api_secret, made.base_url) == (
        "key-1",
        "s3cret",
        Settings.stream_base_url,
    )
    assert made.agent_name == "Interviewer"


# --- REST through the SDK -----------------------------------------------------------------------


def test_rest_calls_at_the_sdk_boundary() -> None:
    async def main(fake: FakeStream) -> tuple[bool, bool, Any, str]:
        rest = await StreamRest.create(options(fake))
        try:
            await rest.upsert_agent()
            first = await rest.get_or_create_call("call-1")
            again = await rest.get_or_create_call("call-1")
            token = rest.user_token("call-1")
            credentials = await rest.join("call-1", token)
            await rest.send_event("call-1", TRANSCRIPT)
            await rest.send_event("call-1", PROGRESS)
        finally:
            await rest.aclose()
        return first, again, credentials, token

    with FakeStream() as fake:
        first, again, credentials, token = anyio.run(main, fake)

    assert (first, again) == (True, False)
    assert [r.endpoint for r in fake.requests] == [
        "users",
        "call",
        "call",
        "join",
        "event",
        "event",
    ]
    for rec in fake.requests:
        assert rec.status in (200, 201), rec
        assert rec.query["api_key"] == fake.api_key
        assert rec.headers["stream-auth-type"] == "jwt"
        assert not rec.headers["authorization"].lower().startswith("bearer")
        assert fake.api_secret not in json.dumps([rec.headers, rec.query, rec.body])
        claims = jwt.decode(rec.headers["authorization"], fake.api_secret, algorithms=["HS256"])
        if rec.endpoint == "join":  # a user token, limited to this call
            assert claims["user_id"] == AGENT
            assert claims["call_cids"] == ["default:call-1"]
            assert claims["exp"] > claims["iat"]
            assert rec.headers["authorization"] == token
            assert rec.body["create"] is False
        else:  # server-side: empty claims, the user named in the body
            assert "user_id" not in claims
    assert fake.users[AGENT]["name"] == "AI Interviewer"
    assert fake.calls["default:call-1"]["created_by"] == AGENT
    assert credentials.token == fake.sfu_tokens[-1]
    assert credentials.ws_endpoint == fake.ws_url.replace("/video/connect", "/sfu/ws")
    assert credentials.token not in repr(credentials)
    assert fake.custom_events("default:call-1") == [TRANSCRIPT, PROGRESS]  # the original shapes
    assert {e["user_id"] for e in fake.events} == {AGENT}


# --- the transport in a graph -------------------------------------------------------------------


class Frames:
    """The pacer's side: once joined, ``count`` egress frames of a 440 Hz tone at 48 kHz."""

    name = "pacer"

    def __init__(self, transport: GetStreamTransport, count: int, hold: bool = False) -> None:
        self.transport = transport
        self.count = count
        self.hold = hold  # then wait for the end of the call, as a live pacer does
        self.frames: list[EgressFrame] = []

    async def run(self, ctx: CallContext, inbox: Inbox, outbox: Outbox) -> None:
        if not await self.transport.wait_connected():
            return
        pcm = tone(440, 0.02 * self.count, 48000)
        size = 960 * 2
        for i in range(self.count):
            frame = EgressFrame(pcm[i * size : (i + 1) * size], 48000, 1, None, False, i)
            self.frames.append(frame)
            await outbox.send(frame)
        if self.hold:
            await anyio.sleep_forever()


async def run_call(
    transport: GetStreamTransport,
    media: MediaDouble,
    *,
    inbound: list[RemoteAudio] = (),  # type: ignore[assignment]
    frames: int = 0,
    events: list[dict[str, Any]] = (),  # type: ignore[assignment]
    stop: bool = False,
) -> tuple[CallResult, list[AudioChunk], Frames, CallContext]:
    """One call: the ingress into a sink, a frame source into the egress, events as the
    session would send them, the candidate's audio fed once joined, then the hang-up (or,
    with ``stop``, the end the session makes: the supervisor cancels every stage)."""
    ctx = CallContext(call_id=transport.call_id)
    sink = Collect("vad", types=(AudioChunk,))
    source = Frames(transport, frames, hold=stop)
    graph = Graph()
    graph.chain(transport.ingress(None), sink)
    graph.chain(source, transport.egress())
    for event in events[:1]:  # one before the join: it waits in the queue
        transport.send_event(event)

    supervisor = Supervisor(ctx, graph)

    async def candidate() -> None:
        if not await transport.wait_connected():
            return
        for event in events[1:]:
            transport.send_event(event)
        for audio in inbound:
            media.feed(audio)
        if stop:
            while len(media.sent) < frames:  # noqa: ASYNC110 (the double has no event)
                await anyio.sleep(0.005)
            supervisor.stop("ended")
        else:
            media.hang_up()

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(candidate)
            result = await supervisor.run()
    return result, sink.frames, source, ctx


def candidate_audio(seconds: float, user_id: str = "candidate-1") -> list[RemoteAudio]:
    """20 ms stereo frames of a 440 Hz tone at 48 kHz (what the SFU decodes from Opus)."""
    mono = np.frombuffer(tone(440, seconds, 48000), dtype="<i2")
    stereo = np.repeat(mono, 2).astype("<i2").tobytes()
    size = 960 * 4
    return [
        RemoteAudio(stereo[i : i + size], 48000, 2, user_id, i / size * 0.02)
        for i in range(0, len(stereo), size)
    ]


def test_audio_both_ways_and_live_events_through_a_graph() -> None:
    with FakeStream() as fake:
        media = MediaDouble()
        transport = GetStreamTransport("call-7", options(fake), media=media)
        at_close: list[int] = []
        media.on_close = lambda: at_close.append(len(fake.events))
        echo = candidate_audio(0.2, user_id=AGENT)  # our own voice handed back: ignored
        result, chunks, source, ctx = anyio.run(
            lambda: run_call(
                transport,
                media,
                inbound=echo + candidate_audio(1.0),
                frames=40,
                events=[TRANSCRIPT, PROGRESS, ANSWER],
            )
        )

    assert result.status == "completed", result.reason
    # joined with the REST join's credentials and a user token; no secret in the ticket
    ticket = media.ticket
    assert ticket.credentials.token == fake.sfu_tokens[0]
    assert jwt.decode(ticket.user_token, fake.api_secret, algorithms=["HS256"])["user_id"] == AGENT
    assert (ticket.call_type, ticket.call_id, ticket.user_id) == ("default", "call-7", AGENT)
    assert fake.api_secret not in repr(ticket) and ticket.user_token not in repr(ticket)
    # candidate → VAD: 16 kHz mono, the tone kept, capture times in order on the call clock
    assert {(c.sample_rate, c.channels) for c in chunks} == {(16000, 1)}
    heard = b"".join(c.pcm for c in chunks)
    assert 0.98 <= len(heard) / 2 / 16000 <= 1.0  # the resampler holds back a few samples
    assert abs(dominant_frequency(heard, 16000) - 440) < 10
    starts = [c.capture_time for c in chunks]
    assert starts == sorted(starts) and starts[-1] <= ctx.clock.now()
    assert transport.stats.chunks_in == len(chunks)
    # pacer → call: every frame, in order, at 48 kHz
    assert media.sent == [(f.pcm, 48000) for f in source.frames]
    assert transport.stats.frames_out == 40 and transport.stats.frames_unsent == 0
    # live events: the original shapes, in order, all sent before the agent left the call
    assert fake.custom_events("default:call-7") == [TRANSCRIPT, PROGRESS, ANSWER]
    assert media.closed and at_close == [3]
    assert transport.stats.events_sent == 3


def test_a_stopped_call_still_sends_its_events_and_leaves() -> None:
    """The session ends an interview by stopping the supervisor (every stage cancelled): the
    events queued by then still go out, once and in order, before the agent leaves the call."""
    ended = {"type": "ended", "reason": "completed"}
    with FakeStream() as fake:
        fake.inject("event", Fault(delay_s=0.3))  # the first event is in flight at the stop
        media = MediaDouble()
        transport = GetStreamTransport("call-14", options(fake), media=media)
        at_close: list[int] = []
        media.on_close = lambda: at_close.append(len(fake.events))
        result, *_ = anyio.run(
            lambda: run_call(
                transport, media, frames=3, events=[TRANSCRIPT, PROGRESS, ended], stop=True
            )
        )
    assert result.status == "stopped", result.reason
    # the request in flight at the stop was let finish: every event once, in order
    assert fake.custom_events("default:call-14") == [TRANSCRIPT, PROGRESS, ended]
    assert media.closed and at_close == [3]
    assert (transport.stats.events_sent, transport.stats.events_failed) == (3, 0)


def test_muted_egress_sends_silence() -> None:
    with FakeStream() as fake:
        media = MediaDouble()
        transport = GetStreamTransport("call-8", options(fake), media=media)
        transport.muted = True
        result, _, source, _ = anyio.run(lambda: run_call(transport, media, frames=5))
    assert result.status == "completed", result.reason
    assert any(f.pcm.count(0) < len(f.pcm) for f in source.frames)  # the pacer sent a voice
    assert [pcm for pcm, _ in media.sent] == [bytes(1920)] * 5


# --- failures -----------------------------------------------------------------------------------


def test_auth_failure_fails_the_call_clearly_and_logs_no_secret(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    wrong = "wrong-secret-0000000000000000000000"
    with FakeStream() as fake:
        media = MediaDouble()
        transport = GetStreamTransport("call-9", options(fake, api_secret=wrong), media=media)
        result, chunks, _, _ = anyio.run(lambda: run_call(transport, media, events=[TRANSCRIPT]))

    assert result.status == "failed" and result.failed_stage == "ingress"
    assert isinstance(transport.failure, GetStreamAuthError)
    assert "401" in str(result.error) and "STREAM_API_KEY and STREAM_API_SECRET" in str(
        result.error
    )
    assert "upsert the agent user" in str(result.error)
    assert media.ticket is None and not chunks and not fake.events
    assert [(r.endpoint, r.status) for r in fake.requests] == [("users", 401)]
    sent_token = fake.requests[0].headers["authorization"]
    logged = [
        record.getMessage() + repr(record.__dict__) + caplog.text for record in caplog.records
    ]
    assert logged, "the failure was logged"
    for text in [*logged, str(result.error), str(transport.failure)]:
        assert wrong not in text and fake.api_secret not in text and sent_token not in text


def test_server_errors_and_timeouts_are_reported() -> None:
    with FakeStream() as fake:
        fake.inject("call", Fault(status=500, message="internal"))
        media = MediaDouble()
        transport = GetStreamTransport("call-10", options(fake), media=media)
        result, *_ = anyio.run(lambda: run_call(transport, media))
        assert result.status == "failed"
        failure = transport.failure
        assert isinstance(failure, GetStreamError) and not isinstance(failure, GetStreamAuthError)
        assert failure.status == 500 and "get or create the call" in str(failure)

        fake.inject("join", Fault(delay_s=2.0))
        media = MediaDouble()
        slow = GetStreamTransport("call-11", options(fake, request_timeout_s=0.2), media=media)
        result, *_ = anyio.run(lambda: run_call(slow, media))
        assert result.status == "failed" and media.ticket is None
        assert "join the call" in str(slow.failure) and "timeout" in str(slow.failure)


def test_live_event_failures_and_overflow_do_not_end_the_call() -> None:
    with FakeStream() as fake:
        fake.inject("event", Fault(status=503))
        media = MediaDouble()
        transport = GetStreamTransport("call-12", options(fake, event_queue=2), media=media)
        transport.send_event(TRANSCRIPT)  # pushed out of the full queue by the next two
        with pytest.raises(ValueError, match="type"):
            transport.send_event({"speaker": "agent"})
        result, *_ = anyio.run(
            lambda: run_call(transport, media, events=[PROGRESS, ANSWER], frames=3)
        )
    assert result.status == "completed", result.reason
    stats = transport.stats
    assert (stats.events_dropped, stats.events_failed, stats.events_sent) == (1, 1, 1)
    assert [r.status for r in fake.of("event")] == [503, 201]
    assert fake.custom_events() == [ANSWER]


# --- the native media client, up to the SFU -----------------------------------------------------

NATIVE_CHILD = """
import json, sys, anyio
from pipeline.graph import Graph
from pipeline.stage import CallContext, Collect
from pipeline.supervisor import Supervisor
from stages.getstream import GetStreamOptions, GetStreamTransport

async def main():
    transport = GetStreamTransport("call-13", GetStreamOptions(**json.loads(sys.argv[1])))
    graph = Graph()
    graph.chain(transport.ingress(None), Collect("vad"))
    with anyio.fail_after(30):
        result = await Supervisor(CallContext(call_id="call-13"), graph).run()
    print(json.dumps({"status": result.status, "error": result.error,
                      "failure": type(transport.failure).__name__}))

anyio.run(main)
"""


@pytest.mark.skipif(
    importlib.util.find_spec("getstream_rtc") is None, reason="getstream-rtc is not installed"
)
def test_native_media_joins_through_the_fake_up_to_the_sfu() -> None:
    """Stream's native client (the real media path) joins through the fake's coordinator and
    presents the SFU token at the stub SFU, which has no media: the join fails there. It runs
    in a child process whose HTTPS proxy is the fake's refusing one, because the client also
    asks ``hint.stream-io-video.com`` for the nearest SFU, and nothing may leave the machine."""
    root = Path(__file__).resolve().parents[1]
    with FakeStream() as fake:
        args = {
            "api_key": fake.api_key,
            "api_secret": fake.api_secret,
            "base_url": fake.url,
            "ws_url": fake.ws_url,
        }
        env = dict(
            os.environ,
            HTTPS_PROXY=fake.proxy_url,
            HTTP_PROXY=fake.proxy_url,
            ALL_PROXY=fake.proxy_url,
            NO_PROXY="127.0.0.1,localhost",
            PYTHONPATH=str(root),
        )
        child = subprocess.run(
            [sys.executable, "-c", NATIVE_CHILD, json.dumps(args)],
            env=env,
            cwd=root,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert child.returncode == 0, child.stderr[-3000:]
    outcome = json.loads(child.stdout.strip().splitlines()[-1])
    assert outcome["status"] == "failed" and outcome["failure"] == "GetStreamError"
    assert "native client" in outcome["error"] and "default:call-13" in outcome["error"]
    assert fake.api_secret not in child.stdout + child.stderr
    # REST through the SDK first, then the native client's own coordinator join
    endpoints = [r.endpoint for r in fake.requests]
    assert endpoints[:3] == ["users", "call", "coordinator"] and "join" in endpoints
    coordinator = fake.of("coordinator")[0]
    assert coordinator.claims is not None and coordinator.claims["user_id"] == AGENT
    token = coordinator.body["token"]
    assert token not in child.stdout + child.stderr  # native logs stay at INFO and above
    join = fake.of("join")[0]
    assert join.status == 201 and join.headers["authorization"] == token
    assert join.query["connection_id"] and join.query["api_key"] == fake.api_key
    # the SFU got the token the join issued, in its first (protobuf) message
    sfu = fake.of("sfu")[0]
    assert sfu.query["cid"] == "default:call-13"
    assert isinstance(sfu.body, bytes) and fake.sfu_tokens[0].encode() in sfu.body
    assert all(line.startswith("CONNECT ") for line in fake.proxied)  # refused, not sent out
