"""Triton chunked Lightning Attention (prefill / training), forward and backward.

Notation: B batch, T time, H heads, D q/k head dim, E v head dim, N sequences, C chunk (BT), L segment.

Design (docs/kernels.md#triton-prefill, #segmented-prefill, #backward): the state of each (sequence, head)
is carried on chip through a sequential loop over chunks, as in the official forward, so per-chunk states
never touch HBM (fla writes them all). To keep the GPU busy when B·H is small, long sequences are cut into
segments of L tokens: `_seg_state_kernel` computes each segment's own decayed KᵀV, `_seg_scan_kernel`
turns those into the state entering every segment (in place, fp32, L ≫ C so this is small), then
`_chunk_kernel` runs all segments in parallel. One generic kernel serves the forward and all three
gradients (only the roles of the inputs change):

    o  = attn(q, k, v)      forward in time, state S (carried S_{t-1}, enters row i of a chunk as λ^(i+1))
    dq = attn(dO, v, k)     forward in time, state Sᵀ (forward entering states, transposed strides)
    dv = attn(k, q, dO)     backward in time, state G' (λ·dL/dS; enters as λ^i, initial = d final_state)
    dk = attn(v, dO, q)     backward in time, state G'ᵀ;   d initial_state = G' left after the first chunk

Dots run on bf16/fp16 tensor cores for 16-bit inputs (fp32 accumulate); the state stays fp32 (the inter
dot casts it to bf16 for bf16 inputs, to fp32/TF32 otherwise since fp16 could overflow).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from tnllm.kernels._device import triton_interpreted
from tnllm.kernels.reference import check_shapes

__all__ = ["lightning_attn_triton"]

@triton.jit
def _dot(x, y, F32: tl.constexpr):
    """tl.dot; F32 upcasts first (the CPU interpreter computes bf16 dots wrongly, triton 3.9)."""
    if F32:
        x = x.to(tl.float32)
        y = y.to(tl.float32)
    return tl.dot(x, y)


@triton.jit
def _seg_bounds(seg, i_s, T, NS, L, IS_VARLEN: tl.constexpr):
    """(bos, eos, i_n, is_first, is_last) of segment i_s, token offsets in int64."""
    if IS_VARLEN:
        bos = tl.load(seg + i_s * 5).to(tl.int64)
        eos = tl.load(seg + i_s * 5 + 1).to(tl.int64)
        i_n = tl.load(seg + i_s * 5 + 2).to(tl.int32)
        is_first = tl.load(seg + i_s * 5 + 3) != 0
        is_last = tl.load(seg + i_s * 5 + 4) != 0
    else:
        i_n = i_s // NS
        i_j = i_s % NS
        bos = i_n.to(tl.int64) * T + i_j.to(tl.int64) * L
        eos = tl.minimum(bos + L, i_n.to(tl.int64) * T + T)
        is_first = i_j == 0
        is_last = i_j == NS - 1
    return bos, eos, i_n, is_first, is_last


@triton.jit
def _chunk_span(bos, eos, i_c, n_c, o_t, BT: tl.constexpr, REVERSE: tl.constexpr):
    """The i_c-th of a segment's n_c chunks in processing order (last chunk first when REVERSE): its tokens
    o_tok [BT] (int64), its length n_m and the mask of its real tokens m_t [BT]."""
    if REVERSE:
        t0 = bos + (n_c - 1 - i_c) * BT
    else:
        t0 = bos + i_c * BT
    n_m = tl.minimum(eos - t0, BT).to(tl.int32)
    return t0 + o_t.to(tl.int64), n_m, o_t < n_m


@triton.jit
def _carry_state(b_h, b_ld, b_b, b_c, o_t, n_m, m_t, REVERSE: tl.constexpr, F32: tl.constexpr,
                 STATE_T: tl.constexpr):
    """The state after one chunk: h <- λ^n_m h + Σ_j λ^f_j b_jᵀ c_j, f_j the distance of token j to the chunk's
    far end (its last token, or its first when REVERSE), within the chunk: every power of λ stays >= λ^BT.
    STATE_T: h is held transposed, [V, K]."""
    if REVERSE:
        e_k = o_t + 1
    else:
        e_k = n_m - 1 - o_t
    d_k = tl.where(m_t, tl.exp2(b_ld * tl.maximum(e_k, 0).to(tl.float32)), 0.)
    b_bd = (b_b * d_k[:, None]).to(b_b.dtype)
    if STATE_T:  # a single return: with a return inside this branch, compiled Triton failed when K != V
        b_u = _dot(tl.trans(b_c), b_bd, F32)
    else:
        b_u = _dot(tl.trans(b_bd), b_c, F32)
    return b_h * tl.exp2(b_ld * n_m.to(tl.float32)) + b_u


@triton.jit
def _intra_decay(o_t, b_ld, REVERSE: tl.constexpr):
    """[BT, BT] λ^|i-j| on the causal side of a chunk (j <= i, or j >= i when REVERSE), 0 elsewhere."""
    if REVERSE:
        m_A = o_t[:, None] <= o_t[None, :]
        b_D = tl.exp2(tl.where(m_A, b_ld * (o_t[None, :] - o_t[:, None]).to(tl.float32), float("-inf")))
    else:
        m_A = o_t[:, None] >= o_t[None, :]
        b_D = tl.exp2(tl.where(m_A, b_ld * (o_t[:, None] - o_t[None, :]).to(tl.float32), float("-inf")))
    return b_D


@triton.jit
def _entering_state(h, i_s, i_n, i_h, s_hn, s_hh, s_hk, s_hv, o_k, o_v, m_k, m_v, USE_H: tl.constexpr,
                    H_PER_SEG: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, STATE_T: tl.constexpr):
    """The fp32 state [BK, BV] ([BV, BK] if STATE_T) a program starts from: its segment's (H_PER_SEG) or its
    sequence's, or zeros."""
    if STATE_T:
        b_h = tl.zeros([BV, BK], dtype=tl.float32)
    else:
        b_h = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_H:
        if H_PER_SEG:
            i_hn = i_s
        else:
            i_hn = i_n
        p_h = h + i_hn.to(tl.int64) * s_hn + i_h * s_hh
        if STATE_T:
            b_h = tl.load(p_h + o_v[:, None] * s_hv + o_k[None, :] * s_hk, mask=m_v[:, None] & m_k[None, :],
                          other=0.).to(tl.float32)
        else:
            b_h = tl.load(p_h + o_k[:, None] * s_hk + o_v[None, :] * s_hv, mask=m_k[:, None] & m_v[None, :],
                          other=0.).to(tl.float32)
    return b_h


@triton.jit
def _chunk_out(b_a, b_b, b_c, b_h, b_D, d_q, BF16_STATE: tl.constexpr, F32: tl.constexpr, STATE_T: tl.constexpr):
    """One chunk's output [BT, V]: Σ_{j causal} λ^|i-j| (a_i·b_j) c_j + λ^e_i a_i h, h the state entering it.
    STATE_T: h is held transposed, [V, K], and the state term is computed as (hᵀ (λ^e a)ᵀ)ᵀ."""
    b_o = _dot((_dot(b_a, tl.trans(b_b), F32) * b_D).to(b_c.dtype), b_c, F32)
    if STATE_T and BF16_STATE:
        b_o += tl.trans(_dot(b_h.to(b_a.dtype), tl.trans((b_a * d_q[:, None]).to(b_a.dtype)), F32))
    elif STATE_T:
        b_o += tl.dot(b_a.to(tl.float32) * d_q[:, None], tl.trans(b_h))
    elif BF16_STATE:
        b_o += _dot((b_a * d_q[:, None]).to(b_a.dtype), b_h.to(b_a.dtype), F32)
    else:
        b_o += tl.dot(b_a.to(tl.float32) * d_q[:, None], b_h)
    return b_o


@triton.jit
def _state_decay(o_t, n_m, m_t, b_ld, REVERSE: tl.constexpr):
    """[BT] λ^e_i: how far the state entering a chunk has decayed at each of its real rows (0 past its end)."""
    if REVERSE:
        e_q = n_m - 1 - o_t
    else:
        e_q = o_t + 1
    return tl.where(m_t, tl.exp2(b_ld * tl.maximum(e_q, 0).to(tl.float32)), 0.)


# one GPU kernel for every pass: its branches are compile-time constants
@triton.jit(do_not_specialize=["T", "NS", "L"])
def _chunk_kernel(a, b, c, o, h, hf, ld, seg, T, NS, L, s_hn, s_hh, s_hk, s_hv,
                  H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                  BT: tl.constexpr, REVERSE: tl.constexpr, USE_H: tl.constexpr, H_PER_SEG: tl.constexpr,
                  STORE_FINAL: tl.constexpr, IS_VARLEN: tl.constexpr, BF16_STATE: tl.constexpr,
                  F32: tl.constexpr, STATE_T: tl.constexpr):
    # out_i = sum_{j causal} λ^|i-j| (a_i·b_j) c_j + λ^e_i a_i S ;  S <- λ^m S + Σ_j λ^f_j b_jᵀ c_j
    i_v, i_sh = tl.program_id(0), tl.program_id(1)
    i_s, i_h = i_sh // H, i_sh % H
    bos, eos, i_n, is_first, is_last = _seg_bounds(seg, i_s, T, NS, L, IS_VARLEN)
    b_ld = tl.load(ld + i_h).to(tl.float32) * 1.4426950408889634  # log2 of λ

    o_t = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    b_D = _intra_decay(o_t, b_ld, REVERSE)
    b_h = _entering_state(h, i_s, i_n, i_h, s_hn, s_hh, s_hk, s_hv, o_k, o_v, m_k, m_v, USE_H, H_PER_SEG, BK, BV,
                          STATE_T)
    n_c = tl.cdiv(eos - bos, BT).to(tl.int32)
    for i_c in range(n_c):
        o_tok, n_m, m_t = _chunk_span(bos, eos, i_c, n_c, o_t, BT, REVERSE)
        p_a = a + (o_tok[:, None] * H + i_h) * K + o_k[None, :]
        p_b = b + (o_tok[:, None] * H + i_h) * K + o_k[None, :]
        p_c = c + (o_tok[:, None] * H + i_h) * V + o_v[None, :]
        b_a = tl.load(p_a, mask=m_t[:, None] & m_k[None, :], other=0.)
        b_b = tl.load(p_b, mask=m_t[:, None] & m_k[None, :], other=0.)
        b_c = tl.load(p_c, mask=m_t[:, None] & m_v[None, :], other=0.)
        b_o = _chunk_out(b_a, b_b, b_c, b_h, b_D, _state_decay(o_t, n_m, m_t, b_ld, REVERSE), BF16_STATE, F32,
                         STATE_T)
        p_o = o + (o_tok[:, None] * H + i_h) * V + o_v[None, :]
        tl.store(p_o, b_o.to(o.dtype.element_ty), mask=m_t[:, None] & m_v[None, :])
        b_h = _carry_state(b_h, b_ld, b_b, b_c, o_t, n_m, m_t, REVERSE, F32, STATE_T)

    if STORE_FINAL and (is_first if REVERSE else is_last):
        p_f = hf + (i_n.to(tl.int64) * H + i_h) * K * V
        if STATE_T:
            tl.store(p_f + o_v[:, None] + o_k[None, :] * V, b_h, mask=m_v[:, None] & m_k[None, :])
        else:
            tl.store(p_f + o_k[:, None] * V + o_v[None, :], b_h, mask=m_k[:, None] & m_v[None, :])


@triton.jit(do_not_specialize=["T", "NS", "L"])
def _seg_state_kernel(b, c, hs, ld, seg, T, NS, L, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                      BK: tl.constexpr, BV: tl.constexpr, BT: tl.constexpr, REVERSE: tl.constexpr,
                      IS_VARLEN: tl.constexpr, F32: tl.constexpr):
    # hs[s] = Σ_{j in s} λ^f_j b_jᵀ c_j ; f_j = eos-1-j (forward) or j-bos+1 (reverse). Walked chunk by chunk
    # in processing order with `_carry_state`, as _chunk_kernel: the decayed b is rounded to b.dtype for the dot,
    # and a power of λ over the whole segment (down to λ^L) would round away small decays near λ = 1
    # (docs/kernels.md#final-state-precision-near-λ--1); chunk-local powers stay >= λ^BT.
    i_kv, i_sh = tl.program_id(0), tl.program_id(1)
    NV: tl.constexpr = triton.cdiv(V, BV)
    i_k, i_v = i_kv // NV, i_kv % NV
    i_s, i_h = i_sh // H, i_sh % H
    bos, eos, i_n, is_first, is_last = _seg_bounds(seg, i_s, T, NS, L, IS_VARLEN)
    if is_first if REVERSE else is_last:  # the sequence's last segment in processing order: no segment follows
        return                            # it, so no entering state needs its own (_seg_scan_kernel skips it)
    b_ld = tl.load(ld + i_h).to(tl.float32) * 1.4426950408889634
    o_t = tl.arange(0, BT)
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    n_c = tl.cdiv(eos - bos, BT).to(tl.int32)
    for i_c in range(n_c):
        o_tok, n_m, m_t = _chunk_span(bos, eos, i_c, n_c, o_t, BT, REVERSE)
        b_b = tl.load(b + (o_tok[:, None] * H + i_h) * K + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0.)
        b_c = tl.load(c + (o_tok[:, None] * H + i_h) * V + o_v[None, :], mask=m_t[:, None] & m_v[None, :], other=0.)
        b_h = _carry_state(b_h, b_ld, b_b, b_c, o_t, n_m, m_t, REVERSE, F32, False)
    p_h = hs + (i_s.to(tl.int64) * H + i_h) * K * V + o_k[:, None] * V + o_v[None, :]
    tl.store(p_h, b_h, mask=m_k[:, None] & m_v[None, :])


@triton.jit(do_not_specialize=["T", "NS", "L"])
def _seg_scan_kernel(hs, h0, ld, seg, sseg, T, NS, L, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                     BK: tl.constexpr, BV: tl.constexpr, REVERSE: tl.constexpr, USE_H0: tl.constexpr,
                     IS_VARLEN: tl.constexpr):
    # in place: hs[s] <- state entering segment s (in processing order); carry <- λ^len carry + hs[s]
    i_kv, i_nh = tl.program_id(0), tl.program_id(1)
    NV: tl.constexpr = triton.cdiv(V, BV)
    i_k, i_v = i_kv // NV, i_kv % NV
    i_n, i_h = i_nh // H, i_nh % H
    b_ld = tl.load(ld + i_h).to(tl.float32) * 1.4426950408889634
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_kv = (o_k < K)[:, None] & (o_v < V)[None, :]
    o_kv = o_k[:, None] * V + o_v[None, :]
    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_H0:
        b_h = tl.load(h0 + (i_n.to(tl.int64) * H + i_h) * K * V + o_kv, mask=m_kv, other=0.).to(tl.float32)
    if IS_VARLEN:
        s_beg = tl.load(sseg + i_n).to(tl.int32)
        n_s = tl.load(sseg + i_n + 1).to(tl.int32) - s_beg
    else:
        s_beg = i_n * NS
        n_s = NS
    for i_j in range(n_s):
        if REVERSE:
            i_s = s_beg + n_s - 1 - i_j
        else:
            i_s = s_beg + i_j
        bos, eos, _n, _f, _l = _seg_bounds(seg, i_s, T, NS, L, IS_VARLEN)
        p_h = hs + (i_s * H + i_h).to(tl.int64) * K * V + o_kv
        b_l = tl.where(i_j < n_s - 1, tl.load(p_h, mask=m_kv, other=0.), 0.)  # the last one's was never written
        tl.store(p_h, b_h, mask=m_kv)
        b_h = b_h * tl.exp2(b_ld * (eos - bos).to(tl.float32)) + b_l


# Launch settings on GPU (bench/chunk_sweep.py on an H200, docs/kernels.md#launch-settings); the interpreter uses
# 16-wide blocks. BT chunk; BV, WARPS, STAGES of the chunk kernel, "_WIDE" when the contracted dim K exceeds 128;
# BS state tile of the segment kernels; SEG_PROGRAMS_PER_SM, MIN_SEG_CHUNKS: the segment length rule (`_Plan`).
# STATE_T (STATE_T_WIDE): the chunk kernel holds its state transposed, [V, K], so that its products take the state
# from registers (`bench/chunk_sweep.py --variants`, docs/kernels.md#the-state-held-transposed).
_CFG = dict(BT=64, BV=128, WARPS=8, STAGES=3, BV_WIDE=64, WARPS_WIDE=8, STAGES_WIDE=2, BS=128, SEG_PROGRAMS_PER_SM=2,
            MIN_SEG_CHUNKS=16, STATE_T=True, STATE_T_WIDE=False)
_CFG_INTERPRET = dict(BT=16, BV=16, WARPS=4, STAGES=1, BV_WIDE=16, WARPS_WIDE=4, STAGES_WIDE=1, BS=16,
                      SEG_PROGRAMS_PER_SM=1, MIN_SEG_CHUNKS=1, STATE_T=True, STATE_T_WIDE=False)


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


class _Plan:
    """Segmentation and block sizes of one call (host side; varlen needs one sync for cu_seqlens)."""

    def __init__(self, B, T, H, D, E, device, cu_seqlens, seg_len):
        interpreted = triton_interpreted(device)
        self.cfg = cfg = _CFG_INTERPRET if interpreted else _CFG
        self.BT, self.BS, self.H = cfg["BT"], cfg["BS"], H
        n_v = max(triton.cdiv(E, self.BV_of(D, E)), triton.cdiv(D, self.BV_of(E, D)))
        if cu_seqlens is None:
            self.N, lens = B, None
            tot = B * T
        else:
            bounds = cu_seqlens.tolist()
            lens = [e - s for s, e in zip(bounds[:-1], bounds[1:])]
            self.N, tot = len(lens), bounds[-1]
        if seg_len is None:
            # Segments cost a pre-pass over k and v (a quarter of the forward's time at 8k-32k tokens), so a
            # sequence is cut only when one program per (sequence, head, slice) leaves SMs idle; then into enough
            # segments for SEG_PROGRAMS_PER_SM programs per SM.
            sms = 1 if interpreted else _sm_count(torch.device(device))
            if self.N * H * n_v >= sms:
                seg_len = max(lens or [T])
            else:
                seg_len = max(cfg["MIN_SEG_CHUNKS"] * self.BT,
                              triton.cdiv(tot * H * n_v, cfg["SEG_PROGRAMS_PER_SM"] * sms))
        self.L = triton.cdiv(max(int(seg_len), 1), self.BT) * self.BT
        self.T, self.varlen = T, cu_seqlens is not None
        if lens is None:
            self.NS = max(1, triton.cdiv(T, self.L))
            self.n_seg = B * self.NS
            self.segmented = self.NS > 1
            self.seg = self.sseg = torch.zeros(1, dtype=torch.int64, device=device)
        else:
            rows, sseg = [], [0]
            for i_n, (s, n) in enumerate(zip(bounds[:-1], lens)):
                ns = max(1, triton.cdiv(n, self.L))
                for j in range(ns):
                    rows.append([s + j * self.L, min(s + (j + 1) * self.L, s + n), i_n, int(j == 0), int(j == ns - 1)])
                sseg.append(sseg[-1] + ns)
            self.NS, self.n_seg = 1, len(rows)
            self.segmented = self.n_seg > self.N
            self.seg = torch.tensor(rows, dtype=torch.int64).to(device)
            self.sseg = torch.tensor(sseg, dtype=torch.int64).to(device)

    def BV_of(self, K, V):
        return min(self.cfg["BV"] if K <= 128 else self.cfg["BV_WIDE"], max(16, triton.next_power_of_2(V)))

    @staticmethod
    def f32(x):
        return x.dtype == torch.bfloat16 and triton_interpreted(x.device)

    def seg_states(self, b, c, ld, h0, reverse):
        """State entering each segment (processing order), fp32 [n_seg, H, K, V]."""
        K, V = b.shape[-1], c.shape[-1]
        hs = torch.empty(self.n_seg, self.H, K, V, dtype=torch.float32, device=b.device)
        BK, BV = min(self.BS, triton.next_power_of_2(K)), min(self.BS, triton.next_power_of_2(V))
        BK, BV = max(BK, 16), max(BV, 16)
        n_kv = triton.cdiv(K, BK) * triton.cdiv(V, BV)
        _seg_state_kernel[(n_kv, self.n_seg * self.H)](
            b, c, hs, ld, self.seg, self.T, self.NS, self.L, H=self.H, K=K, V=V, BK=BK, BV=BV, BT=self.BT,
            REVERSE=reverse, IS_VARLEN=self.varlen, F32=self.f32(b))
        _seg_scan_kernel[(n_kv, self.N * self.H)](
            hs, h0 if h0 is not None else hs, ld, self.seg, self.sseg, self.T, self.NS, self.L, H=self.H,
            K=K, V=V, BK=BK, BV=BV, REVERSE=reverse, USE_H0=h0 is not None, IS_VARLEN=self.varlen)
        return hs

    def chunk(self, a, b, c, ld, h, h_per_seg, reverse, store_final, transpose_h=False):
        """out [.., V] (a.dtype) and the final state [N, H, K, V] fp32 (or None) of one generic pass."""
        K, V = a.shape[-1], c.shape[-1]
        out = torch.empty(c.shape, dtype=a.dtype, device=a.device)
        hf = torch.empty(self.N, self.H, K, V, dtype=torch.float32, device=a.device) if store_final else None
        BV = self.BV_of(K, V)
        if h is None:
            strides = (0, 0, 0, 0)
        else:
            s_n, s_h, s_1, s_2 = h.stride()
            strides = (s_n, s_h, s_2, s_1) if transpose_h else (s_n, s_h, s_1, s_2)
        _chunk_kernel[(triton.cdiv(V, BV), self.n_seg * self.H)](
            a, b, c, out, h if h is not None else out, hf if hf is not None else out, ld, self.seg,
            self.T, self.NS, self.L, *strides, H=self.H, K=K, V=V, BK=max(16, triton.next_power_of_2(K)),
            BV=BV, BT=self.BT, REVERSE=reverse, USE_H=h is not None, H_PER_SEG=h_per_seg,
            STORE_FINAL=store_final, IS_VARLEN=self.varlen, BF16_STATE=a.dtype == torch.bfloat16, F32=self.f32(a),
            STATE_T=self.cfg["STATE_T" if K <= 128 else "STATE_T_WIDE"],
            num_warps=self.cfg["WARPS" if K <= 128 else "WARPS_WIDE"], num_stages=self.stages(K, a))
        return out, hf

    def stages(self, K: int, a: torch.Tensor) -> int:
        """Pipeline stages of the chunk kernel for 16-bit tiles; fp32 tiles are twice the bytes, and more than one
        stage of them exceeds the H200's 227 KiB of shared memory."""
        if a.element_size() > 2:
            return 1
        return self.cfg["STAGES" if K <= 128 else "STAGES_WIDE"]


class _LightningAttnFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, log_decay, initial_state, output_final_state, cu_seqlens, seg_len):
        B, T, H, D = q.shape
        plan = _Plan(B, T, H, D, v.shape[-1], q.device, cu_seqlens, seg_len)
        ld = log_decay.detach().to(device=q.device, dtype=torch.float32).contiguous()
        h0 = None if initial_state is None else initial_state.detach().float().contiguous()
        hs = plan.seg_states(k, v, ld, h0, reverse=False) if plan.segmented else None
        o, final = plan.chunk(q, k, v, ld, hs if plan.segmented else h0, plan.segmented, False, output_final_state)
        ctx.save_for_backward(q, k, v, ld, h0, hs)
        ctx.plan, ctx.s0_dtype = plan, None if initial_state is None else initial_state.dtype
        return o, final

    @staticmethod
    def backward(ctx, do, dfinal):
        q, k, v, ld, h0, hs = ctx.saved_tensors
        plan = ctx.plan
        do = do.contiguous()
        dfinal = None if dfinal is None else dfinal.float().contiguous()
        h_fwd = hs if plan.segmented else h0
        dq, _ = plan.chunk(do, v, k, ld, h_fwd, plan.segmented, False, False, transpose_h=True)
        gs = plan.seg_states(q, do, ld, dfinal, reverse=True) if plan.segmented else None
        h_rev = gs if plan.segmented else dfinal
        need_ds0 = ctx.s0_dtype is not None and ctx.needs_input_grad[4]
        dv, ds0 = plan.chunk(k, q, do, ld, h_rev, plan.segmented, True, need_ds0)
        dk, _ = plan.chunk(v, do, q, ld, h_rev, plan.segmented, True, False, transpose_h=True)
        if ds0 is not None:
            ds0 = ds0.to(ctx.s0_dtype)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, ds0, None, None, None


def lightning_attn_triton(q, k, v, log_decay, *, initial_state=None, output_final_state=False, cu_seqlens=None):
    """Causal linear attention with a fixed per-head decay (Lightning Attention), Triton, differentiable.

        S_t = λ_h S_{t-1} + k_tᵀ v_t ,   o_t = q_t S_t ,   λ_h = exp(log_decay[h])   (no scale, no softmax)

    Args:
        q, k: [B, T, H, D]; v: [B, T, H, E] (bf16, fp16 or fp32, one dtype; D != E allowed).
        log_decay: [H] fp32, <= 0 (no gradient: a fixed buffer).
        initial_state: [N, H, D, E] (fp32) or None; N = B, or the number of sequences with cu_seqlens.
        output_final_state: also return the state after the last token, [N, H, D, E] fp32.
        cu_seqlens: [N + 1] int offsets of packed sequences (needs B == 1), or None.
    Returns:
        o [B, T, H, E] in q.dtype, and the final state or None. Gradients flow to q, k, v, initial_state
        (and from the final state).
    """
    return _lightning_attn(q, k, v, log_decay, initial_state, output_final_state, cu_seqlens, None)


def _lightning_attn(q, k, v, log_decay, initial_state, output_final_state, cu_seqlens, seg_len):
    """`lightning_attn_triton` with the segment length forced (None: automatic); tests use it."""
    check_shapes(q, k, v, log_decay, initial_state, cu_seqlens)
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    return _LightningAttnFunction.apply(q, k, v, log_decay, initial_state, bool(output_final_state),
                                        cu_seqlens, seg_len)

