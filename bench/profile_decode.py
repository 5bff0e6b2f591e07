"""Where one captured decode step spends its time (docs/engine.md#where-a-decode-steps-time-goes).

    python bench/profile_decode.py --device cuda --out bench/results   # H200, about a minute per preset
    python bench/profile_decode.py --quant int8 --presets tnl-7b --out /tmp  # the int8 step (writes profile-int8-...)

Per preset (random bf16 weights, quantised in place by --quant; batch 1 and --batch):
* step_ms: one replay of the engine's captured decode step (embedding -> layers -> head -> sampler), every row
  sampling with chat's default settings (the sampling plan chat's replies get);
* kernels: every kernel of that replay from the profiler (name, calls per step, GPU us per step), so the
  difference between step_ms and the kernels' sum is the time the GPU sits between kernels;
* linears_only_ms: every Linear of the step (same shapes and weights: bf16, or int8 under --quant) captured back
  to back with nothing else: what the matrix products alone cost, the most any fusion of the rest can recover;
* hbm_floor_ms: the bytes a step reads (`weight_bytes(per_step=True)`) / device-to-device copy bandwidth measured in
  the same run.

Writes OUT/profile-h200.json (under --quant: OUT/profile-QUANT-h200.json) after every preset.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import functools
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

from tnllm import quant
from tnllm.engine import Engine, EngineConfig
from tnllm.engine.graphs import capture_cuda_graph
from tnllm.model import random_model
from tnllm.sampling import SamplingParams
from tnllm.webui.validation import CHAT_DEFAULTS

from engine_gpu import copy_bandwidth, weight_bytes

ROOT = Path(__file__).resolve().parents[1]


def replay_ms(replay, n: int = 50) -> float:
    """Mean ms of `replay` over n calls, after a warm-up (synchronised around the timer)."""
    for _ in range(5):
        replay()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(n):
        replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / n * 1e3


def kernel_table(replay, steps: int = 20) -> list[dict]:
    """Kernels of `steps` replays under the profiler: per name, calls and GPU microseconds per step."""
    from torch.profiler import ProfilerActivity, profile

    replay()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            replay()
        torch.cuda.synchronize()
    totals: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0])
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            entry = totals[event.name[:120]]
            entry[0] += 1
            entry[1] += event.device_time
    rows = [{"kernel": name, "calls_per_step": calls / steps, "us_per_step": us / steps}
            for name, (calls, us) in totals.items()]
    return sorted(rows, key=lambda r: -r["us_per_step"])


def linears_only(model, batch: int):
    """(replay, n_linears) of a graph running every Linear of one decode step on a [batch, 1, d] input."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear) or hasattr(m, "TAKES_PROLOGUE")]
    inputs = [torch.randn(batch, 1, m.in_features, device="cuda", dtype=torch.bfloat16) for m in linears]

    def run():
        out = None
        for m, x in zip(linears, inputs):
            out = m(x)
        return out

    replay, _ = capture_cuda_graph(run, warmup=2)
    return replay, len(linears)


def profile_preset(preset: str, batch: int, bandwidth: float, method: str = "none") -> dict:
    model = random_model(preset, device="cuda", dtype=torch.bfloat16)
    if method != "none":
        quant.quantize(model, method)
        torch.cuda.empty_cache()
    engine = Engine(model, None, EngineConfig(max_sessions=max(batch, 1), threaded=False))
    result = {"preset": preset, "quant": method, "hbm_floor_ms": weight_bytes(model, per_step=True) / bandwidth * 1e3,
              "batches": []}
    params = SamplingParams(**{**CHAT_DEFAULTS, "seed": 0})
    for slot in range(1, engine.pool.size + 1):
        engine.sampler.configure(slot, params, seed=slot, prompt_ids=[])
    for b in sorted({1, batch}):
        slots = list(range(1, b + 1))
        step = functools.partial(engine.scheduler.decoder.step, slots, engine.sampler.plan(slots))
        row = {"batch": b, "step_ms": replay_ms(step), "kernels": kernel_table(step)}
        row["kernels_sum_us"] = sum(k["us_per_step"] for k in row["kernels"])
        row["kernels_per_step"] = sum(k["calls_per_step"] for k in row["kernels"])
        replay, n = linears_only(model, b)
        row["linears_only_ms"] = replay_ms(replay)
        row["linears_per_step"] = n
        result["batches"].append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "kernels"}), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default="tnl-7b,tnl-1b")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--quant", default="none", choices=("none", "int8"), help="weights quantised in place")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    bandwidth = copy_bandwidth(torch.device("cuda"), 4.0)
    data = {"bench": "profile", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "command": "python " + " ".join(sys.argv), "copy_bandwidth_gb_s": bandwidth / 1e9, "presets": []}
    path = args.out / ("profile-h200.json" if args.quant == "none" else f"profile-{args.quant}-h200.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    for preset in args.presets.split(","):
        data["presets"].append(profile_preset(preset, args.batch, bandwidth, args.quant))
        path.write_text(json.dumps(data, indent=2) + "\n")
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
