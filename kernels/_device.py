"""Where a Triton launch runs: the one interpreter check of the Triton launchers (triton_chunk, triton_norm,
triton_step, triton_int8)."""

from __future__ import annotations

import os

import torch


def triton_interpreted(device: torch.device | str) -> bool:
    """True when a Triton launch for tensors on `device` runs in Triton's interpreter: TRITON_INTERPRET=1, or CPU
    tensors (only the interpreter runs those). The launchers then pick small tiles (the interpreter emulates every
    program in NumPy, where the GPU's large tiles are slow) and upcast bf16 dots, which it computes wrongly."""
    return os.environ.get("TRITON_INTERPRET") == "1" or torch.device(device).type == "cpu"
