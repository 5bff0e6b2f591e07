"""The three PyTorch attention paths agree: naive masked (oracle), chunked, and the recurrent step."""

import pytest
import torch

from tests.conftest import assert_close
from tnllm.kernels import reference as ref


def _inputs(B, T, H, D, E, dtype=torch.float64, rate_scale=1.0):
    q = torch.randn(B, T, H, D, dtype=dtype)
    k = torch.randn(B, T, H, D, dtype=dtype)
    v = torch.randn(B, T, H, E, dtype=dtype)
    log_decay = -rate_scale * torch.rand(H, dtype=torch.float32)
    return q, k, v, log_decay


def _recurrent_loop(q, k, v, log_decay, initial_state=None):
    B, T, H, D = q.shape
    state = torch.zeros(B, H, D, v.shape[-1], dtype=torch.float64) if initial_state is None \
        else initial_state.clone().double()
    outs = [ref.lightning_attn_step_ref(q[:, t], k[:, t], v[:, t], log_decay, state) for t in range(T)]
    return torch.stack(outs, dim=1), state  # [B, T, H, E]


CASES = [
    pytest.param(1, 1, 2, 8, 8, 64, id="B1-T1-H2-D8"),
    pytest.param(2, 63, 3, 8, 4, 16, id="B2-T63-H3-D8-E4-C16"),
    pytest.param(2, 65, 2, 16, 8, 64, id="B2-T65-H2-D16-E8-C64"),
    pytest.param(1, 100, 4, 16, 16, 7, id="B1-T100-H4-D16-C7"),
    pytest.param(3, 37, 2, 8, 8, 128, id="B3-T37-C128>T"),
]


@pytest.mark.parametrize("B,T,H,D,E,C", CASES)
@pytest.mark.parametrize("with_state", [False, True], ids=["no-s0", "s0"])
def test_chunked_and_step_match_naive(B, T, H, D, E, C, with_state):
    q, k, v, a = _inputs(B, T, H, D, E)
    s0 = torch.randn(B, H, D, E, dtype=torch.float64) if with_state else None
    o_ref, s_ref = ref.lightning_attn_naive(q, k, v, a, initial_state=s0, output_final_state=True)
    o_chk, s_chk = ref.lightning_attn_chunked(q, k, v, a, initial_state=s0, output_final_state=True, chunk_size=C)
    o_rec, s_rec = _recurrent_loop(q, k, v, a, s0)
    assert_close("o chunked", o_ref, o_chk, rel=1e-12)
    assert_close("state chunked", s_ref, s_chk, rel=1e-12)
    assert_close("o step", o_ref, o_rec, rel=1e-12)
    assert_close("state step", s_ref, s_rec, rel=1e-12)


@pytest.mark.parametrize("block_chunks", [1, 3, 64])
def test_chunk_blocks_match_naive(block_chunks, monkeypatch):
    """Full chunks are batched BLOCK_CHUNKS at a time, the state carried between blocks, then a partial one."""
    monkeypatch.setattr(ref, "BLOCK_CHUNKS", block_chunks)
    q, k, v, a = _inputs(2, 100, 3, 8, 4)
    s0 = torch.randn(2, 3, 8, 4, dtype=torch.float64)
    o_ref, s_ref = ref.lightning_attn_naive(q, k, v, a, initial_state=s0, output_final_state=True)
    o, s = ref.lightning_attn_chunked(q, k, v, a, initial_state=s0, output_final_state=True, chunk_size=7)
    assert_close("o", o_ref, o, rel=1e-12)
    assert_close("state", s_ref, s, rel=1e-12)


def test_zero_rate_stays_causal():
    """Rate 0 must not disable the causal mask (upstream LA1 masks on rate*(i-j) >= 0)."""
    q, k, v, _ = _inputs(1, 20, 2, 4, 4)
    a = torch.zeros(2)
    o, _ = ref.lightning_attn_chunked(q, k, v, a, chunk_size=8)
    v2 = v.clone()
    v2[:, 10:] += 100.0  # future values must not change earlier outputs
    o2, _ = ref.lightning_attn_chunked(q, k, v2, a, chunk_size=8)
    assert torch.equal(o[:, :10], o2[:, :10])
    # and with rate 0 the output is a plain causal prefix sum
    expected = torch.einsum("bthd,bshd,bshe->bthe", q[:, 5:6], k[:, :6], v[:, :6])
    assert_close("rate0", expected, o[:, 5:6], rel=1e-12)


def test_strong_decay_long_sequence_is_finite():
    """Large rates and long sequences: exponents stay <= 0, so nothing overflows."""
    q, k, v, _ = _inputs(1, 700, 2, 8, 8, dtype=torch.float32)
    a = torch.tensor([-0.0, -20.0])
    o, s = ref.lightning_attn_chunked(q, k, v, a, output_final_state=True, chunk_size=256)
    assert torch.isfinite(o).all() and torch.isfinite(s).all()
    o_naive, _ = ref.lightning_attn_naive(q.double(), k.double(), v.double(), a)
    assert_close("o", o_naive, o.double(), rel=1e-5)


def test_varlen_equals_per_sequence():
    H, D, E = 2, 8, 4
    lens = [5, 17, 1, 30]
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)))
    q, k, v, a = _inputs(1, sum(lens), H, D, E)
    s0 = torch.randn(len(lens), H, D, E, dtype=torch.float64)
    o, s = ref.lightning_attn_chunked(q, k, v, a, initial_state=s0, output_final_state=True,
                                      cu_seqlens=cu, chunk_size=8)
    for i, (lo, hi) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        oi, si = ref.lightning_attn_naive(q[:, lo:hi], k[:, lo:hi], v[:, lo:hi], a,
                                          initial_state=s0[i:i + 1], output_final_state=True)
        assert_close(f"o seq{i}", oi, o[:, lo:hi], rel=1e-12)
        assert_close(f"state seq{i}", si, s[i:i + 1], rel=1e-12)


def test_chunked_gradients_match_naive():
    q, k, v, a = _inputs(2, 29, 2, 8, 4)
    s0 = torch.randn(2, 2, 8, 4, dtype=torch.float64)
    grads = []
    for fn in (ref.lightning_attn_naive, lambda *x, **kw: ref.lightning_attn_chunked(*x, chunk_size=8, **kw)):
        leaves = [t.clone().requires_grad_() for t in (q, k, v, s0)]
        o, s = fn(*leaves[:3], a, initial_state=leaves[3], output_final_state=True)
        (o.sin().sum() + s.cos().sum()).backward()
        grads.append([t.grad for t in leaves])
    for name, g_ref, g in zip("qkvs", *grads):
        assert_close(f"d{name}", g_ref, g, rel=1e-12)


def test_bad_shapes_raise_clear_errors():
    q, k, v, a = _inputs(1, 4, 2, 8, 4)
    with pytest.raises(ValueError, match="log_decay"):
        ref.lightning_attn_chunked(q, k, v, a[:1])
    with pytest.raises(ValueError, match="initial_state"):
        ref.lightning_attn_chunked(q, k, v, a, initial_state=torch.zeros(1, 2, 4, 4))
    with pytest.raises(ValueError, match="cu_seqlens"):
        ref.lightning_attn_chunked(q.expand(2, -1, -1, -1), k.expand(2, -1, -1, -1), v.expand(2, -1, -1, -1),
                                   a, cu_seqlens=torch.tensor([0, 4]))


def test_srmsnorm_matches_formula():
    x = torch.randn(3, 5, 64, dtype=torch.float64) * 3
    y = ref.srmsnorm_ref(x)
    expected = x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-6)
    assert_close("srmsnorm", expected, y, rel=1e-14)
    xb = x.to(torch.bfloat16)
    assert ref.srmsnorm_ref(xb).dtype == torch.bfloat16


def test_add_srmsnorm_matches_composition():
    x, delta = (torch.randn(2, 3, 67, dtype=torch.float64) for _ in range(2))
    s, y = ref.add_srmsnorm_ref(x, delta, 1e-6)
    assert torch.equal(s, x + delta)
    expected = (x + delta) / torch.sqrt(((x + delta) ** 2).mean(-1, keepdim=True) + 1e-6)
    assert_close("y", expected, y, rel=1e-14)
    xb, db = x.bfloat16(), delta.bfloat16()
    sb, yb = ref.add_srmsnorm_ref(xb, db)
    assert torch.equal(sb, xb + db) and torch.equal(yb, ref.srmsnorm_ref(xb + db))  # the norm of the rounded sum


def test_gated_srmsnorm_matches_composition():
    o, u = (torch.randn(2, 3, 67, dtype=torch.float64) * 3 for _ in range(2))
    y = ref.gated_srmsnorm_ref(o, u, 1e-6)
    assert_close("y", u * o / torch.sqrt((o * o).mean(-1, keepdim=True) + 1e-6), y, rel=1e-14)
    ob, ub = o.bfloat16(), u.bfloat16()
    yb = ref.gated_srmsnorm_ref(ob, ub)
    assert yb.dtype == torch.bfloat16
    assert torch.equal(yb, ref.gated_srmsnorm_ref(ob.float(), ub.float()).bfloat16())  # one rounding, at the end


@pytest.mark.parametrize("slots", [None, [2, 0]], ids=["no-slots", "slots"])
def test_step_activation_equals_activating_the_inputs(slots):
    q, k = (torch.randn(2, 3, 8, dtype=torch.float64) for _ in range(2))
    v = torch.randn(2, 3, 4, dtype=torch.float64)
    a = -torch.rand(3)
    slots = None if slots is None else torch.tensor(slots)
    state = torch.randn(3 if slots is not None else 2, 3, 8, 4, dtype=torch.float64)
    fused_state, plain_state = state.clone(), state.clone()
    o = ref.lightning_attn_step_ref(q, k, v, a, fused_state, slots, act="silu")
    o_plain = ref.lightning_attn_step_ref(torch.nn.functional.silu(q), torch.nn.functional.silu(k), v, a, plain_state,
                                          slots)
    assert torch.equal(o, o_plain) and torch.equal(fused_state, plain_state)
    assert torch.equal(ref.lightning_attn_step_ref(q, k, v, a, state.clone(), slots, act="none"),
                       ref.lightning_attn_step_ref(q, k, v, a, state.clone(), slots))
