"""Shared test helpers: seeding, tolerance helper, markers for CUDA/Triton-only cases."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
requires_triton_interpret = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
    reason="Triton kernels need CUDA or TRITON_INTERPRET=1",
)


def assert_close(name: str, ref: torch.Tensor, out: torch.Tensor, *, rel: float = 1e-5, atol: float = 0.0):
    """Assert rel-L2 error ||out - ref|| / ||ref|| <= rel (or max-abs <= atol); prints both on failure."""
    assert ref.shape == out.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values"
    diff = (out.double() - ref.double())
    max_abs = diff.abs().max().item() if diff.numel() else 0.0
    denom = ref.double().norm().item()
    rel_err = diff.norm().item() / denom if denom > 0 else diff.norm().item()
    ok = rel_err <= rel or (atol > 0 and max_abs <= atol)
    assert ok, f"{name}: rel-L2 {rel_err:.3e} (limit {rel:.1e}), max-abs {max_abs:.3e}"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
