"""GPU figures of the weight-only int8 Triton kernel (docs/quantization.md#cuda-kernel): per Linear and whole model.

    python bench/quant_gpu.py --out bench/results/quant-h200.json        # H200, a few minutes
    python bench/quant_gpu.py --dry-run --out /tmp/quant-dry.json        # CPU, Triton interpreter, tiny shapes

Sections (each row is written to --out as soon as it exists, so a timeout loses nothing):
* linear: every decoder Linear shape of --preset (tnl-7b: qkvu_proj 4096->16384, out_proj 4096->4096, l1/l2
  4096->11008, l3 11008->4096) at M = --rows, bf16 activations: bf16 F.linear vs the int8 Triton kernel
  (`kernels.int8_linear`) vs bitsandbytes Linear8bitLt and Linear4bit NF4 (if importable). us = median over
  --reps of CUDA-event timed runs of one call on each of R weight copies back to back (R copies >= --rotate-mib,
  so the weights are read from HBM, not L2), divided by R; bf16, int8 and NF4 runs are replayed CUDA graphs (as
  the engine decodes), bnb_int8 runs eager (its outlier path syncs with the host); eager_us is the same without a
  graph for every method.
  weight_gb_s = weight bytes / us. max_rel_err = max|y - ref| / max|ref| against float64 dequantise-then-matmul
  of the int8 weight (for bf16 that is the quantisation error itself);
* model: random-weight --preset in bf16, then quantised in place (`quant.quantize(model, "int8")`, timed as
  load_s), decoded through `tnllm.engine.Engine` with CUDA graphs: decode_ms_per_token (median gap between two
  tokens of a session) at batch 1 and --batch, sessions holding --context tokens; prefill: one --prefill-tokens
  prompt through the same engine (prefill_budget 16384), timed twice, the second reported (cold_s: the first);
* load: the random --preset written as a bf16 safetensors checkpoint in --shard-gib shards, then loaded by a fresh
  process per method (bf16 as saved; int8 through the streaming loader, each weight quantised on the GPU):
  load_s, peak_host_mb (the process's peak resident memory), largest_shard_mb.
Helpers (model building, engine rows, JSON results, failed-section notes) come from bench/engine_gpu.py.
"""

from __future__ import annotations

import os
import sys

if "--dry-run" in sys.argv:  # before anything imports Triton: its interpreter is chosen when kernels are defined
    os.environ.setdefault("TRITON_INTERPRET", "1")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import datetime  # noqa: E402
import functools  # noqa: E402
import gc  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from tnllm import TNLConfig, TransNormerLLM, kernels, quant  # noqa: E402
from tnllm.engine import Engine, EngineConfig  # noqa: E402
from tnllm.memory import peak_rss_bytes  # noqa: E402
from tnllm.quant import bnb  # noqa: E402
from tnllm.quant.int8 import Int8Linear  # noqa: E402
from tnllm.sampling import SamplingParams  # noqa: E402
from tnllm.tokenizer import BUNDLED_TOKENIZER, Tokenizer  # noqa: E402

from engine_gpu import PARAMS, ModuloTokenizer, Results, build, decode_row, section, sync, weight_bytes  # noqa: E402


def linear_shapes(cfg: TNLConfig) -> dict[str, tuple[int, int]]:
    """Name -> (in, out) of every decoder Linear of a preset (l1 and l2 share a shape), and of l1|l2 packed into
    one product (`GLU.pack`: what decode on CUDA runs)."""
    return {"qkvu_proj": (cfg.dim, 4 * cfg.hidden_dim), "out_proj": (cfg.hidden_dim, cfg.dim),
            "l1/l2": (cfg.dim, cfg.glu_dim), "l1|l2": (cfg.dim, 2 * cfg.glu_dim), "l3": (cfg.glu_dim, cfg.dim)}


def time_us(calls: list, device: torch.device, reps: int, graph: bool) -> float:
    """Median µs per call: `reps` timed runs of every call in `calls` back to back, divided by len(calls).

    CUDA: CUDA events around each run, the run replayed from one CUDA graph if `graph` (captured after two eager
    warm-up runs on a side stream); CPU: perf_counter."""
    def run():
        for call in calls:
            call()

    if device.type == "cuda":
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            run()
            run()
        torch.cuda.current_stream(device).wait_stream(stream)
        if graph:
            cuda_graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(cuda_graph):
                run()
            run = cuda_graph.replay
        run()
        times = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e3)
    else:
        run()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            run()
            times.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(times) / len(calls)


def layer_copies(n_in: int, n_out: int, copies: int, device: torch.device, threshold: float) -> dict[str, list]:
    """Method -> `copies` independent random layers of one shape: (call(x), weight bytes) per layer."""
    out = {"bf16": [], "int8": [], "int8_linear": [], "bnb_int8": [], "bnb_nf4": []}
    for _ in range(copies):
        lin = nn.Linear(n_in, n_out, bias=False, device=device, dtype=torch.bfloat16)
        q = Int8Linear.from_float(lin)
        out["bf16"].append((lin, lambda x, w=lin.weight: F.linear(x, w), lin.weight.numel() * 2))
        int8_bytes = q.weight.numel() + q.scales.numel() * q.scales.element_size()
        out["int8"].append((q, lambda x, q=q: kernels.int8_linear(x, q.weight, q.scales, q.bias), int8_bytes))
        out["int8_linear"].append((q, q, int8_bytes))  # what the model runs: the kernel or dequantise + cuBLAS
        if bnb.available():
            b = bnb.linear_from_float(lin, device, threshold=threshold)
            out["bnb_int8"].append((b, b, b.weight.numel() + n_out * 4))  # int8 rows + fp32 row scales
            nf4 = bnb.nf4_linear_from_float(lin, device)
            out["bnb_nf4"].append((nf4, nf4, n_in * n_out // 2 + n_in * n_out // 64 * 4))  # nibbles + fp32 absmax
    return {method: layers for method, layers in out.items() if layers}


@torch.inference_mode()
def bench_linear(args, results: Results, device: torch.device) -> None:
    """The per-Linear section: one row per (shape, M, method)."""
    cfg = TNLConfig.from_name(args.preset)
    for name, (n_in, n_out) in linear_shapes(cfg).items():
        with section(results, f"linear {name}"):
            copies = max(2, min(16, math.ceil(args.rotate_mib * 2**20 / (n_in * n_out))))  # int8 bytes
            layers = layer_copies(n_in, n_out, copies, device, args.threshold)
            q = layers["int8"][0][0]
            w_deq = q.weight.double() * q.scales.double()[:, None]  # [out, in]: the oracle's weight
            for m in args.rows:
                x = torch.randn(m, n_in, device=device, dtype=torch.bfloat16)
                ref = x.double() @ w_deq.T  # [m, out]
                for method, group in layers.items():
                    calls = [functools.partial(call, x) for _, call, _ in group]
                    y = calls[0]().double()
                    graph = method != "bnb_int8"
                    us = time_us(calls, device, args.reps, graph=graph)
                    eager_us = time_us(calls, device, args.reps, graph=False) if graph else us
                    nbytes = group[0][2]
                    row = {"shape": name, "in": n_in, "out": n_out, "rows": m, "method": method,
                           "us": us, "eager_us": eager_us, "timing": "graph" if graph else "eager",
                           "weight_mib": nbytes / 2**20, "weight_gb_s": nbytes / us / 1e3,
                           "tflop_s": 2 * m * n_in * n_out / us / 1e6, "copies": len(group),
                           "max_rel_err": ((y - ref).abs().max() / ref.abs().max()).item(),
                           "rel_l2": ((y - ref).norm() / ref.norm()).item()}
                    if method == "int8":
                        from tnllm.kernels.triton_int8 import choose_config

                        row["config"] = choose_config(m, n_out, n_in, device)._asdict()
                    results.add("linear", row)
            del layers, q, w_deq
            release(device)


def prefill_s(engine: Engine, tokens: int, seed: int) -> float:
    """Seconds from submitting a `tokens`-id prompt to its first (only) sampled token, in a fresh session."""
    session = engine.open()
    ids = torch.randint(3, engine.model.config.vocab_size, (tokens,), generator=torch.Generator().manual_seed(seed))
    start = time.perf_counter()
    session.feed_ids(ids.tolist(), SamplingParams(max_new_tokens=1, **PARAMS)).wait()
    elapsed = time.perf_counter() - start
    session.close()
    return elapsed


def bench_model_method(model: TransNormerLLM, method: str, load_s: float | None, args, results: Results, tok,
                       device: torch.device) -> None:
    """Decode rows at batch 1 and --batch, then the prefill row, of one (already quantised) model."""
    base = {"method": method, "preset": args.preset, "load_s": load_s, "weight_gib": weight_bytes(model) / 2**30}
    engine = Engine(model, tok, EngineConfig(max_sessions=args.batch, prefill_budget=16384), eos_ids=set())
    base["path"] = "graph" if engine.scheduler.decoder is not None else "eager"
    try:
        for batch in sorted({1, args.batch}):
            ms, tok_s, _ = decode_row(engine, [args.context] * batch, args.tokens)
            results.add("model", {**base, "batch": batch, "context": args.context, "decode_ms_per_token": ms,
                                  "aggregate_tok_s": tok_s})
        cold = prefill_s(engine, args.prefill_tokens, seed=1)
        warm = prefill_s(engine, args.prefill_tokens, seed=2)
        results.add("prefill", {**base, "batch": 1, "context": args.prefill_tokens, "prefill_s": warm,
                                "cold_s": cold, "prefill_tok_s": args.prefill_tokens / warm})
    finally:
        engine.shutdown()


def release(device: torch.device) -> None:
    """Give freed tensors back (the float weights a quantisation replaced, a model let go)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def bench_quantised(model: TransNormerLLM, method: str, args, results: Results, tok, device: torch.device) -> None:
    """Quantise the float model in place with `method` (timed as its load_s), then its decode and prefill rows."""
    with section(results, f"model {method}"):
        sync(device)
        start = time.perf_counter()
        quant.quantize(model, method, threshold=args.threshold)
        sync(device)
        load_s = time.perf_counter() - start
        release(device)
        bench_model_method(model, method, load_s, args, results, tok, device)


def bench_model(args, results: Results, device: torch.device, tok) -> None:
    """The whole-model section: bf16, then the same weights quantised to int8 in place; with bitsandbytes, a fresh
    bf16 model quantised to bnb_int8."""
    model = build(args.preset, args.model_dtype, device)
    with section(results, "model bf16"):
        bench_model_method(model, "bf16" if args.model_dtype == torch.bfloat16 else "float", None, args, results,
                           tok, device)
    bench_quantised(model, "int8", args, results, tok, device)
    if bnb.available():
        del model
        release(device)
        bench_quantised(build(args.preset, args.model_dtype, device), "bnb_int8", args, results, tok, device)


def timed_load(directory: str, method: str, device: str) -> dict:
    """Seconds to load the checkpoint in `directory` onto `device` with `method` ("none": bf16 weights), and this
    process's peak resident host memory (run it in a fresh process, so the peak is the load's: VmHWM starts anew
    at exec, where getrusage's ru_maxrss would carry the parent's peak over)."""
    start = time.perf_counter()
    if method == "none":
        from tnllm.checkpoint import load_model

        model = load_model(directory, dtype=torch.bfloat16, device=device)
    else:
        model = quant.load_quantized(directory, method, dtype=torch.bfloat16, device=device)
    sync(torch.device(device))
    return {"load_s": time.perf_counter() - start, "weight_gib": weight_bytes(model) / 2**30,
            "peak_host_mb": peak_rss_bytes() / 2**20}


def bench_load(args, results: Results, device: torch.device) -> None:
    """A random --preset checkpoint written in shards of --shard-gib (bf16 safetensors), then loaded by a fresh
    process per method: bf16 as saved, and 8-bit through the streaming loader."""
    import json
    import subprocess
    import tempfile

    from tnllm.checkpoint import save_model

    with tempfile.TemporaryDirectory() as tmp:
        model = build(args.preset, torch.bfloat16, device)
        save_model(model, tmp, max_shard_bytes=int(args.shard_gib * 2**30))
        del model
        gc.collect()
        largest = max(p.stat().st_size for p in Path(tmp).glob("*.safetensors")) / 2**20
        for method in ("none", "int8") + (("bnb_int8",) if bnb.available() else ()):
            with section(results, f"load {method}"):
                code = (f"import json; from quant_gpu import timed_load; "
                        f"print(json.dumps(timed_load({tmp!r}, {method!r}, {str(device)!r})))")
                # run from bench/, where `python -c` finds this script as the module quant_gpu
                out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                                     cwd=ROOT / "bench")
                row = json.loads(out.stdout.strip().splitlines()[-1])
                results.add("load", {"method": "bf16" if method == "none" else method, "preset": args.preset,
                                     "largest_shard_mb": largest, **row})


def print_table(data: dict) -> None:
    print("\nlinear (us per call; GB/s of weight bytes; max rel err vs dequantise-then-matmul)")
    print(f"{'shape':<10} {'rows':>5} {'method':<9} {'us':>9} {'eager_us':>9} {'GB/s':>7} {'max_rel_err':>11}")
    for r in data["linear"]:
        print(f"{r['shape']:<10} {r['rows']:>5} {r['method']:<9} {r['us']:>9.1f} {r['eager_us']:>9.1f} "
              f"{r['weight_gb_s']:>7.0f} {r['max_rel_err']:>11.2e}")
    print("\nmodel (decode through the engine; prefill of one prompt)")
    print(f"{'method':<7} {'batch':>5} {'context':>7} {'ms/token':>9} {'prefill_s':>9} {'load_s':>7} {'GiB':>6}")
    for r in data["model"] + data["prefill"]:
        ms, pre, load = (r.get(k) for k in ("decode_ms_per_token", "prefill_s", "load_s"))
        ms, pre, load = ("" if v is None else f"{v:.3f}" for v in (ms, pre, load))
        print(f"{r['method']:<7} {r['batch']:>5} {r['context']:>7} {ms:>9} {pre:>9} {load:>7} {r['weight_gib']:>6.2f}")
    for note in data["notes"]:
        print("note:", note)


def parse_args() -> argparse.Namespace:
    """The command line, with --dry-run's sizes applied and lists split."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "quant-h200.json",
                        help="JSON file, rewritten after every row")
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU, Triton interpreter, tiny preset and sizes: checks the code path in seconds")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--preset", default="tnl-7b")
    parser.add_argument("--rows", default="1,16,64,128,512,4096", help="M of the per-Linear section")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--rotate-mib", type=float, default=256.0, help="weight copies cycled per timed run")
    parser.add_argument("--threshold", type=float, default=6.0, help="bnb LLM.int8 outlier threshold")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--tokens", type=int, default=128, help="decode tokens per session and row")
    parser.add_argument("--prefill-tokens", type=int, default=32768)
    parser.add_argument("--sections", default="linear,model,load")
    parser.add_argument("--shard-gib", type=float, default=5.0,
                        help="shard size of the checkpoint the load section writes")
    args = parser.parse_args()
    args.model_dtype = torch.bfloat16
    if args.dry_run:
        args.device, args.preset, args.rows, args.reps, args.rotate_mib = "cpu", "tiny", "3", 1, 0.0
        args.batch, args.context, args.tokens, args.prefill_tokens = 2, 16, 4, 64
        args.model_dtype = torch.float32
    args.rows = [int(r) for r in args.rows.split(",")]
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device: run on a GPU, or pass --dry-run")
    return args


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    try:
        import triton
    except ImportError:
        triton = None
    results = Results(args.out, {
        "bench": "quant_gpu", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if cuda else platform.processor() or platform.machine(),
        "torch": torch.__version__, "triton": triton and triton.__version__, "bnb": bnb.available(),
        "command": "python " + " ".join(sys.argv), "preset": args.preset})
    results.data.update(linear=[], model=[], prefill=[], load=[])
    if cuda and kernels.backend_for(device) != "triton":
        results.add("notes", "Triton not importable: int8 rows use the PyTorch reference")
    if not bnb.available():
        results.add("notes", "bitsandbytes not importable: no bnb_int8 rows")
    # the dry run sends the int8 kernel through the Triton interpreter on CPU tensors
    force = kernels.use_impl("triton") if args.dry_run else contextlib.nullcontext()
    sections = args.sections.split(",")
    if "linear" in sections:
        with force:
            bench_linear(args, results, device)
    if "model" in sections:
        with section(results, "model"):
            bench_model(args, results, device, ModuloTokenizer(Tokenizer(BUNDLED_TOKENIZER)))
    if "load" in sections:
        with section(results, "load"):
            bench_load(args, results, device)
    print_table(results.data)


if __name__ == "__main__":
    main()
