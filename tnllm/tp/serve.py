"""Generation under tensor parallelism: rank 0 drives, the other ranks follow.

Only rank 0 decides anything: it owns the tokenizer, the UI, the sampling (temperature, top-p,
repetition penalty, seeds), stop strings, eos and cancellation. Every call it makes on the model is
first broadcast as a small command - op, state id, shape, and the token ids themselves (inline for
up to 64 ids, so a decode step of batch <= 64 costs one broadcast of 70 int64) - and then executed
by all ranks in the same order, so the collectives inside the forward always pair up. Sampled ids
reach the followers as the input of the next forward: "rank 0 samples and broadcasts the token".
The alternative (every rank samples with the same seeded generator) was rejected: it needs the full
logits, the sampling settings, the repetition history, stop strings and the user's cancel on every
rank, and any divergence (a top-p tie resolved differently, a UI event seen by one rank) silently
desynchronises the collectives.

On rank 0, `DrivenModel` looks like a `TransNormerLLM` to the engine (`model(ids, state,
logits_to_keep)`, `allocate_state`, `config`, `lm_head`) and gives it a `DrivenPool`, whose slot operations
and forwards over slots run on every rank, so `tnllm.engine.Engine` serves it unchanged (eagerly: a CUDA
graph captured on rank 0 alone cannot hold the other ranks' collectives). `DrivenGraph` steps a graph captured
on every rank (bench/tp.py). Its states are `DrivenState`s: the local heads' tensors plus an id naming the
same state on every rank.

    def main(model):                       # rank 0 only; model is a DrivenModel
        engine = Engine(model, tokenizer)
        ...
    serve("DIR", main, dtype="bf16")       # every rank: torchrun --nproc-per-node N your_script.py

Thread-safe: one lock around each command (Gradio runs handlers in worker threads). A follower that
fails (e.g. out of memory) leaves rank 0 waiting until the process group's timeout.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from tnllm.checkpoint import default_dtype
from tnllm.engine.pool import StatePool
from tnllm.state import RecurrentState, SlotState
from tnllm.tp.comm import TPGroup, init_tp
from tnllm.tp.load import load_tp_model
from tnllm.tp.model import TPTransNormerLLM

(STOP, FORWARD, ALLOC, FREE, CLONE, RESET, GRAPH_NEW, GRAPH_LOAD, GRAPH_STEP, GRAPH_STORE,
 FORWARD_SLOTS, SLOT_CLEAR, SLOT_COPY, SLOT_READ, SLOT_WRITE) = range(15)
HEADER = 6  # op, sid, a, b, c, n_payload
INLINE = 64  # token ids carried inside the command buffer itself


class Executor:
    """Runs commands on one rank's shard; holds that rank's states and graphs by id (all ranks alike)."""

    def __init__(self, model: TPTransNormerLLM):
        self.model = model
        self.states: dict[int, RecurrentState] = {}
        self.graphs: dict[int, object] = {}

    @torch.inference_mode()
    def run(self, op: int, sid: int, a: int, b: int, c: int, ids: torch.Tensor | None):
        """Execute one command (numbered as at the top of this module) on this rank's shard.
        Returns the logits of a forward or a graph step, else None; an unknown op below FORWARD_SLOTS raises."""
        if op >= FORWARD_SLOTS:  # the engine's slot pool: sid = the pool's state
            return self._run_pool(op, StatePool.over(self.states[sid]), a, b, c, ids)
        handler = self._HANDLERS.get(op)
        if handler is None:
            raise ValueError(f"unknown TP command {op}")
        return handler(self, sid, a, b, c, ids)

    def _stop(self, sid, a, b, c, ids):
        """STOP: nothing to do here (the follower loop ends on it)."""
        return None

    def _forward(self, sid, a, b, c, ids):
        """FORWARD: ids [a, b]; c = logits_to_keep; sid -1 = no state."""
        return self.model(ids.view(a, b), self.states[sid] if sid >= 0 else None, logits_to_keep=c)

    def _alloc(self, sid, a, b, c, ids):
        """ALLOC: a new state named sid for a batch of a."""
        self.states[sid] = self.model.allocate_state(a)

    def _free(self, sid, a, b, c, ids):
        """FREE: drop the state named sid (if any)."""
        self.states.pop(sid, None)

    def _clone(self, sid, a, b, c, ids):
        """CLONE: a = new id, a copy of state sid."""
        self.states[a] = self.states[sid].clone()

    def _reset(self, sid, a, b, c, ids):
        """RESET: zero the state named sid."""
        self.states[sid].reset()

    def _graph_new(self, sid, a, b, c, ids):
        """GRAPH_NEW: sid = graph id, a = batch size."""
        self.graphs[sid] = new_graph(self.model, a)

    def _graph_load(self, sid, a, b, c, ids):
        """GRAPH_LOAD: a = state id, loaded into graph sid."""
        self.graphs[sid].load(self.states[a])

    def _graph_store(self, sid, a, b, c, ids):
        """GRAPH_STORE: graph sid's state stored into state a."""
        self.graphs[sid].store(self.states[a])

    def _graph_step(self, sid, a, b, c, ids):
        """GRAPH_STEP: one decode step of graph sid on ids [a, 1]."""
        return self.graphs[sid].step(ids.view(a, 1))

    _HANDLERS = {
        STOP: _stop, FORWARD: _forward, ALLOC: _alloc, FREE: _free, CLONE: _clone, RESET: _reset,
        GRAPH_NEW: _graph_new, GRAPH_LOAD: _graph_load, GRAPH_STEP: _graph_step, GRAPH_STORE: _graph_store,
    }

    def _run_pool(self, op: int, pool: StatePool, a: int, b: int, c: int, ids: torch.Tensor | None):
        if op == FORWARD_SLOTS:  # ids: a * b token ids then the a rows' slots; c = logits_to_keep
            return self.model(ids[:a * b].view(a, b), pool.rows(ids[a * b:]), logits_to_keep=c)
        if op == SLOT_CLEAR:
            pool.clear(a)
        elif op == SLOT_COPY:
            pool.copy(a, b)
        elif op == SLOT_READ:  # slot a -> a new state named b
            self.states[b] = pool.read(a)
        elif op == SLOT_WRITE:  # the state named b -> slot a
            pool.write(a, self.states[b])
        return None


def new_graph(model: TPTransNormerLLM, batch_size: int):
    """`tnllm.cuda_graph.GraphedDecoder` on the shard: its NCCL collectives are captured in the graph.
    All ranks capture together; pending collectives are drained first (nothing for NCCL's watchdog
    to query during the capture)."""
    from tnllm.cuda_graph import GraphedDecoder

    torch.cuda.synchronize()
    model.tp.barrier()
    return GraphedDecoder(model, batch_size)


class Driver:
    """Rank 0's side: broadcast a command, then execute it locally like every follower does."""

    def __init__(self, model: TPTransNormerLLM):
        self.model, self.tp = model, model.tp
        self.executor = Executor(model)
        self.buf = torch.zeros(HEADER + INLINE, dtype=torch.long, device=self.tp.device)
        self.lock = threading.RLock()
        self._next_id = 0
        self._dead: list[int] = []  # ids of collected DrivenStates, freed with the next command

    def new_id(self) -> int:
        with self.lock:
            self._next_id += 1
            return self._next_id

    def command(self, op: int, sid: int = -1, a: int = 0, b: int = 0, c: int = 0,
                ids: torch.Tensor | None = None):
        with self.lock:
            while self._dead and op != STOP:
                dead = self._dead.pop()
                self._send(FREE, dead)
                self.executor.run(FREE, dead, 0, 0, 0, None)
            ids = None if ids is None else ids.to(self.tp.device, torch.long).reshape(-1)
            self._send(op, sid, a, b, c, ids)
            if ids is not None and ids.numel() <= INLINE:
                ids = self.buf[HEADER:HEADER + ids.numel()]  # run on exactly what the followers got
            return self.executor.run(op, sid, a, b, c, ids)

    def _send(self, op: int, sid: int, a: int = 0, b: int = 0, c: int = 0, ids: torch.Tensor | None = None) -> None:
        n = 0 if ids is None else ids.numel()
        self.buf[:HEADER].copy_(torch.tensor([op, sid, a, b, c, n], dtype=torch.long))
        if 0 < n <= INLINE:
            self.buf[HEADER:HEADER + n].copy_(ids)
        self.tp.broadcast(self.buf)
        if n > INLINE:
            self.tp.broadcast(ids.contiguous())

    def forget(self, sid: int) -> None:
        """Called when a DrivenState is garbage-collected (any thread): free it at the next command."""
        self._dead.append(sid)

    def stop(self) -> None:
        """Release the followers (they return from `follow`)."""
        self.command(STOP)


def follow(model: TPTransNormerLLM) -> None:
    """Ranks > 0: execute rank 0's commands until it sends STOP."""
    tp, executor = model.tp, Executor(model)
    buf = torch.zeros(HEADER + INLINE, dtype=torch.long, device=tp.device)
    while True:
        tp.broadcast(buf)
        op, sid, a, b, c, n = buf[:HEADER].tolist()
        if op == STOP:
            return
        ids = None
        if n:
            ids = buf[HEADER:HEADER + n] if n <= INLINE else tp.broadcast(torch.empty(n, dtype=torch.long,
                                                                                       device=tp.device))
        executor.run(op, sid, a, b, c, ids)


class DrivenState(RecurrentState):
    """Rank 0's view of a state split over all ranks: its own heads' kv + positions, and the id that
    names the same state on the followers. Fork with `clone()`, clear with `reset()`."""

    def __init__(self, driver: Driver, sid: int):
        local = driver.executor.states[sid]
        super().__init__(local.kv, local.positions)
        self.driver, self.sid = driver, sid
        weakref.finalize(self, driver.forget, sid)

    def clone(self) -> "DrivenState":
        sid = self.driver.new_id()
        self.driver.command(CLONE, self.sid, sid)
        return DrivenState(self.driver, sid)

    def reset(self) -> None:
        self.driver.command(RESET, self.sid)

    def _unsupported(self, *args, **kwargs):
        raise NotImplementedError("a tensor-parallel state lives on all ranks: use clone() / reset() only")

    select = to = save = copy_ = tensors = _unsupported  # tensors(): a session file would hold one rank's heads


class DrivenModel:
    """Rank 0's stand-in for a `TransNormerLLM`: same call, same `allocate_state`, runs on all ranks."""

    def __init__(self, driver: Driver):
        self.driver = driver
        self.shard = driver.model
        self.config = self.shard.full_config
        self.lm_head = self.shard.lm_head  # generation reads .weight.device
        self.tp = driver.tp

    capturable = False  # every rank must join each step: the engine's CUDA graphs cannot capture it

    def allocate_pool(self, size: int) -> "DrivenPool":
        """The engine's slot pool, kept alike on every rank."""
        return DrivenPool(self, size)

    def allocate_state(self, batch_size: int = 1) -> DrivenState:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        sid = self.driver.new_id()
        self.driver.command(ALLOC, sid, batch_size)
        return DrivenState(self.driver, sid)

    def __call__(self, input_ids: torch.Tensor, state: DrivenState | DrivenSlots | None = None,
                 logits_to_keep: int = 0):
        """input_ids [B, T] -> logits [B, T', V] (full vocabulary), state advanced on every rank."""
        if input_ids.dim() != 2 or input_ids.numel() == 0:  # validate before any rank starts
            raise ValueError(f"input_ids must be a non-empty [B, T], got shape {tuple(input_ids.shape)}")
        self._check_ids(input_ids)
        B, T = input_ids.shape
        if isinstance(state, DrivenSlots):
            if state.batch_size != B:
                raise ValueError(f"{state.batch_size} slots but input_ids has batch {B}")
            payload = torch.cat([input_ids.reshape(-1), state.slots])
            return self.driver.command(FORWARD_SLOTS, state.sid, B, T, logits_to_keep, payload)
        if state is not None and not isinstance(state, DrivenState):
            raise TypeError("under TP, states must come from DrivenModel.allocate_state (or their clone())")
        if state is not None and state.batch_size != input_ids.shape[0]:
            raise ValueError(f"state holds {state.batch_size} sequences but input_ids has batch {input_ids.shape[0]}")
        return self.driver.command(FORWARD, -1 if state is None else state.sid, B, T, logits_to_keep, input_ids)

    def _check_ids(self, input_ids: torch.Tensor) -> None:
        if int(input_ids.min()) < 0 or int(input_ids.max()) >= self.config.vocab_size:
            raise ValueError(f"token ids must lie in [0, {self.config.vocab_size})")

    def parameters(self):
        return self.shard.parameters()

    def num_parameters(self) -> int:
        """Parameters of the whole model (this shard's count is `shard.num_parameters()`)."""
        return sum(p.numel() for p in _meta_full(self.config).parameters())


class DrivenSlots(SlotState):
    """Rows of a `DrivenPool` as the model reads them: the slots plus the id naming the pool on every rank."""

    def __init__(self, pool: "DrivenPool", slots: torch.Tensor):
        super().__init__(pool.kv, pool.positions, slots)
        self.sid = pool.state.sid


class DrivenPool(StatePool):
    """The engine's slot pool under tensor parallelism: every rank holds its heads' share of each slot, and
    every change to a slot (clear, copy, read, write, a forward over slots) is a command all ranks run."""

    supports_packing = False  # a packed forward is not among the commands the ranks run

    def __init__(self, model: DrivenModel, size: int):
        self.driver = model.driver
        super().__init__(model, size)  # model.allocate_state: a DrivenState, allocated on every rank

    def _command(self, op: int, a: int = 0, b: int = 0) -> None:
        self.driver.command(op, self.state.sid, a, b)

    def clear(self, slot: int) -> None:
        self._command(SLOT_CLEAR, slot)

    def copy(self, src: int, dst: int) -> None:
        self._command(SLOT_COPY, src, dst)

    def read(self, slot: int) -> DrivenState:
        """A copy of the slot on every rank (a `DrivenState`; save() is not supported)."""
        sid = self.driver.new_id()
        self._command(SLOT_READ, slot, sid)
        return DrivenState(self.driver, sid)

    def write(self, slot: int, state: RecurrentState) -> None:
        if not isinstance(state, DrivenState):
            raise TypeError("under tensor parallelism a slot can only be written from a state of this pool "
                            "(session files hold a whole state and load on one GPU only)")
        self._command(SLOT_WRITE, slot, state.sid)

    def rows(self, slots: torch.Tensor) -> DrivenSlots:
        return DrivenSlots(self, slots)


def _meta_full(config):
    from tnllm.model import TransNormerLLM

    with torch.device("meta"):
        return TransNormerLLM(config)


class DrivenGraph:
    """A CUDA-graph decoder on every rank, driven from rank 0 (bench/tp.py steps it; chat over TP decodes eagerly)."""

    def __init__(self, model: DrivenModel, batch_size: int = 1):
        self.driver = model.driver
        self.gid = self.driver.new_id()
        self.driver.command(GRAPH_NEW, self.gid, batch_size)
        self.batch_size = batch_size

    def load(self, state: DrivenState) -> None:
        self.driver.command(GRAPH_LOAD, self.gid, state.sid)

    def store(self, state: DrivenState) -> None:
        self.driver.command(GRAPH_STORE, self.gid, state.sid)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, 1] -> the graph's static logits [B, V] (copy to keep)."""
        return self.driver.command(GRAPH_STEP, self.gid, self.batch_size, 1, 0, tokens)


def serve(path_or_repo_id: str | Path, main: Callable[[DrivenModel], object], *,
          dtype: torch.dtype | str | None = None, vocab_parallel: bool = True, tp: TPGroup | None = None):
    """Every rank calls this under torchrun: load the shard (`dtype` None: `default_dtype` of the rank's
    device), then rank 0 runs `main(DrivenModel)` while the others follow; when `main` returns (or raises)
    the followers are released. Returns main's result on rank 0, None elsewhere."""
    tp = tp or init_tp()
    model = load_tp_model(path_or_repo_id, tp, dtype=dtype or default_dtype(tp.device), vocab_parallel=vocab_parallel)
    if tp.rank != 0:
        follow(model)
        return None
    driver = Driver(model)
    try:
        return main(DrivenModel(driver))
    finally:
        driver.stop()


def shutdown() -> None:
    """Leave the process group (end of a torchrun script)."""
    if dist.is_initialized():
        dist.destroy_process_group()
