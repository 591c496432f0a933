"""zhjax checkpoints on disk (orbax).

A *base checkpoint* is a model's parameters in zhjax's own layout (stacked layers) plus `zhjax.json`, which records
the layout (`scanned`, dtype, vocab size) and the full `ModelConfig`, so a reader never guesses how the arrays are
laid out. Saving writes to a temporary directory that replaces the destination only when complete.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from etils import epath
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


class RunCheckpointer:
    """Training checkpoints of one run: trainable params, optimizer state and a JSON `meta` item.

    `meta` holds the step, the data loader's position, the RNG seed and the job config. Saves are asynchronous
    (orbax `CheckpointManager`) and keep the newest `max_to_keep`; orbax writes each step to a temporary
    directory and renames it when complete, so a crash mid-save leaves the previous checkpoint restorable.
    Every process calls every method (orbax coordinates multi-host saves). `directory` may be a URL such as
    `gs://bucket/run/checkpoints`: orbax then writes there directly (each process its own shards) and, since an
    object store has no atomic rename, marks a finished step with a commit file instead.
    """

    def __init__(self, directory: str | Path, *, max_to_keep: int | None, async_save: bool = True):
        # a URL stays a URL (etils.epath picks its backend); `Path` would mangle `gs://` into a local `gs:/`
        self.directory = epath.Path(directory) if "://" in str(directory) else Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, enable_async_checkpointing=async_save, create=True
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("trainable", "opt_state", "meta"))

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None."""
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, trainable, opt_state, meta: dict) -> None:
        """Start saving (returns before the write finishes; `wait` blocks until it has)."""
        self.manager.save(
            step,
            args=ocp.args.Composite(
                trainable=ocp.args.StandardSave(nnx.to_pure_dict(trainable)),
                opt_state=ocp.args.StandardSave(opt_state),
                meta=ocp.args.JsonSave(meta),
            ),
        )

    def restore(self, step: int, trainable_target, opt_state_target):
        """Restore `(trainable, opt_state, meta)` of `step` onto the targets' shapes and shardings."""
        abstract = lambda tree: jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree
        )
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                trainable=ocp.args.StandardRestore(abstract(nnx.to_pure_dict(trainable_target))),
                opt_state=ocp.args.StandardRestore(abstract(opt_state_target)),
                meta=ocp.args.JsonRestore(),
            ),
        )
        trainable = jax.tree.map(lambda x: x, trainable_target)
        nnx.replace_by_pure_dict(trainable, restored["trainable"])
        return trainable, restored["opt_state"], restored["meta"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
