"""The fused batch sampler (kernels/triton_sample.py) against its PyTorch twin, and through the engine's sampler.

Runs on CUDA, or on CPU tensors under TRITON_INTERPRET=1.
"""

import pytest
import torch

from tests.conftest import requires_triton_interpret
from tnllm import kernels
from tnllm.engine import BatchSampler
from tnllm.engine.sampler import HEAD, SMALL_HEAD, SamplePlan
from tnllm.kernels import reference as ref
from tnllm.sampling import SamplingParams

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    """Under the interpreter, small blocks and sorts: the same merge levels at shapes CI can afford (a sort of
    2048 keys per program takes minutes there); on CUDA the real sizes."""
    if DEVICE == "cpu":
        from tnllm.kernels import triton_sample
        monkeypatch.setattr(triton_sample, "BLOCK_V", 128)
        monkeypatch.setattr(triton_sample, "SORT_WIDTH", 64)


def random_tables(S: int, V: int, head: int, seed: int) -> ref.SlotTables:
    """Per-slot settings across their ranges (a third of the slots greedy), penalty sets of random ids."""
    g = torch.Generator().manual_seed(seed)
    temperature = torch.rand(S, generator=g) * 2 + 0.05
    tables = ref.SlotTables(
        temperature=torch.where(torch.rand(S, generator=g) < 0.3, 0.0, temperature),
        top_k=torch.randint(1, head + 1, (S,), generator=g),
        top_p=torch.where(torch.rand(S, generator=g) < 0.3, 1.0, torch.rand(S, generator=g)),
        penalty=torch.rand(S, generator=g) + 0.5,
        seed=torch.randint(0, 2**62, (S,), generator=g),
        drawn=torch.randint(0, 2**40, (S,), generator=g),
        last_token=torch.zeros(S, dtype=torch.long),
        seen=torch.rand(S, V, generator=g) < 0.1,
        vocab_hash=ref.mix32(torch.arange(V)),
    )
    return ref.SlotTables(*(t.to(DEVICE) for t in tables))


def copy_tables(tables: ref.SlotTables) -> ref.SlotTables:
    return ref.SlotTables(*(t.clone() for t in tables))


@requires_triton_interpret
def untied_logits(B: int, V: int, dtype: torch.dtype, g: torch.Generator) -> torch.Tensor:
    """[B, V] logits without ties (the twin's top-k orders ties its own way), as strided rows: fp32 normal, or
    bf16 multiples of 1/32 in [-4, 4) (exact in bf16; V <= 256)."""
    if dtype == torch.float32:
        rows = torch.randn(B, V + 5, generator=g) * 4
    else:
        rows = torch.stack([torch.randperm(256, generator=g)[:V + 5] for _ in range(B)]).float() / 32 - 4
    return rows.to(dtype)[:, :V]


@requires_triton_interpret
@pytest.mark.parametrize("B,V,head,penalty,draw,dtype", [
    (3, 1500, SMALL_HEAD, True, True, torch.float32),   # chat's plan: vocabulary blocks, a merge level
    (1, 513, HEAD, False, True, torch.float32),         # one row, two head-sized blocks and one token
    (5, 250, HEAD, True, True, torch.bfloat16),         # fewer tokens than the block (and than the head)
    (4, 50, SMALL_HEAD, True, True, torch.bfloat16),    # fewer tokens than the head
    (17, 1100, 0, True, False, torch.float32),          # every row greedy: no sort; batch 17
    (3, 200, 0, False, False, torch.bfloat16),
])
def test_fused_sampler_equals_the_reference(B, V, head, penalty, draw, dtype):
    """Same ids and the same table updates as the PyTorch twin; a NaN row and an inf row report NOT_FINITE."""
    S = B + 3
    tables = random_tables(S, V, max(head, 1), seed=B * V)
    g = torch.Generator().manual_seed(V)
    logits = untied_logits(B, V, dtype, g)
    logits[B // 2, V // 3] = float("nan")
    if B > 2:
        logits[B - 1, 0] = float("inf")
    slots = torch.randperm(S - 1, generator=g)[:B] + 1  # distinct slots (slot 0: the padding sink)
    logits, slots = logits.to(DEVICE), slots.to(DEVICE)
    want_tables, got_tables = copy_tables(tables), copy_tables(tables)
    want = ref.sample_rows_ref(logits, slots, want_tables, penalty=penalty, draw=draw, head=head)
    with kernels.use_impl("triton"):
        got = kernels.sample_rows(logits, slots, got_tables, penalty=penalty, draw=draw, head=head)
    assert got.dtype == torch.long and torch.equal(got.cpu(), want.cpu())
    assert (got == ref.NOT_FINITE).sum() == (2 if B > 2 else 1)
    for name, w, o in zip(ref.SlotTables._fields, want_tables, got_tables):
        assert torch.equal(w.cpu(), o.cpu()), name


@requires_triton_interpret
def test_fused_sampler_hash_noise_is_the_reference_bit_for_bit():
    """Equal logits, every token kept (top_k = V = head, top_p 1, temperature 1): each pick is the argmax of the
    noise alone, so any hash or rounding difference shows."""
    B, V = 16, SMALL_HEAD
    tables = random_tables(B + 1, V, V, seed=1)._replace(
        temperature=torch.ones(B + 1, device=DEVICE), top_k=torch.full((B + 1,), V, device=DEVICE),
        top_p=torch.ones(B + 1, device=DEVICE))
    logits, slots = torch.zeros(B, V, device=DEVICE), torch.arange(1, B + 1, device=DEVICE)
    want = ref.sample_rows_ref(logits, slots, copy_tables(tables), penalty=False, draw=True, head=V)
    with kernels.use_impl("triton"):
        got = kernels.sample_rows(logits, slots, copy_tables(tables), penalty=False, draw=True, head=V)
    assert torch.equal(got.cpu(), want.cpu()) and len(set(got.tolist())) > B // 2


@requires_triton_interpret
@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_sampler_head_plan_draws_what_the_general_path_draws(impl):
    """The engine's sampler on the head plan (fused on Triton) == the GENERAL plan (full sort) for chat-like rows."""
    V, slots = 300, torch.tensor([1, 2, 3, 4], device=DEVICE)
    rows = [SamplingParams(temperature=0.7, top_k=40, top_p=0.9, seed=1), SamplingParams(temperature=0),
            SamplingParams(temperature=1.5, top_k=HEAD, top_p=1.0, seed=2),
            SamplingParams(temperature=0.3, top_k=5, top_p=0.5, seed=3)]
    draws = {}
    for plan in (SamplePlan(penalty=False, head=HEAD), SamplePlan()):
        sampler = BatchSampler(5, V, DEVICE)
        for slot, params in zip(slots.tolist(), rows):
            sampler.configure(slot, params, params.seed or 0, [3, 4])
        logits = torch.randn(2, 4, V, generator=torch.Generator().manual_seed(0)).to(DEVICE) * 3
        with kernels.use_impl(impl):
            draws[plan] = [sampler.sample(step, slots, plan).tolist() for step in logits]
    assert len(set(map(str, draws.values()))) == 1, draws
