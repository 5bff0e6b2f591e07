"""`python -m tnllm`: load a model and check it end to end (what runs before the chat app lands).

Prints the configuration, parameter count and recurrent-state size, then verifies that recurrent
decoding reproduces a full forward pass on a prompt and shows the greedy continuation ids
(and text, when the checkpoint has a tokenizer).
"""

from __future__ import annotations

import argparse
import time

import torch

from tnllm import TNLConfig, TransNormerLLM, load_model, load_tokenizer


def _build(args: argparse.Namespace) -> TransNormerLLM:
    if args.model.startswith("preset:"):
        torch.manual_seed(0)
        return TransNormerLLM(TNLConfig.from_name(args.model.removeprefix("preset:"))).to(args.dtype).eval()
    return load_model(args.model, dtype=args.dtype)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tnllm", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="preset:tiny",
                        help="checkpoint directory, Hub repo id, or preset:NAME for random weights")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--prompt", default="Human:\nHello!\nAssistant:\n")
    parser.add_argument("--new-tokens", type=int, default=16)
    args = parser.parse_args(argv)
    args.dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]

    start = time.perf_counter()
    model = _build(args)
    c = model.config
    print(f"loaded {args.model} in {time.perf_counter() - start:.1f}s: {model.num_parameters():,} parameters, "
          f"d={c.dim} L={c.n_layers} H={c.n_heads} glu={c.glu_dim} vocab={c.vocab_size}")
    tokenizer = None
    if not args.model.startswith("preset:"):
        try:
            tokenizer = load_tokenizer(args.model)
        except (FileNotFoundError, ValueError) as exc:
            print(f"no tokenizer: {exc}")
    ids = tokenizer.encode(args.prompt) if tokenizer else torch.randint(0, c.vocab_size, (12,)).tolist()

    with torch.inference_mode():
        state = model.allocate_state(1)
        logits = model(torch.tensor([ids]), state, logits_to_keep=1)
        out = []
        for _ in range(args.new_tokens):
            out.append(int(logits[0, -1].argmax()))
            logits = model(torch.tensor([[out[-1]]]), state)
        full = model(torch.tensor([ids + out]), logits_to_keep=1)
        err = (full.float() - logits.float()).abs().max().item() / full.float().abs().max().item()
    print(f"recurrent state: {state.nbytes / 2**20:.2f} MiB for any context length")
    print(f"recurrent decode vs full forward, last logits: max rel. diff {err:.2e}")
    print(f"greedy ids: {out}")
    if tokenizer:
        print(f"greedy text: {tokenizer.decode(out)!r}")


if __name__ == "__main__":
    main()
