"""The brain protocol: what the interview director needs of an interviewer's mind.

Small on purpose. The scripted offline interviewer (stages/local.py) and the Gemini brain
(stages/gemini.py) implement it; the interview director drives it. It knows nothing of
vendors and nothing of the interview's state beyond what the director tells it.

One reply per call of :meth:`Brain.reply`. The brain streams text as it is produced (so the
voice can start speaking before the reply is complete) and calls the director's tools through
the :class:`ToolHandler` it was started with, feeding the results back to its model itself.
After a reply has been spoken (or cut short), the director calls :meth:`Brain.heard` with the
text the candidate actually heard, so the brain's history holds only that.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable


@dataclass(frozen=True, slots=True)
class ToolSpec:
    """A function the brain may call: name, description and JSON-schema parameters."""

    name: str
    description: str
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class BrainSetup:
    """Everything a brain needs before the first reply."""

    system_instruction: str
    tools: tuple[ToolSpec, ...] = ()
    language: str = "en"
    context: dict[str, Any] = field(default_factory=dict)
    """Facts of the interview a simple brain may use directly (``candidateName``, ``jobTitle``)."""


@dataclass(frozen=True, slots=True)
class BrainTurn:
    """The input of one reply.

    ``audio`` is the candidate's turn (16-bit mono PCM at ``sample_rate``) or None for a reply
    that no speech prompted (the opening, a nudge after silence). ``text`` is a transcript of the
    turn when one is already known. ``instruction`` is the director's guidance for this reply
    (e.g. "the time for this question is up: move on").
    """

    epoch: int
    turn_id: int | None = None
    audio: bytes | None = None
    sample_rate: int = 16000
    text: str | None = None
    instruction: str | None = None


@dataclass(frozen=True, slots=True)
class TextDelta:
    text: str


@dataclass(frozen=True, slots=True)
class UserTranscript:
    """What the brain understood the candidate to say (for the transcript)."""

    turn_id: int | None
    text: str


@dataclass(frozen=True, slots=True)
class ToolCalled:
    """A tool the brain called during the reply, with the handler's result."""

    name: str
    args: dict[str, Any]
    result: dict[str, Any]


@dataclass(frozen=True, slots=True)
class BrainUsage:
    input_tokens: int = 0
    output_tokens: int = 0


BrainEvent = TextDelta | UserTranscript | ToolCalled | BrainUsage

ToolHandler = Callable[[str, dict[str, Any]], Awaitable[dict[str, Any]]]


class BrainError(Exception):
    """The brain cannot go on (bad key, model refused): the interview should fail."""


@runtime_checkable
class Brain(Protocol):
    name: str
    """What `/` reports as the llm, e.g. ``"scripted (offline)"`` or ``"gemini-2.5-flash"``."""

    async def start(self, setup: BrainSetup, tools: ToolHandler) -> None:
        """Open sessions, remember the setup and the tool handler."""
        ...

    def reply(self, turn: BrainTurn) -> AsyncIterator[BrainEvent]:
        """Stream one reply. Cancelling the iteration cancels the generation."""
        ...

    def heard(self, epoch: int, text: str, completed: bool) -> None:
        """Record what the candidate heard of reply ``epoch`` (all of it when ``completed``)."""
        ...

    async def aclose(self) -> None: ...
