"""The engine: one model, one state pool, one scheduler, one thread stepping every active session.

    engine = Engine(model, tokenizer, EngineConfig(max_sessions=16))
    session = engine.open()                  # or engine.load(path)
    for event in session.send("hi", params): ...

Everything that touches the pool or the scheduler runs on the engine thread between two steps (callers'
requests go through an inbox and wait for their result), so a request waits at most one step and no state
is read or written mid-step. Without a thread (`threaded=False`: tests, single-user scripts), requests run
at once and iterating a reply drives the steps.
"""

from __future__ import annotations

import secrets
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from tnllm.engine.graphs import DecodeGraphs, PrefillGraphs
from tnllm.engine.pool import pool_for
from tnllm.engine.sampler import BatchSampler
from tnllm.engine.scheduler import Scheduler
from tnllm.engine.session import Reply, Session, Snapshot, read_session_file, write_session_file
from tnllm.model import TransNormerLLM
from tnllm.sampling import SamplingParams
from tnllm.streaming import TextStreamer
from tnllm.tokenizer import Tokenizer

# Prompt tokens read per step, per (device, weights): (while other sessions decode, while none does). While others
# decode, each step's chunk rides in their decode step (packed) and delays their next token by its compute. On an
# H200 at the 7B shape, a 32k-token prompt arriving while 8 sessions decode raised their ms/token 1.31x with
# 128-id chunks of a bf16 model (read in 1.8 s) and 1.71x with 256 (1.2 s); with int8 weights a packed row costs
# more (the int8 tiles add the conversion to tensor-core-bound products): 2.97x at 128, 2.50x at 64, 1.67x at 32
# (2.7 s) (bench/results/engine-h200.json, docs/engine.md#chunked-prefill). Alone, a prompt reads in large
# chunks. The CPU keeps 512 for both (a chunk there costs its compute, not its launches). Weights without a row
# of their own take their device's float row; a device without a row takes the CPU's.
PREFILL_BUDGETS = {("cuda", "none"): (128, 4096), ("cuda", "int8"): (32, 4096), ("cpu", "none"): (512, 512)}


def prefill_budgets(device_type: str, quant_method: str = "none") -> tuple[int, int]:
    """The default (prefill_budget, solo_prefill_budget) for a model on `device_type` with `quant_method` weights."""
    return PREFILL_BUDGETS.get((device_type, quant_method),
                               PREFILL_BUDGETS.get((device_type, "none"), PREFILL_BUDGETS[("cpu", "none")]))


@dataclass(frozen=True)
class EngineConfig:
    """max_sessions: pool slots (sessions open at once); prefill_budget: prompt tokens read per step while
    other sessions decode (the chunk a long prompt advances by between two of their tokens), and
    solo_prefill_budget: per step while none does (None: `prefill_budgets` of the device and weights); cuda_graphs:
    captured decode per batch bucket (None = on for a CUDA model; eager otherwise); sample_in_graph: the
    sampler inside the captured step; prefill_graph: chunks up to `prefill_budget` ids captured too (None = with
    cuda_graphs); overlap: hand out a step's ids while the next step runs on the GPU (None = with cuda_graphs;
    see tnllm/engine/scheduler.py); pack_chunks: a prompt chunk read while others decode rides in the decode
    step's forward (one read of the weights for both; see tnllm/engine/scheduler.py); threaded: run steps on an
    engine thread."""

    max_sessions: int = 16
    prefill_budget: int | None = None
    solo_prefill_budget: int | None = None
    cuda_graphs: bool | None = None
    sample_in_graph: bool = True
    prefill_graph: bool | None = None
    overlap: bool | None = None
    pack_chunks: bool = True
    threaded: bool = True


class Engine:
    """Owns generation for one model: open/load sessions, submit replies, step them all together."""

    def __init__(self, model: TransNormerLLM, tokenizer: Tokenizer, config: EngineConfig = EngineConfig(),
                 eos_ids: set[int] | None = None):
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.pool = pool_for(model, config.max_sessions)
        pack = getattr(model, "pack_weights", None)  # the device's fast layout for the products, where it has one
        if pack is not None:
            pack()
        defaults = prefill_budgets(self.pool.device.type, getattr(model, "quant_method", "none"))
        budget = config.prefill_budget or defaults[0]
        solo_budget = config.solo_prefill_budget or defaults[1]
        if budget < 1 or solo_budget < 1:
            raise ValueError(f"prefill budgets must be >= 1, got {budget} and {solo_budget}")
        self.sampler = BatchSampler(config.max_sessions + 1, model.config.vocab_size, self.pool.device)
        # Not capturable: a model whose step other processes must join (tensor parallel), or one whose products
        # read values on the host (bitsandbytes LLM.int8).
        capturable = self.pool.device.type == "cuda" and getattr(model, "capturable", True)
        graphs = config.cuda_graphs if config.cuda_graphs is not None else capturable
        decoder = (DecodeGraphs(model, self.pool, self.sampler, config.max_sessions, config.sample_in_graph)
                   if graphs else None)
        prefill_graph = config.prefill_graph if config.prefill_graph is not None else graphs
        chunk_graph = PrefillGraphs(model, self.pool, budget, config.max_sessions) if prefill_graph else None
        eos = {model.config.eos_token_id} if eos_ids is None else set(eos_ids)
        overlap = config.overlap if config.overlap is not None else graphs
        self.scheduler = Scheduler(model, self.pool, self.sampler, eos, (budget, solo_budget), decoder, chunk_graph,
                                   overlap, config.pack_chunks)
        self.threaded = config.threaded
        self._cond = threading.Condition()
        self._inbox: list[tuple[Callable[[], Any], Future]] = []
        self._stopping = False
        self._thread = None
        if self.threaded:
            self._thread = threading.Thread(target=self._serve, name="tnllm-engine", daemon=True)
            self._thread.start()

    # -- public requests ---------------------------------------------------------------------------
    def open(self) -> Session:
        """A new session in a fresh (zeroed) slot; raises `PoolFullError` when every slot is taken."""
        return self._call(lambda: Session(self, self.pool.acquire()))

    def load(self, path: str | Path) -> Session:
        """A session saved by `Session.save`, in a new slot."""
        state, history, pending = read_session_file(path, self.model.config)

        def load_into_slot() -> Session:
            slot = self.pool.acquire()
            self.pool.write(slot, state)
            return Session(self, slot, history, pending)

        return self._call(load_into_slot)

    def submit(self, session: Session, prompt: list[int], params: SamplingParams,
               time_limit_s: float | None = None) -> Reply:
        """Start a reply reading `prompt` into the session's state (use `Session.send` / `feed_ids`)."""
        if not prompt:
            raise ValueError("a reply needs at least one prompt token")
        # Checked here, on the caller's thread: on CUDA an id past the embedding is a device-side assert that
        # takes down every session of the process, not an error for this reply.
        vocab = self.model.config.vocab_size
        if min(prompt) < 0 or max(prompt) >= vocab:
            bad = next(i for i in prompt if not 0 <= i < vocab)
            raise ValueError(f"prompt id {bad} is outside the model's vocabulary (0..{vocab - 1}): the tokenizer "
                             "does not belong to this model")
        deadline = None if time_limit_s is None else time.monotonic() + time_limit_s
        seed = secrets.randbits(62) if params.seed is None else params.seed

        def admit() -> Reply:
            self._check_idle(session)
            reply = Reply(session, prompt, params, deadline, TextStreamer(self.tokenizer, params.stop))
            self.sampler.configure(session.slot, params, seed, prompt)
            session.reply = reply
            self.scheduler.add(reply)
            return reply

        return self._call(admit)

    def fork(self, session: Session) -> Session:
        """A copy of an idle session in a new slot."""
        def fork_slot() -> Session:
            self._check_idle(session)
            slot = self.pool.acquire()
            self.pool.copy(session.slot, slot)
            return Session(self, slot, list(session.history), list(session.pending))

        return self._call(fork_slot)

    def save(self, session: Session, path: str | Path) -> None:
        """Write an idle session's state and ids to one safetensors file."""
        def save_slot() -> None:
            self._check_idle(session)
            write_session_file(path, self.pool.read(session.slot), session.history, session.pending)

        self._call(save_slot)

    def snapshot(self, session: Session) -> Snapshot:
        """A copy of an idle session's state and ids, kept outside the pool (for undo)."""
        def take() -> Snapshot:
            self._check_idle(session)
            return Snapshot(self.pool.read(session.slot), tuple(session.history), tuple(session.pending))

        return self._call(take)

    def restore(self, session: Session, snapshot: Snapshot) -> None:
        """Put an idle session back to a snapshot (taken from it or from another session of this engine)."""
        def put() -> None:
            self._check_idle(session)
            self.pool.write(session.slot, snapshot.state)
            session.history, session.pending = list(snapshot.history), list(snapshot.pending)

        self._call(put)

    def reset(self, session: Session, pending: list[int] | None = None) -> None:
        """Empty an idle session's state; `pending` ids (if any) are read with its next message."""
        def clear() -> None:
            self._check_idle(session)
            self.pool.clear(session.slot)
            session.history, session.pending = [], list(pending or [])

        self._call(clear)

    def close(self, session: Session) -> None:
        """Cancel the session's reply (if any) and free its slot; closing twice is a no-op."""
        def close_slot() -> None:
            if session.closed:
                return
            if session.reply is not None:
                self.scheduler.finish(session.reply, "cancelled")
            self.pool.release(session.slot)
            session.closed = True

        self._call(close_slot)

    @property
    def captured_graphs(self) -> int:
        """How many CUDA graphs the engine holds (decode and packed steps, prefill pieces)."""
        scheduler = self.scheduler
        return (len(scheduler.decoder.graphs) if scheduler.decoder is not None else 0) + (
            len(scheduler.prefill_graph.pieces) if scheduler.prefill_graph is not None else 0)

    def precapture(self, params: SamplingParams, prefill_pieces: bool = True) -> int:
        """Capture now every graph that steps of replies sampled with `params` can need: the decode step and the
        packed step (decode rows plus a prompt chunk) of every batch bucket, and (prefill_pieces) every prefill
        piece of every bucket. Otherwise a graph is captured the first time a step needs it, and that step, with
        every session in it, waits for the capture (a few forwards). Returns how many graphs were captured (0
        without graphs). Each graph keeps its own activation memory on the GPU: the pieces of every bucket hold
        up to max_sessions × prefill_budget tokens' activations each, too many for a 7B model with the
        16,384-token budget the benchmarks use, which is why decode-only callers leave them out."""
        def capture() -> int:
            scheduler, before = self.scheduler, self.captured_graphs
            if scheduler.decoder is not None:
                plan = self.sampler.plan_for([params])
                scheduler.decoder.capture_all(plan)
                if scheduler.pack_chunks:
                    scheduler.decoder.capture_all(plan, chunk=scheduler.prefill_budget)
            if scheduler.prefill_graph is not None and prefill_pieces:
                scheduler.prefill_graph.capture_all()
            return self.captured_graphs - before

        return self._call(capture)

    def step(self) -> None:
        """One scheduler step (threadless engines; the engine thread calls it by itself)."""
        if self.threaded:
            raise RuntimeError("this engine steps on its own thread")
        self.scheduler.step()

    def run_until_idle(self) -> None:
        """Step until no reply is active (threadless engines)."""
        while self.scheduler.busy:
            self.step()

    def shutdown(self) -> None:
        """Stop the engine thread (active replies stay unfinished)."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()

    # -- engine thread -----------------------------------------------------------------------------
    def _check_idle(self, session: Session) -> None:
        if session.closed:
            raise RuntimeError("session is closed")
        if session.reply is not None:
            raise RuntimeError("a reply is still streaming in this session: cancel it first")

    def _call(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` between two steps (on the engine thread when there is one) and return its result."""
        if not self.threaded or threading.current_thread() is self._thread:
            return fn()
        future: Future = Future()
        with self._cond:
            if self._stopping:
                raise RuntimeError("engine is shut down")
            self._inbox.append((fn, future))
            self._cond.notify()
        return future.result()

    def _serve(self) -> None:
        while True:
            with self._cond:
                while not self._inbox and not self.scheduler.busy and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                calls, self._inbox = self._inbox, []
            for fn, future in calls:
                try:
                    future.set_result(fn())
                except Exception as exc:  # noqa: BLE001 (handed to the caller)
                    future.set_exception(exc)
            self.scheduler.step()


def single_reply(model: TransNormerLLM, tokenizer: Tokenizer, text: str, params: SamplingParams) -> Reply:
    """A finished chat reply to `text` from a fresh single-session engine without a thread (scripts, tests,
    benchmarks): the reply a new chat gets for its first message."""
    engine = Engine(model, tokenizer, EngineConfig(max_sessions=1, threaded=False))
    return engine.open().send(text, params).wait()
