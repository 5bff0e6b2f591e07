"""Toy-size training on CPU: loss goes down for both architectures, artefacts load through the normal paths."""

import json

import pytest

from tnllm import load_model, load_tokenizer
from tnllm.train import EVAL_SLICE, TrainConfig, dialogue_loss, read_dialogues, train

DIALOGUES = [
    [{"role": "human", "text": "hi there"}, {"role": "assistant", "text": "hello! how are you?"}],
    [{"role": "human", "text": "how are you doing today?"}, {"role": "assistant", "text": "i am fine, thanks"},
     {"role": "human", "text": "great"}, {"role": "assistant", "text": "what about you?"}],
    [{"role": "human", "text": "tell me about the fox"}, {"role": "assistant", "text": "the quick brown fox jumps"}],
]


@pytest.fixture
def toy_data(tmp_path):
    for split, n in (("train", 40), ("val", 8)):
        with open(tmp_path / f"{split}.jsonl", "w") as f:
            for i in range(n):
                f.write(json.dumps({"id": f"{split}{i}", "turns": DIALOGUES[i % 3]}) + "\n")
    return tmp_path


@pytest.mark.parametrize("arch", ["tnl", "llama"])
def test_toy_training_reduces_loss(toy_data, tok_file, tmp_path, arch):
    cfg = TrainConfig(arch=arch, data=str(toy_data), tokenizer=str(tok_file), out=str(tmp_path / arch),
                      dim=64, layers=2, heads=2, glu=128, seq_len=32, batch_size=4, epochs=3, lr=1e-2,
                      warmup_steps=3, device="cpu", log_every=1, warmup_excluded_steps=0)
    summary = train(cfg)
    log = [json.loads(line) for line in open(tmp_path / arch / "train_log.jsonl")]
    losses = [r["loss"] for r in log if "loss" in r]
    assert losses[-1] < 0.6 * losses[0]
    assert summary["epochs"][-1]["val_loss"] < summary["epochs"][0]["val_loss"]
    assert summary["train_tokens_per_s"] > 0 and summary["tokens_seen"] > 0
    assert (tmp_path / arch / "model" / "config.json").is_file()
    if arch == "tnl":  # the shipped model loads through the normal loader and reproduces the summary figure
        model = load_model(tmp_path / arch / "model")
        val = read_dialogues(toy_data / "val.jsonl")[:EVAL_SLICE]
        loss = dialogue_loss(model, load_tokenizer(tok_file), val)
        assert abs(loss - summary["val_slice_loss"]) < 1e-4 * summary["val_slice_loss"]
