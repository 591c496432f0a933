"""New embedding rows for an extended vocabulary (array level: no model code here).

After `merge` or `bpe` has grown the tokenizer from `V_old` to `V_new` tokens, the model's `embed_tokens`
and `lm_head` (both `[V, D]` in HF layout, tied or not) need `V_new - V_old` new rows. `resize_embedding`
returns the grown matrix; its first `V_old` rows are the old rows bit for bit, so the logits of the old
tokens are unchanged by a resize. The caller applies it to each matrix (once for a tied model).

Initialisations of the new rows:

- `normal`: N(0, std) with std 0.02 (LLaMA's initializer_range), what the seed got from
  `resize_token_embeddings` at the time.
- `mean`: what current transformers does (`mean_resizing=True`): the mean of the old rows plus a draw from
  N(0, 1e-9 * covariance of the old rows), or just the mean when that covariance is not positive definite.
- `subword`: each new token's row is the mean of the old rows of the pieces the *base* tokenizer splits the
  same string into (`subword_source_ids`). The new token then starts out meaning what its pieces meant
  together, so the model's loss on Chinese right after the resize starts lower than with the other two.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from zhjax.tokenizer.bpe import byte_level_decoder_table, byte_level_token

__all__ = ["INITS", "resize_embedding", "subword_source_ids"]

INITS = ("normal", "mean", "subword")


def resize_embedding(
    old: np.ndarray,
    new_vocab_size: int,
    init: str = "normal",
    *,
    source_ids: Sequence[Sequence[int]] | None = None,
    rng_seed: int = 0,
    std: float = 0.02,
    covariance_scale: float = 1e-9,
) -> np.ndarray:
    """Grow a `[V_old, D]` embedding (or HF-layout LM head) to `[new_vocab_size, D]`, same dtype.

    Rows `[:V_old]` are copied unchanged. New rows follow `init` ("normal", "mean" or "subword", see the
    module docstring). `source_ids[i]` lists the old rows whose mean becomes new row `V_old + i` (required
    for "subword"; an empty list stands for all old rows, e.g. for a new [PAD]). Statistics are computed in
    float32 or wider and cast to the matrix's dtype. `rng_seed` makes "normal" and "mean" reproducible.
    """
    old = np.asarray(old)
    if old.ndim != 2:
        raise ValueError(f"old embedding: expected a [vocab, dim] matrix, got shape {old.shape}")
    old_vocab, dim = old.shape
    if new_vocab_size < old_vocab:
        raise ValueError(
            f"new_vocab_size={new_vocab_size} is smaller than the embedding's {old_vocab} rows; "
            "resize only grows a vocabulary (old ids must keep their rows)"
        )
    if init not in INITS:
        raise ValueError(f"init={init!r}: expected one of {INITS}")
    added = new_vocab_size - old_vocab
    out = np.empty((new_vocab_size, dim), dtype=old.dtype)
    out[:old_vocab] = old
    if added == 0:
        return out
    rng = np.random.default_rng(rng_seed)
    wide = np.float64 if old.dtype == np.float64 else np.float32
    if init == "normal":
        new_rows = rng.normal(0.0, std, size=(added, dim))
    elif init == "mean":
        new_rows = _mean_rows(old.astype(wide), added, rng, covariance_scale)
    else:
        new_rows = _subword_rows(old.astype(wide), added, source_ids)
    out[old_vocab:] = new_rows.astype(old.dtype)
    return out


def _mean_rows(old: np.ndarray, added: int, rng: np.random.Generator, scale: float) -> np.ndarray:
    mean = old.mean(axis=0)
    centered = old - mean
    covariance = (centered.T @ centered).astype(np.float64) * (scale / old.shape[0])
    try:
        chol = np.linalg.cholesky(covariance)
    except np.linalg.LinAlgError:  # not positive definite: transformers falls back to the mean alone
        return np.broadcast_to(mean, (added, old.shape[1]))
    return mean + rng.standard_normal((added, old.shape[1])) @ chol.T


def _subword_rows(old: np.ndarray, added: int, source_ids: Sequence[Sequence[int]] | None) -> np.ndarray:
    if source_ids is None:
        raise ValueError("init='subword' needs source_ids (see subword_source_ids)")
    if len(source_ids) != added:
        raise ValueError(f"source_ids has {len(source_ids)} entries but the resize adds {added} rows")
    rows = np.empty((added, old.shape[1]), dtype=old.dtype)
    overall = None
    for i, ids in enumerate(source_ids):
        if len(ids) == 0:
            overall = old.mean(axis=0) if overall is None else overall
            rows[i] = overall
            continue
        index = np.asarray(ids, dtype=np.int64)
        if index.min() < 0 or index.max() >= old.shape[0]:
            raise ValueError(
                f"source_ids[{i}] = {list(ids)} refers to rows outside the old embedding (0..{old.shape[0] - 1})"
            )
        rows[i] = old[index].mean(axis=0)
    return rows


def _backend(tokenizer: Any, name: str) -> Any:
    """The `tokenizers.Tokenizer` behind an HF tokenizer (or the object itself)."""
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    if not hasattr(backend, "model") or not hasattr(backend, "id_to_token"):
        raise TypeError(
            f"{name}: expected a tokenizers-backed HF tokenizer or a tokenizers.Tokenizer, got {type(tokenizer).__name__}"
        )
    return backend


def subword_source_ids(base_tokenizer: Any, new_tokenizer: Any, old_vocab_size: int) -> list[list[int]]:
    """For each new id `old_vocab_size..len(new)-1`, the base tokenizer's ids for that token's string.

    The token string is segmented by the base's *model* directly (`backend.model.tokenize`), skipping the
    normalizer and pre-tokenizer: a byte-level token (e.g. 'ä¸Ńå¤®', possibly a partial UTF-8 character)
    and a SentencePiece piece ('▁中国', with its word-start marker) are already in the form the model works
    on, and going through text would add a dummy prefix or break partial characters. Both tokenizers must
    share that form, which holds when the new tokenizer extends the base (`merge`, `bpe`); a byte-level base's
    new words added as plain text (`bpe`'s form "words") are written in the byte-level alphabet first. Special added
    tokens (e.g. "[PAD]") get an empty list, which `resize_embedding` reads as "mean of all old rows".
    Accepts HF tokenizers (tokenizers-backed) or `tokenizers.Tokenizer` objects.
    """
    base, new = _backend(base_tokenizer, "base_tokenizer"), _backend(new_tokenizer, "new_tokenizer")
    new_size = new.get_vocab_size(with_added_tokens=True)
    if old_vocab_size > new_size:
        raise ValueError(f"old_vocab_size={old_vocab_size} exceeds the new tokenizer's {new_size} tokens")
    special = {token.content for token in new.get_added_tokens_decoder().values() if token.special}
    # a byte-level base's words added as plain text (`zhjax.tokenizer.bpe`, form "words"): in the model's form
    byte_level = "ByteLevel" in str(base.decoder)
    alphabet = byte_level_decoder_table() if byte_level else {}
    sources: list[list[int]] = []
    for token_id in range(old_vocab_size, new_size):
        token = new.id_to_token(token_id)
        if token is None or token in special:
            sources.append([])
            continue
        if byte_level:
            token = byte_level_token(token, alphabet)
        ids = [piece.id for piece in base.model.tokenize(token)]
        if any(i >= old_vocab_size for i in ids):
            raise ValueError(
                f"the base tokenizer maps new token {token!r} (id {token_id}) to ids {ids}, not all below "
                f"old_vocab_size={old_vocab_size}: is base_tokenizer really the tokenizer the model was trained with?"
            )
        sources.append(ids)
    return sources
