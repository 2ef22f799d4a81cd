"""The join request's checks and the question plan (interview/plan.py)."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from interview.plan import (
    JoinRequest,
    Limits,
    Question,
    QuestionPlan,
    RequestError,
    parse_join_request,
)

TOP_FIELDS = ("callId", "candidateName", "jobTitle", "questions")
QUESTION_FIELDS = ("id", "text", "type", "duration", "category", "keyPoints")


def body(**overrides: Any) -> dict[str, Any]:
    b: dict[str, Any] = {
        "callId": "call_1:a.b-c",
        "candidateName": "Ada Lovelace",
        "jobTitle": "Backend Engineer",
        "questions": [
            {
                "id": "q1",
                "text": "Tell me about yourself.",
                "type": "behavioral",
                "duration": 3,
                "category": "intro",
                "keyPoints": ["background", "motivation"],
            },
            {
                "id": "q2",
                "text": "Design a rate limiter.",
                "type": "technical",
                "duration": 5,
                "category": "system design",
            },
        ],
    }
    b.update(overrides)
    return b


# -- examples -------------------------------------------------------------------------------


def test_parses_the_web_app_payload() -> None:
    req = parse_join_request(body())
    assert req.call_id == "call_1:a.b-c"
    assert req.candidate_name == "Ada Lovelace"
    assert req.job_title == "Backend Engineer"
    assert req.questions == (
        Question(
            "q1", "Tell me about yourself.", "behavioral", 3, "intro", ("background", "motivation")
        ),
        Question("q2", "Design a rate limiter.", "technical", 5, "system design", ()),
    )
    assert req.questions[1].budget_seconds == 300


def test_error_message_names_field_and_reason() -> None:
    b = body()
    b["questions"][1]["duration"] = 0
    with pytest.raises(RequestError) as info:
        parse_join_request(b)
    assert info.value.field == "questions[1].duration"
    assert info.value.reason == "must be a positive integer (minutes)"
    assert str(info.value) == "questions[1].duration: must be a positive integer (minutes)"
    assert isinstance(info.value, ValueError)


def test_extra_fields_are_ignored() -> None:
    b = body(interviewType="tech", meta={"x": 1})
    b["questions"][0]["difficulty"] = "hard"
    assert parse_join_request(b) == parse_join_request(body())


def test_integral_float_duration_is_accepted_and_fraction_is_not() -> None:
    b = body()
    b["questions"][0]["duration"] = 5.0
    q = parse_join_request(b).questions[0]
    assert q.duration_min == 5 and isinstance(q.duration_min, int)
    for bad in (5.5, True, "5", float("nan"), float("inf"), -1, 0):
        b["questions"][0]["duration"] = bad
        with pytest.raises(RequestError, match=r"^questions\[0\]\.duration: "):
            parse_join_request(b)


def test_key_points_optional_null_and_blank_entries() -> None:
    b = body()
    b["questions"][0]["keyPoints"] = None
    assert parse_join_request(b).questions[0].key_points == ()
    b["questions"][0]["keyPoints"] = [" a ", "", "  ", "b"]
    assert parse_join_request(b).questions[0].key_points == ("a", "b")
    b["questions"][0]["keyPoints"] = ["a", 3]
    with pytest.raises(RequestError) as info:
        parse_join_request(b)
    assert info.value.field == "questions[0].keyPoints[1]"


def test_whitespace_is_stripped_and_blank_names_refused() -> None:
    req = parse_join_request(body(candidateName="  Ada  ", jobTitle="\tSRE\n"))
    assert (req.candidate_name, req.job_title) == ("Ada", "SRE")
    with pytest.raises(RequestError, match=r"^candidateName: must not be empty$"):
        parse_join_request(body(candidateName="   "))


def test_body_must_be_an_object() -> None:
    bad: Any
    for bad in (None, [], "x", 3):
        with pytest.raises(RequestError, match=r"^body: must be a JSON object$"):
            parse_join_request(bad)


def test_question_count_limits() -> None:
    q = body()["questions"][0]
    assert len(parse_join_request(body(questions=[q] * 100)).questions) == 100
    with pytest.raises(RequestError, match=r"^questions: must have at most 100 questions$"):
        parse_join_request(body(questions=[q] * 101))
    with pytest.raises(RequestError, match=r"^questions: must have at least one question$"):
        parse_join_request(body(questions=[]))


def test_call_id_rules() -> None:
    assert parse_join_request(body(callId="x" * 128)).call_id == "x" * 128
    for bad in ("", "x" * 129, "a b", "a/b", "caf\u00e9", "a\n"):
        with pytest.raises(RequestError) as info:
            parse_join_request(body(callId=bad))
        assert info.value.field == "callId"


def test_limits_are_configurable() -> None:
    with pytest.raises(RequestError, match=r"^questions: must have at most 1 questions$"):
        parse_join_request(body(), Limits(max_questions=1))


# -- properties -----------------------------------------------------------------------------

call_ids = st.from_regex(r"[A-Za-z0-9_\-:.]{1,128}", fullmatch=True)
nonblank = st.text(max_size=30).filter(lambda s: s.strip() != "")
labels = st.text(max_size=20)
durations = st.integers(1, 240) | st.integers(1, 240).map(float)
extras = st.dictionaries(
    st.text(max_size=8).filter(lambda k: k not in TOP_FIELDS + QUESTION_FIELDS),
    st.integers() | st.text(max_size=5) | st.none(),
    max_size=2,
)


@st.composite
def question_bodies(draw: st.DrawFn) -> dict[str, Any]:
    q: dict[str, Any] = {
        "id": draw(nonblank),
        "text": draw(nonblank),
        "type": draw(labels),
        "duration": draw(durations),
        "category": draw(labels),
    }
    key_points = draw(st.sampled_from(["missing", "null", "list"]))
    if key_points == "null":
        q["keyPoints"] = None
    elif key_points == "list":
        q["keyPoints"] = draw(st.lists(st.text(max_size=20), max_size=4))
    q.update(draw(extras))
    return q


@st.composite
def valid_bodies(draw: st.DrawFn) -> dict[str, Any]:
    b: dict[str, Any] = {
        "callId": draw(call_ids),
        "candidateName": draw(nonblank),
        "jobTitle": draw(nonblank),
        "questions": draw(st.lists(question_bodies(), min_size=1, max_size=6)),
    }
    b.update(draw(extras))
    return b


def normalised(b: dict[str, Any]) -> dict[str, Any]:
    """What the spec says a valid body means: known fields, stripped, keyPoints a list."""
    return {
        "callId": b["callId"],
        "candidateName": b["candidateName"].strip(),
        "jobTitle": b["jobTitle"].strip(),
        "questions": [
            {
                "id": q["id"].strip(),
                "text": q["text"].strip(),
                "type": q["type"].strip(),
                "duration": int(q["duration"]),
                "category": q["category"].strip(),
                "keyPoints": [p.strip() for p in q.get("keyPoints") or [] if p.strip()],
            }
            for q in b["questions"]
        ],
    }


@settings(max_examples=200)
@given(valid_bodies())
def test_valid_bodies_parse_and_round_trip(b: dict[str, Any]) -> None:
    original = copy.deepcopy(b)
    req = parse_join_request(b)
    assert b == original  # the input is not touched
    assert req.to_body() == normalised(b)
    assert parse_join_request(req.to_body()) == req
    assert isinstance(req, JoinRequest)


BAD_TOP: dict[str, list[Any]] = {
    "callId": [None, 7, "", "a b", "x" * 129, ["a"]],
    "candidateName": [None, 3, "  ", {"a": 1}],
    "jobTitle": [None, False, "", ["x"]],
    "questions": [None, {}, "q", [], 5],
}
BAD_QUESTION: dict[str, list[Any]] = {
    "id": [None, 1, " "],
    "text": [None, "", "\n\t", 2.5],
    "type": [None, 3, ["t"]],
    "duration": [None, 0, -3, 1.5, True, "5", float("nan"), 241, [5]],
    "category": [None, 1.0, {}],
    "keyPoints": ["a", 3, {"a": "b"}],
}


@st.composite
def invalid_bodies(draw: st.DrawFn) -> tuple[dict[str, Any], str]:
    """A valid body with exactly one thing broken, and the field the error must name."""
    b = draw(valid_bodies())
    where = draw(st.sampled_from(["top", "question", "question_shape", "key_point", "missing"]))
    if where == "top":
        key = draw(st.sampled_from(sorted(BAD_TOP)))
        b[key] = draw(st.sampled_from(BAD_TOP[key]))
        return b, key
    i = draw(st.integers(0, len(b["questions"]) - 1))
    q = b["questions"][i]
    if where == "question":
        key = draw(st.sampled_from(sorted(BAD_QUESTION)))
        q[key] = draw(st.sampled_from(BAD_QUESTION[key]))
        return b, f"questions[{i}].{key}"
    if where == "question_shape":
        b["questions"][i] = draw(st.sampled_from([None, "q", 3, ["id"]]))
        return b, f"questions[{i}]"
    if where == "key_point":
        points: list[Any] = draw(st.lists(st.text(max_size=5), max_size=3))
        j = draw(st.integers(0, len(points)))
        points.insert(j, draw(st.sampled_from([1, None, ["x"], {"k": "v"}])))
        q["keyPoints"] = points
        return b, f"questions[{i}].keyPoints[{j}]"
    key = draw(st.sampled_from(["callId", "candidateName", "jobTitle", "questions"] + ["q"] * 4))
    if key != "q":
        del b[key]
        return b, key
    qkey = draw(st.sampled_from(["id", "text", "type", "duration", "category"]))
    del q[qkey]
    return b, f"questions[{i}].{qkey}"


@settings(max_examples=300)
@given(invalid_bodies())
def test_invalid_bodies_name_the_broken_field(case: tuple[dict[str, Any], str]) -> None:
    b, field = case
    with pytest.raises(RequestError) as info:
        parse_join_request(b)
    assert info.value.field == field
    assert str(info.value) == f"{field}: {info.value.reason}"
    assert info.value.reason


# -- the plan -------------------------------------------------------------------------------


def plan_of(*categories: str, duration: int = 2) -> QuestionPlan:
    return QuestionPlan(
        [Question(f"q{i}", f"Question {i}?", "t", duration, c) for i, c in enumerate(categories)]
    )


def test_plan_walks_the_questions_in_order() -> None:
    plan = plan_of("intro", "tech")
    assert plan.index == -1 and plan.asked == 0 and plan.current is None
    assert plan.progress() == {"questionIndex": -1, "category": "", "totalQuestions": 2}
    assert plan.budget_seconds() == 0
    first = plan.advance()
    assert first is not None and first.category == "intro"
    assert plan.progress() == {"questionIndex": 0, "category": "intro", "totalQuestions": 2}
    assert plan.budget_seconds() == 120 and not plan.all_asked
    second = plan.advance()
    assert second is not None and second.id == "q1"
    assert plan.all_asked and not plan.exhausted
    assert plan.advance() is None
    assert plan.exhausted and plan.index == 1 and plan.asked == 2
    assert plan.progress() == {"questionIndex": 1, "category": "tech", "totalQuestions": 2}
    assert plan.total_budget_seconds == 240


def test_plan_needs_a_question() -> None:
    with pytest.raises(ValueError):
        QuestionPlan([])


@given(st.integers(1, 12), st.integers(0, 30))
def test_plan_index_moves_forward_and_stays_in_range(n: int, steps: int) -> None:
    plan = plan_of(*[f"c{i}" for i in range(n)])
    previous = plan.index
    for _ in range(steps):
        q = plan.advance()
        assert previous <= plan.index <= n - 1
        assert (q is None) == (previous == n - 1)
        if q is not None:
            assert plan.index == previous + 1 and plan.current == q
        previous = plan.index
    assert plan.asked == min(steps, n)
    assert plan.exhausted == (steps > n)
