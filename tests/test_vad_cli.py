"""``python -m stages.vad``: segments of a WAV file as JSON or a table; exit 2 on bad input."""

from __future__ import annotations

import json
import subprocess
import sys
import wave
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from pipeline.audio import read_wav, resample, write_wav
from stages.vad import main

FIXTURES = Path(__file__).parent / "fixtures"
LAYOUT = json.loads((FIXTURES / "layout.json").read_text())
ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "stages.vad", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def expected(name: str, stop_ms: int = 700) -> list[dict[str, float]]:
    (case,) = [e for e in LAYOUT["files"][name]["expect"] if e["stop_ms"] == stop_ms]
    return case["segments"]


def assert_close(found: list[dict[str, int]], truth: list[dict[str, float]], tol: float) -> None:
    assert len(found) == len(truth), (found, truth)
    for f, t in zip(found, truth, strict=True):
        assert set(f) == {"start_ms", "end_ms"}
        assert all(isinstance(v, int) for v in f.values())
        assert abs(f["start_ms"] - t["start_ms"]) <= tol and abs(f["end_ms"] - t["end_ms"]) <= tol


def test_json_segments_from_the_command_line() -> None:
    done = run_cli(str(FIXTURES / "answers_two.wav"), "--json")
    assert done.returncode == 0, done.stderr
    assert_close(json.loads(done.stdout)["segments"], expected("answers_two.wav"), 60)


def test_stop_ms_start_ms_and_aggressiveness_are_used(capsys: pytest.CaptureFixture[str]) -> None:
    path = str(FIXTURES / "pause_long.wav")
    assert main([path, "--json", "--stop-ms", "2000"]) == 0
    assert_close(
        json.loads(capsys.readouterr().out)["segments"], expected("pause_long.wav", 2000), 60
    )
    assert main([path, "--json", "--stop-ms", "700", "--aggressiveness", "1"]) == 0
    assert len(json.loads(capsys.readouterr().out)["segments"]) == 2
    # a start threshold longer than either utterance finds nothing
    assert main([path, "--json", "--start-ms", "3000"]) == 0
    assert json.loads(capsys.readouterr().out) == {"segments": []}


def test_stereo_44k_file_gives_the_same_segments(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    audio = read_wav(FIXTURES / "answers_two.wav")
    stereo = tmp_path / "stereo44k.wav"
    write_wav(stereo, resample(audio.pcm, 16000, 44100, 1, 2), 44100, channels=2)
    assert main([str(stereo), "--json"]) == 0
    assert_close(json.loads(capsys.readouterr().out)["segments"], expected("answers_two.wav"), 60)


def test_table_without_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(FIXTURES / "answers_two.wav")]) == 0
    out = capsys.readouterr().out
    assert "2 segment(s)" in out
    rows = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert [r[0] for r in rows] == ["1", "2"]
    truth = expected("answers_two.wav")
    assert abs(float(rows[0][1].rstrip("s")) * 1000 - truth[0]["start_ms"]) <= 60


def not_audio(tmp_path: Path) -> Path:
    p = tmp_path / "notes.wav"
    p.write_text("these are not samples\n")
    return p


def empty(tmp_path: Path) -> Path:
    p = tmp_path / "empty.wav"
    p.write_bytes(b"")
    return p


def truncated_header(tmp_path: Path) -> Path:
    p = tmp_path / "cut.wav"
    p.write_bytes((FIXTURES / "answer_single.wav").read_bytes()[:20])
    return p


@pytest.mark.parametrize(
    "make", [not_audio, empty, truncated_header, lambda tmp: tmp / "missing.wav", lambda tmp: tmp]
)
def test_unusable_files_exit_2_with_one_line(make: Callable[[Path], Path], tmp_path: Path) -> None:
    path = make(tmp_path)
    done = run_cli(str(path), "--json")
    assert done.returncode == 2
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "error" in lines[0] and str(path) in lines[0], done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["--aggressiveness", "4"],
        ["--stop-ms", "abc"],
        ["--stop-ms", "0"],
        ["--start-ms", "-20"],
        ["--energy-floor-dbfs", "6"],
        ["--no-such-flag"],
    ],
)
def test_bad_arguments_exit_2_with_one_line(
    args: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main([str(FIXTURES / "answer_single.wav"), *args])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "error" in err


def test_missing_file_argument_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main([])
    assert exit_.value.code == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_8_bit_wav_is_read(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    audio = read_wav(FIXTURES / "answer_single.wav")
    u8 = ((np.frombuffer(audio.pcm, "<i2").astype(np.int32) >> 8) + 128).astype(np.uint8)
    path = tmp_path / "u8.wav"
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(1)
        w.setframerate(16000)
        w.writeframes(u8.tobytes())
    assert main([str(path), "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["segments"]) == 1
