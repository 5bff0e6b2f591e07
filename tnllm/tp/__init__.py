"""Tensor-parallel TransNormerLLM on torch.distributed (one process per GPU, launched by torchrun).

    tp = init_tp()                                   # NCCL on CUDA (NVLS off), gloo on CPU
    model = load_tp_model("DIR", tp, dtype="bf16")   # each rank reads only its slices
    logits = model(ids, model.allocate_state(1))     # same call as TransNormerLLM; state = own heads

Rank 0 drives generation, the others follow (`tnllm.tp.serve`); `python -m tnllm.tp` is a chat CLI.
"""

from tnllm.tp.comm import TPGroup, init_tp, shard_range
from tnllm.tp.load import load_tp_model, load_tp_weights, shard_from_model, shard_spec
from tnllm.tp.model import TPTransNormerLLM, empty_tp_model, local_config

__all__ = ["TPGroup", "TPTransNormerLLM", "empty_tp_model", "init_tp", "load_tp_model", "load_tp_weights",
           "local_config", "shard_from_model", "shard_range", "shard_spec"]
