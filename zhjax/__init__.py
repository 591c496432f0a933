"""zhjax: Chinese adaptation of LLaMA-family models in JAX/Flax NNX.

The Python API in three calls::

    model = zhjax.load_pretrained("assets/smollm2-135m", dtype="float32", lora=zhjax.LoraConfig(r=8))
    logits = model(input_ids, attention_mask=None)          # float32 [batch, seq, vocab]
    zhjax.save_pretrained(model, "out/merged", tokenizer="assets/smollm2-135m")   # LoRA merged on export
"""

from __future__ import annotations

from pathlib import Path

from zhjax.config import LoraConfig, ModelConfig

__all__ = ["LoraConfig", "ModelConfig", "load_pretrained", "save_pretrained"]
__version__ = "0.1.0"


def load_pretrained(path: str | Path, dtype="float32", lora: LoraConfig | None = None, **model_overrides):
    """Load an HF LLaMA-family directory as a zhjax model (weights and compute in `dtype`).

    `lora` adds fresh PEFT-initialised adapters; `model_overrides` change `ModelConfig` fields such as
    `remat` or `attention`. (`zhjax.convert.hf.load_pretrained`; imported on first call, so `import zhjax` stays
    light.)
    """
    from zhjax.convert.hf import load_pretrained

    return load_pretrained(path, dtype, lora, **model_overrides)


def save_pretrained(model, out_dir: str | Path, tokenizer=None, dtype: str | None = None) -> Path:
    """Write `model` as an HF directory that `transformers` loads with no custom code, LoRA merged in.

    `tokenizer` is a directory whose tokenizer files are copied, or an HF tokenizer object (`save_pretrained`
    is called on it). (`zhjax.convert.hf.save_pretrained`.)
    """
    from zhjax.convert.hf import save_pretrained

    return save_pretrained(model, out_dir, tokenizer, dtype)
