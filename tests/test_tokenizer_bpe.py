"""Byte-level BPE extension of SmolLM2's tokenizer (zhjax.tokenizer.bpe, tools/merge_tokenizers.py --kind bpe).

References: `tokenizers`/transformers (the base tokenizer, AutoTokenizer on the written dir) and, for the
resize report, transformers' LlamaForCausalLM on SmolLM2's real weights.
"""

from __future__ import annotations

import argparse
import inspect
import json
import textwrap

import numpy as np
import pytest
from tokenizers import pre_tokenizers
from transformers import AutoTokenizer

from tools.merge_tokenizers import main as merge_tool
from zhjax.tokenizer.bpe import byte_level_decoder_table, extend_bpe_tokenizer
from zhjax.tokenizer.merge import tokenization_report
from zhjax.tokenizer.resize import INITS, resize_embedding, subword_source_ids

NEW_TOKENS = 6000
MIXED = [
    "混合文本：Hello, 世界! 2024年3月15日，价格是￥1,299.99元。",
    "emoji 😀🎉👍🏽 and rare characters 𠀀𪚥龘䶮 in one line",
    "数字 0123456789 与全角数字 １２３ and ＡＢＣ",
    "Code: def f(x): return x ** 2  # two spaces",
    "  leading, double  and trailing spaces  ",
    "tabs\tand\nnewlines, Ωmega, naïve café, Привет, こんにちは",
    "<|im_start|>user\n你好<|im_end|>",
]
ENGLISH = [
    line for mod in (argparse, json, textwrap) for line in inspect.getdoc(mod).splitlines() if line.strip()
]


@pytest.fixture(scope="module")
def corpus(assets, tmp_path_factory):
    lines = [line.rstrip("\n") for line in open(assets.corpus_text, encoding="utf-8") if line.strip()]
    train = tmp_path_factory.mktemp("bpe_corpus") / "train.txt"
    train.write_text("\n".join(lines[:8000]) + "\n", encoding="utf-8")
    return train, lines[-1000:]


@pytest.fixture(scope="module")
def extended(assets, corpus, tmp_path_factory):
    train, _ = corpus
    out = tmp_path_factory.mktemp("smollm2_zh")
    return extend_bpe_tokenizer(assets.smollm2_dir, [train], NEW_TOKENS, out)


@pytest.fixture(scope="module")
def tokenizers_pair(assets, extended):
    return AutoTokenizer.from_pretrained(assets.smollm2_dir), AutoTokenizer.from_pretrained(extended.out_dir)


def test_chinese_cost_falls_to_at_most_0_8_tokens_per_character(corpus, tokenizers_pair):
    _, held_out = corpus
    base, ext = tokenizers_pair
    before = tokenization_report(lambda s: base.encode(s, add_special_tokens=False), held_out)
    after = tokenization_report(lambda s: ext.encode(s, add_special_tokens=False), held_out)
    print(
        f"SmolLM2 + {NEW_TOKENS}: {before.tokens_per_zh_char:.3f} -> {after.tokens_per_zh_char:.3f} tokens/char"
    )
    assert before.tokens_per_zh_char > 1.5
    assert after.tokens_per_zh_char <= 0.8


def test_english_ids_are_unchanged(tokenizers_pair):
    base, ext = tokenizers_pair
    for line in ENGLISH + ["The quick brown fox jumps over the lazy dog. 1998: +8.8% GDP growth!"]:
        assert ext.encode(line) == base.encode(line), line


def test_existing_ids_merges_and_special_tokens_are_kept(assets, extended):
    base = json.loads((assets.smollm2_dir / "tokenizer.json").read_text(encoding="utf-8"))
    new = json.loads((extended.out_dir / "tokenizer.json").read_text(encoding="utf-8"))
    base_vocab, new_vocab = base["model"]["vocab"], new["model"]["vocab"]
    assert {t: new_vocab[t] for t in base_vocab} == base_vocab
    assert new["model"]["merges"][: len(base["model"]["merges"])] == base["model"]["merges"]
    assert len(new["model"]["merges"]) == len(base["model"]["merges"]) + extended.added_merges
    assert new["added_tokens"] == base["added_tokens"]
    for key in ("normalizer", "pre_tokenizer", "post_processor", "decoder"):
        assert new[key] == base[key], key
    added_ids = sorted(set(new_vocab.values()) - set(base_vocab.values()))
    assert (
        added_ids == list(range(len(base_vocab), len(base_vocab) + NEW_TOKENS))
        and extended.added_tokens == NEW_TOKENS
    )
    for name in ("tokenizer_config.json", "chat_template.jinja"):
        assert (extended.out_dir / name).read_bytes() == (assets.smollm2_dir / name).read_bytes()


def test_hf_dir_loads_with_the_same_special_tokens(tokenizers_pair):
    base, ext = tokenizers_pair
    assert len(ext) == len(base) + NEW_TOKENS
    for name in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        assert getattr(ext, name) == getattr(base, name), name
    assert ext.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False
    ) == base.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)


def test_round_trip_on_mixed_text(corpus, tokenizers_pair):
    _, held_out = corpus
    _, ext = tokenizers_pair
    for text in MIXED + held_out[:50]:
        assert ext.decode(ext.encode(text, add_special_tokens=False)) == text


def test_byte_level_table_is_the_tokenizers_alphabet():
    table = byte_level_decoder_table()
    assert set(table) == set(pre_tokenizers.ByteLevel.alphabet())
    assert sorted(table.values()) == list(range(256))
    text = "Hello 世界 😀 \t\n naïve"
    pieces = pre_tokenizers.ByteLevel(add_prefix_space=False).pre_tokenize_str(text)
    assert bytes(table[c] for piece, _ in pieces for c in piece) == text.encode("utf-8")


def test_rejects_a_base_that_is_not_byte_level_bpe(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}.*no tokenizer.json"):
        extend_bpe_tokenizer(tmp_path, [tmp_path], 10, tmp_path / "out")
    spec = {"version": "1.0", "model": {"type": "WordLevel", "vocab": {"a": 0}}, "pre_tokenizer": None}
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match="expected a byte-level BPE tokenizer"):
        extend_bpe_tokenizer(tmp_path, [tmp_path], 10, tmp_path / "out")


def test_subword_sources_spell_each_new_token_with_base_tokens(tokenizers_pair):
    base, ext = tokenizers_pair
    sources = subword_source_ids(base, ext, len(base))
    assert len(sources) == NEW_TOKENS
    for offset, ids in enumerate(sources):
        assert ids and max(ids) < len(base)
        assert "".join(base.convert_ids_to_tokens(ids)) == ext.convert_ids_to_tokens(len(base) + offset)


def test_tool_prints_the_report(assets, corpus, tmp_path, capsys):
    train, held_out = corpus
    eval_text, small = tmp_path / "eval.txt", tmp_path / "small.txt"
    eval_text.write_text("\n".join(held_out[:100]) + "\n", encoding="utf-8")
    small.write_text("".join(open(train, encoding="utf-8").readlines()[:2000]), encoding="utf-8")
    argv = ["--kind", "bpe", "--base", str(assets.smollm2_dir), "--corpus", str(small), "--new-tokens", "500"]
    assert merge_tool([*argv, "--out", str(tmp_path / "out"), "--eval-text", str(eval_text)]) == 0
    out = capsys.readouterr().out
    assert "49152 base + 500 new" in out
    assert "base: " in out and "extended: " in out and "tokens per Chinese character" in out
    assert "same ids as the base on 6 of 6 English lines" in out


@pytest.mark.slow
def test_resize_report_subword_init_starts_with_the_lowest_chinese_loss(assets, corpus, tokenizers_pair):
    """Issue 3 point 4's report: SmolLM2's loss per character on held-out Chinese right after the resize."""
    torch = pytest.importorskip("torch")
    from transformers import LlamaForCausalLM

    _, held_out = corpus
    base, ext = tokenizers_pair
    model = LlamaForCausalLM.from_pretrained(assets.smollm2_dir, dtype=torch.float32).eval()
    old = model.get_input_embeddings().weight.detach().numpy().copy()
    lines = [line for line in held_out if 40 <= len(line) <= 120][:6]
    chars = sum(len(line) for line in lines)

    def loss_per_char(tokenizer) -> float:
        """Summed next-token loss (nats) over the lines, one padded batch, divided by their characters."""
        rows = [[tokenizer.bos_token_id, *tokenizer.encode(line, add_special_tokens=False)] for line in lines]
        width = max(map(len, rows))
        ids = torch.tensor([row + [0] * (width - len(row)) for row in rows])
        mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows])
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
        return float((nll * mask[:, 1:]).sum()) / chars

    results = {"base tokenizer": loss_per_char(base)}
    sources = subword_source_ids(base, ext, len(base))
    model.resize_token_embeddings(len(ext), mean_resizing=False)
    for init in INITS:
        rows = resize_embedding(old, len(ext), init, source_ids=sources, rng_seed=0)
        assert np.array_equal(rows[: len(old)], old)
        model.get_input_embeddings().weight.data = torch.from_numpy(rows)
        model.tie_weights()
        assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
        results[init] = loss_per_char(ext)
    print("loss per character right after resize:", {k: round(v, 3) for k, v in results.items()})
    assert results["subword"] < min(results["normal"], results["mean"])
