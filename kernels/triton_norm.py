"""Triton SimpleRMSNorm (no gain): y = x * rsqrt(mean(x², -1) + eps), fp32 math, forward and backward.

One program per row; rows longer than the block are walked in blocks (two passes), so any last dim works.

Two forward-only fusions for decode (docs/kernels.md#fused-decode-ops), where every launch costs more than its
arithmetic: `add_srmsnorm_triton` (a residual add and the norm after it) and `gated_srmsnorm_triton` (the token
mixer's u * srmsnorm(o)). They have no backward: `kernels` calls them only when autograd records nothing.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tnllm.kernels._device import triton_interpreted
from tnllm.kernels._pdl import pdl, start_next
from tnllm.kernels.reference import check_same_shape

__all__ = ["srmsnorm_triton", "add_srmsnorm_triton", "gated_srmsnorm_triton"]


@triton.jit
def _inv_rms(p, N, eps, BN: tl.constexpr):
    # rsqrt(mean(row²) + eps) of the N values at p, in BN-wide blocks (fp32)
    o_n = tl.arange(0, BN)
    b_ss = tl.zeros([BN], dtype=tl.float32)
    for i0 in range(0, N, BN):
        b_x = tl.load(p + i0 + o_n, mask=i0 + o_n < N, other=0.).to(tl.float32)
        b_ss += b_x * b_x
    return 1.0 / tl.sqrt(tl.sum(b_ss, axis=0) / N + eps)


@triton.jit
def _norm_fwd_kernel(x, y, r, N, eps, BN: tl.constexpr, PDL: tl.constexpr):
    start_next(PDL)  # the forward kernels let a product after them load its first weight tiles (`kernels._pdl`)
    i_m = tl.program_id(0).to(tl.int64)
    o_n = tl.arange(0, BN)
    b_r = _inv_rms(x + i_m * N, N, eps, BN)
    tl.store(r + i_m, b_r)
    for i0 in range(0, N, BN):
        m_n = i0 + o_n < N
        b_x = tl.load(x + i_m * N + i0 + o_n, mask=m_n, other=0.).to(tl.float32)
        tl.store(y + i_m * N + i0 + o_n, (b_x * b_r).to(y.dtype.element_ty), mask=m_n)


@triton.jit
def _norm_bwd_kernel(x, dy, dx, r, N, BN: tl.constexpr):
    # dx = r dy - x r³ mean(dy x)
    i_m = tl.program_id(0).to(tl.int64)
    o_n = tl.arange(0, BN)
    b_r = tl.load(r + i_m)
    b_acc = tl.zeros([BN], dtype=tl.float32)
    for i0 in range(0, N, BN):
        m_n = i0 + o_n < N
        b_x = tl.load(x + i_m * N + i0 + o_n, mask=m_n, other=0.).to(tl.float32)
        b_dy = tl.load(dy + i_m * N + i0 + o_n, mask=m_n, other=0.).to(tl.float32)
        b_acc += b_x * b_dy
    b_c = tl.sum(b_acc, axis=0) / N * b_r * b_r * b_r
    for i0 in range(0, N, BN):
        m_n = i0 + o_n < N
        b_x = tl.load(x + i_m * N + i0 + o_n, mask=m_n, other=0.).to(tl.float32)
        b_dy = tl.load(dy + i_m * N + i0 + o_n, mask=m_n, other=0.).to(tl.float32)
        tl.store(dx + i_m * N + i0 + o_n, (b_r * b_dy - b_c * b_x).to(dx.dtype.element_ty), mask=m_n)


@triton.jit
def _residual(x, d, o_n, N, S_TY: tl.constexpr):
    """x + d at columns o_n of one row (0 past N) as fp32, after rounding to S_TY as the separate add would."""
    m_n = o_n < N
    b_x = tl.load(x + o_n, mask=m_n, other=0.).to(tl.float32)
    b_d = tl.load(d + o_n, mask=m_n, other=0.).to(tl.float32)
    return (b_x + b_d).to(S_TY).to(tl.float32)


@triton.jit
def _add_norm_fwd_kernel(x, d, s, y, s_xm, s_dm, N, eps, BN: tl.constexpr, PDL: tl.constexpr):
    # s = x + d, y = s * rsqrt(mean(s²) + eps). The statistics are taken of the rounded s, in the blocks and order
    # of _norm_fwd_kernel, so y is bitwise the unfused srmsnorm(x + d). Like that kernel, the second pass reloads
    # its inputs (and recomputes the same s) rather than holding a row of any width in registers.
    start_next(PDL)
    i_m = tl.program_id(0).to(tl.int64)
    o_n = tl.arange(0, BN)
    p_x, p_d = x + i_m * s_xm, d + i_m * s_dm
    b_ss = tl.zeros([BN], dtype=tl.float32)
    for i0 in range(0, N, BN):
        b_s = _residual(p_x, p_d, i0 + o_n, N, s.dtype.element_ty)
        b_ss += b_s * b_s
    b_r = 1.0 / tl.sqrt(tl.sum(b_ss, axis=0) / N + eps)
    for i0 in range(0, N, BN):
        m_n = i0 + o_n < N
        b_s = _residual(p_x, p_d, i0 + o_n, N, s.dtype.element_ty)
        tl.store(s + i_m * N + i0 + o_n, b_s.to(s.dtype.element_ty), mask=m_n)
        tl.store(y + i_m * N + i0 + o_n, (b_s * b_r).to(y.dtype.element_ty), mask=m_n)


@triton.jit
def _gated_norm_fwd_kernel(o, u, y, s_om, s_um, N, eps, BN: tl.constexpr, PDL: tl.constexpr):
    # y = u * o * rsqrt(mean(o²) + eps), fp32 inside, rounded once at the store
    start_next(PDL)
    i_m = tl.program_id(0).to(tl.int64)
    o_n = tl.arange(0, BN)
    b_r = _inv_rms(o + i_m * s_om, N, eps, BN)
    for i0 in range(0, N, BN):
        m_n = i0 + o_n < N
        b_o = tl.load(o + i_m * s_om + i0 + o_n, mask=m_n, other=0.).to(tl.float32)
        b_u = tl.load(u + i_m * s_um + i0 + o_n, mask=m_n, other=0.).to(tl.float32)
        tl.store(y + i_m * N + i0 + o_n, (b_o * b_r * b_u).to(y.dtype.element_ty), mask=m_n)


def _block(N, device):
    cap = 1024 if triton_interpreted(device) else 8192
    return min(triton.next_power_of_2(N), cap), 4 if N <= 2048 else 8


class _SRMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, eps):
        shape, N = x.shape, x.shape[-1]
        x2 = x.reshape(-1, N).contiguous()  # [M, N]
        y = torch.empty_like(x2)
        r = torch.empty(x2.shape[0], dtype=torch.float32, device=x.device)
        BN, warps = _block(N, x.device)
        if x2.shape[0]:
            _norm_fwd_kernel[(x2.shape[0],)](x2, y, r, N, eps, BN=BN, PDL=pdl(x.device), num_warps=warps)
        ctx.save_for_backward(x2, r)
        return y.reshape(shape)

    @staticmethod
    def backward(ctx, dy):
        x2, r = ctx.saved_tensors
        N = x2.shape[-1]
        dy2 = dy.reshape(-1, N).contiguous()  # [M, N]
        dx = torch.empty_like(x2)
        BN, warps = _block(N, x2.device)
        if x2.shape[0]:
            _norm_bwd_kernel[(x2.shape[0],)](x2, dy2, dx, r, N, BN=BN, num_warps=warps)
        return dx.reshape(dy.shape), None


def srmsnorm_triton(x, eps=1e-6):
    """SimpleRMSNorm without gain, differentiable:  y = x · rsqrt(mean(x², dim=-1) + eps).

    Args:
        x: [..., N] any float dtype, any leading shape, any N (rows longer than 8192 are walked in blocks).
        eps: added to the mean square.
    Returns:
        y: same shape and dtype as x (statistics and products in fp32).
    """
    return _SRMSNormFunction.apply(x, float(eps))


def _rows(t):
    """t [..., N] as rows [M, N] with a unit column stride: a view when its strides allow (e.g. a slice of a fused
    projection's output), else a copy."""
    rows = t.reshape(-1, t.shape[-1])  # [M, N]
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def add_srmsnorm_triton(x, delta, eps=1e-6):
    """A residual add and the SRMSNorm after it, in one kernel (forward only, no autograd):

        s = x + delta ,   y = s · rsqrt(mean(s², dim=-1) + eps)

    Args:
        x, delta: [..., N], one shape, any float dtypes and strides (s takes their promoted dtype).
        eps: added to the mean square.
    Returns:
        (s, y), both [..., N] in the promoted dtype: s rounded exactly as `x + delta` (the add in fp32, one
        rounding), y computed from that rounded s, so bitwise `srmsnorm_triton(x + delta)`.
    """
    check_same_shape(x, delta, "x and delta")
    x2, d2 = _rows(x), _rows(delta)  # [M, N]
    M, N = x2.shape
    s = torch.empty(M, N, dtype=torch.promote_types(x.dtype, delta.dtype), device=x.device)
    y = torch.empty_like(s)
    BN, warps = _block(N, x.device)
    if M:
        _add_norm_fwd_kernel[(M,)](x2, d2, s, y, x2.stride(0), d2.stride(0), N, float(eps), BN=BN, PDL=pdl(x.device),
                                   num_warps=warps)
    return s.view(x.shape), y.view(x.shape)


def gated_srmsnorm_triton(o, u, eps=1e-6):
    """The token mixer's gated norm in one kernel (forward only, no autograd):  y = u · srmsnorm(o).

    Statistics and products in fp32, rounded once at the end; the unfused `u * srmsnorm(o)` rounds twice with
    16-bit inputs, so the two agree to rounding.

    Args:
        o, u: [..., N], one shape, any float dtypes and strides (u is typically a slice of the qkvu output).
        eps: added to the mean square.
    Returns:
        y: [..., N] in the promoted dtype of o and u.
    """
    check_same_shape(o, u, "o and u")
    o2, u2 = _rows(o), _rows(u)  # [M, N]
    M, N = o2.shape
    y = torch.empty(M, N, dtype=torch.promote_types(o.dtype, u.dtype), device=o.device)
    BN, warps = _block(N, o.device)
    if M:
        _gated_norm_fwd_kernel[(M,)](o2, u2, y, o2.stride(0), u2.stride(0), N, float(eps), BN=BN, PDL=pdl(o.device),
                                     num_warps=warps)
    return y.view(o.shape)
