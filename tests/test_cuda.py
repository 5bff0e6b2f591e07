"""GPU-only checks (skipped without CUDA): Triton model path vs PyTorch, CUDA-graph decode vs eager."""

import pytest
import torch

import kernels
from tests.conftest import assert_close, requires_cuda
from tnllm import TNLConfig, TransNormerLLM
from tnllm.cuda_graph import GraphedDecoder

pytestmark = requires_cuda


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = TNLConfig(vocab_size=1024, dim=512, n_layers=4, n_heads=4, hidden_dim=512, glu_dim=1024,
                    lrpe_layers=[1, 0, 1, 0], tie_word_embeddings=False)
    return TransNormerLLM(cfg).cuda().to(torch.bfloat16).eval()


def test_triton_model_matches_torch_model(model):
    ids = torch.randint(0, 1024, (3, 777), device="cuda")
    with torch.inference_mode():
        with kernels.use_impl("torch"):
            ref = model(ids).float()
        out = model(ids).float()
    assert kernels.backend_for("cuda") == "triton"
    assert_close("logits", ref, out, rel=2e-2)


def test_graphed_decode_equals_eager(model):
    ids = torch.randint(0, 1024, (2, 100), device="cuda")
    with torch.inference_mode():
        eager_state = model.allocate_state(2)
        model(ids[:, :60], eager_state)
        eager = [model(ids[:, t:t + 1], eager_state)[:, -1].float() for t in range(60, 100)]
        session = model.allocate_state(2)
        model(ids[:, :60], session)
        decoder = GraphedDecoder(model, batch_size=2)
        decoder.load(session)
        graphed = [decoder.step(ids[:, t:t + 1]).float().clone() for t in range(60, 100)]
        decoder.store(session)
    assert_close("graphed logits", torch.stack(eager), torch.stack(graphed), rel=1e-5)
    assert torch.equal(session.positions, eager_state.positions)


def test_generate_with_graph_equals_eager(model):
    from tnllm.generation import decode_tokens, generate_tokens, prefill
    from tnllm.sampling import SamplingParams

    prompt = torch.randint(3, 1024, (50,)).tolist()
    params = SamplingParams(temperature=0, max_new_tokens=30)
    eager = list(generate_tokens(model, prompt, params, eos_ids=set()))
    decoder = GraphedDecoder(model, batch_size=1)
    state = model.allocate_state(1)
    logits = prefill(model, torch.tensor([prompt], device="cuda"), state)
    graphed = list(decode_tokens(model, logits, state, params, set(), prompt, graph=decoder))
    assert graphed == eager
    assert state.positions.item() == len(prompt) + 29  # the last sampled token is not fed


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_wide_lrpe_heads_prefill_in_every_dtype(dtype):
    """dk = 256 (an LRPE layer of 128-wide heads): the fp32 chunk kernel must fit the GPU's shared memory."""
    torch.manual_seed(0)
    q, k = (torch.randn(2, 333, 4, 256, device="cuda", dtype=dtype) * 0.1 for _ in range(2))
    v = torch.randn(2, 333, 4, 128, device="cuda", dtype=dtype)
    log_decay = -torch.rand(4, device="cuda") * 0.1
    o_ref, s_ref = kernels.reference.lightning_attn_naive(q.double(), k.double(), v.double(), log_decay.double(),
                                                          output_final_state=True)
    with kernels.use_impl("triton"):
        o, s = kernels.lightning_attn(q, k, v, log_decay, output_final_state=True)
    rel = 5e-3 if dtype == torch.float32 else 1e-2  # fp32: the kernel multiplies in tf32 (as in test_kernels.py)
    assert_close("o", o_ref, o, rel=rel)
    assert_close("state", s_ref, s, rel=rel)
