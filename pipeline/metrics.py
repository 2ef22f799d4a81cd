"""Per-turn latency timelines and usage counters (DESIGN.md §6).

A :class:`TurnTimeline` holds monotonic marks for one user turn. Stages mark what they see
(``timeline.mark(turn_id, "first_token")``); the first mark of a kind wins, so a stage can call
it on every chunk without checking. Derived figures are in milliseconds:

* ``endpointing_ms``   speech end → turn committed (the VAD hangover)
* ``llm_ttft_ms``      brain request → first token
* ``tts_ttfb_ms``      voice request → first audio
* ``voice_to_voice_ms`` speech end → first egress frame handed to the transport
* ``overhead_ms``      voice-to-voice minus endpointing, LLM and TTS waits: the framework's share
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Mark = Literal[
    "speech_end",
    "turn_committed",
    "brain_request",
    "first_token",
    "voice_request",
    "first_audio",
    "first_egress",
]
MARKS: tuple[Mark, ...] = (
    "speech_end",
    "turn_committed",
    "brain_request",
    "first_token",
    "voice_request",
    "first_audio",
    "first_egress",
)


def _span(marks: dict[str, float], a: str, b: str) -> float | None:
    if a in marks and b in marks:
        return round((marks[b] - marks[a]) * 1000.0, 3)
    return None


@dataclass
class TurnRecord:
    """The marks of one user turn and the figures derived from them."""

    turn_id: int
    marks: dict[str, float] = field(default_factory=dict)

    def figures(self) -> dict[str, float | None]:
        m = self.marks
        endpointing = _span(m, "speech_end", "turn_committed")
        ttft = _span(m, "brain_request", "first_token")
        ttfb = _span(m, "voice_request", "first_audio")
        v2v = _span(m, "speech_end", "first_egress")
        overhead = None
        if v2v is not None and None not in (endpointing, ttft, ttfb):
            overhead = round(v2v - (endpointing or 0) - (ttft or 0) - (ttfb or 0), 3)
        return {
            "endpointing_ms": endpointing,
            "llm_ttft_ms": ttft,
            "tts_ttfb_ms": ttfb,
            "voice_to_voice_ms": v2v,
            "overhead_ms": overhead,
        }

    def as_dict(self) -> dict[str, Any]:
        return {"turn_id": self.turn_id, "marks": dict(self.marks), **self.figures()}


class TurnTimeline:
    """All turns of one call. Marks are monotonic-clock seconds."""

    def __init__(self) -> None:
        self._turns: dict[int, TurnRecord] = {}

    def mark(self, turn_id: int | None, name: Mark, at: float) -> bool:
        """Record ``name`` for the turn unless already recorded. Returns True if recorded."""
        if turn_id is None:
            return False
        record = self._turns.setdefault(turn_id, TurnRecord(turn_id))
        if name in record.marks:
            return False
        record.marks[name] = at
        return True

    def get(self, turn_id: int) -> TurnRecord | None:
        return self._turns.get(turn_id)

    def turns(self) -> list[TurnRecord]:
        return [self._turns[k] for k in sorted(self._turns)]

    def summary(self) -> dict[str, dict[str, float] | int]:
        """p50/p95/max of every figure over the turns that have it."""
        out: dict[str, dict[str, float] | int] = {"turns": len(self._turns)}
        keys = ("endpointing_ms", "llm_ttft_ms", "tts_ttfb_ms", "voice_to_voice_ms", "overhead_ms")
        figures = [t.figures() for t in self.turns()]
        for key in keys:
            values = sorted(v for f in figures if (v := f[key]) is not None)
            if values:
                out[key] = {
                    "p50": round(percentile(values, 50), 3),
                    "p95": round(percentile(values, 95), 3),
                    "max": round(values[-1], 3),
                    "n": len(values),
                }
        return out

    def as_dict(self) -> dict[str, Any]:
        return {"turns": [t.as_dict() for t in self.turns()], "summary": self.summary()}


def percentile(sorted_values: list[float], pct: float) -> float:
    """Linearly interpolated percentile (0-100) of an already sorted, non-empty list."""
    if not sorted_values:
        raise ValueError("no values")
    k = (len(sorted_values) - 1) * min(max(pct, 0.0), 100.0) / 100.0
    lo = int(k)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (k - lo)


@dataclass
class Usage:
    """Usage counters for one call (what the providers will bill)."""

    llm_input_tokens: int = 0
    llm_output_tokens: int = 0
    tts_characters: int = 0
    audio_in_seconds: float = 0.0
    audio_out_seconds: float = 0.0
    frames_dropped: int = 0
    underruns: int = 0

    def add(self, **amounts: float) -> None:
        for key, value in amounts.items():
            if not hasattr(self, key):
                raise KeyError(f"unknown usage counter {key!r}")
            setattr(self, key, getattr(self, key) + value)

    def as_dict(self) -> dict[str, float]:
        return {
            "llm_input_tokens": self.llm_input_tokens,
            "llm_output_tokens": self.llm_output_tokens,
            "tts_characters": self.tts_characters,
            "audio_in_seconds": round(self.audio_in_seconds, 3),
            "audio_out_seconds": round(self.audio_out_seconds, 3),
            "frames_dropped": self.frames_dropped,
            "underruns": self.underruns,
        }
