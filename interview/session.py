"""One interview: builds its graph and runs it under a supervisor until an end condition.

    ingress ─▶ vad ─▶ conversation ─▶ voice ─▶ pacer ─▶ egress
                 ▲                              │
                 └─── agent speaking (barge-in) ┘   conversation ◀── playback reports

The transport gives the ingress and egress stages (files for batch runs, WebRTC for live
calls, none for an interview nobody has connected to yet). The brain and the voice come from
the settings: Gemini and ElevenLabs when their keys are set, otherwise the offline stand-ins
(development only; production refuses to start without keys, see interview/config.py).

The interview ends when the director says so (plan done, the brain's end tool, maximum
duration), when the candidate's media ends, on :meth:`InterviewSession.stop` (shutdown), or
when a stage fails. Whatever the ending, the result is built from what was held and handed to
the results service, which never loses it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import anyio

from interview import telemetry
from interview.config import Settings
from interview.conversation import Conversation
from interview.director import Director
from interview.outbox import ResultsService
from interview.plan import JoinRequest
from interview.results import Transcript, completion_payload
from pipeline.clock import Clock, MonotonicClock
from pipeline.graph import Graph
from pipeline.stage import CallContext, Inbox, Outbox, Stage
from pipeline.supervisor import DEGRADE, CallResult, FailurePolicy, Supervisor
from stages.brain import Brain
from stages.pacer import Pacer, PacerOptions
from stages.vad import AgentSpeech, VadOptions, VadStage
from stages.voice import Synthesizer, VoiceStage

log = logging.getLogger("synchire.session")

SHUTDOWN_LINE = "Sorry, the service is restarting, so we must stop here. Thank you for your time."


class Transport(Protocol):
    """Where the candidate's audio comes from and the interviewer's goes to."""

    realtime: bool
    """True for live media (the pacer keeps wall-clock pace); False for batch files."""

    def ingress(self, floor: Floor) -> Stage: ...

    def egress(self) -> Stage: ...


class Floor:
    """Who holds the floor: lets a turn-based ingress wait until the interviewer is done."""

    def __init__(self) -> None:
        self.conversation: Conversation | None = None

    async def wait_interviewer_done(self) -> int:
        """Wait until every reply so far has been generated and played; the replies count."""
        assert self.conversation is not None
        await self.conversation.wait_idle()
        return self.conversation.replies_started


class _Idle:
    """An ingress with no candidate yet: sends nothing until the call ends."""

    name = "ingress"

    async def run(self, ctx: CallContext, inbox: Inbox, outbox: Outbox) -> None:
        await anyio.sleep_forever()


class _Discard:
    name = "egress"

    async def run(self, ctx: CallContext, inbox: Inbox, outbox: Outbox) -> None:
        async for _ in inbox:
            pass


class NullTransport:
    """No media connected: the interview waits (a later transport issue connects peers)."""

    realtime = True

    def ingress(self, floor: Floor) -> Stage:
        return _Idle()

    def egress(self) -> Stage:
        return _Discard()


@dataclass
class Providers:
    """The brain and the voice for one interview.

    ``voice`` is a whole voice stage (ElevenLabs streams text in and audio out itself); without
    it the voice is ``VoiceStage(synthesizer)``, the phrase-by-phrase offline voice.
    """

    brain: Brain
    synthesizer: Synthesizer
    voice: Stage | None = None


def offline_providers(settings: Settings) -> Providers:
    """The offline stand-ins: scripted interviewer, espeak-ng voice, pocketsphinx transcriber."""
    from stages.local import EspeakSynthesizer, PocketsphinxTranscriber, ScriptedBrain

    return Providers(
        brain=ScriptedBrain(transcriber=PocketsphinxTranscriber()),
        synthesizer=EspeakSynthesizer(),
    )


def make_providers(settings: Settings) -> Providers:
    """Real providers where keys are set; offline stand-ins otherwise (development only)."""
    providers = offline_providers(settings)
    if settings.gemini_api_key is not None:
        from stages.gemini import GeminiBrain

        providers.brain = GeminiBrain(
            settings.gemini_api_key.get_secret_value(),
            settings.gemini_model,
            mode=settings.gemini_mode,
            base_url=settings.gemini_base_url,
        )
    if settings.elevenlabs_api_key is not None:
        from stages.elevenlabs import ElevenLabsOptions, ElevenLabsVoice

        providers.voice = ElevenLabsVoice(ElevenLabsOptions.from_settings(settings))
    return providers


ProviderFactory = Callable[[Settings], Providers]


class InterviewSession:
    """One interview, from admission to its delivered result."""

    def __init__(
        self,
        request: JoinRequest,
        settings: Settings,
        results: ResultsService,
        *,
        transport: Transport | None = None,
        clock: Clock | None = None,
        providers: ProviderFactory = make_providers,
    ) -> None:
        self.request = request
        self.settings = settings
        self.results = results
        self.transport: Transport = transport or NullTransport()
        self.clock = clock or MonotonicClock()
        self.providers = providers
        self.call_id = request.call_id
        self.candidate_name = request.candidate_name
        self.job_title = request.job_title
        self.started_at = time.time()
        self.video_avatar_enabled = False
        self.state = "starting"
        self.events: list[dict[str, Any]] = []
        self.payload: dict[str, Any] | None = None
        self.result: CallResult | None = None
        self._listeners: list[Callable[[dict[str, Any]], None]] = []
        self._transcript = Transcript()
        self._latency_sent: set[int] = set()
        self._prepared = False
        self.avatar: Any = None  # stages.heygen.AvatarStage once its session is live
        self.avatar_info: dict[str, Any] | None = None
        self._stop_reason: str | None = None
        self._waiting: anyio.CancelScope | None = None  # waiting for the candidate to connect
        self._supervisor: Supervisor | None = None
        self._director: Director | None = None
        self._conversation: Conversation | None = None
        self.ctx = CallContext(call_id=self.call_id, clock=self.clock, settings=settings)

    # -- observers -----------------------------------------------------------------------------

    def subscribe(self, listener: Callable[[dict[str, Any]], None]) -> None:
        """Live events (transcript, progress, ended) in the original shapes."""
        self._listeners.append(listener)

    def _on_event(self, event: dict[str, Any]) -> None:
        self.events.append(event)
        if event.get("type") == "transcript":
            self._transcript.add(event["speaker"], event["text"], event["timestamp"])
            director = self._director
            self.results.checkpoint(
                self.call_id,
                transcript=self._transcript,
                questions_asked=director.questions_asked if director else None,
            )
        elif event.get("type") == "ended" and self._supervisor is not None:
            self.state = "ending"
            self._supervisor.stop(str(event.get("reason")))
        for listener in list(self._listeners):
            try:
                listener(event)
            except Exception:
                log.exception("event listener failed", extra={"callId": self.call_id})

    # -- control -------------------------------------------------------------------------------

    def stop(self, reason: str = "shutdown") -> None:
        """Request the end. ``shutdown`` first tells the candidate with a short spoken line."""
        if self._stop_reason is not None:
            return
        self._stop_reason = reason
        if self._waiting is not None:
            self._waiting.cancel()
        director, conversation = self._director, self._conversation
        if director is None or conversation is None:
            if self._supervisor is not None:
                self._supervisor.stop(reason)
            return
        if reason == "shutdown" and self.transport.realtime:
            conversation.say(SHUTDOWN_LINE, then_end=reason)
        else:
            director.end(reason)

    def view(self) -> dict[str, Any]:
        director = self._director
        return {
            "callId": self.call_id,
            "candidateName": self.candidate_name,
            "jobTitle": self.job_title,
            "state": self.state,
            "progress": director.progress if director else None,
            "questionsAsked": director.questions_asked if director else 0,
            "totalQuestions": len(self.request.questions),
            "transcript": self._transcript.entries(),
            "latency": self.ctx.timeline.summary(),
            "usage": self.ctx.usage.as_dict(),
            "endReason": director.end_reason if director else None,
            "startedAt": self.started_at,
        }

    # -- the avatar ----------------------------------------------------------------------------

    async def prepare(self, timeout_s: float = 8.0) -> dict[str, Any] | None:
        """Start what the candidate's client needs before the interview: the avatar session
        (HeyGen LiveAvatar) when one is configured. Returns its client info (LiveKit address and
        token) or None. Idempotent; a failure leaves the interview audio-only, and says so."""
        if self._prepared:
            return self.avatar_info
        self._prepared = True
        if not self.settings.video_avatar_enabled:
            return None
        from stages.heygen import AvatarOptions, AvatarStage

        avatar = AvatarStage(
            AvatarOptions.from_settings(self.settings), on_state=self._avatar_state
        )
        try:
            with anyio.fail_after(timeout_s):
                self.avatar_info = (await avatar.start()).client_info()
        except Exception as exc:  # AvatarError, a timeout, a network error: audio-only
            log.warning(
                "avatar unavailable, the interview is audio-only: %s",
                exc,
                extra={"callId": self.call_id},
            )
            with anyio.move_on_after(2, shield=True):
                await avatar.stop()
            self._on_event({"type": "avatar", "state": "failed", "reason": str(exc)})
            return None
        self.avatar = avatar
        self.video_avatar_enabled = True
        return self.avatar_info

    def _avatar_state(self, live: bool, reason: str) -> None:
        info = self.avatar_info or {}
        if live:
            self._on_event(
                {
                    "type": "avatar",
                    "state": "live",
                    "livekitUrl": info.get("livekitUrl"),
                    "token": info.get("token"),
                }
            )
            return
        self.video_avatar_enabled = False
        log.warning(
            "avatar failed, carrying on audio-only: %s", reason, extra={"callId": self.call_id}
        )
        self._on_event({"type": "avatar", "state": "failed", "reason": reason})

    async def _stop_avatar(self) -> None:
        if self.avatar is not None:
            with anyio.move_on_after(3, shield=True):
                await self.avatar.stop()

    # -- the interview -------------------------------------------------------------------------

    async def run(self) -> dict[str, Any]:
        """Hold the interview and deliver its result; returns the completion payload."""
        ctx = self.ctx
        settings = self.settings
        end_reason = "failed"
        try:
            await self.prepare()
            await self._wait_for_candidate()
            if self._stop_reason is not None and self._director is None:
                self.state = "ended"  # stopped before anyone connected: nothing was held
                return await self._deliver(self._stop_reason)
            providers = self.providers(settings)
            director = Director(
                self.request,
                self.clock,
                max_minutes=settings.max_interview_minutes,
                on_event=self._on_event,
            )
            self._director = director
            graph, conversation = self._build(providers, director)
            self._conversation = conversation
            supervisor = Supervisor(
                ctx,
                graph,
                policies=self._policies(graph),
                deadline_s=settings.max_interview_minutes * 60 + 30,
            )
            self._supervisor = supervisor
            if self._stop_reason is not None:
                director.end(self._stop_reason)
                supervisor.stop(self._stop_reason)
            self.state = "running"
            async with anyio.create_task_group() as tg:
                tg.start_soon(director.run_timer)
                result = self.result = await supervisor.run()
                tg.cancel_scope.cancel()
            end_reason = self._end_reason(director, result)
            director.end(end_reason)
        except Exception as exc:  # building the interview failed: still deliver a result
            log.exception("interview %s failed: %s", self.call_id, exc)
            end_reason = "failed"
        finally:
            await self._stop_avatar()
        self.state = "ended"
        return await self._deliver(end_reason)

    async def _wait_for_candidate(self) -> None:
        """A live transport with ``wait_connected`` holds the interview (and its greeting)
        until the candidate connects; :meth:`stop` ends the wait (the WebRTC media stops it
        with ``candidate_left`` after its join timeout)."""
        wait = getattr(self.transport, "wait_connected", None)
        if wait is None or self._stop_reason is not None:
            return
        with anyio.CancelScope() as self._waiting:
            await wait()
        self._waiting = None

    def _build(self, providers: Providers, director: Director) -> tuple[Graph, Conversation]:
        settings = self.settings
        speech = AgentSpeech()
        realtime = self.transport.realtime

        def playback_started(at: float) -> None:
            speech.started(at)
            self._report_latency()

        pacer = Pacer(
            PacerOptions(realtime=realtime, emit_silence=realtime),
            on_playback_start=playback_started,
            on_playback_stop=lambda _at: speech.stopped(),
        )
        conversation = Conversation(director, providers.brain, pacer.played)
        pacer.on_reply_done = conversation.playback_changed
        floor = Floor()
        floor.conversation = conversation
        vad = VadStage(
            VadOptions(
                aggressiveness=settings.vad_aggressiveness,
                stop_ms=settings.vad_stop_ms,
                interrupt_min_ms=settings.barge_in_ms,
            ),
            agent=speech,
            # a brain that listens while the candidate speaks gets the live audio too
            forward_audio=bool(getattr(providers.brain, "streams_audio", False)),
        )
        graph = Graph()
        ingress = graph.add(self.transport.ingress(floor))
        # live audio must never wait behind a slow VAD; batch audio must never be lost
        graph.add(vad, policy="drop_oldest" if realtime else "block", capacity=100)
        graph.connect(ingress, vad)
        voice = providers.voice or VoiceStage(providers.synthesizer)
        graph.chain(vad, conversation, voice, pacer)
        egress = self.transport.egress()
        egress_policy: Literal["block", "drop_oldest"] = "drop_oldest" if realtime else "block"
        graph.add(egress, policy=egress_policy, capacity=50)
        avatar = self.avatar
        if avatar is None:
            graph.connect(pacer, egress)
            return graph, conversation
        from stages.heygen import MuteWhileAvatarLive

        # The avatar speaks the voice's audio (lip-synced, in its own LiveKit room); it is a
        # tap, degraded on failure. While it is live the candidate hears it, not our egress;
        # a batch run (not real time) keeps writing the voice to its file.
        graph.tap(voice, avatar, policy="drop_oldest", capacity=512)
        if realtime:
            mute = graph.add(MuteWhileAvatarLive(avatar), policy=egress_policy, capacity=50)
            graph.connect(pacer, mute)
            graph.connect(mute, egress)
        else:
            graph.connect(pacer, egress)
        return graph, conversation

    def _report_latency(self) -> None:
        """Once a turn's reply reaches the transport its figures are complete: send them as a
        live event (the demo page's latency table), to the metrics and to the log."""
        for record in self.ctx.timeline.turns():
            if record.turn_id in self._latency_sent or "first_egress" not in record.marks:
                continue
            self._latency_sent.add(record.turn_id)
            figures = record.figures()
            telemetry.current().observe_turn(figures)
            log.info("turn %d latency %s", record.turn_id, figures, extra={"callId": self.call_id})
            self._on_event({"type": "latency", "turnId": record.turn_id, **figures})

    def _policies(self, graph: Graph) -> dict[str, FailurePolicy]:
        policies: dict[str, FailurePolicy] = {}
        if "avatar" in graph.stages:
            policies["avatar"] = DEGRADE  # the interview carries on audio-only
        # a provider hiccup (both the voice's websocket and its HTTP fallback failing) reopens
        # the voice instead of failing the interview; a bad key still fails it after 3 tries
        policies["voice"] = FailurePolicy("restart", max_restarts=3)
        return policies

    def _end_reason(self, director: Director, result: CallResult) -> str:
        if director.end_reason is not None:
            return director.end_reason
        if result.status == "failed":
            return "failed"
        if self._stop_reason is not None:
            return self._stop_reason
        if result.status == "deadline":
            return "max_duration"
        return "candidate_left"  # the candidate's media ended before the plan did

    async def _deliver(self, end_reason: str) -> dict[str, Any]:
        director = self._director
        now = time.time()
        payload = completion_payload(
            call_id=self.call_id,
            candidate_name=self.candidate_name,
            job_title=self.job_title,
            started_at=self.started_at,
            ended_at=now,
            end_reason=end_reason,
            transcript=self._transcript,
            questions_asked=director.questions_asked if director else 0,
            total_questions=len(self.request.questions),
            latency=self.ctx.timeline.summary(),
        )
        if self.result is not None and self.result.status == "failed":
            payload["error"] = {"stage": self.result.failed_stage, "message": self.result.error}
        self.payload = payload
        try:
            await self.results.submit(payload)
        except Exception:
            log.exception("could not write the result of %s", self.call_id)
        return payload
