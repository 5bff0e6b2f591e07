"""Quality of 8-bit weights: the bundled model's validation-slice loss per method, against its float weights.

    python bench/quant_quality.py --device cpu --out bench/results/quant-quality-cpu.json
    python bench/quant_quality.py --device cuda --out bench/results/quant-quality-h200.json

The loss is `tnllm.train.dialogue_loss` on assets/val_slice.jsonl (20 dialogues, each read on its own; the model
card's figure). Per method (float, int8, and bnb_int8 where bitsandbytes imports), the model is loaded as the app
loads it on that device (fp32 on the CPU, bf16 on CUDA; 8-bit decoder Linears through `quant.load_quantized`).
Rows: method, device, dtype, loss, ppl, rel_change = loss / float loss - 1 (the goal for int8: at most +0.5 %).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import sys
from pathlib import Path

import torch

from tnllm import quant
from tnllm.quant import bnb
from tnllm.tokenizer import tokenizer_for
from tnllm.train import dialogue_loss, read_dialogues

ROOT = Path(__file__).resolve().parents[1]
GOAL = 0.005  # int8's loss at most 0.5 % above float's


def val_losses(model_dir: Path, device: str, dtype: torch.dtype) -> list[dict]:
    """One row per 8-bit method available here (float first), each with its loss change against float."""
    tokenizer = tokenizer_for(str(model_dir))
    dialogues = read_dialogues(ROOT / "assets" / "val_slice.jsonl")
    rows = []
    for method in ("none", "int8", "bnb_int8"):
        if method == "bnb_int8" and not bnb.available():
            continue
        model = quant.load_quantized(model_dir, method, dtype=dtype, device=device)
        loss = dialogue_loss(model, tokenizer, dialogues, device=device)
        rows.append({"method": method, "device": device, "dtype": str(dtype).removeprefix("torch."), "loss": loss,
                     "ppl": math.exp(loss), "rel_change": loss / rows[0]["loss"] - 1 if rows else 0.0})
        del model
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", type=Path, default=ROOT / "assets" / "tnl")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    cuda = args.device.startswith("cuda")
    rows = val_losses(args.model, args.device, torch.bfloat16 if cuda else torch.float32)
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    device = torch.cuda.get_device_name(args.device) if cuda else platform.processor() or platform.machine()
    result = {"bench": "quant_quality", "date": now, "device": device, "torch": torch.__version__,
              "command": "python " + " ".join(sys.argv), "goal_rel_change": GOAL, "rows": rows}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for r in rows:
        print(f"{r['method']:9} {r['dtype']:9} loss {r['loss']:.4f} ppl {r['ppl']:.2f} change {r['rel_change']:+.4%}")


if __name__ == "__main__":
    main()
