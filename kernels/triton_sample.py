"""Triton sampling of a whole batch in a few kernels: penalty, NaN check, head selection, draw, table updates.

Notation: B rows, V tokens, K the head (each row's K largest logits; K = 1 when every row is greedy), NB vocabulary
blocks, W keys sorted by one program (W = max(SORT_WIDTH, 4K) tokens per block, W / K lists per merge).

The PyTorch twin (`reference.sample_rows_ref`) takes about forty launches a step (a cast, the finiteness check,
the penalty, an argmax, a multi-pass top-k, the 32-bit hash as two dozen int64 ops, three table updates), which at
decode time cost more than the arithmetic. Here:

    _block_head_kernel  [B, NB]  one block of a row: penalised fp32 logits, finite flag, the block's K best keys
    _merge_kernel       [B, NB/G] (while more than G = W / K lists are left) G lists of K keys -> their K best
    _pick_kernel        [B]      the last <= G lists -> the row's K best keys; greedy id or the exponential race;
                                 last token, drawn count and penalty set of the row's slot updated

Greedy batches (K = 1) take blocks of BLOCK_V tokens and no sort: a max per block, a max over the blocks. Small
sorts in many programs beat one large sort: a bitonic sort of n keys takes log2(n)(log2(n) + 1)/2 passes.

A key is one int64 that sorts like (logit, -token id): the logit's order-preserving 32-bit integer in the high
word, (2^32 - 1 - id) in the low one, so one sort of keys orders values and breaks ties towards the lower id as
argmax does. Same arithmetic as the twin: fp32 logits, the penalty as one divide or multiply, uint32 hash rounds
(wrapping products equal the twin's 16-bit-half products mod 2^32), fp32 log-sum-exp with the max subtracted, an
exclusive cumulative sum for top-p. The launcher allocates only its outputs and scratch and never syncs:
capturable in a CUDA graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tnllm.kernels.reference import NOT_FINITE, SlotTables

__all__ = ["sample_rows_triton"]

BLOCK_V = 2048  # vocabulary tokens per block program of a greedy batch (a max, no sort)
# Measured on an H200 (bench/results/sampler-h200.json): chat's head of 64 at W = 256 takes 17 us a step at batch
# 1 (one 2048-key sort per row took 90), and sorts of 1024 keys run faster on 8 warps than on 4.
SORT_WIDTH = 256  # keys one program sorts, at least (see W above)
NUM_WARPS: int | None = None  # None: 8 for sorts of 1024 keys or more, else 4
MAX_HEAD = 1024
_NOT_FINITE = tl.constexpr(NOT_FINITE)


@triton.jit
def _mix32(x):
    """The twin's `mix32` on uint32 values (products wrap mod 2^32)."""
    x = x ^ (x >> 16)
    x = x * tl.full(x.shape, 0x7FEB352D, tl.uint32)
    x = x ^ (x >> 15)
    x = x * tl.full(x.shape, 0x846CA68B, tl.uint32)
    return x ^ (x >> 16)


@triton.jit
def _key(x, token):
    """int64 keys ordered like (x, -token) for fp32 x without NaN and int64 token ids in [0, 2^32)."""
    bits = x.to(tl.int32, bitcast=True)
    ordered = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)  # signed order = float order
    return (ordered.to(tl.int64) << 32) | (0xFFFFFFFF - token)


@triton.jit
def _key_value(key):
    """The fp32 logit of a key (inverse of `_key`'s high word)."""
    ordered = (key >> 32).to(tl.int32)
    return tl.where(ordered >= 0, ordered, ordered ^ 0x7FFFFFFF).to(tl.float32, bitcast=True)


@triton.jit
def _block_head_kernel(logits, slots, seen, penalty, keys, finite, V, NB, s_l, s_seen,
                       PENALTY: tl.constexpr, K: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    blk = tl.program_id(1)
    token = blk * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    inside = token < V
    x = tl.load(logits + b * s_l + token, mask=inside, other=float("-inf")).to(tl.float32)
    bad = (x != x) | (tl.abs(x) == float("inf"))
    tl.store(finite + b * NB + blk, tl.max((bad & inside).to(tl.int32), axis=0) == 0)
    if PENALTY:
        slot = tl.load(slots + b)
        p = tl.load(penalty + slot)
        was_seen = tl.load(seen + slot * s_seen + token, mask=inside, other=0) != 0
        x = tl.where(was_seen, tl.where(x > 0, x / p, x * p), x)
    key = _key(tl.where(x != x, float("-inf"), x), token)  # NaN: the row is reported, its keys only must sort
    if K == 1:
        tl.store(keys + (b * NB + blk), tl.max(key, axis=0))
    else:
        ranked = tl.sort(key, descending=True)
        best = tl.max(tl.reshape(ranked, (BLOCK // K, K)), axis=0)  # row 0 of the sorted rows: the K largest
        tl.store(keys + (b * NB + blk) * K + tl.arange(0, K), best)


@triton.jit
def _merge_kernel(keys_in, keys_out, NB_IN, NB_OUT, G: tl.constexpr, K: tl.constexpr):
    b = tl.program_id(0)
    group = tl.program_id(1)
    i = tl.arange(0, G * K)
    lists = group * G + i // K
    merged = tl.load(keys_in + (b * NB_IN + group * G) * K + i, mask=lists < NB_IN, other=-(2**63))
    ranked = tl.sort(merged, descending=True)
    tl.store(keys_out + (b * NB_OUT + group) * K + tl.arange(0, K), tl.max(tl.reshape(ranked, (G, K)), axis=0))


@triton.jit
def _race(v, cand, valid, t, k, p, s, d, vocab_hash, K: tl.constexpr):
    """The exponential race over a row's head: v [K] fp32 logits sorted descending, cand [K] their ids (valid
    marks real ones); temperature t, top-k k (> 0), top-p p, seed s, drawn count d -> the drawn id."""
    offs = tl.arange(0, K)
    v = tl.where(valid, v / t, float("-inf"))
    # top-k: keep every candidate tied with the k-th
    kth = tl.max(tl.where(offs == tl.minimum(tl.maximum(k - 1, 0), K - 1), v, float("-inf")), axis=0)
    outside_k = (k > 0) & (v < kth)
    kept = tl.where(outside_k | ~valid, float("-inf"), v)
    top = tl.max(kept, axis=0)
    log_norm = top + tl.log(tl.sum(tl.exp(kept - top), axis=0))
    probs = tl.exp(kept - log_norm)
    before = tl.cumsum(probs, axis=0) - probs  # probability of the candidates ahead of each one
    outside_p = before >= tl.where(p < 1.0, p, float("inf"))  # top-p 1 is off
    key = _mix32(_mix32(_mix32((s & 0xFFFFFFFF).to(tl.uint32)) ^ (s >> 32).to(tl.uint32))
                 ^ (d & 0xFFFFFFFF).to(tl.uint32))
    bits = _mix32(tl.load(vocab_hash + cand, mask=valid, other=0).to(tl.uint32) ^ key)
    uniform = ((bits >> 8).to(tl.float32) + 0.5) * 5.9604644775390625e-08  # (0, 1): 24 bits, exact in fp32
    score = tl.where(outside_k | outside_p | ~valid, float("-inf"), v - tl.log(-tl.log(uniform)))
    best = tl.argmax(score, axis=0)
    return tl.sum(tl.where(offs == best, cand, 0), axis=0)


@triton.jit
def _pick_kernel(keys, finite, slots, temperature, top_k, top_p, seed, drawn, last_token, seen, vocab_hash, out,
                 V, NB, NF, s_seen, DRAW: tl.constexpr, K: tl.constexpr, NB_POW2: tl.constexpr,
                 NF_POW2: tl.constexpr):
    b = tl.program_id(0)
    flags = tl.arange(0, NF_POW2)
    ok = tl.min(tl.load(finite + b * NF + flags, mask=flags < NF, other=1).to(tl.int32), axis=0) != 0
    slot = tl.load(slots + b)
    if K == 1:
        blocks = tl.arange(0, NB_POW2)
        best = tl.max(tl.load(keys + b * NB + blocks, mask=blocks < NB, other=-(2**63)), axis=0)
        ids = 0xFFFFFFFF - (best & 0xFFFFFFFF)
    else:
        i = tl.arange(0, NB_POW2 * K)
        merged = tl.load(keys + b * NB * K + i, mask=i < NB * K, other=-(2**63))
        ranked = tl.sort(merged, descending=True)
        head = tl.max(tl.reshape(ranked, (NB_POW2, K)), axis=0)  # the row's K largest keys, descending
        cand = 0xFFFFFFFF - (head & 0xFFFFFFFF)
        valid = cand < V  # a row of fewer than K tokens pads with keys past the vocabulary
        first = tl.arange(0, K) == 0
        ids = tl.sum(tl.where(first, cand, 0), axis=0)  # greedy: the largest
        if DRAW:
            t = tl.load(temperature + slot)
            drawn_id = _race(_key_value(head), tl.where(valid, cand, 0), valid, tl.where(t > 0, t, 1.0),
                             tl.load(top_k + slot), tl.load(top_p + slot), tl.load(seed + slot),
                             tl.load(drawn + slot), vocab_hash, K)
            ids = tl.where(t > 0, drawn_id, ids)
    ids = tl.where(ok, ids, 0)
    tl.store(last_token + slot, ids)
    tl.store(drawn + slot, tl.load(drawn + slot) + 1)
    tl.store(seen + slot * s_seen + ids, 1)
    tl.store(out + b, tl.where(ok, ids, _NOT_FINITE))


def sample_rows_triton(logits: torch.Tensor, slots: torch.Tensor, tables: SlotTables, *, penalty: bool, draw: bool,
                       head: int) -> torch.Tensor:
    """`reference.sample_rows_ref` in a few kernels: ids [B] int64 (see there for the arguments)."""
    B, V = logits.shape
    K = 1 if not draw else triton.next_power_of_2(head)
    if logits.stride(-1) != 1 or tables.seen.stride(-1) != 1 or tables.seen.shape[1] != V:
        raise ValueError(f"logits [B, V] and the penalty set [S, V] need a contiguous last dim and one V, got "
                         f"{tuple(logits.shape)} and {tuple(tables.seen.shape)}")
    if K > MAX_HEAD or V >= 2**32:
        raise ValueError(f"head must be at most {MAX_HEAD} and the vocabulary below 2^32 tokens, got {head} and {V}")
    width = max(SORT_WIDTH, 4 * K)
    warps = NUM_WARPS or (8 if width >= 1024 else 4)
    block = min(BLOCK_V if K == 1 else width, max(triton.next_power_of_2(V), K))
    nb = nf = triton.cdiv(V, block)
    keys = torch.empty(B, nb, K, dtype=torch.int64, device=logits.device)  # [B, NB, K]
    finite = torch.empty(B, nf, dtype=torch.uint8, device=logits.device)  # [B, NB]: 1 = all finite
    out = torch.empty(B, dtype=torch.long, device=logits.device)
    seen = tables.seen.view(torch.uint8)  # bool storage, read and written as bytes
    _block_head_kernel[(B, nb)](logits, slots, seen, tables.penalty, keys, finite, V, nb, logits.stride(0),
                                seen.stride(0), PENALTY=penalty, K=K, BLOCK=block, num_warps=warps)
    group = width // K
    while K > 1 and nb > group:
        merged = torch.empty(B, triton.cdiv(nb, group), K, dtype=torch.int64, device=logits.device)
        _merge_kernel[(B, merged.shape[1])](keys, merged, nb, merged.shape[1], G=group, K=K, num_warps=warps)
        keys, nb = merged, merged.shape[1]
    _pick_kernel[(B,)](keys, finite, slots, tables.temperature, tables.top_k, tables.top_p, tables.seed, tables.drawn,
                       tables.last_token, seen, tables.vocab_hash, out, V, nb, nf, seen.stride(0), DRAW=draw, K=K,
                       NB_POW2=triton.next_power_of_2(nb), NF_POW2=triton.next_power_of_2(nf), num_warps=warps)
    return out
