"""Lightning Attention kernels behind one dispatch point.

Public functions (same signatures as their PyTorch twins in `kernels.reference`):
    lightning_attn(q, k, v, log_decay, *, initial_state=None, output_final_state=False, cu_seqlens=None)
        q, k [B, T, H, D], v [B, T, H, E], log_decay [H] fp32 (<= 0) -> (o [B, T, H, E], state [B, H, D, E] | None)
    lightning_attn_step(q, k, v, log_decay, state, slots=None, *, act="none", lrpe=None)   q, k [B, H, D],
        v [B, H, E]; state updated in place (with int64 slots [B], state is a pool [S, H, D, E] and row b updates
        state[slots[b]]); act ("silu" | "none", see ACTIVATIONS) is applied to q and k inside the step, then LRPE
        with lrpe = (theta [H, D], positions [B]) (the state then [.., H, 2 D, E])
    srmsnorm(x, eps=1e-6)
    add_srmsnorm(x, delta, eps=1e-6) -> (s, y)   s = x + delta, y = srmsnorm(s): a residual add and the next norm
    gated_srmsnorm(o, u, eps=1e-6)   u * srmsnorm(o): the token mixer's gated norm
    glu_mul(y)                       y[..., :g] * y[..., g:]: the channel mixer's product of the packed l1|l2 output
    int8_linear(x, weight, scales, bias=None)    x [..., K] float, weight [N, K] int8, scales [N] -> y [..., N]
        (weight-only int8 Linear: y = (x @ weightᵀ) · scales + bias)
    prologue_linear(x, weight, scales=None, bias=None, *, prologue, other=None, eps=1e-6) -> y (or (s, y))
        a decode product fused with the op before it (a norm, add + norm, gated norm or product; see
        `reference.PROLOGUES`); `fuses_prologue(x, weight, prologue, other)` says where the model should call it
    sample_rows(logits, slots, tables, *, penalty, draw, head) -> ids [B]   one exact seeded sample (or the argmax)
        per row of logits [B, V] from its slot's settings (penalty, temperature, top-k, top-p); the slots'
        tables (`reference.SlotTables`) updated in place

This module is the ONLY place that decides between Triton (CUDA tensors, Triton importable) and the
PyTorch reference (everything else). Tests force a path with `use_impl("torch" | "triton")`; under
`TRITON_INTERPRET=1` the Triton path also runs on CPU tensors. Importing this package never imports
Triton or touches CUDA.

`add_srmsnorm`, `gated_srmsnorm` and `glu_mul` are fused decode kernels without a backward: while autograd records
through their inputs, the Triton path composes the differentiable ops instead (`_fused_impl`, the one place that
decides).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
from typing import Iterator

import torch

from tnllm.kernels import reference

__all__ = ["lightning_attn", "lightning_attn_step", "srmsnorm", "add_srmsnorm", "gated_srmsnorm", "glu_mul",
           "int8_linear", "prologue_linear", "fuses_prologue", "sample_rows", "use_impl", "backend_for", "reference",
           "ACTIVATIONS"]

ACTIVATIONS = reference.ACTIVATIONS  # the q/k activations lightning_attn_step applies, by name

_IMPLS = ("torch", "triton")
_FORCE_IMPL: str | None = None


@contextlib.contextmanager
def use_impl(name: str | None) -> Iterator[None]:
    """Force every dispatch inside the block to `name` ("torch" or "triton"); None restores auto."""
    global _FORCE_IMPL
    if name is not None and name not in _IMPLS:
        raise ValueError(f"impl must be one of {_IMPLS} or None, got {name!r}")
    previous, _FORCE_IMPL = _FORCE_IMPL, name
    try:
        yield
    finally:
        _FORCE_IMPL = previous


@functools.cache
def triton_available() -> bool:
    """True when the `triton` package can be imported (checked once, without importing it)."""
    return importlib.util.find_spec("triton") is not None


def backend_for(device: torch.device | str) -> str:
    """The implementation the dispatch picks for tensors on `device`: "triton" or "torch"."""
    if _FORCE_IMPL is not None:
        return _FORCE_IMPL
    kind = device.type if isinstance(device, torch.device) else torch.device(device).type  # every op asks: no copy
    return "triton" if kind == "cuda" and triton_available() else "torch"


def _fused_impl(*tensors: torch.Tensor) -> str:
    """The path of a forward-only fused op on `tensors`: backend_for's choice, except "unfused" where that is
    Triton while autograd records through an input (the fused kernels have no backward; training then takes the
    differentiable ops it always took). The PyTorch twins are differentiable, so "torch" stays "torch"."""
    impl = backend_for(tensors[0].device)
    if impl == "triton" and torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return "unfused"
    return impl


def _triton(module: str, name: str):
    """Lazily import a Triton launcher (kept out of import time so CPU installs never need Triton)."""
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


def lightning_attn(q, k, v, log_decay, *, initial_state=None, output_final_state=False, cu_seqlens=None):
    """Causal decay linear attention (prefill / training). See `kernels.reference.lightning_attn_chunked`."""
    kwargs = dict(initial_state=initial_state, output_final_state=output_final_state, cu_seqlens=cu_seqlens)
    if backend_for(q.device) == "triton":
        return _triton("triton_chunk", "lightning_attn_triton")(q, k, v, log_decay, **kwargs)
    return reference.lightning_attn_chunked(q, k, v, log_decay, **kwargs)


def lightning_attn_step(q, k, v, log_decay, state, slots=None, *, act="none", row_ms=None, eps: float = 1e-6,
                        lrpe=None):
    """One recurrent decode step (act applied to q and k inside, then LRPE with lrpe = (theta, positions); with
    row_ms, a deferred norm's row scale before it), state updated in place. See
    `kernels.reference.lightning_attn_step_ref`."""
    kwargs = dict(act=act, row_ms=row_ms, eps=eps, lrpe=lrpe)
    if backend_for(q.device) == "triton":
        return _triton("triton_step", "lightning_attn_step_triton")(q, k, v, log_decay, state, slots, **kwargs)
    return reference.lightning_attn_step_ref(q, k, v, log_decay, state, slots, **kwargs)


def srmsnorm(x, eps: float = 1e-6):
    """SimpleRMSNorm without gain. See `kernels.reference.srmsnorm_ref`."""
    if backend_for(x.device) == "triton":
        return _triton("triton_norm", "srmsnorm_triton")(x, eps)
    return reference.srmsnorm_ref(x, eps)


def add_srmsnorm(x, delta, eps: float = 1e-6):
    """(x + delta, srmsnorm(x + delta)): a residual add and the norm after it, one kernel on the Triton path.
    See `kernels.reference.add_srmsnorm_ref`."""
    impl = _fused_impl(x, delta)
    if impl == "triton":
        return _triton("triton_norm", "add_srmsnorm_triton")(x, delta, eps)
    if impl == "torch":
        return reference.add_srmsnorm_ref(x, delta, eps)
    s = x + delta  # "unfused": autograd records, so the differentiable ops (see _fused_impl)
    return s, srmsnorm(s, eps)


def gated_srmsnorm(o, u, eps: float = 1e-6):
    """u * srmsnorm(o), one kernel on the Triton path. See `kernels.reference.gated_srmsnorm_ref`."""
    impl = _fused_impl(o, u)
    if impl == "triton":
        return _triton("triton_norm", "gated_srmsnorm_triton")(o, u, eps)
    if impl == "torch":
        return reference.gated_srmsnorm_ref(o, u, eps)
    return u * srmsnorm(o, eps)  # "unfused": autograd records, so the differentiable ops (see _fused_impl)


def glu_mul(y):
    """y[..., :g] * y[..., g:] for y [..., 2g], one kernel on the Triton path. See `kernels.reference.glu_mul_ref`."""
    impl = _fused_impl(y)
    if impl == "triton":
        return _triton("triton_glu", "glu_mul_triton")(y)
    return reference.glu_mul_ref(y)  # "torch", or "unfused" (the same differentiable ops)


# Per prologue, the most rows at which a product takes it in-kernel (absent: never), and the weights ("int8",
# "float") whose products take them. Measured per product on an H200 (bench/prologue_ab.py, tnl-7b and tnl-1b,
# µs composed → fused): the GLU product into l3 pays at 1 and 16 rows (7B bf16 31.1 → 29.8, 32.3 → 29.2), the
# gated norm into out_proj at 1 row (7B bf16 16.4 → 14.2) and, alone, not at 16 (15.7 → 16.2), but fused up to 16
# rows it lets the blocks defer their norms at every decode batch (no add+norm kernels, no split-K reduce of a
# cuBLAS out_proj): the tnl-7b bf16 engine at 16 sessions 4.97 → 4.87 ms per token (same run), and 4.96 → 4.82
# once out_proj's 2-16-row tile was chosen with the gated norm (engine-h200.json, --prologues gated1 against the
# shipped setting, code 4f8755d); the add+norms lose
# (7B int8 q|k|v|u 27.6 → 34.6, l1|l2 36.5 → 50.5: the stored sum and second input slow the K loop), and with them
# fused the tnl-7b int8 step took 3.50 ms against 3.00 (bench/engine_gpu.py --prologues). With these two the
# tnl-7b bf16 step took 4.04 ms at 1 session and 4.88 at 16 against 4.19 and 4.99 composed; on int8 weights the
# captured step went 3.20 → 3.09 ms at 1 session. "none" is the plain product: at one row the one-row gemv tiles
# of float weights beat cuBLAS at every tnl-7b and tnl-1b shape (bench/results/float-sweep-m1-h200.json.gz, µs: 7B
# l1|l2 45.9 against 50.9, lm_head 122.7 against 153.2, q|k|v|u 34.9 against 35.6; 1B 10.4-62.5 against 11.5-77.5),
# so float Linears (`tnllm.linear.Linear`) run their one-row products on it.
FUSED_PROLOGUES: dict[str, int] = {"none": 1, "gated_norm": 16, "mul": 16}
PROLOGUE_WEIGHTS: tuple[str, ...] = ("int8", "float")
# Where a decode layer's out_proj and l3 both take their prologues, they also add the residual and hand the next
# norm's scale to the products after them, so the layer runs no add+norm kernel (`layers.defers_norms`,
# docs/kernels.md#deferred-norms). Captured tnl-7b step at 1 session on an H200: bf16 4.22 → 4.10 ms, int8 3.09 →
# 2.98; tnl-1b bf16 1.02 → 0.97 (no change at 16 sessions, where out_proj composes). False: the norms run as
# kernels of their own (bench/engine_gpu.py --norms kernels, for A/B runs).
DEFERRED_NORMS = True


def fuses_prologue(x: torch.Tensor, weight: torch.Tensor, prologue: str, other: torch.Tensor | None = None) -> bool:
    """Whether a product of x [..., K] (and the prologue's second input `other`) with `weight` should take the op
    before it fused (`prologue_linear`): the Triton path, at most FUSED_PROLOGUES[prologue] rows, a weight kind in
    PROLOGUE_WEIGHTS ("int8", or "float": x's dtype), other of x's dtype, no autocast (its casts belong to the
    composed ops) and no autograd recording (the fused kernel has no backward). Elsewhere the model composes the
    ops: on the CPU its Linears' own fast products serve better than this composition."""
    if backend_for(x.device) != "triton" or x.numel() // max(x.shape[-1], 1) > FUSED_PROLOGUES.get(prologue, 0):
        return False  # the backend first: a CPU Linear asks on every call
    if (other is not None and other.dtype != x.dtype) or torch.is_autocast_enabled(x.device.type):
        return False
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, other, weight)):
        return False
    kind = "int8" if weight.dtype == torch.int8 else "float" if weight.dtype == x.dtype else None
    return kind in PROLOGUE_WEIGHTS


def prologue_linear(x, weight, scales=None, bias=None, *, prologue, other=None, eps: float = 1e-6, row_ms=None,
                    row_power: int = 1, residual=None):
    """A product fused with the op before it (and, with row_ms / residual, a deferred norm's epilogue). See
    `kernels.reference.prologue_linear_ref`."""
    kwargs = dict(prologue=prologue, other=other, eps=eps, row_ms=row_ms, row_power=row_power, residual=residual)
    if backend_for(x.device) == "triton":
        return _triton("triton_int8", "prologue_linear_triton")(x, weight, scales, bias, **kwargs)
    return reference.prologue_linear_ref(x, weight, scales, bias, **kwargs)


def int8_linear(x, weight, scales, bias=None):
    """Weight-only int8 Linear, dequantised on the fly. See `kernels.reference.int8_linear`."""
    if backend_for(x.device) == "triton":
        return _triton("triton_int8", "int8_linear_triton")(x, weight, scales, bias)
    return reference.int8_linear(x, weight, scales, bias)


def sample_rows(logits, slots, tables, *, penalty: bool, draw: bool, head: int):
    """A batch's next ids from its slots' settings, their tables updated. See `kernels.reference.sample_rows_ref`."""
    kwargs = dict(penalty=penalty, draw=draw, head=head)
    if backend_for(logits.device) == "triton":
        return _triton("triton_sample", "sample_rows_triton")(logits, slots, tables, **kwargs)
    return reference.sample_rows_ref(logits, slots, tables, **kwargs)
