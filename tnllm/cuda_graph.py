"""Decode without Python overhead: one recurrent step captured in a CUDA graph and replayed.

The step touches only static buffers: the token input, the recurrent state (updated in place by the
decode kernel; positions advanced in place) and the logits output, so one capture per batch size
serves a whole generation. Sessions copy their state in and out (a few MB, constant size).

Superseded by `tnllm.engine.graphs.DecodeGraphs` (graphs over the engine's state slots, per batch bucket). Only the
tensor-parallel path still replays this one (`tnllm.tp.serve.new_graph`, bench/tp.py); delete it once TP decodes
through the engine.
"""

from __future__ import annotations

import torch

from tnllm.model import TransNormerLLM
from tnllm.state import RecurrentState


class GraphedDecoder:
    """`step(tokens [B, 1]) -> logits [B, V]` replaying a captured graph; the state lives in `self.state`."""

    def __init__(self, model: TransNormerLLM, batch_size: int = 1, warmup: int = 3):
        device = model.lm_head.weight.device
        if device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA model, got device {device}")
        self.model = model
        self.state = model.allocate_state(batch_size)
        self.tokens = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
        saved = self.state.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.inference_mode():
            for _ in range(warmup):  # compile Triton kernels and settle allocations outside the capture
                model(self.tokens, self.state)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), torch.inference_mode():
            self.logits = model(self.tokens, self.state)[:, -1]  # [B, V], static output
        self.load(saved)  # capture ran one step for real: restore

    def load(self, state: RecurrentState) -> None:
        """Copy a session's state into the static buffers."""
        self.state.copy_(state)

    def store(self, state: RecurrentState) -> None:
        """Copy the static state back into a session's state."""
        state.copy_(self.state)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """One decode step for all sequences; returns the static logits buffer (copy it to keep it)."""
        self.tokens.copy_(tokens)
        self.graph.replay()
        return self.logits
