"""Vocabulary extension: train a Chinese SentencePiece, merge it into a SentencePiece base or extend a
byte-level BPE base, grow the embedding rows, and guard against mismatched vocab sizes.

- `train`: SentencePiece training, streamed from files.
- `merge`: the seed's SentencePiece merge (score modes "rank" and "seed") and its HF tokenizer dir.
- `bpe`: byte-level BPE (tokenizer.json) extension with merges learned on top of the base, added as merges or,
  form "words", as added tokens of two or more characters.
- `resize`: new embedding / LM-head rows (normal, mean, subword).
- `guards`: vocab-size and tokenizer-dir checks with actionable errors.
"""

from zhjax.tokenizer.bpe import BpeExtensionResult, extend_bpe_tokenizer
from zhjax.tokenizer.guards import (
    check_tokenizer_dir,
    check_vocab_match,
    load_tokenizer,
    tokenizer_vocab_size,
)
from zhjax.tokenizer.merge import (
    MergeResult,
    TokenizationReport,
    load_sp_proto,
    merge_sentencepiece,
    merge_tokenizers,
    save_merged_tokenizer,
    sentencepiece_to_tokenizers,
    tokenization_report,
)
from zhjax.tokenizer.resize import resize_embedding, subword_source_ids
from zhjax.tokenizer.train import SentencePieceTrainConfig, TrainResult, train_sentencepiece

__all__ = [
    "BpeExtensionResult",
    "MergeResult",
    "SentencePieceTrainConfig",
    "TokenizationReport",
    "TrainResult",
    "check_tokenizer_dir",
    "check_vocab_match",
    "extend_bpe_tokenizer",
    "load_sp_proto",
    "load_tokenizer",
    "merge_sentencepiece",
    "merge_tokenizers",
    "resize_embedding",
    "save_merged_tokenizer",
    "sentencepiece_to_tokenizers",
    "subword_source_ids",
    "tokenization_report",
    "tokenizer_vocab_size",
    "train_sentencepiece",
]
