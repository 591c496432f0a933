"""The distill transfer init (zhjax.tokenizer.transfer via resize_hf_checkpoint(init="distill")) on a tiny random
LLaMA, tied and untied, with the bundled tiny byte-level BPE extended by 60 Chinese tokens.

References: `transformers` builds the base and loads the resized dir; the comparison is against the base model's
own predictions under its own tokenizer, aligned by byte offsets, so nothing here is computed by the code under
test alone.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from transformers import AutoTokenizer

from tests.test_resize_model import CHINESE, OLD_VOCAB, make_hf_model
from zhjax.convert.resize_model import resize_hf_checkpoint
from zhjax.tokenizer.bpe import extend_bpe_tokenizer
from zhjax.tokenizer.transfer import TransferConfig, align_chunks

torch = pytest.importorskip("torch")
from transformers import AutoModelForCausalLM  # noqa: E402

# input rows distilled for a few steps (off by default, on here so that the path is tested), data-fitted outputs
TINY = TransferConfig(sample_characters=4000, chunk_tokens=32, batch_size=4, input_steps=20,
                      input_learning_rate=1e-2, output_steps=30, output_learning_rate=3e-2)
# output rows fitted to the base's own probability of each token's pieces
TINY_BASE = dataclasses.replace(TINY, input_steps=0, output_target="base")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from tests.test_resize_model import TINY_TOKENIZER

    tmp = tmp_path_factory.mktemp("transfer")
    sample = tmp / "sample.txt"
    sample.write_text("\n".join(CHINESE) + "\n", encoding="utf-8")
    ext = extend_bpe_tokenizer(TINY_TOKENIZER, [sample], 60, tmp / "extended").out_dir
    return tmp, sample, TINY_TOKENIZER, ext


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def grown(request, setup):
    tmp, sample, _, ext = setup
    base = make_hf_model(tmp / f"base-{request.param}", request.param)
    out = {}
    for name, init, cfg in (("subword", "subword", None), ("distill", "distill", TINY),
                            ("distill-new", "distill", dataclasses.replace(TINY, output_rows="new")),
                            ("distill-base", "distill", TINY_BASE)):
        out[name] = resize_hf_checkpoint(base, ext, tmp / f"{name}-{request.param}", init, seed=0,
                                         sample_files=[sample], transfer=cfg)
    return base, out


def _hf(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _aligned_scores(base_dir, model_dir, base_tok, new_tok, lines):
    """Tokenizer-aligned distances of the grown model from the base on `lines`, at the positions where both
    tokenizations end at the same byte: (mean KL of the base's next-token distribution to the grown model's,
    renormalised over the old vocab; mean |log p_grown(next extended token) - log p_base(its pieces in sequence)|
    over the positions followed by a new token; the grown model's mean loss per extended token)."""
    base, grown = _hf(base_dir), _hf(model_dir)
    chunks = align_chunks(base_tok, new_tok, lines, 32)
    with torch.no_grad():
        lb = base(input_ids=torch.tensor(chunks.base_ids, dtype=torch.long),
                  attention_mask=torch.tensor(chunks.base_mask, dtype=torch.long)).logits
        lg = grown(input_ids=torch.tensor(chunks.ext_ids, dtype=torch.long),
                   attention_mask=torch.tensor(chunks.ext_mask, dtype=torch.long)).logits
    align = torch.tensor(chunks.align, dtype=torch.long)
    base_logp = torch.log_softmax(lb, -1)
    pb = torch.gather(base_logp, 1, align[..., None].expand(-1, -1, lb.shape[-1]))
    pg = torch.log_softmax(lg[..., :OLD_VOCAB], -1)
    mask = torch.tensor(chunks.ext_mask)
    kl = ((pb.exp() * (pb - pg)).sum(-1) * mask).sum() / mask.sum()
    # log p_base of each base token given the ones before it, summed over each new token's pieces
    base_next = torch.tensor(chunks.base_ids[:, 1:], dtype=torch.long)
    piece = torch.gather(base_logp[:, :-1], -1, base_next[..., None])[..., 0]
    cum = torch.cat([torch.zeros_like(piece[:, :1]), piece.cumsum(1)], 1)
    grown_logp = torch.log_softmax(lg, -1)
    gaps = []
    for r in range(chunks.ext_ids.shape[0]):
        for j in range(int(mask[r].sum()) - 1):
            token = int(chunks.ext_ids[r, j + 1])
            if token < OLD_VOCAB:
                continue
            string = cum[r, chunks.align[r, j + 1]] - cum[r, chunks.align[r, j]]
            gaps.append(abs(float(grown_logp[r, j, token]) - float(string)))
    ext_next = torch.tensor(chunks.ext_ids[:, 1:], dtype=torch.long)
    nll = -(torch.gather(grown_logp[:, :-1], -1, ext_next[..., None])[..., 0] * mask[:, 1:]).sum() / mask[:, 1:].sum()
    return float(kl), float(np.mean(gaps)), float(nll)


def test_distill_is_closer_to_the_base_than_subword(grown, setup):
    base_dir, results = grown
    _, _, base_tok_dir, ext = setup
    base_tok, new_tok = AutoTokenizer.from_pretrained(base_tok_dir), AutoTokenizer.from_pretrained(ext)
    lines = sorted(set(CHINESE))
    kl_sub, gap_sub, nll_sub = _aligned_scores(base_dir, results["subword"].out_dir, base_tok, new_tok, lines)
    _, _, nll_dis = _aligned_scores(base_dir, results["distill"].out_dir, base_tok, new_tok, lines)
    kl_dis, _, _ = _aligned_scores(base_dir, results["distill-new"].out_dir, base_tok, new_tok, lines)
    _, gap_base, _ = _aligned_scores(base_dir, results["distill-base"].out_dir, base_tok, new_tok, lines)
    # input rows: after a new token, the next-token distribution over the old vocabulary is the base's (measured
    # with the old head rows kept, output_rows="new": the default also refits the old rows the sample predicts,
    # which moves that distribution on purpose)
    assert kl_dis < 0.5 * kl_sub, (kl_dis, kl_sub)
    # output rows, target "data": the sample's extended tokens are predicted better than with the pieces' mean
    assert nll_dis < nll_sub, (nll_dis, nll_sub)
    # output rows, target "base": p(new token) is the base's p(its pieces in sequence)
    assert gap_base < 0.5 * gap_sub, (gap_base, gap_sub)


def test_distill_unties_keeps_old_rows_and_loads_in_transformers(grown):
    base_dir, results = grown
    r = results["distill"]
    assert not r.tied and r.new_vocab_size == OLD_VOCAB + 60
    base, out = _hf(base_dir), _hf(r.out_dir)
    assert not out.config.tie_word_embeddings
    old_in, old_out = base.get_input_embeddings().weight, base.get_output_embeddings().weight
    assert torch.equal(out.get_input_embeddings().weight[:OLD_VOCAB], old_in)
    # the head's old rows: bit for bit, except those of the tokens the sample predicts (output_rows="seen")
    refit = r.transfer.head_old_ids
    assert 0 < len(refit) < OLD_VOCAB
    untouched = np.setdiff1d(np.arange(OLD_VOCAB), refit)
    head = out.get_output_embeddings().weight.detach().numpy()
    assert np.array_equal(head[untouched], old_out.detach().numpy()[untouched])
    assert np.array_equal(head[refit], r.transfer.head_old_rows)
    assert not np.allclose(head[refit], old_out.detach().numpy()[refit])
    # the new rows transformers loaded are the fitted ones, in and out different
    assert np.array_equal(out.get_input_embeddings().weight[OLD_VOCAB:].detach().numpy(), r.transfer.embed_rows)
    assert np.array_equal(head[OLD_VOCAB:], r.transfer.head_rows)
    assert not np.allclose(r.transfer.embed_rows, r.transfer.head_rows)
    # text made only of old tokens: the base's final states, so the base's logits wherever the head row was kept
    ids = torch.tensor([[1, 40, 41, 42, 43, 44]])
    with torch.no_grad():
        a, b = base(input_ids=ids).logits, out(input_ids=ids).logits[..., :OLD_VOCAB]
    assert torch.allclose(a[..., untouched], b[..., untouched], atol=1e-5)


def test_only_the_old_rows_the_sample_predicts_are_refitted(setup, grown):
    """`output_rows="seen"` (the default) refits the head rows of old tokens that occur in the sample's extended
    tokenization (and no others); `"new"` keeps every old head row bit for bit. (Whether the refit pays is measured on
    SmolLM2 by bench/resize_init.py: README "Where training starts".)"""
    _, sample, _, ext = setup
    base_dir, results = grown
    new_tok = AutoTokenizer.from_pretrained(ext)
    in_sample = {t for line in sample.read_text(encoding="utf-8").splitlines() if line
                 for t in new_tok.encode(line + "\n", add_special_tokens=False) if t < OLD_VOCAB}
    refit = set(results["distill"].transfer.head_old_ids.tolist())
    assert refit and refit <= in_sample, sorted(refit - in_sample)
    only_new = results["distill-new"]
    assert len(only_new.transfer.head_old_ids) == 0
    assert torch.equal(_hf(only_new.out_dir).get_output_embeddings().weight[:OLD_VOCAB],
                       _hf(base_dir).get_output_embeddings().weight)


def test_distill_is_deterministic_for_a_seed(setup, tmp_path):
    tmp, sample, _, ext = setup
    base = make_hf_model(tmp_path / "base", True)
    a = resize_hf_checkpoint(base, ext, tmp_path / "a", "distill", seed=3, sample_files=[sample], transfer=TINY)
    b = resize_hf_checkpoint(base, ext, tmp_path / "b", "distill", seed=3, sample_files=[sample], transfer=TINY)
    assert np.array_equal(a.transfer.embed_rows, b.transfer.embed_rows)
    assert np.array_equal(a.transfer.head_rows, b.transfer.head_rows)
    assert np.array_equal(a.transfer.head_old_rows, b.transfer.head_old_rows)


@pytest.mark.parametrize("target", ["data", "base"])
def test_the_output_fit_in_position_chunks_equals_the_fit_in_one(setup, tmp_path, target):
    """The fit's logits are computed `position_chunk` positions at a time (a large sample's full logits do not fit in
    memory: 200 k characters of SmolLM2's sample ran out of 23 GB): chunks, padding included, change nothing. In
    fp32 products: with the default bf16 ones the chunked and the whole fit measured up to 1.7e-3 apart after 30
    Adam steps (fp32 accumulation in another order); the bf16 fit's own test bounds it against fp32."""
    tmp, sample, _, ext = setup
    base = make_hf_model(tmp_path / "base", False)
    cfg = dataclasses.replace(TINY, input_steps=0, output_target=target, output_dtype="float32")
    one = resize_hf_checkpoint(base, ext, tmp_path / "one", "distill", seed=1, sample_files=[sample],
                               transfer=dataclasses.replace(cfg, position_chunk=1_000_000))
    many = resize_hf_checkpoint(base, ext, tmp_path / "many", "distill", seed=1, sample_files=[sample],
                                transfer=dataclasses.replace(cfg, position_chunk=37))
    assert one.transfer.positions > 5 * 37
    np.testing.assert_allclose(many.transfer.head_rows, one.transfer.head_rows, atol=2e-5)
    np.testing.assert_allclose(many.transfer.head_old_rows, one.transfer.head_old_rows, atol=2e-5)
    np.testing.assert_allclose(many.transfer.output_nll, one.transfer.output_nll, rtol=1e-5)


def test_a_sample_smaller_than_one_batch_of_windows_still_fits(setup, tmp_path):
    tmp, sample, _, ext = setup
    base = make_hf_model(tmp_path / "base", True)
    small = tmp_path / "small.txt"
    small.write_text(CHINESE[0] + "\n", encoding="utf-8")  # one line: fewer windows than `batch_size`
    out = resize_hf_checkpoint(base, ext, tmp_path / "out", "distill", seed=0, sample_files=[small], transfer=TINY)
    assert out.transfer.chunks < TINY.batch_size and np.isfinite(out.transfer.head_rows).all()


def test_distill_refuses_bad_input_before_writing(setup, tmp_path):
    tmp, sample, base_tok_dir, ext = setup
    base = make_hf_model(tmp_path / "base", True)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n", encoding="utf-8")
    with pytest.raises(ValueError, match="no non-empty line"):
        resize_hf_checkpoint(base, ext, tmp_path / "out1", "distill", sample_files=[empty], transfer=TINY)
    with pytest.raises(ValueError, match="sample files"):
        resize_hf_checkpoint(base, ext, tmp_path / "out2", "distill", transfer=TINY)
    # a tokenizer that is not a superset of the base: the unextended base tokenizer of another model
    other = tmp_path / "other"
    extend_bpe_tokenizer(ext, [sample], 5, other)  # ids of `ext` kept, but the base model has only OLD_VOCAB rows
    import json

    cfg = json.loads((other / "tokenizer.json").read_text())
    vocab = cfg["model"]["vocab"]
    first, second = sorted(vocab, key=vocab.get)[10:12]
    vocab[first], vocab[second] = vocab[second], vocab[first]  # two base ids swapped
    (other / "tokenizer.json").write_text(json.dumps(cfg), encoding="utf-8")
    with pytest.raises(ValueError, match="does not extend"):
        resize_hf_checkpoint(base, other, tmp_path / "out3", "distill", sample_files=[sample], transfer=TINY)
    assert not any((tmp_path / f"out{i}").exists() for i in (1, 2, 3))


def test_the_bf16_output_fit_lands_where_the_fp32_fit_does(setup, tmp_path):
    """`output_dtype: bfloat16` (the default: bf16 products with fp32 accumulation, 1.35x faster on 2 cores) fits the
    same rows as fp32 to bf16 precision, and the grown model it writes is as close to the base."""
    tmp, sample, base_tok_dir, ext = setup
    base = make_hf_model(tmp_path / "base", False)
    cfg = dataclasses.replace(TINY, input_steps=0)
    fits = {dt: resize_hf_checkpoint(base, ext, tmp_path / dt, "distill", seed=0, sample_files=[sample],
                                     transfer=dataclasses.replace(cfg, output_dtype=dt))
            for dt in ("float32", "bfloat16")}
    f32, b16 = (fits[dt].transfer for dt in ("float32", "bfloat16"))
    assert not np.array_equal(b16.head_rows, f32.head_rows)  # the products did run in bf16
    # 40 shared steps then up to 30 per-row steps at a learning rate of 3e-2 carry the bf16 rounding: 3 of the 1920
    # numbers measured up to 0.04 apart (2e-2 held before the shared fit); the model each writes is checked below
    np.testing.assert_allclose(b16.head_rows, f32.head_rows, atol=6e-2)
    np.testing.assert_allclose(b16.output_nll, f32.output_nll, rtol=1e-2)
    base_tok, new_tok = AutoTokenizer.from_pretrained(base_tok_dir), AutoTokenizer.from_pretrained(ext)
    scores = {dt: _aligned_scores(base, tmp_path / dt, base_tok, new_tok, CHINESE) for dt in fits}
    np.testing.assert_allclose(scores["bfloat16"], scores["float32"], rtol=2e-2)


def test_an_unknown_output_dtype_is_refused():
    with pytest.raises(ValueError, match=r"transfer.output_dtype='fp8': expected one of \('auto', 'float32', 'bfloat16'\)"):
        TransferConfig(output_dtype="fp8")


@pytest.mark.parametrize("field, value, expected", [("shared_steps", -1, ">= 0"), ("output_patience", -2, ">= 0"),
                                                     ("shared_positions", 0, "positive"),
                                                     ("shared_learning_rate", 0.0, "positive")])
def test_bad_fit_sizes_are_refused_naming_the_field(field, value, expected):
    with pytest.raises(ValueError, match=rf"transfer.{field}={value}: expected a .*{expected}"):
        TransferConfig(**{field: value})


def test_the_shared_fit_lowers_the_grown_models_loss_and_moves_rows_by_kind(setup, tmp_path):
    """`shared_steps` (on by default) fits a scale and two vectors per kind of row before the per-row fit: the grown
    model (loaded by `transformers`) predicts the sample's extended tokens better than without it, and with no
    per-row steps after it every new row of one kind has moved by the same two vectors (its start row scaled)."""
    tmp, sample, base_tok_dir, ext = setup
    base = make_hf_model(tmp_path / "base", True)
    cfg = dataclasses.replace(TINY, input_steps=0, output_steps=0, shared_learning_rate=3e-2)
    fits = {n: resize_hf_checkpoint(base, ext, tmp_path / str(n), "distill", seed=0, sample_files=[sample],
                                    transfer=dataclasses.replace(cfg, shared_steps=n)) for n in (0, 40)}
    base_tok, new_tok = AutoTokenizer.from_pretrained(base_tok_dir), AutoTokenizer.from_pretrained(ext)
    lines = sorted(set(CHINESE))
    nll = {n: _aligned_scores(base, tmp_path / str(n), base_tok, new_tok, lines)[2] for n in fits}
    assert nll[40] < nll[0] - 0.05, nll
    before, after = fits[40].transfer.shared_nll
    assert after < before and np.isnan(fits[0].transfer.shared_nll).all()
    start, moved = fits[0].transfer.head_rows, fits[40].transfer.head_rows
    assert not np.allclose(start, moved)
    one_char = [i for i in range(60) if len(new_tok.decode([OLD_VOCAB + i])) == 1 and "\ufffd" not in
                new_tok.decode([OLD_VOCAB + i])]
    assert len(one_char) >= 6
    # moved - start = a * start + u + use * v, `use` the standardized log1p of the row's count in the sample: per
    # dimension an affine map of (start, 1, log1p(count)) that three coefficients fit exactly over all these rows
    counts = np.array([sum(new_tok.encode(line, add_special_tokens=False).count(OLD_VOCAB + i)
                           for line in sample.read_text(encoding="utf-8").splitlines()) for i in one_char])
    delta = moved[one_char] - start[one_char]
    design = np.stack([start[one_char], np.ones_like(start[one_char]),
                       np.broadcast_to(np.log1p(counts)[:, None], start[one_char].shape)], axis=-1)
    for d in range(0, start.shape[1], 7):
        coef, *_ = np.linalg.lstsq(design[:, d], delta[:, d], rcond=None)
        np.testing.assert_allclose(design[:, d] @ coef, delta[:, d], atol=1e-5, err_msg=f"dimension {d}")


def test_distill_fits_words_added_as_tokens(setup, tmp_path):
    """The words form (`zhjax.tokenizer.bpe`, added tokens in plain text): the fit finds each word's pieces and
    aligns it to the base by its UTF-8 bytes, and the grown model's next-token distributions after the words are
    closer to the base's than with the pieces' mean."""
    _, sample, base_tok_dir, _ = setup
    words = extend_bpe_tokenizer(base_tok_dir, [sample], 300, tmp_path / "words", form="words").out_dir
    base_tok, new_tok = AutoTokenizer.from_pretrained(base_tok_dir), AutoTokenizer.from_pretrained(words)
    assert len(new_tok) > OLD_VOCAB + 10 and all(len(new_tok.convert_ids_to_tokens(i)) >= 2
                                                  for i in range(OLD_VOCAB, len(new_tok)))
    base = make_hf_model(tmp_path / "base", True)
    lines = sorted(set(CHINESE))
    scores = {}
    for name, init, cfg in (("subword", "subword", None),
                            ("distill", "distill", dataclasses.replace(TINY, output_rows="new"))):
        out = resize_hf_checkpoint(base, words, tmp_path / name, init, seed=0, sample_files=[sample], transfer=cfg)
        scores[name] = _aligned_scores(base, out.out_dir, base_tok, new_tok, lines)
    assert scores["distill"][0] < 0.5 * scores["subword"][0], scores
