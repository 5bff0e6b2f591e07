"""Triton Lightning Attention decode step: one token per sequence, fp32 state updated in place.

Notation: B batch (sequences), H heads, D q/k head dim, E v head dim.

Bandwidth-bound (docs/kernels.md#decode-cost): each program reads and writes one [D, BV] slice of one state
once. The launcher allocates only `o`, never syncs with the host and never copies inputs, so the call can be
captured in a CUDA graph with static buffers.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tnllm.kernels._device import triton_interpreted
from tnllm.kernels._pdl import pdl, start_next
from tnllm.kernels.reference import check_row_ms, check_step_shapes

__all__ = ["lightning_attn_step_triton"]

TILE: tuple[int, int] | None = None  # (BV, num_warps) for every launch: bench/step_tiles.py sets it; None: `_tile`


@triton.jit
def _act(x, ACT: tl.constexpr):
    """The activation of q and k (fp32 in, fp32 out): "silu" or "none"."""
    if ACT == "silu":
        x = x * tl.sigmoid(x)
    return x


@triton.jit(do_not_specialize=["B", "n_ms"])
def _step_kernel(q, k, v, s, o, ld, slots, row_ms, theta, pos, B, n_ms, eps, s_qb, s_qh, s_kb, s_kh, s_vb, s_vh,
                 s_sb, s_sh, s_sk, s_sv, s_th, s_pb, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                 BK: tl.constexpr, BV: tl.constexpr, HAS_SLOTS: tl.constexpr, ACT: tl.constexpr, T_MS: tl.constexpr,
                 LRPE: tl.constexpr, PDL: tl.constexpr):
    # S <- λ S + f(k)ᵀ v ;  o = f(q) S      for one (sequence, head) and a BV-wide slice of E; f = act
    # T_MS > 0: q, k, v first scaled by r = rsqrt(Σ_t row_ms[t, b] + eps) (n_ms partials; a deferred norm)
    # LRPE > 0 (q's head dim; K = 2 LRPE): f(x)[j] = act(x)[j mod LRPE] · (cos for j < LRPE, else sin)(t θ[j mod LRPE])
    start_next(PDL)  # the product after the step may load its first weight tiles now (`kernels._pdl`)
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = (i_bh // H).to(tl.int64), i_bh % H
    i_s = i_b
    if HAS_SLOTS:  # the row's state lives in a pool slot
        i_s = tl.load(slots + i_b).to(tl.int64)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_s = m_k[:, None] & m_v[None, :]
    o_x = o_k % LRPE if LRPE > 0 else o_k  # the q / k element of each state row
    b_lam = tl.exp(tl.load(ld + i_h).to(tl.float32))
    b_q = tl.load(q + i_b * s_qb + i_h * s_qh + o_x, mask=m_k, other=0.).to(tl.float32)
    b_k = tl.load(k + i_b * s_kb + i_h * s_kh + o_x, mask=m_k, other=0.).to(tl.float32)
    b_v = tl.load(v + i_b * s_vb + i_h * s_vh + o_v, mask=m_v, other=0.).to(tl.float32)
    if T_MS > 0:
        o_t = tl.arange(0, T_MS)
        r = tl.rsqrt(tl.sum(tl.load(row_ms + o_t * B + i_b, mask=o_t < n_ms, other=0.), axis=0) + eps)
        b_q, b_k, b_v = b_q * r, b_k * r, b_v * r
    # act(0) = 0 for both activations, so the masked tail stays 0
    b_q, b_k = _act(b_q, ACT), _act(b_k, ACT)
    if LRPE > 0:
        angle = tl.load(pos + i_b * s_pb).to(tl.float32) * tl.load(theta + i_h * s_th + o_x, mask=m_k, other=0.).to(
            tl.float32)
        rotation = tl.where(o_k < LRPE, tl.cos(angle), tl.sin(angle))
        b_q, b_k = b_q * rotation, b_k * rotation
    p_s = s + i_s * s_sb + i_h * s_sh + o_k[:, None] * s_sk + o_v[None, :] * s_sv
    b_s = tl.load(p_s, mask=m_s, other=0.).to(tl.float32)
    b_s = b_s * b_lam + b_k[:, None] * b_v[None, :]
    tl.store(p_s, b_s.to(p_s.dtype.element_ty), mask=m_s)
    b_o = tl.sum(b_q[:, None] * b_s, axis=0)
    tl.store(o + (i_b * H + i_h) * V + o_v, b_o.to(o.dtype.element_ty), mask=m_v)


def lightning_attn_step_triton(q, k, v, log_decay, state, slots=None, *, act="none", row_ms=None, eps=1e-6,
                               lrpe=None):
    """One Lightning Attention decode step for one token per sequence; `state` is updated in place.

        S <- λ_h S + f(k_t)ᵀ v_t ,   o_t = f(q_t) S ,   λ_h = exp(log_decay[h]),   f = act (then LRPE)

    The activation (and an LRPE layer's cos/sin features) runs in the kernel, in fp32, on the raw q and k (e.g.
    strided views of a fused projection's output), so decode needs no separate launches for them and no copies.

    Args:
        q, k: [B, H, D]; v: [B, H, E] (any float dtype; any strides, last dim contiguous).
        log_decay: [H] fp32 (<= 0), on the inputs' device.
        state: [B, H, D, E] fp32, modified in place (any strides).
        slots: None, or int64 [B]: `state` is then a pool [S, H, D, E] and row b updates state[slots[b]].
        act: "silu" or "none" (the keys of `kernels.reference.ACTIVATIONS`).
        row_ms, eps: None, or [T, B] fp32 partial mean squares: q, k, v scaled by their row's norm scale first
            (`kernels.reference.lightning_attn_step_ref`).
        lrpe: None, or (theta [H, D] float, positions int [B]): an LRPE layer's step; state is then [.., H, 2 D, E].
    Returns:
        o: [B, H, E] in q.dtype (the only allocation; no host sync: CUDA-graph capturable).
    """
    check_step_shapes(q, k, v, log_decay, state, slots, act, lrpe)
    B, H, D = q.shape
    theta, positions = lrpe if lrpe is not None else (state, state)  # `state`: unused placeholders
    if row_ms is not None:
        check_row_ms(row_ms, B, q.device)
        row_ms = row_ms.contiguous()
    E = v.shape[-1]
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError("q, k, v need a contiguous last dim (strides elsewhere are free)")
    o = torch.empty(B, H, E, dtype=q.dtype, device=q.device)
    features = state.shape[2]  # D, or 2 D with LRPE
    BK = triton.next_power_of_2(features)
    BV, warps = TILE or _tile(B * H, BK, E, q.device)
    n_ms = 0 if row_ms is None else row_ms.shape[0]
    _step_kernel[(triton.cdiv(E, BV), B * H)](
        q, k, v, state, o, log_decay, state if slots is None else slots,  # `state`: an unused placeholder
        state if row_ms is None else row_ms, theta, positions, B, n_ms, eps,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        *state.stride(), theta.stride(0), positions.stride(0), H=H, K=features, V=E, BK=BK, BV=BV,
        HAS_SLOTS=slots is not None, ACT=act, T_MS=0 if row_ms is None else triton.next_power_of_2(n_ms),
        LRPE=D if lrpe is not None else 0, PDL=pdl(q.device), num_warps=warps)
    return o


def _tile(rows: int, BK: int, E: int, device: torch.device) -> tuple[int, int]:
    """(BV, num_warps) for `rows` (sequence, head) pairs: each program holds a [BK, BV] fp32 slice of one state.

    From bench/results/step-tiles-h200.json (D = E = 128, 16 and 32 heads, 1-32 sequences, states read from HBM):
    few rows are latency-bound and want many small programs with many warps (16 KiB slices took 1.3x as long at
    one sequence); from 129 to 512 rows 2 warps per 16 KiB slice beat 4 by 1-7 %; above, 4 warps were best at
    1,024 rows and are what bench/kernels.py measured at 85-92 % of the copy bandwidth for 64-256 sequences. Other
    head dims keep 16 KiB slices on 4 warps."""
    if triton_interpreted(device):
        return min(triton.next_power_of_2(E), 64), 4
    if BK != 128:
        return min(triton.next_power_of_2(E), max(16, 4096 // BK)), 4
    width = triton.next_power_of_2(E)
    if rows <= 64:
        return min(16, width), 8
    return min(32, width), 2 if 128 < rows <= 512 else 4
