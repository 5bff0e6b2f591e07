"""`python -m tnllm`: load a model and check that recurrent decoding reproduces a full forward pass.

Prints the configuration, parameter count and recurrent-state size, greedy-decodes a reply to a chat prompt through
a threadless `tnllm.engine` session (the path chat uses: prefill into a state slot, decode steps, the engine's
sampler and detokeniser; until eos or --new-tokens) and prints it, then compares the logits of one more recurrent
step on the session's state with one full forward pass over prompt + reply: PASS when their max relative difference
is within the tolerance of the dtype, else FAIL and exit code 1.

Examples:
    python -m tnllm --model assets/tnl                # the bundled model and tokenizer
    python -m tnllm --model preset:tiny --dtype bf16  # random weights over assets/tokenizer.model
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from tnllm import TNLConfig, TransNormerLLM, load_model
from tnllm.engine import Engine, EngineConfig, Reply
from tnllm.sampling import SamplingParams
from tnllm.tokenizer import BUNDLED_TOKENIZER, Tokenizer, tokenizer_for

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# max |recurrent - full| / max |full| over the last logits. Both paths compute the same function and differ only
# in summation order (token-by-token state updates vs chunked parallel attention), i.e. by rounding: a few units of
# the dtype's precision, grown through the layers. A decoding bug (wrong decay, a stale state, an off-by-one
# position) gives differences of order 0.1-1 instead. fp32 (eps 1.2e-7): 1e-4 is ~1000 eps, far above rounding
# (<1e-6 measured on assets/tnl, 200-token replies) and far below a bug. bf16 (eps 7.8e-3) and fp16 (eps 9.8e-4)
# round every activation: 2e-2 is ~2.5 bf16 eps (up to 6e-3 measured), the bound tests/test_cuda.py uses for
# bf16 logits too. NaN/inf (fp16 overflow) never passes.
TOLERANCE = {"fp32": 1e-4, "bf16": 2e-2, "fp16": 2e-2}
EXIT_FAIL = 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    description, _, epilog = __doc__.partition("\n\n")
    parser = argparse.ArgumentParser(prog="python -m tnllm", description=description, epilog=epilog,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="preset:tiny",
                        help="checkpoint directory, Hub repo id, or preset:NAME for random weights")
    parser.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    parser.add_argument("--prompt", default="Hello!", help="the human turn of the chat prompt")
    parser.add_argument("--new-tokens", type=int, default=16, help="at most this many reply tokens")
    parser.add_argument("--tolerance", type=float, default=None,
                        help="max relative difference that passes (default: "
                             + ", ".join(f"{tol:g} {dtype}" for dtype, tol in TOLERANCE.items()) + ")")
    args = parser.parse_args(argv)
    if args.tolerance is None:
        args.tolerance = TOLERANCE[args.dtype]
    return args


def build(source: str, dtype: torch.dtype) -> tuple[TransNormerLLM, Tokenizer]:
    """(model, tokenizer) for a checkpoint (tokenizer found as the app finds it) or `preset:NAME`: random weights
    (seed 0) sized to the bundled tokenizer, as the app's demo weights."""
    if not source.startswith("preset:"):
        return load_model(source, dtype=dtype), tokenizer_for(source)
    tokenizer = Tokenizer(BUNDLED_TOKENIZER)
    config = TNLConfig.from_name(source.removeprefix("preset:"), vocab_size=tokenizer.vocab_size,
                                 eos_token_id=tokenizer.eos_id, bos_token_id=tokenizer.bos_id)
    torch.manual_seed(0)
    return TransNormerLLM(config).to(dtype).eval(), tokenizer


@torch.inference_mode()
def greedy_check(model: TransNormerLLM, tokenizer: Tokenizer, prompt: list[int],
                 new_tokens: int) -> tuple[Reply, float, int]:
    """(the engine's greedy reply, max relative difference of the last logits between recurrent decoding and one
    full forward pass, state bytes).

    The session's state has read prompt + every sampled id but the last (a synchronous engine feeds a sampled id
    with the next step, which a finished reply does not get); one recurrent step on a copy of it with that id
    gives the logits after prompt + reply, and so does the full forward pass. NaN/inf logits end the reply with
    "numerical_error" (the engine resets the state): the difference is then NaN.
    """
    engine = Engine(model, tokenizer, EngineConfig(max_sessions=1, overlap=False, threaded=False))
    session = engine.open()
    reply = session.feed_ids(prompt, SamplingParams(temperature=0, max_new_tokens=new_tokens)).wait()
    if reply.finish_reason == "numerical_error":
        return reply, float("nan"), engine.pool.slot_bytes
    device = engine.pool.device
    recurrent = model(torch.tensor([reply.sampled[-1:]], device=device), engine.pool.read(session.slot))
    full = model(torch.tensor([prompt + reply.sampled], device=device), logits_to_keep=1).float()
    err = (full - recurrent.float()).abs().max().item() / full.abs().max().item()
    return reply, err, engine.pool.slot_bytes


def reply_ids(reply: Reply) -> list[int]:
    """The reply's ids without the eos that ended it."""
    return reply.sampled[:-1] if reply.finish_reason == "eos" else reply.sampled


def main(argv: list[str] | None = None) -> None:
    """Run the check; exits with EXIT_FAIL when the recurrent path disagrees with the full forward pass."""
    args = parse_args(argv)
    start = time.perf_counter()
    model, tokenizer = build(args.model, DTYPES[args.dtype])
    c = model.config
    print(f"loaded {args.model} in {time.perf_counter() - start:.1f}s: {model.num_parameters():,} parameters, "
          f"d={c.dim} L={c.n_layers} H={c.n_heads} glu={c.glu_dim} vocab={c.vocab_size}")
    print(f"tokenizer: {tokenizer.path} ({tokenizer.vocab_size} pieces, eos {c.eos_token_id})")

    prompt = tokenizer.chat_ids([("human", args.prompt)])
    reply, err, state_bytes = greedy_check(model, tokenizer, prompt, args.new_tokens)
    ids = reply_ids(reply)
    stop = f"--new-tokens {args.new_tokens}" if reply.finish_reason == "length" else reply.finish_reason
    print(f"recurrent state: {state_bytes / 2**20:.2f} MiB for any context length")
    print(f"greedy reply ({len(ids)} tokens, stopped at {stop}): {reply.text!r}")
    print(f"greedy ids: {ids}")
    passed = err <= args.tolerance  # False for NaN too: NaN logits must never pass
    print(f"recurrent decode vs full forward, last logits: max rel. diff {err:.2e} "
          f"(tolerance {args.tolerance:g} for {args.dtype}): {'PASS' if passed else 'FAIL'}")
    if not passed:
        sys.exit(EXIT_FAIL)


if __name__ == "__main__":
    main()
