"""Incremental detokenizer: token ids in, printable text pieces out.

Never yields broken UTF-8 (byte-fallback pieces of one character arrive as several tokens) and
holds back text that could be the start of a stop string, so a stop string never reaches the user.
"""

from __future__ import annotations

from tnllm.tokenizer import Tokenizer

REPLACEMENT = "\ufffd"
MAX_PENDING_TOKENS = 8  # give up waiting for a character to complete after this many tokens


class TextStreamer:
    """Feed ids with `push`, get new text; `flush` at the end; `stopped` once a stop string appears."""

    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.stop = stop
        self.ids: list[int] = []
        self.text = ""          # text of all ids up to `read_offset`
        self.emitted = 0        # chars of `text` already handed out
        self.stopped = False
        # Decode only a short window: ids[prefix_offset:read_offset] were already turned into text and
        # serve as left context, so SentencePiece's leading-space handling stays right.
        self.prefix_offset = 0
        self.read_offset = 0
        # A plain piece after complete text adds the same text whatever precedes it: the tokenizer's `piece_text`
        # (None where it has none, or for pieces that need the window) saves the window's two decodes.
        self._piece_text = getattr(tokenizer, "piece_text", lambda token_id: None)

    def push(self, token_id: int) -> str:
        """Add one id; return the text that became safe to show (possibly empty)."""
        if self.stopped:
            return ""
        self.ids.append(token_id)
        # The shortcut needs decoded left context (no leading-space rule) and no ids still waiting for a character.
        piece = self._piece_text(token_id) if self.prefix_offset < self.read_offset == len(self.ids) - 1 else None
        if piece is None:
            self._decode_window(final=False)
        else:
            self.text += piece
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return self._release(final=False)

    def flush(self) -> str:
        """Everything still held back (call once generation ended)."""
        if not self.stopped:
            self._decode_window(final=True)
        return self._release(final=True)

    def _decode_window(self, final: bool) -> None:
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset])
        window = self.tokenizer.decode(self.ids[self.prefix_offset:])
        incomplete = window.endswith(REPLACEMENT) and len(self.ids) - self.read_offset < MAX_PENDING_TOKENS
        if incomplete and not final:
            return
        self.text += window[len(prefix):]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)

    def _release(self, final: bool) -> str:
        cut = len(self.text)
        for stop in self.stop:
            found = self.text.find(stop, max(0, self.emitted - len(stop) + 1))
            if found != -1 and found < cut:
                cut, self.stopped = found, True
        if not self.stopped and not final:
            cut -= self._partial_stop_suffix()
        piece = self.text[self.emitted:cut] if cut > self.emitted else ""
        self.emitted = max(self.emitted, cut)
        if self.stopped:
            self.text = self.text[:cut]
        return piece

    def _partial_stop_suffix(self) -> int:
        """Length of the longest tail of `text` that is a proper prefix of a stop string."""
        best = 0
        for stop in self.stop:
            for n in range(min(len(stop) - 1, len(self.text)), best, -1):
                if self.text.endswith(stop[:n]):
                    best = n
                    break
        return best
