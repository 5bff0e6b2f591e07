"""Where a Triton launch runs: the one interpreter check of the Triton launchers (triton_chunk, triton_norm,
triton_step, triton_int8, triton_glu), and the one decision whether decode kernels use programmatic dependent
launch."""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl


def triton_interpreted(device: torch.device | str) -> bool:
    """True when a Triton launch for tensors on `device` runs in Triton's interpreter: TRITON_INTERPRET=1, or CPU
    tensors (only the interpreter runs those). The launchers then pick small tiles (the interpreter emulates every
    program in NumPy, where the GPU's large tiles are slow) and upcast bf16 dots, which it computes wrongly."""
    return os.environ.get("TRITON_INTERPRET") == "1" or torch.device(device).type == "cpu"


def pdl(device: torch.device | str) -> bool:
    """Whether the int8 decode products on `device` use programmatic dependent launch (PDL): a CUDA device of
    compute capability 9.0 or newer (Hopper), not the interpreter, and TNLLM_PDL not "0".

    A kernel launched with PDL may start while the kernel before it in the stream is still running, as soon as
    that kernel's programs have all called `start_next`: its programs first read what no earlier kernel writes
    (the weights), then wait for the earlier kernel to finish (`await_inputs`) before they read its outputs or
    write anything. Only the int8 products and their split-K reduce launch that way: in a decode step they
    always follow a Triton kernel of ours (a norm, the GLU product, the product before the reduce), and those
    kernels call `start_next`; a kernel after a cuBLAS or PyTorch kernel, which never releases its successor
    early, would start no earlier (docs/kernels.md#programmatic-dependent-launch)."""
    device = torch.device(device)
    if device.type != "cuda" or triton_interpreted(device) or os.environ.get("TNLLM_PDL") == "0":
        return False
    return _hopper_or_newer(torch.cuda.current_device() if device.index is None else device.index)


@functools.lru_cache(maxsize=None)
def _hopper_or_newer(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


@triton.jit
def start_next(PDL: tl.constexpr):
    """Under PDL: let the next kernel in the stream start now, if it was launched with PDL (it waits for this
    one to finish before it reads this kernel's outputs); without a PDL launch after it, nothing happens."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def await_inputs(PDL: tl.constexpr):
    """For a kernel launched with PDL: wait until the previous kernel in the stream has finished and its writes
    are visible, then let the next one start. Called before the kernel reads anything an earlier kernel may
    write and before its first store (a buffer it writes may be one the previous kernel still reads)."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
