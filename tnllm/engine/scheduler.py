"""One engine step for every active reply: batched decode, chunked prefill, batched sampling, host bookkeeping.

    step():
      1. cancels and deadlines end their replies (the state keeps what it read);
      2. launch the device work: ONE decode step for every decoding reply (rows = their slots; the pool is
         updated in place), prefill chunks of waiting prompts, at most `prefill_budget` tokens per step while
         any reply decodes, so that a long prompt delays the decoding replies by one chunk per step instead of
         its whole length, and `solo_prefill_budget` when none does. While replies decode, the oldest prompt's
         chunk rides in the decode step's own forward (`packed_step`: one row of decode tokens and the chunk),
         so the step reads the weights once for both; on CUDA that packed step is a captured graph for chunks
         of exactly `prefill_budget` ids, and other chunks replay captured prefill pieces (`PrefillGraphs`),
         the chunks of every waiting prompt together;
         one batched sampling call (decode rows inside the decode step; prompts that finished their prefill
         here) and ONE device -> host copy of all sampled ids;
      3. host: append ids, detect eos / stop strings / max tokens, detokenise, emit events.

With `overlap` (CUDA), step 3 handles the ids of the PREVIOUS step while the GPU runs the one just launched,
so detokenising and events cost no GPU time. Its events are handed to the consumers one step later, right after
the next step is launched: consumer threads share the interpreter lock with the engine thread and take it at every
torch call or decode that releases it, so waking them while the engine launches a step or hands out ids puts their
Python on the critical path; woken after the launch, they run while the engine thread waits for the GPU. A reply's
events therefore reach its consumer one step after they happen (and at once when the engine goes idle).

A decode step needs no host input (each row's last id stays in
the sampler's device table), so the next step can be launched before the host has seen its ids; the price is
that a reply ending on an id has already been fed that id by the step in flight, and that step's own id for it
is dropped (`Reply.fed_sampled` counts what the state read). Without overlap (CPU), steps 2 and 3 run back to
back: launching ahead there would only delay each token by one step's compute.

A row whose logits hold NaN/inf ends only its own reply ("numerical_error", its state reset).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from tnllm.engine.pool import StatePool, upload_ids
from tnllm.engine.sampler import GENERAL, NOT_FINITE, BatchSampler, SamplePlan
from tnllm.engine.session import Reply
from tnllm.model import TransNormerLLM

log = logging.getLogger(__name__)


@torch.inference_mode()
def decode_step(model: TransNormerLLM, pool: StatePool, sampler: BatchSampler, slots: torch.Tensor,
                sample: bool = True, plan: SamplePlan = GENERAL) -> torch.Tensor:
    """Feed each row's last sampled token (the sampler's table) into its slot; return the next ids [B], or the
    logits [B, V] with `sample=False` (a CUDA graph that samples outside). No host sync unless `plan.probe`."""
    tokens = sampler.last_token[slots][:, None]  # [B, 1]
    logits = model(tokens, pool.rows(slots))[:, -1]  # [B, V]
    return sampler.sample(logits, slots, plan) if sample else logits


@torch.inference_mode()
def packed_step(model: TransNormerLLM, pool: StatePool, sampler: BatchSampler, slots: torch.Tensor,
                chunk_ids: torch.Tensor, sample: bool = True,
                plan: SamplePlan = GENERAL) -> tuple[torch.Tensor, torch.Tensor]:
    """`decode_step` for the rows of slots[:-1] and a prompt chunk `chunk_ids` [1, C] read into slot slots[-1], in
    ONE forward, so the step reads the weights once for both: (next ids [n], or logits [n, V] with
    `sample=False`; the chunk's last logits [1, V])."""
    n = slots.shape[0] - 1
    tokens = torch.cat([sampler.last_token[slots[:n]], chunk_ids[0]])[None]  # [1, n + C]
    logits = model(tokens, pool.packed_rows(slots, n))[0]  # [n + 1, V]
    decode = sampler.sample(logits[:n], slots[:n], plan) if sample else logits[:n]
    return decode, logits[n:]


@dataclass
class Launched:
    """One step's device work, launched: its rows and their sampled ids on the way to the host."""

    rows: list[Reply]
    ids: torch.Tensor                     # int64 [len(rows)]: pinned host buffer (CUDA) or the ids themselves
    done: torch.cuda.Event | None = None  # recorded after the copy (CUDA)

    def host_ids(self) -> list[int]:
        """The ids, once the copy has landed (waits for this step only, not for work queued after it)."""
        if self.done is not None:
            self.done.synchronize()
        return self.ids.tolist()


class Scheduler:
    """The active replies and `step()`. Not thread-safe: the engine calls it from one thread, under its lock."""

    def __init__(self, model: TransNormerLLM, pool: StatePool, sampler: BatchSampler, eos_ids: set[int],
                 prefill_budgets: tuple[int, int], decoder=None, prefill_graph=None, overlap: bool = False,
                 pack_chunks: bool = True):
        self.model, self.pool, self.sampler = model, pool, sampler
        self.eos_ids, self.closing_eos = eos_ids, model.config.eos_token_id
        self.prefill_budget, self.solo_prefill_budget = prefill_budgets  # while others decode, and alone
        self.decoder = decoder  # CUDA graphs (`DecodeGraphs`), or None: eager `decode_step`
        self.prefill_graph = prefill_graph  # captured chunks (`PrefillGraphs`), or None: eager chunks
        self.overlap = overlap
        self.pack_chunks = pack_chunks and pool.supports_packing  # decode rows and a prompt chunk in one forward
        self.active: list[Reply] = []
        self.in_flight: Launched | None = None  # with overlap: the launched step whose ids are not handled yet
        self.outbox: list | None = None  # with overlap, inside `step`: where this step's events are held
        self._held: list = []  # the last step's events, delivered once the next step is launched
        self.steps = 0

    def slots(self, slots: list[int]) -> torch.Tensor:
        return upload_ids(slots, self.pool.device)

    def add(self, reply: Reply) -> None:
        self.active.append(reply)

    @property
    def busy(self) -> bool:
        """Replies to advance, or a launched step whose ids are still to hand out."""
        return bool(self.active) or self.in_flight is not None

    def step(self) -> None:
        """Advance every active reply by one step (see the module docstring)."""
        held, self._held = self._held, []
        self.outbox = [] if self.overlap else None
        now = time.monotonic()
        for reply in list(self.active):
            if reply.cancel_requested:
                self.finish(reply, "cancelled")
            elif reply.deadline is not None and now > reply.deadline:
                self.finish(reply, "time_limit")
        previous, self.in_flight = self.in_flight, None  # with overlap: the step launched by the last call
        try:
            launched = self._launch() if self.active else None
            self._deliver(held)  # the GPU has this step's work: consumers may run now
            if self.overlap:
                handle, self.in_flight = previous, launched
            else:
                handle = launched
            ids = handle.host_ids() if handle is not None else []
        except Exception:  # noqa: BLE001 (OOM, driver errors: those replies end, the engine keeps serving)
            log.exception("engine step failed")
            self._deliver(held)
            for reply in list(self.active):
                self.finish(reply, "error")
            handle, ids = None, []
        for reply, token in zip(handle.rows if handle is not None else [], ids, strict=True):
            if reply.finish_reason is None:  # a reply that ended after its step was launched: the id is dropped
                self._accept(reply, token)
        events, self.outbox = self.outbox or [], None
        if self.busy:
            self._held = events
        else:  # no next step to deliver them after
            self._deliver(events)

    @staticmethod
    def _deliver(events: list) -> None:
        """Hand held (reply, event) pairs to their consumers, in the order they were emitted."""
        for reply, event in events:
            reply.deliver(event)
        events.clear()

    @torch.inference_mode()
    def _launch(self) -> Launched | None:
        """Queue one step's device work and the copy of its ids to the host; None when no reply can advance."""
        self.steps += 1
        decoding = [r for r in self.active if not r.prefilling and r.launched < r.params.max_new_tokens]
        parts, rows = [], []
        ready, ready_logits = [], []
        budget = self.prefill_budget if decoding else self.solo_prefill_budget
        if decoding:
            slots = [r.session.slot for r in decoding]
            plan = self.sampler.plan(slots)
            reader, chunk = self._packable_chunk(len(slots), budget)
            if reader is not None:
                ids, logits = self._packed(slots, plan, chunk, reader.session.slot)
                parts.append(ids)
                self._advance_prompt(reader, len(chunk), logits, ready, ready_logits)
                budget -= len(chunk)
            elif self.decoder is not None and self.decoder.covers(len(slots)):
                parts.append(self.decoder.step(slots, plan))
            else:
                parts.append(decode_step(self.model, self.pool, self.sampler, self.slots(slots), plan=plan))
            for reply in decoding:
                reply.fed_sampled += 1  # the step reads the reply's last sampled id...
                reply.launched += 1     # ...and samples the next
            rows += decoding
        self._prefill(budget, ready, ready_logits)
        if ready:
            slots = [r.session.slot for r in ready]
            parts.append(self.sampler.sample(torch.cat(ready_logits), self.slots(slots), self.sampler.plan(slots)))
            for reply in ready:
                reply.launched += 1
            rows += ready
        if not rows:
            return None
        ids = torch.cat(parts)  # [len(rows)]
        if ids.device.type != "cuda":
            return Launched(rows, ids)
        host = torch.empty(ids.shape, dtype=ids.dtype, pin_memory=True)
        host.copy_(ids, non_blocking=True)  # the step's one device -> host transfer
        done = torch.cuda.Event()
        done.record()
        return Launched(rows, host, done)

    def _packable_chunk(self, n_decode: int, budget: int) -> tuple[Reply | None, list[int]]:
        """The oldest prompt's next chunk when it can ride in the decode step's forward (`packed_step`): eager
        steps pack any chunk; captured steps pack chunks of exactly `budget` ids (the captured packed length),
        so a prompt's shorter last chunk reads beside the decode step. (None, []) when nothing packs."""
        reader = next((r for r in self.active if r.prefilling), None)
        if not self.pack_chunks or reader is None:
            return None, []
        chunk = reader.prompt[reader.fed:reader.fed + budget]
        if self.decoder is not None and not (self.decoder.covers(n_decode) and len(chunk) == budget):
            return None, []
        return reader, chunk

    def _packed(self, slots: list[int], plan: SamplePlan, chunk: list[int],
                chunk_slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Launch the decode rows of `slots` and `chunk` (read into `chunk_slot`) as one forward."""
        if self.decoder is not None:
            return self.decoder.packed_step(slots, plan, chunk, chunk_slot)
        chunk_ids = upload_ids(chunk, self.pool.device)[None]  # [1, C]
        return packed_step(self.model, self.pool, self.sampler, self.slots(slots + [chunk_slot]), chunk_ids,
                           plan=plan)

    def _advance_prompt(self, reply: Reply, n: int, logits: torch.Tensor, ready: list[Reply],
                        ready_logits: list[torch.Tensor]) -> None:
        """Count a launched chunk of n prompt ids; a reply whose prompt is now fully read joins `ready` with its
        last logits [1, V], the others report progress."""
        reply.fed += n
        reply.stats.prefilled = reply.fed
        if reply.fed == len(reply.prompt):
            ready.append(reply)
            ready_logits.append(logits)
        else:
            reply.emit(outbox=self.outbox)  # prefill progress

    def _prefill(self, budget: int, ready: list[Reply], ready_logits: list[torch.Tensor]) -> None:
        """Prefill chunks within `budget` tokens, oldest prompt first (see `_advance_prompt`): the chunks the
        captured pieces cover read together (`PrefillGraphs.run`), the others one eager forward each."""
        captured: list[tuple[Reply, list[int]]] = []
        for reply in [r for r in self.active if r.prefilling]:
            if budget <= 0:
                break
            n = min(budget, len(reply.prompt) - reply.fed)
            ids = reply.prompt[reply.fed:reply.fed + n]
            budget -= n
            if self.prefill_graph is not None and self.prefill_graph.covers(n):
                captured.append((reply, ids))
                continue
            chunk = upload_ids(ids, self.pool.device)[None]  # [1, n]
            logits = self.model(chunk, self.pool.rows(self.slots([reply.session.slot])), logits_to_keep=1)[:, -1]
            self._advance_prompt(reply, n, logits, ready, ready_logits)
        if captured:
            logits = self.prefill_graph.run([(ids, reply.session.slot) for reply, ids in captured])
            for (reply, ids), last in zip(captured, logits, strict=True):
                self._advance_prompt(reply, len(ids), last, ready, ready_logits)

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
            reply.emit(piece, outbox=self.outbox)

    def finish(self, reply: Reply, reason: str, text: str = "") -> None:
        """End a reply: record what the state read into its session, emit the last event, leave the batch."""
        session = reply.session
        if reason in ("numerical_error", "error"):
            self.pool.clear(session.slot)  # the state may hold NaN or a half-applied step: start afresh
            session.history, session.pending = [], []
        else:
            written = reply.prompt[:reply.fed] + reply.sampled[:reply.fed_sampled]
            unfed = reply.prompt[reply.fed:] + reply.sampled[reply.fed_sampled:]
            closed = (session.history + written + unfed)[-1:] == [self.closing_eos]
            session.history.extend(written)
            session.pending = unfed if closed else unfed + [self.closing_eos]
        reply.finish_reason = reply.stats.finish_reason = reason
        self.active.remove(reply)
        session.reply = None
        if self.outbox is None:  # outside a step (a closed session): what is held goes first
            self._deliver(self._held)
        reply.emit(text, finish=reason, outbox=self.outbox)
