"""The merged SentencePiece tokenizer's HF files agree with SentencePiece around user-defined pieces.

Issue 17, item 8: with `<sep>` and `<mask>` user-defined in the base, HF added a `▁` after `<sep>`
(`hello<sep>world`) and dropped the one before `<mask>` (`a <mask> b`). What still differs is stated by the tool.
"""

from __future__ import annotations

import pytest

LINES = ["hello<sep>world", "a <mask> b", "<sep>start", "x  <sep>  y", "今天<sep>天气很好", "end<mask>",
         " lead <sep>", "<sep><mask>", "hello <sep> 世界", "<mask> ", "我们在北京<sep>上海<mask>广州。", "plain line"]


@pytest.fixture(scope="module")
def merged_with_user_defined(seed_dir, tmp_path_factory):
    from zhjax.tokenizer.merge import USER_DEFINED, load_sp_proto, merge_sentencepiece, save_merged_tokenizer

    base = load_sp_proto(seed_dir / "llama_tokenizer_32000.model")
    for piece in ("<sep>", "<mask>"):
        entry = base.pieces.add()
        entry.piece, entry.score, entry.type = piece, 0.0, USER_DEFINED
    result = merge_sentencepiece(base, load_sp_proto(seed_dir / "chinese_sp.model"))
    out = tmp_path_factory.mktemp("ud") / "tok"
    save_merged_tokenizer(result.proto, out)
    return out, result.proto


def test_hf_ids_equal_sentencepiece_ids_around_user_defined_pieces(merged_with_user_defined):
    import sentencepiece as spm
    from transformers import AutoTokenizer

    out, _ = merged_with_user_defined
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    hf = AutoTokenizer.from_pretrained(out)
    differing = [(line, sp.encode(line, out_type=str), hf.tokenize(line))
                 for line in LINES if sp.encode(line) != hf.encode(line, add_special_tokens=False)]
    assert differing == []
    assert all(hf.decode(hf.encode(line, add_special_tokens=False)) == sp.decode(sp.encode(line)) for line in LINES)


def test_the_remaining_differences_are_stated_and_real(merged_with_user_defined):
    import sentencepiece as spm
    from transformers import AutoTokenizer

    from zhjax.tokenizer.merge import known_differences

    out, proto = merged_with_user_defined
    stated = known_differences(proto)
    assert any("control piece" in s and "</s>" in s for s in stated)
    assert any("exactly one user-defined piece" in s for s in stated)
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    hf = AutoTokenizer.from_pretrained(out)
    for line in ("a </s> b", "<sep>"):  # each stated case does differ (the statement is not a guess)
        assert sp.encode(line) != hf.encode(line, add_special_tokens=False)
