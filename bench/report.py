"""Write BENCHMARKS.md from bench/results/kernels-h200.json and, when present, the bundled-model training
sweep bench/results/train-sweep-h200.json, the bench/decode.py runs bench/results/decode-*.json, the
bench/soak.py figures bench/results/soak-cpu.json, the chat's sampling grid bench/results/sampling-cpu.json,
the engine runs bench/results/engine-h200.json and bench/results/serve-cpu.json
(never hand-edit the figures). Each section states the date, hardware and versions its own JSON records; a
section whose JSON is missing says it is not measured yet.

    python bench/report.py [--json bench/results/kernels-h200.json] [--out BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

HEADER = """# Benchmarks

Date: {date}. Hardware: {device}. Software: torch {torch}, triton {triton}, fla-core {fla}, lightning-attn
{official}. Command (repo root, wheels installed on the machine, see bench/kernels.py):

    python bench/kernels.py --sweep        # then: python bench/report.py

Protocol (docs/benchmarks.md#kernel-benchmark): bf16 inputs, fp32 state, H={H}, ALiBi rates 2^(-8(h+1)/H),
B·N = 65,536 tokens (131,072 at N=128k, B=1); `triton.testing.do_bench` median (warm-up 25 ms, rep 100 ms,
L2 flushed); every kernel in its native layout, pre-built. Ceilings measured in the same run: device copy
**{copy:.2f} TB/s** (read+write), bf16 8192³ matmul **{mm:.0f} TF/s**. % floor = (q,k,v,o bytes [+ dO, dq, dk,
dv]) / copy BW / time.
Anchors: fla = `chunk_simple_gla(q, k, v, g_gamma=-rate, scale=1.0)`; official =
`lightning_attn_func(q, k, v, s=rate.reshape(H,1,1))` ([B,H,N,D]); sdpa = `scaled_dot_product_attention(
is_causal=True)` (different op: speed reference only; skipped for N > 32k and dk != dv).
One run, no repeat: differences under ~10% are not significant. Our launch config: `{config}`.
"""


def fmt(x, f="{:.3f}"):
    return f.format(x) if isinstance(x, (int, float)) else "—"


def run_date(result: dict) -> str:
    """The date a result JSON records for its run ("not recorded" for files written before runs dated them)."""
    return result.get("date") or "not recorded"


def not_measured(title: str, results: str, command: str) -> str:
    """A section whose results file does not exist yet: its title, the file and the command that writes it."""
    return f"\n## {title}\n\nNot measured yet: no {results}. Command: `{command}`.\n"


def _prefill_lines(r: dict) -> list[str]:
    """The prefill / training table: one row per (shape, impl), ours' speed-ups over each anchor."""
    out = ["## Prefill / training (ms, lower is better)", "",
           "| N | B | dk/dv | impl | fwd | fwd+bwd | fwd Mtok/s | % fwd floor | % fwd+bwd floor | "
           "ours faster (fwd) | ours faster (fwd+bwd) | peak GiB (fwd+bwd, over inputs) |", "|" + "---|" * 12]
    ours = {(x["B"], x["N"], x["dk"]): x for x in r["rows"] if x["impl"] == "ours"}
    for x in r["rows"]:
        o = ours.get((x["B"], x["N"], x["dk"]), {})
        sf = "" if x["impl"] == "ours" else fmt(o.get(f"fwd_speedup_vs_{x['impl']}"), "{:.2f}×")
        sb = "" if x["impl"] == "ours" else fmt(o.get(f"fwdbwd_speedup_vs_{x['impl']}"), "{:.2f}×")
        err = f" ({x['error'][:60]})" if "error" in x else ""
        out.append(f"| {x['N']} | {x['B']} | {x['dk']}/{x['dv']} | {x['impl']}{err} | {fmt(x.get('fwd_ms'))} | "
                   f"{fmt(x.get('fwdbwd_ms'))} | {fmt(x.get('fwd_Mtok_s'), '{:.1f}')} | "
                   f"{fmt(x.get('fwd_pct_floor'), '{:.0f}%')} | {fmt(x.get('fwdbwd_pct_floor'), '{:.0f}%')} | "
                   f"{sf} | {sb} | {fmt(x.get('peak_extra_GiB'), '{:.2f}')} |")
    return out


def _decode_step_lines(r: dict, H) -> list[str]:
    """The decode-step table (none when the run has no decode rows)."""
    if not r.get("decode"):
        return []
    out = ["", f"## Decode step (H={H}, D=E=128, bf16 q/k/v, fp32 state; µs per step, CUDA-graph replay "
           "of 10 steps)", "", "| B | impl | µs | state GB/s (read+write) |", "|---|---|---|---|"]
    for x in sorted(r["decode"], key=lambda x: (x["B"], x["impl"])):
        out.append(f"| {x['B']} | {x['impl']} | {fmt(x.get('us'), '{:.1f}')} | "
                   f"{fmt(x.get('state_GBps'), '{:.0f}')} |")
    out.append("\nours updates the state in place; fla `fused_recurrent_simple_gla` writes a new final state.")
    return out


def _correctness_lines(r: dict) -> list[str]:
    """The correctness table: rel-L2 of ours and fla vs the fp32 reference (none when not recorded)."""
    if not r.get("correctness"):
        return []
    out = ["", "## Correctness (bf16 inputs, first sequence of each shape, initial state given; rel-L2 vs "
           "the fp32 chunked reference)", "", "| shape | impl | o | final | dq | dk | dv |",
           "|---|---|---|---|---|---|---|"]
    for key, c in r["correctness"].items():
        for impl in ("ours", "fla"):
            if impl in c:
                e = c[impl]
                out.append(f"| {key} | {impl} | " + " | ".join(fmt(e.get(n), "{:.2e}") for n in
                                                             ("o", "final", "dq", "dk", "dv")) + " |")
        if "ours_vs_fla_full_o" in c:
            out.append(f"| {key} | ours vs fla (full batch, o) | {fmt(c['ours_vs_fla_full_o'], '{:.2e}')} "
                       "| | | | |")
    return out


def _sweep_lines(r: dict) -> list[str]:
    """Our launch-config sweep table (none when the run did not sweep)."""
    if not r.get("sweep"):
        return []
    out = ["", "## Our launch-config sweep (ms; the best fwd+bwd sum is the default in triton_chunk._CFG)", "",
           "| B×N | dk/dv | config | fwd | fwd+bwd |", "|---|---|---|---|---|"]
    for x in r["sweep"]:
        out.append(f"| {x['B']}×{x['N']} | {x['dk']}/{x['dv']} | `{x['cfg']}` | {fmt(x.get('fwd_ms'))} | "
                   f"{fmt(x.get('fwdbwd_ms'))} |")
    return out


def _missing_lines(r: dict) -> list[str]:
    """A note naming the tables this run lacks (the wide row, the decode step) and the command for them."""
    missing = [name for name, ok in (("dk=256/dv=128 anchors row", any(x["dk"] != x["dv"] for x in r["rows"])),
                                     ("decode step table", bool(r.get("decode")))) if not ok]
    if not missing:
        return []
    return ["", f"Not measured yet in this run: {', '.join(missing)}. "
            "Command: `python bench/kernels.py --sections wide,decode --out <file>`."]


def render(r: dict) -> str:
    """The kernel benchmark's part of BENCHMARKS.md: header, then its tables."""
    H = r["rows"][0]["H"] if r["rows"] else "?"
    out = [HEADER.format(date=run_date(r), device=r["device"], torch=r["torch"], triton=r["triton"],
                         fla=r.get("fla_version"), official=r.get("lightning_attn_version"), H=H,
                         copy=r["ceilings"]["copy_TBps"], mm=r["ceilings"]["matmul_TFps"], config=r.get("config"))]
    out += _prefill_lines(r)
    out += _decode_step_lines(r, H)
    out += _correctness_lines(r)
    out += _sweep_lines(r)
    out += _missing_lines(r)
    return "\n".join(out) + "\n"


def render_training(sweep: dict) -> str:
    """Training throughput of the bundled model's sweep: the solo runs (`speed-*`) of the chosen size."""
    out = ["", "## Bundled-model training throughput (tokens/s, higher is better)", "",
           f"Date: {run_date(sweep)}. Hardware and versions as recorded by each run. Command (device, repo root, "
           "`data/` carried): `bash scripts/gpu_train_sweep.sh` (80 solo steps of the chosen size per architecture, "
           "the first 10 left out; batch 32 × 512 tokens, bf16 autocast, AdamW, TNL attention on the Triton "
           "kernels).", "", "| model | params | tokens/s | device | torch | attention |", "|---|---|---|---|---|---|"]
    for name in ("speed-tnl", "speed-llama"):
        run = sweep["runs"].get(name)
        if run:
            # The recorded attention_impl is TNL's kernel dispatch; the Llama runs transformers' own attention.
            attention = run.get("attention_impl", "—") if name == "speed-tnl" else "transformers default"
            out.append(f"| {name.removeprefix('speed-')} | {run['params']:,} | {run['train_tokens_per_s']:,.0f} | "
                       f"{run['device']} | {run['torch']} | {attention} |")
    return "\n".join(out) + "\n"


def render_decode(result: dict) -> str:
    """One bench/decode.py run: the table, and the engine's goals computed from it."""
    params = ", ".join(f"{name} {n:,}" for name, n in result["parameters"].items())
    command = result.get("command", "python bench/decode.py")
    out = ["", f"## Decode latency vs context: TNL vs Llama ({result['device']}, {result['dtype']}, "
           f"{result['threads']} threads)", "",
           f"Date: {run_date(result)}. torch {result['torch']}, transformers {result['transformers']}. "
           f"Models: `{result['tnl']}` vs `{result['baseline']}` ({params} parameters). Command: `{command}`"
           f" (each 8-bit method in its own process; decode = median of {result['tokens']} steps of the row's path: "
           "`model-step` a teacher-forced model call, `engine-*` a chat reply's step through the engine"
           f"{', taking turns across the contexts' if result.get('interleave') else ''}; "
           "memory = process RSS on CPU, peak allocated on CUDA).", "",
           "| model | path | 8-bit | context | TTFT ms | decode ms/token | p20–p80 | tokens/s | cache MiB | "
           "memory MiB |", "|---|---|---|---|---|---|---|---|---|---|"]
    rows = result["rows"]
    for x in rows:
        path = x.get("path", "model-step")  # runs recorded before rows named their path timed model steps
        out.append(f"| {x['model']} | {path} | {x['quant']} | {x['context']:,} | {x['ttft_ms']:.1f} | "
                   f"{x['decode_ms_per_token']:.2f} | {x['decode_p20_ms']:.2f}–{x['decode_p80_ms']:.2f} | "
                   f"{x['tokens_per_s']:.1f} | {x['cache_bytes'] / 2**20:.2f} | {fmt(x['peak_mem_mb'], '{:.0f}')} |")
    out += ["", "| 8-bit | TNL decode at longest / shortest context | TNL vs Llama decode at longest | "
            "TNL vs Llama TTFT at longest |", "|---|---|---|---|"]
    for quant in dict.fromkeys(x["quant"] for x in rows):
        by = {(x["model"], x["context"]): x for x in rows if x["quant"] == quant}
        lo, hi = min(c for _, c in by), max(c for _, c in by)
        tnl_lo, tnl_hi, llama_hi = by.get(("TNL", lo)), by.get(("TNL", hi)), by.get(("Llama", hi))
        if not (tnl_lo and tnl_hi and llama_hi):
            continue
        out.append(f"| {quant} | {tnl_hi['decode_ms_per_token'] / tnl_lo['decode_ms_per_token']:.2f}× "
                   f"({hi:,} vs {lo:,}) | {llama_hi['decode_ms_per_token'] / tnl_hi['decode_ms_per_token']:.2f}× "
                   f"faster | {llama_hi['ttft_ms'] / tnl_hi['ttft_ms']:.2f}× faster |")
    return "\n".join(out) + "\n"


def render_sampling(result: dict) -> str:
    """bench/sampling_defaults.py: every setting of the grid against the human references, and the choice."""
    m = result["machine"]
    out = ["", "## Chat sampling defaults (CPU)", "",
           f"Date: {run_date(result)}. {m['processor']} ({m['cpu_count']} cores, {m['torch_threads']} torch thread), "
           f"torch {m['torch']}. Model `{result['model']}`. Command: `{result['command']}`. {result['prompts']} "
           f"held-out prompts ({result['prompt_source']}), at most {result['new_tokens']} new tokens, each reply "
           "through the chat's `Conversation.reply`.", "",
           "rep-3 / rep-4: share of a reply's token 3-/4-grams repeating an earlier one (mean over replies); "
           "distinct-2: unique / all bigrams over the replies; eos: share of replies ending by themselves; gen LL: "
           "mean log-likelihood per generated token under the plain model; ref NLL: mean NLL per token of the "
           "human replies under the setting's sampling distribution (teacher-forced; a token the setting never "
           f"samples counts as p = {result['floor']:g}). The references row gives the human replies' own figures "
           "(ref NLL there: the plain model's).", "",
           "| temperature | top-p | top-k | rep. penalty | rep-3 | rep-4 | distinct-2 | length | eos | gen LL | "
           "ref NLL |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    h = result["human"]
    out.append(f"| references | | | | {h['rep3']:.3f} | {h['rep4']:.3f} | {h['distinct2']:.3f} | {h['length']:.1f} | "
               f"{h['eos']:.2f} | {h['gen_ll']:.2f} | {h['ref_nll']:.2f} |")
    for i, x in enumerate(result["rows"]):
        cells = [f"{x['temperature']:g}", f"{x['top_p']:g}", str(x["top_k"]), f"{x['repetition_penalty']:g}",
                 f"{x['rep3']:.3f}", f"{x['rep4']:.3f}", f"{x['distinct2']:.3f}", f"{x['length']:.1f}",
                 f"{x['eos']:.2f}", f"{x['gen_ll']:.2f}", f"{x['ref_nll']:.2f}"]
        if i == result["chosen_row"]:
            cells = [f"**{c}**" for c in cells]
        out.append("| " + " | ".join(cells) + " |")
    chosen = ", ".join(f"{name} {value:g}" for name, value in result["chosen"].items())
    out += ["", f"Rule: {result['rule']} Chosen (bold row, now `CHAT_DEFAULTS` in webui/validation.py): {chosen}.",
            "", "| prompt | reference | greedy (penalty 1) | chosen |", "|---|---|---|---|"]
    for e in result["examples"]:
        out.append("| " + " | ".join(_cell(e[k]) for k in ("prompt", "reference", "greedy", "chosen")) + " |")
    return "\n".join(out) + "\n"


def _commands(result: dict) -> str:
    """The run's command, or its commands (a result merged from several calls), as inline code."""
    commands = result["command"] if isinstance(result["command"], list) else [result["command"]]
    return ("Command: " if len(commands) == 1 else "Commands: ") + "; ".join(f"`{c}`" for c in commands)


def render_engine(result: dict) -> str:
    """bench/engine_gpu.py: decode through the engine as chat uses it, against the HBM floor measured in the run."""
    out = ["", f"## Engine decode on the GPU ({result['device']}, {result['dtype']} weights, fp32 state)", "",
           f"Date: {run_date(result)}. torch {result['torch']}. {_commands(result)}. Floor: the step's "
           f"weight and state bytes at the copy bandwidth measured in the same run "
           f"({result['copy_bandwidth_gb_s']:,.0f} GB/s). {result['tokens']} tokens per reply, eos ignored; "
           "ms/token = median gap between two tokens of one session, read by a consumer thread as chat reads "
           "them (sampling, detokenising and events included). `graph-replay` = the captured step alone.", "",
           "| preset | path | sessions | context | ms/token | floor ms | % of floor | aggregate tok/s | code |",
           "|---|---|---|---|---|---|---|---|---|"]
    for x in result["rows"]:
        out.append(f"| {x['preset']} | {x['path']} | {x['batch']} | {x['context']:,} | "
                   f"{x['decode_ms_per_token']:.2f} | {x['hbm_floor_ms']:.2f} | {100 * x['floor_fraction']:.0f} % | "
                   f"{x['aggregate_tok_s']:,.0f} | {x.get('commit', '')} |")
    if result.get("interleave"):
        out += ["", "A long prompt arriving while sessions decode (their ms/token during its prefill vs before):", "",
                "| preset | decoding sessions | prompt tokens | prefill chunk | chunk read | prefill s | "
                "ms/token before → during | ratio | code |", "|---|---|---|---|---|---|---|---|---|"]
        for x in result["interleave"]:
            read = {True: "in the decode step", False: "beside it"}.get(x.get("packed", False))
            out.append(f"| {x['preset']} | {x['decoding_sessions']} | {x['prompt_tokens']:,} | {x['prefill_budget']:,}"
                       f" | {read} | {x['prefill_s']:.2f} | {x['ms_per_token_before']:.1f} → "
                       f"{x['ms_per_token_during']:.1f} | {x['ratio']:.2f}× | {x.get('commit', '')} |")
    for check in result.get("checks") or []:
        out.append(f"\nGraph vs eager: {check}")
    return _with_notes(out, result)


def _with_notes(lines: list[str], result: dict) -> str:
    """A section's lines, then the run's notes (each on a paragraph of its own), as Markdown."""
    lines = lines + [f"\nNote: {note}" for note in result.get("notes") or []]
    return "\n".join(lines) + "\n"


def render_app(result: dict) -> str:
    """bench/app_http.py: a chat reply streamed over HTTP by the app, against the app's engine alone."""
    out = ["", f"## The app over HTTP against its engine ({result['device']})", "",
           f"Date: {run_date(result)}. torch {result['torch']}. {_commands(result)}. One message, chat's default "
           f"sampling seeded (both paths sample the same tokens), float weights; tok/s = (tokens - 1) / (final "
           "result - first text), the median of the runs after an untimed one.", "",
           "| model | path | tokens | tok/s | runs (tok/s) | app / engine |", "|---|---|---|---|---|---|"]
    for x in result["rows"]:
        ratio = f"{x['ratio_to_engine']:.2f}" if x.get("ratio_to_engine") else ""
        runs = ", ".join(f"{r:.0f}" for r in x["tok_s_runs"])
        out.append(f"| {x['model']} | {x['path']} | {x['tokens'][0]} | {fmt(x['tok_s'], '{:.1f}')} | {runs} | "
                   f"{ratio} |")
    return _with_notes(out, result)


def render_quant(result: dict) -> str:
    """bench/quant_gpu.py: 8-bit weights per Linear and through the engine, against bf16 in the same run."""
    out = ["", f"## 8-bit weights on the GPU ({result['device']}, {result['preset']}, triton {result['triton']})", "",
           f"Date: {run_date(result)}. torch {result['torch']}. {_commands(result)}. µs per call as CUDA-graph "
           "replays, weights read from HBM; `int8` = the Triton kernel, `Int8Linear` = what the model runs (the "
           "kernel, or the dequantised weight through cuBLAS above its row limit).", "",
           "| Linear | rows | bf16 µs | int8 kernel µs | Int8Linear µs |", "|---|---|---|---|---|"]
    cells: dict[tuple[str, int], dict[str, float]] = {}
    for x in result["linear"]:
        cells.setdefault((x["shape"], x["rows"]), {})[x["method"]] = x["us"]
    for (shape, rows), us in cells.items():
        times = " | ".join(fmt(us.get(method), "{:.1f}") for method in ("bf16", "int8", "int8_linear"))
        out.append(f"| {shape} | {rows} | {times} |")
    out += ["", "| method | batch | context | ms/token | prefill s | weights GiB | quantise s |",
            "|---|---|---|---|---|---|---|"]
    for x in result["model"] + result["prefill"]:
        out.append(f"| {x['method']} | {x['batch']} | {x['context']:,} | {fmt(x.get('decode_ms_per_token'))} | "
                   f"{fmt(x.get('prefill_s'))} | {x['weight_gib']:.2f} | {fmt(x.get('load_s'))} |")
    if result.get("load"):
        out += ["", "Loading a checkpoint (bf16 safetensors shards) in a fresh process:", "",
                "| method | load s | peak host MB | largest shard MB | weights GiB |", "|---|---|---|---|---|"]
        for x in result["load"]:
            out.append(f"| {x['method']} | {x['load_s']:.2f} | {x['peak_host_mb']:,.0f} | "
                       f"{x['largest_shard_mb']:,.0f} | {x['weight_gib']:.2f} |")
    return _with_notes(out, result)


def render_serve(result: dict) -> str:
    """bench/serve.py: concurrent chat sessions through the engine on the CPU, today's loop as the anchor."""
    out = ["", "## Concurrent sessions through the engine (CPU)", "",
           f"Date: {run_date(result)}. {result['machine']} ({result['cpu_count']} cores, {result['threads']} torch "
           f"thread(s)), torch {result['torch']}. Model `{result['model']}`. Command: `{result['command']}`. "
           f"{result['tokens']} tokens per reply, medians of {result['rounds']} rounds.", "",
           "| path | sessions | aggregate tok/s | ms/token p50 | p90 |", "|---|---|---|---|---|"]
    for x in result["rows"]:
        out.append(f"| {x['path']} | {x['sessions']} | {x['aggregate_tok_s']:.1f} | {x['ms_per_token_p50']:.2f} | "
                   f"{x['ms_per_token_p90']:.2f} |")
    ratios = ", ".join(f"{n} sessions {r:.2f}×" for n, r in result["speedup_vs_one_session"].items() if n != "1")
    return "\n".join(out + ["", f"Aggregate tok/s against one session: {ratios}."]) + "\n"


def _cell(text: str) -> str:
    """Text as one Markdown table cell (newlines and pipes would break the row)."""
    return text.replace("|", "\\|").replace("\n", " / ")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", default=str(ROOT / "bench/results/kernels-h200.json"))
    p.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"))
    a = p.parse_args()
    Path(a.out).write_text(render_all(ROOT / "bench/results", Path(a.json)))


def render_all(results: Path, kernels_json: Path) -> str:
    """Every section of BENCHMARKS.md, each from its own file in `results` (the kernels' from `kernels_json`);
    a missing file reads "not measured yet"."""
    if kernels_json.is_file():
        result = json.loads(kernels_json.read_text())
        _bench_module("kernels").derive(result)  # idempotent; partial (timed-out) JSON files are written before it
        text = render(result)
    else:
        text = "# Benchmarks\n" + not_measured("Lightning Attention kernels", _shown(kernels_json),
                                                "python bench/kernels.py --sweep")
    training = results / "train-sweep-h200.json"
    text += (render_training(json.loads(training.read_text())) if training.is_file() else
             not_measured("Bundled-model training throughput", _shown(training), "bash scripts/gpu_train_sweep.sh"))
    decodes = sorted(results.glob("decode-*.json"))
    text += "".join(render_decode(json.loads(d.read_text())) for d in decodes) or not_measured(
        "Decode latency vs context: TNL vs Llama", _shown(results / "decode-*.json"), "python bench/decode.py")
    soak = results / "soak-cpu.json"
    title = "Chat server: concurrency, soak, Stop during prefill (CPU)"
    if soak.is_file():  # the same text as README's reliability section
        text += f"\n## {title}\n\n" + _bench_module("soak").render(json.loads(soak.read_text())) + "\n"
    else:
        text += not_measured(title, _shown(soak), "python bench/soak.py")
    for name, title, renderer, command in (
            ("sampling-cpu", "Chat sampling defaults (CPU)", render_sampling, "python bench/sampling_defaults.py"),
            ("engine-h200", "Engine decode on the GPU", render_engine, "python bench/engine_gpu.py --device cuda"),
            ("quant-h200", "8-bit weights on the GPU", render_quant, "python bench/quant_gpu.py"),
            ("app-h200", "The app over HTTP against its engine", render_app,
             "python bench/app_http.py --device cuda --out bench/results/app-h200.json"),
            ("serve-cpu", "Concurrent sessions through the engine (CPU)", render_serve,
             "python bench/serve.py --device cpu --out bench/results/serve-cpu.json")):
        path = results / f"{name}.json"
        text += renderer(json.loads(path.read_text())) if path.is_file() else not_measured(title, _shown(path), command)
    return text


def _shown(path: Path) -> str:
    """`path` relative to the repo root when inside it (as the report names files)."""
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def _bench_module(name: str):
    """bench/<name>.py as a module (bench/ is a folder of scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / f"bench/{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


if __name__ == "__main__":
    main()
