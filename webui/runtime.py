"""What the app serves: the chat model, its tokenizer and the Transformer baseline, loaded once at startup.

Model choice, in order: an explicit `--model` (local directory or Hub repo id), the bundled checkpoint
`assets/tnl/` (config.json + model.safetensors) when present, else a clearly labelled tiny model with
random weights ("untrained demo weights") over `assets/tokenizer.model`, so the app always starts.
The baseline: `--baseline DIR`, else `assets/llama/` when present, else transformers' `LlamaForCausalLM`
with random weights matched to the TNL config (`tnllm.baseline`). Missing GPU, Triton or the 8-bit
back end each fall back with one log line. A checkpoint or tokenizer that fails its checks (truncated or
corrupted file, wrong shapes, config not matching the weights, tokenizer vocabulary or special ids not matching
the model, NaN/inf at the warm-up generation) raises `StartupError` naming the file and the mismatch; the app
exits instead of serving garbage.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tnllm import TNLConfig, TransNormerLLM, kernels, load_model
from tnllm.checkpoint import CONFIG_FILE, CheckpointError, default_dtype, parse_dtype
from tnllm.engine import Engine, EngineConfig
from tnllm.model import random_model
from tnllm.paths import ASSETS, ROOT
from tnllm.sampling import SamplingParams
from tnllm.tokenizer import BUNDLED_TOKENIZER, Tokenizer, tokenizer_for
from tnllm.webui.validation import CHAT_DEFAULTS, default_max_context

log = logging.getLogger("tnllm.app")

BUNDLED_TNL = ASSETS / "tnl"
BUNDLED_LLAMA = ASSETS / "llama"
TOKENIZER_FILE = BUNDLED_TOKENIZER  # (its name here for the tests and scripts that import it)
MODEL_CARD = ASSETS / "model_card.json"
RANDOM_LABEL = "untrained demo weights"
VOCAB_PADDING = 128  # embedding rows may exceed the tokenizer's pieces by less than this (padded vocabularies)
CHAT_SESSIONS = 32  # chat sessions whose state the server keeps (least recently used beyond this are dropped)


class StartupError(RuntimeError):
    """The model cannot be served; the message names the file and the problem."""


def check_tokenizer(config: TNLConfig, tokenizer: Tokenizer, model_where: str) -> None:
    """Tokenizer vs model: every id must have an embedding row (rows may be padded by < VOCAB_PADDING) and the
    special ids must be the config's; raises CheckpointError naming both files and each mismatch."""
    rows, pieces = config.vocab_size, tokenizer.vocab_size
    problems = []
    if not pieces <= rows < pieces + VOCAB_PADDING:
        problems.append(f"vocabulary size {pieces} != {rows} embedding rows (vocab_size)")
    for name, tok_id in (("eos_token_id", tokenizer.eos_id), ("bos_token_id", tokenizer.bos_id)):
        want = getattr(config, name, None)
        if want is not None and tok_id != want and (tok_id >= 0 or name == "eos_token_id"):
            problems.append(f"{name} {tok_id} != {want} in the config")
    if problems:
        raise CheckpointError(f"tokenizer {tokenizer.path} does not match the model {model_where}: "
                              + "; ".join(problems))


def shown_path(path: str | Path) -> str:
    """How the UI names a file or directory: repo-relative inside this repository (`assets/tnl`), else only its
    name; a Hub repo id (nothing local) as given. The Model tab's text is public (Gradio's /config), so an
    absolute server path must never reach it."""
    local = Path(path).expanduser()
    if not local.exists():
        return str(path)
    local = local.resolve()
    return local.relative_to(ROOT).as_posix() if local.is_relative_to(ROOT) else local.name


@dataclass
class Runtime:
    """Everything the handlers need; `info` and `baseline_info` feed the Model tab (public text, see
    `shown_path`); `model_path` is the chat model's source as given (a path or Hub repo id), for the server."""

    model: TransNormerLLM
    tokenizer: Tokenizer
    baseline: torch.nn.Module | None
    device: torch.device
    max_context: int
    info: dict[str, str] = field(default_factory=dict)
    baseline_info: dict[str, str] = field(default_factory=dict)
    model_path: str = ""
    engine: Engine = None  # type: ignore[assignment]  # started by `start_engine` (load_runtime does)

    @property
    def untrained(self) -> bool:
        return self.info.get("weights") == RANDOM_LABEL


def pick_device(requested: str | None) -> torch.device:
    """`requested` if usable, else CUDA when present, else CPU (one log line when falling back)."""
    if requested and requested.startswith("cuda") and not torch.cuda.is_available():
        log.warning("device %s requested but no CUDA GPU is available: running on the CPU", requested)
        return torch.device("cpu")
    if requested:
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _is_checkpoint(path: Path) -> bool:
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def _quant():
    """The `quant` package, or None (one log line) when it or its dependencies cannot be imported."""
    try:
        from tnllm import quant
        return quant
    except ImportError as exc:
        log.warning("8-bit weights unavailable (%s): using float weights", exc)
        return None


def default_source() -> str:
    """The bundled checkpoint, else `preset:tiny` (one log line: its weights are random)."""
    if _is_checkpoint(BUNDLED_TNL):
        return str(BUNDLED_TNL)
    log.warning("no bundled checkpoint in %s: serving a tiny model with %s", shown_path(BUNDLED_TNL), RANDOM_LABEL)
    return "preset:tiny"


def load_tnl(source: str, *, int8: bool, device: torch.device, dtype: torch.dtype
             ) -> tuple[TransNormerLLM, Tokenizer, dict[str, str]]:
    """(model, tokenizer, info) for `source`: a directory, a Hub repo id or `preset:NAME` (random weights over
    assets/tokenizer.model)."""
    info = {"model": shown_path(source), "weights": "trained checkpoint"}
    start = time.perf_counter()
    if source.startswith("preset:"):
        tokenizer = Tokenizer(BUNDLED_TOKENIZER)
        model = random_model(source.removeprefix("preset:"), device=device, dtype=dtype,
                             vocab_size=tokenizer.vocab_size, eos_token_id=tokenizer.eos_id,
                             bos_token_id=tokenizer.bos_id)
        info.update(model=f"{source} ({RANDOM_LABEL})", weights=RANDOM_LABEL)
    else:
        log.info("loading %s (a Hub repo id downloads with progress bars) ...", source)
        tokenizer = tokenizer_for(source)
        model = None
    quant = _quant() if int8 else None
    method = quant.choose_method(device) if quant else "none"
    if model is None:
        model = (quant.load_quantized(source, method, dtype=dtype, device=device) if quant
                 else load_model(source, dtype=dtype, device=device))
    elif quant:
        model = quant.quantize(model, method)
    check_tokenizer(model.config, tokenizer, str(Path(source) / CONFIG_FILE) if Path(source).is_dir() else source)
    log.info("model ready in %.1fs (%s, 8-bit: %s)", time.perf_counter() - start, source, method)
    info.update(_describe(model, device, dtype, method), tokenizer=_tokenizer_row(tokenizer))
    if quant:
        info["8-bit"] = f"{method}: {quant.why_method(device)}"
    info["_method"] = method
    return model, tokenizer, info


def _tokenizer_row(tokenizer: Tokenizer) -> str:
    return f"{shown_path(tokenizer.path)} ({tokenizer.vocab_size} pieces)"


def count_parameters(model: torch.nn.Module) -> int:
    """Weights and biases, tied ones once; 8-bit weights (int8 buffers, not Parameters) included."""
    tensors = {p.data_ptr(): p.numel() for p in model.parameters()}
    tensors.update({t.data_ptr(): t.numel() for t in model.buffers() if t.dtype == torch.int8})
    return sum(tensors.values())


def _describe(model: torch.nn.Module, device: torch.device, dtype: torch.dtype, method: str) -> dict[str, str]:
    params = count_parameters(model)
    backend = kernels.backend_for(device)
    if device.type == "cuda" and backend != "triton":
        log.warning("Triton is not available: Lightning Attention runs on the PyTorch path")
    return {"parameters": f"{params:,}", "precision": str(dtype).removeprefix("torch."),
            "8-bit": "off (float weights)" if method == "none" else method,
            "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
            "kernel path": f"{backend} (kernels.backend_for)"}


def load_baseline(source: str | None, model: TransNormerLLM, *, device: torch.device, dtype: torch.dtype,
                  method: str = "none") -> tuple[torch.nn.Module | None, dict[str, str]]:
    """The Llama baseline: a directory, "matched" (random, sized like `model`), "none" (no baseline: the
    latency tab shows TNL only) or None (assets/llama/, else matched); None with one log line when
    transformers is missing or loading fails. `method`: the TNL model's
    8-bit method, applied to the baseline's decoder Linears too so that both run at the same precision."""
    if source == "none":
        return None, {"model": "none"}
    if source is None and _is_checkpoint(BUNDLED_LLAMA):
        source = str(BUNDLED_LLAMA)
    source = None if source == "matched" else source
    try:
        from tnllm.baseline import build_llama, load_llama
        llama = (load_llama(source, dtype=dtype, device=device) if source
                 else build_llama(model.config, dtype=dtype, device=device))
    except (ImportError, OSError, ValueError) as exc:
        log.warning("Transformer baseline unavailable (%s): the latency tab shows TNL only", exc)
        return None, {"model": "none"}
    name = shown_path(source) if source else f"LlamaForCausalLM matched to the TNL config ({RANDOM_LABEL})"
    params = count_parameters(llama)
    if method != "none":
        try:
            from tnllm import quant
            llama = quant.quantize(llama, method)
        except Exception as exc:  # noqa: BLE001 (any failure: keep a working float baseline)
            log.warning("baseline stays float (8-bit %s failed: %s): latency compares 8-bit TNL to float", method, exc)
            method = "none"
    return llama, {"model": name, "parameters": f"{params:,}", "precision": str(dtype).removeprefix("torch."),
                   "8-bit": "off (float weights)" if method == "none" else method,
                   "attention": getattr(llama.config, "_attn_implementation", "?"), "device": str(device)}


def start_engine(model: TransNormerLLM, tokenizer: Tokenizer, source: str) -> Engine:
    """The engine every chat reply runs on (a state slot per chat session; CUDA graphs on a GPU),
    after one short greedy reply, so that the first user does not pay for lazy initialisation and NaN/inf
    weights fail here (StartupError) instead of in a user's reply. With CUDA graphs, the decode steps of every
    batch size are captured now for chat's default sampling: otherwise the first step at a new number of
    concurrent users would stall every one of them for the capture."""
    engine = Engine(model, tokenizer, EngineConfig(max_sessions=CHAT_SESSIONS))
    session = engine.open()
    try:
        reply = session.send("hi", SamplingParams(temperature=0.0, max_new_tokens=2)).wait()
    finally:
        session.close()
    if reply.finish_reason not in ("eos", "length", "stop"):
        engine.shutdown()
        why = ("the model produced NaN/inf logits" if reply.finish_reason == "numerical_error"
               else f"it ended with {reply.finish_reason!r} (see the log)")
        raise StartupError(f"{source}: warm-up generation failed: {why}")
    start = time.perf_counter()
    captured = engine.precapture(SamplingParams(**CHAT_DEFAULTS), prefill_pieces=False)
    if captured:
        log.info("captured %d CUDA graphs (decode steps for 1 to %d sessions, chat's default sampling) in %.1f s",
                 captured, CHAT_SESSIONS, time.perf_counter() - start)
    return engine


def _notes(source: str, info: dict[str, str]) -> str:
    """Licence and data notes: the checkpoint's model card when it has one, else what is known here."""
    card = Path(source) / "README.md"
    if card.is_file():
        return f"see the model card {shown_path(card)}"
    if Path(source).resolve() == BUNDLED_TNL.resolve() and MODEL_CARD.is_file():
        tnl = json.loads(MODEL_CARD.read_text(encoding="utf-8"))["models"]["tnl"]
        return (f"bundled model trained from scratch on {tnl['tokens_seen'] / 1e6:.0f}M tokens of chitchat-dataset "
                f"(MIT licence, casual human chat), validation perplexity {tnl['val_ppl']:.1f}; a small demo model, "
                f"expect short casual replies. Details: assets/model_card.json")
    if info["weights"] == RANDOM_LABEL:
        return ("random weights (no training data); tokenizer: BPE-8192 trained on chitchat-dataset (MIT), "
                "see assets/tokenizer_report.md")
    return "see the checkpoint's model card (official OpenNLPLab checkpoints carry their own licence)"


def load_runtime(model: str | None = None, baseline: str | None = None, *, int8: bool = True,
                 device: str | None = None, dtype: str | None = None, max_context: int | None = None) -> Runtime:
    """Load everything the app serves (`model`/`baseline`: local path, Hub repo id, or None for the defaults;
    `dtype` None: bf16 on CUDA, fp32 on the CPU)."""
    dev = pick_device(device)
    torch_dtype = parse_dtype(dtype) if dtype else default_dtype(dev)
    source = model or default_source()
    try:
        tnl, tokenizer, info = load_tnl(source, int8=int8, device=dev, dtype=torch_dtype)
    except (ValueError, OSError) as exc:  # CheckpointError, tokenizer and config errors, missing files
        raise StartupError(str(exc)) from exc
    engine = start_engine(tnl, tokenizer, source)
    llama, baseline_info = load_baseline(baseline, tnl, device=dev, dtype=torch_dtype, method=info.pop("_method"))
    info["licence / data"] = _notes(source, info)
    limit = max_context or default_max_context(dev.type)
    return Runtime(tnl, tokenizer, llama, dev, limit, info, baseline_info, model_path=source, engine=engine)


def load_tp_runtime(model, source: str, baseline: str | None, *, max_context: int | None = None) -> Runtime:
    """The runtime around a tensor-parallel `tnllm.tp.serve.DrivenModel` (rank 0 of `app.py --tp N`).

    Same checks as `load_runtime` (tokenizer vs model, warm-up); weights stay float (8-bit is not sharded).
    """
    device, dtype = model.lm_head.weight.device, model.lm_head.weight.dtype
    try:
        tokenizer = tokenizer_for(source)
        check_tokenizer(model.config, tokenizer, str(Path(source) / CONFIG_FILE) if Path(source).is_dir() else source)
    except (ValueError, OSError) as exc:
        raise StartupError(str(exc)) from exc
    engine = start_engine(model, tokenizer, source)
    info = {"model": shown_path(source), "weights": "trained checkpoint", "parameters": f"{model.num_parameters():,}",
            "precision": str(dtype).removeprefix("torch."), "8-bit": "off (tensor-parallel shards are float)",
            "device": f"{model.tp.size} x {device.type} (tensor parallel, this rank holds 1/{model.tp.size})",
            "kernel path": f"{kernels.backend_for(device)} (kernels.backend_for)",
            "tokenizer": _tokenizer_row(tokenizer)}
    llama, baseline_info = load_baseline(baseline, model, device=device, dtype=dtype)
    info["licence / data"] = _notes(source, info)
    limit = max_context or default_max_context(device.type)
    return Runtime(model, tokenizer, llama, device, limit, info, baseline_info, model_path=source, engine=engine)
