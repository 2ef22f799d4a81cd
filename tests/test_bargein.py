"""Barge-in: user speech over the agent's voice interrupts it; coughs and short sounds do not.

The pure policy gets hypothesis properties; the stage runs in a graph on a virtual clock, with
the microphone played at capture pace and the agent's playback driven by a schedule.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import anyio
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.audio import WavAudio, read_wav
from pipeline.clock import VirtualClock
from pipeline.control import Interrupt
from pipeline.frames import AudioChunk, UserSpeechStarted, UserTurn
from pipeline.graph import Graph
from pipeline.stage import CallContext, Collect, Inbox, Outbox
from pipeline.supervisor import Supervisor
from stages.vad import FRAME_S, AgentSpeech, BargeInPolicy, VadOptions, VadStage, VadStateMachine

FIXTURES = Path(__file__).parent / "fixtures"
LAYOUT = json.loads((FIXTURES / "layout.json").read_text())
RATE = 16000
TOLERANCE_S = 0.060  # the fixtures' boundary tolerance


# ----------------------------------------------------------------------------------------------
# The pure policy


@settings(max_examples=300, deadline=None)
@given(
    runs=st.lists(st.tuples(st.booleans(), st.integers(1, 40)), min_size=1, max_size=30),
    agent_frame=st.integers(0, 200),
    guard_frames=st.integers(0, 30),
    min_frames=st.integers(0, 40),
)
def test_policy_fires_once_per_long_enough_utterance(
    runs: list[tuple[bool, int]], agent_frame: int, guard_frames: int, min_frames: int
) -> None:
    flags = [v for v, n in runs for _ in range(n)]
    options = VadOptions(
        start_ms=100, stop_ms=200, interrupt_min_ms=min_frames * 20, echo_guard_ms=guard_frames * 20
    )
    machine, policy = VadStateMachine(options), BargeInPolicy(options)
    agent_at = agent_frame * FRAME_S
    guard_end = agent_at + options.echo_guard_ms / 1000
    need = options.interrupt_min_ms / 1000
    fired: dict[int, float] = {}  # utterance → frame end at which it fired
    extent: dict[int, float] = {}  # utterance → longest counted speech seen
    for i, voiced in enumerate(flags):
        t = i * FRAME_S
        machine.push(voiced, t)
        speaking_agent = agent_at if t >= agent_at else None
        fire = policy.check(machine, speaking_agent)
        u = machine.utterances
        if machine.in_speech and speaking_agent is not None:
            assert machine.run_start is not None and machine.last_voiced_end is not None
            counted = machine.last_voiced_end - max(machine.run_start, guard_end)
            extent[u] = max(extent.get(u, -1.0), counted)
        if fire:
            assert u not in fired, "at most one interrupt per utterance"
            fired[u] = t + FRAME_S
            assert extent[u] >= need - 1e-9, "never for speech shorter than interrupt_min_ms"
        elif machine.in_speech and u in extent and u not in fired:
            assert extent[u] < need - 1e-9 or not voiced, (
                "fires as soon as the speech is long enough"
            )
    for u, longest in extent.items():
        assert (u in fired) == (longest >= need - 1e-9)


def test_policy_ignores_silence_and_agent_not_speaking() -> None:
    options = VadOptions(start_ms=40, interrupt_min_ms=40)
    machine, policy = VadStateMachine(options), BargeInPolicy(options)
    for i in range(10):
        machine.push(True, i * FRAME_S)
        assert not policy.check(machine, None)
    assert policy.check(machine, 0.0)


def test_agent_speech_keeps_the_first_start() -> None:
    agent = AgentSpeech()
    agent.started(5.0)
    agent.started(6.0)
    assert (agent.speaking, agent.started_at) == (True, 5.0)
    agent.stopped()
    assert (agent.speaking, agent.started_at) == (False, None)
    vad = VadStage(agent=agent)
    vad.agent_started(7.0)
    assert agent.started_at == 7.0
    vad.agent_stopped()
    assert not agent.speaking


# ----------------------------------------------------------------------------------------------
# Through a graph on a virtual clock


class Mic:
    """Plays 16 kHz mono PCM in 20 ms chunks at capture pace; capture_time = clock at start."""

    name = "mic"

    def __init__(self, pcm: bytes, t0: float) -> None:
        self.pcm, self.t0 = pcm, t0

    async def run(self, ctx: CallContext, inbox: Inbox, outbox: Outbox) -> None:
        step = RATE // 50 * 2
        for offset in range(0, len(self.pcm), step):
            start = self.t0 + offset / (2 * RATE)
            piece = self.pcm[offset : offset + step]
            await ctx.clock.sleep_until(start + len(piece) / (2 * RATE))
            await outbox.send(AudioChunk(piece, RATE, start))


class AgentPlayback:
    """Stands in for the pacer: marks the agent speaking over ``[start, end)`` (seconds from
    t0) and, like the pacer, stops speaking when interrupted (unless ``keep_talking``)."""

    name = "agent"

    def __init__(
        self, agent: AgentSpeech, t0: float, spans: list[tuple[float, float]], keep_talking: bool
    ) -> None:
        self.agent, self.t0, self.spans, self.keep_talking = agent, t0, spans, keep_talking

    async def run(self, ctx: CallContext, inbox: Inbox, outbox: Outbox) -> None:
        if not self.keep_talking:
            ctx.control.subscribe(lambda _: self.agent.stopped())
        for start, end in self.spans:
            await ctx.clock.sleep_until(self.t0 + start)
            self.agent.started(ctx.clock.now())
            await ctx.clock.sleep_until(self.t0 + end)
            self.agent.stopped()


def run_call(
    pcm: bytes,
    agent_spans: list[tuple[float, float]],
    options: VadOptions | None = None,
    keep_talking: bool = False,
) -> tuple[CallContext, list[Interrupt], list[Any], float]:
    clock = VirtualClock()
    ctx = CallContext(clock=clock)
    interrupts: list[Interrupt] = []
    ctx.control.subscribe(interrupts.append)
    sink = Collect()

    async def main() -> float:
        t0 = clock.now()
        agent = AgentSpeech()
        graph = Graph().chain(Mic(pcm, t0), VadStage(options, agent=agent), sink)
        graph.add(AgentPlayback(agent, t0, agent_spans, keep_talking))
        with anyio.fail_after(120):
            result = await Supervisor(ctx, graph).run()
        assert result.status == "completed", result.reason
        return t0

    t0 = clock.run(main)
    return ctx, interrupts, sink.frames, t0


def fixture(name: str) -> tuple[WavAudio, dict[str, Any]]:
    return read_wav(FIXTURES / name), LAYOUT["files"][name]


def utterance_pcm(name: str, index: int = 0) -> bytes:
    audio, spec = fixture(name)
    u = spec["utterances"][index]
    a, b = round(u["start_ms"] * RATE / 1000), round(u["end_ms"] * RATE / 1000)
    return audio.pcm[2 * a : 2 * b]


def silence_s(seconds: float) -> bytes:
    return bytes(round(seconds * RATE) * 2)


def test_bargein_fixture_interrupts_once_after_interrupt_min_ms() -> None:
    audio, spec = fixture("bargein.wav")
    playback = spec["agent_playback"][0]
    span = (playback["start_ms"] / 1000, playback["end_ms"] / 1000)
    options = VadOptions()
    ctx, interrupts, frames, t0 = run_call(audio.pcm, [span], options)
    assert ctx.control.interrupts == 1 and ctx.control.epoch == 1
    (event,) = interrupts
    assert event.reason == "barge-in"
    speech_start = spec["utterances"][0]["start_ms"] / 1000
    reaction = event.at - t0 - speech_start
    low = options.interrupt_min_ms / 1000 - TOLERANCE_S
    assert low <= reaction <= options.interrupt_min_ms / 1000 + TOLERANCE_S + FRAME_S
    # the cough during playback started nothing: the only turn is the interruption
    assert len([f for f in frames if isinstance(f, UserTurn)]) == 1


def test_no_interrupt_while_the_agent_is_silent() -> None:
    audio, _ = fixture("bargein.wav")
    ctx, interrupts, frames, _ = run_call(audio.pcm, [])
    assert ctx.control.interrupts == 0 and not interrupts
    assert len([f for f in frames if isinstance(f, UserTurn)]) == 1
    ctx, _, _, _ = run_call(audio.pcm, [(0.2, 0.6)])  # the agent finished before the user spoke
    assert ctx.control.interrupts == 0


def test_speech_shorter_than_interrupt_min_does_not_interrupt() -> None:
    clip = utterance_pcm("answer_single.wav")
    short = clip[: round(0.26 * RATE) * 2]  # long enough to start a turn, not to interrupt
    pcm = silence_s(1.0) + short + silence_s(1.5)
    ctx, _, frames, _ = run_call(pcm, [(0.5, 3.0)])
    assert any(isinstance(f, UserSpeechStarted) for f in frames)
    assert ctx.control.interrupts == 0
    longer = clip[: round(0.6 * RATE) * 2]
    ctx, _, _, _ = run_call(silence_s(1.0) + longer + silence_s(1.5), [(0.5, 3.0)])
    assert ctx.control.interrupts == 1


def test_a_cough_during_playback_does_not_interrupt() -> None:
    audio, spec = fixture("cough_blip.wav")
    blip = spec["blips"][0]
    a, b = round(blip["start_ms"] * 16) * 2, round(blip["end_ms"] * 16) * 2
    pcm = silence_s(0.8) + audio.pcm[a:b] + silence_s(0.3) + audio.pcm[a:b] + silence_s(1.0)
    ctx, _, frames, _ = run_call(pcm, [(0.2, 2.5)], VadOptions(interrupt_min_ms=0))
    assert ctx.control.interrupts == 0
    assert not any(isinstance(f, UserSpeechStarted) for f in frames)


def test_echo_guard_holds_off_barge_in_after_the_agent_starts() -> None:
    clip = utterance_pcm("answer_single.wav")
    pcm = silence_s(1.0) + clip + silence_s(1.0)
    agent_start = 0.9  # the user starts talking 100 ms after the agent
    speech_start = 1.0  # where the clip is placed in this track
    unguarded = VadOptions(interrupt_min_ms=300)
    _, (event,), _, t0 = run_call(pcm, [(agent_start, 6.0)], unguarded)
    assert abs(event.at - t0 - (speech_start + 0.3)) <= TOLERANCE_S + FRAME_S
    guarded = VadOptions(interrupt_min_ms=300, echo_guard_ms=1000)
    _, (event,), _, t0 = run_call(pcm, [(agent_start, 6.0)], guarded)
    # counted from the guard's end (agent start + 1 s), not from the speech start
    expected = agent_start + 1.0 + 0.3
    assert expected - 1e-6 <= event.at - t0 <= expected + FRAME_S + 1e-6
    short = silence_s(1.0) + clip[: round(0.9 * RATE) * 2] + silence_s(1.0)
    ctx, _, _, _ = run_call(short, [(agent_start, 6.0)], guarded)
    assert ctx.control.interrupts == 0  # the speech was over before guard end + 300 ms


def test_one_interrupt_per_utterance() -> None:
    clip = utterance_pcm("answer_single.wav")
    ctx, _, _, _ = run_call(silence_s(1.0) + clip + silence_s(1.0), [(0.5, 6.0)], keep_talking=True)
    assert ctx.control.interrupts == 1  # a 3.7 s utterance still interrupts once
    two, _ = fixture("answers_two.wav")
    ctx, interrupts, _, t0 = run_call(two.pcm, [(0.2, 7.0)], keep_talking=True)
    assert ctx.control.interrupts == 2 and ctx.control.epoch == 2
    starts = [u["start_ms"] / 1000 for u in LAYOUT["files"]["answers_two.wav"]["utterances"]]
    for event, start in zip(interrupts, starts, strict=True):
        assert abs(event.at - t0 - (start + 0.3)) <= TOLERANCE_S + FRAME_S
    # a pacer that stops on interrupt is not interrupted again by the rest of the answer
    ctx, _, _, _ = run_call(two.pcm, [(0.2, 7.0)], keep_talking=False)
    assert ctx.control.interrupts == 1


def test_quiet_room_noise_never_interrupts() -> None:
    rng = np.random.default_rng(7)
    noise = rng.normal(0, 10 ** (-45 / 20) * 32768, 5 * RATE)
    pcm = np.clip(np.rint(noise), -32768, 32767).astype("<i2").tobytes()
    ctx, _, frames, _ = run_call(pcm, [(0.0, 5.0)])
    assert ctx.control.interrupts == 0 and not frames
