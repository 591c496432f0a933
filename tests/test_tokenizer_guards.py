"""Guards (zhjax.tokenizer.guards): mismatched vocab sizes and incomplete tokenizer dirs fail with clear errors."""

from __future__ import annotations

import shutil

import pytest
import sentencepiece as spm
from tokenizers import Tokenizer
from transformers import AutoTokenizer

from zhjax.tokenizer.guards import (
    check_tokenizer_dir,
    check_vocab_match,
    load_tokenizer,
    tokenizer_vocab_size,
)


def test_matching_sizes_pass_and_every_tokenizer_kind_has_a_size(assets):
    sp = spm.SentencePieceProcessor(model_file=str(assets.mistral_sp_model))
    hf = AutoTokenizer.from_pretrained(assets.smollm2_dir)
    raw = Tokenizer.from_file(str(assets.smollm2_dir / "tokenizer.json"))
    assert (tokenizer_vocab_size(sp), tokenizer_vocab_size(hf), tokenizer_vocab_size(raw)) == (
        32000,
        49152,
        49152,
    )
    check_vocab_match(32000, sp, "mistral")
    check_vocab_match(49152, hf, "smollm2")
    check_vocab_match(49152, raw, "smollm2")


def test_llama_model_with_alpaca_tokenizer_names_the_mixup():
    with pytest.raises(ValueError) as err:
        check_vocab_match(49953, 49954, "sft: model ckpt/llama vs tokenizer tok/alpaca")
    message = str(err.value)
    assert message.startswith("sft: model ckpt/llama vs tokenizer tok/alpaca: the model has 49953 token rows")
    assert "the tokenizer has 49954 tokens" in message
    assert "Chinese-LLaMA model is being used with the Chinese-Alpaca tokenizer" in message
    assert "[PAD]" in message


def test_alpaca_model_with_llama_tokenizer_names_the_mixup():
    with pytest.raises(
        ValueError, match="Chinese-Alpaca model is being used with the Chinese-LLaMA tokenizer"
    ):
        check_vocab_match(49954, 49953, "generate")


def test_unresized_model_with_an_extended_tokenizer_says_to_resize():
    with pytest.raises(
        ValueError, match=r"model has 32000 token rows but the tokenizer has 49953 tokens.*resize"
    ):
        check_vocab_match(32000, 49953, "pretrain")


def test_extended_model_with_the_base_tokenizer_says_which_tokenizer_to_use():
    with pytest.raises(
        ValueError, match=r"model has 49953 token rows but the tokenizer has 32000.*tokenizer saved"
    ):
        check_vocab_match(49953, 32000, "generate")
    check_vocab_match(32064, 32000, "padded checkpoint", allow_padding=True)
    with pytest.raises(ValueError, match="resize embed_tokens and lm_head"):
        check_vocab_match(31990, 32000, "padded checkpoint", allow_padding=True)


def test_tokenizer_dir_without_tokenizer_files_names_dir_and_files(assets, tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError) as err:
        check_tokenizer_dir(tmp_path)
    message = str(err.value)
    assert (
        str(tmp_path) in message
        and "tokenizer.json or tokenizer.model" in message
        and "config.json" in message
    )
    with pytest.raises(FileNotFoundError, match="does not exist"):
        check_tokenizer_dir(tmp_path / "absent")
    with pytest.raises(NotADirectoryError, match="pass the directory"):
        check_tokenizer_dir(assets.smollm2_dir / "tokenizer.json")


def test_truncated_tokenizer_json_is_named(assets, tmp_path):
    data = (assets.smollm2_dir / "tokenizer.json").read_bytes()
    (tmp_path / "tokenizer.json").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="tokenizer.json is not valid JSON"):
        check_tokenizer_dir(tmp_path)


def test_load_tokenizer_checks_then_loads(assets, tmp_path):
    assert len(load_tokenizer(assets.smollm2_dir)) == 49152
    shutil.copyfile(assets.mistral_sp_model, tmp_path / "tokenizer.model")
    assert len(load_tokenizer(tmp_path)) == 32000
