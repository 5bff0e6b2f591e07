"""bitsandbytes LLM.int8 (`Linear8bitLt`, has_fp16_weights=False) back end, loaded through Accelerate.

Order matters (docs/quantization.md#loading-order): a Linear8bitLt must receive FLOAT weights and only then
be moved to a device, which quantises them. Writing floats into an already-quantised module raises nothing
in bitsandbytes and yields garbage, so every write here goes through `check_not_quantised` and
each module gets a load_state_dict pre-hook that refuses float weights once quantised.

Streaming (docs/quantization.md#streaming-loader): modules are swapped on the meta device with
`accelerate.utils.bnb.replace_with_bnb_layers` and filled one tensor at a time:
each float weight is quantised on `device` (`int8_vectorwise_quant`, as `Int8Params.to()` does) into an
`Int8Params` holding the int8 rows and their scales, never through the host when `device` is a GPU.
Only this module (and only when called) imports bitsandbytes; model code never does.
"""

from __future__ import annotations

import importlib.util
import logging

import torch
from accelerate import init_empty_weights
from torch import nn

from tnllm.model import TransNormerLLM
from tnllm.quant.common import check_not_quantised, reject_float_into_int8, target_linears


def available() -> bool:
    """bitsandbytes is installed (importing it is deferred until a bnb model is built)."""
    return importlib.util.find_spec("bitsandbytes") is not None


def version() -> str:
    """The installed bitsandbytes version (without importing it)."""
    from importlib.metadata import version as installed

    return installed("bitsandbytes")


def _bnb():
    # Before the first import: silence per-forward "inputs will be cast to float16" and import-time
    # optional-kernel messages (docs/quantization.md#bitsandbytes-on-the-cpu).
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    import bitsandbytes

    return bitsandbytes


def _config(threshold: float, skip: list[str]):
    from accelerate.utils import BnbQuantizationConfig

    return BnbQuantizationConfig(load_in_8bit=True, llm_int8_threshold=threshold, skip_modules=skip,
                                 keep_in_fp32_modules=[])


def targets(model: TransNormerLLM) -> dict[str, nn.Linear]:
    """The float Linears this method quantises: the decoder's. The lm_head stays float, as transformers keeps it
    under bitsandbytes: LLM.int8 decodes slower than 16 bits, so quantising the largest product would only cost."""
    return target_linears(model)


def float_modules(model: TransNormerLLM) -> list[str]:
    """Names of the Linear modules to keep float: every nn.Linear outside the decoder layers (lm_head)."""
    quantised = targets(model)
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in quantised]


def replace_linears(model: TransNormerLLM, threshold: float = 6.0) -> list[str]:
    """Swap the target nn.Linear modules for Linear8bitLt (in place, meta or float model); returns their names.

    On a float model the new modules hold the old float weights, not yet quantised.
    """
    from accelerate.utils.bnb import replace_with_bnb_layers

    _bnb()
    skip = float_modules(model)
    replace_with_bnb_layers(model, _config(threshold, skip), modules_to_not_convert=skip)
    swapped = targets(model)
    for module in swapped.values():
        module.register_load_state_dict_pre_hook(reject_float_into_int8)
    # LLM.int8 finds its outlier columns on the host in every call, which a CUDA graph cannot capture: the
    # engine decodes such a model eagerly (Engine reads `capturable`).
    model.capturable = False
    return list(swapped)


@torch.no_grad()
def load_float_weight(name: str, module: nn.Module, weight: torch.Tensor, device: torch.device | str) -> None:
    """Quantise float `weight` [out, in] into the (not yet quantised) Linear8bitLt `module` on `device`."""
    check_not_quantised(name, module)
    bnb = _bnb()
    # What Int8Params.to() does for a host tensor, on `device` wherever the weight is: Int8Params would quantise
    # only data that starts on the CPU, so a GPU weight would go through the host and back.
    rows, row_scales, _ = bnb.functional.int8_vectorwise_quant(weight.to(device=device, dtype=torch.float16))
    module.weight = bnb.nn.Int8Params(rows, requires_grad=False, has_fp16_weights=False, CB=rows, SCB=row_scales)


def quantize_model(model: TransNormerLLM, threshold: float = 6.0) -> TransNormerLLM:
    """A loaded float model (docs/quantization.md#quantising-a-loaded-model): swap in Linear8bitLt, then quantise
    each on its device."""
    floats = {}
    for name, module in targets(model).items():
        floats[name] = {k: t.detach() for k, t in module.named_parameters(recurse=False)}
        for key, tensor in floats[name].items():  # the swap below copies meta placeholders, not the weights
            setattr(module, key, nn.Parameter(tensor.to("meta"), requires_grad=False))
    with init_empty_weights():  # else each new module first allocates and initialises a float weight on the CPU
        replace_linears(model, threshold)
    for name, module in targets(model).items():
        tensors = floats.pop(name)
        load_float_weight(name, module, tensors["weight"], tensors["weight"].device)
        if "bias" in tensors:
            module.bias = nn.Parameter(tensors["bias"], requires_grad=False)
    return model


def linear_from_float(linear: nn.Linear, device: torch.device | str, threshold: float = 6.0) -> nn.Module:
    """A quantised Linear8bitLt copy of one float nn.Linear (benchmarks and tests)."""
    bnb = _bnb()
    mod = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, linear.bias is not None,
                              has_fp16_weights=False, threshold=threshold, device="meta")
    load_float_weight("linear", mod, linear.weight.detach(), device)
    if linear.bias is not None:
        mod.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    return mod.eval()


def nf4_linear_from_float(linear: nn.Linear, device: torch.device | str) -> nn.Module:
    """A bitsandbytes 4-bit NF4 copy of one float nn.Linear (`Linear4bit`, blocks of 64, computing in the weight's
    dtype), quantised on `device`: what a `bnb_nf4` method would run (bench/quant_cpu.py times it)."""
    bnb = _bnb()
    weight = linear.weight.detach()
    mod = bnb.nn.Linear4bit(linear.in_features, linear.out_features, linear.bias is not None,
                            compute_dtype=weight.dtype, quant_type="nf4", device="meta")
    # Params4bit quantises when it is moved to a device, from wherever the float weight is
    mod.weight = bnb.nn.Params4bit(weight.clone(), requires_grad=False, quant_type="nf4").to(device)
    if linear.bias is not None:
        mod.bias = nn.Parameter(linear.bias.detach().clone().to(device), requires_grad=False)
    return mod.eval()
