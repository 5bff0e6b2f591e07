"""Tensor-parallel pieces that replace plain modules inside the TP model (Megatron schema, paper §3.4).

Column-parallel layers need no new module: a plain `nn.Linear` holding the rank's rows
(`qkvu_proj` by heads, `l1` / `l2` by hidden units). What does need one:

* `RowParallelLinear` (`out_proj`, `l3`): the rank's input columns, partial products summed by one
  all-reduce; the bias (replicated) is added once, after the sum.
* `ShardedSRMSNorm`: the token mixer's SRMSNorm normalises all hd channels of a row, but each rank
  holds hd / N of them: one small all-reduce of the per-row sum of squares [B, T, 1] gives the exact
  global mean, mean = (sum_r sum_j x_rj^2) / hd (fp32; only the summation order differs).
* `ShardedEmbedding` / `ShardedLMHead`: vocab-parallel (rows [r V/N, (r+1) V/N) of the shared,
  tied matrix): lookup masks foreign ids and sums over ranks; logits are all-gathered to [.., V].
  With `parallel=False` they hold the full matrix (replicated) and do no communication.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tnllm.tp.comm import TPGroup


class RowParallelLinear(nn.Linear):
    """y = all_reduce(x_r @ W_r^T) + b. Weight [out, in / N] (the rank's input columns), bias [out]."""

    def __init__(self, in_local: int, out_features: int, bias: bool, tp: TPGroup):
        super().__init__(in_local, out_features, bias=bias)
        self.tp = tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.tp.all_reduce(F.linear(x, self.weight))  # [..., out], summed over ranks
        return y if self.bias is None else y + self.bias


class ShardedSRMSNorm(nn.Module):
    """SRMSNorm over a width split across ranks: x_r * rsqrt(sum_ranks(sum x_r^2) / full_width + eps)."""

    def __init__(self, full_width: int, eps: float, tp: TPGroup):
        super().__init__()
        self.full_width = full_width
        self.eps = eps
        self.tp = tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, T, width / N] -> same shape; fp32 inside (fp64 stays fp64), like kernels.srmsnorm."""
        xf = x.double() if x.dtype == torch.float64 else x.float()
        sum_sq = self.tp.all_reduce(xf.pow(2).sum(-1, keepdim=True))  # [B, T, 1], global
        return (xf * torch.rsqrt(sum_sq / self.full_width + self.eps)).to(x.dtype)


class ShardedEmbedding(nn.Module):
    """Token embedding, rows [vocab_start, vocab_start + weight.shape[0]) of the full table."""

    def __init__(self, n_rows: int, dim: int, vocab_start: int, parallel: bool, tp: TPGroup):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_rows, dim))  # [V / N or V, d]
        self.vocab_start = vocab_start
        self.parallel = parallel and tp.size > 1
        self.tp = tp

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, T] (global ids) -> [B, T, d]."""
        if not self.parallel:
            return F.embedding(ids, self.weight)
        local = ids - self.vocab_start
        foreign = (local < 0) | (local >= self.weight.shape[0])
        x = F.embedding(local.clamp(0, self.weight.shape[0] - 1), self.weight)
        return self.tp.all_reduce(x.masked_fill(foreign[..., None], 0))  # exactly one rank adds non-zeros


class ShardedLMHead(nn.Module):
    """Logits of the rank's vocab rows, all-gathered to the full vocabulary: [..., d] -> [..., V]."""

    def __init__(self, n_rows: int, dim: int, parallel: bool, tp: TPGroup):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_rows, dim))  # tied to ShardedEmbedding.weight by default
        self.parallel = parallel and tp.size > 1
        self.tp = tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = F.linear(x, self.weight)  # [..., V / N]
        return self.tp.all_gather_last(logits) if self.parallel else logits
