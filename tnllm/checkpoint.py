"""Load and save TransNormerLLM checkpoints in the official layout.

Reads a local directory or a Hugging Face Hub repo id holding `config.json` plus weights as
`model.safetensors`, sharded `model-*.safetensors` + `model.safetensors.index.json`, or the official
pickled `pytorch_model*.bin` (+ index), the latter only through `torch.load(weights_only=True)`.
The model is built on the meta device and filled tensor by tensor, so peak memory stays near one
copy of the model. Every missing, unexpected or mis-shaped key is reported in one error.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from tnllm.config import TNLConfig
from tnllm.model import TransNormerLLM

CONFIG_FILE = "config.json"
MANIFEST_FILE = "manifest.sha256.json"
SAFE_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")
TIED_KEYS = ("model.embed_tokens.weight", "lm_head.weight")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
           "fp16": torch.float16, "float16": torch.float16}
_SHORT_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and the problem."""


def parse_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """torch dtype from a dtype or one of 'fp32', 'bf16', 'fp16' (and their long names)."""
    if isinstance(dtype, torch.dtype) and dtype in _DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.lower() in _DTYPES:
        return _DTYPES[dtype.lower()]
    raise ValueError(f"dtype must be one of fp32 / bf16 / fp16, got {dtype!r}")


def dtype_name(dtype: torch.dtype | str) -> str:
    """The short name ('fp32', 'bf16' or 'fp16') of anything `parse_dtype` reads, as results files record it."""
    return _SHORT_NAMES[parse_dtype(dtype)]


def default_dtype(device: torch.device | str) -> torch.dtype:
    """The weights' dtype when none is asked for: bf16 on CUDA, fp32 on any other device.

    On a GPU, bf16 halves the bytes every decode step reads (decode is bandwidth-bound) and runs matmuls on the
    tensor cores, with fp32 kept where it matters (state, norms, softmax). CPUs often run bf16 matmuls slower
    than fp32 (bench/quant_cpu.py times both) and have memory to spare for a small model, so they keep fp32,
    the precision the numerical checks compare against."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


# -- locating files -----------------------------------------------------------------------------
def weight_files(listing: list[str], read_index) -> tuple[str | None, list[str]]:
    """(index file or None, weight files to read) of a checkpoint, given its file names.

    Prefers safetensors over pickle; `read_index(name)` returns the parsed JSON of an index file.
    Only the shards the index names are used (old repos also hold unrelated shard sets).
    """
    names = set(listing)
    for index, single in ((SAFE_INDEX, "model.safetensors"), (BIN_INDEX, "pytorch_model.bin")):
        if index in names:
            weight_map = read_index(index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{index} has no 'weight_map'")
            return index, sorted(set(weight_map.values()))
        if single in names:
            return None, [single]
    raise CheckpointError(
        f"no weights found (looked for {SAFE_INDEX}, model.safetensors, {BIN_INDEX}, pytorch_model.bin) "
        f"among {sorted(names)}"
    )


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from exc


def resolve(path_or_repo_id: str | Path, *, revision: str | None = None, files: tuple[str, ...] = ()) -> Path:
    """A local directory for `path_or_repo_id`, downloading from the Hub when it is a repo id.

    Downloads only config.json, tokenizer files and the weight files that will be read
    (with huggingface_hub's progress bars). `files` limits the download to those names instead.
    """
    path = Path(path_or_repo_id).expanduser()
    if path.is_dir():
        return path
    text = str(path_or_repo_id)
    if path.exists() or not _REPO_ID.match(text) or text.startswith((".", "/", "~")):
        raise FileNotFoundError(f"checkpoint directory not found: {text}")
    from huggingface_hub import HfApi, hf_hub_download, snapshot_download

    try:
        if not files:
            listing = HfApi().list_repo_files(text, revision=revision)
            index, shards = weight_files(
                listing, lambda name: _read_json(Path(hf_hub_download(text, name, revision=revision))))
            files = (CONFIG_FILE, *TOKENIZER_FILES, *([index] if index else []), *shards)
        return Path(snapshot_download(text, revision=revision, allow_patterns=list(files)))
    except CheckpointError:
        raise
    except Exception as exc:  # network, auth, missing repo: one clear message
        raise FileNotFoundError(f"could not fetch {text!r} from the Hugging Face Hub: {exc}") from exc


# -- reading tensors ----------------------------------------------------------------------------
def _iter_file(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs of one weight file, one tensor at a time."""
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        except SafetensorError as exc:
            raise CheckpointError(f"corrupted safetensors file {path.name}: {exc}") from exc
    elif path.suffix == ".bin":
        try:
            # Never unpickle arbitrary objects: weights_only refuses anything but tensors/containers.
            state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:
            raise CheckpointError(f"cannot load {path.name} (weights_only=True): {exc}") from exc
        if not isinstance(state, dict):
            raise CheckpointError(f"{path.name} does not hold a state dict")
        yield from state.items()
    else:
        raise CheckpointError(f"unsupported weight file {path.name}")


def _file_keys(path: Path) -> dict[str, tuple[tuple[int, ...], bool]]:
    """Tensor names -> (shape, is floating point) of a weight file, without reading safetensors data."""
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as f:
                slices = {n: f.get_slice(n) for n in f.keys()}
                return {n: (tuple(s.get_shape()), s.get_dtype().startswith(("F", "BF"))) for n, s in slices.items()}
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"corrupted safetensors file {path.name}: {exc}") from exc
    return {n: (tuple(t.shape), t.is_floating_point()) for n, t in _iter_file(path)}


def _check_keys(model: TransNormerLLM, found: dict[str, tuple], where: str,
                origin: dict[str, str] | None = None) -> None:
    origin = origin or {}
    expected = {n: tuple(t.shape) for n, t in model.state_dict(keep_vars=True).items()}
    tied = model.config.tie_word_embeddings
    missing = [n for n in expected if n not in found and not (tied and n in TIED_KEYS
                                                               and any(k in found for k in TIED_KEYS))]
    unexpected = sorted(set(found) - set(expected))
    mismatched = [f"{n}: checkpoint {list(found[n][0])} vs model {list(s)}"
                  + (f" (in {origin[n]}, model from {CONFIG_FILE})" if n in origin else "")
                  for n, s in expected.items() if n in found and found[n][0] != s]
    not_float = [n for n, (_, is_float) in found.items() if n in expected and not is_float]
    if missing or unexpected or mismatched or not_float:
        parts = [f"{label} ({len(items)}): {', '.join(items[:12])}{' ...' if len(items) > 12 else ''}"
                 for label, items in (("missing keys", missing), ("unexpected keys", unexpected),
                                      ("shape mismatches", mismatched), ("non-float tensors", not_float))
                 if items]
        raise CheckpointError(f"checkpoint {where} does not match its config: " + "; ".join(parts))


def check_weights(model: TransNormerLLM, directory: Path, files: list[str]) -> dict[str, tuple]:
    """Check every key, shape and dtype of `files` against `model`; returns name -> (shape, is_float)."""
    found: dict[str, tuple] = {}
    origin: dict[str, str] = {}
    for name in files:
        path = directory / name
        if not path.is_file():
            raise CheckpointError(f"weight file {path} named by the index is missing")
        keys = _file_keys(path)
        found.update(keys)
        origin.update(dict.fromkeys(keys, name))
    _check_keys(model, found, str(directory), origin)
    return found


def load_weights(model: TransNormerLLM, directory: Path, files: list[str]) -> None:
    """Check every key and shape against the model, then copy tensors in (dtype converted)."""
    found = check_weights(model, directory, files)
    params = model.state_dict(keep_vars=True)
    # A tied checkpoint may store the shared matrix under either name, or both (the 7B index lists
    # both): read the embedding when present so the result never depends on file order.
    skip = {"lm_head.weight"} if model.config.tie_word_embeddings and TIED_KEYS[0] in found else set()
    with torch.no_grad():
        for name in files:
            for key, tensor in _iter_file(directory / name):
                if key not in skip:
                    params[key].copy_(tensor)


# -- manifest -----------------------------------------------------------------------------------
def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(directory: str | Path) -> Path:
    """Record the SHA-256 of every file in `directory` (except the manifest) in manifest.sha256.json."""
    directory = Path(directory)
    files = sorted(p.name for p in directory.iterdir() if p.is_file() and p.name != MANIFEST_FILE)
    out = directory / MANIFEST_FILE
    out.write_text(json.dumps({n: sha256_file(directory / n) for n in files}, indent=2) + "\n")
    return out


def verify_manifest(directory: str | Path) -> None:
    """If `directory` holds a manifest, check every listed file's SHA-256 (flipped bytes, truncation)."""
    directory = Path(directory)
    manifest = directory / MANIFEST_FILE
    if not manifest.is_file():
        return
    for name, expected in _read_json(manifest).items():
        path = directory / name
        if not path.is_file():
            raise CheckpointError(f"{path} is listed in {MANIFEST_FILE} but missing")
        actual = sha256_file(path)
        if actual != expected:
            raise CheckpointError(f"{path} is corrupted: SHA-256 {actual} != manifest {expected}")


# -- public entry points ------------------------------------------------------------------------
def open_checkpoint(path_or_repo_id: str | Path, *, revision: str | None = None) -> tuple[Path, TNLConfig, list[str]]:
    """(local directory, config, weight files to read) of a checkpoint, manifest verified first."""
    directory = resolve(path_or_repo_id, revision=revision)
    verify_manifest(directory)
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        raise CheckpointError(f"{config_path} not found")
    config = TNLConfig.from_file(config_path)
    listing = [p.name for p in directory.iterdir()]
    _, files = weight_files(listing, lambda name: _read_json(directory / name))
    return directory, config, files


def load_model(
    path_or_repo_id: str | Path,
    *,
    dtype: torch.dtype | str = torch.float32,
    device: torch.device | str = "cpu",
    revision: str | None = None,
) -> TransNormerLLM:
    """Load a TransNormerLLM from a local directory or Hub repo id, in eval mode.

    Args:
        path_or_repo_id: directory with config.json + weights, or e.g. "OpenNLPLab/TransNormerLLM-1B".
        dtype: parameter dtype (fp32 / bf16 / fp16); decay rates and recurrent state stay fp32.
        device: where the parameters live.
    """
    dtype = parse_dtype(dtype)
    directory, config, files = open_checkpoint(path_or_repo_id, revision=revision)
    with torch.device("meta"):
        model = TransNormerLLM(config)
    model = model.to(dtype).to_empty(device=device)
    load_weights(model, directory, files)
    return model.eval()


def save_model(model: TransNormerLLM, directory: str | Path, *, max_shard_bytes: int | None = None,
               manifest: bool = False) -> Path:
    """Write config.json and safetensors weights in the official key layout.

    A tied lm_head is stored once, as `model.embed_tokens.weight`. With `max_shard_bytes`, weights
    are split into `model-0000i-of-0000n.safetensors` plus `model.safetensors.index.json`.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.config.save(directory / CONFIG_FILE)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight")
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if max_shard_bytes and shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(directory / "model.safetensors"), metadata=meta)
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(directory / name), metadata=meta)
            weight_map.update(dict.fromkeys(shard, name))
        total = sum(t.numel() * t.element_size() for t in state.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (directory / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    if manifest:
        write_manifest(directory)
    return directory
