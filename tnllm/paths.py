"""Where the package finds its files: the one place that decides, for a checkout and an installed package alike.

`tnllm/assets` is a symlink to the repository's `assets/` in a checkout and a copy of it (package data) in an
installed package, so the bundled model is always found next to this module.
"""

from __future__ import annotations

from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
ASSETS = (PACKAGE / "assets").resolve()  # the bundled model, its baseline and tokenizer
# The folder holding assets/: the repository root in a checkout, the package folder once installed. The UI
# names files relative to it, and the latency tab looks for recorded runs in its bench/results/ (a checkout's
# only: an installed package has none and shows the live run alone).
ROOT = ASSETS.parent
RECORDED_RESULTS = ROOT / "bench" / "results"
