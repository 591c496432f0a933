"""The recipe's held-out bits per character (`zhjax.eval.hf.bits_per_character`), batched longest first, equals
the same text scored one line at a time by `transformers`' own loss."""

from __future__ import annotations

import math

import pytest

from tests.extras import needs_torch

pytestmark = needs_torch


@pytest.fixture(scope="module")
def smollm2(assets):
    from zhjax.eval.hf import load_hf

    return load_hf(str(assets.smollm2_dir))


def _reference_bits_per_char(model, tok, lines):
    """Each line alone, BOS first, mean loss times the number of predicted tokens (HF's own shift and loss)."""
    import torch

    nll, chars = 0.0, 0
    for line in lines:
        ids = tok(line, add_special_tokens=False)["input_ids"]
        row = torch.tensor([[tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id, *ids]])
        with torch.no_grad():
            nll += float(model(input_ids=row, labels=row).loss) * len(ids)
        chars += len(line)
    return nll / chars / math.log(2)


def test_batched_bits_per_char_equals_line_by_line_loss(assets, smollm2):
    from zhjax.eval.hf import bits_per_character

    model, tok = smollm2
    text = assets.corpus_text.read_text(encoding="utf-8").splitlines()
    lines = [x for x in text[:400] if x][::20][:14] + ["", "短。", "English words, 混合 text."]
    got = bits_per_character(model, tok, lines, batch_tokens=256)  # several batches of different widths
    assert got.characters == sum(len(x) for x in lines)
    assert got.tokens == sum(len(tok(x, add_special_tokens=False)["input_ids"]) for x in lines)
    assert got.bits_per_char == pytest.approx(_reference_bits_per_char(model, tok, [x for x in lines if x]), rel=1e-5)


def test_bfloat16_scoring_runs_in_bf16_and_stays_within_a_hundredth_of_a_bit_of_float32(assets, smollm2):
    from zhjax.eval.hf import bits_per_character

    model, tok = smollm2
    lines = [x for x in assets.corpus_text.read_text(encoding="utf-8").splitlines()[:400] if x][::20][:14]
    full = bits_per_character(model, tok, lines, max_tokens=None)
    half = bits_per_character(model, tok, lines, max_tokens=None, dtype="bfloat16")
    assert half.bits_per_char != full.bits_per_char  # the products did run in bf16
    assert half.bits_per_char == pytest.approx(full.bits_per_char, abs=0.01)
    assert (half.tokens, half.characters) == (full.tokens, full.characters)
    with pytest.raises(ValueError, match=r"dtype 'float16': expected one of \('auto', 'float32', 'bfloat16'\)"):
        bits_per_character(model, tok, lines, dtype="float16")


def test_long_lines_are_cut_with_their_characters(smollm2):
    from zhjax.eval.hf import bits_per_character

    model, tok = smollm2
    line = "中华人民共和国成立以来，" * 20
    got = bits_per_character(model, tok, [line], max_tokens=16)
    kept = tok(line, add_special_tokens=False)["input_ids"][:16]
    assert got.tokens == 16 and got.characters == len(tok.decode(kept))
    assert got.bits_per_char == pytest.approx(_reference_bits_per_char(model, tok, [tok.decode(kept)]), rel=1e-5)


def test_a_character_cut_scores_the_same_text_under_any_tokenizer(smollm2):
    """The recipe compares tokenizers on held-out text: a cut in tokens (512 of them) kept 275 characters of a
    paragraph under SmolLM2's tokenizer and 730 under the extended one; a cut in characters keeps the same text."""
    from zhjax.eval.hf import bits_per_character

    model, tok = smollm2
    line = "中华人民共和国成立以来，" * 60  # 720 characters, over 1000 tokens under SmolLM2's tokenizer
    assert len(tok(line, add_special_tokens=False)["input_ids"]) > 1000
    got = bits_per_character(model, tok, [line, "短。"], max_chars=600, max_tokens=None)
    assert got.characters == 600 + 2
    assert got.tokens == sum(len(tok(x, add_special_tokens=False)["input_ids"]) for x in (line[:600], "短。"))
    assert got.bits_per_char == pytest.approx(_reference_bits_per_char(model, tok, [line[:600], "短。"]), rel=1e-5)
