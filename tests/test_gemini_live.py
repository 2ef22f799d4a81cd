"""The Gemini brain in live mode, through the real google-genai SDK over a TLS websocket to the
local fake: setup, turns, tools, streaming hooks, goAway, dropped and silent sockets, refused
handles, interruptions, a bad key, and a whole batch interview."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from stages.brain import BrainError, BrainTurn, TextDelta, ToolCalled, UserTranscript
from stages.gemini import FALLBACK_LINE, GeminiBrain, GeminiOptions
from stages.gemini_live import parse_duration
from tests.fakes.gemini import (
    FakeGemini,
    InterviewerModel,
    LiveConnection,
    b64decode,
    get,
    go_away,
    live_call,
    live_reply,
    say,
)
from tests.test_gemini import SETUP, Director, texts, whole_interview

pytestmark = pytest.mark.filterwarnings(
    "ignore:Inheritance class AiohttpClientSession:DeprecationWarning"
)
FAST = GeminiOptions(
    backoff_initial_s=0.01,
    backoff_max_s=0.05,
    first_token_timeout_s=1.0,
    stall_timeout_s=1.0,
    turn_budget_s=4.0,
    live_tool_continuation_s=0.5,
)
SECOND = b"\x01\x02" * 16000  # one second of 16 kHz audio


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeGemini]:
    with FakeGemini() as server:
        yield server


@pytest.fixture(autouse=True)
def _trust_fake(fake: FakeGemini, monkeypatch: pytest.MonkeyPatch) -> None:
    fake.reset()
    monkeypatch.setenv("SSL_CERT_FILE", fake.ca_file)


def live_brain(fake: FakeGemini, key: str = "test-key", **options: Any) -> GeminiBrain:
    opts = GeminiOptions(**{**FAST.__dict__, **options})
    return GeminiBrain(key, mode="live", base_url=fake.base_url, options=opts)


async def collect(brain: GeminiBrain, turn: BrainTurn) -> list[Any]:
    with anyio.fail_after(15):
        return [event async for event in brain.reply(turn)]


def run(fn: Any) -> Any:
    return anyio.run(fn)


def handle_of(conn: LiveConnection) -> Any:
    return get(get(conn.setup, "sessionResumption", "session_resumption"), "handle")


# --- setup and turns -----------------------------------------------------------------------------


def test_setup_asks_for_manual_activity_transcription_and_resumption(fake: FakeGemini) -> None:
    async def main() -> GeminiBrain:
        brain = live_brain(fake)
        await brain.start(SETUP, Director())
        await brain.aclose()
        return brain

    brain = run(main)
    assert brain.name == "gemini-3.8-live"
    (conn,) = fake.live
    assert conn.path.endswith(
        "/ws/google.ai.generativelanguage.v1.GenerativeService.BidiGenerateContent"
    )
    setup = conn.setup
    assert setup["model"] == "models/gemini-3.8-live"
    ric = get(setup, "realtimeInputConfig", "realtime_input_config")
    aad = get(ric, "automaticActivityDetection", "automatic_activity_detection")
    assert get(aad, "disabled") is True
    assert get(ric, "activityHandling", "activity_handling") == "NO_INTERRUPTION"
    assert get(setup, "inputAudioTranscription", "input_audio_transcription") == {}
    assert get(setup, "sessionResumption", "session_resumption") == {}  # asked from the start
    assert get(get(setup, "generationConfig"), "responseModalities") == ["AUDIO"]
    assert get(setup, "outputAudioTranscription", "output_audio_transcription") == {}
    decls = setup["tools"][0]["functionDeclarations"]
    assert [d["name"] for d in decls] == ["next_question", "end_interview"]
    assert {d["behavior"] for d in decls} == {"BLOCKING"}
    assert fake.wait_until(lambda: conn.closed_by == "client")


def test_opening_tool_call_and_question_over_live(fake: FakeGemini) -> None:
    fake.script_live(
        live_reply(say("Hello ", "Ann."), live_call("next_question", call_id="c1"), complete=False),
        live_reply(say(" What is a closure?")),
    )
    director = Director()

    async def main() -> list[Any]:
        brain = live_brain(fake)
        await brain.start(SETUP, director)
        events = await collect(brain, BrainTurn(epoch=1, instruction="Greet Ann."))
        await brain.aclose()
        return events

    events = run(main)
    assert texts(events) == "Hello Ann. What is a closure?"
    assert [e.name for e in events if isinstance(e, ToolCalled)] == ["next_question"]
    (conn,) = fake.live
    assert conn.kinds() == ["clientContent", "toolResponse"]
    cc = get(conn.messages[0], "clientContent", "client_content")
    assert get(cc, "turnComplete", "turn_complete") is True
    assert "Greet Ann." in json.dumps(cc)
    tr = get(conn.messages[1], "toolResponse", "tool_response")
    (fr,) = get(tr, "functionResponses", "function_responses")
    assert fr["id"] == "c1" and fr["response"]["question"] == "What is a closure?"


def test_a_model_that_completes_the_turn_at_the_tool_call(fake: FakeGemini) -> None:
    fake.tool_call_turn_complete = True
    fake.script_live(
        live_reply(say("Thanks."), live_call("next_question"), complete=False),
        live_reply(say(" Next: why Python?")),
    )

    async def main() -> list[Any]:
        brain = live_brain(fake)
        await brain.start(SETUP, Director(("Why Python?",)))
        events = await collect(brain, BrainTurn(epoch=1, text="done"))
        await brain.aclose()
        return events

    assert texts(run(main)) == "Thanks. Next: why Python?"


def test_whole_turn_audio_between_activity_start_and_end(fake: FakeGemini) -> None:
    fake.script_live(live_reply(say("Thank you."), input_transcript="I built a compiler."))

    async def main() -> list[Any]:
        brain = live_brain(fake)
        await brain.start(SETUP, Director())
        events = await collect(brain, BrainTurn(epoch=2, turn_id=5, audio=SECOND))
        await brain.aclose()
        return events

    events = run(main)
    assert texts(events) == "Thank you."
    assert UserTranscript(5, "I built a compiler.") in events
    (conn,) = fake.live
    kinds = conn.kinds()
    assert kinds[0] == "activityStart" and kinds[-1] == "activityEnd"
    assert set(kinds[1:-1]) == {"audio"}
    assert conn.audio_bytes() == len(SECOND)
    mime = {get(b, "mimeType", "mime_type") for b in conn.realtime("audio")}
    assert mime == {"audio/pcm;rate=16000"}


def test_text_modality_reads_model_turn_text(fake: FakeGemini) -> None:
    fake.script_live(live_reply(say("Plain text.")))

    async def main() -> list[Any]:
        brain = live_brain(fake, live_response_modality="TEXT")
        await brain.start(SETUP, Director())
        events = await collect(brain, BrainTurn(epoch=1, text="hi"))
        await brain.aclose()
        return events

    assert texts(run(main)) == "Plain text."
    setup = fake.live[0].setup
    assert get(get(setup, "generationConfig"), "responseModalities") == ["TEXT"]
    assert get(setup, "outputAudioTranscription", "output_audio_transcription") is None


def test_streamed_turn_is_not_sent_twice(fake: FakeGemini) -> None:
    fake.script_live(live_reply(say("Got it.")))

    async def main() -> list[Any]:
        brain = live_brain(fake, live_preroll_ms=100)
        await brain.start(SETUP, Director())
        for _ in range(10):  # 0.5 s of silence before the speech: only 0.1 s of it is kept
            await brain.stream_audio(b"\0\0" * 800, 16000)
        await brain.speech_started()
        for _ in range(5):
            await brain.stream_audio(b"\x05\x00" * 1600, 16000)
        await brain.speech_ended()
        events = await collect(brain, BrainTurn(epoch=2, turn_id=1, audio=b"\x05\x00" * 8000))
        await brain.aclose()
        return events

    events = run(main)
    assert texts(events) == "Got it."
    (conn,) = fake.live
    assert conn.kinds().count("activityStart") == 1 and conn.kinds().count("activityEnd") == 1
    assert conn.audio_bytes() == 2 * 1600 + 5 * 3200  # pre-roll, then the speech


def test_streamed_audio_is_batched_and_flushed_at_the_end(fake: FakeGemini) -> None:
    async def main() -> None:
        brain = live_brain(fake, live_preroll_ms=0, live_stream_chunk_ms=100)
        assert brain.streams_audio
        await brain.start(SETUP, Director())
        await brain.speech_started()
        for _ in range(23):  # 20 ms frames: 460 ms
            await brain.stream_audio(b"\x07\x00" * 320, 16000)
        await brain.speech_ended()
        await brain.aclose()

    run(main)
    conn = fake.live[0]
    assert fake.wait_until(lambda: "activityEnd" in conn.kinds())
    sizes = [len(b64decode(get(b, "data"))) for b in conn.realtime("audio")]
    assert sizes == [3200, 3200, 3200, 3200, 1920]  # four 100 ms messages, then the rest
    assert conn.kinds()[-1] == "activityEnd"


def test_stream_audio_at_another_rate_is_resampled(fake: FakeGemini) -> None:
    async def main() -> None:
        brain = live_brain(fake, live_preroll_ms=0)
        await brain.start(SETUP, Director())
        await brain.speech_started()
        await brain.stream_audio(b"\x01\x00" * 48000, 48000)  # one second at 48 kHz
        await brain.speech_ended()
        await brain.aclose()

    run(main)
    assert fake.wait_until(lambda: "activityEnd" in fake.live[0].kinds())
    sent = fake.live[0].audio_bytes()
    assert 16000 * 2 * 0.9 <= sent <= 16000 * 2 * 1.1


# --- what was heard and interruptions ------------------------------------------------------------


def test_heard_sends_a_note_before_the_next_turn(fake: FakeGemini) -> None:
    fake.script_live(
        live_reply(say("Tell me about ", "your last project in detail.")),
        live_reply(say("Sure.")),
    )

    async def main() -> None:
        brain = live_brain(fake)
        await brain.start(SETUP, Director())
        await collect(brain, BrainTurn(epoch=1, text="hi"))
        brain.heard(1, "Tell me about", completed=False)
        await collect(brain, BrainTurn(epoch=2, turn_id=2, audio=SECOND))
        await brain.aclose()

    run(main)
    (conn,) = fake.live
    assert conn.kinds()[1:3] == ["clientContent", "activityStart"]
    note = get(conn.messages[1], "clientContent", "client_content")
    assert get(note, "turnComplete", "turn_complete") in (None, False)
    assert "heard your last reply only up to" in json.dumps(note)
    assert "Tell me about" in json.dumps(note)


def test_an_interrupted_reply_is_skipped_by_the_next(fake: FakeGemini) -> None:
    fake.script_live(
        live_reply(
            say("One ", "two ", "three."),
            live_call("next_question"),
            interval_s=0.2,
            complete=False,
        ),
        live_reply(say(" stale question?")),  # the stale reply's continuation
        live_reply(say("Fresh answer.")),
    )
    director = Director()

    async def main() -> list[Any]:
        brain = live_brain(fake)
        await brain.start(SETUP, director)
        with anyio.CancelScope() as scope:
            async for event in brain.reply(BrainTurn(epoch=1, text="first")):
                if isinstance(event, TextDelta):
                    scope.cancel()
        brain.heard(1, "One", completed=False)
        events = await collect(brain, BrainTurn(epoch=2, text="second"))
        await brain.aclose()
        return events

    events = run(main)
    assert texts(events) == "Fresh answer."
    assert director.calls == []  # the stale tool call never reached the director
    (conn,) = fake.live
    tr = get(conn.messages[1], "toolResponse", "tool_response")
    assert get(tr, "functionResponses", "function_responses")[0]["response"]["status"] == (
        "cancelled"
    )


# --- connection trouble --------------------------------------------------------------------------


def test_go_away_reconnects_with_the_latest_handle(fake: FakeGemini) -> None:
    fake.script_live(live_reply(say("First.")), live_reply(go_away("30s"), say("Second.")))
    fake.script_live(live_reply(say("Third.")))

    async def main() -> list[str]:
        brain = live_brain(fake)
        await brain.start(SETUP, Director())
        said = [texts(await collect(brain, BrainTurn(epoch=i, text=f"t{i}"))) for i in (1, 2, 3)]
        await brain.aclose()
        return said

    assert run(main) == ["First.", "Second.", "Third."]
    first, second = fake.live
    assert handle_of(first) is None
    assert len(first.handles) == 2  # one after each completed turn
    assert handle_of(second) == first.handles[-1] == second.resumed_from
    assert first.kinds() == ["clientContent", "clientContent"]
    assert second.kinds() == ["clientContent"]  # the third turn went to the new connection


def test_go_away_between_replies_is_answered_at_the_next(fake: FakeGemini) -> None:
    async def main() -> list[str]:
        brain = live_brain(fake)
        await brain.start(SETUP, Director())
        said = [texts(await collect(brain, BrainTurn(epoch=1, text="a")))]
        fake.push_live(go_away("20s"))
        await anyio.sleep(0.1)
        said.append(texts(await collect(brain, BrainTurn(epoch=2, text="b"))))
        said.append(texts(await collect(brain, BrainTurn(epoch=3, text="c"))))
        await brain.aclose()
        return said

    assert run(main) == ["OK.", "OK.", "OK."]
    assert len(fake.live) == 2
    assert handle_of(fake.live[1]) == fake.live[0].handles[-1]


@pytest.mark.parametrize("fault", ["drop", "stall"])
def test_a_dead_socket_mid_reply_is_resumed(fake: FakeGemini, fault: str) -> None:
    kw: dict[str, Any] = {"drop_after": 1} if fault == "drop" else {"stall_after": 1}
    fake.script_live(
        live_reply(say("Hello.")),
        live_reply(say("Thank you, ", "never sent"), **kw),
        live_reply(say("that is helpful.")),
    )

    async def main() -> list[str]:
        brain = live_brain(fake)
        await brain.start(SETUP, Director())
        said = [texts(await collect(brain, BrainTurn(epoch=1, text="hi")))]
        said.append(texts(await collect(brain, BrainTurn(epoch=2, turn_id=1, audio=SECOND))))
        await brain.aclose()
        return said

    assert run(main) == ["Hello.", "Thank you, that is helpful."]
    first, second = fake.live
    assert handle_of(second) == first.handles[0]  # where the last complete turn left it
    assert second.audio_bytes() == len(SECOND)  # the turn was sent again
    note = json.dumps(get(second.messages[0], "clientContent", "client_content"))
    assert "connection dropped" in note and "Thank you," in note


def test_a_refused_handle_opens_a_fresh_session_with_the_conversation(fake: FakeGemini) -> None:
    fake.script_live(live_reply(say("Welcome, Ann.")), live_reply(say("x"), drop_after=0))
    fake.script_live(live_reply(say("Go on.")))

    async def main() -> str:
        brain = live_brain(fake)
        await brain.start(SETUP, Director())
        await collect(brain, BrainTurn(epoch=1, text="Hello there."))
        fake._handles.clear()  # the server forgot the session
        said = texts(await collect(brain, BrainTurn(epoch=2, text="Anyway.")))
        await brain.aclose()
        return said

    assert run(main) == "Go on."
    refused, fresh = fake.live[1], fake.live[2]
    assert refused.closed_by == "refused" and handle_of(fresh) is None
    replay = get(fresh.messages[0], "clientContent", "client_content")
    assert get(replay, "turnComplete", "turn_complete") in (None, False)
    turns = [(t["role"], t["parts"][0]["text"]) for t in replay["turns"]]
    assert turns == [("user", "Hello there."), ("model", "Welcome, Ann.")]


def test_budget_exhausted_over_live_says_the_fallback(fake: FakeGemini) -> None:
    fake.live_responder = lambda conn, trigger, message: live_reply(say("x"), stall_after=0)

    async def main() -> str:
        brain = live_brain(fake, first_token_timeout_s=0.3, turn_budget_s=1.0)
        await brain.start(SETUP, Director())
        said = texts(await collect(brain, BrainTurn(epoch=1, text="hello?")))
        await brain.aclose()
        return said

    assert run(main) == FALLBACK_LINE


def test_a_bad_key_fails_at_start(fake: FakeGemini, caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        brain = live_brain(fake, key="wrong-key-456")
        with pytest.raises(BrainError, match="API key"):
            await brain.start(SETUP, Director())
        await brain.aclose()

    run(main)
    assert fake.live[0].closed_by == "refused"
    assert all("wrong-key-456" not in r.getMessage() for r in caplog.records)


def test_parse_duration() -> None:
    assert parse_duration("5s") == 5.0
    assert parse_duration("1.5s") == 1.5
    assert parse_duration("") is None
    assert parse_duration("soon") is None


# --- a whole interview ---------------------------------------------------------------------------


def test_a_whole_interview_through_the_session_in_live_mode(
    fake: FakeGemini, tmp_path: Path
) -> None:
    fake.live_responder = InterviewerModel().live
    fake.transcript = "My answer."
    payload = whole_interview(fake, "live", tmp_path)
    assert payload["status"] == "completed", payload
    agent = [e["text"] for e in payload["transcript"] if e["speaker"] == "agent"]
    user = [e["text"] for e in payload["transcript"] if e["speaker"] == "user"]
    assert "Hello" in agent[0] and "Tell me about yourself." in agent[0]
    assert "Goodbye" in agent[-1]
    assert user == ["My answer."]
    (conn,) = fake.live  # one connection held the whole interview
    assert conn.kinds().count("activityEnd") == 1
