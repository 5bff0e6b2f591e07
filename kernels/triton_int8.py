"""Triton weight-only int8 Linear: y = (x @ qᵀ) · s (+ b), int8 weight dequantised in registers.

Notation: M rows of x (tokens), K input features, N output features; q [N, K] int8, s [N] per-row scales.

The int8 tile is loaded, converted to x's dtype in registers and fed to `tl.dot` (fp32 accumulation); the scale
and bias are applied once to the accumulator, so no float copy of the weight ever exists. One kernel, a few
fixed tiles chosen on the host from M (docs/quantization.md#cuda-kernel):

* decode (M <= 16): bound by reading the weight once. A 16-row tile (rows past M re-read valid rows and are not
  stored), 64-wide N tiles, and the K loop split over up to 8 programs so that about 4 per SM are in flight; each
  slice writes fp32 partial sums and a second small kernel adds them, scales, adds the bias and casts;
* larger M (prefill): a tiled GEMM bound by the tensor cores, row tiles visited in groups of GROUP_M so that
  neighbouring programs share weight tiles in L2; K is split as well while the tiles alone leave SMs idle.

The launcher allocates only the output (and, for split-K, a workspace whose size depends on the shapes alone),
never syncs with the host and never autotunes, so it can be captured in a CUDA graph once each shape ran once
(Triton compiles on first use). M is not a specialisation key, so decode batch sizes share one compiled kernel.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from tnllm.kernels._device import triton_interpreted
from tnllm.kernels.reference import check_int8_linear

__all__ = ["int8_linear_triton"]

DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@triton.jit(do_not_specialize=["M"])
def _int8_mm_kernel(x, w, s, b, y, M, N, K, s_xm, s_wn, s_ym,
                    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SPLIT_K: tl.constexpr,
                    GROUP_M: tl.constexpr, EVEN_K: tl.constexpr, HAS_BIAS: tl.constexpr, F32: tl.constexpr):
    # y[m, n] = s[n] Σ_k x[m, k] q[n, k] (+ b[n]) for one [BM, BN] tile and the pid_k-th of SPLIT_K K-slices
    pid, pid_k = tl.program_id(0), tl.program_id(1)
    n_m, n_n = tl.cdiv(M, BM), tl.cdiv(N, BN)
    group = GROUP_M * n_n  # programs per group of GROUP_M row tiles
    first_m = (pid // group) * GROUP_M
    size_m = min(n_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % size_m
    pid_n = (pid % group) // size_m
    o_m, o_n, o_k = pid_m * BM + tl.arange(0, BM), pid_n * BN + tl.arange(0, BN), tl.arange(0, BK)
    r_m = (o_m % M).to(tl.int64)  # rows past the end re-read valid ones; their results are never stored
    r_n = (o_n % N).to(tl.int64)
    p_x = x + r_m[:, None] * s_xm + o_k[None, :]  # [BM, BK]
    p_w = w + r_n[:, None] * s_wn + o_k[None, :]  # [BN, BK]
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in range(pid_k * BK, K, SPLIT_K * BK):
        if EVEN_K:
            b_x = tl.load(p_x + k0)
            b_q = tl.load(p_w + k0)
        else:
            m_k = o_k[None, :] < K - k0
            b_x = tl.load(p_x + k0, mask=m_k, other=0.)
            b_q = tl.load(p_w + k0, mask=m_k, other=0)
        if F32:  # fp32 x, or bf16 under the interpreter (it computes bf16 dots wrongly, triton 3.9)
            b_x = b_x.to(tl.float32)
            b_w = b_q.to(tl.float32)
        else:
            b_w = b_q.to(b_x.dtype)  # exact: |q| <= 127
        acc = tl.dot(b_x, tl.trans(b_w), acc, input_precision="ieee")  # [BM, BN]; ieee: fp32 stays fp32
    m_y = (o_m[:, None] < M) & (o_n[None, :] < N)
    if SPLIT_K == 1:
        acc *= tl.load(s + r_n).to(tl.float32)[None, :]
        if HAS_BIAS:
            acc += tl.load(b + r_n).to(tl.float32)[None, :]
        tl.store(y + o_m.to(tl.int64)[:, None] * s_ym + o_n[None, :], acc.to(y.dtype.element_ty), mask=m_y)
    else:  # fp32 partial sums [SPLIT_K, M, N]; _splitk_reduce_kernel finishes
        tl.store(y + (pid_k * M + o_m.to(tl.int64))[:, None] * N + o_n[None, :], acc, mask=m_y)


@triton.jit(do_not_specialize=["M"])
def _splitk_reduce_kernel(ws, s, b, y, M, N, s_ym, SPLIT_K: tl.constexpr, BN: tl.constexpr, HAS_BIAS: tl.constexpr):
    # y[m, n] = s[n] Σ_i ws[i, m, n] (+ b[n]) for one row m and BN columns
    i_m, o_n = tl.program_id(0).to(tl.int64), tl.program_id(1) * BN + tl.arange(0, BN)
    m_n = o_n < N
    acc = tl.zeros([BN], dtype=tl.float32)
    for i in tl.static_range(SPLIT_K):
        acc += tl.load(ws + (i * M + i_m) * N + o_n, mask=m_n, other=0.)
    acc *= tl.load(s + o_n, mask=m_n, other=0.).to(tl.float32)
    if HAS_BIAS:
        acc += tl.load(b + o_n, mask=m_n, other=0.).to(tl.float32)
    tl.store(y + i_m * s_ym + o_n, acc.to(y.dtype.element_ty), mask=m_n)


class Config(NamedTuple):
    """One launch configuration: tile [BM, BN] x BK, K split in SPLIT_K slices, Triton warps and stages."""
    BM: int
    BN: int
    BK: int
    SPLIT_K: int = 1
    GROUP_M: int = 8
    num_warps: int = 4
    num_stages: int = 4


# (largest M, tile) by M; `choose_config` adds the K split. Chosen on an H200 (triton 3.6) over the tnl-7b shapes,
# timed as CUDA-graph replays over weights too large for L2, every candidate first checked for correct and
# run-to-run identical results (docs/quantization.md#cuda-kernel).
TILES = (
    (16, Config(16, 64, 128, num_warps=4, num_stages=5)),  # decode: bound by reading the weight
    (32, Config(32, 64, 128, num_warps=4, num_stages=4)),
    (64, Config(64, 128, 64, num_warps=4, num_stages=4)),
    (512, Config(128, 128, 64, num_warps=4, num_stages=4)),
    (None, Config(256, 128, 64, num_warps=8, num_stages=4)),  # prefill: bound by the tensor cores
)
DECODE_MAX_M = TILES[0][0]


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


@functools.lru_cache(maxsize=4096)  # host time: this runs on every eager call
def choose_config(M: int, N: int, K: int, device: torch.device) -> Config:
    """The launch configuration for an [M, K] x [N, K]ᵀ product on `device` (a pure function of the shapes).

    The tile comes from `TILES` by M. K is then split in 2, 4 or 8 slices while the programs do not yet reach
    4 per SM (decode: more loads in flight) or 1 per SM (GEMM tiles), keeping at least 8 BK steps per slice.
    Under the interpreter: 16-wide tiles and 2 K slices for M <= 16, so that tests at small shapes walk several
    K steps, N tiles and slices.
    """
    if triton_interpreted(device):
        return Config(16, 16, 16, SPLIT_K=2 if M <= DECODE_MAX_M and K > 32 else 1, GROUP_M=2, num_stages=1)
    cfg = next(tile for max_m, tile in TILES if max_m is None or M <= max_m)
    programs = triton.cdiv(M, cfg.BM) * triton.cdiv(N, cfg.BN)
    target = (4 if M <= DECODE_MAX_M else 1) * _sm_count(device)
    steps, split = triton.cdiv(K, cfg.BK), 1
    while split < 8 and programs * split < target and steps // (2 * split) >= 8:
        split *= 2
    return cfg._replace(SPLIT_K=split)


def int8_linear_triton(x, weight, scales, bias=None):
    """Weight-only int8 Linear on the GPU: y = (x @ weightᵀ) · scales (+ bias), fp32 accumulation.

    Args:
        x: [..., K] bf16, fp16 or fp32 (fp32 products are exact fp32, no tf32); any leading shape.
        weight: [N, K] int8 with a contiguous last dim; scales: [N] float; bias: None or [N] float.
    Returns:
        y: [..., N] in x.dtype. Allocates only y (and a split-K workspace sized by the shapes); no host sync.
    """
    return _int8_linear(x, weight, scales, bias)


def _int8_linear(x, weight, scales, bias=None, config: Config | None = None):
    check_int8_linear(x, weight, scales, bias)
    if x.dtype not in DTYPES:
        raise TypeError(f"int8_linear_triton supports x in {[str(d) for d in DTYPES]}, got {x.dtype}")
    if weight.stride(1) != 1:
        raise ValueError("weight needs a contiguous last dim (K)")
    N, K = weight.shape
    x2 = x.reshape(-1, K)  # [M, K] (a view when x is contiguous)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)  # [M, N]
    if M == 0 or N == 0:
        return y.reshape(*x.shape[:-1], N)
    if K == 0:
        return y.copy_((torch.zeros_like(scales) if bias is None else bias).expand(M, N)).reshape(*x.shape[:-1], N)
    cfg = config or choose_config(M, N, K, x.device)
    b = scales if bias is None else bias  # `scales`: an unused placeholder
    f32 = x.dtype == torch.float32 or (x.dtype == torch.bfloat16 and triton_interpreted(x.device))
    ws = y if cfg.SPLIT_K == 1 else torch.empty(cfg.SPLIT_K, M, N, dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(M, cfg.BM) * triton.cdiv(N, cfg.BN), cfg.SPLIT_K)
    _int8_mm_kernel[grid](
        x2, weight, scales, b, ws, M, N, K, x2.stride(0), weight.stride(0), y.stride(0),
        BM=cfg.BM, BN=cfg.BN, BK=cfg.BK, SPLIT_K=cfg.SPLIT_K, GROUP_M=cfg.GROUP_M,
        EVEN_K=K % cfg.BK == 0, HAS_BIAS=bias is not None,
        F32=f32, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if cfg.SPLIT_K > 1:
        BN = min(triton.next_power_of_2(N), 16 if triton_interpreted(x.device) else 1024)
        _splitk_reduce_kernel[(M, triton.cdiv(N, BN))](ws, scales, b, y, M, N, y.stride(0), SPLIT_K=cfg.SPLIT_K,
                                                       BN=BN, HAS_BIAS=bias is not None, num_warps=4)
    return y.reshape(*x.shape[:-1], N)
