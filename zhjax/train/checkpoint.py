"""Run checkpoints on disk (orbax); base checkpoints (a model's weights) are `zhjax.convert.base`.

A *run checkpoint* (`RunCheckpointer`) carries a checksum of every array it holds, in its `meta` item, computed on
the device at save time and compared after restore (`tree_checksums`). Each checksum is two wrapping 32-bit sums
of the array's bits weighted by odd functions of the element index: integer sums do not depend on the reduction
order, so the value is the same on any mesh, and any single changed bit changes the first sum. A newest checkpoint
that fails to restore or to verify is reported by name, moved to `checkpoints/damaged/`, and the next older one is
tried (`restore_latest_good`); the run never trains on weights it could not verify.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from zhjax.train.state import TrainState, step_array


class CheckpointError(ValueError):
    """No checkpoint of the run can be trusted; the message names each one and why."""


class CheckpointDamaged(CheckpointError):
    """One checkpoint's arrays differ from the checksums saved with them."""


def _as_uint32(x: jax.Array) -> jax.Array:
    """The bits of `x` as uint32 (narrower types widened, 64-bit types split into two words on a last axis)."""
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    width = x.dtype.itemsize
    if width == 8:
        return jax.lax.bitcast_convert_type(x, jnp.uint32)
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[width]
    return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def _checksum(x: jax.Array) -> jax.Array:
    bits = _as_uint32(x)
    index = jnp.zeros(bits.shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(bits.ndim)):  # the row-major element index, without reshaping a sharded array
        index = index + jax.lax.broadcasted_iota(jnp.uint32, bits.shape, axis) * jnp.uint32(stride & 0xFFFFFFFF)
        stride *= bits.shape[axis]
    first = jnp.sum(bits * (index * 2 + 1), dtype=jnp.uint32)
    rotated = (bits << 7) | (bits >> 25)
    second = jnp.sum(rotated * ((index * jnp.uint32(0x9E3779B1)) | 1), dtype=jnp.uint32)
    return jnp.stack([first, second])


_checksums = jax.jit(lambda tree: jax.tree.map(_checksum, tree))


def tree_checksums(tree) -> dict[str, list[int]]:
    """`{path: [sum1, sum2]}` of every array in `tree` (module docstring); collective in a multi-process run."""
    flat, _ = jax.tree_util.tree_flatten_with_path(_checksums(tree))
    # a replicated result is read from this process's own copy (a multi-process array is not fully addressable)
    host = lambda x: x.addressable_data(0) if x.is_fully_replicated else jax.device_get(x)
    return {jax.tree_util.keystr(path): [int(v) for v in host(value)] for path, value in flat}


class RunCheckpointer:
    """Training checkpoints of one run (a `TrainState`): trainable params, optimizer state and a JSON `meta` item.

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
        self._options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, enable_async_checkpointing=async_save, create=True
        )
        self.manager = self._open()

    def _open(self) -> ocp.CheckpointManager:
        return ocp.CheckpointManager(self.directory, options=self._options, item_names=("trainable", "opt_state", "meta"))

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None."""
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: TrainState, meta: dict) -> None:
        """Start saving `state` as checkpoint `step` (returns before the write finishes; `wait` blocks until it has).

        On disk: the trainable weights, the optimizer state and `meta` (which holds the step). The arrays'
        checksums are computed now, on the device, and saved in `meta["checksums"]`.
        """
        trainable = nnx.to_pure_dict(state.trainable)
        meta = {**meta, "step": step, "checksums": {"trainable": tree_checksums(trainable),
                                                    "opt_state": tree_checksums(state.opt_state)}}
        self.manager.save(
            step,
            args=ocp.args.Composite(
                trainable=ocp.args.StandardSave(trainable),
                opt_state=ocp.args.StandardSave(state.opt_state),
                meta=ocp.args.JsonSave(meta),
            ),
        )

    def restore(self, step: int, target: TrainState) -> tuple[TrainState, dict]:
        """Restore `(state, meta)` of checkpoint `step` onto `target`'s shapes and shardings.

        The step comes from `meta`, the key from `target` (the run's seed, recorded in `meta["seed"]`).
        """
        abstract = lambda tree: jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree
        )
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                trainable=ocp.args.StandardRestore(abstract(nnx.to_pure_dict(target.trainable))),
                opt_state=ocp.args.StandardRestore(abstract(target.opt_state)),
                meta=ocp.args.JsonRestore(),
            ),
        )
        meta = restored["meta"]
        saved = meta.get("checksums")
        if saved is not None:  # checkpoints written before checksums existed are restored unverified
            for name in ("trainable", "opt_state"):
                got = tree_checksums(restored[name])
                bad = sorted(k for k in set(got) | set(saved[name]) if got.get(k) != saved[name].get(k))
                if bad:
                    raise CheckpointDamaged(f"{name} checksum mismatch in {', '.join(bad[:3])}"
                                            + (f" and {len(bad) - 3} more arrays" if len(bad) > 3 else ""))
        trainable = jax.tree.map(lambda x: x, target.trainable)
        nnx.replace_by_pure_dict(trainable, restored["trainable"])
        state = TrainState(step=step_array(meta["step"], target.step.sharding), trainable=trainable,
                           opt_state=restored["opt_state"], rng=target.rng)
        return state, meta

    def restore_latest_good(self, target: TrainState, *, report: Callable[[str], None] = print):
        """`(step, state, meta)` of the newest checkpoint that restores and verifies, or None if none.

        Each damaged newer checkpoint is reported by name and moved to `checkpoints/damaged/STEP-TIME` (kept, not
        deleted), so the run saves that step afresh. When checkpoints exist but none is good, nothing is moved and
        `CheckpointError` says which failed and why. Every process calls it.
        """
        failures = []
        for step in sorted(self.all_steps(), reverse=True):
            try:
                state, meta = self.restore(step, target)
            except Exception as e:  # noqa: BLE001 - any failure to read a checkpoint means "damaged"
                reason = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
                report(f"zhjax: warning: checkpoint {self.directory / str(step)} is damaged ({reason})")
                failures.append((step, reason))
                continue
            if failures:
                self._move_aside([s for s, _ in failures])
            return step, state, meta
        if failures:
            listed = "; ".join(f"{s}: {r}" for s, r in failures)
            raise CheckpointError(
                f"no usable checkpoint in {self.directory} ({listed}); move them away, or start fresh with "
                "overwrite_output_dir=true"
            )
        return None

    def _move_aside(self, steps: list[int]) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
        if jax.process_index() == 0:
            stamp = time.strftime("%Y%m%dT%H%M%S")
            damaged = self.directory / "damaged"
            damaged.mkdir(parents=True, exist_ok=True)
            note = damaged / "README.txt"  # an object store's folder exists only with an object in it
            if not note.exists():
                note.write_text("zhjax moved these checkpoints here: they failed to restore or to match their "
                                "checksums. Nothing reads them; delete them when you no longer need them.\n")
            for step in steps:  # through the path's own filesystem, so orbax's listing (the same one) sees it
                (self.directory / str(step)).rename(damaged / f"{step}-{stamp}")
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("zhjax-damaged-checkpoints-moved")
        self.manager = self._open()

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
