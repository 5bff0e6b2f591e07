"""Shared test helpers: seeding, tolerance helper, markers for CUDA/Triton-only cases."""

from __future__ import annotations

import importlib
import io
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from types import ModuleType

import pytest
import sentencepiece as spm
import torch
from hypothesis import settings

# Property tests draw the same examples on every run: CI must not pass or fail by luck. Explore new
# examples locally with HYPOTHESIS_PROFILE=explore.
settings.register_profile("ci", derandomize=True, database=None)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

ROOT = Path(__file__).resolve().parents[1]  # on sys.path through pytest's `pythonpath` (pyproject.toml)


def import_bench_script(name: str) -> ModuleType:
    """bench/<name>.py as a module. bench/ is a folder of scripts that import their siblings by name (as
    `python bench/<name>.py` finds them), so bench/ goes on sys.path, after everything else."""
    folder = str(ROOT / "bench")
    if folder not in sys.path:
        sys.path.append(folder)
    return importlib.import_module(name)


def pytest_sessionstart(session):
    """Stop at once, saying why, unless `tnllm` is installed from this checkout: the tests that run bench/ and
    scripts/ as scripts (a subprocess each) import the installed package, not the repository root."""
    probe = "import importlib.util; print(importlib.util.find_spec('tnllm').origin)"
    found = subprocess.run([sys.executable, "-c", probe], cwd=Path(tempfile.gettempdir()), capture_output=True,
                           text=True).stdout.strip()
    if not found or Path(found).resolve() != ROOT / "tnllm" / "__init__.py":
        pytest.exit(f"tnllm must be installed from {ROOT} (found: {found or 'none'}): run `pip install -e . "
                    "--no-deps` there (README)", returncode=4)

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
requires_triton_interpret = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
    reason="Triton kernels need CUDA or TRITON_INTERPRET=1",
)
# For tests that run the Triton path on CPU tensors: only the interpreter can (a GPU machine without it cannot).
requires_interpreter = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                          reason="runs Triton on CPU tensors: needs TRITON_INTERPRET=1")


def assert_close(name: str, ref: torch.Tensor, out: torch.Tensor, *, rel: float = 1e-5, atol: float = 0.0):
    """Assert rel-L2 error ||out - ref|| / ||ref|| <= rel (or max-abs <= atol); prints both on failure."""
    assert ref.shape == out.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values"
    diff = (out.double() - ref.double())
    max_abs = diff.abs().max().item() if diff.numel() else 0.0
    denom = ref.double().norm().item()
    rel_err = diff.norm().item() / denom if denom > 0 else diff.norm().item()
    ok = rel_err <= rel or (atol > 0 and max_abs <= atol)
    assert ok, f"{name}: rel-L2 {rel_err:.3e} (limit {rel:.1e}), max-abs {max_abs:.3e}"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


TOKENIZER_TEXT = [
    "Human:\nhow are you doing today?\nAssistant:\ni am fine, thanks for asking!",
    "the quick brown fox jumps over the lazy dog 0123456789",
    "¿Dónde está la biblioteca? 图书馆在哪里？ emoji 🙂 tabs\tand\nnewlines",
] * 50


@pytest.fixture(scope="session")
def tok_file(tmp_path_factory):
    """A small Baichuan-layout SentencePiece model (<unk>=0, <s>=1, </s>=2, byte fallback), 400 pieces."""
    out = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TOKENIZER_TEXT), model_writer=buf, vocab_size=400, model_type="bpe",
        byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=1.0,
        remove_extra_whitespaces=False, normalization_rule_name="identity", minloglevel=2,
    )
    out.write_bytes(buf.getvalue())
    return out


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def untied_tiny_model():
    """The tiny preset over a 400-piece vocabulary, untied: a random tied model just predicts its last input
    token again (the tied embedding dominates), which would make generation tests trivial."""
    from tnllm import TNLConfig, TransNormerLLM

    torch.manual_seed(0)
    return TransNormerLLM(TNLConfig.from_name("tiny", vocab_size=400, tie_word_embeddings=False)).eval()


@pytest.fixture(scope="module")
def tok(tok_file):
    """A Tokenizer over `tok_file`."""
    from tnllm.tokenizer import Tokenizer

    return Tokenizer(tok_file)


# The Gradio app's handlers over the tiny preset (random weights, float), one runtime per test module.
@pytest.fixture(scope="module")
def runtime():
    from tnllm.webui.runtime import load_runtime

    runtime = load_runtime("preset:tiny", "matched", int8=False, device="cpu", max_context=4096)
    yield runtime
    runtime.engine.shutdown()


@pytest.fixture
def chat(runtime):
    """The chat handler with its own session store (`chat.store`; its sessions are closed afterwards)."""
    from tnllm.webui.chat import SessionStore, make_chat_fn

    store = SessionStore(runtime)
    fn = make_chat_fn(runtime, store)
    fn.store = store
    yield fn
    store.close()


def pack_glus(model) -> None:
    """`GLU.pack` on every layer: what `pack_weights` does on CUDA, run on any device."""
    for layer in model.model.layers:
        layer.channel_mixer.pack()
