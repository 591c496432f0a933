"""The files an HF tokenizer directory is made of: one list for every copy, check and rewrite."""

from __future__ import annotations

__all__ = ["TOKENIZER_FILES", "TOKENIZER_MODEL_FILES"]

# the files that define the segmentation: a directory holds a tokenizer when it has one of them
TOKENIZER_MODEL_FILES = ("tokenizer.json", "tokenizer.model")
# everything a tokenizer directory may hold; copied together whenever a checkpoint or tokenizer is written
TOKENIZER_FILES = (
    *TOKENIZER_MODEL_FILES,
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)
