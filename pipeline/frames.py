"""Frame types: the small immutable messages that flow between stages.

Every frame is a frozen, slotted dataclass so that it is cheap to create and safe to share
between fan-out branches. Frames that belong to an agent reply carry that reply's ``epoch``;
the graph drops them once the control lane has moved past that epoch (barge-in). Frames that
belong to a user turn carry its ``turn_id`` so metrics and transcripts can be joined later.

Times are in seconds. ``capture_time`` is in the audio's own capture clock (for live audio the
ingress maps it onto the call's monotonic clock; for files it is the position in the file plus
the moment the file started).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Speaker = Literal["agent", "user"]


@dataclass(frozen=True, slots=True)
class AudioChunk:
    """Candidate (or any inbound) audio: 16-bit little-endian PCM, interleaved."""

    pcm: bytes
    sample_rate: int
    capture_time: float
    channels: int = 1

    @property
    def samples(self) -> int:
        return len(self.pcm) // (2 * self.channels)

    @property
    def duration(self) -> float:
        return self.samples / self.sample_rate


@dataclass(frozen=True, slots=True)
class UserSpeechStarted:
    """The VAD heard the candidate start speaking (``at`` in the capture clock)."""

    turn_id: int
    at: float


@dataclass(frozen=True, slots=True)
class UserSpeechStopped:
    """The candidate's speech ended (``at`` = end of the last voiced frame, capture clock)."""

    turn_id: int
    at: float


@dataclass(frozen=True, slots=True)
class UserTurn:
    """A committed user turn: its audio (with pre-roll) and its bounds in the capture clock."""

    turn_id: int
    pcm: bytes
    sample_rate: int
    start: float
    end: float
    text: str = ""

    @property
    def duration(self) -> float:
        return len(self.pcm) / 2 / self.sample_rate


@dataclass(frozen=True, slots=True)
class AgentTextDelta:
    """A piece of the agent's reply text as the brain produces it. ``final`` ends the reply."""

    epoch: int
    text: str
    turn_id: int | None = None
    final: bool = False


@dataclass(frozen=True, slots=True)
class AgentAudio:
    """A piece of the agent's spoken reply (16-bit mono PCM). ``final`` ends the reply."""

    epoch: int
    pcm: bytes
    sample_rate: int
    turn_id: int | None = None
    final: bool = False
    text: str = ""

    @property
    def duration(self) -> float:
        return len(self.pcm) / 2 / self.sample_rate


@dataclass(frozen=True, slots=True)
class TranscriptEntry:
    """One line of the transcript; ``timestamp`` is seconds since the interview started."""

    speaker: Speaker
    text: str
    timestamp: float
    turn_id: int | None = None


@dataclass(frozen=True, slots=True)
class EndOfStream:
    """Explicit end marker for transports that cannot close a stream (e.g. a file's end).

    Inside a graph, end-of-stream is the closing of a stage's inbox; this frame exists for
    stages that must tell a peer "no more" without closing (and for batch runs).
    """

    reason: str = ""


Frame = (
    AudioChunk
    | UserSpeechStarted
    | UserSpeechStopped
    | UserTurn
    | AgentTextDelta
    | AgentAudio
    | TranscriptEntry
    | EndOfStream
)


def frame_epoch(frame: object) -> int | None:
    """The agent-reply epoch a frame belongs to, or None for frames outside any reply."""
    return getattr(frame, "epoch", None)
