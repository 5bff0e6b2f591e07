"""Write BENCHMARKS.md from bench/results/kernels-h200.json and, when present, the bundled-model training
sweep bench/results/train-sweep-h200.json, the bench/decode.py runs bench/results/decode-*.json, the
bench/soak.py figures bench/results/soak-cpu.json, the chat's sampling grid bench/results/sampling-cpu.json,
the engine runs bench/results/engine-h200.json and bench/results/serve-cpu.json
(never hand-edit the figures). Each section states the date, hardware and versions its own JSON records; a
section whose JSON is missing says it is not measured yet.

    python bench/report.py [--json bench/results/kernels-h200.json] [--out BENCHMARKS.md]
    python bench/report.py --merge NEW.json [--merged-out FILE]   # fold a new kernel run into --json, then render
    python bench/report.py --fold NEW.json --into bench/results/engine-h200.json --commit SHA   # then render

--merge: bench/kernels.py runs its sections one by one and may skip some for its time budget, so a new run is
folded into the previous kernels file section by section (merge_kernel_runs): a section the new run completed
replaces the old one; a section it skipped (or left partial, or failed) keeps the old rows it did not measure
again. The merged file lists every run under "runs" and tags each row with the run it came from, so each table
of BENCHMARKS.md names its run's date. The merged JSON overwrites --json unless --merged-out names another file.

--fold: a run of a row-based benchmark (bench/engine_gpu.py, bench/quant_gpu.py) that measured some rows again
replaces those rows of the recorded file and keeps the others (fold_rows); each row names the code it ran.
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

HEADER = """# Benchmarks

Date: {date}. Hardware: {device}. Software: torch {torch}, triton {triton}, fla-core {fla}, lightning-attn
{official}. Command (repo root, wheels installed on the machine, see bench/kernels.py):

    python bench/kernels.py --out new.json    # then: python bench/report.py --merge new.json

(a section the new run skipped for its time budget keeps the previous run's rows; each table names its run).
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


# ---- the kernel benchmark (bench/kernels.py): its sections, merging runs, rendering ----

# bench/kernels.py's sections (its SECTIONS, in its run order) and the JSON parts holding each one's items: a
# list part (rows, decode) takes a predicate on the item, a dict part
# (correctness, agreement, near1: keyed by shape) one on the key. prefill and wide share rows and correctness,
# split by dk = dv.
KERNEL_SECTIONS = ("wide", "decode", "agree", "near1", "prefill")


def _wide_key(key: str) -> bool:
    """Whether a shape key such as "B8-N8192-H32-dk256-dv128" has dk != dv."""
    m = re.search(r"dk(\d+)-dv(\d+)$", key)
    return bool(m) and m[1] != m[2]


SECTION_PARTS = {
    "wide": {"rows": lambda x: x["dk"] != x["dv"], "correctness": _wide_key},
    "decode": {"decode": None},
    "agree": {"agreement": None},
    "near1": {"near1": None},
    "prefill": {"rows": lambda x: x["dk"] == x["dv"], "correctness": lambda key: not _wide_key(key)},
}
LIST_PARTS = ("rows", "decode")
DICT_PARTS = ("correctness", "agreement", "near1")
# What a run records about itself (the top level of its JSON); a merged file keeps one per run under "runs".
RUN_META = ("date", "device", "torch", "triton", "fla_version", "lightning_attn_version", "ceilings", "config",
            "budget_s", "total_s", "anchor_errors")


def _item_id(part: str, item: dict):
    """What a newer run's item replaces in an older run: the same shape (every impl of it), the same decode batch."""
    if part == "rows":
        return tuple(item.get(k) for k in ("B", "N", "H", "dk", "dv"))
    if part == "decode":
        return item.get("B")
    return None


def _section_items(r: dict, name: str) -> dict:
    """part -> the items of section `name` in result `r` (a list, or a dict keyed by shape)."""
    out = {}
    for part, belongs in SECTION_PARTS[name].items():
        if part in LIST_PARTS:
            out[part] = [x for x in r.get(part) or [] if belongs is None or belongs(x)]
        else:
            out[part] = {k: v for k, v in (r.get(part) or {}).items() if belongs is None or belongs(k)}
    return out


def _has_items(items: dict) -> bool:
    return any(bool(v) for v in items.values())


def _sections(r: dict) -> dict:
    """The run's section entries; a file written before runs recorded them gets "done" entries for the sections it
    holds data of (marked inferred)."""
    if "sections" in r:
        return r["sections"]
    names = (["ceilings"] if r.get("ceilings") else []) + [n for n in SECTION_PARTS
                                                           if _has_items(_section_items(r, n))]
    return {name: {"status": "done", "inferred": True} for name in names}


def _stamp(items: dict, run: int) -> dict:
    """Copies of the items, each tagged with the index of its run (an item already tagged keeps its tag)."""
    out = {}
    for part, v in items.items():
        if isinstance(v, list):
            out[part] = [{"run": run, **x} for x in v]
        else:
            out[part] = {k: {"run": run, **e} if isinstance(e, dict) else e for k, e in v.items()}
    return out


def merge_kernel_runs(old: dict, new: dict) -> dict:
    """`new` (one bench/kernels.py run, possibly partial) folded into `old` (the previous results file: one run, or
    an earlier merge), section by section:

    * the new run completed the section (status "done"): its items replace the old ones;
    * otherwise (partial, skipped for the budget, failed, or not run): the new items win, and the old items it did
      not measure again stay (a prefill shape is replaced with all its impls, a decode row by batch size);
      with no new item the old section entry stays too, noting the new run's status as "latest_status".

    The result's top level describes the newest run; "runs" lists every run's date, device, versions, ceilings and
    launch config (oldest first), and every item and section entry carries "run", its index there. % of floor
    and speed-ups are derived per run (bench/kernels.py derive): a shape's impls always come from one run."""
    old_runs = old.get("runs") or [{k: old.get(k) for k in RUN_META}]
    new_meta = {k: new.get(k) for k in RUN_META}
    if "runs" in new:
        raise ValueError("the new file is itself a merge: merge single runs of bench/kernels.py into it")
    if new_meta in old_runs:
        raise ValueError(f"this run ({new_meta['date']}, {new_meta['total_s']} s) is already merged in")
    runs = [*old_runs, new_meta]
    i_new, i_old = len(runs) - 1, len(old_runs) - 1  # untagged items of the old file are from its newest run
    merged = {k: v for k, v in new.items() if k not in (*LIST_PARTS, *DICT_PARTS, "sections")}
    merged.update(runs=runs, sections={}, **{p: [] for p in LIST_PARTS}, **{p: {} for p in DICT_PARTS})
    old_sec, new_sec = _sections(old), _sections(new)
    names = [*new_sec, *(n for n in old_sec if n not in new_sec)]
    for name in names + [n for n in SECTION_PARTS if n not in names]:
        new_entry, old_entry = new_sec.get(name), old_sec.get(name)
        new_items = _stamp(_section_items(new, name), i_new) if name in SECTION_PARTS else {}
        old_items = _stamp(_section_items(old, name), i_old) if name in SECTION_PARTS else {}
        done = bool(new_entry) and new_entry.get("status") == "done"
        for part, items in new_items.items():
            kept = _merge_part(part, items, old_items[part], done)
            if isinstance(kept, list):
                merged[part] += kept
            else:
                merged[part].update(kept)
        entry = _merged_entry(new_entry, old_entry, done or _has_items(new_items), i_new, i_old)
        if entry:
            merged["sections"][name] = entry
    merged["rows"].sort(key=lambda x: (x["dk"] != x["dv"], x["N"]))  # as bench/kernels.py saves them
    merged["decode"].sort(key=lambda x: x["B"])
    return merged


def _merge_part(part: str, new, old, done: bool):
    """One part of one section: the new items alone when the new run completed the section, else the new items
    and the old ones it did not measure again (same shape / batch)."""
    if done:
        return new
    if isinstance(new, dict):
        return {**{k: v for k, v in old.items() if k not in new}, **new}
    ids = {_item_id(part, x) for x in new}
    return new if None in ids else new + [x for x in old if _item_id(part, x) not in ids]


def _merged_entry(new_entry, old_entry, new_measured: bool, i_new: int, i_old: int):
    """A section's entry in the merged file: the new run's when it measured something there (or the old file has
    no entry: ceilings are always new), else the old one, with the new run's status as "latest_status"."""
    if new_entry and (new_measured or not old_entry):
        return {**new_entry, "run": i_new}
    if new_measured:  # items in a new file that records no entry for them
        return {"status": "done", "inferred": True, "run": i_new}
    if not old_entry:
        return None
    entry = {**old_entry, "run": old_entry.get("run", i_old)}
    if new_entry:
        entry["latest_status"] = new_entry.get("status")
    return entry


def _runs(r: dict) -> list[dict]:
    """Every run the file holds (one unless merged)."""
    return r.get("runs") or [{k: r.get(k) for k in RUN_META}]


def _run_of(r: dict, item: dict) -> int:
    return item.get("run", len(_runs(r)) - 1) if isinstance(item, dict) else len(_runs(r)) - 1


def _run_label(r: dict, i: int) -> str:
    """"2026-12-01" for a single-run file; "run 2 (2026-12-01)" when runs are merged (runs table in the header)."""
    runs = _runs(r)
    date = runs[i].get("date") or "date not recorded"
    return date if len(runs) == 1 else f"run {i + 1} ({date})"


def _from_line(r: dict, items) -> str:
    """The run(s) a table's items come from."""
    idx = sorted({_run_of(r, x) for x in items})
    return "Run: " + ", ".join(_run_label(r, i) for i in idx) + "."


def _not_measured(r: dict, name: str, what: str = "") -> str:
    """One line for a section with nothing to show: its status in this run when it has one."""
    status = _sections(r).get(name, {}).get("status")
    why = f" ({status})" if status and status != "done" else ""
    return f"{what or 'Not measured'} in this run{why}. Command: `python bench/kernels.py --sections {name}`."


def _skipped_line(r: dict, name: str) -> list[str]:
    """Shapes the section skipped for the budget (a partial section), as a line; none otherwise."""
    skipped = _sections(r).get(name, {}).get("skipped_for_budget")
    return [f"Skipped for the time budget in the {name} section: {', '.join(skipped)}."] if skipped else []


def _prefill_lines(r: dict) -> list[str]:
    """The prefill / training table: one row per (shape, impl), ours' speed-ups over each anchor; the dk = dv rows
    (section prefill) and the dk=256/dv=128 rows (section wide) side by side, each part named when absent."""
    out = ["## Prefill / training (ms, lower is better)", ""]
    rows = r.get("rows") or []
    notes = []
    for name, label, has in (("prefill", "dk = dv rows", any(x["dk"] == x["dv"] for x in rows)),
                             ("wide", "dk=256/dv=128 rows", any(x["dk"] != x["dv"] for x in rows))):
        if not has:
            notes.append(_not_measured(r, name, f"{label} (section `{name}`): not measured"))
        notes += _skipped_line(r, name)
    if not rows:
        return out + notes
    multi = len({_run_of(r, x) for x in rows}) > 1
    out += [_from_line(r, rows), *notes, "",
            "| N | B | dk/dv | impl | fwd | fwd+bwd | fwd Mtok/s | % fwd floor | % fwd+bwd floor | "
            "ours faster (fwd) | ours faster (fwd+bwd) | peak GiB (fwd+bwd, over inputs) |"
            + (" run |" if multi else ""),
            "|" + "---|" * (13 if multi else 12)]
    ours = {(x["B"], x["N"], x["dk"]): x for x in rows if x["impl"] == "ours"}
    for x in rows:
        o = ours.get((x["B"], x["N"], x["dk"]), {})
        sf = "" if x["impl"] == "ours" else fmt(o.get(f"fwd_speedup_vs_{x['impl']}"), "{:.2f}×")
        sb = "" if x["impl"] == "ours" else fmt(o.get(f"fwdbwd_speedup_vs_{x['impl']}"), "{:.2f}×")
        err = f" ({x['error'][:60]})" if "error" in x else ""
        out.append(f"| {x['N']} | {x['B']} | {x['dk']}/{x['dv']} | {x['impl']}{err} | {fmt(x.get('fwd_ms'))} | "
                   f"{fmt(x.get('fwdbwd_ms'))} | {fmt(x.get('fwd_Mtok_s'), '{:.1f}')} | "
                   f"{fmt(x.get('fwd_pct_floor'), '{:.0f}%')} | {fmt(x.get('fwdbwd_pct_floor'), '{:.0f}%')} | "
                   f"{sf} | {sb} | {fmt(x.get('peak_extra_GiB'), '{:.2f}')} |"
                   + (f" {_run_label(r, _run_of(r, x))} |" if multi else ""))
    return out


def _decode_step_lines(r: dict, H) -> list[str]:
    """The decode-step table: µs per step, the state's read + write GB/s and that as a % of the copy ceiling."""
    rows = r.get("decode") or []
    modes = {x.get("mode") for x in rows if "mode" in x}
    how = "CUDA-graph replay of 10 steps" if modes <= {"cuda-graph"} else f"mode {', '.join(sorted(modes))}"
    out = ["", f"## Decode step (H={H}, D=E={rows[0]['dk'] if rows else 128}, bf16 q/k/v, fp32 state; µs per step, "
           f"{how})", ""]
    if not rows:
        return out + [_not_measured(r, "decode")]
    out += [_from_line(r, rows), "", "| B | impl | µs | state GB/s (read+write) | % of copy ceiling |",
            "|---|---|---|---|---|"]
    for x in sorted(rows, key=lambda x: (x["B"], x["impl"])):
        err = f" ({x['error'][:60]})" if "error" in x else ""
        out.append(f"| {x['B']} | {x['impl']}{err} | {fmt(x.get('us'), '{:.1f}')} | "
                   f"{fmt(x.get('state_GBps'), '{:.0f}')} | {fmt(x.get('state_pct_copy'), '{:.0f}%')} |")
    out.append("\nours updates the state in place; fla `fused_recurrent_simple_gla` writes a new final state. "
               "% of copy ceiling: the state's bytes per second against the device copy of the same run; at small "
               "B the state fits in L2, so only B ≥ 64 measures HBM.")
    return out


def _correctness_lines(r: dict) -> list[str]:
    """The correctness table: rel-L2 of ours and fla vs the fp32 reference (none when not recorded)."""
    if not r.get("correctness"):
        return []
    entries = dict(sorted(r["correctness"].items(), key=lambda kv: _shape_order(kv[0])))
    multi = len({_run_of(r, c) for c in entries.values()}) > 1
    out = ["", "## Correctness (bf16 inputs, first sequence of each shape, initial state given; rel-L2 vs "
           "the fp32 chunked reference)", "", _from_line(r, entries.values()), "",
           "| shape | impl | o | final | dq | dk | dv |" + (" run |" if multi else ""),
           "|" + "---|" * (8 if multi else 7)]
    for key, c in entries.items():
        run = f" {_run_label(r, _run_of(r, c))} |" if multi else ""
        if "error" in c:
            out.append(f"| {key} | error: {c['error'][:80]} | | | | | |{run}")
        for impl in ("ours", "fla"):
            if impl in c:
                e = c[impl]
                out.append(f"| {key} | {impl} | " + " | ".join(fmt(e.get(n), "{:.2e}") for n in
                                                             ("o", "final", "dq", "dk", "dv")) + f" |{run}")
        if "ours_vs_fla_full_o" in c:
            out.append(f"| {key} | ours vs fla (full batch, o) | {fmt(c['ours_vs_fla_full_o'], '{:.2e}')} "
                       f"| | | | |{run}")
    return out


def _shape_order(key: str):
    """Shape keys as the rows are ordered: dk = dv first, then by N."""
    m = re.search(r"N(\d+)", key)
    return _wide_key(key), int(m[1]) if m else 0


ERROR_NAMES = ("o", "final", "dq", "dk", "dv", "ds0")


def _error_cells(errs, names) -> str:
    """The rel-L2 cells of one comparison; "unavailable" or an error message spans the first cell."""
    if not isinstance(errs, dict):
        return f"{errs} |" + " |" * (len(names) - 1)
    if "error" in errs:
        return f"{errs['error'][:80]} |" + " |" * (len(names) - 1)
    return " | ".join(fmt(errs.get(n), "{:.2e}") for n in names) + " |"


def _names_present(comparisons) -> list[str]:
    """The outputs (o, final, dq, dk, dv, ds0) any of the comparisons has, in that order."""
    seen = {n for c in comparisons if isinstance(c, dict) for n in c}
    return [n for n in ERROR_NAMES if n in seen]


def _agreement_lines(r: dict) -> list[str]:
    """ours / official / fla against the fp64 and fp32 references and against each other (section agree)."""
    out = ["", "## Agreement: ours vs official lightning-attn vs fla (rel-L2, lower is closer)", ""]
    entries = r.get("agreement") or {}
    if not entries:
        return out + [_not_measured(r, "agree")]
    rows = []  # (shape, impl, vs, errors)
    for key, e in entries.items():
        rows.append((key, "fp32 reference", "fp64 reference", e.get("ref32_vs_ref64", {})))
        for impl in ("ours", "official", "fla"):
            got = e.get(impl, "not recorded")
            if isinstance(got, dict) and ("vs_ref64" in got or "vs_ref32" in got):
                rows += [(key, impl, f"{ref} reference", got.get(f"vs_ref{ref[2:]}", {})) for ref in ("fp64", "fp32")]
            else:
                rows.append((key, impl, "", got))
        for pair in ("ours_vs_official", "ours_vs_fla", "official_vs_fla"):
            if pair in e:
                rows.append((key, *pair.split("_vs_"), e[pair]))
    names = _names_present(x[3] for x in rows)
    inputs = sorted({e.get("inputs") for e in entries.values() if e.get("inputs")})
    out += [f"Inputs: {'; '.join(inputs) or 'not recorded'}; one sequence per shape. References: the chunked PyTorch "
            "reference in fp64 and in fp32 on the same bf16 inputs. " + _from_line(r, entries.values()),
            *_skipped_line(r, "agree"), "", "| shape | impl | vs | " + " | ".join(names) + " |",
            "|" + "---|" * (3 + len(names))]
    out += [f"| {key} | {impl} | {vs} | " + _error_cells(errs, names) for key, impl, vs, errs in rows]
    return out


NEAR1_IMPLS = {"ref32": "fp32 reference", "ours": "ours (as planned)", "ours_one_segment": "ours, one segment",
               "ours_8_segments": "ours, 8 segments", "fla": "fla"}


def _near1_lines(r: dict) -> list[str]:
    """Precision at λ ≈ 1 (section near1): every output's rel-L2 against the fp64 reference, per log λ and impl."""
    out = ["", "## Precision near λ = 1 (rel-L2 against the fp64 reference, lower is better)", ""]
    entries = r.get("near1") or {}
    if not entries:
        return out + [_not_measured(r, "near1")]
    rows = []  # (shape, log λ, impl, errors)
    notes = []
    for key, e in entries.items():
        notes.append(f"{key}: {e.get('inputs', 'inputs not recorded')}; as planned {e.get('segments_per_sequence')} "
                     f"segment(s) of {e.get('segment_len')} tokens per sequence.")
        for ld, by_impl in e.items():
            if ld.startswith("log_decay="):
                rows += [(key, ld.removeprefix("log_decay="), NEAR1_IMPLS.get(impl, impl), errs)
                         for impl, errs in by_impl.items()]
    names = _names_present(x[3] for x in rows)
    out += [*notes, _from_line(r, entries.values()), "", "| shape | log λ | impl | " + " | ".join(names) + " |",
            "|" + "---|" * (3 + len(names))]
    out += [f"| {key} | {ld} | {impl} | " + _error_cells(errs, names) for key, ld, impl, errs in rows]
    return out


def _section_status_lines(r: dict) -> list[str]:
    """Each section's status and seconds in the run it comes from (a section no run ran: "not run")."""
    sections = _sections(r)
    out = ["", "## Kernel benchmark sections (status and seconds of each)", "",
           "| section | status | s | run |", "|---|---|---|---|"]
    for name in [*sections, *(n for n in ("ceilings", *KERNEL_SECTIONS) if n not in sections)]:
        e = sections.get(name)
        if e is None:
            out.append(f"| {name} | not run | — | |")
            continue
        status = e.get("status", "not recorded")
        if e.get("inferred"):
            status += " (inferred: the file predates section statuses)"
        if e.get("skipped_for_budget"):
            status += f" (skipped for the budget: {', '.join(e['skipped_for_budget'])})"
        if e.get("not_selected"):
            status += f" (not selected: {', '.join(e['not_selected'])})"
        if e.get("latest_status"):
            status += f"; latest run: {e['latest_status']}"
        if e.get("unavailable"):
            status += f"; unavailable: {', '.join(e['unavailable'])}"
        out.append(f"| {name} | {status} | {fmt(e.get('elapsed_s'), '{:.1f}')} | {_run_label(r, _run_of(r, e))} |")
    return out


def _runs_lines(r: dict) -> list[str]:
    """For a merged file: every run it holds, with its device, versions, ceilings and launch config."""
    runs = _runs(r)
    if len(runs) == 1:
        return []
    out = ["", f"This file merges {len(runs)} runs (`python bench/report.py --merge`); each table names the run its "
           "rows come from, and % of floor uses that run's copy ceiling. The header above describes the newest.", "",
           "| run | date | device | torch | triton | fla-core | lightning-attn | copy TB/s | matmul TF/s | "
           "launch config |", "|---|---|---|---|---|---|---|---|---|---|"]
    for i, x in enumerate(runs):
        c = x.get("ceilings") or {}
        out.append(f"| {i + 1} | {x.get('date') or 'not recorded'} | {x.get('device')} | {x.get('torch')} | "
                   f"{x.get('triton')} | {x.get('fla_version')} | {x.get('lightning_attn_version')} | "
                   f"{fmt(c.get('copy_TBps'), '{:.2f}')} | {fmt(c.get('matmul_TFps'), '{:.0f}')} | "
                   f"`{x.get('config')}` |")
    return out


def render(r: dict) -> str:
    """The kernel benchmark's part of BENCHMARKS.md: header, then its tables; a section the file lacks gets a
    one-line "not measured in this run"."""
    H = next((x["H"] for x in (r.get("rows") or []) + (r.get("decode") or []) if "H" in x), "?")
    out = [HEADER.format(date=run_date(r), device=r["device"], torch=r["torch"], triton=r["triton"],
                         fla=r.get("fla_version"), official=r.get("lightning_attn_version"), H=H,
                         copy=r["ceilings"]["copy_TBps"], mm=r["ceilings"]["matmul_TFps"], config=r.get("config"))]
    out += _runs_lines(r)
    out += ([""] if len(_runs(r)) > 1 else []) + _prefill_lines(r)
    out += _decode_step_lines(r, H)
    out += _correctness_lines(r)
    out += _agreement_lines(r)
    out += _near1_lines(r)
    out += _section_status_lines(r)
    return "\n".join(out) + "\n"


def merge_kernel_files(old: Path, new: Path, out: Path) -> dict:
    """merge_kernel_runs of two JSON files (derived columns recomputed per run), written to `out`."""
    merged = merge_kernel_runs(json.loads(old.read_text()), json.loads(new.read_text()))
    _bench_module("kernels").derive(merged)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(merged, indent=1))
    return merged


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


# The fields that name an item of a row-based result file (the rest are its measurements), per list.
IDENTITY = {"rows": ("preset", "quant", "path", "batch", "context", "model", "prologues", "norms", "pdl",
                     "switch_interval_ms"),
            "interleave": ("preset", "quant", "packed", "decoding_sessions", "prompt_tokens", "prefill_budget"),
            "checks": ("preset", "dtype", "batch"), "model": ("method", "preset", "batch", "context", "pdl"),
            "prefill": ("method", "preset", "context"), "linear": ("shape", "rows", "method"),
            "load": ("method", "preset")}
# an identity field's value in items recorded before it existed
ABSENT = {"prologues": "auto", "norms": "auto", "pdl": "auto"}


def _identity(item: dict, fields: tuple) -> tuple:
    return tuple(item.get(f, ABSENT.get(f)) for f in fields)


def fold_rows(old: dict, new: dict, commit: str) -> dict:
    """`new` (one run) folded into `old` (a recorded file of the same benchmark): every new item, tagged with
    `commit`, replaces the old item of the same name (IDENTITY); old items not measured again stay, with their
    own commit. The run's metadata (date, versions) is the new one's; commands and notes accumulate."""
    folded = {**old, **{k: v for k, v in new.items() if k not in IDENTITY and k not in ("command", "notes")}}
    for part, fields in IDENTITY.items():
        fresh = [{**x, "commit": commit} for x in new.get(part) or []]
        names = {_identity(x, fields) for x in fresh}
        kept = [x for x in old.get(part) or [] if _identity(x, fields) not in names]
        if part in old or fresh:
            folded[part] = kept + fresh
    commands = old["command"] if isinstance(old["command"], list) else [old["command"]]
    folded["command"] = commands + [f"{new['command']} (rows of code {commit})"]
    folded["notes"] = list(dict.fromkeys((old.get("notes") or []) + (new.get("notes") or [])))
    return folded


def render_sampler(result: dict) -> str:
    """bench/sampler.py: the batch sampler per step, fused Triton op vs its PyTorch twin."""
    out = ["", f"## Batch sampler per decode step ({result['device']}, vocabulary {result['vocab']:,}, bf16 logits)",
           "", f"Date: {run_date(result)}. torch {result['torch']}. {_commands(result)}. µs = one CUDA-graph replay "
           "of the op (repetition penalty on; greedy, chat's top-k 40 = a 64-token head, top-k 256); W = keys one "
           "program sorts; warps `auto` = the launcher's choice; same ids = equal to the twin's on the same input.",
           "", "| plan | batch | impl | W | warps | µs | same ids |", "|---|---|---|---|---|---|---|"]
    for x in result["rows"]:
        warps = "" if x["impl"] == "torch" else x["num_warps"] or "auto"
        out.append(f"| {x['plan']} | {x['batch']} | {x['impl']} | {x['sort_width'] or ''} | {warps} | "
                   f"{x['us']:.1f} | {'yes' if x['equal_to_torch'] else 'NO'} |")
    return "\n".join(out) + "\n"


def render_prologue_ab(result: dict, title: str = "Decode products with the op before them fused") -> str:
    """bench/prologue_ab.py: each decode product with the op before it fused, against the op composed."""
    out = ["", f"## {title} ({result['device']})", "",
           f"Date: {run_date(result)}. torch {result['torch']}, triton {result['triton']}. {_commands(result)}. µs "
           "per call, CUDA-graph replays over weight copies larger than L2, bf16 activations. composed = the op's "
           "kernel then the product; product = the product alone; fused = `kernels.prologue_linear` with the "
           "launcher's tile, best fused = the fastest of the tiles tried (`float_tiles` for bf16 weights, "
           "`int8_tiles` for int8 weights at one row). `kernels.FUSED_PROLOGUES` encodes where fusing pays.", "",
           "| preset | product | op | weights | rows | composed | product | fused | best fused (tile) | rel-L2 |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for x in result["rows"]:
        best = f"{x['fused_best_us']:.1f} ({x['fused_best_config']})" if x.get("fused_best_us") else ""
        out.append(f"| {x['preset']} | {x['product']} | {x['prologue']} | {x['weights']} | {x['M']} | "
                   f"{x['composed_us']:.1f} | {x['product_us']:.1f} | {x['fused_us']:.1f} | {best} | "
                   f"{x['rel_l2']:.1e} |")
    return _with_notes(out, result)


def render_tile_sweep(result: dict, name: str) -> str:
    """bench/int8_sweep.py: the fastest tile per (Linear, M) of one sweep, against cuBLAS bf16 and the tile the
    launcher chose in that run."""
    weights = result.get("weights") or "int8"
    out = ["", f"## Product tile sweep: {name} ({result['device']}, {result['preset']}, {weights} weights)", "",
           f"Date: {run_date(result)}. torch {result['torch']}, triton {result['triton']}. {_commands(result)}. µs "
           "per call, CUDA-graph replays over weight copies larger than L2, bf16 activations; chosen = the tile the "
           "launcher's table picked in that run (`kernels/triton_int8.py` CONFIGS / FLOAT_CONFIGS).", "",
           "| Linear | rows | best tile | µs | TB/s | bf16 cuBLAS µs | chosen µs |", "|---|---|---|---|---|---|---|"]
    for x in result["best"]:
        out.append(f"| {_cell(x['shape'])} | {x['M']} | `{x['config_src']}` | {x['us']:.1f} | {x['tb_s']:.2f} | "
                   f"{fmt(x.get('bf16_us'), '{:.1f}')} | {fmt(x.get('chosen_us'), '{:.1f}')} |")
    return _with_notes(out, result)


def render_step_tiles(result: dict) -> str:
    """bench/step_tiles.py: the decode step kernel's launch tiles, best per (heads, sequences) against the tile the
    launcher picked in that run."""
    out = ["", f"## Decode step kernel tiles ({result['device']}, D = E = 128, bf16 q/k/v, fp32 states from HBM)", "",
           f"Date: {run_date(result)}. torch {result['torch']}. {_commands(result)}. µs per step call, one CUDA-graph "
           "replay over enough slot pools that the states outgrow L2; state TB/s = state bytes read + written per "
           "second. `kernels/triton_step.py::_tile` encodes the best tiles.", "",
           "| preset | sequences | best BV × warps | µs | state TB/s | tile picked in the run | µs |",
           "|---|---|---|---|---|---|---|"]
    groups: dict[tuple, list] = {}
    for x in result["rows"]:
        groups.setdefault((x["preset"], x["batch"]), []).append(x)
    for (preset, batch), rows in groups.items():
        best = min(rows, key=lambda x: x["us"])
        picked = next((x for x in rows if x["default"]), None)
        picked_cells = f"{picked['bv']} × {picked['warps']} | {picked['us']:.2f}" if picked else "not swept |"
        out.append(f"| {preset} | {batch} | {best['bv']} × {best['warps']} | {best['us']:.2f} | "
                   f"{best['state_tb_s']:.2f} | {picked_cells} |")
    return _with_notes(out, result)


def render_chunk_sweep(result: dict, title: str | None = None) -> str:
    """bench/chunk_sweep.py: the Lightning Attention forward per launch setting and segment count, against fla."""
    shipped_only = len(result["rows"]) == len(result["best"])  # bench/chunk_sweep.py --shipped-only
    title = title or ("the shipped setting, dk and dv in one sweep or two" if shipped_only else
                      "launch settings and segments")
    out = ["", f"## Lightning Attention forward: {title} ({result['device']}, bf16, H = 32)", "",
           f"Date: {run_date(result)}. torch {result['torch']}. {_commands(result)}. ms per forward (do_bench, L2 "
           "flushed); pre-pass = the segment state kernels alone; floor = q, k, v read and o written once at the "
           f"run's copy bandwidth ({result['ceilings']['copy_TBps']:.2f} TB/s); fla = `chunk_simple_gla` on the same "
           "inputs in the same run. Settings named as the run named them.", "",
           "| N | B | dk/dv | setting then shipped: fwd | its segments, pre-pass | fastest setting | segments | fwd | "
           "% floor | fwd+bwd | fwd+bwd, dk and dv in one sweep | fla fwd | fastest vs fla |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    shipped = result["shipped"]
    for best in result["best"]:
        same = [x for x in result["rows"] if (x["N"], x["dk"]) == (best["N"], best["dk"]) and "fwd_ms" in x]
        then = next((x for x in same if all(shipped.get(k) == v for k, v in x["cfg"].items())), None)
        fastest = min(same, key=lambda x: x["fwd_ms"])
        setting = ", ".join(f"{k}={v}" for k, v in best["cfg"].items())
        then_cells = (f"{then['fwd_ms']:.3f} | {then['segments']}, {then['prepass_ms']:.3f}" if then else "— | —")
        fla = best.get("fla_fwd_ms")
        too_wide = max(best["dk"], best["dv"]) > shipped.get("DKDV_MAX", float("inf"))  # runs before it: no limit
        fused = "n/a (head dim above DKDV_MAX)" if too_wide else fmt(best.get("fwdbwd_fused_dkdv_ms"))
        out.append(f"| {best['N']:,} | {best['B']} | {best['dk']}/{best['dv']} | {then_cells} | {setting} | "
                   f"{best['segments']} | {fastest['fwd_ms']:.3f} | {100 * best['floor_ms'] / fastest['fwd_ms']:.0f}% "
                   f"| {best['fwdbwd_ms']:.3f} | {fused} | {fmt(fla)} | "
                   f"{fmt(fla / fastest['fwd_ms'] if fla else None, '{:.2f}×')} |")
    return _with_notes(out, result)


def render_chunk_variants(result: dict) -> str:
    """bench/chunk_sweep.py --variants: every code variant of the chunk kernel per shape, the fastest's backward."""
    out = [render_chunk_sweep(result, "the chunk kernel's code variants").rstrip("\n"), "",
           "Every variant of that run (ms per forward; err = largest output difference from the run's shipped "
           "setting, relative to the largest output):", "",
           "| N | B | dk/dv | setting | segments | pre-pass | fwd | % floor | vs fla | err |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    segment_rule = ("SEG_PROGRAMS_PER_SM", "MIN_SEG_CHUNKS")  # the shipped rule in every row
    for x in result["rows"]:
        setting = ", ".join(f"{k}={v}" for k, v in x["cfg"].items() if k not in segment_rule)
        shape = f"| {x['N']:,} | {x['B']} | {x['dk']}/{x['dv']} | {setting} |"
        if "fwd_ms" not in x:
            out.append(f"{shape} | | {x['error'][:60]} | | | |")
            continue
        out.append(f"{shape} {x['segments']} | {x['prepass_ms']:.3f} | {x['fwd_ms']:.3f} | {x['pct_floor']:.0f}% | "
                   f"{fmt(x.get('vs_fla'), '{:.2f}×')} | {fmt(x.get('err_vs_shipped'), '{:.1e}')} |")
    return "\n".join(out) + "\n"


def render_streamer_ab(result: dict) -> str:
    """bench/streamer_ab.py: one machine's 16-session decode with the detokenizer's plain-piece shortcut and without."""
    out = ["", f"## Detokenizer shortcut A/B ({result['device']}, {result['preset']}, {result['context']:,}-token "
           "contexts)", "", f"Date: {run_date(result)}. torch {result['torch']}. {_commands(result)}. Two engines on "
           "one model in one process, alternating; ms/token = median gap between two tokens of a session, "
           f"{result['tokens']} tokens per reply; aggregate = the sessions' tok/s over one session's.", "",
           "| round | streamer | sessions | solo ms/token | sessions ms/token | ratio | aggregate |",
           "|---|---|---|---|---|---|---|"]
    for x in result["rows"]:
        out.append(f"| {x['round']} | {x['streamer']} | {x['sessions']} | {x['solo_ms']:.3f} | "
                   f"{x['sessions_ms']:.3f} | {x['ratio']:.2f}× | {x['aggregate_x']:.1f}× |")
    return _with_notes(out, result)


def render_engine(result: dict) -> str:
    """bench/engine_gpu.py: decode through the engine as chat uses it, against the HBM floor measured in the run."""
    out = ["", f"## Engine decode on the GPU ({result['device']}, {result['dtype']} activations, fp32 state)", "",
           f"Date: {run_date(result)}. torch {result['torch']}. {_commands(result)}. Floor: the step's "
           f"weight and state bytes at the copy bandwidth measured in the same run "
           f"({result['copy_bandwidth_gb_s']:,.0f} GB/s). {result['tokens']} tokens per reply, eos ignored; "
           "ms/token = median gap between two tokens of one session, read by a consumer thread as chat reads "
           "them (sampling, detokenising and events included). `graph-replay` = the captured step alone. "
           f"Weights: float = {result['dtype']}, int8 = weight-only int8 (`--quant int8`). Prologues off / int8 / "
           "all: the decode products' ops before them composed, or fused into the products of int8 weights, or of "
           "every weight (`--prologues`; docs/kernels.md#prologues-the-op-before-a-product-inside-the-product). Norms "
           "deferred / kernels: the blocks' norms left to the products after them, or kernels of their own "
           "(`--norms`; docs/kernels.md#deferred-norms). PDL on / off: the one-row products launched with "
           "programmatic dependent launch or not (`--pdl`; docs/kernels.md#programmatic-dependent-launch).", "",
           "| preset | weights | path | sessions | context | ms/token | floor ms | % of floor | aggregate tok/s | "
           "code |", "|---|---|---|---|---|---|---|---|---|---|"]
    for x in result["rows"]:
        path = x["path"] + "".join(f" ({field} {x[field]})" for field in ("prologues", "norms", "pdl")
                                   if x.get(field, "auto") != "auto")
        out.append(f"| {x['preset']} | {_weights(x)} | {path} | {x['batch']} | {x['context']:,} | "
                   f"{x['decode_ms_per_token']:.2f} | {x['hbm_floor_ms']:.2f} | {100 * x['floor_fraction']:.0f} % | "
                   f"{x['aggregate_tok_s']:,.0f} | {x.get('commit', '')} |")
    if result.get("interleave"):
        out += ["", "A long prompt arriving while sessions decode (their ms/token during its prefill vs before):", "",
                "| preset | weights | decoding sessions | prompt tokens | prefill chunk | chunk read | prefill s | "
                "ms/token before → during | ratio | code |", "|---|---|---|---|---|---|---|---|---|---|"]
        for x in result["interleave"]:
            read = {True: "in the decode step", False: "beside it"}.get(x.get("packed", False))
            out.append(f"| {x['preset']} | {_weights(x)} | {x['decoding_sessions']} | {x['prompt_tokens']:,} | "
                       f"{x['prefill_budget']:,} | {read} | {x['prefill_s']:.2f} | {x['ms_per_token_before']:.1f} → "
                       f"{x['ms_per_token_during']:.1f} | {x['ratio']:.2f}× | {x.get('commit', '')} |")
    for check in result.get("checks") or []:
        out.append(f"\nGraph vs eager: {check}")
    return _with_notes(out, result)


def _weights(item: dict) -> str:
    """An engine row's weights: the float dtype of the run ("none") or its 8-bit method."""
    return "float" if item.get("quant", "none") == "none" else item["quant"]


def _with_notes(lines: list[str], result: dict) -> str:
    """A section's lines, then the run's notes (each on a paragraph of its own), as Markdown."""
    lines = lines + [f"\nNote: {note}" for note in result.get("notes") or []]
    return "\n".join(lines) + "\n"


def render_app(result: dict) -> str:
    """bench/app_http.py: a chat reply streamed over HTTP by the app, against the app's engine alone."""
    out = ["", f"## The app over HTTP against its engine ({result['device']})", "",
           f"Date: {run_date(result)}. torch {result['torch']}. {_commands(result)}. One message, chat's default "
           f"sampling seeded (both paths sample the same tokens), float weights; tok/s = (tokens - 1) / (time the "
           "text was complete - first text), the median of the runs after an untimed one; to completion: up to "
           "the final result instead (over HTTP, Gradio's completion message after the last text; rows without it "
           "were measured up to the final result).", "",
           "| model | path | tokens | tok/s | runs (tok/s) | to completion | app / engine | code |",
           "|---|---|---|---|---|---|---|---|"]
    for x in result["rows"]:
        ratio = f"{x['ratio_to_engine']:.2f}" if x.get("ratio_to_engine") else ""
        runs = ", ".join(f"{r:.0f}" for r in x["tok_s_runs"])
        path = x["path"]
        if path == "app-http":  # rows without an interval ran at Python's own (the app's default then)
            path += f" (switch interval {x.get('switch_interval_ms') or 5:g} ms)"
        out.append(f"| {x['model']} | {path} | {x['tokens'][0]} | {fmt(x['tok_s'], '{:.1f}')} | {runs} | "
                   f"{fmt(x.get('tok_s_to_completion'), '{:.1f}')} | {ratio} | {x.get('commit', '')} |")
    return _with_notes(out, result)


def render_quant(result: dict) -> str:
    """bench/quant_gpu.py: 8-bit weights per Linear and through the engine, against bf16 in the same run."""
    out = ["", f"## 8-bit weights on the GPU ({result['device']}, {result['preset']}, triton {result['triton']})", "",
           f"Date: {run_date(result)}. torch {result['torch']}. {_commands(result)}. µs per call as CUDA-graph "
           "replays, weights read from HBM; `int8` = the Triton kernel, `Int8Linear` = what the model runs (the "
           "kernel, or the dequantised weight through cuBLAS above its row limit); `bnb_int8` = bitsandbytes "
           "`Linear8bitLt` (outlier threshold 6), timed eagerly (it reads its outlier columns on the host, so no "
           "graph captures it); `bnb_nf4` = bitsandbytes 4-bit `Linear4bit` (NF4, blocks of 64), a graph replay, "
           "timed to decide whether a 4-bit method pays (docs/quantization.md#4-bit-nf4).", "",
           "| Linear | rows | bf16 µs | int8 kernel µs | Int8Linear µs | bnb_int8 µs | bnb_nf4 µs |",
           "|---|---|---|---|---|---|---|"]
    cells: dict[tuple[str, int], dict[str, float]] = {}
    for x in result["linear"]:
        cells.setdefault((x["shape"], x["rows"]), {})[x["method"]] = x["us"]
    for (shape, rows), us in cells.items():
        times = " | ".join(fmt(us.get(method), "{:.1f}") for method in ("bf16", "int8", "int8_linear", "bnb_int8",
                                                                      "bnb_nf4"))
        out.append(f"| {_cell(shape)} | {rows} | {times} |")
    out += ["", "Through the engine (decode: ms per token of each session; × bf16: tok/s against bf16's at the same "
            "batch, from the same code and launch mode where recorded; path: captured CUDA graphs or eager steps; "
            "PDL: an experiment's int8 products launched with programmatic dependent launch or not, docs/kernels.md; "
            "— = the row's code as shipped, which launches one-row int8 products with it from 7932c0e on):", "",
            "| method | path | PDL | batch | context | ms/token | × bf16 | prefill s | weights GiB | quantise s "
            "| code |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    rows = result["model"] + result["prefill"]
    bf16 = {(x["batch"], x["context"]): x for x in rows if x["method"] == "bf16"}
    bf16.update({(x["batch"], x["context"], x.get("pdl"), x.get("commit")): x for x in rows if x["method"] == "bf16"})
    for x in rows:
        same_run = (x["batch"], x["context"], x.get("pdl"), x.get("commit"))
        ref = bf16.get(same_run) or bf16.get((x["batch"], x["context"]))
        key = "decode_ms_per_token" if "decode_ms_per_token" in x else "prefill_s"
        speed = fmt(ref[key] / x[key], "{:.2f}×") if ref and ref.get(key) and x.get(key) else "—"
        launch = {True: "on", False: "off"}.get(x.get("pdl"), "—")
        out.append(f"| {x['method']} | {x.get('path', 'graph')} | {launch} | {x['batch']} | {x['context']:,} | "
                   f"{fmt(x.get('decode_ms_per_token'))} | {speed} | {fmt(x.get('prefill_s'))} | "
                   f"{x['weight_gib']:.2f} | {fmt(x.get('load_s'))} | {x.get('commit', '')} |")
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


def render_quant_quality(result: dict) -> str:
    """bench/quant_quality.py: the bundled model's validation-slice loss per 8-bit method against float."""
    out = ["", f"## 8-bit weights: validation-slice loss ({result['device']})", "",
           f"Date: {run_date(result)}. torch {result['torch']}. {_commands(result)}. Goal: int8 at most "
           f"{result['goal_rel_change']:+.1%} against float.", "",
           "| method | dtype | loss | perplexity | change vs float |", "|---|---|---|---|---|"]
    for x in result["rows"]:
        out.append(f"| {x['method']} | {x['dtype']} | {x['loss']:.5f} | {x['ppl']:.3f} | {x['rel_change']:+.4%} |")
    return "\n".join(out) + "\n"


def _cell(text: str) -> str:
    """Text as one Markdown table cell (newlines and pipes would break the row)."""
    return text.replace("|", "\\|").replace("\n", " / ")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", default=str(ROOT / "bench/results/kernels-h200.json"))
    p.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"))
    p.add_argument("--merge", metavar="NEW_JSON",
                   help="a new bench/kernels.py run to fold into --json section by section before rendering")
    p.add_argument("--merged-out", metavar="FILE", help="write the merged kernels JSON here (default: over --json)")
    p.add_argument("--fold", metavar="NEW_JSON", help="a run of bench/engine_gpu.py or bench/quant_gpu.py to fold "
                   "into --into (rows measured again are replaced), before rendering")
    p.add_argument("--into", metavar="FILE", help="the recorded file --fold updates in place")
    p.add_argument("--commit", help="the code the --fold run measured (short hash)")
    a = p.parse_args()
    if a.fold:
        if not (a.into and a.commit):
            p.error("--fold needs --into and --commit")
        into = Path(a.into)
        folded = fold_rows(json.loads(into.read_text()), json.loads(Path(a.fold).read_text()), a.commit)
        into.write_text(json.dumps(folded, indent=1) + "\n")
    kernels_json = Path(a.json)
    if a.merge:
        target = Path(a.merged_out or a.json)
        try:
            merged = merge_kernel_files(kernels_json, Path(a.merge), target)
        except ValueError as e:
            p.error(str(e))
        print(f"merged {a.merge} into {target}: " + ", ".join(
            f"{name} {_run_label(merged, e['run'])}" for name, e in merged["sections"].items()))
        kernels_json = target
    Path(a.out).write_text(render_all(ROOT / "bench/results", kernels_json))


def render_all(results: Path, kernels_json: Path) -> str:
    """Every section of BENCHMARKS.md, each from its own file in `results` (the kernels' from `kernels_json`);
    a missing file reads "not measured yet"."""
    if kernels_json.is_file():
        result = json.loads(kernels_json.read_text())
        _bench_module("kernels").derive(result)  # idempotent; partial (timed-out) JSON files are written before it
        text = render(result)
    else:
        text = "# Benchmarks\n" + not_measured("Lightning Attention kernels", _shown(kernels_json),
                                                "python bench/kernels.py")
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
            ("sampler-h200", "Batch sampler per decode step", render_sampler, "python bench/sampler.py"),
            ("streamer-ab-h200", "Detokenizer shortcut A/B", render_streamer_ab,
             "python bench/streamer_ab.py --out bench/results/streamer-ab-h200.json"),
            ("chunk-sweep-h200", "Lightning Attention forward: launch settings and segments", render_chunk_sweep,
             "python bench/chunk_sweep.py --out bench/results/chunk-sweep-h200.json"),
            ("chunk-shipped-h200", "Lightning Attention forward: the shipped setting, dk and dv in one sweep or two",
             render_chunk_sweep,
             "python bench/chunk_sweep.py --shipped-only --out bench/results/chunk-shipped-h200.json"),
            ("chunk-variants-h200", "Lightning Attention forward: the chunk kernel's code variants",
             render_chunk_variants,
             "python bench/chunk_sweep.py --variants --out bench/results/chunk-variants-h200.json"),
            ("prologue-ab-h200", "Decode products with the op before them fused", render_prologue_ab,
             "python bench/prologue_ab.py --out bench/results/prologue-ab-h200.json"),
            ("step-tiles-h200", "Decode step kernel tiles", render_step_tiles,
             "python bench/step_tiles.py --out bench/results/step-tiles-h200.json"),
            ("app-h200", "The app over HTTP against its engine", render_app,
             "python bench/app_http.py --device cuda --out bench/results/app-h200.json"),
            ("serve-cpu", "Concurrent sessions through the engine (CPU)", render_serve,
             "python bench/serve.py --device cpu --out bench/results/serve-cpu.json"),
            ("quant-quality-cpu", "8-bit weights: validation-slice loss (CPU)", render_quant_quality,
             "python bench/quant_quality.py --device cpu --out bench/results/quant-quality-cpu.json"),
            ("quant-quality-h200", "8-bit weights: validation-slice loss (GPU)", render_quant_quality,
             "python bench/quant_quality.py --device cuda --out bench/results/quant-quality-h200.json")):
        path = results / f"{name}.json"
        text += renderer(json.loads(path.read_text())) if path.is_file() else not_measured(title, _shown(path), command)
    # the runs that chose single tiles of the launcher's tables, where recorded
    for path in sorted(results.glob("prologue-ab-*-h200.json")):
        text += render_prologue_ab(json.loads(path.read_text()), f"Decode products with the op before them fused: "
                                   f"{path.name}")
    for path in sorted(results.glob("*sweep*-h200.json.gz")):
        text += render_tile_sweep(json.loads(gzip.decompress(path.read_bytes())), path.name)
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
