"""`Linear`: nn.Linear whose fp32 weight can also be held in oneDNN's blocked layout for the CPU (`pack_for_cpu`).

PyTorch's fp32 CPU matmul (MKL sgemm) repacks the weight on every call, so a decode step, whose products have 1 to
16 rows, pays for that repacking on every Linear; oneDNN with the weight reordered once does not. Measured on a
2-core AVX-512 Xeon, 1 thread, weights cycled through six copies so that each call reads from memory (µs per call,
F.linear / packed): 1536×384 at 1 row 93 / 56, 4 rows 136 / 53, 16 rows 315 / 110, 512 rows 6019 / 2646;
8192×384 (the bundled lm_head) at 1 row 1128 / 402, 4 rows 1373 / 451, 512 rows 33489 / 13385; 5632×2048 at
1 row 2074 / 1157, 16 rows 6632 / 2509. The packed product wins at every size measured, so it serves every
inference call once packed. The bundled model's whole decode step went from 6.0 to 3.8 ms at batch 1 and from 9.5
to 5.0 ms at batch 4.

The pack is a second copy of the weight (the module keeps its own for saving, loading, training and other
devices), so packing doubles the memory of the float Linears; 8-bit Linears (quant/) are not packed. The pack
serves a call only while the weight is the one it was made from and autograd does not record (the oneDNN op has
no backward); otherwise the call is a plain F.linear. "The one it was made from": the same storage, no
`load_state_dict` since, and no in-place write that the version counter saw. A write under torch.inference_mode()
bumps no version counter, so after writing weights that way call `pack_for_cpu(refresh=True)` (or the model's
`pack_weights(refresh=True)`). Otherwise packing again keeps a live pack: every new engine on a model packs it,
and laying a large model out again would cost seconds and a third copy of its weights meanwhile.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tnllm import kernels

# oneDNN's reorder takes the row count it should lay the weight out for; decode batches are 1 to 16 rows, and a
# weight laid out for 16 rows served 1 to 16 rows as fast as one laid out for each (and prefill faster than F.linear).
PACK_ROWS_HINT = 16


def can_pack_for_cpu(weight: torch.Tensor) -> bool:
    """True where `pack_for_cpu` applies: an fp32 weight on the CPU of a PyTorch built with oneDNN."""
    return weight.device.type == "cpu" and weight.dtype == torch.float32 and torch.backends.mkldnn.is_available()


class _CpuPack:
    """A oneDNN copy of one weight and the identity of the weight it was made from."""

    def __init__(self, weight: torch.Tensor):
        self.source = _identity(weight)
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACK_ROWS_HINT)

    def __deepcopy__(self, memo) -> None:
        return None  # an opaque oneDNN tensor cannot be copied: a copied module runs unpacked until packed again

    def __reduce__(self):
        return type(None), ()  # nor pickled: an unpickled module runs unpacked until packed again


def _identity(weight: torch.Tensor) -> tuple:
    # Inference tensors keep no version counter (only an in-place write under inference_mode could change one).
    version = None if weight.is_inference() else weight._version
    return weight.data_ptr(), version, weight.dtype, weight.device, tuple(weight.shape)


class Linear(nn.Linear):
    """nn.Linear (same parameters, state dict and behaviour) that can serve inference from a CPU pack, and take the
    op before it into its product (`prologue_forward`)."""

    TAKES_PROLOGUE = True  # read by tnllm.layers.takes_prologue

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_pack()

    def _init_pack(self) -> None:
        self._cpu_pack: _CpuPack | None = None
        self.register_load_state_dict_post_hook(Linear._drop_pack)  # loading writes in place, maybe unversioned

    @classmethod
    def adopt(cls, linear: nn.Linear) -> "Linear":
        """Make a plain nn.Linear (say, of a transformers model) this class in place: same parameters and
        hooks, and `pack_for_cpu` from now on."""
        if not isinstance(linear, cls):
            linear.__class__ = cls
            linear._init_pack()
        return linear

    def prologue_forward(self, x: torch.Tensor, prologue: str, other: torch.Tensor | None = None,
                         eps: float = 1e-6, **epilogue):
        """self(op(x, other)) for a `kernels.reference.PROLOGUES` op, fused (`kernels.prologue_linear`, which also
        takes the deferred-norm `epilogue`: row_ms, row_power, residual)."""
        return kernels.prologue_linear(x, self.weight, None, self.bias, prologue=prologue, other=other, eps=eps,
                                       **epilogue)

    def _drop_pack(self, incompatible_keys) -> None:
        self._cpu_pack = None

    @torch.no_grad()
    def pack_for_cpu(self, refresh: bool = False) -> bool:
        """Lay the weight out for oneDNN (see the module docstring), keeping a live pack unless `refresh`; False
        (and no pack) where that cannot apply."""
        if not can_pack_for_cpu(self.weight):
            self._cpu_pack = None
        elif refresh or self._live_pack() is None:
            self._cpu_pack = _CpuPack(self.weight)
        return self._cpu_pack is not None

    def _live_pack(self) -> _CpuPack | None:
        pack = self._cpu_pack
        if pack is not None and pack.source != _identity(self.weight):
            self._cpu_pack = pack = None  # moved, converted, reloaded or trained: let the stale copy go
        return pack

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if kernels.fuses_prologue(x, self.weight, "none"):  # a GPU decode row: the Triton product beats cuBLAS
            return self.prologue_forward(x, "none")
        pack = self._live_pack()
        if pack is None or x.dtype != torch.float32 or (torch.is_grad_enabled() and (
                self.weight.requires_grad or x.requires_grad)):
            return F.linear(x, self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, pack.weight, self.bias, "none", [], "")


def pack_linears_for_cpu(module: nn.Module, refresh: bool = False) -> int:
    """`Linear.pack_for_cpu(refresh)` on every nn.Linear inside `module` (plain ones adopted); the number packed."""
    return sum(Linear.adopt(m).pack_for_cpu(refresh) for m in list(module.modules())
               if type(m) in (nn.Linear, Linear) and can_pack_for_cpu(m.weight))


def packed_linears(model) -> int:
    """How many Linears inside `model` serve inference from a live CPU pack now (0 for a model that is not a
    module: a tensor-parallel driver)."""
    if not isinstance(model, nn.Module):
        return 0
    return sum(isinstance(m, Linear) and m._live_pack() is not None for m in model.modules())
