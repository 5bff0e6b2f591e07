"""Generation: greedy == argmax loop, seeds, streaming text, stop strings, conversations; batching (the engine's)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import assert_close
from tnllm import TNLConfig, Tokenizer, TransNormerLLM
from tnllm.engine import Engine, EngineConfig
from tnllm.generation import (
    Conversation,
    NumericalError,
    ReplyStats,
    generate,
    generate_tokens,
)
from tnllm.sampling import SamplingParams
from tnllm.streaming import TextStreamer

GREEDY = SamplingParams(temperature=0, max_new_tokens=12)


@pytest.fixture(scope="module")
def model(untied_tiny_model):
    return untied_tiny_model


def argmax_loop(model, ids, n):
    """The obvious reference: re-run the full sequence every step and take the argmax."""
    out = []
    for _ in range(n):
        logits = model(torch.tensor([ids + out]))
        out.append(int(logits[0, -1].argmax()))
    return out


def test_greedy_equals_full_forward_argmax(model):
    prompt = torch.randint(3, 400, (23,)).tolist()
    eos_never = {-1}
    ids = list(generate_tokens(model, prompt, GREEDY, eos_ids=eos_never))
    assert ids == argmax_loop(model, prompt, 12)


def test_eos_ends_generation(model):
    prompt = torch.randint(3, 400, (9,)).tolist()
    first = argmax_loop(model, prompt, 8)
    k = next(k for k in range(2, 8) if first[k] not in first[:k])  # a token that first appears late
    ids = list(generate_tokens(model, prompt, GREEDY, eos_ids={first[k]}))
    assert ids == first[: k + 1]


def test_seeded_sampling_is_reproducible(model):
    prompt = torch.randint(3, 400, (15,)).tolist()
    params = SamplingParams(temperature=1.5, top_k=50, top_p=0.95, max_new_tokens=20, seed=1234)
    a = list(generate_tokens(model, prompt, params, eos_ids=set()))
    b = list(generate_tokens(model, prompt, params, eos_ids=set()))
    c = list(generate_tokens(model, prompt, SamplingParams(**{**params.__dict__, "seed": 99}), eos_ids=set()))
    assert a == b and a != c


def test_top_k_1_and_tiny_top_p_are_greedy(model):
    prompt = torch.randint(3, 400, (7,)).tolist()
    greedy = list(generate_tokens(model, prompt, GREEDY, eos_ids=set()))
    for params in (SamplingParams(temperature=1.0, top_k=1, max_new_tokens=12, seed=0),
                   SamplingParams(temperature=1.0, top_p=1e-6, max_new_tokens=12, seed=0)):
        assert list(generate_tokens(model, prompt, params, eos_ids=set())) == greedy


def test_repetition_penalty_avoids_seen_tokens(model):
    prompt = torch.randint(3, 400, (10,)).tolist()
    params = SamplingParams(temperature=0, repetition_penalty=1e6, max_new_tokens=30)
    ids = list(generate_tokens(model, prompt, params, eos_ids=set()))
    assert len(set(ids)) == len(ids) and not set(ids) & set(prompt)


@pytest.mark.parametrize("bad,message", [
    (dict(temperature=-0.1), "temperature"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(top_k=-1), "top_k"), (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(max_new_tokens=10**9), "max_new_tokens"), (dict(seed="7"), "seed"),
    (dict(temperature=float("nan")), "temperature"), (dict(repetition_penalty=0), "repetition"),
    (dict(stop=("",)), "stop"), (dict(top_k=2.5), "top_k"),
])
def test_bad_sampling_values(bad, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**bad)


def test_text_stream_joins_to_decoded_greedy_reply(model, tok):
    prompt = tok.chat_ids([("human", "how are you doing today?")])
    stats = ReplyStats()
    pieces = list(generate(model, tok, prompt, SamplingParams(temperature=0, max_new_tokens=25), stats=stats))
    ids = [t for t in argmax_loop(model, prompt, 25)]
    expected = ids[: ids.index(tok.eos_id)] if tok.eos_id in ids else ids
    assert "".join(pieces) == tok.decode(expected)
    assert all("\ufffd" not in p for p in pieces)
    assert stats.new_tokens == len(expected) + (tok.eos_id in ids) and stats.ttft_s > 0
    assert stats.finish_reason in ("eos", "length")


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=3, max_value=399), min_size=0, max_size=40))
def test_streamer_pieces_join_to_decode(tok_file, ids):
    """Random ids incl. byte-fallback pieces: the concatenated stream equals decoding everything."""
    tok = Tokenizer(tok_file)
    streamer = TextStreamer(tok)
    out = "".join(streamer.push(i) for i in ids) + streamer.flush()
    assert out == tok.decode(ids)


def test_streamer_never_splits_a_character(tok):
    ids = tok.encode("图书馆 🙂 ok")
    streamer = TextStreamer(tok)
    pieces = [streamer.push(i) for i in ids] + [streamer.flush()]
    assert "".join(pieces) == "图书馆 🙂 ok"
    assert all("\ufffd" not in p for p in pieces)


@pytest.mark.parametrize("stop", [("Human:",), ("fox",), ("zzz", "lazy")])
def test_stop_strings_are_never_shown(tok, stop):
    text = "the quick brown fox jumps over the lazy dog\nHuman:\nhi"
    streamer = TextStreamer(tok, stop)
    pieces = []
    for i in tok.encode(text):
        pieces.append(streamer.push(i))
        if streamer.stopped:
            break
    out = "".join(pieces) + streamer.flush()
    first = min(text.find(s) for s in stop if s in text)
    assert out == text[:first] and streamer.stopped


def _fresh_state_from(model, ids):
    state = model.allocate_state(1)
    model(torch.tensor([ids]), state)
    return state


def test_conversation_reuses_state_and_equals_rereading_history(model, tok):
    conv = Conversation(model, tok)
    params = SamplingParams(temperature=0, max_new_tokens=8)
    replies = ["".join(conv.reply(msg, params)) for msg in ("hello there", "how are you?", "the dog")]
    assert conv.last_stats.prompt_tokens < len(conv.history)  # turn 3 prefilled only its new message
    reread = _fresh_state_from(model, conv.history)
    for a, b in zip(reread.kv, conv.state.kv):
        assert_close("state", a, b, rel=1e-5)
    assert torch.equal(reread.positions, conv.state.positions)
    # Re-reading the history as a new conversation gives the same next reply.
    clone = Conversation(model, tok, reread, list(conv.history), list(conv.pending))
    assert "".join(clone.reply("bye", params)) == "".join(conv.reply("bye", params))
    assert len(replies) == 3


def test_save_restore_fork_continue_identically(model, tok, tmp_path):
    conv = Conversation(model, tok)
    params = SamplingParams(temperature=0.8, max_new_tokens=10, seed=5)
    "".join(conv.reply("tell me about the fox", params))
    conv.save(tmp_path / "conv.safetensors")
    fork = conv.fork()
    restored = Conversation.load(tmp_path / "conv.safetensors", model, tok)
    outs = ["".join(c.reply("and then?", params)) for c in (conv, fork, restored)]
    assert outs[0] == outs[1] == outs[2]
    assert conv.history == fork.history == restored.history


def test_cancel_mid_stream_keeps_state_consistent(model, tok):
    conv = Conversation(model, tok)
    stream = conv.reply("the quick brown fox", SamplingParams(temperature=0, max_new_tokens=50))
    for _ in range(3):
        next(stream)
    stream.close()  # what Gradio does on Stop
    assert conv.last_stats.finish_reason == "cancelled"
    reread = _fresh_state_from(model, conv.history)
    assert_close("state", reread.kv[0], conv.state.kv[0], rel=1e-5)
    assert conv.pending[-1] == tok.eos_id
    "".join(conv.reply("again", SamplingParams(temperature=0, max_new_tokens=4)))  # still usable


def test_batched_decode_equals_per_sequence(model, tok):
    """Sequences of different prompt lengths, settings and reply lengths decoded together by the engine (each
    leaving the batch when its reply is done) equal their solo runs."""
    prompts = [torch.randint(3, 400, (n,)).tolist() for n in (5, 31, 12)]
    params = [SamplingParams(temperature=0, max_new_tokens=9),
              SamplingParams(temperature=0.9, top_k=40, max_new_tokens=6, seed=3),
              SamplingParams(temperature=0, repetition_penalty=1.3, max_new_tokens=14)]

    def engine():
        return Engine(model, tok, EngineConfig(max_sessions=3, threaded=False), eos_ids=set())

    solo = [engine().open().feed_ids(ids, p).wait().sampled for ids, p in zip(prompts, params)]
    batch = engine()
    replies = [batch.open().feed_ids(ids, p) for ids, p in zip(prompts, params)]
    batch.run_until_idle()
    assert [r.sampled for r in replies] == solo
    assert [len(ids) for ids in solo] == [9, 6, 14] and solo[0] == argmax_loop(model, prompts[0], 9)


def test_nan_logits_are_reported(tok):
    model = TransNormerLLM(TNLConfig.from_name("tiny", vocab_size=400)).eval()
    with torch.no_grad():
        model.model.layers[1].channel_mixer.l3.weight[0, 0] = float("nan")
    with pytest.raises(NumericalError, match="NaN"):
        list(generate_tokens(model, [5, 6, 7], GREEDY))
