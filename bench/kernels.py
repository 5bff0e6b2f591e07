"""Lightning Attention kernel benchmark (docs/benchmarks.md#kernel-benchmark): ours vs fla 0.6.0, official
lightning-attn 0.0.5 and SDPA flash, plus the decode step vs fla fused_recurrent, with copy / matmul ceilings
from the same run.

    python bench/kernels.py                       # full set on the GPU -> bench/results/kernels-h200.json
    python bench/kernels.py --sweep               # also try launch configs of our chunk kernel first
    TRITON_INTERPRET=1 python bench/kernels.py --tiny --out /tmp/k.json   # CPU smoke test of this script

Prints a human table, then one JSON line. Inputs are pre-built contiguous in each kernel's native layout.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
from pathlib import Path

import torch

from tnllm.bench import timed
from tnllm.kernels import reference as ref
from tnllm.kernels import triton_chunk
from tnllm.kernels.triton_chunk import lightning_attn_triton
from tnllm.kernels.triton_step import lightning_attn_step_triton

ROOT = Path(__file__).resolve().parents[1]

DEV = "cuda" if torch.cuda.is_available() else "cpu"


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


def time_impl(fn, leaves, with_bwd):
    leaves = [t.detach().requires_grad_(with_bwd) for t in leaves]
    fwd = bench(lambda: fn(*leaves))
    row = {"fwd_ms": fwd[0], "fwd_p20": fwd[1], "fwd_p80": fwd[2]}
    if with_bwd:
        o = fn(*leaves)
        do = torch.randn_like(o)
        del o
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


SWEEP_NARROW = [dict(BT=64, BV=128, WARPS=8, STAGES=1), dict(BT=64, BV=64, WARPS=4, STAGES=1),
                dict(BT=128, BV=64, WARPS=8, STAGES=1), dict(BT=128, BV=128, WARPS=8, STAGES=1)]
SWEEP_WIDE = [dict(BV_WIDE=64, WARPS_WIDE=8, STAGES_WIDE=2), dict(BV_WIDE=64, WARPS_WIDE=8, STAGES_WIDE=1)]


def sweep(shapes_narrow, shapes_wide):
    """Try launch configs of our chunk kernel, keep the best (fwd+bwd summed over shapes) in _CFG."""
    rows = []
    for configs, shapes in ((SWEEP_NARROW, shapes_narrow), (SWEEP_WIDE, shapes_wide)):
        base, best = dict(triton_chunk._CFG), None
        for cfg in configs:
            triton_chunk._CFG.update({**base, **cfg})
            total = 0.0
            for B, N, H, dk, dv in shapes:
                q, k = (torch.randn(B, N, H, dk, device=DEV, dtype=torch.bfloat16) for _ in range(2))
                v = torch.randn(B, N, H, dv, device=DEV, dtype=torch.bfloat16)
                rate = alibi_rates(H)
                try:
                    r = time_impl(lambda x, y, z, a=-rate: lightning_attn_triton(x, y, z, a)[0], (q, k, v), True)
                    total += r["fwd_ms"] + r["fwdbwd_ms"]
                except Exception as e:  # noqa: BLE001
                    r, total = {"error": repr(e)[:200]}, float("inf")
                rows.append({"cfg": cfg, "B": B, "N": N, "dk": dk, "dv": dv, **r})
                print(f"sweep {B}x{N} dk{dk} {cfg}: fwd {r.get('fwd_ms', float('nan')):.3f} "
                      f"fwd+bwd {r.get('fwdbwd_ms', float('nan')):.3f} {r.get('error', '')}", flush=True)
            if best is None or total < best[0]:
                best = (total, cfg)
        triton_chunk._CFG.update({**base, **best[1]})
        print(f"sweep picked {best[1]}", flush=True)
    return rows


def _parse_args():
    """The command line (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="small shapes (CPU smoke test of the script)")
    p.add_argument("--sweep", action="store_true", help="sweep our launch configs first")
    p.add_argument("--no-main", action="store_true", help="skip the main table")
    p.add_argument("--sections", default="prefill,wide,decode",
                   help="comma list of prefill (dk == dv rows), wide (dk=256/dv=128 row), decode")
    p.add_argument("--out", default=str(ROOT / "bench/results/kernels-h200.json"))
    return p.parse_args()


def _shapes(tiny):
    """(H, D, shapes): heads, head dim and the (B, N, H, dk, dv) prefill shapes, about `tokens` tokens each."""
    H, D = (2, 16) if tiny else (32, 128)
    tokens = 256 if tiny else 65536
    Ns = (64, 128) if tiny else (2048, 8192, 32768, 131072)
    shapes = [(max(1, tokens // N), N, H, D, D) for N in Ns]
    shapes.append((max(1, tokens // Ns[1]), Ns[1], H, 2 * D, D))  # TNL layer 0: dk = 2 dv
    return H, D, shapes


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
              f"{row.get('fwdbwd_ms', float('nan')):.3f} ms {row.get('error', '')}", flush=True)
    if "fla" in outs:
        result["correctness"][key]["ours_vs_fla_full_o"] = rel_l2(outs["ours"], outs["fla"])
    del q, k, v, outs
    if DEV == "cuda":
        torch.cuda.empty_cache()


def main():
    args = _parse_args()
    torch.manual_seed(0)
    H, D, shapes = _shapes(args.tiny)
    anchors, anchor_errors = load_anchors()
    ceil = ceilings()
    print(f"device {torch.cuda.get_device_name() if DEV == 'cuda' else platform.processor()}; "
          f"copy {ceil['copy_TBps']:.2f} TB/s, bf16 matmul {ceil['matmul_TFps']:.1f} TF/s; "
          f"anchor import errors: {anchor_errors or 'none'}", flush=True)
    result = {"date": datetime.date.today().isoformat(), "device": torch.cuda.get_device_name() if DEV == "cuda"
              else "cpu", "torch": torch.__version__, "triton": __import__("triton").__version__,
              "ceilings": ceil, "anchor_errors": anchor_errors, "config": dict(triton_chunk._CFG),
              "rows": [], "decode": [], "correctness": {}}
    _record_anchor_versions(result)
    if args.sweep:
        result["sweep"] = sweep([shapes[1]], [shapes[-1]])
        result["config"] = dict(triton_chunk._CFG)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    sections = set(args.sections.split(","))
    if not args.no_main:
        for B, N, H_, dk, dv in shapes:
            if ("wide" if dk != dv else "prefill") not in sections:
                continue
            _bench_shape(result, B, N, H_, dk, dv, anchors)
            Path(args.out).write_text(json.dumps(result, indent=1))  # partial results survive a timeout
        if "decode" in sections:
            result["decode"] = decode_rows(anchors, H=H, D=D, batches=(1, 4) if args.tiny else (1, 4, 16, 64, 128, 256))
    derive(result)
    print(table(result))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps({"ceilings": ceil, "rows": [{k: r.get(k) for k in ("impl", "N", "dk", "fwd_ms", "fwdbwd_ms")}
                                                 for r in result["rows"]]}))


def derive(result):
    """Add Mtok/s, % of memory floor and ratios vs each anchor (same run) to every row."""
    bw = result["ceilings"]["copy_TBps"] * 1e12
    by_shape = {}
    for r in result["rows"]:
        by_shape.setdefault((r["B"], r["N"], r["dk"], r["dv"]), {})[r["impl"]] = r
    for r in result["rows"]:
        if "fwd_ms" not in r:
            continue
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


def table(result):
    lines = ["| impl | B | N | dk/dv | fwd ms | fwd+bwd ms | fwd Mtok/s | % fwd floor | % fwd+bwd floor | "
             "ours fwd speed-up | ours fwd+bwd speed-up |", "|" + "---|" * 11]
    ours = {(r["B"], r["N"], r["dk"]): r for r in result["rows"] if r["impl"] == "ours"}
    for r in result["rows"]:
        o = ours.get((r["B"], r["N"], r["dk"]), {})

        def f(x, fmt="{:.3f}"):
            return fmt.format(x) if isinstance(x, (int, float)) else "—"
        su = "" if r["impl"] == "ours" else f(o.get(f"fwd_speedup_vs_{r['impl']}"), "{:.2f}×")
        sub = "" if r["impl"] == "ours" else f(o.get(f"fwdbwd_speedup_vs_{r['impl']}"), "{:.2f}×")
        lines.append(f"| {r['impl']} | {r['B']} | {r['N']} | {r['dk']}/{r['dv']} | {f(r.get('fwd_ms'))} | "
                     f"{f(r.get('fwdbwd_ms'))} | {f(r.get('fwd_Mtok_s'), '{:.1f}')} | "
                     f"{f(r.get('fwd_pct_floor'), '{:.0f}%')} | {f(r.get('fwdbwd_pct_floor'), '{:.0f}%')} | "
                     f"{su} | {sub} |")
    if result.get("decode"):
        lines += ["", "| decode impl | B | µs/step | state GB/s | mode |", "|---|---|---|---|---|"]
        for r in result["decode"]:
            lines.append(f"| {r['impl']} | {r['B']} | {r.get('us', float('nan')):.1f} | "
                         f"{r.get('state_GBps', float('nan')):.0f} | {r.get('mode', r.get('error', ''))} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
