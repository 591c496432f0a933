"""Real weights: zhjax's SmolLM2-135M gives transformers' logits on mixed Chinese/English text."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax.numpy as jnp  # noqa: E402

import zhjax  # noqa: E402


@pytest.fixture(scope="module")
def smollm2(assets):
    tok = transformers.AutoTokenizer.from_pretrained(assets.smollm2_dir)
    ref = transformers.AutoModelForCausalLM.from_pretrained(assets.smollm2_dir, dtype=torch.float32).eval()
    return tok, ref, zhjax.load_pretrained(assets.smollm2_dir, dtype="float32")


def test_smollm2_logits_match_transformers_on_mixed_text(assets, smollm2):
    tok, ref, model = smollm2
    lines = assets.corpus_text.read_text(encoding="utf-8").splitlines()[100:102]
    texts = [
        lines[0][:60] + " The People's Daily, January 1998. " + lines[1][:40],
        "SmolLM2 is a small language model; 它的中文能力有限，需要扩充词表。",
    ]
    batch = tok(texts, padding=True, return_tensors="np")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.shape[1] >= 64
    with torch.no_grad():
        expected = ref(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    got = np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    keep = mask.astype(bool)
    assert np.abs(got[keep] - expected[keep]).max() <= 1e-3
    np.testing.assert_array_equal(got[keep].argmax(-1), expected[keep].argmax(-1))
