"""Latency tab: TNL vs the Transformer baseline, through the same timing code as bench/decode.py.

`run_benchmark` is `tnllm.bench.sweep` (same adapters, seeded ids, warm-up and timer) turned into the
tables the plots need. `race` streams both models' greedy replies to one prompt side by side, giving
each model the turn whenever its own accumulated compute time is the smaller one, so at any moment both
have spent about the same time and the faster one shows more text.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict

import gradio as gr
import pandas as pd
import torch

from tnllm.bench import ModelAdapter, adapter_for, prompt_ids, sweep, timed
from tnllm.streaming import TextStreamer
from webui.runtime import Runtime

CPU_CONTEXTS = [128, 256, 512, 1024, 2048, 4096, 8192, 16384]
GPU_CONTEXTS = CPU_CONTEXTS + [32768, 65536, 131072]
COLUMNS = ["model", "context", "decode ms/token", "TTFT ms", "tokens/s", "cache MiB", "decode peak MiB",
           "memory MiB", "8-bit"]


def context_choices(runtime: Runtime) -> list[int]:
    choices = GPU_CONTEXTS if runtime.device.type == "cuda" else CPU_CONTEXTS
    return [c for c in choices if c <= runtime.max_context]


def adapters(runtime: Runtime) -> list[ModelAdapter]:
    pair = [adapter_for(runtime.model, "TNL")]
    if runtime.baseline is not None:
        pair.append(adapter_for(runtime.baseline, "Llama"))
    return pair


def _mib(n: int | None) -> float | None:
    return None if n is None else round(n / 2**20, 3)


def rows_frame(rows) -> pd.DataFrame:
    """sweep rows -> one DataFrame (plots read columns of it, the table shows it)."""
    records = [asdict(r) for r in rows]
    return pd.DataFrame(
        [[r["model"], r["context"], round(r["decode_ms_per_token"], 3), round(r["ttft_ms"], 2),
          round(r["tokens_per_s"], 1), _mib(r["cache_bytes"]), _mib(r["peak_bytes"]),
          None if r["peak_mem_mb"] is None else round(r["peak_mem_mb"], 1), r["quant"]] for r in records],
        columns=COLUMNS)


def run_benchmark(runtime: Runtime, contexts: list, n_tokens: int, progress=gr.Progress()):  # noqa: B008 (Gradio's API)
    """Sweep the chosen context lengths; returns (frame, frame, frame, frame): one per plot, and the table."""
    chosen = sorted({int(c) for c in contexts or []})
    if not chosen:
        raise gr.Error("Pick at least one context length.")
    if chosen[-1] > runtime.max_context:
        raise gr.Error(f"Context {chosen[-1]} is above this server's limit of {runtime.max_context} tokens.")
    rows = sweep(adapters(runtime), chosen, int(n_tokens), prefill_repeats=2, progress=progress)
    frame = rows_frame(rows)
    return frame, frame, frame, frame


class _Runner:
    """One model's greedy stream: prefill, then one adapter.step per token, its own compute clock."""

    def __init__(self, adapter: ModelAdapter, runtime: Runtime, ids: torch.Tensor, max_new_tokens: int):
        self.adapter, self.runtime, self.ids, self.left = adapter, runtime, ids.to(adapter.device), max_new_tokens
        self.streamer = TextStreamer(runtime.tokenizer)
        self.cache, self.logits, self.text, self.clock, self.tokens, self.ttft = None, None, "", 0.0, 0, 0.0
        self.done = False

    @torch.inference_mode()
    def advance(self) -> None:
        if self.cache is None:
            (self.logits, self.cache), seconds = timed(lambda: self.adapter.prefill(self.ids), self.adapter.device)
            self.clock += seconds
            self.ttft = self.clock
        token = int(self.logits[0, -1].argmax())
        self.tokens, self.left = self.tokens + 1, self.left - 1
        if token == self.runtime.tokenizer.eos_id or self.left <= 0:
            self.done = True
            self.text += self.streamer.flush() if token == self.runtime.tokenizer.eos_id else self.streamer.push(token)
            return
        self.text += self.streamer.push(token)
        step = torch.tensor([[token]], device=self.adapter.device)
        (self.logits, self.cache), seconds = timed(lambda: self.adapter.step(step, self.cache),
                                                         self.adapter.device)
        self.clock += seconds

    def line(self) -> str:
        rate = (self.tokens - 1) / (self.clock - self.ttft) if self.tokens > 1 and self.clock > self.ttft else 0.0
        cache = self.adapter.cache_bytes(self.cache) / 2**20 if self.cache is not None else 0.0
        return (f"**{self.adapter.name}**: {self.tokens} tokens · **{rate:.1f} tok/s** · TTFT {self.ttft * 1e3:.0f} ms"
                f" · cache {cache:.2f} MiB")


def race(runtime: Runtime, prompt: str, context_tokens: int, max_new_tokens: int) -> Iterator[tuple[str, str, str]]:
    """Stream (TNL text, Llama text, counters) as both models answer `prompt` after `context_tokens` of filler."""
    if not prompt or not prompt.strip():
        raise gr.Error("Type a prompt first.")
    if runtime.baseline is None:
        raise gr.Error("No Transformer baseline is loaded.")
    if int(context_tokens) + len(prompt) // 2 > runtime.max_context:
        raise gr.Error(f"Context is above this server's limit of {runtime.max_context} tokens.")
    filler = prompt_ids(runtime.model.config.vocab_size, int(context_tokens))[0].tolist() if context_tokens else []
    ids = torch.tensor([filler + runtime.tokenizer.chat_ids([("human", prompt)])])
    runners = [_Runner(a, runtime, ids, int(max_new_tokens)) for a in adapters(runtime)]
    while not all(r.done for r in runners):
        active = [r for r in runners if not r.done]
        min(active, key=lambda r: r.clock).advance()  # whoever has spent less compute time moves next
        yield runners[0].text, runners[1].text, "  \n".join(r.line() for r in runners)
