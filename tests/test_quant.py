"""8-bit weights (quant/): accuracy vs float, recurrent decoding, streaming memory, ordering guard, checks.

Measured on the CPU (tiny config below, 2 x 41 tokens): logits rel-L2 vs float 0.0057 (int8) and
0.0080 (bnb_int8), top-1 agreement 100%. Bounds asserted: rel-L2 <= 0.02, top-1 >= 97%.
"""

import math
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from tests.conftest import ROOT, assert_close, import_bench_script, pack_glus, requires_cuda
from tnllm import CheckpointError, TNLConfig, TransNormerLLM, load_model, quant, save_model
from tnllm.bench import adapter_for
from tnllm.checkpoint import MANIFEST_FILE, check_weights, open_checkpoint
from tnllm.linear import Linear
from tnllm.quant import bnb
from tnllm.quant.common import QuantOrderError, target_linears
from tnllm.quant.int8 import PACKED_MM_MAX_ROWS, Int8Linear
from tnllm.quant.loader import stream_weights

METHODS = ["int8", pytest.param("bnb_int8", marks=pytest.mark.skipif(not bnb.available(), reason="no bnb"))]
# Dims multiples of 64 (bitsandbytes CPU kernels; docs/quantization.md#bitsandbytes-on-the-cpu); LRPE on layers 0 and 2.
CONFIG = TNLConfig.from_name("tiny", dim=128, hidden_dim=128, glu_dim=256)
IDS = torch.randint(0, 256, (2, 41), generator=torch.Generator().manual_seed(1))
QUANTISED = {"qkvu_proj", "out_proj", "l1", "l2", "l3"}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(float model, checkpoint directory) shared by the module's tests."""
    torch.manual_seed(0)
    model = TransNormerLLM(CONFIG).eval()
    directory = tmp_path_factory.mktemp("tiny")
    save_model(model, directory)
    return model, directory


def logits_error(ref: torch.Tensor, out: torch.Tensor) -> tuple[float, float]:
    """(rel-L2, top-1 agreement) of logits [B, T, V] against the float reference."""
    rel = ((out.double() - ref.double()).norm() / ref.double().norm()).item()
    return rel, (out.argmax(-1) == ref.argmax(-1)).float().mean().item()


@pytest.mark.parametrize("method", METHODS)
def test_quantize_keeps_biases(tmp_path, method):
    """Linears with biases: quantising a loaded model (whose swap copies placeholders, then sets each weight and
    bias) equals the streaming load, and the biases are the float ones."""
    torch.manual_seed(2)
    model = TransNormerLLM(CONFIG.replace(bias=True)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_()
    save_model(model, tmp_path)
    q = quant.quantize(load_model(tmp_path), method)
    with torch.no_grad():
        assert torch.equal(q(IDS), quant.load_quantized(tmp_path, method)(IDS))
    biases = {n: p for n, p in model.named_parameters() if n.endswith("bias")}
    state = q.state_dict()
    assert biases and all(torch.equal(p.float(), state[n].float()) for n, p in biases.items())


@pytest.mark.skipif(not bnb.available(), reason="no bnb")
def test_bnb_glus_stay_unpacked(saved):
    """The engine packs each GLU's l1 and l2 on CUDA (`GLU.pack`); LLM.int8 modules keep their int8 rows and scales
    on their Int8Params, which a concatenation would drop (every forward then failed), so they stay unpacked and
    the logits are those of the unpacked model."""
    q = quant.load_quantized(saved[1], "bnb_int8")
    with torch.no_grad():
        want = q(IDS)
        pack_glus(q)
        assert all(layer.channel_mixer._l12 is None for layer in q.model.layers)
        assert torch.equal(q(IDS), want)
    assert q.capturable is False  # the engine decodes it eagerly: its outlier columns are read on the host


@pytest.mark.parametrize("method", METHODS)
def test_logits_close_to_float(saved, method):
    model, directory = saved
    q = quant.load_quantized(directory, method)
    with torch.no_grad():
        rel, top1 = logits_error(model(IDS), q(IDS))
    print(f"{method}: logits rel-L2 {rel:.4f}, top-1 agreement {top1:.3f}")
    assert rel <= 0.02 and top1 >= 0.97
    layers = {n.rsplit(".", 1)[-1]: m for n, m in q.named_modules() if n.startswith("model.layers.")}
    assert all(layers[name].weight.dtype == torch.int8 for name in QUANTISED)
    if method == "int8":  # its own int8 copy of the tied matrix; the embedding stays float and unchanged
        assert type(q.lm_head) is Int8Linear and q.lm_head.weight.dtype == torch.int8
        assert torch.equal(q.model.embed_tokens.weight, model.model.embed_tokens.weight)
        q.to(torch.float32)  # moving the model must not re-tie a float matrix over the int8 head
        assert q.lm_head.weight.dtype == torch.int8
    else:  # bnb keeps the head float, tied to the embedding
        assert q.lm_head.weight is q.model.embed_tokens.weight and q.lm_head.weight.dtype == torch.float32
        assert type(q.lm_head) is Linear
    assert not q.training


def test_methods_agree_and_none_is_float(saved):
    model, directory = saved
    with torch.no_grad():
        ref = quant.load_quantized(directory, "int8")(IDS)  # the pure-torch oracle
        if bnb.available():
            assert_close("bnb vs int8 oracle", ref, quant.load_quantized(directory, "bnb_int8")(IDS), rel=0.02)
        assert torch.equal(quant.load_quantized(directory, "none")(IDS), model(IDS))


@pytest.mark.parametrize("method", METHODS)
def test_recurrent_decoding_matches_own_forward(saved, method):
    q = quant.load_quantized(saved[1], method)
    with torch.no_grad():
        full = q(IDS)
        state = q.allocate_state(batch_size=2)
        steps = [q(IDS[:, :17], state)] + [q(IDS[:, t:t + 1], state) for t in range(17, IDS.shape[1])]
    # Not 1e-5 as in float: the 8-bit matmuls round activations (bnb: int8; int8 on CPU: bf16 in the
    # packed decode-sized matmul, fp32 in the dequantised one the 82-row full forward takes), measured
    # 2.2e-3 for int8. A wrong state or position would be O(1).
    assert_close("prefill + decode vs full forward", full, torch.cat(steps, dim=1), rel=5e-3)


@pytest.mark.parametrize("method", METHODS)
def test_quantize_loaded_model_equals_streaming_load(saved, method):
    model, directory = saved
    q = quant.quantize(load_model(directory), method)
    with torch.no_grad():
        assert torch.equal(q(IDS), quant.load_quantized(directory, method)(IDS))
    with pytest.raises(QuantOrderError, match="already quantised"):
        quant.quantize(q, method)
    # the method travels with the model, so the latency tab and bench/decode.py can report it
    assert [adapter_for(m).quant for m in (q, quant.load_quantized(directory, method),
                                           quant.load_quantized(directory, "none"), load_model(directory))] == \
        [method, method, "none", "none"]


def test_bf16_int8(saved):
    model, directory = saved
    q = quant.load_quantized(directory, "int8", dtype="bf16")
    assert q.model.layers[0].token_mixer.qkvu_proj.scales.dtype == torch.bfloat16
    with torch.no_grad():
        rel, top1 = logits_error(model(IDS), q(IDS).float())
    assert rel <= 0.03 and top1 >= 0.95


@pytest.mark.parametrize("rows", [15, PACKED_MM_MAX_ROWS + 1], ids=["packed-mm", "dequantised"])
def test_int8_linear_matches_dequantised_weight(rows):
    lin = nn.Linear(192, 128)
    q = Int8Linear.from_float(lin)
    x = torch.randn(3, rows // 3 + 1, 192)
    w = q.weight.float() * q.scales[:, None]  # the dequantised weight
    assert (w - lin.weight).abs().max() <= q.scales.max() / 2 + 1e-7  # round-to-nearest
    with torch.no_grad():
        # packed: bf16 activations (0.4-0.5% error); dequantised: fp32 throughout
        assert_close("Int8Linear", nn.functional.linear(x, w, lin.bias), q(x),
                     rel=5e-3 if x.numel() // 192 <= PACKED_MM_MAX_ROWS else 1e-5)


# -- ordering guard: floats into already-quantised modules -------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_float_weights_into_quantised_model_raise(saved, method):
    model, directory = saved
    q = quant.load_quantized(directory, method)
    with pytest.raises(QuantOrderError, match="already-quantised"):
        q.load_state_dict(model.state_dict(), strict=False)
    # The streaming loader run again over the loaded model: its first 8-bit write is refused.
    _, _, files = open_checkpoint(directory)
    found = check_weights(model, directory, files)
    names = [n for n, m in q.named_modules() if n.rsplit(".", 1)[-1] in QUANTISED]
    with pytest.raises(QuantOrderError, match="already quantised"):
        stream_weights(q, directory, files, found, names, method, torch.float32, {"": "cpu"})


@pytest.mark.skipif(not bnb.available(), reason="no bnb")
def test_bnb_wrong_order_is_garbage_without_the_guard():
    """What the guard prevents: bitsandbytes itself accepts floats after quantisation (rel. err ~1)."""
    lin = nn.Linear(128, 128, bias=False)
    mod = bnb.linear_from_float(lin, "cpu")
    mod._load_state_dict_pre_hooks.clear()  # remove our guard to show the raw behaviour
    mod.load_state_dict(lin.state_dict(), strict=False)
    x = torch.randn(4, 128)
    with torch.no_grad():
        rel = ((mod(x) - lin(x)).norm() / lin(x).norm()).item()
    assert rel > 0.5


@pytest.mark.skipif(not bnb.available(), reason="no bnb")
def test_nf4_linear_holds_four_bit_blocks_and_tracks_the_float_layer():
    """The NF4 layer the benchmarks time: half a byte per weight, bias kept, output within 4-bit error of the float
    layer (about 0.1 relative on a random layer; int8 weight-only stays near 0.002)."""
    torch.manual_seed(0)
    lin = nn.Linear(256, 96, bias=True)
    mod = bnb.nf4_linear_from_float(lin, "cpu")
    assert mod.weight.dtype == torch.uint8 and mod.weight.numel() == 256 * 96 // 2
    x = torch.randn(3, 256)
    with torch.no_grad():
        ref, out = lin(x), mod(x)
    rel = ((out - ref).norm() / ref.norm()).item()
    assert 0.01 < rel < 0.2, rel
    assert torch.equal(mod.bias, lin.bias)


# -- checkpoint checks still apply -----------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_corrupted_or_mismatched_checkpoint_rejected(saved, method, tmp_path):
    model, _ = saved
    save_model(model, tmp_path, manifest=True)
    weights = tmp_path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupted"):
        quant.load_quantized(tmp_path, method)
    (tmp_path / MANIFEST_FILE).unlink()
    CONFIG.replace(glu_dim=320).save(tmp_path / "config.json")
    with pytest.raises(CheckpointError, match="shape mismatches"):
        quant.load_quantized(tmp_path, method)


@pytest.mark.parametrize("method", METHODS)
def test_sharded_and_lm_head_only_checkpoints(saved, method, tmp_path):
    model, directory = saved
    save_model(model, tmp_path / "sharded", max_shard_bytes=100_000)
    from safetensors.torch import load_file, save_file

    sd = load_file(directory / "model.safetensors")
    sd["lm_head.weight"] = sd.pop("model.embed_tokens.weight")  # tied matrix under the other name
    (tmp_path / "head").mkdir()
    CONFIG.save(tmp_path / "head" / "config.json")
    save_file(sd, tmp_path / "head" / "model.safetensors", metadata={"format": "pt"})
    ref = quant.load_quantized(directory, method)
    with torch.no_grad():
        for sub in ("sharded", "head"):
            q = quant.load_quantized(tmp_path / sub, method)
            if method == "int8":  # the int8 head is the quantised tied matrix, whichever key held it
                want = quant.int8.quantize_weight(model.model.embed_tokens.weight, torch.float32)
                assert torch.equal(q.lm_head.weight, want[0]) and torch.equal(q.lm_head.scales, want[1]), sub
                assert torch.equal(q.model.embed_tokens.weight, model.model.embed_tokens.weight), sub
            else:
                assert q.lm_head.weight is q.model.embed_tokens.weight
            assert torch.equal(q(IDS), ref(IDS)), sub


def test_auto_choice():
    """"auto": weight-only int8 on the CPU and on CUDA (both measured faster than bitsandbytes at decode sizes),
    each with its reason; another device type gets the CPU's choice."""
    assert quant.choose_method("cpu") == quant.choose_method("cuda") == quant.choose_method("meta") == "int8"
    assert "bitsandbytes" in quant.why_method("cuda") and quant.why_method("meta") == quant.why_method("cpu")
    with pytest.raises(ValueError, match="method must be one of"):
        quant.load_quantized("unused", "int4")


# -- peak memory of the streaming loader ------------------------------------------------------------
# Peak anonymous RSS (RssAnon, /proc/self/status) above a baseline taken after all imports, sampled
# every 0.5 ms from a thread while the loader runs in a fresh process. Anonymous memory is what torch
# tensors occupy; the safetensors mmap is file-backed and not counted (RLIMIT_DATA / VmData count
# that mapping in full, ru_maxrss counts its resident pages, tracemalloc sees no torch allocations).
# Sampling can miss a spike shorter than a sample, so the same probe on the float loader must see the
# whole float model: that shows the probe works.
LOADER = textwrap.dedent("""
    import sys, threading, time
    from tnllm import quant
    path, method = sys.argv[1], sys.argv[2]
    if method == "bnb_int8":
        quant.bnb._bnb()  # import bitsandbytes before the baseline: measure the loader, not the import

    def rss_anon():
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))

    base = peak = rss_anon()
    done = threading.Event()

    def poll():
        global peak
        while not done.is_set():
            peak = max(peak, rss_anon())
            time.sleep(0.0005)

    thread = threading.Thread(target=poll)
    thread.start()
    model = quant.load_quantized(path, method)
    done.set()
    thread.join()
    print(max(peak, rss_anon()) - base)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_streaming_peak_memory_near_int8_size(tmp_path):
    config = TNLConfig.from_name("tiny", vocab_size=256, dim=1024, hidden_dim=1024, glu_dim=2816, n_layers=8,
                                 n_heads=8, lrpe_layers=[1] + [0] * 7)
    model = TransNormerLLM(config)
    n_int8 = sum(m.weight.numel() for m in target_linears(model).values())
    float_bytes = 4 * model.num_parameters()  # 445 MB
    int8_bytes = n_int8 + 4 * (model.num_parameters() - n_int8)  # 112 MB
    save_model(model, tmp_path)
    del model

    def peak(method: str) -> int:
        res = subprocess.run([sys.executable, "-c", LOADER, str(tmp_path), method], cwd=ROOT,
                             capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr[-2000:]
        return int(res.stdout.split()[-1])

    # Measured (MiB): float 501, int8 209, bnb_int8 264-278; int8 model 107, float model 424.
    assert peak("none") > float_bytes
    for method in ("int8", "bnb_int8") if bnb.available() else ("int8",):
        measured = peak(method)
        print(f"{method}: peak {measured / 2**20:.0f} MiB (8-bit model {int8_bytes / 2**20:.0f} MiB)")
        assert measured < int8_bytes + 0.4 * float_bytes < 0.7 * float_bytes


# -- CUDA only (skipped on CPU machines) -------------------------------------------------------------
@requires_cuda
@pytest.mark.parametrize("method", METHODS)
def test_cuda_load_matches_cpu_oracle(saved, method):
    model, directory = saved
    q = quant.load_quantized(directory, method, dtype="fp16", device="cuda")
    assert q.model.layers[0].channel_mixer.l1.weight.device.type == "cuda"
    with torch.no_grad():
        rel, top1 = logits_error(model(IDS), q(IDS.cuda()).float().cpu())
        state = q.allocate_state(2)
        steps = [q(IDS[:, :17].cuda(), state)] + [q(IDS[:, t:t + 1].cuda(), state) for t in range(17, 41)]
        full = q(IDS.cuda())
    assert rel <= 0.03 and top1 >= 0.95
    assert_close("cuda decode vs forward", full.float(), torch.cat(steps, 1).float(), rel=1e-2)


@requires_cuda
@pytest.mark.parametrize("method", METHODS)
def test_cuda_device_map_auto(saved, method):
    model, directory = saved
    n = torch.cuda.device_count()
    # Force a split over every GPU: each may hold about one decoder layer.
    max_memory = {i: "300KB" for i in range(n)} if n > 1 else None
    q = quant.load_quantized(directory, method, dtype="fp16", device_map="auto", max_memory=max_memory)
    devices = {p.device for p in q.parameters()}
    assert all(d.type == "cuda" for d in devices) and (n == 1 or len(devices) > 1)
    with torch.no_grad():
        rel, top1 = logits_error(model(IDS), q(IDS.cuda()).float().cpu())
    assert rel <= 0.03 and top1 >= 0.95


@pytest.mark.parametrize("rows", [1, PACKED_MM_MAX_ROWS + 5])
def test_packed_int8_glu_equals_its_two_products(saved, rows):
    """`GLU.pack` on an int8 model: l1 and l2 become one Int8Linear of twice the outputs (their int8 weights,
    scales and views joined), with the logits of the two separate products, at decode and prefill sizes."""
    _, directory = saved
    q = quant.load_quantized(directory, "int8")
    ids = IDS[:1, :rows] if rows <= IDS.shape[1] else torch.randint(0, 256, (1, rows))
    with torch.no_grad():
        want = q(ids)
        pack_glus(q)
        packed = q.model.layers[0].channel_mixer._packed()
        assert type(packed) is Int8Linear and packed.weight.shape == (2 * CONFIG.glu_dim, CONFIG.dim)
        assert_close("packed int8 logits", want, q(ids), rel=1e-6)
        assert set(q.state_dict()) == set(quant.load_quantized(directory, "int8").state_dict())


def test_int8_keeps_the_bundled_models_validation_loss():
    """Weight-only int8 (and LLM.int8 where bitsandbytes imports) within +0.5 % of the float model's
    loss on the fixed validation slice (bench/quant_quality.py, the recorded CPU figures' code path)."""
    quality = import_bench_script("quant_quality")
    rows = {r["method"]: r for r in quality.val_losses(ROOT / "assets" / "tnl", "cpu", torch.float32)}
    assert rows["none"]["rel_change"] == 0.0 and math.isfinite(rows["none"]["loss"])
    for method in set(rows) - {"none"}:
        assert abs(rows[method]["rel_change"]) <= quality.GOAL, rows[method]
