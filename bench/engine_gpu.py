"""GPU figures of the engine (docs/engine.md): decode through the engine as chat uses it, graph vs eager.

    python bench/engine_gpu.py --device cuda --out bench/results            # H200, under 10 minutes
    python bench/engine_gpu.py --device cpu --smoke --out /tmp/engine-smoke  # seconds; what the tests run

Per preset (tnl-7b, tnl-1b; random bf16 weights; tiny fp32 in --smoke):
* hbm_floor_ms: the step's bytes (weights + every session's fp32 state read and written) / the copy bandwidth
  measured in the same run (a device-to-device copy of --copy-gib, read + write counted);
* decode rows: sessions opened in a threaded engine, prompts of `context` random ids prefilled and 4-token
  replies each (not timed: rounds until one captures no new graph), then replies of --tokens tokens (eos
  ignored) read by one consumer thread each, as chat reads them (sampling, detokenising, events included).
  decode_ms_per_token = median gap between two tokens of a session; aggregate_tok_s = tokens of all sessions /
  wall time of the decode; timed_captures = graphs captured during it. Batch 1 at each --contexts, and
  --sessions concurrent sessions at the first context;
* paths: "engine-graph" (captured decode per batch bucket, sampler inside), "engine-graph-sampler-outside",
  "engine-eager", and "graph-replay" (the captured step with chat's sampling plan and the id transfer alone, the
  host waiting for each: no scheduler, no events, no step ahead);
* interleave: --interleave-sessions decode while a --interleave-prompt-token prompt arrives; their gaps during
  its prefill against before, per prefill budget (chunk) in --budgets, with the chunks packed into the decode
  steps' forward and read beside them (--packing); each after an untimed round of the same (graph captures,
  Triton compiles);
* check: graph vs eager logits and states of one step (fp32 copy of the 1B preset; tiny in --smoke), rel-L2.

--prologues off / int8 / all: every row with the decode products' fused prologues nowhere, on int8 weights, or on
int8 and float weights (an A/B of `kernels.fuses_prologue`; rows name the mode; auto = the shipped setting);
gated1: as shipped, but out_proj takes the gated norm at one row only, so the blocks run their norms as kernels at
2-16 sessions (the setting before the gated norm went up to 16 rows).
--norms deferred / kernels: the blocks' norms left to the products after them, or run as kernels
(`kernels.DEFERRED_NORMS`; rows name the mode; auto = the shipped setting).
--pdl on / off: the one-row decode products, of every weight kind, launched with programmatic dependent launch or
not (`kernels._pdl.DECODE_PDL`; rows name the mode; auto = the shipped setting: int8 products only).

Every row is written to OUT/engine-h200.json as soon as it exists (the same name in --smoke, so the test reads
the H200 layout), so a timeout loses nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import gc
import itertools
import json
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch

from tnllm import TNLConfig, TransNormerLLM, kernels, quant
from tnllm.engine import Engine, EngineConfig, Session
from tnllm.engine.graphs import DecodeGraphs, PrefillGraphs, capture_cuda_graph, replay_eagerly, split_into_pieces
from tnllm.engine.scheduler import decode_step
from tnllm.kernels import _pdl
from tnllm.sampling import SamplingParams
from tnllm.tokenizer import BUNDLED_TOKENIZER, Tokenizer
from tnllm.webui.validation import CHAT_DEFAULTS

from serve import stream_in_threads, time_sessions, token_gaps_ms

ROOT = Path(__file__).resolve().parents[1]

# --prologues: the settings of kernels' decision `fuses_prologue` each mode runs with (an A/B of the fusion)
# ("gated1": out_proj takes the gated norm at one row only, so blocks compose their norms at 2-16 sessions)
PROLOGUE_MODES = {"auto": {}, "off": {"PROLOGUE_WEIGHTS": ()}, "int8": {"PROLOGUE_WEIGHTS": ("int8",)},
                  "all": {"PROLOGUE_WEIGHTS": ("int8", "float")},
                  "gated1": {"FUSED_PROLOGUES": {**kernels.FUSED_PROLOGUES, "gated_norm": 1}}}
NORM_MODES = {"auto": {}, "deferred": {"DEFERRED_NORMS": True}, "kernels": {"DEFERRED_NORMS": False}}
# settings of kernels._pdl: auto = as shipped, on = every weight kind, off = none
PDL_MODES = {"auto": {}, "on": {"DECODE_PDL": frozenset(_pdl.WEIGHT_KINDS)}, "off": {"DECODE_PDL": frozenset()}}
CHECK_CHUNK, CHECK_MAX_CHUNK = 37, 64  # the captured-vs-eager prefill check: 37 ids = pieces of 32, 4 and 1
CHECK_BATCHED = (5, 12)  # chunks read together with it (slots 2 and 3): pieces 4 + 1 and 8 + 4
# Sampled with chat's defaults (the length is each row's), seeded.
WARM_ROUNDS = 4  # untimed rounds before a timed one, at most (see decode_row)
PARAMS = {**{k: v for k, v in CHAT_DEFAULTS.items() if k != "max_new_tokens"}, "seed": 0}


class ModuloTokenizer:
    """The bundled tokenizer for a larger random-weight vocabulary: ids are folded into its range, so
    detokenising costs what it costs in chat."""

    def __init__(self, base: Tokenizer):
        self.base = base

    def decode(self, ids) -> str:
        return self.base.decode([i % self.base.vocab_size for i in ids])

    def piece_text(self, token_id: int) -> str | None:
        return self.base.piece_text(token_id % self.base.vocab_size)


class Results:
    """Rows and notes, rewritten to one JSON file after every addition."""

    def __init__(self, path: Path, meta: dict):
        self.path, self.data = path, {**meta, "rows": [], "checks": [], "interleave": [], "notes": []}
        self.save()

    def add(self, key: str, item) -> None:
        self.data[key].append(item)
        print(json.dumps(item), flush=True)
        self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.data, indent=2) + "\n")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device, gib: float) -> float:
    """Bytes/s of a device-to-device copy (read + write), best of 5 after a warm-up."""
    n = int(gib * 2**30)
    src, dst = torch.empty(n, dtype=torch.uint8, device=device), torch.empty(n, dtype=torch.uint8, device=device)
    dst.copy_(src)
    best = float("inf")
    for _ in range(5):
        sync(device)
        start = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n / best


def build(preset: str, dtype: torch.dtype, device: torch.device) -> TransNormerLLM:
    """Random weights, initialised on the device (a 7B model never passes through host memory)."""
    torch.manual_seed(0)
    with device:
        model = TransNormerLLM(TNLConfig.from_name(preset))
    return model.to(dtype).eval()


def weight_bytes(model: TransNormerLLM, *, per_step: bool = False) -> int:
    """Bytes of every parameter and buffer, each storage once (the tied head counts once; int8 Linears keep their
    weights as buffers). `per_step`: what one decode step reads, so the embedding table counts only where the
    head reads it (a float tied head); a step looks up one of its rows, and an int8 head holds its own copy."""
    seen = {t.data_ptr(): t.numel() * t.element_size() for t in itertools.chain(model.parameters(), model.buffers())}
    table = model.model.embed_tokens.weight
    if per_step and table.data_ptr() != model.lm_head.weight.data_ptr():
        seen.pop(table.data_ptr())
    return sum(seen.values())


def prefilled_sessions(engine: Engine, contexts: list[int]) -> list[Session]:
    """One session per context, holding that many random ids (read through a 1-token reply, untimed)."""
    vocab = engine.model.config.vocab_size
    sessions = []
    for i, context in enumerate(contexts):
        session = engine.open()
        ids = torch.randint(3, vocab, (context - 1,), generator=torch.Generator().manual_seed(i)).tolist()
        session.feed_ids(ids, SamplingParams(max_new_tokens=1, **PARAMS)).wait()
        sessions.append(session)
    return sessions


class DecodeFigures(NamedTuple):
    ms: float              # median ms between two tokens of a session
    tok_s: float           # aggregate tok/s, from the submissions to the last token
    timed_captures: int    # graphs captured during the timed round (0 in the steady state it means to measure)


def decode_row(engine: Engine, contexts: list[int], tokens: int,
               before_timed: Callable[[], None] = lambda: None) -> DecodeFigures:
    """The figures of one `tokens`-long reply per session, all at once, in sessions already holding `contexts`
    tokens (each reads only its 2 pending ids first). `before_timed` runs between the untimed rounds and the
    timed one."""
    sessions = prefilled_sessions(engine, contexts)
    # The timed round measures the steady state of a server that has been running: every graph its steps can
    # need is captured first (`Engine.precapture`; how the sessions' first steps group depends on thread timing,
    # so untimed rounds alone did not always meet every shape), then untimed rounds until one captures nothing
    # (at most WARM_ROUNDS). `timed_captures` says whether the timed round still captured.
    params = SamplingParams(max_new_tokens=tokens, **PARAMS)
    engine.precapture(params, prefill_pieces=False)  # the timed replies read no prompt
    for _ in range(WARM_ROUNDS):
        before = engine.captured_graphs
        time_sessions([functools.partial(s.feed_ids, [], SamplingParams(max_new_tokens=4, **PARAMS))
                       for s in sessions])
        if engine.captured_graphs == before:
            break
    before_timed()
    before = engine.captured_graphs
    tok_s, gaps, total = time_sessions([functools.partial(s.feed_ids, [], params) for s in sessions])
    for s in sessions:
        s.close()
    assert total == tokens * len(sessions), f"{total} tokens from {len(sessions)} sessions"
    return DecodeFigures(statistics.median(gaps), tok_s, engine.captured_graphs - before)


def graph_replay_ms(engine: Engine, batch: int, tokens: int) -> float:
    """The captured step (chat's sampling plan) and the id transfer back to back, no scheduler and no step ahead:
    what one step costs when the host waits for it. Needs a threadless graph engine (nothing else steps it)."""
    slots = list(range(1, batch + 1))
    for slot in slots:
        engine.sampler.configure(slot, SamplingParams(**PARAMS), seed=slot, prompt_ids=[])
    plan = engine.sampler.plan(slots)
    for _ in range(3):
        engine.scheduler.decoder.step(slots, plan).tolist()
    start = time.perf_counter()
    for _ in range(tokens):
        engine.scheduler.decoder.step(slots, plan).tolist()
    return (time.perf_counter() - start) / tokens * 1e3


def graph_vs_eager(preset: str, device: torch.device, batch: int = 3) -> dict:
    """One decode step of `batch` rows, captured vs eager, from the same fp32 states: rel-L2 of logits/states."""
    model = build(preset, torch.float32, device)
    with torch.inference_mode():
        return _graph_vs_eager(model, preset, device, batch)


def _graph_vs_eager(model: TransNormerLLM, preset: str, device: torch.device, batch: int,
                    capture=capture_cuda_graph) -> dict:
    """The check itself (`capture`: tests pass an eager stand-in to run it on the CPU)."""
    engine = Engine(model, None, EngineConfig(max_sessions=4, cuda_graphs=False, threaded=False))
    graphs = DecodeGraphs(model, engine.pool, engine.sampler, max_batch=4, sample_in_graph=False, capture=capture)
    slots = list(range(1, batch + 1))
    slot_ids = torch.tensor(slots, device=device)
    ids = torch.randint(3, model.config.vocab_size, (batch, 300), generator=torch.Generator().manual_seed(0))
    model(ids.to(device), engine.pool.rows(slot_ids))
    engine.sampler.last_token[slot_ids] = ids[:, -1].to(device)
    before = [t.clone() for t in engine.pool.kv], engine.pool.positions.clone()
    eager_logits = decode_step(model, engine.pool, engine.sampler, slot_ids, sample=False).clone()
    eager_state = [t[slot_ids].clone() for t in engine.pool.kv]
    for t, saved in zip(engine.pool.kv, before[0]):
        t.copy_(saved)
    engine.pool.positions.copy_(before[1])
    graphs.step(slots)
    graph_logits = graphs.captured(batch).out[:batch]

    def rel(a, b):
        return float((a.double() - b.double()).norm() / b.double().norm())

    state_err = max(rel(t[slot_ids], e) for t, e in zip(engine.pool.kv, eager_state))
    result = {"preset": preset, "dtype": "fp32", "batch": batch, "logits_rel_l2": rel(graph_logits, eager_logits),
              "state_rel_l2": state_err}
    # A captured prefill chunk of CHECK_CHUNK ids (several pieces) against the same pieces run eagerly, from slot 1's
    # state; beside it, for information, one eager chunk of all the ids (another grouping of the sums: in fp32 on
    # a GPU the chunk kernel's dots run in tf32, so groupings differ by about 1e-3). Then the same chunk read
    # together with chunks of CHECK_BATCHED ids into slots 2 and 3 (batched pieces) against the same batched pieces
    # run eagerly; beside it, for information, against each chunk's pieces alone (the chunk kernel splits a batch
    # of rows into fewer segments than one row: another grouping).
    chunk = PrefillGraphs(model, engine.pool, CHECK_MAX_CHUNK, max_batch=4, capture=capture)
    chunk_eager = PrefillGraphs(model, engine.pool, CHECK_MAX_CHUNK, max_batch=4, capture=replay_eagerly)
    generator = torch.Generator().manual_seed(1)
    chunks = [(torch.randint(3, model.config.vocab_size, (n,), generator=generator).tolist(), slot)
              for slot, n in enumerate((CHECK_CHUNK, *CHECK_BATCHED), start=1)]
    saved = {slot: engine.pool.read(slot) for _, slot in chunks}

    def eager(ids: list[int], slot: int, pieces: list[int]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        engine.pool.write(slot, saved[slot])
        start = 0
        for size in pieces:
            piece = torch.tensor([ids[start:start + size]], device=device)  # [1, size]
            logits = model(piece, engine.pool.rows(slot_ids[slot - 1:slot]), logits_to_keep=1)[:, -1].clone()
            start += size
        return logits, [t[slot].clone() for t in engine.pool.kv]

    def restore() -> None:
        for slot, state in saved.items():
            engine.pool.write(slot, state)

    pieces = split_into_pieces(CHECK_CHUNK, chunk.sizes)
    one_logits, one_state = eager(chunks[0][0], 1, [CHECK_CHUNK])
    wanted = [eager(ids, slot, split_into_pieces(len(ids), chunk.sizes)) for ids, slot in chunks]
    restore()
    graph_chunk = chunk.run(chunks[:1])[0]
    result["prefill_pieces"] = pieces
    result["prefill_logits_rel_l2"] = rel(graph_chunk, wanted[0][0])
    result["prefill_state_rel_l2"] = max(rel(t[1], e) for t, e in zip(engine.pool.kv, wanted[0][1]))
    result["pieces_vs_one_chunk_logits_rel_l2"] = rel(wanted[0][0], one_logits)
    result["pieces_vs_one_chunk_state_rel_l2"] = max(rel(a, b) for a, b in zip(wanted[0][1], one_state))
    restore()
    batched_eager = chunk_eager.run(chunks)
    eager_states = {slot: [t[slot].clone() for t in engine.pool.kv] for _, slot in chunks}
    restore()
    batched = chunk.run(chunks)
    result["prefill_batched_logits_rel_l2"] = max(rel(got, want) for got, want in zip(batched, batched_eager))
    result["prefill_batched_state_rel_l2"] = max(rel(t[slot], e) for _, slot in chunks
                                                 for t, e in zip(engine.pool.kv, eager_states[slot]))
    result["batched_vs_alone_logits_rel_l2"] = max(rel(got, want[0]) for got, want in zip(batched, wanted))
    result["pass_1e-5"] = all(result[k] <= 1e-5 for k in (
        "logits_rel_l2", "state_rel_l2", "prefill_logits_rel_l2", "prefill_state_rel_l2",
        "prefill_batched_logits_rel_l2", "prefill_batched_state_rel_l2"))
    return result


def interleave(engine: Engine, n_decoding: int, prompt_tokens: int, tokens: int) -> dict:
    """Gaps of `n_decoding` decoding sessions before and while a long prompt is prefilled in chunks."""
    decoding = [engine.open() for _ in range(n_decoding)]
    params = SamplingParams(max_new_tokens=tokens, **PARAMS)
    threads, stamps, _ = stream_in_threads([functools.partial(s.feed_ids, [5 + i], params)
                                         for i, s in enumerate(decoding)])
    deadline = time.monotonic() + 120
    while min(map(len, stamps)) < tokens // 4:  # decoding at full pace first
        if time.monotonic() > deadline:
            raise TimeoutError("the decoding sessions did not get going")
        time.sleep(0.001)
    newcomer = engine.open()
    ids = torch.randint(3, engine.model.config.vocab_size, (prompt_tokens,),
                        generator=torch.Generator().manual_seed(9)).tolist()
    start = time.perf_counter()
    reply = newcomer.feed_ids(ids, SamplingParams(max_new_tokens=1, **PARAMS)).wait()
    end = time.perf_counter()  # its first (and only) token: the prefill is over
    if reply.finish_reason != "length":
        raise RuntimeError(f"the long prompt's reply ended with {reply.finish_reason!r}")
    for t in threads:
        t.join()
    before, during = [], []
    for times in stamps:
        for t1, gap in zip(sorted(set(times))[1:], token_gaps_ms(sorted(set(times)))):
            (during if start <= t1 <= end else before if t1 < start else []).append(gap)
    for s in decoding + [newcomer]:
        s.close()
    return {"decoding_sessions": n_decoding, "prompt_tokens": prompt_tokens,
            "prefill_budget": engine.scheduler.prefill_budget, "prefill_s": end - start,
            "ms_per_token_before": statistics.median(before),
            "ms_per_token_during": statistics.median(during) if during else None,
            "ratio": statistics.median(during) / statistics.median(before) if during else None}


def build_weights(preset: str, method: str, device: torch.device) -> TransNormerLLM:
    """`build`'s model (bf16 on CUDA, fp32 on the CPU), quantised in place unless `method` is "none"."""
    model = build(preset, torch.bfloat16 if device.type == "cuda" else torch.float32, device)
    if method != "none":
        quant.quantize(model, method)
        gc.collect()  # the float weights it replaced go back to the device
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return model


def bench_preset(preset: str, args, results: "Results", tok, bandwidth: float) -> None:
    """Every decode row and the interleave figures of one preset."""
    device, contexts = torch.device(args.device), [int(c) for c in args.contexts.split(",")]
    cuda = device.type == "cuda"
    model = build_weights(preset, args.quant, device)
    weights = weight_bytes(model, per_step=True)

    def row(path: str, batch: int, context: int, ms: float, tok_s: float, state_bytes: int, **extra) -> dict:
        floor = (weights + 2 * batch * state_bytes) / bandwidth * 1e3  # weights read, states read and written
        return {"preset": preset, "quant": args.quant, "batch": batch, "context": context, "decode_ms_per_token": ms,
                "hbm_floor_ms": floor, "floor_fraction": floor / ms,
                "aggregate_tok_s": tok_s, "path": path, "prologues": args.prologues, "norms": args.norms,
                "pdl": args.pdl, **extra}

    if cuda:
        with section(results, f"{preset} graph-replay"):
            engine = Engine(model, tok, EngineConfig(max_sessions=args.sessions, cuda_graphs=True, threaded=False))
            for batch in (1, args.sessions):
                ms = graph_replay_ms(engine, batch, args.tokens)
                results.add("rows", row("graph-replay", batch, 0, ms, batch * 1e3 / ms, engine.pool.slot_bytes))
            del engine
    paths = {"engine-eager": dict(cuda_graphs=False)}
    if cuda:
        paths = {"engine-graph": dict(cuda_graphs=True),
                 "engine-graph-sampler-outside": dict(cuda_graphs=True, sample_in_graph=False), **paths}
    paths = {path: options for path, options in paths.items() if path in args.paths.split(",")}
    for path, options in paths.items():
        with section(results, f"{preset} {path}"):
            engine = Engine(model, tok, EngineConfig(max_sessions=args.sessions, prefill_budget=16384, **options),
                            eos_ids=set())
            try:
                rows = [(1, [c]) for c in contexts] + [(args.sessions, [contexts[0]] * args.sessions)]
                for batch, row_contexts in rows:
                    figures = decode_row(engine, row_contexts, args.tokens)
                    results.add("rows", row(path, batch, row_contexts[0], figures.ms, figures.tok_s,
                                            engine.pool.slot_bytes, timed_captures=figures.timed_captures))
            finally:
                engine.shutdown()
    for budget in (int(b) for b in args.budgets.split(",") if b):  # "" skips the interleave figures
        for packing in args.packing.split(","):
            with section(results, f"{preset} interleave budget {budget} packing {packing}"):
                engine = Engine(model, tok, EngineConfig(max_sessions=args.interleave_sessions + 1,
                                                         prefill_budget=budget, pack_chunks=packing == "on"),
                                eos_ids=set())
                try:
                    # an untimed round first: its graph captures and Triton compiles would stall the timed one
                    for _ in range(2):
                        figures = interleave(engine, args.interleave_sessions, args.interleave_prompt,
                                             4 * args.tokens)
                    results.add("interleave", {"preset": preset, "quant": args.quant, "packed": packing == "on",
                                               **figures})
                finally:
                    engine.shutdown()


@contextlib.contextmanager
def section(results: Results, name: str):
    """Run one section; a failure is recorded in the notes (with its traceback on stderr) and the run goes on."""
    try:
        yield
    except Exception as exc:  # noqa: BLE001 (one failed section must not lose the others' figures)
        traceback.print_exc()
        results.add("notes", f"{name} failed: {type(exc).__name__}: {exc}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--smoke", action="store_true", help="tiny preset, small sizes: seconds on a CPU")
    parser.add_argument("--presets", default="tnl-7b,tnl-1b")
    parser.add_argument("--quant", default="none", choices=("none", "int8"),
                        help="weights of every row: the preset's float dtype, or quantised in place to int8 "
                             "(bitsandbytes cannot be captured in a graph)")
    parser.add_argument("--contexts", default="1024,32768,131072")
    parser.add_argument("--sessions", type=int, default=16)
    parser.add_argument("--paths", default="engine-graph,engine-graph-sampler-outside,engine-eager",
                        help="decode paths to time (the graph ones need CUDA)")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--budgets", default="256,512,1024",
                        help="prefill budgets (tokens per step: the captured chunk) to interleave")
    parser.add_argument("--packing", default="on,off",
                        help="interleave with the prompt's chunks inside the decode steps (on) and beside them (off)")
    parser.add_argument("--interleave-sessions", type=int, default=8)
    parser.add_argument("--interleave-prompt", type=int, default=32768)
    parser.add_argument("--check-preset", default="tnl-1b")
    parser.add_argument("--copy-gib", type=float, default=4.0)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--prologues", default="auto", choices=tuple(PROLOGUE_MODES),
                        help="decode products fused with the op before them: as kernels.PROLOGUE_WEIGHTS says (auto), "
                             "nowhere (off), on int8 weights (int8), on int8 and float weights (all), or as shipped "
                             "with out_proj's gated norm at one row only (gated1: blocks compose their norms at "
                             "2-16 rows)")
    parser.add_argument("--norms", default="auto", choices=tuple(NORM_MODES),
                        help="decode blocks' norms: as kernels.DEFERRED_NORMS says (auto), left to the products after "
                             "them where the blocks allow (deferred), or kernels of their own (kernels)")
    parser.add_argument("--pdl", default="auto", choices=tuple(PDL_MODES),
                        help="one-row decode products with programmatic dependent launch: as kernels._pdl.DECODE_PDL "
                             "says (auto: int8 products), on for every weight kind, or off")
    args = parser.parse_args()
    for name, value in {**PROLOGUE_MODES[args.prologues], **NORM_MODES[args.norms]}.items():
        setattr(kernels, name, value)
    for name, value in PDL_MODES[args.pdl].items():
        setattr(_pdl, name, value)
    if args.smoke:
        args.presets, args.contexts, args.sessions, args.tokens = "tiny", "64,256", 4, 12
        args.budgets, args.interleave_sessions, args.interleave_prompt = "64", 2, 512
        args.check_preset, args.copy_gib = "tiny", 0.0625
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(1)
    cuda = device.type == "cuda"
    dtype = "bf16" if cuda else "fp32"
    bandwidth = copy_bandwidth(device, args.copy_gib)
    results = Results(args.out / "engine-h200.json", {
        "bench": "engine", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if cuda else platform.processor() or platform.machine(),
        "torch": torch.__version__, "dtype": dtype, "command": "python " + " ".join(sys.argv),
        "copy_bandwidth_gb_s": bandwidth / 1e9, "tokens": args.tokens})
    tok = ModuloTokenizer(Tokenizer(BUNDLED_TOKENIZER))
    if not cuda:
        results.add("notes", "CUDA graphs need a CUDA device: graph paths and the graph-vs-eager check skipped")
    for preset in args.presets.split(","):
        with section(results, preset):
            bench_preset(preset, args, results, tok, bandwidth)
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    if cuda:
        with section(results, "graph vs eager"):
            results.add("checks", graph_vs_eager(args.check_preset, device))


if __name__ == "__main__":
    main()
