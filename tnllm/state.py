"""Recurrent decode state, owned by the caller (one per conversation / Gradio session).

TransNormerLLM's whole context lives in one fp32 matrix per layer and head, so the state size is
constant however long a conversation gets: that is the point of the project. Per sequence it is
4 * H * dh^2 * (L + #LRPE layers) bytes (LRPE layers have dk = 2 * dh): 17.8 MB for TNL-1B.

Notation: B batch, L layers, H heads, dk = dh or 2 * dh (LRPE layers), dh head dim.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tnllm.config import TNLConfig


@dataclass
class RecurrentState:
    """Per-layer fp32 kv tensors [B, H, dk, dh] plus per-sequence positions [B] (tokens consumed).

    The model updates both in place (`mul_`/`add_`/`copy_`), so tensor addresses never change
    during decoding (what CUDA graphs need). Positions are per sequence, never shared.
    """

    kv: list[torch.Tensor]
    positions: torch.Tensor

    @classmethod
    def allocate(cls, config: TNLConfig, batch_size: int = 1, device: torch.device | str = "cpu",
                 layer_devices: list[torch.device] | None = None) -> "RecurrentState":
        """Zero state for `batch_size` fresh sequences.

        `layer_devices` puts each layer's kv next to that layer's weights when a model is spread over
        several GPUs (device_map="auto"), so in-place updates never go through a copy.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        dh = config.head_dim
        devices = layer_devices or [device] * config.n_layers
        kv = [
            torch.zeros(batch_size, config.n_heads, dh * (2 if lrpe else 1), dh, dtype=torch.float32, device=dev)
            for lrpe, dev in zip(config.lrpe_layers, devices, strict=True)
        ]
        return cls(kv=kv, positions=torch.zeros(batch_size, dtype=torch.long, device=device))

    @property
    def batch_size(self) -> int:
        return self.positions.shape[0]

    @property
    def nbytes(self) -> int:
        """Bytes held by the state (independent of context length)."""
        return sum(t.numel() * t.element_size() for t in self.kv) + self.positions.numel() * 8

    def reset(self) -> None:
        """Forget everything (in place)."""
        for t in self.kv:
            t.zero_()
        self.positions.zero_()

    def clone(self) -> "RecurrentState":
        """An independent copy: fork a conversation."""
        return RecurrentState([t.clone() for t in self.kv], self.positions.clone())

    def select(self, index: torch.Tensor | list[int]) -> "RecurrentState":
        """A new state holding the given batch rows, in the given order (reorder / split a batch)."""
        index = torch.as_tensor(index, dtype=torch.long, device=self.positions.device)
        return RecurrentState([t.index_select(0, index) for t in self.kv], self.positions.index_select(0, index))

    @classmethod
    def cat(cls, states: list["RecurrentState"]) -> "RecurrentState":
        """Stack several states along the batch dim (e.g. to decode sessions together)."""
        kv = [torch.cat(layer, dim=0) for layer in zip(*(s.kv for s in states))]
        return cls(kv, torch.cat([s.positions for s in states]))

    def copy_(self, other: "RecurrentState") -> None:
        """Overwrite this state with `other` in place (tensor addresses unchanged)."""
        for dst, src in zip(self.kv, other.kv, strict=True):
            dst.copy_(src)
        self.positions.copy_(other.positions)

    def to(self, device: torch.device | str) -> "RecurrentState":
        return RecurrentState([t.to(device) for t in self.kv], self.positions.to(device))

    def tensors(self) -> dict[str, torch.Tensor]:
        """The state as named CPU tensors (`kv.{layer}`, `positions`), the safetensors layout."""
        tensors = {f"kv.{i}": t.contiguous().cpu() for i, t in enumerate(self.kv)}
        tensors["positions"] = self.positions.cpu()
        return tensors

    def save(self, path: str | Path) -> None:
        """Write to a safetensors file (a few MB; no pickle)."""
        save_file(self.tensors(), str(path), metadata={"format": "pt", "kind": "tnllm-recurrent-state"})

    @classmethod
    def load(cls, path: str | Path, config: TNLConfig, device: torch.device | str = "cpu") -> "RecurrentState":
        """Read a state saved by `save`, checking it fits `config`."""
        return cls.from_tensors(load_file(str(path), device=str(device)), config, path)

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], config: TNLConfig, where: str | Path) -> "RecurrentState":
        """The state held in `tensors` (layout of `tensors()`; other keys ignored), checked against `config`."""
        expected = cls.allocate(config, 1, "meta")
        kv = []
        for i, ref in enumerate(expected.kv):
            t = tensors.get(f"kv.{i}")
            if t is None or t.shape[1:] != ref.shape[1:] or t.dtype != torch.float32:
                got = None if t is None else (tuple(t.shape), t.dtype)
                raise ValueError(f"state file {where}: layer {i} expected [B, {', '.join(map(str, ref.shape[1:]))}] "
                                 f"fp32, got {got}")
            kv.append(t)
        if f"kv.{len(kv)}" in tensors or "positions" not in tensors:
            raise ValueError(f"state file {where} does not match a {config.n_layers}-layer model")
        return cls(kv, tensors["positions"])


@dataclass
class SlotState:
    """Rows of a state pool addressed by slot ids: what the model reads and updates for a batch of sessions.

    `kv` holds per-layer fp32 pools [S, H, dk, dh] and `positions` a pool [S]; row b of the batch is slot
    `slots[b]`. The model updates the addressed slots in place (no per-session copies), so sessions can join
    and leave a batch between steps by changing `slots` only.
    """

    kv: list[torch.Tensor]
    positions: torch.Tensor
    slots: torch.Tensor  # int64 [B], on the pool's device

    @property
    def batch_size(self) -> int:
        return self.slots.shape[0]


@dataclass
class PackedSlotState(SlotState):
    """Decode rows and one prompt chunk packed into ONE batch row, so one forward reads the weights once for both.

    The model's input is [1, n_decode + C]: token b < n_decode is one decode token of slot `slots[b]`, and the
    last C tokens are a prompt chunk continuing slot `slots[n_decode]`. Linears and norms see n_decode + C rows;
    attention takes the recurrent step for the decode tokens and the chunked path for the chunk. The forward
    returns logits at the end of each segment: [1, n_decode + 1, V].
    """

    n_decode: int = 0

    @property
    def batch_size(self) -> int:
        return 1

    def layout(self, start: torch.Tensor, T: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(positions [1, T] of the row's tokens, tokens each slot reads [n_decode + 1]) from the slots' positions
        before the forward, start [n_decode + 1]."""
        n = self.n_decode
        if not 0 < n < T or self.slots.shape[0] != n + 1:
            raise ValueError(f"a packed row holds n_decode >= 1 decode tokens and a chunk after them: got "
                             f"n_decode={n}, {T} tokens, {self.slots.shape[0]} slots")
        positions = torch.cat([start[:n], start[n] + torch.arange(T - n, device=start.device)])[None]  # [1, T]
        advance = torch.ones_like(start)  # each decode slot reads 1 token...
        advance[-1:].fill_(T - n)  # ...and the chunk's slot the chunk (a fill: no host copy, so capturable)
        return positions, advance

    def segment_ends(self, t: torch.Tensor) -> torch.Tensor:
        """t [1, T, ...] at the end of every segment, [1, n_decode + 1, ...]: each decode token and the chunk's
        last token."""
        return torch.cat([t[:, :self.n_decode], t[:, -1:]], dim=1)
