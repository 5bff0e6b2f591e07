"""The batch sampler's cost per decode step: the fused Triton op against its PyTorch twin, per launch setting.

    python bench/sampler.py --out bench/results/sampler-h200.json   # H200, about a minute

Rows: plan (greedy; chat's top-k 40 = a 64-token head; top-k 256 = a 256-token head; all with chat's repetition
penalty), batch, impl ("torch" = `reference.sample_rows_ref`; "triton" at each SORT_WIDTH x NUM_WARPS), the
microseconds of one CUDA-graph replay of the op (graphs, as in the engine's captured step), and whether its ids
equal the twin's on the same inputs. Vocabulary 64,000 (the released models'), bf16 logits.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import functools
import json
import sys
from pathlib import Path

import torch

from tnllm.engine.graphs import capture_cuda_graph
from tnllm.kernels import reference, triton_sample
from tnllm.kernels.reference import SlotTables, mix32

ROOT = Path(__file__).resolve().parents[1]
V = 64000
PLANS = {"greedy": (False, 0), "top-k 40": (True, 64), "top-k 256": (True, 256)}  # name: (draw, head)


def tables_for(batch: int, top_k: int) -> SlotTables:
    """Chat-like settings for slots 1..batch: temperature 0.7, top-p 1, penalty 1.1 over 64 seen ids."""
    S = batch + 1
    seen = torch.zeros(S, V, dtype=torch.bool, device="cuda")
    seen[:, torch.randint(0, V, (64,))] = True
    full = lambda value, dtype=torch.float32: torch.full((S,), value, dtype=dtype, device="cuda")  # noqa: E731
    return SlotTables(full(0.7), full(top_k, torch.long), full(1.0), full(1.1),
                      torch.arange(S, device="cuda") * 7919, full(0, torch.long), full(0, torch.long), seen,
                      mix32(torch.arange(V, device="cuda")))


def replay_us(fn, n: int = 200) -> float:
    replay, _ = capture_cuda_graph(fn, warmup=2)
    for _ in range(10):
        replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(n):
        replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / n * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--widths", default="256,512,1024")
    parser.add_argument("--warps", default="4,8", help="0: the launcher's own choice")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "sampler-h200.json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/sampler.py needs a CUDA device")
    result = {"bench": "sampler", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "device": torch.cuda.get_device_name(), "torch": torch.__version__, "vocab": V,
              "command": "python " + " ".join(sys.argv), "rows": []}
    for batch in map(int, args.batches.split(",")):
        logits = (torch.randn(batch, V, device="cuda") * 4).to(torch.bfloat16)
        slots = torch.arange(1, batch + 1, device="cuda")
        for plan, (draw, head) in PLANS.items():
            tables = tables_for(batch, max(head, 1))
            kwargs = dict(penalty=True, draw=draw, head=head)
            want = reference.sample_rows_ref(logits, slots, copy.deepcopy(tables), **kwargs)
            variants = [("torch", None, None)] + [("triton", int(w), int(n)) for w in args.widths.split(",")
                                                  for n in args.warps.split(",")]
            for impl, width, warps in variants:
                op = reference.sample_rows_ref if impl == "torch" else triton_sample.sample_rows_triton
                if impl == "triton":
                    triton_sample.SORT_WIDTH, triton_sample.NUM_WARPS = width, warps or None
                got = op(logits, slots, copy.deepcopy(tables), **kwargs)  # from the same tables as `want`
                timed = copy.deepcopy(tables)  # replays advance drawn counts and penalty sets
                row = {"plan": plan, "batch": batch, "impl": impl, "sort_width": width, "num_warps": warps,
                       "us": replay_us(functools.partial(op, logits, slots, timed, **kwargs)),
                       "equal_to_torch": bool(torch.equal(got, want))}
                result["rows"].append(row)
                print(json.dumps(row), flush=True)
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
