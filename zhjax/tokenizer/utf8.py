"""Which tokens may come next without leaving bytes that can never complete a UTF-8 character.

Byte-level BPE (SmolLM2, Llama-3) and SentencePiece with byte fallback can spell one Chinese character with
several tokens, each holding part of its UTF-8 bytes. A decoder that picks a token starting a new character
while the previous one still waits for continuation bytes (or a continuation byte where none is expected) writes
bytes that no later token can repair: the text shows U+FFFD. A model whose new rows are barely trained does this
often. `Utf8Constraint` turns the rule into two small tables over the vocabulary, so a decoder masks such tokens
at the cost of one gather per step:

- the *state* of a sequence is the number of continuation bytes (0-3) the last character still needs;
- `allowed[state, token]`: the token's bytes continue the text validly: with state `s > 0`, the token starts
  with exactly `s` continuation bytes (or consists of fewer, all continuation bytes); with state 0, it starts
  with none. Tokens with no bytes (special tokens: EOS, BOS, PAD) are allowed only at state 0, so a sequence
  never ends inside a character;
- `next_state[state, token]`: the state after it (the continuation bytes its own last character still needs).

Only the shape of UTF-8 is checked (lead byte, number of continuation bytes), which is what U+FFFD in decoded
output comes from; tokens whose bytes are malformed in themselves (a lone 0xFF byte) are never allowed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["Utf8Constraint", "token_bytes"]

_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def _byte_decoder() -> dict[str, int]:
    from zhjax.tokenizer.bpe import byte_level_decoder_table

    return byte_level_decoder_table()


def token_bytes(tokenizer: Any) -> list[bytes | None]:
    """The bytes each id of an HF tokenizer stands for; None for special tokens (no text of their own).

    Byte-level BPE tokens are mapped back through the byte-to-unicode table; SentencePiece pieces `<0xNN>` are
    one byte, other pieces their UTF-8 text with `▁` as a space.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    byte_level = backend is not None and "ByteLevel" in str(backend.decoder)
    decoder = _byte_decoder() if byte_level else None
    special = set(getattr(tokenizer, "all_special_ids", []))
    special |= {i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if t.special}
    out: list[bytes | None] = []
    for i, token in enumerate(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))):
        if token is None or i in special:
            out.append(None)
        elif decoder is not None:
            out.append(bytes(decoder[c] for c in token) if all(c in decoder for c in token) else token.encode())
        elif m := _BYTE_PIECE.match(token):
            out.append(bytes([int(m.group(1), 16)]))
        else:
            out.append(token.replace("\u2581", " ").encode("utf-8"))
    return out


def _shape(data: bytes) -> tuple[int, bool, int] | None:
    """(leading continuation bytes, whether a lead byte follows them, continuation bytes still needed at the end),
    or None when the bytes cannot be part of valid UTF-8."""
    i = 0
    while i < len(data) and 0x80 <= data[i] <= 0xBF:
        i += 1
    lead_seen, need = i < len(data), 0
    while i < len(data):
        b = data[i]
        if need:
            if not 0x80 <= b <= 0xBF:
                return None
            need -= 1
        elif b < 0x80:
            pass
        elif 0xC2 <= b <= 0xDF:
            need = 1
        elif 0xE0 <= b <= 0xEF:
            need = 2
        elif 0xF0 <= b <= 0xF4:
            need = 3
        else:
            return None
        i += 1
    leading = next((k for k, b in enumerate(data) if not 0x80 <= b <= 0xBF), len(data))
    return leading, lead_seen, need


@dataclass(frozen=True)
class Utf8Constraint:
    """`allowed [4, vocab]` (bool) and `next_state [4, vocab]` (int8) tables; see the module docstring."""

    allowed: np.ndarray
    next_state: np.ndarray

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, vocab_size: int | None = None) -> Utf8Constraint:
        """Tables for `tokenizer`'s ids; a model with more rows than the tokenizer (padding) gets them disallowed."""
        pieces = token_bytes(tokenizer)
        vocab = max(vocab_size or 0, len(pieces))
        allowed = np.zeros((4, vocab), bool)
        next_state = np.zeros((4, vocab), np.int8)
        for t, data in enumerate(pieces):
            if data is None or not data:  # special or empty: only between characters, state unchanged
                allowed[0, t] = True
                continue
            shape = _shape(data)
            if shape is None:
                continue
            leading, lead_seen, need = shape
            for s in range(4):
                if lead_seen and leading == s:
                    allowed[s, t], next_state[s, t] = True, need
                elif not lead_seen and 0 < leading <= s:
                    allowed[s, t], next_state[s, t] = True, s - leading
        return cls(allowed, next_state)

    def state_after(self, ids, state: int = 0) -> int:
        """The state after `ids` from `state` (a token that breaks the rule restarts from its own end)."""
        for t in ids:
            t = int(t)
            if t >= self.allowed.shape[1]:
                continue
            if self.allowed[state, t]:
                state = int(self.next_state[state, t])
            else:  # already broken text (e.g. a prompt): continue from what this token leaves
                col = self.allowed[:, t]
                state = int(self.next_state[int(np.argmax(col)), t]) if col.any() else 0
        return state
