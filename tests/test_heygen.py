"""LiveAvatar LITE: the avatar stage against the local fake, under the supervisor's DEGRADE.

Transport tests on the real clock. :func:`avatar_options` and :func:`run_avatar` are meant for
reuse (whole-interview tests).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import pytest
from fakes.elevenlabs import pcm_tone, wait_for
from fakes.liveavatar import LIVEKIT_URL, FakeLiveAvatar

from pipeline.frames import AgentAudio
from pipeline.graph import Graph
from pipeline.stage import CallContext, Collect, Inbox, Outbox, PassThrough
from pipeline.supervisor import DEGRADE, CallResult, Supervisor
from stages.heygen import (
    AVATAR_RATE,
    AvatarAuthError,
    AvatarError,
    AvatarOptions,
    AvatarStage,
    MuteWhileAvatarLive,
)
from stages.pacer import EgressFrame

# --- helpers (reusable) --------------------------------------------------------------------------


def avatar_options(fake: FakeLiveAvatar, **overrides: Any) -> AvatarOptions:
    """Options pointing at ``fake``, plus overrides."""
    values: dict[str, Any] = {
        "api_key": fake.api_key,
        "avatar_id": "00000000-0000-4000-8000-000000000001",
        "base_url": fake.url,
    }
    values.update(overrides)
    return AvatarOptions(**values)


States = list[tuple[bool, str]]
Driver = Callable[[CallContext, Any, States], Awaitable[None]]
"""``driver(ctx, outbox, states)``: sends the voice's frames; ``states`` fills with the
avatar's ``on_state`` calls as they happen."""


@dataclass
class AvatarRun:
    ctx: CallContext
    avatar: AvatarStage
    sink: Collect
    result: CallResult
    states: list[tuple[bool, str]] = field(default_factory=list)


class _Feed:
    name = "feed"

    def __init__(self, driver: Driver, states: States) -> None:
        self.driver, self.states = driver, states

    async def run(self, ctx: CallContext, inbox: Inbox, outbox: Outbox) -> None:
        await self.driver(ctx, outbox, self.states)


def run_avatar(
    options: AvatarOptions,
    driver: Driver,
    *,
    start_first: bool = False,
    states: list[tuple[bool, str]] | None = None,
) -> AvatarRun:
    """``feed → voice (a pass-through) → sink`` with the avatar tapped on the voice, run under
    a supervisor with ``{"avatar": DEGRADE}`` as the interview session does. ``states``
    collects the ``on_state`` calls as they happen (for drivers that wait on them)."""
    states = [] if states is None else states
    avatar = AvatarStage(options, on_state=lambda live, why: states.append((live, why)))
    ctx = CallContext()
    sink = Collect("sink")
    graph = Graph().chain(_Feed(driver, states), PassThrough("voice"), sink)
    graph.tap("voice", avatar, capacity=256)

    async def main() -> CallResult:
        with anyio.fail_after(20):
            if start_first:
                await avatar.start()
            return await Supervisor(ctx, graph, policies={"avatar": DEGRADE}).run()

    result = anyio.run(main)
    return AvatarRun(ctx, avatar, sink, result, states)


def reply(epoch: int, seconds: float, rate: int = 16000, chunk_s: float = 0.25) -> list[AgentAudio]:
    """A reply's audio as the voice emits it: chunks, then the closing final frame."""
    n = round(seconds / chunk_s)
    return [AgentAudio(epoch, pcm_tone(chunk_s, rate), rate, epoch) for _ in range(n)] + [
        AgentAudio(epoch, b"", rate, epoch, final=True)
    ]


async def until_live(states: States) -> None:
    """Wait until the avatar is live (as an interview might before its greeting)."""
    await wait_for(lambda: bool(states) and states[-1][0])


async def until_failed(states: States) -> None:
    await wait_for(lambda: bool(states) and not states[-1][0])


def speaks_of(fake: FakeLiveAvatar, event_id: str) -> list[int]:
    return [
        e.audio_bytes
        for e in fake.events
        if e.kind == "agent.speak" and e.body.get("event_id") == event_id
    ]


# --- tests ---------------------------------------------------------------------------------------


def test_session_sequence_from_token_to_stop() -> None:
    async def driver(ctx: CallContext, send: Any, states: States) -> None:
        await until_live(states)
        for frame in reply(1, 2.5):
            await send.send(frame)
        await anyio.sleep(0.6)  # longer than the fake's idle timeout: keep-alives hold it
        for frame in reply(2, 1.0, rate=48000):
            await send.send(frame)

    with FakeLiveAvatar(idle_timeout_s=0.3) as fake:
        run = run_avatar(avatar_options(fake, keepalive_interval_s=0.1, quality="high"), driver)
    assert run.result.status == "completed" and run.result.degraded == []
    assert run.states == [(True, "connected")] and not run.avatar.live
    kinds = fake.kinds()
    assert kinds[:2] == ["token", "start"] and kinds[-1] == "stop"
    token, start, stop = fake.events[0], fake.events[1], fake.events[-1]
    assert token.headers["x-api-key"] == fake.api_key
    assert token.body == {
        "mode": "LITE",
        "avatar_id": "00000000-0000-4000-8000-000000000001",
        "is_sandbox": False,
        "video_settings": {"quality": "high", "encoding": "VP8"},
    }
    (session,) = fake.sessions.values()
    assert start.headers["authorization"] == f"Bearer {session.token}"
    assert stop.body == {"session_id": session.id, "reason": "USER_CLOSED"}
    assert session.stopped and session.closed_by == "client"  # never closed for idleness
    assert session.keepalives >= 1
    assert "session.keep_alive" in kinds[kinds.index("agent.speak_end") :]
    # One speaking event per reply: its audio, at 24 kHz, then speak_end with the same id.
    assert len(session.speak_ends) == 2 and len(set(session.speak_ends)) == 2
    for event_id, seconds in zip(session.speak_ends, (2.5, 1.0), strict=True):
        sizes = speaks_of(fake, event_id)
        assert all(0 < s <= AVATAR_RATE * 2 for s in sizes)  # at most ~1 s per message
        assert sum(sizes) == pytest.approx(seconds * AVATAR_RATE * 2, abs=64)
        ends = [
            i
            for i, e in enumerate(fake.events)
            if e.body == {"type": "agent.speak_end", "event_id": event_id}
        ]
        speaks = [
            i
            for i, e in enumerate(fake.events)
            if e.kind == "agent.speak" and e.body.get("event_id") == event_id
        ]
        assert ends and max(speaks) < ends[0]
    assert len(run.sink.frames) == len(reply(1, 2.5)) + len(reply(2, 1.0))


def test_start_before_the_graph_gives_the_client_its_address() -> None:
    async def main(fake: FakeLiveAvatar) -> tuple[dict[str, str], str]:
        avatar = AvatarStage(avatar_options(fake))
        session = await avatar.start()
        again = await avatar.start()
        assert again is session
        await avatar.stop()
        await avatar.stop()
        return session.client_info(), repr(session)

    with FakeLiveAvatar() as fake:
        info, text = anyio.run(main, fake)
    (session,) = fake.sessions.values()
    assert info == {
        "sessionId": session.id,
        "livekitUrl": LIVEKIT_URL,
        "token": f"client-{session.id}",
    }
    assert f"client-{session.id}" not in text  # tokens stay out of logs
    assert fake.kinds() == ["token", "start", "stop"]


def test_barge_in_interrupts_the_avatar_and_drops_the_cut_reply() -> None:
    async def driver(ctx: CallContext, send: Any, states: States) -> None:
        await until_live(states)
        ctx.control.next_epoch()
        for frame in reply(1, 3.0)[:-1]:  # reply 1 never finishes
            await send.send(frame)
            await anyio.sleep(0.01)
            if len(fake.kinds()) >= 6:  # a few agent.speak are out
                break
        ctx.control.interrupt()
        for frame in reply(1, 1.0):  # the voice was still sending: stale now
            await send.send(frame)
        for frame in reply(2, 1.0):
            await send.send(frame)

    with FakeLiveAvatar() as fake:
        run = run_avatar(avatar_options(fake), driver, start_first=True)
    assert run.result.status == "completed" and run.result.degraded == []
    (session,) = fake.sessions.values()
    assert session.interrupts == 1
    kinds = fake.kinds()
    cut = kinds.index("agent.interrupt")
    first_id = fake.events[2].body["event_id"]
    # Nothing of the cut reply after the interrupt, and no speak_end for it.
    after = [e for e in fake.events[cut:] if e.kind == "agent.speak"]
    assert after and all(e.body["event_id"] != first_id for e in after)
    assert first_id not in session.speak_ends and len(session.speak_ends) == 1
    assert sum(speaks_of(fake, session.speak_ends[0])) == pytest.approx(AVATAR_RATE * 2, abs=64)


@pytest.mark.parametrize("fault", ["start", "token", "bad key", "socket"])
def test_avatar_refused_at_start_degrades_and_the_call_goes_on(fault: str) -> None:
    frames = reply(1, 1.0)

    async def driver(ctx: CallContext, send: Any, states: States) -> None:
        for frame in frames:
            await send.send(frame)
        await until_failed(states)  # the interview lasts longer than the avatar's start

    faults: dict[str, Any] = {
        "start": {"refuse_start": 503},
        "token": {"refuse_token": 500},
        "socket": {"refuse_ws": 403},
        "bad key": {},
    }[fault]
    key = "wrong-heygen-secret" if fault == "bad key" else None
    with FakeLiveAvatar(**faults) as fake:
        opts = avatar_options(fake, **({"api_key": key} if key else {}))
        run = run_avatar(opts, driver)
    assert run.result.status == "completed"
    assert run.result.degraded == ["avatar"]
    assert run.sink.frames == frames  # the audio path never noticed
    (failure,) = run.result.failures
    assert run.states == [(False, "failed: " + failure.error.split(": ", 1)[1])]
    expected = {"start": "HTTP 503", "token": "HTTP 500", "socket": "websocket", "bad key": "401"}
    assert expected[fault] in failure.error
    if fault == "bad key":
        assert failure.error_type == "AvatarAuthError" and "HEYGEN_API_KEY" in failure.error
        assert "wrong-heygen-secret" not in failure.error
    if fault == "socket":
        assert fake.kinds()[-1] == "stop"  # a started session is always stopped


def test_avatar_dying_mid_reply_degrades_within_that_reply() -> None:
    frames = reply(1, 4.0)

    async def driver(ctx: CallContext, send: Any, states: States) -> None:
        await until_live(states)
        for frame in frames[:-1]:
            await send.send(frame)
            await anyio.sleep(0.01)
        # The reply is not over yet, and the session already knows the avatar is gone.
        await until_failed(states)
        await send.send(frames[-1])
        for frame in reply(2, 0.5):
            await send.send(frame)

    with FakeLiveAvatar(die_after_speaks=2) as fake:
        run = run_avatar(avatar_options(fake, chunk_ms=250), driver)
    assert run.result.status == "completed" and run.result.degraded == ["avatar"]
    assert run.states[0] == (True, "connected")
    live, why = run.states[-1]
    assert not live and "closed mid-interview" in why
    assert not run.avatar.live and run.avatar.failure is not None
    assert len(run.sink.frames) == len(frames) + len(reply(2, 0.5))  # audio-only goes on
    (session,) = fake.sessions.values()
    assert session.closed_by == "died" and session.stopped  # stop was still sent


def test_a_slow_avatar_never_holds_the_voice_and_goes_live_between_replies() -> None:
    first, second = reply(1, 3.0), reply(2, 1.0)
    sink = Collect("sink")
    states: States = []

    async def driver(ctx: CallContext, send: Any, states: States) -> None:
        for frame in first[:-1]:
            await send.send(frame)
        # Every frame got past the tap (whose inbox holds 4) while the avatar was connecting.
        await wait_for(lambda: len(sink.frames) == len(first) - 1)
        assert not any(s.connected for s in fake.sessions.values())
        await wait_for(lambda: any(s.connected for s in fake.sessions.values()))
        await anyio.sleep(0.05)
        assert not states  # connected mid-reply: not live yet
        await send.send(first[-1])
        for frame in second:
            await send.send(frame)

    with FakeLiveAvatar(connect_delay_s=0.5) as fake:
        avatar = AvatarStage(avatar_options(fake), on_state=lambda *s: states.append(s))
        graph = Graph().chain(_Feed(driver, states), PassThrough("voice"), sink)
        graph.tap("voice", avatar, capacity=4)

        async def main() -> CallResult:
            with anyio.fail_after(20):
                return await Supervisor(CallContext(), graph, policies={"avatar": DEGRADE}).run()

        result = anyio.run(main)
    assert result.status == "completed" and result.degraded == [], result.reason
    assert sink.frames == first + second
    assert states == [(True, "connected")]
    (session,) = fake.sessions.values()
    # The reply half spoken when the avatar connected stayed the agent's own; the next one
    # was the avatar's, whole.
    assert len(session.speak_ends) == 1
    assert sum(speaks_of(fake, session.speak_ends[0])) == pytest.approx(AVATAR_RATE * 2, abs=64)


def test_agent_audio_is_muted_only_while_the_avatar_is_live() -> None:
    avatar = AvatarStage(AvatarOptions(api_key="k", avatar_id="a"))
    mute = MuteWhileAvatarLive(avatar)
    loud = pcm_tone(0.02, 48000)
    frames = [EgressFrame(loud, 48000, 1, 1, False, i) for i in range(4)]
    out: list[EgressFrame] = []

    class Out:
        async def send(self, frame: Any) -> None:
            out.append(frame)

    class In:
        def __init__(self) -> None:
            self.items = list(frames)

        def __aiter__(self) -> In:
            return self

        async def __anext__(self) -> Any:
            if not self.items:
                raise StopAsyncIteration
            avatar.live = len(self.items) > 2  # live for the first two frames, then failed
            return self.items.pop(0)

        async def receive(self) -> Any:
            return await self.__anext__()

    anyio.run(mute.run, CallContext(), In(), Out())
    assert [f.pcm == bytes(len(loud)) for f in out] == [True, True, False, False]
    assert [f.index for f in out] == [0, 1, 2, 3] and mute.muted == 2


def test_options_name_bad_fields_and_read_the_settings() -> None:
    from interview.config import Settings

    settings = Settings(
        heygen_api_key="hg-secret",
        heygen_avatar_id="av-1",
        heygen_video_quality="medium",
        heygen_base_url="http://127.0.0.1:9",
    )
    opts = AvatarOptions.from_settings(settings)
    assert (opts.api_key, opts.avatar_id, opts.quality, opts.root) == (
        "hg-secret",
        "av-1",
        "medium",
        "http://127.0.0.1:9",
    )
    assert "hg-secret" not in repr(opts)
    assert AvatarOptions.from_settings(Settings(heygen_api_key="x")).root == (
        "https://api.liveavatar.com"
    )
    cases: dict[str, dict[str, Any]] = {
        "api_key": {"api_key": ""},
        "avatar_id": {"avatar_id": " "},
        "quality": {"quality": "ultra"},
        "base_url": {"base_url": "https://api.liveavatar.com/v1"},
        "chunk_ms": {"chunk_ms": 5},
    }
    for name, bad in cases.items():
        with pytest.raises(ValueError, match=f"AvatarOptions.{name}"):
            AvatarOptions(**{"api_key": "k", "avatar_id": "a", **bad})
    assert issubclass(AvatarAuthError, AvatarError)


def test_elevenlabs_options_read_the_settings() -> None:
    from interview.config import Settings
    from stages.elevenlabs import ElevenLabsOptions

    settings = Settings(elevenlabs_api_key="el-secret", elevenlabs_base_url="http://127.0.0.1:9")
    opts = ElevenLabsOptions.from_settings(settings)
    assert (opts.api_key, opts.model_id, opts.root) == (
        "el-secret",
        "eleven_flash_v2_5",
        "http://127.0.0.1:9",
    )
    assert opts.websocket_url.startswith("ws://127.0.0.1:9/v1/text-to-speech/")


# --- voice and face together (the session's wiring) ---------------------------------------------


def wire_voice_and_avatar(
    graph: Graph, voice: Any, avatar: AvatarStage, pacer: Any, egress: Any
) -> MuteWhileAvatarLive:
    """The interview session's wiring: the avatar taps the voice's output (never blocking it),
    and the agent's own egress audio is muted while the avatar speaks for it."""
    mute = MuteWhileAvatarLive(avatar)
    graph.chain(voice, pacer, mute, egress)
    graph.tap(voice, avatar, policy="drop_oldest", capacity=512)
    return mute


def test_voice_and_avatar_together_with_a_failure_mid_interview() -> None:
    from fakes.elevenlabs import FakeElevenLabs
    from test_elevenlabs import deltas, voice_options

    from pipeline.frames import AgentTextDelta
    from stages.elevenlabs import ElevenLabsVoice
    from stages.pacer import Pacer, PacerOptions

    first = "Hello Ada, thanks for joining. Let's begin."
    second = "Tell me about a project you are proud of."
    states: States = []
    out: list[EgressFrame] = []

    class Egress:
        name = "egress"

        async def run(self, ctx: CallContext, inbox: Inbox, outbox: Outbox) -> None:
            async for frame in inbox:
                if isinstance(frame, EgressFrame):
                    out.append(frame)

    async def driver(ctx: CallContext, send: Any, states: States) -> None:
        await until_live(states)
        for epoch, text in ((1, first), (2, second)):
            ctx.control.next_epoch()
            for delta in deltas(epoch, text, turn_id=epoch):
                await send.send(delta)
            await wait_for(lambda e=epoch: pacer.played(e).completed)  # type: ignore[misc]
            if epoch == 1:
                heard_live = [f for f in out if f.epoch == 1]
                assert heard_live and all(not any(f.pcm) for f in heard_live)  # muted
                fake_avatar.die_after_speaks = 0  # the next agent.speak kills the session
        await send.send(AgentTextDelta(3, "", final=True))

    with FakeElevenLabs(ms_per_char=10) as fake_voice, FakeLiveAvatar() as fake_avatar:
        voice = ElevenLabsVoice(voice_options(fake_voice))
        avatar = AvatarStage(avatar_options(fake_avatar), on_state=lambda *s: states.append(s))
        pacer = Pacer(PacerOptions(emit_silence=False, jitter_buffer_ms=0))
        graph = Graph()
        feed = graph.add(_Feed(driver, states))
        graph.connect(feed, graph.add(voice))
        mute = wire_voice_and_avatar(graph, voice, avatar, pacer, Egress())

        async def main() -> CallResult:
            with anyio.fail_after(20):
                return await Supervisor(CallContext(), graph, policies={"avatar": DEGRADE}).run()

        result = anyio.run(main)
    assert result.status == "completed" and result.degraded == ["avatar"], result.reason
    assert states[0] == (True, "connected") and not states[-1][0]
    # Reply 1 went to the avatar whole, at 24 kHz, and the agent's own copy was muted.
    (session,) = fake_avatar.sessions.values()
    assert len(session.speak_ends) == 1
    voiced = sum(len(f.pcm) for f in out if f.epoch == 1) / 2 / 48000
    assert sum(speaks_of(fake_avatar, session.speak_ends[0])) / 2 / AVATAR_RATE == pytest.approx(
        voiced, abs=0.03
    )
    assert mute.muted > 0
    # The avatar died at reply 2: from then on the candidate hears the agent itself.
    assert any(any(f.pcm) for f in out if f.epoch == 2)
    assert pacer.played(2).text_played.split() == second.split()
