"""Filters that split a model's state into LoRA adapters, fully trained modules and the frozen base.

The trainer never guesses what is trainable: it asks for `trainable_filter(lora_config, full_finetuning)` and
passes it to `split_model`, which returns `(graphdef, trainable, frozen)`; `merge_model` puts them back together.
With LoRA and `modules_to_save=("embed_tokens", "lm_head")` the trainable state is the adapters plus the
embedding and head (on a tied model, the one shared matrix); everything else is frozen.
"""

from __future__ import annotations

from flax import nnx

from zhjax.config import LoraConfig

LORA_FILTER = nnx.LoRAParam


def modules_filter(names: tuple[str, ...]) -> nnx.filterlib.Filter:
    """Plain parameters under any of the named top-level modules (e.g. `embed_tokens`, `lm_head`)."""
    if not names:
        return nnx.Nothing
    return nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam), nnx.Any(*(nnx.PathContains(n) for n in names)))


def trainable_filter(lora: LoraConfig | None, full_finetuning: bool = False) -> nnx.filterlib.Filter:
    """What a run trains: every parameter when `full_finetuning`, else the adapters and `modules_to_save`."""
    if full_finetuning or lora is None:
        return nnx.Param
    return nnx.Any(LORA_FILTER, modules_filter(lora.modules_to_save))


def split_model(model: nnx.Module, trainable: nnx.filterlib.Filter):
    """`(graphdef, trainable_state, frozen_state)` of `model` for a pure train step."""
    graphdef, train_state, frozen_state = nnx.split(model, trainable, ...)
    return graphdef, train_state, frozen_state


def merge_model(graphdef, trainable_state, frozen_state) -> nnx.Module:
    """Inverse of `split_model`."""
    return nnx.merge(graphdef, trainable_state, frozen_state)


def count_params(state) -> int:
    """Number of scalars in a state (abstract shapes count too)."""
    import math

    import jax

    return sum(math.prod(x.shape) for x in jax.tree.leaves(state))


def variable_value(var):
    """The array (or abstract shape, or sharding) an `nnx.Variable` of a state holds."""
    getter = getattr(var, "get_value", None)
    return getter() if getter is not None else var.value
