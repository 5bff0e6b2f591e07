"""The matched Llama baseline: same shape as the TNL model, hand-computed size, dtype, local loading."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close

from tnllm import TNLConfig
from tnllm.baseline import build_llama, llama_config_for, load_llama

# Attention width (hidden_dim = 96, dh = 24) differs from the model width (dim = 64) on purpose.
CONFIG = TNLConfig.from_name("tiny", hidden_dim=96, glu_dim=160)


def test_matched_config_has_tnl_shape():
    c = llama_config_for(CONFIG)
    assert (c.hidden_size, c.num_hidden_layers, c.vocab_size) == (CONFIG.dim, CONFIG.n_layers, CONFIG.vocab_size)
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (4, 4, 24)
    assert c.intermediate_size == CONFIG.glu_dim
    assert c.tie_word_embeddings and c.rms_norm_eps == CONFIG.norm_eps


def test_parameter_count_by_hand():
    model = build_llama(CONFIG)
    d, hd, g, V, L = CONFIG.dim, CONFIG.hidden_dim, CONFIG.glu_dim, CONFIG.vocab_size, CONFIG.n_layers
    # tied embedding + per layer (q, k, v, o; gate, up, down; 2 RMSNorm gains) + final norm gain
    expected = V * d + L * (4 * d * hd + 3 * d * g + 2 * d) + d
    assert expected == 256 * 64 + 3 * (24_576 + 30_720 + 128) + 64 == 182_720
    assert sum(p.numel() for p in model.parameters()) == expected
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.model.layers[0].self_attn.q_proj.weight.shape == (hd, d)


def test_seeded_and_leaves_global_rng_alone():
    torch.manual_seed(1)
    expected_next = torch.rand(1)
    torch.manual_seed(1)
    a, b = build_llama(CONFIG, seed=3), build_llama(CONFIG, seed=3)
    assert torch.equal(torch.rand(1), expected_next)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_precision(dtype):
    model = build_llama(CONFIG, dtype={torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype])
    assert {p.dtype for p in model.parameters()} == {dtype}


def test_load_llama_round_trip(tmp_path):
    model = build_llama(CONFIG)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    loaded = load_llama(tmp_path)
    ids = torch.randint(0, CONFIG.vocab_size, (1, 9))
    with torch.inference_mode():
        assert_close("loaded logits", model(ids).logits, loaded(ids).logits, rel=1e-6)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_llama(tmp_path / "missing")
