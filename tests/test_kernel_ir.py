"""The one-row product tiles keep their weight tiles in the registers they were loaded into: `bench/kernel_ir.py`
compiles every one-row gemv row of the launcher's tables for sm_90 on this machine (Triton's compiler, no GPU) and
lists what the K loop converts between layouts; only the input row ([1, BK]) may be converted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[1]


def _compiling(args: list[str]) -> str:
    """stdout of a Python run without the Triton interpreter (which compiles nothing), from the repo root."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_one_row_tiles_convert_no_weight_tile_in_their_k_loop():
    out = json.loads(_compiling(["bench/kernel_ir.py", "--json", "--registers"]).strip().splitlines()[-1])
    tables = {r["table"] for r in out["rows"]}
    assert tables == {"CONFIGS", "FLOAT_CONFIGS"} and len(out["rows"]) >= 5
    # the registers of each compiled kernel, plain and with PDL, as its cubin states them
    assert all(0 < r["registers"][mode] <= 255 for r in out["rows"] for mode in ("pdl_off", "pdl_on"))
    moved = [(r["table"], r["key"], r["config"], t) for r in out["rows"] for t in r["loop_conversions"]
             if not t.startswith("1x")]
    assert not moved, moved


def test_a_three_dimensional_product_is_caught():
    # gemv_once on two rows accumulates [BM, BN, BK] products: Triton moves the int8 weight tile [16, 256] through
    # shared memory in every K step, which the check must see
    code = ("import sys; sys.path.insert(0, 'bench'); import kernel_ir; from tnllm.kernels.triton_int8 import Config; "
            "print(kernel_ir.weight_tile_conversions(Config(2, 16, 256, num_stages=1, kind='gemv_once', magic=True)))")
    assert "16x256xi8" in _compiling(["-c", code])
