"""Latency tab: TNL vs the Transformer baseline, through the same timing code as bench/decode.py.

`run_benchmark` streams `tnllm.bench.sweep_rounds` (same adapters, seeded ids, warm-up and timer as
bench/decode.py: each model's decode is a chat reply through an engine, sampling and detokenising included, TNL
on its recurrent state and the Transformer on its KV cache; on CUDA the Transformer's static-cache captured step
beside them; the table's "timed path" says which) as tables: after every (model,
context) run the medians so far, their spread over the rounds, and the recorded reference results of
`bench/results/decode-*.json` beside them in the plots.

`race` streams both models' greedy replies to one prompt side by side, each through an engine of its own, one
engine step per turn (TNL on its recurrent state; the Transformer on its KV cache through `KVCacheLM`: the same
scheduler, sampler and detokeniser), giving each model the turn
whenever its own accumulated compute time is the smaller one, so at any moment both have spent about the same
time and the faster one shows more text. It ends naming the winner and why each side stopped.
"""

from __future__ import annotations

import json
import math
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
import pandas as pd
import torch

from tnllm.bench import (
    BenchRow,
    EngineAdapter,
    ModelAdapter,
    baseline_adapters,
    prompt_ids,
    sweep_rounds,
    timed,
)
from tnllm.engine import Engine, EngineConfig
from tnllm.engine.kv_cache import KVCacheLM
from tnllm.paths import RECORDED_RESULTS
from tnllm.sampling import SamplingParams
from tnllm.webui.runtime import Runtime
from tnllm.webui.validation import (
    CHAT_DEFAULTS,
    MAX_MESSAGE_CHARS,
    MAX_REPLY_SECONDS,
    InputError,
    Limits,
    check_text,
    shown,
)

RESULTS = RECORDED_RESULTS
CPU_CONTEXTS = [128, 256, 512, 1024, 2048, 4096, 8192, 16384]
GPU_CONTEXTS = CPU_CONTEXTS + [32768, 65536, 131072]
DECODE_STEPS = (4, 64)  # timed decode steps per run (the slider's range; the server checks it too)
REPEATS = (1, 5)  # rounds per (model, context): the medians are over these
RACE_FILLER = 8192  # most filler tokens before the race's prompt (also capped by the server's max context)
RACE_NEW_TOKENS = (1, 256)
# The first six columns are the HTTP API's contract (tests/test_app.py reads them by position).
COLUMNS = ["model", "context", "decode ms/token", "TTFT ms", "tokens/s", "cache MiB", "decode peak MiB",
           "memory MiB", "8-bit", "decode min–max ms", "TTFT min–max ms", "runs", "timed path"]
CUDA_ONLY = {"decode peak MiB"}  # measured by torch.cuda's allocator only: an always-empty column on the CPU
PLOT_Y = {"decode ms/token": "Per-token decode latency (ms)", "TTFT ms": "Time to first token (ms)",
          "cache MiB": "Decode cache: state vs KV cache (MiB)"}
SPACER = "\u200b"  # an invisible series: one point at every power of two, so the category axis is log2-spaced
MEMORY_NOTE = ("**cache MiB**: what the decode cache holds after the timed steps (TNL: the recurrent state, the "
               "same at any context; Llama: the KV cache, growing with it). **memory MiB**: on the CPU the whole "
               "server process's resident memory (RSS) after the run, both models' weights, Python and Gradio "
               "included: it tracks growth, not one model's size; on CUDA the peak GPU memory allocated during "
               "the run, weights included. **decode peak MiB** (CUDA only): the peak above the weights during "
               "the timed steps. Each value is the median over the runs; **min–max** is the spread of the "
               "runs' own medians.")


def context_choices(runtime: Runtime) -> list[int]:
    """The context lengths the tab offers: powers of two up to the server's limit."""
    choices = GPU_CONTEXTS if runtime.device.type == "cuda" else CPU_CONTEXTS
    return [c for c in choices if c <= runtime.max_context]


def context_label(context: int) -> str:
    """128 -> "   128": the plots' x categories. Right-aligned to one width, so that the plot's default
    (lexicographic) order of categories is the numeric one: Gradio 6.26's LinePlot fails to draw at all
    when given an explicit `sort` list (a structuredClone error in the browser)."""
    return f"{context:>6}"


def columns(runtime: Runtime) -> list[str]:
    """The table's columns on this server's device (no CUDA-only column on the CPU)."""
    return [c for c in COLUMNS if runtime.device.type == "cuda" or c not in CUDA_ONLY]


def adapters(runtime: Runtime) -> list[ModelAdapter]:
    """Both models as chat runs them (a reply through the engine, chat's default sampling, seeded: TNL on its
    state, the Transformer on its default KV cache) and, on CUDA, the Transformer's strong setting beside them
    (`baseline_adapters`: its static cache with captured steps)."""
    params = SamplingParams(**{**CHAT_DEFAULTS, "seed": 0})
    pair: list[ModelAdapter] = [EngineAdapter(runtime.model, runtime.tokenizer, params, "TNL")]
    if runtime.baseline is not None:
        pair += baseline_adapters(runtime.baseline, runtime.tokenizer, params)
    return pair


def _mib(n: int | None) -> float | None:
    return None if n is None else round(n / 2**20, 3)


def _spread(values: list[float], digits: int) -> str:
    return f"{min(values):.{digits}f}–{max(values):.{digits}f}"


# -- recorded reference results ---------------------------------------------------------------------
@dataclass
class Recorded:
    """One bench/decode.py result file: its rows and where and when they were measured."""

    path: Path
    meta: dict
    rows: list[dict]

    @property
    def label(self) -> str:
        return f"recorded ({self.meta.get('host', '?')}, {self.meta.get('date', '?')})"

    @property
    def on_cuda(self) -> bool:
        return "cuda" in self.meta.get("command", "") or "nvidia" in str(self.meta.get("device", "")).lower()

    def note(self) -> str:
        """A Markdown line: machine, software, models and the command behind the rows."""
        m = self.meta
        params = ", ".join(f"{k} {v / 1e6:.1f}M" for k, v in m.get("parameters", {}).items())
        return (f"**Recorded reference**: `{self.path.relative_to(RESULTS.parents[1])}`, measured "
                f"{m.get('date', '?')} on `{m.get('host', '?')}` ({m.get('device', '?')}, {m.get('threads', '?')} "
                f"threads, torch {m.get('torch', '?')}, {m.get('dtype', '?')}) with models `{m.get('tnl', '?')}` "
                f"and `{m.get('baseline', '?')}` ({params} parameters), {m.get('tokens', '?')} timed steps. "
                f"Another machine and possibly other weights than this server's: compare shapes, not "
                f"absolute numbers.")


def load_recorded(device_type: str, results: Path = RESULTS) -> Recorded | None:
    """The newest bench/results/decode-*.json measured on this kind of device (CPU or CUDA), or None."""
    found = []
    for path in sorted(results.glob("decode-*.json")):
        try:
            data = json.loads(path.read_text())
            rec = Recorded(path, {k: v for k, v in data.items() if k != "rows"}, list(data["rows"]))
        except (OSError, ValueError, KeyError, TypeError):
            continue  # a half-written or foreign file is no reason to break the tab
        if rec.on_cuda == (device_type == "cuda"):
            found.append(rec)
    return max(found, key=lambda r: str(r.meta.get("date", ""))) if found else None


def recorded_frame(recorded: Recorded | None) -> pd.DataFrame:
    """The recorded rows as a table (every model, 8-bit method and context of the file)."""
    cols = ["model", "8-bit", "context", "decode ms/token", "decode p20–p80 ms", "TTFT ms", "tokens/s",
            "cache MiB", "memory MiB"]
    rows = [] if recorded is None else recorded.rows
    return pd.DataFrame(
        [[r["model"], r["quant"], r["context"], round(r["decode_ms_per_token"], 3),
          f"{r['decode_p20_ms']:.2f}–{r['decode_p80_ms']:.2f}", round(r["ttft_ms"], 2), round(r["tokens_per_s"], 1),
          _mib(r["cache_bytes"]), None if r["peak_mem_mb"] is None else round(r["peak_mem_mb"], 1)] for r in rows],
        columns=cols)


def recorded_series(recorded: Recorded | None, quant: str) -> list[dict]:
    """Plot points of the recorded rows of one 8-bit method ("none": float weights), named by file."""
    if recorded is None:
        return []
    return [{"series": f"{r['model']} {recorded.label}", "context": r["context"],
             "decode ms/token": r["decode_ms_per_token"], "TTFT ms": r["ttft_ms"], "cache MiB": _mib(r["cache_bytes"])}
            for r in recorded.rows if r["quant"] == quant]


# -- the live sweep ---------------------------------------------------------------------------------
def summary_row(runs: list[BenchRow]) -> dict:
    """One (model, context)'s runs -> a table row: medians over the runs, min–max of the runs' medians."""
    decode = [r.decode_ms_per_token for r in runs]
    ttft = [r.ttft_ms for r in runs]
    memory = [r.peak_mem_mb for r in runs if r.peak_mem_mb is not None]
    peaks = [r.peak_bytes for r in runs if r.peak_bytes is not None]
    decode_ms = statistics.median(decode)
    return {"model": runs[0].model, "context": runs[0].context, "decode ms/token": round(decode_ms, 3),
            "TTFT ms": round(statistics.median(ttft), 2), "tokens/s": round(1e3 / decode_ms, 1),
            "cache MiB": _mib(runs[-1].cache_bytes), "decode peak MiB": _mib(max(peaks)) if peaks else None,
            "memory MiB": round(max(memory), 1) if memory else None, "8-bit": runs[0].quant,
            "decode min–max ms": _spread(decode, 2), "TTFT min–max ms": _spread(ttft, 1), "runs": len(runs),
            "timed path": runs[0].path}


def table_frame(runs: dict[tuple[int, int], list[BenchRow]], cols: list[str]) -> pd.DataFrame:
    """Every measured (model, context) so far, by context then model."""
    rows = [summary_row(runs[key]) for key in sorted(runs, key=lambda k: (k[1], k[0]))]
    return pd.DataFrame([[row[c] for c in cols] for row in rows], columns=cols)


def plot_frame(table: pd.DataFrame, reference: list[dict], all_contexts: list[int]) -> pd.DataFrame:
    """The plots' data: live medians ("TNL (live)") and recorded points, x as context labels.

    The x axis is categorical (Gradio's LinePlot has no log scale); a transparent spacer series puts a
    point at every power of two between the smallest and largest context shown, so equal steps on the
    axis are equal factors of two."""
    live = [{"series": f"{r['model']} (live)", "context": r["context"], **{y: r[y] for y in PLOT_Y}}
            for r in table.to_dict("records")]
    points = live + reference
    low, high = (min(p["context"] for p in points), max(p["context"] for p in points)) if points else (0, -1)
    powers = [c for c in all_contexts if low <= c <= high and c & (c - 1) == 0]
    spacer = [{"series": SPACER, "context": c, **dict.fromkeys(PLOT_Y, 0.0)} for c in powers]
    frame = pd.DataFrame(points + spacer, columns=["series", "context", *PLOT_Y])
    frame["context"] = frame["context"].map(context_label)
    return frame


def plot_series(runtime: Runtime, recorded: Recorded | None) -> list[str]:
    """Every series name the plots can show (their colours are fixed up front, the spacer's transparent)."""
    pair = adapters(runtime)
    recorded_names = {p["series"] for p in recorded_series(recorded, pair[0].quant)}
    return [f"{a.name} (live)" for a in pair] + [n for a in pair for n in sorted(recorded_names)
                                                  if n.startswith(f"{a.name} ")]


def plot_contexts(runtime: Runtime, recorded: Recorded | None) -> list[int]:
    """Every context a plot can show, in order: the tab's choices, the recorded rows' contexts and every power
    of two between them (the spacer's points)."""
    contexts = set(context_choices(runtime)) | {r["context"] for r in (recorded.rows if recorded else [])}
    powers = {2**k for k in range(min(contexts).bit_length() - 1, max(contexts).bit_length())}
    return sorted(contexts | {p for p in powers if min(contexts) <= p <= max(contexts)})


def _whole(name: str, value, low: int, high: int) -> int:
    """`value` as an int in [low, high] (Gradio sliders send floats like 16.0), else a gr.Error naming it."""
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise gr.Error(f"{name} must be a number, got {shown(value)}.") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise gr.Error(f"{name} must be a number, got {shown(value)}.")
    if value != int(value):
        raise gr.Error(f"{name} must be a whole number, got {shown(value)}.")
    if not low <= value <= high:
        raise gr.Error(f"{name} must be between {low} and {high}, got {shown(value)}.")
    return int(value)


def check_contexts(runtime: Runtime, contexts) -> list[int]:
    """The chosen context lengths, sorted, each one of the tab's choices (ints or their strings)."""
    choices = context_choices(runtime)
    chosen = set()
    for c in contexts or []:
        try:
            value = int(str(c).strip())
        except ValueError:
            value = None
        if value not in choices:
            raise gr.Error(f"contexts: {shown(c)} is not one of {', '.join(map(str, choices))} "
                           f"(this server's limit is {runtime.max_context:,} tokens).")
        chosen.add(value)
    if not chosen:
        raise gr.Error("Pick at least one context length.")
    return sorted(chosen)


def sweep_updates(runtime: Runtime, contexts, n_tokens, repeats, recorded: Recorded | None = None
                  ) -> Iterator[tuple[int, int, str, tuple[pd.DataFrame, ...] | None]]:
    """Checked inputs -> (runs done, runs in all, what just ended, frames) after every run, starting at 0 done;
    frames (decode plot, TTFT plot, cache plot, table: medians so far) when a context's round has ended, else
    None. Progress is counted in runs, never predicted in seconds: a run's time depends on the context and on
    the machine's load."""
    chosen = check_contexts(runtime, contexts)
    n_tokens = _whole("n_tokens", n_tokens, *DECODE_STEPS)
    repeats = _whole("repeats", repeats, *REPEATS)
    pair, cols = adapters(runtime), columns(runtime)
    reference = recorded_series(recorded, pair[0].quant)
    all_contexts = plot_contexts(runtime, recorded)
    total = repeats * len(chosen) * len(pair)
    runs: dict[tuple[int, int], list[BenchRow]] = {}
    yield 0, total, "starting", None
    for done, (round_, i, row) in enumerate(sweep_rounds(pair, chosen, n_tokens, repeats=repeats), start=1):
        runs.setdefault((i, row.context), []).append(row)
        what = f"round {round_ + 1}/{repeats}: {pair[i].name} at {row.context} tokens"
        if done % len(pair):  # `sweep_rounds` runs every model at a context in a row: frames once all have run,
            yield done, total, what, None  # so every update holds every series (a plot keeps its first colours)
            continue
        table = table_frame(runs, cols)
        plot = plot_frame(table, reference, all_contexts)
        yield done, total, what, (plot, plot, plot, table)


def run_benchmark(runtime: Runtime, contexts: list, n_tokens: int, repeats: int = 3,
                  progress: Callable | None = gr.Progress(),  # noqa: B008 (Gradio's API)
                  recorded: Recorded | None = None) -> Iterator[tuple[pd.DataFrame, ...]]:
    """The /latency endpoint: yields (decode plot, TTFT plot, cache plot, table) after every context of every
    round; `progress((done, total), unit="runs")` after every run (API clients read it from the job status)."""
    for done, total, what, frames in sweep_updates(runtime, contexts, n_tokens, repeats, recorded):
        if progress:
            progress((done, total), desc=what, unit="runs")
        if frames:
            yield frames


def status_line(done: int, total: int, what: str) -> str:
    """The tab's progress line: runs measured, and the last one."""
    if done == total:
        return f"✅ Done: {total} of {total} runs measured."
    return f"⏳ {done} of {total} runs measured ({what}{' done' if done else ''})."


def run_benchmark_in_tab(runtime: Runtime, contexts: list, n_tokens: int, repeats: int = 3,
                         recorded: Recorded | None = None) -> Iterator[tuple]:
    """The tab's button: as /latency, plus a status line after every run (Gradio's own progress display shows
    elapsed time over the previous run's duration, a guess that a different choice of contexts makes wrong)."""
    for done, total, what, frames in sweep_updates(runtime, contexts, n_tokens, repeats, recorded):
        yield *(frames or (gr.skip(),) * 4), status_line(done, total, what)


# -- the race ---------------------------------------------------------------------------------------
class _Runner:
    """One side of the race: its greedy reply so far, its own compute clock and how it ended."""

    def __init__(self, name: str, device: torch.device):
        self.name, self.device = name, device
        self.text, self.clock, self.tokens, self.ttft = "", 0.0, 0, 0.0
        self.finish: str | None = None  # "eos", "length", "time limit" or "stopped"

    @property
    def done(self) -> bool:
        return self.finish is not None

    def end(self, why: str) -> None:
        """Stopped from outside (Stop, time limit)."""
        self.finish = why

    def summary(self) -> dict:
        """What the counters show, as plain data."""
        decode_s = self.clock - self.ttft
        return {"name": self.name, "tokens": self.tokens, "clock_s": self.clock, "ttft_s": self.ttft,
                "decode_tok_s": (self.tokens - 1) / decode_s if self.tokens > 1 and decode_s > 0 else 0.0,
                "cache_bytes": self.cache_bytes(), "finish": self.finish}

    def cache_bytes(self) -> int:
        raise NotImplementedError


class _EngineRunner(_Runner):
    """A model as chat runs it: a reply from a threadless engine of its own, one engine step per turn (a prefill
    chunk, or a token sampled on the device, brought to the host, detokenised and emitted), all on the clock.
    TNL's engine holds its recurrent state; the Transformer's (`KVCacheLM`) its KV cache, so both sides pay for
    the same scheduler, sampler and detokeniser."""

    def __init__(self, name: str, model, runtime: Runtime, ids: list[int], max_new_tokens: int):
        super().__init__(name, runtime.device)
        self.engine = Engine(model, runtime.tokenizer, EngineConfig(max_sessions=1, threaded=False))
        reply = self.engine.open().feed_ids(ids, SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens))
        self.events = iter(reply)

    def advance(self) -> None:
        event, seconds = timed(lambda: next(self.events), self.device)
        self.clock += seconds
        self.text += event.text
        if event.stats.new_tokens and not self.tokens:
            self.ttft = self.clock
        self.tokens, self.finish = event.stats.new_tokens, event.finish

    def cache_bytes(self) -> int:
        return self.engine.pool.slot_bytes


def _line(s: dict) -> str:
    state = f"finished: **{s['finish']}**" if s["finish"] else "running"
    return (f"**{s['name']}**: {s['tokens']} tokens · **{s['decode_tok_s']:.1f} tok/s** · TTFT "
            f"{s['ttft_s'] * 1e3:.0f} ms · cache {s['cache_bytes'] / 2**20:.2f} MiB · {state}")


def _overall(s: dict) -> float:
    """Tokens per second of compute, prefill included: the pace at which the race shows a model's text."""
    return s["tokens"] / s["clock_s"] if s["clock_s"] > 0 else 0.0


def counters(summaries: list[dict]) -> str:
    """The counters Markdown: one line per model; once every side has finished, the winner."""
    lines = [_line(s) for s in summaries]
    if summaries and all(s["finish"] for s in summaries):
        ranked = sorted(summaries, key=_overall, reverse=True)
        pace = " vs ".join(f"{s['name']} {_overall(s):.1f} tok/s ({s['finish']})" for s in ranked)
        if len(ranked) > 1 and _overall(ranked[0]) == _overall(ranked[1]):
            lines.append(f"🏁 **Tie**: {pace}")
        else:
            lines.append(f"🏁 **{ranked[0]['name']} wins**: {pace}, tokens per second of compute, prefill "
                         "included")
    return "  \n".join(lines)


class RaceStops:
    """The Stop race button's flags, one per browser session: the race loop checks its flag after every step,
    so Stop never depends on Gradio cancelling the event (its `cancels=` did not reach a running race).

    The Start button arms a fresh flag at once (before the race waits in the queue), so a Stop sent while the
    race is still queued ends it as soon as it starts."""

    def __init__(self):
        self._flags: dict[str, threading.Event] = {}
        self._lock = threading.Lock()

    def arm(self, key: str) -> None:
        """A clear flag for the race about to start in session `key` (a flag a running race holds is kept)."""
        with self._lock:
            flag = self._flags.get(key)
            if flag is None or flag.is_set():
                self._flags[key] = threading.Event()

    @contextmanager
    def running(self, key: str) -> Iterator[threading.Event]:
        """The flag of the race running in session `key` (armed now if Start did not), dropped when it ends."""
        with self._lock:
            flag = self._flags.setdefault(key, threading.Event())
        try:
            yield flag
        finally:
            with self._lock:
                if self._flags.get(key) is flag:
                    del self._flags[key]

    def stop(self, key: str) -> None:
        with self._lock:
            flag = self._flags.get(key)
        if flag is not None:
            flag.set()


def race_ids(runtime: Runtime, prompt, context_tokens, max_new_tokens) -> tuple[list[int], int]:
    """Checked race inputs -> (filler + prompt ids, new tokens); gr.Error naming what is wrong.

    The prompt is checked in characters before tokenising (like a chat message), then the whole request in
    tokens: characters say little about tokens (an emoji is ~4 byte-fallback tokens)."""
    try:
        text = check_text(prompt, Limits(max_chars=MAX_MESSAGE_CHARS))
    except InputError as exc:
        raise gr.Error(str(exc)) from None
    filler = _whole("context_tokens", context_tokens, 0, min(RACE_FILLER, runtime.max_context))
    new = _whole("max_new_tokens", max_new_tokens, *RACE_NEW_TOKENS)
    prompt_ids_ = runtime.tokenizer.chat_ids([("human", text)])
    total = filler + len(prompt_ids_) + new
    if total > runtime.max_context:
        raise gr.Error(f"Too long: {filler:,} filler + {len(prompt_ids_):,} prompt + {new:,} new tokens = "
                       f"{total:,} tokens, above this server's limit of {runtime.max_context:,}.")
    ids = prompt_ids(runtime.model.config.vocab_size, filler)[0].tolist() if filler else []
    return ids + prompt_ids_, new


def race(runtime: Runtime, prompt: str, context_tokens: int, max_new_tokens: int, *,
         time_limit_s: float = MAX_REPLY_SECONDS, stop: threading.Event | None = None
         ) -> Iterator[tuple[str, str, str, list[dict]]]:
    """Stream (TNL text, Llama text, counters, summaries) as both models answer `prompt` after
    `context_tokens` of filler; `stop` set ends both ("stopped"), and so does `time_limit_s` ("time limit")."""
    if runtime.baseline is None:
        raise gr.Error("No Transformer baseline is loaded.")
    ids, new = race_ids(runtime, prompt, context_tokens, max_new_tokens)
    started = time.monotonic()
    runners = [_EngineRunner("TNL", runtime.model, runtime, ids, new),
               _EngineRunner("Llama", KVCacheLM(runtime.baseline), runtime, ids, new)]
    while not all(r.done for r in runners):
        active = [r for r in runners if not r.done]
        ended = ("stopped" if stop is not None and stop.is_set()
                 else "time limit" if time.monotonic() - started >= time_limit_s else None)
        if ended:
            for r in active:
                r.end(ended)
        else:
            min(active, key=lambda r: r.clock).advance()  # whoever has spent less compute time moves next
        summaries = [r.summary() for r in runners]
        yield runners[0].text, runners[1].text, counters(summaries), summaries
