"""Chat with a checkpoint split over N GPUs (rank 0 reads stdin and prints; the others follow).

    torchrun --standalone --nproc-per-node 2 -m tnllm.tp --model DIR_OR_REPO_ID [--dtype bf16]
    torchrun --standalone --nproc-per-node 2 -m tnllm.tp --model DIR --prompt "Hello!" --temperature 0

Replies run on the engine (`tnllm.engine`), eagerly: its CUDA graphs are captured on one process and cannot
hold the other ranks' collectives. NCCL_NVLS_ENABLE=0 is kept (docs/tensor-parallel.md).
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # before torch / NCCL read the environment

from tnllm.sampling import SamplingParams  # noqa: E402
from tnllm.tp.serve import DrivenModel, serve, shutdown  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="checkpoint directory or Hub repo id")
    parser.add_argument("--tokenizer", default=None, help="tokenizer dir/repo (default: --model)")
    parser.add_argument("--dtype", default=None, help="fp32 / bf16 / fp16 (default bf16 on CUDA, fp32 on CPU)")
    parser.add_argument("--replicated-vocab", action="store_true", help="replicate embedding/lm_head")
    parser.add_argument("--prompt", default=None, help="answer one message and exit (else read stdin)")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--seed", type=int, default=None)
    return parser.parse_args(argv)


def chat(model: DrivenModel, args: argparse.Namespace) -> None:
    """Rank 0: a terminal chat over the TP model through the engine."""
    from tnllm.engine import Engine, EngineConfig
    from tnllm.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(args.tokenizer or args.model)
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
                            seed=args.seed)
    session = Engine(model, tokenizer, EngineConfig(max_sessions=1, threaded=False)).open()
    messages = [args.prompt] if args.prompt is not None else (line.rstrip("\n") for line in sys.stdin)
    for message in messages:
        reply = session.send(message, params)
        for event in reply:
            print(event.text, end="", flush=True)
        stats = reply.stats
        print(f"\n[{stats.new_tokens} tokens, {stats.tokens_per_s:.1f} tok/s, TP={model.tp.size}, "
              f"state {stats.state_bytes / 1e6:.2f} MB per GPU]", flush=True)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        serve(args.model, lambda model: chat(model, args), dtype=args.dtype, vocab_parallel=not args.replicated_vocab)
    finally:
        shutdown()


if __name__ == "__main__":
    main()
