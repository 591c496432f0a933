"""SentencePiece training (zhjax.tokenizer.train, tools/train_tokenizer.py) on the real People's Daily text."""

from __future__ import annotations

import itertools

import pytest
import sentencepiece as spm

from tools.train_tokenizer import main as train_tool
from zhjax.tokenizer.train import SentencePieceTrainConfig, iter_corpus_lines, train_sentencepiece

MIXED = [
    "混合文本：Hello, 世界! 2024年3月15日，价格是￥1,299.99元。",
    "emoji 😀🎉👍🏽 and rare characters 𠀀𪚥龘䶮 in one line",
    "数字 0123456789 与全角数字 １２３ and ＡＢＣ",
    "  leading, double  and trailing spaces  ",
    "tabs\tand\nnewlines, Ωmega, naïve café, Привет, こんにちは",
]


@pytest.fixture(scope="module")
def corpus_dir(assets, tmp_path_factory):
    """Two files in nested folders (3000 + 1000 lines of the corpus) and a blank-line-only file."""
    lines = list(itertools.islice(open(assets.corpus_text, encoding="utf-8"), 4000))
    root = tmp_path_factory.mktemp("corpus")
    (root / "a").mkdir()
    (root / "a" / "part1.txt").write_text("".join(lines[:3000]), encoding="utf-8")
    (root / "b" / "c").mkdir(parents=True)
    (root / "b" / "c" / "part2.txt").write_text("\n\n" + "".join(lines[3000:]), encoding="utf-8")
    (root / "empty.txt").write_text("\n   \n", encoding="utf-8")
    return root, [line.strip() for line in lines if line.strip()]


def test_iter_corpus_lines_streams_every_nonempty_line_of_a_directory(corpus_dir):
    root, expected = corpus_dir
    seen = []
    assert list(iter_corpus_lines([root], on_progress=seen.append, report_every=1000)) == expected
    assert seen[-1].lines == len(expected) and seen[-1].files == 3
    assert len(seen) == len(expected) // 1000 + 1  # every 1000 lines, and once at the end


def test_missing_input_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        list(iter_corpus_lines([tmp_path / "nope.txt"]))


@pytest.mark.parametrize("model_type", ["unigram", "bpe"])
def test_trains_a_model_of_the_requested_size_and_type(corpus_dir, tmp_path, model_type):
    root, lines = corpus_dir
    config = SentencePieceTrainConfig(
        vocab_size=5000, model_type=model_type, num_threads=2, input_sentence_size=2500
    )
    result = train_sentencepiece([root], tmp_path / "zh", config)
    sp = spm.SentencePieceProcessor(model_file=str(result.model_file))
    assert result.vocab_size == sp.get_piece_size() == 5000
    assert result.progress.lines == len(lines)  # all read, 2500 sampled for training
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(result.model_file.read_bytes())
    assert pb.TrainerSpec.ModelType.Name(proto.trainer_spec.model_type).lower() == model_type
    assert proto.trainer_spec.character_coverage == pytest.approx(0.9995)
    # Chinese words become pieces: far fewer pieces than characters on the training text
    text = "".join(lines[:200])
    assert len(sp.encode(text)) < 0.8 * len(text)


def test_byte_fallback_identity_model_round_trips_mixed_text(corpus_dir, tmp_path):
    root, _ = corpus_dir
    config = SentencePieceTrainConfig(
        vocab_size=5000,
        num_threads=2,
        byte_fallback=True,
        normalization_rule_name="identity",
        input_sentence_size=2000,  # a sample of the 4000 lines
        extra_options={"remove_extra_whitespaces": False},
    )
    sp = spm.SentencePieceProcessor(
        model_file=str(train_sentencepiece([root], tmp_path / "zh", config).model_file)
    )
    for text in MIXED:
        assert sp.decode(sp.encode(text)) == text


def test_too_small_vocab_fails_with_the_inputs_named(corpus_dir, tmp_path):
    root, _ = corpus_dir
    with pytest.raises(RuntimeError, match="Vocabulary size is smaller than required_chars") as err:
        train_sentencepiece([root], tmp_path / "zh", SentencePieceTrainConfig(vocab_size=100, num_threads=2))
    assert str(root) in str(err.value)


def test_config_rejects_unknown_model_type():
    with pytest.raises(ValueError, match="model_type='wordpiece'"):
        SentencePieceTrainConfig(model_type="wordpiece")


def test_tool_prints_progress_and_tokens_per_character(corpus_dir, tmp_path, capsys):
    root, _ = corpus_dir
    argv = ["--input", str(root), "--model-prefix", str(tmp_path / "zh"), "--vocab-size", "5000"]
    assert train_tool([*argv, "--model-type", "bpe", "--num-threads", "2", "--report-every", "1000"]) == 0
    out = capsys.readouterr().out
    assert "read 1,000 lines" in out and "read 4,000 lines" in out
    assert "(5000 pieces, bpe)" in out
    assert "tokens per Chinese character" in out and "tokens per English word" in out
    assert (tmp_path / "zh.model").is_file() and (tmp_path / "zh.vocab").is_file()
