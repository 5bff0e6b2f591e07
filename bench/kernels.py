"""Lightning Attention kernel benchmark (docs/benchmarks.md#kernel-benchmark): ours vs fla 0.6.0, official
lightning-attn 0.0.5 and SDPA flash, plus the decode step vs fla fused_recurrent, with copy / matmul ceilings
from the same run.

    python bench/kernels.py                       # every section on the GPU -> bench/results/kernels-h200.json
    python bench/kernels.py --sections decode     # some sections only (names below, run in the order given)
    python bench/kernels.py --sections prefill --prefill-n 8192,32768   # some prefill rows only
    python bench/kernels.py --out new.json && python bench/report.py --merge new.json   # fold a partial run in
    TRITON_INTERPRET=1 python bench/kernels.py --tiny --out /tmp/k.json   # CPU smoke test of this script

Sections (default: all, in this order; the missing rows first, so a short device budget still gets them):
    wide     the dk=256 / dv=128 prefill row (TNL's LRPE layers), every impl, with its correctness entry
    decode   the decode step for B = 1..256, ours vs fla fused_recurrent, % of the copy ceiling on the state
    agree    ours vs official vs fla on the same inputs: rel-L2 of o, dq, dk, dv against fp64 and fp32 references
    near1    final-state (and d initial_state) precision at λ = exp(-1e-6) and exp(-1e-5), ours vs fla, fp64 ref
    prefill  the dk = dv = 128 rows, N = 2k..128k
After every section the JSON at --out is rewritten with everything so far (a timeout loses nothing), each section's
elapsed seconds are printed and recorded under "sections", and no section (nor prefill or agreement shape) starts
after --budget-s seconds: it is recorded as skipped instead. fla and lightning-attn are optional: without them the
sections list them as "unavailable" and the run goes on. They are pure-Python wheels (Triton kernels, no compiled
extension): `pip install --no-deps fla-core==0.6.0 lightning-attn==0.0.5 einops` keeps the machine's torch.

Prints a human table, then one JSON line. Inputs are pre-built contiguous in each kernel's native layout.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import time
from pathlib import Path

import torch

from tnllm.bench import timed
from tnllm.kernels import reference as ref
from tnllm.kernels import triton_chunk
from tnllm.kernels._device import triton_interpreted
from tnllm.kernels.triton_chunk import _lightning_attn, lightning_attn_triton
from tnllm.kernels.triton_step import lightning_attn_step_triton

START = time.perf_counter()  # the budget and the printed totals count from here (after the imports)

ROOT = Path(__file__).resolve().parents[1]

DEV = "cuda" if torch.cuda.is_available() else "cpu"

SECTIONS = ("wide", "decode", "agree", "near1", "prefill")


def bench(fn, grad_to_none=None):
    """(median, p20, p80) ms: triton do_bench on CUDA (L2 flushed, warm-up 25 ms, rep 100 ms)."""
    if DEV == "cuda":
        import triton

        return tuple(triton.testing.do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8],
                                             grad_to_none=grad_to_none))
    fn()
    ms = timed(fn, torch.device(DEV))[1] * 1e3
    return ms, ms, ms


def rel_l2(out, want):
    d = out.double() - want.double()
    return d.norm().item() / max(want.double().norm().item(), 1e-30)


def ceilings():
    if DEV != "cuda":
        return {"copy_TBps": float("nan"), "matmul_TFps": float("nan")}
    x = torch.empty(2 * 1024 ** 3 // 2, dtype=torch.bfloat16, device=DEV).normal_()  # 2 GiB
    y = torch.empty_like(x)
    ms = bench(lambda: y.copy_(x))[0]
    copy = 2 * x.numel() * 2 / ms / 1e9
    a, b = (torch.randn(8192, 8192, device=DEV, dtype=torch.bfloat16) for _ in range(2))
    ms = bench(lambda: a @ b)[0]
    return {"copy_TBps": copy, "matmul_TFps": 2 * 8192 ** 3 / ms / 1e9}


def alibi_rates(H):
    return torch.tensor([2 ** (-8 * (h + 1) / H) for h in range(H)], dtype=torch.float32, device=DEV)


def load_anchors():
    anchors, errors = {}, {}
    try:
        from fla.ops.simple_gla import chunk_simple_gla, fused_recurrent_simple_gla
        anchors["fla"], anchors["fla_step"] = chunk_simple_gla, fused_recurrent_simple_gla
    except Exception as e:  # noqa: BLE001 - report and go on
        errors["fla"] = repr(e)
    try:
        from lightning_attn.ops.lightning_attn_interface import lightning_attn_func
        anchors["official"] = lightning_attn_func
    except Exception as e:  # noqa: BLE001
        errors["official"] = repr(e)
    return anchors, errors


def make_impls(q, k, v, rate, anchors):
    """name -> (fwd closure, leaves) on inputs pre-built in each native layout."""
    H = q.shape[2]
    a = -rate
    impls = {"ours": (lambda x, y, z: lightning_attn_triton(x, y, z, a)[0], (q, k, v))}
    if "fla" in anchors:
        f = anchors["fla"]
        impls["fla"] = (lambda x, y, z, f=f: f(x, y, z, g_gamma=a, scale=1.0)[0], (q, k, v))
    hf = tuple(t.transpose(1, 2).contiguous() for t in (q, k, v))  # [B, H, N, D]
    if "official" in anchors:
        f = anchors["official"]
        s = rate.reshape(H, 1, 1)
        impls["official"] = (lambda x, y, z, f=f: f(x, y, z, s), hf)
    if q.shape[-1] == v.shape[-1] and q.shape[1] <= 32768 and DEV == "cuda":
        sdpa = torch.nn.functional.scaled_dot_product_attention
        impls["sdpa"] = (lambda x, y, z: sdpa(x, y, z, is_causal=True), hf)
    return impls


def wall_s(fn):
    """(fn(), seconds of wall time including the device work): a first call's compile / autotune cost."""
    if DEV == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if DEV == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def time_impl(fn, leaves, with_bwd):
    """fwd (and fwd+bwd) timings of fn(*leaves); first_*_s: the untimed first calls (Triton compile, autotune)."""
    leaves = [t.detach().requires_grad_(with_bwd) for t in leaves]
    o, first = wall_s(lambda: fn(*leaves))
    fwd = bench(lambda: fn(*leaves))
    row = {"fwd_ms": fwd[0], "fwd_p20": fwd[1], "fwd_p80": fwd[2], "first_fwd_s": first}
    if with_bwd:
        do = torch.randn_like(o)
        del o
        row["first_fwdbwd_s"] = wall_s(lambda: fn(*leaves).backward(do))[1]
        fb = bench(lambda: fn(*leaves).backward(do), grad_to_none=leaves)
        row.update(fwdbwd_ms=fb[0], fwdbwd_p20=fb[1], fwdbwd_p80=fb[2])
        if DEV == "cuda":
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            fn(*leaves).backward(do)
            torch.cuda.synchronize()
            row["peak_extra_GiB"] = (torch.cuda.max_memory_allocated() - base) / 2 ** 30
    return row


def correctness(B, N, H, dk, dv, anchors, n_ref_seq):
    """Errors on the first n_ref_seq sequences: ours and fla vs the fp32 chunked reference (fwd + grads)."""
    g = torch.Generator(device=DEV).manual_seed(1)
    q, k = (torch.randn(n_ref_seq, N, H, dk, device=DEV, generator=g).bfloat16() / dk ** 0.25 for _ in range(2))
    v = torch.randn(n_ref_seq, N, H, dv, device=DEV, generator=g).bfloat16()
    s0 = torch.randn(n_ref_seq, H, dk, dv, device=DEV, generator=g)
    rate = alibi_rates(H)
    leaves = [t.float().requires_grad_() for t in (q, k, v)]
    o_r, f_r = ref.lightning_attn_chunked(*leaves, -rate, initial_state=s0, output_final_state=True,
                                          chunk_size=1024)
    do = torch.randn_like(o_r)
    (o_r * do).sum().backward()
    out = {}
    ours = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    o, f = lightning_attn_triton(*ours, -rate, initial_state=s0, output_final_state=True)
    (o.float() * do).sum().backward()
    out["ours"] = {"o": rel_l2(o, o_r), "final": rel_l2(f, f_r), "o_max_abs": (o.float() - o_r).abs().max().item(),
                   **{n: rel_l2(t.grad, r.grad) for n, t, r in zip(("dq", "dk", "dv"), ours, leaves)},
                   "finite": bool(torch.isfinite(o).all())}
    if "fla" in anchors:
        fl = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        o2, f2 = anchors["fla"](*fl, g_gamma=-rate, scale=1.0, initial_state=s0, output_final_state=True)
        (o2.float() * do).sum().backward()
        out["fla"] = {"o": rel_l2(o2, o_r), "final": rel_l2(f2, f_r),
                      **{n: rel_l2(t.grad, r.grad) for n, t, r in zip(("dq", "dk", "dv"), fl, leaves)}}
        out["ours_vs_fla"] = {"o": rel_l2(o, o2), "final": rel_l2(f, f2)}
    return out


def _run_outputs(call, xs, s0, do, df):
    """{o, final, dq, dk, dv, ds0} of call(q, k, v, s0) -> (o, final or None) on fresh leaves cloned from xs (their
    dtype kept: a reference gets fp64 / fp32 copies of the bf16 inputs, so its gradients are not rounded), after
    backward of <o, do> + <final, df>."""
    leaves = [x.detach().clone().requires_grad_() for x in xs]
    s = None if s0 is None else s0.detach().clone().requires_grad_()
    o, f = call(*leaves, s)
    loss = (o.double() * do).sum()
    if f is not None and df is not None:
        loss = loss + (f.double() * df).sum()
    loss.backward()
    out = {"o": o.detach(), **{n: t.grad for n, t in zip(("dq", "dk", "dv"), leaves)}}
    if f is not None:
        out["final"] = f.detach()
    if s is not None and s.grad is not None:
        out["ds0"] = s.grad
    return out


def _errors(got, want):
    """rel-L2 of every output the two share."""
    return {n: rel_l2(got[n], want[n]) for n in got if n in want}


def _inputs(B, N, H, dk, dv, seed, with_s0):
    """bf16 q, k (scaled by dk^-1/4), v, and an fp32 initial state or None; the same on every call with one seed."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    q, k = (torch.randn(B, N, H, dk, device=DEV, generator=g).bfloat16() / dk ** 0.25 for _ in range(2))
    v = torch.randn(B, N, H, dv, device=DEV, generator=g).bfloat16()
    s0 = torch.randn(B, H, dk, dv, device=DEV, generator=g) * 0.1 if with_s0 else None
    return (q, k, v), s0


def _references(xs, log_decay, s0, do, df):
    """(fp64, fp32) outputs of the chunked PyTorch reference on the exact bf16 inputs."""
    refs = []
    for dt in (torch.float64, torch.float32):
        call = (lambda q, k, v, s, dt=dt: ref.lightning_attn_chunked(
            q, k, v, log_decay.to(dt), initial_state=s, output_final_state=s is not None or df is not None))
        refs.append(_run_outputs(call, [x.to(dt) for x in xs], None if s0 is None else s0.to(dt), do, df))
    return refs


def agreement(B, N, H, dk, dv, anchors):
    """Ours, official and fla on the same bf16 inputs (ALiBi rates, no initial state: the official kernel has none):
    rel-L2 of o, dq, dk, dv against the fp64 and fp32 chunked references, and between the kernels."""
    xs, _ = _inputs(B, N, H, dk, dv, seed=2, with_s0=False)
    rate = alibi_rates(H)
    do = torch.randn(B, N, H, dv, device=DEV, dtype=torch.float64)
    r64, r32 = _references(xs, -rate, None, do, None)
    calls = {"ours": lambda q, k, v, s: lightning_attn_triton(q, k, v, -rate)}
    if "official" in anchors:
        f = anchors["official"]
        hf = (lambda t: t.transpose(1, 2).contiguous())
        calls["official"] = lambda q, k, v, s, f=f: (f(hf(q), hf(k), hf(v), rate.reshape(H, 1, 1)).transpose(1, 2),
                                                     None)
    if "fla" in anchors:
        f = anchors["fla"]
        calls["fla"] = lambda q, k, v, s, f=f: f(q, k, v, g_gamma=-rate, scale=1.0)
    entry = {"inputs": "bf16, ALiBi rates, no initial state", "ref32_vs_ref64": _errors(r32, r64)}
    outs = {}
    for name, call in calls.items():
        try:
            outs[name] = _run_outputs(call, xs, None, do, None)
            entry[name] = {"vs_ref64": _errors(outs[name], r64), "vs_ref32": _errors(outs[name], r32)}
        except Exception as e:  # noqa: BLE001 - report and go on
            entry[name] = {"error": repr(e)[:300]}
    for other in ("official", "fla"):
        if other in outs and "ours" in outs:
            entry[f"ours_vs_{other}"] = _errors(outs["ours"], outs[other])
    if "official" in outs and "fla" in outs:
        entry["official_vs_fla"] = _errors(outs["official"], outs["fla"])
    for name in ("official", "fla"):
        if name not in anchors:
            entry[name] = "unavailable"
    return entry


def near_one(B, N, H, dk, dv, anchors, dtype=torch.bfloat16, log_decays=(-1e-6, -1e-5)):
    """Precision with λ ≈ 1 (one log-decay for every head): rel-L2 of the final state, d initial_state and the rest
    against the fp64 reference, for ours as planned (segmented when B·H is small), ours forced to one segment per
    sequence (and to 8 segments when the plan has one), and fla (docs/kernels.md#final-state-precision-near-λ--1).
    The interpreter runs fp16: its bf16 cast truncates, the GPU's rounds to nearest."""
    xs, s0 = _inputs(B, N, H, dk, dv, seed=3, with_s0=True)
    xs = [x.to(dtype) for x in xs]
    g = torch.Generator(device=DEV).manual_seed(4)
    do = torch.randn(B, N, H, dv, device=DEV, generator=g, dtype=torch.float64)
    df = torch.randn(B, H, dk, dv, device=DEV, generator=g, dtype=torch.float64)
    plan = triton_chunk._Plan(B, N, H, dk, dv, xs[0].device, None, None)
    out = {"inputs": f"{str(dtype)[6:]}, initial state given, gradients of <o, dO> + <final, dF>",
           "segments_per_sequence": plan.NS, "segment_len": plan.L}
    for a in log_decays:
        ld = torch.full((H,), a, device=DEV)
        r64, r32 = _references(xs, ld, s0, do, df)
        calls = {"ours": lambda q, k, v, s, ld=ld: _lightning_attn(q, k, v, ld, s, True, None, None),
                 "ours_one_segment": lambda q, k, v, s, ld=ld: _lightning_attn(q, k, v, ld, s, True, None, N)}
        if plan.NS == 1:
            calls["ours_8_segments"] = lambda q, k, v, s, ld=ld: _lightning_attn(q, k, v, ld, s, True, None, N // 8)
        if "fla" in anchors:
            f = anchors["fla"]
            calls["fla"] = lambda q, k, v, s, f=f, ld=ld: f(q, k, v, g_gamma=ld, scale=1.0, initial_state=s,
                                                            output_final_state=True)
        entry = {"ref32": _errors(r32, r64)}
        for name, call in calls.items():
            try:
                entry[name] = _errors(_run_outputs(call, xs, s0, do, df), r64)
            except Exception as e:  # noqa: BLE001
                entry[name] = {"error": repr(e)[:300]}
        if "fla" not in anchors:
            entry["fla"] = "unavailable"
        out[f"log_decay={a:g}"] = entry
    return out


def bytes_per_token_head(dk, dv, mode):
    fwd = 2 * (2 * dk + 2 * dv)
    return fwd if mode == "fwd" else fwd + 2 * (4 * dk + 3 * dv)


def decode_rows(anchors, H=32, D=128, batches=(1, 4, 16, 64, 128, 256), reps=10):
    rows = []
    rate = alibi_rates(H)
    for B in batches:
        q, k, v = (torch.randn(B, H, D, device=DEV, dtype=torch.bfloat16) for _ in range(3))
        state = torch.randn(B, H, D, D, device=DEV) * 0.01
        calls = {"ours": lambda: lightning_attn_step_triton(q, k, v, -rate, state)}  # noqa: B023
        if "fla_step" in anchors:
            f = anchors["fla_step"]
            q4, k4, v4 = (t[:, None] for t in (q, k, v))  # [B, 1, H, D]
            calls["fla"] = lambda: f(q4, k4, v4, g_gamma=-rate, scale=1.0,  # noqa: B023
                                     initial_state=state, output_final_state=True)  # noqa: B023
        for name, call in calls.items():
            row = {"impl": name, "B": B, "H": H, "dk": D, "dv": D}
            try:
                if DEV == "cuda":
                    s = torch.cuda.Stream()
                    s.wait_stream(torch.cuda.current_stream())
                    with torch.cuda.stream(s):
                        for _ in range(3):
                            call()
                    torch.cuda.current_stream().wait_stream(s)
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph):
                        for _ in range(reps):
                            call()
                    ms = bench(graph.replay)[0] / reps
                    row["mode"] = "cuda-graph"
                else:
                    ms = bench(call)[0]
                    row["mode"] = "eager"
                row["us"] = ms * 1e3
                row["state_GBps"] = B * H * D * D * 4 * 2 / (ms * 1e-3) / 1e9
            except Exception as e:  # noqa: BLE001
                row["error"] = repr(e)[:300]
            rows.append(row)
    return rows


def _parse_args():
    """The command line (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="small shapes (CPU smoke test of the script)")
    p.add_argument("--sections", default=",".join(SECTIONS),
                   help=f"comma list, run in the order given, of {', '.join(SECTIONS)} (module docstring)")
    p.add_argument("--budget-s", type=float, default=300.0,
                   help="start no section or prefill shape after this many seconds (the rest is recorded as "
                        "skipped); default 300: the whole default run then ends within about 6 minutes on an H200")
    p.add_argument("--prefill-n", default="",
                   help="comma list of sequence lengths: the prefill section runs only these rows (default: all)")
    p.add_argument("--out", default=str(ROOT / "bench/results/kernels-h200.json"))
    args = p.parse_args()
    args.sections = [x for x in args.sections.split(",") if x]
    unknown = sorted(set(args.sections) - set(SECTIONS))
    if unknown:
        p.error(f"unknown sections {unknown}; choose from {', '.join(SECTIONS)}")
    lengths = {s[1] for s in _shapes(args.tiny)[2] if s[3] == s[4]}
    try:
        args.prefill_n = {int(n) for n in args.prefill_n.split(",") if n}  # empty: every row
    except ValueError:
        p.error(f"--prefill-n takes comma-separated integers, got {args.prefill_n!r}")
    if args.prefill_n - lengths:
        p.error(f"--prefill-n {sorted(args.prefill_n - lengths)}: no such prefill row; the rows are {sorted(lengths)}")
    return args


def _shapes(tiny):
    """(H, D, shapes): heads, head dim and the (B, N, H, dk, dv) prefill shapes, about `tokens` tokens each; the last
    one is the wide row (TNL's LRPE layers: dk = 2 dv)."""
    H, D = (2, 16) if tiny else (32, 128)
    tokens = 256 if tiny else 65536
    Ns = (64, 128) if tiny else (2048, 8192, 32768, 131072)
    shapes = [(max(1, tokens // N), N, H, D, D) for N in Ns]
    shapes.append((max(1, tokens // Ns[1]), Ns[1], H, 2 * D, D))  # TNL layer 0: dk = 2 dv
    return H, D, shapes


def _precision_shapes(tiny):
    """(agree shapes, near1 shape): one sequence each. The interpreter shapes use D >= 32: lightning-attn 0.0.5
    asserts `16 % d` (so it rejects d = 16)."""
    if tiny:
        return [(1, 128, 2, 32, 32), (1, 128, 2, 64, 32)], (1, 256, 2, 16, 16)
    return [(1, 8192, 32, 128, 128), (1, 8192, 32, 256, 128)], (1, 8192, 32, 128, 128)


def _record_anchor_versions(result):
    """result["fla_version"] and result["lightning_attn_version"]: the installed versions (None if absent)."""
    for mod in ("fla", "lightning_attn"):
        try:
            from importlib.metadata import version
            result[f"{mod}_version"] = version({"fla": "fla-core", "lightning_attn": "lightning-attn"}[mod])
        except Exception:  # noqa: BLE001
            result[f"{mod}_version"] = None


def _bench_shape(result, B, N, H_, dk, dv, anchors):
    """One prefill shape: its correctness entry, then fwd and fwd+bwd timings of every impl (rows appended)."""
    key = f"B{B}-N{N}-H{H_}-dk{dk}-dv{dv}"
    try:
        result["correctness"][key] = correctness(B, N, H_, dk, dv, anchors, n_ref_seq=1)
    except Exception as e:  # noqa: BLE001
        result["correctness"][key] = {"error": repr(e)[:300]}
    q, k = (torch.randn(B, N, H_, dk, device=DEV, dtype=torch.bfloat16) for _ in range(2))
    v = torch.randn(B, N, H_, dv, device=DEV, dtype=torch.bfloat16)
    rate = alibi_rates(H_)
    outs = {}
    for name, (fn, leaves) in make_impls(q, k, v, rate, anchors).items():
        row = {"impl": name, "B": B, "N": N, "H": H_, "dk": dk, "dv": dv, "dtype": "bf16"}
        try:
            row.update(time_impl(fn, leaves, with_bwd=True))
            if name in ("ours", "fla"):
                outs[name] = fn(*leaves)
        except Exception as e:  # noqa: BLE001
            row["error"] = repr(e)[:300]
        result["rows"].append(row)
        print(f"{key} {name}: fwd {row.get('fwd_ms', float('nan')):.3f} ms, fwd+bwd "
              f"{row.get('fwdbwd_ms', float('nan')):.3f} ms (first calls {row.get('first_fwd_s', 0):.1f} + "
              f"{row.get('first_fwdbwd_s', 0):.1f} s) {row.get('error', '')}", flush=True)
    if "fla" in outs:
        result["correctness"][key]["ours_vs_fla_full_o"] = rel_l2(outs["ours"], outs["fla"])
    del q, k, v, outs
    if DEV == "cuda":
        torch.cuda.empty_cache()


def elapsed():
    return time.perf_counter() - START


def save(result, out):
    """Rewrite `out` with everything so far (derived columns included): a run cut short keeps what it measured."""
    result["rows"].sort(key=lambda r: (r["dk"] != r["dv"], r["N"]))  # stable: impls keep their order per shape
    derive(result)
    result["total_s"] = elapsed()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=1))


def _prefill_shapes(result, shapes, anchors, args):
    """The prefill rows of `shapes`, each skipped once the budget is spent, the JSON saved after each (a row takes
    minutes with fla's autotuning); returns {"skipped_for_budget": keys}."""
    skipped = []
    for B, N, H_, dk, dv in shapes:
        if elapsed() > args.budget_s:
            skipped.append(f"B{B}-N{N}-H{H_}-dk{dk}-dv{dv}")
            continue
        _bench_shape(result, B, N, H_, dk, dv, anchors)
        save(result, args.out)
    return {"skipped_for_budget": skipped}


def section_runners(args, result, anchors):
    """name -> callable running that section into `result`, returning None or the lists of shapes it left out
    ({"skipped_for_budget": [...], "not_selected": [...]}: non-empty ones make the section "partial")."""
    H, D, shapes = _shapes(args.tiny)
    agree_shapes, near1_shape = _precision_shapes(args.tiny)

    def decode():
        result["decode"] = decode_rows(anchors, H=H, D=D, batches=(1, 4) if args.tiny else (1, 4, 16, 64, 128, 256))

    def agree():
        skipped = []
        for shape in agree_shapes:
            key = "B{}-N{}-H{}-dk{}-dv{}".format(*shape)
            if elapsed() > args.budget_s:
                skipped.append(key)
                continue
            result["agreement"][key] = agreement(*shape, anchors)
        return {"skipped_for_budget": skipped}

    def near1():
        dtype = torch.float16 if triton_interpreted(DEV) else torch.bfloat16
        result["near1"]["B{}-N{}-H{}-dk{}-dv{}".format(*near1_shape)] = near_one(*near1_shape, anchors, dtype)

    square = [s for s in shapes if s[3] == s[4]]
    selected = [s for s in square if not args.prefill_n or s[1] in args.prefill_n]

    def prefill():
        # rows left out by --prefill-n make the section partial, so a merge keeps the older rows of those shapes
        return {**_prefill_shapes(result, selected, anchors, args),
                "not_selected": ["B{}-N{}-H{}-dk{}-dv{}".format(*s) for s in square if s not in selected]}

    return {"wide": lambda: _prefill_shapes(result, [s for s in shapes if s[3] != s[4]], anchors, args),
            "prefill": prefill,
            "decode": decode, "agree": agree, "near1": near1}


SECTION_ANCHORS = {"wide": ("fla", "official"), "prefill": ("fla", "official"), "decode": ("fla_step",),
                   "agree": ("fla", "official"), "near1": ("fla",)}


def run_section(result, name, fn, anchors, args):
    """Run one section unless the budget is spent; record its status and seconds, print them, save the JSON."""
    entry = {"unavailable": [a for a in SECTION_ANCHORS.get(name, ()) if a not in anchors]}
    if elapsed() > args.budget_s:
        entry["status"] = f"skipped: budget of {args.budget_s:.0f} s spent"
    else:
        t0 = time.perf_counter()
        try:
            left_out = {k: v for k, v in (fn() or {}).items() if v}  # the section's shapes it did not run
            entry["status"] = "partial" if left_out else "done"
            entry.update(left_out)
        except Exception as e:  # noqa: BLE001 - a section's failure must not lose the others
            entry["status"] = f"error: {e!r}"[:300]
        entry["elapsed_s"] = time.perf_counter() - t0
    result["sections"][name] = entry
    save(result, args.out)
    print(f"== section {name}: {entry['status']} in {entry.get('elapsed_s', 0):.1f} s (total {elapsed():.1f} s)"
          + (f"; unavailable: {', '.join(entry['unavailable'])}" if entry["unavailable"] else ""), flush=True)


def main():
    args = _parse_args()
    torch.manual_seed(0)
    H, D, shapes = _shapes(args.tiny)
    anchors, anchor_errors = load_anchors()
    ceil, ceil_s = wall_s(ceilings)
    print(f"device {torch.cuda.get_device_name() if DEV == 'cuda' else platform.processor()}; "
          f"copy {ceil['copy_TBps']:.2f} TB/s, bf16 matmul {ceil['matmul_TFps']:.1f} TF/s ({ceil_s:.1f} s); "
          f"anchor import errors: {anchor_errors or 'none'}", flush=True)
    result = {"date": datetime.date.today().isoformat(), "device": torch.cuda.get_device_name() if DEV == "cuda"
              else "cpu", "torch": torch.__version__, "triton": __import__("triton").__version__,
              "ceilings": ceil, "anchor_errors": anchor_errors, "config": dict(triton_chunk._CFG),
              "budget_s": args.budget_s, "sections": {"ceilings": {"status": "done", "elapsed_s": ceil_s}},
              "rows": [], "decode": [], "correctness": {}, "agreement": {}, "near1": {}}
    _record_anchor_versions(result)
    runners = section_runners(args, result, anchors)
    for name in args.sections:
        run_section(result, name, runners[name], anchors, args)
    save(result, args.out)
    print(table(result))
    print(json.dumps({"ceilings": ceil, "total_s": result["total_s"],
                      "sections": {k: v["status"] for k, v in result["sections"].items()},
                      "rows": [{k: r.get(k) for k in ("impl", "N", "dk", "fwd_ms", "fwdbwd_ms")}
                               for r in result["rows"]]}))


def copy_bw(result, item):
    """Bytes/s of the copy ceiling of the run `item` comes from: a file merged by bench/report.py --merge lists its
    runs under "runs" and tags each item with its run's index; a single run has one ceiling."""
    runs = result.get("runs")
    ceilings = runs[item["run"]]["ceilings"] if runs and "run" in item else result["ceilings"]
    return ceilings["copy_TBps"] * 1e12


def derive(result):
    """Add Mtok/s, % of memory floor and ratios vs each anchor (same run) to every row, and to every decode row its
    state traffic as a % of the copy ceiling. Idempotent (also run on partial and merged files by bench/report.py)."""
    by_shape = {}
    for r in result["rows"]:
        by_shape.setdefault((r["B"], r["N"], r["dk"], r["dv"]), {})[r["impl"]] = r
    for r in result["rows"]:
        if "fwd_ms" not in r:
            continue
        bw = copy_bw(result, r)
        toks = r["B"] * r["N"]
        r["fwd_Mtok_s"] = toks / r["fwd_ms"] / 1e3
        for mode in ("fwd", "fwdbwd"):
            if f"{mode}_ms" in r and not math.isnan(bw):
                floor_ms = toks * r["H"] * bytes_per_token_head(r["dk"], r["dv"], mode) / bw * 1e3
                r[f"{mode}_floor_ms"] = floor_ms
                r[f"{mode}_pct_floor"] = 100 * floor_ms / r[f"{mode}_ms"]
        for other, o in by_shape[(r["B"], r["N"], r["dk"], r["dv"])].items():
            if other != r["impl"] and "fwd_ms" in o:
                r[f"fwd_speedup_vs_{other}"] = o["fwd_ms"] / r["fwd_ms"]
                if "fwdbwd_ms" in o and "fwdbwd_ms" in r:
                    r[f"fwdbwd_speedup_vs_{other}"] = o["fwdbwd_ms"] / r["fwdbwd_ms"]
    _derive_decode(result)


def _derive_decode(result):
    """state_pct_copy: the decode step's state read + write bytes per second as a % of the copy ceiling."""
    for r in result.get("decode") or []:
        bw = copy_bw(result, r)
        if "state_GBps" in r and not math.isnan(bw):
            r["state_pct_copy"] = 100 * r["state_GBps"] * 1e9 / bw


def _fmt(x, fmt="{:.3f}"):
    return fmt.format(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else "—"


def _prefill_table(result):
    lines = ["| impl | B | N | dk/dv | fwd ms | fwd+bwd ms | fwd Mtok/s | % fwd floor | % fwd+bwd floor | "
             "ours fwd speed-up | ours fwd+bwd speed-up |", "|" + "---|" * 11]
    ours = {(r["B"], r["N"], r["dk"]): r for r in result["rows"] if r["impl"] == "ours"}
    for r in result["rows"]:
        o = ours.get((r["B"], r["N"], r["dk"]), {})
        su = "" if r["impl"] == "ours" else _fmt(o.get(f"fwd_speedup_vs_{r['impl']}"), "{:.2f}×")
        sub = "" if r["impl"] == "ours" else _fmt(o.get(f"fwdbwd_speedup_vs_{r['impl']}"), "{:.2f}×")
        lines.append(f"| {r['impl']} | {r['B']} | {r['N']} | {r['dk']}/{r['dv']} | {_fmt(r.get('fwd_ms'))} | "
                     f"{_fmt(r.get('fwdbwd_ms'))} | {_fmt(r.get('fwd_Mtok_s'), '{:.1f}')} | "
                     f"{_fmt(r.get('fwd_pct_floor'), '{:.0f}%')} | {_fmt(r.get('fwdbwd_pct_floor'), '{:.0f}%')} | "
                     f"{su} | {sub} |")
    return lines


def _decode_table(result):
    lines = ["", "| decode impl | B | µs/step | state GB/s | % of copy | mode |", "|---|---|---|---|---|---|"]
    for r in result["decode"]:
        lines.append(f"| {r['impl']} | {r['B']} | {_fmt(r.get('us'), '{:.1f}')} | "
                     f"{_fmt(r.get('state_GBps'), '{:.0f}')} | {_fmt(r.get('state_pct_copy'), '{:.0f}%')} | "
                     f"{r.get('mode', r.get('error', ''))} |")
    return lines


def _error_row(label, key, impl, vs, errs, names):
    if not isinstance(errs, dict):  # "unavailable"
        return f"| {label} | {key} | {impl} | {vs} | {errs} |" + " |" * (len(names) - 1)
    if "error" in errs:
        return f"| {label} | {key} | {impl} | {vs} | {errs['error'][:80]} |" + " |" * (len(names) - 1)
    return f"| {label} | {key} | {impl} | {vs} | " + " | ".join(_fmt(errs.get(n), "{:.2e}") for n in names) + " |"


def _agreement_table(result):
    names = ("o", "final", "dq", "dk", "dv", "ds0")
    lines = ["", "| precision (rel-L2) | shape | impl | vs | " + " | ".join(names) + " |", "|" + "---|" * 10]
    for key, e in result.get("agreement", {}).items():
        lines.append(_error_row("agree", key, "ref32", "ref64", e.get("ref32_vs_ref64", {}), names))
        for impl in ("ours", "official", "fla"):
            errs = e.get(impl, {})
            lines.append(_error_row("agree", key, impl, "ref64", errs.get("vs_ref64", errs) if isinstance(errs, dict)
                                    else errs, names))
        for pair in ("ours_vs_official", "ours_vs_fla", "official_vs_fla"):
            if pair in e:
                a, b = pair.split("_vs_")
                lines.append(_error_row("agree", key, a, b, e[pair], names))
    for key, e in result.get("near1", {}).items():
        for ld, by_impl in e.items():
            if ld.startswith("log_decay"):
                lines += [_error_row(f"near1 {ld}", key, impl, "ref64", errs, names) for impl, errs in by_impl.items()]
    return lines


def table(result):
    lines = _prefill_table(result)
    if result.get("decode"):
        lines += _decode_table(result)
    if result.get("agreement") or result.get("near1"):
        lines += _agreement_table(result)
    lines += ["", "| section | status | s |", "|---|---|---|"]
    lines += [f"| {k} | {v['status']} | {_fmt(v.get('elapsed_s'), '{:.1f}')} |" for k, v in result["sections"].items()]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
