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

from tnllm.engine.pool import SINK_SLOT, StatePool, upload_ids
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


def replay_eagerly(run: Callable[[], torch.Tensor], warmup: int) -> tuple[Callable[[], None], torch.Tensor]:
    """A stand-in for `capture_cuda_graph` with the same static outputs: replay = run again and copy into them.
    The CPU tests check the graph logic through it; the GPU check uses it as the eager twin of a capture."""
    out = run()

    def replay():
        for static, fresh in zip(*((o,) if isinstance(o, torch.Tensor) else o for o in (out, run()))):
            static.copy_(fresh)

    return replay, out


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

    def capture_all(self, plan: SamplePlan, chunk: int = 0) -> None:
        """Capture now, for every batch bucket, the step under `plan` (with `chunk` > 0: the packed step)."""
        for bucket in self.sizes:
            self.captured(bucket, plan, chunk)

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
    ids: torch.Tensor    # static int64 [b, size] input
    slots: torch.Tensor  # static int64 [b] input
    out: torch.Tensor    # static logits [b, V]


class PrefillGraphs:
    """`run(chunks) -> logits`: prompt chunks of up to `max_chunk` ids, each continuing its own slot, by graph
    replays.

    An eager chunk launches a few hundred kernels from Python; for chunks of a chat message's size that launch
    time exceeds the chunk's GPU work, so the prompt's reader and every decoding session wait on the host. A
    chunk of n ids replays the pieces of n's binary decomposition (37 ids: 32, 4, 1), each continuing the slot's
    state; the pieces are every power of two below `max_chunk` and `max_chunk`. Chunks of several sessions read
    together: for each piece size, largest first, ONE replay of a [b, size] graph serves every chunk whose
    decomposition holds that size (so each chunk's pieces still run in order), b being the batch bucket
    (`bucket_sizes(max_batch)`) of that many chunks, its pad rows on the sink slot. Sixteen new two-id prompts are
    one replay instead of sixteen forwards, each reading every weight. The pieces of one row are captured when
    the engine starts (a lone chat message never waits for a capture); batched ones the first time a step needs
    them. Chunks longer than `max_chunk` run eagerly (there the GPU work dominates). `capture` as in
    `DecodeGraphs`.
    """

    def __init__(self, model: TransNormerLLM, pool: StatePool, max_chunk: int, max_batch: int = 1, warmup: int = 2,
                 capture=capture_cuda_graph):
        if pool.device.type != "cuda" and capture is capture_cuda_graph:
            raise ValueError(f"CUDA graphs need a CUDA model, got device {pool.device}")
        self.model, self.pool, self.warmup, self.capture = model, pool, warmup, capture
        self.max_chunk, self.sizes, self.device = max_chunk, piece_sizes(max_chunk), pool.device
        self.buckets = bucket_sizes(max_batch)
        self.pieces: dict[tuple[int, int], _Piece] = {}
        for size in self.sizes:
            self.piece(size, 1)

    def piece(self, size: int, rows: int) -> _Piece:
        """The captured [b, size] piece for `rows` chunks (b: the bucket of `rows`), captured now if new."""
        key = (size, next(b for b in self.buckets if b >= rows))
        if key not in self.pieces:
            ids = torch.zeros(key[1], size, dtype=torch.long, device=self.device)
            slots = torch.full((key[1],), SINK_SLOT, dtype=torch.long, device=self.device)  # capture: the sink
            replay, out = self.capture(lambda: self.model(ids, self.pool.rows(slots), logits_to_keep=1)[:, -1],
                                       self.warmup)  # [b, V]
            self.pieces[key] = _Piece(replay, ids, slots, out)
        return self.pieces[key]

    def capture_all(self) -> None:
        """Capture now every piece size for every batch bucket."""
        for size in self.sizes:
            for bucket in self.buckets:
                self.piece(size, bucket)

    def covers(self, n: int) -> bool:
        return n <= self.max_chunk

    def run(self, chunks: list[tuple[list[int], int]]) -> list[torch.Tensor]:
        """Read each chunk's ids (1 to `max_chunk`) into its slot (one chunk per slot), `max_batch` chunks at a
        time; per chunk, a copy of its last position's logits [1, V]."""
        if len({slot for _, slot in chunks}) != len(chunks):
            raise ValueError("captured prefill reads one chunk per slot")
        for ids, _ in chunks:
            if not 1 <= len(ids) <= self.max_chunk:
                raise ValueError(f"captured prefill reads 1 to {self.max_chunk} ids, got {len(ids)}")
        most = self.buckets[-1]
        return [last for i in range(0, len(chunks), most) for last in self._run_batch(chunks[i:i + most])]

    def _run_batch(self, chunks: list[tuple[list[int], int]]) -> list[torch.Tensor]:
        """`run` for at most `max_batch` chunks."""
        plans = [split_into_pieces(len(ids), self.sizes) for ids, _ in chunks]
        fed = [0] * len(chunks)
        # Every replay's ids and slots (pad rows included) go up in ONE upload (`upload_ids`: no host sync).
        replays, flat = [], []
        for size in sorted({size for plan in plans for size in plan}, reverse=True):
            rows = [i for i, plan in enumerate(plans) if size in plan]
            rows.sort(key=lambda i: plans[i][-1] != size)  # chunks that end with this piece first
            piece = self.piece(size, len(rows))
            pad = piece.slots.shape[0] - len(rows)
            for i in rows:
                flat += chunks[i][0][fed[i]:fed[i] + size]
                fed[i] += size
            flat += [0] * (pad * size) + [chunks[i][1] for i in rows] + [SINK_SLOT] * pad
            replays.append((piece, rows, sum(plans[i][-1] == size for i in rows)))
        staged = upload_ids(flat, self.device)
        logits: list[torch.Tensor | None] = [None] * len(chunks)
        start = 0
        for piece, rows, ending in replays:
            b, size = piece.ids.shape
            piece.ids.copy_(staged[start:start + b * size].view(b, size))
            piece.slots.copy_(staged[start + b * size:start + b * size + b])
            start += b * size + b
            piece.replay()
            ends = piece.out[:ending].clone()  # [ending, V]: before a later replay of this piece overwrites it
            for j, i in enumerate(rows[:ending]):
                logits[i] = ends[j:j + 1]
        return logits
