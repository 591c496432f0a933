"""The device mesh: built from `MeshConfig` over `jax.devices()`, and multi-host start-up.

Axis types are `Auto` on purpose: parameters and batches get explicit shardings at the jit boundary and GSPMD
propagates the rest (JAX 0.10's `make_mesh` defaults to Explicit axes, under which `with_sharding_constraint`
on a logical spec raises).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
from jax.sharding import AxisType

from zhjax.parallel.rules import MESH_AXES


@dataclass
class MeshConfig:
    """Sizes of the `data`, `fsdp` and `tensor` mesh axes; one of them may be -1 (fill with the rest)."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1


def mesh_shape(config: MeshConfig, num_devices: int) -> tuple[int, int, int]:
    """Resolve -1 and check that the axes multiply to the device count."""
    sizes = [config.data, config.fsdp, config.tensor]
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh: at most one axis may be -1, got data={config.data} fsdp={config.fsdp} tensor={config.tensor}")
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh: axis sizes must be positive or -1, got {sizes}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ValueError(f"mesh: {num_devices} devices are not divisible by the fixed axes' product {known}")
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ValueError(
            f"mesh: data*fsdp*tensor = {'*'.join(map(str, sizes))} = {math.prod(sizes)}, but {num_devices} devices are present"
        )
    return tuple(sizes)


def make_mesh(config: MeshConfig | None = None, devices=None) -> jax.sharding.Mesh:
    """A `(data, fsdp, tensor)` mesh over `devices` (default: all devices of all processes)."""
    devices = list(devices if devices is not None else jax.devices())
    shape = mesh_shape(config or MeshConfig(), len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)
