"""Model-level resize (zhjax.convert.resize_model, tools/resize_model.py) on a tiny random HF LLaMA.

References: `transformers` makes the base model and loads the resized dir; the bundled tiny byte-level BPE
tokenizer (configs/tiny/tokenizer, 400 tokens) is extended with `zhjax.tokenizer.bpe` on a few hundred lines of
Chinese, and the appended merges say independently which base rows each new token should average.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from transformers import AutoTokenizer

import zhjax
from tools.resize_model import main as resize_tool
from zhjax.convert.resize_model import check_extends, resize_hf_checkpoint, resize_model
from zhjax.tokenizer.bpe import extend_bpe_tokenizer
from zhjax.tokenizer.resize import INITS, subword_source_ids

torch = pytest.importorskip("torch")
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TINY_TOKENIZER = REPO / "configs" / "tiny" / "tokenizer"
OLD_VOCAB, NEW_TOKENS = 400, 60
CHINESE = [
    "中共中央总书记、国家主席江泽民发表新年讲话。",
    "国务院总理李鹏在北京考察企业，了解国有企业改革的情况。",
    "新华社记者报道，全国各族人民欢度新年，各地举行了丰富多彩的庆祝活动。",
    "香港特别行政区同胞、澳门和台湾同胞、海外侨胞向全国人民致以新年的问候。",
] * 20


@pytest.fixture(scope="module")
def tokenizers_dirs(tmp_path_factory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("resize_tok")
    (tmp / "corpus.txt").write_text("\n".join(CHINESE) + "\n", encoding="utf-8")
    result = extend_bpe_tokenizer(TINY_TOKENIZER, [tmp / "corpus.txt"], NEW_TOKENS, tmp / "extended")
    assert result.vocab_size == OLD_VOCAB + NEW_TOKENS
    return TINY_TOKENIZER, result.out_dir


def make_hf_model(out: Path, tied: bool) -> Path:
    """A random tiny LlamaForCausalLM saved by transformers (fp32 safetensors) with the tiny tokenizer."""
    config = LlamaConfig(
        vocab_size=OLD_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=tied, bos_token_id=1,
        eos_token_id=2, pad_token_id=3,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # a trained-looking embedding: non-zero mean, so the inits differ visibly
        model.get_input_embeddings().weight.add_(0.05)
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(TINY_TOKENIZER / name, out / name)
    return out


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def base_dir(request, tmp_path_factory) -> Path:
    return make_hf_model(tmp_path_factory.mktemp("base") / "model", request.param)


@pytest.fixture(scope="module")
def resized(base_dir, tokenizers_dirs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("resized") / "model"
    result = resize_hf_checkpoint(base_dir, tokenizers_dirs[1], out, "subword")
    assert result.new_vocab_size == OLD_VOCAB + NEW_TOKENS and result.out_dir == out
    return out


def old_token_ids() -> jnp.ndarray:
    return jnp.asarray(np.random.default_rng(0).integers(0, OLD_VOCAB, size=(2, 12)), jnp.int32)


def test_zhjax_logits_of_old_tokens_are_bitwise_unchanged(base_dir, resized):
    ids = old_token_ids()
    before = np.asarray(zhjax.load_pretrained(base_dir, "float32")(ids))
    model = zhjax.load_pretrained(resized, "float32")
    after = np.asarray(model(ids))
    assert model.config.vocab_size == OLD_VOCAB + NEW_TOKENS
    assert after.shape == (*ids.shape, OLD_VOCAB + NEW_TOKENS)
    assert np.array_equal(after[..., :OLD_VOCAB], before)


def test_resized_dir_loads_in_transformers_with_old_weights_and_the_new_tokenizer(base_dir, resized, tokenizers_dirs):
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    grown = AutoModelForCausalLM.from_pretrained(resized, dtype=torch.float32).eval()
    tied = base.config.tie_word_embeddings
    assert grown.config.vocab_size == OLD_VOCAB + NEW_TOKENS and grown.config.tie_word_embeddings == tied
    if tied:
        assert grown.lm_head.weight.data_ptr() == grown.get_input_embeddings().weight.data_ptr()
    old_state, new_state = base.state_dict(), grown.state_dict()
    assert old_state.keys() == new_state.keys()
    for name, old in old_state.items():
        new = new_state[name]
        if new.shape != old.shape:  # the embedding and head: old rows kept, new rows appended
            assert new.shape == (OLD_VOCAB + NEW_TOKENS, *old.shape[1:]), name
            new = new[:OLD_VOCAB]
        assert torch.equal(new, old), name
    ids = torch.tensor(np.asarray(old_token_ids()))
    with torch.no_grad():
        assert torch.equal(grown(ids).logits[..., :OLD_VOCAB], base(ids).logits)
    assert len(AutoTokenizer.from_pretrained(resized)) == OLD_VOCAB + NEW_TOKENS
    assert (resized / "tokenizer.json").read_bytes() == (tokenizers_dirs[1] / "tokenizer.json").read_bytes()
    config = json.loads((resized / "config.json").read_text())
    assert config == {**json.loads((base_dir / "config.json").read_text()), "vocab_size": OLD_VOCAB + NEW_TOKENS}


def test_subword_rows_are_the_mean_of_the_base_rows_their_merge_joins(base_dir, resized, tokenizers_dirs):
    """A new token whose appended merge joins two base tokens starts as the mean of those two rows."""
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    grown = AutoModelForCausalLM.from_pretrained(resized, dtype=torch.float32)
    spec = json.loads((tokenizers_dirs[1] / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = spec["model"]["vocab"]
    merges = [m.split(" ") if isinstance(m, str) else m for m in spec["model"]["merges"]]
    appended = merges[len(merges) - NEW_TOKENS :]
    matrices = [(base.get_input_embeddings().weight, grown.get_input_embeddings().weight)]
    if not base.config.tie_word_embeddings:
        matrices.append((base.lm_head.weight, grown.lm_head.weight))
    checked = 0
    for left, right in appended:
        if vocab[left] >= OLD_VOCAB or vocab[right] >= OLD_VOCAB:
            continue  # built on a new token: its pieces are checked through that token's own merge
        for old, new in matrices:
            expected = (old[vocab[left]] + old[vocab[right]]) / 2
            torch.testing.assert_close(new[vocab[left + right]], expected, rtol=1e-6, atol=1e-7)
        checked += 1
    assert checked >= 10


@pytest.mark.parametrize("init", INITS)
def test_in_memory_resize_matches_the_streamed_checkpoint(base_dir, tokenizers_dirs, tmp_path, init):
    base_tok, new_tok = (AutoTokenizer.from_pretrained(d) for d in tokenizers_dirs)
    sources = subword_source_ids(base_tok, new_tok, OLD_VOCAB)
    model = zhjax.load_pretrained(base_dir, "float32")
    grown = resize_model(model, OLD_VOCAB + NEW_TOKENS, init, sources, seed=3)
    on_disk = zhjax.load_pretrained(
        resize_hf_checkpoint(base_dir, tokenizers_dirs[1], tmp_path / "m", init, seed=3).out_dir, "float32"
    )
    assert grown.config == on_disk.config and model.config.vocab_size == OLD_VOCAB  # the input is untouched
    assert model.embed_tokens.embedding[...].shape == (OLD_VOCAB, 32)
    assert np.array_equal(grown.embed_tokens.embedding[...], on_disk.embed_tokens.embedding[...])
    if model.lm_head is not None:
        assert np.array_equal(grown.lm_head.kernel[...], on_disk.lm_head.kernel[...])
        new_embed, new_head = grown.embed_tokens.embedding[...][OLD_VOCAB:], grown.lm_head.kernel[...].T[OLD_VOCAB:]
        assert not np.array_equal(new_embed, new_head)  # the head's rows come from the head, not the embedding
    ids = old_token_ids()
    assert np.array_equal(np.asarray(grown(ids))[..., :OLD_VOCAB], np.asarray(model(ids)))


def test_a_tokenizer_that_does_not_extend_the_base_is_refused(base_dir, tokenizers_dirs, tmp_path):
    spec = json.loads((tokenizers_dirs[1] / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = spec["model"]["vocab"]
    a, b = (t for t, i in vocab.items() if i in (300, 301))
    vocab[a], vocab[b] = vocab[b], vocab[a]  # two base tokens swap ids
    shuffled = tmp_path / "shuffled"
    shuffled.mkdir()
    (shuffled / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    shutil.copyfile(tokenizers_dirs[1] / "tokenizer_config.json", shuffled / "tokenizer_config.json")
    with pytest.raises(ValueError, match=r"does not extend the base tokenizer: 2 of 400 base tokens changed id"):
        resize_hf_checkpoint(base_dir, shuffled, tmp_path / "out", "subword")
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="is the base dir"):
        resize_hf_checkpoint(base_dir, tokenizers_dirs[1], base_dir, "subword")
    base_tok, new_tok = (AutoTokenizer.from_pretrained(d) for d in tokenizers_dirs)
    with pytest.raises(ValueError, match="fewer than the model's 460 rows"):
        check_extends(base_tok, base_tok, OLD_VOCAB + NEW_TOKENS)
    with pytest.raises(ValueError, match="new tokenizer puts new tokens on padding rows 400..439"):
        check_extends(base_tok, new_tok, 440)


def test_tool_resizes_and_reports(base_dir, tokenizers_dirs, tmp_path, capsys):
    argv = ["--base", str(base_dir), "--tokenizer", str(tokenizers_dirs[1]), "--out", str(tmp_path / "out")]
    assert resize_tool([*argv, "--init", "mean"]) == 0
    out = capsys.readouterr().out
    assert "vocab 400 -> 460 (60 new rows, init mean" in out
    assert zhjax.load_pretrained(tmp_path / "out", "float32").config.vocab_size == 460
    assert resize_tool([*argv[:2], "--tokenizer", str(base_dir), "--out", str(tmp_path / "x"), "--init", "subword"]) == 0
    assert resize_tool(["--base", str(tmp_path / "missing"), *argv[2:]]) == 1
    assert "resize_model:" in capsys.readouterr().err
    # the default init fits the new rows on training text: without it, one line says so and nothing is written
    assert resize_tool([*argv[:4], "--out", str(tmp_path / "y")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("resize_model: init='distill'") and "--sample-file" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "y").exists()
