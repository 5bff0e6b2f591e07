"""Linear-layer timings behind `quant.choose_method("auto")`: float vs int8 weight-only vs bnb LLM.int8 and NF4.

    python bench/quant_cpu.py                 # CPU: 2048->2048 and 2048->5632, batch 1/16, fp32/bf16
    python bench/quant_cpu.py --device cuda   # the same on a GPU (fp16/bf16)
    python bench/quant_cpu.py --model assets/tnl   # whole-model decode ms/token per method (batch 1)

Prints a table (median ms per forward, rel-L2 error of the output vs float) and one JSON line; --out also writes
it (with the command, date and versions) to a file.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import statistics
import sys
from pathlib import Path

import torch
from torch import nn

from tnllm import quant
from tnllm.bench import timed
from tnllm.quant import bnb
from tnllm.quant.int8 import Int8Linear

SHAPES = ((2048, 2048), (2048, 5632))  # (in, out): TNL-1B out_proj and l1/l2
BATCHES = (1, 16)


def time_ms(fn, x: torch.Tensor, reps: int) -> tuple[float, float]:
    """(median, min) time of fn(x) in ms after 3 warm-up calls, each call timed by `tnllm.bench.timed`.

    The min is reported too because shared 2-core VMs lose whole scheduler slices (+4-8 ms)."""
    for _ in range(3):
        fn(x)
    times = [timed(lambda: fn(x), x.device)[1] * 1e3 for _ in range(reps)]
    return statistics.median(times), min(times)


def layers(n_in: int, n_out: int, device: str, dtype: torch.dtype, threshold: float) -> dict[str, nn.Module]:
    """The same random Linear as float, int8 weight-only and (if importable) bnb Linear8bitLt and 4-bit NF4
    Linear4bit (not a method of `quant`: timed to decide whether one would pay)."""
    ref = nn.Linear(n_in, n_out, bias=False).to(device=device, dtype=dtype)
    out = {"float": ref, "int8": Int8Linear.from_float(ref)}
    if bnb.available():
        out["bnb_int8"] = bnb.linear_from_float(ref, device, threshold=threshold)
        out["bnb_nf4"] = bnb.nf4_linear_from_float(ref, device)
    return out


@torch.inference_mode()
def run(device: str, dtypes: list[torch.dtype], reps: int, threshold: float) -> list[dict]:
    rows = []
    for dtype in dtypes:
        for n_in, n_out in SHAPES:
            mods = layers(n_in, n_out, device, dtype, threshold)
            for batch in BATCHES:
                x = torch.randn(batch, n_in, device=device, dtype=dtype)
                ref = mods["float"](x).double()
                for method, mod in mods.items():
                    err = ((mod(x).double() - ref).norm() / ref.norm()).item()
                    med, best = time_ms(mod, x, reps)
                    rows.append(dict(device=device, dtype=str(dtype).removeprefix("torch."), shape=f"{n_in}x{n_out}",
                                     batch=batch, method=method, ms=round(med, 4), min_ms=round(best, 4),
                                     rel_err=round(err, 5)))
    return rows


@torch.inference_mode()
def run_model(path: str, device: str, reps: int, context: int = 256) -> list[dict]:
    """Batch-1 recurrent decode ms/token of a whole model loaded with each 8-bit method."""
    rows = []
    for method in ("none", "int8", "bnb_int8"):
        if method == "bnb_int8" and not bnb.available():
            continue
        model = quant.load_quantized(path, method=method, device=device)
        model.pack_weights()  # as the engine does: the layout chat decodes with
        state = model.allocate_state(1)
        model(torch.randint(3, model.config.vocab_size, (1, context), device=device), state, logits_to_keep=1)
        token = torch.tensor([[5]], device=device)
        med, best = time_ms(functools.partial(model, state=state), token, reps)
        rows.append(dict(device=device, model=path, method=method, context=context, ms_per_token=round(med, 3),
                         min_ms=round(best, 3)))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--threshold", type=float, default=6.0, help="bnb outlier threshold")
    p.add_argument("--model", default=None, help="time whole-model decode of this checkpoint instead")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model:
        rows = run_model(args.model, args.device, args.reps)
        print(f"threads={torch.get_num_threads()} torch={torch.__version__}")
        for r in rows:
            print(f"{r['method']:9} {r['ms_per_token']:8.3f} ms/token (min {r['min_ms']:.3f})")
        emit({"bench": "quant_model_decode", "threads": torch.get_num_threads(), "rows": rows}, args.out)
        return
    dtypes = [torch.float32, torch.bfloat16] if args.device == "cpu" else [torch.float16, torch.bfloat16]
    rows = run(args.device, dtypes, args.reps, args.threshold)
    print(f"device={args.device} capability={torch.backends.cpu.get_cpu_capability()} "
          f"threads={torch.get_num_threads()} torch={torch.__version__}")
    print(f"{'dtype':9} {'shape':10} {'batch':>5} {'method':9} {'median_ms':>9} {'min_ms':>8} {'rel_err':>8}")
    for r in rows:
        print(f"{r['dtype']:9} {r['shape']:10} {r['batch']:5d} {r['method']:9} {r['ms']:9.4f} {r['min_ms']:8.4f} "
              f"{r['rel_err']:8.5f}")
    emit({"bench": "quant_linear", "device": args.device, "capability": torch.backends.cpu.get_cpu_capability(),
          "threads": torch.get_num_threads(), "rows": rows}, args.out)


def emit(result: dict, out: Path | None) -> None:
    """Print `result` as one JSON line; with `out`, also write it there with the command, date and versions."""
    print(json.dumps(result))
    if out is not None:
        meta = {"command": "python " + " ".join(sys.argv), "torch": torch.__version__,
                "bitsandbytes": bnb.version() if bnb.available() else None,
                "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        out.write_text(json.dumps({**result, **meta}, indent=1) + "\n")


if __name__ == "__main__":
    main()
