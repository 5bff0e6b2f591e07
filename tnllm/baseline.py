"""The Transformer baseline of the latency comparison: transformers' own `LlamaForCausalLM`.

The baseline is the implementation users would actually pick, not one we wrote
(docs/benchmarks.md#transformer-baseline), sized like the TNL model it is compared with: same width, depth,
heads and head dim, vocabulary, GLU width (as `intermediate_size`), tied embeddings and precision. What
differs is the point of the comparison: softmax attention with a KV cache that grows with the context, against
TNL's constant recurrent state.

Parameter count of the matched Llama (d width, hd = H * dh attention width, g GLU width, V vocab, L layers):
    V*d (tied embedding) + L * (4*d*hd + 3*d*g + 2*d) + d
TNL has 5*d*hd per layer (fused q|k|v|u + out) and weight-free norms, so it is a little larger.

Weights are random (tests, benchmarks: latency does not depend on them) or read from a local directory
holding `config.json` + safetensors; nothing is ever downloaded.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tnllm.checkpoint import parse_dtype
from tnllm.config import TNLConfig


def llama_config_for(config: TNLConfig, *, max_position_embeddings: int = 32768,
                     dtype: torch.dtype | str = "fp32") -> LlamaConfig:
    """A `LlamaConfig` matching `config`: d, L, H (MHA, head_dim = dh), V, glu_dim, tied embeddings, dtype.

    `max_position_embeddings` does not limit default RoPE; keep it above the longest context benchmarked
    so that the config states the range the model is used on.
    """
    return LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.dim,
        intermediate_size=config.glu_dim,
        num_hidden_layers=config.n_layers,
        num_attention_heads=config.n_heads,
        num_key_value_heads=config.n_heads,  # plain MHA, like TNL: KV cache = 2 * L * H * dh values per token
        head_dim=config.head_dim,
        hidden_act="silu",
        max_position_embeddings=max_position_embeddings,
        initializer_range=config.init_std,
        rms_norm_eps=config.norm_eps,
        tie_word_embeddings=config.tie_word_embeddings,
        attention_bias=config.bias,
        mlp_bias=config.bias,
        pad_token_id=config.pad_token_id,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        dtype=parse_dtype(dtype),
    )


def build_llama(config: TNLConfig | LlamaConfig, *, dtype: torch.dtype | str = "fp32",
                device: torch.device | str = "cpu", seed: int = 0) -> LlamaForCausalLM:
    """A randomly initialised Llama (matched to a `TNLConfig`, or from a `LlamaConfig`), in eval mode.

    Initialised under `seed` without disturbing the caller's RNG, so a benchmark's two models and inputs
    stay reproducible whatever order they are built in. The weights are drawn on `device` (a 7B model never
    passes through host memory), from that device's generator.
    """
    dtype, device = parse_dtype(dtype), torch.device(device)
    llama_config = llama_config_for(config, dtype=dtype) if isinstance(config, TNLConfig) else config
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), device:
        torch.manual_seed(seed)
        model = LlamaForCausalLM(llama_config)
    return model.to(device=device, dtype=dtype).eval()


def load_llama(path: str | Path, *, dtype: torch.dtype | str = "fp32",
               device: torch.device | str = "cpu") -> LlamaForCausalLM:
    """A Llama from a local directory (`config.json` + safetensors weights), in eval mode; never downloads."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a local Llama checkpoint directory (no config.json)")
    model = LlamaForCausalLM.from_pretrained(path, dtype=parse_dtype(dtype), local_files_only=True,
                                             use_safetensors=True)
    return model.to(device).eval()
