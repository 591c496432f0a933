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


def _dtype_name(dtype) -> str:
    import jax.numpy as jnp

    try:
        return jnp.dtype(dtype).name
    except TypeError as e:
        raise ValueError(f"dtype {dtype!r} is not a dtype name such as 'float32' or 'bfloat16'") from e


def load_pretrained(path: str | Path, dtype="float32", lora: LoraConfig | None = None, **model_overrides):
    """Load an HF LLaMA-family directory as a zhjax model (weights and compute in `dtype`).

    `lora` adds fresh PEFT-initialised adapters; `model_overrides` change `ModelConfig` fields such as
    `remat` or `attention`.
    """
    from zhjax.convert.hf import load_params, read_config

    name = _dtype_name(dtype)
    config, _ = read_config(path)
    config = config.replace(dtype=name, param_dtype=name, **model_overrides)
    return load_params(path, config, lora)


def save_pretrained(model, out_dir: str | Path, tokenizer=None, dtype: str | None = None) -> Path:
    """Write `model` as an HF directory that `transformers` loads with no custom code, LoRA merged in.

    `tokenizer` is a directory whose tokenizer files are copied, or an HF tokenizer object (`save_pretrained`
    is called on it).
    """
    import tempfile

    from zhjax.convert.hf import save_hf

    if tokenizer is None or isinstance(tokenizer, (str, Path)):
        return save_hf(model, out_dir, dtype=dtype, tokenizer_dir=tokenizer)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        return save_hf(model, out_dir, dtype=dtype, tokenizer_dir=tmp)
