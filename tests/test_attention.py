"""`grouped_attention` (the CPU attention) equals `jax.nn.dot_product_attention`, values and gradients, under the
padding and segment masks the model builds, and its bf16 products take the bf16 path on XLA:CPU."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.test_chunked_loss import _dot_operand_types
from zhjax.model.llama import build_attention_mask, grouped_attention

B, T, HEADS, KV, D = 3, 16, 6, 2, 8
SCALE = 0.35


def _inputs(dtype):
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(B, T, HEADS, D)), dtype)
    k = jnp.asarray(rng.normal(size=(B, T, KV, D)), dtype)
    v = jnp.asarray(rng.normal(size=(B, T, KV, D)), dtype)
    return q, k, v


def _masks():
    """None; right and left padding (left-padded queries see nothing: fully masked rows); packed segments."""
    pad = np.ones((B, T), np.int32)
    pad[1, 11:] = 0
    pad[2, :5] = 0
    seg = np.ones((B, T), np.int32)
    seg[0, 6:] = 2
    seg[1, 9:] = 3
    seg[2, 14:] = 0
    return {
        "none": None,
        "padding": build_attention_mask(jnp.asarray(pad), None),
        "segments": build_attention_mask(None, jnp.asarray(seg)),
    }


def _reference(q, k, v, mask):
    out = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True, scale=SCALE)
    return out.reshape(B, T, HEADS * D)


@pytest.mark.parametrize("mask_name", ["none", "padding", "segments"])
def test_grouped_attention_equals_dot_product_attention_in_fp32(mask_name):
    mask = _masks()[mask_name]
    q, k, v = _inputs(jnp.float32)
    ours = jax.jit(lambda q, k, v: grouped_attention(q, k, v, mask, SCALE))
    ref = jax.jit(lambda q, k, v: _reference(q, k, v, mask))
    np.testing.assert_allclose(ours(q, k, v), ref(q, k, v), rtol=1e-5, atol=1e-6)
    weights = jnp.asarray(np.random.default_rng(1).normal(size=(B, T, HEADS * D)), jnp.float32)
    grads = lambda f: jax.jit(jax.grad(lambda *x: jnp.sum(f(*x) * weights), (0, 1, 2)))(q, k, v)
    for ga, gb in zip(grads(ours), grads(ref), strict=True):
        np.testing.assert_allclose(ga, gb, rtol=1e-5, atol=1e-5)


def test_grouped_attention_in_bf16_stays_within_bf16_rounding_of_the_reference():
    mask = _masks()["padding"]
    q, k, v = _inputs(jnp.bfloat16)
    ours = grouped_attention(q, k, v, mask, SCALE).astype(jnp.float32)
    ref = _reference(q, k, v, mask).astype(jnp.float32)
    exact = _reference(*(x.astype(jnp.float32) for x in (q, k, v)), mask)
    # both round the probabilities to bf16 before the second product: as far from fp32 as the reference is
    assert float(jnp.max(jnp.abs(ours - exact))) <= 2 * float(jnp.max(jnp.abs(ref - exact))) + 1e-2
    np.testing.assert_allclose(ours, ref, atol=3e-2)


def test_grouped_attention_products_read_bf16_operands_on_cpu():
    """`jax.nn.dot_product_attention` on XLA:CPU converts the bf16 operands of some products to float32."""
    if jax.default_backend() != "cpu":
        pytest.skip("the layout rule is XLA:CPU's")
    q, k, v = (jax.ShapeDtypeStruct(x.shape, jnp.bfloat16) for x in _inputs(jnp.bfloat16))
    mask = _masks()["padding"]

    def grad_hlo(f):
        loss = lambda q, k, v: jnp.sum(f(q, k, v).astype(jnp.float32) ** 2)
        return jax.jit(jax.grad(loss, (0, 1, 2))).lower(q, k, v).compile().as_text()

    dots = _dot_operand_types(grad_hlo(lambda q, k, v: grouped_attention(q, k, v, mask, SCALE)))
    assert len(dots) >= 6 and all(t == ("bf16", "bf16") for t in dots), dots  # 2 forward, 4 backward (+ recomputed)
    assert ("f32", "f32") in _dot_operand_types(grad_hlo(lambda q, k, v: _reference(q, k, v, mask)))
