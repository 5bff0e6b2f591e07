"""The shared timing helper: adapters are exact, rows are sane, the engine path steps a real reply, and TNL decode
memory is constant."""

from __future__ import annotations

import importlib.util
import json
import math
import random
import statistics
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, assert_close, requires_cuda

from tnllm import TNLConfig, TransNormerLLM
from tnllm.baseline import build_llama
from tnllm.bench import (
    BenchRow,
    EngineAdapter,
    LlamaAdapter,
    LlamaStaticAdapter,
    TNLAdapter,
    adapter_for,
    percentile,
    prompt_ids,
    sweep,
    time_decode,
    time_decode_interleaved,
    time_prefill,
)
from tnllm.memory import process_rss_bytes
from tnllm.model import random_model
from tnllm.sampling import SamplingParams
from tnllm.tokenizer import BUNDLED_TOKENIZER, Tokenizer

TINY = TNLConfig.from_name("tiny")


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared, oversubscribed CPU OpenMP's
    spinning makes a decode step ~30x slower (measured: 60 ms vs 2 ms); the 4,000-step test needs one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _adapters(config: TNLConfig, device: str = "cpu"):
    torch.manual_seed(0)
    tnl = TransNormerLLM(config).to(device).eval()
    return [adapter_for(tnl), adapter_for(build_llama(config, device=device))]


def _full_logits(adapter, ids):
    """Logits [B, T, V] of one forward pass over the whole sequence, without any cache."""
    if isinstance(adapter, TNLAdapter):
        return adapter.model(ids)
    return adapter.model(ids, use_cache=False).logits


def static_vs_default_cache(device: str) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Logits of 6 teacher-forced Llama steps after a 40-token context with transformers' default cache and with
    `LlamaStaticAdapter` (on CUDA: captured steps), and the static run's path."""
    llama = build_llama(TINY, device=device)
    runs = [LlamaAdapter(llama).decode_run(40, 6, warmup=2, seed=0),
            LlamaStaticAdapter(llama).decode_run(40, 6, warmup=2, seed=0)]
    logits = [torch.cat([run.step().clone() for _ in range(6)]) for run in runs]  # [6, 1, V] each
    return logits[0], logits[1], runs[1].path


@torch.inference_mode()
def test_llama_static_cache_steps_equal_the_default_cache():
    """The strong Transformer setting (preallocated cache) computes what transformers' default does."""
    dynamic, static, path = static_vs_default_cache("cpu")
    assert path == "static-cache"
    assert_close("static vs dynamic cache logits", dynamic, static, rel=1e-5)


@pytest.mark.parametrize("family", [0, 1], ids=["tnl", "llama"])
@torch.inference_mode()
def test_prefill_then_greedy_steps_equal_full_forward(family):
    adapter = _adapters(TINY)[family]
    ids = prompt_ids(TINY.vocab_size, 13)  # [1, 13]: not a multiple of any chunk size
    logits, cache = adapter.prefill(ids)
    stepped = [logits[:, -1]]  # [1, V] per position
    for _ in range(8):
        ids = torch.cat([ids, stepped[-1].argmax(-1, keepdim=True)], dim=1)
        logits, cache = adapter.step(ids[:, -1:], cache)
        assert logits.shape == (1, 1, TINY.vocab_size)
        stepped.append(logits[:, -1])
    full = _full_logits(adapter, ids)[:, 12:]  # [1, 9, V]: positions the greedy loop produced logits for
    assert_close(f"{adapter.name} prefill+steps vs full", full, torch.stack(stepped, dim=1), rel=1e-5)
    assert torch.equal(full[:, :-1].argmax(-1), ids[:, 13:])  # the full pass picks the same greedy tokens


@pytest.mark.parametrize("interleave", [False, True], ids=["per-context", "interleaved"])
def test_timing_rows_are_sane(interleave):
    adapters = _adapters(TINY)
    calls = []
    rows = sweep(adapters, [16, 40], n_tokens=5, prefill_repeats=2, interleave=interleave,
                 progress=lambda fraction, desc: calls.append((fraction, desc)))
    assert [(r.model, r.context) for r in rows] == [("TNL", 16), ("Llama", 16), ("TNL", 40), ("Llama", 40)]
    for r in rows:
        assert isinstance(r, BenchRow)
        assert r.ttft_ms > 0 and 0 < r.decode_p20_ms <= r.decode_ms_per_token <= r.decode_p80_ms
        assert r.tokens_per_s == pytest.approx(1e3 / r.decode_ms_per_token)
        assert r.peak_bytes is None and r.prefill_peak_bytes is None  # CPU: cache_bytes and RSS instead
        rss = process_rss_bytes()
        assert r.peak_mem_mb is None if rss is None else 0 < r.peak_mem_mb <= rss / 2**20
        assert r.quant == "none"
    tnl_16, llama_16, tnl_40, llama_40 = rows
    assert tnl_16.cache_bytes == tnl_40.cache_bytes == adapters[0].model.allocate_state().nbytes
    kv_per_token = 2 * TINY.n_layers * TINY.hidden_dim * 4  # K and V, every layer, fp32
    assert (llama_16.cache_bytes, llama_40.cache_bytes) == (kv_per_token * 21, kv_per_token * 45)
    fractions = [f for f, _ in calls]
    n_calls = 2 * 2 + 2 if interleave else 2 * 2 * 2  # prefills, then one decode phase per model or per row
    assert len(calls) == n_calls + 1 and fractions == sorted(fractions) and calls[-1] == (1.0, "done")


def test_single_measurements():
    tnl = _adapters(TINY)[0]
    prefill = time_prefill(tnl, 24, repeats=2)
    assert prefill.ttft_ms > 0 and prefill.prefill_tok_s == pytest.approx(24e3 / prefill.ttft_ms)
    decode = time_decode(tnl, 24, 3, warmup=1)
    assert (decode.context_len, decode.n_tokens) == (24, 3) and decode.decode_ms > 0
    with pytest.raises(ValueError, match="warmup"):
        time_decode(tnl, 2, 3, warmup=2)


def test_engine_decode_steps_a_chat_reply_at_the_requested_context():
    """`EngineAdapter`: set-up reads the context into the session's slot, each timed step is one engine step (one
    token fed), and the row says it timed the engine."""
    tnl = EngineAdapter(_adapters(TINY)[0].model, Tokenizer(BUNDLED_TOKENIZER),
                        SamplingParams(temperature=0.7, top_k=40, repetition_penalty=1.1, seed=0))
    run = tnl.decode_run(24, 3, warmup=2, seed=0)
    pool, slot = run.session.engine.pool, run.session.slot
    assert run.path == "engine-eager" and pool.position(slot) == 24
    for _ in range(3):
        run.step()
    assert pool.position(slot) == run.session.context_tokens == 27  # the reply ended: 6 tokens, the last unfed
    row = time_decode(tnl, 24, 3, warmup=1)
    assert (row.n_tokens, row.path, row.cache_bytes) == (3, "engine-eager", tnl.model.allocate_state().nbytes)


def test_the_transformer_decodes_through_the_engine_on_its_kv_cache():
    """`EngineAdapter` on the Llama baseline: its reply runs on a per-session KV cache behind `KVCacheLM`, the same
    engine path as TNL's, and the row's cache is that session's KV cache, exactly as long as the context read."""
    llama = _adapters(TINY)[1].model
    adapter = EngineAdapter(llama, Tokenizer(BUNDLED_TOKENIZER), SamplingParams(temperature=0.7, top_k=40, seed=0),
                            "Llama")
    config = llama.config
    per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * 4  # K and V, fp32
    for context in (9, 30):
        row = time_decode(adapter, context, 3, warmup=1)
        assert row.path == "engine-eager" and row.n_tokens == 3
        assert row.cache_bytes == (context + 3) * per_token  # the prompt and the 3 timed tokens, nothing else


def test_interleaved_decode_steps_each_context_like_alone():
    """Interleaving only changes when the steps run: each context's cache sees the same ids as alone."""
    for adapter in _adapters(TINY):
        rows = time_decode_interleaved(adapter, [9, 30], 4, warmup=1)
        alone = [time_decode(adapter, c, 4, warmup=1) for c in (9, 30)]
        assert [(r.context_len, r.n_tokens, r.cache_bytes) for r in rows] == \
            [(r.context_len, r.n_tokens, r.cache_bytes) for r in alone]
        assert all(r.decode_ms > 0 and r.peak_bytes is None and r.total_bytes is None for r in rows)


@torch.inference_mode()
def test_tnl_decode_memory_does_not_grow_while_llama_kv_cache_does():
    """After 100 and after 4,000 decoded tokens (CPU, fp32; attention width 256 so a KV cache is visible):

    TNL: the state's tensors keep their size and their addresses (updated in place, never reallocated),
    and the process RSS grows by less than 2 MiB, under a tenth of the 23 MiB a KV cache of the same
    attention width would add over those 3,900 tokens. RSS is the honest whole-process check: any
    per-token allocation kept alive (a cache, a history list) would show up there.
    Llama: its KV cache bytes are exactly linear in the tokens seen (40x from 100 to 4,000), so the test
    fails if the baseline stops caching or the comparison stops measuring what grows.
    """
    config = TINY.replace(hidden_dim=256)  # H = 4, dh = 64
    tnl, llama = _adapters(config)
    ids = prompt_ids(config.vocab_size, 4000)  # [1, 4000]

    _, state = tnl.prefill(ids[:, :1])
    for t in range(1, 100):
        _, state = tnl.step(ids[:, t : t + 1], state)
    bytes_100, ptrs_100, rss_100 = state.nbytes, [kv.data_ptr() for kv in state.kv], process_rss_bytes()
    for t in range(100, 4000):
        _, state = tnl.step(ids[:, t : t + 1], state)
    assert int(state.positions) == 4000
    assert state.nbytes == bytes_100 == 4 * 4 * 64 * 64 * (3 + 2) + 8  # fp32 [H, dk, dh] per layer; 2 LRPE
    assert [kv.data_ptr() for kv in state.kv] == ptrs_100
    if rss_100 is not None:
        assert process_rss_bytes() - rss_100 < 2 * 2**20

    assert isinstance(llama, LlamaAdapter)
    _, cache = llama.prefill(ids[:, :1])
    for t in range(1, 100):
        _, cache = llama.step(ids[:, t : t + 1], cache)
    kv_100 = llama.cache_bytes(cache)
    _, cache = llama.step(ids[:, 100:], cache)  # the other 3,900 tokens in one call: same cache, less time
    kv_per_token = 2 * config.n_layers * config.hidden_dim * 4  # K and V, every layer, fp32
    assert (kv_100, llama.cache_bytes(cache)) == (100 * kv_per_token, 4000 * kv_per_token)


@requires_cuda
def test_cuda_rows_report_peak_memory():
    rows = sweep(_adapters(TINY, "cuda"), [64], n_tokens=4, prefill_repeats=2)
    assert all(r.peak_bytes is not None and r.peak_bytes >= r.cache_bytes > 0 for r in rows)
    assert all(r.prefill_peak_bytes is not None and r.prefill_peak_bytes > 0 for r in rows)


def test_decode_bench_runs_each_quant_method_in_its_own_process(tmp_path):
    """bench/decode.py: both models per 8-bit method, its JSON fields, one row per (model, quant, context)."""
    out = tmp_path / "decode.json"
    subprocess.run([sys.executable, str(ROOT / "bench" / "decode.py"), "--contexts", "16,40", "--tokens", "3",
                    "--prefill-repeats", "1", "--threads", "1", "--quant", "none,int8", "--out", str(out)],
                   check=True, capture_output=True, timeout=300)
    result = json.loads(out.read_text())
    assert result["quant"] == ["none", "int8"] and result["command"].startswith("python bench/decode.py")
    assert result["interleave"] is True, "CPU default: decode steps take turns across the contexts"
    rows = result["rows"]
    assert [(r["model"], r["quant"], r["context"]) for r in rows] == [
        (m, q, c) for q in ("none", "int8") for c in (16, 40) for m in ("TNL", "Llama")]
    for r in rows:
        assert r["ttft_ms"] > 0 and r["decode_ms_per_token"] > 0 and r["peak_mem_mb"] > 0
        assert r["path"] == "engine-eager"  # both models' replies through the engine, as chat runs them (CPU)
    tnl_cache = {r["cache_bytes"] for r in rows if r["model"] == "TNL"}
    assert len(tnl_cache) == 1, "TNL's state is the same size at every context and precision"
    # BENCHMARKS.md's section is rendered from this JSON: every row, and one goals line per method
    text = _report().render_decode(result)
    assert sum(line.startswith(("| TNL |", "| Llama |")) for line in text.splitlines()) == len(rows)
    assert [line.split(" | ")[0] for line in text.splitlines() if "(40 vs 16)" in line] == ["| none", "| int8"]


def test_random_preset_model_is_seeded_and_leaves_the_callers_rng_alone():
    """`random_model`, the benchmarks' `preset:NAME`: one seed, one model, whatever the caller drew before."""
    torch.manual_seed(5)
    expected_next = torch.rand(3)
    torch.manual_seed(5)
    model = random_model("tiny", vocab_size=300, dtype=torch.bfloat16)
    assert torch.equal(torch.rand(3), expected_next), "the caller's random stream is untouched"
    assert model.config.vocab_size == 300 and not model.training
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    again = random_model("tiny", vocab_size=300, dtype=torch.bfloat16)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    other = random_model("tiny", vocab_size=300, dtype=torch.bfloat16, seed=1)
    assert not torch.equal(model.lm_head.weight, other.lm_head.weight)


def _report():
    """bench/report.py as a module (bench/ is a folder of scripts)."""
    spec = importlib.util.spec_from_file_location("bench_report", ROOT / "bench" / "report.py")
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    return report


def test_report_sections_state_their_own_json_date(tmp_path):
    """Each section's date line comes from its JSON; a JSON without one says so instead of borrowing another's."""
    report = _report()
    kernels = json.loads((ROOT / "bench/results/kernels-h200.json").read_text())
    (tmp_path / "kernels.json").write_text(json.dumps({**kernels, "date": "2031-02-03"}))
    (tmp_path / "train-sweep-h200.json").write_text(json.dumps({"runs": {}}))
    text = report.render_all(tmp_path, tmp_path / "kernels.json")
    assert f"Date: 2031-02-03. Hardware: {kernels['device']}. Software: torch {kernels['torch']}," in text
    training = text.split("## Bundled-model training throughput")[1]
    assert training.splitlines()[2].startswith("Date: not recorded.")


def test_report_says_not_measured_for_missing_json(tmp_path):
    """A section whose JSON is missing is named, with the file and the command that would write it."""
    text = _report().render_all(tmp_path, tmp_path / "kernels.json")
    assert text.count("Not measured yet: no ") == 18
    assert f"no {tmp_path / 'soak-cpu.json'}. Command: `python bench/soak.py`." in text
    assert "budget" not in text


def _kernel_run(date, copy_tbps, sections, rows=(), decode=(), correctness=None, agreement=None, total_s=100.0):
    """A bench/kernels.py result as it writes one (sections=None: a file from before runs recorded sections)."""
    run = {"date": date, "device": "NVIDIA H200", "torch": "2.11", "triton": "3.6", "fla_version": "0.6.0",
           "lightning_attn_version": "0.0.5", "ceilings": {"copy_TBps": copy_tbps, "matmul_TFps": 700.0},
           "config": {"BT": 64}, "budget_s": 280.0, "total_s": total_s, "anchor_errors": {}, "rows": list(rows),
           "decode": list(decode), "correctness": correctness or {}, "agreement": agreement or {}, "near1": {}}
    if sections is not None:
        run["sections"] = sections
    return run


def _prefill_row(impl, B, N, dk, fwd_ms):
    return {"impl": impl, "B": B, "N": N, "H": 32, "dk": dk, "dv": 128, "dtype": "bf16", "fwd_ms": fwd_ms,
            "fwdbwd_ms": 4 * fwd_ms}


def _shape(B, N, dk):
    return f"B{B}-N{N}-H32-dk{dk}-dv128"


def _correct(o):
    return {"ours": {"o": o, "final": o, "dq": o, "dk": o, "dv": o}, "fla": {"o": o}}


SKIPPED = "skipped: budget of 280 s spent"


def _old_kernel_run():
    """The full older run: prefill N = 2k and 8k, the wide row, decode B = 1 and 64; no section statuses."""
    rows = [_prefill_row(impl, B, N, dk, ms) for B, N, dk in ((32, 2048, 128), (8, 8192, 128), (8, 8192, 256))
            for impl, ms in (("ours", 1.0), ("fla", 1.5))]
    decode = [{"impl": "ours", "B": B, "H": 32, "dk": 128, "dv": 128, "mode": "cuda-graph", "us": 5.0,
               "state_GBps": 2000.0} for B in (1, 64)]
    return _kernel_run("2031-01-01", 4.0, None, rows, decode,
                       {_shape(B, N, dk): _correct(1e-3) for B, N, dk in ((32, 2048, 128), (8, 8192, 128),
                                                                           (8, 8192, 256))})


def _new_kernel_run():
    """A partial newer run: wide done, decode skipped, agree partial, near1 skipped, prefill partial (8k skipped)."""
    agree = {"inputs": "bf16, ALiBi rates, no initial state", "ref32_vs_ref64": {"o": 2e-7, "dq": 2e-7},
             "ours": {"vs_ref64": {"o": 3e-3, "dq": 3.3e-3}, "vs_ref32": {"o": 3e-3, "dq": 3.3e-3}},
             "official": {"vs_ref64": {"o": 1.8e-3, "dq": 2.7e-3}, "vs_ref32": {"o": 1.8e-3, "dq": 2.7e-3}},
             "fla": "unavailable", "ours_vs_official": {"o": 3.3e-3, "dq": 3.5e-3}}
    sections = {"ceilings": {"status": "done", "elapsed_s": 0.3},
                "wide": {"unavailable": [], "status": "done", "elapsed_s": 200.0},
                "decode": {"unavailable": [], "status": SKIPPED},
                "agree": {"unavailable": ["fla"], "status": "partial", "elapsed_s": 60.0,
                          "skipped_for_budget": [_shape(1, 8192, 256)]},
                "near1": {"unavailable": [], "status": SKIPPED},
                "prefill": {"unavailable": [], "status": "partial", "elapsed_s": 20.0,
                            "skipped_for_budget": [_shape(8, 8192, 128)]}}
    rows = [_prefill_row(impl, B, N, dk, ms) for B, N, dk in ((32, 2048, 128), (8, 8192, 256))
            for impl, ms in (("ours", 0.8), ("fla", 1.6))]
    return _kernel_run("2031-02-02", 5.0, sections, rows, (),
                       {_shape(32, 2048, 128): _correct(2e-3), _shape(8, 8192, 256): _correct(2e-3)},
                       {_shape(1, 8192, 128): agree})


def test_report_renders_a_partial_kernel_run(tmp_path):
    """Sections a run skipped (or never ran) read "not measured in this run" with its status; the others render:
    the wide row beside the prefill rows, the agreement table, the section statuses and seconds."""
    report = _report()
    (tmp_path / "kernels.json").write_text(json.dumps(_new_kernel_run()))
    text = report.render_all(tmp_path, tmp_path / "kernels.json")
    kernels = text.split("## Bundled-model training throughput")[0]
    assert "Date: 2031-02-02. Hardware: NVIDIA H200." in kernels and "merges" not in kernels
    prefill = kernels.split("## Prefill / training")[1].split("\n## ")[0]
    assert "Run: 2031-02-02." in prefill
    assert "Skipped for the time budget in the prefill section: B8-N8192-H32-dk128-dv128." in prefill
    assert "| 8192 | 8 | 256/128 | fla | 1.600 | 6.400 | 41.0 |" in prefill  # 65,536 tokens in 1.6 ms
    assert "| 0.50× |" not in prefill and "| 2.00× | 2.00× |" in prefill  # ours 0.8 ms vs fla 1.6 ms
    assert "% of copy ceiling" not in kernels  # no decode table: the decode section was skipped
    assert ("## Decode step (H=32, D=E=128, bf16 q/k/v, fp32 state; µs per step, CUDA-graph replay of 10 steps)\n\n"
            f"Not measured in this run ({SKIPPED}). Command: `python bench/kernels.py --sections decode`.") in kernels
    assert f"## Precision near λ = 1 (rel-L2 against the fp64 reference, lower is better)\n\nNot measured in this " \
           f"run ({SKIPPED})." in kernels
    agree = kernels.split("## Agreement")[1].split("\n## ")[0]
    assert "| shape | impl | vs | o | dq |" in agree  # only the outputs recorded (no initial state: no final, ds0)
    assert "| B1-N8192-H32-dk128-dv128 | official | fp64 reference | 1.80e-03 | 2.70e-03 |" in agree
    assert "| B1-N8192-H32-dk128-dv128 | ours | official | 3.30e-03 | 3.50e-03 |" in agree
    assert "| B1-N8192-H32-dk128-dv128 | fla |  | unavailable | |" in agree
    assert "Skipped for the time budget in the agree section: B1-N8192-H32-dk256-dv128." in agree
    status = kernels.split("## Kernel benchmark sections")[1]
    assert "| wide | done | 200.0 | 2031-02-02 |" in status
    assert f"| near1 | {SKIPPED} | — | 2031-02-02 |" in status
    assert "| agree | partial (skipped for the budget: B1-N8192-H32-dk256-dv128); unavailable: fla | 60.0 |" in status
    # a file with no section at all: every table says so, nothing fails
    (tmp_path / "kernels.json").write_text(json.dumps(_kernel_run("2031-03-03", 4.0, {})))
    text = report.render_all(tmp_path, tmp_path / "kernels.json")
    assert text.count("not measured in this run") == 2 and text.count("Not measured in this run") == 3
    assert "| prefill | not run | — | |" in text


def test_merge_keeps_what_a_partial_run_skipped(tmp_path):
    """A section the new run completed replaces the old one; one it skipped keeps the old rows (tagged with their
    run); a partial one keeps the old shapes it did not measure again; % of floor uses each run's own ceiling."""
    report = _report()
    old, new = tmp_path / "old.json", tmp_path / "new.json"
    old.write_text(json.dumps(_old_kernel_run()))
    new.write_text(json.dumps(_new_kernel_run()))
    merged = report.merge_kernel_files(old, new, tmp_path / "merged.json")
    assert json.loads((tmp_path / "merged.json").read_text()) == json.loads(json.dumps(merged))
    assert [r["date"] for r in merged["runs"]] == ["2031-01-01", "2031-02-02"] and merged["date"] == "2031-02-02"
    assert merged["ceilings"]["copy_TBps"] == 5.0
    by_shape = {(x["N"], x["dk"], x["impl"]): x for x in merged["rows"]}
    assert len(merged["rows"]) == 6
    assert by_shape[(2048, 128, "ours")]["fwd_ms"] == 0.8 and by_shape[(2048, 128, "ours")]["run"] == 1
    assert by_shape[(8192, 128, "ours")]["fwd_ms"] == 1.0 and by_shape[(8192, 128, "ours")]["run"] == 0  # kept
    assert by_shape[(8192, 256, "fla")]["fwd_ms"] == 1.6  # wide: done in the new run, replaced
    # % of floor: the same bytes over each run's own copy rate (4 TB/s old, 5 TB/s new)
    floor = 65536 * 32 * 2 * (2 * 128 + 2 * 128) / 1e12 * 1e3  # ms at 1 TB/s
    assert by_shape[(8192, 128, "ours")]["fwd_pct_floor"] == pytest.approx(100 * floor / 4.0 / 1.0)
    assert by_shape[(2048, 128, "ours")]["fwd_pct_floor"] == pytest.approx(100 * floor / 5.0 / 0.8)
    assert [(x["B"], x["run"]) for x in merged["decode"]] == [(1, 0), (64, 0)]  # decode skipped: the old rows stay
    assert merged["decode"][1]["state_pct_copy"] == pytest.approx(50.0)  # 2 TB/s of the old run's 4 TB/s
    assert {k: c["run"] for k, c in merged["correctness"].items()} == {
        _shape(32, 2048, 128): 1, _shape(8, 8192, 128): 0, _shape(8, 8192, 256): 1}
    sections = merged["sections"]
    assert sections["decode"] == {"status": "done", "inferred": True, "run": 0, "latest_status": SKIPPED}
    assert sections["prefill"]["status"] == "partial" and sections["prefill"]["run"] == 1
    assert sections["near1"] == {"unavailable": [], "status": SKIPPED, "run": 1}

    text = report.render(merged)
    assert "This file merges 2 runs" in text and "| 1 | 2031-01-01 | NVIDIA H200 |" in text
    prefill = text.split("## Prefill / training")[1].split("\n## ")[0]
    assert "Run: run 1 (2031-01-01), run 2 (2031-02-02)." in prefill and "| run |" in prefill
    assert "| 8192 | 8 | 128/128 | ours | 1.000 |" in prefill and prefill.count("| run 1 (2031-01-01) |") == 2
    decode = text.split("## Decode step")[1].split("\n## ")[0]
    assert "Run: run 1 (2031-01-01)." in decode and "| 64 | ours | 5.0 | 2000 | 50% |" in decode
    assert f"| decode | done (inferred: the file predates section statuses); latest run: {SKIPPED} | — | " \
           "run 1 (2031-01-01) |" in text

    with pytest.raises(ValueError, match="already merged"):
        report.merge_kernel_runs(merged, _new_kernel_run())
    # a third run that completes prefill replaces the kept 8k shape too
    third = _kernel_run("2031-03-03", 4.5, {"prefill": {"status": "done", "elapsed_s": 9.0}},
                        [_prefill_row("ours", 32, 2048, 128, 0.7)], (), {_shape(32, 2048, 128): _correct(1e-3)})
    again = report.merge_kernel_runs(merged, third)
    assert [(x["N"], x["dk"], x["impl"], x["run"]) for x in again["rows"]] == [
        (2048, 128, "ours", 2), (8192, 256, "ours", 1), (8192, 256, "fla", 1)]
    assert set(again["correctness"]) == {_shape(32, 2048, 128), _shape(8, 8192, 256)}
    assert again["sections"]["decode"]["run"] == 0 and again["sections"]["wide"]["run"] == 1


def test_merge_command_writes_the_merged_file_and_the_report(tmp_path):
    """`bench/report.py --merge NEW --merged-out FILE`: the previous file is left alone; merging twice is refused."""
    old, new = tmp_path / "old.json", tmp_path / "new.json"
    old.write_text(json.dumps(_old_kernel_run()))
    new.write_text(json.dumps(_new_kernel_run()))
    before = old.read_text()
    cmd = [sys.executable, "bench/report.py", "--json", str(old), "--merge", str(new), "--out", str(tmp_path / "B.md")]
    proc = subprocess.run([*cmd, "--merged-out", str(tmp_path / "m.json")], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert old.read_text() == before
    assert "decode run 1 (2031-01-01)" in proc.stdout and "prefill run 2 (2031-02-02)" in proc.stdout
    assert len(json.loads((tmp_path / "m.json").read_text())["runs"]) == 2
    assert "This file merges 2 runs" in (tmp_path / "B.md").read_text()
    proc = subprocess.run([*cmd[:3], str(tmp_path / "m.json"), *cmd[4:]], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2 and "already merged" in proc.stderr


def test_percentile_interpolates_linearly_between_closest_ranks():
    """The one percentile of the benchmarks: position q * (n - 1) of the sorted samples, interpolated."""
    assert percentile([4, 1, 3, 2], 0.5) == 2.5
    assert percentile([10, 20, 30, 40, 50], 0.2) == 18
    assert percentile([10, 20, 30, 40, 50], 0.95) == 48
    assert percentile([3, 1, 2], 0) == 1 and percentile([3, 1, 2], 1) == 3
    assert percentile([7.0], 0.8) == 7.0
    assert math.isnan(percentile([], 0.5))
    with pytest.raises(ValueError):
        percentile([1, 2], 95)
    rng = random.Random(0)
    for n in (2, 5, 32):
        samples = [rng.random() for _ in range(n)]
        assert percentile(samples, 0.5) == pytest.approx(statistics.median(samples))
        deciles = statistics.quantiles(samples, n=10, method="inclusive")
        assert [percentile(samples, i / 10) for i in range(1, 10)] == pytest.approx(deciles)


def test_fold_rows_replaces_what_was_measured_again_and_keeps_the_rest():
    report = _report()
    old = {"command": "first", "date": "d1", "notes": ["a"],
           "rows": [{"preset": "p", "quant": "none", "path": "x", "batch": 1, "context": 0, "ms": 5.0, "commit": "old"},
                    {"preset": "p", "quant": "none", "path": "x", "batch": 16, "context": 0, "ms": 6.0,
                     "commit": "old"}], "interleave": []}
    new = {"command": "second", "date": "d2", "notes": ["b"],
           "rows": [{"preset": "p", "quant": "none", "path": "x", "batch": 1, "context": 0, "ms": 4.0}]}
    folded = report.fold_rows(old, new, "new")
    assert folded["date"] == "d2" and folded["notes"] == ["a", "b"]
    assert folded["command"] == ["first", "second (rows of code new)"]
    assert sorted((r["batch"], r["ms"], r["commit"]) for r in folded["rows"]) == [(1, 4.0, "new"), (16, 6.0, "old")]
