"""One engine step for every active reply: batched decode, chunked prefill, batched sampling, host bookkeeping.

    step():
      1. cancels and deadlines end their replies (the state keeps what it read);
      2. ONE decode step for every decoding reply (rows = their slots; the pool is updated in place);
      3. prefill chunks of waiting prompts, at most `prefill_budget` tokens per step while any reply decodes,
         so that a long prompt delays the decoding replies by one chunk per step instead of its whole length
         (on CUDA, chunks up to that size replay captured graphs: `PrefillGraphs`), and `solo_prefill_budget`
         when none does;
      4. one batched sampling call (decode rows inside the decode step; prompts that finished their prefill
         here) and ONE host transfer of all sampled ids;
      5. host: append ids, detect eos / stop strings / max tokens, detokenise, emit events.

A row whose logits hold NaN/inf ends only its own reply ("numerical_error", its state reset).
"""

from __future__ import annotations

import logging
import time

import torch

from tnllm.engine.pool import StatePool
from tnllm.engine.sampler import NOT_FINITE, BatchSampler
from tnllm.engine.session import Reply
from tnllm.model import TransNormerLLM

log = logging.getLogger(__name__)


@torch.inference_mode()
def decode_step(model: TransNormerLLM, pool: StatePool, sampler: BatchSampler, slots: torch.Tensor,
                sample: bool = True, host_slots: list[int] | None = None) -> torch.Tensor:
    """Feed each row's last sampled token (the sampler's table) into its slot; return the next ids [B], or the
    logits [B, V] with `sample=False` (a CUDA graph that samples outside). No host sync: capturable."""
    tokens = sampler.last_token[slots][:, None]  # [B, 1]
    logits = model(tokens, pool.rows(slots))[:, -1]  # [B, V]
    return sampler.sample(logits, slots, host_slots) if sample else logits


class Scheduler:
    """The active replies and `step()`. Not thread-safe: the engine calls it from one thread, under its lock."""

    def __init__(self, model: TransNormerLLM, pool: StatePool, sampler: BatchSampler, eos_ids: set[int],
                 prefill_budgets: tuple[int, int], decoder=None, prefill_graph=None):
        self.model, self.pool, self.sampler = model, pool, sampler
        self.eos_ids, self.closing_eos = eos_ids, model.config.eos_token_id
        self.prefill_budget, self.solo_prefill_budget = prefill_budgets  # while others decode, and alone
        self.decoder = decoder  # CUDA graphs (`DecodeGraphs`), or None: eager `decode_step`
        self.prefill_graph = prefill_graph  # captured chunks (`PrefillGraphs`), or None: eager chunks
        self.active: list[Reply] = []
        self.steps = 0

    def slots(self, slots: list[int]) -> torch.Tensor:
        return torch.tensor(slots, dtype=torch.long, device=self.pool.device)

    def add(self, reply: Reply) -> None:
        self.active.append(reply)

    def step(self) -> None:
        """Advance every active reply by one step (see the module docstring)."""
        now = time.monotonic()
        for reply in list(self.active):
            if reply.cancel_requested:
                self.finish(reply, "cancelled")
            elif reply.deadline is not None and now > reply.deadline:
                self.finish(reply, "time_limit")
        if not self.active:
            return
        self.steps += 1
        decoding = [r for r in self.active if not r.prefilling]
        try:
            rows, ids = self._run(decoding)
        except Exception:  # noqa: BLE001 (OOM, driver errors: those replies end, the engine keeps serving)
            log.exception("engine step failed")
            for reply in list(self.active):
                self.finish(reply, "error")
            return
        for reply, token in zip(rows, ids, strict=True):
            self._accept(reply, token)

    @torch.inference_mode()
    def _run(self, decoding: list[Reply]) -> tuple[list[Reply], list[int]]:
        """Device work of one step: (replies that sampled a token, their ids after the one host transfer)."""
        parts, rows = [], []
        if decoding:
            slots = [r.session.slot for r in decoding]
            if self.decoder is not None and self.decoder.covers(len(slots)):
                parts.append(self.decoder.step(slots))
            else:
                parts.append(decode_step(self.model, self.pool, self.sampler, self.slots(slots), host_slots=slots))
            rows += decoding
        ready, ready_logits = self._prefill(self.prefill_budget if decoding else self.solo_prefill_budget)
        if ready:
            slots = [r.session.slot for r in ready]
            parts.append(self.sampler.sample(torch.cat(ready_logits), self.slots(slots), slots))
            rows += ready
        return rows, (torch.cat(parts).tolist() if parts else [])  # the step's one device -> host transfer

    def _prefill(self, budget: int) -> tuple[list[Reply], list[torch.Tensor]]:
        """Prefill chunks within `budget` tokens, oldest prompt first; returns the replies whose prompt is now
        fully read and their last logits [1, V]."""
        ready, ready_logits = [], []
        for reply in [r for r in self.active if r.prefilling]:
            if budget <= 0:
                break
            n = min(budget, len(reply.prompt) - reply.fed)
            ids = reply.prompt[reply.fed:reply.fed + n]
            if self.prefill_graph is not None and self.prefill_graph.covers(n):
                logits = self.prefill_graph.run(ids, reply.session.slot)
            else:
                chunk = torch.tensor([ids], device=self.pool.device)  # [1, n]
                logits = self.model(chunk, self.pool.rows(self.slots([reply.session.slot])), logits_to_keep=1)[:, -1]
            reply.fed += n
            reply.stats.prefilled = reply.fed
            budget -= n
            if reply.fed == len(reply.prompt):
                ready.append(reply)
                ready_logits.append(logits)
            else:
                reply.emit()  # prefill progress
        return ready, ready_logits

    def _accept(self, reply: Reply, token: int) -> None:
        """Host side of one sampled id."""
        if token == NOT_FINITE:
            self.finish(reply, "numerical_error")
            return
        reply.sampled.append(token)
        stats, now = reply.stats, time.perf_counter()
        if stats.new_tokens == 0:
            stats.ttft_s = now - reply.submitted
        stats.new_tokens += 1
        stats.decode_s = now - reply.submitted - stats.ttft_s
        if token in self.eos_ids:
            self.finish(reply, "eos", reply.streamer.flush())
            return
        piece = reply.streamer.push(token)
        if reply.streamer.stopped:
            self.finish(reply, "stop", piece)
        elif stats.new_tokens == reply.params.max_new_tokens:
            self.finish(reply, "length", piece + reply.streamer.flush())
        else:
            reply.emit(piece)

    def finish(self, reply: Reply, reason: str, text: str = "") -> None:
        """End a reply: record what the state read into its session, emit the last event, leave the batch."""
        session = reply.session
        if reason in ("numerical_error", "error"):
            self.pool.clear(session.slot)  # the state may hold NaN or a half-applied step: start afresh
            session.history, session.pending = [], []
        else:
            session.history.extend(reply.prompt[:reply.fed] + reply.sampled[:-1])
            unfed = reply.prompt[reply.fed:] if not reply.sampled else reply.sampled[-1:]
            session.pending = unfed if unfed[-1:] == [self.closing_eos] else unfed + [self.closing_eos]
        reply.finish_reason = reply.stats.finish_reason = reason
        self.active.remove(reply)
        session.reply = None
        reply.emit(text, finish=reason)
