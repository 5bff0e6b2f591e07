"""bench/app_http.py on the CPU: the app over HTTP streams what its engine streams, at a comparable rate."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import free_port

pytest.importorskip("gradio")

ROOT = Path(__file__).resolve().parents[1]


def test_app_http_bench_smoke(tmp_path):
    out = tmp_path / "app.json"
    command = ["bench/app_http.py", "--device", "cpu", "--model", "preset:tiny", "--tokens", "24", "--runs", "1",
               "--port", str(free_port()), "--switch-interval-ms", "2", "--out", str(out)]
    subprocess.run([sys.executable, *command], cwd=ROOT, check=True, timeout=600)
    engine, http = json.loads(out.read_text())["rows"]
    assert (engine["path"], http["path"], http["switch_interval_ms"]) == ("engine", "app-http", 2)
    assert engine["tokens"] == http["tokens"], "seeded: both paths sample the same reply"
    assert engine["tok_s"] > 0 and http["tok_s"] > 0 and http["ratio_to_engine"] > 0
