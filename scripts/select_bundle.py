"""Pick the bundled model size from a training sweep and pack the chosen pair (device side).

    python3 scripts/select_bundle.py choose RUNS          -> prints the size whose TNL val loss is lowest
    python3 scripts/select_bundle.py pack RUNS SIZE OUT   -> OUT/sweep.json + OUT/bundle.tar.part-NN (<= 15 MB each)

The device returns at most 8 files of 16 MB, so the two models travel as a split tar.
"""

from __future__ import annotations

import io
import json
import sys
import tarfile
from pathlib import Path

PART_BYTES = 15 * 2**20


def summaries(runs: Path) -> dict[str, dict]:
    out = {}
    for path in sorted(runs.glob("*/summary.json")):
        out[path.parent.name] = json.loads(path.read_text())
    return out


def choose(runs: Path) -> str:
    tnl = {name.split("-", 1)[1]: s["val_loss"] for name, s in summaries(runs).items()
           if name.startswith("tnl-")}
    if not tnl:
        raise SystemExit("no finished TNL runs")
    return min(tnl, key=tnl.get)


def pack(runs: Path, size: str, out: Path) -> None:
    all_runs = summaries(runs)
    logs = {p.stem: p.read_text()[-4000:] for p in sorted(runs.glob("*.log"))}
    (out / "sweep.json").write_text(json.dumps({"chosen": size, "runs": all_runs, "log_tails": logs}, indent=1))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for arch in ("tnl", "llama"):
            tar.add(runs / f"{arch}-{size}" / "model", arcname=arch)
            tar.add(runs / f"{arch}-{size}" / "train_log.jsonl", arcname=f"{arch}-train_log.jsonl")
    data = buf.getvalue()
    for i in range(0, len(data), PART_BYTES):
        (out / f"bundle.tar.part-{i // PART_BYTES:02d}").write_bytes(data[i:i + PART_BYTES])


if __name__ == "__main__":
    command, runs = sys.argv[1], Path(sys.argv[2])
    if command == "choose":
        print(choose(runs))
    else:
        pack(runs, sys.argv[3], Path(sys.argv[4]))
