"""Offline stand-ins for the cloud providers: for development, demos and tests, not production.

Without any API keys the service still holds a whole interview with these, and says so (every
name here ends in "(offline)"):

* :class:`ScriptedBrain`: a deterministic interviewer that follows the director's plan through
  the same tools a real brain calls (greets, asks each question, acknowledges, closes);
* :class:`EspeakSynthesizer`: an espeak-ng voice from the ``espeakng-loader`` wheel (its shared
  library and data, through ctypes; no system package needed);
* :class:`PocketsphinxTranscriber`: the ``pocketsphinx`` wheel with its bundled US-English model,
  for the candidate's side of the transcript.

Both native engines are blocking C code: they run in worker threads, so the event loop never
waits on them, and each is used under a lock because neither is safe to call concurrently.
"""

from __future__ import annotations

import ctypes
import logging
import re
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import anyio
import anyio.to_process

from pipeline.clock import Clock, MonotonicClock
from stages.brain import (
    BrainError,
    BrainEvent,
    BrainSetup,
    BrainTurn,
    TextDelta,
    ToolCalled,
    ToolHandler,
    UserTranscript,
)

log = logging.getLogger("stages.local")


class OfflineUnavailable(RuntimeError):
    """An offline engine's wheel is missing or its native library cannot be loaded."""


# --- espeak-ng voice -----------------------------------------------------------------------------

# From espeak-ng's speak_lib.h.
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_INITIALIZE_DONT_EXIT = 0x8000  # report errors instead of calling exit()
_RATE = 1  # espeakRATE
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_ENDPAUSE = 0x1000  # a short pause after the text, so consecutive phrases do not run together
_EE_OK = 0
_SynthCallback = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p
)


class _Espeak:
    """The process-wide espeak-ng engine. Every call into it holds :attr:`lock`."""

    lock = threading.Lock()
    _instance: _Espeak | None = None

    @classmethod
    def get(cls) -> _Espeak:
        with cls.lock:
            if cls._instance is None:
                cls._instance = cls()
            return cls._instance

    def __init__(self) -> None:
        try:
            import espeakng_loader

            lib = ctypes.CDLL(espeakng_loader.get_library_path())
            data = espeakng_loader.get_data_path()
        except (ImportError, OSError, RuntimeError) as exc:
            raise OfflineUnavailable(
                "espeak-ng could not be loaded from the 'espeakng-loader' wheel "
                f"(pip install espeakng-loader): {exc}"
            ) from exc
        lib.espeak_Initialize.restype = ctypes.c_int
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_SetVoiceByName.restype = ctypes.c_int
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetParameter.restype = ctypes.c_int
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_Synth.restype = ctypes.c_int
        lib.espeak_Synth.argtypes = [
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.c_uint,
            ctypes.c_int,
            ctypes.c_uint,
            ctypes.c_uint,
            ctypes.c_void_p,
            ctypes.c_void_p,
        ]
        rate = lib.espeak_Initialize(
            _AUDIO_OUTPUT_SYNCHRONOUS, 0, data.encode(), _INITIALIZE_DONT_EXIT
        )
        if rate <= 0:
            raise OfflineUnavailable(
                f"espeak-ng from the 'espeakng-loader' wheel failed to start (data at {data})"
            )
        self.lib = lib
        self.sample_rate: int = rate
        self._sink: list[bytes] = []
        self._cancel: threading.Event | None = None
        self._callback = _SynthCallback(self._on_samples)  # kept alive as long as the engine
        lib.espeak_SetSynthCallback(self._callback)

    def _on_samples(self, wav: Any, count: int, events: Any) -> int:
        if self._cancel is not None and self._cancel.is_set():
            return 1  # abort the synthesis
        if wav and count > 0:
            self._sink.append(ctypes.string_at(wav, count * 2))
        return 0

    def set_voice(self, voice: str) -> bool:
        """Caller holds the lock."""
        return bool(self.lib.espeak_SetVoiceByName(voice.encode()) == _EE_OK)

    def render(self, text: str, voice: str, rate_wpm: int, cancel: threading.Event) -> bytes:
        data = text.replace("\0", " ").encode() + b"\0"
        with self.lock:
            if cancel.is_set():
                return b""
            if not self.set_voice(voice):
                raise RuntimeError(f"espeak-ng: voice {voice!r} not found")
            self.lib.espeak_SetParameter(_RATE, rate_wpm, 0)
            self._sink, self._cancel = [], cancel
            try:
                code = self.lib.espeak_Synth(
                    data, len(data), 0, _POS_CHARACTER, 0, _CHARS_UTF8 | _ENDPAUSE, None, None
                )
                if code != _EE_OK and not cancel.is_set():
                    raise RuntimeError(f"espeak-ng: synthesis failed (error {code})")
                return b"".join(self._sink)
            finally:
                self._sink, self._cancel = [], None


@dataclass(frozen=True)
class EspeakOptions:
    """Options of :class:`EspeakSynthesizer`."""

    voice: str = "en"
    """An espeak-ng voice name ("en", "en-us", "en+f3", ...)."""
    rate_wpm: int = 165
    """Speaking rate in words per minute (espeak-ng allows 80–450; its own default is 175)."""
    chunk_ms: int = 100
    """Length of the PCM chunks :meth:`EspeakSynthesizer.synthesize` yields."""

    def __post_init__(self) -> None:
        if not self.voice.strip():
            raise ValueError("EspeakOptions.voice: must not be empty")
        if not 80 <= self.rate_wpm <= 450:
            raise ValueError("EspeakOptions.rate_wpm: must be between 80 and 450")
        if self.chunk_ms < 1:
            raise ValueError("EspeakOptions.chunk_ms: must be at least 1")


class EspeakSynthesizer:
    """An offline :class:`stages.voice.Synthesizer`: espeak-ng, 16-bit mono PCM at 22050 Hz.

    A phrase renders in a few milliseconds (far faster than real time), so each phrase is
    rendered whole in a worker thread and then yielded in ``chunk_ms`` pieces. Cancelling the
    iteration aborts the rendering at espeak-ng's next callback.
    """

    name = "espeak-ng (offline)"

    def __init__(self, options: EspeakOptions | None = None) -> None:
        self.options = options or EspeakOptions()
        self._engine = _Espeak.get()
        self.sample_rate: int = self._engine.sample_rate
        with self._engine.lock:
            if not self._engine.set_voice(self.options.voice):
                raise ValueError(
                    f"EspeakOptions.voice: espeak-ng has no voice {self.options.voice!r}"
                )

    def render(self, text: str, cancel: threading.Event | None = None) -> bytes:
        """Speak ``text`` into one PCM buffer (blocking; for threads and batch tools)."""
        if not text.strip():
            return b""
        opts = self.options
        return self._engine.render(text, opts.voice, opts.rate_wpm, cancel or threading.Event())

    async def synthesize(self, text: str) -> AsyncIterator[bytes]:
        cancel = threading.Event()
        try:
            pcm = await anyio.to_thread.run_sync(self.render, text, cancel, abandon_on_cancel=True)
        finally:
            cancel.set()  # if we were cancelled, the abandoned thread stops at its next callback
        step = max(2, self.sample_rate * self.options.chunk_ms // 1000 * 2)
        for start in range(0, len(pcm), step):
            yield pcm[start : start + step]


# --- pocketsphinx transcriber --------------------------------------------------------------------


@runtime_checkable
class Transcriber(Protocol):
    """Speech to text for the candidate's side of the transcript."""

    name: str

    async def transcribe(self, pcm: bytes, sample_rate: int = 16000) -> str:
        """The text of one turn of 16-bit mono PCM ("" when nothing was recognised)."""
        ...


class PocketsphinxTranscriber:
    """An offline :class:`Transcriber`: pocketsphinx with the wheel's US-English model.

    Rough (a small, older acoustic model; synthetic voices fare worst), but real: enough for a
    development transcript. The decoder loads lazily (about 0.3 s) on the first turn and is reused.

    :meth:`transcribe` runs the decoder in a worker *process*: pocketsphinx holds the GIL while
    it decodes (measured here: the event loop stalled 850 ms on a 4 s answer), which would stop
    every call's pacer. anyio keeps the worker process alive and reuses it (and its decoder).
    """

    name = "pocketsphinx (offline)"
    rate = 16000
    """The model's sample rate; other rates are resampled to it."""

    def __init__(self) -> None:
        self._decoder: Any = None
        self._lock = threading.Lock()

    def transcribe_blocking(self, pcm: bytes, sample_rate: int = 16000) -> str:
        """:meth:`transcribe` without the thread (for worker threads and batch tools)."""
        if sample_rate <= 0:
            raise ValueError(f"sample_rate: must be positive, got {sample_rate}")
        if len(pcm) % 2:
            raise ValueError("pcm: must be whole 16-bit samples (an even number of bytes)")
        if not pcm:
            return ""
        if sample_rate != self.rate:
            from pipeline.audio import resample

            pcm = resample(pcm, sample_rate, self.rate)
        with self._lock:
            decoder = self._load()
            decoder.start_utt()
            try:
                decoder.process_raw(pcm, full_utt=True)
            finally:
                decoder.end_utt()
            hyp = decoder.hyp()
        return str(hyp.hypstr).strip() if hyp is not None else ""

    async def transcribe(self, pcm: bytes, sample_rate: int = 16000) -> str:
        return await anyio.to_process.run_sync(
            _transcribe_in_worker, pcm, sample_rate, cancellable=True
        )

    def _load(self) -> Any:
        """Caller holds the lock."""
        if self._decoder is None:
            try:
                from pocketsphinx import Decoder
            except ImportError as exc:
                raise OfflineUnavailable(
                    f"pocketsphinx is not installed (pip install pocketsphinx): {exc}"
                ) from exc
            self._decoder = Decoder(samprate=self.rate, loglevel="FATAL")
        return self._decoder


_WORKER_TRANSCRIBER: PocketsphinxTranscriber | None = None


def _transcribe_in_worker(pcm: bytes, sample_rate: int) -> str:
    """Runs in an anyio worker process; the decoder is loaded once per worker."""
    global _WORKER_TRANSCRIBER
    if _WORKER_TRANSCRIBER is None:
        _WORKER_TRANSCRIBER = PocketsphinxTranscriber()
    return _WORKER_TRANSCRIBER.transcribe_blocking(pcm, sample_rate)


# --- scripted interviewer ------------------------------------------------------------------------

_ACKS = (
    "Thank you.",
    "Thank you, that is helpful.",
    "Great, thank you.",
    "Thank you for explaining that.",
)


@dataclass(frozen=True, slots=True)
class HeardLine:
    """What the candidate heard of one reply (see :meth:`ScriptedBrain.heard`)."""

    epoch: int
    text: str
    completed: bool


class ScriptedBrain:
    """An offline :class:`stages.brain.Brain`: follows the plan through the director's tools.

    * the opening (a turn with neither audio nor text): greets the candidate by name for the
      job, calls ``next_question`` and asks the question it returns;
    * a candidate turn: transcribes it (when a transcriber was given, yielding
      :class:`UserTranscript`), acknowledges briefly, calls ``next_question`` and asks the next
      question; once the answer is ``no_more_questions``, says a closing line and calls
      ``end_interview``;
    * a turn with nothing in it after the opening (a nudge after silence): repeats the question.

    Deterministic: the same plan and the same turns give the same replies. Text streams as
    several :class:`TextDelta` events of ``words_per_delta`` words, after ``think_s`` seconds of
    pretend thinking on ``clock``. Free-text instructions from the director are not interpreted.
    """

    name = "scripted (offline)"

    def __init__(
        self,
        transcriber: Transcriber | None = None,
        *,
        think_s: float = 0.0,
        clock: Clock | None = None,
        words_per_delta: int = 3,
    ) -> None:
        if think_s < 0:
            raise ValueError("think_s: must not be negative")
        if words_per_delta < 1:
            raise ValueError("words_per_delta: must be at least 1")
        self.transcriber = transcriber
        self.think_s = think_s
        self.clock = clock or MonotonicClock()
        self.words_per_delta = words_per_delta
        self.history: list[HeardLine] = []
        """What the candidate heard of each reply, in order."""
        self._setup: BrainSetup | None = None
        self._tools: ToolHandler | None = None
        self._opened = False
        self._answers = 0
        self._question: str | None = None
        self._ended = False

    async def start(self, setup: BrainSetup, tools: ToolHandler) -> None:
        self._setup = setup
        self._tools = tools

    def heard(self, epoch: int, text: str, completed: bool) -> None:
        self.history.append(HeardLine(epoch, text, completed))

    async def aclose(self) -> None:
        pass

    async def reply(self, turn: BrainTurn) -> AsyncIterator[BrainEvent]:
        """The reply's text first, then the transcript of the turn: transcribing the candidate
        (about a second with pocketsphinx) must never delay what the interviewer says."""
        if self._setup is None or self._tools is None:
            raise BrainError("ScriptedBrain.reply called before start()")
        async for event in self._respond(turn):
            yield event
        if turn.audio is not None and turn.text is None and self.transcriber is not None:
            text = await self._transcribe(turn)
            if text is not None:
                yield UserTranscript(turn.turn_id, text)

    async def _respond(self, turn: BrainTurn) -> AsyncIterator[BrainEvent]:
        assert self._tools is not None  # reply() checked start() was called
        if self.think_s > 0:
            await self.clock.sleep(self.think_s)

        if self._ended:
            for delta in self._deltas("Thank you again. Goodbye.", False):
                yield delta
            return
        if self._opened and turn.audio is None and not turn.text and self._question:
            for delta in self._deltas(f"Take your time. The question was: {self._question}", False):
                yield delta
            return
        if self._opened:
            line, reason = _ACKS[self._answers % len(_ACKS)], "the candidate answered"
            self._answers += 1
        else:
            line, reason = self._greeting(), "opening"
            self._opened = True
        for delta in self._deltas(line, False):
            yield delta

        args = {"reason": reason}
        result = await self._tools("next_question", args)
        yield ToolCalled("next_question", args, result)
        status = result.get("status")
        if status == "ok":
            self._question = str(result.get("question", "")).strip()
            for delta in self._deltas(self._question, True):
                yield delta
        elif status == "no_more_questions":
            for delta in self._deltas(self._closing(), True):
                yield delta
            end_args = {"reason": "all questions asked"}
            end = await self._tools("end_interview", end_args)
            yield ToolCalled("end_interview", end_args, end)
            self._ended = True
        else:
            raise BrainError(f"next_question returned an unexpected status {status!r}")

    async def _transcribe(self, turn: BrainTurn) -> str | None:
        assert self.transcriber is not None and turn.audio is not None
        try:
            return await self.transcriber.transcribe(turn.audio, turn.sample_rate)
        except (ValueError, RuntimeError, OSError):
            # A development transcript is not worth ending the interview over.
            log.warning("offline transcription failed; turn %s untranscribed", turn.turn_id)
            return None

    def _greeting(self) -> str:
        ctx = self._setup.context if self._setup else {}
        name = str(ctx.get("candidateName") or "").strip()
        job = str(ctx.get("jobTitle") or "").strip()
        hello = f"Hello {name}, welcome" if name else "Hello, welcome"
        role = f" for the {job} position" if job else ""
        return f"{hello} to your interview{role}. I will ask you a few questions; take your time."

    def _closing(self) -> str:
        name = str((self._setup.context if self._setup else {}).get("candidateName") or "")
        to = f", {name.strip()}" if name.strip() else ""
        return (
            f"That was my last question. Thank you for your time{to}. "
            "We will be in touch about the next steps. Goodbye."
        )

    def _deltas(self, text: str, after_text: bool) -> list[TextDelta]:
        """``text`` as deltas of a few words; a leading space separates it from earlier text."""
        words = re.findall(r"\S+\s*", text.strip())
        n = self.words_per_delta
        pieces = ["".join(words[i : i + n]) for i in range(0, len(words), n)]
        if pieces and after_text:
            pieces[0] = " " + pieces[0]
        return [TextDelta(p) for p in pieces]
