"""8-bit weights for TransNormerLLM, applied at load time (model code never imports bitsandbytes).

    load_quantized(path_or_repo_id, method="auto", dtype="fp32", device="cpu") -> TransNormerLLM
    quantize(model, method="auto") -> model                    # an already-loaded float model, in place

Methods: "bnb_int8" (bitsandbytes LLM.int8 Linear8bitLt through Accelerate, quant/bnb.py), "int8"
(pure-PyTorch weight-only int8, quant/int8.py), "none" (float), "auto" (`choose_method`).
Quantised: every nn.Linear inside the decoder layers, and with "int8" the lm_head too (its own int8 copy of a tied
matrix); the embedding stays float, and so does the head under bitsandbytes.
Design and reasons: docs/quantization.md.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tnllm.checkpoint import load_model, parse_dtype
from tnllm.model import TransNormerLLM
from tnllm.quant import bnb, int8, loader
from tnllm.quant.common import QuantOrderError

METHODS = ("auto", "bnb_int8", "int8", "none")

__all__ = ["AUTO", "METHODS", "QuantOrderError", "choose_method", "load_quantized", "quantize", "why_method"]


# What "auto" picks per device type, and why (docs/quantization.md#choosing-a-method has the measurements).
AUTO = {
    "cpu": ("int8", "weight-only int8 decodes faster than float (2.2 vs 3.0 ms/token, bundled model, 1 thread) "
                    "with a quarter of the decoder weight bytes; bitsandbytes quantises the activations on every "
                    "call, slower at decode sizes"),
    "cuda": ("int8", "weight-only int8 through a Triton kernel that reads the int8 weight: faster than bf16 at "
                     "decode sizes (7B: 1.66x bf16's tok/s); bitsandbytes LLM.int8 runs eagerly and decoded 22x slower "
                     "than bf16"),
}


def _auto(device: torch.device | str) -> tuple[str, str]:
    """(method, reason) of `AUTO` for a device; other device types get the CPU's."""
    return AUTO.get(torch.device(device).type, AUTO["cpu"])


def choose_method(device: torch.device | str) -> str:
    """The 8-bit method "auto" picks for a device."""
    return _auto(device)[0]


def why_method(device: torch.device | str) -> str:
    """Why "auto" picks `choose_method(device)` there, in one sentence (the Model tab shows it)."""
    return _auto(device)[1]


def _resolve_method(method: str, device: torch.device | str) -> str:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    return choose_method(device) if method == "auto" else method


def quantize(model: TransNormerLLM, method: str = "auto", *, threshold: float = 6.0) -> TransNormerLLM:
    """Quantise the decoder Linears of a loaded float model in place (on the device they are on).

    Raises QuantOrderError if the model is already quantised.
    """
    if any(isinstance(m, int8.Int8Linear) for m in model.modules()) or any(
            t.dtype == torch.int8 for t in model.state_dict().values()):
        raise QuantOrderError("model is already quantised")
    weight = model.lm_head.weight
    method = _resolve_method(method, weight.device)
    if method == "bnb_int8":
        model = bnb.quantize_model(model, threshold)
    elif method == "int8":
        model = int8.quantize_model(model)
    model.quant_method = method  # what tnllm.bench and the app's Model tab report
    return model.eval()


def load_quantized(
    path_or_repo_id: str | Path,
    method: str = "auto",
    *,
    dtype: torch.dtype | str = torch.float32,
    device: torch.device | str = "cpu",
    device_map: str | dict | None = None,
    max_memory: dict | None = None,
    threshold: float = 6.0,
    revision: str | None = None,
) -> TransNormerLLM:
    """Load a checkpoint (directory or Hub repo id) with 8-bit decoder Linears, in eval mode.

    Weights are streamed tensor by tensor into a meta-built model, so peak host memory stays near
    the 8-bit size. Manifest and key/shape checks of tnllm.checkpoint apply unchanged.

    Args:
        method: "auto" | "bnb_int8" | "int8" | "none" (plain tnllm.load_model).
        dtype: compute dtype of the float parts (embedding, a float lm_head, scales, activations).
        device: where the model lives (ignored when `device_map` is given).
        device_map: CUDA only: "auto" / "balanced" / "sequential" or an Accelerate map: spread the
            decoder layers over several GPUs (Accelerate's infer_auto_device_map + dispatch_model).
            `model.allocate_state` then puts each layer's recurrent state on that layer's device, so
            in-place state updates never go through a copy (untested on multi-GPU hardware so far).
        threshold: bnb LLM.int8 outlier threshold (0 disables the fp16 outlier path).
    """
    dtype = parse_dtype(dtype)
    device = torch.device(device)
    if device_map is not None:
        if not torch.cuda.is_available():
            raise ValueError("device_map needs CUDA GPUs; on the CPU pass device='cpu'")
        device = torch.device("cuda", torch.cuda.current_device())
    method = _resolve_method(method, device)
    if method == "none":
        if device_map is not None:
            raise ValueError("device_map is only supported for the 8-bit methods")
        model = load_model(path_or_repo_id, dtype=dtype, device=device, revision=revision)
        model.quant_method = "none"
        return model
    if method == "bnb_int8" and not bnb.available():
        raise ImportError("method='bnb_int8' needs bitsandbytes (pip install -r requirements.txt)")
    return loader.load(path_or_repo_id, method, dtype=dtype, device=device, device_map=device_map,
                       threshold=threshold, revision=revision, max_memory=max_memory)
