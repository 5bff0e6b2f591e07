"""Serving throughput on the CPU: N concurrent chat sessions through the engine, against one session.

    python bench/serve.py --device cpu --model assets/tnl --sessions 1,4 --tokens 64 --out bench/results/serve-cpu.json

Each round: for every N in --sessions, N chat sessions sending a user turn at once to one threaded engine,
each read by its own consumer thread as chat reads it (chat's default sampling, seeded; detokenising and
events included). Replies are exactly --tokens long (eos
ignored, as `vllm bench latency` does). Per setting: `aggregate_tok_s` = tokens of all sessions / wall time
from the submissions to the last token (prefill included), `ms_per_token_p50` = median gap between two tokens
of a session as its consumer sees them. Rounds alternate the settings so that a shared machine's load drifts
hit them alike; each figure is the median over --rounds.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import platform
import shlex
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import torch

from tnllm import load_model
from tnllm.bench import percentile
from tnllm.engine import Engine, EngineConfig, Reply
from tnllm.sampling import SamplingParams
from tnllm.tokenizer import tokenizer_for
from tnllm.webui.validation import CHAT_DEFAULTS

ROOT = Path(__file__).resolve().parents[1]

MESSAGES = ["Hi! How was your weekend?", "What is your favourite book, and why?", "Tell me something about the ocean.",
            "Do you like cooking? What do you make?", "Any plans for the summer?", "What did you do today?"]


def stream_in_threads(starts: list[Callable[[], Reply]]) -> tuple[list[threading.Thread], list[list[float]], float]:
    """Start every reply at once, each read by its own consumer thread as chat reads it; returns the threads
    (join them), per reply the perf_counter() time each of its tokens reached the consumer, and the time the
    threads were released to submit (after they were created and started)."""
    stamps: list[list[float]] = [[] for _ in starts]
    barrier = threading.Barrier(len(starts) + 1)

    def consume(i: int) -> None:
        barrier.wait()
        for event in starts[i]():
            now = time.perf_counter()
            stamps[i] += [now] * (event.stats.new_tokens - len(stamps[i]))

    threads = [threading.Thread(target=consume, args=(i,)) for i in range(len(starts))]
    for t in threads:
        t.start()
    barrier.wait()
    return threads, stamps, time.perf_counter()


def token_gaps_ms(stamps: list[float]) -> list[float]:
    """Gaps between consecutive tokens of one reply; tokens that arrived together share their gap."""
    gaps, last = [], None
    for t in sorted(set(stamps)):
        if last is not None:
            gaps += [(t - last) * 1e3 / stamps.count(t)] * stamps.count(t)
        last = t
    return gaps


def time_sessions(starts: list[Callable[[], Reply]]) -> tuple[float, list[float], int]:
    """(aggregate tok/s from the submissions to the last token, every reply's gaps between tokens in ms,
    tokens in all) of replies started at once."""
    threads, stamps, start = stream_in_threads(starts)
    for t in threads:
        t.join()
    wall = max(s[-1] for s in stamps if s) - start
    return sum(map(len, stamps)) / wall, [g for s in stamps for g in token_gaps_ms(s)], sum(map(len, stamps))


def engine_round(engine: Engine, params: SamplingParams, n_sessions: int) -> tuple[float, list[float], int]:
    """N chat sessions at once, each sending a user turn."""
    sessions = [engine.open() for _ in range(n_sessions)]
    messages = [MESSAGES[i % len(MESSAGES)] for i in range(n_sessions)]
    try:
        return time_sessions([functools.partial(s.send, m, params) for s, m in zip(sessions, messages)])
    finally:
        for s in sessions:
            s.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="assets/tnl", help="checkpoint directory")
    parser.add_argument("--sessions", default="1,4", help="comma-separated concurrent session counts")
    parser.add_argument("--tokens", type=int, default=64, help="tokens per reply")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--out", type=Path, default=None, help="JSON file to write")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    counts = [int(n) for n in args.sessions.split(",")]
    model, tok = load_model(args.model, device=args.device).eval(), tokenizer_for(args.model)
    params = SamplingParams(**{**CHAT_DEFAULTS, "max_new_tokens": args.tokens, "seed": 0})
    engine = Engine(model, tok, EngineConfig(max_sessions=max(counts)), eos_ids=set())
    engine_round(engine, params, max(counts))  # warm-up (allocator, first-call costs)

    runs = {n: {"tok_s": [], "gaps": []} for n in counts}
    for round_ in range(args.rounds):
        order = counts if round_ % 2 == 0 else counts[::-1]
        for n in order:
            tok_s, gaps, total = engine_round(engine, params, n)
            assert total == n * args.tokens, f"{n} sessions produced {total} tokens"
            runs[n]["tok_s"].append(tok_s)
            runs[n]["gaps"] += gaps
        print(f"round {round_ + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    engine.shutdown()

    def row(path: str, sessions: int, data: dict) -> dict:
        return {"path": path, "sessions": sessions, "aggregate_tok_s": statistics.median(data["tok_s"]),
                "ms_per_token_p50": statistics.median(data["gaps"]),
                "ms_per_token_p90": percentile(data["gaps"], 0.9)}

    rows = [row("engine", n, runs[n]) for n in counts]
    one = next((r for r in rows if r["sessions"] == 1), None)
    result = {
        "bench": "serve",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.node()} {platform.machine()} {platform.processor() or ''}".strip(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "threads": args.threads,
        "device": args.device,
        "model": args.model,
        "tokens": args.tokens,
        "rounds": args.rounds,
        "sampling": {**CHAT_DEFAULTS, "max_new_tokens": args.tokens, "seed": 0},
        "command": "python " + shlex.join(sys.argv),
        "rows": rows,
        "speedup_vs_one_session": {r["sessions"]: r["aggregate_tok_s"] / one["aggregate_tok_s"]
                                   for r in rows} if one else {},
    }
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
