"""WAV ingress and egress: feed a call from a file, record a call's audio to a file.

Used by tests, benchmarks and batch runs. :class:`WavSource` plays a file into the graph as
:class:`~pipeline.frames.AudioChunk` frames, either as fast as the graph takes them or paced on
the call's clock (so on a :class:`~pipeline.clock.VirtualClock` a real-time run is exact and
instant). :class:`WavSink` records audio frames to a WAV as they pass, so even a call cancelled
half-way leaves a playable file.

Run ``python -m stages.files --demo`` to stream a test tone from one WAV to another.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import wave
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel

from pipeline.audio import Resampler, WavAudio, read_wav, resample, silence, to_mono, tone
from pipeline.frames import AgentAudio, AudioChunk
from pipeline.stage import CallContext, Inbox, Outbox


@dataclass
class WavSourceOptions:
    """How :class:`WavSource` plays its file."""

    realtime: bool = False
    """Pace chunks at wall-clock speed on ``ctx.clock`` (False: as fast as the graph takes them)."""
    chunk_ms: int = 20
    """Length of each emitted chunk; the last one may be shorter."""
    sample_rate: int | None = None
    """Resample to this rate (None keeps the file's rate)."""
    mono: bool = True
    """Mix multichannel files down to mono."""
    trailing_silence_s: float = 0.0
    """Silence appended after the file, so a VAD can close the last turn."""

    def __post_init__(self) -> None:
        if self.chunk_ms <= 0:
            raise ValueError(f"WavSourceOptions.chunk_ms must be positive, got {self.chunk_ms}")
        if self.sample_rate is not None and self.sample_rate <= 0:
            raise ValueError(
                f"WavSourceOptions.sample_rate must be positive, got {self.sample_rate}"
            )
        if self.trailing_silence_s < 0:
            raise ValueError(
                "WavSourceOptions.trailing_silence_s must not be negative, "
                f"got {self.trailing_silence_s}"
            )


class WavSource:
    """A source stage that plays a WAV file (or decoded audio) as ``AudioChunk`` frames.

    The file is read and converted when the stage is built, so a bad file fails fast with
    :class:`~pipeline.audio.AudioFileError`, and playing it costs no decoding on the audio path.
    Each chunk's ``capture_time`` is the moment the run began plus the chunk's offset in the
    file. In real-time mode a chunk is sent once it would have been fully captured (its offset
    plus its length), as a microphone would deliver it, so latency measured against the capture
    clock is not flattered by audio arriving early.
    """

    def __init__(
        self,
        source: str | Path | WavAudio,
        options: WavSourceOptions | None = None,
        name: str = "wav_in",
    ) -> None:
        self.name = name
        self.options = options = options or WavSourceOptions()
        audio = source if isinstance(source, WavAudio) else read_wav(source)
        self.source_path = None if isinstance(source, WavAudio) else Path(source)
        pcm, rate, channels = audio.pcm, audio.sample_rate, audio.channels
        if options.mono and channels > 1:
            pcm, channels = to_mono(pcm, channels), 1
        if options.sample_rate is not None and options.sample_rate != rate:
            pcm = resample(pcm, rate, options.sample_rate, channels, channels)
            rate = options.sample_rate
        if options.trailing_silence_s > 0:
            pcm += silence(options.trailing_silence_s, rate, channels)
        self.audio = WavAudio(pcm, rate, channels)
        self.chunks_sent = 0

    @property
    def duration(self) -> float:
        """Seconds of audio this source plays (including any trailing silence)."""
        return self.audio.duration

    async def run(self, ctx: CallContext, inbox: Inbox, outbox: Outbox) -> None:
        audio, realtime = self.audio, self.options.realtime
        rate, channels = audio.sample_rate, audio.channels
        step = max(1, round(rate * self.options.chunk_ms / 1000)) * 2 * channels
        sample_bytes = 2 * channels
        start = ctx.clock.now()
        pcm = audio.pcm
        for pos in range(0, len(pcm), step):
            piece = pcm[pos : pos + step]
            offset = pos // sample_bytes / rate
            chunk = AudioChunk(piece, rate, start + offset, channels)
            if realtime:
                await ctx.clock.sleep_until(start + offset + chunk.duration)
            else:
                await anyio.lowlevel.checkpoint()  # stay cancellable; let consumers run
            await outbox.send(chunk)
            self.chunks_sent += 1
            ctx.usage.audio_in_seconds += chunk.duration


class WavSink:
    """Records audio frames to a mono 16-bit WAV as they pass, and forwards every frame.

    Frames of ``types`` (anything with ``pcm``, ``sample_rate`` and optionally ``channels``)
    are resampled to ``sample_rate`` and appended. ``wave`` rewrites the header after every
    write, and the file is closed in ``finally``, so a cancelled call still leaves a valid WAV
    holding what was written. Writes are synchronous: small appends to a local file.
    """

    def __init__(
        self,
        path: str | Path,
        sample_rate: int = 16000,
        name: str = "wav_out",
        types: tuple[type, ...] = (AgentAudio, AudioChunk),
    ) -> None:
        if sample_rate <= 0:
            raise ValueError(f"WavSink sample_rate must be positive, got {sample_rate}")
        self.path = Path(path)
        self.sample_rate = sample_rate
        self.name = name
        self.types = types
        self.frames_written = 0
        self.samples_written = 0
        self._resampler: Resampler | None = None

    @property
    def seconds_written(self) -> float:
        return self.samples_written / self.sample_rate

    async def run(self, ctx: CallContext, inbox: Inbox, outbox: Outbox) -> None:
        writer = wave.open(str(self.path), "wb")  # closed in finally
        writer.setnchannels(1)
        writer.setsampwidth(2)
        writer.setframerate(self.sample_rate)
        self._resampler = None
        try:
            async for frame in inbox:
                if isinstance(frame, self.types):
                    self._write(writer, self._convert(frame))
                    self.frames_written += 1
                await outbox.send(frame)
        finally:
            try:
                if self._resampler is not None:
                    self._write(writer, self._resampler.flush())
            finally:
                writer.close()

    def _convert(self, frame: Any) -> bytes:
        rate, channels = frame.sample_rate, getattr(frame, "channels", 1)
        r = self._resampler
        tail = b""
        if r is None or (r.in_rate, r.in_channels) != (rate, channels):
            if r is not None:
                tail = r.flush()  # a new input format: finish the old stream first
            r = self._resampler = Resampler(rate, self.sample_rate, channels, 1)
        return tail + r.process(frame.pcm)

    def _write(self, writer: wave.Wave_write, pcm: bytes) -> None:
        if pcm:
            writer.writeframes(pcm)
            self.samples_written += len(pcm) // 2


# ----------------------------------------------------------------------------------------------
# Demo: python -m stages.files --demo [--input IN.wav] [--output OUT.wav]


async def _demo(source: WavSource, sink: WavSink) -> dict[str, Any]:
    from pipeline.graph import Graph
    from pipeline.supervisor import Supervisor

    ctx = CallContext(call_id="demo")
    result = await Supervisor(ctx, Graph().chain(source, sink)).run()
    return {
        "input": str(source.source_path or "<440 Hz tone>"),
        "output": str(sink.path),
        "status": result.status,
        "seconds_in": round(ctx.usage.audio_in_seconds, 3),
        "seconds_written": round(sink.seconds_written, 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.files", description=__doc__)
    parser.add_argument("--demo", action="store_true", help="stream a WAV through a graph")
    parser.add_argument("--input", help="WAV to play (default: a 1 s 440 Hz tone)")
    parser.add_argument("--output", help="WAV to write (default: a temporary file)")
    parser.add_argument("--rate", type=int, default=16000, help="output sample rate")
    args = parser.parse_args(argv)
    if not args.demo:
        parser.print_help()
        return 2
    src: str | WavAudio = args.input or WavAudio(tone(440.0, 1.0, 48000), 48000, 1)
    out = args.output or str(Path(tempfile.mkdtemp(prefix="synchire-demo-")) / "out.wav")
    result = anyio.run(_demo, WavSource(src), WavSink(out, sample_rate=args.rate))
    json.dump(result, sys.stdout, indent=2)
    print()
    return 0 if result["status"] == "completed" else 1


if __name__ == "__main__":
    raise SystemExit(main())
