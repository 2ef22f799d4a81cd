"""Interview results that are never lost (DESIGN.md §7; issue 4, item 5): what a result says.

The pieces, in the order an interview meets them:

* :class:`Transcript` merges consecutive fragments of one speaker into one entry.
* :func:`completion_payload` builds the completion webhook body: every field the web app reads
  today plus ``durationSeconds``, ``endReason``, ``questionsAsked``, ``totalQuestions`` and
  ``latency``.
* :func:`sign` / :func:`verify_signature`: ``X-SyncHire-Signature: t=<unix>,v1=<hex HMAC-SHA256 of
  "<t>.<raw body>">``. The timestamp lets a receiver reject replays.
* The durable outbox and the delivery (:class:`interview.outbox.ResultsService`) live in
  :mod:`interview.outbox`.

Status of a result (``status``; ``endReason`` keeps the precise reason):

==========================================  =========================================
endReason                                   status
==========================================  =========================================
completed, ended_by_agent                   completed
candidate_left, max_duration, shutdown      completed if the candidate said anything,
                                            abandoned otherwise
failed                                      failed
crashed (checkpoint of a killed process)    abandoned
==========================================  =========================================
"""

from __future__ import annotations

import hashlib
import hmac
import math
import re
import time
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any, Literal
from urllib.parse import urlsplit

SIGNATURE_HEADER = "X-SyncHire-Signature"
IDEMPOTENCY_HEADER = "Idempotency-Key"
WEBHOOK_PATH = "/api/webhooks/interview-complete"

Speaker = Literal["agent", "user"]
Status = Literal["completed", "failed", "abandoned"]
#: The director's end reasons plus ``crashed`` (a checkpoint recovered after the process died).
END_REASONS = frozenset(
    {
        "completed",
        "ended_by_agent",
        "candidate_left",
        "max_duration",
        "shutdown",
        "failed",
        "crashed",
    }
)
_NEEDS_CANDIDATE = frozenset({"candidate_left", "max_duration", "shutdown"})
_CALL_ID = re.compile(r"[A-Za-z0-9_\-:.]{1,128}")


def _check_call_id(value: Any, name: str) -> str:
    if not isinstance(value, str) or not _CALL_ID.fullmatch(value):
        raise ValueError(f"{name}: must be 1-128 characters of A-Z a-z 0-9 _ - : .")
    return value


# --------------------------------------------------------------------------- transcript


class Transcript:
    """Transcript entries ``{speaker, text, timestamp}`` (seconds since the interview started).

    Consecutive fragments of one speaker become one entry (texts joined with a space, the first
    fragment's timestamp), so the web app sees turns, not the transcriber's chunks.
    """

    def __init__(self, entries: Iterable[Mapping[str, Any]] = ()) -> None:
        self._entries: list[dict[str, Any]] = []
        for i, entry in enumerate(entries):
            try:
                self.add(entry["speaker"], entry["text"], entry["timestamp"])
            except KeyError as exc:
                raise ValueError(f"transcript[{i}].{exc.args[0]}: missing") from None
            except ValueError as exc:
                raise ValueError(f"transcript[{i}].{exc}") from None

    def add(self, speaker: str, text: str, timestamp: float) -> bool:
        """Add a fragment; blank text is ignored. Returns whether the transcript changed."""
        if speaker not in ("agent", "user"):
            raise ValueError(f"speaker: must be 'agent' or 'user', got {speaker!r}")
        if not isinstance(text, str):
            raise ValueError("text: must be a string")
        if isinstance(timestamp, bool) or not isinstance(timestamp, int | float):
            raise ValueError("timestamp: must be a number of seconds")
        if not math.isfinite(timestamp) or timestamp < 0:
            raise ValueError("timestamp: must be finite and not negative")
        text = text.strip()
        if not text:
            return False
        if self._entries and self._entries[-1]["speaker"] == speaker:
            self._entries[-1]["text"] += " " + text
        else:
            self._entries.append(
                {"speaker": speaker, "text": text, "timestamp": round(timestamp, 2)}
            )
        return True

    def entries(self) -> list[dict[str, Any]]:
        """A copy of the entries, safe to serialise or hand to another task."""
        return [dict(e) for e in self._entries]

    @property
    def candidate_spoke(self) -> bool:
        return any(e["speaker"] == "user" for e in self._entries)

    def __len__(self) -> int:
        return len(self._entries)


# --------------------------------------------------------------------------- payload


def completion_status(end_reason: str, *, candidate_spoke: bool) -> Status:
    """The web app's ``status`` for an end reason (table in the module docstring)."""
    if end_reason not in END_REASONS:
        raise ValueError(
            f"endReason: unknown {end_reason!r}; expected one of {sorted(END_REASONS)}"
        )
    if end_reason == "failed":
        return "failed"
    if end_reason == "crashed" or (end_reason in _NEEDS_CANDIDATE and not candidate_spoke):
        return "abandoned"
    return "completed"


def _iso_utc(unix_s: float) -> str:
    stamp = datetime.fromtimestamp(unix_s, UTC).isoformat(timespec="milliseconds")
    return stamp.replace("+00:00", "Z")


def completion_payload(
    *,
    call_id: str,
    candidate_name: str,
    job_title: str,
    started_at: float,
    ended_at: float,
    end_reason: str,
    transcript: Transcript | Iterable[Mapping[str, Any]],
    questions_asked: int = 0,
    total_questions: int = 0,
    latency: Mapping[str, Any] | None = None,
    score: float | None = None,
    ai_evaluation: Any = None,
) -> dict[str, Any]:
    """The completion webhook body. ``started_at`` / ``ended_at`` are unix seconds.

    The original fields come first, unchanged in name and type (``durationMinutes`` rounded to
    2 decimals as the original did; ``completedAt`` ISO 8601 UTC with ``Z``). ``score`` and
    ``aiEvaluation`` are included only when given.
    """
    _check_call_id(call_id, "interviewId")
    entries = transcript if isinstance(transcript, Transcript) else Transcript(transcript)
    status = completion_status(end_reason, candidate_spoke=entries.candidate_spoke)
    seconds = max(0.0, float(ended_at) - float(started_at))
    payload: dict[str, Any] = {
        "interviewId": call_id,
        "candidateName": candidate_name,
        "jobTitle": job_title,
        "durationMinutes": round(seconds / 60.0, 2),
        "completedAt": _iso_utc(ended_at),
        "status": status,
        "transcript": entries.entries(),
        "durationSeconds": round(seconds, 1),
        "endReason": end_reason,
        "questionsAsked": int(questions_asked),
        "totalQuestions": int(total_questions),
        "latency": dict(latency or {}),
    }
    if score is not None:
        payload["score"] = score
    if ai_evaluation is not None:
        payload["aiEvaluation"] = ai_evaluation
    return payload


# --------------------------------------------------------------------------- signing


def signing_secret(webhook_secret: str | None, api_secret_key: str | None) -> str | None:
    """``WEBHOOK_SECRET``, falling back to ``API_SECRET_KEY`` (blank counts as unset)."""
    return (webhook_secret or "").strip() or (api_secret_key or "").strip() or None


def _mac(secret: str, timestamp: int, body: bytes) -> str:
    message = str(timestamp).encode() + b"." + body
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def sign(secret: str, body: bytes, timestamp: int) -> str:
    """The ``X-SyncHire-Signature`` value for ``body`` sent at ``timestamp`` (unix seconds)."""
    return f"t={timestamp},v1={_mac(secret, timestamp, body)}"


def verify_signature(
    secret: str, header: str | None, body: bytes, tolerance_s: float = 300, now: float | None = None
) -> bool:
    """Whether ``header`` signs ``body`` with ``secret`` within ``tolerance_s`` of ``now``.

    For receivers: verify the raw request body before parsing it, and reject when this is False
    (a wrong secret, a tampered body, or a timestamp too old or too far ahead: a replay). Several
    ``v1=`` values are accepted, so a sender may sign with two secrets during a rotation.
    """
    if not secret or not header:
        return False
    stamp: str | None = None
    candidates: list[str] = []
    for part in header.split(","):
        key, sep, value = part.strip().partition("=")
        if sep and key == "t":
            stamp = value
        elif sep and key == "v1":
            candidates.append(value)
    if stamp is None or not re.fullmatch(r"[0-9]{1,12}", stamp) or not candidates:
        return False
    current = time.time() if now is None else now
    if abs(current - int(stamp)) > tolerance_s:
        return False
    expected = _mac(secret, int(stamp), body).encode()
    return any(hmac.compare_digest(expected, c.encode()) for c in candidates)


def webhook_url(base_url: str) -> str:
    """``{NEXTJS_WEBHOOK_URL}/api/webhooks/interview-complete`` (a trailing slash is dropped)."""
    base = base_url.strip().rstrip("/")
    parts = urlsplit(base)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError("NEXTJS_WEBHOOK_URL: must be an absolute http(s) URL")
    return base + WEBHOOK_PATH


def idempotency_key(call_id: str, result_id: str) -> str:
    """The same for every attempt, from any instance, to deliver one result."""
    return f"{call_id}:{result_id}"
