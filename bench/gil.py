"""The engine thread's per-token time while another thread of the process runs Python, per GIL switch interval.

    python bench/gil.py --device cpu --out bench/results/gil-cpu.json        # about a minute
    python bench/gil.py --device cuda --preset tnl-1b --out /tmp/gil.json

A web server streaming replies runs Python on its own threads (Gradio: each update's diff, JSON and SSE) while
the engine thread steps. Every step of the engine thread takes and gives back the GIL many times (each PyTorch
op releases it), and CPython hands the GIL to a waiting thread only after the holder has run for the switch
interval (`sys.setswitchinterval`, 5 ms by default), so the engine can wait that long at each of those points.
One session decodes --tokens tokens (greedy, from a 3-id prompt) with: no other thread; a thread running Python
in bursts (--burst-ms busy, then sleeping for as long: half of one core, about what many streaming users cost);
a thread running Python all the time. Each at the intervals of --intervals-ms. JSON rows: interval_ms, load,
ms_per_token_p50, ms_per_token_p90.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

from tnllm.engine import Engine, EngineConfig
from tnllm.sampling import SamplingParams
from tnllm.tokenizer import BUNDLED_TOKENIZER, Tokenizer

from engine_gpu import ModuloTokenizer, build_weights
from serve import token_gaps_ms

LOADS = ("none", "bursts", "busy")


def python_load(stop: threading.Event, burst_s: float | None) -> None:
    """Pure-Python work (holds the GIL) until `stop`: all the time, or `burst_s` busy then as long asleep."""
    x = 0
    while not stop.is_set():
        end = time.perf_counter() + (burst_s or 0.01)
        while time.perf_counter() < end:
            for i in range(200):
                x += i * i
        if burst_s:
            time.sleep(burst_s)


def reply_gaps_ms(engine: Engine, tokens: int) -> list[float]:
    """ms between consecutive tokens of one greedy reply as its reader receives them, from the second token on
    (the first one's wait is the prefill)."""
    session = engine.open()
    try:
        stamps = [time.perf_counter() for _ in session.feed_ids([5, 6, 7], SamplingParams(temperature=0,
                                                                                          max_new_tokens=tokens))]
    finally:
        session.close()
    return token_gaps_ms(stamps[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--intervals-ms", default="5,0.5")
    parser.add_argument("--burst-ms", type=float, default=1.0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(1)
    engine = Engine(build_weights(args.preset, "none", device), ModuloTokenizer(Tokenizer(BUNDLED_TOKENIZER)),
                    EngineConfig(max_sessions=2), eos_ids=set())
    result = {"bench": "gil", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
              "torch": torch.__version__, "python": platform.python_version(), "preset": args.preset,
              "tokens": args.tokens, "burst_ms": args.burst_ms, "command": "python " + " ".join(sys.argv), "rows": []}
    reply_gaps_ms(engine, 8)  # warm-up (graph captures on CUDA)
    default = sys.getswitchinterval()
    try:
        for interval in (float(ms) / 1e3 for ms in args.intervals_ms.split(",")):
            sys.setswitchinterval(interval)
            for load in LOADS:
                stop = threading.Event()
                worker = threading.Thread(target=python_load, daemon=True,
                                          args=(stop, args.burst_ms / 1e3 if load == "bursts" else None))
                if load != "none":
                    worker.start()
                try:
                    gaps = reply_gaps_ms(engine, args.tokens)
                finally:
                    stop.set()
                row = {"interval_ms": interval * 1e3, "load": load, "ms_per_token_p50": statistics.median(gaps),
                       "ms_per_token_p90": statistics.quantiles(gaps, n=10)[-1]}
                result["rows"].append(row)
                print(json.dumps(row), flush=True)
                args.out.write_text(json.dumps(result, indent=1))
    finally:
        sys.setswitchinterval(default)
        engine.shutdown()


if __name__ == "__main__":
    main()
