"""The Gemini brain in chat mode, driven through the real google-genai SDK against the local fake
(tests/fakes/gemini.py): streaming, tools, interruptions, failures, what was heard; plus the
pure pieces (retry budget, heard prefix) as properties, and a whole batch interview."""

from __future__ import annotations

import base64
import functools
import io
import json
import logging
import random
import wave
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stages.brain import (
    Brain,
    BrainError,
    BrainSetup,
    BrainTurn,
    BrainUsage,
    TextDelta,
    ToolCalled,
    ToolSpec,
    UserTranscript,
)
from stages.gemini import (
    DEFAULT_MODELS,
    FALLBACK_LINE,
    GeminiBrain,
    GeminiOptions,
    RetryBudget,
    heard_prefix_len,
)
from tests.fakes.gemini import (
    FakeGemini,
    InterviewerModel,
    Reply,
    b64decode,
    call_reply,
    error_reply,
    get,
    text_reply,
)

pytestmark = pytest.mark.filterwarnings(
    "ignore:Inheritance class AiohttpClientSession:DeprecationWarning"
)
FIXTURES = Path(__file__).parent / "fixtures"
TOOLS = (
    ToolSpec(
        "next_question",
        "Move to the next question.",
        {"type": "object", "properties": {"reason": {"type": "string"}}, "required": ["reason"]},
    ),
    ToolSpec("end_interview", "End the interview.", {"type": "object", "properties": {}}),
)
SETUP = BrainSetup("You are an interviewer.", TOOLS, context={"candidateName": "Ann"})
FAST = GeminiOptions(
    backoff_initial_s=0.01,
    backoff_max_s=0.05,
    first_token_timeout_s=1.0,
    stall_timeout_s=1.0,
    turn_budget_s=3.0,
    transcript_wait_s=3.0,
)


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeGemini]:
    with FakeGemini() as server:
        yield server


@pytest.fixture(autouse=True)
def _trust_fake(fake: FakeGemini, monkeypatch: pytest.MonkeyPatch) -> None:
    fake.reset()
    monkeypatch.setenv("SSL_CERT_FILE", fake.ca_file)


class Director:
    """A stand-in ToolHandler with the director's result shapes."""

    def __init__(self, questions: tuple[str, ...] = ("What is a closure?",)) -> None:
        self.questions = list(questions)
        self.calls: list[tuple[str, dict[str, Any]]] = []

    async def __call__(self, name: str, args: dict[str, Any]) -> dict[str, Any]:
        self.calls.append((name, args))
        if name == "end_interview":
            return {"status": "ok"}
        if not self.questions:
            return {"status": "no_more_questions", "instruction": "close"}
        return {"status": "ok", "questionIndex": 0, "question": self.questions.pop(0)}


def brain_for(fake: FakeGemini, key: str = "test-key", **options: Any) -> GeminiBrain:
    opts = GeminiOptions(**{**FAST.__dict__, **options})
    return GeminiBrain(key, "gemini-3.8-flash", base_url=fake.base_url, options=opts)


async def collect(brain: GeminiBrain, turn: BrainTurn) -> list[Any]:
    with anyio.fail_after(15):
        return [event async for event in brain.reply(turn)]


def texts(events: list[Any]) -> str:
    return "".join(e.text for e in events if isinstance(e, TextDelta))


def run(fn: Any) -> Any:
    return anyio.run(fn)


def pcm(seconds: float = 0.5) -> bytes:
    return bytes(range(256)) * int(seconds * 16000 * 2 / 256)


# --- streaming and tools -------------------------------------------------------------------------


def test_brain_is_a_brain_and_reports_the_model(fake: FakeGemini) -> None:
    brain = GeminiBrain("k", base_url=fake.base_url)
    assert isinstance(brain, Brain)
    assert brain.name == DEFAULT_MODELS["chat"] == "gemini-3.8-flash"
    assert "k" not in repr(brain).replace("gemini", "")
    with pytest.raises(ValueError, match="GEMINI_MODE"):
        GeminiBrain("k", mode="other")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="GEMINI_API_KEY"):
        GeminiBrain(" ")


def test_text_streams_as_chunks_arrive(fake: FakeGemini) -> None:
    fake.script(text_reply("Hello ", "Ann, ", "welcome.", interval_s=0.3))
    seen_while_streaming: list[str] = []

    async def main() -> list[Any]:
        brain = brain_for(fake)
        await brain.start(SETUP, Director())
        events: list[Any] = []
        async for event in brain.reply(BrainTurn(epoch=1, instruction="Greet Ann.")):
            if isinstance(event, TextDelta) and not events:
                seen_while_streaming.append(fake.requests[-1].outcome)
            events.append(event)
        await brain.aclose()
        return events

    events = run(main)
    assert [e.text for e in events if isinstance(e, TextDelta)] == ["Hello ", "Ann, ", "welcome."]
    assert seen_while_streaming == [""]  # the fake had not finished sending
    assert events[-1] == BrainUsage(100, 12)
    (req,) = fake.stream_requests()
    assert req.path == "/v1/models/gemini-3.8-flash:streamGenerateContent"
    assert req.headers["x-goog-api-key"] == "test-key"
    body = req.json
    assert get(body, "systemInstruction")["parts"][0]["text"] == "You are an interviewer."
    names = [d["name"] for d in body["tools"][0]["functionDeclarations"]]
    assert names == ["next_question", "end_interview"]
    thinking = get(get(body, "generationConfig"), "thinkingConfig")
    assert get(thinking, "thinkingLevel", "thinking_level") == "LOW"
    assert "Greet Ann." in req.contents[-1]["parts"][0]["text"]


def test_tool_call_result_goes_back_and_the_question_is_spoken(fake: FakeGemini) -> None:
    fake.script(
        call_reply("next_question", {"reason": "opening"}, text=("Hello Ann.",), sig="sig-1"),
        text_reply(" What is a closure?"),
    )
    director = Director()

    async def main() -> list[Any]:
        brain = brain_for(fake)
        await brain.start(SETUP, director)
        events = await collect(brain, BrainTurn(epoch=1, instruction="Greet."))
        await brain.aclose()
        return events

    events = run(main)
    assert texts(events) == "Hello Ann. What is a closure?"
    assert director.calls == [("next_question", {"reason": "opening"})]
    called = [e for e in events if isinstance(e, ToolCalled)]
    assert called[0].result["question"] == "What is a closure?"
    _first, second = fake.stream_requests()
    model, answer = second.contents[-2], second.contents[-1]
    assert model["role"] == "model"
    call_part = next(p for p in model["parts"] if get(p, "functionCall"))
    assert (
        get(call_part, "thoughtSignature", "thought_signature")
        == base64.b64encode(b"sig-1").decode()
    )
    response = get(answer["parts"][0], "functionResponse", "function_response")
    assert response["name"] == "next_question"
    assert response["response"]["question"] == "What is a closure?"
    assert events.index(called[0]) < next(
        i for i, e in enumerate(events) if isinstance(e, TextDelta) and "closure" in e.text
    )


def test_audio_goes_as_wav_and_is_transcribed_beside_the_reply(fake: FakeGemini) -> None:
    audio = pcm(0.5)
    fake.script(text_reply("Thank you."), text_reply("Next."))
    fake.script_unary(text_reply("I like Python.", delay_s=0.5))

    async def main() -> tuple[list[Any], list[Any]]:
        brain = brain_for(fake)
        await brain.start(SETUP, Director())
        first = await collect(brain, BrainTurn(epoch=2, turn_id=7, audio=audio))
        second = await collect(brain, BrainTurn(epoch=3, turn_id=8, text="More."))
        await brain.aclose()
        return first, second

    first, second = run(main)
    # the reply did not wait for the transcript
    kinds = [type(e) for e in first]
    assert kinds.index(TextDelta) < kinds.index(UserTranscript)
    assert UserTranscript(7, "I like Python.") in first
    reply_req = fake.stream_requests()[0]
    blob = get(reply_req.contents[-1]["parts"][0], "inlineData", "inline_data")
    assert get(blob, "mimeType", "mime_type") == "audio/wav"
    with wave.open(io.BytesIO(b64decode(blob["data"]))) as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (16000, 1, 2)
        assert w.readframes(w.getnframes()) == audio
    (transcribe,) = fake.unary_requests()
    parts = transcribe.contents[0]["parts"]
    assert get(parts[0], "inlineData", "inline_data")["data"] == blob["data"]
    assert "verbatim" in parts[1]["text"]
    # once transcribed, the history carries the words instead of the audio
    later = json.dumps(fake.stream_requests()[1].contents)
    assert "I like Python." in later and "inlineData" not in later and "inline_data" not in later
    assert texts(second) == "Next."


# --- interruptions and what was heard ------------------------------------------------------------


@pytest.mark.parametrize("where", ["awaiting the next chunk", "while the consumer is busy"])
def test_cancelling_the_reply_closes_the_stream(fake: FakeGemini, where: str) -> None:
    fake.script(text_reply(*[f"word{i} " for i in range(20)], interval_s=0.2))

    async def main() -> str:
        brain = brain_for(fake)
        await brain.start(SETUP, Director())
        got = []
        with anyio.CancelScope() as scope:
            async for event in brain.reply(BrainTurn(epoch=1)):
                got.append(event)
                if where == "while the consumer is busy":
                    scope.cancel()
                    await anyio.sleep(1)  # cancelled here, the generator left suspended
                else:
                    scope.cancel()  # cancelled in the next anext()
        await anyio.to_thread.run_sync(fake.wait_until, lambda: fake.requests[-1].outcome != "")
        await brain.aclose()
        return fake.requests[-1].outcome

    assert run(main) == "disconnected"


def test_history_keeps_only_what_was_heard(fake: FakeGemini) -> None:
    fake.script(
        call_reply("next_question", text=("Thank you. ",)),
        text_reply("Tell me about your last project. ", "What did you build?"),
        text_reply("Sure."),
    )

    async def main() -> None:
        brain = brain_for(fake)
        await brain.start(SETUP, Director())
        await collect(brain, BrainTurn(epoch=4, turn_id=1, text="I answered."))
        brain.heard(4, "Thank you. Tell me  about your", completed=False)
        await collect(brain, BrainTurn(epoch=5, turn_id=2, text="Sorry, go on?"))
        await brain.aclose()

    run(main)
    contents = fake.stream_requests()[-1].contents
    said = "".join(p.get("text", "") for c in contents if c["role"] == "model" for p in c["parts"])
    assert said == "Thank you. Tell me about your"
    assert "What did you build" not in json.dumps(contents)
    assert any(get(p, "functionCall") for c in contents for p in c["parts"])  # tool call kept
    last_user = " ".join(p.get("text", "") for p in contents[-1]["parts"])
    assert "interrupted" in last_user and "Tell me about your" in last_user
    assert "Sorry, go on?" in last_user


def test_a_reply_heard_in_full_stays_whole(fake: FakeGemini) -> None:
    fake.script(text_reply("One. ", "Two."), text_reply("Three."))

    async def main() -> None:
        brain = brain_for(fake)
        await brain.start(SETUP, Director())
        await collect(brain, BrainTurn(epoch=1, text="hi"))
        brain.heard(1, "One. Two.", completed=True)
        await collect(brain, BrainTurn(epoch=2, text="ok"))
        await brain.aclose()

    run(main)
    text = json.dumps(fake.stream_requests()[-1].contents)
    assert "One. Two." in text and "interrupted" not in text


def test_older_turns_go_as_a_condensed_transcript(fake: FakeGemini) -> None:
    fake.responder = lambda rec: text_reply(f"Reply {len(fake.stream_requests())}.")

    async def main() -> None:
        brain = brain_for(fake, history_turns=2)
        await brain.start(SETUP, Director())
        for i in range(1, 6):
            await collect(brain, BrainTurn(epoch=i, turn_id=i, text=f"Answer {i}."))
            brain.heard(i, f"Reply {i}.", completed=True)
        await brain.aclose()

    run(main)
    contents = fake.stream_requests()[-1].contents
    assert len(contents) == 3  # [condensed transcript, turn 4], reply 4, turn 5
    summary = contents[0]["parts"][0]["text"]
    for i in (1, 2, 3):
        assert f"Candidate: Answer {i}." in summary and f"Interviewer: Reply {i}." in summary
    assert "Answer 4." not in summary and contents[0]["parts"][1]["text"] == "Answer 4."
    assert contents[1] == {"role": "model", "parts": [{"text": "Reply 4."}]}
    assert contents[-1]["parts"][-1]["text"] == "Answer 5."


# --- failures ------------------------------------------------------------------------------------


def test_429_and_500_are_retried_then_the_reply_comes(fake: FakeGemini) -> None:
    fake.script(error_reply(429), error_reply(500), text_reply("Welcome back."))

    async def main() -> list[Any]:
        brain = brain_for(fake)
        await brain.start(SETUP, Director())
        events = await collect(brain, BrainTurn(epoch=1))
        await brain.aclose()
        return events

    assert texts(run(main)) == "Welcome back."
    assert [r.outcome for r in fake.stream_requests()] == ["error 429", "error 500", "ok"]


def test_a_late_first_token_is_abandoned_and_retried(fake: FakeGemini) -> None:
    fake.script(text_reply("Too late.", delay_s=2.0), text_reply("On time."))

    async def main() -> list[Any]:
        brain = brain_for(fake, first_token_timeout_s=0.3)
        await brain.start(SETUP, Director())
        events = await collect(brain, BrainTurn(epoch=1))
        await brain.aclose()
        return events

    assert texts(run(main)) == "On time."
    assert len(fake.stream_requests()) == 2


def test_budget_exhausted_says_the_fallback_line(fake: FakeGemini) -> None:
    fake.responder = lambda rec: error_reply(503)

    async def main() -> list[Any]:
        brain = brain_for(fake, max_attempts=3)
        await brain.start(SETUP, Director())
        events = await collect(brain, BrainTurn(epoch=1, text="hello?"))
        await brain.aclose()
        return events

    events = run(main)
    assert texts(events) == FALLBACK_LINE
    assert len(fake.stream_requests()) == 3


def test_a_stream_cut_midway_continues_without_repeating(fake: FakeGemini) -> None:
    fake.script(
        Reply(parts=[{"text": "Tell me "}, {"text": "never sent"}], drop_after=1),
        text_reply("about yourself."),
    )

    async def main() -> list[Any]:
        brain = brain_for(fake)
        await brain.start(SETUP, Director())
        events = await collect(brain, BrainTurn(epoch=1))
        await brain.aclose()
        return events

    assert texts(run(main)) == "Tell me about yourself."
    retry = fake.stream_requests()[1].contents
    assert retry[-2] == {"role": "model", "parts": [{"text": "Tell me "}]}
    assert "continue exactly" in retry[-1]["parts"][0]["text"]


def test_failed_after_a_question_was_given_speaks_the_question(fake: FakeGemini) -> None:
    fake.script(call_reply("next_question"))
    fake.responder = lambda rec: error_reply(500)

    async def main() -> list[Any]:
        brain = brain_for(fake, max_attempts=2)
        await brain.start(SETUP, Director(("Why Python?",)))
        events = await collect(brain, BrainTurn(epoch=1))
        await brain.aclose()
        return events

    assert texts(run(main)) == " Why Python?"


def test_repeated_failed_turns_end_with_brain_error(fake: FakeGemini) -> None:
    fake.responder = lambda rec: error_reply(500)

    async def main() -> list[str]:
        brain = brain_for(fake, max_attempts=1, max_failed_turns=2)
        await brain.start(SETUP, Director())
        said = [texts(await collect(brain, BrainTurn(epoch=1)))]
        with pytest.raises(BrainError, match="2 replies in a row"):
            await collect(brain, BrainTurn(epoch=2))
        await brain.aclose()
        return said

    assert run(main) == [FALLBACK_LINE]


@pytest.mark.parametrize(
    ("reply", "why"),
    [
        (error_reply(400, "API key not valid.", reason="API_KEY_INVALID"), "API key"),
        (error_reply(403), "API key"),
        (error_reply(404), "GEMINI_MODEL"),
    ],
)
def test_a_bad_key_or_model_fails_at_once(
    fake: FakeGemini, caplog: pytest.LogCaptureFixture, reply: Reply, why: str
) -> None:
    secret = "sk-very-secret-key-123"
    fake.api_key = secret  # the fake lets it through: the scripted answer decides
    fake.script(reply)

    async def main() -> None:
        brain = brain_for(fake, key=secret)
        await brain.start(SETUP, Director())
        with pytest.raises(BrainError, match=why):
            await collect(brain, BrainTurn(epoch=1))
        await brain.aclose()

    with caplog.at_level(logging.DEBUG):
        run(main)
    assert len(fake.stream_requests()) == 1  # no retry
    assert any(why in r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR)
    assert all(secret not in r.getMessage() for r in caplog.records)


def test_the_fake_itself_rejects_a_wrong_key(fake: FakeGemini) -> None:
    async def main() -> None:
        brain = brain_for(fake, key="wrong")
        await brain.start(SETUP, Director())
        with pytest.raises(BrainError, match="API key"):
            await collect(brain, BrainTurn(epoch=1))
        await brain.aclose()

    run(main)


# --- pure pieces ---------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    words=st.lists(st.text(st.characters(categories=["L", "N", "P"]), min_size=1), max_size=12),
    cut=st.integers(min_value=0, max_value=200),
    spaces=st.sampled_from([" ", "  ", "\n"]),
)
def test_heard_prefix_matches_whatever_the_spacing(words: list[str], cut: int, spaces: str) -> None:
    original = " ".join(words)
    heard = original[: min(cut, len(original))]
    n = heard_prefix_len(original, heard.replace(" ", spaces))
    assert n is not None
    assert original[:n].split() == heard.split()
    assert heard_prefix_len(original, original + " extra!") is None


@settings(max_examples=200, deadline=None)
@given(
    budget=st.floats(0.1, 20),
    attempts=st.integers(1, 8),
    hints=st.lists(st.one_of(st.none(), st.floats(0, 10)), max_size=10),
    seed=st.integers(0, 1000),
)
def test_retry_budget_never_overruns(
    budget: float, attempts: int, hints: list[float | None], seed: int
) -> None:
    opts = GeminiOptions(turn_budget_s=budget, max_attempts=attempts)
    b = RetryBudget(opts, start=100.0, rng=random.Random(seed))
    now, granted = 100.0, 0
    for hint in hints:
        delay = b.next_delay(now, hint)
        if delay is None:
            continue
        granted += 1
        assert delay >= 0
        now += delay
        assert now <= b.deadline
    assert granted + 1 <= attempts


def test_options_are_checked() -> None:
    with pytest.raises(ValueError, match="turn_budget_s"):
        GeminiOptions(turn_budget_s=0)
    with pytest.raises(ValueError, match="max_attempts"):
        GeminiOptions(max_attempts=0)


# --- a whole interview ---------------------------------------------------------------------------


def whole_interview(fake: FakeGemini, mode: str, tmp_path: Path) -> dict[str, Any]:
    """``interview.run.run_interview`` with the Gemini brain against the fake."""
    import interview.run as batch
    from interview.config import Settings
    from interview.session import InterviewSession, Providers
    from pipeline.audio import read_wav
    from stages.local import EspeakSynthesizer

    def providers(settings: Settings) -> Providers:
        brain = GeminiBrain(
            "test-key",
            mode=mode,  # type: ignore[arg-type]
            base_url=fake.base_url,
            options=FAST,
        )
        return Providers(brain=brain, synthesizer=EspeakSynthesizer())

    body = {
        "callId": f"gemini-{mode}",
        "candidateName": "Ann",
        "jobTitle": "Backend Engineer",
        "questions": [
            {
                "id": "q1",
                "text": "Tell me about yourself.",
                "type": "intro",
                "duration": 2,
                "category": "intro",
            }
        ],
    }
    settings = Settings(outbox_dir=str(tmp_path / "outbox"))
    session = functools.partial(InterviewSession, providers=providers)
    audio = read_wav(FIXTURES / "answer_single.wav")  # one answer: a short interview

    async def main() -> dict[str, Any]:
        with anyio.fail_after(60):
            original = batch.InterviewSession
            batch.InterviewSession = session  # type: ignore[misc,assignment]
            try:
                return await batch.run_interview(body, audio, settings=settings, out=None)
            finally:
                batch.InterviewSession = original  # type: ignore[misc]

    return anyio.run(main)


def test_a_whole_interview_through_the_session_in_chat_mode(
    fake: FakeGemini, tmp_path: Path
) -> None:
    fake.responder = InterviewerModel().chat
    fake.transcript = "My answer."
    payload = whole_interview(fake, "chat", tmp_path)
    assert payload["status"] == "completed", payload
    agent = [e["text"] for e in payload["transcript"] if e["speaker"] == "agent"]
    user = [e["text"] for e in payload["transcript"] if e["speaker"] == "user"]
    assert "Hello" in agent[0] and "Tell me about yourself." in agent[0]
    assert "Goodbye" in agent[-1]
    assert user == ["My answer."]
    assert len(fake.unary_requests()) == 1  # the answer was transcribed
    assert fake.stream_requests()[-1].headers["x-goog-api-key"] == "test-key"


def test_a_bad_key_fails_the_interview_with_its_result_delivered(
    fake: FakeGemini, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fake.api_key = "the-right-key"  # the brain sends test-key: rejected
    payload = whole_interview(fake, "chat", tmp_path)
    assert payload["status"] == "failed"
    assert payload["interviewId"] == "gemini-chat" and "transcript" in payload
    assert len(fake.stream_requests()) == 1  # no retries on a rejected key
    assert any("API key was rejected" in r.getMessage() for r in caplog.records)
