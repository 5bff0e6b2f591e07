"""Build the chat SFT data: chitchat-dataset → data/{train,val}.jsonl + data/stats.json.

Source: PyPI ``chitchat-dataset`` 0.9.0 (MIT; BYU "Chit-Chat Challenge"; 7,168 conversations), read from
its bundled ``dataset.json`` (or ``--source PATH``). Each conversation becomes structured turns
(``tnllm.data.chitchat_to_turns``); conversations without a single reply are dropped. The split is fixed
by a hash of the conversation uuid (``tnllm.data.split_of``). Output lines, sorted by id:
``{"id": uuid, "turns": [{"role": "human"|"assistant", "text": ...}, ...]}``. The prompt rendering and the
eos token are applied later, with the tokenizer (``tnllm.data.encode_dialogue``).

Usage: python scripts/prepare_data.py [--source dataset.json] [--out data] [--val-fraction 0.05]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from tnllm.data import chitchat_to_turns, split_of

ROOT = Path(__file__).resolve().parents[1]

SPLITS = ("train", "val")


def default_source() -> Path:
    """Path of the JSON bundled in the installed ``chitchat_dataset`` package."""
    try:
        import chitchat_dataset
    except ImportError as e:
        raise SystemExit("pip install chitchat-dataset==0.9.0 (or pass --source dataset.json)") from e
    return Path(chitchat_dataset.__file__).with_name("dataset.json")


def build_splits(raw: dict, val_fraction: float) -> tuple[dict[str, list[dict]], int]:
    """Convert and split ``raw`` (uuid → conversation). Returns ({split: records sorted by id}, n_dropped)."""
    splits: dict[str, list[dict]] = {s: [] for s in SPLITS}
    dropped = 0
    for conv_id in sorted(raw):
        turns = chitchat_to_turns(raw[conv_id]["messages"])
        if not turns:  # monologue (no reply at all) or empty: nothing to learn
            dropped += 1
            continue
        splits[split_of(conv_id, val_fraction)].append({"id": conv_id, "turns": turns})
    return splits, dropped


def split_stats(records: list[dict]) -> dict:
    """Counts for one split: conversations, turns (per role) and characters of turn text."""
    turns = [t for r in records for t in r["turns"]]
    return {
        "conversations": len(records),
        "turns": len(turns),
        "human_turns": sum(t["role"] == "human" for t in turns),
        "assistant_turns": sum(t["role"] == "assistant" for t in turns),
        "characters": sum(len(t["text"]) for t in turns),
    }


def main(argv: list[str] | None = None) -> dict:
    """Write the jsonl files and stats; returns the stats dict."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", type=Path, default=None, help="chitchat dataset.json (default: installed package)")
    ap.add_argument("--out", type=Path, default=ROOT / "data")
    ap.add_argument("--val-fraction", type=float, default=0.05)
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    source = args.source or default_source()
    raw = json.loads(source.read_text(encoding="utf-8"))
    splits, dropped = build_splits(raw, args.val_fraction)

    args.out.mkdir(parents=True, exist_ok=True)
    for name, records in splits.items():
        with open(args.out / f"{name}.jsonl", "w", encoding="utf-8", newline="\n") as f:
            for rec in records:
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    stats = {
        "source": "chitchat-dataset 0.9.0 (PyPI, MIT)",
        "val_fraction": args.val_fraction,
        "split_rule": "val iff sha256(uuid)[:8] as big-endian int < val_fraction * 2**64",
        "input_conversations": len(raw),
        "dropped_conversations": dropped,
        **{name: split_stats(records) for name, records in splits.items()},
    }
    (args.out / "stats.json").write_text(json.dumps(stats, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(stats, indent=2))
    print(f"wrote {args.out} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return stats


if __name__ == "__main__":
    main()
