"""Triton product of the channel mixer's two halves: y[..., :g] * y[..., g:] for the packed l1|l2 output.

Forward only, for decode (docs/kernels.md#fused-decode-ops): PyTorch multiplies the two strided halves of a
multi-row y with its generic, unvectorised elementwise kernel (3 us at 16 rows of the 7B shape, against 1.2 at one
row); this kernel reads both halves of a row with contiguous loads whatever the row count.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["glu_mul_triton"]

BLOCK = 1024  # outputs per program


@triton.jit
def _glu_mul_kernel(y, out, G, s_y, BLOCK: tl.constexpr):
    i_r, i_g = tl.program_id(0).to(tl.int64), tl.program_id(1)  # rows on the grid's first axis: no 65,535 limit
    o_g = i_g * BLOCK + tl.arange(0, BLOCK)
    mask = o_g < G
    a = tl.load(y + i_r * s_y + o_g, mask=mask).to(tl.float32)
    b = tl.load(y + i_r * s_y + G + o_g, mask=mask).to(tl.float32)
    tl.store(out + i_r * G + o_g, (a * b).to(out.dtype.element_ty), mask=mask)  # one rounding, as torch's a * b


def glu_mul_triton(y: torch.Tensor) -> torch.Tensor:
    """`reference.glu_mul_ref` in one kernel: y [..., 2g] (last dim contiguous) -> [..., g] in y's dtype."""
    if y.shape[-1] % 2 or y.stride(-1) != 1:
        raise ValueError(f"y needs an even, contiguous last dim (l1's outputs, then l2's), got {tuple(y.shape)} "
                         f"with strides {y.stride()}")
    G = y.shape[-1] // 2
    rows = y.reshape(-1, 2 * G)  # [R, 2g]: a view for the model's outputs
    out = torch.empty(*y.shape[:-1], G, dtype=y.dtype, device=y.device)
    if rows.shape[0]:
        _glu_mul_kernel[(rows.shape[0], triton.cdiv(G, BLOCK))](rows, out, G, rows.stride(0), BLOCK=BLOCK,
                                                                 num_warps=4)
    return out
