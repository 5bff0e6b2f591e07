"""The bundled model: files match the manifest, models load through the normal loaders, figures reproduce."""

import json
from pathlib import Path

import pytest
import torch

from tnllm import load_model, load_tokenizer
from tnllm.baseline import load_llama
from tnllm.checkpoint import sha256_file
from tnllm.engine import single_reply
from tnllm.sampling import SamplingParams
from tnllm.train import dialogue_loss, read_dialogues

ASSETS = Path(__file__).resolve().parents[1] / "assets"
CARD = json.loads((ASSETS / "model_card.json").read_text())


def test_shipped_files_match_manifest():
    manifest = json.loads((ASSETS / "manifest.sha256.json").read_text())
    shipped = {str(p.relative_to(ASSETS)) for p in ASSETS.rglob("*") if p.is_file()}
    assert shipped - {"manifest.sha256.json"} == set(manifest)
    for name, digest in manifest.items():
        assert sha256_file(ASSETS / name) == digest, name
    total = sum((ASSETS / n).stat().st_size for n in shipped)
    assert total < 64 * 2**20


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(ASSETS / "tokenizer.model")


@pytest.fixture(scope="module")
def tnl():
    return load_model(ASSETS / "tnl")


def test_tnl_val_loss_matches_card(tnl, tokenizer):
    """Val loss on the fixed 20-dialogue slice, on this CPU, within 2% of the README / card figure."""
    assert tnl.config.vocab_size == tokenizer.vocab_size
    loss = dialogue_loss(tnl, tokenizer, read_dialogues(ASSETS / "val_slice.jsonl"))
    expected = CARD["models"]["tnl"]["val_slice_loss_cpu"]
    assert abs(loss - expected) <= 0.02 * expected, (loss, expected)


def test_tnl_greedy_reply_is_stable(tnl, tokenizer):
    sample = next(s for s in CARD["samples"] if s["mode"] == "greedy")
    reply = single_reply(tnl, tokenizer, sample["prompt"], SamplingParams(temperature=0, max_new_tokens=40)).text
    assert reply == sample["reply"]


def test_baseline_loads_and_runs(tokenizer):
    llama = load_llama(ASSETS / "llama")
    assert llama.config.vocab_size == tokenizer.vocab_size
    assert llama.config.hidden_size == CARD["config"]["dim"]
    ids = torch.tensor([tokenizer.chat_ids([("human", "hi! how are you?")])])
    with torch.no_grad():
        logits = llama(ids).logits
    assert logits.shape == (1, ids.shape[1], tokenizer.vocab_size) and torch.isfinite(logits).all()
