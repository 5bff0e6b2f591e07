"""State slot pool: every session's recurrent state lives in one slot of per-layer fp32 tensors.

    kv[l]      [S + 1, H, dk_l, dh]   (per layer: an LRPE layer has dk = 2 * dh)
    positions  [S + 1]                tokens each slot has read

Slot 0 is a sink that padded batch rows (CUDA-graph buckets) read and write; sessions get slots 1..S from a
host free list and never see slot 0. A decode step reads and updates the slots of its rows in place
(`SlotState`), so joining or leaving a batch moves no state.
"""

from __future__ import annotations

import torch

from tnllm.model import TransNormerLLM
from tnllm.state import PackedSlotState, RecurrentState, SlotState

SINK_SLOT = 0


def upload_ids(ids: list[int], device: torch.device) -> torch.Tensor:
    """Host ints as an int64 tensor on `device`, without waiting for the GPU: a copy from pageable memory blocks the
    host until every kernel queued before it has run, which would drain the step the engine runs ahead (every
    session joining while others decode cost them a step). On CUDA the ids go through a fresh pinned tensor, which
    the caching host allocator keeps until its copy has run."""
    cuda = torch.device(device).type == "cuda"
    return torch.tensor(ids, dtype=torch.long, pin_memory=cuda).to(device, non_blocking=cuda)


class PoolFullError(RuntimeError):
    """Every slot holds a session: close one (or make the pool larger) before opening another."""


class SlotAllocator:
    """Slots 1..size handed out from a host free list; `clear(slot)` (a subclass's) empties one when handed out."""

    supports_packing = False  # a subclass with `packed_rows(slots, n_decode)` sets it (see StatePool)

    def __init__(self, size: int):
        if size < 1:
            raise ValueError(f"pool size must be >= 1, got {size}")
        self.size = size
        self._free = list(range(size, 0, -1))  # pop() hands out slot 1 first

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def acquire(self) -> int:
        """A free slot, emptied (a fresh state)."""
        if not self._free:
            raise PoolFullError(f"all {self.size} session slots are taken")
        slot = self._free.pop()
        self.clear(slot)
        return slot

    def release(self, slot: int) -> None:
        """Give a slot back (its content is emptied when it is handed out again)."""
        if not 1 <= slot <= self.size or slot in self._free:
            raise ValueError(f"slot {slot} is not held")
        self._free.append(slot)

    def clear(self, slot: int) -> None:
        raise NotImplementedError


class StatePool(SlotAllocator):
    """`size` session slots (plus the sink) of `model`'s recurrent state, on the model's devices."""

    supports_packing = True

    def __init__(self, model: TransNormerLLM, size: int):
        if size < 1:
            raise ValueError(f"pool size must be >= 1, got {size}")
        self._attach(model.allocate_state(size + 1))  # one zero state per slot, each layer on its layer's device

    @classmethod
    def over(cls, state: RecurrentState) -> "StatePool":
        """A pool whose slots are the rows of an existing state (row 0 the sink), every slot free."""
        pool = cls.__new__(cls)
        pool._attach(state)
        return pool

    def _attach(self, state: RecurrentState) -> None:
        super().__init__(state.batch_size - 1)
        self.state = state
        self.kv, self.positions = state.kv, state.positions
        self.device = self.positions.device

    @property
    def slot_bytes(self) -> int:
        """Bytes of one session's state (the same at any context length)."""
        return sum(t[0].numel() * t.element_size() for t in self.kv) + 8

    def clear(self, slot: int) -> None:
        for t in self.kv:
            t[slot].zero_()
        self.positions[slot] = 0

    def copy(self, src: int, dst: int) -> None:
        """Overwrite slot `dst` with slot `src` (fork)."""
        for t in self.kv:
            t[dst].copy_(t[src])
        self.positions[dst] = self.positions[src]

    def rows(self, slots: torch.Tensor) -> SlotState:
        """The model's view of the given slots (int64 [B] on the pool's device) as batch rows."""
        return SlotState(self.kv, self.positions, slots)

    def packed_rows(self, slots: torch.Tensor, n_decode: int) -> PackedSlotState:
        """One packed row: decode tokens of slots[:n_decode], then a prompt chunk of slots[n_decode]."""
        return PackedSlotState(self.kv, self.positions, slots, n_decode)

    def read(self, slot: int) -> RecurrentState:
        """A copy of one slot as a batch-1 `RecurrentState`."""
        return RecurrentState([t[slot:slot + 1].clone() for t in self.kv], self.positions[slot:slot + 1].clone())

    def write(self, slot: int, state: RecurrentState) -> None:
        """Overwrite one slot with a batch-1 `RecurrentState` (shapes checked by the copy)."""
        if state.batch_size != 1:
            raise ValueError(f"a slot holds one sequence, got a state of batch {state.batch_size}")
        for dst, src in zip(self.kv, state.kv, strict=True):
            dst[slot].copy_(src[0])
        self.positions[slot] = state.positions[0]

    def position(self, slot: int) -> int:
        """Tokens the slot has read (a host sync: for bookkeeping between steps, not inside one)."""
        return int(self.positions[slot])


def pool_for(model, size: int) -> StatePool:
    """The slot pool for `model`: its own `allocate_pool` when it has one (a tensor-parallel model keeps every
    rank's share of each slot in step), else a `StatePool`."""
    allocate = getattr(model, "allocate_pool", None)
    return allocate(size) if allocate is not None else StatePool(model, size)
