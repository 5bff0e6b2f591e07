"""The engine: slot-pool forward == RecurrentState forward, greedy == full-forward argmax (alone and batched),
isolation of concurrent sessions, multi-turn, cancel, time limit, stop strings, NaN isolation, fork/save/load,
chunked prefill interleaved with decoding, and the GPU benchmark script's CPU smoke mode."""

import copy
import subprocess
import sys
import threading

import pytest
import torch

from tests.conftest import ROOT, assert_close, import_bench_script, requires_triton_interpret
from tnllm import kernels, quant
from tnllm.engine import BatchSampler, Engine, EngineConfig, PoolFullError
from tnllm.engine.engine import PREFILL_BUDGETS, prefill_budgets
from tnllm.engine.graphs import DecodeGraphs, PrefillGraphs, piece_sizes, replay_eagerly, split_into_pieces
from tnllm.engine.sampler import GENERAL, HEAD, SMALL_HEAD, SamplePlan, head_size
from tnllm.sampling import SamplingParams, filter_logits
from tnllm.state import PackedSlotState, SlotState

GREEDY = SamplingParams(temperature=0, max_new_tokens=12)
SAMPLED = SamplingParams(temperature=1.2, top_k=50, top_p=0.95, repetition_penalty=1.3, max_new_tokens=12)


@pytest.fixture(scope="module")
def model(untied_tiny_model):
    return untied_tiny_model


@pytest.fixture(params=[False, True], ids=["sync", "overlap"])
def overlap(request):
    """Run a test with the host handling each step's ids at once (CPU default) and one step late (CUDA
    default: the ids of step n are handed out after step n + 1 is launched)."""
    return request.param


def make_engine(model, tok, **config):
    """A threadless engine (tests step it by hand), eos never ending a reply unless given."""
    eos_ids = config.pop("eos_ids", set())
    config.setdefault("prefill_budget", 16)
    config.setdefault("solo_prefill_budget", config["prefill_budget"])
    return Engine(model, tok, EngineConfig(**{"max_sessions": 6, "threaded": False, **config}), eos_ids=eos_ids)


def argmax_loop(model, ids, n):
    """The obvious reference: re-run the full sequence every step and take the argmax."""
    out = []
    for _ in range(n):
        out.append(int(model(torch.tensor([ids + out]))[0, -1].argmax()))
    return out


def prompt(n, seed):
    return torch.randint(3, 400, (n,), generator=torch.Generator().manual_seed(seed)).tolist()



def solo_ids(model, tok, ids, params, overlap=False):
    """Ids a reply samples when it is the engine's only session."""
    reply = make_engine(model, tok, overlap=overlap).open().feed_ids(ids, params).wait()
    return reply.sampled


# -- the model on pool slots --------------------------------------------------------------------------
@torch.inference_mode()
def test_slot_forward_equals_recurrent_state(model):
    """Prefill chunks and decode steps through pool slots (out of order, a gap) == RecurrentState rows."""
    ids = torch.randint(3, 400, (2, 30))
    state = model.allocate_state(2)
    ref = [model(ids[:, :20], state), model(ids[:, 20:21], state), model(ids[:, 21:22], state)]
    pool = model.allocate_state(5)  # slots 0..4
    slots = torch.tensor([4, 2])
    rows = SlotState(pool.kv, pool.positions, slots)
    out = [model(ids[:, :20], rows), model(ids[:, 20:21], rows), model(ids[:, 21:22], rows)]
    for a, b in zip(ref, out):
        assert_close("logits", a, b, rel=1e-5)
    for layer_ref, layer_pool in zip(state.kv, pool.kv):
        assert_close("state", layer_ref, layer_pool[slots], rel=1e-5)
        assert not layer_pool[[0, 1, 3]].any()  # untouched slots stay zero
    assert pool.positions.tolist() == [0, 0, 22, 0, 22]


@requires_triton_interpret
def test_triton_step_through_slots_equals_reference():
    B, H, D, E, S = 3, 2, 16, 16, 6
    device = "cuda" if torch.cuda.is_available() else "cpu"  # the interpreter runs it on the CPU
    q, k = torch.randn(B, H, D, device=device), torch.randn(B, H, D, device=device)
    v, a = torch.randn(B, H, E, device=device), -torch.rand(H, device=device)
    pool = torch.randn(S, H, D, E, device=device)
    slots = torch.tensor([5, 1, 3], device=device)
    expected_pool = pool.clone()
    o_ref = kernels.reference.lightning_attn_step_ref(q, k, v, a, expected_pool, slots)
    with kernels.use_impl("triton"):
        o = kernels.lightning_attn_step(q, k, v, a, pool, slots)
    assert_close("o", o_ref, o, rel=1e-5)
    assert_close("pool", expected_pool, pool, rel=1e-5)


@pytest.mark.parametrize("impl", ["torch", pytest.param("triton", marks=requires_triton_interpret)])
@torch.inference_mode()
def test_packed_row_equals_the_decode_step_and_the_chunk_apart(model, impl):
    """One packed forward (decode tokens of slots 1, 4, 3 and an 11-token chunk of slot 5, every slot with a
    history) == the decode step and the chunk run one after the other: logits, states and positions."""
    device = "cuda" if impl == "triton" and torch.cuda.is_available() else "cpu"  # else the interpreter
    model = copy.deepcopy(model).to(device)
    pool = model.allocate_state(6)
    ids = torch.randint(3, 400, (4, 7), device=device)
    model(ids, SlotState(pool.kv, pool.positions, torch.tensor([1, 3, 4, 5], device=device)))
    packed = pool.clone()
    decode_slots, chunk_slot = torch.tensor([1, 4, 3], device=device), torch.tensor([5], device=device)
    tokens, chunk = torch.randint(3, 400, (3, 1), device=device), torch.randint(3, 400, (1, 11), device=device)
    with kernels.use_impl(impl):
        apart = torch.cat([model(tokens, SlotState(pool.kv, pool.positions, decode_slots))[:, -1],
                           model(chunk, SlotState(pool.kv, pool.positions, chunk_slot), logits_to_keep=1)[:, -1]])
        row = torch.cat([tokens[:, 0], chunk[0]])[None]  # [1, 3 + 11]
        together = model(row, PackedSlotState(packed.kv, packed.positions, torch.cat([decode_slots, chunk_slot]), 3))
    assert together.shape == (1, 4, 400)
    assert_close("logits", apart, together[0], rel=1e-5)
    for layer_apart, layer_packed in zip(pool.kv, packed.kv):
        assert_close("state", layer_apart, layer_packed, rel=1e-5)
    assert packed.positions.tolist() == pool.positions.tolist() == [0, 8, 0, 8, 8, 18]
    with pytest.raises(ValueError, match="n_decode"):
        model(row[:, :3], PackedSlotState(packed.kv, packed.positions, torch.cat([decode_slots, chunk_slot]), 3))


def test_packing_prompt_chunks_into_decode_steps_changes_no_reply(model, tok, overlap):
    """Eager engine: prompts arriving while others decode read inside the decode steps (`packed_step`), and every
    reply (greedy and seeded sampling) equals the engine that reads them apart."""
    def run(pack_chunks):
        engine = make_engine(model, tok, overlap=overlap, pack_chunks=pack_chunks)
        params = [GREEDY, SamplingParams(**{**SAMPLED.__dict__, "seed": 9}), GREEDY]
        replies = [engine.open().feed_ids(prompt(4, 40), params[0])]
        engine.step()
        replies += [engine.open().feed_ids(prompt(n, 40 + n), p) for n, p in ((37, params[1]), (23, params[2]))]
        engine.run_until_idle()
        return [r.sampled for r in replies]

    assert run(pack_chunks=True) == run(pack_chunks=False)


def test_prompt_chunks_ride_in_the_captured_decode_step(model, tok, overlap):
    """With graph stand-ins, a prompt read while others decode takes the packed graph for its full chunks
    (16 ids) and a prefill piece for the rest; greedy replies == argmax loop."""
    engine = make_engine(model, tok, overlap=overlap)
    decoder = DecodeGraphs(model, engine.pool, engine.sampler, max_batch=6, capture=replay_eagerly)
    prefill = PrefillGraphs(model, engine.pool, max_chunk=16, capture=replay_eagerly)
    engine.scheduler.decoder, engine.scheduler.prefill_graph = decoder, prefill
    pieces = count_piece_replays(prefill)
    prompts = [prompt(5, 50), prompt(6, 51), prompt(40, 52)]
    replies = [engine.open().feed_ids(ids, GREEDY) for ids in prompts[:2]]
    engine.step()  # both short prompts read alone
    replies.append(engine.open().feed_ids(prompts[2], GREEDY))
    engine.run_until_idle()
    assert {key[2] for key in decoder.graphs} == {0, 16}, "decode graphs and the packed one for 16-id chunks"
    # 5 and 6 ids alone: 4 + 1, 4 + 2; then 40 beside decoding: two 16-id chunks packed, the last 8 a piece
    assert pieces == [4, 1, 4, 2, 8]
    for reply, ids in zip(replies, prompts):
        assert reply.sampled == argmax_loop(model, ids, 12)


def test_precapture_leaves_nothing_to_capture_while_serving(model, tok, overlap):
    """`Engine.precapture(params)` (graph stand-ins): every decode and packed step of each batch bucket and every
    prefill piece of each bucket is captured up front, so sessions of those settings joining at different steps,
    with short prompts and a long one read beside the decoding, capture nothing more; replies are unchanged."""
    engine = make_engine(model, tok, overlap=overlap)
    assert engine.precapture(GREEDY) == 0 and engine.captured_graphs == 0  # an eager engine has none
    decoder = DecodeGraphs(model, engine.pool, engine.sampler, max_batch=6, capture=replay_eagerly)
    prefill = PrefillGraphs(model, engine.pool, max_chunk=16, max_batch=6, capture=replay_eagerly)
    engine.scheduler.decoder, engine.scheduler.prefill_graph = decoder, prefill
    buckets, pieces = len(decoder.sizes), len(prefill.sizes) * len(prefill.buckets)
    assert engine.precapture(GREEDY, prefill_pieces=False) == 2 * buckets  # decode and packed steps only
    assert engine.precapture(GREEDY) == pieces - 5  # the one-row pieces existed already
    assert engine.precapture(GREEDY) == 0
    captured = engine.captured_graphs
    prompts = [prompt(n, 60 + n) for n in (3, 2, 40, 7, 2, 5)]
    replies = []
    for ids in prompts:
        replies.append(engine.open().feed_ids(ids, GREEDY))
        engine.step()
    engine.run_until_idle()
    assert engine.captured_graphs == captured
    for reply, ids in zip(replies, prompts):
        assert reply.sampled == argmax_loop(model, ids, 12)


# -- greedy correctness and isolation -------------------------------------------------------------------
def test_greedy_equals_full_forward_argmax(model, tok, overlap):
    ids = prompt(37, 1)  # 3 prefill chunks of 16
    assert solo_ids(model, tok, ids, GREEDY, overlap) == argmax_loop(model, ids, 12)


def test_concurrent_greedy_sessions_joining_at_different_steps(model, tok, overlap):
    engine = make_engine(model, tok, overlap=overlap)
    prompts = [prompt(n, seed) for seed, n in enumerate((5, 40, 17, 1))]
    params = [SamplingParams(temperature=0, max_new_tokens=n) for n in (12, 9, 14, 6)]
    replies = []
    for ids, p in zip(prompts, params):  # a new session joins every two steps
        replies.append(engine.open().feed_ids(ids, p))
        engine.step()
        engine.step()
    engine.run_until_idle()
    for reply, ids, p in zip(replies, prompts, params):
        assert reply.finish_reason == "length"
        assert reply.sampled == argmax_loop(model, ids, p.max_new_tokens)


def test_concurrent_seeded_sampling_equals_solo_runs(model, tok, overlap):
    prompts = [prompt(n, 10 + n) for n in (3, 25, 11)]
    params = [SamplingParams(**{**SAMPLED.__dict__, "seed": s}) for s in (1, 2, 3)]
    expected = [solo_ids(model, tok, ids, p) for ids, p in zip(prompts, params)]
    engine = make_engine(model, tok, overlap=overlap)
    replies = [engine.open().feed_ids(ids, p) for ids, p in zip(prompts, params)]
    engine.run_until_idle()
    assert [r.sampled for r in replies] == expected
    other_seed = solo_ids(model, tok, prompts[0], SamplingParams(**{**SAMPLED.__dict__, "seed": 99}))
    assert other_seed != expected[0]


def test_threaded_engine_serves_concurrent_consumers(model, tok, overlap):
    engine = Engine(model, tok, EngineConfig(max_sessions=4, prefill_budget=16, overlap=overlap), eos_ids=set())
    prompts = [prompt(n, n) for n in (4, 33, 9)]
    results = {}

    def consume(i):
        reply = engine.open().feed_ids(prompts[i], GREEDY)
        text = "".join(event.text for event in reply)
        results[i] = (reply.sampled, text, reply.finish_reason)

    threads = [threading.Thread(target=consume, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    engine.shutdown()
    for i, ids in enumerate(prompts):
        sampled, text, finish = results[i]
        assert sampled == argmax_loop(model, ids, 12) and finish == "length"
        assert text == tok.decode(sampled)


def count_piece_replays(graphs: PrefillGraphs, rows: bool = False) -> list:
    """Make each captured prefill piece of `graphs` (those captured now and later) note its size, or (size, batch
    bucket) with `rows`, when replayed; the list they go to."""
    replays = []
    piece = graphs.piece

    def counted(size: int, n: int):
        captured = piece(size, n)
        if not getattr(captured, "counted", False):
            replay, captured.counted = captured.replay, True

            def run():
                replays.append((size, captured.slots.shape[0]) if rows else size)
                replay()
            captured.replay = run
        return captured

    graphs.piece = counted
    return replays


@pytest.mark.parametrize("sample_in_graph", [True, False])
def test_graph_buckets_pad_to_the_sink_and_equal_eager(model, tok, sample_in_graph):
    """The bucketed decode (3 and 5 rows replay buckets 4 and 6 with pad rows on slot 0) leaves every session as
    the eager engine does: greedy == argmax loop, seeded sampling == solo runs."""
    engine = make_engine(model, tok)
    engine.scheduler.decoder = DecodeGraphs(model, engine.pool, engine.sampler, max_batch=6,
                                            sample_in_graph=sample_in_graph, capture=replay_eagerly)
    assert engine.scheduler.decoder.sizes == [1, 2, 4, 6]
    prompts = [prompt(n, 30 + n) for n in (3, 18, 7, 25, 2)]
    params = [GREEDY, SamplingParams(**{**SAMPLED.__dict__, "seed": 4}), GREEDY, GREEDY, GREEDY]
    replies = [engine.open().feed_ids(ids, p) for ids, p in zip(prompts[:3], params[:3])]
    engine.step()
    replies += [engine.open().feed_ids(ids, p) for ids, p in zip(prompts[3:], params[3:])]
    engine.run_until_idle()
    assert replies[1].sampled == solo_ids(model, tok, prompts[1], params[1])
    for i in (0, 2, 3, 4):
        assert replies[i].sampled == argmax_loop(model, prompts[i], 12)


def test_a_prompt_alone_reads_in_large_chunks_and_beside_decoding_in_small_ones(model, tok):
    engine = make_engine(model, tok, prefill_budget=8, solo_prefill_budget=64)
    alone = engine.open().feed_ids(prompt(50, 1), GREEDY)
    engine.step()
    assert alone.fed == 50, "nobody decodes: the solo budget"
    engine.step()
    newcomer = engine.open().feed_ids(prompt(50, 2), GREEDY)
    engine.step()
    assert newcomer.fed == 8, "a reply decodes: the small budget"
    engine.run_until_idle()
    assert newcomer.sampled == argmax_loop(model, prompt(50, 2), 12)
    cpu = Engine(model, tok, EngineConfig(max_sessions=1, threaded=False))
    assert (cpu.scheduler.prefill_budget, cpu.scheduler.solo_prefill_budget) == prefill_budgets("cpu")


def test_default_prefill_budgets_follow_the_device_and_the_weights(model, tok, monkeypatch):
    float_row = PREFILL_BUDGETS[("cuda", "none")]
    assert prefill_budgets("cuda", "bnb_int8") == float_row, "weights without a row: the device's float row"
    assert prefill_budgets("mps", "int8") == prefill_budgets("cpu"), "a device without a row: the CPU's"
    int8_model = quant.quantize(copy.deepcopy(model), "int8")
    monkeypatch.setitem(PREFILL_BUDGETS, ("cpu", "int8"), (7, 9))
    engine = Engine(int8_model, tok, EngineConfig(max_sessions=1, threaded=False))
    assert (engine.scheduler.prefill_budget, engine.scheduler.solo_prefill_budget) == (7, 9)
    floats = Engine(model, tok, EngineConfig(max_sessions=1, threaded=False))
    assert floats.scheduler.prefill_budget == prefill_budgets("cpu")[0] != 7


def test_prefill_pieces_are_a_binary_decomposition():
    assert piece_sizes(16) == [1, 2, 4, 8, 16] and piece_sizes(12) == [1, 2, 4, 8, 12]
    assert split_into_pieces(37, piece_sizes(128)) == [32, 4, 1]
    assert split_into_pieces(31, piece_sizes(12)) == [12, 12, 4, 2, 1]


def test_captured_prefill_chunks_equal_eager(model, tok):
    """Prefill chunks through the `PrefillGraphs` stand-in (static ids and slot buffers per piece, replayed
    back to back), two prompts interleaved with a decoding session: greedy == argmax loop."""
    engine = make_engine(model, tok, pack_chunks=False)
    graphs = PrefillGraphs(model, engine.pool, max_chunk=16, capture=replay_eagerly)
    replays = count_piece_replays(graphs)
    engine.scheduler.prefill_graph = graphs
    prompts = [prompt(8, 5), prompt(40, 6), prompt(33, 7)]
    first = engine.open().feed_ids(prompts[0], GREEDY)
    engine.step()
    replies = [first] + [engine.open().feed_ids(ids, GREEDY) for ids in prompts[1:]]
    engine.run_until_idle()
    # 8: one piece; 40: 16, 16, 8; 33: the 8 left of a step's budget, 16, 8 + 1
    assert sorted(replays) == sorted([8, 16, 16, 8, 8, 16, 8, 1])
    for reply, ids in zip(replies, prompts):
        assert reply.sampled == argmax_loop(model, ids, 12)
    with pytest.raises(ValueError, match="1 to 16 ids"):
        graphs.run([(list(range(3, 20)), 1)])
    with pytest.raises(ValueError, match="one chunk per slot"):
        graphs.run([([3], 1), ([4], 1)])


def test_waiting_prompts_read_together_in_batched_pieces(model, tok):
    """Five prompts arriving at once read in one step: one replay per piece size, batched over the prompts whose
    binary decomposition holds it (pad rows on the sink), instead of a forward per prompt; greedy == argmax loop,
    and sampled replies equal their solo runs."""
    engine = make_engine(model, tok, pack_chunks=False, solo_prefill_budget=64)
    graphs = PrefillGraphs(model, engine.pool, max_chunk=16, max_batch=6, capture=replay_eagerly)
    replays = count_piece_replays(graphs, rows=True)
    engine.scheduler.prefill_graph = graphs
    prompts = [prompt(n, 60 + n) for n in (5, 2, 16, 7, 3)]
    params = [GREEDY, GREEDY, SamplingParams(**{**SAMPLED.__dict__, "seed": 9}), GREEDY, GREEDY]
    replies = [engine.open().feed_ids(ids, p) for ids, p in zip(prompts, params)]
    engine.step()
    assert all(not r.prefilling for r in replies), "every prompt read in the first step"
    # 5 = 4 + 1, 2, 16, 7 = 4 + 2 + 1, 3 = 2 + 1: sizes 16 (1 row), 4 (2 rows), 2 (3 rows, bucket 4), 1 (3 rows)
    assert replays == [(16, 1), (4, 2), (2, 4), (1, 4)]
    engine.run_until_idle()
    for i in (0, 1, 3, 4):
        assert replies[i].sampled == argmax_loop(model, prompts[i], 12)
    assert replies[2].sampled == solo_ids(model, tok, prompts[2], params[2])


def test_gpu_benchmarks_graph_vs_eager_check_runs_on_the_cpu(model):
    """bench/engine_gpu.py's correctness check (decode step and prefill chunk, captured vs eager from the same
    state), with the eager stand-in for the capture: it must pass, so a GPU failure means the graphs."""
    _graph_vs_eager = import_bench_script("engine_gpu")._graph_vs_eager

    with torch.inference_mode():
        result = _graph_vs_eager(model, "tiny", torch.device("cpu"), 3, capture=replay_eagerly)
    # Not bit-exact: the stand-in pads 3 rows to the bucket of 4, and the CPU's matmul may block 4 rows otherwise.
    assert result["pass_1e-5"] and max(result["logits_rel_l2"], result["prefill_logits_rel_l2"],
                                       result["prefill_batched_logits_rel_l2"]) < 1e-6, result
    assert result["prefill_pieces"] == [32, 4, 1] and result["pieces_vs_one_chunk_logits_rel_l2"] < 1e-5


# -- sampler --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("params", [SamplingParams(temperature=1.0, top_p=1.0),
                                    SamplingParams(temperature=0.8, top_k=5, top_p=0.9),
                                    SamplingParams(temperature=1.3, top_p=0.5),
                                    SamplingParams(temperature=0.7, top_k=40, repetition_penalty=1.1)],
                         ids=["plain", "top-k+top-p", "top-p", "chat-defaults"])
def test_sampler_is_exact_and_its_shortcuts_draw_the_same_ids(params):
    """argmax(logit - log E) with hashed noise: frequencies over many seeds match the filtered softmax
    (`filter_logits`), and the plan the host picks for these settings (the head of HEAD candidates when top-k
    bounds it, else the CPU's checked head) draws the same ids as the general path."""
    vocab, n = 400, 3000
    logits = torch.randn(vocab, generator=torch.Generator().manual_seed(0)) * 3
    sampler = BatchSampler(n + 1, vocab, "cpu")
    for slot in range(1, n + 1):
        sampler.configure(slot, params, seed=slot, prompt_ids=[])
    slots = list(range(1, n + 1))
    plan = sampler.plan(slots)
    assert plan.head == head_size([params.top_k]) and plan.probe == (params.top_k == 0)
    assert plan.penalty == (params.repetition_penalty != 1.0) and plan.draw

    def draw(plan):
        sampler.drawn.zero_()  # the same noise and penalty set for both draws
        sampler.seen.zero_()
        return sampler.sample(logits.expand(n, vocab), torch.tensor(slots), plan)

    general, shortcut = draw(GENERAL), draw(plan)
    assert torch.equal(general, shortcut)
    temperature = torch.tensor([params.temperature])
    expected = torch.softmax(filter_logits(logits[None], temperature, torch.tensor([params.top_k]),
                                           torch.tensor([params.top_p]))[0], -1)
    freq = torch.bincount(general, minlength=vocab).float() / n
    assert (freq - expected).abs().max() < 0.03 and not freq[expected == 0].any()


def test_sampler_plans_follow_the_batch_settings():
    sampler = BatchSampler(5, 300, "cpu")
    sampler.configure(1, SamplingParams(temperature=0), 0, [])
    assert sampler.plan([1]) == SamplePlan(penalty=False, draw=False, head=0, probe=False)
    sampler.configure(2, SamplingParams(temperature=0.7, top_k=40, repetition_penalty=1.1), 0, [])
    assert sampler.plan([1, 2]) == SamplePlan(penalty=True, draw=True, head=SMALL_HEAD, probe=False)
    sampler.configure(4, SamplingParams(temperature=0.7, top_k=HEAD), 0, [])
    assert sampler.plan([2, 4]).head == HEAD
    sampler.configure(3, SamplingParams(temperature=0.7, top_k=257), 0, [])  # beyond the head
    assert sampler.plan([2, 3]) == SamplePlan(penalty=True, draw=True, head=0, probe=True)
    gpu = BatchSampler(5, 300, "meta")
    gpu.configure(3, SamplingParams(temperature=0.7, top_p=0.9), 0, [])
    assert not gpu.plan([3]).probe, "off the CPU the checked head syncs: never planned"


def test_sampler_top_k_1_is_greedy_and_nan_rows_are_flagged():
    sampler = BatchSampler(4, 10, "cpu")
    sampler.configure(1, SamplingParams(temperature=2.0, top_k=1, seed=0), 0, [])
    sampler.configure(2, SamplingParams(temperature=2.0, top_p=1e-6, seed=0), 0, [])
    sampler.configure(3, SamplingParams(temperature=1.0, seed=0), 0, [])
    logits = torch.randn(3, 10)
    logits[2, 4] = float("nan")
    ids = sampler.sample(logits, torch.tensor([1, 2, 3]))
    assert ids.tolist() == [int(logits[0].argmax()), int(logits[1].argmax()), -1]


# -- conversations --------------------------------------------------------------------------------------
def test_multi_turn_reads_only_the_new_message_and_equals_rereading_history(model, tok, overlap):
    """Each turn reads the unfed end of the last reply plus its own message; its greedy reply is the argmax
    loop over everything said so far, and the slot holds exactly the state of re-reading the history."""
    engine = make_engine(model, tok, overlap=overlap, eos_ids={tok.eos_id})
    session = engine.open()
    params = SamplingParams(temperature=0, max_new_tokens=8)
    for message in ("hello there", "how are you?", "the dog"):
        unread = session.pending + tok.chat_ids([("human", message)])
        said = session.history + unread
        reply = session.send(message, params).wait()
        assert reply.stats.prompt_tokens == len(unread)
        ids = argmax_loop(model, said, 8)
        expected = ids[: ids.index(tok.eos_id) + 1] if tok.eos_id in ids else ids
        assert reply.sampled == expected and reply.text == tok.decode([t for t in expected if t != tok.eos_id])
    assert reply.stats.prompt_tokens < len(session.history)  # turn 3 read only its new message
    reread = model.allocate_state(1)
    model(torch.tensor([session.history]), reread)
    for layer_reread, layer_pool in zip(reread.kv, engine.pool.kv):
        assert_close("state", layer_reread[0], layer_pool[session.slot], rel=1e-5)
    assert session.pending[-1] == tok.eos_id


def test_overlapped_steps_hand_events_out_after_the_next_launch(model, tok):
    """With overlap, a step's events are held until the next step is launched (their consumers then run while the
    engine waits for the GPU), delivered at once when the engine goes idle, and in emitted order when a session
    closes between steps; the events and their text are those of a run without overlap."""
    def events_of(overlap: bool, close_after: int | None = None) -> list:
        engine = make_engine(model, tok, overlap=overlap)
        session = engine.open()
        reply = session.feed_ids(prompt(5, 70), GREEDY)
        held = []
        for _ in range(close_after or 100):
            if not engine.scheduler.busy:
                break
            engine.step()
            held.append((reply._events.qsize(), len(engine.scheduler._held)))
        if close_after:
            engine.close(session)
        return list(reply), held

    plain, _ = events_of(overlap=False)
    overlapped, held = events_of(overlap=True)
    assert [(e.text, e.finish, e.stats.new_tokens) for e in overlapped] == \
        [(e.text, e.finish, e.stats.new_tokens) for e in plain]
    # step 1 launches the prompt, step 2 hands out the first id (held), step 3 delivers it after its own launch
    assert held[:3] == [(0, 0), (0, 1), (1, 1)]
    assert held[-1][1] == 0, "the last step delivers everything: no step follows it"
    closed, held = events_of(overlap=True, close_after=4)
    assert held[-1][1] == 1 and closed[-1].finish == "cancelled"
    assert [(e.text, e.stats.new_tokens) for e in closed[:-1]] == \
        [(e.text, e.stats.new_tokens) for e in plain[:len(closed) - 1]], "held events first, in order"


def test_cancel_ends_within_one_step_and_keeps_state_consistent(model, tok, overlap):
    engine = make_engine(model, tok, overlap=overlap)
    session = engine.open()
    reply = session.feed_ids(prompt(40, 3), SamplingParams(temperature=0, max_new_tokens=50))
    for _ in range(6):  # 3 prefill chunks, then decoding
        engine.step()
    reply.cancel()
    engine.step()
    assert reply.finish_reason == "cancelled" and session.reply is None
    if overlap:  # the 4th id was in flight: dropped; the step in flight had fed the 3rd
        assert len(reply.sampled) == 3 and session.pending == [tok.eos_id]
    else:
        assert len(reply.sampled) == 4 and session.pending == [reply.sampled[-1], tok.eos_id]
    assert session.history + session.pending[:-1] == prompt(40, 3) + reply.sampled  # what was shown, once
    reread = model.allocate_state(1)
    model(torch.tensor([session.history]), reread)
    assert_close("state", reread.kv[0][0], engine.pool.kv[0][session.slot], rel=1e-5)

    during_prefill = session.feed_ids(prompt(40, 4), GREEDY)
    engine.step()  # one chunk read
    during_prefill.cancel()
    engine.step()
    assert during_prefill.finish_reason == "cancelled" and during_prefill.fed == 16
    assert session.pending[-1] == tok.eos_id and session.pending[:-1] == during_prefill.prompt[16:]  # unread rest + eos


def test_time_limit(model, tok, overlap):
    engine = make_engine(model, tok, overlap=overlap)
    reply = engine.open().feed_ids(prompt(8, 5), SamplingParams(temperature=0, max_new_tokens=50),
                                   time_limit_s=0.0)
    events = list(reply)
    assert events[-1].finish == "time_limit" and reply.sampled == []


def test_stop_string_ends_the_reply_before_it_is_shown(model, tok, overlap):
    ids = prompt(9, 6)
    params = SamplingParams(temperature=0, max_new_tokens=30)
    full = make_engine(model, tok, overlap=overlap).open().feed_ids(ids, params).wait().text
    stop = full[len(full) // 2:len(full) // 2 + 3]
    assert stop.strip(), f"pick another prompt: {full!r}"
    stopping = SamplingParams(**{**params.__dict__, "stop": (stop,)})
    reply = make_engine(model, tok, overlap=overlap).open().feed_ids(ids, stopping)
    text = "".join(event.text for event in reply)
    assert reply.finish_reason == "stop" and text == full[:full.index(stop)]


def test_nan_in_one_session_leaves_the_others_unchanged(model, tok, overlap):
    prompts = [prompt(n, 20 + n) for n in (6, 19, 8)]
    params = [GREEDY, SamplingParams(**{**SAMPLED.__dict__, "seed": 7}), GREEDY]
    expected = [solo_ids(model, tok, ids, p) for ids, p in zip(prompts, params)]
    engine = make_engine(model, tok, overlap=overlap)
    sessions = [engine.open() for _ in prompts]
    replies = [s.feed_ids(ids, p) for s, ids, p in zip(sessions, prompts, params)]
    for _ in range(4):
        engine.step()
    engine.pool.kv[1][sessions[1].slot, 0, 0, 0] = float("nan")  # as an fp16 overflow would leave it
    engine.run_until_idle()
    assert replies[1].finish_reason == "numerical_error"
    assert sessions[1].history == [] and not engine.pool.kv[1][sessions[1].slot].any()  # reset
    assert [replies[0].sampled, replies[2].sampled] == [expected[0], expected[2]]
    again = sessions[1].feed_ids(prompts[1], params[1]).wait()  # the session is usable again
    assert again.sampled == expected[1]


def test_fork_save_load_continue_identically(model, tok, tmp_path, overlap):
    engine = make_engine(model, tok, overlap=overlap, eos_ids={tok.eos_id})
    session = engine.open()
    params = SamplingParams(temperature=0.8, max_new_tokens=10, seed=5)
    session.send("tell me about the fox", params).wait()
    session.save(tmp_path / "s.safetensors")
    fork = session.fork()
    loaded = engine.load(tmp_path / "s.safetensors")
    replies = [s.send("and then?", params) for s in (session, fork, loaded)]
    engine.run_until_idle()
    assert replies[0].text == replies[1].text == replies[2].text and replies[0].sampled
    assert session.history == fork.history == loaded.history
    other = make_engine(model, tok, overlap=overlap, eos_ids={tok.eos_id})  # another engine (another process, say)
    assert other.load(tmp_path / "s.safetensors").send("and then?", params).wait().text == replies[0].text


def test_pool_full_and_close_frees_the_slot(model, tok, overlap):
    engine = make_engine(model, tok, overlap=overlap, max_sessions=2)
    a, b = engine.open(), engine.open()
    with pytest.raises(PoolFullError):
        engine.open()
    reply = b.feed_ids([5, 6, 7], GREEDY)
    b.close()  # cancels its reply and gives the slot back
    assert reply.finish_reason == "cancelled"
    c = engine.open()
    assert c.slot == b.slot and not engine.pool.kv[0][c.slot].any()
    with pytest.raises(RuntimeError, match="closed"):
        b.feed_ids([1], GREEDY)
    a.feed_ids([1, 2], GREEDY)
    with pytest.raises(RuntimeError, match="still streaming"):
        a.fork()


def test_ids_outside_the_vocabulary_are_refused_before_the_device_sees_them(model, tok):
    engine = make_engine(model, tok)
    other = engine.open()
    running = other.feed_ids(prompt(9, 3), SamplingParams(temperature=0, max_new_tokens=5))
    session = engine.open()
    vocab = model.config.vocab_size
    for ids in ([5, vocab, 6], [-1]):
        with pytest.raises(ValueError, match=f"prompt id {ids[1] if len(ids) > 1 else -1} is outside"):
            session.feed_ids(ids, GREEDY)
    assert session.reply is None and not engine.pool.kv[0][session.slot].any(), "nothing was read"
    engine.run_until_idle()
    assert running.sampled == argmax_loop(model, prompt(9, 3), 5), "the other session was not disturbed"
    last = session.feed_ids([5, vocab - 1], SamplingParams(temperature=0, max_new_tokens=2)).wait()
    assert last.finish_reason == "length", "the session still serves ids inside the vocabulary"


def test_long_prompt_is_prefilled_in_chunks_between_decode_steps(model, tok, overlap):
    engine = make_engine(model, tok, overlap=overlap, prefill_budget=32)
    decoding = [engine.open().feed_ids(prompt(4, s), SamplingParams(temperature=0, max_new_tokens=100))
                for s in (1, 2)]
    engine.step()  # both prompts read (8 tokens < budget), first tokens sampled
    long = engine.open().feed_ids(prompt(300, 9), GREEDY)
    for step in range(1, 11):
        engine.step()
        assert [len(r.sampled) for r in decoding] == [1 + step - overlap] * 2  # one token per step each
        assert long.fed == min(300, 32 * step)
    if overlap:  # the ids of a step reach the host with the next one
        engine.step()
    assert long.sampled  # 300 tokens = 10 chunks: its first token came with the 10th step


# -- the bundled model and the GPU benchmark script -------------------------------------------------------
def test_engine_gpu_benchmark_smoke_on_cpu(tmp_path):
    """Every section of bench/engine_gpu.py on the CPU, with float weights and with int8 ones (--quant): rows
    named by their weights, and int8's floor is its smaller weights'."""
    import json

    floors = {}
    for method in ("none", "int8"):
        (tmp_path / method).mkdir()
        out = subprocess.run([sys.executable, "bench/engine_gpu.py", "--device", "cpu", "--smoke", "--quant", method,
                              "--out", str(tmp_path / method)], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-3000:]
        data = json.loads((tmp_path / method / "engine-h200.json").read_text())
        keys = {"preset", "quant", "batch", "context", "decode_ms_per_token", "hbm_floor_ms", "aggregate_tok_s", "path"}
        assert data["rows"] and all(keys <= set(row) and row["quant"] == method for row in data["rows"])
        assert data["interleave"] and all(x["quant"] == method for x in data["interleave"])
        assert not [note for note in data["notes"] if "failed" in note]
        floors[method] = min(row["hbm_floor_ms"] for row in data["rows"] if row["batch"] == 1)
    assert floors["int8"] < floors["none"]


def test_engine_host_breakdown_runs_on_the_cpu(tmp_path):
    """bench/engine_host.py times the engine thread's parts per step; the timers come off when it ends."""
    import json

    out = tmp_path / "host.json"
    run = subprocess.run([sys.executable, "bench/engine_host.py", "--device", "cpu", "--presets", "tiny",
                          "--sessions", "1,3", "--context", "16", "--tokens", "8", "--out", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["sessions"] for r in rows] == [1, 3]
    for r in rows:
        assert r["steps"] >= 8 and r["tok_s"] > 0
        parts = [r[f"{name}_ms_per_step"] for name in ("launch", "wait", "accept")]
        assert all(p >= 0 for p in parts) and sum(parts) <= r["step_ms_per_step"]


def test_upload_ids_on_the_cpu():
    from tnllm.engine.pool import upload_ids

    ids = upload_ids([3, 1, 2], torch.device("cpu"))
    assert ids.tolist() == [3, 1, 2] and ids.dtype == torch.long and ids.device.type == "cpu"
    assert upload_ids([], torch.device("cpu")).shape == (0,)
