"""Programmatic dependent launch (PDL) of the one-row decode products: the one decision (`pdl`) and the two calls
the kernels make (`start_next`, `await_inputs`). Imported by the Triton launchers only.

On Hopper a kernel launched with PDL may start while the kernel before it in the stream still runs, once that
kernel's programs have all called `start_next`. Its programs first read what no kernel of the step writes (the
weights), then wait for the earlier kernel to finish (`await_inputs`) before they read its output or store
anything. In a one-session decode step every product follows a kernel of ours (the decode step, a norm, another
product), so each product's first weight tiles load while the kernel before it drains
(docs/kernels.md#programmatic-dependent-launch).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from tnllm.kernels._device import triton_interpreted

# The weight kinds of a product ("int8", "float"): what `DECODE_PDL` lists and `pdl` is asked about
WEIGHT_KINDS = ("int8", "float")
# The weight kinds whose one-row products launch with PDL, as measured through the engine on an H200 (tnl-7b
# shape, batch 1, context 1,024, ms per token with PDL / without): int8 2.35 / 2.49, bf16 4.32 / 4.01 (tnl-1b bf16
# 0.90 / 0.90), so float products launch plainly.
DECODE_PDL: frozenset[str] = frozenset({"int8"})


# The kernels' PDL constexpr: what `pdl` returns
OFF, PEEL, CHAINED = 0, 1, 2


def pdl(device: torch.device | str, weights: str | None = None) -> int:
    """How decode kernels on `device` use PDL: CHAINED (launched with PDL, the first K step peeled off and the
    griddepcontrol instructions issued) on a CUDA device of compute capability 9.0 or newer (Hopper); PEEL (the
    peeled loop alone: what the interpreter can check, it runs no PTX) under the interpreter; else OFF.

    A product asks with its `weights` kind (one of `WEIGHT_KINDS`): on only if `DECODE_PDL` lists it. The kernels
    ahead of a product ask with None: they let the next kernel start whenever some kind launches with PDL."""
    if not DECODE_PDL or (weights is not None and weights not in DECODE_PDL):  # every decode launch asks: cheap first
        return OFF
    device = torch.device(device)
    if device.type not in ("cuda", "cpu"):
        return OFF
    if triton_interpreted(device):
        return PEEL
    return CHAINED if _hopper_or_newer(torch.cuda.current_device() if device.index is None else device.index) else OFF


@functools.cache
def _hopper_or_newer(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


@triton.jit
def start_next(PDL: tl.constexpr):
    """CHAINED: let the next kernel in the stream start now if it was launched with PDL (it waits for this one to
    finish before it reads this kernel's outputs); without a PDL launch after it, nothing happens."""
    if PDL == 2:
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def await_inputs(PDL: tl.constexpr):
    """CHAINED, for a kernel launched with PDL: wait until the previous kernel in the stream has finished and its
    writes are visible, then let the next one start. Called before the kernel reads anything an earlier kernel may
    write and before its first store."""
    if PDL == 2:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
