"""Embedding resize (zhjax.tokenizer.resize): old rows bitwise, each initialisation as specified.

The `mean` init is compared with transformers' own `resize_token_embeddings` initialisation (torch);
`subword_source_ids` is checked on a real SentencePiece merge (Mistral base + a Chinese model trained here).
"""

from __future__ import annotations

import re
import shutil

import ml_dtypes
import numpy as np
import pytest
from transformers import AutoTokenizer

from zhjax.tokenizer.merge import merge_tokenizers
from zhjax.tokenizer.resize import INITS, resize_embedding, subword_source_ids
from zhjax.tokenizer.train import SentencePieceTrainConfig, train_sentencepiece


def old_embedding(vocab: int = 400, dim: int = 24, dtype=np.float32) -> np.ndarray:
    """Rows with a non-zero mean and correlated dims, like a trained embedding."""
    rng = np.random.default_rng(7)
    mixing = rng.normal(size=(dim, dim)) / np.sqrt(dim)
    return (rng.normal(0.3, 1.0, size=(vocab, dim)) @ mixing * 0.05 + 0.01).astype(dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16])
@pytest.mark.parametrize("init", INITS)
def test_old_rows_are_bitwise_unchanged(init, dtype):
    old = old_embedding(dtype=dtype)
    sources = [[i, i + 1] for i in range(30)]
    new = resize_embedding(old, 430, init, source_ids=sources, rng_seed=1)
    assert new.shape == (430, 24) and new.dtype == old.dtype
    assert new[:400].tobytes() == old.tobytes()
    assert np.all(np.isfinite(new.astype(np.float32)))


def test_logits_of_old_tokens_are_unchanged_tied_and_untied():
    embed, head = old_embedding(), old_embedding()[::-1].copy()
    hidden = np.random.default_rng(0).normal(size=(5, 24)).astype(np.float32)
    for matrix in (embed, head):  # untied: each matrix resized; tied: the same matrix serves both
        grown = resize_embedding(matrix, 450, "normal")
        assert np.array_equal((hidden @ grown.T)[:, :400], hidden @ matrix.T)


def test_normal_init_draws_from_n_0_002_reproducibly():
    old = old_embedding(vocab=50, dim=64)
    new = resize_embedding(old, 50 + 4000, "normal", rng_seed=3)[50:]
    assert abs(new.mean()) < 1e-3 and new.std() == pytest.approx(0.02, rel=0.03)
    assert np.array_equal(new, resize_embedding(old, 4050, "normal", rng_seed=3)[50:])
    assert not np.array_equal(new, resize_embedding(old, 4050, "normal", rng_seed=4)[50:])
    assert resize_embedding(old, 4050, "normal", std=0.5)[50:].std() == pytest.approx(0.5, rel=0.03)


def transformers_mean_rows(old: np.ndarray, added: int) -> np.ndarray:
    torch = pytest.importorskip("torch")
    from transformers import PreTrainedModel

    old_emb = torch.nn.Embedding(*old.shape)
    old_emb.weight.data = torch.from_numpy(old.copy())
    new_emb = torch.nn.Embedding(old.shape[0] + added, old.shape[1])
    torch.manual_seed(0)
    # the method does not use `self`; it is what resize_token_embeddings(mean_resizing=True) calls
    PreTrainedModel._init_added_embeddings_weights_with_mean(None, old_emb, new_emb, old.shape[0], added)
    return new_emb.weight.data[-added:].numpy()


def test_mean_init_matches_transformers_resize():
    old = old_embedding()
    ours = resize_embedding(old, 460, "mean", rng_seed=0)[400:]
    theirs = transformers_mean_rows(old, 60)
    mean = old.mean(axis=0)
    scale = old.std()
    # both are the mean plus noise of covariance 1e-9 * cov (std ~ 3e-5 of the rows' spread)
    assert np.abs(ours - mean).max() < 1e-3 * scale and np.abs(theirs - mean).max() < 1e-3 * scale
    noise = (ours - mean).std() / (np.sqrt(1e-9) * old.std(axis=0).mean())
    assert 0.2 < noise < 5
    assert len({row.tobytes() for row in ours}) == 60  # a draw per row, not 60 copies
    np.testing.assert_allclose(ours, theirs, atol=1e-3 * scale)


def test_mean_init_is_the_plain_mean_when_the_covariance_is_singular():
    old = old_embedding(vocab=10, dim=24)  # 10 rows in 24 dims: rank-deficient covariance
    ours = resize_embedding(old, 15, "mean")[10:]
    np.testing.assert_allclose(ours, np.broadcast_to(old.mean(axis=0), ours.shape), rtol=0, atol=1e-7)
    np.testing.assert_allclose(ours, transformers_mean_rows(old, 5), rtol=0, atol=1e-7)


def test_subword_rows_are_the_means_of_their_source_rows():
    old = old_embedding()
    sources = [[5], [1, 2, 3], [399, 0], [7, 7, 8], []]
    new = resize_embedding(old, 405, "subword", source_ids=sources)
    assert np.array_equal(new[400], old[5])
    np.testing.assert_allclose(new[401], (old[1] + old[2] + old[3]) / 3, rtol=1e-6)
    np.testing.assert_allclose(new[402], (old[399] + old[0]) / 2, rtol=1e-6)
    np.testing.assert_allclose(new[403], (2 * old[7] + old[8]) / 3, rtol=1e-6)
    np.testing.assert_allclose(new[404], old.mean(axis=0), rtol=1e-5)  # empty: mean of all rows


def test_bad_arguments_are_named():
    old = old_embedding()
    with pytest.raises(ValueError, match="smaller than the embedding's 400 rows"):
        resize_embedding(old, 300)
    with pytest.raises(ValueError, match="init='zeros'"):
        resize_embedding(old, 410, "zeros")
    with pytest.raises(ValueError, match="needs source_ids"):
        resize_embedding(old, 410, "subword")
    with pytest.raises(ValueError, match="has 2 entries but the resize adds 10 rows"):
        resize_embedding(old, 410, "subword", source_ids=[[1], [2]])
    with pytest.raises(ValueError, match=re.escape("source_ids[1] = [400]")):
        resize_embedding(old, 402, "subword", source_ids=[[1], [400]])
    with pytest.raises(ValueError, match="expected a \\[vocab, dim\\] matrix"):
        resize_embedding(old[0], 410)


@pytest.fixture(scope="module")
def sp_merge(assets, tmp_path_factory):
    """HF base (AutoTokenizer on a dir holding only Mistral's tokenizer.model) and a merged dir with [PAD]."""
    tmp = tmp_path_factory.mktemp("resize_sp")
    lines = [line for line in open(assets.corpus_text, encoding="utf-8") if line.strip()][:2000]
    (tmp / "train.txt").write_text("".join(lines), encoding="utf-8")
    config = SentencePieceTrainConfig(vocab_size=4000, model_type="bpe", num_threads=2)
    zh = train_sentencepiece([tmp / "train.txt"], tmp / "zh", config).model_file
    merge_tokenizers(assets.mistral_sp_model, zh, tmp / "merged", pad_token="[PAD]")
    (tmp / "base").mkdir()
    shutil.copyfile(assets.mistral_sp_model, tmp / "base" / "tokenizer.model")
    return AutoTokenizer.from_pretrained(tmp / "base"), AutoTokenizer.from_pretrained(tmp / "merged")


def piece_bytes(piece: str) -> bytes:
    match = re.fullmatch(r"<0x([0-9A-F]{2})>", piece)
    return bytes([int(match[1], 16)]) if match else piece.encode("utf-8")


def test_subword_sources_for_a_sentencepiece_merge_spell_each_piece(sp_merge):
    base, merged = sp_merge
    assert len(base) == 32000
    sources = subword_source_ids(base, merged, 32000)
    assert len(sources) == len(merged) - 32000 and sources[-1] == []  # [PAD] is special: mean of all rows
    for offset, ids in enumerate(sources[:-1]):
        piece = merged.convert_ids_to_tokens(32000 + offset)
        assert ids and max(ids) < 32000
        # '▁' stays the word-start marker on both sides; characters Mistral lacks come back as byte pieces
        assert b"".join(piece_bytes(p) for p in base.convert_ids_to_tokens(ids)) == piece.encode("utf-8"), (
            piece
        )


def test_subword_sources_reject_ids_past_the_old_rows_and_non_tokenizers(sp_merge):
    base, merged = sp_merge
    with pytest.raises(ValueError, match="not all below old_vocab_size=100"):
        subword_source_ids(base, merged, 100)
    with pytest.raises(TypeError, match="expected a tokenizers-backed HF tokenizer"):
        subword_source_ids(object(), merged, 32000)
