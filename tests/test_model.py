"""Model core: decay schedule, config, an independent oracle forward, recurrent decoding, dtypes."""

import math

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import assert_close, pack_glus, requires_interpreter
from tnllm import RecurrentState, TNLConfig, TransNormerLLM, kernels, lightning_log_decay
from tnllm.model import alibi_slopes
from tnllm.state import SlotState

# The official TransNormerLLM-1B config.json fields (docs/model.md#released-sizes).
OFFICIAL_1B = {
    "architectures": ["TransnormerForCausalLM"], "auto_map": {"AutoConfig": "x"}, "model_type": "transnormer",
    "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "vocab_size": 64000, "use_cache": True,
    "init_std": 0.02, "decoder_embed_dim": 2048, "decoder_layers": 16, "decoder_attention_heads": 16,
    "no_scale_embedding": False, "add_bos_token": False, "norm_type": "simplermsnorm",
    "linear_use_lrpe_list": [1] + [0] * 15, "hidden_dim": 2048, "linear_act_fun": "swish", "glu_dim": 5632,
    "bias": False, "torch_dtype": "bfloat16", "transformers_version": "4.32.0", "linear_use_lrpe": 0,
}


def tiny(**overrides) -> TNLConfig:
    return TNLConfig.from_name("tiny", **overrides)


# -- decay -------------------------------------------------------------------------------------
@pytest.mark.parametrize("H", [8, 16, 32])
def test_decay_pinned_values(H):
    L = 16
    first, mid, last = (lightning_log_decay(H, l, L) for l in (0, 5, L - 1))
    slopes = torch.tensor([2.0 ** (-8 * (h + 1) / H) for h in range(H)], dtype=torch.float64)
    assert first.dtype == torch.float32 and (first <= 0).all()
    assert_close("layer0", -slopes * (1 + 1e-5), first.double(), rel=1e-7)
    assert_close("layer5", -slopes * (1 - 5 / 15 + 1e-5), mid.double(), rel=1e-7)
    assert_close("last", -slopes * 1e-5, last.double(), rel=1e-7)
    assert math.isclose(first[0].item(), -(2.0 ** (-8 / H)) * (1 + 1e-5), rel_tol=1e-7)


def test_non_power_of_two_heads_use_alibi_rule():
    assert alibi_slopes(6) == [2**-2, 2**-4, 2**-6, 2**-8, 2**-1, 2**-3]
    s12 = alibi_slopes(12)
    assert s12[:8] == [2.0 ** (-(h + 1)) for h in range(8)]
    assert s12[8:] == [2.0 ** (-0.5 * (2 * i + 1)) for i in range(4)]


# -- config ------------------------------------------------------------------------------------
def test_official_config_parsed_and_round_tripped():
    cfg = TNLConfig.from_hf_dict({**OFFICIAL_1B, "mystery_key": 7})
    assert (cfg.dim, cfg.n_layers, cfg.n_heads, cfg.head_dim, cfg.glu_dim) == (2048, 16, 16, 128, 5632)
    assert cfg.act == "silu" and cfg.lrpe_layers == [1] + [0] * 15 and cfg.tie_word_embeddings
    assert math.isclose(cfg.embed_scale, math.sqrt(2048))
    assert cfg.extra == {"mystery_key": 7}  # unknown kept; bookkeeping keys dropped
    again = TNLConfig.from_hf_dict(cfg.to_hf_dict())
    assert again == cfg
    assert cfg.to_hf_dict()["linear_act_fun"] == "swish" and cfg.to_hf_dict()["mystery_key"] == 7


@pytest.mark.parametrize("change,message", [
    (dict(hidden_dim=60, n_heads=8), "not divisible"),
    (dict(lrpe_layers=[1, 0]), "3 entries|2 entries"),
    (dict(n_layers=1, lrpe_layers=[0]), "n_layers must be >= 2"),
    (dict(norm_type="layernorm"), "norm_type"),
    (dict(lrpe_layers=[2, 0, 0]), "0 or 1"),
    (dict(eos_token_id=999), "outside the vocabulary"),
    (dict(dim=0), "positive"),
])
def test_config_validation_errors(change, message):
    with pytest.raises(ValueError, match=message):
        tiny(**change)


def test_unknown_preset_and_glu_default():
    with pytest.raises(ValueError, match="unknown preset"):
        TNLConfig.from_name("tnl-1B")  # exact names only
    assert TNLConfig(dim=64, hidden_dim=64, n_heads=4, n_layers=2, glu_dim=-1, vocab_size=32).glu_dim == 64


@pytest.mark.parametrize("name,expected", [("tnl-1b", 1_020_266_496), ("tnl-7b", 6_836_719_616),
                                           ("tnl-385m", 398_984_192)])
def test_official_parameter_counts_on_meta(name, expected):
    with torch.device("meta"):
        model = TransNormerLLM(TNLConfig.from_name(name))
    assert model.num_parameters() == expected
    assert all(p.device.type == "meta" for p in model.parameters())


# -- an independent oracle of the whole forward (docs/model.md#forward-pass, written with explicit loops) --
def oracle_logits(model: TransNormerLLM, ids: torch.Tensor) -> torch.Tensor:
    c = model.config
    W = {k: v.double() for k, v in model.state_dict().items()}
    H, dh, hd = c.n_heads, c.head_dim, c.hidden_dim
    T = ids.shape[1]

    def norm(x):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + c.norm_eps)

    x = W["model.embed_tokens.weight"][ids] * (1.0 if c.no_scale_embedding else math.sqrt(c.dim))
    for l in range(c.n_layers):
        p = f"model.layers.{l}."
        h = norm(x) @ W[p + "token_mixer.qkvu_proj.weight"].T
        q, k, v, u = h[..., :hd], h[..., hd:2 * hd], h[..., 2 * hd:3 * hd], h[..., 3 * hd:]
        heads = []
        for i in range(H):
            qi, ki, vi = (t[..., i * dh:(i + 1) * dh] for t in (q, k, v))
            qi, ki = F.silu(qi), F.silu(ki)
            if c.lrpe_layers[l]:
                ang = torch.arange(T, dtype=torch.float64)[:, None] * W[p + "token_mixer.lrpe.theta"][i, 0]
                qi = torch.cat([qi * ang.cos(), qi * ang.sin()], -1)
                ki = torch.cat([ki * ang.cos(), ki * ang.sin()], -1)
            rate = 2.0 ** (-8 * (i + 1) / H) * (1 - l / (c.n_layers - 1) + 1e-5)
            t_idx = torch.arange(T)
            decay = torch.where(t_idx[:, None] >= t_idx[None], torch.exp(-rate * (t_idx[:, None] - t_idx[None])), 0)
            heads.append(((qi @ ki.transpose(-1, -2)) * decay) @ vi)
        o = norm(torch.cat(heads, -1))
        x = x + (u * o) @ W[p + "token_mixer.out_proj.weight"].T
        y = norm(x)
        g = (y @ W[p + "channel_mixer.l1.weight"].T) * (y @ W[p + "channel_mixer.l2.weight"].T)
        x = x + g @ W[p + "channel_mixer.l3.weight"].T
    return norm(x) @ W["model.embed_tokens.weight"].T


@pytest.mark.parametrize("no_scale", [False, True], ids=["scaled", "no-scale"])
def test_forward_matches_independent_oracle(no_scale):
    model = TransNormerLLM(tiny(no_scale_embedding=no_scale, vocab_size=97))
    ids = torch.randint(0, 97, (2, 70))
    assert_close("logits", oracle_logits(model, ids), model(ids).double(), rel=1e-5)


def test_embedding_scale_both_ways():
    ids = torch.randint(0, 256, (1, 9))
    # Untied, so scaling the embedding by hand leaves lm_head alone.
    scaled = TransNormerLLM(tiny(tie_word_embeddings=False))
    unscaled = TransNormerLLM(tiny(no_scale_embedding=True, tie_word_embeddings=False))
    unscaled.load_state_dict(scaled.state_dict())
    assert not torch.allclose(scaled(ids), unscaled(ids))
    with torch.no_grad():
        unscaled.model.embed_tokens.weight.mul_(math.sqrt(64))
    assert_close("sqrt(d) scale", scaled(ids), unscaled(ids), rel=1e-6)


# -- recurrent decoding ------------------------------------------------------------------------
@pytest.mark.parametrize("B,n,k", [(1, 1, 5), (2, 37, 11), (3, 64, 3)])
def test_prefill_then_decode_equals_full_forward(B, n, k):
    model = TransNormerLLM(tiny())
    ids = torch.randint(0, 256, (B, n + k))
    full = model(ids)
    state = model.allocate_state(B)
    steps = [model(ids[:, :n], state)] + [model(ids[:, t:t + 1], state) for t in range(n, n + k)]
    assert_close("decode logits", full, torch.cat(steps, 1), rel=1e-5)
    assert state.positions.tolist() == [n + k] * B


def test_multi_token_continuation_from_cache():
    """Chunks of several tokens continue from the state (the official per-call offset bug)."""
    model = TransNormerLLM(tiny())
    ids = torch.randint(0, 256, (2, 50))
    state = model.allocate_state(2)
    parts = [model(ids[:, a:b], state) for a, b in ((0, 13), (13, 14), (14, 31), (31, 32), (32, 50))]
    assert_close("chunked continuation", model(ids), torch.cat(parts, 1), rel=1e-5)


def test_sequences_keep_their_own_positions():
    """Two conversations at different lengths decoded in one batch equal decoding each alone."""
    model = TransNormerLLM(tiny())
    a, b = torch.randint(0, 256, (1, 30)), torch.randint(0, 256, (1, 7))
    sa, sb = model.allocate_state(1), model.allocate_state(1)
    model(a, sa), model(b, sb)
    nxt = torch.randint(0, 256, (2, 4))
    both = RecurrentState.cat([sa.clone(), sb.clone()])
    batched = torch.cat([model(nxt[:, t:t + 1], both) for t in range(4)], 1)
    alone_a = torch.cat([model(nxt[:1, t:t + 1], sa) for t in range(4)], 1)
    alone_b = torch.cat([model(nxt[1:, t:t + 1], sb) for t in range(4)], 1)
    assert_close("batched", torch.cat([alone_a, alone_b]), batched, rel=1e-5)
    assert both.positions.tolist() == [34, 11]


def test_logits_to_keep_and_state_size():
    model = TransNormerLLM(tiny())
    ids = torch.randint(0, 256, (2, 20))
    assert_close("last", model(ids)[:, -3:], model(ids, logits_to_keep=3), rel=1e-6)
    state = model.allocate_state(2)
    dh = 16  # tiny: 64 / 4 heads; layers 0 and 2 use LRPE (dk = 2 * dh)
    assert [tuple(t.shape) for t in state.kv] == [(2, 4, 32, 16), (2, 4, 16, 16), (2, 4, 32, 16)]
    assert state.nbytes == 4 * 2 * 4 * dh * dh * (3 + 2) + 2 * 8
    with pytest.raises(ValueError, match="batch"):
        model(ids[:1], state)


def test_state_save_load_clone_select(tmp_path):
    model = TransNormerLLM(tiny())
    state = model.allocate_state(2)
    model(torch.randint(0, 256, (2, 12)), state)
    state.save(tmp_path / "s.safetensors")
    loaded = RecurrentState.load(tmp_path / "s.safetensors", model.config)
    assert all(torch.equal(x, y) for x, y in zip(state.kv, loaded.kv))
    assert torch.equal(loaded.positions, state.positions)
    fork = state.clone()
    model(torch.randint(0, 256, (2, 1)), fork)
    assert not torch.equal(fork.kv[0], state.kv[0])
    rev = state.select([1, 0])
    assert torch.equal(rev.kv[1][0], state.kv[1][1])
    other = TNLConfig.from_name("tiny", lrpe_layers=[0, 0, 0])
    with pytest.raises(ValueError, match="layer 0"):
        RecurrentState.load(tmp_path / "s.safetensors", other)


# -- dtypes and training -----------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_keeps_fp32_decay_and_state(dtype):
    ref = TransNormerLLM(tiny())
    model = TransNormerLLM(tiny())
    model.load_state_dict(ref.state_dict())
    model.to(dtype)
    assert model.log_decay.dtype == torch.float32
    assert torch.equal(model.log_decay, ref.log_decay)
    ids = torch.randint(0, 256, (1, 40))
    state = model.allocate_state(1)
    out = torch.cat([model(ids[:, :30], state)] + [model(ids[:, t:t + 1], state) for t in range(30, 40)], 1)
    assert out.dtype == dtype and state.kv[0].dtype == torch.float32
    assert_close("half vs fp32", ref(ids), out.float(), rel=5e-2)


def test_training_gradients_reach_every_parameter():
    model = TransNormerLLM(tiny()).train()
    ids = torch.randint(0, 256, (2, 33))
    logits = model(ids)
    F.cross_entropy(logits[:, :-1].reshape(-1, 256), ids[:, 1:].reshape(-1)).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_state_layers_can_live_on_different_devices():
    """device_map="auto" spreads layers over GPUs: each layer's kv is allocated next to its weights."""
    cfg = tiny()
    state = RecurrentState.allocate(cfg, 2, "cpu", layer_devices=[torch.device("cpu"), torch.device("meta"),
                                                                 torch.device("cpu")])
    assert [t.device.type for t in state.kv] == ["cpu", "meta", "cpu"]
    with pytest.raises(ValueError):
        RecurrentState.allocate(cfg, 2, "cpu", layer_devices=[torch.device("cpu")])


# -- fused decode ops (docs/kernels.md#fused-decode-ops) ----------------------------------------
def spy_fused_launchers(monkeypatch) -> dict[str, int]:
    """Count the calls of the fused Triton launchers (the dispatch looks them up at call time); a step counts
    under "step:<act>", an LRPE layer's under "step:<act>+lrpe"."""
    from tnllm.kernels import triton_norm, triton_step

    calls: dict[str, int] = {}

    def spy(module, name, key):
        fn = getattr(module, name)

        def counted(*args, **kw):
            calls[key(kw)] = calls.get(key(kw), 0) + 1
            return fn(*args, **kw)
        monkeypatch.setattr(module, name, counted)

    for name in ("add_srmsnorm_triton", "gated_srmsnorm_triton"):
        spy(triton_norm, name, key=lambda kw, name=name: name)
    spy(triton_step, "lightning_attn_step_triton",
        key=lambda kw: f"step:{kw['act']}" + ("+lrpe" if kw.get("lrpe") else ""))
    return calls


@requires_interpreter
@pytest.mark.parametrize("pooled", [False, True], ids=["recurrent-state", "slot-state"])
def test_fused_decode_equals_torch_path(monkeypatch, pooled):
    """Prefill, then decode token by token: the Triton path (fused decode ops, under the interpreter) gives the
    PyTorch path's logits, and launches the fused kernels as often as docs/kernels.md counts them."""
    model = TransNormerLLM(tiny()).eval()  # 3 layers, LRPE on layers 0 and 2
    ids = torch.randint(0, 256, (2, 12))

    def run(impl):
        pool = model.allocate_state(4 if pooled else 2)
        state = SlotState(pool.kv, pool.positions, torch.tensor([3, 1])) if pooled else pool
        with kernels.use_impl(impl), torch.no_grad():
            steps = [model(ids[:, :8], state)] + [model(ids[:, t:t + 1], state) for t in range(8, 12)]
        return torch.cat(steps, 1)

    expected = run("torch")
    calls = spy_fused_launchers(monkeypatch)
    assert_close("logits", expected, run("triton"), rel=1e-5)
    calls_per_forward = 5  # the prefill and 4 decode tokens
    # no gated-norm kernel: every forward here has at most 16 rows, where out_proj takes the gated norm itself
    assert calls == {"add_srmsnorm_triton": 2 * 3 * calls_per_forward,  # 2 residual adds per layer
                     "step:silu": 1 * 4,  # the activation fused into the step: layer 1, every decode token
                     "step:silu+lrpe": 2 * 4}  # and LRPE's features too: layers 0 and 2


@requires_interpreter
def test_training_on_the_triton_path_keeps_gradients(monkeypatch):
    """With autograd recording, the Triton path takes the differentiable ops, never the forward-only fused ones,
    and its gradients equal the PyTorch path's."""
    model = TransNormerLLM(tiny()).train()
    ids = torch.randint(0, 256, (2, 20))
    grads = {}
    for impl in ("torch", "triton"):
        model.zero_grad(set_to_none=True)
        with kernels.use_impl(impl):
            logits = model(ids)
        F.cross_entropy(logits[:, :-1].reshape(-1, 256), ids[:, 1:].reshape(-1)).backward()
        grads[impl] = {name: p.grad for name, p in model.named_parameters()}
        if impl == "torch":
            calls = spy_fused_launchers(monkeypatch)  # spied from here on: the Triton run must not call them
    assert calls == {}
    for name, g in grads["torch"].items():
        assert_close(name, g, grads["triton"][name], rel=1e-4)


def test_packed_glu_equals_two_matmuls_and_unpacks_when_it_must(tmp_path):
    """`GLU.pack` (`pack_weights` on CUDA): same logits (fp64, so only the matmul grouping could differ), l1/l2
    still load and save as before; training, a dtype change and quantisation-style replacement fall back to two
    matmuls."""
    from tnllm.checkpoint import load_model, save_model

    config = tiny(bias=True)
    model = TransNormerLLM(config).double().eval()
    ids = torch.randint(0, config.vocab_size, (2, 9))
    with torch.no_grad():
        want = model(ids)
        pack_glus(model)
        glu = model.model.layers[0].channel_mixer
        assert glu._packed() is not None
        packed = glu._l12
        pack_glus(model)  # a second engine on the same model: the pack is kept, not rebuilt
        assert glu._l12 is packed
        assert_close("packed logits", want, model(ids), rel=1e-12)
        # Loading fills the packed buffer in place; the two products and the one agree on the new weights.
        fresh = TransNormerLLM(config).double().state_dict()
        model.load_state_dict(fresh)
        assert glu._packed() is not None and torch.equal(glu._packed().weight[:config.glu_dim], fresh[
            "model.layers.0.channel_mixer.l1.weight"])
        assert not any(".l12" in k or "_l12" in k for k in model.state_dict())
        save_model(model, tmp_path / "m")
        reloaded = load_model(tmp_path / "m", dtype=torch.float32)
        assert_close("saved packed model", reloaded(ids).double(), model(ids), rel=1e-5)
    # Training: gradients reach l1 and l2 (the unpacked path), and the buffer stays for the next inference.
    model.train()
    model(ids).sum().backward()
    assert glu._l12 is not None
    assert glu.l1.weight.grad is not None and glu.l2.weight.grad is not None
    # Replaced l2 (as quantisation does): the stale buffer is dropped, forward uses the modules.
    glu.l2 = torch.nn.Linear(config.dim, config.glu_dim, bias=True).double()
    with torch.no_grad():
        assert glu._packed() is None and glu._l12 is None
        model(ids)
    # A dtype change makes new tensors: unpacked, and correct.
    pack_glus(model)
    model.float()
    assert model.model.layers[0].channel_mixer._packed() is None
