"""Decode products fused with the op before them (`kernels.prologue_linear`, kernels/triton_int8.py) vs a float64
oracle of the same math, vs their PyTorch twin (`reference.prologue_linear_ref`), and in a whole model.

Runs on CUDA, or on CPU tensors under TRITON_INTERPRET=1 (16-wide tiles and 2 K slices there, so odd K and N walk
several K steps, N tiles and slices).
"""

import copy
import inspect

import pytest
import torch
from torch import nn

from tests.conftest import assert_close, pack_glus, requires_cuda, requires_triton_interpret
from tnllm import kernels
from tnllm.kernels import reference as ref
from tnllm.quant import int8 as int8_module
from tnllm.quant.int8 import Int8Linear, quantize_model
from tnllm.state import SlotState

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}  # as tests/test_int8_kernel.py
EPS = 1e-6
TWO_INPUTS = ("add_norm", "gated_norm", "mul")


def _inputs(prologue, M, N, K, dtype, weight_kind, bias=True, lead=()):
    """(x, other | None, weight, scales | None, bias | None): other for the prologues that take one; an int8
    weight with scales, or a float weight of x's dtype."""
    g = torch.Generator().manual_seed(100 * M + K + ref.PROLOGUES.index(prologue))
    x = torch.randn(*lead, M, K, generator=g).to(device=DEVICE, dtype=dtype)
    other = torch.randn(*lead, M, K, generator=g).to(device=DEVICE, dtype=dtype) if prologue in TWO_INPUTS else None
    if weight_kind == "int8":
        w = torch.randint(-127, 128, (N, K), dtype=torch.int8, generator=g).to(DEVICE)
        s = (torch.rand(N, generator=g) * 0.02 + 1e-3).to(device=DEVICE, dtype=dtype)
    else:
        w, s = (torch.randn(N, K, generator=g) / K**0.5).to(device=DEVICE, dtype=dtype), None
    b = torch.randn(N, generator=g).to(device=DEVICE, dtype=dtype) if bias else None
    return x, other, w, s, b


def _oracle(prologue, x, other, w, s, b):
    """float64 of the kernel's math: the prologue's elementwise op rounded to x's dtype (as x + other and x * other
    round), its product with the weight, then the rows scaled by the norm's rsqrt(mean(squares) + eps).
    Returns y, or (s, y) for add_norm."""
    if prologue in ("none", "norm"):
        op = x
    elif prologue == "add_norm":
        op = x + other
    else:
        op = x * other
    squares_of = x if prologue == "gated_norm" else op
    y = op.double() @ (w.double() if s is None else w.double() * s.double()[:, None]).T  # [..., N]
    if prologue in ref.NORM_PROLOGUES:
        y = y * torch.rsqrt(squares_of.double().square().mean(-1, keepdim=True) + EPS)
    y = y if b is None else y + b.double()
    return (op, y) if prologue == "add_norm" else y


def _check(name, prologue, expected, out, dtype):
    if prologue == "add_norm":
        if dtype == torch.bfloat16 and DEVICE == "cpu":
            # the interpreter casts fp32 -> bf16 toward zero (the GPU rounds to nearest even: tests/test_cuda.py)
            ulps = (expected[0].view(torch.int16).int() - out[0].view(torch.int16).int()).abs().max().item()
            assert ulps <= 1, f"{name}: the stored sum x + other, {ulps} ulps"
        else:
            assert torch.equal(expected[0], out[0]), f"{name}: the stored sum x + other"
        expected, out = expected[1], out[1]
    assert out.dtype == dtype
    assert_close(name, expected, out, rel=TOL[dtype])


@requires_triton_interpret
class TestTriton:
    @pytest.mark.parametrize("prologue", ref.PROLOGUES)
    @pytest.mark.parametrize("weight_kind", ["int8", "float"])
    @pytest.mark.parametrize("M", [1, 3, 17])
    def test_matches_oracle(self, prologue, weight_kind, M):
        x, other, w, s, b = _inputs(prologue, M, 29, 37, torch.float32, weight_kind)  # odd K and N
        with kernels.use_impl("triton"):
            out = kernels.prologue_linear(x, w, s, b, prologue=prologue, other=other, eps=EPS)
        _check(f"{prologue} {weight_kind} M={M}", prologue, _oracle(prologue, x, other, w, s, b), out, torch.float32)
        # the PyTorch twin rounds the same ops the other way round (the normed input, not the product): fp32 agrees
        twin = ref.prologue_linear_ref(x, w, s, b, prologue=prologue, other=other, eps=EPS)
        _check(f"{prologue} twin", prologue, twin, out, torch.float32)

    @pytest.mark.parametrize("prologue", ref.PROLOGUES)
    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
    def test_16_bit(self, prologue, dtype):
        for weight_kind in ("int8", "float"):
            x, other, w, s, b = _inputs(prologue, 5, 29, 37, dtype, weight_kind)
            with kernels.use_impl("triton"):
                out = kernels.prologue_linear(x, w, s, b, prologue=prologue, other=other, eps=EPS)
            _check(f"{prologue} {weight_kind}", prologue, _oracle(prologue, x, other, w, s, b), out, dtype)

    @pytest.mark.parametrize("kind", ["dot", "dot_t", "gemv", "gemv_once", "gemv_word"])
    @pytest.mark.parametrize("prologue", ["add_norm", "gated_norm", "mul"])
    def test_every_kind_and_split(self, kind, prologue):
        # splits 1 and 3 of 70 = 3 K steps of 32 (one slice past the end, masked last step); 17 rows: several row
        # tiles, the last re-reading valid rows whose sums must not be stored twice wrong
        from tnllm.kernels.triton_int8 import Config, _linear

        bm = {"dot": 16, "dot_t": 16, "gemv_word": 1}.get(kind, 4)
        for split, bias, weight_kind in ((1, True, "int8"), (3, False, "int8"), (3, True, "float")):
            x, other, w, s, b = _inputs(prologue, 17, 45, 68 if kind == "gemv_word" else 70, torch.float32,
                                        weight_kind, bias)  # gemv_word: K a multiple of 4 (its words)
            cfg = Config(bm, 16, 32, SPLIT_K=split, GROUP_M=2, num_stages=1, kind=kind)
            out = _linear(x, w, s, b, prologue=prologue, other=other, eps=EPS, config=cfg)
            _check(f"{cfg} {weight_kind}", prologue, _oracle(prologue, x, other, w, s, b), out, torch.float32)

    @pytest.mark.parametrize("kind", ["gemv", "gemv_once", "gemv_word"])
    def test_one_row_products_peel_their_first_step_for_pdl(self, kind, monkeypatch):
        """With PDL on, a one-row product peels its first K step off (its weight tile is loaded before the wait for
        the kernel ahead): the interpreter runs that loop (not the PTX) against the oracle, with K slices 1, 3 and
        4 (the last one without a step) over K = 68 (a masked last step), int8 and float weights, prologues."""
        from tnllm.kernels import _pdl
        from tnllm.kernels.triton_int8 import Config, _linear

        monkeypatch.setattr(_pdl, "DECODE_PDL", frozenset(_pdl.WEIGHT_KINDS))
        for weights in (None, *_pdl.WEIGHT_KINDS):
            assert _pdl.pdl(DEVICE, weights) == (_pdl.PEEL if DEVICE == "cpu" else _pdl.CHAINED)
        for split, prologue, weight_kind in ((1, "none", "int8"), (3, "gated_norm", "int8"), (4, "mul", "float")):
            x, other, w, s, b = _inputs(prologue, 1, 45, 68, torch.float32, weight_kind)
            cfg = Config(1, 16, 32, SPLIT_K=split, num_stages=1, kind=kind)
            out = _linear(x, w, s, b, prologue=prologue, other=other, eps=EPS, config=cfg)
            _check(f"{cfg} {prologue} {weight_kind}", prologue, _oracle(prologue, x, other, w, s, b), out,
                   torch.float32)

    def test_pdl_is_chosen_per_weight_kind(self, monkeypatch):
        """With PDL listed for int8 weights alone (the shipped setting), a one-row int8 product asks for and gets it,
        a float one does not, and the kernels ahead of a product (which ask without a kind) signal."""
        from tnllm.kernels import _pdl
        from tnllm.kernels import triton_int8 as ti

        on = _pdl.PEEL if DEVICE == "cpu" else _pdl.CHAINED
        monkeypatch.setattr(_pdl, "DECODE_PDL", frozenset({"int8"}))
        assert (_pdl.pdl(DEVICE), _pdl.pdl(DEVICE, "int8"), _pdl.pdl(DEVICE, "float")) == (on, on, _pdl.OFF)
        asked = []
        monkeypatch.setattr(ti, "pdl", lambda device, weights=None: asked.append(weights) or _pdl.pdl(device, weights))
        for weight_kind in ("int8", "float"):
            x, other, w, s, b = _inputs("none", 1, 45, 68, torch.float32, weight_kind)
            out = ti._linear(x, w, s, b, config=ti.Config(1, 16, 32, num_stages=1, kind="gemv"))
            _check(weight_kind, "none", _oracle("none", x, other, w, s, b), out, torch.float32)
        assert asked == ["int8", "float"]

    @pytest.mark.parametrize("kind", ["dot", "dot_t", "gemv", "gemv_once", "gemv_word"])
    def test_deferred_norm_epilogue(self, kind):
        """row_ms (power 1 and 2) and a residual after every prologue that serves them, splits 1 and 3, 17 rows and
        odd N (several row and column tiles, masked edges): y against a float64 oracle, the partial mean squares'
        sum against the mean squares of the rounded output, one partial per column tile."""
        from tnllm.kernels.triton_int8 import Config, _linear

        bm = {"dot": 16, "dot_t": 16, "gemv_word": 1}.get(kind, 4)
        g = torch.Generator().manual_seed(7)
        for split, prologue, weight_kind, power in ((1, "gated_norm", "int8", 1), (3, "mul", "int8", 2),
                                                    (3, "gated_norm", "float", 1), (1, "none", "float", 2)):
            x, other, w, s, b = _inputs(prologue, 17, 45, 68, torch.float32, weight_kind)
            row_ms = (torch.rand(5, 17, generator=g) * 0.3).to(DEVICE)
            residual = torch.randn(17, 45, generator=g).to(DEVICE)
            cfg = Config(bm, 16, 32, SPLIT_K=split, GROUP_M=2, num_stages=1, kind=kind)
            y, ms = _linear(x, w, s, b, prologue=prologue, other=other, eps=EPS, row_ms=row_ms, row_power=power,
                            residual=residual, config=cfg)
            product = _oracle(prologue, x, other, w, s, None)  # [17, 45] float64, before the bias
            r = torch.rsqrt(row_ms.double().sum(0) + EPS)[:, None] ** power
            expected = residual.double() + product * r + b.double()
            assert_close(f"{cfg} {prologue} y", expected, y)
            # one partial per column tile: the product's 16 wide, or under split-K the reduce kernel's (up to 1024)
            assert ms.shape[1] == 17 and 1 <= ms.shape[0] <= -(-45 // 16)
            assert_close(f"{cfg} {prologue} ms", y.double().square().mean(-1), ms.double().sum(0))
            scaled = _linear(x, w, s, b, prologue=prologue, other=other, eps=EPS, row_ms=row_ms, row_power=power,
                             config=cfg)  # the row scale alone
            assert_close(f"{cfg} {prologue} scaled", product * r + b.double(), scaled)
            twin = ref.prologue_linear_ref(x, w, s, b, prologue=prologue, other=other, eps=EPS, row_ms=row_ms,
                                           row_power=power, residual=residual)
            assert_close("twin y", twin[0], y)
            assert_close("twin ms", twin[1].sum(0), ms.sum(0))

    def test_leading_dims_and_strided_halves(self):
        # the GLU's halves: two strided views of one [..., 2g] output, rows [2, 3]
        y12 = torch.randn(2, 3, 74, device=DEVICE)
        first, second = y12.chunk(2, dim=-1)
        _, _, w, s, b = _inputs("mul", 3, 29, 37, torch.float32, "int8")
        with kernels.use_impl("triton"):
            out = kernels.prologue_linear(first, w, s, b, prologue="mul", other=second)
        assert out.shape == (2, 3, 29)
        assert_close("strided halves", _oracle("mul", first, second, w, s, b), out)
        x, other, w, s, b = _inputs("add_norm", 3, 29, 37, torch.float32, "float", lead=(2,))
        with kernels.use_impl("triton"):
            total, out = kernels.prologue_linear(x, w, s, b, prologue="add_norm", other=other)
            assert total.shape == (2, 3, 37) and out.shape == (2, 3, 29)
            empty_total, empty = kernels.prologue_linear(x[:, :0], w, s, b, prologue="add_norm", other=other[:, :0])
        assert empty_total.shape == (2, 0, 37) and empty.shape == (2, 0, 29)

    def test_signature_matches_reference_twin(self):
        from tnllm.kernels.triton_int8 import prologue_linear_triton

        def params(f):
            return [(p.name, p.kind, p.default) for p in inspect.signature(f).parameters.values()]

        assert params(prologue_linear_triton) == params(ref.prologue_linear_ref)


def test_bad_input_errors():
    pytest.importorskip("triton")
    from tnllm.kernels.triton_int8 import Config, _linear, prologue_linear_triton

    x, other, w, s, b = _inputs("add_norm", 2, 29, 37, torch.float32, "int8")
    for impl in (ref.prologue_linear_ref, prologue_linear_triton):
        with pytest.raises(ValueError, match="prologue must be one of"):
            impl(x, w, s, b, prologue="rms")
        with pytest.raises(ValueError, match="needs its second input"):
            impl(x, w, s, b, prologue="add_norm")
        with pytest.raises(ValueError, match="takes no second input"):
            impl(x, w, s, b, prologue="norm", other=other)
        with pytest.raises(ValueError, match="must have one shape"):
            impl(x, w, s, b, prologue="mul", other=other[:, :36])
        with pytest.raises(ValueError, match="share dtype and device"):
            impl(x, w, s, b, prologue="mul", other=other.double())
        with pytest.raises(ValueError, match="equal K"):
            impl(x[:, :36], w, s, b, prologue="norm")
    with pytest.raises(TypeError, match="float weight must have x's dtype"):
        prologue_linear_triton(x, w.half(), None, b, prologue="norm")
    with pytest.raises(TypeError, match="weight must be int8"):
        prologue_linear_triton(x, w.float(), s, b, prologue="norm")
    with pytest.raises(ValueError, match="scales belong to an int8 weight"):
        ref.prologue_linear_ref(x, w.float(), s, b, prologue="norm")
    with pytest.raises(ValueError, match='"deq" serves a plain int8 product only'):
        _linear(x, w, s, b, prologue="norm", config=Config(1, 32, 256, kind="deq"))
    residual, row_ms = torch.zeros(2, 29, device=DEVICE), torch.zeros(3, 2, device=DEVICE)
    for impl in (ref.prologue_linear_ref, prologue_linear_triton):
        with pytest.raises(ValueError, match="row_ms must be fp32"):
            impl(x, w, s, b, prologue="mul", other=other, row_ms=row_ms.double())
        with pytest.raises(ValueError, match="row_ms must be fp32"):
            impl(x, w, s, b, prologue="mul", other=other, row_ms=row_ms[:, :1])  # one row of two
        with pytest.raises(ValueError, match="row_power must be 1 or 2"):
            impl(x, w, s, b, prologue="mul", other=other, row_ms=row_ms, row_power=3)
        with pytest.raises(ValueError, match="residual must be"):
            impl(x, w, s, b, prologue="mul", other=other, residual=residual[:, :28])
        with pytest.raises(ValueError, match="takes no residual after"):
            impl(x, w, s, b, prologue="add_norm", other=other, residual=residual)
    with pytest.raises(ValueError, match='"deq" serves a plain int8 product only'):
        _linear(x, w, s, b, residual=residual, config=Config(1, 32, 256, kind="deq"))


def test_only_decode_rows_without_autograd_take_a_prologue(monkeypatch):
    x, _, w, _, _ = _inputs("norm", 16, 29, 37, torch.float32, "int8")
    monkeypatch.setattr(kernels, "PROLOGUE_WEIGHTS", ("int8",))
    monkeypatch.setattr(kernels, "FUSED_PROLOGUES", {"mul": 16, "gated_norm": 1})
    with kernels.use_impl("triton"):
        assert kernels.fuses_prologue(x, w, "mul", x)
        assert not kernels.fuses_prologue(torch.cat([x, x[:1]]), w, "mul", x)  # 17 rows: a prefill chunk
        assert kernels.fuses_prologue(x[:1], w, "gated_norm", x[:1])
        assert not kernels.fuses_prologue(x[:2], w, "gated_norm", x[:2])  # past the gated norm's rows
        assert not kernels.fuses_prologue(x, w, "add_norm", x)  # a prologue not named
        assert not kernels.fuses_prologue(x, w, "mul", x.double())  # the promotion belongs to the composed op
        with torch.autocast(DEVICE):
            assert not kernels.fuses_prologue(x, w, "mul", x)
        assert not kernels.fuses_prologue(x.requires_grad_(), w, "mul", x)  # autograd records: no backward
        with torch.no_grad():
            assert kernels.fuses_prologue(x, w, "mul", x)
        x = x.detach()
        assert not kernels.fuses_prologue(x, w.float(), "mul", x)  # only the weight kinds named
        monkeypatch.setattr(kernels, "PROLOGUE_WEIGHTS", ("int8", "float"))
        assert kernels.fuses_prologue(x, w.float(), "mul", x) and not kernels.fuses_prologue(x, w.half(), "mul", x)
    with kernels.use_impl("torch"):
        assert not kernels.fuses_prologue(x, w, "mul", x)  # the CPU: the Linears' own products (oneDNN, int8pack)


@requires_triton_interpret
@torch.inference_mode()
def test_float_linear_runs_one_row_on_the_triton_product(monkeypatch):
    """tnllm's float Linear sends a one-row product on the Triton path to the kernel's plain product ("none"), equal
    to F.linear in fp32 (odd N and K, bias, a leading batch dim); two rows, or autograd recording, stay F.linear."""
    from tnllm.linear import Linear

    torch.manual_seed(3)
    linear = Linear(37, 29, bias=True).to(DEVICE)
    counter = CallCounter(kernels.prologue_linear)
    monkeypatch.setattr(kernels, "prologue_linear", counter)
    x = torch.randn(3, 2, 37, device=DEVICE)
    with kernels.use_impl("triton"):
        one = linear(x[:1, :1])
        assert counter.calls == ["none"] and one.shape == (1, 1, 29)
        assert_close("one row", torch.nn.functional.linear(x[:1, :1], linear.weight, linear.bias), one, rel=1e-6)
        assert_close("two rows", torch.nn.functional.linear(x[:1], linear.weight, linear.bias), linear(x[:1]))
        assert counter.calls == ["none"]
        with torch.enable_grad():
            linear(x[:1, :1].clone().requires_grad_())
        assert counter.calls == ["none"]


class CallCounter:
    """Counts calls of one function and calls it (a spy, not a stand-in)."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, *args, **kwargs):
        self.calls.append(kwargs.get("prologue"))
        return self.fn(*args, **kwargs)


def _dequantised(model):
    """A float copy of an int8 model: each Int8Linear's weight as the float Linear q · s it stands for (the CPU
    runs int8 products in bf16, so the int8 model's own composed path is no fp32 oracle)."""
    twin = copy.deepcopy(model)
    for name, module in model.named_modules():
        if isinstance(module, Int8Linear):
            linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            linear.weight.data = module.weight.float() * module.scales.float()[:, None]  # [N, K]
            if module.bias is not None:
                linear.bias.data = module.bias.float()
            twin.set_submodule(name, linear)
    return twin


@requires_triton_interpret
@pytest.mark.parametrize("weights", ["int8", "float"])
@torch.inference_mode()
def test_model_decode_with_fused_prologues_equals_the_composed_ops(untied_tiny_model, weights, monkeypatch):
    """Decode steps of 3 slots (after one 6-token prefill of the float weights) on the tiny model with every product
    taking its prologue == the PyTorch path of the same float weights (the int8 ones dequantised): logits and
    states, fp32. Every block's four products take one (the first block's token norm, or add_norm; gated_norm;
    add_norm into the packed l1|l2; mul), and the lm_head (float in int8 models too) the final add_norm."""
    model = copy.deepcopy(untied_tiny_model).to(DEVICE)
    monkeypatch.setattr(kernels, "PROLOGUE_WEIGHTS", ("int8", "float"))
    monkeypatch.setattr(kernels, "FUSED_PROLOGUES", dict.fromkeys(ref.PROLOGUES, 16))
    monkeypatch.setattr(kernels, "DEFERRED_NORMS", False)  # every norm in a product (test_deferred_norms: none)
    if weights == "int8":
        model = quantize_model(model)
        composed = _dequantised(model)
    else:
        composed = model
    pack_glus(model)
    counter = CallCounter(kernels.prologue_linear)
    monkeypatch.setattr(kernels, "prologue_linear", counter)
    _decode_both_ways(model, composed)
    assert counter.calls == _expected_calls(model.config.n_layers)


def _decode_both_ways(model, composed, steps=(6, 7)):
    """Decode steps of 3 slots after a 6-token prefill: `model` on the Triton path against `composed` on the
    PyTorch path, from the same states: logits and states equal to fp32 rounding."""
    ids = torch.randint(3, 400, (3, max(steps) + 1), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    slots = torch.tensor([4, 0, 2], device=DEVICE)
    logits, pools = {}, {}
    for impl, net in (("torch", composed), ("triton", model)):
        pool = net.allocate_state(5)
        rows = SlotState(pool.kv, pool.positions, slots)
        composed(ids[:, :6], rows)  # 18 rows: a prefill, which composes the ops
        with kernels.use_impl(impl):
            logits[impl] = torch.cat([net(ids[:, t:t + 1], rows) for t in steps], dim=1)
        pools[impl] = pool
    assert_close("logits", logits["torch"], logits["triton"], rel=1e-5)
    for a, b in zip(pools["torch"].kv, pools["triton"].kv):
        assert_close("state", a, b, rel=1e-5)


def _expected_calls(n_layers):
    """The fused products of two decode steps."""
    step = ["norm", "gated_norm", "add_norm", "mul"] + ["add_norm", "gated_norm", "add_norm", "mul"] * (n_layers - 1)
    return (step + ["add_norm"]) * 2


@requires_triton_interpret
@pytest.mark.parametrize("weights", ["int8", "float"])
@torch.inference_mode()
def test_deferred_norms_equal_the_composed_ops(weights, monkeypatch):
    """Blocks that defer their norms (LRPE pattern [1, 0, 0, 1], every block's l1 and l2 packed but block 2's, so
    blocks 0, 1 and 3 defer; out_proj and l3 fused with their prologues): two decode steps == the PyTorch path of
    the same float weights, logits and states, fp32. Block 0 (LRPE: the step scales q and k before its features)
    normalises the embedding itself, block 1 takes the stream's mean squares from it, block 2 normalises the
    summed stream as a kernel and hands block 3 x + delta, which block 3 adds and normalises with the add+norm
    kernel; no add+norm runs between deferring blocks."""
    from tnllm import TNLConfig, TransNormerLLM

    torch.manual_seed(0)
    config = TNLConfig.from_name("tiny", vocab_size=400, tie_word_embeddings=False, n_layers=4,
                                 lrpe_layers=[1, 0, 0, 1])
    model = TransNormerLLM(config).eval().to(DEVICE)
    monkeypatch.setattr(kernels, "PROLOGUE_WEIGHTS", ("int8", "float"))
    monkeypatch.setattr(kernels, "FUSED_PROLOGUES", {"gated_norm": 16, "mul": 16})
    monkeypatch.setattr(kernels, "DEFERRED_NORMS", True)
    if weights == "int8":
        model = quantize_model(model)
        # q|k|v|u and l1|l2 run as plain products here: through the launcher, as on CUDA (the CPU's own int8
        # product computes in bf16, no fp32 oracle)
        monkeypatch.setattr(int8_module, "_use_int8_kernel", lambda x: True)
    composed = _dequantised(model) if weights == "int8" else model
    for i in (0, 1, 3):
        model.model.layers[i].channel_mixer.pack()
    _decode_both_ways(model, composed)
    fused, add_norms = CallCounter(kernels.prologue_linear), CallCounter(kernels.add_srmsnorm)
    norms = CallCounter(kernels.srmsnorm)
    monkeypatch.setattr(kernels, "prologue_linear", fused)
    monkeypatch.setattr(kernels, "add_srmsnorm", add_norms)
    monkeypatch.setattr(kernels, "srmsnorm", norms)
    x = torch.zeros(3, 1, config.dim, device=DEVICE)
    with kernels.use_impl("triton"):
        model(torch.ones(3, 1, dtype=torch.long, device=DEVICE), model.allocate_state(3))  # one decode step
    # out_proj and l3 of every block (3 rows), but block 2's l3: its unpacked GLU multiplies l1's and l2's outputs
    assert fused.calls == ["gated_norm", "mul"] * 2 + ["gated_norm"] + ["gated_norm", "mul"]
    # block 2's channel norm and block 3's token norm (x + delta); plain: block 0's and 2's token norms, the final
    # norm. Composed, every block's two norms and the final one would run as add+norms (but block 0's token norm)
    assert len(add_norms.calls) == 2 and len(norms.calls) == 3
    with kernels.use_impl("triton"):
        defers = [layer.defers_norms(x, x, None, layer.channel_mixer._packed()) for layer in model.model.layers]
        assert defers == [True, True, False, True]
        assert not model.model.layers[1].defers_norms(x[:, :0], x, None, model.model.layers[1].channel_mixer._packed())
        monkeypatch.setattr(kernels, "DEFERRED_NORMS", False)
        assert not model.model.layers[1].defers_norms(x, x, None, model.model.layers[1].channel_mixer._packed())


@requires_cuda
@pytest.mark.parametrize("weight_kind", ["int8", "float"])
def test_cuda_every_decode_tile_takes_a_prologue(weight_kind):
    """Each decode row of the launcher's table (CONFIGS for int8 weights, FLOAT_CONFIGS for float ones) with a
    prologue, bf16 at a 7B-like K (unmasked K steps), its bucket's rows: right and run-to-run identical."""
    from tnllm.kernels.triton_int8 import CONFIGS, DECODE_MAX_M, FLOAT_CONFIGS, _linear

    table = CONFIGS if weight_kind == "int8" else FLOAT_CONFIGS
    tiles = [(bucket, cfg) for (bucket, _), cfg in table.items() if bucket is not None and bucket <= DECODE_MAX_M]
    for i, (bucket, cfg) in enumerate(tiles):
        prologue = ref.PROLOGUES[1 + i % 4]  # each tile one of the four, in turn
        x, other, w, s, b = _inputs(prologue, bucket, 1000, 4096, torch.bfloat16, weight_kind)
        cfg = cfg._replace(SPLIT_K=cfg.SPLIT_K or 2)
        out = _linear(x, w, s, b, prologue=prologue, other=other, eps=EPS, config=cfg)
        _check(f"{cfg} {prologue}", prologue, _oracle(prologue, x, other, w, s, b), out, torch.bfloat16)
        again = _linear(x, w, s, b, prologue=prologue, other=other, eps=EPS, config=cfg)
        same = zip(out, again) if prologue == "add_norm" else [(out, again)]
        assert all(torch.equal(first, second) for first, second in same), f"{cfg}: not run-to-run identical"
