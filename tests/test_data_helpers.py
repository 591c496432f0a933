"""Shared helpers for the data tests (no tests here): a tiny tokenizer built offline and file writers."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

TRAIN_TEXT = [
    "迈向充满希望的新世纪，一九九八年新年讲话。",
    "同胞们、朋友们、女士们、先生们：在一九九八年来临之际，我十分高兴。",
    "The quick brown fox jumps over the lazy dog. 0123456789",
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "### Instruction:\n### Response: [INST] <<SYS>> <</SYS>> [/INST] You are a helpful assistant. 你是一个乐于助人的助手。",
]


def make_tokenizer(vocab_size: int = 400) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained in milliseconds on a few lines, with <s>, </s> and <pad>; no downloads."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(TRAIN_TEXT * 5, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def write_text(path: Path, lines: list[str], *, gz: bool = False, jsonl: bool = False) -> Path:
    """Write ``lines`` as a .txt (one per line) or .jsonl ({"text": line}) file, gzip-compressed if asked."""
    body = "".join((json.dumps({"text": x}, ensure_ascii=False) if jsonl else x) + "\n" for x in lines).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(body) if gz else body)
    return path
