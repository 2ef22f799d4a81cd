"""PCM helpers: WAV i/o, av.AudioFrame conversion, streaming resampling, exact re-framing.

Every function here speaks 16-bit signed little-endian PCM, interleaved when multichannel,
because that is what WebRTC, webrtcvad and the speech providers exchange. Conversions to and
from other formats happen at the edges (``read_wav``, ``from_av_frame``) so stages never have
to care. Resampling uses FFmpeg's resampler through PyAV rather than hand-written filters.
"""

from __future__ import annotations

import math
import struct
import wave
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

VAD_FRAME_MS = (10, 20, 30)
"""The frame lengths webrtcvad accepts (and so the ones :class:`Reframer` produces)."""

SILENCE_DBFS = -120.0
"""What :func:`rms_dbfs` reports for silence or no audio instead of minus infinity."""

_LAYOUTS = {1: "mono", 2: "stereo"}
_WAVE_FORMAT_PCM = 0x0001
_WAVE_FORMAT_IEEE_FLOAT = 0x0003
_WAVE_FORMAT_EXTENSIBLE = 0xFFFE


class AudioFileError(ValueError):
    """An audio file cannot be used: missing, not a WAV, an unsupported format, or empty."""


@dataclass(frozen=True)
class WavAudio:
    """Decoded audio: 16-bit PCM (interleaved) at the file's own rate and channel count."""

    pcm: bytes
    sample_rate: int
    channels: int

    @property
    def samples(self) -> int:
        """Samples per channel."""
        return len(self.pcm) // (2 * self.channels)

    @property
    def duration(self) -> float:
        """Length in seconds."""
        return self.samples / self.sample_rate


# ----------------------------------------------------------------------------------------------
# WAV files


def read_wav(path: str | Path) -> WavAudio:
    """Read a PCM WAV (8/16/24/32-bit integer or 32/64-bit float) as 16-bit PCM.

    The stdlib ``wave`` module reads integer PCM; float and WAVE_FORMAT_EXTENSIBLE files (which
    ``wave`` refuses on Python 3.11) are parsed from their RIFF chunks here.
    """
    p = Path(path)
    if not p.exists():
        raise AudioFileError(f"{p}: no such file")
    if not p.is_file():
        raise AudioFileError(f"{p}: not a regular file")
    if p.stat().st_size == 0:
        raise AudioFileError(f"{p}: empty file (0 bytes), not a WAV")
    try:
        with wave.open(str(p), "rb") as w:
            width, rate, channels = w.getsampwidth(), w.getframerate(), w.getnchannels()
            raw = w.readframes(w.getnframes())
    except (wave.Error, EOFError) as exc:
        return _read_riff(p, exc)
    if width not in (1, 2, 3, 4):
        raise AudioFileError(f"{p}: unsupported sample width of {width} bytes")
    return _checked(p, _int_to_s16(raw, width), rate, channels)


def write_wav(path: str | Path, pcm: bytes, sample_rate: int, channels: int = 1) -> None:
    """Write 16-bit PCM as a WAV file."""
    if len(pcm) % (2 * channels):
        raise ValueError(
            f"pcm length {len(pcm)} is not a whole number of {channels}-channel 16-bit samples"
        )
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(pcm)


def _checked(path: Path, pcm: bytes, rate: int, channels: int) -> WavAudio:
    if rate <= 0:
        raise AudioFileError(f"{path}: invalid sample rate {rate}")
    if channels <= 0:
        raise AudioFileError(f"{path}: invalid channel count {channels}")
    usable = len(pcm) - len(pcm) % (2 * channels)  # a truncated last frame is dropped
    return WavAudio(pcm[:usable], rate, channels)


def _int_to_s16(raw: bytes, width: int) -> bytes:
    """Little-endian integer PCM of ``width`` bytes per sample to 16-bit (keeps the top bits)."""
    if width == 2:
        return raw[: len(raw) - len(raw) % 2]
    if width == 1:  # 8-bit WAV is unsigned
        u8 = np.frombuffer(raw, dtype=np.uint8)
        return ((u8.astype(np.int16) - 128) << 8).astype("<i2").tobytes()
    b = np.frombuffer(raw[: len(raw) - len(raw) % width], dtype=np.uint8).reshape(-1, width)
    return np.ascontiguousarray(b[:, width - 2 :]).tobytes()  # the two most significant bytes


def _float_to_s16(samples: np.ndarray) -> bytes:
    scaled = np.clip(np.nan_to_num(samples.astype(np.float64)), -1.0, 1.0) * 32767.0
    return np.rint(scaled).astype("<i2").tobytes()


def _read_riff(path: Path, cause: BaseException) -> WavAudio:
    """Parse the RIFF chunks of a WAV that ``wave`` refused (float or extensible format)."""
    data = path.read_bytes()
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise AudioFileError(f"{path}: not a WAV file (no RIFF/WAVE header)")
    fmt: bytes | None = None
    payload: bytes | None = None
    pos = 12
    while pos + 8 <= len(data):
        chunk_id = data[pos : pos + 4]
        (size,) = struct.unpack_from("<I", data, pos + 4)
        body = data[pos + 8 : pos + 8 + size]
        if chunk_id == b"fmt ":
            fmt = body
        elif chunk_id == b"data":
            payload = body
            break
        pos += 8 + size + (size & 1)
    if fmt is None or len(fmt) < 16:
        raise AudioFileError(f"{path}: not a valid WAV file (no fmt chunk): {cause}")
    if payload is None:
        raise AudioFileError(f"{path}: not a valid WAV file (no data chunk)")
    tag, channels, rate, _, _, bits = struct.unpack_from("<HHIIHH", fmt)
    if tag == _WAVE_FORMAT_EXTENSIBLE and len(fmt) >= 26:
        (tag,) = struct.unpack_from("<H", fmt, 24)  # first two bytes of the sub-format GUID
    if tag == _WAVE_FORMAT_IEEE_FLOAT and bits in (32, 64):
        dtype = "<f4" if bits == 32 else "<f8"
        width = bits // 8
        samples = np.frombuffer(payload[: len(payload) - len(payload) % width], dtype=dtype)
        return _checked(path, _float_to_s16(samples), rate, channels)
    if tag == _WAVE_FORMAT_PCM and bits in (8, 16, 24, 32):
        return _checked(path, _int_to_s16(payload, bits // 8), rate, channels)
    kind = {_WAVE_FORMAT_IEEE_FLOAT: "float", _WAVE_FORMAT_PCM: "PCM"}.get(tag, f"tag {tag:#x}")
    raise AudioFileError(f"{path}: unsupported WAV format ({kind}, {bits}-bit)")


# ----------------------------------------------------------------------------------------------
# Sizes and channel maps


def frame_bytes(sample_rate: int, frame_ms: int, channels: int = 1) -> int:
    """Bytes in one frame of ``frame_ms`` of 16-bit PCM; the frame must be whole samples."""
    samples, rest = divmod(sample_rate * frame_ms, 1000)
    if rest or samples <= 0:
        raise ValueError(f"{frame_ms} ms at {sample_rate} Hz is not a whole number of samples")
    return samples * 2 * channels


def to_mono(pcm: bytes, channels: int) -> bytes:
    """Average interleaved channels into one."""
    if channels == 1:
        return pcm
    if channels < 1:
        raise ValueError(f"channels must be at least 1, got {channels}")
    x = np.frombuffer(pcm, dtype="<i2")
    x = x[: len(x) - len(x) % channels].reshape(-1, channels)
    return np.rint(x.mean(axis=1)).astype("<i2").tobytes()


def _layout(channels: int) -> str:
    try:
        return _LAYOUTS[channels]
    except KeyError:
        raise ValueError(
            f"only mono or stereo audio is supported, got {channels} channels"
        ) from None


# ----------------------------------------------------------------------------------------------
# Resampling


class Resampler:
    """Streaming 16-bit PCM resampler (rate and mono/stereo) on FFmpeg's swresample via PyAV.

    Feed chunks of any size to :meth:`process`; call :meth:`flush` at the end to drain the
    filter's delay so the total duration is kept. Channels are mapped here, not by FFmpeg:
    stereo to mono averages, mono to stereo copies the channel at the same level (FFmpeg's
    default upmix would lower it by 3 dB). When the rates are equal av is never touched.
    """

    def __init__(
        self, in_rate: int, out_rate: int, in_channels: int = 1, out_channels: int = 1
    ) -> None:
        if in_rate <= 0 or out_rate <= 0:
            raise ValueError(f"sample rates must be positive, got {in_rate} → {out_rate}")
        self.in_rate, self.out_rate = in_rate, out_rate
        self.in_channels, self.out_channels = in_channels, out_channels
        for channels in (in_channels, out_channels):
            _layout(channels)  # only mono and stereo: raise ValueError otherwise
        self.passthrough = in_rate == out_rate and in_channels == out_channels
        self._downmix = in_channels == 2 and out_channels == 1
        self._upmix = in_channels == 1 and out_channels == 2
        self._work_layout = _layout(min(in_channels, out_channels))  # channels while resampling
        self._av: av.AudioResampler | None = None
        self._partial = b""  # bytes of an incomplete sample frame, kept for the next chunk
        self._sample_bytes = 2 * in_channels

    def process(self, pcm: bytes) -> bytes:
        """Resample a chunk; returns whatever output is ready (maybe empty)."""
        if self._partial:
            pcm = self._partial + pcm
        usable = len(pcm) - len(pcm) % self._sample_bytes
        self._partial = pcm[usable:]
        if not usable:
            return b""
        if usable != len(pcm):
            pcm = pcm[:usable]
        if self.passthrough:
            return pcm
        if self._downmix:
            pcm = to_mono(pcm, 2)
        if self.in_rate != self.out_rate:
            array = np.frombuffer(pcm, dtype="<i2").reshape(1, -1)
            frame = av.AudioFrame.from_ndarray(array, format="s16", layout=self._work_layout)
            frame.sample_rate = self.in_rate
            if self._av is None:
                self._av = av.AudioResampler(
                    format="s16", layout=self._work_layout, rate=self.out_rate
                )
            pcm = _join(self._av.resample(frame))
        return self._finish(pcm)

    def flush(self) -> bytes:
        """Drain the resampler's delay; the resampler may be used again afterwards."""
        self._partial = b""
        if self._av is None:
            return b""
        out = _join(self._av.resample(None))
        self._av = None
        return self._finish(out)

    def _finish(self, pcm: bytes) -> bytes:
        if self._upmix and pcm:
            return np.repeat(np.frombuffer(pcm, dtype="<i2"), 2).tobytes()
        return pcm


def resample(
    pcm: bytes, in_rate: int, out_rate: int, in_channels: int = 1, out_channels: int = 1
) -> bytes:
    """Resample a whole buffer at once."""
    r = Resampler(in_rate, out_rate, in_channels, out_channels)
    return r.process(pcm) + r.flush()


def _join(frames: list[av.AudioFrame]) -> bytes:
    if len(frames) == 1:
        return bytes(frames[0].to_ndarray().tobytes())
    return b"".join(f.to_ndarray().tobytes() for f in frames)


# ----------------------------------------------------------------------------------------------
# Exact re-framing


class Reframer:
    """Cuts a PCM stream into exact frames of 10, 20 or 30 ms (what webrtcvad accepts)."""

    def __init__(self, sample_rate: int, frame_ms: int = 20, channels: int = 1) -> None:
        if frame_ms not in VAD_FRAME_MS:
            raise ValueError(f"frame_ms must be one of {VAD_FRAME_MS}, got {frame_ms}")
        self.sample_rate = sample_rate
        self.frame_ms = frame_ms
        self.channels = channels
        self.frame_size = frame_bytes(sample_rate, frame_ms, channels)
        self._buf = bytearray()

    @property
    def pending(self) -> int:
        """Bytes held back waiting for a full frame."""
        return len(self._buf)

    def push(self, pcm: bytes) -> list[bytes]:
        """Add audio; returns every complete frame now available (oldest first)."""
        size = self.frame_size
        if not self._buf and len(pcm) == size:
            return [bytes(pcm)]  # the common case on a live path: already frame-sized
        buf = self._buf
        buf += pcm
        n = len(buf) // size
        if not n:
            return []
        frames = [bytes(buf[i * size : (i + 1) * size]) for i in range(n)]
        del buf[: n * size]
        return frames

    def flush(self, pad: bool = True) -> bytes | None:
        """The held-back remainder (zero-padded to a full frame if ``pad``), or None if empty."""
        if not self._buf:
            return None
        rest = bytes(self._buf)
        self._buf.clear()
        if pad:
            rest += bytes(self.frame_size - len(rest))
        return rest


# ----------------------------------------------------------------------------------------------
# av.AudioFrame conversion


def to_av_frame(
    pcm: bytes, sample_rate: int, channels: int = 1, pts: int | None = None
) -> av.AudioFrame:
    """Wrap 16-bit interleaved PCM in a packed-s16 ``av.AudioFrame``.

    With ``pts`` set, the frame's time base is 1/sample_rate (pts counts samples).
    """
    if len(pcm) % (2 * channels):
        raise ValueError(
            f"pcm length {len(pcm)} is not a whole number of {channels}-channel 16-bit samples"
        )
    array = np.frombuffer(pcm, dtype="<i2").reshape(1, -1)
    frame = av.AudioFrame.from_ndarray(array, format="s16", layout=_layout(channels))
    frame.sample_rate = sample_rate
    if pts is not None:
        frame.pts = pts
        frame.time_base = Fraction(1, sample_rate)
    return frame


def from_av_frame(frame: av.AudioFrame) -> tuple[bytes, int, int]:
    """(16-bit interleaved PCM, sample rate, channels) of any audio frame (fltp, s16p, flt…)."""
    channels = len(frame.layout.channels)
    rate = frame.sample_rate
    if frame.format.name == "s16" and not frame.format.is_planar:
        return frame.to_ndarray().tobytes(), rate, channels
    converter = av.AudioResampler(format="s16", layout=frame.layout, rate=rate)
    return _join(converter.resample(frame) + converter.resample(None)), rate, channels


# ----------------------------------------------------------------------------------------------
# Measuring and synthesising


def rms_dbfs(pcm: bytes) -> float:
    """RMS level relative to full scale (32768), or -120.0 for silence or no audio."""
    x = np.frombuffer(pcm, dtype="<i2", count=len(pcm) // 2)
    if not len(x):
        return SILENCE_DBFS
    rms = math.sqrt(float(np.mean(np.square(x, dtype=np.float64))))
    if rms <= 0.0:
        return SILENCE_DBFS
    return max(SILENCE_DBFS, 20.0 * math.log10(rms / 32768.0))


def tone(freq_hz: float, seconds: float, sample_rate: int, amplitude: float = 0.5) -> bytes:
    """A mono sine tone (test signals, the offline demo)."""
    n = round(seconds * sample_rate)
    t = np.arange(n, dtype=np.float64) / sample_rate
    wave_ = np.sin(2.0 * math.pi * freq_hz * t) * (amplitude * 32767.0)
    return np.rint(wave_).astype("<i2").tobytes()


def silence(seconds: float, sample_rate: int, channels: int = 1) -> bytes:
    """Digital silence of the given length."""
    return bytes(round(seconds * sample_rate) * 2 * channels)


def dominant_frequency(pcm: bytes, sample_rate: int) -> float:
    """The strongest frequency in mono PCM (FFT peak, refined between bins); 0.0 if none."""
    x = np.frombuffer(pcm, dtype="<i2", count=len(pcm) // 2).astype(np.float64)
    if len(x) < 4:
        return 0.0
    spectrum = np.abs(np.fft.rfft((x - x.mean()) * np.hanning(len(x))))
    k = int(np.argmax(spectrum))
    if spectrum[k] <= 0.0:
        return 0.0
    shift = 0.0
    if 0 < k < len(spectrum) - 1:  # parabolic interpolation on the log magnitude
        a, b, c = np.log(spectrum[k - 1 : k + 2] + 1e-12)
        denom = a - 2 * b + c
        if denom != 0:
            shift = 0.5 * (a - c) / denom
    return float((k + shift) * sample_rate / len(x))
