"""Triton SimpleRMSNorm (no gain): y = x * rsqrt(mean(x², -1) + eps), fp32 math, forward and backward.

One program per row; rows longer than the block are walked in blocks (two passes), so any last dim works.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._device import triton_interpreted

__all__ = ["srmsnorm_triton"]


@triton.jit
def _norm_fwd_kernel(x, y, r, N, eps, BN: tl.constexpr):
    i_m = tl.program_id(0).to(tl.int64)
    o_n = tl.arange(0, BN)
    b_ss = tl.zeros([BN], dtype=tl.float32)
    for i0 in range(0, N, BN):
        m_n = i0 + o_n < N
        b_x = tl.load(x + i_m * N + i0 + o_n, mask=m_n, other=0.).to(tl.float32)
        b_ss += b_x * b_x
    b_r = 1.0 / tl.sqrt(tl.sum(b_ss, axis=0) / N + eps)
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
            _norm_fwd_kernel[(x2.shape[0],)](x2, y, r, N, eps, BN=BN, num_warps=warps)
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
