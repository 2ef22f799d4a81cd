"""Batch run: a whole interview from a WAV of the candidate's answers.

    python -m interview.run --questions q.json --audio candidate.wav [--out agent.wav] --json

``q.json`` holds the join request body the web app sends. The WAV holds the candidate's answers
separated by silences (any rate, mono or stereo). The run is turn-based: each answer is played
into the interview (at real-time pace, so latency figures are real) once the interviewer has
finished speaking, so the interview is coherent whatever the answers' timing; the interviewer's
replies are not paced. It goes through the real graph (VAD, brain, voice, pacer) with
the offline stand-ins, or the real providers when their keys are set, and ends by itself once
the interviewer has answered the last answer (or the brain ends it). The completion payload is
printed on stdout; logs go to stderr. Bad files or JSON: a one-line error and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, NoReturn

import anyio

from interview.config import ConfigError, Settings
from interview.outbox import ResultsService
from interview.plan import RequestError, parse_join_request
from interview.results import signing_secret
from interview.session import Floor, InterviewSession
from pipeline.audio import AudioFileError, WavAudio, read_wav, resample, silence, to_mono
from pipeline.frames import AudioChunk
from pipeline.stage import CallContext, Inbox, Outbox, Stage
from stages.files import WavSink
from stages.pacer import EgressFrame
from stages.vad import VadOptions, detect_segments

log = logging.getLogger("synchire.run")
RATE = 16000
CHUNK_S = 0.02


def split_answers(audio: WavAudio, options: VadOptions) -> list[bytes]:
    """The candidate's answers as 16 kHz mono PCM, cut where the VAD finds them."""
    pcm = to_mono(audio.pcm, audio.channels) if audio.channels > 1 else audio.pcm
    pcm = resample(pcm, audio.sample_rate, RATE) if audio.sample_rate != RATE else pcm
    mono = WavAudio(pcm, RATE, 1)
    answers = []
    for seg in detect_segments(mono, options):
        start = max(0, int((seg.start - 0.3) * RATE)) * 2
        end = min(len(pcm), int((seg.end + 0.15) * RATE) * 2)
        answers.append(pcm[start:end])
    return answers


class TurnBasedSource:
    """Plays each answer once the interviewer is done, then enough silence to end the turn."""

    name = "ingress"

    def __init__(self, answers: list[bytes], floor: Floor, stop_ms: int) -> None:
        self.answers = answers
        self.floor = floor
        self.tail = silence(stop_ms / 1000 + 0.3, RATE)
        self.played = 0

    async def run(self, ctx: CallContext, inbox: Inbox, outbox: Outbox) -> None:
        step = int(CHUNK_S * RATE) * 2
        for answer in self.answers:
            replies = await self.floor.wait_interviewer_done()
            conversation = self.floor.conversation
            assert conversation is not None
            if conversation.director.ended:
                return
            # The answer is played at real-time pace, so the capture clock is the call clock
            # and the turn's latency figures (endpointing, voice-to-voice) are real ones.
            audio = answer + self.tail
            base = ctx.clock.now()
            for i in range(0, len(audio), step):
                captured = base + i / 2 / RATE
                await ctx.clock.sleep_until(captured + CHUNK_S)
                await outbox.send(AudioChunk(audio[i : i + step], RATE, captured))
            self.played += 1
            # wait for the interviewer to take the turn (or give up on an answer it missed)
            with anyio.move_on_after(30):
                while conversation.replies_started == replies:
                    await ctx.clock.sleep(0.02)
        await self.floor.wait_interviewer_done()


class _Egress:
    """Keeps the interviewer's voice (paced frames) in a WAV, or discards it."""

    def __init__(self, out: Path | None) -> None:
        self.out = out

    def stage(self) -> Stage:
        if self.out is not None:
            return WavSink(self.out, sample_rate=24000, name="egress", types=(EgressFrame,))
        from interview.session import NullTransport

        return NullTransport().egress()


class FileTransport:
    """Batch media: answers from a WAV, the interviewer's voice to a WAV. Not real time."""

    realtime = False

    def __init__(self, answers: list[bytes], stop_ms: int, out: Path | None) -> None:
        self.answers = answers
        self.stop_ms = stop_ms
        self.out = out
        self.source: TurnBasedSource | None = None

    def ingress(self, floor: Floor) -> Stage:
        self.source = TurnBasedSource(self.answers, floor, self.stop_ms)
        return self.source

    def egress(self) -> Stage:
        return _Egress(self.out).stage()


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _fail(message: str) -> NoReturn:
    print(f"interview.run: error: {message}", file=sys.stderr)
    raise SystemExit(2)


async def run_interview(
    body: Any, audio: WavAudio, *, settings: Settings, out: Path | None = None
) -> dict[str, Any]:
    """Hold one batch interview and return its completion payload."""
    request = parse_join_request(body)
    options = VadOptions(aggressiveness=settings.vad_aggressiveness, stop_ms=settings.vad_stop_ms)
    answers = split_answers(audio, options)
    log.info("%d answers found in the candidate's audio", len(answers))
    secret = signing_secret(
        settings.webhook_secret.get_secret_value() if settings.webhook_secret else None,
        settings.api_secret_key.get_secret_value() if settings.api_secret_key else None,
    )
    async with ResultsService(
        settings.outbox_dir, webhook_base_url=settings.nextjs_webhook_url, secret=secret
    ) as results:
        await results.admit(
            request.call_id,
            candidate_name=request.candidate_name,
            job_title=request.job_title,
            total_questions=len(request.questions),
        )
        transport = FileTransport(answers, settings.vad_stop_ms, out)
        session = InterviewSession(request, settings, results, transport=transport)
        await session.prepare()  # the avatar, when configured; stopped again by run()
        payload = await session.run()
        await results.flush(10)
    return payload


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="python -m interview.run", description=__doc__.split("\n")[0])
    parser.add_argument("--questions", required=True, type=Path, help="join request JSON")
    parser.add_argument("--audio", required=True, type=Path, help="the candidate's answers (WAV)")
    parser.add_argument("--out", type=Path, help="write the interviewer's voice to this WAV")
    parser.add_argument("--json", action="store_true", help="print the payload as one JSON line")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        body = json.loads(args.questions.read_text(encoding="utf-8"))
    except OSError as exc:
        _fail(f"{args.questions}: cannot read ({exc.strerror or exc})")
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        _fail(f"{args.questions}: not valid JSON ({exc})")
    try:
        parse_join_request(body)
    except RequestError as exc:
        _fail(f"{args.questions}: {exc}")
    try:
        audio = read_wav(args.audio)
    except AudioFileError as exc:
        _fail(str(exc))
    try:
        settings = Settings()
    except ConfigError as exc:
        _fail(str(exc))
    if not settings.config_valid:
        _fail("configuration incomplete, missing: " + ", ".join(settings.missing))
    if args.out is not None and not args.out.parent.exists():
        _fail(f"{args.out}: its folder does not exist")
    payload = anyio.run(lambda: run_interview(body, audio, settings=settings, out=args.out))
    print(json.dumps(payload) if args.json else json.dumps(payload, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
