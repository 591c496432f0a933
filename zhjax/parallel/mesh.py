"""The device mesh: built from `MeshConfig` over `jax.devices()`, and multi-host start-up.

Axis types are `Auto` on purpose: parameters and batches get explicit shardings at the jit boundary and GSPMD
propagates the rest (JAX 0.10's `make_mesh` defaults to Explicit axes, under which `with_sharding_constraint`
on a logical spec raises).

Multi-host: `initialize` starts `jax.distributed` before anything touches a device. On TPU pod slices, SLURM
(one task per node) and Open MPI the coordinator, process count and index are auto-detected; elsewhere they come
from `--coordinator/--num-processes/--process-id` (or `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`,
`JAX_PROCESS_ID`). Every process then sees the global device list, builds the same mesh and runs the same
program; each feeds only its own rows of a batch. On CPU the collectives go over gloo, so the whole path runs as
several processes on one machine (tests do that). A dead or frozen peer is detected by the coordination
service's heartbeat: the survivors exit with "the JAX distributed service detected fatal errors ... another
task died" (or a gloo "connection reset" error from a collective in flight) within `heartbeat_timeout`
seconds instead of waiting forever.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import jax
from jax.sharding import AxisType

from zhjax.config import MESH_AXES


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


# ----------------------------------------------------------------------------------------------- multi-host


def cluster_environment(environ: dict[str, str] | None = None) -> str | None:
    """The multi-process launcher this process runs under (`slurm`, `ompi`, `tpu`), or None.

    Only launches with more than one process count: a single SLURM task or a single-host TPU VM trains
    without `jax.distributed`. (A multi-host TPU slice that sets none of these variables, the usual case
    with `gcloud ... ssh --worker=all`, is started with `--distributed`, and JAX reads the slice's metadata.)
    """
    env = os.environ if environ is None else environ
    if env.get("SLURM_JOB_ID") and int(env.get("SLURM_NTASKS", env.get("SLURM_NPROCS", "1"))) > 1:
        return "slurm"
    if int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        return "ompi"
    if "," in env.get("TPU_WORKER_HOSTNAMES", "") or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return "tpu"
    return None


def initialize(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    auto: bool = False,
    local_device_ids: list[int] | None = None,
    initialization_timeout: int = 300,
    heartbeat_timeout: int = 60,
    shutdown_timeout: int = 60,
) -> bool:
    """Start `jax.distributed` for a multi-process run; returns whether it did (False: single process).

    Explicit mode: `coordinator` ("host:port" of process 0), `num_processes` and `process_id` all given.
    Auto mode (`auto=True`, or a launcher found by `cluster_environment`): JAX detects them (TPU pods, SLURM,
    Open MPI). With neither, this is a no-op and the run is single-process. Must run before any JAX
    computation; calling it again after a successful start is a no-op.

    `initialization_timeout` bounds the wait for all processes to connect, `heartbeat_timeout` how long a
    silent peer is tolerated before every process is stopped with an error, `shutdown_timeout` the wait for
    peers at exit (seconds).
    """
    if jax.distributed.is_initialized():
        return True
    given = {"coordinator": coordinator, "num_processes": num_processes, "process_id": process_id}
    explicit = any(v is not None for v in given.values())
    if explicit and any(v is None for v in given.values()):
        missing = ", ".join(f"--{k.replace('_', '-')}" for k, v in given.items() if v is None)
        raise ValueError(f"multi-host: {missing} missing; give --coordinator, --num-processes and --process-id together")
    if not explicit and not auto and cluster_environment() is None:
        return False
    if explicit and not 0 <= process_id < num_processes:
        raise ValueError(f"multi-host: process id {process_id} is not in [0, {num_processes})")
    if local_device_ids is None and not explicit:
        local_device_ids = slurm_node_devices()
    # CPU processes exchange collectives over gloo (TCP); GPU and TPU clients ignore this setting.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=coordinator,
        num_processes=num_processes,
        process_id=process_id,
        local_device_ids=local_device_ids,
        initialization_timeout=initialization_timeout,
        heartbeat_timeout_seconds=heartbeat_timeout,
        shutdown_timeout_seconds=shutdown_timeout,
    )
    return True


def slurm_node_devices(environ: dict[str, str] | None = None) -> list[int] | None:
    """All GPUs of the node when SLURM runs one task per node, else None (JAX's default).

    JAX's SLURM detection gives each task the one GPU numbered by its local task id, which suits one task per
    GPU; with one task per node that would leave all but GPU 0 idle. `JAX_LOCAL_DEVICE_IDS` overrides both.
    """
    env = os.environ if environ is None else environ
    if cluster_environment(env) != "slurm" or env.get("JAX_LOCAL_DEVICE_IDS"):
        return None
    nodes = int(env.get("SLURM_STEP_NUM_NODES", env.get("SLURM_JOB_NUM_NODES", "0")) or 0)
    gpus = env.get("SLURM_GPUS_ON_NODE", "")
    if nodes and int(env.get("SLURM_NTASKS", env.get("SLURM_NPROCS", "1"))) == nodes and gpus.isdigit():
        return list(range(int(gpus)))
    return None


# What a failed collective says when the real fault is a peer process that died or froze.
_PEER_FAILURE_SIGNS = ("Gloo", "Connection reset", "coordination service", "heartbeat")


@contextlib.contextmanager
def explain_peer_failures() -> Iterator[None]:
    """Around a multi-process run: a collective failure that leaves the block is explained on stderr, then re-raised.

    The exception is unchanged; a one-line note says what it most likely means (a peer process died, and its own
    log holds the first error). Scoped to the block rather than installed as `sys.excepthook`, so importing or
    initializing zhjax never changes how the rest of the process reports its errors.
    """
    try:
        yield
    except Exception as e:
        if jax.distributed.is_initialized() and any(s in str(e) for s in _PEER_FAILURE_SIGNS):
            print(
                f"zhjax: process {jax.process_index()} of {jax.process_count()} stopped: a collective with the other "
                "processes failed, most likely because one of them died; see its log for the first error.",
                file=sys.stderr,
            )
        raise


def add_distributed_args(parser: argparse.ArgumentParser) -> None:
    """The multi-host flags of `zhjax pretrain/sft`; defaults come from `JAX_*` environment variables."""
    env = os.environ
    g = parser.add_argument_group("multi-host (jax.distributed)")
    g.add_argument("--distributed", action="store_true",
                   help="start jax.distributed with auto-detection (TPU pod slices, SLURM, Open MPI)")
    g.add_argument("--coordinator", default=env.get("JAX_COORDINATOR_ADDRESS"), metavar="HOST:PORT",
                   help="address of process 0's coordinator (explicit mode; env JAX_COORDINATOR_ADDRESS)")
    g.add_argument("--num-processes", type=int, default=_env_int("JAX_NUM_PROCESSES"), metavar="N",
                   help="number of processes (explicit mode; env JAX_NUM_PROCESSES)")
    g.add_argument("--process-id", type=int, default=_env_int("JAX_PROCESS_ID"), metavar="I",
                   help="this process's index, 0..N-1 (explicit mode; env JAX_PROCESS_ID)")
    g.add_argument("--heartbeat-timeout", type=int, default=60, metavar="S",
                   help="seconds a silent peer is tolerated before all processes stop with an error (default 60)")
    g.add_argument("--init-timeout", type=int, default=300, metavar="S",
                   help="seconds to wait for all processes to connect (default 300)")


def initialize_from_args(args: argparse.Namespace) -> bool:
    """`initialize` with the flags of `add_distributed_args`; a no-op for a plain single-process run."""
    return initialize(
        args.coordinator,
        args.num_processes,
        args.process_id,
        auto=args.distributed,
        initialization_timeout=args.init_timeout,
        heartbeat_timeout=args.heartbeat_timeout,
    )


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else None
