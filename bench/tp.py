"""Tensor parallelism: TP=1 vs TP=N decode latency and 32k prefill, official 7B shape, random bf16 weights.

    # the lent 2-GPU H200 (NCCL; NVLink multicast stays off: NCCL_NVLS_ENABLE=0 is forced here)
    torchrun --standalone --nproc-per-node 2 bench/tp.py              # -> bench/results/tp-h200x2.json
    # CPU smoke run of the same code (gloo, tiny preset, no CUDA graphs)
    torchrun --standalone --nproc-per-node 2 bench/tp.py --preset tiny --prefill 256 --tokens 8 --out /tmp/tp.json

Protocol. Weights: every tensor drawn from its own seeded generator (seed + crc32 of its name),
normal(0, init_std) in fp32, then cast, so the TP=1 model, the TP=N shards and the fp32 reference
are the same model (each rank draws a full tensor on its GPU, keeps its slice, frees the rest).
TP=1 runs on rank 0 alone (the others wait at a barrier), TP=N on all ranks, in the same process.
Timer: CUDA events after a synchronize around each call, on rank 0 (its time includes waiting for
the other ranks in the collectives); medians. Decode: a state prefilled with a 128-token prompt,
then `--tokens` single-token steps (teacher-forced seeded ids, identical on every rank) after
`--warmup` untimed ones, eager and CUDA graph (NCCL collectives captured in the graph), batch 1
and 16. Decode cost does not depend on the context (constant-size state). Prefill: one call of
[1, --prefill] tokens into a fresh state, logits of the last position, median of `--repeats`
after one warm-up. "driven": the serving path (rank 0 broadcasts each command, samples greedily,
CUDA graph on every rank), tokens per second of a greedy generation at batch 1.
Outputs: logits of the prompt's last position and of every teacher-forced decode step, TP=1 bf16
and TP=N bf16 each against the fp32 TP=1 model (rel-L2), TP=N against TP=1, and the greedy tokens
of 32 steps from each. Goal (docs/benchmarks.md#floors): TP=2 batch-1 per-token <= 0.6x TP=1, prefill 32k
<= 0.55x.
"""

from __future__ import annotations

import os

os.environ["NCCL_NVLS_ENABLE"] = "0"  # never NVLink multicast on the lent machines
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")

import argparse
import json
import platform
import statistics
import time
import zlib
from pathlib import Path

import torch

from tnllm import TNLConfig, TransNormerLLM
from tnllm.bench import timed
from tnllm.checkpoint import default_dtype, dtype_name, parse_dtype
from tnllm.tp import TPGroup, empty_tp_model, init_tp, shard_spec
from tnllm.tp.load import take
from tnllm.tp.serve import DrivenGraph, DrivenModel, Driver, follow, new_graph

PROMPT = 128      # decode starts from a state holding this many tokens
GREEDY_STEPS = 32


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tnl-7b", help="TNLConfig preset (random weights)")
    parser.add_argument("--dtype", default=None, help="bf16 on CUDA (default), fp32 on CPU")
    parser.add_argument("--batches", default="1,16", help="decode batch sizes")
    parser.add_argument("--tokens", type=int, default=100, help="timed decode steps per setting")
    parser.add_argument("--warmup", type=int, default=10, help="untimed decode steps before timing")
    parser.add_argument("--prefill", type=int, default=32768, help="prefill length")
    parser.add_argument("--repeats", type=int, default=3, help="timed prefill calls")
    parser.add_argument("--no-graphs", action="store_true", help="eager decode only")
    parser.add_argument("--no-fp32-reference", action="store_true", help="skip the fp32 TP=1 model")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="JSON (default bench/results/tp-<gpu>x<N>.json)")
    return parser.parse_args(argv)


# -- weights ------------------------------------------------------------------------------------
def random_full(name: str, shape, std: float, seed: int, device) -> torch.Tensor:
    """The full fp32 tensor `name`, the same on every rank and for every TP size."""
    gen = torch.Generator(device=device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    return torch.randn(*shape, generator=gen, device=device, dtype=torch.float32) * std


@torch.no_grad()
def fill(model: TransNormerLLM, full_shapes: dict, std: float, seed: int) -> None:
    """Fill a full model or a TP shard (named_parameters skips the tied lm_head)."""
    sharded = hasattr(model, "tp")
    for name, param in model.named_parameters():
        full = random_full(name, full_shapes[name], std, seed, param.device)
        param.copy_(take(full, shard_spec(name, model)) if sharded else full)
        del full


def full_model(config: TNLConfig, dtype, device, seed: int) -> TransNormerLLM:
    with torch.device("meta"):
        model = TransNormerLLM(config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    model = model.to(dtype).to_empty(device=device).eval()
    fill(model, shapes, config.init_std, seed)
    return model


def shard_model(config: TNLConfig, tp: TPGroup, dtype, seed: int):
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in TransNormerLLM(config).state_dict().items()}
    model = empty_tp_model(config, tp, dtype)
    fill(model, shapes, config.init_std, seed)
    return model


# -- timing -------------------------------------------------------------------------------------
def ids(config: TNLConfig, shape, seed: int, device) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, config.vocab_size, shape, generator=gen).to(device)


@torch.inference_mode()
def decode_latency(model, config, batch: int, args, device, graphs: bool, fuse_rows: int | None = None) -> dict:
    """Median ms per decode step (batch sequences per step) from a 128-token state. TP shards:
    `fuse_rows` 0 keeps the norm's own all-reduce (3 per layer instead of 2), for comparison."""
    mode = "graph" if graphs else "eager"
    if fuse_rows is not None:
        model.set_fuse_norm_rows(fuse_rows)
        mode += "" if fuse_rows else " (norm all-reduce unfused)"
    state = model.allocate_state(batch)
    model(ids(config, (batch, PROMPT), args.seed + 1, device), state, logits_to_keep=1)
    steps = ids(config, (args.warmup + args.tokens, batch, 1), args.seed + 2, device)
    if graphs:
        graph = new_graph(model, batch) if hasattr(model, "tp") else _graphed(model, batch)
        graph.load(state)
        step = graph.step
    else:
        step = lambda t: model(t, state)  # noqa: E731
    times = [timed(lambda t=t: step(t), device)[1] * 1e3 for t in steps]
    if fuse_rows is not None:
        model.set_fuse_norm_rows(64)
    return {"ms_per_step": statistics.median(times[args.warmup:]), "tokens_per_step": batch, "mode": mode}


def _graphed(model, batch):
    from tnllm.cuda_graph import GraphedDecoder

    return GraphedDecoder(model, batch)


@torch.inference_mode()
def prefill_latency(model, config, args, device) -> dict:
    prompt = ids(config, (1, args.prefill), args.seed + 3, device)
    times = []
    for _ in range(args.repeats + 1):
        state = model.allocate_state(1)
        times.append(timed(lambda s=state: model(prompt, s, logits_to_keep=1), device)[1] * 1e3)
        del state
    return {"tokens": args.prefill, "ms": statistics.median(times[1:]), "all_ms": times}


@torch.inference_mode()
def outputs(model, config, args, device) -> dict:
    """Last-prompt-position logits, teacher-forced decode logits, and greedy tokens (fp32 on CPU)."""
    state = model.allocate_state(1)
    prompt = ids(config, (1, PROMPT), args.seed + 4, device)
    logits = [model(prompt, state, logits_to_keep=1)[:, -1]]
    forced = ids(config, (16, 1, 1), args.seed + 5, device)
    fork = state.clone()
    for t in forced:
        logits.append(model(t, state)[:, -1])
    greedy, last = [], logits[0]
    for _ in range(GREEDY_STEPS):
        token = last.argmax(-1, keepdim=True)  # [1, 1]
        greedy.append(int(token))
        last = model(token, fork)[:, -1]
    return {"logits": torch.cat(logits).float().cpu(), "greedy": greedy}


@torch.inference_mode()
def driven_tokens_per_s(model, config, args, device, graphs: bool) -> dict:
    """Rank 0: greedy generation through the serving path (commands broadcast, graph on every rank)."""
    driven = DrivenModel(Driver(model))
    try:
        graph = DrivenGraph(driven, 1) if graphs else None
        state = driven.allocate_state(1)
        logits = driven(ids(config, (1, PROMPT), args.seed + 6, device), state, logits_to_keep=1)[:, -1]
        if graph is not None:
            graph.load(state)
        step = graph.step if graph is not None else (lambda t: driven(t, state)[:, -1])
        n = args.warmup + args.tokens
        times = []
        for _ in range(n):
            token = logits.argmax(-1, keepdim=True)
            int(token)  # the host sees the sampled id (as a chat would), then sends it
            logits, seconds = timed(lambda t=token: step(t), device)
            times.append(seconds * 1e3)
        ms = statistics.median(times[args.warmup:])
        return {"ms_per_token": ms, "tokens_per_s": 1e3 / ms, "mode": "graph" if graphs else "eager"}
    finally:
        driven.driver.stop()


def rel_l2(ref: torch.Tensor, out: torch.Tensor) -> float:
    return float((out.double() - ref.double()).norm() / ref.double().norm())


def agree(a: list[int], b: list[int]) -> int:
    """Length of the common prefix."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


# -- main ---------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> dict | None:
    tp = init_tp(timeout_s=3600)
    device = tp.device
    args.dtype = dtype_name(args.dtype or default_dtype(device))  # resolved here, so the report records what ran
    dtype = parse_dtype(args.dtype)
    graphs = device.type == "cuda" and not args.no_graphs
    config = TNLConfig.from_name(args.preset)
    batches = [int(b) for b in args.batches.split(",")]
    res: dict = {"tp1": {}, f"tp{tp.size}": {}}
    if tp.rank == 0:  # TP=1 alone on rank 0
        single = full_model(config, dtype, device, args.seed)
        res["tp1"]["decode"] = [decode_latency(single, config, b, args, device, g)
                                for b in batches for g in ([False, True] if graphs else [False])]
        res["tp1"]["prefill"] = prefill_latency(single, config, args, device)
        res["tp1"]["outputs"] = outputs(single, config, args, device)
        del single
        if not args.no_fp32_reference:
            ref = full_model(config, torch.float32, device, args.seed)
            res["fp32"] = outputs(ref, config, args, device)
            del ref
        if device.type == "cuda":
            torch.cuda.empty_cache()
    tp.barrier()
    shard = shard_model(config, tp, dtype, args.seed)
    key = f"tp{tp.size}"
    res[key]["decode"] = [decode_latency(shard, config, b, args, device, g, fuse)
                          for b in batches for g in ([False, True] if graphs else [False]) for fuse in (64, 0)]
    res[key]["prefill"] = prefill_latency(shard, config, args, device)
    res[key]["outputs"] = outputs(shard, config, args, device)
    res[key]["state_bytes_per_rank_b1"] = shard.allocate_state(1).nbytes
    if tp.rank == 0:
        res[key]["driven"] = driven_tokens_per_s(shard, config, args, device, graphs)
    else:
        follow(shard)
    tp.barrier()
    return res if tp.rank == 0 else None


def summarize(res: dict, args: argparse.Namespace, size: int) -> dict:
    key = f"tp{size}"
    one, many = res["tp1"], res[key]
    match = {f"{key}_vs_tp1_rel_l2": rel_l2(one["outputs"]["logits"], many["outputs"]["logits"]),
             "greedy_common_prefix": agree(one["outputs"]["greedy"], many["outputs"]["greedy"]),
             "greedy_steps": GREEDY_STEPS}
    if "fp32" in res:
        match["tp1_vs_fp32_rel_l2"] = rel_l2(res["fp32"]["logits"], one["outputs"]["logits"])
        match[f"{key}_vs_fp32_rel_l2"] = rel_l2(res["fp32"]["logits"], many["outputs"]["logits"])
        match["greedy_fp32_common_prefix_tp1"] = agree(res["fp32"]["greedy"], one["outputs"]["greedy"])
        match[f"greedy_fp32_common_prefix_{key}"] = agree(res["fp32"]["greedy"], many["outputs"]["greedy"])
    rows = []
    single = {(a["tokens_per_step"], a["mode"]): a["ms_per_step"] for a in one["decode"]}
    for b in many["decode"]:
        tp1 = single[(b["tokens_per_step"], b["mode"].split(" ")[0])]
        rows.append({"batch": b["tokens_per_step"], "mode": b["mode"], "tp1_ms": tp1,
                     f"{key}_ms": b["ms_per_step"], "ratio": b["ms_per_step"] / tp1})
    prefill = {"tokens": args.prefill, "tp1_ms": one["prefill"]["ms"], f"{key}_ms": many["prefill"]["ms"],
               "ratio": many["prefill"]["ms"] / one["prefill"]["ms"]}
    best_b1 = min((r for r in rows if r["batch"] == 1), key=lambda r: r[f"{key}_ms"])
    return {"decode": rows, "prefill": prefill, "match": match, "driven": many.get("driven"),
            "state_bytes_per_rank_b1": many["state_bytes_per_rank_b1"],
            "goals": {"decode_b1_ratio": best_b1["ratio"], "decode_b1_mode": best_b1["mode"],
                      "decode_b1_ok": best_b1["ratio"] <= 0.6, "prefill_ratio": prefill["ratio"],
                      "prefill_ok": prefill["ratio"] <= 0.55}}


def print_table(summary: dict, size: int) -> None:
    key = f"tp{size}"
    print(f"\n| decode | batch | TP=1 ms/step | TP={size} ms/step | ratio |\n|---|---|---|---|---|")
    for r in summary["decode"]:
        print(f"| {r['mode']} | {r['batch']} | {r['tp1_ms']:.3f} | {r[f'{key}_ms']:.3f} | {r['ratio']:.2f}x |")
    p = summary["prefill"]
    print(f"| prefill | 1 x {p['tokens']} | {p['tp1_ms']:.1f} | {p[f'{key}_ms']:.1f} | {p['ratio']:.2f}x |")
    if summary["driven"]:
        d = summary["driven"]
        print(f"\nserving path (rank 0 drives, {d['mode']}): {d['ms_per_token']:.3f} ms/token, "
              f"{d['tokens_per_s']:.1f} tok/s")
    print("\nmatch:", json.dumps(summary["match"]))
    print("goals:", json.dumps(summary["goals"]))


def main(argv: list[str] | None = None) -> dict | None:
    args = parse_args(argv)
    res = run(args)
    if res is None:
        _shutdown()
        return None
    size = int(os.environ.get("WORLD_SIZE", "1"))
    summary = summarize(res, args, size)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
    report = {"bench": "tp", "date": time.strftime("%Y-%m-%d"), "device": device, "world_size": size,
              "torch": torch.__version__,
              "nccl": ".".join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() else None,
              "env": {k: os.environ.get(k) for k in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST")},
              "preset": args.preset, "config": TNLConfig.from_name(args.preset).to_hf_dict(),
              "dtype": args.dtype,
              "args": vars(args), **summary,
              "raw": {k: {kk: vv for kk, vv in v.items() if kk != "outputs"} for k, v in res.items() if k != "fp32"}}
    print_table(summary, size)
    gpu = "h200" if "H200" in device else ("cpu" if not torch.cuda.is_available() else "gpu")
    out = Path(args.out or Path(__file__).parent / "results" / f"tp-{gpu}x{size}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    _shutdown()
    return report


def _shutdown() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
