"""Guards for the mistakes the seed's users kept making with tokenizers and vocab sizes.

- A model used with a tokenizer of another size (e.g. the base LLaMA with the merged Chinese tokenizer
  before resizing, or the reverse): ids past the embedding, or Chinese text cut into the wrong pieces.
- The Chinese-LLaMA tokenizer (49953 tokens) mixed with the Chinese-Alpaca one (49954: it adds "[PAD]"):
  off by one, so it "works" and silently trains or generates garbage.
- A tokenizer dir missing its files, which otherwise surfaces as an obscure error deep in transformers.

Each check raises a ValueError / FileNotFoundError whose message names what it found (sizes, dir, files)
and what to do.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["check_tokenizer_dir", "check_vocab_match", "load_tokenizer", "tokenizer_vocab_size"]

CHINESE_LLAMA_VOCAB = 49953
CHINESE_ALPACA_VOCAB = 49954
TOKENIZER_MODEL_FILES = ("tokenizer.json", "tokenizer.model")


def tokenizer_vocab_size(tokenizer: Any) -> int:
    """Number of ids a tokenizer can produce: HF tokenizer (`len`, added tokens included),
    `tokenizers.Tokenizer`, `sentencepiece.SentencePieceProcessor`, or a plain int."""
    if isinstance(tokenizer, int):
        return tokenizer
    if hasattr(tokenizer, "get_piece_size"):
        return int(tokenizer.get_piece_size())
    if hasattr(tokenizer, "get_vocab_size") and not hasattr(tokenizer, "backend_tokenizer"):
        return int(tokenizer.get_vocab_size(with_added_tokens=True))
    if hasattr(tokenizer, "__len__"):
        return len(tokenizer)
    raise TypeError(f"cannot tell the vocab size of a {type(tokenizer).__name__}")


def check_vocab_match(
    model_vocab_size: int, tokenizer: Any, where: str, *, allow_padding: bool = False
) -> None:
    """Raise ValueError unless the model's embedding rows match the tokenizer's ids.

    `where` says which model and tokenizer are being combined (it starts the message). With
    `allow_padding`, a model with more rows than the tokenizer has ids is accepted (vocab padded to a
    multiple, as some checkpoints are); fewer rows are never accepted.
    """
    tok_size = tokenizer_vocab_size(tokenizer)
    if model_vocab_size == tok_size or (allow_padding and model_vocab_size > tok_size):
        return
    sizes = f"{where}: the model has {model_vocab_size} token rows but the tokenizer has {tok_size} tokens"
    if (model_vocab_size, tok_size) == (CHINESE_LLAMA_VOCAB, CHINESE_ALPACA_VOCAB):
        raise ValueError(
            f"{sizes}. 49953 is the Chinese-LLaMA vocabulary and 49954 the Chinese-Alpaca one (it adds [PAD]): "
            "a Chinese-LLaMA model is being used with the Chinese-Alpaca tokenizer. Use the tokenizer saved with "
            "the model (Chinese-LLaMA's 49953), or, to instruction-tune it, resize the model to 49954 first."
        )
    if (model_vocab_size, tok_size) == (CHINESE_ALPACA_VOCAB, CHINESE_LLAMA_VOCAB):
        raise ValueError(
            f"{sizes}. 49954 is the Chinese-Alpaca vocabulary (with [PAD]) and 49953 the Chinese-LLaMA one: a "
            "Chinese-Alpaca model is being used with the Chinese-LLaMA tokenizer. Use the Chinese-Alpaca "
            "tokenizer (49954) saved with the model."
        )
    if model_vocab_size < tok_size:
        raise ValueError(
            f"{sizes}, so ids {model_vocab_size}..{tok_size - 1} have no embedding row. If the tokenizer was "
            f"extended (tools/merge_tokenizers.py), resize embed_tokens and lm_head to {tok_size} rows first "
            "(zhjax.tokenizer.resize.resize_embedding); otherwise use the tokenizer the model was trained with."
        )
    raise ValueError(
        f"{sizes}: rows {tok_size}..{model_vocab_size - 1} would never be used, which usually means the wrong "
        "tokenizer (e.g. the base tokenizer with a model resized for an extended one). Use the tokenizer saved "
        "with the model; if the extra rows are deliberate padding, pass allow_padding=True."
    )


def check_tokenizer_dir(path: str | Path) -> Path:
    """Check that `path` is a tokenizer dir `transformers.AutoTokenizer` can load; return it as a Path.

    It must hold `tokenizer.json` (HF tokenizers) or `tokenizer.model` (SentencePiece); a
    `tokenizer.json` must parse. Errors name the dir, what it holds, and what is missing.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"tokenizer dir {path} does not exist")
    if path.is_file():
        hint = " (pass the directory that contains it)" if path.name in TOKENIZER_MODEL_FILES else ""
        raise NotADirectoryError(f"tokenizer path {path} is a file, expected a tokenizer directory{hint}")
    present = sorted(p.name for p in path.iterdir())
    if not any(name in present for name in TOKENIZER_MODEL_FILES):
        raise FileNotFoundError(
            f"tokenizer dir {path} is missing its tokenizer files: expected tokenizer.json or tokenizer.model "
            f"(plus tokenizer_config.json), found {present or 'nothing'}. Point to the dir written by "
            "tools/merge_tokenizers.py or the model's own HF dir."
        )
    if "tokenizer.json" in present:
        try:
            json.loads((path / "tokenizer.json").read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{path / 'tokenizer.json'} is not valid JSON (truncated copy?): {err}") from err
    return path


def load_tokenizer(path: str | Path) -> Any:
    """`transformers.AutoTokenizer.from_pretrained(path)` after `check_tokenizer_dir` (local dirs only)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(check_tokenizer_dir(path)))
