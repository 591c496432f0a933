"""Reference check of issue 3 on the seed's own files (../shared/seed/; the `seed_dir` fixture skips elsewhere).

Merging the seed's `chinese_sp.model` into `llama_tokenizer_32000.model` must give the seed's 49953 pieces:
the first 32000 unchanged, the seed's pieces and (in seed mode) its scores exactly; in rank mode the HF dir
must agree with SentencePiece on every line of a Chinese/English text; and Chinese must cost at most half
the tokens of LLaMA's tokenizer. The expected pieces are derived here with SentencePiece itself.
"""

from __future__ import annotations

import argparse
import inspect
import json
import textwrap

import pytest
import sentencepiece as spm
from transformers import AutoTokenizer

from zhjax.tokenizer.guards import check_vocab_match
from zhjax.tokenizer.merge import load_sp_proto, merge_tokenizers, tokenization_report

ENGLISH = [
    line for mod in (argparse, json, textwrap) for line in inspect.getdoc(mod).splitlines() if line.strip()
]


@pytest.fixture(scope="module")
def seed_merges(seed_dir, tmp_path_factory):
    out = {}
    for mode, pad in [("seed", None), ("rank", None), ("alpaca", "[PAD]")]:
        folder = tmp_path_factory.mktemp(mode)
        result = merge_tokenizers(
            seed_dir / "llama_tokenizer_32000.model",
            seed_dir / "chinese_sp.model",
            folder,
            score_mode="seed" if mode == "seed" else "rank",
            pad_token=pad,
        )
        out[mode] = (result, folder)
    return out


@pytest.fixture(scope="module")
def chinese_lines(assets):
    return [line.rstrip("\n") for line in open(assets.corpus_text, encoding="utf-8") if line.strip()]


def sp_pieces(path) -> list[str]:
    sp = spm.SentencePieceProcessor(model_file=str(path))
    return [sp.id_to_piece(i) for i in range(sp.get_piece_size())]


def test_merge_gives_the_seeds_49953_pieces_with_llama_first(seed_dir, seed_merges):
    llama = sp_pieces(seed_dir / "llama_tokenizer_32000.model")
    known = set(llama)
    chinese = [p for p in sp_pieces(seed_dir / "chinese_sp.model") if p not in known]
    for mode in ("seed", "rank"):
        result, folder = seed_merges[mode]
        merged = sp_pieces(folder / "tokenizer.model")
        assert len(merged) == result.vocab_size == 49953
        assert merged[:32000] == llama
        assert merged[32000:] == chinese


def test_seed_mode_scores_are_the_seeds(seed_dir, seed_merges):
    llama = load_sp_proto(seed_dir / "llama_tokenizer_32000.model")
    _, folder = seed_merges["seed"]
    merged = load_sp_proto(folder / "tokenizer.model")
    assert list(merged.pieces[:32000]) == list(llama.pieces)
    assert {(p.score, p.type) for p in merged.pieces[32000:]} == {(0.0, 1)}  # score 0, NORMAL


def test_rank_mode_hf_equals_sentencepiece_on_every_line(seed_merges, chinese_lines):
    _, folder = seed_merges["rank"]
    hf = AutoTokenizer.from_pretrained(folder)
    sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    encode = lambda s: hf.encode(s, add_special_tokens=False)
    report = tokenization_report(encode, chinese_lines + ENGLISH, reference=sp.encode)
    print(report.describe("seed files, rank mode"))
    assert report.disagreeing_lines == 0 and report.lines == len(chinese_lines) + len(ENGLISH)


def test_merged_spends_at_most_half_the_tokens_of_llama_on_chinese(seed_dir, seed_merges, chinese_lines):
    llama = spm.SentencePieceProcessor(model_file=str(seed_dir / "llama_tokenizer_32000.model"))
    before = tokenization_report(llama.encode, chinese_lines)
    for mode in ("seed", "rank"):
        merged = spm.SentencePieceProcessor(model_file=str(seed_merges[mode][1] / "tokenizer.model"))
        after = tokenization_report(merged.encode, chinese_lines)
        print(
            f"{mode}: {before.tokens_per_zh_char:.3f} -> {after.tokens_per_zh_char:.3f} tokens per character"
        )
        assert after.zh_tokens <= 0.5 * before.zh_tokens


def test_seed_mode_hf_disagreement_is_what_rank_mode_fixes(seed_merges, chinese_lines):
    """Documents the reason for rank mode: the tied scores make HF and SentencePiece part ways."""
    _, folder = seed_merges["seed"]
    hf = AutoTokenizer.from_pretrained(folder)
    sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    sample = chinese_lines[:2000]
    report = tokenization_report(
        lambda s: hf.encode(s, add_special_tokens=False), sample, reference=sp.encode
    )
    print(report.describe("seed files, seed mode"))
    assert report.disagreeing_lines > 0.1 * len(sample)


def test_alpaca_pad_gives_49954_and_the_mixup_guard_names_both(seed_merges):
    result, folder = seed_merges["alpaca"]
    alpaca = AutoTokenizer.from_pretrained(folder)
    llama = AutoTokenizer.from_pretrained(seed_merges["rank"][1])
    assert (len(alpaca), alpaca.pad_token, alpaca.pad_token_id) == (49954, "[PAD]", 49953)
    with pytest.raises(
        ValueError, match="Chinese-LLaMA model is being used with the Chinese-Alpaca tokenizer"
    ):
        check_vocab_match(len(llama), alpaca, "seed check")
