"""Build the bundled model's card, loss-curve plot, SHA-256 manifest and README table from measurements.

    python scripts/bundle_report.py

Reads bench/results/train-sweep-h200.json (the GPU sweep, scripts/gpu_train_sweep.sh), evaluates the
shipped models on CPU (val loss on the fixed 20-dialogue slice assets/val_slice.jsonl, sample replies),
and writes assets/model_card.json, assets/loss_curves.png, assets/manifest.sha256.json and the README
section between the bundled-model markers. No figure is typed by hand.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from tnllm import load_model, load_tokenizer
from tnllm.baseline import load_llama
from tnllm.checkpoint import sha256_file
from tnllm.engine import single_reply
from tnllm.sampling import SamplingParams
from tnllm.train import dialogue_loss, read_dialogues

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "assets"
SWEEP = ROOT / "bench/results/train-sweep-h200.json"
SAMPLE_PROMPTS = ["hi! how are you doing today?", "what do you like to do for fun?", "do you have any pets?"]
GREEDY = SamplingParams(temperature=0, max_new_tokens=40)
SAMPLED = SamplingParams(temperature=0.8, top_p=0.9, max_new_tokens=40, seed=0)
MARKERS = ("<!-- bundled-model:start -->", "<!-- bundled-model:end -->")


def manifest() -> None:
    """SHA-256 of every shipped asset (relative paths), except the manifest itself."""
    files = sorted(p for p in ASSETS.rglob("*") if p.is_file() and p != ASSETS / "manifest.sha256.json")
    data = {str(p.relative_to(ASSETS)): sha256_file(p) for p in files}
    (ASSETS / "manifest.sha256.json").write_text(json.dumps(data, indent=2) + "\n")


def plot(sweep: dict) -> None:
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=110)
    for name, run in sorted(sweep["runs"].items()):
        if name.startswith("speed-"):
            continue
        arch, size = name.split("-")
        xs = [e["tokens_seen"] / 1e6 for e in run["epochs"]]
        style = "-" if arch == "tnl" else "--"
        width = 2.2 if size == sweep["chosen"] else 1.0
        ax.plot(xs, [e["val_loss"] for e in run["epochs"]], style, lw=width,
                label=f"{'TNL' if arch == 'tnl' else 'Llama'}-{size} ({run['params'] / 1e6:.1f}M)")
    ax.set_xlabel("training tokens (M)")
    ax.set_ylabel("validation loss")
    ax.set_title("Chit-chat SFT: TransNormerLLM vs Llama, same sizes")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(ASSETS / "loss_curves.png")


def card(sweep: dict) -> dict:
    tokenizer = load_tokenizer(ASSETS / "tokenizer.model")
    val = read_dialogues(ASSETS / "val_slice.jsonl")
    size = sweep["chosen"]
    tnl = load_model(ASSETS / "tnl")
    llama = load_llama(ASSETS / "llama")
    out = {"chosen_size": size, "models": {}}
    for arch, model in (("tnl", tnl), ("llama", llama)):
        run, speed = sweep["runs"][f"{arch}-{size}"], sweep["runs"][f"speed-{arch}"]
        loss = dialogue_loss(model, tokenizer, val)
        out["models"][arch] = {
            "params": run["params"], "tokens_seen": run["tokens_seen"], "best_epoch": run["best_epoch"],
            "val_loss": run["val_loss"], "val_ppl": run["val_ppl"], "val_slice_loss_cpu": loss,
            "val_slice_ppl_cpu": math.exp(loss), "train_tokens_per_s_h200": speed["train_tokens_per_s"],
            "device": run["device"], "torch": run["torch"],
        }
    samples = []
    for prompt in SAMPLE_PROMPTS:
        for label, params in (("greedy", GREEDY), ("sampled T=0.8 top-p 0.9 seed 0", SAMPLED)):
            reply = single_reply(tnl, tokenizer, prompt, params).text
            samples.append({"prompt": prompt, "mode": label, "reply": reply})
    out["samples"] = samples
    out["config"] = sweep["runs"][f"tnl-{size}"]["config"]
    return out


def readme_section(c: dict, sweep: dict) -> str:
    rows = []
    for name, run in sorted(sweep["runs"].items()):
        if not name.startswith("speed-"):
            rows.append(f"| {name} | {run['params'] / 1e6:.2f} M | {run['best_epoch'] + 1} | "
                        f"{run['val_loss']:.3f} | {run['val_ppl']:.1f} |")
    t, ll = c["models"]["tnl"], c["models"]["llama"]
    cfg = c["config"]
    lines = [
        MARKERS[0],
        f"Shipped pair (size `{c['chosen_size']}`: d={cfg['dim']}, L={cfg['layers']}, H={cfg['heads']}, "
        f"GLU {cfg['glu']}, vocab 8192; seq {cfg['seq_len']}, batch {cfg['batch_size']}, lr {cfg['lr']}, "
        f"{cfg['epochs']} epochs, best epoch kept), trained on {t['device']} (torch {t['torch']}):",
        "",
        "| model | params | tokens seen | val loss (packed) | val ppl | val loss, 20-dialogue slice, CPU | "
        "train tokens/s (H200, solo) |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, m in (("TransNormerLLM", t), ("Llama (matched)", ll)):
        lines.append(f"| {label} | {m['params']:,} | {m['tokens_seen'] / 1e6:.1f} M | {m['val_loss']:.3f} | "
                     f"{m['val_ppl']:.1f} | {m['val_slice_loss_cpu']:.3f} | {m['train_tokens_per_s_h200']:,.0f} |")
    lines += ["", "Size sweep (all runs, same data and schedule; the TNL with the lowest val loss is shipped):", "",
              "| run | params | best epoch | val loss | val ppl |", "|---|---|---|---|---|", *rows, "",
              "Per epoch, shipped size (train loss measured on a train subset the size of the val split):", "",
              "| epoch | TNL train | TNL val | Llama train | Llama val |", "|---|---|---|---|---|",
              *[f"| {a['epoch'] + 1} | {a['train_loss']:.3f} | {a['val_loss']:.3f} | {b['train_loss']:.3f} | "
                f"{b['val_loss']:.3f} |" for a, b in zip(sweep["runs"][f"tnl-{c['chosen_size']}"]["epochs"],
                                                          sweep["runs"][f"llama-{c['chosen_size']}"]["epochs"])],
              "", "![validation loss curves](assets/loss_curves.png)", "",
              "Sample replies of the shipped TNL model:", ""]
    for s in c["samples"]:
        lines.append(f"* *{s['prompt']}* ({s['mode']}) → {json.dumps(s['reply'], ensure_ascii=False)}")
    lines.append(MARKERS[1])
    return "\n".join(lines)


def main() -> None:
    sweep = json.loads(SWEEP.read_text())
    plot(sweep)
    c = card(sweep)
    (ASSETS / "model_card.json").write_text(json.dumps(c, indent=2, ensure_ascii=False) + "\n")
    readme = ROOT / "README.md"
    text = readme.read_text()
    section = readme_section(c, sweep)
    if MARKERS[0] in text:
        text = re.sub(re.escape(MARKERS[0]) + ".*?" + re.escape(MARKERS[1]), lambda _: section, text, flags=re.S)
    else:
        text += "\n## Bundled model\n\n" + section + "\n"
    readme.write_text(text)
    manifest()
    print(section)


if __name__ == "__main__":
    main()
