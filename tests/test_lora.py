"""zhjax LoRA computes what `peft` computes, merges to the same model, and splits apart with filters.

The first two tests compare with `peft` on PyTorch and skip without the torch extra; the rest are pure JAX on a
tiny random model that zhjax itself writes, and run without torch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import zhjax
from zhjax.config import LORA_TARGETS, LoraConfig, ModelConfig
from zhjax.convert.peft import load_lora_weights, lora_state_dict
from zhjax.model.lora import merge_lora
from zhjax.model.params import count_params, split_model, trainable_filter

# The shape of tests/test_model_parity.py's random models: hidden 48, mlp 80, 3 layers, vocab 97, untied.
TINY = ModelConfig(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=4,
                   max_position_embeddings=64, rms_norm_eps=1e-5, initializer_range=0.2)


def tiny_hf_dir(path):
    """A tiny random LLaMA written as an HF directory by zhjax itself (no torch needed)."""
    from zhjax.model.llama import LlamaForCausalLM

    zhjax.save_pretrained(LlamaForCausalLM(TINY, None, rngs=nnx.Rngs(0)), path)
    return path


@pytest.fixture
def reference():
    """torch, transformers and peft (the torch extra), with the parity helpers that use them; skips without."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    from . import test_model_parity

    return test_model_parity


def peft_model_with_random_adapters(base, r=4, alpha=16, targets=LORA_TARGETS):
    import peft
    import torch

    config = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(targets))
    model = peft.get_peft_model(base, config).eval()
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.1)  # B non-zero, so the adapters matter
    return model


@pytest.mark.parametrize("tied", [False, True])
def test_lora_on_all_seven_targets_matches_peft_and_merges(tmp_path, tied, reference):
    import peft

    hf_logits, random_hf_model = reference.hf_logits, reference.random_hf_model
    base = random_hf_model(tmp_path, num_key_value_heads=2, tie_word_embeddings=tied)
    ids = np.random.default_rng(0).integers(0, 97, (2, 16))
    plain_ref = hf_logits(base, ids)
    pm = peft_model_with_random_adapters(base)
    ref = hf_logits(pm, ids)
    assert np.abs(ref - plain_ref).max() > 1e-2  # the adapters really change the output

    lora = LoraConfig(r=4, lora_alpha=16, lora_dropout=0.0)
    model = zhjax.load_pretrained(tmp_path, lora=lora)
    state = {k: v.numpy() for k, v in peft.get_peft_model_state_dict(pm).items()}
    load_lora_weights(model, state)
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(ids))), ref, atol=1e-4, rtol=0)

    # the state dict round-trips to PEFT's names and layouts
    ours = lora_state_dict(model)
    assert set(ours) == set(state)
    for k in state:
        np.testing.assert_array_equal(ours[k], state[k])

    merge_lora(model)
    assert not jax.tree.leaves(nnx.state(model, nnx.LoRAParam))
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(ids))), ref, atol=1e-4, rtol=0)


def test_save_pretrained_merges_lora_and_transformers_loads_it(tmp_path, reference):
    import peft
    import transformers

    hf_logits, random_hf_model = reference.hf_logits, reference.random_hf_model
    base = random_hf_model(tmp_path / "base", num_key_value_heads=2)
    pm = peft_model_with_random_adapters(base, targets=("q_proj", "v_proj", "down_proj"))
    ids = np.arange(20)[None] % 97
    ref = hf_logits(pm, ids)
    model = zhjax.load_pretrained(tmp_path / "base", lora=LoraConfig(r=4, lora_alpha=16, target_modules=("q_proj", "v_proj", "down_proj")))
    load_lora_weights(model, {k: v.numpy() for k, v in peft.get_peft_model_state_dict(pm).items()})
    zhjax.save_pretrained(model, tmp_path / "merged")
    assert jax.tree.leaves(nnx.state(model, nnx.LoRAParam))  # exporting did not strip the caller's adapters
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    np.testing.assert_allclose(hf_logits(merged, ids), ref, atol=1e-4, rtol=0)


def test_fresh_adapters_use_peft_init_and_leave_the_model_unchanged(tmp_path):
    tiny_hf_dir(tmp_path)
    plain = zhjax.load_pretrained(tmp_path)
    lora = zhjax.load_pretrained(tmp_path, lora=LoraConfig(r=8, lora_alpha=32))
    ids = jnp.asarray(np.arange(10)[None])
    np.testing.assert_array_equal(np.asarray(plain(ids)), np.asarray(lora(ids)))
    a = np.asarray(lora.layers.mlp.down_proj.lora_a[...])  # [L, in=80, r]
    b = np.asarray(lora.layers.mlp.down_proj.lora_b[...])
    bound = 1 / np.sqrt(80)
    assert a.shape == (3, 80, 8) and np.abs(a).max() <= bound and np.abs(a).max() > 0.8 * bound
    assert a.std() == pytest.approx(bound / np.sqrt(3), rel=0.15)  # uniform(-b, b) has std b/sqrt(3)
    assert not b.any()


def test_filters_split_adapters_modules_to_save_and_frozen_base(tmp_path):
    tiny_hf_dir(tmp_path)
    lora = LoraConfig(r=2, lora_alpha=4, target_modules=("q_proj", "v_proj"))
    model = zhjax.load_pretrained(tmp_path, lora=lora)
    _, trainable, frozen = split_model(model, trainable_filter(lora))
    names = {"/".join(str(k) for k in p) for p, _ in nnx.to_flat_state(trainable)}
    assert names == {
        "layers/self_attn/q_proj/lora_a",
        "layers/self_attn/q_proj/lora_b",
        "layers/self_attn/v_proj/lora_a",
        "layers/self_attn/v_proj/lora_b",
        "embed_tokens/embedding",
        "lm_head/kernel",
    }
    # r=2 on q (48->48) and v (48->48) for 3 layers, plus embed and head (97 x 48 each)
    assert count_params(trainable) == 3 * 2 * (48 * 2 + 2 * 48) + 2 * 97 * 48
    frozen_names = {"/".join(str(k) for k in p) for p, _ in nnx.to_flat_state(frozen)}
    assert "layers/self_attn/q_proj/kernel" in frozen_names and "norm/scale" in frozen_names
    _, everything, nothing = split_model(model, trainable_filter(lora, full_finetuning=True))
    assert count_params(nothing) == 0 and count_params(everything) == count_params(nnx.state(model))


def test_lora_dropout_is_random_in_training_and_off_in_eval(tmp_path):
    tiny_hf_dir(tmp_path)
    model = zhjax.load_pretrained(tmp_path, lora=LoraConfig(r=4, lora_alpha=8, lora_dropout=0.5))
    for _, m in nnx.iter_modules(model):  # non-zero B so dropout shows
        if hasattr(m, "lora_b") and m.lora_b is not None:
            m.lora_b[...] = jnp.ones_like(m.lora_b[...]) * 0.1
    ids = jnp.asarray(np.arange(10)[None])
    eval_a, eval_b = model(ids), model(ids)
    np.testing.assert_array_equal(np.asarray(eval_a), np.asarray(eval_b))
    k1 = model(ids, dropout_rng=jax.random.key(1))
    k1_again = model(ids, dropout_rng=jax.random.key(1))
    k2 = model(ids, dropout_rng=jax.random.key(2))
    np.testing.assert_array_equal(np.asarray(k1), np.asarray(k1_again))
    assert np.abs(np.asarray(k1) - np.asarray(k2)).max() > 1e-4
    assert np.abs(np.asarray(k1) - np.asarray(eval_a)).max() > 1e-4


def test_dropout_drops_at_the_configured_rate_and_keeps_the_mean():
    from zhjax.model.lora import dropout

    x = jnp.ones((64, 1000))
    y = np.asarray(dropout(x, 0.05, jax.random.key(0)))
    dropped = (y == 0).mean()
    assert abs(dropped - 0.05) < 0.003  # realised rate 13/256 = 0.0508
    assert abs(y.mean() - 1.0) < 0.01
    assert np.array_equal(np.asarray(dropout(x, 0.05, jax.random.key(0))), y)
    assert not np.array_equal(np.asarray(dropout(x, 0.05, jax.random.key(1))), y)


def test_dropout_bytes_are_uniform_and_independent_of_their_neighbours_and_of_other_keys():
    """`random_bytes` (the counter hash behind LoRA dropout): byte values uniform, adjacent bytes (within a word
    and across words) independent, and the streams of split/folded keys independent of each other (chi-square
    tests; a weak mix, e.g. one round, or a stream shared by two keys fails them)."""
    from scipy import stats

    from zhjax.model.lora import random_bytes

    n = 1 << 20
    key = jax.random.key(0)
    a = np.asarray(random_bytes(key, n)).astype(np.int64)
    assert a.shape == (n,)
    assert stats.chisquare(np.bincount(a, minlength=256)).pvalue > 1e-4

    def independent(u, v):  # the top 4 bits of two byte streams, as a 16 x 16 contingency table
        table = np.zeros((16, 16))
        np.add.at(table, (u >> 4, v >> 4), 1)
        return stats.chi2_contingency(table).pvalue > 1e-4

    assert independent(a[:-1], a[1:])  # neighbours, three of four inside one word
    assert independent(a[:-4], a[4:])  # the same byte of consecutive words
    for other in (jax.random.key(1), jax.random.split(key)[1], jax.random.fold_in(key, 1)):
        assert independent(a, np.asarray(random_bytes(other, n)).astype(np.int64))
    np.testing.assert_array_equal(np.asarray(random_bytes(key, 10)), a[:10])  # a prefix: a function of the index
