"""Fill a TP shard: from a checkpoint (each rank reads only its slices) or from a full in-memory model.

A shard spec says which slices of a full tensor a rank keeps: a list of (dim, start, stop) pieces,
concatenated along `dim` (qkvu_proj has four: its heads' rows of q, k, v and u). Safetensors files
are read with `get_slice`, so a rank reads only its bytes and never holds a full Linear weight;
pickled `.bin` checkpoints are memory-mapped (`torch.load(mmap=True)`) and sliced, so only the
rank's slice is copied into process memory. Keys, shapes and dtypes are checked against the full
config first (`tnllm.checkpoint.check_weights`, on a meta-device model: no memory).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open

from tnllm.checkpoint import (
    CONFIG_FILE,
    TIED_KEYS,
    CheckpointError,
    _iter_file,
    _read_json,
    check_weights,
    open_checkpoint,
    parse_dtype,
    weight_files,
)
from tnllm.config import TNLConfig
from tnllm.model import TransNormerLLM
from tnllm.tp.comm import TPGroup
from tnllm.tp.model import TPTransNormerLLM, empty_tp_model

Spec = list[tuple[int, int, int]]  # [(dim, start, stop)], pieces concatenated along dim (all equal)


def shard_spec(name: str, model: TPTransNormerLLM) -> Spec | None:
    """Which slices of the full tensor `name` this rank keeps; None = the whole tensor (replicated)."""
    c = model.full_config
    hd = c.hidden_dim
    h_lo, h_hi = model.head_range
    dh = c.head_dim
    if re.search(r"\.qkvu_proj\.(weight|bias)$", name):  # rows: quarters q|k|v|u, each head-major h*dh + j
        return [(0, q * hd + h_lo * dh, q * hd + h_hi * dh) for q in range(4)]
    if name.endswith(".lrpe.theta"):  # [H, 1, dh]
        return [(0, h_lo, h_hi)]
    if re.search(r"\.out_proj\.weight$", name):  # [d, hd]: input columns of the rank's heads
        return [(1, h_lo * dh, h_hi * dh)]
    if re.search(r"\.(l1|l2)\.(weight|bias)$", name):  # [g, d]
        return [(0, *model.glu_range)]
    if re.search(r"\.l3\.weight$", name):  # [d, g]
        return [(1, *model.glu_range)]
    if name in TIED_KEYS and model.vocab_parallel:  # [V, d]
        return [(0, *model.vocab_range)]
    return None  # biases of out_proj / l3 and anything else: replicated


def take(source, spec: Spec | None) -> torch.Tensor:
    """The shard of `source` (a tensor, or a safetensors slice: both index as `[lo:hi]` / `[:, lo:hi]`,
    reading only those bytes from a file); the whole tensor when spec is None."""
    if spec is None:
        return source[:]
    pieces = [source[lo:hi] if dim == 0 else source[:, lo:hi] for dim, lo, hi in spec]
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=spec[0][0])


def _read_safetensors(path: Path, model: TPTransNormerLLM, keys: set[str]):
    """(name, shard) of the wanted keys of one safetensors file, reading only the shard's bytes."""
    try:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                if name in keys:
                    yield name, take(f.get_slice(name), shard_spec(name, model))
    except SafetensorError as exc:
        raise CheckpointError(f"corrupted safetensors file {path.name}: {exc}") from exc


def _read_pickle(path: Path, model: TPTransNormerLLM, keys: set[str]):
    """(name, shard) of a memory-mapped .bin file: views into the map, copied only into the shard."""
    for name, tensor in _iter_file(path):
        if name in keys:
            yield name, take(tensor, shard_spec(name, model))


def load_tp_weights(model: TPTransNormerLLM, directory: Path, files: list[str]) -> None:
    """Check the checkpoint against the full config, then copy this rank's slices into `model`."""
    with torch.device("meta"):
        full = TransNormerLLM(model.full_config)
    found = check_weights(full, directory, files)
    params = model.state_dict(keep_vars=True)
    # Tied: read the embedding when present, else lm_head.weight into the shared matrix (as load_weights).
    tied = model.full_config.tie_word_embeddings
    keys = set(params) - ({"lm_head.weight"} if tied and TIED_KEYS[0] in found else set())
    with torch.no_grad():
        for name in files:
            path = directory / name
            reader = _read_safetensors if path.suffix == ".safetensors" else _read_pickle
            for key, shard in reader(path, model, keys):
                if params[key].shape != shard.shape:
                    raise CheckpointError(f"{key}: shard {list(shard.shape)} vs model {list(params[key].shape)}")
                params[key].copy_(shard)


def shard_from_model(model: TPTransNormerLLM, full: TransNormerLLM) -> TPTransNormerLLM:
    """Copy this rank's slices out of a full model in memory (tests; bench with random weights)."""
    full_params = full.state_dict()
    with torch.no_grad():
        for name, param in model.state_dict(keep_vars=True).items():
            param.copy_(take(full_params[name], shard_spec(name, model)))
    return model


def _open_on_driver(path_or_repo_id: str | Path, tp: TPGroup,
                    revision: str | None) -> tuple[Path, TNLConfig, list[str]]:
    """Rank 0 resolves (downloads) and verifies the manifest once; the others read the same directory."""
    if tp.size == 1:
        return open_checkpoint(path_or_repo_id, revision=revision)
    message: list[object] = [None]
    if tp.rank == 0:
        try:
            directory, _, _ = open_checkpoint(path_or_repo_id, revision=revision)
            message = [str(directory)]
        except Exception as exc:  # noqa: BLE001 - tell the followers, then raise here too
            message = [f"error: {type(exc).__name__}: {exc}"]
            dist.broadcast_object_list(message, src=0, group=tp.group, device=tp.device)
            raise
    dist.broadcast_object_list(message, src=0, group=tp.group, device=tp.device)
    text = str(message[0])
    if text.startswith("error: "):
        raise CheckpointError(f"rank 0 could not open {path_or_repo_id}: {text[7:]}")
    directory = Path(text)
    config = TNLConfig.from_file(directory / CONFIG_FILE)
    _, files = weight_files([p.name for p in directory.iterdir()], lambda name: _read_json(directory / name))
    return directory, config, files


def load_tp_model(path_or_repo_id: str | Path, tp: TPGroup, *, dtype: torch.dtype | str = torch.float32,
                  vocab_parallel: bool = True, revision: str | None = None) -> TPTransNormerLLM:
    """This rank's shard of a checkpoint (directory or Hub repo id), on `tp.device`, in eval mode."""
    directory, config, files = _open_on_driver(path_or_repo_id, tp, revision)
    model = empty_tp_model(config, tp, parse_dtype(dtype), vocab_parallel)
    load_tp_weights(model, directory, files)
    return model
