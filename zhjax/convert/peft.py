"""PEFT LoRA adapters <-> zhjax LoRA state.

PEFT names an adapter weight `base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight` (`[r, in]`) and
`...lora_B.weight` (`[out, r]`); zhjax stacks them over layers as `layers/self_attn/q_proj/lora_a` `[L, in, r]`
and `.../lora_b` `[L, r, out]`. `modules_to_save` weights (full `embed_tokens` / `lm_head`) are stored by PEFT
under `base_model.model.` with the plain HF names.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from zhjax.convert.hf import ConversionError

PEFT_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.\w+)?\.weight$")


def load_lora_weights(model: nnx.Module, state_dict: dict[str, np.ndarray], *, source: str = "adapter") -> None:
    """Set `model`'s LoRA factors from a PEFT state dict (as `peft.get_peft_model_state_dict` returns), in place.

    Every LoRA factor of the model must be present with the right shape; unknown LoRA keys are an error.
    """
    num_layers = model.config.num_hidden_layers
    _, lora_state, _ = nnx.split(model, nnx.LoRAParam, ...)
    targets = {tuple(str(k) for k in p): v for p, v in nnx.to_flat_state(lora_state)}
    collected: dict[tuple[str, ...], list] = {p: [None] * num_layers for p in targets}
    for key, value in state_dict.items():
        m = _LORA_KEY.match(key)
        if not m:
            continue
        layer, block, module, ab = int(m[1]), m[2], m[3], m[4]
        path = ("layers", block, module, "lora_a" if ab == "A" else "lora_b")
        if path not in collected or layer >= num_layers:
            raise ConversionError(f"{source}: LoRA weight {key!r} has no matching LoRA target in the model")
        collected[path][layer] = np.asarray(value, np.float32).T
    for path, var in targets.items():
        missing = [i for i, x in enumerate(collected[path]) if x is None]
        if missing:
            raise ConversionError(f"{source}: LoRA weight for {'/'.join(path)} of layer {missing[0]} is missing")
        stacked = np.stack(collected[path])
        if stacked.shape != tuple(var.shape):
            raise ConversionError(
                f"{source}: LoRA weights for {'/'.join(path)} have shape {stacked.shape}, the model expects {tuple(var.shape)}"
            )
        var[...] = jnp.asarray(stacked, var.dtype)


def lora_state_dict(model: nnx.Module) -> dict[str, np.ndarray]:
    """The model's LoRA factors as a PEFT adapter state dict (`[r, in]` / `[out, r]`, float32)."""
    _, lora_state, _ = nnx.split(model, nnx.LoRAParam, ...)
    out = {}
    for p, var in nnx.to_flat_state(lora_state):
        _, block, module, leaf = (str(k) for k in p)
        value = np.asarray(jax.device_get(var[...]), np.float32)
        ab = "A" if leaf == "lora_a" else "B"
        for i in range(value.shape[0]):
            out[f"{PEFT_PREFIX}model.layers.{i}.{block}.{module}.lora_{ab}.weight"] = np.ascontiguousarray(value[i].T)
    return out
