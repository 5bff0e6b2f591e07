"""Chat data: conversation cleaning, the train/val split, and the SFT prompt format.

Format (docs/model.md#tokenizer-and-chat-format, official ``fine-tune/train.py``): each exchange is
``Human:\\n{human}\\nAssistant:\\n`` (prompt, label -100) followed by ``{assistant}`` + eos (target).
Multi-turn dialogues repeat the block with nothing in between; no BOS (upstream ``add_bos_token: false``).
The eos is a token id, never the text "</s>": ``render_dialogue`` marks it with ``Segment.is_eos`` and
``encode_dialogue`` inserts the integer id, so user text can never forge a control token
(docs/reliability.md#special-token-injection). A dialogue ending with a human turn renders to a prompt that
ends in ``Assistant:\\n``: the generation prompt of the chat demo.

Pure Python (no torch, no sentencepiece): the tokenizer is passed in as an ``encode`` callable.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

HUMAN, ASSISTANT = "human", "assistant"
HUMAN_PREFIX = "Human:\n"
ASSISTANT_PREFIX = "\nAssistant:\n"
IGNORE_INDEX = -100  # label of prompt tokens (PyTorch cross-entropy ignore_index)

_WS = re.compile(r"\s+")


@dataclass(frozen=True)
class Segment:
    """A piece of a rendered dialogue: text to encode, or (``is_eos``) the eos token id."""

    text: str
    is_target: bool
    is_eos: bool = False


def normalize_text(text: str) -> str:
    """Collapse every whitespace run (incl. newlines/tabs) to one space and strip the ends."""
    return _WS.sub(" ", text).strip()


def chitchat_to_turns(messages: Sequence[Sequence[dict]]) -> list[dict]:
    """Turn one chitchat-dataset conversation into alternating human/assistant turns.

    ``messages`` is the dataset's list of message groups, each a list of ``{text, sender, ...}``.
    The first sender becomes the human, the other the assistant. Messages are whitespace-normalised and
    empty ones dropped; consecutive messages by the same sender (also across a group that became empty)
    are joined with a newline. A trailing human turn (no reply to learn) is dropped, so the result is
    either empty or ends with an assistant turn.
    """
    turns: list[dict] = []
    human_sender = None
    for group in messages:
        for msg in group:
            text = normalize_text(msg["text"])
            if not text:
                continue
            if human_sender is None:
                human_sender = msg["sender"]
            role = HUMAN if msg["sender"] == human_sender else ASSISTANT
            if turns and turns[-1]["role"] == role:
                turns[-1]["text"] += "\n" + text
            else:
                turns.append({"role": role, "text": text})
    if turns and turns[-1]["role"] == HUMAN:
        turns.pop()
    return turns


def split_of(conv_id: str, val_fraction: float = 0.05) -> str:
    """Fixed split: "val" if the SHA-256 of the conversation id falls in the first ``val_fraction``, else "train".

    Depends only on the id (not on order, Python's hash seed, or the dataset size), so the held-out set
    never changes when the data is regenerated.
    """
    h = int.from_bytes(hashlib.sha256(conv_id.encode("utf-8")).digest()[:8], "big")
    return "val" if h < val_fraction * 2**64 else "train"


def render_dialogue(turns: Sequence[dict]) -> list[Segment]:
    """Render turns in the official SFT format as segments (prompt text, target text, eos markers).

    Turns must alternate starting with a human turn. Markers and message texts are separate segments so
    that user text is encoded on its own (identical tokens at training time and in the demo).
    """
    segments: list[Segment] = []
    for i, turn in enumerate(turns):
        expected = HUMAN if i % 2 == 0 else ASSISTANT
        if turn["role"] != expected:
            raise ValueError(f"turn {i} has role {turn['role']!r}, expected {expected!r}")
        if expected == HUMAN:
            segments += [Segment(HUMAN_PREFIX, False), Segment(turn["text"], False), Segment(ASSISTANT_PREFIX, False)]
        else:
            segments += [Segment(turn["text"], True), Segment("", True, is_eos=True)]
    return segments


def segments_to_text(segments: Sequence[Segment], eos_text: str = "</s>") -> str:
    """Readable string of a rendered dialogue (for display and tests only; never tokenize this)."""
    return "".join(eos_text if s.is_eos else s.text for s in segments)


def encode_dialogue(
    turns: Sequence[dict], encode: Callable[[str], list[int]], eos_id: int, max_len: int | None = None
) -> tuple[list[int], list[int]]:
    """Token ids and labels of a dialogue; prompt positions get ``IGNORE_INDEX``.

    Args:
        turns: alternating human/assistant turns (see ``render_dialogue``).
        encode: text → ids with special-token parsing off (SentencePiece ``encode`` never emits control ids).
        eos_id: id appended after every assistant turn.
        max_len: optional right truncation.
    Returns:
        (ids, labels), equal length; labels[i] == ids[i] on targets (incl. eos), else IGNORE_INDEX.
    """
    ids: list[int] = []
    labels: list[int] = []
    for seg in render_dialogue(turns):
        piece = [eos_id] if seg.is_eos else (encode(seg.text) if seg.text else [])
        ids += piece
        labels += piece if seg.is_target else [IGNORE_INDEX] * len(piece)
    if max_len is not None:
        ids, labels = ids[:max_len], labels[:max_len]
    return ids, labels
