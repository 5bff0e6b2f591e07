"""Decode latency vs context: TNL's constant-cost recurrent step against a Transformer's KV-cache step.

    python bench/decode.py                                   # tiny preset vs matched Llama, CPU, < 1 min
    python bench/decode.py --tnl preset:tnl-1b --device cuda --dtype bf16 --contexts 512,2048,8192,32768

Both models run through `tnllm.bench.sweep` (same timer, same seeded ids). The baseline is transformers'
`LlamaForCausalLM`, random and matched to the TNL config (`--baseline matched`) or read from a local
directory. Prints a table, then one JSON line; the same JSON goes to `--out`.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from dataclasses import asdict
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/decode.py` from anywhere

from tnllm import TNLConfig, TransNormerLLM, load_model  # noqa: E402
from tnllm.baseline import build_llama, load_llama  # noqa: E402
from tnllm.bench import adapter_for, format_table, print_progress, sweep  # noqa: E402
from tnllm.checkpoint import parse_dtype  # noqa: E402


def build_tnl(spec: str, dtype: str, device: str) -> TransNormerLLM:
    """`preset:NAME` (random weights, seed 0) or a checkpoint directory / repo id."""
    if spec.startswith("preset:"):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = TransNormerLLM(TNLConfig.from_name(spec.removeprefix("preset:")))
        return model.to(device=device, dtype=parse_dtype(dtype)).eval()
    return load_model(spec, dtype=dtype, device=device)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tnl", default="preset:tiny", help="checkpoint dir, repo id, or preset:NAME (random)")
    parser.add_argument("--baseline", default="matched", help="'matched' (random Llama sized like TNL) or a dir")
    parser.add_argument("--contexts", default="128,512,2048,8192", help="comma-separated context lengths")
    parser.add_argument("--tokens", type=int, default=32, help="timed decode steps per context")
    parser.add_argument("--prefill-repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None,
                        help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU intra-op threads (default: torch's); 1 is steadier on a shared machine")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="JSON file (default bench/results/decode-<host>.json)")
    args = parser.parse_args(argv)
    dtype = args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")
    contexts = [int(c) for c in args.contexts.split(",")]
    if args.threads:
        torch.set_num_threads(args.threads)

    tnl = build_tnl(args.tnl, dtype, args.device)
    llama = (build_llama(tnl.config, dtype=dtype, device=args.device) if args.baseline == "matched"
             else load_llama(args.baseline, dtype=dtype, device=args.device))
    adapters = [adapter_for(tnl, "TNL"), adapter_for(llama, "Llama")]
    for a in adapters:
        print(f"{a.name}: {a.num_parameters():,} parameters, {a.dtype}, {a.device}", file=sys.stderr)

    rows = sweep(adapters, contexts, args.tokens, prefill_repeats=args.prefill_repeats, seed=args.seed,
                 progress=print_progress)
    result = {
        "bench": "decode",
        "host": platform.node(),
        "device": (torch.cuda.get_device_name(args.device) if args.device.startswith("cuda")
                   else platform.processor() or platform.machine()),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "dtype": dtype,
        "threads": torch.get_num_threads(),
        "tnl": args.tnl,
        "baseline": args.baseline,
        "parameters": {a.name: a.num_parameters() for a in adapters},
        "tokens": args.tokens,
        "rows": [asdict(r) for r in rows],
    }
    print(format_table(rows))
    print(json.dumps(result))
    out = Path(args.out or Path(__file__).parent / "results" / f"decode-{platform.node()}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return result


if __name__ == "__main__":
    main()
