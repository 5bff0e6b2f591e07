"""TransNormerLLM (arXiv 2307.14995) as the official OpenNLPLab checkpoints need it.

    x = embed_tokens(ids) * sqrt(d)            # unless no_scale_embedding
    x = layers(x)                              # L x (token mixer, channel mixer), pre-norm residual
    logits = lm_head(srmsnorm(x))              # lm_head tied to embed_tokens by default

Parameter names equal the official ones (`model.layers.{i}.token_mixer.qkvu_proj.weight`, ...), so an
official state dict loads strictly. Decay rates are fixed fp32 buffers, never parameters.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from tnllm.config import TNLConfig
from tnllm.layers import DecoderLayer, Lrpe, SimpleRMSNorm, norm_linear
from tnllm.linear import Linear, pack_linears_for_cpu
from tnllm.state import PackedSlotState, RecurrentState, SlotState


def alibi_slopes(n_heads: int) -> list[float]:
    """ALiBi head slopes: 2^(-8 (h+1) / H) for H a power of two; otherwise the slopes of the
    nearest lower power of two followed by every other slope of the doubled count (ALiBi's rule)."""
    def power_of_two(n: int) -> list[float]:
        return [2.0 ** (-8.0 * (h + 1) / n) for h in range(n)]

    if n_heads & (n_heads - 1) == 0:
        return power_of_two(n_heads)
    lower = 2 ** math.floor(math.log2(n_heads))
    return power_of_two(lower) + alibi_slopes(2 * lower)[0::2][: n_heads - lower]


def lightning_log_decay(n_heads: int, layer_idx: int, n_layers: int) -> torch.Tensor:
    """Per-head log decay [H] (fp32, <= 0) of one layer, exactly as the released checkpoints use it:

        rate[l, h] = slope[h] * (1 - l / (L - 1) + 1e-5),   lambda = exp(-rate)

    (docs/model.md#decay-rates). The paper writes exp(-(8h/H)(1 - l/L)); the code - and so the
    weights - use ALiBi slopes and L - 1: follow the code. Layer 0 decays most.
    """
    factor = 1.0 - layer_idx / (n_layers - 1) + 1e-5
    rates = torch.tensor(alibi_slopes(n_heads), dtype=torch.float64) * factor
    return (-rates).to(torch.float32)


class TransNormerModel(nn.Module):
    """The decoder body (official prefix `model.`): embeddings and layers."""

    def __init__(self, config: TNLConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.dim, padding_idx=config.pad_token_id)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.n_layers))
        self.final_norm = SimpleRMSNorm(config.norm_eps)


class TransNormerLLM(nn.Module):
    """Causal LM. `forward(input_ids [B, T], state=None, logits_to_keep=0) -> logits [B, T', V]`.

    With a `RecurrentState`, the call continues each sequence from it (any number of new tokens;
    one token takes the recurrent step) and advances the state in place. A `SlotState` does the same for
    the pool slots it names (row b continues slot `slots[b]`); a `PackedSlotState` reads decode tokens of several
    slots and a prompt chunk of one more slot from one row (logits at each segment's end).
    """

    def __init__(self, config: TNLConfig):
        super().__init__()
        self.config = config
        self.model = TransNormerModel(config)
        self.lm_head = Linear(config.dim, config.vocab_size, bias=False)
        self.tie_head()
        # Fixed decay rates: recomputed, never loaded or saved.
        self.register_buffer("log_decay", self._log_decay_table(), persistent=False)  # [L, H] fp32
        if self.lm_head.weight.device.type != "meta":
            self.init_weights()

    def _log_decay_table(self) -> torch.Tensor:
        c = self.config
        return torch.stack([lightning_log_decay(c.n_heads, i, c.n_layers) for i in range(c.n_layers)])

    def _apply(self, fn, recurse=True):
        # Recompute the decay table after every .to()/.half()/to_empty(): it must stay exact fp32
        # (a bf16 model would otherwise round it) and be real data after a meta-device build.
        # Re-tie lm_head too: to_empty() gives each module its own new parameter.
        super()._apply(fn, recurse)
        self.tie_head()
        self.log_decay = self._log_decay_table().to(self.lm_head.weight.device)
        return self

    def tie_head(self) -> None:
        """Share the embedding matrix with a float lm_head when the config ties them. A quantised head (8-bit
        weights, tnllm.quant) keeps its own copy and is left alone."""
        if self.config.tie_word_embeddings and self.lm_head.weight.is_floating_point():
            self.lm_head.weight = self.model.embed_tokens.weight

    @torch.no_grad()
    def init_weights(self) -> None:
        """Official init: normal(0, init_std) for every Linear/Embedding, zero biases and padding row."""
        std = self.config.init_std
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
            if isinstance(module, Lrpe):
                module.reset_parameters()
        pad = self.config.pad_token_id
        if pad is not None:
            self.model.embed_tokens.weight[pad].zero_()

    def allocate_state(self, batch_size: int = 1) -> RecurrentState:
        """A zero recurrent state for `batch_size` new sequences, each layer's kv on that layer's device."""
        layer_devices = [layer.token_mixer.out_proj.weight.device for layer in self.model.layers]
        return RecurrentState.allocate(self.config, batch_size, self.model.embed_tokens.weight.device, layer_devices)

    def pack_weights(self, refresh: bool = False) -> None:
        """Lay the weights out for inference on their device (outputs equal up to the matmul's rounding): on
        CUDA each channel mixer's l1 and l2 run as one product (`GLU.pack`: one matrix-vector product streams the
        weights faster than two); on the CPU every fp32 Linear gets a oneDNN copy of its weight
        (`Linear.pack_for_cpu`: 1.5-3x faster products at every row count, for twice the float weights' memory).
        Training, moving or reloading the model falls back to the plain products; a live pack is kept, unless
        `refresh` (after writing weights in place under inference_mode, which no version counter sees)."""
        pack_linears_for_cpu(self, refresh)
        for layer in self.model.layers:
            if layer.channel_mixer.l1.weight.device.type == "cuda":
                layer.channel_mixer.pack()

    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The ids' embedding rows [B, T, d]. Outside autograd a plain gather: for a decode step's few ids on CUDA,
        `nn.Embedding`'s index_select walks the ids one after another in each thread (13 us for 16 rows of a 1B
        step, against 2 for the gather). Under autograd the module, whose backward leaves the padding row alone;
        another embedding module (the tensor-parallel shard) looks its ids up itself."""
        embed = self.model.embed_tokens
        if type(embed) is not nn.Embedding or (torch.is_grad_enabled() and embed.weight.requires_grad):
            return embed(input_ids)  # a subclass's own lookup (a vocab-parallel shard), or autograd
        return embed.weight[input_ids]

    def num_parameters(self) -> int:
        """Parameter count with tied weights counted once."""
        return sum(p.numel() for p in self.parameters())

    def forward(
        self,
        input_ids: torch.Tensor,
        state: RecurrentState | SlotState | None = None,
        logits_to_keep: int = 0,
    ) -> torch.Tensor:
        """input_ids [B, T] -> logits [B, T, V] (only the last `logits_to_keep` positions if > 0)."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, T], got shape {tuple(input_ids.shape)}")
        B, T = input_ids.shape
        if state is not None and state.batch_size != B:
            raise ValueError(f"state holds {state.batch_size} sequences but input_ids has batch {B}")
        slots = getattr(state, "slots", None)
        packed = state if isinstance(state, PackedSlotState) else None
        if state is None:
            start = torch.zeros(B, dtype=torch.long, device=input_ids.device)
        else:
            start = state.positions if slots is None else state.positions[slots]
        if packed is None:
            positions = start[:, None] + torch.arange(T, device=input_ids.device)  # [B, T], absolute (LRPE)
            advance = T
        else:  # one row: n_decode single tokens, then a chunk
            positions, advance = packed.layout(start, T)
        n_decode = None if packed is None else packed.n_decode

        x = self._embed(input_ids) * self.config.embed_scale  # [B, T, d]
        # the residual stream is x + delta: each layer's last add is fused into the next norm (or, where a layer
        # defers its norms, x alone with its rows' mean squares ms)
        delta = ms = None
        for i, layer in enumerate(self.model.layers):
            kv = None if state is None else state.kv[i]
            x, delta, ms = layer(x, self.log_decay[i], positions, kv, slots, delta=delta, n_decode=n_decode, ms=ms)
        if slots is not None:
            state.positions.index_copy_(0, slots, start + advance)
        elif state is not None:
            state.positions += T
        if packed is not None:
            x, delta = packed.segment_ends(x), packed.segment_ends(delta)  # [1, n_decode + 1, d]
        elif logits_to_keep > 0:
            x = x[:, -logits_to_keep:]
            delta = None if delta is None else delta[:, -logits_to_keep:]
        # the last layer's residual add and the final norm (in the lm_head's kernel where it takes them)
        return norm_linear(self.model.final_norm, self.lm_head, x, delta)[1]


def random_model(preset: str, *, seed: int = 0, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, **overrides) -> TransNormerLLM:
    """A `TNLConfig` preset (`overrides` as in `TNLConfig.from_name`) with random weights, in eval mode: what the
    app, the CLI and the benchmarks run when given `preset:NAME` instead of a checkpoint.

    The weights are drawn under `seed` without touching the caller's random streams, so one seed gives one model
    whatever ran before. They are drawn on `device` (a 7B preset never passes through host memory), from that
    device's generator: a CUDA model differs from the CPU one of the same seed."""
    device = torch.device(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), device:
        torch.manual_seed(seed)
        model = TransNormerLLM(TNLConfig.from_name(preset, **overrides))
    return model.to(dtype).eval()
