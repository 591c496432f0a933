"""The zhjax LLaMA gives transformers' logits: tiny random configs covering every architecture switch."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

from tests.extras import needs_torch, optional

torch, transformers = optional("torch"), optional("transformers")

import zhjax  # noqa: E402
from zhjax.convert.hf import config_from_hf  # noqa: E402

BASE = dict(
    vocab_size=97,
    hidden_size=48,
    intermediate_size=80,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=64,
    rms_norm_eps=1e-5,
)

CASES = {
    "mha_untied": {},
    "gqa_tied": dict(num_key_value_heads=2, tie_word_embeddings=True),
    "mqa_explicit_head_dim": dict(num_key_value_heads=1, head_dim=16),
    "biases": dict(attention_bias=True, mlp_bias=True, num_key_value_heads=2),
    "rope_linear": dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}),
    "rope_dynamic": dict(max_position_embeddings=16, rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}),
    "rope_llama3": dict(
        rope_parameters={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8,
            "rope_theta": 500000.0,
        }
    ),
}


def random_hf_model(tmp_path, seed: int = 0, **overrides):
    """A tiny LlamaForCausalLM with every weight random (norms and biases too), saved as safetensors."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(**{**BASE, **overrides})
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2 + (1.0 if p.ndim == 1 and p.shape[0] == config.hidden_size else 0.0))
    model.save_pretrained(tmp_path)
    return model


def hf_logits(model, ids, mask=None) -> np.ndarray:
    with torch.no_grad():
        kwargs = {} if mask is None else {"attention_mask": torch.tensor(mask)}
        return model(torch.tensor(ids), **kwargs).logits.float().numpy()


@needs_torch
@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers_with_padding(tmp_path, case):
    hf = random_hf_model(tmp_path, **CASES[case])
    model = zhjax.load_pretrained(tmp_path, dtype="float32")
    rng = np.random.default_rng(1)
    seq = 24  # longer than max_position_embeddings=16 in the dynamic case, so NTK scaling is active
    ids = rng.integers(0, BASE["vocab_size"], (3, seq))
    mask = np.ones((3, seq), np.int64)
    mask[1, 17:] = 0  # right padding
    mask[2, 9:] = 0
    ref = hf_logits(hf, ids, mask)
    ours = np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    keep = mask.astype(bool)
    assert ours.shape == ref.shape
    np.testing.assert_allclose(ours[keep], ref[keep], atol=1e-4, rtol=0)
    # without a mask the unpadded row is the same computation
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(ids[:1]))), hf_logits(hf, ids[:1]), atol=1e-4, rtol=0)


@needs_torch
def test_segment_ids_match_separate_sequences(tmp_path):
    hf = random_hf_model(tmp_path, num_key_value_heads=2)
    model = zhjax.load_pretrained(tmp_path)
    rng = np.random.default_rng(2)
    a, b = rng.integers(0, 97, 7), rng.integers(0, 97, 5)
    packed = np.concatenate([a, b, [0, 0]])[None]
    segments = np.array([[1] * 7 + [2] * 5 + [0, 0]])
    positions = np.array([list(range(7)) + list(range(5)) + [0, 0]])
    out = np.asarray(model(jnp.asarray(packed), segment_ids=jnp.asarray(segments), positions=jnp.asarray(positions)))
    np.testing.assert_allclose(out[0, :7], hf_logits(hf, a[None])[0], atol=1e-4, rtol=0)
    np.testing.assert_allclose(out[0, 7:12], hf_logits(hf, b[None])[0], atol=1e-4, rtol=0)


def test_legacy_and_new_rope_conventions_read_the_same(tmp_path):
    legacy = {
        "model_type": "llama",
        **BASE,
        "rope_theta": 50000.0,
        "rope_scaling": {"type": "linear", "factor": 4.0},
    }
    new = {**BASE, "model_type": "llama", "rope_parameters": {"rope_type": "linear", "factor": 4.0, "rope_theta": 50000.0}}
    assert config_from_hf(legacy) == config_from_hf(new)
    no_theta = {"model_type": "llama", **BASE}
    assert config_from_hf(no_theta).rope_theta == 10000.0


@needs_torch
@pytest.mark.parametrize("legacy_rope", [False, True])
def test_exported_config_is_read_back_by_transformers(tmp_path, legacy_rope):
    src, out = tmp_path / "src", tmp_path / "out"
    hf = random_hf_model(src, **CASES["rope_linear"])
    model = zhjax.load_pretrained(src)
    from zhjax.convert.hf import save_hf

    save_hf(model, out, legacy_rope=legacy_rope)
    written = json.loads((out / "config.json").read_text())
    assert ("rope_scaling" in written) == legacy_rope and ("rope_parameters" in written) != legacy_rope
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = np.arange(20)[None] % 97
    np.testing.assert_array_equal(hf_logits(reloaded, ids), hf_logits(hf, ids))


@needs_torch
def test_bfloat16_forward_is_close_to_float32(tmp_path):
    random_hf_model(tmp_path)
    ids = jnp.asarray(np.arange(16)[None] % 97)
    f32 = np.asarray(zhjax.load_pretrained(tmp_path, dtype="float32")(ids))
    bf16_model = zhjax.load_pretrained(tmp_path, dtype="bfloat16")
    bf16 = bf16_model(ids)
    assert bf16.dtype == jnp.float32  # logits are always float32
    assert bf16_model.layers.self_attn.q_proj.kernel[...].dtype == jnp.bfloat16
    assert np.abs(np.asarray(bf16) - f32).max() < 0.15 * np.abs(f32).max()


@needs_torch
@pytest.mark.parametrize("remat", ["full", "dots", "dots_with_no_batch_dims", "save_only_these_names"])
def test_remat_policies_do_not_change_logits_or_grads(tmp_path, remat):
    import jax
    from flax import nnx

    random_hf_model(tmp_path)
    ids = jnp.asarray(np.arange(12)[None] % 97)

    def loss_and_grad(model):
        graphdef, state = nnx.split(model)

        def loss(state):
            return nnx.merge(graphdef, state)(ids).mean()

        return jax.value_and_grad(loss)(state)

    plain = loss_and_grad(zhjax.load_pretrained(tmp_path))
    rematted = loss_and_grad(zhjax.load_pretrained(tmp_path, remat=remat))
    np.testing.assert_allclose(plain[0], rematted[0], atol=1e-6)
    for a, b in zip(jax.tree.leaves(plain[1]), jax.tree.leaves(rematted[1]), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)
