"""Decode latency vs context: TNL's constant-cost recurrent step against a Transformer's KV-cache step.

    python bench/decode.py                                   # tiny preset vs matched Llama, CPU, < 1 min
    python bench/decode.py --tnl preset:tnl-1b --device cuda --dtype bf16 --contexts 512,2048,8192,32768

Both models run through `tnllm.bench.sweep` (same timer, same seeded prompt ids). TNL's decode is the path
users get: a chat reply through a threadless `tnllm.engine` session (chat's sampling defaults, seeded; the
on-device sampler, host transfer, detokenising and events included; a CUDA graph on CUDA), eos ignored so the
reply has a fixed length (rows' `path`: "engine-graph" or "engine-eager"). The baseline is transformers'
`LlamaForCausalLM`, random and matched to the TNL config (`--baseline matched`) or read from a local
directory, decoding through the engine the same way on a per-session `DynamicCache` (`KVCacheLM`; `path`
"engine-eager": nothing of it is captured), and on CUDA also its static-cache captured step (`path`
"static-cache-graph"). TTFT is each model's own prefill. `--quant none,int8` runs both models once per
8-bit method (`quant.quantize` on both, so they always share a precision), each method in a fresh child
process so its memory column is its own. Prints a table, then one JSON line; the same JSON goes to `--out`
(rows: `model`, `quant`, `context`, `ttft_ms`, `decode_ms_per_token`, `peak_mem_mb`, `path`, ...:
`tnllm.bench.BenchRow`).

    python bench/decode.py --tnl assets/tnl --baseline assets/llama --device cpu --quant none,int8 \
        --contexts 128,1024,4096,16384 --out bench/results/decode-cpu.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch
import transformers

from tnllm import TransNormerLLM, load_model, quant
from tnllm.baseline import build_llama, load_llama
from tnllm.bench import (
    BenchRow,
    EngineAdapter,
    baseline_adapters,
    format_table,
    print_progress,
    sweep,
)
from tnllm.checkpoint import default_dtype, dtype_name, parse_dtype
from tnllm.model import random_model
from tnllm.sampling import SamplingParams
from tnllm.tokenizer import BUNDLED_TOKENIZER, Tokenizer, tokenizer_for
from tnllm.webui.validation import CHAT_DEFAULTS

from engine_gpu import ModuloTokenizer


def build_tnl(spec: str, dtype: str, device: str) -> TransNormerLLM:
    """`preset:NAME` (random weights, seed 0) or a checkpoint directory / repo id."""
    if spec.startswith("preset:"):
        return random_model(spec.removeprefix("preset:"), device=device, dtype=parse_dtype(dtype))
    return load_model(spec, dtype=dtype, device=device)


def tnl_tokenizer(spec: str) -> ModuloTokenizer:
    """What the engine detokenises TNL's reply with: the checkpoint's tokenizer as the app finds it, the bundled
    one for a preset, ids beyond it (a random preset's larger vocabulary) folded into its range."""
    return ModuloTokenizer(Tokenizer(BUNDLED_TOKENIZER) if spec.startswith("preset:") else tokenizer_for(spec))


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
    parser.add_argument("--quant", default="none",
                        help="comma-separated 8-bit methods of quant.METHODS (none, int8, bnb_int8, auto)")
    parser.add_argument("--interleave", action=argparse.BooleanOptionalAction, default=None,
                        help="decode steps take turns across the contexts, cancelling a shared machine's drift "
                             "(default on for CPU; off on CUDA, where it would lose the per-context decode peak)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="JSON file (default bench/results/decode-<host>.json)")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    dtype = args.dtype or dtype_name(default_dtype(args.device))
    contexts = [int(c) for c in args.contexts.split(",")]
    methods = args.quant.split(",")
    if len(methods) > 1:
        result = run_each_method(argv, methods)
    else:
        result = measure(args, dtype, contexts, methods[0])
    result.update(date=datetime.date.today().isoformat(),
                  command=" ".join(["python bench/decode.py", *argv]))
    rows = [BenchRow(**r) for r in result["rows"]]
    print(format_table(rows))
    print(json.dumps(result))
    out = Path(args.out or Path(__file__).parent / "results" / f"decode-{platform.node()}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return result


def run_each_method(argv: list[str], methods: list[str]) -> dict:
    """One child process per 8-bit method (so RSS and peak memory are that method's alone); merged JSON."""
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for method in methods:
            out = Path(tmp) / f"{method}.json"
            child = [*argv, "--quant", method, "--out", str(out)]  # later flags win in argparse
            subprocess.run([sys.executable, __file__, *child], check=True, stdout=subprocess.DEVNULL)
            results.append(json.loads(out.read_text(encoding="utf-8")))
    merged = {**results[0], "quant": methods}
    merged["rows"] = [row for r in results for row in r["rows"]]
    return merged


def measure(args: argparse.Namespace, dtype: str, contexts: list[int], method: str) -> dict:
    """Build (and quantise) both models, sweep them, return the JSON result."""
    if args.threads:
        torch.set_num_threads(args.threads)
    tnl = build_tnl(args.tnl, dtype, args.device)
    llama = (build_llama(tnl.config, dtype=dtype, device=args.device) if args.baseline == "matched"
             else load_llama(args.baseline, dtype=dtype, device=args.device))
    if method != "none":
        tnl, llama = quant.quantize(tnl, method), quant.quantize(llama, method)
    params = SamplingParams(**{**CHAT_DEFAULTS, "seed": args.seed})
    tokenizer = tnl_tokenizer(args.tnl)  # the baseline is built on TNL's vocabulary
    adapters = [EngineAdapter(tnl, tokenizer, params, "TNL"), *baseline_adapters(llama, tokenizer, params)]
    for a in adapters:
        print(f"{a.name}: {a.num_parameters():,} parameters, {a.dtype}, {a.device}, 8-bit: {a.quant}",
              file=sys.stderr)

    interleave = not args.device.startswith("cuda") if args.interleave is None else args.interleave
    rows = sweep(adapters, contexts, args.tokens, prefill_repeats=args.prefill_repeats, seed=args.seed,
                 interleave=interleave, progress=print_progress)
    return {
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
        "tnl_sampling": {k: v for k, v in asdict(params).items() if k != "max_new_tokens"},  # the runs set the length
        "parameters": {a.name: a.num_parameters() for a in adapters},
        "tokens": args.tokens,
        "interleave": interleave,
        "quant": [method],
        "rows": [asdict(r) for r in rows],
    }


if __name__ == "__main__":
    main()
