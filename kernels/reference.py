"""Pure-PyTorch Lightning Attention: the oracle, the CPU production path and the decode step.

Every Triton kernel in this package has a twin here with the same signature; tests compare them.

Notation: B batch, T time, H heads, D q/k head dim, E v head dim, N sequences (varlen).

The op (per batch element and head, rate s_h >= 0, log_decay a_h = -s_h, lambda_h = exp(a_h)):
    S_t = lambda_h * S_{t-1} + k_t^T v_t          # state [D, E], fp32
    o_t = q_t S_t                                  # no softmax, no 1/sqrt(D), no denominator
with S_{-1} = initial_state (zeros when absent). Exponents of lambda are never positive here, so
nothing can overflow however long the sequence (the paper's "robust" form, arXiv 2307.14995 §3.2).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from tnllm.sampling import drop_outside_nucleus, penalise_seen

__all__ = [
    "lightning_attn_naive",
    "lightning_attn_chunked",
    "lightning_attn_step_ref",
    "srmsnorm_ref",
    "add_srmsnorm_ref",
    "gated_srmsnorm_ref",
    "glu_mul_ref",
    "row_scale",
    "ACTIVATIONS",
    "decay_matrix",
    "check_shapes",
    "check_step_shapes",
    "check_same_shape",
    "mix32",
    "noise_key",
    "log_exponential_noise",
    "draw_from_head_ref",
]


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """fp64 stays fp64 (test oracle); everything else is computed in fp32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _cast(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x.to(dtype), skipping the call when x already has that dtype: even a no-op `.to` costs about 1 µs of
    argument parsing, paid several times per layer on the CPU decode path."""
    return x if x.dtype == dtype else x.to(dtype)


def check_shapes(q, k, v, log_decay, initial_state=None, cu_seqlens=None) -> None:
    """Validate the inputs of a prefill call (shared by every implementation); ValueError names them."""
    if q.dim() != 4 or k.shape != q.shape or v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(
            f"expected q, k [B, T, H, D] and v [B, T, H, E] with equal B, T, H; "
            f"got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    B, _, H, D = q.shape
    E = v.shape[-1]
    if log_decay.shape != (H,):
        raise ValueError(f"log_decay must have shape [H]=[{H}], got {tuple(log_decay.shape)}")
    n_seq = B
    if cu_seqlens is not None:
        if B != 1:
            raise ValueError(f"cu_seqlens needs B == 1 (packed sequences), got B={B}")
        n_seq = cu_seqlens.numel() - 1
    if initial_state is not None and initial_state.shape != (n_seq, H, D, E):
        raise ValueError(
            f"initial_state must be [{n_seq}, {H}, {D}, {E}], got {tuple(initial_state.shape)}"
        )


def decay_matrix(log_decay: torch.Tensor, n: int, dtype: torch.dtype) -> torch.Tensor:
    """M[h, i, j] = exp(log_decay[h] * (i - j)) for i >= j, else 0. Shape [H, n, n].

    The mask is taken on the index (i >= j), never on the product, so rate 0 stays causal.
    """
    idx = torch.arange(n, device=log_decay.device)
    dist = (idx[:, None] - idx[None, :]).to(dtype)  # [n, n]
    causal = idx[:, None] >= idx[None, :]
    m = torch.exp(log_decay.to(dtype)[:, None, None] * dist.clamp(min=0))  # [H, n, n]
    return m * causal


def _per_sequence(fn, q, k, v, log_decay, initial_state, output_final_state, cu_seqlens, **kw):
    """Run a dense implementation once per packed sequence (cu_seqlens) and re-pack the results."""
    outs, finals = [], []
    bounds = cu_seqlens.tolist()
    for i, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        s0 = None if initial_state is None else initial_state[i : i + 1]
        o, s = fn(q[:, start:end], k[:, start:end], v[:, start:end], log_decay,
                  initial_state=s0, output_final_state=output_final_state, **kw)
        outs.append(o)
        finals.append(s)
    o = torch.cat(outs, dim=1)  # [1, T_total, H, E]
    final = torch.cat(finals, dim=0) if output_final_state else None  # [N, H, D, E]
    return o, final


def lightning_attn_naive(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor,
    *,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Masked O(T^2) decay attention: the test oracle. Never used by the model.

    Args:
        q, k: [B, T, H, D]; v: [B, T, H, E]; log_decay: [H] (<= 0);
        initial_state: [B, H, D, E] or None; cu_seqlens: [N + 1] int offsets with B == 1, or None.
    Returns:
        o [B, T, H, E] in q.dtype, and the final state [B, H, D, E] (fp32, fp64 for fp64 inputs) or None.
    """
    check_shapes(q, k, v, log_decay, initial_state, cu_seqlens)
    if cu_seqlens is not None:
        return _per_sequence(lightning_attn_naive, q, k, v, log_decay, initial_state,
                             output_final_state, cu_seqlens)
    dt = _compute_dtype(q)
    T = q.shape[1]
    qh, kh, vh = (x.to(dt).transpose(1, 2) for x in (q, k, v))  # [B, H, T, D|E]
    a = log_decay.to(dt)
    o = (qh @ kh.transpose(-1, -2) * decay_matrix(a, T, dt)) @ vh  # [B, H, T, E]
    pos = torch.arange(T, device=q.device, dtype=dt)
    if initial_state is not None:
        # Contribution of the carried state: lambda^(t+1) q_t S0.
        q_decay = torch.exp(a[:, None] * (pos + 1))[..., None]  # [H, T, 1]
        o = o + (qh * q_decay) @ initial_state.to(dt)
    final = None
    if output_final_state:
        k_decay = torch.exp(a[:, None] * (T - 1 - pos))[..., None]  # [H, T, 1]
        final = (kh * k_decay).transpose(-1, -2) @ vh  # [B, H, D, E]
        if initial_state is not None:
            final = final + torch.exp(a * T)[:, None, None] * initial_state.to(dt)
    return o.transpose(1, 2).to(q.dtype), final  # [B, T, H, E]


BLOCK_CHUNKS = 64  # full chunks batched per block in lightning_attn_chunked (bounds its per-chunk states)


def lightning_attn_chunked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor,
    *,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunked decay attention, O(T·C·(D+E) + T·D·E): the CPU production path (differentiable).

    Per chunk of m <= C rows with S the state entering it (0-based in-chunk index i, j):
        o_i   = lambda^(i+1) q_i S + sum_{j<=i} lambda^(i-j) (q_i . k_j) v_j
        S_new = lambda^m S + sum_j lambda^(m-1-j) k_j^T v_j

    Full chunks are computed BLOCK_CHUNKS at a time as batched matmuls (only the state recurrence
    S_new = lambda^C S + KV_c is a loop, one fused op per chunk), which bounds the memory of the per-chunk
    states to BLOCK_CHUNKS of them; a last partial chunk is one more step. 2-core CPU, H=6, D=E=64,
    16k tokens: 77 ms vs 110 ms for a loop of small ops per chunk.

    Args/Returns: as `lightning_attn_naive`; chunk_size C >= 1.
    """
    check_shapes(q, k, v, log_decay, initial_state, cu_seqlens)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if cu_seqlens is not None:
        return _per_sequence(lightning_attn_chunked, q, k, v, log_decay, initial_state, output_final_state,
                             cu_seqlens, chunk_size=chunk_size)
    dt = _compute_dtype(q)
    B, T, H, D = q.shape
    E = v.shape[-1]
    qh, kh, vh = (x.to(dt).transpose(1, 2) for x in (q, k, v))  # [B, H, T, D|E]
    a = log_decay.to(dt)
    C = max(1, min(chunk_size, T))
    state = q.new_zeros((B, H, D, E), dtype=dt) if initial_state is None else initial_state.to(dt)
    outs = []
    full = T - T % C
    for start in range(0, full, C * BLOCK_CHUNKS):
        end = min(full, start + C * BLOCK_CHUNKS)
        o, state = _full_chunks(qh[:, :, start:end], kh[:, :, start:end], vh[:, :, start:end], a, state, C)
        outs.append(o)
    if full < T:
        o, state = _full_chunks(qh[:, :, full:], kh[:, :, full:], vh[:, :, full:], a, state, T - full)
        outs.append(o)
    o = torch.cat(outs, dim=2).transpose(1, 2)  # [B, T, H, E]
    return o.to(q.dtype), (state if output_final_state else None)


def _full_chunks(q, k, v, a, state, C: int):
    """Chunks of exactly C rows: q, k [B, H, n*C, D], v [B, H, n*C, E], state [B, H, D, E] entering the
    first one. Returns (o [B, H, n*C, E], state after the last chunk)."""
    B, H, T, D = q.shape
    E = v.shape[-1]
    n = T // C
    qc, kc, vc = q.reshape(B, H, n, C, D), k.reshape(B, H, n, C, D), v.reshape(B, H, n, C, E)  # [B, H, n, C, *]
    rows = torch.arange(C, device=q.device, dtype=a.dtype)
    o = (qc @ kc.transpose(-1, -2) * decay_matrix(a, C, a.dtype)[:, None]) @ vc  # intra-chunk [B, H, n, C, E]
    k_decay = torch.exp(a[:, None] * (C - 1 - rows))[:, None, :, None]  # [H, 1, C, 1]
    kv = (kc * k_decay).transpose(-1, -2) @ vc  # each chunk's own decayed K^T V [B, H, n, D, E]
    chunk_decay = torch.exp(a * C)[:, None, None]  # [H, 1, 1]
    entering = []
    for c in range(n):
        entering.append(state)
        state = torch.addcmul(kv[:, :, c], chunk_decay, state)  # lambda^C S + KV_c
    q_decay = torch.exp(a[:, None] * (rows + 1))[:, None, :, None]  # [H, 1, C, 1]
    o = o + (qc * q_decay) @ torch.stack(entering, dim=2)  # inter-chunk [B, H, n, C, E]
    return o.reshape(B, H, T, E), state


# The activations a decode step can apply to q and k itself, by name (TNLConfig.act): "silu" (the official
# "swish") or "none".
ACTIVATIONS = {"silu": F.silu, "none": lambda t: t}


def lrpe_features(xs, theta: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """LRPE's features [x cos(t θ), x sin(t θ)] of each x [..., H, D] in `dtype`, θ = theta [H, D] and t =
    positions (x's leading dims): the angles in fp32 (bf16 would round positions past 256), one cos/sin
    evaluation for every x. The prefill layer (`tnllm.layers.Lrpe`) and the decode step share it."""
    angles = (positions.float()[..., None, None] * theta.float()).to(dtype)  # [..., H, D]
    cos, sin = torch.cos(angles), torch.sin(angles)
    return tuple(torch.cat([x.to(dtype) * cos, x.to(dtype) * sin], dim=-1) for x in xs)  # [..., H, 2 D]


def check_step_shapes(q, k, v, log_decay, state, slots=None, act="none", lrpe=None) -> None:
    """Validate the inputs of a decode step (shared by every implementation); ValueError names them."""
    if act not in ACTIVATIONS:
        raise ValueError(f"act must be one of {sorted(ACTIVATIONS)}, got {act!r}")
    B, H, D = q.shape
    rows = B if slots is None else state.shape[0]
    features = 2 * D if lrpe is not None else D  # LRPE doubles q's and k's features
    if k.shape != q.shape or v.shape[:2] != (B, H) or state.shape != (rows, H, features, v.shape[-1]):
        raise ValueError(
            f"step expects q, k [B, H, D], v [B, H, E], state [B (or pool size with slots), H, D (2 D with lrpe), "
            f"E]; got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, state {tuple(state.shape)}"
        )
    if lrpe is not None:
        theta, positions = lrpe
        if theta.shape != (H, D) or theta.stride(-1) != 1 or not theta.is_floating_point():
            raise ValueError(f"lrpe's theta must be float [H, D]=[{H}, {D}] with a contiguous last dim, got "
                             f"{theta.dtype} {tuple(theta.shape)}")
        if positions.shape != (B,) or positions.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"lrpe's positions must be int32/int64 [B]=[{B}], got {positions.dtype} "
                             f"{tuple(positions.shape)}")
    if slots is not None and (slots.shape != (B,) or slots.dtype != torch.long):
        raise ValueError(f"slots must be int64 [B]=[{B}], got {slots.dtype} {tuple(slots.shape)}")
    if log_decay.shape != (H,):
        raise ValueError(f"log_decay must be [H]=[{H}], got {tuple(log_decay.shape)}")


def lightning_attn_step_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor,
    state: torch.Tensor,
    slots: torch.Tensor | None = None,
    *,
    act: str = "none",
    row_ms: torch.Tensor | None = None,
    eps: float = 1e-6,
    lrpe: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """One decode step for one token per sequence; updates `state` in place.

        S <- exp(log_decay) * S + f(k)^T v ;  o = f(q) S ,   f = act, or LRPE after act

    With `row_ms`, q, k and v are first scaled by their row's norm scale (`row_scale`): the step of a layer whose
    input norm was left to the products after it (docs/kernels.md#deferred-norms). With `lrpe` = (theta [H, D],
    positions [B]), the step of an LRPE layer: f(x) = [act(x) cos(θ t), act(x) sin(θ t)] (`tnllm.layers.Lrpe`,
    t = the row's position), in the state's dtype, so the state's contracted dim is 2 D.

    Args:
        q, k: [B, H, D]; v: [B, H, E]; log_decay: [H]; state: [B, H, D, E] fp32 (or fp64), modified in place.
        slots: None, or int64 [B]: then `state` is a pool [S, H, D, E] and row b reads and writes
            state[slots[b]] (rows may share a slot only if its content does not matter, e.g. a padding sink).
        act: "silu" or "none" (a key of ACTIVATIONS), applied to q and k in the state's dtype.
        row_ms: None, or [T, B] fp32 partial mean squares of each row's normed input (`check_row_ms`); eps: the
            norm's.
    Returns:
        o: [B, H, E] in q.dtype.
    """
    check_step_shapes(q, k, v, log_decay, state, slots, act, lrpe)
    dt, dtype = state.dtype, q.dtype
    q, k, v = (_cast(t, dt) for t in (q, k, v))
    if row_ms is not None:
        check_row_ms(row_ms, q.shape[0], q.device)
        r = row_scale(row_ms, eps).to(dt)[:, None, None]  # [B, 1, 1]
        q, k, v = q * r, k * r, v * r
    activation = ACTIVATIONS[act]
    qa, ka = activation(q), activation(k)
    if lrpe is not None:
        qa, ka = lrpe_features((qa, ka), *lrpe, dt)  # [B, H, 2 D]
    rows = state if slots is None else state.index_select(0, slots)  # [B, H, D, E]
    decay = torch.exp(_cast(log_decay, dt))[:, None, None]  # [H, 1, 1]
    rows.mul_(decay).add_(ka[..., :, None] * v[..., None, :])  # [B, H, D, E]
    o = (qa[..., None, :] @ rows).squeeze(-2)  # [B, H, E]
    if slots is not None:
        state.index_copy_(0, slots, rows)
    return _cast(o, dtype)


def row_scale(row_ms: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """A norm's scale per row, rsqrt(mean(s²) + eps) [M] fp32, from partial mean squares row_ms [T, M] whose sum
    over T is mean(s²) (a product kernel writes one partial per output tile: `prologue_linear_ref`'s residual)."""
    return torch.rsqrt(row_ms.float().sum(0) + eps)


def check_row_ms(row_ms: torch.Tensor, rows: int, device: torch.device) -> None:
    """row_ms must be fp32 [T, rows] (T >= 1) on `device`."""
    if row_ms.dtype != torch.float32 or row_ms.dim() != 2 or row_ms.shape[1] != rows or row_ms.shape[0] < 1 \
            or row_ms.device != device:
        raise ValueError(f"row_ms must be fp32 [T, {rows}] on {device}, got {row_ms.dtype} {tuple(row_ms.shape)} "
                         f"on {row_ms.device}")


def srmsnorm_ref(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """SimpleRMSNorm: x * rsqrt(mean(x^2, -1) + eps), computed in fp32 (fp64 for fp64), no gain."""
    # torch's fused rms_norm without a weight is exactly x * rsqrt(mean(x^2) + eps) (one pass fewer on CPU)
    return _cast(F.rms_norm(_cast(x, _compute_dtype(x)), (x.shape[-1],), eps=eps), x.dtype)


def check_same_shape(a: torch.Tensor, b: torch.Tensor, names: str) -> None:
    """The two inputs of a fused norm must have one shape (no broadcasting); ValueError names them."""
    if a.shape != b.shape:
        raise ValueError(f"{names} must have one shape, got {tuple(a.shape)} and {tuple(b.shape)}")


def add_srmsnorm_ref(x: torch.Tensor, delta: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """A residual add and the SRMSNorm after it: s = x + delta, y = srmsnorm_ref(s).

    Args:
        x, delta: [..., N], one shape (float dtypes; s takes their promoted dtype, as `x + delta` does).
    Returns:
        (s, y): the sum, rounded to its dtype, and its norm, computed from that rounded sum.
    """
    check_same_shape(x, delta, "x and delta")
    s = x + delta
    return s, srmsnorm_ref(s, eps)


def gated_srmsnorm_ref(o: torch.Tensor, u: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """The gated SRMSNorm of the token mixer: u * srmsnorm(o) over the last dim.

    Computed in fp32 (fp64 for fp64) and rounded once, to the promoted dtype of o and u; the unfused
    `u * srmsnorm(o)` of 16-bit inputs rounds twice, so the two differ by rounding there.

    Args:
        o, u: [..., N], one shape.
    Returns:
        y: [..., N].
    """
    check_same_shape(o, u, "o and u")
    out = torch.promote_types(o.dtype, u.dtype)
    dt = torch.float64 if out == torch.float64 else torch.float32
    return _cast(F.rms_norm(_cast(o, dt), (o.shape[-1],), eps=eps) * u, out)  # the product promotes u to dt


def glu_mul_ref(y: torch.Tensor) -> torch.Tensor:
    """The channel mixer's product of its two halves, y[..., :g] * y[..., g:], for y = (l1|l2)(x) [..., 2g].

    Returns:
        [..., g] in y's dtype (one rounding of the exact product, as `a * b` does).
    """
    if y.shape[-1] % 2:
        raise ValueError(f"y's last dim must be even (l1's outputs, then l2's), got {tuple(y.shape)}")
    a, b = y.chunk(2, dim=-1)
    return a * b


def check_int8_linear(x, weight, scales, bias=None) -> None:
    """Validate the inputs of a weight-only int8 Linear (shared by every implementation); errors name them."""
    if weight.dtype != torch.int8:
        raise TypeError(f"weight must be int8 [N, K], got {weight.dtype}")
    floats = [t.is_floating_point() for t in (x, scales, bias) if t is not None]
    if not all(floats):
        raise TypeError(f"x, scales and bias must be floating point; got x {x.dtype}, scales {scales.dtype}"
                        + ("" if bias is None else f", bias {bias.dtype}"))
    if weight.dim() != 2 or x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"expected x [..., K] and weight [N, K] with equal K; "
                         f"got x {tuple(x.shape)}, weight {tuple(weight.shape)}")
    N = weight.shape[0]
    if scales.shape != (N,) or (bias is not None and bias.shape != (N,)):
        raise ValueError(f"scales and bias must be [N]=[{N}]; got scales {tuple(scales.shape)}"
                         + ("" if bias is None else f", bias {tuple(bias.shape)}"))
    devices = {t.device for t in (x, weight, scales, bias) if t is not None}
    if len(devices) > 1:
        raise ValueError(f"x, weight, scales and bias must be on one device, got {sorted(map(str, devices))}")


def int8_linear(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """Weight-only int8 Linear: y = (x @ weightᵀ) · scales (+ bias), dequantised, in fp32 (fp64 for fp64).

    Args:
        x: [..., K] any float dtype; weight: [N, K] int8; scales: [N] float (one per output row);
        bias: None or [N] float.
    Returns:
        y: [..., N] in x.dtype.
    """
    check_int8_linear(x, weight, scales, bias)
    dt = _compute_dtype(x)
    y = F.linear(x.to(dt), weight.to(dt)) * scales.to(dt)  # [..., N]
    return (y if bias is None else y + bias.to(dt)).to(x.dtype)


# What a decode product can take instead of its input rows x (`prologue_linear_ref`): the ops that precede each
# product of a block, fused into the product's kernel on the GPU.
PROLOGUES = ("none", "norm", "add_norm", "gated_norm", "mul")
NORM_PROLOGUES = ("norm", "add_norm", "gated_norm")  # those whose rows end scaled by an SRMSNorm


def check_prologue(prologue: str, x: torch.Tensor, other: torch.Tensor | None) -> None:
    """Validate a prologue and its second input (`other`: add_norm's delta, gated_norm's gate, mul's factor)."""
    if prologue not in PROLOGUES:
        raise ValueError(f"prologue must be one of {PROLOGUES}, got {prologue!r}")
    if prologue in ("none", "norm"):
        if other is not None:
            raise ValueError(f"prologue {prologue!r} takes no second input")
        return
    if other is None:
        raise ValueError(f"prologue {prologue!r} needs its second input")
    check_same_shape(x, other, "x and other")
    if other.dtype != x.dtype or other.device != x.device:
        raise ValueError(f"x and other must share dtype and device, got {x.dtype} on {x.device} "
                         f"and {other.dtype} on {other.device}")


def prologue_linear_ref(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor | None = None,
                        bias: torch.Tensor | None = None, *, prologue: str = "none", other: torch.Tensor | None = None,
                        eps: float = 1e-6, row_ms: torch.Tensor | None = None, row_power: int = 1,
                        residual: torch.Tensor | None = None):
    """A Linear of x after one of the ops that precede a block's products (PROLOGUES):

        "none"        y = linear(x)
        "norm"        y = linear(srmsnorm(x))
        "add_norm"    s = x + other, y = linear(srmsnorm(s)); returns (s, y)
        "gated_norm"  y = linear(other * srmsnorm(x))            (the token mixer's gate: x = o, other = u)
        "mul"         y = linear(x * other)                       (the GLU's product of l1's and l2's outputs)

    linear: `int8_linear` for an int8 weight (with its scales), else F.linear (scales None). The ops round as their
    own references do (`srmsnorm_ref`, `add_srmsnorm_ref`, `gated_srmsnorm_ref`, `a * b`); the fused kernel scales
    the product's fp32 rows by the norm instead of rounding the normed input, so 16-bit results differ by rounding.

    Two epilogues serve a norm left to the products after it (docs/kernels.md#deferred-norms):
    * row_ms [T, M]: the product's rows (before the bias) are multiplied by `row_scale(row_ms, eps) ** row_power`
      (1 or 2): the scale of a norm whose input reached this product unnormed (once through the gate u, twice
      through l1 and l2, which must have no bias);
    * residual [..., N]: the product is added to it, y = residual + y (rounded once), and the result comes with
      its rows' mean squares: (y, ms [T, M]) with T = 1 here (the kernel writes one partial per output tile).

    Args:
        x, other: [..., K], one shape, dtype and device; weight [N, K]; scales [N] (int8 weight) or None;
        bias None or [N]; row_ms, residual: as above (residual: x's dtype and leading shape).
    Returns:
        y [..., N] in x.dtype; (s [..., K], y) for "add_norm"; (y, ms) with a residual (not with "add_norm").
    """
    check_prologue(prologue, x, other)
    check_epilogue(x, weight, prologue, row_ms, row_power, residual)
    s = None
    if prologue == "none":
        h = x
    elif prologue == "norm":
        h = srmsnorm_ref(x, eps)
    elif prologue == "add_norm":
        s, h = add_srmsnorm_ref(x, other, eps)
    elif prologue == "gated_norm":
        h = gated_srmsnorm_ref(x, other, eps)
    else:
        h = x * other
    scaled = row_ms is not None  # the row scale comes before the bias
    if weight.dtype == torch.int8:
        y = int8_linear(h, weight, scales, None if scaled else bias)
    else:
        if scales is not None:
            raise ValueError("scales belong to an int8 weight; a float weight takes none")
        y = F.linear(h, weight.to(h.dtype), None if bias is None or scaled else bias.to(h.dtype))
    if scaled:
        y = y.float() * row_scale(row_ms, eps).pow(row_power).view(*y.shape[:-1], 1)
        y = _cast(y if bias is None else y + bias.float(), h.dtype)
    if residual is not None:
        y = _cast(residual.float() + y.float(), y.dtype)
        return y, y.float().square().mean(-1).reshape(1, -1)  # [1, M]
    return y if s is None else (s, y)


def check_epilogue(x, weight, prologue, row_ms=None, row_power=1, residual=None) -> None:
    """The deferred-norm epilogue's inputs (`prologue_linear_ref`); ValueError names what is wrong."""
    rows = x.numel() // max(x.shape[-1], 1)
    if row_ms is not None:
        check_row_ms(row_ms, rows, x.device)
        if row_power not in (1, 2):
            raise ValueError(f"row_power must be 1 or 2, got {row_power!r}")
    if residual is not None:
        if prologue == "add_norm":
            raise ValueError('"add_norm" adds its own residual before the product; it takes no residual after')
        shape = (*x.shape[:-1], weight.shape[0])
        if residual.shape != shape or residual.dtype != x.dtype or residual.device != x.device:
            raise ValueError(f"residual must be {x.dtype} {shape} on {x.device}, got {residual.dtype} "
                             f"{tuple(residual.shape)} on {residual.device}")


# -- sampling: the exact draw from a row's head ------------------------------------------------------------
MASK32 = 0xFFFFFFFF


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


def noise_key(seed: torch.Tensor, drawn: torch.Tensor) -> torch.Tensor:
    """The 32-bit key [B] of each row's next draw from its seed [B] (int64, < 2^62) and drawn count [B]."""
    return mix32(mix32(mix32(seed & MASK32) ^ (seed >> 32)) ^ (drawn & MASK32))


def log_exponential_noise(token_hash: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """log E, E ~ Exp(1), per token: token_hash [B, N] (mix32 of the token ids) and the rows' keys [B, 1]."""
    bits = mix32(token_hash ^ key)  # uniform 32-bit
    uniform = ((bits >> 8).float() + 0.5) * 2.0**-24  # (0, 1), 24 bits: exact in fp32
    return torch.log(-torch.log(uniform))


def draw_from_head_ref(values: torch.Tensor, candidates: torch.Tensor, vocab_hash: torch.Tensor,
                       temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, seed: torch.Tensor,
                       drawn: torch.Tensor) -> torch.Tensor:
    """One exact sample per row from the head of its distribution: argmax over the kept candidates of
    (logit / temperature - log E) (the exponential race), E from the row's (seed, drawn) and the token id.

    Args:
        values: [B, N] fp32, each row's N largest logits sorted descending; candidates: [B, N] int64 their ids.
            Every token a row keeps must be among them (0 < top_k <= N; top-p then normalises over the top-k).
        vocab_hash: [V] int64, mix32 of every token id; temperature [B] > 0, top_k [B] int64, top_p [B] fp32,
            seed [B] int64 (< 2^62), drawn [B] int64 (tokens the row drew before).
    Returns:
        ids [B] int64.
    """
    tempered = values / temperature[:, None]  # [B, N]
    drop = drop_outside_nucleus(tempered, top_k, top_p, torch.logsumexp(tempered, dim=-1, keepdim=True))
    noise = log_exponential_noise(vocab_hash[candidates], noise_key(seed, drawn)[:, None])
    scores = tempered.masked_fill(drop, float("-inf")) - noise
    return candidates.gather(1, scores.argmax(dim=-1, keepdim=True))[:, 0]


# -- sampling: a whole batch's next ids from the head of each row ------------------------------------------
NOT_FINITE = -1  # the id reported for a row whose logits hold NaN/inf


class SlotTables(NamedTuple):
    """The engine sampler's per-slot device tables (S slots, V tokens) that `sample_rows` reads and updates."""

    temperature: torch.Tensor  # [S] fp32, 0 = greedy
    top_k: torch.Tensor        # [S] int64, 0 = off
    top_p: torch.Tensor        # [S] fp32, 1 = off
    penalty: torch.Tensor      # [S] fp32 repetition penalty, 1 = off
    seed: torch.Tensor         # [S] int64 < 2^62
    drawn: torch.Tensor        # [S] int64: tokens the slot drew before
    last_token: torch.Tensor   # [S] int64: the slot's last id
    seen: torch.Tensor         # [S, V] bool: the ids under the slot's repetition penalty
    vocab_hash: torch.Tensor   # [V] int64: mix32 of every token id


def record_draws(ids: torch.Tensor, finite: torch.Tensor, slots: torch.Tensor, tables: SlotTables) -> torch.Tensor:
    """Write each row's id into its slot's tables (last token, drawn count, penalty set) and return the ids [B],
    NOT_FINITE where `finite` [B] is False (such a row records id 0, a valid id, in its tables)."""
    ids = torch.where(finite, ids, 0)
    tables.last_token.index_copy_(0, slots, ids)
    tables.drawn.index_add_(0, slots, torch.ones_like(ids))
    tables.seen.index_put_((slots, ids), torch.ones_like(ids, dtype=torch.bool))
    return torch.where(finite, ids, NOT_FINITE)


def penalised_logits(logits: torch.Tensor, slots: torch.Tensor, tables: SlotTables,
                     penalty: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp32 logits [B, V] with the rows' repetition penalties applied when `penalty`, finite [B]: the row's raw
    logits hold no NaN/inf): what every sampling path starts from."""
    logits = logits.float()
    finite = torch.isfinite(logits).all(dim=-1)  # [B]
    if penalty:
        logits = penalise_seen(logits, tables.seen[slots], tables.penalty[slots])
    return logits, finite


def sample_rows_ref(logits: torch.Tensor, slots: torch.Tensor, tables: SlotTables, *, penalty: bool, draw: bool,
                    head: int) -> torch.Tensor:
    """Each row's next id, sampled by its slot's settings, and the slots' tables updated (`record_draws`).

    Args:
        logits: [B, V] any float dtype; slots: [B] int64 rows of `tables`.
        penalty: apply the rows' repetition penalties (False: every row's is 1).
        draw: some row samples (False: every row is greedy, temperature 0).
        head: every sampling row keeps at most `head` tokens (0 < top_k <= head), so the `head` largest logits
            hold every kept token and the draw needs no sort of the vocabulary (`draw_from_head_ref`).
    Returns:
        ids [B] int64, NOT_FINITE for a row whose logits hold NaN/inf. Greedy rows take the (penalised) argmax.
    """
    logits, finite = penalised_logits(logits, slots, tables, penalty)
    ids = logits.argmax(dim=-1)
    if draw:
        temperature = tables.temperature[slots]
        sampling = temperature > 0
        values, candidates = torch.topk(logits, min(head, logits.shape[1]))  # [B, head], sorted
        drawn = draw_from_head_ref(values, candidates, tables.vocab_hash, torch.where(sampling, temperature, 1.0),
                                   tables.top_k[slots], tables.top_p[slots], tables.seed[slots],
                                   tables.drawn[slots])
        ids = torch.where(sampling, drawn, ids)
    return record_draws(ids, finite, slots, tables)
