"""The conversation stage between the director, the brain and the voice."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from interview.conversation import Conversation
from interview.director import Director
from interview.plan import parse_join_request
from pipeline.clock import VirtualClock
from pipeline.frames import AgentTextDelta
from pipeline.graph import Graph
from pipeline.stage import CallContext, Collect
from pipeline.supervisor import Supervisor
from stages.brain import BrainEvent, BrainSetup, BrainTurn, TextDelta, ToolCalled, ToolHandler
from stages.pacer import PlaybackReport

BODY = {
    "callId": "c1",
    "candidateName": "Ada",
    "jobTitle": "Engineer",
    "questions": [{"id": "q1", "text": "Why?", "type": "t", "duration": 2, "category": "c"}],
}


class SlowAfterToolBrain:
    """Says a sentence, calls a tool, then takes 2 s (a second model request) to go on."""

    name = "slow"

    def __init__(self, clock: VirtualClock) -> None:
        self.clock = clock

    async def start(self, setup: BrainSetup, tools: ToolHandler) -> None:
        self.tools = tools

    async def reply(self, turn: BrainTurn) -> AsyncIterator[BrainEvent]:
        yield TextDelta("Thank you.")
        result = await self.tools("next_question", {"reason": "opening"})
        yield ToolCalled("next_question", {"reason": "opening"}, result)
        await self.clock.sleep(2)
        yield TextDelta("Why?")

    def heard(self, epoch: int, text: str, completed: bool) -> None:
        pass

    async def aclose(self) -> None:
        pass


class Stamp(Collect):
    async def run(self, ctx: CallContext, inbox: Any, outbox: Any) -> None:
        async for frame in inbox:
            self.frames.append((ctx.clock.now(), frame))


def test_text_before_a_tool_call_is_released_to_the_voice_at_once() -> None:
    """The voice's chunker cuts a sentence only once whitespace follows it; the text before a
    tool call must not wait for the model's next request to get that whitespace."""
    clock = VirtualClock()
    sink = Stamp("voice")

    async def main() -> float:
        ctx = CallContext(clock=clock)
        director = Director(parse_join_request(BODY), clock)
        conversation = Conversation(
            director, SlowAfterToolBrain(clock), lambda e: PlaybackReport(e, 0, 0, False, "")
        )
        graph = Graph().chain(conversation, sink)
        sup = Supervisor(ctx, graph)
        start = clock.now()
        async with _stop_after(sup, clock, 5):
            await sup.run()
        return start

    start = clock.run(main)
    deltas = [(t - start, f.text) for t, f in sink.frames if isinstance(f, AgentTextDelta)]
    texts = [text for _, text in deltas]
    assert texts[:2] == ["Thank you.", " "]
    assert deltas[1][0] == 0  # the separator went out with the tool call, not 2 s later
    assert "Why?" in texts and deltas[texts.index("Why?")][0] == 2


class _stop_after:
    def __init__(self, sup: Supervisor, clock: VirtualClock, seconds: float) -> None:
        self.sup, self.clock, self.seconds = sup, clock, seconds

    async def __aenter__(self) -> None:
        import anyio

        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()

        async def stop() -> None:
            await self.clock.sleep(self.seconds)
            self.sup.stop("test over")

        self._tg.start_soon(stop)

    async def __aexit__(self, *exc: object) -> None:
        self._tg.cancel_scope.cancel()
        await self._tg.__aexit__(None, None, None)
