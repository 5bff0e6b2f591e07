"""Checkpoint loading/saving in the official layout, and every loading error path."""

import json

import pytest
import torch
from safetensors.torch import save_file

from tests.conftest import assert_close
from tnllm import CheckpointError, TNLConfig, TransNormerLLM, load_model, save_model
from tnllm.checkpoint import (
    MANIFEST_FILE,
    default_dtype,
    dtype_name,
    parse_dtype,
    resolve,
    weight_files,
    write_manifest,
)

IDS = torch.randint(0, 256, (2, 21), generator=torch.Generator().manual_seed(1))


@pytest.fixture
def model():
    return TransNormerLLM(TNLConfig.from_name("tiny")).eval()


def official_state_dict(model):
    """What the official checkpoints hold: bf16 tensors, both tied keys present."""
    return {k: v.detach().to(torch.bfloat16).clone() for k, v in model.state_dict().items()}


def test_safetensors_round_trip(model, tmp_path):
    save_model(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    loaded = load_model(tmp_path)
    assert not loaded.training
    assert torch.equal(loaded(IDS), model(IDS))
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight  # tied after loading


def test_sharded_safetensors_round_trip(model, tmp_path):
    save_model(model, tmp_path, max_shard_bytes=40_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and all((tmp_path / s).is_file() for s in shards)
    assert "lm_head.weight" not in index["weight_map"]
    assert torch.equal(load_model(tmp_path)(IDS), model(IDS))


@pytest.mark.parametrize("dtype", ["bf16", "fp16", torch.float32])
def test_dtype_choice(model, tmp_path, dtype):
    save_model(model, tmp_path)
    loaded = load_model(tmp_path, dtype=dtype)
    expected = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(dtype, torch.float32)
    assert loaded.lm_head.weight.dtype == expected and loaded.log_decay.dtype == torch.float32
    assert_close("logits", model(IDS), loaded(IDS).float(), rel=5e-2)


def test_official_bin_single_and_sharded(model, tmp_path):
    sd = official_state_dict(model)
    model.config.save(tmp_path / "config.json")
    torch.save(sd, tmp_path / "pytorch_model.bin")
    expected = load_model(tmp_path)(IDS)
    bf16_model = TransNormerLLM(model.config).eval()
    bf16_model.load_state_dict({k: v.float() for k, v in sd.items()})
    assert torch.equal(expected, bf16_model(IDS))

    sharded = tmp_path / "sharded"
    sharded.mkdir()
    model.config.save(sharded / "config.json")
    keys = list(sd)
    halves = {"pytorch_model-00001-of-00002.bin": keys[: len(keys) // 2],
              "pytorch_model-00002-of-00002.bin": keys[len(keys) // 2:]}
    weight_map = {}
    for name, part in halves.items():
        torch.save({k: sd[k] for k in part}, sharded / name)
        weight_map.update(dict.fromkeys(part, name))
    (sharded / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    torch.save({"stale": torch.zeros(1)}, sharded / "pytorch_model-old-shard.bin")  # not in the index: ignored
    assert torch.equal(load_model(sharded)(IDS), expected)


@pytest.mark.parametrize("keep", ["model.embed_tokens.weight", "lm_head.weight"])
def test_either_tied_key_accepted(model, tmp_path, keep):
    sd = {k: v for k, v in model.state_dict().items()
          if k not in ("model.embed_tokens.weight", "lm_head.weight") or k == keep}
    model.config.save(tmp_path / "config.json")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "model.safetensors"))
    assert torch.equal(load_model(tmp_path)(IDS), model(IDS))


def test_untied_model_round_trip(tmp_path):
    model = TransNormerLLM(TNLConfig.from_name("tiny", tie_word_embeddings=False)).eval()
    save_model(model, tmp_path)
    loaded = load_model(tmp_path)
    assert loaded.lm_head.weight is not loaded.model.embed_tokens.weight
    assert torch.equal(loaded(IDS), model(IDS))


def test_unknown_config_keys_survive_save(model, tmp_path):
    model.config.extra["rope_note"] = "kept"
    save_model(model, tmp_path)
    assert load_model(tmp_path).config.extra == {"rope_note": "kept"}


# -- error paths ---------------------------------------------------------------------------------
def _write(tmp_path, model, state):
    model.config.save(tmp_path / "config.json")
    save_file({k: v.clone() for k, v in state.items()}, str(tmp_path / "model.safetensors"))


def test_missing_unexpected_and_misshaped_keys_in_one_error(model, tmp_path):
    sd = dict(model.state_dict())
    del sd["model.layers.1.channel_mixer.l2.weight"]
    sd["model.layers.9.extra.weight"] = torch.zeros(2)
    sd["model.layers.0.token_mixer.out_proj.weight"] = torch.zeros(64, 32)
    _write(tmp_path, model, sd)
    with pytest.raises(CheckpointError) as err:
        load_model(tmp_path)
    msg = str(err.value)
    assert "missing keys (1): model.layers.1.channel_mixer.l2.weight" in msg
    assert "unexpected keys (1): model.layers.9.extra.weight" in msg
    assert "model.layers.0.token_mixer.out_proj.weight: checkpoint [64, 32] vs model [64, 64]" in msg


def test_config_that_does_not_match_weights(model, tmp_path):
    save_model(model, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["linear_use_lrpe_list"] = [0, 0, 0]  # weights hold lrpe.theta for layers 0 and 2
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="unexpected keys \\(2\\).*lrpe.theta"):
        load_model(tmp_path)


def test_non_float_tensor_rejected(model, tmp_path):
    sd = dict(model.state_dict())
    sd["model.layers.0.channel_mixer.l1.weight"] = torch.zeros(128, 64, dtype=torch.int32)
    _write(tmp_path, model, sd)
    with pytest.raises(CheckpointError, match="non-float tensors \\(1\\): model.layers.0.channel_mixer.l1"):
        load_model(tmp_path)


def test_truncated_safetensors(model, tmp_path):
    save_model(model, tmp_path)
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_model(tmp_path)


def test_garbage_header(model, tmp_path):
    save_model(model, tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match="corrupted safetensors file model.safetensors"):
        load_model(tmp_path)


def test_pickle_with_code_is_refused(model, tmp_path):
    model.config.save(tmp_path / "config.json")

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="weights_only=True"):
        load_model(tmp_path)


def test_flipped_byte_caught_by_manifest(model, tmp_path):
    save_model(model, tmp_path, manifest=True)
    assert json.loads((tmp_path / MANIFEST_FILE).read_text()).keys() == {"config.json", "model.safetensors"}
    load_model(tmp_path)
    data = bytearray((tmp_path / "model.safetensors").read_bytes())
    data[-5] ^= 0x01  # inside tensor data: safetensors itself cannot notice
    (tmp_path / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model.safetensors is corrupted: SHA-256"):
        load_model(tmp_path)
    write_manifest(tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json is listed"):
        load_model(tmp_path)


def test_missing_pieces(model, tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_model(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="not found"):
        load_model("./relative/missing")  # looks like a path: never sent to the Hub
    save_model(model, tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights found"):
        load_model(tmp_path)
    save_model(model, tmp_path, max_shard_bytes=40_000)
    next(tmp_path.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(CheckpointError, match="named by the index is missing"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot read config"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"decoder_embed_dim": 60, "decoder_attention_heads": 7,
                                                      "hidden_dim": 60, "decoder_layers": 2}))
    with pytest.raises(ValueError, match="invalid config .*not divisible"):
        load_model(tmp_path)


def test_bad_dtype_rejected(model, tmp_path):
    save_model(model, tmp_path)
    with pytest.raises(ValueError, match="dtype"):
        load_model(tmp_path, dtype="int8")


def test_weight_file_selection():
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    listing = ["config.json", "model.safetensors.index.json", *index["weight_map"].values(),
               "pytorch_model.bin", "pytorch_model-old.bin"]
    assert weight_files(listing, lambda name: index) == (
        "model.safetensors.index.json", ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"])
    assert weight_files(["pytorch_model.bin", "config.json"], None) == (None, ["pytorch_model.bin"])
    with pytest.raises(CheckpointError, match="weight_map"):
        weight_files(["pytorch_model.bin.index.json"], lambda name: {})


def test_hub_errors_are_clear(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="could not fetch 'OpenNLPLab/TransNormerLLM-1B'"):
        resolve("OpenNLPLab/TransNormerLLM-1B")


def test_default_dtype_is_bf16_on_cuda_and_fp32_elsewhere():
    assert default_dtype("cuda") is torch.bfloat16 and default_dtype(torch.device("cuda", 1)) is torch.bfloat16
    assert default_dtype("cpu") is torch.float32 and default_dtype(torch.device("meta")) is torch.float32


@pytest.mark.parametrize("name", ["fp32", "bf16", "fp16"])
def test_dtype_name_inverts_parse_dtype(name):
    assert dtype_name(parse_dtype(name)) == name and dtype_name(name.upper()) == name
    assert dtype_name({"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[name]) == name
