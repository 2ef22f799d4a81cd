"""PCM helpers: resampling keeps duration and pitch, exact re-framing, av frames, WAV i/o."""

from __future__ import annotations

import itertools
import math
import struct
import wave
from pathlib import Path

import av
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.audio import (
    AudioFileError,
    Reframer,
    Resampler,
    WavAudio,
    dominant_frequency,
    frame_bytes,
    from_av_frame,
    read_wav,
    resample,
    rms_dbfs,
    silence,
    to_av_frame,
    to_mono,
    tone,
    write_wav,
)

RATES = (8000, 16000, 24000, 44100, 48000)
TONE_HZ = 440.0


def _feed(r: Resampler, pcm: bytes, sizes: list[int], sample_bytes: int) -> bytes:
    """Push ``pcm`` through ``r`` in chunks of ``sizes`` samples (cycled), then flush."""
    out = bytearray()
    pos = 0
    for n in itertools.cycle(sizes):
        if pos >= len(pcm):
            break
        out += r.process(pcm[pos : pos + n * sample_bytes])
        pos += n * sample_bytes
    out += r.flush()
    return bytes(out)


def _stereo(mono: bytes) -> bytes:
    return np.repeat(np.frombuffer(mono, "<i2"), 2).astype("<i2").tobytes()


# ----------------------------------------------------------------------------------------------
# Resampling


@pytest.mark.parametrize(("in_rate", "out_rate"), list(itertools.product(RATES, RATES)))
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sizes=st.lists(st.integers(min_value=1, max_value=3000), min_size=1, max_size=12))
def test_resampler_keeps_duration_and_pitch(in_rate: int, out_rate: int, sizes: list[int]) -> None:
    pcm = tone(TONE_HZ, 0.3, in_rate)
    in_samples = len(pcm) // 2
    out = _feed(Resampler(in_rate, out_rate), pcm, sizes, 2)
    assert len(out) % 2 == 0
    expected = in_samples * out_rate / in_rate
    assert abs(len(out) // 2 - expected) <= 1.0
    assert abs(dominant_frequency(out, out_rate) - TONE_HZ) < 3.0


@settings(max_examples=30, deadline=None)
@given(
    sizes=st.lists(st.integers(min_value=1, max_value=5000), min_size=1, max_size=8),
    rates=st.sampled_from([(44100, 16000), (16000, 48000), (48000, 8000)]),
)
def test_resampler_accepts_byte_chunks_of_any_size(
    sizes: list[int], rates: tuple[int, int]
) -> None:
    """Chunks that split a sample in half still give the same audio as one-shot resampling."""
    in_rate, out_rate = rates
    pcm = tone(TONE_HZ, 0.2, in_rate)
    out = _feed(Resampler(in_rate, out_rate), pcm, sizes, 1)  # sizes in bytes here
    assert out == resample(pcm, in_rate, out_rate)


def test_resampler_odd_chunk_of_441_samples() -> None:
    r = Resampler(44100, 16000)
    pcm = tone(TONE_HZ, 1.0, 44100)
    out = _feed(r, pcm, [441], 2)
    assert abs(len(out) // 2 - 16000) <= 1


def test_resampler_passthrough_returns_input_unchanged() -> None:
    r = Resampler(16000, 16000)
    assert r.passthrough
    pcm = tone(300.0, 0.05, 16000)
    assert r.process(pcm[:101]) + r.process(pcm[101:]) + r.flush() == pcm


@pytest.mark.parametrize(("in_ch", "out_ch"), [(2, 1), (1, 2), (2, 2)])
def test_resampler_channel_conversion(in_ch: int, out_ch: int) -> None:
    mono = tone(TONE_HZ, 0.5, 48000)
    src = _stereo(mono) if in_ch == 2 else mono
    out = resample(src, 48000, 16000, in_ch, out_ch)
    samples = len(out) // (2 * out_ch)
    assert abs(samples - 8000) <= 1
    as_mono = to_mono(out, out_ch)
    assert abs(dominant_frequency(as_mono, 16000) - TONE_HZ) < 3.0
    assert abs(rms_dbfs(as_mono) - rms_dbfs(mono)) < 0.5  # level kept (no doubling or halving)


def test_resampler_rejects_more_than_two_channels() -> None:
    with pytest.raises(ValueError, match="mono or stereo"):
        Resampler(16000, 8000, in_channels=6)


def test_resampler_can_be_reused_after_flush() -> None:
    r = Resampler(16000, 8000)
    first = r.process(tone(TONE_HZ, 0.1, 16000)) + r.flush()
    second = r.process(tone(TONE_HZ, 0.1, 16000)) + r.flush()
    assert first == second
    assert len(first) // 2 == 800


# ----------------------------------------------------------------------------------------------
# Re-framing


@settings(max_examples=200, deadline=None)
@given(
    rate=st.sampled_from([8000, 16000, 32000, 48000]),
    frame_ms=st.sampled_from([10, 20, 30]),
    channels=st.sampled_from([1, 2]),
    sizes=st.lists(st.integers(min_value=0, max_value=4000), max_size=30),
    pad=st.booleans(),
)
def test_reframer_reproduces_input_in_exact_frames(
    rate: int, frame_ms: int, channels: int, sizes: list[int], pad: bool
) -> None:
    rf = Reframer(rate, frame_ms, channels)
    size = frame_bytes(rate, frame_ms, channels)
    data = bytes(i % 251 + 1 for i in range(sum(sizes)))  # no zero bytes: padding is visible
    frames: list[bytes] = []
    pos = 0
    for n in sizes:
        frames += rf.push(data[pos : pos + n])
        pos += n
    assert all(len(f) == size for f in frames)
    assert rf.pending == len(data) % size
    rest = rf.flush(pad=pad)
    joined = b"".join(frames)
    if rest is None:
        assert len(data) % size == 0
    else:
        assert len(rest) == (size if pad else len(data) % size)
        joined += rest
    assert joined[: len(data)] == data
    assert joined[len(data) :] == bytes(len(joined) - len(data))  # padding only at the end
    assert rf.pending == 0
    assert rf.flush() is None


def test_reframer_frame_sizes_and_rejections() -> None:
    assert Reframer(16000, 20).frame_size == 640
    assert Reframer(48000, 10, channels=2).frame_size == 1920
    assert Reframer(44100, 10).frame_size == 882
    with pytest.raises(ValueError, match="frame_ms"):
        Reframer(16000, 25)
    with pytest.raises(ValueError, match="whole number"):
        Reframer(22050, 10)


def test_reframer_returns_frames_that_do_not_alias_its_buffer() -> None:
    rf = Reframer(8000, 10)
    first = rf.push(b"\x01" * 200)
    rf.push(b"\x02" * 200)
    assert first == [b"\x01" * 160]


# ----------------------------------------------------------------------------------------------
# av.AudioFrame conversion


@pytest.mark.parametrize("channels", [1, 2])
def test_av_frame_round_trip_s16(channels: int) -> None:
    mono = tone(TONE_HZ, 0.02, 48000)
    pcm = _stereo(mono) if channels == 2 else mono
    frame = to_av_frame(pcm, 48000, channels, pts=960)
    assert frame.format.name == "s16" and not frame.format.is_planar
    assert frame.samples == 960 and frame.sample_rate == 48000 and frame.pts == 960
    assert len(frame.layout.channels) == channels
    assert from_av_frame(frame) == (pcm, 48000, channels)


@pytest.mark.parametrize(("fmt", "channels"), [("fltp", 2), ("fltp", 1), ("flt", 2), ("s16p", 2)])
def test_from_av_frame_converts_to_packed_s16(fmt: str, channels: int) -> None:
    n = 441
    left = 0.5 * np.sin(np.arange(n) * 2 * math.pi * 1000 / 44100)
    right = -0.25 * np.ones(n)
    planes = np.stack([left, right][:channels])
    if fmt.startswith("s16"):
        data = np.rint(planes * 32767).astype(np.int16)
    else:
        data = planes.astype(np.float32)
    if not fmt.endswith("p"):
        data = data.T.reshape(1, -1)  # packed: one interleaved plane
    frame = av.AudioFrame.from_ndarray(data, format=fmt, layout=["mono", "stereo"][channels - 1])
    frame.sample_rate = 44100
    pcm, rate, ch = from_av_frame(frame)
    assert (rate, ch) == (44100, channels)
    got = np.frombuffer(pcm, "<i2").reshape(-1, channels)
    expected = planes.T * 32767
    assert got.shape == expected.shape
    assert np.max(np.abs(got - expected)) <= 2


def test_to_av_frame_rejects_partial_samples() -> None:
    with pytest.raises(ValueError, match="whole number"):
        to_av_frame(b"\x00" * 6, 16000, channels=2)


# ----------------------------------------------------------------------------------------------
# WAV files


def _write_int_wav(path: Path, samples: np.ndarray, width: int, rate: int, channels: int) -> None:
    """Write int16 ``samples`` (interleaved) as ``width``-byte PCM, scaled up losslessly."""
    s = samples.astype(np.int64)
    if width == 1:
        raw = ((s >> 8) + 128).astype(np.uint8).tobytes()
    elif width == 2:
        raw = s.astype("<i2").tobytes()
    elif width == 3:
        v = (s << 8).astype("<i4").view(np.uint8).reshape(-1, 4)[:, :3]
        raw = np.ascontiguousarray(v).tobytes()
    else:
        raw = (s << 16).astype("<i4").tobytes()
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes(raw)


def _write_float_wav(path: Path, samples: np.ndarray, rate: int, channels: int) -> None:
    data = samples.astype("<f4").tobytes()
    fmt = struct.pack("<HHIIHH", 3, channels, rate, rate * channels * 4, channels * 4, 32)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt
    body += b"data" + struct.pack("<I", len(data)) + data
    path.write_bytes(b"RIFF" + struct.pack("<I", len(body)) + body)


@pytest.mark.parametrize("width", [1, 2, 3, 4])
@pytest.mark.parametrize("channels", [1, 2])
def test_read_wav_integer_widths(tmp_path: Path, width: int, channels: int) -> None:
    rng = np.random.default_rng(width * 10 + channels)
    samples = rng.integers(-32768, 32767, size=1600 * channels, dtype=np.int64)
    if width == 1:
        samples = (samples >> 8) << 8  # 8-bit keeps only the top byte
    path = tmp_path / f"w{width}c{channels}.wav"
    _write_int_wav(path, samples, width, 16000, channels)
    audio = read_wav(path)
    assert (audio.sample_rate, audio.channels) == (16000, channels)
    assert np.array_equal(np.frombuffer(audio.pcm, "<i2"), samples.astype(np.int16))
    assert audio.duration == pytest.approx(0.1)


def test_read_wav_float32(tmp_path: Path) -> None:
    x = np.array([0.0, 0.5, -0.5, 1.0, -1.0, 2.0, -2.0, 0.25], dtype=np.float32)
    path = tmp_path / "float.wav"
    _write_float_wav(path, x, 22050, 2)
    audio = read_wav(path)
    assert (audio.sample_rate, audio.channels) == (22050, 2)
    expected = [0, 16384, -16384, 32767, -32767, 32767, -32767, 8192]
    assert np.abs(np.frombuffer(audio.pcm, "<i2") - np.array(expected)).max() <= 1


def test_read_wav_extensible_float(tmp_path: Path) -> None:
    """WAVE_FORMAT_EXTENSIBLE with a float sub-format (what many editors write)."""
    x = np.array([0.5, -0.5, 0.125, 0.0], dtype="<f4")
    guid = struct.pack("<H", 3) + bytes.fromhex("000000001000800000aa00389b71")
    fmt = struct.pack("<HHIIHHHHI", 0xFFFE, 1, 48000, 48000 * 4, 4, 32, 22, 32, 4) + guid
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt
    body += b"LIST" + struct.pack("<I", 3) + b"abc\x00"  # an odd-sized chunk before the data
    body += b"data" + struct.pack("<I", x.nbytes) + x.tobytes()
    path = tmp_path / "ext.wav"
    path.write_bytes(b"RIFF" + struct.pack("<I", len(body)) + body)
    audio = read_wav(path)
    assert (audio.sample_rate, audio.channels) == (48000, 1)
    assert np.frombuffer(audio.pcm, "<i2").tolist() == [16384, -16384, 4096, 0]


@pytest.mark.parametrize("channels", [1, 2])
def test_write_then_read_wav_round_trip(tmp_path: Path, channels: int) -> None:
    mono = tone(TONE_HZ, 0.25, 24000)
    pcm = _stereo(mono) if channels == 2 else mono
    path = tmp_path / "rt.wav"
    write_wav(path, pcm, 24000, channels)
    assert read_wav(path) == WavAudio(pcm, 24000, channels)
    with wave.open(str(path), "rb") as w:
        assert (w.getsampwidth(), w.getnchannels(), w.getnframes()) == (2, channels, 6000)


def test_write_wav_rejects_partial_samples(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="whole number"):
        write_wav(tmp_path / "x.wav", b"\x00\x01\x02", 16000)


def test_read_wav_errors_name_the_file_and_reason(tmp_path: Path) -> None:
    missing = tmp_path / "missing.wav"
    with pytest.raises(AudioFileError, match=r"missing\.wav: no such file"):
        read_wav(missing)
    text = tmp_path / "notes.wav"
    text.write_text("these are not the samples you are looking for\n" * 3)
    with pytest.raises(AudioFileError, match=r"notes\.wav: not a WAV"):
        read_wav(text)
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    with pytest.raises(AudioFileError, match=r"empty\.wav: empty file"):
        read_wav(empty)
    tiny = tmp_path / "tiny.wav"
    tiny.write_bytes(b"RIFF")
    with pytest.raises(AudioFileError, match=r"tiny\.wav"):
        read_wav(tiny)
    with pytest.raises(AudioFileError, match="not a regular file"):
        read_wav(tmp_path)


def test_read_wav_rejects_unsupported_format(tmp_path: Path) -> None:
    fmt = struct.pack("<HHIIHH", 6, 1, 8000, 8000, 1, 8)  # A-law
    body = b"WAVE" + b"fmt " + struct.pack("<I", 16) + fmt + b"data" + struct.pack("<I", 4)
    path = tmp_path / "alaw.wav"
    path.write_bytes(b"RIFF" + struct.pack("<I", len(body) + 4) + body + b"\x00" * 4)
    with pytest.raises(AudioFileError, match=r"alaw\.wav: unsupported WAV format"):
        read_wav(path)


def test_audio_file_error_is_a_value_error() -> None:
    assert issubclass(AudioFileError, ValueError)


# ----------------------------------------------------------------------------------------------
# Measuring and synthesising


def test_levels_and_synthesis() -> None:
    assert rms_dbfs(b"") == -120.0
    assert rms_dbfs(silence(0.1, 16000)) == -120.0
    assert rms_dbfs(tone(1000.0, 0.5, 16000, amplitude=1.0)) == pytest.approx(-3.01, abs=0.05)
    assert rms_dbfs(tone(1000.0, 0.5, 16000, amplitude=0.1)) == pytest.approx(-23.01, abs=0.05)
    assert len(silence(0.02, 48000, channels=2)) == 3840
    assert len(tone(440.0, 0.5, 8000)) == 8000
    assert frame_bytes(16000, 20) == 640
    assert frame_bytes(48000, 10, 2) == 1920


@settings(max_examples=50, deadline=None)
@given(
    freq=st.floats(min_value=50.0, max_value=3500.0),
    rate=st.sampled_from(RATES),
)
def test_dominant_frequency_finds_the_tone(freq: float, rate: int) -> None:
    assert dominant_frequency(tone(freq, 0.25, rate), rate) == pytest.approx(freq, abs=2.0)


def test_to_mono_averages_channels() -> None:
    stereo = np.array([100, 300, -50, 50, 32767, 32767], dtype="<i2").tobytes()
    assert np.frombuffer(to_mono(stereo, 2), "<i2").tolist() == [200, 0, 32767]
    assert to_mono(b"\x01\x00", 1) == b"\x01\x00"
