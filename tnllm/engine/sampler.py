"""Batched on-device sampling: per-slot settings in device tables, exact draws with no host sync.

A draw is argmax(probs / E) = argmax(logit - log E) with E ~ Exponential(1) per token, an exact sample of
`probs` (the exponential-race form of Gumbel-max) that needs no `torch.multinomial` (which syncs). The noise comes from
a counter-based hash of (the reply's seed, how many tokens it has drawn, token id), so a seeded reply gets
the same tokens whichever sessions share its batch, and the whole sampler can be captured in a CUDA graph.
Greedy rows (temperature 0) take the argmax. Temperature, top-k, top-p and the repetition penalty are the
ones of `tnllm.sampling` (one implementation: `penalise_seen`, `filter_logits`). Batches whose kept tokens lie
in a head of each row (every sampling row has 0 < top_k <= HEAD) or that are all greedy take `kernels.sample_rows`
(a few Triton kernels on CUDA); the others sort the vocabulary here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tnllm import kernels
from tnllm.engine.pool import upload_ids
from tnllm.kernels.reference import (
    NOT_FINITE,
    SlotTables,
    log_exponential_noise,
    mix32,
    noise_key,
    penalised_logits,
    record_draws,
)
from tnllm.sampling import SamplingParams, drop_outside_nucleus, filter_logits

__all__ = ["BatchSampler", "SamplePlan", "GENERAL", "NOT_FINITE", "HEAD", "SMALL_HEAD", "head_size"]

HEAD = 256  # candidates kept by the head path: top-k of at most this many needs no full sort of the vocabulary
SMALL_HEAD = 64  # the head when every sampling row keeps at most this many (chat's top-k): a quarter of the sort


def head_size(top_ks: list[int]) -> int:
    """The head that holds every kept token of rows with these top-k values (0 < k <= HEAD), or 0 for none."""
    if not top_ks or not all(0 < k <= HEAD for k in top_ks):
        return 0
    return SMALL_HEAD if max(top_ks) <= SMALL_HEAD else HEAD


@dataclass(frozen=True)
class SamplePlan:
    """What a batch's sampling needs, decided on the host from its rows' settings (no sync): each variant is
    its own code path and, on CUDA, its own captured graph.

    penalty: some row has a repetition penalty; draw: some row samples (temperature > 0); head: > 0 when every
    sampling row keeps at most that many tokens (0 < top_k <= head, `head_size`), so the head of each row holds
    every kept token and the vocabulary is never sorted; probe: try a HEAD anyway and check it (a host sync:
    CPU only, where a full sort costs ~0.6 ms a row)."""

    penalty: bool = True
    draw: bool = True
    head: int = 0
    probe: bool = False


GENERAL = SamplePlan()  # settings unknown: everything on the device, no shortcut


class BatchSampler:
    """Per-slot sampling tables (slot 0 = padding sink) and `sample(logits, slots)` for a whole batch."""

    def __init__(self, n_slots: int, vocab_size: int, device: torch.device | str):
        self.device = torch.device(device)
        zeros = lambda dtype: torch.zeros(n_slots, dtype=dtype, device=device)  # noqa: E731
        ones = lambda: torch.ones(n_slots, device=device)  # noqa: E731
        # Until a reply configures its slot: greedy, filters and penalty off (what padded rows run).
        self.temperature, self.top_p, self.penalty = zeros(torch.float32), ones(), ones()
        self.top_k, self.seed, self.drawn, self.last_token = (zeros(torch.long) for _ in range(4))
        self.seen = torch.zeros(n_slots, vocab_size, dtype=torch.bool, device=device)  # ids under the penalty
        self.vocab_hash = mix32(torch.arange(vocab_size, device=device))  # [V], fixed part of the noise
        self.settings = [SamplingParams(temperature=0)] * n_slots  # host mirror of the tables

    def configure(self, slot: int, params: SamplingParams, seed: int, prompt_ids: list[int]) -> None:
        """Set a slot's settings for a new reply; `prompt_ids` start its repetition-penalty set."""
        self.temperature[slot] = params.temperature
        self.top_k[slot] = params.top_k
        self.top_p[slot] = params.top_p
        self.penalty[slot] = params.repetition_penalty
        self.seed[slot] = seed & ((1 << 62) - 1)
        self.drawn[slot] = 0
        self.seen[slot] = False
        self.seen[slot, upload_ids(prompt_ids, self.device)] = True
        self.settings[slot] = params

    def log_exponential_noise(self, slots: torch.Tensor, token_ids: torch.Tensor | None = None) -> torch.Tensor:
        """log E, E ~ Exp(1) [B, V] (or [B, N] for the given token ids [B, N]): determined by each slot's seed,
        its drawn count and the token id, so any subset of a row's tokens sees the noise of the whole row."""
        key = noise_key(self.seed[slots], self.drawn[slots])[:, None]  # [B, 1]
        token_hash = self.vocab_hash[None, :] if token_ids is None else self.vocab_hash[token_ids]
        return log_exponential_noise(token_hash, key)

    def plan(self, slots: list[int]) -> SamplePlan:
        """The cheapest `SamplePlan` that serves these slots' current settings."""
        return self.plan_for([self.settings[s] for s in slots])

    def plan_for(self, settings: list[SamplingParams]) -> SamplePlan:
        """The cheapest `SamplePlan` that serves rows with these settings."""
        drawing = [p for p in settings if p.temperature > 0]
        head = head_size([p.top_k for p in drawing])
        return SamplePlan(penalty=any(p.repetition_penalty != 1.0 for p in settings), draw=bool(drawing),
                          head=head, probe=bool(drawing) and not head and self.device.type == "cpu")

    @property
    def vocab_size(self) -> int:
        return self.seen.shape[1]

    @property
    def tables(self) -> SlotTables:
        """The per-slot device tables, as `kernels.sample_rows` reads and updates them."""
        return SlotTables(self.temperature, self.top_k, self.top_p, self.penalty, self.seed, self.drawn,
                          self.last_token, self.seen, self.vocab_hash)

    def sample(self, logits: torch.Tensor, slots: torch.Tensor, plan: SamplePlan = GENERAL) -> torch.Tensor:
        """One id per row of logits [B, V] (int64 [B], on the device; NOT_FINITE where a row has NaN/inf).

        `slots` int64 [B] names each row's settings; each slot's drawn count, last token and penalty set are
        updated in place. `plan` (from `plan(host slots)`) skips what no row needs; GENERAL (the default) serves
        any settings. No host sync unless `plan.probe`: capturable in a CUDA graph.
        """
        if plan.head or not plan.draw:
            return kernels.sample_rows(logits, slots, self.tables, penalty=plan.penalty, draw=plan.draw,
                                       head=plan.head)
        logits, finite = penalised_logits(logits, slots, self.tables, plan.penalty)
        temperature = self.temperature[slots]
        sampling = temperature > 0
        drawn = self._draw(logits, torch.where(sampling, temperature, 1.0), slots, plan.probe)
        ids = torch.where(sampling, drawn, logits.argmax(dim=-1))
        return record_draws(ids, finite, slots, self.tables)

    def _draw(self, logits: torch.Tensor, temperature: torch.Tensor, slots: torch.Tensor, probe: bool) -> torch.Tensor:
        """argmax over the kept tokens of (logit / temperature - log E): an exact sample of the filtered
        distribution, sorting the whole vocabulary unless `probe` finds the kept tokens in each row's HEAD.
        temperature [B] > 0 (rows that do not sample pass 1: their draw is discarded)."""
        top_k, top_p = self.top_k[slots], self.top_p[slots]
        tempered = logits / temperature[:, None]
        if probe:
            values, candidates = torch.topk(tempered, min(HEAD, tempered.shape[1]))  # [B, HEAD], sorted
            drop = drop_outside_nucleus(values, top_k, top_p, torch.logsumexp(tempered, dim=-1, keepdim=True))
            # When the head's last candidate is dropped, so is every token after it (top-k and top-p cut a
            # sorted row at one point): the head holds every kept token.
            if bool((drop[:, -1] & (top_k <= values.shape[1])).all()):
                scores = values.masked_fill(drop, float("-inf")) - self.log_exponential_noise(slots, candidates)
                return candidates.gather(1, scores.argmax(dim=-1, keepdim=True))[:, 0]
        filtered = filter_logits(tempered, torch.ones_like(top_p), top_k, top_p)
        return (filtered - self.log_exponential_noise(slots)).argmax(dim=-1)
