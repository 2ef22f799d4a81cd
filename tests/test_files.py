"""WAV ingress and egress stages, run through a Graph under a Supervisor."""

from __future__ import annotations

import itertools
import wave
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest

from pipeline.audio import (
    AudioFileError,
    WavAudio,
    dominant_frequency,
    read_wav,
    rms_dbfs,
    tone,
    write_wav,
)
from pipeline.clock import VirtualClock
from pipeline.frames import AgentAudio, AudioChunk, TranscriptEntry
from pipeline.graph import Graph
from pipeline.stage import CallContext, Collect, Inbox, Outbox, Stage
from pipeline.supervisor import CallResult, Supervisor
from stages.files import WavSink, WavSource, WavSourceOptions

HZ = 440.0


class Stamp:
    """Collects frames together with the clock time each one arrived."""

    def __init__(self, name: str = "stamp") -> None:
        self.name = name
        self.arrivals: list[tuple[float, Any]] = []

    async def run(self, ctx: CallContext, inbox: Inbox, outbox: Outbox) -> None:
        async for frame in inbox:
            self.arrivals.append((ctx.clock.now(), frame))


class Frames:
    """A source that sends a fixed list of frames."""

    def __init__(self, frames: list[Any], name: str = "frames") -> None:
        self.name = name
        self.frames = frames

    async def run(self, ctx: CallContext, inbox: Inbox, outbox: Outbox) -> None:
        for frame in self.frames:
            await outbox.send(frame)


class StopAfter:
    """Stops the supervisor after ``seconds`` on the call's clock."""

    def __init__(self, seconds: float, name: str = "stopper") -> None:
        self.name = name
        self.seconds = seconds
        self.supervisor: Supervisor | None = None

    async def run(self, ctx: CallContext, inbox: Inbox, outbox: Outbox) -> None:
        await ctx.clock.sleep(self.seconds)
        assert self.supervisor is not None
        self.supervisor.stop("test stop")


def _run(*chains: tuple[Stage, ...], stopper: StopAfter | None = None) -> tuple[CallResult, Any]:
    """Run the chains on a VirtualClock; returns the call result and the context."""
    clock = VirtualClock()
    ctx = CallContext(clock=clock)
    graph = Graph()
    for chain in chains:
        graph.chain(*chain)
    if stopper is not None:
        graph.add(stopper)

    async def main() -> CallResult:
        with anyio.fail_after(600):  # hang guard (virtual seconds)
            sup = Supervisor(ctx, graph)
            if stopper is not None:
                stopper.supervisor = sup
            return await sup.run()

    return clock.run(main), ctx


def _pcm(frames: list[Any]) -> bytes:
    return b"".join(f.pcm for f in frames)


# ----------------------------------------------------------------------------------------------
# WavSource


def test_fast_mode_delivers_all_audio_in_order() -> None:
    audio = WavAudio(tone(HZ, 1.03, 16000), 16000, 1)
    src, sink = WavSource(audio), Collect()
    result, ctx = _run((src, sink))
    assert result.status == "completed"
    assert _pcm(sink.frames) == audio.pcm
    assert all(isinstance(f, AudioChunk) for f in sink.frames)
    assert [len(f.pcm) for f in sink.frames[:-1]] == [640] * 51
    assert len(sink.frames[-1].pcm) == 320  # the last chunk is the 10 ms remainder
    times = [f.capture_time for f in sink.frames]
    assert all(b > a for a, b in itertools.pairwise(times))
    offsets = np.array(times) - times[0]
    assert np.allclose(offsets, np.arange(len(times)) * 0.02)
    assert ctx.usage.audio_in_seconds == pytest.approx(1.03)
    assert src.chunks_sent == 52


def test_realtime_mode_paces_chunks_on_the_clock() -> None:
    audio = WavAudio(tone(HZ, 2.0, 8000), 8000, 1)
    src = WavSource(audio, WavSourceOptions(realtime=True, chunk_ms=40))
    stamp = Stamp()
    result, _ = _run((src, stamp))
    assert result.status == "completed"
    frames = [f for _, f in stamp.arrivals]
    assert _pcm(frames) == audio.pcm
    captures = np.array([f.capture_time for f in frames])
    assert np.allclose(np.diff(captures), 0.04)
    assert result.duration == pytest.approx(2.0, abs=1e-6)
    start = result.started_at
    assert captures[0] == pytest.approx(start)
    for arrived, f in stamp.arrivals:  # a chunk arrives once fully captured, never earlier
        assert arrived == pytest.approx(f.capture_time + f.duration, abs=1e-6)


def test_fast_mode_takes_no_clock_time() -> None:
    src = WavSource(WavAudio(tone(HZ, 3.0, 16000), 16000, 1))
    result, _ = _run((src, Collect()))
    assert result.duration == 0.0


def test_resampling_mono_and_trailing_silence(tmp_path: Path) -> None:
    left = np.frombuffer(tone(HZ, 0.5, 44100), "<i2")
    stereo = np.stack([left, left]).T.reshape(-1).astype("<i2").tobytes()
    path = tmp_path / "stereo44k.wav"
    write_wav(path, stereo, 44100, channels=2)
    opts = WavSourceOptions(sample_rate=16000, mono=True, trailing_silence_s=0.25)
    src, sink = WavSource(path, opts), Collect()
    result, ctx = _run((src, sink))
    assert result.status == "completed"
    assert {(f.sample_rate, f.channels) for f in sink.frames} == {(16000, 1)}
    pcm = _pcm(sink.frames)
    assert abs(len(pcm) // 2 - (8000 + 4000)) <= 1
    voiced, tail = pcm[: 8000 * 2], pcm[8000 * 2 + 200 :]  # skip the resampler's decay
    assert dominant_frequency(voiced, 16000) == pytest.approx(HZ, abs=3)
    assert rms_dbfs(voiced) == pytest.approx(rms_dbfs(left.tobytes()), abs=0.5)
    assert rms_dbfs(tail) == -120.0
    assert ctx.usage.audio_in_seconds == pytest.approx(0.75, abs=1e-3)


def test_stereo_kept_when_mono_is_off(tmp_path: Path) -> None:
    pcm = np.arange(-800, 800, dtype="<i2").tobytes()
    path = tmp_path / "st.wav"
    write_wav(path, pcm, 16000, channels=2)
    src, sink = WavSource(path, WavSourceOptions(mono=False, chunk_ms=10)), Collect()
    _run((src, sink))
    assert {f.channels for f in sink.frames} == {2}
    assert [f.samples for f in sink.frames] == [160] * 5
    assert _pcm(sink.frames) == pcm


def test_bad_file_fails_at_construction(tmp_path: Path) -> None:
    with pytest.raises(AudioFileError, match=r"nope\.wav: no such file"):
        WavSource(tmp_path / "nope.wav")
    with pytest.raises(ValueError, match="chunk_ms"):
        WavSourceOptions(chunk_ms=0)


# ----------------------------------------------------------------------------------------------
# WavSink


def test_sink_writes_what_was_sent_and_forwards_frames(tmp_path: Path) -> None:
    audio = WavAudio(tone(HZ, 0.77, 16000), 16000, 1)
    out = tmp_path / "out.wav"
    src, rec, after = WavSource(audio), WavSink(out), Collect()
    result, _ = _run((src, rec, after))
    assert result.status == "completed"
    with wave.open(str(out), "rb") as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (1, 2, 16000)
        assert w.getnframes() == len(audio.pcm) // 2
    assert read_wav(out).pcm == audio.pcm
    assert rec.frames_written == len(after.frames) == src.chunks_sent
    assert rec.seconds_written == pytest.approx(0.77)
    assert _pcm(after.frames) == audio.pcm  # forwarded untouched


def test_sink_resamples_and_only_records_its_types(tmp_path: Path) -> None:
    speech = tone(HZ, 0.5, 24000)
    frames: list[Any] = [
        AgentAudio(epoch=0, pcm=speech[i : i + 960], sample_rate=24000)
        for i in range(0, len(speech), 960)
    ]
    frames.insert(3, TranscriptEntry("agent", "hello", 0.0))
    out = tmp_path / "agent.wav"
    rec, after = WavSink(out, sample_rate=16000, types=(AgentAudio,)), Collect()
    result, _ = _run((Frames(frames), rec, after))
    assert result.status == "completed"
    assert after.frames == frames  # everything forwarded, in order
    assert rec.frames_written == len(frames) - 1
    written = read_wav(out)
    assert written.sample_rate == 16000
    assert abs(written.samples - 8000) <= 1
    assert written.duration == pytest.approx(rec.seconds_written)
    assert dominant_frequency(written.pcm, 16000) == pytest.approx(HZ, abs=3)


def test_sink_handles_a_change_of_input_rate(tmp_path: Path) -> None:
    frames = [
        AudioChunk(tone(HZ, 0.25, 48000), 48000, 0.0),
        AudioChunk(tone(HZ, 0.25, 8000), 8000, 0.25),
    ]
    out = tmp_path / "mixed.wav"
    rec = WavSink(out, sample_rate=16000)
    _run((Frames(frames), rec))
    assert abs(read_wav(out).samples - 8000) <= 2
    assert rec.seconds_written == pytest.approx(0.5, abs=2 / 16000)


def test_sink_leaves_a_valid_wav_when_the_call_is_stopped(tmp_path: Path) -> None:
    audio = WavAudio(tone(HZ, 3.0, 16000), 16000, 1)
    out = tmp_path / "partial.wav"
    src = WavSource(audio, WavSourceOptions(realtime=True))
    rec = WavSink(out)
    result, ctx = _run((src, rec), stopper=StopAfter(1.0))
    assert result.status == "stopped" and result.reason == "test stop"
    assert result.duration == pytest.approx(1.0)
    with wave.open(str(out), "rb") as w:  # a complete, consistent header
        assert w.getnframes() * 2 == len(w.readframes(w.getnframes() + 1))
    written = read_wav(out)
    assert 0.9 <= written.duration <= 1.0 + 1e-9  # what arrived before the stop
    assert written.duration == pytest.approx(rec.seconds_written)
    assert written.pcm == audio.pcm[: len(written.pcm)]
    # Usage counts what the source sent; a chunk may still have been queued at the stop.
    assert written.duration - 1e-9 <= ctx.usage.audio_in_seconds <= 1.0 + 1e-9


def test_sink_rejects_a_bad_rate(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="sample_rate"):
        WavSink(tmp_path / "x.wav", sample_rate=0)
