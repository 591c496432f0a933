"""Base checkpoints: a model's parameters in zhjax's own layout (orbax), readable without guessing.

A *base checkpoint* is a model's parameters in zhjax's own layout (stacked layers) plus `zhjax.json`, which records
the layout (`scanned`, dtype, vocab size) and the full `ModelConfig`, so a reader never guesses how the arrays are
laid out. Saving writes to a temporary directory that replaces the destination only when complete. (Run
checkpoints, with optimizer state and data position, are `zhjax.train.checkpoint`.)
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from flax import nnx

from zhjax.config import ModelConfig, RopeScaling
from zhjax.ownership import staged_dir

LAYOUT_VERSION = 1


def config_to_dict(config: ModelConfig) -> dict:
    """JSON-able dict of a `ModelConfig`."""
    return dataclasses.asdict(config)


def config_from_dict(d: dict) -> ModelConfig:
    """Inverse of `config_to_dict`."""
    d = dict(d)
    d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
    if isinstance(d.get("eos_token_id"), list):
        d["eos_token_id"] = tuple(d["eos_token_id"])
    return ModelConfig(**d)


def save_base_checkpoint(model: nnx.Module, out_dir: str | Path, *, source: str | None = None,
                         overwrite: bool = False) -> Path:
    """Save the model's base parameters (LoRA adapters excluded) as an orbax checkpoint with layout metadata.

    An existing `out_dir` that zhjax did not write, or the `source` directory itself, is refused (`zhjax.ownership`).
    """
    out_dir = Path(out_dir).absolute()
    _, _, base = nnx.split(model, nnx.LoRAParam, ...)
    with staged_dir(out_dir, inputs=[source], overwrite=overwrite) as tmp:
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(tmp / "params", nnx.to_pure_dict(base))
        meta = {
            "format": "zhjax-base",
            "layout_version": LAYOUT_VERSION,
            "scanned": True,
            "param_dtype": model.config.param_dtype,
            "vocab_size": model.config.vocab_size,
            "source": source,
            "config": config_to_dict(model.config),
        }
        (tmp / "zhjax.json").write_text(json.dumps(meta, indent=2))
    return out_dir


def load_base_checkpoint(path: str | Path) -> nnx.Module:
    """Load a base checkpoint written by `save_base_checkpoint` as a `LlamaForCausalLM`."""
    from zhjax.model.llama import LlamaForCausalLM

    path = Path(path).absolute()
    meta_file = path / "zhjax.json"
    if not meta_file.exists():
        raise FileNotFoundError(f"{path}: not a zhjax base checkpoint (zhjax.json is missing)")
    meta = json.loads(meta_file.read_text())
    if meta.get("format") != "zhjax-base" or meta.get("layout_version") != LAYOUT_VERSION:
        raise ValueError(
            f"{meta_file}: format {meta.get('format')!r} layout_version {meta.get('layout_version')!r}; "
            f"expected 'zhjax-base' version {LAYOUT_VERSION}"
        )
    config = config_from_dict(meta["config"])
    abstract = nnx.eval_shape(lambda: LlamaForCausalLM(config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0])),
        nnx.to_pure_dict(state),
    )
    with ocp.StandardCheckpointer() as ckptr:
        restored = ckptr.restore(path / "params", target)
    nnx.replace_by_pure_dict(state, restored)
    return nnx.merge(graphdef, state)
