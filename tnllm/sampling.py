"""Sampling settings and the filters the engine's batched sampler applies (temperature, top-k, top-p, penalty)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

MAX_NEW_TOKENS_LIMIT = 8192


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. temperature 0 = greedy; top_k 0 and top_p 1.0 = off; seed None = random.

    The repetition penalty (CTRL / HF style: positive logits divided, negative multiplied) applies to the
    ids of the current prompt and the reply so far.
    """

    temperature: float = 0.7
    top_k: int = 0
    top_p: float = 0.9
    repetition_penalty: float = 1.0
    max_new_tokens: int = 256
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""
        def number(name):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
            return value

        if number("temperature") < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < number("top_p") <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if number("repetition_penalty") <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        for name, low, high in (("top_k", 0, None), ("max_new_tokens", 1, MAX_NEW_TOKENS_LIMIT)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low or (high and value > high):
                bound = f"in [{low}, {high}]" if high else f">= {low}"
                raise ValueError(f"{name} must be an integer {bound}, got {value!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ValueError(f"seed must be an integer or None, got {self.seed!r}")
        if not isinstance(self.stop, tuple) or not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"stop must be a tuple of non-empty strings, got {self.stop!r}")


def penalise_seen(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """Repetition penalty for a batch: logits [B, V] fp32, seen [B, V] bool, penalty [B] (1 = off).

    Seen tokens' positive logits are divided by the row's penalty, negative ones multiplied (CTRL / HF).
    """
    penalty = penalty[:, None]  # [B, 1]
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def drop_outside_nucleus(sorted_logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                         row_logsumexp: torch.Tensor) -> torch.Tensor:
    """Which candidates top-k / top-p remove: bool [B, N] over candidates sorted by descending logit.

    The candidates are a whole row (N = V) or, when the caller knows the kept tokens lie within it, the head
    of one; `row_logsumexp` [B, 1] normalises probabilities over the whole row (used when top-k is off).
    Top-k keeps every token tied with the k-th; top-p, applied after top-k, keeps the smallest head whose
    probability reaches p (the token crossing p included). No host sync: usable inside a CUDA graph.
    """
    k = top_k[:, None]  # [B, 1]
    kth = sorted_logits.gather(1, (k - 1).clamp(0, sorted_logits.shape[1] - 1))  # [B, 1]
    outside_k = (k > 0) & (sorted_logits < kth)
    kept = sorted_logits.masked_fill(outside_k, float("-inf"))
    log_norm = torch.where(k > 0, torch.logsumexp(kept, dim=-1, keepdim=True), row_logsumexp)
    probs = torch.exp(kept - log_norm)
    outside_p = (top_p[:, None] < 1.0) & (probs.cumsum(-1) - probs >= top_p[:, None])
    return outside_k | outside_p


def filter_logits(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                  top_p: torch.Tensor) -> torch.Tensor:
    """Tempered logits [B, V] with the tokens outside each row's top-k and top-p set to -inf.

    logits [B, V] fp32; per row: temperature [B] (> 0), top_k [B] int64 (0 = off), top_p [B] (1 = off).
    """
    logits = logits / temperature[:, None]
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # [B, V]
    drop = drop_outside_nucleus(sorted_logits, top_k, top_p, torch.logsumexp(logits, dim=-1, keepdim=True))
    return logits.masked_fill(torch.zeros_like(drop).scatter(1, order, drop), float("-inf"))  # vocab order
