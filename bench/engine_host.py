"""Where the engine thread's time goes per step, alone and with concurrent sessions (docs/engine.md).

    python bench/engine_host.py --device cuda --presets tnl-1b,tnl-7b --out /tmp/engine-host.json   # H200, 1 min
    python bench/engine_host.py --device cpu --presets tiny --out /tmp/engine-host.json              # seconds

Sessions as bench/engine_gpu.py's decode rows run them (threaded engine, prompts of --context random ids,
replies of --tokens tokens read by one consumer thread each, as chat reads them), with the scheduler's parts
timed on the engine thread: `launch` (queue the step's device work), `wait` (the previous step's ids reaching
the host: the GPU's share; near zero means the host is the bottleneck), `accept` (hand the ids out:
detokenising, stop strings, events), per step, in ms. The timers wrap those methods, so the step itself runs
slower than in engine_gpu.py; compare the parts, not the totals.
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from pathlib import Path

import torch

from tnllm.engine import Engine, EngineConfig
from tnllm.engine.scheduler import Launched, Scheduler
from tnllm.tokenizer import Tokenizer

from engine_gpu import BUNDLED_TOKENIZER, ModuloTokenizer, build, decode_row

# The timed methods: a step's parts, and the step itself.
TIMED = {"launch": (Scheduler, "_launch"), "wait": (Launched, "host_ids"), "accept": (Scheduler, "_accept"),
         "step": (Scheduler, "step")}


class PartTimer:
    """Wraps the `TIMED` methods to add up their time while it is installed; `restore` undoes it."""

    def __init__(self):
        self.seconds = dict.fromkeys(TIMED, 0.0)
        self.steps = 0
        self._originals = {name: getattr(owner, attr) for name, (owner, attr) in TIMED.items()}
        for name, (owner, attr) in TIMED.items():
            setattr(owner, attr, self._timed(name, self._originals[name]))

    def _timed(self, name: str, method):
        @functools.wraps(method)
        def run(*args, **kwargs):
            start = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - start
                self.steps += name == "step"
        return run

    def reset(self) -> None:
        self.seconds = dict.fromkeys(self.seconds, 0.0)
        self.steps = 0

    def per_step_ms(self) -> dict[str, float]:
        return {f"{name}_ms_per_step": s / max(self.steps, 1) * 1e3 for name, s in self.seconds.items()}

    def restore(self) -> None:
        for name, (owner, attr) in TIMED.items():
            setattr(owner, attr, self._originals[name])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--presets", default="tnl-1b,tnl-7b")
    parser.add_argument("--sessions", default="1,16", help="comma-separated concurrent session counts")
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    tok = ModuloTokenizer(Tokenizer(BUNDLED_TOKENIZER))
    counts = [int(n) for n in args.sessions.split(",")]
    rows, timer = [], PartTimer()
    try:
        for preset in args.presets.split(","):
            model = build(preset, torch.bfloat16 if cuda else torch.float32, device)
            for n in counts:
                engine = Engine(model, tok, EngineConfig(max_sessions=max(counts), prefill_budget=16384),
                                eos_ids=set())
                try:
                    gap_ms, tok_s, _ = decode_row(engine, [args.context] * n, args.tokens, before_timed=timer.reset)
                finally:
                    engine.shutdown()
                row = {"preset": preset, "sessions": n, "steps": timer.steps, "tok_s": tok_s,
                       "ms_per_token_p50": gap_ms, **timer.per_step_ms()}
                rows.append(row)
                print(json.dumps(row), flush=True)
    finally:
        timer.restore()
    args.out.write_text(json.dumps({"bench": "engine_host", "device": str(device), "torch": torch.__version__,
                                    "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
