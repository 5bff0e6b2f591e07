"""Triton draw from the head of each row's distribution: temperature, top-k, top-p, the exponential race, one kernel.

Notation: B rows, N head candidates per row (the row's largest logits, sorted descending).

The PyTorch twin (`reference.draw_from_head_ref`) takes ~120 tiny launches per step (the 32-bit hash alone is two
dozen int64 ops per round), which at decode time cost more than the draw's arithmetic; here one program per row
does all of it on N values in registers. Same arithmetic as the twin: uint32 hash rounds (wrapping products equal
the twin's 16-bit-half products mod 2^32), fp32 log-sum-exp with the max subtracted, an exclusive cumulative sum
for top-p. The launcher allocates only the ids and never syncs: capturable in a CUDA graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["draw_from_head_triton"]


@triton.jit
def _mix32(x):
    """The twin's `mix32` on uint32 values (products wrap mod 2^32)."""
    x = x ^ (x >> 16)
    x = x * tl.full(x.shape, 0x7FEB352D, tl.uint32)
    x = x ^ (x >> 15)
    x = x * tl.full(x.shape, 0x846CA68B, tl.uint32)
    return x ^ (x >> 16)


@triton.jit
def _draw_head_kernel(values, cands, vocab_hash, temp, top_k, top_p, seed, drawn, out, N, s_v, s_c,
                      BLOCK: tl.constexpr):
    b = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    inside = offs < N
    t = tl.load(temp + b).to(tl.float32)
    k = tl.load(top_k + b)
    p = tl.load(top_p + b).to(tl.float32)
    v = tl.load(values + b * s_v + offs, mask=inside, other=float("-inf")).to(tl.float32) / t  # [BLOCK], sorted
    # top-k: keep every candidate tied with the k-th (k > 0 on this path)
    kth = tl.max(tl.where(offs == tl.minimum(tl.maximum(k - 1, 0), N - 1), v, float("-inf")), axis=0)
    outside_k = (k > 0) & (v < kth)
    kept = tl.where(outside_k | ~inside, float("-inf"), v)
    top = tl.max(kept, axis=0)
    log_norm = top + tl.log(tl.sum(tl.exp(kept - top), axis=0))
    probs = tl.exp(kept - log_norm)
    before = tl.cumsum(probs, axis=0) - probs  # probability of the candidates ahead of each one
    outside_p = before >= tl.where(p < 1.0, p, float("inf"))  # top-p 1 is off
    # the exponential race: noise from (seed, drawn, token id)
    s = tl.load(seed + b)
    d = tl.load(drawn + b)
    key = _mix32(_mix32(_mix32((s & 0xFFFFFFFF).to(tl.uint32)) ^ (s >> 32).to(tl.uint32))
                 ^ (d & 0xFFFFFFFF).to(tl.uint32))
    c = tl.load(cands + b * s_c + offs, mask=inside, other=0)
    bits = _mix32(tl.load(vocab_hash + c, mask=inside, other=0).to(tl.uint32) ^ key)
    uniform = ((bits >> 8).to(tl.float32) + 0.5) * 5.9604644775390625e-08  # (0, 1): 24 bits, exact in fp32
    score = tl.where(outside_k | outside_p | ~inside, float("-inf"), v - tl.log(-tl.log(uniform)))
    best = tl.argmax(score, axis=0)
    tl.store(out + b, tl.sum(tl.where(offs == best, c, 0), axis=0))


def draw_from_head_triton(values, candidates, vocab_hash, temperature, top_k, top_p, seed, drawn):
    """`reference.draw_from_head_ref` in one kernel: ids [B] int64 (see there for the arguments)."""
    B, N = values.shape
    if candidates.shape != (B, N) or values.stride(-1) != 1 or candidates.stride(-1) != 1:
        raise ValueError(f"values and candidates must be [B, N] with a contiguous last dim, got "
                         f"{tuple(values.shape)} and {tuple(candidates.shape)}")
    out = torch.empty(B, dtype=torch.long, device=values.device)
    _draw_head_kernel[(B,)](values, candidates, vocab_hash, temperature, top_k, top_p, seed, drawn, out, N,
                            values.stride(0), candidates.stride(0), BLOCK=triton.next_power_of_2(N), num_warps=4)
    return out
