"""Tensor-parallel pieces that replace plain modules inside the TP model (Megatron schema, paper §3.4).

Column-parallel layers need no new module: a plain `nn.Linear` holding the rank's rows
(`qkvu_proj` by heads, `l1` / `l2` by hidden units). What does need one:

* `RowParallelLinear` (`out_proj`, `l3`): the rank's input columns, partial products summed by one
  all-reduce; the bias (replicated) is added once, after the sum.
* `ShardedSRMSNorm`: the token mixer's SRMSNorm normalises all hd channels of a row, but each rank
  holds hd / N of them: one small all-reduce of the per-row sum of squares [B, T, 1] gives the exact
  global mean, mean = (sum_r sum_j x_rj^2) / hd (fp32; only the summation order differs).
  Decode fusion (calls of <= `fuse_rows` rows): the norm's scale s = rsqrt(mean + eps) is one scalar
  per row and out_proj is linear, so out_proj(u * (o s)) = s * out_proj(u * o). The norm then only
  hands its local sum of squares to out_proj, which all-reduces [partial output | sum of squares]
  as one fp32 [B, T, d + 1] tensor and applies s after the sum: the same math with one collective
  per token mixer instead of two (latency-bound decode). Longer calls (prefill) keep the separate
  [B, T, 1] all-reduce: the fp32 packing would double the bytes of the big one.
* `ShardedEmbedding` / `ShardedLMHead`: vocab-parallel (rows [r V/N, (r+1) V/N) of the shared,
  tied matrix): lookup masks foreign ids and sums over ranks; logits are all-gathered to [.., V].
  With `parallel=False` they hold the full matrix (replicated) and do no communication.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tnllm.tp.comm import TPGroup


class PendingScale:
    """Hand-over from a fused ShardedSRMSNorm to the out_proj after it (plain object, not a module)."""

    def __init__(self, full_width: int, eps: float):
        self.full_width, self.eps = full_width, eps
        self.sum_sq: torch.Tensor | None = None  # [B, T, 1] local sum of squares, not yet reduced


class RowParallelLinear(nn.Linear):
    """y = all_reduce(x_r @ W_r^T) + b. Weight [out, in / N] (the rank's input columns), bias [out].

    With a `PendingScale` holding a sum of squares, the norm's scale is applied here (see module doc).
    """

    def __init__(self, in_local: int, out_features: int, bias: bool, tp: TPGroup,
                 pending: PendingScale | None = None):
        super().__init__(in_local, out_features, bias=bias)
        self.tp = tp
        self.pending = pending

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)  # [..., out], this rank's partial sum
        if self.pending is not None and self.pending.sum_sq is not None:
            p, sum_sq = self.pending, self.pending.sum_sq
            p.sum_sq = None
            packed = self.tp.all_reduce(torch.cat([y.to(sum_sq.dtype), sum_sq], dim=-1))  # [..., out + 1]
            y = (packed[..., :-1] * torch.rsqrt(packed[..., -1:] / p.full_width + p.eps)).to(x.dtype)
        else:
            y = self.tp.all_reduce(y)
        return y if self.bias is None else y + self.bias


class ShardedSRMSNorm(nn.Module):
    """SRMSNorm over a width split across ranks: x_r * rsqrt(sum_ranks(sum x_r^2) / full_width + eps)."""

    def __init__(self, full_width: int, eps: float, tp: TPGroup, fuse_rows: int = 0):
        super().__init__()
        self.full_width = full_width
        self.eps = eps
        self.tp = tp
        self.fuse_rows = fuse_rows  # calls with <= this many rows defer the scale to `pending`'s out_proj
        self.pending = PendingScale(full_width, eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, T, width / N] -> same shape; fp32 inside (fp64 stays fp64), like kernels.srmsnorm."""
        xf = x.double() if x.dtype == torch.float64 else x.float()
        sum_sq = xf.pow(2).sum(-1, keepdim=True)  # [B, T, 1], this rank's channels
        if self.tp.size > 1 and x.shape[:-1].numel() <= self.fuse_rows:
            self.pending.sum_sq = sum_sq  # fused: out_proj reduces it and scales its output
            return x
        sum_sq = self.tp.all_reduce(sum_sq)  # global
        return (xf * torch.rsqrt(sum_sq / self.full_width + self.eps)).to(x.dtype)

    def gated(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """gate * self(x), as `SimpleRMSNorm.gated`; unfused: the statistics need the all-reduce first."""
        return gate * self(x)


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
