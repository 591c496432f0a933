"""`attention: splash` (the Pallas TPU kernel, run here in interpret mode) gives transformers' logits and the XLA
path's gradients, with padding, packed segments, grouped-query heads and lengths that are not a multiple of 128."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.extras import needs_torch, optional

torch = optional("torch")

import zhjax  # noqa: E402
from tests.test_model_parity import BASE, hf_logits, random_hf_model  # noqa: E402

GQA = dict(num_key_value_heads=2, max_position_embeddings=256)


@needs_torch
def test_splash_logits_match_transformers_with_left_and_right_padding(tmp_path):
    hf = random_hf_model(tmp_path, **GQA)
    model = zhjax.load_pretrained(tmp_path, attention="splash")
    rng = np.random.default_rng(0)
    seq = 150  # padded to 256 inside: two 128-blocks, the second partly the kernel's own padding
    ids = rng.integers(0, BASE["vocab_size"], (3, seq))
    mask = np.ones((3, seq), np.int64)
    mask[1, 131:] = 0  # right padding
    mask[2, :40] = 0  # left padding
    ref = hf_logits(hf, ids, mask)
    ours = np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    keep = mask.astype(bool)
    np.testing.assert_allclose(ours[keep], ref[keep], atol=1e-4, rtol=0)


@needs_torch
def test_splash_gradients_match_xla_on_packed_segments(tmp_path):
    random_hf_model(tmp_path, **GQA)
    lora = zhjax.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0)
    rng = np.random.default_rng(1)
    ids = jnp.asarray(rng.integers(0, BASE["vocab_size"], (2, 128)))
    seg = np.ones((2, 128), np.int32)
    seg[0, 50:] = 2  # two documents packed in row 0
    seg[1, 100:] = 0  # a padded tail in row 1
    seg = jnp.asarray(seg)
    valid = seg > 0

    def loss_and_grads(attention):
        model = zhjax.load_pretrained(tmp_path, lora=lora, attention=attention)
        nnx.update(model, jax.tree.map(lambda x: x + 0.05, nnx.state(model, nnx.LoRAParam)))  # B != 0: live LoRA grads
        graphdef, params, rest = nnx.split(model, nnx.LoRAParam, ...)

        def loss(params):
            logits = nnx.merge(graphdef, params, rest)(ids, segment_ids=seg)
            logp = jax.nn.log_softmax(logits)[:, :-1]
            picked = jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
            return -(picked * valid[:, 1:]).sum() / valid[:, 1:].sum()

        return jax.value_and_grad(loss)(params)

    (l_xla, g_xla), (l_splash, g_splash) = loss_and_grads("xla"), loss_and_grads("splash")
    np.testing.assert_allclose(l_splash, l_xla, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g_splash), jax.tree.leaves(g_xla), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5 * float(jnp.abs(b).max()) + 1e-7)


def test_unknown_attention_backend_is_refused():
    with pytest.raises(ValueError, match="attention 'flash' is not supported"):
        zhjax.ModelConfig(attention="flash")
