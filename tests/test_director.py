"""The interview director (interview/director.py): tools, guidance, transcript and every end
condition, on the virtual clock."""

from __future__ import annotations

from typing import Any

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from interview.director import (
    CLOSE_NOW,
    NO_MORE_QUESTIONS,
    NOT_STARTED,
    OVER_BUDGET,
    WRAP_UP,
    Director,
)
from interview.plan import JoinRequest, Question
from pipeline.clock import VirtualClock


def request(n: int = 3, duration: int = 2) -> JoinRequest:
    return JoinRequest(
        call_id="call-1",
        candidate_name="Ada",
        job_title="Backend Engineer",
        questions=tuple(
            Question(
                f"q{i}", f"Question number {i}?", "technical", duration, f"cat{i}", (f"kp{i}",)
            )
            for i in range(n)
        ),
    )


class Recorder:
    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def __call__(self, event: dict[str, Any]) -> None:
        self.events.append(event)

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["type"] == kind]


def make(
    clock: VirtualClock, n: int = 3, duration: int = 2, **kw: Any
) -> tuple[Director, Recorder]:
    rec = Recorder()
    return Director(request(n, duration), clock, on_event=rec, **kw), rec


async def ask_next(d: Director, epoch: int) -> dict[str, Any]:
    """What a brain does in one reply: move on and speak the question."""
    result = await d.handle_tool("next_question", {"reason": "next"})
    if result["status"] == "ok":
        d.agent_said(f"Thank you. {result['question']}", epoch, True)
    return result


# -- setup ----------------------------------------------------------------------------------


def test_setup_instruction_tools_and_context() -> None:
    clock = VirtualClock()
    d, _ = make(clock)
    setup = d.setup()
    text = setup.system_instruction
    for needle in ("Backend Engineer", "Ada", "next_question", "end_interview", "markdown"):
        assert needle in text
    for q in d.request.questions:
        assert q.text in text
    assert "never reveal" in text.lower()
    assert [t.name for t in setup.tools] == ["next_question", "end_interview"]
    for tool in setup.tools:
        assert tool.parameters["type"] == "object"
        assert tool.parameters["properties"]["reason"]["type"] == "string"
        assert tool.parameters["required"] == ["reason"]
    assert setup.context["candidateName"] == "Ada"
    assert setup.context["jobTitle"] == "Backend Engineer"
    assert setup.context["totalQuestions"] == 3


def test_opening_turn_asks_for_greeting_and_first_question() -> None:
    d, _ = make(VirtualClock())
    turn = d.opening_turn(1)
    assert turn.epoch == 1 and turn.audio is None and turn.turn_id is None
    assert turn.instruction is not None
    assert "Greet Ada" in turn.instruction and "next_question" in turn.instruction


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="max_minutes"):
        Director(request(), VirtualClock(), max_minutes=0)
    d, _ = make(VirtualClock())
    with pytest.raises(ValueError, match="unknown end reason"):
        d.end("bye")
    assert not d.ended


# -- a whole interview ------------------------------------------------------------------------


def test_completed_after_last_question_end_interview_and_reply_finished() -> None:
    clock = VirtualClock()

    async def main() -> Director:
        d, rec = make(clock, n=3)
        t0 = clock.now()
        epoch = 1
        d.opening_turn(epoch)
        result = await ask_next(d, epoch)
        assert result == {
            "status": "ok",
            "questionIndex": 0,
            "totalQuestions": 3,
            "question": "Question number 0?",
            "category": "cat0",
            "keyPoints": ["kp0"],
            "timeBudgetSeconds": 120,
        }
        d.reply_finished(epoch)
        for turn_id in range(1, 4):
            await clock.sleep(30)
            d.user_said(f"answer {turn_id}", turn_id)
            epoch += 1
            d.turn_for(turn_id, b"\0\0", epoch)
            result = await ask_next(d, epoch)
            if turn_id < 3:
                assert result["status"] == "ok" and result["questionIndex"] == turn_id
            else:
                assert result == {"status": "no_more_questions", "instruction": NO_MORE_QUESTIONS}
            d.reply_finished(epoch)
            assert not d.ended
        assert await d.handle_tool("end_interview", {"reason": "done"}) == {"status": "ok"}
        assert d.end_requested == "completed" and not d.ended  # the closing is still playing
        await clock.sleep(5)
        d.agent_said("Thank you Ada, we will be in touch.", epoch, True)
        d.reply_finished(epoch)
        assert d.ended and d.end_reason == "completed"
        assert await d.wait_ended() == "completed"
        assert d.questions_asked == d.total_questions == 3

        assert rec.of("progress") == [
            {"type": "progress", "questionIndex": i, "category": f"cat{i}", "totalQuestions": 3}
            for i in range(3)
        ]
        assert rec.of("ended") == [{"type": "ended", "reason": "completed"}]
        assert rec.events[-1] == {"type": "ended", "reason": "completed"}
        transcript = d.transcript
        assert [e["speaker"] for e in transcript] == ["agent"] + ["user", "agent"] * 2 + [
            "user",
            "agent",
        ]
        assert transcript[-1] == {
            "speaker": "agent",
            "text": "Thank you Ada, we will be in touch.",
            "timestamp": 95.0,
        }
        assert [e["timestamp"] for e in transcript] == [0.0, 30.0, 30.0, 60.0, 60.0, 90.0, 95.0]
        assert [{k: v for k, v in e.items() if k != "type"} for e in rec.of("transcript")] == (
            transcript
        )
        assert d.elapsed() == clock.now() - t0 == 95.0
        return d

    clock.run(main)


def test_ended_by_agent_when_end_interview_is_called_early() -> None:
    clock = VirtualClock()

    async def main() -> None:
        d, rec = make(clock, n=3)
        d.opening_turn(1)
        await ask_next(d, 1)
        d.reply_finished(1)
        d.user_said("I would rather stop here.", 1)
        d.turn_for(1, None, 2)
        assert await d.handle_tool("end_interview", {"reason": "candidate asked"}) == {
            "status": "ok"
        }
        assert d.end_requested == "ended_by_agent"
        later = await d.handle_tool("next_question", {"reason": "x"})
        assert later["status"] == "error"  # no questions once the end is requested
        d.reply_finished(1)  # an older reply finishing does not end it
        assert not d.ended
        d.reply_finished(2)
        assert d.end_reason == "ended_by_agent"
        assert d.questions_asked == 1
        assert rec.of("ended") == [{"type": "ended", "reason": "ended_by_agent"}]

    clock.run(main)


def test_completed_when_every_question_was_asked_even_without_no_more_questions() -> None:
    clock = VirtualClock()

    async def main() -> None:
        d, _ = make(clock, n=2)
        d.opening_turn(1)
        await ask_next(d, 1)
        d.turn_for(1, None, 2)
        await d.handle_tool("end_interview", {"reason": "early"})
        assert d.end_requested == "ended_by_agent"  # one question of two
        d.end("shutdown")

        d2, _ = make(clock, n=2)
        d2.opening_turn(1)
        await ask_next(d2, 1)
        d2.turn_for(1, None, 2)
        await ask_next(d2, 2)  # the last question
        d2.turn_for(2, None, 3)
        await d2.handle_tool("end_interview", {"reason": "all asked"})
        d2.reply_finished(3)
        assert d2.end_reason == "completed"

    clock.run(main)


def test_max_duration_after_sixty_virtual_minutes_runs_fast() -> None:
    clock = VirtualClock()

    async def main() -> tuple[str, float, Director, Recorder]:
        d, rec = make(clock, n=40, duration=1)
        t0 = clock.now()
        with anyio.fail_after(3700):  # virtual seconds: a hang guard

            async def chatty_candidate() -> None:
                epoch, turn_id = 1, 0
                d.opening_turn(epoch)
                await ask_next(d, epoch)
                while not d.ended:  # a brain that never ends, a candidate who never stops
                    await clock.sleep(45)
                    turn_id += 1
                    d.user_said(f"answer {turn_id}", turn_id)
                    epoch += 1
                    d.turn_for(turn_id, None, epoch)
                    await ask_next(d, epoch)
                    d.reply_finished(epoch)

            async with anyio.create_task_group() as tg:
                tg.start_soon(chatty_candidate)
                reason = await d.run_timer()
        return reason, clock.now() - t0, d, rec

    reason, elapsed, d, rec = clock.run(main)
    assert reason == "max_duration" == d.end_reason
    assert elapsed == 3600.0 == d.elapsed()
    assert d.deadline == d.started_at + 3600
    assert rec.of("ended") == [{"type": "ended", "reason": "max_duration"}]
    assert d.questions_asked == 40  # the conversation went on all the while


def test_run_timer_returns_at_once_when_the_interview_ends_first() -> None:
    clock = VirtualClock()

    async def main() -> tuple[str, float]:
        d, _ = make(clock)
        t0 = clock.now()
        async with anyio.create_task_group() as tg:

            async def leave() -> None:
                await clock.sleep(10)
                d.end("candidate_left")

            tg.start_soon(leave)
            reason = await d.run_timer()
        return reason, clock.now() - t0

    assert clock.run(main) == ("candidate_left", 10.0)


@pytest.mark.parametrize("reason", ["shutdown", "candidate_left", "failed"])
def test_session_ends_it(reason: str) -> None:
    clock = VirtualClock()

    async def main() -> None:
        d, rec = make(clock)
        d.opening_turn(1)
        await ask_next(d, 1)
        await clock.sleep(12)
        assert d.end(reason) is True
        assert d.ended and d.end_reason == reason
        assert await d.wait_ended() == reason
        assert rec.of("ended") == [{"type": "ended", "reason": reason}]
        assert (await d.handle_tool("next_question", {"reason": "x"}))["status"] == "error"
        assert d.elapsed() == 12.0
        await clock.sleep(5)
        assert d.elapsed() == 12.0  # frozen at the end

    clock.run(main)


def test_first_reason_wins() -> None:
    clock = VirtualClock()

    async def main() -> None:
        d, rec = make(clock)
        d.opening_turn(1)
        await d.handle_tool("end_interview", {"reason": "x"})
        assert d.end("shutdown") is True  # before the closing finished playing
        assert d.end("failed") is False
        d.reply_finished(1)
        assert d.end("max_duration") is False
        assert d.end_reason == "shutdown"
        assert rec.of("ended") == [{"type": "ended", "reason": "shutdown"}]

    clock.run(main)


def test_wait_ended_wakes_waiters() -> None:
    clock = VirtualClock()

    async def main() -> list[str]:
        d, _ = make(clock)
        got: list[str] = []

        async def waiter() -> None:
            got.append(await d.wait_ended())

        async with anyio.create_task_group() as tg:
            tg.start_soon(waiter)
            tg.start_soon(waiter)
            await clock.sleep(1)
            d.end("failed")
        return got

    assert clock.run(main) == ["failed", "failed"]


def test_goodbye_words_end_nothing() -> None:
    clock = VirtualClock()

    async def main() -> None:
        d, rec = make(clock, n=1)
        d.opening_turn(1)
        d.agent_said("Goodbye! Bye bye. That concludes the interview.", 1, True)
        d.reply_finished(1)
        d.user_said("ok bye, goodbye, end interview", 1)
        turn = d.turn_for(1, None, 2)
        d.agent_said("Bye!", 2, False)
        d.reply_finished(2)
        assert not d.ended and d.end_requested is None
        assert rec.of("ended") == []
        assert [e["text"] for e in d.transcript][-1] == "Bye!"
        assert turn.instruction == NOT_STARTED

    clock.run(main)


def test_tool_errors_are_results_not_exceptions() -> None:
    clock = VirtualClock()

    async def main() -> None:
        d, _ = make(clock)
        result = await d.handle_tool("open_pod_bay_doors", {"reason": "x"})
        assert result["status"] == "error"
        assert result["error"].startswith("unknown tool 'open_pod_bay_doors'")
        assert d.progress["questionIndex"] == -1
        result = await d.handle_tool("next_question", {})  # no reason: still works
        assert result["status"] == "ok" and result["questionIndex"] == 0
        result = await d.handle_tool("next_question", None)
        assert result["questionIndex"] == 1

    clock.run(main)


def test_a_broken_event_listener_does_not_break_the_interview() -> None:
    clock = VirtualClock()

    def broken(event: dict[str, Any]) -> None:
        raise RuntimeError("listener down")

    async def main() -> None:
        d = Director(request(), clock, on_event=broken)
        assert (await d.handle_tool("next_question", {"reason": "x"}))["status"] == "ok"
        d.agent_said("Question?", 1, True)
        d.end("failed")
        assert d.end_reason == "failed" and len(d.transcript) == 1

    clock.run(main)


def test_blank_speech_is_not_transcribed_and_at_sets_timestamp() -> None:
    clock = VirtualClock()
    d, rec = make(clock)
    d.user_said("   ", 1)
    d.agent_said("", 1, False)
    assert d.transcript == [] and rec.events == []
    d.agent_said(" Hello Ada. ", 1, True, at=d.started_at + 2.5)
    assert d.transcript == [{"speaker": "agent", "text": "Hello Ada.", "timestamp": 2.5}]
    assert rec.events == [
        {"type": "transcript", "speaker": "agent", "text": "Hello Ada.", "timestamp": 2.5}
    ]


# -- time keeping ---------------------------------------------------------------------------


def test_over_budget_instruction_after_the_duration_and_not_before() -> None:
    clock = VirtualClock()

    async def main() -> None:
        d, _ = make(clock, n=2, duration=2)
        d.opening_turn(1)
        await ask_next(d, 1)
        assert d.turn_for(1, None, 2).instruction is None
        await clock.sleep(119.5)
        assert not d.over_budget()
        assert d.turn_for(2, None, 3).instruction is None
        await clock.sleep(0.5)
        assert d.over_budget()
        assert d.turn_for(3, None, 4).instruction == OVER_BUDGET
        await clock.sleep(30)
        assert d.turn_for(4, None, 5).instruction == OVER_BUDGET  # until the brain moves on
        await ask_next(d, 5)
        assert d.turn_for(5, None, 6).instruction is None  # a new question, a new budget
        await clock.sleep(120)
        assert d.turn_for(6, None, 7).instruction == OVER_BUDGET
        assert (await d.handle_tool("next_question", {"reason": "x"}))["status"] == (
            "no_more_questions"
        )
        assert d.turn_for(7, None, 8).instruction == CLOSE_NOW
        await d.handle_tool("end_interview", {"reason": "x"})
        assert d.turn_for(8, None, 9).instruction is None  # closing: no more guidance

    clock.run(main)


def test_wrap_up_instruction_near_the_deadline() -> None:
    clock = VirtualClock()

    async def main() -> None:
        d, _ = make(clock, n=2, duration=60, max_minutes=10, wrap_up_seconds=90)
        d.opening_turn(1)
        await ask_next(d, 1)
        await clock.sleep(10 * 60 - 90 - 1)
        assert d.turn_for(1, None, 2).instruction is None
        await clock.sleep(1)
        assert d.turn_for(2, None, 3).instruction == WRAP_UP

    clock.run(main)


def test_turn_for_carries_the_candidates_turn() -> None:
    d, _ = make(VirtualClock())
    turn = d.turn_for(7, b"\1\2", 9, text="hello", sample_rate=48000)
    assert (turn.turn_id, turn.audio, turn.epoch, turn.text, turn.sample_rate) == (
        7,
        b"\1\2",
        9,
        "hello",
        48000,
    )


# -- properties -------------------------------------------------------------------------------

operations = st.lists(
    st.one_of(
        st.tuples(st.just("tool"), st.sampled_from(["next_question", "end_interview", "nope"])),
        st.tuples(st.just("turn"), st.none()),
        st.tuples(st.just("finish"), st.integers(-1, 0)),
        st.tuples(st.just("sleep"), st.floats(0, 900)),
        st.tuples(
            st.just("end"), st.sampled_from(["candidate_left", "shutdown", "failed", "completed"])
        ),
        st.tuples(st.just("say"), st.sampled_from(["goodbye", "bye", "thanks", "that is all"])),
    ),
    max_size=40,
)


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 6), operations)
def test_any_sequence_keeps_progress_in_range_and_ends_at_most_once(
    n: int, ops: list[tuple[str, Any]]
) -> None:
    clock = VirtualClock()

    async def main() -> None:
        d, rec = make(clock, n=n, duration=1, max_minutes=30)
        epoch = 0
        previous = d.progress["questionIndex"]
        first_reason: str | None = None
        async with anyio.create_task_group() as tg:
            tg.start_soon(d.run_timer)
            for kind, arg in ops:
                if kind == "tool":
                    result = await d.handle_tool(arg, {"reason": "r"})
                    assert result["status"] in ("ok", "no_more_questions", "error")
                elif kind == "turn":
                    epoch += 1
                    d.turn_for(epoch, None, epoch)
                elif kind == "finish":
                    d.reply_finished(epoch + arg)
                elif kind == "sleep":
                    await clock.sleep(arg)
                elif kind == "end":
                    d.end(arg)
                else:
                    d.agent_said(arg, epoch, True)
                    d.user_said(arg, epoch)
                index = d.progress["questionIndex"]
                assert previous <= index <= n - 1
                previous = index
                ended = rec.of("ended")
                assert len(ended) == (1 if d.ended else 0)
                if first_reason is None:
                    first_reason = d.end_reason
                assert d.end_reason == first_reason
            d.end("shutdown")
        progress = [e["questionIndex"] for e in rec.of("progress")]
        assert progress == list(range(len(progress)))
        assert len(rec.of("ended")) == 1
        assert d.questions_asked == len(progress)

    clock.run(main)
