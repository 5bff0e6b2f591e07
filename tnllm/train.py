"""Train the bundled chat model (TransNormerLLM) or its matched Llama baseline on the chat data.

    python -m tnllm.train --arch tnl   --out runs/tnl   [--dim 256 --layers 6 --heads 4 --glu 704 ...]
    python -m tnllm.train --arch llama --out runs/llama (same sizes, tokens and schedule)

Data: `data/{train,val}.jsonl` from scripts/prepare_data.py, rendered in the official SFT format by
`tnllm.data.encode_dialogue` (loss on assistant text + eos only), packed into windows of `seq_len` tokens.
bf16 autocast on CUDA (the Triton Lightning Attention forward/backward run there), fp32 on CPU.
AdamW, linear warm-up + cosine decay, gradient clipping, seeded. Logs loss; evaluates train/val loss
per epoch; writes the final model (bf16, official layout for TNL) and `summary.json`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from tnllm import kernels
from tnllm.checkpoint import save_model
from tnllm.config import TNLConfig
from tnllm.data import IGNORE_INDEX, encode_dialogue
from tnllm.model import TransNormerLLM
from tnllm.tokenizer import Tokenizer

EVAL_SLICE = 20  # the first 20 validation dialogues: the fixed slice the README figure and tests use


@dataclass
class TrainConfig:
    arch: str = "tnl"
    data: str = "data"
    tokenizer: str = "assets/tokenizer.model"
    out: str = "runs/tnl"
    dim: int = 256
    layers: int = 6
    heads: int = 4
    glu: int = 704
    seq_len: int = 512
    batch_size: int = 32
    epochs: int = 4
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    max_steps: int = 0  # > 0: stop early (smoke tests, throughput runs)
    time_budget_s: float = 0.0  # > 0: stop after this much training time (the summary says so)
    log_every: int = 50
    warmup_excluded_steps: int = 10  # first steps (JIT compilation) left out of tokens/s


def read_dialogues(path: Path) -> list[list[dict]]:
    """Turn lists of a jsonl file written by scripts/prepare_data.py."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["turns"] for line in f if line.strip()]


def pack(dialogues: list[list[dict]], tokenizer: Tokenizer, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate encoded dialogues and cut into windows: inputs [N, seq_len], labels [N, seq_len]
    (labels already shifted: labels[:, t] is the target of inputs[:, t])."""
    ids: list[int] = []
    labels: list[int] = []
    for turns in dialogues:
        i, l = encode_dialogue(turns, tokenizer.encode, tokenizer.eos_id)
        ids += i
        labels += l
    n = (len(ids) - 1) // seq_len
    x = torch.tensor(ids[: n * seq_len + 1])
    y = torch.tensor(labels[: n * seq_len + 1])
    return x[:-1].view(n, seq_len), y[1:].view(n, seq_len)  # [N, seq_len] each


def build(cfg: TrainConfig, vocab_size: int) -> tuple[torch.nn.Module, TNLConfig]:
    """A freshly initialised model of the chosen architecture; the Llama mirrors the TNL config."""
    tnl = TNLConfig(vocab_size=vocab_size, dim=cfg.dim, n_layers=cfg.layers, n_heads=cfg.heads,
                    hidden_dim=cfg.dim, glu_dim=cfg.glu, lrpe_layers=[1] + [0] * (cfg.layers - 1), act="swish",
                    no_scale_embedding=False)
    torch.manual_seed(cfg.seed)
    if cfg.arch == "tnl":
        return TransNormerLLM(tnl), tnl
    if cfg.arch == "llama":
        from tnllm.baseline import build_llama

        return build_llama(tnl, seed=cfg.seed).train(), tnl
    raise ValueError(f"arch must be 'tnl' or 'llama', got {cfg.arch!r}")


def logits_of(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    out = model(ids)
    return out if isinstance(out, torch.Tensor) else out.logits


def loss_of(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = logits_of(model, x)  # [B, T, V]
    return F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX)


@torch.no_grad()
def packed_loss(model, x, y, batch_size: int, device: str) -> float:
    """Mean loss over all target tokens of packed windows."""
    total, count = 0.0, 0
    for i in range(0, len(x), batch_size):
        xb, yb = x[i:i + batch_size].to(device), y[i:i + batch_size].to(device)
        with _autocast(device):
            n = (yb != IGNORE_INDEX).sum().item()
            total += loss_of(model, xb, yb).item() * n
        count += n
    return total / max(count, 1)


@torch.no_grad()
def dialogue_loss(model: torch.nn.Module, tokenizer: Tokenizer, dialogues: list[list[dict]],
                  device: str = "cpu") -> float:
    """Mean target-token loss with each dialogue read on its own (no packing): the README's val figure."""
    total, count = 0.0, 0
    for turns in dialogues:
        ids, labels = encode_dialogue(turns, tokenizer.encode, tokenizer.eos_id)
        x = torch.tensor([ids[:-1]], device=device)
        y = torch.tensor([labels[1:]], device=device)
        n = (y != IGNORE_INDEX).sum().item()
        with _autocast(device):
            total += loss_of(model, x, y).item() * n
        count += n
    return total / max(count, 1)


def _autocast(device: str):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else torch.autocast(
        "cpu", enabled=False)


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def _optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices only (not embeddings, LRPE angles, norms, biases)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.dim() == 2 and "embed" not in name else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = cfg.device.startswith("cuda")
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8, fused=fused)


def check_kernels(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Relative difference of loss and gradients between the Triton and the PyTorch attention paths."""
    results = []
    for impl in ("torch", "triton"):
        model.zero_grad(set_to_none=True)
        with kernels.use_impl(impl), _autocast("cuda"):
            loss = loss_of(model, x, y)
        loss.backward()
        grads = torch.cat([p.grad.float().flatten() for p in model.parameters()])
        results.append((loss.detach().float(), grads))
    model.zero_grad(set_to_none=True)
    (l_ref, g_ref), (l_tri, g_tri) = results
    return max(abs(l_tri - l_ref).item() / abs(l_ref).item(), ((g_tri - g_ref).norm() / g_ref.norm()).item())


def save(model: torch.nn.Module, cfg: TrainConfig, out: Path) -> None:
    """bf16 weights: TNL in the official layout, the Llama with transformers' safetensors writer."""
    model = model.to(torch.bfloat16).eval()
    if cfg.arch == "tnl":
        save_model(model, out / "model", manifest=True)
    else:
        model.save_pretrained(out / "model", safe_serialization=True)
    model.float()


def train(cfg: TrainConfig) -> dict:
    """Run one training; returns (and writes) the summary."""
    with contextlib.ExitStack() as exit_stack:
        return _train(cfg, exit_stack)


@dataclass
class _Progress:
    """Counters carried through the training loop."""

    total: int  # steps to run; cut to the steps done once the time budget is spent
    step: int = 0
    tokens: int = 0
    timed_tokens: int = 0  # tokens of the steps after warmup_excluded_steps (for tokens/s)
    train_time: float = 0.0  # seconds of those steps
    elapsed: float = 0.0  # seconds of all steps (for the time budget)
    stopped_early: bool = False


def _check_attention(cfg: TrainConfig, model: torch.nn.Module, x_train: torch.Tensor, y_train: torch.Tensor,
                     exit_stack: contextlib.ExitStack) -> float | None:
    """TNL on CUDA: compare the Triton and PyTorch attention paths; if Triton fails or disagrees, train with
    the PyTorch path for the rest of the run (entered on `exit_stack`). Returns the relative difference."""
    kernel_diff = None
    if cfg.arch == "tnl" and cfg.device.startswith("cuda"):
        try:
            kernel_diff = check_kernels(model, x_train[:4].to(cfg.device), y_train[:4].to(cfg.device))
        except Exception as exc:  # a kernel that fails to build must not cost the run
            print(f"Triton kernels failed: {exc!r}")
        print(f"Triton vs PyTorch attention (loss, grads): rel. diff {kernel_diff}")
        if kernel_diff is None or kernel_diff > 2e-2:
            print("training with the PyTorch attention path instead")
            exit_stack.enter_context(kernels.use_impl("torch"))
    return kernel_diff


def _log_step(log, epoch: int, step: int, loss: torch.Tensor, grad_norm: torch.Tensor,
              optimizer: torch.optim.Optimizer) -> None:
    """Write and print one step's record (loss.item() syncs; only called on log steps)."""
    record = {"step": step, "epoch": epoch, "loss": loss.item(), "grad_norm": float(grad_norm),
              "lr": optimizer.param_groups[0]["lr"]}
    log.write(json.dumps(record) + "\n")
    print(json.dumps(record))


def _count_step(cfg: TrainConfig, progress: _Progress, step_time: float, n_tokens: int) -> None:
    """Account one finished step; past the time budget, the run stops after it."""
    progress.elapsed += step_time
    if progress.step >= cfg.warmup_excluded_steps:
        progress.train_time += step_time
        progress.timed_tokens += n_tokens
    progress.tokens += n_tokens
    progress.step += 1
    if cfg.time_budget_s and progress.elapsed > cfg.time_budget_s:
        progress.stopped_early = True
        progress.total = progress.step


def _train_epoch(model: torch.nn.Module, optimizer: torch.optim.Optimizer, cfg: TrainConfig, epoch: int,
                 order: torch.Tensor, x_train: torch.Tensor, y_train: torch.Tensor, progress: _Progress,
                 log) -> None:
    """One pass over the shuffled training windows (stopping at progress.total steps)."""
    for b in range(len(x_train) // cfg.batch_size):
        if progress.step >= progress.total:
            break
        idx = order[b * cfg.batch_size:(b + 1) * cfg.batch_size]
        xb, yb = x_train[idx].to(cfg.device, non_blocking=True), y_train[idx].to(cfg.device, non_blocking=True)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(progress.step, progress.total, cfg)
        start = time.perf_counter()
        with _autocast(cfg.device):
            loss = loss_of(model, xb, yb)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        if progress.step % cfg.log_every == 0 or progress.step == progress.total - 1:
            _log_step(log, epoch, progress.step, loss, grad_norm, optimizer)
        if cfg.device.startswith("cuda"):
            torch.cuda.synchronize()
        _count_step(cfg, progress, time.perf_counter() - start, xb.numel())


def _evaluate(model: torch.nn.Module, cfg: TrainConfig, epoch: int, tokens: int, x_train: torch.Tensor,
              y_train: torch.Tensor, x_val: torch.Tensor, y_val: torch.Tensor) -> dict:
    """The epoch's record: packed train loss (on as many windows as val has) and packed val loss."""
    model.eval()
    ep = {"epoch": epoch, "tokens_seen": tokens,
          "train_loss": packed_loss(model, x_train[:len(x_val)], y_train[:len(x_val)], cfg.batch_size, cfg.device),
          "val_loss": packed_loss(model, x_val, y_val, cfg.batch_size, cfg.device)}
    model.train()
    return ep


def _summary(cfg: TrainConfig, tnl_config: TNLConfig, n_params: int, progress: _Progress, epochs: list[dict],
             best: tuple, kernel_diff: float | None, slice_loss: float) -> dict:
    """The run's summary.json contents."""
    return {"config": asdict(cfg), "model_config": tnl_config.to_hf_dict(), "params": n_params,
            "tokens_seen": epochs[best[1]]["tokens_seen"], "tokens_trained": progress.tokens,
            "train_tokens_per_s": progress.timed_tokens / max(progress.train_time, 1e-9),
            "stopped_early_by_time_budget": progress.stopped_early, "kernel_check_rel_diff": kernel_diff,
            "attention_impl": kernels.backend_for(cfg.device),
            "epochs": epochs, "best_epoch": best[1], "val_loss": best[0], "val_ppl": math.exp(best[0]),
            "val_slice_loss": slice_loss, "device": torch.cuda.get_device_name() if
            cfg.device.startswith("cuda") else "cpu", "torch": torch.__version__}


def _train(cfg: TrainConfig, exit_stack: contextlib.ExitStack) -> dict:
    random.seed(cfg.seed)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(cfg.tokenizer)
    train_dialogues = read_dialogues(Path(cfg.data) / "train.jsonl")
    val_dialogues = read_dialogues(Path(cfg.data) / "val.jsonl")
    x_train, y_train = pack(train_dialogues, tokenizer, cfg.seq_len)
    x_val, y_val = pack(val_dialogues, tokenizer, cfg.seq_len)
    model, tnl_config = build(cfg, tokenizer.vocab_size)
    model.to(cfg.device).train()
    n_params = sum(p.numel() for p in model.parameters())
    steps_per_epoch = len(x_train) // cfg.batch_size
    total = steps_per_epoch * cfg.epochs if not cfg.max_steps else min(cfg.max_steps, steps_per_epoch * cfg.epochs)
    optimizer = _optimizer(model, cfg)
    generator = torch.Generator().manual_seed(cfg.seed)
    print(f"{cfg.arch}: {n_params:,} params, {len(x_train)} x {cfg.seq_len} train windows, {total} steps")
    kernel_diff = _check_attention(cfg, model, x_train, y_train, exit_stack)
    log = open(out / "train_log.jsonl", "w", encoding="utf-8")
    progress, epochs = _Progress(total), []
    best = None  # (val_loss, epoch, CPU copy of the weights): the model we ship
    for epoch in range(cfg.epochs):
        order = torch.randperm(len(x_train), generator=generator)
        _train_epoch(model, optimizer, cfg, epoch, order, x_train, y_train, progress, log)
        ep = _evaluate(model, cfg, epoch, progress.tokens, x_train, y_train, x_val, y_val)
        epochs.append(ep)
        log.write(json.dumps(ep) + "\n")
        print(json.dumps(ep))
        if best is None or ep["val_loss"] < best[0]:
            best = (ep["val_loss"], epoch, {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()})
        if progress.step >= progress.total:
            break
    log.close()
    model.load_state_dict(best[2])
    save(model, cfg, out)  # leaves the weights rounded to bf16, as shipped
    slice_loss = dialogue_loss(model.float().eval(), tokenizer, val_dialogues[:EVAL_SLICE], cfg.device)
    summary = _summary(cfg, tnl_config, n_params, progress, epochs, best, kernel_diff, slice_loss)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tnllm.train", description=__doc__.splitlines()[0])
    for name, default in asdict(TrainConfig()).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(default), default=default)
    train(TrainConfig(**vars(parser.parse_args(argv))))


if __name__ == "__main__":
    main()
