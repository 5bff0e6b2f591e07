"""Sampling settings and streamed text through the engine: greedy == argmax loop, eos, seeds, filters, the
repetition penalty, text pieces, stop strings; `TextStreamer` on random and multi-byte ids."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tnllm import Tokenizer
from tnllm.engine import Engine, EngineConfig
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


def sampled_ids(model, tok, prompt, params, eos_ids=frozenset()):
    """The ids one reply samples for raw prompt ids, from a fresh single-session engine."""
    engine = Engine(model, tok, EngineConfig(max_sessions=1, threaded=False), eos_ids=set(eos_ids))
    return engine.open().feed_ids(prompt, params).wait().sampled


def test_greedy_equals_full_forward_argmax(model, tok):
    prompt = torch.randint(3, 400, (23,)).tolist()
    assert sampled_ids(model, tok, prompt, GREEDY) == argmax_loop(model, prompt, 12)


def test_eos_ends_generation(model, tok):
    prompt = torch.randint(3, 400, (9,)).tolist()
    first = argmax_loop(model, prompt, 8)
    k = next(k for k in range(2, 8) if first[k] not in first[:k])  # a token that first appears late
    assert sampled_ids(model, tok, prompt, GREEDY, eos_ids={first[k]}) == first[: k + 1]


def test_seeded_sampling_is_reproducible(model, tok):
    prompt = torch.randint(3, 400, (15,)).tolist()
    params = SamplingParams(temperature=1.5, top_k=50, top_p=0.95, max_new_tokens=20, seed=1234)
    a = sampled_ids(model, tok, prompt, params)
    b = sampled_ids(model, tok, prompt, params)
    c = sampled_ids(model, tok, prompt, SamplingParams(**{**params.__dict__, "seed": 99}))
    assert a == b and a != c


def test_top_k_1_and_tiny_top_p_are_greedy(model, tok):
    prompt = torch.randint(3, 400, (7,)).tolist()
    greedy = sampled_ids(model, tok, prompt, GREEDY)
    for params in (SamplingParams(temperature=1.0, top_k=1, max_new_tokens=12, seed=0),
                   SamplingParams(temperature=1.0, top_p=1e-6, max_new_tokens=12, seed=0)):
        assert sampled_ids(model, tok, prompt, params) == greedy


def test_repetition_penalty_avoids_seen_tokens(model, tok):
    prompt = torch.randint(3, 400, (10,)).tolist()
    ids = sampled_ids(model, tok, prompt, SamplingParams(temperature=0, repetition_penalty=1e6, max_new_tokens=30))
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
    engine = Engine(model, tok, EngineConfig(max_sessions=1, threaded=False), eos_ids={tok.eos_id})
    reply = engine.open().feed_ids(prompt, SamplingParams(temperature=0, max_new_tokens=25))
    pieces = [event.text for event in reply]
    ids = argmax_loop(model, prompt, 25)
    expected = ids[: ids.index(tok.eos_id)] if tok.eos_id in ids else ids
    assert "".join(pieces) == tok.decode(expected)
    assert all("\ufffd" not in p for p in pieces)
    assert reply.stats.new_tokens == len(expected) + (tok.eos_id in ids) and reply.stats.ttft_s > 0
    assert reply.finish_reason in ("eos", "length")


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=3, max_value=399), min_size=0, max_size=40))
def test_streamer_pieces_join_to_decode(tok_file, ids):
    """Random ids incl. byte-fallback pieces: the concatenated stream equals decoding everything."""
    tok = Tokenizer(tok_file)
    streamer = TextStreamer(tok)
    out = "".join(streamer.push(i) for i in ids) + streamer.flush()
    assert out == tok.decode(ids)


class _WindowOnly:
    """The tokenizer without `piece_text`: the streamer then decodes its window for every id."""

    def __init__(self, tok: Tokenizer):
        self.decode = tok.decode


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.integers(min_value=0, max_value=402),  # control, unknown, out-of-range ids too
                          st.integers(min_value=3, max_value=258)),  # byte pieces, often several in a row
                min_size=0, max_size=40),
       st.sampled_from([(), ("Human:",), ("e", "the ")]))
def test_piece_text_shortcut_streams_what_the_window_streams(tok_file, ids, stop):
    """The streamer's shortcut for plain pieces (`Tokenizer.piece_text`) yields exactly the pieces, stop and text of
    decoding every window: after bytes, given-up characters, control and unknown ids, and across stop strings."""
    tok = Tokenizer(tok_file)
    fast, window = TextStreamer(tok, stop), TextStreamer(_WindowOnly(tok), stop)

    def run(streamer):
        try:
            return [streamer.push(i) for i in ids] + [streamer.flush()], streamer.stopped
        except Exception as exc:  # an id outside the vocabulary: both must refuse it alike
            return type(exc), None

    assert run(fast) == run(window)


def test_piece_text_of_plain_and_other_pieces(tok):
    plain = tok.encode("hello world")
    assert "".join(tok.piece_text(i) for i in plain[1:]) == tok.decode(plain)[len(tok.decode(plain[:1])):]
    for other in (0, 1, 2, 3, 100, tok.vocab_size, -1):  # unknown, bos, eos, bytes, outside the vocabulary
        assert tok.piece_text(other) is None


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
