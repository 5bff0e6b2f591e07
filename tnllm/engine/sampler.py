"""Batched on-device sampling: per-slot settings in device tables, exact draws with no host sync.

A draw is argmax(probs / E) with E ~ Exponential(1) per token, an exact sample of `probs` (the
exponential-race form of Gumbel-max) that needs no `torch.multinomial` (which syncs). The noise comes from
a counter-based hash of (the reply's seed, how many tokens it has drawn, token id), so a seeded reply gets
the same tokens whichever sessions share its batch, and the whole sampler can be captured in a CUDA graph.
Greedy rows (temperature 0) take the argmax. Temperature, top-k, top-p and the repetition penalty are the
ones of `tnllm.sampling` (one implementation: `penalise_seen`, `filter_logits`).
"""

from __future__ import annotations

import torch

from tnllm.sampling import SamplingParams, filter_logits, penalise_seen

MASK32 = 0xFFFFFFFF
NOT_FINITE = -1  # the id reported for a row whose logits hold NaN/inf


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 for int64 x in [0, 2^32), without int64 overflow (16-bit halves)."""
    low = (x & 0xFFFF) * c
    high = (((x >> 16) * c) & 0xFFFF) << 16
    return (low + high) & MASK32


def mix32(x: torch.Tensor) -> torch.Tensor:
    """A bijective 32-bit integer hash (xorshift-multiply rounds) on int64 tensors holding 32-bit values."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


class BatchSampler:
    """Per-slot sampling tables (slot 0 = padding sink) and `sample(logits, slots)` for a whole batch."""

    def __init__(self, n_slots: int, vocab_size: int, device: torch.device | str):
        self.device = torch.device(device)
        zeros = lambda dtype: torch.zeros(n_slots, dtype=dtype, device=device)  # noqa: E731
        self.temperature, self.top_p, self.penalty = zeros(torch.float32), zeros(torch.float32), zeros(torch.float32)
        self.top_k, self.seed, self.drawn, self.last_token = (zeros(torch.long) for _ in range(4))
        self.seen = torch.zeros(n_slots, vocab_size, dtype=torch.bool, device=device)  # ids under the penalty
        self.vocab_hash = mix32(torch.arange(vocab_size, device=device))  # [V], fixed part of the noise
        self.greedy = [True] * n_slots  # host mirror: lets an all-greedy eager step skip the filters

    def configure(self, slot: int, params: SamplingParams, seed: int, prompt_ids: list[int]) -> None:
        """Set a slot's settings for a new reply; `prompt_ids` start its repetition-penalty set."""
        self.temperature[slot] = params.temperature
        self.top_k[slot] = params.top_k
        self.top_p[slot] = params.top_p
        self.penalty[slot] = params.repetition_penalty
        self.seed[slot] = seed & ((1 << 62) - 1)
        self.drawn[slot] = 0
        self.seen[slot] = False
        self.seen[slot, torch.tensor(prompt_ids, dtype=torch.long, device=self.device)] = True
        self.greedy[slot] = params.temperature == 0

    def exponential_noise(self, slots: torch.Tensor) -> torch.Tensor:
        """Exp(1) noise [B, V] determined by each slot's (seed, drawn count) and the token id."""
        seed, drawn = self.seed[slots], self.drawn[slots]  # [B]
        row_key = mix32(mix32(mix32(seed & MASK32) ^ (seed >> 32)) ^ (drawn & MASK32))  # [B]
        bits = mix32(self.vocab_hash[None, :] ^ row_key[:, None])  # [B, V], uniform 32-bit
        uniform = ((bits >> 8).float() + 0.5) * 2.0**-24  # (0, 1), 24 bits: exact in fp32
        return -torch.log(uniform)

    def sample(self, logits: torch.Tensor, slots: torch.Tensor, greedy_only: bool = False) -> torch.Tensor:
        """One id per row of logits [B, V] (int64 [B], on the device; NOT_FINITE where a row has NaN/inf).

        `slots` int64 [B] names each row's settings; each slot's drawn count, last token and penalty set are
        updated in place. `greedy_only` (every row greedy, known on the host) skips the filters.
        """
        logits = logits.float()
        finite = torch.isfinite(logits).all(dim=-1)  # [B]
        logits = penalise_seen(logits, self.seen[slots], self.penalty[slots])
        ids = logits.argmax(dim=-1)
        if not greedy_only:
            temperature = self.temperature[slots]
            sampling = temperature > 0
            filtered = filter_logits(logits, torch.where(sampling, temperature, 1.0), self.top_k[slots],
                                     self.top_p[slots])
            drawn = (torch.softmax(filtered, dim=-1) / self.exponential_noise(slots)).argmax(dim=-1)
            ids = torch.where(sampling, drawn, ids)
        ids = torch.where(finite, ids, 0)  # a valid id for the table updates; reported as NOT_FINITE below
        self.last_token.index_copy_(0, slots, ids)
        self.drawn.index_add_(0, slots, torch.ones_like(ids))
        self.seen.index_put_((slots, ids), torch.ones_like(ids, dtype=torch.bool))
        return torch.where(finite, ids, NOT_FINITE)

    def all_greedy(self, slots: list[int]) -> bool:
        return all(self.greedy[s] for s in slots)
