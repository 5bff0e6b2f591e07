"""tnllm: TransNormerLLM with Lightning Attention and constant-memory recurrent decoding.

Public API:
    load_model(path_or_repo_id, dtype="fp32", device="cpu") -> TransNormerLLM
    load_tokenizer(path_or_repo_id) -> Tokenizer
    model(input_ids [B, T], state=None, logits_to_keep=0) -> logits [B, T, vocab]
    model.allocate_state(batch_size) -> RecurrentState
"""

from tnllm.checkpoint import CheckpointError, load_model, save_model
from tnllm.config import TNLConfig
from tnllm.model import TransNormerLLM, lightning_log_decay
from tnllm.state import RecurrentState
from tnllm.tokenizer import Tokenizer, load_tokenizer

__all__ = [
    "CheckpointError",
    "RecurrentState",
    "TNLConfig",
    "Tokenizer",
    "TransNormerLLM",
    "lightning_log_decay",
    "load_model",
    "load_tokenizer",
    "save_model",
]
