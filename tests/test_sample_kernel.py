"""The fused head draw (kernels/triton_sample.py) against its PyTorch twin, and through the engine's sampler.

Runs on CUDA, or on CPU tensors under TRITON_INTERPRET=1.
"""

import pytest
import torch

from tests.conftest import requires_triton_interpret
from tnllm import kernels
from tnllm.engine import BatchSampler
from tnllm.engine.sampler import HEAD, SamplePlan
from tnllm.kernels import reference as ref
from tnllm.sampling import SamplingParams

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def head_inputs(B: int, N: int, V: int, seed: int):
    """Random rows: logits' sorted heads (a strided view), hashes and per-row settings across their ranges."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, V, generator=g) * 4
    values, candidates = torch.topk(logits, N)
    padded = torch.full((B, N + 3), float("nan"))
    padded[:, :N] = values  # the kernel must honour the row stride
    settings = dict(
        temperature=torch.rand(B, generator=g) * 2 + 0.05,
        top_k=torch.randint(1, N + 1, (B,), generator=g),
        top_p=torch.where(torch.rand(B, generator=g) < 0.3, 1.0, torch.rand(B, generator=g)),
        seed=torch.randint(0, 2**62, (B,), generator=g),
        drawn=torch.randint(0, 2**40, (B,), generator=g),
    )
    args = [padded[:, :N], candidates, ref.mix32(torch.arange(V)), *settings.values()]
    return [t.to(DEVICE) for t in args]


@requires_triton_interpret
@pytest.mark.parametrize("B,N,V", [(48, 256, 1000), (5, 100, 300), (3, 1, 50)])
def test_triton_draw_equals_the_reference(B, N, V):
    args = head_inputs(B, N, V, seed=B + N)
    want = ref.draw_from_head_ref(*args)
    with kernels.use_impl("triton"):
        got = kernels.draw_from_head(*args)
    assert got.dtype == torch.long and torch.equal(got.cpu(), want.cpu())


@requires_triton_interpret
def test_triton_hash_noise_is_the_reference_bit_for_bit():
    """top_k = N, top_p = 1, temperature 1 over equal logits: the pick is the argmax of the noise alone, so any
    hash or rounding difference shows."""
    B, N, V = 64, 64, 500
    values = torch.zeros(B, N)
    candidates = torch.stack([torch.randperm(V, generator=torch.Generator().manual_seed(b))[:N] for b in range(B)])
    args = [values, candidates, ref.mix32(torch.arange(V)), torch.ones(B), torch.full((B,), N),
            torch.ones(B), torch.arange(B) * 2**33 + 7, torch.arange(B) * 3]
    args = [t.to(DEVICE) for t in args]
    want = ref.draw_from_head_ref(*args)
    with kernels.use_impl("triton"):
        assert torch.equal(kernels.draw_from_head(*args).cpu(), want.cpu())


@requires_triton_interpret
@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_sampler_head_plan_draws_what_the_general_path_draws(impl):
    """The engine's sampler on the head plan (fused draw) == the GENERAL plan (full sort) for chat-like rows."""
    V, slots = 700, torch.tensor([1, 2, 3, 4], device=DEVICE)
    rows = [SamplingParams(temperature=0.7, top_k=40, top_p=0.9, seed=1), SamplingParams(temperature=0),
            SamplingParams(temperature=1.5, top_k=HEAD, top_p=1.0, seed=2),
            SamplingParams(temperature=0.3, top_k=5, top_p=0.5, seed=3)]
    draws = {}
    for plan in (SamplePlan(penalty=False, head=True), SamplePlan()):
        sampler = BatchSampler(5, V, DEVICE)
        for slot, params in zip(slots.tolist(), rows):
            sampler.configure(slot, params, params.seed or 0, [3, 4])
        logits = torch.randn(6, 4, V, generator=torch.Generator().manual_seed(0)).to(DEVICE) * 3
        with kernels.use_impl(impl):
            draws[plan] = [sampler.sample(step, slots, plan).tolist() for step in logits]
    assert len(set(map(str, draws.values()))) == 1, draws
