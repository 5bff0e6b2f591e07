"""Sweep of the decode step kernel's launch tiles (kernels/triton_step.py: BV, num_warps) on the GPU.

    python bench/step_tiles.py --out bench/results/step-tiles-h200.json        # H200: about a minute
    TRITON_INTERPRET=1 python bench/step_tiles.py --tiny --out /tmp/tiles.json  # CPU, Triton interpreter, seconds

For the head layouts of --presets (tnl-1b: 16 heads, tnl-7b: 32 heads; D = E = 128) and B rows in --batches, the
step as the engine runs it: bf16 q, k, v as strided views of one q|k|v|u output, fp32 states in a slot pool
(rows 1..B), silu applied inside. One CUDA graph runs the step on L pools in turn (L = the preset's layers, at
least enough pools that the states outgrow the L2 cache, as between two decode steps that stream the weights);
us = median replay time / L. Rows: preset, batch, bv, warps, us, state_tb_s (state bytes read + written per
second), and `default` for the tile `_tile` picks. The JSON is rewritten after every (preset, batch).
"""

from __future__ import annotations

import os
import sys

if "--tiny" in sys.argv:  # before Triton is imported: its interpreter is chosen when kernels are defined
    os.environ.setdefault("TRITON_INTERPRET", "1")

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from quant_gpu import time_us  # noqa: E402

from tnllm import TNLConfig  # noqa: E402
from tnllm.kernels import triton_step  # noqa: E402

L2_BYTES = 60 * 2**20  # more than the H200's L2 (50 MiB): the pools of one replay never fit in it


def step_calls(H: int, D: int, B: int, layers: int, device: torch.device) -> tuple[list, int]:
    """(one step call per pool, state bytes one call reads + writes); on the CPU one pool per layer."""
    state_bytes = B * H * D * D * 4
    pools = max(layers, -(-L2_BYTES // state_bytes)) if device.type == "cuda" else layers
    generator = torch.Generator(device=device).manual_seed(0)
    qkvu = torch.randn(B, 4 * H * D, device=device, generator=generator).to(torch.bfloat16)
    q, k, v = (t.view(B, H, D) for t in qkvu.chunk(4, dim=-1)[:3])  # strided views, as the model passes them
    log_decay = -torch.rand(H, device=device, generator=generator)
    slots = torch.arange(1, B + 1, device=device)
    calls = []
    for _ in range(pools):
        pool = torch.zeros(B + 1, H, D, D, device=device)  # [S, H, D, E]: slot 0 is the engine's sink
        calls.append(lambda pool=pool: triton_step.lightning_attn_step_triton(q, k, v, log_decay, pool, slots,
                                                                              act="silu"))
    return calls, 2 * state_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="tnl-1b,tnl-7b")
    parser.add_argument("--batches", default="1,2,4,8,16,32")
    parser.add_argument("--bv", default="16,32,64,128")
    parser.add_argument("--warps", default="1,2,4,8")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run: one small shape, one tile")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    device = torch.device("cpu" if args.tiny else "cuda")
    if args.tiny:
        args.presets, args.batches, args.bv, args.warps, args.reps = "tiny", "2", "16", "4", 1
    result = {"bench": "step-tiles", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (interpreter)",
              "torch": torch.__version__, "command": "python " + " ".join(sys.argv), "rows": []}
    for preset in args.presets.split(","):
        config = TNLConfig.from_name(preset)
        H, D = config.n_heads, config.head_dim
        for B in (int(b) for b in args.batches.split(",")):
            calls, nbytes = step_calls(H, D, B, config.n_layers, device)
            triton_step.TILE = None
            default = triton_step._tile(B * H, D, D, device)
            for bv in (int(x) for x in args.bv.split(",")):
                for warps in (int(x) for x in args.warps.split(",")):
                    triton_step.TILE = (bv, warps)
                    us = time_us(calls, device, args.reps, graph=device.type == "cuda")
                    result["rows"].append({"preset": preset, "heads": H, "head_dim": D, "batch": B, "bv": bv,
                                           "warps": warps, "us": us, "state_tb_s": nbytes / us / 1e6,
                                           "default": (bv, warps) == tuple(default)})
            triton_step.TILE = None
            best = min((r for r in result["rows"] if r["preset"] == preset and r["batch"] == B), key=lambda r: r["us"])
            print(f"{preset} B={B}: best bv={best['bv']} warps={best['warps']} {best['us']:.2f} us "
                  f"({best['state_tb_s']:.2f} TB/s)", flush=True)
            args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
