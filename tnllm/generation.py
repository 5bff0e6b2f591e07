"""Generation: chunked prefill into a constant-size recurrent state, then streaming decode.

Small functions in the spirit of gpt-fast:
    prefill(model, ids, state)          -> logits of the last position (chunked, cancellable)
    decode_one_token(model, token, state) -> logits, state advanced in place
    generate_tokens(...)                -> ids, one at a time
    generate(...)                       -> text pieces, never broken UTF-8, stop strings held back
    Conversation                        -> a chat that keeps its state between turns

Cost per decoded token is constant: the state never grows with the context (the point of the model).
Convention: a token is yielded before it is fed back, so after the consumer stops, the last yielded
token is not in the state yet; `Conversation` feeds it (plus eos) with the next message.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tnllm.model import TransNormerLLM
from tnllm.sampling import SamplingParams, sample_token
from tnllm.state import RecurrentState
from tnllm.streaming import TextStreamer
from tnllm.tokenizer import Tokenizer

PREFILL_CHUNK = 512


class NumericalError(RuntimeError):
    """The model produced NaN/inf logits (e.g. fp16 overflow); the reply is aborted, not streamed."""


def _check_finite(logits: torch.Tensor) -> torch.Tensor:
    if not torch.isfinite(logits).all():
        raise NumericalError("the model produced NaN/inf logits; generation stopped")
    return logits


@torch.inference_mode()
def prefill_chunks(model: TransNormerLLM, ids: torch.Tensor, state: RecurrentState,
                   chunk_size: int = PREFILL_CHUNK) -> Iterator[torch.Tensor | None]:
    """Feed ids [B, T] into `state` chunk by chunk; yields None after each chunk but the last, then
    the last position's logits [B, V]. Stopping early leaves the state at a chunk boundary."""
    if ids.shape[1] == 0:
        raise ValueError("prefill needs at least one token")
    for start in range(0, ids.shape[1], chunk_size):
        logits = model(ids[:, start:start + chunk_size], state, logits_to_keep=1)[:, -1]
        if start + chunk_size < ids.shape[1]:
            yield None
    yield _check_finite(logits)


def prefill(model: TransNormerLLM, ids: torch.Tensor, state: RecurrentState,
            chunk_size: int = PREFILL_CHUNK) -> torch.Tensor:
    """Feed ids [B, T] into `state`; return the last position's logits [B, V]."""
    *_, logits = prefill_chunks(model, ids, state, chunk_size)
    return logits


@torch.inference_mode()
def decode_one_token(model: TransNormerLLM, token: torch.Tensor, state: RecurrentState) -> torch.Tensor:
    """token [B, 1] -> logits [B, V]; one recurrent step, state updated in place."""
    return _check_finite(model(token, state)[:, -1])


def decode_tokens(model: TransNormerLLM, logits: torch.Tensor, state: RecurrentState, params: SamplingParams,
                  eos_ids: set[int], seen: list[int]) -> Iterator[int]:
    """Sample up to max_new_tokens ids for one sequence starting from `logits` [1, V]."""
    generator = params.make_generator(logits.device)
    seen_ids = torch.tensor(seen, dtype=torch.long, device=logits.device)
    for i in range(params.max_new_tokens):
        token = sample_token(logits[0], params, generator, seen_ids)
        yield token
        if token in eos_ids or i + 1 == params.max_new_tokens:
            return
        if params.repetition_penalty != 1.0:
            seen_ids = torch.cat([seen_ids, seen_ids.new_tensor([token])])
        logits = decode_one_token(model, torch.tensor([[token]], device=logits.device), state)


def generate_tokens(model: TransNormerLLM, prompt_ids: list[int], params: SamplingParams,
                    state: RecurrentState | None = None, eos_ids: set[int] | None = None) -> Iterator[int]:
    """Prefill `prompt_ids` (continuing `state` if given) and yield sampled ids."""
    state = model.allocate_state(1) if state is None else state
    device = state.positions.device
    logits = prefill(model, torch.tensor([prompt_ids], device=device), state)
    eos = {model.config.eos_token_id} if eos_ids is None else eos_ids
    yield from decode_tokens(model, logits, state, params, eos, prompt_ids)


@dataclass
class ReplyStats:
    """Live numbers of one reply (the app shows them under each message)."""

    prompt_tokens: int = 0
    prefilled: int = 0          # prompt tokens read into the state so far (prefill progress)
    new_tokens: int = 0
    ttft_s: float = 0.0         # prompt submitted -> first token sampled
    decode_s: float = 0.0       # first token -> last token
    state_bytes: int = 0
    finish_reason: str = ""     # "eos", "length", "stop", "cancelled"

    @property
    def tokens_per_s(self) -> float:
        return (self.new_tokens - 1) / self.decode_s if self.new_tokens > 1 and self.decode_s > 0 else 0.0


@dataclass
class TokenLog:
    """What one `generate` call did to the state: ids written into it, and ids sampled."""

    fed: list[int] = field(default_factory=list)
    sampled: list[int] = field(default_factory=list)


def generate(model: TransNormerLLM, tokenizer: Tokenizer, prompt_ids: list[int], params: SamplingParams,
             state: RecurrentState | None = None, stats: ReplyStats | None = None,
             log: TokenLog | None = None) -> Iterator[str]:
    """Stream the reply's text pieces. Yields "" while prefilling so a consumer can cancel.

    `stats` (if given) is filled in live; `log` (if given) records the ids fed and sampled. The last
    sampled id is not fed (see the module docstring).
    """
    state = model.allocate_state(1) if state is None else state
    stats = ReplyStats() if stats is None else stats
    log = TokenLog() if log is None else log
    fed = log.fed
    stats.prompt_tokens, stats.state_bytes, stats.finish_reason = len(prompt_ids), state.nbytes, "cancelled"
    start = time.perf_counter()
    ids = torch.tensor([prompt_ids], device=state.positions.device)
    for chunk_start, logits in zip(range(0, len(prompt_ids), PREFILL_CHUNK), prefill_chunks(model, ids, state)):
        fed.extend(prompt_ids[chunk_start:chunk_start + PREFILL_CHUNK])
        stats.prefilled = len(fed)
        if logits is None:
            yield ""
    streamer = TextStreamer(tokenizer, params.stop)
    eos = {model.config.eos_token_id}
    for token in decode_tokens(model, logits, state, params, eos, prompt_ids):
        if log.sampled:
            fed.append(log.sampled[-1])  # decode_tokens fed it before sampling this one
        log.sampled.append(token)
        now = time.perf_counter()
        if stats.new_tokens == 0:
            stats.ttft_s = now - start
        stats.new_tokens += 1
        stats.decode_s = now - start - stats.ttft_s
        if token in eos:
            stats.finish_reason = "eos"
            break
        piece = streamer.push(token)
        if piece:
            yield piece
        if streamer.stopped:
            stats.finish_reason = "stop"
            return
    else:
        stats.finish_reason = "length"
    tail = streamer.flush()
    if tail:
        yield tail


@dataclass
class Conversation:
    """A chat whose recurrent state persists between turns: turn N prefills only its new message.

    `history` holds every id written into the state; `pending` the ids still to write (the last
    sampled token and the eos closing the assistant turn), fed together with the next message.
    """

    model: TransNormerLLM
    tokenizer: Tokenizer
    state: RecurrentState = None  # type: ignore[assignment]
    history: list[int] = field(default_factory=list)
    pending: list[int] = field(default_factory=list)
    last_stats: ReplyStats = field(default_factory=ReplyStats)

    def __post_init__(self) -> None:
        if self.state is None:
            self.state = self.model.allocate_state(1)

    def reply(self, user_text: str, params: SamplingParams) -> Iterator[str]:
        """Stream the assistant's answer to `user_text`; the state then holds the whole exchange."""
        prompt = self.pending + self.tokenizer.chat_ids([("human", user_text)])
        eos = self.model.config.eos_token_id
        self.last_stats = ReplyStats()
        log = TokenLog()
        try:
            yield from generate(self.model, self.tokenizer, prompt, params, self.state, self.last_stats, log)
        finally:
            # Done, stop string or cancelled mid-stream: record exactly what the state saw; what it has
            # not seen yet (rest of the prompt, the last sampled id) plus an eos closing the assistant
            # turn is written with the next message.
            self.history.extend(log.fed)
            unfed = prompt[len(log.fed):] if not log.sampled else log.sampled[-1:]
            self.pending = unfed if unfed[-1:] == [eos] else unfed + [eos]

    def fork(self) -> "Conversation":
        """An independent copy (same history, cloned state)."""
        return Conversation(self.model, self.tokenizer, self.state.clone(), list(self.history), list(self.pending))

    def save(self, path: str | Path) -> None:
        """State + ids in one safetensors file (a few MB whatever the conversation length)."""
        tensors = self.state.tensors()
        tensors["history"] = torch.tensor(self.history, dtype=torch.long)
        tensors["pending"] = torch.tensor(self.pending, dtype=torch.long)
        save_file(tensors, str(path), metadata={"format": "pt", "kind": "tnllm-conversation"})

    @classmethod
    def load(cls, path: str | Path, model: TransNormerLLM, tokenizer: Tokenizer) -> "Conversation":
        """A conversation saved by `save` (one read of the file), its state checked against `model`."""
        tensors = load_file(str(path), device=str(model.lm_head.weight.device))
        state = RecurrentState.from_tensors(tensors, model.config, path)
        return cls(model, tokenizer, state, tensors["history"].tolist(), tensors["pending"].tolist())
