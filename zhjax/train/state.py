"""The state of a training run as one pytree: step, trainable weights, optimizer state and the dropout key.

`TrainState` is what the jitted step takes and returns, what a run checkpoint saves and restores, and what the
planner compiles against as abstract shapes. The frozen base is not part of it: it never changes, is never
checkpointed (the run records where it came from) and is passed to the step beside the state.

Shardings mirror the state (`train_state_shardings`): the trainable weights follow the rules table
(`zhjax.parallel.rules`), each optimizer-state tree that mirrors the parameters (Adam's `mu`, `nu`) takes the
parameters' shardings (`optax.tree_map_params` finds those trees from the optimizer's own `init`), and the
scalars (step, Adam's count, the key) are replicated.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from zhjax.parallel.rules import state_shardings


class TrainState(NamedTuple):
    """One run's changing state. `step` counts optimizer updates; update k's dropout uses `fold_in(rng, k)`."""

    step: Any  # int32 scalar
    trainable: Any  # nnx.State of the trainable (float32) weights
    opt_state: Any  # the optax state of `trainable`
    rng: Any  # the run's base PRNG key (from the job's seed); not advanced, the step is folded in


def train_state_shardings(tx: optax.GradientTransformation, trainable, mesh: jax.sharding.Mesh) -> TrainState:
    """The shardings of a `TrainState` for `trainable` (arrays or abstract shapes) trained by `tx` on `mesh`.

    (Letting the compiler pick for `jax.jit(tx.init)` instead would replicate the moments: zeros that depend on no
    input get a replicated placement, and every device would hold every moment.)
    """
    replicated = NamedSharding(mesh, PartitionSpec())
    train_sh = state_shardings(trainable, mesh)
    opt_sh = optax.tree_map_params(tx, lambda _, sh: sh, jax.eval_shape(tx.init, trainable), train_sh,
                                   transform_non_params=lambda _: replicated)
    return TrainState(step=replicated, trainable=train_sh, opt_state=opt_sh, rng=replicated)


def init_train_state(tx: optax.GradientTransformation, trainable, seed: int, shardings: TrainState) -> TrainState:
    """Step 0 of a run: `trainable` (placed as `shardings` says), fresh optimizer state and the key of `seed`."""
    trainable = jax.device_put(trainable, shardings.trainable)
    fresh = jax.jit(lambda t: (jnp.zeros((), jnp.int32), tx.init(t), jax.random.key(seed)),
                    out_shardings=(shardings.step, shardings.opt_state, shardings.rng))
    step, opt_state, rng = fresh(trainable)
    return TrainState(step=step, trainable=trainable, opt_state=opt_state, rng=rng)


def abstract_train_state(tx: optax.GradientTransformation, trainable, shardings: TrainState) -> TrainState:
    """The `TrainState` of `trainable` as `jax.ShapeDtypeStruct`s carrying `shardings` (nothing is allocated)."""
    shapes = jax.eval_shape(lambda t: (jnp.zeros((), jnp.int32), t, tx.init(t), jax.random.key(0)), trainable)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), TrainState(*shapes),
                        shardings)


def step_array(step: int, sharding: jax.sharding.Sharding) -> jax.Array:
    """`step` as the int32 scalar of a `TrainState`, placed with `sharding` (works across processes)."""
    return jax.make_array_from_callback((), sharding, lambda _: np.asarray(step, np.int32))
