"""A Transformer behind the engine: a transformers causal LM whose per-session KV caches live in pool slots.

    engine = Engine(KVCacheLM(llama), tokenizer, EngineConfig(max_sessions=4, threaded=False))

The engine drives a model through `model(ids [B, T], pool.rows(slots), logits_to_keep)` and a slot pool
(`allocate_pool`); `KVCacheLM` gives a transformers model that interface, so the latency comparison runs the
Transformer through the same scheduler, sampler, detokeniser and events as TNL and compares like with like.
Each slot holds one `DynamicCache` (transformers' default), grown by every token; rows of a batch run one forward
each (caches of different lengths do not batch without padding), and nothing is captured in a CUDA graph.
Slots cannot be copied, snapshotted or saved: a KV cache is the whole context, not a fixed-size state.
"""

from __future__ import annotations

import torch
from torch import nn

from tnllm.engine.pool import SlotAllocator
from tnllm.linear import pack_linears_for_cpu


class KVCachePool(SlotAllocator):
    """`size` session slots of per-session KV caches (slot 0 a sink, never used without CUDA graphs)."""

    def __init__(self, model: "KVCacheLM", size: int):
        super().__init__(size)
        self.device = next(model.parameters()).device
        self.caches: list = [None] * (size + 1)  # a transformers Cache per slot; None = nothing read yet

    @property
    def slot_bytes(self) -> int:
        """Bytes of the largest cache held now (a KV cache grows with its context)."""
        return max((kv_cache_bytes(c) for c in self.caches if c is not None), default=0)

    def clear(self, slot: int) -> None:
        self.caches[slot] = None

    def rows(self, slots: torch.Tensor) -> "KVRows":
        return KVRows(self, slots.tolist())

    def copy(self, src: int, dst: int) -> None:
        raise NotImplementedError("KV-cache sessions cannot be forked: the cache is the whole context")

    def read(self, slot: int):
        raise NotImplementedError("KV-cache sessions cannot be snapshotted or saved: the cache is the whole context")

    def write(self, slot: int, state) -> None:
        raise NotImplementedError("KV-cache sessions cannot be restored or loaded")


class KVRows:
    """The slots of one forward's rows (host ints: the pool is indexed on the host)."""

    def __init__(self, pool: KVCachePool, slots: list[int]):
        self.pool, self.slots = pool, slots

    @property
    def batch_size(self) -> int:
        return len(self.slots)


def kv_cache_bytes(cache) -> int:
    """Bytes of the keys and values a transformers `Cache` holds."""
    return sum(t.nbytes for layer in cache.layers for t in (layer.keys, layer.values) if t is not None)


class KVCacheLM(nn.Module):
    """A transformers causal LM (say `LlamaForCausalLM`) with the call the engine makes: `forward(ids [B, T], rows,
    logits_to_keep=0) -> logits [B, T', V]`, row b continuing the cache of slot `rows.slots[b]`."""

    capturable = False  # caches grow and are indexed on the host: no CUDA graph

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.config = model.config

    def pack_weights(self) -> None:
        """The Transformer's fp32 CPU Linears get the same oneDNN layout as TNL's (`pack_linears_for_cpu`), so the
        latency comparison does not hand one side a faster matmul."""
        pack_linears_for_cpu(self.model)

    def allocate_pool(self, size: int) -> KVCachePool:
        return KVCachePool(self, size)

    def forward(self, ids: torch.Tensor, rows: KVRows, logits_to_keep: int = 0) -> torch.Tensor:
        if ids.shape[0] != rows.batch_size:
            raise ValueError(f"{rows.batch_size} slots for a batch of {ids.shape[0]}")
        logits = []
        for b, slot in enumerate(rows.slots):
            out = self.model(ids[b:b + 1], cache=rows.pool.caches[slot], use_cache=True, logits_to_keep=logits_to_keep)
            rows.pool.caches[slot] = out.cache
            logits.append(out.logits)
        return torch.cat(logits)  # [B, T', V]
