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


def modules_to_save_state_dict(model: nnx.Module, modules: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Fully trained modules (`embed_tokens`, `lm_head`) as PEFT stores them, `[V, D]` float32.

    On a tied model the one shared matrix is written under both names, so PEFT's two copies start equal.
    """
    out = {}
    embed = np.asarray(jax.device_get(model.embed_tokens.embedding[...]), np.float32)
    if "embed_tokens" in modules:
        out[f"{PEFT_PREFIX}model.embed_tokens.weight"] = embed
    if "lm_head" in modules:
        head = embed if model.lm_head is None else np.asarray(jax.device_get(model.lm_head.kernel[...]), np.float32).T
        out[f"{PEFT_PREFIX}lm_head.weight"] = np.ascontiguousarray(head)
    return out


def save_peft_adapter(model: nnx.Module, out_dir, *, base_model_name_or_path: str | None = None) -> None:
    """Write `adapter_config.json` + `adapter_model.safetensors` (LoRA and `modules_to_save`) that peft loads.

    Written to a temporary folder first and renamed into place, so an interrupted save never leaves an empty
    or partial adapter (the seed's 443-byte adapter files).
    """
    import json
    import shutil
    import tempfile
    from pathlib import Path

    from safetensors.numpy import save_file

    lora = model.lora
    if lora is None:
        raise ValueError("the model has no LoRA adapters to save")
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tensors = {**lora_state_dict(model), **modules_to_save_state_dict(model, lora.modules_to_save)}
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": lora.r,
        "lora_alpha": lora.lora_alpha,
        "lora_dropout": lora.lora_dropout,
        "target_modules": sorted(lora.target_modules),
        "modules_to_save": list(lora.modules_to_save) or None,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
    }
    if model.config.tie_word_embeddings and {"embed_tokens", "lm_head"} <= set(lora.modules_to_save):
        config["ensure_weight_tying"] = True
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_peft_adapter(model: nnx.Module, adapter_dir, *, source: str | None = None) -> None:
    """Load a PEFT adapter dir (safetensors, or the seed's `adapter_model.bin`) into `model`'s LoRA and modules."""
    from pathlib import Path

    adapter_dir = Path(adapter_dir)
    source = source or str(adapter_dir)
    st, binf = adapter_dir / "adapter_model.safetensors", adapter_dir / "adapter_model.bin"
    if st.exists():
        from safetensors.numpy import load_file

        state = load_file(str(st))
    elif binf.exists():
        import torch

        loaded = torch.load(binf, map_location="cpu", weights_only=True)
        state = {k: v.float().numpy() for k, v in loaded.items()}
    else:
        raise ConversionError(f"{adapter_dir}: no adapter_model.safetensors or adapter_model.bin found")
    load_lora_weights(model, state, source=source)
    embed = state.get(f"{PEFT_PREFIX}model.embed_tokens.weight")
    head = state.get(f"{PEFT_PREFIX}lm_head.weight")
    for name, value, var in (
        ("embed_tokens", embed, model.embed_tokens.embedding),
        ("lm_head", head, None if model.lm_head is None else model.lm_head.kernel),
    ):
        if value is None or var is None:
            continue
        value = value if name == "embed_tokens" else value.T
        if tuple(value.shape) != tuple(var.shape):
            raise ConversionError(
                f"{source}: {name} has shape {tuple(value.shape)} but the model's is {tuple(var.shape)}: "
                "the adapter was trained with a different vocabulary size (resize the base first)"
            )
        var[...] = jnp.asarray(value, var.dtype)
