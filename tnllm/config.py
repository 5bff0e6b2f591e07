"""TransNormerLLM configuration: one dataclass, the official config.json mapping, named presets.

Checkpoint field names (`decoder_embed_dim`, `linear_use_lrpe_list`, ...) appear only in
`from_hf_dict` / `to_hf_dict`; the rest of the code uses the short names below.
Fields and released sizes: docs/model.md#configuration and #released-sizes.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# Official field name -> our field name.
_HF_NAMES = {
    "vocab_size": "vocab_size",
    "decoder_embed_dim": "dim",
    "decoder_layers": "n_layers",
    "decoder_attention_heads": "n_heads",
    "hidden_dim": "hidden_dim",
    "glu_dim": "glu_dim",
    "linear_use_lrpe_list": "lrpe_layers",
    "linear_act_fun": "act",
    "no_scale_embedding": "no_scale_embedding",
    "norm_type": "norm_type",
    "bias": "bias",
    "tie_word_embeddings": "tie_word_embeddings",
    "pad_token_id": "pad_token_id",
    "bos_token_id": "bos_token_id",
    "eos_token_id": "eos_token_id",
    "init_std": "init_std",
    "use_cache": "use_cache",
    "add_bos_token": "add_bos_token",
}
# Bookkeeping keys written by transformers or by the upstream model itself; dropped on read.
_IGNORED_KEYS = {
    "architectures", "auto_map", "model_type", "torch_dtype", "dtype", "transformers_version",
    "_name_or_path", "keys_to_ignore_at_inference", "linear_use_lrpe",
}
_ACTIVATIONS = {"silu": "silu", "swish": "silu", "none": "none"}


@dataclass
class TNLConfig:
    """Hyper-parameters of a TransNormerLLM model (defaults = the official `TransnormerConfig`).

    `lrpe_layers[i] == 1` puts LRPE on layer i's q/k (its attention then has dk = 2 * head_dim).
    `extra` keeps unknown keys from a checkpoint's config.json so that saving writes them back.
    """

    vocab_size: int = 64000
    dim: int = 1024
    n_layers: int = 24
    n_heads: int = 8
    hidden_dim: int = 1024
    glu_dim: int = 2816
    lrpe_layers: list[int] = field(default_factory=list)
    act: str = "silu"
    no_scale_embedding: bool = False
    norm_type: str = "simplermsnorm"
    bias: bool = False
    tie_word_embeddings: bool = True
    pad_token_id: int = 0
    bos_token_id: int = 1
    eos_token_id: int = 2
    init_std: float = 0.02
    use_cache: bool = True
    add_bos_token: bool = False
    norm_eps: float = 1e-6
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.glu_dim == -1:  # upstream convention: -1 means "same as the model width"
            self.glu_dim = self.dim
        if not self.lrpe_layers:
            self.lrpe_layers = [0] * self.n_layers
        self.lrpe_layers = [int(x) for x in self.lrpe_layers]
        self.act = _ACTIVATIONS.get(str(self.act).lower(), "none")
        self.validate()

    @property
    def head_dim(self) -> int:
        return self.hidden_dim // self.n_heads

    @property
    def embed_scale(self) -> float:
        """sqrt(dim) unless `no_scale_embedding` (the official 1B multiplies by sqrt(2048))."""
        return 1.0 if self.no_scale_embedding else math.sqrt(self.dim)

    def validate(self) -> None:
        """Raise ValueError naming the offending values."""
        positive = {"vocab_size": self.vocab_size, "dim": self.dim, "n_heads": self.n_heads,
                    "hidden_dim": self.hidden_dim, "glu_dim": self.glu_dim}
        for name, value in positive.items():
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.n_layers < 2:
            # The decay schedule divides by (n_layers - 1) (docs/model.md#decay-rates).
            raise ValueError(f"n_layers must be >= 2 (decay uses l / (n_layers - 1)), got {self.n_layers}")
        if self.hidden_dim % self.n_heads:
            raise ValueError(f"hidden_dim={self.hidden_dim} is not divisible by n_heads={self.n_heads}")
        if len(self.lrpe_layers) != self.n_layers:
            raise ValueError(
                f"linear_use_lrpe_list has {len(self.lrpe_layers)} entries but n_layers={self.n_layers}"
            )
        if any(x not in (0, 1) for x in self.lrpe_layers):
            raise ValueError(f"linear_use_lrpe_list entries must be 0 or 1, got {self.lrpe_layers}")
        if self.norm_type != "simplermsnorm":
            raise ValueError(
                f"norm_type={self.norm_type!r} is not supported: released TransNormerLLM checkpoints use "
                "'simplermsnorm' (weight-free); other norms would add parameters the official layout lacks"
            )
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < self.vocab_size:
                raise ValueError(f"{name}={value} is outside the vocabulary [0, {self.vocab_size})")

    # -- official config.json <-> TNLConfig -----------------------------------------------------
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> "TNLConfig":
        """Build from an official `config.json` dict; unknown keys are kept in `extra` (logged once)."""
        kwargs: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        for key, value in d.items():
            if key in _HF_NAMES:
                kwargs[_HF_NAMES[key]] = value
            elif key not in _IGNORED_KEYS:
                extra[key] = value
        if extra:
            log.info("config.json: keeping unknown keys %s", sorted(extra))
        return cls(**kwargs, extra=extra)

    def to_hf_dict(self) -> dict[str, Any]:
        """The official `config.json` layout (plus any unknown keys read earlier)."""
        ours = asdict(self)
        d: dict[str, Any] = {"architectures": ["TransnormerForCausalLM"], "model_type": "transnormer"}
        d.update({hf: ours[name] for hf, name in _HF_NAMES.items()})
        d["linear_act_fun"] = {"silu": "swish", "none": "none"}[self.act]
        d.update(self.extra)
        return d

    @classmethod
    def from_file(cls, path: str | Path) -> "TNLConfig":
        """Read an official `config.json`; errors name the file."""
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"cannot read config {path}: {exc}") from exc
        if not isinstance(data, dict):
            raise ValueError(f"config {path} must hold a JSON object, got {type(data).__name__}")
        try:
            return cls.from_hf_dict(data)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"invalid config {path}: {exc}") from exc

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_hf_dict(), indent=2) + "\n", encoding="utf-8")

    # -- presets -------------------------------------------------------------------------------
    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> "TNLConfig":
        """Exact-name preset ("tnl-385m", "tnl-1b", "tnl-7b", "tiny"); keyword overrides win."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def replace(self, **changes: Any) -> "TNLConfig":
        """A validated copy with some fields changed."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return TNLConfig(**{**values, **changes})


def _lrpe_first(n_layers: int) -> list[int]:
    return [1] + [0] * (n_layers - 1)


# Released sizes (docs/model.md#released-sizes). The 385M/7B head counts, no_scale_embedding and act are not
# known for certain and are best guesses: a checkpoint's config.json always overrides them.
PRESETS: dict[str, dict[str, Any]] = {
    "tnl-385m": dict(vocab_size=64000, dim=1024, n_layers=24, n_heads=8, hidden_dim=1024, glu_dim=2816,
                     lrpe_layers=_lrpe_first(24), act="swish"),
    "tnl-1b": dict(vocab_size=64000, dim=2048, n_layers=16, n_heads=16, hidden_dim=2048, glu_dim=5632,
                   lrpe_layers=_lrpe_first(16), act="swish", no_scale_embedding=False),
    "tnl-7b": dict(vocab_size=64000, dim=4096, n_layers=30, n_heads=32, hidden_dim=4096, glu_dim=11008,
                   lrpe_layers=_lrpe_first(30), act="swish"),
    "tiny": dict(vocab_size=256, dim=64, n_layers=3, n_heads=4, hidden_dim=64, glu_dim=128,
                 lrpe_layers=[1, 0, 1], act="swish"),
}
