"""bench/kernels.py on the CPU: the --tiny smoke run under Triton's interpreter, its sections, the partial JSON and the
budget (docs/benchmarks.md#kernel-benchmark). fla and lightning-attn are absent here: their rows say so."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

SECTIONS = ["wide", "decode", "agree", "near1", "prefill"]


def _bench_kernels():
    """bench/kernels.py as a module under its own name (a top-level `kernels` package exists too)."""
    spec = importlib.util.spec_from_file_location("bench_kernels", ROOT / "bench" / "kernels.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _report():
    """bench/report.py as a module (it renders and merges this script's JSON)."""
    spec = importlib.util.spec_from_file_location("bench_report", ROOT / "bench" / "report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(tmp_path, *args):
    out = tmp_path / "k.json"
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}  # the CPU path, even on a GPU host
    proc = subprocess.run([sys.executable, "bench/kernels.py", "--tiny", "--out", str(out), *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


def test_tiny_run_fills_every_section(tmp_path):
    result, stdout = _run(tmp_path)
    assert list(result["sections"]) == ["ceilings", *SECTIONS]
    for name in SECTIONS:
        entry = result["sections"][name]
        assert entry["status"] == "done" and entry["elapsed_s"] > 0, (name, entry)
        assert f"== section {name}: done in " in stdout
    assert result["total_s"] >= sum(result["sections"][n]["elapsed_s"] for n in SECTIONS)
    ours = [r for r in result["rows"] if r["impl"] == "ours"]
    assert [(r["dk"], r["dv"]) for r in ours] == [(16, 16), (16, 16), (32, 16)]  # prefill, then the wide row
    assert all(r["fwd_ms"] > 0 and r["fwdbwd_ms"] > 0 and r["first_fwd_s"] > 0 for r in ours)
    assert [(r["impl"], r["B"]) for r in result["decode"] if r["impl"] == "ours"] == [("ours", 1), ("ours", 4)]
    assert set(result["agreement"]) == {"B1-N128-H2-dk32-dv32", "B1-N128-H2-dk64-dv32"}
    for entry in result["agreement"].values():
        assert entry["ref32_vs_ref64"]["o"] < 1e-6
        assert entry["ours"]["vs_ref64"]["o"] < 2e-2  # bf16 in the interpreter (its bf16 cast truncates)
        assert set(entry["ours"]["vs_ref64"]) == {"o", "dq", "dk", "dv"}
    near1 = result["near1"]["B1-N256-H2-dk16-dv16"]
    for ld in ("log_decay=-1e-06", "log_decay=-1e-05"):
        e = near1[ld]
        # fp16 in the interpreter; forced segments are as precise as one segment (the segment kernel decays per chunk)
        assert e["ours_8_segments"]["final"] < 1.5 * e["ours_one_segment"]["final"] < 2e-4
        assert e["ours_8_segments"]["ds0"] < 1.5 * e["ours_one_segment"]["ds0"]
    for module, name, sections in (("fla", "fla", ("wide", "agree", "near1", "prefill")),
                                   ("lightning_attn", "official", ("wide", "agree", "prefill"))):
        if importlib.util.find_spec(module) is None:
            assert all(name in result["sections"][s]["unavailable"] for s in sections)
            assert all(result["agreement"][key][name] == "unavailable" for key in result["agreement"])
    assert "| section | status | s |" in stdout
    text = _report().render(result)  # BENCHMARKS.md's renderer reads every section this writer fills
    assert "not measured in this run" not in text.lower()
    assert "| 128 | 2 | 32/16 | ours |" in text and "| 1 | ours | " in text  # the wide row; decode B = 1
    assert "| B1-N128-H2-dk64-dv32 | ours | fp64 reference |" in text
    assert "| B1-N256-H2-dk16-dv16 | -1e-06 | ours, 8 segments |" in text
    assert "| near1 | done; unavailable: fla |" in text or "| near1 | done |" in text


def test_report_knows_the_sections():
    """bench/report.py's merge splits the JSON by these sections: the same names as the writer's."""
    report, bk = _report(), _bench_kernels()
    assert report.KERNEL_SECTIONS == bk.SECTIONS
    assert set(report.SECTION_PARTS) == set(bk.SECTIONS)


def test_spent_budget_skips_sections_but_writes_the_json(tmp_path):
    result, stdout = _run(tmp_path, "--budget-s", "0", "--sections", "decode,agree")
    assert [result["sections"][n]["status"] for n in ("decode", "agree")] == ["skipped: budget of 0 s spent"] * 2
    assert result["decode"] == [] and result["agreement"] == {} and result["ceilings"]
    assert "== section agree: skipped" in stdout


def test_chosen_prefill_rows_make_a_partial_section_that_a_merge_completes(tmp_path):
    """--prefill-n runs some rows; the section is "partial" (the others "not_selected"), so merging it into an
    earlier complete run replaces those rows and keeps the others."""
    (tmp_path / "all").mkdir()
    full, _ = _run(tmp_path / "all", "--sections", "prefill")
    some, stdout = _run(tmp_path, "--sections", "prefill", "--prefill-n", "128")
    entry = some["sections"]["prefill"]
    assert entry["status"] == "partial" and entry["not_selected"] == ["B4-N64-H2-dk16-dv16"]
    assert {r["N"] for r in some["rows"]} == {128}
    merged = _report().merge_kernel_runs(full, some)
    assert {(r["N"], r["run"]) for r in merged["rows"] if r["impl"] == "ours"} == {(64, 0), (128, 1)}
    assert "not selected: B4-N64-H2-dk16-dv16" in _report().render(merged)


def test_unknown_section_is_refused():
    proc = subprocess.run([sys.executable, "bench/kernels.py", "--tiny", "--sections", "wide,nope"], cwd=ROOT,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "unknown sections ['nope']" in proc.stderr
    proc = subprocess.run([sys.executable, "bench/kernels.py", "--tiny", "--prefill-n", "64,100"], cwd=ROOT,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "--prefill-n [100]: no such prefill row; the rows are [64, 128]" in proc.stderr


def test_failing_section_is_recorded_and_saved_before_the_next(tmp_path):
    """A section that raises is recorded with its error; the JSON on disk already holds it (partial results)."""
    bk = _bench_kernels()
    out = tmp_path / "k.json"
    args = type("Args", (), {"budget_s": 1e9, "out": str(out)})()
    result = {"ceilings": {"copy_TBps": 2.0, "matmul_TFps": 1.0}, "sections": {}, "rows": [],
              "decode": [{"impl": "ours", "B": 64, "state_GBps": 1500.0}]}

    def boom():
        raise RuntimeError("out of memory")

    bk.run_section(result, "agree", boom, {}, args)
    saved = json.loads(out.read_text())
    assert saved["sections"]["agree"]["status"].startswith("error: RuntimeError('out of memory')")
    assert saved["sections"]["agree"]["unavailable"] == ["fla", "official"]
    assert saved["decode"][0]["state_pct_copy"] == pytest.approx(75.0)  # 1.5 TB/s of a 2 TB/s copy


def test_step_tile_sweep_runs_in_the_interpreter(tmp_path):
    """bench/step_tiles.py --tiny: the decode step through a forced tile, timed, rows written; the tile override is
    released afterwards."""
    out = tmp_path / "tiles.json"
    run = subprocess.run([sys.executable, "bench/step_tiles.py", "--tiny", "--out", str(out)], cwd=ROOT,
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, "TRITON_INTERPRET": "1"})
    assert run.returncode == 0, run.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["preset"], r["batch"], r["bv"], r["warps"]) for r in rows] == [("tiny", 2, 16, 4)]
    assert rows[0]["us"] > 0 and rows[0]["state_tb_s"] > 0


@pytest.mark.parametrize("variants", [False, True], ids=["tiles", "variants"])
def test_chunk_sweep_runs_in_the_interpreter(tmp_path, variants):
    """bench/chunk_sweep.py --tiny: every shape timed under each setting (tiles and segment rules, or the kernel's
    code variants), each checked against the shipped setting's output, the best again with its backward, the launch
    settings restored afterwards, and the report renders the file."""
    out = tmp_path / "sweep.json"
    run = subprocess.run([sys.executable, "bench/chunk_sweep.py", "--tiny", "--out", str(out)]
                         + ["--variants"] * variants, cwd=ROOT,
                         capture_output=True, text=True, timeout=300, env={**os.environ, "TRITON_INTERPRET": "1"})
    assert run.returncode == 0, run.stderr[-2000:]
    data = json.loads(out.read_text())
    settings = 2 if variants else 4
    assert len(data["rows"]) == 3 * settings and all(r["fwd_ms"] > 0 and r["segments"] >= 1 for r in data["rows"])
    assert all(r["err_vs_shipped"] < 1e-5 for r in data["rows"])
    assert [(b["N"], b["dk"]) for b in data["best"]] == [(64, 16), (256, 16), (128, 32)]
    assert all(b["fwdbwd_ms"] > 0 and b["shipped_fwd_ms"] > 0 for b in data["best"])
    text = _report().render_chunk_sweep(data)
    assert text.count("\n| ") == 1 + 3  # the header and one row per shape


def test_streamer_ab_runs_on_the_cpu(tmp_path):
    """bench/streamer_ab.py: both detokenizers through the engine, one round, rows written."""
    out = tmp_path / "ab.json"
    run = subprocess.run([sys.executable, "bench/streamer_ab.py", "--device", "cpu", "--preset", "tiny", "--sessions",
                          "3", "--context", "8", "--tokens", "6", "--rounds", "1", "--out", str(out)], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["streamer"] for r in rows] == ["shortcut", "window"]
    assert all(r["solo_ms"] > 0 and r["sessions_ms"] > 0 and r["sessions"] == 3 for r in rows)


def test_gil_bench_runs_on_the_cpu(tmp_path):
    """bench/gil.py: every load at one switch interval, rows written; a thread that never sleeps slows the engine."""
    out = tmp_path / "gil.json"
    run = subprocess.run([sys.executable, "bench/gil.py", "--device", "cpu", "--tokens", "6", "--intervals-ms", "0.5",
                          "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = {r["load"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"none", "bursts", "busy"} and all(r["interval_ms"] == 0.5 for r in rows.values())
    assert 0 < rows["none"]["ms_per_token_p50"] < rows["busy"]["ms_per_token_p50"]


def test_prologue_ab_runs_in_the_interpreter(tmp_path):
    """bench/prologue_ab.py --tiny: every decode product of a layer and the head, composed and fused, timed and
    agreeing; the report renders one line per row."""
    out = tmp_path / "ab.json"
    run = subprocess.run([sys.executable, "bench/prologue_ab.py", "--tiny", "--rows", "3", "--weights", "int8",
                          "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "TRITON_INTERPRET": "1"})
    assert run.returncode == 0, run.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["notes"] == []
    assert [(r["product"], r["prologue"], r["M"]) for r in data["rows"]] == [
        ("qkvu_proj", "add_norm", 3), ("out_proj", "gated_norm", 3), ("l1|l2", "add_norm", 3), ("l3", "mul", 3),
        ("lm_head", "add_norm", 3)]
    for row in data["rows"]:
        assert row["rel_l2"] < 1e-2 and min(row["composed_us"], row["product_us"], row["fused_us"]) > 0
    assert _report().render_prologue_ab(data).count("\n| tiny |") == len(data["rows"])
