"""Prefill and decode latency, and memory: the one timing helper of the app's latency tab and bench/decode.py.

TNL and the Transformer baseline are driven through the same functions, the same seeded token ids and
the same timer; a small adapter per model family is all that differs (prefill a prompt, then step one
token at a time with the model's own cache). A decode row names what its steps timed (`path`):
"model-step", the model's own step fed the next prompt id, or "engine-eager" / "engine-graph", a reply through
`tnllm.engine` as chat runs it (`EngineAdapter`: sampling, detokenising and events included; TNL on its state,
the Transformer on per-session KV caches through `KVCacheLM`; bench/decode.py and the latency tab).
Protocol (docs/benchmarks.md#timing-protocol):

* inputs: seeded random ids [1, T], identical for every model (latency does not depend on the text);
* warm-up excluded: one untimed prefill before the timed ones, and untimed decode steps before the
  timed ones (kernel JIT/autotune, allocator growth); nothing is compiled inside a timed region;
* timer: CUDA events around the call after a device synchronize on GPU (launch gaps count, as a
  user sees them); `time.perf_counter` on CPU, where calls are synchronous; medians are reported;
* memory: `cache_bytes`, the bytes the decode cache holds (TNL: recurrent state, constant; Llama: KV
  cache, linear in context); on CUDA `peak_bytes`, the peak allocated during the timed decode steps
  above what was allocated before the prefill (weights excluded; cache and step activations
  included, prefill activations not: those are `prefill_peak_bytes`); `peak_mem_mb`, the whole
  process's memory at its highest during the row (CUDA: peak allocated, weights included; CPU: RSS).
  The peak counter is reset after the prefill because the prefill's activations grow with the context
  and would otherwise read as decode memory.

Decode latency at context T is the median over `n_tokens` single-token steps that see T .. T+n-1
previous tokens. TNL's step cost is constant in T, a Transformer's grows with it
(docs/kernels.md#decode-cost).
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from tnllm.engine import Engine, EngineConfig
from tnllm.engine.graphs import capture_cuda_graph
from tnllm.engine.kv_cache import KVCacheLM, kv_cache_bytes
from tnllm.memory import process_rss_bytes
from tnllm.model import TransNormerLLM
from tnllm.sampling import SamplingParams

Progress = Callable[..., Any]  # progress(fraction, desc=...): gr.Progress() fits, and so does print_progress


# -- adapters ----------------------------------------------------------------------------------------
class ModelAdapter:
    """One model family behind `prefill(ids [B, T]) -> (logits [B, 1, V], cache)` and
    `step(token [B, 1], cache) -> (logits [B, 1, V], cache)`; `cache_bytes(cache)` is its size.

    `step` also continues the cache by several tokens at once (`[B, T']`), as both models do."""

    def __init__(self, model: torch.nn.Module, name: str):
        self.model = model
        self.name = name

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def quant(self) -> str:
        """The 8-bit method of the weights: what `quant` tagged the model with, else "none"."""
        if getattr(self.model, "is_loaded_in_8bit", False):  # transformers' own bitsandbytes loading
            return "bnb_int8"
        return getattr(self.model, "quant_method", "none")

    @property
    def vocab_size(self) -> int:
        return self.model.config.vocab_size

    def num_parameters(self) -> int:
        """Parameters with tied weights counted once."""
        return sum(p.numel() for p in self.model.parameters())

    def decode_run(self, context_len: int, n_tokens: int, warmup: int, seed: int) -> StepRun | EngineRun:
        """A decode ready for `n_tokens` timed `step()`s at `context_len` (its set-up runs here, untimed)."""
        return StepRun(self, context_len, n_tokens, warmup, seed)

    def engine_model(self) -> torch.nn.Module:
        """The model as `tnllm.engine.Engine` drives it."""
        return self.model


class TNLAdapter(ModelAdapter):
    """TransNormerLLM: the cache is a `RecurrentState`, updated in place, the same size at any context."""

    def __init__(self, model: TransNormerLLM, name: str = "TNL"):
        super().__init__(model, name)

    def prefill(self, ids):
        state = self.model.allocate_state(ids.shape[0])
        return self.model(ids, state, logits_to_keep=1), state

    def step(self, token, state):
        return self.model(token, state, logits_to_keep=1), state

    def cache_bytes(self, state) -> int:
        return state.nbytes


class LlamaAdapter(ModelAdapter):
    """A transformers causal LM (the Llama baseline): the cache is its `DynamicCache` (K and V per layer)."""

    def __init__(self, model: torch.nn.Module, name: str = "Llama"):
        super().__init__(model, name)

    def prefill(self, ids):
        out = self.model(ids, use_cache=True, logits_to_keep=1)  # a fresh DynamicCache
        return out.logits, out.cache

    def step(self, token, cache):
        out = self.model(token, cache=cache, use_cache=True, logits_to_keep=1)  # positions from the cache
        return out.logits, out.cache

    def cache_bytes(self, cache) -> int:
        return kv_cache_bytes(cache)

    def engine_model(self) -> torch.nn.Module:
        return KVCacheLM(self.model)  # per-session KV caches in the engine's slots


class LlamaStaticAdapter(LlamaAdapter):
    """transformers' strong decode setting (its `cache_implementation="static"` recipe): K and V preallocated for
    the longest context a run reaches (`StaticCache`), so every step has the same shapes and addresses and, on
    CUDA, is replayed from a CUDA graph (`StaticStepRun`). Its cache holds the whole preallocated length."""

    def __init__(self, model: torch.nn.Module, name: str = "Llama static"):
        super().__init__(model, name)

    def prefill(self, ids, max_cache_len: int | None = None):
        from transformers import StaticCache  # only this baseline needs transformers

        cache = StaticCache(config=self.model.config, max_cache_len=max_cache_len or ids.shape[1])
        out = self.model(ids, cache=cache, use_cache=True, logits_to_keep=1)
        return out.logits, cache

    def decode_run(self, context_len: int, n_tokens: int, warmup: int, seed: int) -> StepRun:
        return StaticStepRun(self, context_len, n_tokens, warmup, seed)


class EngineAdapter(ModelAdapter):
    """A model whose decode runs through the engine as chat runs it (`EngineRun`): TNL on its recurrent state, a
    transformers LM on per-session KV caches (`KVCacheLM`), so both pay for the same scheduler, sampler,
    detokeniser and events. Its prefill (TTFT) and cache are its family's adapter's (`adapter_for`). `tokenizer`
    detokenises the reply (only its `decode` is used); `params` are the sampling settings (chat's, say; their
    `max_new_tokens` is set by each run)."""

    def __init__(self, model: torch.nn.Module, tokenizer, params: SamplingParams, name: str = "TNL"):
        super().__init__(model, name)
        self.family = adapter_for(model, name)
        self.tokenizer, self.params = tokenizer, params

    def prefill(self, ids):
        return self.family.prefill(ids)

    def step(self, token, cache):
        return self.family.step(token, cache)

    def cache_bytes(self, cache) -> int:
        return self.family.cache_bytes(cache)

    def engine_model(self) -> torch.nn.Module:
        return self.family.engine_model()

    def decode_run(self, context_len: int, n_tokens: int, warmup: int, seed: int) -> EngineRun:
        return EngineRun(self, context_len, n_tokens, warmup, seed)


def baseline_adapters(llama: torch.nn.Module, tokenizer, params: SamplingParams) -> list[ModelAdapter]:
    """The Transformer as users run it: transformers' default cache (a growing `DynamicCache` per session, eager
    steps) through the engine as TNL's replies run, and, on CUDA, its strong setting beside it
    (`LlamaStaticAdapter`: preallocated cache, captured steps, timed as model steps)."""
    adapters: list[ModelAdapter] = [EngineAdapter(llama, tokenizer, params, "Llama")]
    if next(llama.parameters()).device.type == "cuda":
        adapters.append(LlamaStaticAdapter(llama, "Llama static"))
    return adapters


def adapter_for(model: torch.nn.Module, name: str | None = None) -> ModelAdapter:
    """The adapter of `model`'s family: TNL for `TransNormerLLM`, else the transformers one."""
    if isinstance(model, TransNormerLLM):
        return TNLAdapter(model, name or "TNL")
    return LlamaAdapter(model, name or "Llama")


# -- rows --------------------------------------------------------------------------------------------
@dataclass
class PrefillRow:
    """Time to first token: prefill `context_len` tokens and pick the first new one (median of repeats)."""

    model: str
    context_len: int
    ttft_ms: float
    prefill_tok_s: float
    peak_bytes: int | None  # CUDA only: peak allocated during the prefill above what was allocated before
    total_bytes: int | None  # CUDA: peak allocated, weights included; CPU: process RSS after the prefills


@dataclass
class DecodeRow:
    """Single-token decode at context `context_len` (median and p20/p80 over `n_tokens` steps)."""

    model: str
    context_len: int
    n_tokens: int
    decode_ms: float
    decode_p20_ms: float
    decode_p80_ms: float
    tokens_per_s: float
    cache_bytes: int  # after the timed steps: state (TNL) or KV cache (Llama)
    peak_bytes: int | None  # CUDA only: peak during the timed steps above the allocation before the prefill
    total_bytes: int | None  # CUDA: peak allocated during the timed steps, weights included; CPU: RSS after
    path: str  # what a step timed: "model-step" (`StepRun`), "engine-eager" or "engine-graph" (`EngineRun`)


@dataclass
class BenchRow:
    """One model at one context length, as the latency tab plots it and bench/decode.py prints it."""

    model: str
    quant: str  # "none", "int8" or "bnb_int8": see ModelAdapter.quant
    context: int
    ttft_ms: float
    decode_ms_per_token: float  # median
    decode_p20_ms: float
    decode_p80_ms: float
    tokens_per_s: float
    cache_bytes: int
    peak_bytes: int | None  # decode peak (CUDA only), see DecodeRow
    prefill_peak_bytes: int | None  # prefill peak (CUDA only), see PrefillRow
    peak_mem_mb: float | None  # the larger total of prefill and decode (MiB), see PrefillRow.total_bytes
    path: str = "model-step"  # what the decode columns timed, see DecodeRow.path (rows recorded before: model-step)

    @classmethod
    def of(cls, prefill: PrefillRow, decode: DecodeRow, quant: str = "none") -> "BenchRow":
        totals = [b for b in (prefill.total_bytes, decode.total_bytes) if b is not None]
        return cls(decode.model, quant, decode.context_len, prefill.ttft_ms, decode.decode_ms,
                   decode.decode_p20_ms, decode.decode_p80_ms, decode.tokens_per_s, decode.cache_bytes,
                   decode.peak_bytes, prefill.peak_bytes, max(totals) / 2**20 if totals else None, decode.path)


# -- measurement -------------------------------------------------------------------------------------
def prompt_ids(vocab_size: int, length: int, seed: int = 0, device: torch.device | str = "cpu") -> torch.Tensor:
    """Deterministic token ids [1, length] in [3, vocab) (skipping pad/bos/eos), the same for every model."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab_size, (1, length), generator=generator).to(device)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
    """(fn(), seconds): CUDA events after a synchronize on GPU, perf_counter elsewhere."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        result = fn()
        end.record()
        end.synchronize()
        return result, start.elapsed_time(end) / 1e3
    start_s = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start_s


def _allocated(device: torch.device) -> int | None:
    """CUDA bytes allocated now, after a synchronize (None on CPU)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    return torch.cuda.memory_allocated(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def _peak_above(device: torch.device, baseline: int | None) -> int | None:
    return None if baseline is None else torch.cuda.max_memory_allocated(device) - baseline


def _total(device: torch.device) -> int | None:
    """CUDA: peak allocated since the last reset, weights included; CPU: process RSS now."""
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else process_rss_bytes()


def percentile(samples: Sequence[float], q: float) -> float:
    """The `q`-quantile (0 <= q <= 1) of `samples`, NaN when there are none: linear interpolation between the two
    closest ranks, at position q * (n - 1) of the sorted samples.

    The benchmarks' one definition: it is numpy's default, `statistics.quantiles(method="inclusive")` and what
    `triton.testing.do_bench` reports, and its 0.5 is `statistics.median`, so a p20-p80 spread sits around the
    median printed next to it."""
    if not 0 <= q <= 1:
        raise ValueError(f"q must be in [0, 1], got {q}")
    ordered = sorted(samples)
    if not ordered:
        return float("nan")
    position = q * (len(ordered) - 1)
    below = int(position)
    above = min(below + 1, len(ordered) - 1)
    return ordered[below] + (ordered[above] - ordered[below]) * (position - below)


@torch.inference_mode()
def time_prefill(adapter: ModelAdapter, context_len: int, *, repeats: int = 3, warmup: int = 1,
                 seed: int = 0) -> PrefillRow:
    """TTFT at `context_len`: median over `repeats` of prefill + argmax of the last logits."""
    device = adapter.device
    ids = prompt_ids(adapter.vocab_size, context_len, seed, device)  # [1, T]
    first_token = lambda: adapter.prefill(ids)[0][:, -1].argmax(-1)  # [1]
    for _ in range(warmup):
        first_token()
    baseline = _allocated(device)
    _reset_peak(device)
    seconds = [timed(first_token, device)[1] for _ in range(repeats)]
    median_s = statistics.median(seconds)
    return PrefillRow(adapter.name, context_len, median_s * 1e3, context_len / median_s,
                      _peak_above(device, baseline), _total(device))


def _check_warmup(context_len: int, warmup: int) -> None:
    if not 0 <= warmup < context_len:
        raise ValueError(f"need 0 <= warmup < context_len, got warmup={warmup}, context_len={context_len}")


class StepRun:
    """The model's own step: `adapter.step` fed the next prompt id (teacher-forced, so both models see identical
    inputs whatever their weights) on a cache that read context_len - warmup ids in one prefill and `warmup`
    more in untimed steps."""

    path = "model-step"

    def __init__(self, adapter: ModelAdapter, context_len: int, n_tokens: int, warmup: int, seed: int):
        _check_warmup(context_len, warmup)
        self.adapter, self.position = adapter, context_len - warmup
        self.ids = prompt_ids(adapter.vocab_size, context_len + n_tokens, seed, adapter.device)  # [1, T + n]
        self._prefill()
        for _ in range(warmup):
            self.step()

    def _prefill(self) -> None:
        """Read the ids before `position` into a fresh cache."""
        _, self.cache = self.adapter.prefill(self.ids[:, :self.position])

    def step(self) -> torch.Tensor:
        """One decode step: the next prompt id into the cache; its logits [1, 1, V]."""
        logits, self.cache = self.adapter.step(self.ids[:, self.position:self.position + 1], self.cache)
        self.position += 1
        return logits

    def cache_bytes(self) -> int:
        return self.adapter.cache_bytes(self.cache)


class StaticStepRun(StepRun):
    """A `StepRun` on a `LlamaStaticAdapter`: the cache is preallocated for the whole run, and on CUDA each step
    copies the next id into a static input and replays one captured step."""

    def _prefill(self) -> None:
        """Read the ids before `position` into a cache preallocated for every id of the run; then set up the step
        (on CUDA: captured)."""
        model = self.adapter.model
        _, self.cache = self.adapter.prefill(self.ids[:, :self.position], max_cache_len=self.ids.shape[1])
        self.token = self.ids[:, self.position:self.position + 1].clone()  # [1, 1] static input
        forward = lambda: model(self.token, cache=self.cache, use_cache=True, logits_to_keep=1).logits  # noqa: E731
        self.run, self.path = forward, "static-cache"
        if self.adapter.device.type == "cuda":
            self.run, self.path = self._captured(forward), "static-cache-graph"

    def _captured(self, forward: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
        """`forward` as a graph replay returning its static logits; the warm-up calls advance the cache, so its
        lengths are put back after the capture."""
        lengths = [layer.cumulative_length.clone() for layer in self.cache.layers]
        replay, logits = capture_cuda_graph(forward, warmup=2)
        for layer, length in zip(self.cache.layers, lengths, strict=True):
            layer.cumulative_length.copy_(length)

        def run() -> torch.Tensor:
            replay()
            return logits

        return run

    def step(self) -> torch.Tensor:
        """One decode step: the next prompt id into the cache; its logits [1, 1, V] (on CUDA, the graph's static
        output, overwritten by the next step)."""
        self.token.copy_(self.ids[:, self.position:self.position + 1])
        self.position += 1
        return self.run()


class EngineRun:
    """A model as chat runs it: one reply streamed from a threadless `tnllm.engine` session (prefill into the
    session's slot; the decode step, a CUDA graph for TNL on CUDA; the on-device sampler with the adapter's
    settings; the host transfer, detokenising and the event), eos ignored so that the reply has a fixed length.

    The prompt is context_len - warmup seeded ids and `warmup` untimed steps follow it, so the timed steps see
    the contexts a `StepRun`'s see. Not included: the hand-off from an engine thread to a consumer thread
    (bench/serve.py and bench/engine_gpu.py time threaded sessions).
    """

    def __init__(self, adapter: EngineAdapter, context_len: int, n_tokens: int, warmup: int, seed: int):
        _check_warmup(context_len, warmup)
        engine = Engine(adapter.engine_model(), adapter.tokenizer, EngineConfig(max_sessions=1, threaded=False),
                        eos_ids=set())
        self.path = "engine-eager" if engine.scheduler.decoder is None else "engine-graph"
        self.pool = engine.pool
        prompt = prompt_ids(adapter.vocab_size, context_len - warmup, seed)[0].tolist()
        params = replace(adapter.params, max_new_tokens=1 + warmup + n_tokens)
        self.session = engine.open()
        self.events = iter(self.session.feed_ids(prompt, params))  # a threadless reply steps when iterated
        while next(self.events).stats.new_tokens <= warmup:  # prefill events, the first token, `warmup` steps
            pass

    def step(self) -> None:
        """One engine step: the next token sampled, brought to the host, detokenised and emitted."""
        next(self.events)

    def cache_bytes(self) -> int:
        """The session's state (TNL: the same at any context) or KV cache (as long as the context) now."""
        return self.pool.slot_bytes


def _decode_row(adapter: ModelAdapter, context_len: int, seconds: list[float], run: StepRun | EngineRun,
                peak_bytes: int | None, total_bytes: int | None) -> DecodeRow:
    median_s = statistics.median(seconds)
    return DecodeRow(adapter.name, context_len, len(seconds), median_s * 1e3, percentile(seconds, 0.2) * 1e3,
                     percentile(seconds, 0.8) * 1e3, 1.0 / median_s, run.cache_bytes(), peak_bytes, total_bytes,
                     run.path)


@torch.inference_mode()
def time_decode(adapter: ModelAdapter, context_len: int, n_tokens: int = 32, *, warmup: int = 2,
                seed: int = 0) -> DecodeRow:
    """Per-token decode latency at `context_len`: the adapter's decode run (`StepRun`: the model's step fed
    the next prompt ids; `EngineRun`: a chat reply through the engine), set up with `warmup` untimed steps,
    then `n_tokens` timed steps."""
    device = adapter.device
    baseline = _allocated(device)  # weights
    run = adapter.decode_run(context_len, n_tokens, warmup, seed)
    _reset_peak(device)  # the prefill's activations are gone; the cache stays counted
    seconds = [timed(run.step, device)[1] for _ in range(n_tokens)]
    return _decode_row(adapter, context_len, seconds, run, _peak_above(device, baseline), _total(device))


@torch.inference_mode()
def time_decode_interleaved(adapter: ModelAdapter, context_lengths: Sequence[int], n_tokens: int = 32, *,
                            warmup: int = 2, seed: int = 0) -> list[DecodeRow]:
    """`time_decode` at every context length, the timed steps taking turns (one step at each context, then
    the next round), so that a slow drift of a shared machine hits every context alike. Every run is held
    at once, so there is no per-context decode memory (`peak_bytes` and `total_bytes` None: the rows'
    `peak_mem_mb` is then the prefill's)."""
    runs = {c: adapter.decode_run(c, n_tokens, warmup, seed) for c in context_lengths}
    seconds: dict[int, list[float]] = {c: [] for c in context_lengths}
    for _ in range(n_tokens):
        for c, run in runs.items():
            seconds[c].append(timed(run.step, adapter.device)[1])
    return [_decode_row(adapter, c, seconds[c], runs[c], None, None) for c in context_lengths]


def _no_progress(fraction: float, desc: str = "") -> None:
    """The progress callback when none is given: does nothing."""


def sweep(adapters: Sequence[ModelAdapter], context_lengths: Sequence[int], n_tokens: int = 32, *,
          prefill_repeats: int = 3, warmup: int = 2, seed: int = 0, interleave: bool = False,
          progress: Progress | None = None) -> list[BenchRow]:
    """TTFT and decode latency of every model at every context length, one `BenchRow` each.

    Context lengths run in the outer loop so that slow drifts of a shared machine hit all models alike;
    with `interleave`, each model's decode steps also take turns across the context lengths
    (`time_decode_interleaved`). `progress(fraction, desc=...)` is called before each measurement and once
    at the end.
    """
    progress = progress or _no_progress
    prefills, decodes = {}, {}
    steps = len(adapters) * len(context_lengths)
    total, done = steps + (len(adapters) if interleave else steps), 0
    for context_len in context_lengths:
        for i, adapter in enumerate(adapters):
            progress(done / total, desc=f"{adapter.name}: prefill {context_len} tokens")
            prefills[i, context_len] = time_prefill(adapter, context_len, repeats=prefill_repeats, seed=seed)
            done += 1
            if not interleave:
                progress(done / total, desc=f"{adapter.name}: decode at context {context_len}")
                decodes[i, context_len] = time_decode(adapter, context_len, n_tokens, warmup=warmup, seed=seed)
                done += 1
    if interleave:
        for i, adapter in enumerate(adapters):
            progress(done / total, desc=f"{adapter.name}: decode at every context, steps interleaved")
            for row in time_decode_interleaved(adapter, context_lengths, n_tokens, warmup=warmup, seed=seed):
                decodes[i, row.context_len] = row
            done += 1
    progress(1.0, desc="done")
    return [BenchRow.of(prefills[i, c], decodes[i, c], a.quant) for c in context_lengths
            for i, a in enumerate(adapters)]


def sweep_rounds(adapters: Sequence[ModelAdapter], context_lengths: Sequence[int], n_tokens: int = 32, *,
                 repeats: int = 3, warmup: int = 2, seed: int = 0) -> Iterator[tuple[int, int, BenchRow]]:
    """`repeats` rounds over every (context, model) pair, one whole measurement each (TTFT of one prefill,
    then `n_tokens` decode steps); yields (round, adapter index, that run's `BenchRow`) as each run ends.

    For a live display on a shared machine: a burst of load lands on a few runs of different pairs instead
    of every run of one pair, so the median over rounds drops it, and results exist from the first round
    on. Rounds alternate the model order (A B, then B A) so neither model always runs just after the other.
    Each run drops its own warm-up: one untimed prefill before the timed one (`time_prefill`), `warmup`
    untimed steps before the timed ones (`time_decode`). `sweep(interleave=True)` interleaves at the step
    level instead, holding every cache at once, and returns only at the end.
    """
    for round_ in range(repeats):
        order = list(range(len(adapters)))[:: 1 if round_ % 2 == 0 else -1]
        for context_len in context_lengths:
            for i in order:
                adapter = adapters[i]
                prefill = time_prefill(adapter, context_len, repeats=1, seed=seed)
                decode = time_decode(adapter, context_len, n_tokens, warmup=warmup, seed=seed)
                yield round_, i, BenchRow.of(prefill, decode, adapter.quant)


def print_progress(fraction: float, desc: str = "") -> None:
    """A plain progress callback for scripts (stderr, so stdout stays a table and one JSON line)."""
    print(f"[{fraction:4.0%}] {desc}", file=sys.stderr, flush=True)


def format_table(rows: Sequence[BenchRow]) -> str:
    """A fixed-width text table of sweep rows ("mem MiB" is `peak_mem_mb`: CUDA peak or CPU RSS; "decode path" is
    `path`)."""
    header = f"{'model':<10} {'quant':<8} {'context':>8} {'TTFT ms':>10} {'decode ms/tok':>14} " \
             f"{'p20-p80 ms':>15} {'tok/s':>8} {'cache MiB':>10} {'mem MiB':>9}  decode path"
    lines = [header, "-" * len(header)]
    for r in rows:
        mem = "-" if r.peak_mem_mb is None else f"{r.peak_mem_mb:.1f}"
        lines.append(f"{r.model:<10} {r.quant:<8} {r.context:>8} {r.ttft_ms:>10.1f} {r.decode_ms_per_token:>14.2f} "
                     f"{f'{r.decode_p20_ms:.2f}-{r.decode_p80_ms:.2f}':>15} {r.tokens_per_s:>8.1f} "
                     f"{r.cache_bytes / 2**20:>10.2f} {mem:>9}  {r.path}")
    return "\n".join(lines)
