"""SentencePiece tokenizer for TransNormerLLM and the official SFT chat format.

Loads the official Baichuan-style `tokenizer.model` (<unk>=0, <s>=1, </s>=2, no BOS added) or our own.
User text is encoded as plain text: SentencePiece never maps text to control pieces, and `encode`
verifies it, so a user typing "</s>" or "<s>" cannot forge control tokens. Control ids (eos) are
inserted as integers by the chat formatter.

Chat format: `tnllm.data` (official fine-tune/train.py; multi-turn repeats the block):
    Human:\\n{user}\\nAssistant:\\n{reply}</s>Human:\\n{user}\\nAssistant:\\n ...
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

import sentencepiece as spm

from tnllm.checkpoint import resolve
from tnllm.data import HUMAN, encode_dialogue
from tnllm.paths import ASSETS

TOKENIZER_FILE = "tokenizer.model"
# The bundled checkpoints (assets/tnl, assets/llama) share one tokenizer, kept next to them in assets/.
BUNDLED_TOKENIZER = ASSETS / TOKENIZER_FILE

log = logging.getLogger(__name__)


class Tokenizer:
    """Thin wrapper over a SentencePiece model with safe encoding and the chat prompt format."""

    def __init__(self, model_file: str | Path):
        self.path = Path(model_file)
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(str(self.path))
        except (OSError, RuntimeError) as exc:
            raise ValueError(f"cannot load SentencePiece model {self.path}: {exc}") from exc
        self.control_ids = frozenset(i for i in range(self.sp.GetPieceSize()) if self.sp.IsControl(i))
        self._piece_texts: dict[int, str | None] = {}  # `piece_text`'s answers, filled as ids come up
        self._anchor: tuple[int, str] | None = None    # a plain piece and its text, the left context of those answers

    @property
    def vocab_size(self) -> int:
        return self.sp.GetPieceSize()

    @property
    def bos_id(self) -> int:
        return self.sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self.sp.eos_id()

    @property
    def unk_id(self) -> int:
        return self.sp.unk_id()

    def encode(self, text: str) -> list[int]:
        """Plain-text ids (no BOS/EOS); raises if any control id appeared (defence in depth)."""
        if not isinstance(text, str):
            raise TypeError(f"text must be str, got {type(text).__name__}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ValueError(f"text is not valid Unicode ({exc.reason} at position {exc.start})") from None
        ids = self.sp.EncodeAsIds(text)
        if self.control_ids.intersection(ids):
            raise ValueError("text encoded to a control token; refusing (special-token injection)")
        return ids

    def piece_text(self, token_id: int) -> str | None:
        """The text a plain piece adds after any text already decoded (its leading space included), or None for
        control, unknown and byte pieces and ids outside the vocabulary: their text is empty, a placeholder, or
        depends on their neighbours (byte fallback). An incremental detokenizer (`tnllm.streaming`) uses it to skip
        re-decoding a window for most tokens; computed once per id, by decoding it after a fixed plain piece."""
        if token_id in self._piece_texts:
            return self._piece_texts[token_id]
        sp, text = self.sp, None

        def plain(i: int) -> bool:
            return not (sp.IsControl(i) or sp.IsUnknown(i) or sp.IsByte(i))

        if 0 <= token_id < sp.GetPieceSize() and plain(token_id):
            if self._anchor is None:
                anchor = next(i for i in range(sp.GetPieceSize()) if plain(i) and not sp.IsUnused(i))
                self._anchor = anchor, sp.DecodeIds([anchor])
            anchor, anchor_text = self._anchor
            text = sp.DecodeIds([anchor, token_id])[len(anchor_text):]
        self._piece_texts[token_id] = text
        return text

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.DecodeIds(list(ids))

    def id_to_piece(self, token_id: int) -> str:
        return self.sp.IdToPiece(token_id)

    def chat_ids(self, turns: list[tuple[str, str]], add_generation_prompt: bool = True) -> list[int]:
        """Ids of a conversation: `turns` is [(role, text)] with role "human" or "assistant".

        Rendered by `tnllm.data.encode_dialogue`, exactly as the bundled model was trained: markers and
        texts encoded separately, eos inserted as an id after each assistant turn. With
        `add_generation_prompt`, the conversation must end on a human turn (the model answers next).
        """
        if add_generation_prompt and (not turns or turns[-1][0] != HUMAN):
            raise ValueError("add_generation_prompt needs the conversation to end with a human turn")
        ids, _ = encode_dialogue([{"role": r, "text": t} for r, t in turns], self.encode, self.eos_id)
        return ids


def load_tokenizer(path_or_repo_id: str | Path, *, revision: str | None = None) -> Tokenizer:
    """Tokenizer from a `tokenizer.model` file, a directory holding one, or a Hub repo id."""
    path = Path(path_or_repo_id).expanduser()
    if path.is_file():
        return Tokenizer(path)
    directory = resolve(path_or_repo_id, revision=revision, files=(TOKENIZER_FILE,))
    if not (directory / TOKENIZER_FILE).is_file():
        raise FileNotFoundError(f"{directory / TOKENIZER_FILE} not found")
    return Tokenizer(directory / TOKENIZER_FILE)


def tokenizer_for(checkpoint: str | Path) -> Tokenizer:
    """The tokenizer of `checkpoint` (a directory or Hub repo id), as the app and `python -m tnllm` pick it.

    The checkpoint's own tokenizer.model; assets/tokenizer.model when it has none (silently for the bundled
    checkpoints in assets/, with a warning otherwise: the caller's vocabulary check then decides whether it
    fits). A tokenizer file that is there but unreadable is an error, never replaced.
    """
    path = Path(checkpoint).expanduser()
    if (path / TOKENIZER_FILE).is_file():
        return Tokenizer(path / TOKENIZER_FILE)
    if path.is_dir() and path.resolve().parent == ASSETS:
        return Tokenizer(BUNDLED_TOKENIZER)
    try:
        return load_tokenizer(checkpoint)
    except FileNotFoundError as exc:
        log.warning("no tokenizer with %s (%s): using %s", checkpoint, exc, BUNDLED_TOKENIZER)
        return Tokenizer(BUNDLED_TOKENIZER)
