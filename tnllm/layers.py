"""TransNormerLLM blocks, named and shaped as the official checkpoints.

Formulas and names: docs/model.md#token-mixer and #checkpoint-format.

Notation: B batch, T time, H heads, dh head dim, d model width, hd token-mixer width (= H * dh),
g GLU width. Attention works in the kernel layout [B, T, H, D] (D = dh, or 2 * dh after LRPE).

    x = x + token_mixer(srmsnorm(x))     # gated linear attention with fixed per-head decay
    x = x + channel_mixer(srmsnorm(x))   # SGLU: l3(l1(x) * l2(x)), no activation

Decode state never lives on a module: the caller passes the layer's fp32 kv tensor and positions.

Decode launches few kernels (docs/kernels.md#fused-decode-ops): every residual add is fused with the norm after
it (`SimpleRMSNorm.add_norm`; a block hands its last add to the next norm, see `DecoderLayer`), the gate with the
token mixer's norm (`SimpleRMSNorm.gated`), and the q/k activation with the recurrent step. Where
`kernels.fuses_prologue` says the product after one of these ops should take it (decode rows on the GPU; which
ops and weights: `kernels.FUSED_PROLOGUES`, `PROLOGUE_WEIGHTS`), the op runs inside that product's kernel instead
(`norm_linear`, `gated_linear`, `GLU.from_packed`).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from tnllm import kernels
from tnllm.config import TNLConfig
from tnllm.linear import Linear


class SimpleRMSNorm(nn.Module):
    """SRMSNorm: x * rsqrt(mean(x^2) + eps) over the last dim, fp32 inside, no learnable gain."""

    def __init__(self, eps: float = 1e-6):
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.srmsnorm(x, self.eps)

    def add_norm(self, x: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + delta, self(x + delta)): a residual add and this norm, one kernel on the GPU."""
        return kernels.add_srmsnorm(x, delta, self.eps)

    def gated(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """gate * self(x), one kernel on the GPU (rounded once, so 16-bit results may differ by rounding)."""
        return kernels.gated_srmsnorm(x, gate, self.eps)


def takes_prologue(linear: nn.Module, x: torch.Tensor, prologue: str, other: torch.Tensor | None = None) -> bool:
    """Whether `linear` runs the op before it inside its product for input x: a module that offers it
    (TAKES_PROLOGUE and `prologue_forward`: tnllm's `Linear` and `Int8Linear`; tensor-parallel and bitsandbytes
    layers do not) where `kernels.fuses_prologue` allows."""
    return getattr(linear, "TAKES_PROLOGUE", False) and kernels.fuses_prologue(x, linear.weight, prologue, other)


def norm_linear(norm: nn.Module, linear: nn.Module, x: torch.Tensor,
                delta: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + delta, linear(norm(x + delta))), or (x, linear(norm(x))) when delta is None: the stream and the
    product of its norm, in one kernel where the product takes the norm (`takes_prologue`)."""
    prologue = "norm" if delta is None else "add_norm"
    if type(norm) is SimpleRMSNorm and takes_prologue(linear, x, prologue, delta):
        fused = linear.prologue_forward(x, prologue, delta, norm.eps)
        return (x, fused) if delta is None else fused
    if delta is None:
        return x, linear(norm(x))
    x, h = norm.add_norm(x, delta)
    return x, linear(h)


def gated_linear(norm: nn.Module, linear: nn.Module, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """linear(norm.gated(x, gate)), in one kernel where the product takes the gated norm (`takes_prologue`)."""
    if type(norm) is SimpleRMSNorm and takes_prologue(linear, x, "gated_norm", gate):
        return linear.prologue_forward(x, "gated_norm", gate, norm.eps)
    return linear(norm.gated(x, gate))


PACKED_TENSORS = ("weight", "scales", "bias")  # what `GLU.pack` joins: float Linears' and 8-bit ones' tensors


class GLU(nn.Module):
    """Channel mixer ("SGLU" in the paper): l3(l1(x) * l2(x)); the released models use no activation."""

    def __init__(self, dim: int, glu_dim: int, bias: bool):
        super().__init__()
        self.l1 = Linear(dim, glu_dim, bias=bias)
        self.l2 = Linear(dim, glu_dim, bias=bias)
        self.l3 = Linear(glu_dim, dim, bias=bias)
        object.__setattr__(self, "_l12", None)  # `pack`'s module of l1 and l2 (not a submodule)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        packed = self._packed()
        if packed is None:
            return self.l3(self.l1(x) * self.l2(x))
        return self.from_packed(packed(x))

    def from_packed(self, y12: torch.Tensor) -> torch.Tensor:
        """l3(l1(x) * l2(x)) from the packed product y12 = (l1|l2)(x) [..., 2g]; the product of the halves runs
        inside l3's kernel where l3 takes it (`takes_prologue`)."""
        first, second = y12.chunk(2, dim=-1)  # each [..., g]: strided views
        if takes_prologue(self.l3, first, "mul", second):
            return self.l3.prologue_forward(first, "mul", second)
        return self.l3(kernels.glu_mul(y12))  # [..., 2g] -> l1(x) * l2(x) [..., g]

    @torch.no_grad()
    def pack(self) -> None:
        """Put l1's and l2's tensors in one module of their type with twice the outputs, l1 first, so that forward
        reads x once and runs one product for both (at decode, one larger matrix-vector product streams its
        weights faster than two). Serves float Linears and 8-bit ones alike (`weight`, `scales`, `bias`). l1 and
        l2 keep their tensors, now views into the packed ones: loading a state dict fills them, saving sees them
        as before. Moving or converting the module, replacing l1 or l2, or a forward that autograd records
        (training) unpacks: the two products again. Modules whose parameters are subclasses are left alone:
        such a parameter carries state of its own (bitsandbytes' Int8Params holds its int8 rows and scales as
        attributes), which a concatenation would drop."""
        l1, l2 = self.l1, self.l2
        if self._live_pack() is not None or type(l1) is not type(l2) or not hasattr(l1, "out_features"):
            return  # packed already (another engine on this model), or nothing to pack
        if any(type(p) is not nn.Parameter for p in [*l1.parameters(), *l2.parameters()]):
            return
        g = l1.out_features
        packed = copy.copy(l1)  # same class and settings; its own tensor tables below
        packed._parameters, packed._buffers = dict(l1._parameters), dict(l1._buffers)
        packed.out_features = 2 * g
        for name in PACKED_TENSORS:
            first, second = getattr(l1, name, None), getattr(l2, name, None)
            if first is None:
                continue
            both = torch.cat([first, second])  # [2g, ...]
            if isinstance(first, nn.Parameter):
                setattr(packed, name, nn.Parameter(both, requires_grad=first.requires_grad))
                first.data, second.data = both[:g], both[g:]
            else:
                setattr(packed, name, both)
                setattr(l1, name, both[:g])
                setattr(l2, name, both[g:])
        object.__setattr__(self, "_l12", packed)  # not a submodule: never saved, loaded or moved

    def _live_pack(self) -> nn.Module | None:
        """`pack`'s module while l1 and l2 still live in its tensors, else None (and a stale one is let go)."""
        packed = self._l12
        if packed is None:
            return None
        l1, l2, g = self.l1, self.l2, self.l1.out_features
        live = type(l1) is type(l2) is type(packed) and all(
            getattr(l1, name) is None or (getattr(l1, name).data_ptr() == getattr(packed, name).data_ptr()
                                          and getattr(l2, name).data_ptr() == getattr(packed, name)[g:].data_ptr())
            for name in PACKED_TENSORS if hasattr(l1, name))
        if not live:
            object.__setattr__(self, "_l12", None)  # l1 or l2 moved or was replaced: let the stale tensors go
            return None
        return packed

    def _packed(self) -> nn.Module | None:
        """The live pack when autograd does not record through l1 (gradients must reach l1 and l2 themselves)."""
        if torch.is_grad_enabled() and self.l1.weight.requires_grad:
            return None
        return self._live_pack()


class Lrpe(nn.Module):
    """Linearized relative positional encoding, concat form: [x cos(theta t), x sin(theta t)].

    Not RoPE: the cos and sin halves are concatenated (feature dim doubles), so
    LRPE(q_s) . LRPE(k_t) = sum_j q_sj k_tj cos(theta_j (s - t)) depends only on s - t.
    Positions and angles are fp32 (upstream computes them in bf16, which is inexact past 256).
    """

    def __init__(self, n_heads: int, head_dim: int):
        super().__init__()
        self.theta = nn.Parameter(torch.empty(n_heads, 1, head_dim))  # learned; loaded from checkpoints

    @torch.no_grad()
    def reset_parameters(self) -> None:
        n_heads, _, head_dim = self.theta.shape
        d = n_heads * head_dim
        freqs = 10000.0 ** (-2.0 / d * torch.arange(d, dtype=torch.float32))
        self.theta.copy_(freqs.view(n_heads, 1, head_dim))

    def forward(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q, k [B, T, H, dh], positions [B, T] (absolute, int) -> both [B, T, H, 2 * dh] in their dtype
        (one cos/sin evaluation serves both)."""
        theta = self.theta.squeeze(1)  # [H, dh]
        features = kernels.reference.lrpe_features((q, k), theta, positions.to(theta.device), torch.float32)
        return tuple(f.to(x.dtype) for f, x in zip(features, (q, k)))


class NormLinearAttention(nn.Module):
    """Token mixer ("gated linear attention"): one fused q|k|v|u projection, decay attention,
    one SRMSNorm over all hd channels, raw linear gate u (no sigmoid), output projection."""

    def __init__(self, config: TNLConfig, use_lrpe: bool):
        super().__init__()
        self.n_heads = config.n_heads
        self.head_dim = config.head_dim
        self.qkvu_proj = Linear(config.dim, 4 * config.hidden_dim, bias=config.bias)
        self.out_proj = Linear(config.hidden_dim, config.dim, bias=config.bias)
        self.lrpe = Lrpe(config.n_heads, config.head_dim) if use_lrpe else None
        self.act = config.act  # a key of kernels.ACTIVATIONS
        self.norm = SimpleRMSNorm(config.norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        log_decay: torch.Tensor,
        positions: torch.Tensor,
        kv: torch.Tensor | None = None,
        slots: torch.Tensor | None = None,
        n_decode: int | None = None,
    ) -> torch.Tensor:
        """x [B, T, d]; log_decay [H] fp32; positions [B, T]; kv [B, H, dk, dh] fp32 or None.

        With `kv`, attention continues from it and writes the new state back into it in place. With `slots`
        (int64 [B]), `kv` is a pool [S, H, dk, dh] and row b continues slot slots[b]. With `n_decode`, x is one
        packed row (`PackedSlotState`): tokens t < n_decode are decode tokens of slots[t], the rest a chunk of
        slots[n_decode].
        """
        return self.mix(self.qkvu_proj(x), log_decay, positions, kv, slots, n_decode)

    def mix(self, qkvu: torch.Tensor, log_decay: torch.Tensor, positions: torch.Tensor,
            kv: torch.Tensor | None = None, slots: torch.Tensor | None = None,
            n_decode: int | None = None) -> torch.Tensor:
        """`forward` from the projected input qkvu = qkvu_proj(x) [B, T, 4 hd]."""
        o, u = self.attend(qkvu, log_decay, positions, kv, slots, n_decode)
        return gated_linear(self.norm, self.out_proj, o, u)  # out_proj(u * norm(o)), o [B, T, hd]: all heads

    def attend(self, qkvu: torch.Tensor, log_decay: torch.Tensor, positions: torch.Tensor,
               kv: torch.Tensor | None = None, slots: torch.Tensor | None = None, n_decode: int | None = None,
               row_ms: torch.Tensor | None = None, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
        """(o, u), each [B, T, hd]: the attention output and the gate, out_proj's inputs. row_ms [T', B] (decode
        steps only): qkvu was projected from the unnormed stream, and the step scales q, k, v by that norm (scale
        from row_ms and its eps; `DecoderLayer`'s deferred norms; u stays unscaled, for the caller)."""
        B, T, _ = qkvu.shape
        q, k, v, u = qkvu.chunk(4, dim=-1)  # each [B, T, hd]: strided views of one output
        q, k, v = (t.view(B, T, self.n_heads, self.head_dim) for t in (q, k, v))  # [B, T, H, dh]
        if n_decode is not None:
            o = self._packed(q, k, v, log_decay, positions, kv, slots, n_decode)
        elif kv is not None and T == 1:
            o = self._step(q, k, v, log_decay, positions, kv, slots, row_ms, eps)
        else:
            o = self._prefill(q, k, v, log_decay, positions, kv, slots)
        return o.reshape(B, T, -1), u

    def _features(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q, k [B, T, H, dh] as attention sees them: activated, then LRPE ([B, T, H, 2*dh]) on LRPE layers."""
        act = kernels.ACTIVATIONS[self.act]
        q, k = act(q), act(k)
        return (q, k) if self.lrpe is None else self.lrpe(q, k, positions)

    def _step(self, q, k, v, log_decay, positions, kv, slots, row_ms=None, eps=1e-6) -> torch.Tensor:
        """One decode token: q, k, v [B, 1, H, dh] -> o [B, 1, H, dh]. The step applies the activation (after
        row_ms's norm scale) and an LRPE layer's features (positions [B, 1]) to the raw q, k itself."""
        lrpe = None if self.lrpe is None else (self.lrpe.theta[:, 0], positions[:, 0])  # [H, dh], [B]
        return kernels.lightning_attn_step(q[:, 0], k[:, 0], v[:, 0], log_decay, kv, slots, act=self.act,
                                           row_ms=row_ms, eps=eps, lrpe=lrpe)[:, None]

    def _packed(self, q, k, v, log_decay, positions, kv, slots, n_decode) -> torch.Tensor:
        """One packed row, q, k, v [1, T, H, dh]: the first n_decode tokens take the step (one per slot), the
        rest continue slot slots[n_decode] as a chunk -> o [1, T, H, dh]."""
        n = n_decode
        step = (t[0, :n, None] for t in (q, k, v))  # each [n, 1, H, dh]: token t as batch row t
        o_step = self._step(*step, log_decay, positions[0, :n, None], kv, slots[:n])  # [n, 1, H, dh]
        chunk = (t[:, n:] for t in (q, k, v))  # each [1, C, H, dh]
        o_chunk = self._prefill(*chunk, log_decay, positions[:, n:], kv, slots[n:])  # [1, C, H, dh]
        return torch.cat([o_step.transpose(0, 1), o_chunk], dim=1)  # [1, n + C, H, dh]

    def _prefill(self, q, k, v, log_decay, positions, kv, slots) -> torch.Tensor:
        """Any number of tokens, q, k, v [B, T, H, dh] -> o [B, T, H, dh]; continues `kv` (and updates it) if given."""
        q, k = self._features(q, k, positions)
        if kv is None:
            return kernels.lightning_attn(q, k, v, log_decay)[0]
        initial = kv if slots is None else kv.index_select(0, slots)  # [B, H, dk, dh]
        o, final = kernels.lightning_attn(q, k, v, log_decay, initial_state=initial, output_final_state=True)
        if slots is None:
            kv.copy_(final)
        else:
            kv.index_copy_(0, slots, final)
        return o


class DecoderLayer(nn.Module):
    """Pre-norm residual block: token mixer then channel mixer.

    The residual stream travels as a pair (x, delta) whose sum it is: a block leaves its last residual add to the
    next norm (the next block's token norm, or the model's final norm), which fuses it (`SimpleRMSNorm.add_norm`).
    Where the block defers its norms (`defers_norms`), out_proj and l3 add the residual themselves and the stream
    travels summed, as (x, ms) with ms [T, rows] its rows' partial mean squares: the next norm's scale, which the
    products after it apply (docs/kernels.md#deferred-norms).
    """

    def __init__(self, config: TNLConfig, layer_idx: int):
        super().__init__()
        self.token_norm = SimpleRMSNorm(config.norm_eps)
        self.token_mixer = NormLinearAttention(config, use_lrpe=bool(config.lrpe_layers[layer_idx]))
        self.channel_norm = SimpleRMSNorm(config.norm_eps)
        self.channel_mixer = GLU(config.dim, config.glu_dim, config.bias)

    def forward(self, x, log_decay, positions, kv=None, slots=None, delta=None, n_decode=None, ms=None):
        """The stream x + delta [B, T, d] (delta None: x alone; ms: x's partial mean squares, with delta None) ->
        the block's output as (x', delta', ms'): x' + delta' (ms' None), or x' with its mean squares ms' (delta'
        None) where the block defers its norms.

        log_decay, positions, kv, slots, n_decode: as NormLinearAttention.
        """
        mixer, glu = self.token_mixer, self.channel_mixer
        packed = glu._packed()
        if not self.defers_norms(x, kv, n_decode, packed):
            x, qkvu = norm_linear(self.token_norm, mixer.qkvu_proj, x, delta)  # delta: the previous block's last add
            o = mixer.mix(qkvu, log_decay, positions, kv, slots, n_decode)
            if packed is None:
                x, h = self.channel_norm.add_norm(x, o)
                return x, glu(h), None
            x, y12 = norm_linear(self.channel_norm, packed, x, o)
            return x, glu.from_packed(y12), None
        if ms is None:  # the stream arrived without its mean squares: this block's token norm runs as a kernel
            x, qkvu = norm_linear(self.token_norm, mixer.qkvu_proj, x, delta)
        else:
            qkvu = mixer.qkvu_proj(x)  # of the unnormed stream: the step scales q, k, v, out_proj the gate
        o, u = mixer.attend(qkvu, log_decay, positions, kv, slots, row_ms=ms, eps=self.token_norm.eps)
        x, ms = mixer.out_proj.prologue_forward(o, "gated_norm", u, mixer.norm.eps, row_ms=ms, residual=x)
        first, second = packed(x).chunk(2, dim=-1)  # l1(x), l2(x) of the unnormed stream: [B, T, g] views
        x, ms = glu.l3.prologue_forward(first, "mul", second, self.channel_norm.eps, row_ms=ms, row_power=2,
                                        residual=x)  # the channel norm's scale, once through l1 and once through l2
        return x, None, ms

    def defers_norms(self, x: torch.Tensor, kv: torch.Tensor | None, n_decode: int | None,
                     packed: nn.Module | None) -> bool:
        """Whether this block leaves its norms to the products after them (decode steps of one token per sequence
        where out_proj takes the gated norm and l3 the GLU product in-kernel, `takes_prologue`; l1 and l2 packed; no
        bias on q|k|v|u, l1 or l2, whose outputs the norm's scale multiplies; SimpleRMSNorms of one eps;
        `kernels.DEFERRED_NORMS`; an LRPE layer's step scales q and k before its features):
        out_proj and l3 then add the residual and write the stream's mean squares, the step and out_proj apply
        the token norm's scale, l3 the channel norm's, and no norm kernel runs."""
        mixer, norms = self.token_mixer, (self.token_norm, self.channel_norm, self.token_mixer.norm)
        return (kernels.DEFERRED_NORMS and kv is not None and n_decode is None and x.shape[1] == 1
                and packed is not None and mixer.qkvu_proj.bias is None and packed.bias is None
                and all(type(n) is SimpleRMSNorm and n.eps == self.token_norm.eps for n in norms)
                and takes_prologue(mixer.out_proj, x, "gated_norm") and takes_prologue(self.channel_mixer.l3, x, "mul"))
