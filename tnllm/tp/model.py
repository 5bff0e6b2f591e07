"""The tensor-parallel TransNormerLLM: the plain model built at 1/N width, with four module swaps.

Rank r of N holds heads [r H/N, (r+1) H/N) and GLU units [r g/N, (r+1) g/N):

    qkvu_proj  [4 hd/N, d]   column-parallel: rows of its heads from each of the q | k | v | u quarters
    lrpe.theta [H/N, 1, dh]  its heads
    norm                     ShardedSRMSNorm over the full hd (all-reduce of [B, T, 1] sums of squares)
    out_proj   [d, hd/N]     row-parallel, one all-reduce of [B, T, d]
    l1, l2     [g/N, d]      column-parallel
    l3         [d, g/N]      row-parallel, one all-reduce of [B, T, d]
    log_decay  [L, H/N]      the rates of its *global* head indices (ALiBi slopes of the full H)
    embed / lm_head          vocab-parallel [V/N, d] (tied), or replicated [V, d] (vocab_parallel=False)

Everything else - `TransNormerLLM.forward`, `DecoderLayer`, `NormLinearAttention`, the Lightning
Attention kernels, `RecurrentState` - is the single-GPU code, run on the local shapes: the model's
`config` is the *local* config (H/N heads), so `allocate_state` gives each rank only its heads' state.
Per block: 2 all-reduces of [B, T, d] plus 1 of [B, T, 1] (folded into out_proj's for calls of
<= `fuse_norm_rows` rows, i.e. decode: see `tnllm.tp.layers`); per call: 1 for the embedding and
one all-gather of the kept logits.
"""

from __future__ import annotations

import torch

from tnllm.config import TNLConfig
from tnllm.model import TransNormerLLM, lightning_log_decay
from tnllm.tp.comm import TPGroup, shard_range
from tnllm.tp.layers import RowParallelLinear, ShardedEmbedding, ShardedLMHead, ShardedSRMSNorm


def local_config(config: TNLConfig, size: int) -> TNLConfig:
    """The config one rank's modules are built from: H/N heads, hd/N attention width, g/N GLU width."""
    shard_range(config.n_heads, 0, size, "n_heads")
    shard_range(config.glu_dim, 0, size, "glu_dim")
    return config.replace(n_heads=config.n_heads // size, hidden_dim=config.hidden_dim // size,
                          glu_dim=config.glu_dim // size)


class TPTransNormerLLM(TransNormerLLM):
    """One rank's shard. Built on the meta device: call `.to(dtype).to_empty(device=...)`, then fill
    it with `tnllm.tp.load.load_tp_weights` / `shard_from_model` (see `tnllm.tp.load`).

    `full_config` is the checkpoint's config; `config` the local one (what `allocate_state` uses).
    """

    def __init__(self, config: TNLConfig, tp: TPGroup, vocab_parallel: bool = True, fuse_norm_rows: int = 64):
        self.full_config = config
        self.fuse_norm_rows = fuse_norm_rows
        self.tp = tp
        self.vocab_parallel = vocab_parallel and tp.size > 1 and config.vocab_size % tp.size == 0
        self.head_range = shard_range(config.n_heads, tp.rank, tp.size, "n_heads")
        self.glu_range = shard_range(config.glu_dim, tp.rank, tp.size, "glu_dim")
        self.vocab_range = (shard_range(config.vocab_size, tp.rank, tp.size, "vocab_size")
                            if self.vocab_parallel else (0, config.vocab_size))
        local = local_config(config, tp.size)
        with torch.device("meta"):
            super().__init__(local)
            self._swap_modules()

    def _swap_modules(self) -> None:
        c, tp = self.full_config, self.tp
        for layer in self.model.layers:
            mixer = layer.token_mixer
            mixer.norm = ShardedSRMSNorm(c.hidden_dim, c.norm_eps, tp, self.fuse_norm_rows)
            mixer.out_proj = RowParallelLinear(c.hidden_dim // tp.size, c.dim, c.bias, tp, mixer.norm.pending)
            layer.channel_mixer.l3 = RowParallelLinear(c.glu_dim // tp.size, c.dim, c.bias, tp)
        n_rows = self.vocab_range[1] - self.vocab_range[0]
        self.model.embed_tokens = ShardedEmbedding(n_rows, c.dim, self.vocab_range[0], self.vocab_parallel, tp)
        self.lm_head = ShardedLMHead(n_rows, c.dim, self.vocab_parallel, tp)
        if c.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def set_fuse_norm_rows(self, rows: int) -> None:
        """Calls of <= rows rows fold the norm's all-reduce into out_proj's (0 = never; see tp.layers)."""
        self.fuse_norm_rows = rows
        for layer in self.model.layers:
            layer.token_mixer.norm.fuse_rows = rows

    def _log_decay_table(self) -> torch.Tensor:
        """[L, H/N] fp32: the full model's rates at this rank's global head indices."""
        c = self.full_config
        lo, hi = self.head_range
        return torch.stack([lightning_log_decay(c.n_heads, i, c.n_layers)[lo:hi] for i in range(c.n_layers)])

    def init_weights(self) -> None:
        raise NotImplementedError("a TP shard is filled from a checkpoint or a full model (tnllm.tp.load)")


def empty_tp_model(config: TNLConfig, tp: TPGroup, dtype: torch.dtype = torch.float32,
                   vocab_parallel: bool = True, fuse_norm_rows: int = 64) -> TPTransNormerLLM:
    """An uninitialised shard on `tp.device` (only this rank's slices are allocated)."""
    model = TPTransNormerLLM(config, tp, vocab_parallel, fuse_norm_rows)
    return model.to(dtype).to_empty(device=tp.device).eval()
