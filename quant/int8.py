"""Weight-only int8 Linear in pure PyTorch (gpt-fast style): CPU/CUDA fallback and test oracle.

    W [out, in] float  ->  q = round(W / s) in int8,  s[o] = max_i |W[o, i]| / 127   (per output row)
    y = (x @ q^T) * s + b                                # activations stay float: weight-only

On CUDA, every input goes through `kernels.int8_linear` (a Triton kernel that dequantises the int8 tile in
registers for decode-sized inputs, or the weight into a workspace for cuBLAS for larger ones,
docs/quantization.md#cuda-kernel; see `_use_int8_kernel`). On CPU a decode-sized matmul runs as
`aten._weight_int8pack_mm` (int8 weight read directly, no float copy of W; fp32 activations computed in bf16);
larger inputs (prefill) and other devices use `F.linear(x, q.to(x.dtype)) * s` (see `_use_packed_mm` for the
measured crossover).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tnllm import kernels
from tnllm.model import TransNormerLLM
from tnllm.quant.common import check_not_quantised, reject_float_into_int8, target_linears


def quantize_weight(weight: torch.Tensor, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: weight [out, in] float -> (q [out, in] int8, scales [out])."""
    w = weight.float()
    scales = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0  # [out]; zero rows stay zero
    q = torch.round(w / scales[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scales.to(scale_dtype)


PACKED_MM_MAX_ROWS = 64


def _use_packed_mm(x: torch.Tensor, rows: int) -> bool:
    """aten._weight_int8pack_mm on CPU for decode-sized inputs (rows <= PACKED_MM_MAX_ROWS), else the
    dequantised weight through F.linear.

    Packed reads int8 directly (bf16 activations) but costs ~3x a float matmul per row; dequantising
    costs a fixed weight copy. Measured (2-core AVX-512 Xeon, fp32 input, ms per call; packed / dequant /
    float): 384x1536 rows 1: 0.06 / 0.15 / 0.06, rows 16: 0.31 / 0.67 / 0.55, rows 64: 1.07 / 0.60 / 0.44,
    rows 1024: 16.0 / 6.3 / 5.6; 2048x5632 rows 1: 0.6 / 20.7 / 1.8, rows 64: 17.1 / 26.6 / 10.1,
    rows 256: 67 / 52 / 31. So prefill chunks dequantise and decode steps stay packed."""
    return x.device.type == "cpu" and rows <= PACKED_MM_MAX_ROWS


def _use_int8_kernel(x: torch.Tensor) -> bool:
    """The Triton launcher on CUDA at every size: its table (kernels/triton_int8.py CONFIGS) dequantises in
    registers up to 16 rows and, from 512 rows on, into a workspace in one pass for cuBLAS ("deq" kind).

    Measured on an H200 at the tnl-7b shapes (ms per call, bf16 weight / "deq" / the float fallback
    `F.linear(x, q.to(x.dtype)) * s`): q|k|v|u at 4096 rows 0.70 / 0.84 / 1.04, at 16384 rows the fallback
    1.30x bf16 (2.77 / 3.60) and l1 1.37x (2.01 / 2.75): its two extra passes (convert, then scale the output)
    cost more than the one dequantising pass, so large inputs no longer take it on CUDA."""
    return x.is_cuda


class Int8Linear(nn.Module):
    """Drop-in for nn.Linear with int8 weight [out, in] + scales [out] (+ float bias) as buffers.

    Not an nn.Linear subclass on purpose: nothing that walks for nn.Linear (bnb replacement,
    `target_linears`) can mistake it for a float layer and quantise it twice.
    """

    TAKES_PROLOGUE = True  # read by tnllm.layers.takes_prologue

    def __init__(self, in_features: int, out_features: int, bias: bool, *,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.empty(out_features, dtype=dtype, device=device))
        self.register_buffer("bias", torch.empty(out_features, dtype=dtype, device=device) if bias else None)
        self.register_load_state_dict_pre_hook(reject_float_into_int8)

    @classmethod
    def from_float(cls, linear: nn.Linear) -> "Int8Linear":
        """Quantise an existing float nn.Linear (same device; scales/bias keep its dtype)."""
        w = linear.weight.detach()
        mod = cls(linear.in_features, linear.out_features, linear.bias is not None, device="meta", dtype=w.dtype)
        mod.load_float_weight(w, w.device)
        if linear.bias is not None:
            mod.bias = linear.bias.detach().clone()
        return mod

    @torch.no_grad()
    def load_float_weight(self, weight: torch.Tensor, device: torch.device | str) -> None:
        """Quantise `weight` [out, in] (any float dtype) onto `device`; the module must still be empty."""
        check_not_quantised("Int8Linear", self)
        self.weight, self.scales = quantize_weight(weight.to(device), self.scales.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] -> [..., out] in x.dtype."""
        rows = x.numel() // self.in_features
        if _use_int8_kernel(x):  # the Triton kernel (or its PyTorch twin where Triton is missing)
            return kernels.int8_linear(x, self.weight, self.scales, self.bias)
        if _use_packed_mm(x, rows):
            # Its fp32 kernel is 5-40x slower than the bf16 one, so fp32 activations go through bf16
            # (output rel. error 0.4% -> 0.5%; bnb LLM.int8 casts to fp16 the same way).
            cdt = torch.bfloat16 if x.dtype == torch.float32 else x.dtype
            x2 = x.reshape(-1, self.in_features).to(cdt)  # [N, in]
            y = torch.ops.aten._weight_int8pack_mm(x2, self.weight, self.scales.to(cdt))
            y = y.to(x.dtype).view(*x.shape[:-1], self.out_features)  # [..., out]
        else:
            y = F.linear(x, self.weight.to(x.dtype)) * self.scales.to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def prologue_forward(self, x: torch.Tensor, prologue: str, other: torch.Tensor | None = None,
                         eps: float = 1e-6, **epilogue):
        """self(op(x, other)) for a `kernels.reference.PROLOGUES` op, fused (`kernels.prologue_linear`, which also
        takes the deferred-norm `epilogue`: row_ms, row_power, residual)."""
        return kernels.prologue_linear(x, self.weight, self.scales, self.bias, prologue=prologue, other=other,
                                       eps=eps, **epilogue)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def targets(model: TransNormerLLM) -> dict[str, nn.Linear]:
    """The float Linears this method quantises: the decoder's and the lm_head.

    The head is the largest single product of a decode step (tnl-7b: 64000 x 4096, a quarter of the bytes the
    int8 decoder reads), so leaving it in 16 bits would cost the step more than any decoder Linear does. A tied
    head gets its own int8 copy (the embedding stays float for the lookups): V x d more bytes held, half the
    bytes read per token."""
    return target_linears(model, head=True)


def replace_linears(model: TransNormerLLM, dtype: torch.dtype) -> list[str]:
    """Swap every target nn.Linear for an empty (meta) Int8Linear (`load_float_weight` fills it); returns their
    names."""
    swapped = targets(model)
    for name, linear in swapped.items():
        parent_name, _, child = name.rpartition(".")
        empty = Int8Linear(linear.in_features, linear.out_features, linear.bias is not None,
                           device="meta", dtype=dtype)
        model.get_submodule(parent_name).register_module(child, empty)
    return list(swapped)


def quantize_model(model: TransNormerLLM) -> TransNormerLLM:
    """Replace every target nn.Linear of a loaded float model by Int8Linear.from_float (in place)."""
    for name, linear in targets(model).items():
        parent_name, _, child = name.rpartition(".")
        model.get_submodule(parent_name).register_module(child, Int8Linear.from_float(linear))
    return model
