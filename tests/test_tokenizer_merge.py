"""The seed's SentencePiece merge (zhjax.tokenizer.merge, tools/merge_tokenizers.py --kind sp).

Base: the Mistral v1 SentencePiece (LLaMA-style BPE, byte fallback, 32000 pieces). Chinese model: a small
SentencePiece trained here on the People's Daily text. References: SentencePiece itself (for the pieces,
ids and segmentation) and transformers.AutoTokenizer (for the HF dir).
"""

from __future__ import annotations

import argparse
import inspect
import json
import textwrap

import pytest
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as pb
from transformers import AutoTokenizer

from tools.merge_tokenizers import main as merge_tool
from zhjax.tokenizer.merge import (
    load_sp_proto,
    merge_sentencepiece,
    merge_tokenizers,
    sentencepiece_to_tokenizers,
    tokenization_report,
)
from zhjax.tokenizer.train import SentencePieceTrainConfig, train_sentencepiece

MIXED = [
    "混合文本：Hello, 世界! 2024年3月15日，价格是￥1,299.99元。",
    "emoji 😀🎉👍🏽 and rare characters 𠀀𪚥龘䶮 in one line",
    "数字 0123456789 与全角数字 １２３ and ＡＢＣ",
    "Code: def f(x): return x ** 2  # two spaces",
    "  leading, double  and trailing spaces  ",
    "tabs\tand\nnewlines, Ωmega, naïve café, Привет, こんにちは",
]
ENGLISH = [
    line for mod in (argparse, json, textwrap) for line in inspect.getdoc(mod).splitlines() if line.strip()
]


@pytest.fixture(scope="module")
def corpus(assets):
    lines = [line.rstrip("\n") for line in open(assets.corpus_text, encoding="utf-8") if line.strip()]
    return lines[:3000], lines[-500:]


@pytest.fixture(scope="module")
def chinese_model(corpus, tmp_path_factory):
    train, _ = corpus
    path = tmp_path_factory.mktemp("zh") / "train.txt"
    path.write_text("\n".join(train) + "\n", encoding="utf-8")
    config = SentencePieceTrainConfig(vocab_size=5000, model_type="bpe", num_threads=2)
    return train_sentencepiece([path], path.parent / "zh", config).model_file


@pytest.fixture(scope="module")
def merged(assets, chinese_model, tmp_path_factory):
    """mode -> (MergeResult, HF dir), for rank, seed and rank with [PAD]."""
    out = {}
    for name, mode, pad in [("rank", "rank", None), ("seed", "seed", None), ("pad", "rank", "[PAD]")]:
        folder = tmp_path_factory.mktemp(name)
        out[name] = (
            merge_tokenizers(assets.mistral_sp_model, chinese_model, folder, score_mode=mode, pad_token=pad),
            folder,
        )
    return out


def pieces(model_file) -> list[str]:
    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    return [sp.id_to_piece(i) for i in range(sp.get_piece_size())]


@pytest.mark.parametrize("mode", ["rank", "seed", "pad"])
def test_base_pieces_ids_and_specs_are_unchanged(assets, merged, mode):
    base = load_sp_proto(assets.mistral_sp_model)
    result, folder = merged[mode]
    written = load_sp_proto(folder / "tokenizer.model")
    assert written.trainer_spec == base.trainer_spec and written.normalizer_spec == base.normalizer_spec
    assert list(written.pieces[: len(base.pieces)]) == list(base.pieces)  # piece, score and type, id by id
    assert pieces(folder / "tokenizer.model")[: len(base.pieces)] == pieces(assets.mistral_sp_model)


@pytest.mark.parametrize("mode", ["rank", "seed"])
def test_new_pieces_are_the_missing_chinese_pieces_in_order(assets, chinese_model, merged, mode):
    base = pieces(assets.mistral_sp_model)
    known = set(base)
    expected = [p for p in pieces(chinese_model) if p not in known]
    result, folder = merged[mode]
    assert pieces(folder / "tokenizer.model") == base + expected
    assert result.added == len(expected) > 1000
    proto = load_sp_proto(folder / "tokenizer.model")
    assert {p.type for p in proto.pieces[len(base) :]} == {pb.ModelProto.SentencePiece.NORMAL}


def test_seed_mode_scores_every_new_piece_zero(merged):
    result, folder = merged["seed"]
    proto = load_sp_proto(folder / "tokenizer.model")
    assert [p.score for p in proto.pieces[result.base_size :]] == [0.0] * result.added


def test_rank_mode_scores_are_below_the_base_and_strictly_decreasing(assets, merged):
    result, folder = merged["rank"]
    proto = load_sp_proto(folder / "tokenizer.model")
    lowest = min(p.score for p in load_sp_proto(assets.mistral_sp_model).pieces)
    scores = [p.score for p in proto.pieces[result.base_size :]]
    assert scores[0] < lowest
    assert all(a > b for a, b in zip(scores, scores[1:], strict=False))


def test_rank_mode_hf_dir_loads_and_equals_sentencepiece(corpus, merged):
    _, held_out = corpus
    _, folder = merged["rank"]
    hf = AutoTokenizer.from_pretrained(folder)
    sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    assert len(hf) == sp.get_piece_size()
    for line in held_out + ENGLISH + MIXED:
        ids = sp.encode(line)
        assert hf.encode(line, add_special_tokens=False) == ids, line
        assert hf(line).input_ids == [sp.bos_id(), *ids]  # BOS first, as LLaMA's tokenizer
    assert (hf.bos_token, hf.eos_token, hf.unk_token) == ("<s>", "</s>", "<unk>")


@pytest.mark.parametrize("mode", ["rank", "seed", "pad"])
def test_round_trip_in_sentencepiece_and_hf(merged, mode):
    _, folder = merged[mode]
    hf = AutoTokenizer.from_pretrained(folder)
    sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    for text in MIXED:
        assert sp.decode(sp.encode(text)) == text
        assert hf.decode(hf.encode(text), skip_special_tokens=True) == text


def test_merged_spends_fewer_tokens_on_chinese_and_both_modes_compress_alike(assets, corpus, merged):
    _, held_out = corpus
    base = spm.SentencePieceProcessor(model_file=str(assets.mistral_sp_model))
    by_mode = {}
    for mode in ("rank", "seed"):
        sp = spm.SentencePieceProcessor(model_file=str(merged[mode][1] / "tokenizer.model"))
        by_mode[mode] = tokenization_report(sp.encode, held_out).tokens_per_zh_char
    before = tokenization_report(base.encode, held_out).tokens_per_zh_char
    assert by_mode["rank"] < 0.85 * before
    assert by_mode["seed"] == pytest.approx(by_mode["rank"], rel=0.02)


def test_pad_token_is_an_extra_control_piece_and_the_hf_pad(merged):
    result, folder = merged["pad"]
    rank, _ = merged["rank"]
    assert result.vocab_size == rank.vocab_size + 1 and result.pad_id == rank.vocab_size
    proto = load_sp_proto(folder / "tokenizer.model")
    assert proto.pieces[-1].piece == "[PAD]" and proto.pieces[-1].type == pb.ModelProto.SentencePiece.CONTROL
    sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    assert result.pad_id not in sp.encode("text with [PAD] in it")  # never produced from text
    hf = AutoTokenizer.from_pretrained(folder)
    assert (hf.pad_token, hf.pad_token_id, len(hf)) == ("[PAD]", result.pad_id, result.vocab_size)


def test_converter_matches_sentencepiece_on_a_unigram_nfkc_model(corpus, chinese_model, tmp_path):
    """The Chinese model trained as unigram with nmt_nfkc: the Unigram + Precompiled path of the converter."""
    train, held_out = corpus
    path = tmp_path / "train.txt"
    path.write_text("\n".join(train[:2000]) + "\n", encoding="utf-8")
    config = SentencePieceTrainConfig(vocab_size=4000, model_type="unigram", num_threads=2)
    model_file = train_sentencepiece([path], tmp_path / "uni", config).model_file
    tokenizer = sentencepiece_to_tokenizers(load_sp_proto(model_file))
    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    for line in held_out[:200] + ["全角ＡＢＣ１２３与半角 abc 123"]:
        assert tokenizer.encode(line, add_special_tokens=False).ids == sp.encode(line), line


def test_rejects_bad_inputs_with_the_file_named(assets, tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.model"):
        load_sp_proto(tmp_path / "missing.model")
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"\xff\x00 not a proto")
    with pytest.raises(ValueError, match="junk.model"):
        load_sp_proto(junk)
    base = load_sp_proto(assets.mistral_sp_model)
    with pytest.raises(ValueError, match="score_mode='top'"):
        merge_sentencepiece(base, base, score_mode="top")
    with pytest.raises(ValueError, match="already a piece"):
        merge_sentencepiece(base, base, pad_token="<s>")


def test_tool_prints_the_report_for_the_mode_used(assets, chinese_model, corpus, tmp_path, capsys):
    _, held_out = corpus
    eval_text = tmp_path / "eval.txt"
    eval_text.write_text("\n".join(held_out[:100] + ENGLISH[:20]) + "\n", encoding="utf-8")
    argv = [
        "--base",
        str(assets.mistral_sp_model),
        "--chinese",
        str(chinese_model),
        "--out",
        str(tmp_path / "out"),
    ]
    assert merge_tool([*argv, "--pad-token", "--eval-text", str(eval_text)]) == 0
    out = capsys.readouterr().out
    assert "+ [PAD] (id" in out and "score mode rank" in out
    assert "base (SentencePiece): " in out and "tokens per Chinese character" in out
    assert "tokens per English word" in out
    assert "HF ids == SentencePiece ids on 100.0% of lines (0 of 120 differ)" in out
    assert AutoTokenizer.from_pretrained(tmp_path / "out").pad_token == "[PAD]"


def test_tool_reports_a_missing_base_without_a_traceback(chinese_model, tmp_path, capsys):
    argv = [
        "--base",
        str(tmp_path / "nope.model"),
        "--chinese",
        str(chinese_model),
        "--out",
        str(tmp_path / "o"),
    ]
    assert merge_tool(argv) == 1
    assert "nope.model does not exist" in capsys.readouterr().err
