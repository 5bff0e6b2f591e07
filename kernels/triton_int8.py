"""Triton weight-only int8 Linear: y = (x @ qᵀ) · s (+ b), int8 weight dequantised in registers.

Notation: M rows of x (tokens), K input features, N output features; q [N, K] int8, s [N] per-row scales.

Kinds of launch (`Config.kind`), one chosen on the host from (M, N, K) by `choose_config` through the table
`CONFIGS` (docs/quantization.md#cuda-kernel):

* "dot": the int8 tile is loaded, converted to x's dtype in registers and fed to `tl.dot` (fp32 accumulation),
  `x @ qᵀ` over a [BM, BN] tile. Decode (M <= 16) uses a 16-row tile (rows past M re-read valid rows and are not
  stored); larger M visits row tiles in groups of GROUP_M so neighbouring programs share weight tiles in L2;
* "dot_t": the same with the operands swapped, `(q @ xᵀ)ᵀ`: the converted weight is the left operand, so at
  decode sizes its BN rows fill the tensor cores' long side instead of x's padded 16 rows;
* "gemv": no tensor cores. A program owns BN output rows and BM rows of x, loads each [BN, BK] int8 tile once
  (contiguous along K: 16-byte loads), converts it to fp32 and multiplies it with the BM x rows broadcast,
  reducing along K per tile; "gemv_once" accumulates [BM, BN, BK] products and reduces once after the loop. With
  BM = 1 every tile is two-dimensional ([BN, BK]), which keeps each converted weight tile in the registers it was
  loaded into (three-dimensional products made Triton move it through shared memory);
  "gemv_word" is "gemv_once" at BM = 1 reading the weight as int32 words, four bytes converted at once
  (`_words_to_f32`);
* "deq": the weight dequantised (q · s, rounded once to x's dtype) into a workspace by a small kernel, then
  one cuBLAS `F.linear` with the bias: for prefill, where the product is bound by the tensor cores.

The K loop of "dot", "dot_t" and "gemv" can be split over SPLIT_K programs: each slice writes fp32 partial sums
and a second small kernel adds them, scales, adds the bias and casts (deterministic, no atomics). `magic`
converts int8 with integer adds and a float subtraction (the 1.5·2²³ trick) instead of the conversion
instruction, whose throughput can bound a kernel that converts every weight byte.

The launcher allocates only the output (and, for split-K or "deq", a workspace whose size depends on the shapes
alone), never syncs with the host and never autotunes, so it can be captured in a CUDA graph once each shape ran
once (Triton compiles on first use). M and the split are not specialisation keys, so decode batch sizes share
one compiled kernel per tile.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from tnllm.kernels import reference as ref
from tnllm.kernels._device import triton_interpreted
from tnllm.kernels._pdl import CHAINED, OFF, await_inputs, pdl

__all__ = ["int8_linear_triton", "prologue_linear_triton"]

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
KINDS = ("dot", "dot_t", "gemv", "gemv_once", "gemv_word", "deq")


@triton.jit
def _int8_to(q, DT: tl.constexpr, MAGIC: tl.constexpr):
    # int8 -> DT, exact (|q| <= 127). MAGIC: integer add + float subtract, no int->float conversion instruction:
    # the bits 0x4B400000 + q read as fp32 are 1.5·2²³ + q exactly; bf16 is then the fp32's top half.
    if MAGIC:
        f = (q.to(tl.int32) + 0x4B400000).to(tl.float32, bitcast=True) - 12582912.0
        if DT == tl.bfloat16:
            r = (f.to(tl.int32, bitcast=True) >> 16).to(tl.int16).to(tl.bfloat16, bitcast=True)
        else:
            r = f.to(DT)
    else:
        r = q.to(DT)
    return r


@triton.jit
def _finish(acc, o_m, o_n, r_n, M, N, eps, s, b, ms_in, res, ms_out, s_rm, n_ms_in, pid_out, HAS_SCALES: tl.constexpr,
            HAS_BIAS: tl.constexpr, ROW_POW: tl.constexpr, T_IN: tl.constexpr, RESIDUAL: tl.constexpr,
            OUT_DT: tl.constexpr):
    """The finished product tile acc [BM, BN] (rows o_m, columns o_n, r_n = o_n wrapped into N) in fp32 after the
    weight scales, a deferred norm's row scale r^ROW_POW (r from the partial mean squares ms_in [n_ms_in, M]), the
    bias and a residual (res [M, N], row stride s_rm). RESIDUAL: stores this tile's partial mean squares of the
    rounded sum, ms_out[pid_out, m]."""
    if HAS_SCALES:
        acc *= tl.load(s + r_n).to(tl.float32)[None, :]
    if ROW_POW > 0:
        o_t = tl.arange(0, T_IN)
        ms = tl.load(ms_in + o_t[:, None] * M + (o_m % M)[None, :], mask=o_t[:, None] < n_ms_in, other=0.)
        r = tl.rsqrt(tl.sum(ms, axis=0) + eps)  # [BM]
        if ROW_POW == 2:
            r = r * r
        acc *= r[:, None]
    if HAS_BIAS:
        acc += tl.load(b + r_n).to(tl.float32)[None, :]
    if RESIDUAL:
        m_y = (o_m[:, None] < M) & (o_n[None, :] < N)
        acc += tl.load(res + o_m.to(tl.int64)[:, None] * s_rm + o_n[None, :], mask=m_y, other=0.).to(tl.float32)
        rounded = tl.where(m_y, acc.to(OUT_DT).to(tl.float32), 0.)
        tl.store(ms_out + pid_out * M + o_m, tl.sum(rounded * rounded, axis=1) / N, mask=o_m < M)
    return acc


@triton.jit
def _epilogue(acc, ss, s, b, y, ss_ws, o_m, o_n, M, N, K, eps, s_ym, pid_k, pid_n, ms_in, res, ms_out, s_rm,
              n_ms_in, HAS_SCALES: tl.constexpr, HAS_BIAS: tl.constexpr, PARTIAL: tl.constexpr, NORM: tl.constexpr,
              ROW_POW: tl.constexpr, T_IN: tl.constexpr, RESIDUAL: tl.constexpr):
    # acc [BM, BN] fp32 for rows o_m and columns o_n: scaled by the norm (NORM: ss [BM] the rows' sums of squares)
    # and finished (`_finish`) into y, or fp32 partial sums [split, M, N] (and ss [split, M]) for the reduce
    m_y = (o_m[:, None] < M) & (o_n[None, :] < N)
    if PARTIAL:  # _splitk_reduce_kernel finishes
        tl.store(y + (pid_k * M + o_m.to(tl.int64))[:, None] * N + o_n[None, :], acc, mask=m_y)
        if NORM:
            tl.store(ss_ws + pid_k * M + o_m, ss, mask=o_m < tl.where(pid_n == 0, M, 0))  # one column stores
    else:
        if NORM:
            acc *= tl.rsqrt(ss / K + eps)[:, None]
        acc = _finish(acc, o_m, o_n, o_n % N, M, N, eps, s, b, ms_in, res, ms_out, s_rm, n_ms_in, pid_n, HAS_SCALES,
                      HAS_BIAS, ROW_POW, T_IN, RESIDUAL, y.dtype.element_ty)
        tl.store(y + o_m.to(tl.int64)[:, None] * s_ym + o_n[None, :], acc.to(y.dtype.element_ty), mask=m_y)


@triton.jit
def _load_k_tiles(p_x, p_w, k0, K, o_k, EVEN_K: tl.constexpr):
    """The x tile [BM, BK] and int8 weight tile [BN, BK] at K offset k0 (columns past K read as 0)."""
    return _k_tile(p_x, k0, K, o_k, EVEN_K), _k_tile(p_w, k0, K, o_k, EVEN_K)


@triton.jit
def _k_tile(p, k0, K, o_k, EVEN_K: tl.constexpr):
    # the tile [rows, BK] of pointers p at K offset k0, columns past K read as 0
    if EVEN_K:
        t = tl.load(p + k0)
    else:
        t = tl.load(p + k0, mask=o_k[None, :] < K - k0, other=0)
    return t


# Input prologues: what the product multiplies instead of x's rows (`prologue_linear_triton`). The norms' scale
# r = rsqrt(mean(squares) + eps) is one scalar per row, so it multiplies the accumulated row after the K loop.
# The kernels take a prologue's index in PROLOGUES (`reference.PROLOGUES`, where each is defined).
PROLOGUES = ref.PROLOGUES
PRO_NONE = tl.constexpr(PROLOGUES.index("none"))
PRO_NORM = tl.constexpr(PROLOGUES.index("norm"))
PRO_ADD_NORM = tl.constexpr(PROLOGUES.index("add_norm"))
PRO_MUL = tl.constexpr(PROLOGUES.index("mul"))


@triton.jit
def _prologue(b_x, p_x2, p_s, k0, K, o_k, m_store, sq, PRO: tl.constexpr, EVEN_K: tl.constexpr):
    """The operand tile [BM, BK] that replaces x's tile b_x, and the squares sq [BM, BK] grown by this tile's (the
    kernel sums them along K once, after its loop): "norm" x (squares of x); "add_norm" s = x + x2 rounded to x's
    dtype (squares of s; rows m_store [BM] also store s at p_s); "gated_norm" x·x2 (squares of x); "mul" x·x2."""
    f = b_x.to(tl.float32)
    if PRO == PRO_NORM:
        op = b_x
    else:
        if EVEN_K:
            x2 = tl.load(p_x2 + k0).to(tl.float32)
        else:
            x2 = tl.load(p_x2 + k0, mask=o_k[None, :] < K - k0, other=0.).to(tl.float32)
        if PRO == PRO_ADD_NORM:
            op = (f + x2).to(b_x.dtype)
            f = op.to(tl.float32)
            tl.store(p_s + k0, op, mask=m_store[:, None] & (o_k[None, :] < K - k0))
        else:
            op = (f * x2).to(b_x.dtype)
    if PRO != PRO_MUL:
        sq += f * f
    return op, sq


@triton.jit
def _weight_to(b_q, DT: tl.constexpr, INT8: tl.constexpr, MAGIC: tl.constexpr):
    # the weight tile in the product's dtype: int8 converted exactly, float weights cast (a no-op for x's dtype)
    if INT8:
        r = _int8_to(b_q, DT, MAGIC)
    else:
        r = b_q.to(DT)
    return r


@triton.jit(do_not_specialize=["M", "n_ms_in", "split_k"])
def _int8_mm_kernel(x, x2, xs, w, s, b, y, ss_ws, ms_in, res, ms_out, M, N, K, eps, s_xm, s_x2m, s_xsm, s_wn, s_ym,
                    s_rm, n_ms_in, split_k, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                    GROUP_M: tl.constexpr, EVEN_K: tl.constexpr, HAS_SCALES: tl.constexpr, HAS_BIAS: tl.constexpr,
                    F32: tl.constexpr, PARTIAL: tl.constexpr, SWAP: tl.constexpr, MAGIC: tl.constexpr,
                    PRO: tl.constexpr, NORM: tl.constexpr, ROW_POW: tl.constexpr, T_IN: tl.constexpr,
                    RESIDUAL: tl.constexpr):
    # y[m, n] = r[m] s[n] Σ_k op[m, k] w[n, k] (+ b[n]) for one [BM, BN] tile and the pid_k-th of split_k K-slices;
    # op = x (or its prologue, `_prologue`, whose sums also store xs = x + x2), r = 1 or the norm's scale
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
    p_x2 = x2 + r_m[:, None] * s_x2m + o_k[None, :]  # [BM, BK]
    p_xs = xs + r_m[:, None] * s_xsm + o_k[None, :]  # [BM, BK]
    p_w = w + r_n[:, None] * s_wn + o_k[None, :]  # [BN, BK]
    m_store = o_m < tl.where(pid_n == 0, M, 0)  # one column of programs stores x + x2
    sq = tl.zeros([BM, BK], dtype=tl.float32)  # squares of the norm's input, per column of the K tile
    if SWAP:
        acc_t = tl.zeros([BN, BM], dtype=tl.float32)
    else:
        acc = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in range(pid_k * BK, K, split_k * BK):
        b_x, b_q = _load_k_tiles(p_x, p_w, k0, K, o_k, EVEN_K)
        if PRO != PRO_NONE:
            b_x, sq = _prologue(b_x, p_x2, p_xs, k0, K, o_k, m_store, sq, PRO, EVEN_K)
        if F32:  # fp32 x, or bf16 under the interpreter (it computes bf16 dots wrongly, triton 3.9)
            b_x = b_x.to(tl.float32)
        b_w = _weight_to(b_q, b_x.dtype, HAS_SCALES, MAGIC)  # exact for int8: |q| <= 127
        if SWAP:
            acc_t = tl.dot(b_w, tl.trans(b_x), acc_t, input_precision="ieee")  # [BN, BM]
        else:
            acc = tl.dot(b_x, tl.trans(b_w), acc, input_precision="ieee")  # [BM, BN]; ieee: fp32 stays fp32
    if SWAP:
        acc = tl.trans(acc_t)
    _epilogue(acc, tl.sum(sq, axis=1), s, b, y, ss_ws, o_m, o_n, M, N, K, eps, s_ym, pid_k, pid_n, ms_in, res, ms_out,
              s_rm, n_ms_in, HAS_SCALES, HAS_BIAS, PARTIAL, NORM, ROW_POW, T_IN, RESIDUAL)


@triton.jit(do_not_specialize=["M", "n_ms_in", "split_k"])
def _int8_gemv_kernel(x, x2, xs, w, s, b, y, ss_ws, ms_in, res, ms_out, M, N, K, eps, s_xm, s_x2m, s_xsm, s_wn,
                      s_ym, s_rm, n_ms_in, split_k, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                      EVEN_K: tl.constexpr, HAS_SCALES: tl.constexpr, HAS_BIAS: tl.constexpr, PARTIAL: tl.constexpr,
                      REDUCE_ONCE: tl.constexpr, MAGIC: tl.constexpr, PRO: tl.constexpr, NORM: tl.constexpr,
                      ROW_POW: tl.constexpr, T_IN: tl.constexpr, RESIDUAL: tl.constexpr, PDL: tl.constexpr):
    # y[m, n] as above without tensor cores: each [BN, BK] weight tile is loaded once for BM rows of x (PDL: BM = 1
    # only, `_gemv_one_row`)
    pid, pid_k = tl.program_id(0), tl.program_id(1)
    n_m = tl.cdiv(M, BM)
    pid_m, pid_n = pid % n_m, pid // n_m  # row blocks of one weight tile run side by side: they share it in L2
    o_m, o_n, o_k = pid_m * BM + tl.arange(0, BM), pid_n * BN + tl.arange(0, BN), tl.arange(0, BK)
    r_m = (o_m % M).to(tl.int64)
    r_n = (o_n % N).to(tl.int64)
    p_x = x + r_m[:, None] * s_xm + o_k[None, :]  # [BM, BK]
    p_x2 = x2 + r_m[:, None] * s_x2m + o_k[None, :]  # [BM, BK]
    p_xs = xs + r_m[:, None] * s_xsm + o_k[None, :]  # [BM, BK]
    p_w = w + r_n[:, None] * s_wn + o_k[None, :]  # [BN, BK]
    m_store = o_m < tl.where(pid_n == 0, M, 0)
    if BM == 1:
        acc, sq = _gemv_one_row(p_x, p_w, p_x2, p_xs, pid_k, split_k, K, o_k, m_store, BN, BK, HAS_SCALES, MAGIC, PRO,
                                EVEN_K, REDUCE_ONCE, PDL)
    else:
        acc, sq = _gemv_rows(p_x, p_w, p_x2, p_xs, pid_k, split_k, K, o_k, m_store, BM, BN, BK, HAS_SCALES, MAGIC,
                             PRO, EVEN_K, REDUCE_ONCE)
    _epilogue(acc, tl.sum(sq, axis=1), s, b, y, ss_ws, o_m, o_n, M, N, K, eps, s_ym, pid_k, pid_n, ms_in, res, ms_out,
              s_rm, n_ms_in, HAS_SCALES, HAS_BIAS, PARTIAL, NORM, ROW_POW, T_IN, RESIDUAL)


@triton.jit
def _gemv_one_row(p_x, p_w, p_x2, p_xs, pid_k, split_k, K, o_k, m_store, BN: tl.constexpr, BK: tl.constexpr,
                  HAS_SCALES: tl.constexpr, MAGIC: tl.constexpr, PRO: tl.constexpr, EVEN_K: tl.constexpr,
                  REDUCE_ONCE: tl.constexpr, PDL: tl.constexpr):
    """The gemv K loop for one row of x: (acc [1, BN], squares [1, BK]). Every tile is two-dimensional: with a
    [1, BN, BK] product Triton moved each converted weight tile through shared memory. PDL: the first K step is
    peeled off, its weight tile loaded before the wait for x's producer (`await_inputs`); these tiles are not
    software-pipelined, so the peel costs the loop nothing."""
    sq = tl.zeros([1, BK], dtype=tl.float32)
    acc = tl.zeros([BN, BK if REDUCE_ONCE else 1], dtype=tl.float32)
    k_start = pid_k * BK
    if PDL:  # masked loads: a K slice may have no step
        b_q = _k_tile(p_w, k_start, K, o_k, False)
        await_inputs(PDL)
        b_x = _k_tile(p_x, k_start, K, o_k, False)
        b_x, sq = _gemv_input(b_x, p_x2, p_xs, k_start, K, o_k, m_store, sq, PRO, False)
        acc = _gemv_row_step(acc, _weight_to(b_q, tl.float32, HAS_SCALES, MAGIC), b_x, REDUCE_ONCE)
        k_start += split_k * BK
    for k0 in range(k_start, K, split_k * BK):
        b_w, b_x, sq = _gemv_operands(p_x, p_w, p_x2, p_xs, k0, K, o_k, m_store, sq, HAS_SCALES, MAGIC, PRO, EVEN_K)
        acc = _gemv_row_step(acc, b_w, b_x, REDUCE_ONCE)
    return tl.sum(acc, axis=1)[None, :], sq


@triton.jit
def _gemv_row_step(acc, b_w, b_x, REDUCE_ONCE: tl.constexpr):
    # acc [BN, BK] (REDUCE_ONCE: products, reduced after the loop) or [BN, 1] += the weight tile b_w [BN, BK] x the
    # row b_x [1, BK]
    if REDUCE_ONCE:
        acc += b_w * b_x
    else:
        acc += tl.sum(b_w * b_x, axis=1, keep_dims=True)
    return acc


@triton.jit
def _gemv_rows(p_x, p_w, p_x2, p_xs, pid_k, split_k, K, o_k, m_store, BM: tl.constexpr, BN: tl.constexpr,
               BK: tl.constexpr, HAS_SCALES: tl.constexpr, MAGIC: tl.constexpr, PRO: tl.constexpr,
               EVEN_K: tl.constexpr, REDUCE_ONCE: tl.constexpr):
    """The gemv K loop for BM rows of x: (acc [BM, BN], squares [BM, BK])."""
    sq = tl.zeros([BM, BK], dtype=tl.float32)
    if REDUCE_ONCE:
        acc3 = tl.zeros([BM, BN, BK], dtype=tl.float32)
    else:
        acc = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in range(pid_k * BK, K, split_k * BK):
        b_w, b_x, sq = _gemv_operands(p_x, p_w, p_x2, p_xs, k0, K, o_k, m_store, sq, HAS_SCALES, MAGIC, PRO, EVEN_K)
        prod = b_w[None, :, :] * b_x[:, None, :]  # [BM, BN, BK]
        if REDUCE_ONCE:
            acc3 += prod
        else:
            acc += tl.sum(prod, axis=2)
    if REDUCE_ONCE:
        acc = tl.sum(acc3, axis=2)
    return acc, sq


@triton.jit
def _gemv_operands(p_x, p_w, p_x2, p_xs, k0, K, o_k, m_store, sq, HAS_SCALES: tl.constexpr, MAGIC: tl.constexpr,
                   PRO: tl.constexpr, EVEN_K: tl.constexpr):
    """The gemv kinds' operands at K offset k0: the weight tile [BN, BK] and the input rows (or their prologue)
    [BM, BK], both fp32, and the squares sq grown by this tile's."""
    b_x, b_q = _load_k_tiles(p_x, p_w, k0, K, o_k, EVEN_K)
    b_x, sq = _gemv_input(b_x, p_x2, p_xs, k0, K, o_k, m_store, sq, PRO, EVEN_K)
    return _weight_to(b_q, tl.float32, HAS_SCALES, MAGIC), b_x, sq


@triton.jit
def _gemv_input(b_x, p_x2, p_xs, k0, K, o_k, m_store, sq, PRO: tl.constexpr, EVEN_K: tl.constexpr):
    # the input tile the gemv kinds multiply: x's (or its prologue's, `_prologue`) in fp32, and the squares
    if PRO != PRO_NONE:
        b_x, sq = _prologue(b_x, p_x2, p_xs, k0, K, o_k, m_store, sq, PRO, EVEN_K)
    return b_x.to(tl.float32), sq


@triton.jit
def _prmt4(q):
    # the four bytes of each int32 word q as fp32 bit patterns 0x4B0000uu, uu = byte + 128 (bias-128, so unsigned)
    return tl.inline_asm_elementwise(
        asm="""{
        .reg .b32 u;
        xor.b32 u, $4, 0x80808080;
        prmt.b32 $0, u, 0x4B000000, 0x7540;
        prmt.b32 $1, u, 0x4B000000, 0x7541;
        prmt.b32 $2, u, 0x4B000000, 0x7542;
        prmt.b32 $3, u, 0x4B000000, 0x7543;
        }""",
        constraints="=r,=r,=r,=r,r", args=[q], dtype=(tl.int32, tl.int32, tl.int32, tl.int32), is_pure=True,
        pack=1)


@triton.jit
def _words_to_f32(q, ASM: tl.constexpr):
    """The four int8 bytes of each int32 word q [..] as exact fp32 tensors (byte 0 = the lowest column): each byte
    + 128 placed in the mantissa of 2²³ (0x4B0000uu = 2²³ + uu), then 2²³ + 128 subtracted. ASM: one `prmt` per
    byte (the GPU); else shifts and masks (the interpreter runs no inline PTX)."""
    if ASM:
        r0, r1, r2, r3 = _prmt4(q)
    else:
        u = q ^ -2139062144  # 0x80808080: every byte + 128
        r0 = (u & 0xFF) | 0x4B000000
        r1 = ((u >> 8) & 0xFF) | 0x4B000000
        r2 = ((u >> 16) & 0xFF) | 0x4B000000
        r3 = ((u >> 24) & 0xFF) | 0x4B000000
    return (r0.to(tl.float32, bitcast=True) - 8388736.0, r1.to(tl.float32, bitcast=True) - 8388736.0,
            r2.to(tl.float32, bitcast=True) - 8388736.0, r3.to(tl.float32, bitcast=True) - 8388736.0)


@triton.jit
def _word_byte_dot(acc, f, sq, x, x2, xs, r_m, s_xm, s_x2m, s_xsm, o_w, J: tl.constexpr, k0, K, m_store,
                   PRO: tl.constexpr, EVEN_K: tl.constexpr):
    # acc [BN, BW] += byte J of the weight words (f [BN, BW], columns 4w + J) x the row's columns 4w + J
    o_k = 4 * o_w + J
    p_x = x + r_m[:, None] * s_xm + o_k[None, :]  # [1, BW]: every 4th column
    if EVEN_K:
        b_x = tl.load(p_x + k0)
    else:
        b_x = tl.load(p_x + k0, mask=o_k[None, :] < K - k0, other=0.)
    if PRO != PRO_NONE:
        b_x, sq = _prologue(b_x, x2 + r_m[:, None] * s_x2m + o_k[None, :], xs + r_m[:, None] * s_xsm + o_k[None, :],
                            k0, K, o_k, m_store, sq, PRO, EVEN_K)
    return acc + f * b_x.to(tl.float32), sq


@triton.jit
def _word_tile(p_w, k0, K, o_w, EVEN_K: tl.constexpr):
    # the words [BN, BW] of K step k0 (columns past K read as 0)
    if EVEN_K:
        q = tl.load(p_w + k0 // 4)
    else:
        q = tl.load(p_w + k0 // 4, mask=4 * o_w[None, :] < K - k0, other=0)
    return q


@triton.jit
def _word_step(acc, sq, q, x, x2, xs, r_m, s_xm, s_x2m, s_xsm, o_w, k0, K, m_store, PRO: tl.constexpr,
               EVEN_K: tl.constexpr, ASM: tl.constexpr):
    # acc [BN, BW] += the words q [BN, BW] of K step k0, converted, x the row's four strided column tiles
    f0, f1, f2, f3 = _words_to_f32(q, ASM)
    acc, sq = _word_byte_dot(acc, f0, sq, x, x2, xs, r_m, s_xm, s_x2m, s_xsm, o_w, 0, k0, K, m_store, PRO, EVEN_K)
    acc, sq = _word_byte_dot(acc, f1, sq, x, x2, xs, r_m, s_xm, s_x2m, s_xsm, o_w, 1, k0, K, m_store, PRO, EVEN_K)
    acc, sq = _word_byte_dot(acc, f2, sq, x, x2, xs, r_m, s_xm, s_x2m, s_xsm, o_w, 2, k0, K, m_store, PRO, EVEN_K)
    acc, sq = _word_byte_dot(acc, f3, sq, x, x2, xs, r_m, s_xm, s_x2m, s_xsm, o_w, 3, k0, K, m_store, PRO, EVEN_K)
    return acc, sq


@triton.jit(do_not_specialize=["M", "n_ms_in", "split_k"])
def _int8_word_kernel(x, x2, xs, w, s, b, y, ss_ws, ms_in, res, ms_out, M, N, K, eps, s_xm, s_x2m, s_xsm, s_wn,
                      s_ym, s_rm, n_ms_in, split_k, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                      EVEN_K: tl.constexpr, HAS_SCALES: tl.constexpr, HAS_BIAS: tl.constexpr, PARTIAL: tl.constexpr,
                      PRO: tl.constexpr, NORM: tl.constexpr, ROW_POW: tl.constexpr, T_IN: tl.constexpr,
                      RESIDUAL: tl.constexpr, ASM: tl.constexpr, PDL: tl.constexpr):
    # "gemv_word": one row of x per program (BM = 1) and BN output rows, the int8 weight read as int32 words
    # w [N, K / 4] (row stride s_wn in words), four columns per load element, converted four at a time
    # (`_words_to_f32`); the row's columns 4w + j are read as four strided tiles. Every tile is two-dimensional
    # ([BN, BW]): a [1, BN, BW] accumulator made Triton move each converted weight tile through shared memory.
    # PDL: the first K step peeled off, its words loaded before the wait for x's producer (`_gemv_one_row`).
    tl.static_assert(BM == 1, "gemv_word reads one row of x per program")
    BW: tl.constexpr = BK // 4
    pid, pid_k = tl.program_id(0), tl.program_id(1)
    pid_m, pid_n = pid % M, pid // M
    o_m, o_n, o_w = pid_m + tl.arange(0, 1), pid_n * BN + tl.arange(0, BN), tl.arange(0, BW)
    r_m = o_m.to(tl.int64)
    p_w = w + (o_n % N).to(tl.int64)[:, None] * s_wn + o_w[None, :]  # [BN, BW] words
    m_store = o_m < tl.where(pid_n == 0, M, 0)
    sq = tl.zeros([1, BW], dtype=tl.float32)
    acc = tl.zeros([BN, BW], dtype=tl.float32)
    k_start = pid_k * BK
    if PDL:
        q = _word_tile(p_w, k_start, K, o_w, False)
        await_inputs(PDL)
        acc, sq = _word_step(acc, sq, q, x, x2, xs, r_m, s_xm, s_x2m, s_xsm, o_w, k_start, K, m_store, PRO, False, ASM)
        k_start += split_k * BK
    for k0 in range(k_start, K, split_k * BK):
        q = _word_tile(p_w, k0, K, o_w, EVEN_K)
        acc, sq = _word_step(acc, sq, q, x, x2, xs, r_m, s_xm, s_x2m, s_xsm, o_w, k0, K, m_store, PRO, EVEN_K, ASM)
    _epilogue(tl.sum(acc, axis=1)[None, :], tl.sum(sq, axis=1), s, b, y, ss_ws, o_m, o_n, M, N, K, eps, s_ym, pid_k,
              pid_n, ms_in, res, ms_out, s_rm, n_ms_in, HAS_SCALES, HAS_BIAS, PARTIAL, NORM, ROW_POW, T_IN, RESIDUAL)


@triton.jit(do_not_specialize=["M", "n_ms_in"])
def _splitk_reduce_kernel(ws, ss_ws, s, b, y, ms_in, res, ms_out, M, N, K, eps, s_ym, s_rm, n_ms_in,
                          SPLIT_K: tl.constexpr, BN: tl.constexpr, HAS_SCALES: tl.constexpr, HAS_BIAS: tl.constexpr,
                          NORM: tl.constexpr, ROW_POW: tl.constexpr, T_IN: tl.constexpr, RESIDUAL: tl.constexpr):
    # y[m, n] = r[m] s[n] Σ_i ws[i, m, n] (+ b[n]) for one row m and BN columns, then `_finish`; NORM: r from
    # Σ_i ss_ws[i, m]
    pid_n = tl.program_id(1)
    o_m, o_n = tl.program_id(0) + tl.arange(0, 1), pid_n * BN + tl.arange(0, BN)  # o_m [1]: this row
    m_n = o_n < N
    acc = tl.zeros([1, BN], dtype=tl.float32)
    ss = tl.zeros([1], dtype=tl.float32)
    for i in tl.static_range(SPLIT_K):
        acc += tl.load(ws + (i * M + o_m.to(tl.int64))[:, None] * N + o_n[None, :], mask=m_n[None, :], other=0.)
        if NORM:
            ss += tl.load(ss_ws + i * M + o_m)
    if NORM:
        acc *= tl.rsqrt(ss / K + eps)[:, None]
    acc = _finish(acc, o_m, o_n, tl.where(m_n, o_n, 0), M, N, eps, s, b, ms_in, res, ms_out, s_rm, n_ms_in, pid_n,
                  HAS_SCALES, HAS_BIAS, ROW_POW, T_IN, RESIDUAL, y.dtype.element_ty)
    tl.store(y + o_m.to(tl.int64)[:, None] * s_ym + o_n[None, :], acc.to(y.dtype.element_ty), mask=m_n[None, :])


@triton.jit
def _dequant_kernel(w, s, out, N, K, s_wn, BN: tl.constexpr, BK: tl.constexpr):
    # out[n, k] = q[n, k] · s[n], rounded once to out's dtype
    o_n = tl.program_id(0) * BN + tl.arange(0, BN)
    o_k = tl.program_id(1) * BK + tl.arange(0, BK)
    m = (o_n[:, None] < N) & (o_k[None, :] < K)
    q = tl.load(w + o_n.to(tl.int64)[:, None] * s_wn + o_k[None, :], mask=m, other=0)
    sc = tl.load(s + o_n, mask=o_n < N, other=0.).to(tl.float32)
    tl.store(out + o_n.to(tl.int64)[:, None] * K + o_k[None, :], (q.to(tl.float32) * sc[:, None]).to(
        out.dtype.element_ty), mask=m)


class Config(NamedTuple):
    """One launch: `kind` (KINDS), tile [BM, BN] x BK, K split in SPLIT_K slices (0: `auto_split` picks),
    Triton warps and stages, `magic` int8 conversion. "gemv" kinds: BM rows of x per program (any power of 2;
    "gemv_word": 1);
    "dot" kinds: BM >= 16. "deq": [BN, BK] tiles of the dequantising kernel (BM, SPLIT_K unused)."""
    BM: int
    BN: int
    BK: int
    SPLIT_K: int = 1
    GROUP_M: int = 8
    num_warps: int = 4
    num_stages: int = 4
    kind: str = "dot"
    magic: bool = False


def config_src(cfg: Config) -> str:
    """`cfg` as the Python source the `CONFIGS` table uses (fields at their default left out)."""
    extra = [f'{k}="{v}"' if isinstance(v, str) else f"{k}={v!r}" for k, v in cfg._asdict().items()
             if k not in ("BM", "BN", "BK") and v != Config._field_defaults[k]]
    return f"Config({', '.join([str(cfg.BM), str(cfg.BN), str(cfg.BK), *extra])})"


# M buckets: a product with M rows uses the first bucket >= M (None: any larger M).
M_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 160, 256, 512, None)
# Shape classes by N and K (the tnl-7b Linears fall in distinct classes: qkvu_proj n16k.k4k, out_proj n4k.k4k,
# l1/l2 n12k.k4k, the GLU's packed l1|l2 (what CUDA decode runs, `GLU.pack`) n24k.k4k, l3 n4k.kbig, lm_head
# nbig.k4k; tnl-1b's out_proj and l3 are n2k.k4k and n2k.kbig).
N_CLASSES = ((2048, "n2k"), (4096, "n4k"), (12288, "n12k"), (16384, "n16k"), (24576, "n24k"), (None, "nbig"))
K_CLASSES = ((4096, "k4k"), (None, "kbig"))


def shape_class(N: int, K: int) -> str:
    """The `CONFIGS` shape class of an [N, K] weight, e.g. "n16k.k4k"."""
    n = next(name for top, name in N_CLASSES if top is None or N <= top)
    k = next(name for top, name in K_CLASSES if top is None or K <= top)
    return f"{n}.{k}"


def _wider(shape: str) -> str:
    """The class whose rows serve a class without rows of its own: n2k takes n4k's (only the float one-row
    products were swept at N <= 2,048), every other class the "*" row."""
    return "n4k." + shape[4:] if shape.startswith("n2k.") else "*"


def m_bucket(M: int) -> int | None:
    return next(top for top in M_BUCKETS if top is None or M <= top)


# (M bucket, shape class) -> Config; "*" is any shape class without a row of its own. The rows are bench/int8_sweep.py's
# output on an H200 (triton 3.6; bench/results/int8-sweep-h200.json.gz): per tnl-7b Linear and M, the fastest tile
# as CUDA-graph replays over weights too large for L2 (its time and bf16's in the comment);
# a "*" row is the one tile closest to every shape's best (geometric mean); the 32 row was not swept. The M = 1 rows
# of the tnl-7b shapes come from a sweep of that M alone with the one-row gemv kinds on two-dimensional tiles
# (bench/results/int8-sweep-m1-h200.json.gz).
CONFIGS: dict[tuple[int | None, str], Config] = {
    (1, "n16k.k4k"): Config(1, 64, 512, num_warps=8, num_stages=1, kind="gemv_word"),  # qkvu_proj M=1: 20.5 us bf16 35
    (2, "n16k.k4k"): Config(16, 128, 256),  # qkvu_proj M=2: 22.4 us bf16 34.2 us
    (4, "n16k.k4k"): Config(16, 128, 256),  # qkvu_proj M=4: 21.1 us bf16 34.3 us
    (8, "n16k.k4k"): Config(16, 128, 256),  # qkvu_proj M=8: 21.3 us bf16 34.5 us
    (16, "n16k.k4k"): Config(16, 128, 256),  # qkvu_proj M=16: 21.8 us bf16 34.6 us
    (512, "n16k.k4k"): Config(1, 32, 256, kind="deq"),  # qkvu_proj M=512: 141.0 us bf16 90.2 us
    (None, "n16k.k4k"): Config(1, 32, 256, kind="deq"),  # qkvu_proj M=4096: 839.0 us bf16 695.9 us
    (1, "n4k.k4k"): Config(1, 8, 1024, num_stages=1, kind="gemv_once", magic=True),  # out_proj M=1: 8.1 us bf16 13.3 us
    (2, "n4k.k4k"): Config(16, 128, 128, SPLIT_K=8, num_warps=8, num_stages=3),  # out_proj M=2: 10.1 us bf16 13.2 us
    (4, "n4k.k4k"): Config(16, 128, 128, SPLIT_K=8, num_warps=8, num_stages=3),  # out_proj M=4: 10.1 us bf16 13.2 us
    (8, "n4k.k4k"): Config(16, 64, 128, SPLIT_K=4, num_stages=5),  # out_proj M=8: 9.7 us bf16 13.2 us
    (16, "n4k.k4k"): Config(16, 64, 128, SPLIT_K=4, num_stages=5),  # out_proj M=16: 9.7 us bf16 13.3 us
    (512, "n4k.k4k"): Config(1, 32, 256, kind="deq"),  # out_proj M=512: 37.3 us bf16 24.2 us
    (None, "n4k.k4k"): Config(1, 32, 256, kind="deq"),  # out_proj M=4096: 202.4 us bf16 171.1 us
    (1, "n12k.k4k"): Config(16, 128, 128, SPLIT_K=4, num_warps=8, num_stages=3),  # l1/l2 M=1: 18.8 us bf16 24.9 us
    (2, "n12k.k4k"): Config(16, 128, 128, SPLIT_K=4, num_stages=3),  # l1/l2 M=2: 18.6 us bf16 25.4 us
    (4, "n12k.k4k"): Config(16, 128, 128, SPLIT_K=4, num_stages=3),  # l1/l2 M=4: 17.5 us bf16 25.7 us
    (8, "n12k.k4k"): Config(16, 128, 128, SPLIT_K=4, num_stages=3),  # l1/l2 M=8: 17.6 us bf16 25.3 us
    (16, "n12k.k4k"): Config(16, 128, 128, SPLIT_K=4, num_stages=3),  # l1/l2 M=16: 18.4 us bf16 25.5 us
    (512, "n12k.k4k"): Config(1, 64, 256, num_warps=8, kind="deq"),  # l1/l2 M=512: 94.8 us bf16 59.5 us
    (None, "n12k.k4k"): Config(1, 64, 256, num_warps=8, kind="deq"),  # l1/l2 M=4096: 564.8 us bf16 470.7 us
    (1, "n4k.kbig"): Config(1, 8, 1024, num_stages=1, kind="gemv_once", magic=True),  # l3 M=1: 17.6 us bf16 27.8 us
    (2, "n4k.kbig"): Config(16, 128, 128, SPLIT_K=8),  # l3 M=2: 17.5 us bf16 28.1 us
    (4, "n4k.kbig"): Config(16, 128, 128, SPLIT_K=8),  # l3 M=4: 17.5 us bf16 28.3 us
    (8, "n4k.kbig"): Config(16, 128, 256, SPLIT_K=4),  # l3 M=8: 17.4 us bf16 28.4 us
    (16, "n4k.kbig"): Config(16, 128, 256, SPLIT_K=4),  # l3 M=16: 17.5 us bf16 29.1 us
    (512, "n4k.kbig"): Config(1, 64, 256, num_warps=8, kind="deq"),  # l3 M=512: 94.1 us bf16 59.5 us
    (None, "n4k.kbig"): Config(1, 64, 256, num_warps=8, kind="deq"),  # l3 M=4096: 528.9 us bf16 442.9 us
    (1, "nbig.k4k"): Config(1, 32, 256, num_stages=1, kind="gemv_word"),  # lm_head M=1: 66.3 us bf16 151.9 us
    (2, "nbig.k4k"): Config(16, 256, 128, num_warps=8, num_stages=3),  # lm_head M=2: 68.8 us bf16 126.2 us
    (4, "nbig.k4k"): Config(16, 128, 256, num_stages=3),  # lm_head M=4: 68.0 us bf16 126.5 us
    (8, "nbig.k4k"): Config(16, 128, 256, num_stages=3),  # lm_head M=8: 68.2 us bf16 127.7 us
    (16, "nbig.k4k"): Config(16, 128, 256, num_stages=3),  # lm_head M=16: 68.6 us bf16 128.7 us
    (512, "nbig.k4k"): Config(1, 32, 256, kind="deq"),  # lm_head M=512: 548.6 us bf16 344.3 us
    (None, "nbig.k4k"): Config(1, 32, 256, kind="deq"),  # lm_head M=4096: 3246.3 us bf16 2646.1 us
    # packed l1|l2 (n24k), swept on its own (bench/results/int8-sweep-l12-h200.json.gz): µs per call, bf16's, and
    # what the lm_head's tiles it ran before took
    (1, "n24k.k4k"): Config(1, 64, 256, num_warps=8, num_stages=1, kind="gemv_word"),  # 27.3 us; bf16 47.7; was 32.9
    (2, "n24k.k4k"): Config(16, 128, 128, SPLIT_K=4),  # 32.2 us; bf16 48.7; was 36.6
    (4, "n24k.k4k"): Config(16, 128, 128, SPLIT_K=2, num_stages=3),  # 30.0 us; bf16 47.5; was 32.9
    (8, "n24k.k4k"): Config(16, 128, 128, SPLIT_K=2, num_stages=3),  # 30.0 us; bf16 47.8; was 33.0
    (16, "n24k.k4k"): Config(16, 128, 128, SPLIT_K=2, num_stages=3),  # 29.8 us; bf16 47.9; was 32.9
    (512, "n24k.k4k"): Config(1, 32, 256, kind="deq"),
    (None, "n24k.k4k"): Config(1, 32, 256, kind="deq"),
    (1, "*"): Config(16, 128, 128, SPLIT_K=8, num_stages=3),  # M=1: geomean 1.070x of each shape's best
    (2, "*"): Config(16, 128, 128, SPLIT_K=8, num_stages=3, magic=True),  # M=2: geomean 1.121x of each shape's best
    (4, "*"): Config(16, 128, 128, SPLIT_K=8, num_stages=3, magic=True),  # M=4: geomean 1.134x of each shape's best
    (8, "*"): Config(16, 128, 128, SPLIT_K=4, num_stages=3, magic=True),  # M=8: geomean 1.146x of each shape's best
    (16, "*"): Config(16, 128, 128, SPLIT_K=4, num_stages=3, magic=True),  # M=16: geomean 1.152x of each shape's best
    (512, "*"): Config(1, 32, 256, kind="deq"),  # M=512: geomean 1.001x of each shape's best
    (None, "*"): Config(1, 32, 256, kind="deq"),  # M=4096: geomean 1.004x of each shape's best
    (32, "*"): Config(32, 64, 128, SPLIT_K=0),
    # A packed step's rows with a 32-id prompt chunk (the int8 default on CUDA: up to 64), swept at M = 40
    # (bench/results/int8-sweep-mid-h200.json.gz): µs per call, bf16's, and what the old "*" row took
    (64, "n16k.k4k"): Config(64, 128, 64, SPLIT_K=2),  # qkvu_proj M=40: 34.0 us; bf16 35.4; was 34.0
    (64, "n4k.k4k"): Config(64, 128, 64, SPLIT_K=8),  # out_proj M=40: 13.3 us; bf16 14.2; was 13.3
    (64, "n12k.k4k"): Config(64, 128, 64, SPLIT_K=4, num_stages=3),  # l1/l2 M=40: 25.9 us; bf16 26.3; was 31.8
    (64, "n24k.k4k"): Config(64, 128, 64, SPLIT_K=2, num_stages=3),  # l1|l2 M=40: 45.2 us; bf16 47.4; was 53.0
    (64, "n4k.kbig"): Config(64, 128, 64, SPLIT_K=8),  # l3 M=40: 24.3 us; bf16 27.9; was 24.3
    (64, "nbig.k4k"): Config(64, 128, 128, num_stages=3),  # lm_head M=40: 111.1 us; bf16 151.7; was 144.1
    (64, "*"): Config(64, 128, 64, SPLIT_K=4),  # M=40: geomean 1.155x of each shape's best
    # A packed step's rows (decode rows + a prompt chunk of 128: up to 160) and up to 256, swept on their own
    # (bench/results/int8-sweep-m160-h200.json.gz): µs per call, bf16's, and what the "deq" rows they used took
    (160, "n16k.k4k"): Config(64, 128, 64),  # qkvu_proj M=160: 69.9 us; bf16 40.9; was 97.3
    (160, "n4k.k4k"): Config(128, 64, 64, SPLIT_K=2),  # out_proj M=160: 27.4 us; bf16 18.7; was 31.8
    (160, "n12k.k4k"): Config(64, 128, 64),  # l1/l2 M=160: 50.9 us; bf16 30.8; was 69.7
    (160, "n24k.k4k"): Config(64, 256, 64),  # l1|l2 M=160: 88.4 us; bf16 53.7; was 127.0
    (160, "n4k.kbig"): Config(128, 64, 64, SPLIT_K=2),  # l3 M=160: 63.7 us; bf16 33.4; was 71.4
    (160, "nbig.k4k"): Config(64, 256, 64),  # lm_head M=160: 256.8 us; bf16 157.3; was 353.0
    (160, "*"): Config(64, 128, 64, SPLIT_K=2),  # M=160: geomean 1.189x of each shape's best
    (256, "n16k.k4k"): Config(256, 128, 64, num_warps=8),  # qkvu_proj M=256: 76.6 us; bf16 48.0; was 101.8
    (256, "n4k.k4k"): Config(1, 64, 256, num_warps=8, kind="deq"),  # out_proj M=256: 27.7 us; bf16 18.1
    (256, "n12k.k4k"): Config(64, 128, 64),  # l1/l2 M=256: 67.8 us; bf16 33.0; was 70.0
    (256, "n24k.k4k"): Config(128, 128, 64, num_warps=8, kind="dot_t"),  # l1|l2 M=256: 128.4 us; bf16 63.0; was 135.6
    (256, "n4k.kbig"): Config(128, 64, 64, SPLIT_K=2),  # l3 M=256: 64.4 us; bf16 37.3; was 78.5
    (256, "nbig.k4k"): Config(256, 128, 64, num_warps=8),  # lm_head M=256: 295.6 us; bf16 183.3; was 388.5
    (256, "*"): Config(1, 32, 256, kind="deq"),  # M=256: geomean 1.149x of each shape's best
}
# The same kernel on float weights (a float model's one-row products, and its products fused with the op before
# them, `prologue_linear_triton`): tiles sized for 2-byte weights (`bench/int8_sweep.py --weights bf16` sweeps the
# plain product's); the l3 rows at 2-16 rows come from bench/prologue_ab.py's tiles on an H200 (tnl-7b, bf16, µs
# fused; composed): at 16 rows 29.2; 32.3 (tnl-1b's l3, 5632 -> 2048, at 16 rows the same tile: 12.3; 13.1).
FLOAT_CONFIGS: dict[tuple[int | None, str], Config] = {
    # one row: the best plain product per shape of a sweep of that M (bench/results/float-sweep-m1-h200.json.gz; µs
    # tnl-7b, tnl-1b; cuBLAS's): the one-row gemv tiles, which beat cuBLAS at every shape
    (1, "n16k.k4k"): Config(1, 8, 1024, num_stages=1, kind="gemv"),  # q|k|v|u 34.9; 35.6
    (1, "n24k.k4k"): Config(1, 64, 256, num_warps=8, num_stages=1, kind="gemv"),  # l1|l2 45.9; 50.9
    (1, "n12k.k4k"): Config(1, 8, 512, num_stages=1, kind="gemv"),  # tnl-1b q|k|v|u 10.4, l1|l2 14.4; 11.5, 14.2
    (1, "nbig.k4k"): Config(1, 8, 1024, num_stages=1, kind="gemv"),  # lm_head 122.7, 62.5; 153.2, 77.5
    # one row of out_proj and l3, which decode runs with their prologue (the gated norm, the GLU product): the
    # fastest fused tile per shape (bench/results/prologue-ab-m1-h200.json; µs fused; the plain product's tile
    # with the prologue)
    (1, "n4k.k4k"): Config(1, 8, 512, num_stages=1, kind="gemv_once"),  # tnl-7b out_proj 12.8; 13.4
    (1, "n2k.k4k"): Config(1, 8, 1024, num_stages=1, kind="gemv_once"),  # tnl-1b out_proj 5.5; 6.2
    (1, "n4k.kbig"): Config(1, 8, 1024, num_stages=1, kind="gemv"),  # tnl-7b l3 25.6; 32.0
    (1, "n2k.kbig"): Config(1, 8, 1024, num_stages=1, kind="gemv_once"),  # tnl-1b l3 9.2; 12.4
    **{(bucket, "n4k.kbig"): Config(16, 64, 128, SPLIT_K=4, num_stages=3) for bucket in (2, 4, 8, 16)},
    # out_proj at 2-16 rows, which decode runs with the gated norm: the fastest fused tile at 2 and 16 rows
    # (bench/results/prologue-ab-m16-h200.json, 36 tiles; µs fused at 2 / 16 rows; the "*" tile's): tnl-7b 16.1 / 15.7;
    # 20.3 / 20.3, tnl-1b 6.8 / 9.1; 9.0 / 9.1 (at 2 rows its one-row gemv tile reads both rows)
    **{(bucket, "n4k.k4k"): Config(16, 128, 128, SPLIT_K=4, num_stages=3) for bucket in (2, 4, 8, 16)},
    (2, "n2k.k4k"): Config(1, 8, 512, num_stages=1, kind="gemv_once"),
    **{(bucket, "n2k.k4k"): Config(16, 64, 128, SPLIT_K=4, num_stages=3) for bucket in (4, 8, 16)},
    **{(bucket, "*"): Config(16, 64, 128, SPLIT_K=4, num_stages=3) for bucket in (1, 2, 4, 8, 16)},
    **{(bucket, "*"): Config(64, 128, 64, num_stages=3) for bucket in M_BUCKETS[5:]},
}
DECODE_MAX_M = 16


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def auto_split(cfg: Config, M: int, N: int, K: int, device: torch.device) -> int:
    """K slices while the tiles leave SMs idle: 2, 4 or 8 while the programs do not yet reach 4 per SM (M <= 16:
    more loads in flight) or 1 per SM (GEMM tiles), keeping at least 8 BK steps per slice."""
    programs = triton.cdiv(M, cfg.BM) * triton.cdiv(N, cfg.BN)
    target = (4 if M <= DECODE_MAX_M else 1) * _sm_count(device)
    steps, split = triton.cdiv(K, cfg.BK), 1
    while split < 8 and programs * split < target and steps // (2 * split) >= 8:
        split *= 2
    return split


@functools.lru_cache(maxsize=4096)  # host time: this runs on every eager call
def choose_config(M: int, N: int, K: int, device: torch.device, int8: bool = True) -> Config:
    """The launch configuration for an [M, K] x [N, K]ᵀ product on `device` (a pure function of the shapes):
    the row of (m_bucket(M), shape_class(N, K)), else of its `_wider` class, else of (m_bucket(M), "*"), in
    `CONFIGS` (int8 weights) or `FLOAT_CONFIGS`; SPLIT_K 0 -> `auto_split`.

    Under the interpreter the row's kind with 16-wide tiles (BM <= 16) and 2 K slices for M <= 16, so that tests
    at small shapes walk several K steps, N tiles and slices.
    """
    bucket = m_bucket(M)
    table = CONFIGS if int8 else FLOAT_CONFIGS
    shape = shape_class(N, K)
    cfg = table.get((bucket, shape)) or table.get((bucket, _wider(shape))) or table[(bucket, "*")]
    if triton_interpreted(device):
        split = 2 if M <= DECODE_MAX_M and K > 32 and cfg.kind != "deq" else 1
        bm = 16 if cfg.kind in ("dot", "dot_t") else min(cfg.BM, 16)
        return cfg._replace(BM=bm, BN=16, BK=16, SPLIT_K=split, GROUP_M=2, num_stages=1)
    if cfg.SPLIT_K == 0:
        cfg = cfg._replace(SPLIT_K=auto_split(cfg, M, N, K, device))
    return cfg


def int8_linear_triton(x, weight, scales, bias=None):
    """Weight-only int8 Linear on the GPU: y = (x @ weightᵀ) · scales (+ bias), fp32 accumulation.

    Args:
        x: [..., K] bf16, fp16 or fp32 (fp32 products are exact fp32, no tf32); any leading shape.
        weight: [N, K] int8 with a contiguous last dim; scales: [N] float; bias: None or [N] float.
    Returns:
        y: [..., N] in x.dtype. Allocates only y (and a workspace sized by the shapes); no host sync.
    """
    return _linear(x, weight, scales, bias)


def prologue_linear_triton(x, weight, scales=None, bias=None, *, prologue="none", other=None, eps=1e-6, row_ms=None,
                           row_power=1, residual=None):
    """`reference.prologue_linear_ref` in one product kernel (plus split-K's reduce): the prologue's elementwise
    ops run on each input tile, and a norm's per-row scale rsqrt(mean(squares) + eps) multiplies the accumulated
    fp32 row (W·(r·h) = r·(W·h)), so the normed input is never written. "add_norm" also stores s = x + other
    (each element by one program). weight: [N, K] int8 with scales [N], or float (x's dtype) with scales None.
    row_ms / residual: the deferred-norm epilogue; with a residual each output tile (each column block of the
    split-K reduce) writes its rows' partial mean squares, ms [T, M] with T = the number of tiles along N.

    Returns y [..., N] in x.dtype, (s, y) for "add_norm", (y, ms) with a residual; allocates only those (and the
    split-K workspace).
    """
    return _linear(x, weight, scales, bias, prologue=prologue, other=other, eps=eps, row_ms=row_ms,
                   row_power=row_power, residual=residual)


def _int8_linear(x, weight, scales, bias=None, config: Config | None = None, warmup: bool = False):
    """`int8_linear_triton` with an optional forced `config` (bench/int8_sweep.py, tests). warmup: compile the
    kernels this call would launch and launch nothing (returns None)."""
    return _linear(x, weight, scales, bias, config=config, warmup=warmup)


def _linear(x, weight, scales, bias=None, *, prologue="none", other=None, eps=1e-6, row_ms=None, row_power=1,
            residual=None, config: Config | None = None, warmup: bool = False):
    """The launcher behind `int8_linear_triton` and `prologue_linear_triton`, with an optional forced `config`."""
    x2, other2 = _rows(x, weight, scales, bias, prologue, other)  # [M, K] each
    ref.check_epilogue(x, weight, prologue, row_ms, row_power, residual)
    (M, K), N = x2.shape, weight.shape[0]
    sum_shape = x.shape if prologue == "add_norm" else None
    xs = torch.empty(M, K, dtype=x.dtype, device=x.device) if sum_shape else x2  # [M, K]: add_norm's s = x + other
    epilogue = row_ms is not None or residual is not None
    if M == 0 or N == 0 or K == 0:  # a product over nothing (with an epilogue: the twin's result is exact)
        if warmup or not epilogue:
            return None if warmup else _empty_product(x, x2, other2, xs, N, bias, sum_shape)
        return ref.prologue_linear_ref(x, weight, scales, bias, prologue=prologue, other=other, eps=eps,
                                       row_ms=row_ms, row_power=row_power, residual=residual)
    cfg = _launch_config(config, M, N, K, weight, prologue, x.device)
    if cfg.kind == "deq":
        if prologue != "none" or scales is None or epilogue:
            raise ValueError('kind "deq" serves a plain int8 product only')
        return _deq_linear(x2, weight, scales, bias, cfg, warmup, x.shape)
    pro, norm = PROLOGUES.index(prologue), prologue in ref.NORM_PROLOGUES
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)  # [M, N]
    split = cfg.SPLIT_K
    ws = y if split == 1 else torch.empty(split, M, N, dtype=torch.float32, device=x.device)  # [split, M, N]
    ss_ws = torch.empty(split, M, dtype=torch.float32, device=x.device) if norm and split > 1 else ws  # [split, M]
    reduce_bn = min(triton.next_power_of_2(N), 16 if triton_interpreted(x.device) else 1024)
    tiles_n = triton.cdiv(N, cfg.BN if split == 1 else reduce_bn)
    ms_in, res, ms_out, deferred = _deferred_norm_buffers(y, row_ms, row_power, residual, tiles_n)
    s, b = (y if t is None else t for t in (scales, bias))  # placeholders for absent tensors, never read
    finish = dict(deferred, HAS_SCALES=scales is not None, HAS_BIAS=bias is not None, NORM=norm)
    w = weight.view(torch.int32) if cfg.kind == "gemv_word" else weight  # "gemv_word" reads [N, K / 4] words
    args = (x2, other2, xs, w, s, b, ws, ss_ws, ms_in, res, ms_out, M, N, K, eps, x2.stride(0), other2.stride(0),
            xs.stride(0), w.stride(0), y.stride(0), res.stride(0), ms_in.shape[0], split)
    common = dict(finish, BM=cfg.BM, BN=cfg.BN, BK=cfg.BK, EVEN_K=K % cfg.BK == 0, PARTIAL=split > 1,
                  MAGIC=cfg.magic, PRO=pro, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if split > 1:  # the kernel stores partial sums; the reduce applies the epilogue (one compiled kernel for all)
        common.update(ROW_POW=0, T_IN=1, RESIDUAL=False)
    grid = (triton.cdiv(M, cfg.BM) * triton.cdiv(N, cfg.BN), split)
    if cfg.kind in ("dot", "dot_t"):
        f32 = x.dtype == torch.float32 or (x.dtype == torch.bfloat16 and triton_interpreted(x.device))
        kernel, meta = _int8_mm_kernel, dict(common, GROUP_M=cfg.GROUP_M, F32=f32, SWAP=cfg.kind == "dot_t")
    else:  # the gemv kinds; one row per program may start before the kernel ahead of it ends (`kernels._pdl`)
        mode = pdl(x.device, "int8" if weight.dtype == torch.int8 else "float") if cfg.BM == 1 else OFF
        common.update(PDL=mode, **({"launch_pdl": True} if mode == CHAINED else {}))
        if cfg.kind == "gemv_word":
            common.pop("MAGIC")
            kernel, meta = _int8_word_kernel, dict(common, ASM=not triton_interpreted(x.device))
        else:
            kernel, meta = _int8_gemv_kernel, dict(common, REDUCE_ONCE=cfg.kind == "gemv_once")
    _launch(kernel, grid, args, meta, warmup)
    if split > 1:
        _launch(_splitk_reduce_kernel, (M, tiles_n), (ws, ss_ws, s, b, y, ms_in, res, ms_out, M, N, K, eps,
                                                      y.stride(0), res.stride(0), ms_in.shape[0]),
                dict(finish, SPLIT_K=split, BN=reduce_bn, num_warps=4), warmup)
    if warmup:
        return None
    return (_shaped(x, y, xs, None), ms_out) if residual is not None else _shaped(x, y, xs, sum_shape)


def _reads_words(weight: torch.Tensor, prologue: str) -> bool:
    """Whether "gemv_word" serves this product: an int8 weight whose rows view as int32 words (K, the row stride
    and the offset multiples of 4), and no "add_norm" (whose stored sum it does not write); else the launcher runs
    the same tile as "gemv_once"."""
    return (weight.dtype == torch.int8 and prologue != "add_norm" and weight.shape[1] % 4 == 0
            and weight.stride(0) % 4 == 0 and weight.storage_offset() % 4 == 0 and weight.data_ptr() % 4 == 0)


def _launch_config(config: Config | None, M: int, N: int, K: int, weight: torch.Tensor, prologue: str,
                   device: torch.device) -> Config:
    """The forced `config` (checked, its split resolved), else `choose_config`'s; "gemv_word" where it cannot
    serve (`_reads_words`) runs its tile as "gemv_once"."""
    cfg = config or choose_config(M, N, K, device, weight.dtype == torch.int8)
    if cfg.kind not in KINDS:
        raise ValueError(f"unknown kind {cfg.kind!r}; one of {KINDS}")
    if cfg.kind == "gemv_word" and cfg.BM != 1:
        raise ValueError(f"kind \"gemv_word\" reads one row of x per program (BM = 1), got {cfg}")
    if cfg.kind == "gemv_word" and not _reads_words(weight, prologue):
        cfg = cfg._replace(kind="gemv_once", magic=True)
    return cfg._replace(SPLIT_K=auto_split(cfg, M, N, K, device)) if cfg.SPLIT_K == 0 else cfg


def _deferred_norm_buffers(y, row_ms, row_power, residual, tiles_n):
    """(ms_in [T_in, M], res [M, N], ms_out [tiles_n, M], their constexprs) of the deferred-norm epilogue, y [M, N]
    standing in for what is absent (never read or written then)."""
    M, N = y.shape
    ms_in = y if row_ms is None else row_ms.contiguous()  # [T_in, M]
    res = y if residual is None else residual.reshape(M, N)  # [M, N]
    if res.stride(-1) != 1:
        res = res.contiguous()
    ms_out = y if residual is None else torch.empty(tiles_n, M, dtype=torch.float32, device=y.device)  # [T, M]
    meta = dict(ROW_POW=0 if row_ms is None else row_power, RESIDUAL=residual is not None,
                T_IN=1 if row_ms is None else triton.next_power_of_2(len(row_ms)))
    return ms_in, res, ms_out, meta


def _empty_product(x, x2, other2, xs, N, bias, sum_shape):
    """The result of a product with no rows, outputs or inputs: a sum over nothing (+ bias)."""
    M = x2.shape[0]
    if sum_shape:
        torch.add(x2, other2, out=xs)
    y = torch.zeros(M, N, dtype=x.dtype, device=x.device)
    if M and N and bias is not None:
        y.copy_(bias.expand(M, N))
    return _shaped(x, y, xs, sum_shape)


def _shaped(x, y, xs, sum_shape):
    """y [M, N] as [..., N] of x's leading shape, after add_norm's sum xs [M, K] in x's shape."""
    y = y.reshape(*x.shape[:-1], y.shape[-1])
    return y if sum_shape is None else (xs.reshape(sum_shape), y)


def _rows(x, weight, scales, bias, prologue="none", other=None):
    """The checked inputs' x and other (x itself where there is none) as [M, K] rows with a contiguous last dim
    (views when their last dim is contiguous)."""
    ref.check_prologue(prologue, x, other)  # other: x's shape, dtype and device
    if weight.dtype == torch.int8 or scales is not None:
        ref.check_int8_linear(x, weight, scales, bias)
    else:
        _check_float_weight(x, weight, bias)
    if x.dtype not in DTYPES:
        raise TypeError(f"int8_linear_triton supports x in {[str(d) for d in DTYPES]}, got {x.dtype}")
    if weight.stride(1) != 1:
        raise ValueError("weight needs a contiguous last dim (K)")
    rows = []
    for t in (x, x if other is None else other):
        t2 = t.reshape(-1, weight.shape[1])
        rows.append(t2 if t2.stride(-1) == 1 else t2.contiguous())
    return rows


def _check_float_weight(x, weight, bias):
    """What `reference.check_int8_linear` checks of an int8 weight, for a float one of x's dtype (no scales)."""
    if weight.dtype != x.dtype:
        raise TypeError(f"a float weight must have x's dtype and no scales; got x {x.dtype}, weight {weight.dtype}")
    if weight.dim() != 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(f"expected x [..., K] and weight [N, K]; got x {tuple(x.shape)}, weight {tuple(weight.shape)}")
    devices = {t.device for t in (x, weight, bias) if t is not None}
    if len(devices) > 1:
        raise ValueError(f"every input must be on one device, got {sorted(map(str, devices))}")


def _launch(kernel, grid, args, meta, warmup):
    if warmup:
        kernel.warmup(*args, grid=grid, **meta)
    else:
        kernel[grid](*args, **meta)


def _deq_linear(x2, weight, scales, bias, cfg, warmup, shape):
    """kind "deq": w = q · s in x's dtype (a workspace [N, K]), then y = F.linear(x, w, bias) on cuBLAS."""
    N, K = weight.shape
    w = torch.empty(N, K, dtype=x2.dtype, device=x2.device)
    grid = (triton.cdiv(N, cfg.BN), triton.cdiv(K, cfg.BK))
    _launch(_dequant_kernel, grid, (weight, scales, w, N, K, weight.stride(0)),
            dict(BN=cfg.BN, BK=cfg.BK, num_warps=cfg.num_warps), warmup)
    if warmup:
        return None
    y = F.linear(x2, w, None if bias is None else bias.to(x2.dtype))
    return y.reshape(*shape[:-1], N)
