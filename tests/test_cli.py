"""The command lines as a user runs them: `python -m tnllm` (the decode check) and `python app.py` (help, start-up).

Each test starts a real process from the repository root; the models are the bundled 14.6M checkpoint
(assets/tnl) and the tiny preset, fast on the CPU.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import httpx
import pytest
import torch

from tests.conftest import ROOT, free_port

EOS = 2  # assets/tokenizer.model's </s>, the bundled config's eos_token_id
VERDICT = re.compile(r"max rel\. diff (\S+) \(tolerance (\S+) for (\w+)\): (PASS|FAIL)")


def run_check(*flags: str) -> subprocess.CompletedProcess:
    """`python -m tnllm FLAGS` in the repository root."""
    return subprocess.run([sys.executable, "-m", "tnllm", *flags], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def verdict(proc: subprocess.CompletedProcess) -> tuple[float, float, str]:
    """(measured error, tolerance, PASS/FAIL) from the check's last line."""
    found = VERDICT.search(proc.stdout)
    assert found, proc.stdout + proc.stderr
    return float(found[1]), float(found[2]), found[4]


def greedy_ids(proc: subprocess.CompletedProcess) -> list[int]:
    return [int(i) for i in re.search(r"greedy ids: \[([\d, ]*)\]", proc.stdout)[1].split(",") if i.strip()]


# -- python -m tnllm ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bundled():
    return run_check("--model", "assets/tnl", "--new-tokens", "32")


def test_check_of_the_bundled_model_uses_its_tokenizer_stops_at_eos_and_passes(bundled):
    out = bundled.stdout + bundled.stderr
    assert bundled.returncode == 0, out
    assert "no tokenizer" not in out and "assets/tokenizer.model (8192 pieces" in out
    ids = greedy_ids(bundled)
    assert "stopped at eos" in out and EOS not in ids and len(ids) < 32
    assert re.search(r"greedy reply \(\d+ tokens, stopped at eos\): '\w", out), "the decoded reply is printed"
    err, tolerance, result = verdict(bundled)
    assert result == "PASS" and tolerance == 1e-4 and err <= tolerance


def test_check_of_the_tiny_preset_passes_in_fp32_and_bf16():
    for dtype, tolerance in (("fp32", 1e-4), ("bf16", 2e-2)):
        proc = run_check("--model", "preset:tiny", "--dtype", dtype, "--new-tokens", "8")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert verdict(proc)[1:] == (tolerance, "PASS") and "greedy reply (" in proc.stdout


def test_tolerance_below_the_measured_error_fails_with_exit_code_1(bundled):
    err, _, _ = verdict(bundled)
    assert err > 0, "recurrent and chunked fp32 sums round differently; a zero error would make this test vacuous"
    # Far below any rounding difference: the measured error itself moves between runs (3e-7 to 6e-6 seen), as
    # the CPU's matmul kernels may split their sums differently from one process to the next.
    proc = run_check("--model", "assets/tnl", "--new-tokens", "32", "--tolerance", "1e-12")
    measured, tolerance, result = verdict(proc)
    assert proc.returncode == 1 and result == "FAIL" and measured > tolerance == 1e-12, proc.stdout


def test_nan_weights_fail_the_check(tmp_path):
    """A checkpoint whose logits are NaN: every comparison with NaN is false, so it must not PASS."""
    from tnllm import TNLConfig, TransNormerLLM, save_model

    model = TransNormerLLM(TNLConfig.from_name("tiny", vocab_size=8192))
    with torch.no_grad():
        model.model.layers[1].token_mixer.out_proj.weight.fill_(float("nan"))
    save_model(model, tmp_path)
    shutil.copy(ROOT / "assets" / "tokenizer.model", tmp_path)
    proc = run_check("--model", str(tmp_path), "--new-tokens", "4")
    err, _, result = verdict(proc)
    assert proc.returncode == 1 and math.isnan(err) and result == "FAIL", proc.stdout


# -- python app.py --------------------------------------------------------------------------------------------
def test_app_help_describes_the_app_in_whole_sentences():
    proc = subprocess.run([sys.executable, "app.py", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.split())
    description = text.split(" options: ")[0].split("] ")[-1]  # between the usage lines and the option list
    assert description.startswith("TransNormerLLM chat demo:") and description.endswith("and what is loaded."), text
    for word in ("Examples:", "python app.py --model", "TNLLM_MODEL", "TNLLM_MAX_REPLY_SECONDS"):
        assert word in text, f"the epilog names {word}"


def test_app_prints_its_url_and_no_share_hint():
    """`python app.py` on the bundled model: serves, says where, and never suggests share=True (kept off)."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TNLLM_", "GRADIO_"))}  # the defaults
    env.update(PYTHONUNBUFFERED="1", GRADIO_ANALYTICS_ENABLED="False")  # unbuffered: what a terminal shows
    proc = subprocess.Popen([sys.executable, "app.py", "--no-int8", "--device", "cpu", "--port", str(port)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while not _serves(url):
            assert proc.poll() is None and time.monotonic() < deadline, "python app.py did not start"
            time.sleep(0.5)
        time.sleep(1)  # Gradio prints its share hint right after it serves; let it reach the pipe
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
        output = proc.communicate(timeout=30)[0]
    assert f"Running on local URL:  {url}" in output, output[-3000:]
    assert "share=True" not in output, output[-3000:]


def _serves(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
