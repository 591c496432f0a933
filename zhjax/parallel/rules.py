"""Logical parameter and activation axes to mesh axes: the one table (`RULES`, kept in `zhjax.config`) applied.

Mesh axes: `data` (pure data parallelism), `fsdp` (data parallelism with parameters, gradients and optimizer
state sharded: ZeRO-3), `tensor` (Megatron-style tensor parallelism). Every parameter dim carries a logical name
(`logical_axes` metadata, set where the parameter is created); `logical_to_spec` turns those names into a
`PartitionSpec`. A dim whose size the mesh axis does not divide is replicated instead (say, a 49953-row
vocabulary over `tensor=2`), so any model runs on any mesh; `describe` reports where that happened.
"""

from __future__ import annotations

import math

import jax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

# the table itself lives in `zhjax.config`, below the model, whose splash-attention wrapper reads it too
from zhjax.config import AXIS_RULES as RULES


def _axis_size(mesh: jax.sharding.Mesh, axes) -> int:
    if axes is None:
        return 1
    axes = (axes,) if isinstance(axes, str) else axes
    return math.prod(mesh.shape[a] for a in axes)


def logical_to_spec(logical_axes: tuple[str | None, ...], shape: tuple[int, ...], mesh: jax.sharding.Mesh) -> PartitionSpec:
    """The PartitionSpec for a parameter of `shape` with these logical axis names, under `RULES`."""
    spec, used = [], set()
    for name, size in zip(logical_axes, shape, strict=True):
        axes = RULES.get(name) if name else None
        flat = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
        if not flat or used & set(flat) or size % _axis_size(mesh, flat):
            spec.append(None)
            continue
        used |= set(flat)
        spec.append(axes)
    return PartitionSpec(*spec)


def state_shardings(state: nnx.State, mesh: jax.sharding.Mesh) -> nnx.State:
    """A state of `NamedSharding`s with the structure of `state` (abstract or concrete)."""

    def sharding_of(var):
        axes = var.get_metadata().get("logical_axes") or (None,) * len(var.shape)
        return NamedSharding(mesh, logical_to_spec(tuple(axes), tuple(var.shape), mesh))

    return jax.tree.map(
        lambda v: v.replace(sharding_of(v)), state, is_leaf=lambda x: isinstance(x, nnx.Variable)
    )


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
    """Batches are sharded over (`data`, `fsdp`) on their leading dim."""
    return NamedSharding(mesh, PartitionSpec(RULES["batch"]))


def microbatch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
    """A train step's `[accum, batch, seq]` arrays: the micro-batch axis whole, rows as `batch_sharding`."""
    return NamedSharding(mesh, PartitionSpec(None, RULES["batch"]))


def describe(state: nnx.State, shardings: nnx.State) -> list[str]:
    """One line per parameter: path, shape and the PartitionSpec it got."""
    lines = []
    for (path, var), (_, sh) in zip(nnx.to_flat_state(state), nnx.to_flat_state(shardings), strict=True):
        value = sh.get_value() if hasattr(sh, "get_value") else sh.value
        lines.append(f"{'/'.join(map(str, path))} {tuple(var.shape)} {value.spec}")
    return lines
