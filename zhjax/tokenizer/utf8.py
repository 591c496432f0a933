"""Which tokens may come next without leaving bytes that can never complete a UTF-8 character.

Byte-level BPE (SmolLM2, Llama-3) and SentencePiece with byte fallback can spell one Chinese character with
several tokens, each holding part of its UTF-8 bytes. A decoder that picks a token starting a new character
while the previous one still waits for continuation bytes (or a continuation byte where none is expected) writes
bytes that no later token can repair: the text shows U+FFFD. A model whose new rows are barely trained does this
often. `Utf8Constraint` turns the rule into two small tables over the vocabulary, so a decoder masks such tokens
at the cost of one gather per step:

- the *state* of a sequence is where UTF-8's automaton stands after its bytes: between characters (0), or
  waiting for 1-3 continuation bytes, the first of them possibly restricted (after E0, ED, F0, F4: RFC 3629);
- `allowed[state, token]`: the token's bytes all pass the automaton from that state. Tokens with no bytes
  (special tokens: EOS, BOS, PAD) are allowed only between characters, so a sequence never ends inside one;
- `next_state[state, token]`: the state after it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["NUM_STATES", "Utf8Constraint", "token_bytes"]

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


# UTF-8 as a small automaton. A state is what the next byte must be: 0 = between characters; the others wait for
# `need` continuation bytes, the first of them in [lo, hi] (RFC 3629: E0 and F0 exclude overlong forms, ED the
# surrogates, F4 the code points past U+10FFFF).
_STATES = [(0, 0, 0), (1, 0x80, 0xBF), (2, 0x80, 0xBF), (3, 0x80, 0xBF),
           (2, 0xA0, 0xBF), (2, 0x80, 0x9F), (3, 0x90, 0xBF), (3, 0x80, 0x8F)]
_SPECIAL_LEADS = {0xE0: 4, 0xED: 5, 0xF0: 6, 0xF4: 7}
NUM_STATES = len(_STATES)


def _step(state: int, byte: int) -> int | None:
    """The state after `byte`, or None when the byte cannot come next."""
    need, lo, hi = _STATES[state]
    if need:
        return need - 1 if lo <= byte <= hi else None
    if byte < 0x80:
        return 0
    if 0xC2 <= byte <= 0xDF:
        return 1
    if 0xE0 <= byte <= 0xEF:
        return _SPECIAL_LEADS.get(byte, 2)
    if 0xF0 <= byte <= 0xF4:
        return _SPECIAL_LEADS.get(byte, 3)
    return None


def _run(state: int, data: bytes) -> int | None:
    for byte in data:
        state = _step(state, byte)
        if state is None:
            return None
    return state


@dataclass(frozen=True)
class Utf8Constraint:
    """`allowed [NUM_STATES, vocab]` (bool) and `next_state [NUM_STATES, vocab]` (int8) tables; see the module
    docstring."""

    allowed: np.ndarray
    next_state: np.ndarray

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, vocab_size: int | None = None) -> Utf8Constraint:
        """Tables for `tokenizer`'s ids; a model with more rows than the tokenizer (padding) gets them disallowed."""
        pieces = token_bytes(tokenizer)
        vocab = max(vocab_size or 0, len(pieces))
        allowed = np.zeros((NUM_STATES, vocab), bool)
        next_state = np.zeros((NUM_STATES, vocab), np.int8)
        for t, data in enumerate(pieces):
            if not data:  # special or empty: only between characters, state unchanged
                allowed[0, t] = True
                continue
            for s in range(NUM_STATES):
                end = _run(s, data)
                if end is not None:
                    allowed[s, t], next_state[s, t] = True, end
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
