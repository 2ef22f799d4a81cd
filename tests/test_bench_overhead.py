"""The overhead benchmark moves every frame through the graph and reports what it measured."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_benchmark_delivers_every_frame_and_prints_json() -> None:
    out = subprocess.run(
        [
            sys.executable,
            "benchmarks/pipeline_overhead.py",
            "--stages",
            "3",
            "--frames",
            "300",
            "--json",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    result = json.loads(out)
    assert result["stages"] == 3 and result["frames"] == 300
    assert result["received"] == 300
    assert result["latency_p50_ms"] <= result["latency_p99_ms"] <= result["latency_max_ms"]
    assert result["throughput_fps"] > 0


def test_benchmark_refuses_bad_arguments() -> None:
    proc = subprocess.run(
        [sys.executable, "benchmarks/pipeline_overhead.py", "--frames", "0"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "--frames" in proc.stderr
