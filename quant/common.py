"""Pieces shared by the int8 and bitsandbytes back ends: what gets quantised, and the ordering guard.

Quantised: every `nn.Linear` inside `model.model.layers` (token_mixer.qkvu_proj / out_proj,
channel_mixer.l1 / l2 / l3), and for weight-only int8 the lm_head too (each back end's `targets`). Kept float:
the embedding (norms have no weights); a quantised head holds its own int8 copy of a tied matrix.
"""

from __future__ import annotations

import torch
from torch import nn

from tnllm.model import TransNormerLLM


class QuantOrderError(RuntimeError):
    """Float weights were about to be written into an already-quantised module.

    Both back ends would accept the write silently: `copy_` truncates floats into the int8 storage
    and keeps the old scales, so outputs become garbage (rel. error 1.0; docs/quantization.md#loading-order).
    """


def target_linears(model: TransNormerLLM, *, head: bool = False) -> dict[str, nn.Linear]:
    """Qualified name -> module of every nn.Linear (or subclass) inside the decoder layers, and "lm_head" last
    when `head` (and it is still a float Linear)."""
    targets = {f"model.layers.{name}": m for name, m in model.model.layers.named_modules()
               if isinstance(m, nn.Linear)}
    if head and isinstance(model.lm_head, nn.Linear):
        targets["lm_head"] = model.lm_head
    return targets


def check_not_quantised(name: str, module: nn.Module) -> None:
    """Raise QuantOrderError if `module` already holds int8 weights (streaming into it twice)."""
    if module.weight.dtype == torch.int8 and module.weight.device.type != "meta":
        raise QuantOrderError(f"{name} is already quantised: refusing to write float weights into it again")


def reject_float_into_int8(module: nn.Module, state_dict, prefix, *args) -> None:
    """`register_load_state_dict_pre_hook` hook for quantised modules: refuse a float `weight`."""
    incoming = state_dict.get(prefix + "weight")
    if incoming is not None and incoming.is_floating_point() and module.weight.dtype == torch.int8:
        raise QuantOrderError(
            f"{prefix}weight: float {tuple(incoming.shape)} tensor loaded into an already-quantised "
            f"{type(module).__name__}; load float weights before quantising (or use quant.load_quantized)"
        )
