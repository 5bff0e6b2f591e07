"""A/B on one machine: the engine's 16-session decode with the detokenizer's plain-piece shortcut and without.

    python bench/streamer_ab.py --out bench/results/streamer-ab-h200.json                  # H200, about 30 s
    python bench/streamer_ab.py --device cpu --preset tiny --context 16 --tokens 8 --rounds 1 --out /tmp/ab.json

The host's share of a 1B step with 16 sessions varies from machine to machine, so the two detokenizers are
compared in one process, round after round: two engines on one random-weight model, one whose tokenizer has
`piece_text` (`tnllm.streaming.TextStreamer` then skips the window's two decodes for plain pieces, as in chat) and
one with only `decode` (every id decoded in its window). Each round times, per engine, one session and then
--sessions sessions exactly as bench/engine_gpu.py's decode rows do (`decode_row`): ms per token (median gap
between two tokens of a session), the ratio to the one session, and aggregate tok/s over one session's.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import torch

from tnllm.engine import Engine, EngineConfig
from tnllm.tokenizer import BUNDLED_TOKENIZER, Tokenizer

from engine_gpu import ModuloTokenizer, build, decode_row


class WindowOnly:
    """A tokenizer with `decode` alone: the streamer decodes every id's window."""

    def __init__(self, base: ModuloTokenizer):
        self.decode = base.decode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--preset", default="tnl-1b")
    parser.add_argument("--sessions", type=int, default=16)
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    base = ModuloTokenizer(Tokenizer(BUNDLED_TOKENIZER))
    model = build(args.preset, torch.bfloat16 if cuda else torch.float32, device)
    config = EngineConfig(max_sessions=args.sessions, prefill_budget=16384)
    engines = {"shortcut": Engine(model, base, config, eos_ids=set()),
               "window": Engine(model, WindowOnly(base), config, eos_ids=set())}
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    result = {"bench": "streamer-ab", "date": now,
              "device": torch.cuda.get_device_name(device) if cuda else "cpu", "torch": torch.__version__,
              "command": "python " + " ".join(sys.argv), "preset": args.preset, "context": args.context,
              "tokens": args.tokens, "rows": []}
    try:
        for round_ in range(args.rounds):
            for name, engine in engines.items():
                solo = decode_row(engine, [args.context], args.tokens)
                many = decode_row(engine, [args.context] * args.sessions, args.tokens)
                row = {"round": round_, "streamer": name, "sessions": args.sessions, "solo_ms": solo.ms,
                       "sessions_ms": many.ms, "ratio": many.ms / solo.ms, "aggregate_x": many.tok_s / solo.tok_s}
                result["rows"].append(row)
                args.out.write_text(json.dumps(result, indent=1))
                print(json.dumps(row), flush=True)
    finally:
        for engine in engines.values():
            engine.shutdown()


if __name__ == "__main__":
    main()
