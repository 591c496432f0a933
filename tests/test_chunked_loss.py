"""The fused, chunked LM head + cross-entropy equals the plain one (loss and gradients), and the bf16 CPU matmul
path equals `jnp.matmul` forward and backward."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from zhjax.config import LoraConfig, ModelConfig
from zhjax.model.llama import LlamaForCausalLM
from zhjax.model.matmul import matmul
from zhjax.model.params import split_model, trainable_filter
from zhjax.train.loss import chunked_head_loss
from zhjax.train.step import loss_sum_fn


def _plain(h, w, targets, weights):
    logits = jnp.dot(h, w, precision="highest")
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]
    return jnp.sum((lse - picked) * weights)


@pytest.mark.parametrize("chunk", [64, 96, 200])  # 200 rows: one padded chunk
def test_chunked_head_loss_equals_the_plain_loss_and_gradients(chunk):
    rng = np.random.default_rng(0)
    n, d, v = 200, 32, 1000
    h = jnp.asarray(rng.standard_normal((n, d)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((d, v)) * 0.3, jnp.float32)
    targets = jnp.asarray(rng.integers(0, v, n), jnp.int32)
    weights = jnp.asarray(rng.random(n) > 0.2, jnp.float32)
    ref, (ref_dh, ref_dw) = jax.value_and_grad(_plain, argnums=(0, 1))(h, w, targets, weights)
    got, (dh, dw) = jax.value_and_grad(chunked_head_loss, argnums=(0, 1))(h, w, targets, weights, chunk)
    np.testing.assert_allclose(got, ref, rtol=1e-5)
    np.testing.assert_allclose(dh, ref_dh, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dw, ref_dw, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(chunked_head_loss(h, w, targets, weights, chunk), ref, rtol=1e-5)  # no-grad path


@pytest.mark.parametrize("tied", [True, False])
def test_train_loss_with_loss_chunk_equals_the_full_logits_loss(tied):
    cfg = ModelConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    lora = LoraConfig(r=4, lora_dropout=0.0)
    graphdef, trainable, frozen = split_model(LlamaForCausalLM(cfg, lora, rngs=nnx.Rngs(0)), trainable_filter(lora))
    trainable = jax.tree.map(lambda x: x + 0.01, trainable)  # non-zero LoRA B, so every gradient is non-trivial
    ids = jnp.asarray(np.random.default_rng(1).integers(0, 300, (3, 20)), jnp.int32)
    labels = ids.at[0, :5].set(-100)
    batch = {"input_ids": ids, "labels": labels, "segment_ids": jnp.ones_like(ids).at[1, 12:].set(2)}

    def run(chunk):
        f = lambda p: loss_sum_fn(graphdef, p, frozen, batch, None, chunk)
        return jax.value_and_grad(f, has_aux=True)(trainable)

    with jax.default_matmul_precision("highest"):
        (ref, n_ref), g_ref = run(0)
        (got, n_got), g_got = run(16)
    assert float(n_got) == float(n_ref) == float((labels[:, 1:] != -100).sum() - 1)  # one target across the segment edge
    np.testing.assert_allclose(got, ref, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g_got), jax.tree.leaves(g_ref), strict=True):
        # summation order differs (chunks vs one reduction): 1e-5 of each gradient's scale
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(np.abs(b).max()))


def test_bf16_matmul_matches_jnp_forward_and_backward():
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((2, 24, 40)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((40, 56)), jnp.bfloat16)
    g = jnp.asarray(rng.standard_normal((2, 24, 56)), jnp.float32)
    f = lambda mm: lambda x, w: jnp.sum(mm(x, w).astype(jnp.float32) * g)
    ref = jax.grad(f(lambda a, b: jnp.matmul(a, b, preferred_element_type=jnp.float32).astype(a.dtype)), (0, 1))(x, w)
    got = jax.grad(f(matmul), (0, 1))(x, w)
    np.testing.assert_allclose(matmul(x, w).astype(np.float32), (x @ w).astype(np.float32), rtol=1e-2, atol=1e-2)
    for a, b in zip(got, ref, strict=True):
        assert a.dtype == b.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=2e-2, atol=0.1)


def test_fp32_matmul_equals_jnp_forward_and_backward():
    """fp32 products on CPU take the same custom backward (row-major transposes): the values must not move."""
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((2, 24, 40)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((40, 56)), jnp.float32)
    g = jnp.asarray(rng.standard_normal((2, 24, 56)), jnp.float32)
    f = lambda mm: jax.jit(jax.value_and_grad(lambda x, w: jnp.sum(jnp.tanh(mm(x, w)) * g), (0, 1)))
    with jax.default_matmul_precision("highest"):
        (ref, ref_grads), (got, got_grads) = f(jnp.matmul)(x, w), f(matmul)(x, w)
    np.testing.assert_allclose(got, ref, rtol=1e-6)
    for a, b in zip(got_grads, ref_grads, strict=True):
        assert a.dtype == jnp.float32
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def _dot_operand_types(hlo: str) -> list[tuple[str, str]]:
    """(lhs, rhs) element types of every dot in compiled HLO text (operands are named in the same computation)."""
    out = []
    for comp in hlo.split("\n\n"):
        types = dict(re.findall(r"(%[\w.\-]+) = (\w+)\[", comp))
        out += [(types[a], types[b]) for a, b in re.findall(r" dot\((%[\w.\-]+), (%[\w.\-]+)\)", comp)]
    return out


def test_bf16_products_of_a_linear_layer_and_the_head_take_the_bf16_path_on_cpu():
    """XLA:CPU converts a non-canonical bf16 product's operands to float32; `matmul` and the chunked loss avoid it."""
    if jax.default_backend() != "cpu":
        pytest.skip("the layout rule is XLA:CPU's")
    x = jax.ShapeDtypeStruct((64, 48), jnp.bfloat16)
    w = jax.ShapeDtypeStruct((48, 96), jnp.bfloat16)
    loss = lambda x, w: jnp.sum(matmul(x, w).astype(jnp.float32) ** 2)
    dots = _dot_operand_types(jax.jit(jax.grad(loss, (0, 1))).lower(x, w).compile().as_text())
    assert len(dots) == 3 and all(t == ("bf16", "bf16") for t in dots), dots
    plain = lambda x, w: jnp.sum(jnp.matmul(x, w).astype(jnp.float32) ** 2)
    assert ("f32", "f32") in _dot_operand_types(jax.jit(jax.grad(plain, (0, 1))).lower(x, w).compile().as_text())

    targets, weights = jax.ShapeDtypeStruct((64,), jnp.int32), jax.ShapeDtypeStruct((64,), jnp.float32)
    head = jax.jit(jax.grad(chunked_head_loss, (0, 1)), static_argnums=4)
    dots = _dot_operand_types(head.lower(x, w, targets, weights, 32).compile().as_text())
    assert len(dots) == 3 * 2 and all(t == ("bf16", "bf16") for t in dots), dots
