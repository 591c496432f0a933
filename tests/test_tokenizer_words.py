"""The "words" form of the byte-level BPE extension (zhjax.tokenizer.bpe, `form="words"`): the learned merges'
results of two or more characters added as tokens, every other character left to SmolLM2's own BPE.

References: `tokenizers`/transformers (SmolLM2's own tokenizer, AutoTokenizer on the written dir); the expected
segmentations are built here from the base tokenizer and the word list, not by the code under test.
"""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from tests.test_tokenizer_bpe import ENGLISH, MIXED
from zhjax.tokenizer.bpe import byte_level_decoder_table, byte_level_form, extend_bpe_tokenizer
from zhjax.tokenizer.merge import tokenization_report
from zhjax.tokenizer.resize import subword_source_ids
from zhjax.tokenizer.transfer import align_chunks

MERGES = 3000


@pytest.fixture(scope="module")
def corpus(assets, tmp_path_factory):
    lines = [line.rstrip("\n") for line in open(assets.corpus_text, encoding="utf-8") if line.strip()]
    train = tmp_path_factory.mktemp("words_corpus") / "train.txt"
    train.write_text("\n".join(lines[:4000]) + "\n", encoding="utf-8")
    return train, lines[-300:]


@pytest.fixture(scope="module")
def words(assets, corpus, tmp_path_factory):
    train, _ = corpus
    out = tmp_path_factory.mktemp("smollm2_words")
    result = extend_bpe_tokenizer(assets.smollm2_dir, [train], MERGES, out, form="words")
    merges = extend_bpe_tokenizer(assets.smollm2_dir, [train], MERGES, tmp_path_factory.mktemp("smollm2_merges"))
    return result, merges, AutoTokenizer.from_pretrained(assets.smollm2_dir), AutoTokenizer.from_pretrained(out)


def _new_words(tok, base_size):
    return [tok.convert_ids_to_tokens(i) for i in range(base_size, len(tok))]


def test_the_new_tokens_are_the_merges_words_of_two_or_more_characters(assets, words):
    result, merges, base, ext = words
    new = _new_words(ext, len(base))
    assert result.added_tokens == len(new) and result.added_merges == 0
    merged_tok = AutoTokenizer.from_pretrained(merges.out_dir)
    merged_texts = [merged_tok.decode([i]) for i in range(len(base), len(merged_tok))]
    expected = [t for t in merged_texts if len(t) >= 2 and "\ufffd" not in t]
    assert new == expected  # the same order as the merges that made them
    assert 1000 < len(new) < MERGES  # (3000 merges: about half are single characters)
    spec = json.loads((result.out_dir / "tokenizer.json").read_text(encoding="utf-8"))
    base_spec = json.loads((assets.smollm2_dir / "tokenizer.json").read_text(encoding="utf-8"))
    assert spec["model"] == base_spec["model"]  # vocab and merges untouched
    added = spec["added_tokens"][len(base_spec["added_tokens"]):]
    assert spec["added_tokens"][: len(base_spec["added_tokens"])] == base_spec["added_tokens"]
    assert [t["id"] for t in added] == list(range(len(base), len(base) + len(new)))
    assert not any(t["special"] or t["normalized"] for t in added)


def test_a_character_outside_every_word_keeps_the_base_spelling(words):
    _, _, base, ext = words
    vocab = set(_new_words(ext, len(base)))
    singles = [c for c in "的是在了和有我他这中大来上国个到说们为子" if c not in vocab]
    assert singles
    for c in singles:
        assert ext.encode(c, add_special_tokens=False) == base.encode(c, add_special_tokens=False), c


def test_chinese_is_segmented_leftmost_longest_into_words_and_base_pieces(corpus, words):
    _, held_out = corpus
    _, _, base, ext = words
    vocab = {w: i for i, w in enumerate(_new_words(ext, len(base)), start=len(base))}
    longest = max(map(len, vocab))

    def expected(text):  # leftmost-longest match of the words, the base's BPE on the rest
        ids, i, rest = [], 0, ""
        while i < len(text):
            word = next((text[i:i + n] for n in range(min(longest, len(text) - i), 1, -1) if text[i:i + n] in vocab),
                        None)
            if word is None:
                rest += text[i]
                i += 1
                continue
            ids += base.encode(rest, add_special_tokens=False) if rest else []
            ids.append(vocab[word])
            rest, i = "", i + len(word)
        return ids + (base.encode(rest, add_special_tokens=False) if rest else [])

    for line in held_out[:100]:
        assert ext.encode(line, add_special_tokens=False) == expected(line), line
    before = tokenization_report(lambda s: base.encode(s, add_special_tokens=False), held_out)
    after = tokenization_report(lambda s: ext.encode(s, add_special_tokens=False), held_out)
    assert after.tokens_per_zh_char < 0.8 * before.tokens_per_zh_char  # 1.89 -> 1.39 with 1472 words


def test_english_ids_are_unchanged_and_text_round_trips(corpus, words):
    _, held_out = corpus
    _, _, base, ext = words
    for line in ENGLISH + ["The quick brown fox jumps over the lazy dog. 1998: +8.8% GDP growth!"]:
        assert ext.encode(line) == base.encode(line), line
    for text in MIXED + held_out[:50]:
        assert ext.decode(ext.encode(text, add_special_tokens=False)) == text


def test_sources_spell_each_word_and_alignment_counts_its_bytes(corpus, words):
    """The resize's pieces of a word are the base's tokens of its text; the transfer's alignment finds, for each
    word, the base position that ends at the same byte."""
    _, held_out = corpus
    _, _, base, ext = words
    sources = subword_source_ids(base, ext, len(base))
    table = byte_level_decoder_table()
    for offset, ids in enumerate(sources):
        word = ext.convert_ids_to_tokens(len(base) + offset)
        assert "".join(base.convert_ids_to_tokens(ids)) == byte_level_form(word)
        assert bytes(table[c] for c in byte_level_form(word)).decode("utf-8") == word
    chunks = align_chunks(base, ext, held_out[:20], chunk_tokens=64)
    for r in range(len(chunks.ext_ids)):
        n = int(chunks.ext_mask[r].sum())
        ext_text = ext.decode(chunks.ext_ids[r, 1:n].tolist())
        for k in range(1, n):  # the base prefix up to the aligned position spells the extended prefix
            a = int(chunks.align[r, k])
            assert base.decode(chunks.base_ids[r, 1:a + 1].tolist()) == ext.decode(chunks.ext_ids[r, 1:k + 1].tolist())
        assert ext_text


def test_unknown_form_is_refused_before_any_work(assets, tmp_path):
    with pytest.raises(ValueError, match="form='chars': expected one of"):
        extend_bpe_tokenizer(assets.smollm2_dir, [tmp_path / "missing.txt"], 10, tmp_path / "out", form="chars")
    assert not (tmp_path / "out").exists()
