"""CUDA: the decode step captured once per batch-size bucket and sampling plan, and prefill pieces
(`PrefillGraphs`), replayed.

A step with n decoding rows replays the smallest bucket >= n; rows n.. of the bucket point at the pool's
sink slot 0, and the whole slot buffer is rewritten every replay (a static buffer would otherwise keep the
slots of an earlier, larger batch). Each graph holds embedding -> layers -> head, and (by default) the
sampler, so a step is one replay; with `sample_in_graph=False` the graph ends at the logits and the
sampler runs eagerly after it (measured by bench/engine_gpu.py). Batches above the largest bucket run eager.
The packed step (decode rows plus a prompt chunk of `prefill_budget` ids in one forward) is captured the same
way, per (bucket, plan, chunk length), with the chunk's slot after the bucket's rows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from tnllm.engine.pool import SINK_SLOT, StatePool
from tnllm.engine.sampler import GENERAL, BatchSampler, SamplePlan
from tnllm.engine.scheduler import decode_step, packed_step
from tnllm.model import TransNormerLLM


def bucket_sizes(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then every 8 (16, 24, ...) up to `max_batch`, which is always the last bucket."""
    sizes = [b for b in (1, 2, 4, 8) if b < max_batch] + list(range(16, max_batch, 8))
    return sizes + [max_batch]


def capture_cuda_graph(run: Callable[[], torch.Tensor], warmup: int) -> tuple[Callable[[], None], torch.Tensor]:
    """(replay, static output) of `run` captured in a CUDA graph after `warmup` eager calls on a side stream
    (Triton compilation and allocator growth stay outside the capture)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.inference_mode():
        for _ in range(warmup):
            run()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.inference_mode():
        out = run()
    return graph.replay, out


@dataclass
class _Captured:
    replay: Callable[[], None]
    slots: torch.Tensor    # static int64 [b] input ([b + 1] for a packed step: the chunk's slot last)
    out: torch.Tensor | tuple[torch.Tensor, torch.Tensor]  # static output: ids [b], or logits [b, V] without the
    #                        sampler; a packed step adds the chunk's last logits [1, V]
    chunk: torch.Tensor | None = None  # static int64 [1, C] input of a packed step


class DecodeGraphs:
    """`step(slots, plan) -> ids [n]` by graph replay, for any n <= the largest bucket (`covers`).

    One graph per (bucket, sampling plan), captured the first time a step needs it (a 7B step captures in well
    under a second); with `sample_in_graph=False` the plan does not change the graph. `capture(run, warmup) ->
    (replay, static output)` is `capture_cuda_graph`; tests pass an eager stand-in to check the logic on the CPU.
    """

    def __init__(self, model: TransNormerLLM, pool: StatePool, sampler: BatchSampler, max_batch: int,
                 sample_in_graph: bool = True, warmup: int = 2, capture=capture_cuda_graph):
        if pool.device.type != "cuda" and capture is capture_cuda_graph:
            raise ValueError(f"CUDA graphs need a CUDA model, got device {pool.device}")
        self.model, self.pool, self.sampler = model, pool, sampler
        self.sample_in_graph, self.warmup, self.capture = sample_in_graph, warmup, capture
        self.sizes = bucket_sizes(max_batch)
        self.graphs: dict[tuple[int, SamplePlan | None], _Captured] = {}

    def captured(self, n: int, plan: SamplePlan = GENERAL, chunk: int = 0) -> _Captured:
        """The graph serving n rows under `plan` (captured now if it is the first such step); with `chunk` > 0,
        the packed step that also reads a prompt chunk of that many ids (`packed_step`)."""
        key = (self.bucket(n), plan if self.sample_in_graph else None, chunk)
        if key not in self.graphs:
            # Warm-up and capture run real steps: every row points at the sink, so no session's state moves.
            bucket, device = key[0], self.pool.device
            slots = torch.full((bucket + (1 if chunk else 0),), SINK_SLOT, dtype=torch.long, device=device)
            if chunk:
                ids = torch.zeros(1, chunk, dtype=torch.long, device=device)
                run = lambda: packed_step(self.model, self.pool, self.sampler, slots, ids,  # noqa: E731
                                          self.sample_in_graph, plan)
            else:
                ids = None
                run = lambda: decode_step(self.model, self.pool, self.sampler, slots,  # noqa: E731
                                          self.sample_in_graph, plan)
            replay, out = self.capture(run, self.warmup)
            self.graphs[key] = _Captured(replay, slots, out, ids)
        return self.graphs[key]

    def covers(self, n: int) -> bool:
        return n <= self.sizes[-1]

    def bucket(self, n: int) -> int:
        """The captured batch size that serves n rows."""
        return next(size for size in self.sizes if size >= n)

    def step(self, slots: list[int], plan: SamplePlan = GENERAL) -> torch.Tensor:
        """Next ids [n] (on the device) for the rows of `slots`: one replay (plus the sampler if outside)."""
        n = len(slots)
        captured = self.captured(n, plan)
        # A fresh pinned host tensor per step: with the scheduler running a step ahead, the upload of the
        # previous step may still be queued, so no host buffer is reused here (the caching host allocator hands a
        # block out again only once the copies queued on it have run).
        padded = slots + [SINK_SLOT] * (captured.slots.shape[0] - n)
        staged = torch.tensor(padded, dtype=torch.long, pin_memory=self.pool.device.type == "cuda")
        captured.slots.copy_(staged, non_blocking=True)
        captured.replay()
        return self._sampled(captured.out[:n], captured.slots[:n], plan)

    def packed_step(self, slots: list[int], plan: SamplePlan, chunk: list[int],
                    chunk_slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`step` for the rows of `slots` plus a prompt chunk read into `chunk_slot`, as one replay of the packed
        graph for len(chunk) ids: (next ids [n], the chunk's last logits [1, V], valid until the next replay)."""
        n = len(slots)
        captured = self.captured(n, plan, len(chunk))
        bucket = captured.slots.shape[0] - 1
        staged = torch.tensor(slots + [SINK_SLOT] * (bucket - n) + [chunk_slot] + chunk, dtype=torch.long,
                              pin_memory=self.pool.device.type == "cuda")  # fresh per step, as in `step`
        captured.slots.copy_(staged[:bucket + 1], non_blocking=True)
        captured.chunk.copy_(staged[None, bucket + 1:], non_blocking=True)
        captured.replay()
        decoded, chunk_logits = captured.out
        return self._sampled(decoded[:n], captured.slots[:n], plan), chunk_logits

    def _sampled(self, out: torch.Tensor, slots: torch.Tensor, plan: SamplePlan) -> torch.Tensor:
        """A replay's decode rows as ids: the graph's own when it samples, else the sampler's on its logits."""
        if self.sample_in_graph:
            return out
        with torch.inference_mode():
            return self.sampler.sample(out, slots, plan)


def piece_sizes(max_chunk: int) -> list[int]:
    """The captured prefill lengths: every power of two below `max_chunk`, and `max_chunk` itself."""
    return [1 << k for k in range(max_chunk.bit_length()) if 1 << k < max_chunk] + [max_chunk]


def split_into_pieces(n: int, sizes: list[int]) -> list[int]:
    """n ids as consecutive captured pieces, largest first (a binary decomposition below the largest size)."""
    pieces = []
    while n:
        size = max(s for s in sizes if s <= n)
        pieces.append(size)
        n -= size
    return pieces


@dataclass
class _Piece:
    replay: Callable[[], None]
    ids: torch.Tensor   # static int64 [1, size] input
    slot: torch.Tensor  # static int64 [1] input
    out: torch.Tensor   # static logits [1, V]


class PrefillGraphs:
    """`run(ids, slot) -> logits [1, V]` for up to `max_chunk` prompt ids of one session, by graph replays.

    An eager chunk launches a few hundred kernels from Python; for chunks of a chat message's size that launch
    time exceeds the chunk's GPU work, so the prompt's reader and every decoding session wait on the host. Each
    power of two below `max_chunk` (and `max_chunk`) is captured once; a chunk of n ids replays the pieces of n's
    binary decomposition back to back (37 ids: 32, 4, 1), each continuing the slot's state. Chunks longer than
    `max_chunk` run eagerly (there the GPU work dominates). `capture` as in `DecodeGraphs`.
    """

    def __init__(self, model: TransNormerLLM, pool: StatePool, max_chunk: int, warmup: int = 2,
                 capture=capture_cuda_graph):
        if pool.device.type != "cuda" and capture is capture_cuda_graph:
            raise ValueError(f"CUDA graphs need a CUDA model, got device {pool.device}")
        self.max_chunk, self.sizes, self.device = max_chunk, piece_sizes(max_chunk), pool.device
        self.pieces = {size: self._capture(model, pool, size, capture, warmup) for size in self.sizes}

    @staticmethod
    def _capture(model: TransNormerLLM, pool: StatePool, size: int, capture, warmup: int) -> _Piece:
        ids = torch.zeros(1, size, dtype=torch.long, device=pool.device)
        slot = torch.full((1,), SINK_SLOT, dtype=torch.long, device=pool.device)  # warm-up and capture: the sink
        replay, out = capture(lambda: model(ids, pool.rows(slot), logits_to_keep=1)[:, -1], warmup)  # [1, V]
        return _Piece(replay, ids, slot, out)

    def covers(self, n: int) -> bool:
        return n <= self.max_chunk

    def run(self, ids: list[int], slot: int) -> torch.Tensor:
        """Read `ids` (1 to `max_chunk` of them) into `slot`; a copy of the last position's logits [1, V]."""
        if not 1 <= len(ids) <= self.max_chunk:
            raise ValueError(f"captured prefill reads 1 to {self.max_chunk} ids, got {len(ids)}")
        # One upload of the ids and the slot: a fresh (pinned) host tensor per call, kept alive by the caching
        # host allocator until its copy has run, so nothing queued can see it overwritten.
        staged = torch.tensor(ids + [slot], dtype=torch.long, pin_memory=self.device.type == "cuda").to(
            self.device, non_blocking=True)  # [n + 1]
        start = 0
        for size in split_into_pieces(len(ids), self.sizes):
            piece = self.pieces[size]
            piece.ids.copy_(staged[None, start:start + size])
            piece.slot.copy_(staged[-1:])
            piece.replay()
            start += size
        return piece.out.clone()
