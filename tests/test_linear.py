"""`tnllm.linear.Linear`: the oneDNN CPU pack against float64, its fallbacks, and a packed model end to end."""

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import assert_close
from tnllm import TNLConfig, TransNormerLLM
from tnllm.linear import Linear, can_pack_for_cpu, pack_linears_for_cpu, packed_linears

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="PyTorch built without oneDNN")


def packed_linear(n_in: int, n_out: int, bias: bool) -> Linear:
    lin = Linear(n_in, n_out, bias=bias)
    with torch.no_grad():
        lin.weight.normal_()
        if bias:
            lin.bias.normal_()
    assert lin.pack_for_cpu()
    return lin


def float64_product(lin: Linear, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x.double(), lin.weight.double(), None if lin.bias is None else lin.bias.double())


@pytest.mark.parametrize("shape", [(1, 37), (5, 37), (17, 37), (2, 3, 37), (300, 37)])
@pytest.mark.parametrize("bias", [False, True])
@torch.inference_mode()
def test_packed_product_equals_float64(shape, bias):
    lin = packed_linear(37, 53, bias)  # odd sizes: the blocked layout's edges
    x = torch.randn(shape)
    y = lin(x)
    assert y.shape == (*shape[:-1], 53) and y.dtype == torch.float32
    assert lin._live_pack() is not None
    assert_close("packed", float64_product(lin, x), y.double(), rel=1e-6)
    strided = torch.randn(*shape[:-1], 74)[..., ::2]  # every other feature: a last-dim stride of 2
    assert_close("strided input", float64_product(lin, strided), lin(strided).double(), rel=1e-6)


def test_autograd_takes_the_plain_product_with_the_same_gradients():
    lin = packed_linear(24, 16, bias=True)
    plain = torch.nn.Linear(24, 16)
    plain.load_state_dict(lin.state_dict())
    x = torch.randn(3, 24, requires_grad=True)
    lin(x).square().sum().backward()
    got = (x.grad.clone(), lin.weight.grad.clone(), lin.bias.grad.clone())
    x.grad = None
    plain(x).square().sum().backward()
    for g, want in zip(got, (x.grad, plain.weight.grad, plain.bias.grad), strict=True):
        assert torch.equal(g, want)


def test_a_changed_or_moved_weight_is_never_served_from_a_stale_pack():
    lin = packed_linear(16, 8, bias=False)
    x = torch.randn(2, 16)
    with torch.no_grad():
        old = lin(x)
        lin.weight.mul_(-1)  # in place: same storage, new version
        assert lin._live_pack() is None
        assert_close("after an in-place write", -old.double(), lin(x).double(), rel=1e-6)
    with torch.inference_mode():
        lin.pack_for_cpu()
        lin.load_state_dict({"weight": torch.ones(8, 16)})  # unversioned under inference_mode: the hook drops it
        assert lin._cpu_pack is None
        assert_close("after a load", x.sum(-1, keepdim=True).expand(2, 8).double(), lin(x).double(), rel=1e-6)
        lin.pack_for_cpu()
        pack = lin._cpu_pack
        assert lin.pack_for_cpu() and lin._cpu_pack is pack, "packing a live pack again keeps it"
        lin.weight.mul_(2)  # unversioned: packing again with refresh is the documented remedy
        lin.pack_for_cpu(refresh=True)
        assert_close("packed again", 2 * x.sum(-1, keepdim=True).expand(2, 8).double(), lin(x).double(), rel=1e-6)
    lin.double()
    assert not lin.pack_for_cpu() and lin._cpu_pack is None  # fp64: nothing to pack, the plain product
    assert lin(x.double()).dtype == torch.float64


@torch.inference_mode()
def test_packed_model_logits_and_copies():
    """`pack_weights` on a CPU model: logits at decode and prefill sizes equal the unpacked model's to fp32 rounding;
    a deep copy (as the reliability tests make) or an unpickled one runs unpacked until packed itself."""
    config = TNLConfig.from_name("tiny")
    model = TransNormerLLM(config).eval()
    ids = torch.randint(0, config.vocab_size, (3, 21))
    want = model(ids)
    model.pack_weights()
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    assert linears and all(m._live_pack() is not None for m in linears)
    assert_close("prefill", want.double(), model(ids).double(), rel=1e-5)
    state = model.allocate_state(3)
    model(ids[:, :-1], state)
    assert_close("decode", want[:, -1].double(), model(ids[:, -1:], state)[:, -1].double(), rel=1e-5)
    for twin in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert all(m._cpu_pack is None for m in twin.modules() if isinstance(m, Linear))
        assert_close("copy", want.double(), twin(ids).double(), rel=1e-5)


def test_a_tied_lm_head_follows_its_embedding():
    config = TNLConfig.from_name("tiny", tie_word_embeddings=True)
    model = TransNormerLLM(config).eval()
    model.pack_weights()
    ids = torch.randint(0, config.vocab_size, (1, 5))
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] += 1.0  # the lm_head reads the same tensor
        assert model.lm_head._live_pack() is None
        h = torch.randn(1, config.dim)
        assert_close("tied head", h.double() @ model.model.embed_tokens.weight.double().t(), model.lm_head(h).double(),
                     rel=1e-6)
        model(ids)


def test_only_fp32_cpu_weights_pack():
    assert can_pack_for_cpu(torch.empty(2, 2))
    assert not can_pack_for_cpu(torch.empty(2, 2, dtype=torch.float64))
    assert not can_pack_for_cpu(torch.empty(2, 2, dtype=torch.bfloat16))
    assert not can_pack_for_cpu(torch.empty(2, 2, device="meta"))


@torch.inference_mode()
def test_plain_linears_of_another_model_are_adopted_and_packed():
    """A Transformer baseline's nn.Linear modules get the same layout (the latency comparison stays fair)."""
    net = torch.nn.Sequential(torch.nn.Linear(12, 20), torch.nn.ReLU(), torch.nn.Linear(20, 3, bias=False))
    x = torch.randn(4, 12)
    want = net(x)
    keys = set(net.state_dict())
    assert pack_linears_for_cpu(net) == 2 and packed_linears(net) == 2
    assert packed_linears(object()) == 0  # not a module (a tensor-parallel driver): nothing to count
    assert all(type(m) is Linear and m._live_pack() is not None for m in (net[0], net[2]))
    assert set(net.state_dict()) == keys
    assert_close("adopted", want.double(), net(x).double(), rel=1e-6)
    assert pack_linears_for_cpu(net.double()) == 0  # fp64: nothing packs, and the packs made for fp32 are stale
    assert net[0]._live_pack() is None
