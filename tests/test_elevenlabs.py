"""ElevenLabs voice: the SDK's HTTP path and our websocket client against the local fake.

Transport tests on the real clock (the fake is a real server in a thread). The pure alignment
logic gets property tests. :func:`voice_options` and :func:`run_voice` are meant for reuse
(whole-interview tests).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx
import pytest
from fakes.elevenlabs import FakeElevenLabs, WsFault, wait_for
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.frames import AgentAudio, AgentTextDelta
from pipeline.graph import Graph
from pipeline.stage import CallContext, Inbox, Outbox
from pipeline.supervisor import CallResult, Supervisor
from stages.elevenlabs import (
    AlignmentTracker,
    ElevenLabsAuthError,
    ElevenLabsError,
    ElevenLabsOptions,
    ElevenLabsVoice,
)
from stages.pacer import Pacer, PacerOptions
from stages.voice import PhraseChunker

REPLY = (
    "Thanks, Ada. That is a helpful overview of your background. "
    "Could you walk me through a data pipeline you designed end to end?"
)

# --- helpers (reusable) --------------------------------------------------------------------------


def voice_options(fake: FakeElevenLabs, **overrides: Any) -> ElevenLabsOptions:
    """Options pointing at ``fake`` (its key and base URL), plus overrides."""
    values: dict[str, Any] = {"api_key": fake.api_key, "base_url": fake.url}
    values.update(overrides)
    return ElevenLabsOptions(**values)


def deltas(epoch: int, text: str, turn_id: int | None = 1) -> list[AgentTextDelta]:
    """``text`` as the brain streams it: a delta per word, then the final one."""
    words = [w + " " for w in text.split()]
    return [AgentTextDelta(epoch, w, turn_id) for w in words] + [
        AgentTextDelta(epoch, "", turn_id, final=True)
    ]


@dataclass
class Sink:
    """Records every frame with the control lane's epoch at the moment it arrived."""

    name: str = "sink"
    frames: list[tuple[Any, int]] = field(default_factory=list)

    async def run(self, ctx: CallContext, inbox: Inbox, outbox: Outbox) -> None:
        async for frame in inbox:
            self.frames.append((frame, ctx.control.epoch))

    def audio(self, epoch: int | None = None) -> list[AgentAudio]:
        return [
            f
            for f, _ in self.frames
            if isinstance(f, AgentAudio) and (epoch is None or f.epoch == epoch)
        ]

    def finished(self, epoch: int) -> bool:
        return any(f.final for f in self.audio(epoch))


Driver = Callable[[CallContext, Any, "Sink"], Awaitable[None]]


@dataclass
class VoiceRun:
    ctx: CallContext
    voice: ElevenLabsVoice
    sink: Sink
    result: CallResult


class _Feed:
    name = "feed"

    def __init__(self, driver: Driver, sink: Sink) -> None:
        self.driver, self.sink = driver, sink

    async def run(self, ctx: CallContext, inbox: Inbox, outbox: Outbox) -> None:
        await self.driver(ctx, outbox, self.sink)


def run_voice(
    options: ElevenLabsOptions, driver: Driver, *, extra: list[Any] | None = None
) -> VoiceRun:
    """Run ``feed → ElevenLabsVoice → (extra stages) → sink`` under a supervisor until the
    driver returns and everything downstream has drained."""
    ctx = CallContext()
    voice = ElevenLabsVoice(options)
    sink = Sink()
    graph = Graph().chain(_Feed(driver, sink), voice, *(extra or []), sink)

    async def main() -> CallResult:
        with anyio.fail_after(20):
            return await Supervisor(ctx, graph).run()

    result = anyio.run(main)
    return VoiceRun(ctx, voice, sink, result)


def words(frames: list[AgentAudio]) -> list[str]:
    return " ".join(f.text for f in frames if f.text).split()


# --- AlignmentTracker ----------------------------------------------------------------------------

word_st = st.text(alphabet="abcXYZé3',.?!-", min_size=1, max_size=8)
phrase_st = st.lists(word_st, min_size=1, max_size=6).map(" ".join)


@settings(max_examples=300, deadline=None)
@given(
    phrases=st.lists(phrase_st, min_size=1, max_size=5),
    cuts=st.lists(st.integers(0, 200), max_size=20),
    drop_spaces=st.booleans(),
)
def test_alignment_hands_out_whole_words_in_order(
    phrases: list[str], cuts: list[int], drop_spaces: bool
) -> None:
    tracker = AlignmentTracker()
    sent = "".join(tracker.sent(p) for p in phrases)
    chars = [c for c in sent if not (drop_spaces and c == " ")]
    bounds = sorted({0, len(chars), *(c % (len(chars) + 1) for c in cuts)})
    pieces = [tracker.heard(chars[a:b]) for a, b in itertools.pairwise(bounds)]
    # Every character was aligned: all words are out, none split, none repeated.
    assert " ".join(p for p in pieces if p).split() == sent.split()
    assert tracker.rest() == ""


@settings(max_examples=200, deadline=None)
@given(phrases=st.lists(phrase_st, min_size=1, max_size=5), heard=st.integers(0, 300))
def test_resend_starts_at_the_first_word_not_fully_heard(phrases: list[str], heard: int) -> None:
    tracker = AlignmentTracker()
    sent = "".join(tracker.sent(p) for p in phrases)
    given_out = tracker.heard(list(sent[: heard % (len(sent) + 1)]))
    again = tracker.resend()
    assert (given_out + " " + again).split() == sent.split()
    assert tracker.given_text.split() == given_out.split()
    # The resent text is then aligned afresh and handed out exactly once.
    assert (given_out + " " + tracker.heard(list(again)) + " " + tracker.rest()).split() == (
        sent.split()
    )


def test_alignment_waits_for_the_end_of_a_word_cut_between_chunks() -> None:
    tracker = AlignmentTracker()
    tracker.sent("Hello there, Ada.")
    assert tracker.heard(list("Hello th")) == "Hello"
    assert tracker.heard(list("ere, A")) == "there,"
    assert tracker.heard(list("da.")) == "Ada."
    assert tracker.rest() == ""


# --- options -------------------------------------------------------------------------------------


def test_options_derive_the_websocket_address_and_name_bad_fields() -> None:
    opts = ElevenLabsOptions(api_key="sk-secret-123", base_url="https://api.elevenlabs.io/")
    assert opts.websocket_url.startswith(
        "wss://api.elevenlabs.io/v1/text-to-speech/21m00Tcm4TlvDq8ikWAM/multi-stream-input?"
    )
    assert "model_id=eleven_flash_v2_5" in opts.websocket_url
    assert "output_format=pcm_24000" in opts.websocket_url
    local = ElevenLabsOptions(api_key="k", base_url="http://127.0.0.1:9/proxy")
    assert local.websocket_url.startswith("ws://127.0.0.1:9/proxy/v1/text-to-speech/")
    assert "sk-secret-123" not in repr(opts)
    cases: dict[str, dict[str, Any]] = {
        "api_key": {"api_key": " "},
        "base_url": {"base_url": "ftp://x"},
        "sample_rate": {"sample_rate": 12345},
        "keepalive_interval_s": {"keepalive_interval_s": 90.0},
    }
    for name, bad in cases.items():
        with pytest.raises(ValueError, match=f"ElevenLabsOptions.{name}"):
            ElevenLabsOptions(**{"api_key": "k", **bad})
    with pytest.raises(ValueError, match="without /v1"):
        ElevenLabsOptions(api_key="k", base_url="https://api.elevenlabs.io/v1")


# --- the SDK's HTTP path -------------------------------------------------------------------------


def test_sdk_streams_pcm_from_the_fake_and_raises_on_a_bad_key() -> None:
    from elevenlabs import AsyncElevenLabs
    from elevenlabs.core.api_error import ApiError

    with FakeElevenLabs(ms_per_char=10) as fake:

        async def main() -> tuple[bytes, int]:
            async with httpx.AsyncClient() as http:
                client = AsyncElevenLabs(api_key=fake.api_key, base_url=fake.url, httpx_client=http)
                audio = b""
                async for chunk in client.text_to_speech.stream(
                    "voice-1",
                    text="Hello there.",
                    model_id="eleven_flash_v2_5",
                    output_format="pcm_16000",
                ):
                    audio += chunk
                wrong = AsyncElevenLabs(api_key="wrong", base_url=fake.url, httpx_client=http)
                with pytest.raises(ApiError) as err:
                    async for _ in wrong.text_to_speech.stream("voice-1", text="Hi."):
                        pass
            return audio, err.value.status_code or 0

        audio, status = anyio.run(main)
    assert status == 401
    assert len(audio) == len("Hello there.") * 10 * 16000 // 1000 * 2
    req = fake.http_requests[0]
    assert req.path == "/v1/text-to-speech/voice-1/stream"
    assert req.query["output_format"] == "pcm_16000"
    assert req.headers["xi-api-key"] == fake.api_key
    assert req.json["text"] == "Hello there." and req.json["model_id"] == "eleven_flash_v2_5"


# --- the websocket voice -------------------------------------------------------------------------


def test_reply_is_streamed_on_one_context_with_marks_usage_and_attribution() -> None:
    async def driver(ctx: CallContext, send: Any, sink: Sink) -> None:
        ctx.control.next_epoch()
        for delta in deltas(1, REPLY, turn_id=7):
            await send.send(delta)

    with FakeElevenLabs(first_byte_delay_s=0.05) as fake:
        run = run_voice(voice_options(fake), driver)
    assert run.result.status == "completed", run.result.reason
    (conn,) = fake.connections
    assert conn.key_ok and conn.headers["xi-api-key"] == fake.api_key
    assert conn.query == {
        "model_id": "eleven_flash_v2_5",
        "output_format": "pcm_24000",
        "inactivity_timeout": "60",
    }
    chunker = PhraseChunker()
    phrases = chunker.feed(REPLY) + chunker.flush()
    context = conn.messages[0]["context_id"]
    on_context = [m for m in conn.messages if m.get("context_id") == context]
    assert on_context[0] == {"text": " ", "context_id": context}  # initialized first
    texts = [m for m in on_context[1:] if m.get("text")]
    assert [m["text"] for m in texts] == [p + " " for p in phrases]
    assert all(m.get("flush") and m.get("try_trigger_generation") for m in texts)
    assert on_context[-2:] == [
        {"text": "", "context_id": context, "flush": True},
        {"context_id": context, "close_context": True},
    ]
    assert fake.connections[0].contexts[context].final_sent
    audio = run.sink.audio(1)
    assert all(f.sample_rate == 24000 and f.turn_id == 7 and f.epoch == 1 for f in audio)
    assert sum(f.final for f in audio) == 1 and audio[-1].final and audio[-1].pcm == b""
    assert words(audio) == REPLY.split()  # alignment → whole words, in order, once each
    per_char = 40 * 24000 // 1000 * 2
    assert sum(len(f.pcm) for f in audio) == sum(len(p) + 1 for p in phrases) * per_char
    record = run.ctx.timeline.get(7)
    assert record is not None
    ttfb = record.figures()["tts_ttfb_ms"]
    assert ttfb is not None and ttfb >= 50  # the fake's first-byte delay is inside it
    assert run.ctx.usage.tts_characters == sum(len(p) for p in phrases)


def test_replies_share_one_socket_and_take_a_context_each() -> None:
    async def driver(ctx: CallContext, send: Any, sink: Sink) -> None:
        for epoch, text in ((1, "Hello Ada, welcome."), (2, "Tell me about yourself.")):
            ctx.control.next_epoch()
            for delta in deltas(epoch, text, turn_id=epoch):
                await send.send(delta)
            await wait_for(functools.partial(sink.finished, epoch))

    with FakeElevenLabs() as fake:
        run = run_voice(voice_options(fake), driver)
    (conn,) = fake.connections
    used = [cid for cid, c in conn.contexts.items() if c.generated]
    assert len(used) == 2 and all(conn.contexts[c].closed for c in used)
    assert words(run.sink.audio(1)) == "Hello Ada, welcome.".split()
    assert words(run.sink.audio(2)) == "Tell me about yourself.".split()
    assert run.voice.stats.connects == 1 and run.voice.stats.drops == 0


def test_interrupt_closes_the_context_and_drops_late_audio() -> None:
    long_reply = "Let me explain, " + "this is a rather long answer that keeps going. " * 4

    async def driver(ctx: CallContext, send: Any, sink: Sink) -> None:
        ctx.control.next_epoch()
        for delta in deltas(1, long_reply):
            await send.send(delta)
        await wait_for(lambda: len(sink.audio(1)) >= 2)
        ctx.control.interrupt()  # barge-in: epoch 2
        for delta in deltas(2, "Sorry, go ahead."):
            await send.send(delta)
        await wait_for(lambda: sink.finished(2))

    with FakeElevenLabs(chunk_delay_s=0.03) as fake:
        run = run_voice(voice_options(fake), driver)
    (conn,) = fake.connections
    first, second = (c for c in conn.contexts.values() if c.generated)
    assert first.closed and second.closed
    assert first.audio_after_close > 0  # the server kept generating what was flushed...
    assert run.voice.stats.late_audio_dropped > 0  # ...and the client dropped it
    assert run.voice.stats.contexts_abandoned == 1
    # No audio of the cut reply arrived after the interrupt, and it has no final frame.
    assert all(lane == 1 for f, lane in run.sink.frames if getattr(f, "epoch", None) == 1)
    assert not run.sink.finished(1)
    assert words(run.sink.audio(2)) == "Sorry, go ahead.".split()
    assert "".join(second.texts).split() == "Sorry, go ahead.".split()


def test_rapid_barge_ins_never_leave_the_voice_stuck_at_the_context_limit() -> None:
    long_reply = "Let me explain, " + "this answer goes on and on for quite a while. " * 3

    async def driver(ctx: CallContext, send: Any, sink: Sink) -> None:
        for _ in range(7):  # each reply is cut as soon as it is heard
            epoch = ctx.control.next_epoch()
            for delta in deltas(epoch, long_reply):
                await send.send(delta)
            await wait_for(lambda e=epoch: bool(sink.audio(e)))  # type: ignore[misc]
            ctx.control.interrupt()
        epoch = ctx.control.next_epoch()
        for delta in deltas(epoch, "Sorry, go ahead."):
            await send.send(delta)
        await wait_for(lambda: sink.finished(epoch))

    with FakeElevenLabs(chunk_delay_s=0.05) as fake:
        run = run_voice(voice_options(fake), driver)
    assert run.result.status == "completed", run.result.reason
    last = max(f.epoch for f in run.sink.audio())
    assert words(run.sink.audio(last)) == "Sorry, go ahead.".split()
    # The server lets a closed context finish what was flushed, so seven cut replies in a row
    # may pass its limit of five; then it closes the socket, which is reopened at once.
    assert {c.closed_by for c in fake.connections} <= {"client", "limit"}
    assert run.voice.stats.drops == len(fake.connections) - 1


def test_heard_text_from_alignment_reaches_the_pacer_report() -> None:
    pacer = Pacer(PacerOptions(emit_silence=False, jitter_buffer_ms=0))

    async def driver(ctx: CallContext, send: Any, sink: Sink) -> None:
        ctx.control.next_epoch()
        for delta in deltas(1, REPLY):
            await send.send(delta)
        await wait_for(lambda: pacer.played(1).seconds_played >= 1.0)
        ctx.control.interrupt()

    with FakeElevenLabs(ms_per_char=60) as fake:
        run_voice(voice_options(fake), driver, extra=[pacer])
    report = pacer.played(1)
    heard = report.text_played.split()
    assert not report.completed
    assert 0 < len(heard) < len(REPLY.split())
    assert heard == REPLY.split()[: len(heard)]  # whole words, the start of the reply


def test_dropped_socket_is_reopened_and_the_reply_resent_from_the_first_unheard_word() -> None:
    async def driver(ctx: CallContext, send: Any, sink: Sink) -> None:
        ctx.control.next_epoch()
        for delta in deltas(1, REPLY):
            await send.send(delta)

    with FakeElevenLabs(ws_faults=[WsFault(drop_after_audio=4)], chunk_delay_s=0.01) as fake:
        run = run_voice(voice_options(fake), driver)
    assert run.result.status == "completed", run.result.reason
    assert fake.connections[0].closed_by == "fault"
    assert len(fake.connections) == 2
    stats = run.voice.stats
    assert stats.drops == 1 and stats.resends == 1 and stats.http_replies == 0
    audio = run.sink.audio(1)
    assert words(audio) == REPLY.split()  # every word reported heard exactly once
    assert audio[-1].final
    second = fake.connections[1]
    resent = next(m["text"] for m in second.messages if m.get("text", "").strip()).split()
    sent_first = "".join(t for c in fake.connections[0].contexts.values() for t in c.texts)
    # The resend is what the candidate had not fully heard: the tail of what was sent.
    assert 0 < len(resent) < len(sent_first.split())
    assert sent_first.split()[-len(resent) :] == resent


def test_socket_dropped_from_outside_mid_reply_is_reopened() -> None:
    async def driver(ctx: CallContext, send: Any, sink: Sink) -> None:
        ctx.control.next_epoch()
        for delta in deltas(1, REPLY):
            await send.send(delta)
        await wait_for(lambda: len(sink.audio(1)) >= 2)
        fake.drop_all()

    with FakeElevenLabs(chunk_delay_s=0.02) as fake:
        run = run_voice(voice_options(fake), driver)
    assert [c.closed_by for c in fake.connections] == ["fault", "client"]
    assert words(run.sink.audio(1)) == REPLY.split() and run.sink.finished(1)


def test_http_fallback_when_the_websocket_is_refused() -> None:
    async def driver(ctx: CallContext, send: Any, sink: Sink) -> None:
        ctx.control.next_epoch()
        for delta in deltas(1, REPLY, turn_id=2):
            await send.send(delta)

    faults = [WsFault(refuse=503)] * 5
    with FakeElevenLabs(ws_faults=list(faults)) as fake:
        opts = voice_options(fake, reconnect_backoff_s=5.0, reconnect_backoff_max_s=5.0)
        run = run_voice(opts, driver)
    assert run.result.status == "completed", run.result.reason
    assert fake.connections[0].closed_by == "refused"
    chunker = PhraseChunker()
    phrases = chunker.feed(REPLY) + chunker.flush()
    assert [r.json["text"] for r in fake.http_requests] == phrases
    for req in fake.http_requests:
        assert req.path.endswith("/stream") and req.query["output_format"] == "pcm_24000"
        assert req.json["model_id"] == "eleven_flash_v2_5" and req.status == 200
    assert fake.http_requests[1].json["previous_text"] == phrases[0]  # prosody continuity
    audio = run.sink.audio(1)
    assert [f.text for f in audio if f.text] == phrases  # a phrase's text on its first chunk
    assert audio[-1].final and run.voice.stats.http_replies == 1
    record = run.ctx.timeline.get(2)
    assert record is not None and {"voice_request", "first_audio"} <= set(record.marks)


@pytest.mark.parametrize("mode", ["close", "http401", "sdk"])
def test_a_bad_key_fails_with_a_clear_error_that_hides_the_key(mode: str) -> None:
    secret = "wrong-secret-key-123"

    async def driver(ctx: CallContext, send: Any, sink: Sink) -> None:
        ctx.control.next_epoch()
        for delta in deltas(1, "Hello there."):
            await send.send(delta)
        await anyio.sleep_forever()  # the voice must fail on its own

    with FakeElevenLabs(bad_key_http=mode == "http401") as fake:
        opts = voice_options(fake, api_key=secret, websocket=mode != "sdk")
        run = run_voice(opts, driver)
    assert run.result.status == "failed"
    assert run.result.failed_stage == "voice"
    assert run.result.error is not None
    assert "ElevenLabsAuthError" in run.result.error and "ELEVENLABS_API_KEY" in run.result.error
    assert secret not in run.result.error
    assert issubclass(ElevenLabsAuthError, ElevenLabsError)


def test_http_error_status_fails_the_stage_with_the_status() -> None:
    async def driver(ctx: CallContext, send: Any, sink: Sink) -> None:
        ctx.control.next_epoch()
        for delta in deltas(1, "Hello there."):
            await send.send(delta)
        await anyio.sleep_forever()

    with FakeElevenLabs(http_faults=[500]) as fake:
        run = run_voice(voice_options(fake, websocket=False), driver)
    assert run.result.status == "failed" and run.result.error is not None
    assert "HTTP 500" in run.result.error


def test_keepalive_keeps_an_idle_socket_open_between_replies() -> None:
    async def driver(ctx: CallContext, send: Any, sink: Sink) -> None:
        ctx.control.next_epoch()
        for delta in deltas(1, "Hello Ada."):
            await send.send(delta)
        await wait_for(lambda: sink.finished(1))
        await anyio.sleep(1.6)  # the candidate answers for longer than the inactivity timeout
        ctx.control.next_epoch()
        for delta in deltas(2, "Thank you."):
            await send.send(delta)

    with FakeElevenLabs() as fake:
        opts = voice_options(fake, inactivity_timeout_s=1, keepalive_interval_s=0.2)
        run = run_voice(opts, driver)
    assert len(fake.connections) == 1 and fake.connections[0].closed_by != "inactivity"
    assert words(run.sink.audio(2)) == ["Thank", "you."]


def test_the_fake_closes_an_idle_socket_without_keepalive() -> None:
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed

    with FakeElevenLabs() as fake:
        url = voice_options(fake, inactivity_timeout_s=1, keepalive_interval_s=0.5).websocket_url

        async def main() -> None:
            async with connect(url, additional_headers={"xi-api-key": fake.api_key}) as ws:
                await ws.send('{"text": " ", "context_id": "a"}')
                with anyio.fail_after(5), contextlib.suppress(ConnectionClosed):
                    async for _ in ws:
                        pass

        anyio.run(main)
    assert fake.connections[0].closed_by == "inactivity"
    assert fake.connections[0].close_code == 1008
