"""The question plan: the join request, checked, and the interview's position in it.

The SyncHire web app posts the join request of DESIGN.md §7. :func:`parse_join_request` turns
that JSON body into a :class:`JoinRequest` or raises :class:`RequestError` naming the field and
why (the server answers 422 with that message; the original service answered 200 to anything).
Fields the web app may add later are ignored.

Type rules (decided here, relied on by the server and the batch run):

* text fields must be JSON strings; surrounding whitespace is stripped. ``candidateName``,
  ``jobTitle``, ``questions[i].id`` and ``questions[i].text`` must not be blank; ``type`` and
  ``category`` are labels and may be empty;
* ``duration`` is a whole number of minutes ≥ 1. An integral float such as ``5.0`` is accepted
  (JSON has one number type and some clients serialise every number with a decimal point);
  ``5.5``, ``"5"`` and ``true`` are not;
* ``keyPoints`` is optional (missing or null means none); when present it is a list of strings;
  blank entries are dropped (an empty row in the web app's form must not refuse an interview).

:class:`QuestionPlan` is the interview's position in the questions: which one is current,
progress in the original event shape, and each question's time budget. Pure, no I/O, no clock.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

_CALL_ID = re.compile(r"[A-Za-z0-9_\-:.]+")


class RequestError(ValueError):
    """A join request field is missing or invalid. ``str(err)`` is ``"field: reason"``."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds on a join request; they keep the system instruction and the transcript sane."""

    max_call_id: int = 128
    """callId length (it names files in the outbox and appears in URLs)."""
    max_questions: int = 100
    max_name: int = 200
    """candidateName and jobTitle."""
    max_text: int = 4000
    """One question's text."""
    max_label: int = 200
    """Question id, type and category."""
    max_key_points: int = 50
    max_key_point: int = 1000
    max_duration_min: int = 240
    """One question's duration in minutes (the whole interview is capped separately)."""


DEFAULT_LIMITS = Limits()


@dataclass(frozen=True, slots=True)
class Question:
    """One question of the plan, as the web app sent it (``duration`` in minutes)."""

    id: str
    text: str
    type: str
    duration_min: int
    category: str
    key_points: tuple[str, ...] = ()

    @property
    def budget_seconds(self) -> int:
        """The time the interviewer may spend on this question, follow-ups included."""
        return self.duration_min * 60

    def to_body(self) -> dict[str, Any]:
        """The question in the web app's field names."""
        return {
            "id": self.id,
            "text": self.text,
            "type": self.type,
            "duration": self.duration_min,
            "category": self.category,
            "keyPoints": list(self.key_points),
        }


@dataclass(frozen=True, slots=True)
class JoinRequest:
    """A checked join request."""

    call_id: str
    candidate_name: str
    job_title: str
    questions: tuple[Question, ...]

    def to_body(self) -> dict[str, Any]:
        """The request in the web app's field names (parses back to an equal request)."""
        return {
            "callId": self.call_id,
            "candidateName": self.candidate_name,
            "jobTitle": self.job_title,
            "questions": [q.to_body() for q in self.questions],
        }


def _get(obj: Mapping[str, Any], key: str, path: str) -> Any:
    if key not in obj or obj[key] is None:
        raise RequestError(path, "is required")
    return obj[key]


def _string(obj: Mapping[str, Any], key: str, path: str, max_len: int, blank: bool) -> str:
    value = _get(obj, key, path)
    if not isinstance(value, str):
        raise RequestError(path, "must be a string")
    value = value.strip()
    if not value and not blank:
        raise RequestError(path, "must not be empty")
    if len(value) > max_len:
        raise RequestError(path, f"must be at most {max_len} characters")
    return value


def _duration(obj: Mapping[str, Any], path: str, limits: Limits) -> int:
    value = _get(obj, "duration", path)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise RequestError(path, "must be a positive integer (minutes)")
    if value > limits.max_duration_min:
        raise RequestError(path, f"must be at most {limits.max_duration_min} (minutes)")
    return value


def _key_points(obj: Mapping[str, Any], path: str, limits: Limits) -> tuple[str, ...]:
    value = obj.get("keyPoints")
    if value is None:
        return ()
    if not isinstance(value, list):
        raise RequestError(path, "must be a list of strings")
    if len(value) > limits.max_key_points:
        raise RequestError(path, f"must have at most {limits.max_key_points} entries")
    points: list[str] = []
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise RequestError(f"{path}[{i}]", "must be a string")
        item = item.strip()
        if len(item) > limits.max_key_point:
            raise RequestError(f"{path}[{i}]", f"must be at most {limits.max_key_point} characters")
        if item:
            points.append(item)
    return tuple(points)


def _question(value: Any, path: str, limits: Limits) -> Question:
    if not isinstance(value, Mapping):
        raise RequestError(path, "must be an object")
    return Question(
        id=_string(value, "id", f"{path}.id", limits.max_label, blank=False),
        text=_string(value, "text", f"{path}.text", limits.max_text, blank=False),
        type=_string(value, "type", f"{path}.type", limits.max_label, blank=True),
        duration_min=_duration(value, f"{path}.duration", limits),
        category=_string(value, "category", f"{path}.category", limits.max_label, blank=True),
        key_points=_key_points(value, f"{path}.keyPoints", limits),
    )


def parse_join_request(body: Any, limits: Limits = DEFAULT_LIMITS) -> JoinRequest:
    """Check a decoded JSON join request; raise :class:`RequestError` on the first bad field."""
    if not isinstance(body, Mapping):
        raise RequestError("body", "must be a JSON object")
    call_id = _get(body, "callId", "callId")
    if not isinstance(call_id, str):
        raise RequestError("callId", "must be a string")
    if not (1 <= len(call_id) <= limits.max_call_id) or not _CALL_ID.fullmatch(call_id):
        raise RequestError(
            "callId", f"must be 1-{limits.max_call_id} characters of A-Z a-z 0-9 _ - : ."
        )
    candidate = _string(body, "candidateName", "candidateName", limits.max_name, blank=False)
    job_title = _string(body, "jobTitle", "jobTitle", limits.max_name, blank=False)
    raw_questions = _get(body, "questions", "questions")
    if not isinstance(raw_questions, list):
        raise RequestError("questions", "must be a list of questions")
    if not raw_questions:
        raise RequestError("questions", "must have at least one question")
    if len(raw_questions) > limits.max_questions:
        raise RequestError("questions", f"must have at most {limits.max_questions} questions")
    questions = tuple(_question(q, f"questions[{i}]", limits) for i, q in enumerate(raw_questions))
    return JoinRequest(call_id, candidate, job_title, questions)


class QuestionPlan:
    """The questions in order and which one the interview is on.

    ``index`` is -1 until the first question is asked, then the 0-based index of the current
    question; it only moves forward. Once every question has been asked, :meth:`advance`
    returns None and leaves ``index`` on the last one (``exhausted`` becomes True).
    """

    def __init__(self, questions: Sequence[Question]) -> None:
        if not questions:
            raise ValueError("a question plan needs at least one question")
        self._questions = tuple(questions)
        self._index = -1
        self._exhausted = False

    @classmethod
    def from_request(cls, request: JoinRequest) -> QuestionPlan:
        return cls(request.questions)

    @property
    def questions(self) -> tuple[Question, ...]:
        return self._questions

    @property
    def total(self) -> int:
        return len(self._questions)

    @property
    def index(self) -> int:
        return self._index

    @property
    def asked(self) -> int:
        """How many questions have been asked so far."""
        return self._index + 1

    @property
    def current(self) -> Question | None:
        return self._questions[self._index] if self._index >= 0 else None

    @property
    def all_asked(self) -> bool:
        """True once the last question has been asked."""
        return self.asked == self.total

    @property
    def exhausted(self) -> bool:
        """True once more questions were asked for after the last one (time to close)."""
        return self._exhausted

    def advance(self) -> Question | None:
        """Move to the next question and return it, or None when every question was asked."""
        if self.all_asked:
            self._exhausted = True
            return None
        self._index += 1
        return self._questions[self._index]

    def progress(self) -> dict[str, Any]:
        """Progress in the original event shape (without ``type``); index -1 before the first."""
        current = self.current
        return {
            "questionIndex": self._index,
            "category": current.category if current else "",
            "totalQuestions": self.total,
        }

    def budget_seconds(self, index: int | None = None) -> int:
        """The time budget of question ``index`` (default: the current one; 0 before any)."""
        i = self._index if index is None else index
        return self._questions[i].budget_seconds if i >= 0 else 0

    @property
    def total_budget_seconds(self) -> int:
        return sum(q.budget_seconds for q in self._questions)
