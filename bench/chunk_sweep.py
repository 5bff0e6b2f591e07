"""What holds the Lightning Attention forward back at each length: launch settings, segment count and occupancy.

    python bench/chunk_sweep.py --out bench/results/chunk-sweep-h200.json     # H200, about 5 minutes
    python bench/chunk_sweep.py --shipped-only --out new.json                 # the shipped setting only: a minute
    TRITON_INTERPRET=1 python bench/chunk_sweep.py --tiny --out /tmp/cs.json  # CPU smoke test of this script

For each prefill shape of bench/kernels.py (bf16, H = 32, B·N = 65,536 tokens, N = 2k..128k; and the dk = 256 /
dv = 128 row at 8k) it times our forward (`lightning_attn_triton`, triton do_bench, L2 flushed) under every
launch setting of NARROW (chunk kernel tiles: BT, BV, warps, stages) or, for the wide row, WIDE (BV_WIDE, WARPS_WIDE and
STAGES_WIDE) and every segment-length setting (`SEG_PROGRAMS_PER_SM`: chunk-kernel programs per SM the segment
length aims for when a sequence is cut; MIN_SEG_CHUNKS 4 or 16), with fla's `chunk_simple_gla` on the same inputs as the
anchor. Each row: fwd_ms, the segment pre-pass alone (`_seg_state_kernel` + `_seg_scan_kernel`, 0 when the plan
does not segment) as prepass_ms, segments per sequence, chunk-kernel programs, % of the forward's memory floor
(q, k, v read and o written once, at the copy bandwidth of the same run), ratio to fla. The best setting per
shape is timed again with its backward (fwd+bwd); err_vs_shipped is each row's largest output difference from the
shipped setting's, relative to the largest output. --variants times the kernel's code variants (VARIANTS) instead of
the tiles and segment rules. Rows are written to --out as they come, so a timeout loses
nothing. `triton_chunk._CFG` is restored afterwards; the run never edits it.
"""

from __future__ import annotations

import os
import sys

if "--tiny" in sys.argv:  # before Triton is imported: the interpreter is chosen when kernels are defined
    os.environ.setdefault("TRITON_INTERPRET", "1")

import argparse  # noqa: E402
import datetime  # noqa: E402
import importlib.util  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from tnllm.kernels import triton_chunk  # noqa: E402
from tnllm.kernels.triton_chunk import _Plan, lightning_attn_triton  # noqa: E402


def _kernel_bench():
    """bench/kernels.py's helpers (timing, ceilings, anchors): a script beside this one, loaded under its own
    name, since `kernels` names the package."""
    spec = importlib.util.spec_from_file_location("bench_kernels", Path(__file__).with_name("kernels.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_KB = _kernel_bench()
DEV, alibi_rates, bench, ceilings, load_anchors, time_impl = (
    _KB.DEV, _KB.alibi_rates, _KB.bench, _KB.ceilings, _KB.load_anchors, _KB.time_impl)

# chunk kernel tiles (narrow: dk <= 128) and the wide row's; the first of each is the shipped setting
NARROW = [dict(BT=64, BV=128, WARPS=8, STAGES=3), dict(BT=64, BV=64, WARPS=4, STAGES=1),
          dict(BT=64, BV=64, WARPS=4, STAGES=2), dict(BT=64, BV=128, WARPS=8, STAGES=2),
          dict(BT=64, BV=64, WARPS=8, STAGES=1), dict(BT=32, BV=64, WARPS=4, STAGES=1)]
WIDE = [dict(BV_WIDE=64, WARPS_WIDE=8, STAGES_WIDE=2), dict(BV_WIDE=64, WARPS_WIDE=8, STAGES_WIDE=1),
        dict(BV_WIDE=128, WARPS_WIDE=8, STAGES_WIDE=1), dict(BV_WIDE=64, WARPS_WIDE=4, STAGES_WIDE=2)]
PROGRAMS = [dict(SEG_PROGRAMS_PER_SM=p, MIN_SEG_CHUNKS=m) for p in (2, 1, 4) for m in (16, 4)]
# --variants: the chunk kernel's code variant (triton_chunk._CFG's STATE_T: its state held transposed) and the segment
# pre-pass's state tile BS, the first the shipped setting
VARIANTS = [dict(STATE_T=True, BS=128), dict(STATE_T=False), dict(BS=64), dict(STATE_T=False, BS=64)]
VARIANTS_WIDE = [dict(STATE_T_WIDE=False), dict(STATE_T_WIDE=True)]


def shapes(tiny: bool) -> list[tuple[int, int, int, int, int]]:
    """(B, N, H, dk, dv): bench/kernels.py's prefill shapes."""
    if tiny:
        return [(4, 64, 2, 16, 16), (1, 256, 2, 16, 16), (2, 128, 2, 32, 16)]
    return [(32, 2048, 32, 128, 128), (8, 8192, 32, 128, 128), (2, 32768, 32, 128, 128), (1, 131072, 32, 128, 128),
            (8, 8192, 32, 256, 128)]


def current_plan(q, v) -> tuple[_Plan, dict]:
    """The current setting's plan for these inputs, and its facts: segments per sequence, chunk-kernel programs,
    segment length."""
    B, T, H, D = q.shape
    plan = _Plan(B, T, H, D, v.shape[-1], q.device, None, None)
    slices = -(-v.shape[-1] // plan.BV_of(D, v.shape[-1]))
    return plan, {"segments": plan.NS, "programs": plan.n_seg * H * slices, "segment_len": plan.L}


def prepass_ms(plan: _Plan, k, v, ld) -> float:
    """The plan's segment pre-pass alone (0 when it does not segment)."""
    return bench(lambda: plan.seg_states(k, v, ld, None, reverse=False))[0] if plan.segmented else 0.0


def sweep_shape(shape, tiles, programs, anchors, copy_tbps: float, result: dict) -> None:
    """Every (tile, segment target) on one shape, then the best again with its backward; rows into `result`."""
    B, N, H, dk, dv = shape
    gen = torch.Generator(device=DEV).manual_seed(N)
    q, k = (torch.randn(B, N, H, dk, device=DEV, dtype=torch.bfloat16, generator=gen) for _ in range(2))
    v = torch.randn(B, N, H, dv, device=DEV, dtype=torch.bfloat16, generator=gen)
    rate = alibi_rates(H)
    ld = (-rate).float().contiguous()
    floor_ms = (B * N * H * (2 * dk + 2 * dv) * 2) / (copy_tbps * 1e9) if DEV == "cuda" else float("nan")
    base = {"B": B, "N": N, "H": H, "dk": dk, "dv": dv, "floor_ms": floor_ms}
    fla = anchors.get("fla")
    fla_ms = bench(lambda: fla(q, k, v, g_gamma=-rate, scale=1.0)[0])[0] if fla else None
    shipped, rows = dict(triton_chunk._CFG), []
    o_shipped = lightning_attn_triton(q, k, v, -rate)[0].float()
    for tile, prog in itertools.product(tiles, programs):
        triton_chunk._CFG.update({**shipped, **tile, **prog})
        plan, facts = current_plan(q, v)
        row = dict(base, cfg={**tile, **prog}, **facts, fla_fwd_ms=fla_ms)
        try:
            o = lightning_attn_triton(q, k, v, -rate)[0].float()
            row["err_vs_shipped"] = ((o - o_shipped).abs().max() / o_shipped.abs().max()).item()
            row["fwd_ms"] = bench(lambda: lightning_attn_triton(q, k, v, -rate)[0])[0]
            row["prepass_ms"] = prepass_ms(plan, k, v, ld)
            row["pct_floor"] = 100 * floor_ms / row["fwd_ms"]
            row["vs_fla"] = fla_ms / row["fwd_ms"] if fla_ms else None
        except Exception as exc:  # noqa: BLE001 (a tile that needs more shared memory than a block has)
            row["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
        triton_chunk._CFG.update(shipped)
        rows.append(row)
        result["rows"].append(row)
        print(f"{B}x{N} dk{dk} {row['cfg']}: seg {row['segments']} progs {row['programs']} "
              f"fwd {row.get('fwd_ms', float('nan')):.3f} pre {row.get('prepass_ms', float('nan')):.3f} "
              f"fla {fla_ms} {row.get('error', '')}", flush=True)
    ok = [r for r in rows if "fwd_ms" in r]
    if not ok:
        return
    best = min(ok, key=lambda r: r["fwd_ms"])
    triton_chunk._CFG.update({**shipped, **best["cfg"]})
    try:
        timed = time_impl(lambda x, y, z: lightning_attn_triton(x, y, z, -rate)[0], (q, k, v), True)
    finally:
        triton_chunk._CFG.update(shipped)
    first = next((r for r in ok if r["cfg"] == {**tiles[0], **programs[0]}), {})
    result["best"].append(dict(base, cfg=best["cfg"], fwd_ms=timed["fwd_ms"], fwdbwd_ms=timed["fwdbwd_ms"],
                               segments=best["segments"], shipped_fwd_ms=first.get("fwd_ms"), fla_fwd_ms=fla_ms))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--tiny", action="store_true", help="CPU interpreter, small shapes, two settings")
    p.add_argument("--shipped-only", action="store_true",
                   help="time the shipped setting alone (forward, then with its backward)")
    p.add_argument("--variants", action="store_true",
                   help="the chunk kernel's code variants (VARIANTS) at the shipped segment rule, not the tile sweep")
    p.add_argument("--budget-s", type=float, default=420.0, help="no new shape starts after this")
    args = p.parse_args()
    start = time.perf_counter()
    anchors, errors = load_anchors()
    result = {"bench": "chunk_sweep", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
        timespec="seconds"), "device": torch.cuda.get_device_name() if DEV == "cuda" else "cpu",
        "torch": torch.__version__, "command": "python bench/chunk_sweep.py " + " ".join(sys.argv[1:]),
        "anchor_errors": errors, "shipped": dict(triton_chunk._CFG), "ceilings": ceilings(), "rows": [], "best": []}
    # each list starts with what ships, the row to beat
    for first in (NARROW[0], WIDE[0], PROGRAMS[0], VARIANTS[0], VARIANTS_WIDE[0]):
        if any(triton_chunk._CFG[k] != v for k, v in first.items()):
            raise SystemExit(f"{first} is not the shipped setting {triton_chunk._CFG}: update the lists")
    keep = 1 if args.shipped_only else 2 if args.tiny else None
    narrow, wide, programs = NARROW[:keep], WIDE[:keep], PROGRAMS[:keep]
    if args.variants:
        narrow, wide, programs = VARIANTS[:keep], VARIANTS_WIDE[:keep], PROGRAMS[:1]
    for shape in shapes(args.tiny):
        if time.perf_counter() - start > args.budget_s:
            result.setdefault("skipped", []).append(list(shape))
            continue
        tiles = narrow if shape[3] <= 128 else wide
        sweep_shape(shape, tiles, programs, anchors, result["ceilings"]["copy_TBps"], result)
        result["total_s"] = time.perf_counter() - start
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
