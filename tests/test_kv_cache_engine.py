"""The Transformer baseline through the engine (`KVCacheLM`): greedy replies equal the full-forward argmax, alone,
side by side and over several turns; what a KV cache cannot do is refused by name."""

from __future__ import annotations

import pytest
import torch

from tnllm import TNLConfig
from tnllm.baseline import build_llama
from tnllm.engine import Engine, EngineConfig
from tnllm.engine.kv_cache import KVCacheLM
from tnllm.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0, max_new_tokens=10)


@pytest.fixture(scope="module")
def llama():
    # untied: a random tied model mostly repeats its last input, which would make the checks trivial
    return build_llama(TNLConfig.from_name("tiny", vocab_size=400, tie_word_embeddings=False), seed=1)


def make_engine(llama, tok, **config) -> Engine:
    return Engine(KVCacheLM(llama), tok, EngineConfig(**{"max_sessions": 3, "threaded": False, "prefill_budget": 8,
                                                         **config}), eos_ids=set())


@torch.inference_mode()
def argmax_loop(llama, ids: list[int], n: int) -> list[int]:
    """Re-read the whole sequence every step and take the argmax (no cache at all)."""
    out = []
    for _ in range(n):
        out.append(int(llama(torch.tensor([ids + out]), use_cache=False).logits[0, -1].argmax()))
    return out


def prompt(n: int, seed: int) -> list[int]:
    return torch.randint(3, 400, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_greedy_replies_side_by_side_equal_the_argmax_loop(llama, tok):
    """Three sessions joining at different steps, prompts read in chunks: each equals its own argmax loop."""
    engine = make_engine(llama, tok)
    prompts = [prompt(n, n) for n in (5, 19, 11)]
    replies = []
    for ids in prompts:
        replies.append(engine.open().feed_ids(ids, GREEDY))
        engine.step()
    engine.run_until_idle()
    for reply, ids in zip(replies, prompts):
        assert reply.finish_reason == "length" and reply.sampled == argmax_loop(llama, ids, 10)
    assert engine.pool.slot_bytes > 0


def test_a_second_turn_continues_the_cache(llama, tok):
    engine = make_engine(llama, tok)
    session = engine.open()
    first = session.feed_ids(prompt(7, 1), GREEDY).wait()
    said = prompt(7, 1) + first.sampled[:-1] + session.pending  # the last id and the closing eos are pending
    second = session.feed_ids(prompt(4, 2), GREEDY).wait()
    assert second.sampled == argmax_loop(llama, said + prompt(4, 2), 10)


def test_what_a_kv_cache_cannot_do_is_refused(llama, tok):
    engine = make_engine(llama, tok)
    session = engine.open()
    session.feed_ids(prompt(3, 3), GREEDY).wait()
    for attempt in (session.fork, session.snapshot):
        with pytest.raises(NotImplementedError, match="KV-cache"):
            attempt()
    session.close()
    assert engine.open().slot == session.slot  # the slot came back, emptied
    assert engine.pool.caches[session.slot] is None
