"""Weight-only int8 Linear kernel (kernels/triton_int8.py) vs the float64 dequantise-then-matmul oracle.

Runs on CUDA, or on CPU tensors under TRITON_INTERPRET=1 (small shapes: the launcher picks 16-wide tiles there,
so odd K and N walk several K steps, N tiles and K slices). The interpreter computes bf16 dots in fp32 (its bf16
dot is wrong, triton 3.9); the native bf16 path is covered by the CUDA tests.
"""

import gzip
import inspect
import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from tests.conftest import ROOT, assert_close, requires_cuda, requires_triton_interpret
from tnllm import kernels
from tnllm.kernels import reference as ref
from tnllm.quant import bnb
from tnllm.quant.int8 import Int8Linear

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# fp32: exact fp32 products (no tf32); 16-bit: the output's own rounding (bf16 about 2e-3 rel-L2)
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def _inputs(M, N, K, dtype, bias, lead=(), device=DEVICE):
    """(x [*lead, M, K], weight [N, K] int8, scales [N], bias [N] | None), scales and bias in x's dtype."""
    g = torch.Generator().manual_seed(1000 * M + N)
    x = torch.randn(*lead, M, K, generator=g).to(device=device, dtype=dtype)
    w = torch.randint(-127, 128, (N, K), dtype=torch.int8, generator=g).to(device)
    s = (torch.rand(N, generator=g) * 0.02 + 1e-3).to(device=device, dtype=dtype)
    b = torch.randn(N, generator=g).to(device=device, dtype=dtype) if bias else None
    return x, w, s, b


def _oracle(x, w, s, b):
    """float64 dequantise-then-matmul: x @ (q · s)ᵀ (+ b)."""
    y = x.double() @ (w.double() * s.double()[:, None]).T  # [..., N]
    return y if b is None else y + b.double()


try:  # a Triton kernel storing `_int8_to` of 256 int8 values (a jit helper must be a module-level name)
    import triton
    import triton.language as tl

    from tnllm.kernels.triton_int8 import _int8_to, _words_to_f32

    @triton.jit
    def _convert_kernel(q, out, MAGIC: tl.constexpr):
        i = tl.arange(0, 256)
        tl.store(out + i, _int8_to(tl.load(q + i), out.dtype.element_ty, MAGIC))

    @triton.jit
    def _convert_words_kernel(words, out, ASM: tl.constexpr):
        i = tl.arange(0, 64)
        f0, f1, f2, f3 = _words_to_f32(tl.load(words + i), ASM)
        tl.store(out + 4 * i, f0)
        tl.store(out + 4 * i + 1, f1)
        tl.store(out + 4 * i + 2, f2)
        tl.store(out + 4 * i + 3, f3)
except ImportError:
    _convert_kernel = _convert_words_kernel = None


@requires_triton_interpret
class TestTriton:
    @pytest.mark.parametrize("M", [1, 3, 17, 70])
    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
    @pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
    def test_matches_oracle(self, M, dtype, bias):
        x, w, s, b = _inputs(M, 29, 37, dtype, bias)  # odd K and N: partial tiles everywhere
        with kernels.use_impl("triton"):
            y = kernels.int8_linear(x, w, s, b)
        assert y.dtype == dtype and y.shape == (M, 29)
        assert_close(f"int8_linear M={M}", _oracle(x, w, s, b), y, rel=TOL[dtype])

    @pytest.mark.parametrize("cfg", [(16, 16, 16, 1), (16, 16, 16, 3), (32, 16, 32, 2)], ids=str)
    def test_forced_configs(self, cfg):
        from tnllm.kernels.triton_int8 import Config, _int8_linear

        cfg = Config(*cfg, GROUP_M=2, num_stages=1)  # (BM, BN, BK, SPLIT_K); any split, not only powers of 2
        for M, dtype in ((5, torch.float32), (70, torch.float16)):  # up to 5 row tiles in groups of 2
            x, w, s, b = _inputs(M, 45, 70, dtype, bias=True)
            assert_close(f"M={M} {cfg}", _oracle(x, w, s, b), _int8_linear(x, w, s, b, config=cfg), rel=TOL[dtype])

    def test_shapes_and_strides(self):
        x, w, s, b = _inputs(3, 29, 37, torch.float32, bias=True, lead=(2,))
        with kernels.use_impl("triton"):
            assert_close("leading dims", _oracle(x, w, s, b), kernels.int8_linear(x, w, s, b))
            xt = x[0].T.contiguous().T  # [3, 37] with a strided last dim
            assert xt.stride(-1) != 1
            assert_close("strided x", _oracle(xt, w, s, b), kernels.int8_linear(xt, w, s, b))
            assert kernels.int8_linear(x[:, :0], w, s, b).shape == (2, 0, 29)

    @pytest.mark.parametrize("kind", ["dot", "dot_t", "gemv", "gemv_once", "gemv_word", "deq"])
    @pytest.mark.parametrize("magic", [False, True], ids=["cvt", "magic"])
    @pytest.mark.parametrize("M", [1, 17])
    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
    def test_every_kind_matches_oracle(self, kind, magic, M, dtype):
        # odd N and K: partial N tiles and masked K steps; splits 1 and 3 (3 K slices of 3 steps: one past the end
        # on the last); gemv: 4 rows of x per program (M = 17: 5 row blocks, the last re-reading valid rows);
        # gemv_word: K a multiple of 4 (its words), not of the tile
        from tnllm.kernels.triton_int8 import Config, _int8_linear

        bm = {"dot": 16, "dot_t": 16, "gemv_word": 1}.get(kind, 4)
        for split, bias in ((1, True), (3, False)):
            x, w, s, b = _inputs(M, 45, 68 if kind == "gemv_word" else 70, dtype, bias)
            if dtype == torch.bfloat16:  # the model's form: bf16 x with bf16 scales; here also fp32 scales
                s = s.float()
            cfg = Config(bm, 16, 32, SPLIT_K=split, GROUP_M=2, num_stages=1, kind=kind, magic=magic)
            y = _int8_linear(x, w, s, b, config=cfg)
            assert y.dtype == dtype and y.shape == (M, 45)
            assert_close(f"{cfg}", _oracle(x, w, s, b), y, rel=TOL[dtype])

    def test_gemv_row_blocks(self):
        from tnllm.kernels.triton_int8 import Config, _int8_linear

        for bm, M in ((1, 3), (2, 3), (8, 5), (16, 17)):
            x, w, s, b = _inputs(M, 29, 37, torch.float32, bias=True)
            cfg = Config(bm, 8, 16, SPLIT_K=2, num_stages=1, kind="gemv")
            assert_close(f"M={M} {cfg}", _oracle(x, w, s, b), _int8_linear(x, w, s, b, config=cfg))

    def test_magic_conversion_is_exact(self):
        # every int8 value, converted to each float dtype by the magic-number path (and by a cast, where the
        # interpreter converts right: not int8 -> bf16, which it bitcasts)
        q = torch.arange(-128, 128, dtype=torch.int8, device=DEVICE)
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            for magic in (True, False) if dtype != torch.bfloat16 or DEVICE == "cuda" else (True,):
                out = torch.empty(256, dtype=dtype, device=DEVICE)
                _convert_kernel[(1,)](q, out, MAGIC=magic)
                assert torch.equal(out.float(), q.float()), (dtype, magic)

    def test_word_conversion_is_exact(self):
        # every int8 value, four to an int32 word, by shifts and masks (the interpreter) or prmt (the GPU)
        q = torch.arange(-128, 128, dtype=torch.int8, device=DEVICE)
        for asm in (False, True) if DEVICE == "cuda" else (False,):
            out = torch.empty(256, dtype=torch.float32, device=DEVICE)
            _convert_words_kernel[(1,)](q.view(torch.int32), out, ASM=asm)
            assert torch.equal(out, q.float()), asm

    def test_word_kind_runs_gemv_once_where_words_cannot_serve(self):
        # K not a multiple of 4, a weight view at an odd offset, and "add_norm" (whose stored sum it does not write)
        from tnllm.kernels.triton_int8 import Config, _int8_linear, _launch_config, _reads_words

        x, w, s, b = _inputs(1, 45, 68, torch.float32, bias=True)
        cfg = Config(1, 16, 32, num_stages=1, kind="gemv_word")
        assert _reads_words(w, "mul") and not _reads_words(w, "add_norm")
        odd = w.flatten()[1:1 + 45 * 64].view(45, 64)  # rows of 64 at byte offset 1
        assert not _reads_words(w[:, :67], "none") and not _reads_words(odd, "none")
        assert _launch_config(cfg, 1, 45, 68, w, "add_norm", w.device).kind == "gemv_once"
        assert_close("odd offset", _oracle(x[:, :64], odd, s, b), _int8_linear(x[:, :64], odd, s, b, config=cfg))

    def test_chosen_kind_runs(self, monkeypatch):
        # choose_config keeps a CONFIGS row's kind under the interpreter (small tiles): each kind through the
        # public entry point, a shape class's own row over the "*" row
        from tnllm.kernels import triton_int8 as ti

        for kind in ("dot", "dot_t", "gemv", "gemv_once", "deq"):
            rows = dict(ti.CONFIGS)
            rows[(4, ti.shape_class(29, 37))] = ti.Config(2, 64, 256, SPLIT_K=4, kind=kind)
            monkeypatch.setattr(ti, "CONFIGS", rows)
            ti.choose_config.cache_clear()
            cfg = ti.choose_config(3, 29, 37, torch.device(DEVICE))
            assert cfg.kind == kind and (DEVICE == "cuda" or cfg.BK == 16)
            assert ti.choose_config(5, 29, 37, torch.device(DEVICE)).kind == ti.CONFIGS[(8, "*")].kind
            x, w, s, b = _inputs(3, 29, 37, torch.float32, bias=True)
            assert_close(kind, _oracle(x, w, s, b), ti.int8_linear_triton(x, w, s, b))
        ti.choose_config.cache_clear()

    def test_signature_matches_reference_twin(self):
        from tnllm.kernels.triton_int8 import int8_linear_triton

        def params(f):
            return [(p.name, p.kind, p.default) for p in inspect.signature(f).parameters.values()]

        assert params(int8_linear_triton) == params(ref.int8_linear)


def test_reference_matches_oracle():
    x, w, s, b = _inputs(4, 29, 37, torch.float32, bias=True, device="cpu")
    assert_close("reference", _oracle(x, w, s, b), ref.int8_linear(x, w, s, b))
    assert ref.int8_linear(x.double(), w, s.double(), b.double()).dtype == torch.float64


def test_config_table():
    pytest.importorskip("triton")
    from tnllm.kernels import triton_int8 as ti

    # the tnl-7b Linears (qkvu_proj, out_proj, l1/l2, packed l1|l2, l3, lm_head) each have a class of their own
    classes = {ti.shape_class(n, k) for n, k in ((16384, 4096), (4096, 4096), (11008, 4096), (22016, 4096),
                                                 (4096, 11008), (64000, 4096))}
    assert len(classes) == 6
    # tnl-1b's out_proj and l3 have classes of their own; without rows they take the tnl-7b shapes' (n4k)
    assert (ti.shape_class(2048, 2048), ti.shape_class(2048, 5632)) == ("n2k.k4k", "n2k.kbig")
    dev = torch.device("cpu")
    assert ti.choose_config(1, 2048, 5632, dev, int8=True) == ti.choose_config(1, 4096, 11008, dev, int8=True)
    assert ti.choose_config(1, 2048, 5632, dev, int8=False) != ti.choose_config(1, 4096, 11008, dev, int8=False)
    assert [ti.m_bucket(m) for m in (1, 2, 3, 16, 17, 512, 513, 4096)] == [1, 2, 4, 16, 32, 512, None, None]
    for bucket in ti.M_BUCKETS:  # every bucket has a fallback row
        assert (bucket, "*") in ti.CONFIGS
    for cfg in ti.CONFIGS.values():
        assert cfg.kind in ti.KINDS
        assert eval(ti.config_src(cfg), {"Config": ti.Config}) == cfg  # the sweep prints rows in this form
    cfg = ti.Config(4, 32, 512, SPLIT_K=2, num_warps=8, num_stages=1, kind="gemv", magic=True)
    assert ti.config_src(cfg) == 'Config(4, 32, 512, SPLIT_K=2, num_warps=8, num_stages=1, kind="gemv", magic=True)'


# A GPU script's CPU run in the interpreter: what CI can run of it. A GPU machine runs the script itself (and its
# Triton 3.6 interpreter cannot run the int8 kernel: "only 0-dimensional arrays can be converted").
interpreter_run_of_a_gpu_script = pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU machine runs the script")


@interpreter_run_of_a_gpu_script
def test_sweep_tiny_on_cpu(tmp_path):
    """bench/int8_sweep.py --tiny: every kind through the sweep in the interpreter; rows checked and timed,
    a best row per (shape, M), the table printed in CONFIGS' format; gzipped JSON as bench/results keeps it."""
    pytest.importorskip("triton")
    from tnllm.kernels import triton_int8 as ti

    out = tmp_path / "sweep.json.gz"
    run = subprocess.run([sys.executable, "bench/int8_sweep.py", "--tiny", "--out", str(out)], cwd=ROOT,
                         capture_output=True, text=True, timeout=600, env={**os.environ, "TRITON_INTERPRET": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    data = json.loads(gzip.decompress(out.read_bytes()))
    assert not data["notes"] and not any(data["skipped"].values())
    rows = data["rows"]
    assert {r["shape"] for r in rows} == {"square", "odd"} and {r["M"] for r in rows} == {1, 3, 40}
    assert {r["kind"] for r in rows if r["method"] == "candidate"} == set(ti.KINDS)
    assert not [r for r in rows if "error" in r or not r["ok"]]
    assert all(r["us"] > 0 and r["max_rel_err"] < 1e-2 for r in rows if r["method"] != "bf16")
    assert len(data["best"]) == 6
    table = eval("{\n" + "\n".join(data["table"][1:]) + "\n}", {"Config": ti.Config})  # the CONFIGS format
    assert set(table) >= {(1, "*"), (4, "*"), (64, "*")} and all(isinstance(c, ti.Config) for c in table.values())
    assert data["table"][0] in run.stdout


def test_bad_input_errors():
    pytest.importorskip("triton")
    from tnllm.kernels.triton_int8 import int8_linear_triton

    x, w, s, b = _inputs(2, 29, 37, torch.float32, bias=True, device="cpu")
    for impl in (ref.int8_linear, int8_linear_triton):
        with pytest.raises(ValueError, match="equal K"):
            impl(x[:, :36], w, s, b)
        with pytest.raises(TypeError, match="weight must be int8"):
            impl(x, w.float(), s, b)
        with pytest.raises(TypeError, match="floating point"):
            impl(x.to(torch.int32), w, s, b)
        with pytest.raises(ValueError, match=r"scales and bias must be \[N\]=\[29\]"):
            impl(x, w, s[:28], b)
        with pytest.raises(ValueError, match=r"bias \(30,\)"):
            impl(x, w, s, torch.zeros(30))
    with pytest.raises(TypeError, match="supports x in"):
        int8_linear_triton(x.double(), w, s, b)


@requires_cuda
@pytest.mark.parametrize("rows", [1, 16, 300])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
def test_cuda_int8_linear_matches_dequantised(rows, dtype):
    lin = nn.Linear(1000, 3000, bias=True).to(device="cuda", dtype=dtype)
    q = Int8Linear.from_float(lin)
    x = torch.randn(rows, 1000, device="cuda", dtype=dtype)
    with torch.no_grad():
        y = q(x)
    assert kernels.backend_for(x.device) == "triton" and y.dtype == dtype
    assert_close(f"cuda Int8Linear rows={rows}", _oracle(x, q.weight, q.scales, q.bias), y, rel=TOL[dtype])


@requires_cuda
def test_cuda_every_tile_is_right_and_deterministic():
    # a tile Triton miscompiles gives wrong sums that change from run to run (seen: [256, 128] tiles with the
    # weight as the left dot operand and 3+ stages, triton 3.6); K a multiple of every BK: unmasked loads
    from tnllm.kernels.triton_int8 import CONFIGS, Config, _int8_linear

    extra = [Config(16, 64, 256, kind="dot_t"), Config(1, 32, 512, num_stages=1, kind="gemv", magic=True),
             Config(2, 16, 256, num_stages=1, kind="gemv_once"), Config(16, 64, 128, magic=True)]
    tiles = [(b, c) for (b, _), c in CONFIGS.items()] + [(16, c) for c in extra]
    for max_m, tile in tiles:
        for split in (1, 2):
            x, w, s, b = _inputs(min(max_m or 600, 600), 1000, 4096, torch.bfloat16, bias=True)
            cfg = tile._replace(SPLIT_K=split)
            y = _int8_linear(x, w, s, b, config=cfg)
            assert_close(f"{cfg}", _oracle(x, w, s, b), y, rel=TOL[torch.bfloat16])
            assert torch.equal(y, _int8_linear(x, w, s, b, config=cfg)), f"{cfg}: not run-to-run identical"


@requires_cuda
@pytest.mark.parametrize("rows", [1, 300])
def test_cuda_graph_capture(rows):
    x, w, s, b = _inputs(rows, 4096, 4096, torch.bfloat16, bias=True)
    kernels.int8_linear(x, w, s, b)  # compiles outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = kernels.int8_linear(x, w, s, b)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    assert_close("replayed", _oracle(x, w, s, b), y, rel=TOL[torch.bfloat16])


@interpreter_run_of_a_gpu_script
def test_gpu_benchmark_dry_run_on_cpu(tmp_path):
    """bench/quant_gpu.py --dry-run: every section's code path on the CPU (the int8 kernel in the interpreter)."""
    pytest.importorskip("triton")
    out = tmp_path / "quant.json"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, "bench/quant_gpu.py", "--dry-run", "--out", str(out)], cwd=ROOT,
                         capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    data = json.loads(out.read_text())
    assert not [n for n in data["notes"] if "failed" in n], data["notes"]
    int8 = [r for r in data["linear"] if r["method"] == "int8"]
    assert len(int8) == 5 and max(r["max_rel_err"] for r in int8) < 1e-2  # 5 shapes; bf16 output rounding
    methods = ("float", "int8", "bnb_int8") if bnb.available() else ("float", "int8")
    assert {(r["method"], r["batch"]) for r in data["model"]} == {(m, b) for m in methods for b in (1, 2)}
    assert all(r["decode_ms_per_token"] > 0 and r["weight_gib"] > 0 for r in data["model"])
    assert [r["method"] for r in data["prefill"]] == list(methods) and data["prefill"][1]["load_s"] > 0
    loads = {r["method"]: r for r in data["load"]}
    assert set(loads) == {"bf16", *methods[1:]} and all(r["load_s"] > 0 and r["peak_host_mb"] > 0
                                                      for r in loads.values())
    assert loads["int8"]["weight_gib"] < loads["bf16"]["weight_gib"]  # int8 decoder Linears
