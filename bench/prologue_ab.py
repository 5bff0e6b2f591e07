"""Decode products fused with the op before them (`kernels.prologue_linear`) against the ops composed, per product.

    python bench/prologue_ab.py --out bench/results/prologue-ab-h200.json          # H200: about 3 minutes
    TRITON_INTERPRET=1 python bench/prologue_ab.py --tiny --out /tmp/ab.json       # CPU, Triton interpreter

For each product of a decode layer of --presets, with the op the model puts before it (q|k|v|u after the add+norm,
out_proj after the gated norm, l1|l2 after the add+norm, l3 after the GLU product, the lm_head after the final
add+norm), at each M in --rows and for int8 and bf16 weights, µs per call of:
* composed: the op's own kernel (`kernels.add_srmsnorm`, `gated_srmsnorm`, `glu_mul`), then the product
  (`kernels.int8_linear` for int8 weights; `F.linear`, cuBLAS, for bf16): what decode runs unfused;
* product: the product alone (what fusing could reach at best);
* fused: `kernels.prologue_linear` with the launcher's tile; bf16 weights also every tile of `float_tiles`, int8
  weights at one row every tile of `int8_tiles` ("fused_best": the fastest of them, with its `Config`; "tiles":
  every tile's µs).
--products limits the run to some of them (e.g. out_proj,l3 --rows 1 --weights bf16: the float one-row tiles).
Timing: quant_gpu.time_us, a CUDA graph of one call per weight copy (copies >= --rotate-mib, so L2 never holds
the weight), median of --reps replays. `rel_l2`: fused against composed. Rows are saved after every product.
"""

from __future__ import annotations

import os
import sys

if "--tiny" in sys.argv:  # before anything imports Triton: its interpreter is chosen when kernels are defined
    os.environ.setdefault("TRITON_INTERPRET", "1")

import argparse  # noqa: E402
import datetime  # noqa: E402
import functools  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
from quant_gpu import time_us  # noqa: E402

from tnllm import TNLConfig, kernels  # noqa: E402
from tnllm.kernels import triton_int8 as ti  # noqa: E402
from tnllm.quant.int8 import quantize_weight  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def products(preset: str) -> dict[str, tuple[int, int, str]]:
    """Name -> (in, out, prologue) of the decode products of `preset` (tiny: small odd sizes)."""
    c = TNLConfig.from_name(preset)
    return {"qkvu_proj": (c.dim, 4 * c.hidden_dim, "add_norm"), "out_proj": (c.hidden_dim, c.dim, "gated_norm"),
            "l1|l2": (c.dim, 2 * c.glu_dim, "add_norm"), "l3": (c.glu_dim, c.dim, "mul"),
            "lm_head": (c.dim, c.vocab_size, "add_norm")}


def float_tiles(tiny: bool) -> list[ti.Config]:
    """Tiles tried for bf16 weights with a prologue: split-K "dot" tiles sized for 2-byte weights, and the one-row
    gemv kinds (what the one-row `FLOAT_CONFIGS` rows take; at 16 rows they run their [16, BN, BK] form)."""
    if tiny:
        return [ti.Config(16, 16, 16, SPLIT_K=2, num_stages=1), ti.Config(1, 16, 32, num_stages=1, kind="gemv_once")]
    out = [ti.Config(16, bn, bk, SPLIT_K=split, num_warps=4, num_stages=3)
           for bn in (32, 64, 128) for bk in (128, 256) for split in (1, 2, 4, 8) if bn > 32 or split > 1]
    # not "gemv_once" on [64, 256] tiles: triton 3.6's LLVM aborts the process compiling it with the gated norm
    return out + [ti.Config(1, bn, bk, num_warps=w, num_stages=1, kind=kind)
                  for kind in ("gemv", "gemv_once") for w in (4, 8)
                  for bn, bk in ((8, 512), (8, 1024), (16, 512)) + (((64, 256),) if kind == "gemv" else ())]


def int8_tiles(tiny: bool) -> list[ti.Config]:
    """Tiles tried for int8 weights with a prologue at one row: the one-row gemv kinds, the weight read as bytes
    (converted with the magic-number trick) or as int32 words."""
    if tiny:
        return [ti.Config(1, 16, 32, num_stages=1, kind=kind, magic=True) for kind in ("gemv_once", "gemv_word")]
    return [ti.Config(1, bn, bk, num_warps=w, num_stages=1, kind=kind, magic=True)
            for kind in ("gemv_once", "gemv_word") for w in (4, 8)
            for bn, bk in ((8, 1024), (16, 512), (32, 256), (64, 256), (64, 512))]


def inputs(prologue: str, m: int, k: int, device, gen) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x, other, op_input) as the model hands them: the gate u a strided quarter of a q|k|v|u output, the GLU's
    halves strided views of one l1|l2 output (op_input: that output, what `glu_mul` takes; else x)."""
    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=torch.bfloat16)

    if prologue == "gated_norm":
        x = randn(m, k)
        return x, randn(m, 4 * k)[:, 3 * k:], x
    if prologue == "mul":
        y12 = randn(m, 2 * k)  # [m, 2k]
        return y12[:, :k], y12[:, k:], y12
    x = randn(m, k)
    return x, randn(m, k), x


def composed(prologue, x, other, op_input, weight, scales):
    """The op's own kernel, then the product."""
    if prologue == "add_norm":
        h = kernels.add_srmsnorm(x, other)[1]
    elif prologue == "gated_norm":
        h = kernels.gated_srmsnorm(x, other)
    else:
        h = kernels.glu_mul(op_input)
    return product(h, weight, scales)


def product(h, weight, scales):
    return F.linear(h, weight) if scales is None else kernels.int8_linear(h, weight, scales)


def weights(n_in: int, n_out: int, kind: str, copies: int, device) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    out = []
    for _ in range(copies):
        w = torch.randn(n_out, n_in, device=device, dtype=torch.bfloat16) / n_in**0.5
        out.append((w, None) if kind == "bf16" else quantize_weight(w, torch.bfloat16))
    return out


def bench_product(args, preset, name, n_in, n_out, prologue, kind, m, device) -> dict:
    gen = torch.Generator().manual_seed(m)
    copies = max(2, min(16, math.ceil(args.rotate_mib * 2**20 / (n_in * n_out * (2 if kind == "bf16" else 1)))))
    ws = weights(n_in, n_out, kind, copies, device)
    x, other, op_input = inputs(prologue, m, n_in, device, gen)
    h = x.contiguous()  # the product's input alone
    graph = device.type == "cuda"

    def timed(fn):
        return time_us([functools.partial(fn, w, s) for w, s in ws], device, args.reps, graph)

    def fused(w, s, config=None):
        return ti._linear(x, w, s, None, prologue=prologue, other=other, config=config)

    def result(out):
        return out[1] if prologue == "add_norm" else out

    ref = composed(prologue, x, other, op_input, *ws[0]).float()
    got = result(fused(*ws[0])).float()
    row = {"preset": preset, "product": name, "in": n_in, "out": n_out, "prologue": prologue, "weights": kind,
           "M": m, "copies": copies, "rel_l2": ((got - ref).norm() / ref.norm()).item(),
           "composed_us": timed(lambda w, s: composed(prologue, x, other, op_input, w, s)),
           "product_us": timed(lambda w, s: product(h, w, s)),
           "fused_us": timed(fused)}
    tiles = float_tiles(args.tiny) if kind == "bf16" else int8_tiles(args.tiny) if m == 1 else []
    if tiles:
        tried = []
        for cfg in tiles:
            try:
                tried.append((timed(functools.partial(fused, config=cfg)), cfg))
            except Exception as exc:  # noqa: BLE001 (a tile that does not fit is skipped)
                row.setdefault("tile_errors", []).append(f"{ti.config_src(cfg)}: {type(exc).__name__}")
        if tried:
            us, cfg = min(tried, key=lambda t: t[0])
            row.update(fused_best_us=us, fused_best_config=ti.config_src(cfg),
                       tiles={ti.config_src(cfg): us for us, cfg in tried})
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "prologue-ab-h200.json")
    parser.add_argument("--tiny", action="store_true", help="CPU, Triton interpreter, the tiny preset")
    parser.add_argument("--presets", default="tnl-7b,tnl-1b")
    parser.add_argument("--products", default=None, help="comma-separated names of `products` (default: all)")
    parser.add_argument("--rows", default="1,16")
    parser.add_argument("--weights", default="int8,bf16")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--rotate-mib", type=float, default=256.0)
    parser.add_argument("--budget-s", type=float, default=200.0)
    args = parser.parse_args()
    if args.tiny:
        args.presets, args.reps, args.rotate_mib = "tiny", 1, 0.0
        if args.rows == parser.get_default("rows"):
            args.rows = "1,3"
    device = torch.device("cpu" if args.tiny else "cuda")
    data = {"bench": "prologue_ab", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (interpreter)",
            "torch": torch.__version__, "triton": triton.__version__, "command": "python " + " ".join(sys.argv),
            "rows": [], "notes": []}
    start = time.perf_counter()

    def save():
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(data, indent=1) + "\n")

    runs = itertools.product(((preset, name, *sizes) for preset in args.presets.split(",")
                              for name, sizes in products(preset).items()
                              if args.products is None or name in args.products.split(",")),
                             args.weights.split(","), (int(r) for r in args.rows.split(",")))
    with kernels.use_impl("triton"), torch.inference_mode():
        for (preset, name, n_in, n_out, prologue), kind, m in runs:
            if time.perf_counter() - start > args.budget_s:
                data["notes"].append(f"budget spent before {preset} {name} {kind} M={m}")
                continue
            try:
                row = bench_product(args, preset, name, n_in, n_out, prologue, kind, m, device)
            except Exception as exc:  # noqa: BLE001 (one product's failure must not lose the rest)
                data["notes"].append(f"{preset} {name} {kind} M={m}: {type(exc).__name__}: {exc}"[:400])
                continue
            data["rows"].append(row)
            print(" ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()
                           if k not in ("in", "out", "copies", "tiles")), flush=True)
            save()
    save()

if __name__ == "__main__":
    main()
