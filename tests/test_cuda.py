"""GPU-only checks (skipped without CUDA): Triton model path vs PyTorch, the engine's CUDA-graph decode vs its eager
decode, the TP path's `GraphedDecoder` vs eager, the chunk kernel on wide LRPE heads."""

import pytest
import torch

from tests.conftest import assert_close, requires_cuda
from tnllm import TNLConfig, TransNormerLLM, kernels
from tnllm.engine import Engine, EngineConfig
from tnllm.engine.scheduler import decode_step
from tnllm.sampling import SamplingParams
from tnllm.tokenizer import BUNDLED_TOKENIZER, Tokenizer

pytestmark = requires_cuda

# Three sessions of different prompt and reply lengths, greedy and sampled: the batch shrinks 3 -> 2 -> 1, so
# the graphs of buckets 4 (one pad row on the sink slot), 2 and 1 all replay.
PROMPTS = [torch.randint(3, 1024, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (60, 7, 33)]
PARAMS = [SamplingParams(temperature=0, max_new_tokens=30),
          SamplingParams(temperature=0.8, top_k=50, repetition_penalty=1.2, max_new_tokens=20, seed=1),
          SamplingParams(temperature=0, max_new_tokens=10)]


def build(dtype: torch.dtype, vocab_size: int = 1024) -> TransNormerLLM:
    torch.manual_seed(0)
    cfg = TNLConfig(vocab_size=vocab_size, dim=512, n_layers=4, n_heads=4, hidden_dim=512, glu_dim=1024,
                    lrpe_layers=[1, 0, 1, 0], tie_word_embeddings=False)
    return TransNormerLLM(cfg).cuda().to(dtype).eval()


@pytest.fixture(scope="module")
def model():
    return build(torch.bfloat16)


@pytest.fixture(scope="module")
def fp32_model():
    """Graph and eager run the same kernels on the same inputs: in fp32 they agree to rounding (1e-5)."""
    return build(torch.float32)


@pytest.fixture(scope="module")
def tok():
    return Tokenizer(BUNDLED_TOKENIZER)  # 8192 pieces: detokenises every id of the 1024-token vocabulary


def make_engine(model, tok, **config) -> Engine:
    """A threadless engine of 4 slots (graph buckets 1, 2, 4), eos never ending a reply."""
    return Engine(model, tok, EngineConfig(max_sessions=4, threaded=False, **config), eos_ids=set())


def test_triton_model_matches_torch_model(model):
    ids = torch.randint(0, 1024, (3, 777), device="cuda")
    with torch.inference_mode():
        with kernels.use_impl("torch"):
            ref = model(ids).float()
        out = model(ids).float()
    assert kernels.backend_for("cuda") == "triton"
    assert_close("logits", ref, out, rel=2e-2)


@pytest.mark.parametrize("sample_in_graph", [True, False])
def test_engine_graph_decode_equals_eager(fp32_model, tok, sample_in_graph):
    """The same replies through the captured decode (the engine's CUDA default: a step ahead, sampling plans) and
    the eager one (synchronous): the same ids, states within 1e-5. Both read prompts in eager chunks: captured
    prefill pieces group the chunk kernel's tf32 sums differently (checked by bench/engine_gpu.py)."""
    engines, replies = [], []
    for graphs in (False, True):
        engine = make_engine(fp32_model, tok, cuda_graphs=graphs, sample_in_graph=sample_in_graph,
                             prefill_graph=False)
        replies.append([engine.open().feed_ids(ids, p) for ids, p in zip(PROMPTS, PARAMS)])
        engine.run_until_idle()
        engines.append(engine)
    eager, graphed = engines
    assert eager.scheduler.decoder is None and graphed.scheduler.decoder.sizes == [1, 2, 4]
    assert [r.sampled for r in replies[1]] == [r.sampled for r in replies[0]]
    assert [len(r.sampled) for r in replies[1]] == [p.max_new_tokens for p in PARAMS]
    slots = [r.session.slot for r in replies[0]]
    for eager_kv, graph_kv in zip(eager.pool.kv, graphed.pool.kv):
        assert_close("state", eager_kv[slots], graph_kv[slots], rel=1e-5)
    assert torch.equal(eager.pool.positions[slots], graphed.pool.positions[slots])


@torch.inference_mode()
def test_graph_step_logits_equal_eager_step(fp32_model, tok):
    """One decode step of three sessions holding the same prompts: the captured logits (bucket 4, sampler
    outside the graph) equal the eager step's to 1e-5 (both engines read the prompts in eager chunks)."""
    logits = []
    for graphs in (False, True):
        engine = make_engine(fp32_model, tok, cuda_graphs=graphs, sample_in_graph=False, prefill_graph=False)
        sessions = [engine.open() for _ in PROMPTS]
        for session, ids in zip(sessions, PROMPTS):  # the state reads the prompt; its first reply id is the input
            session.feed_ids(ids, SamplingParams(temperature=0, max_new_tokens=1)).wait()
        slots = [s.slot for s in sessions]
        if graphs:
            decoder = engine.scheduler.decoder
            decoder.step(slots)
            logits.append(decoder.captured(len(slots)).out[:len(slots)].clone())
        else:
            slot_ids = torch.tensor(slots, device=engine.pool.device)
            logits.append(decode_step(fp32_model, engine.pool, engine.sampler, slot_ids, sample=False))
    assert_close("logits", logits[0], logits[1], rel=1e-5)


def test_graphed_decoder_equals_eager(model):
    """`tnllm.cuda_graph.GraphedDecoder`, kept while the TP path (tnllm/tp/serve.py, bench/tp.py) still replays
    it; this test goes with that module once TP decodes through the engine."""
    from tnllm.cuda_graph import GraphedDecoder

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


@torch.inference_mode()
def test_llama_static_cache_graph_steps_equal_the_default_cache():
    """The strong Transformer baseline: its captured static-cache steps compute what transformers' default does."""
    # The adapters use the call of the pinned transformers (`cache=`, `out.cache`); a GPU image whose release
    # predates it (5.17 names the field `past_key_values`) skips.
    import dataclasses

    outputs = pytest.importorskip("transformers.modeling_outputs")
    if "cache" not in {f.name for f in dataclasses.fields(outputs.CausalLMOutputWithPast)}:
        pytest.skip("this transformers release has no `cache` output field (the pinned one has)")
    from tests.test_bench import static_vs_default_cache

    dynamic, static, path = static_vs_default_cache("cuda")
    assert path == "static-cache-graph"
    assert_close("static graph vs dynamic cache logits", dynamic, static, rel=1e-5)


def test_upload_ids_does_not_wait_for_queued_kernels():
    """The engine's host -> device ids (new sessions' prompts and slots) leave the host at once while a step runs:
    a pageable copy would block until the queued kernels had run."""
    import time

    from tnllm.engine.pool import upload_ids

    torch.cuda.synchronize()
    torch.cuda._sleep(200_000_000)  # about 0.1 s of GPU time queued ahead of the copy
    start = time.perf_counter()
    ids = upload_ids([5, 7, 11], torch.device("cuda"))
    returned_after = time.perf_counter() - start
    assert ids.tolist() == [5, 7, 11] and ids.dtype == torch.long and ids.is_cuda
    assert returned_after < 0.02, f"upload_ids waited {returned_after * 1e3:.1f} ms for queued kernels"


def test_glu_mul_takes_more_rows_than_a_grid_axis_holds():
    """A prompt of more than 65,535 tokens read in one forward: the GLU product's rows sit on the grid's first
    axis (the second holds at most 65,535 programs)."""
    from tnllm.kernels.triton_glu import glu_mul_triton

    y = torch.randn(70_000, 2 * 96, device="cuda", dtype=torch.bfloat16)
    assert torch.equal(glu_mul_triton(y), (y[:, :96].float() * y[:, 96:].float()).to(torch.bfloat16))


@pytest.mark.parametrize("weights", ["bf16", "int8"])
def test_app_engine_starts_with_every_decode_graph_captured(tok, weights):
    """The app's engine captures the decode and packed steps of every batch bucket for chat's default sampling at
    startup (int8 weights, the app's GPU default, with their own packed chunk): a chat reply with those settings,
    from one session or several, captures nothing more."""
    from tnllm import quant
    from tnllm.engine.engine import prefill_budgets
    from tnllm.engine.graphs import bucket_sizes
    from tnllm.webui.runtime import CHAT_SESSIONS, start_engine
    from tnllm.webui.validation import CHAT_DEFAULTS

    served = build(torch.bfloat16, tok.vocab_size)  # chat text: every id the tokenizer makes is in the vocabulary
    if weights == "int8":
        served = quant.quantize(served, "int8")
    engine = start_engine(served, tok, "test model")
    try:
        assert engine.scheduler.prefill_budget == prefill_budgets("cuda", getattr(served, "quant_method", "none"))[0]
        assert engine.captured_graphs >= 2 * len(bucket_sizes(CHAT_SESSIONS))
        before = engine.captured_graphs
        sessions = [engine.open() for _ in range(3)]
        params = SamplingParams(**{**CHAT_DEFAULTS, "max_new_tokens": 8}, seed=1)
        replies = [s.send("hello there", params) for s in sessions]
        assert all(r.wait().stats.new_tokens == 8 or r.finish_reason == "eos" for r in replies)
        assert engine.captured_graphs == before
    finally:
        engine.shutdown()
