"""Streaming 8-bit loader: meta build -> swap Linears -> fill tensor by tensor.

Peak host memory stays near the 8-bit model plus one float tensor: no float copy of the model
is ever materialised (docs/quantization.md#streaming-loader). The float layout is checked against the
files (keys, shapes, dtypes, manifest: tnllm.checkpoint) before anything is swapped or read.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from accelerate import init_empty_weights
from accelerate.utils import set_module_tensor_to_device

from tnllm.checkpoint import TIED_KEYS, CheckpointError, _iter_file, check_weights, open_checkpoint
from tnllm.memory import malloc_trim
from tnllm.model import TransNormerLLM
from tnllm.quant import bnb, int8

DeviceMap = dict[str, int | str | torch.device]


def _device_for(name: str, device_map: DeviceMap) -> int | str | torch.device:
    """Device of tensor `name` under an Accelerate device map (longest matching module prefix)."""
    prefixes = [p for p in device_map if p == "" or name == p or name.startswith(p + ".")]
    if not prefixes:
        raise ValueError(f"device_map does not place {name}")
    return device_map[max(prefixes, key=len)]


def plan_device_map(model: TransNormerLLM, device_map: str | DeviceMap, dtype: torch.dtype, quantised: list[str],
                    max_memory: dict | None = None) -> DeviceMap:
    """A GPU-only Accelerate device map ("auto" / "balanced" / "balanced_low_0" / "sequential" / dict).

    Sizes count quantised weights as int8 and everything else as `dtype`; decoder layers are never
    split. Placing 8-bit modules on "cpu"/"disk" (offload) is refused: offload hooks would move
    int8 weights around without their scales.
    """
    if isinstance(device_map, str):
        from accelerate.utils import get_balanced_memory, infer_auto_device_map

        prefixes = tuple(f"{n}." for n in quantised)  # the swapped modules: sized as int8
        special = {n: dtype for n, _ in model.named_parameters() if not n.startswith(prefixes)}
        kwargs = dict(no_split_module_classes=["DecoderLayer"], dtype=torch.int8, special_dtypes=special)
        if device_map != "sequential":
            max_memory = get_balanced_memory(model, max_memory=max_memory,
                                             low_zero=device_map == "balanced_low_0", **kwargs)
        device_map = infer_auto_device_map(model, max_memory=max_memory, **kwargs)
    off = sorted(n for n, d in device_map.items() if str(d) in ("cpu", "disk"))
    if off:
        raise ValueError(f"the 8-bit model does not fit on the GPUs; would offload {off} (set max_memory or "
                         "use fewer/larger GPUs)")
    return device_map


def _weight_setter(method: str) -> Callable[[str, torch.nn.Module, torch.Tensor, object], None]:
    if method == "int8":
        return lambda name, module, weight, device: module.load_float_weight(weight, device)
    return bnb.load_float_weight


def stream_weights(model: TransNormerLLM, directory: Path, files: list[str], found: dict, quantised: list[str],
                   method: str, dtype: torch.dtype, device_map: DeviceMap) -> None:
    """Fill a swapped meta model from its files, one tensor at a time.

    `found` holds the checked keys of the files, `quantised` the swapped module names. Their weights
    go through the back end's setter (quantised on their device; QuantOrderError if a module already
    holds int8 weights); everything else is cast to `dtype` and set with Accelerate's
    `set_module_tensor_to_device`.
    """
    set_weight = _weight_setter(method)
    weights = {f"{n}.weight": model.get_submodule(n) for n in quantised}
    tied = model.config.tie_word_embeddings
    head_quantised = TIED_KEYS[1] in weights  # a tied matrix then fills the float embedding and the int8 head
    with torch.no_grad():
        for name in files:
            for key, tensor in _iter_file(directory / name):
                if tied and key == TIED_KEYS[1]:
                    if TIED_KEYS[0] in found:
                        continue  # the shared matrix is read from the embedding key
                    key = TIED_KEYS[0]
                if tied and head_quantised and key == TIED_KEYS[0]:
                    set_weight(TIED_KEYS[1], weights[TIED_KEYS[1]], tensor, _device_for(TIED_KEYS[1], device_map))
                device = _device_for(key, device_map)
                if key in weights:
                    set_weight(key, weights[key], tensor, device)
                    del tensor
                    malloc_trim()  # else the freed float copies stay in glibc's heaps (tnllm.memory)
                else:
                    set_module_tensor_to_device(model, key, device, value=tensor, dtype=dtype, clear_cache=False)
    model.tie_head()
    for name, buf in model.named_buffers():  # the fp32 decay table (built on the CPU, never loaded)
        if not buf.is_meta:
            set_module_tensor_to_device(model, name, _device_for(name, device_map), value=buf, clear_cache=False)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise CheckpointError(f"tensors never loaded from {directory}: {left[:12]}")


def load(path_or_repo_id: str | Path, method: str, *, dtype: torch.dtype, device: torch.device,
         device_map: str | DeviceMap | None, threshold: float, revision: str | None,
         max_memory: dict | None = None) -> TransNormerLLM:
    """Build on meta, check keys against the float layout, swap Linears for `method`, stream weights."""
    directory, config, files = open_checkpoint(path_or_repo_id, revision=revision)
    with init_empty_weights():  # parameters on meta; buffers (the fp32 decay table) real, on the CPU
        model = TransNormerLLM(config)
    found = check_weights(model, directory, files)
    with init_empty_weights():  # the new modules' weights must be meta too (docs/quantization.md#streaming-loader)
        if method == "bnb_int8":
            quantised = bnb.replace_linears(model, threshold)
        else:
            quantised = int8.replace_linears(model, dtype)
    if device_map is None:
        device_map = {"": device}
    else:
        device_map = plan_device_map(model, device_map, dtype, quantised, max_memory)
    stream_weights(model, directory, files, found, quantised, method, dtype, device_map)
    if len(set(map(str, device_map.values()))) > 1:
        from accelerate import dispatch_model

        model = dispatch_model(model, device_map=device_map)
    model.quant_method = method  # what tnllm.bench and the app's Model tab report
    return model.eval()
