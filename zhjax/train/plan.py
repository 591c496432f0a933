"""Ahead-of-time memory plans: compile a job's real train step for a device topology without owning it.

`plan_job` builds everything the trainer builds — the model's state split into trainable (float32) and frozen
(`dtype`) parts, the optimizer, the shardings of `zhjax.parallel.rules`, the `[accum, batch, seq]` batch — but as
abstract shapes (`nnx.eval_shape`: no weight is ever allocated), lowers and compiles the jitted step with the
trainer's in/out shardings and donation, and reads XLA's own per-device accounting (`memory_analysis`). The
devices can be compile-only TPU devices from `jax.experimental.topologies.get_topology_desc` (needs `libtpu`,
the `tpu` extra; works on a CPU-only machine), or the CPUs of this process (`--cpu-devices N` in `zhjax plan`).

Per-device total = arguments + outputs - outputs aliased to donated arguments + temporaries + generated code,
which is what the device must hold at the step's peak. When a TPU compile itself runs out of HBM, XLA's error
states the bytes it needed, and the plan reports that figure as "does not fit". `largest_batch` searches the
largest per-device batch that fits by doubling, then bisecting.

`zero2_bytes_per_gpu` is the comparison with the seed's DeepSpeed ZeRO-2 setup, computed with the formula in
its docstring (an estimate, not a measurement).
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from zhjax.config import ModelConfig
from zhjax.model.llama import LlamaForCausalLM
from zhjax.model.params import count_params, split_model, trainable_filter
from zhjax.parallel.mesh import make_mesh
from zhjax.precision import resolve_dtype
from zhjax.train.config import JobConfig
from zhjax.train.metrics import flops_per_token
from zhjax.train.optim import build_optimizer
from zhjax.train.state import abstract_train_state
from zhjax.train.step import build_train_step

GIB = 1024**3


@dataclasses.dataclass(frozen=True)
class Topology:
    """A TPU slice by its marketing name: libtpu topology, chip configuration, chips and HBM per chip."""

    name: str
    topology: str
    chip_config: str
    chips_per_host_bounds: tuple[int, int, int]
    hbm_gib: float


# v4 and v5p count TensorCores in the name (two per chip, run as one "megacore" device); v5e and v6e count chips.
TOPOLOGIES = {
    "v4-8": Topology("v4-8", "v4:2x2x1", "megacore", (2, 2, 1), 32.0),
    "v5p-8": Topology("v5p-8", "v5p:2x2x1", "megacore", (2, 2, 1), 95.0),
    "v5e-8": Topology("v5e-8", "v5e:2x4", "default", (2, 4, 1), 16.0),
    "v6e-8": Topology("v6e-8", "v6e:2x4", "default", (2, 4, 1), 32.0),
}


def tpu_devices(name: str) -> list:
    """Compile-only devices of a TPU slice (`v4-8`, `v5p-8`, `v5e-8`, `v6e-8`); needs `libtpu`."""
    if name not in TOPOLOGIES:
        raise ValueError(f"unknown topology {name!r}; known: {', '.join(TOPOLOGIES)}")
    import importlib.util

    if importlib.util.find_spec("libtpu") is None:
        raise RuntimeError("compiling for a TPU topology needs libtpu: pip install -e '.[tpu]'")
    from jax.experimental import topologies

    t = TOPOLOGIES[name]
    desc = topologies.get_topology_desc(
        platform="tpu", topology_name=t.topology, chip_config_name=t.chip_config,
        chips_per_host_bounds=t.chips_per_host_bounds, num_slices=1,
    )
    return list(desc.devices)


def usable_hbm_bytes(device) -> int | None:
    """Device memory XLA lets a program use on a (compile-only) TPU device: HBM less what the runtime reserves.

    Read from the compiler itself: a program that needs far more than any chip has fails to compile with
    "... exceeds available HBM (15.75G)", which states the figure. None when the message does not say.
    """
    mesh = jax.sharding.Mesh([device], ("x",))
    one = NamedSharding(mesh, PartitionSpec())
    # a 256 GiB temporary that XLA may not fuse away (the barrier makes it materialise)
    big = lambda x: jax.lax.optimization_barrier(jnp.broadcast_to(x, (1 << 36,)) * 2).sum()
    huge = jax.jit(big, in_shardings=one, out_shardings=one)
    try:
        huge.lower(jax.ShapeDtypeStruct((), jnp.float32, sharding=one)).compile()
    except Exception as e:  # the expected out-of-memory refusal
        if m := re.search(r"available HBM \(([\d.]+)([KMGT]?)\)", str(e)):
            return int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    return None


@dataclasses.dataclass
class Plan:
    """One compiled step's per-device memory (bytes), parameter counts and FLOPs; `total_bytes` is the peak."""

    devices: str
    num_devices: int
    mesh: dict[str, int]
    per_device_batch: int
    accum: int
    seq_len: int
    trainable_params: int
    frozen_params: int
    flops_per_token: float
    capacity_bytes: float
    argument_bytes: int = 0
    output_bytes: int = 0
    alias_bytes: int = 0
    temp_bytes: int = 0
    code_bytes: int = 0
    total_bytes: int = 0
    compile_seconds: float = 0.0
    oom_message: str | None = None  # the compiler refused the program for lack of memory

    @property
    def fits(self) -> bool:
        return self.oom_message is None and self.total_bytes <= self.capacity_bytes

    def last_line(self) -> str:
        """`per-device total: X GiB of Y GiB (fits)` or `(does not fit)`."""
        verdict = "fits" if self.fits else "does not fit"
        return f"per-device total: {self.total_bytes / GIB:.2f} GiB of {self.capacity_bytes / GIB:.2f} GiB ({verdict})"


def job_model_config(cfg: JobConfig, backend: str | None = None) -> tuple[ModelConfig, str]:
    """The job's architecture with the trainer's numerics, and where it came from (no weights are read).

    `backend` is the platform the job will run on (`dtype: auto` depends on it; default: this process's backend).

    `init_from`'s config (HF `config.json` or zhjax `zhjax.json`) wins when that directory exists here, as in the
    trainer; else the `model:` section (the recipes carry the real architectures for exactly this).
    """
    dtype = resolve_dtype(cfg.dtype, backend or jax.default_backend())
    numerics = dict(dtype=dtype, param_dtype=dtype, remat=cfg.remat, attention=cfg.attention)
    if hasattr(cfg, "remat_names"):  # the names `save_only_these_names` keeps
        numerics["remat_names"] = cfg.remat_names
    source = Path(cfg.init_from) if cfg.init_from else None
    if source is not None and (source / "zhjax.json").exists():
        from zhjax.convert.base import config_from_dict

        config = config_from_dict(json.loads((source / "zhjax.json").read_text())["config"])
        return config.replace(**numerics), str(source / "zhjax.json")
    if source is not None and (source / "config.json").exists():
        from zhjax.convert.hf import read_config

        return read_config(source)[0].replace(**numerics), str(source / "config.json")
    if cfg.model is None:
        raise ValueError("the job has neither a `model:` section nor an `init_from` directory with a config here")
    return cfg.model.replace(**numerics), "model: section"


def job_seq_len(cfg: JobConfig, kind: str) -> int:
    """Tokens per row: `block_size` (pre-training) or `max_seq_length` (SFT), as the data loader pads them."""
    return cfg.data.block_size if kind == "pretrain" else cfg.data.max_seq_length


def batch_keys(cfg: JobConfig, kind: str) -> tuple[str, ...]:
    """The batch columns the trainer feeds the step (segment ids only when documents must not see each other)."""
    if kind == "pretrain" and cfg.data.attend_across_documents:
        return ("input_ids", "labels", "positions")
    return ("input_ids", "labels", "segment_ids", "positions")


@dataclasses.dataclass
class LoweredJob:
    """A job's train step lowered on a mesh from abstract shapes, with the sizes a plan reports."""

    lowered: Any  # jax.stages.Lowered
    mesh: jax.sharding.Mesh
    model: ModelConfig
    accum: int
    seq_len: int
    trainable_params: int
    frozen_params: int
    embed_trainable: bool


def lower_job(cfg: JobConfig, kind: str, devices: Sequence) -> LoweredJob:
    """The trainer's train step for `cfg` (`zhjax.train.step.build_train_step`) lowered on `devices`.

    Nothing is allocated: the model, its split, the optimizer state and the batch are abstract shapes carrying the
    shardings the trainer gives them.
    """
    mesh = make_mesh(cfg.mesh, devices)
    model_cfg, _ = job_model_config(cfg, devices[0].platform)
    lora = None if cfg.full_finetuning else cfg.lora
    abstract = nnx.eval_shape(lambda: LlamaForCausalLM(model_cfg, lora, rngs=nnx.Rngs(cfg.seed)))
    graphdef, trainable, frozen = split_model(abstract, trainable_filter(abstract.lora, cfg.full_finetuning))
    trainable = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32), trainable)
    tx = build_optimizer(cfg.optim, trainable, max(cfg.max_steps, 1),
                         schedule_length_in_state=cfg.max_train_seconds > 0)
    train_step = build_train_step(graphdef, tx, trainable, frozen, mesh, lora=abstract.lora,
                                  skip_nonfinite=cfg.skip_nonfinite, loss_chunk=cfg.loss_chunk_size,
                                  lazy_vocab=cfg.optim.lazy_vocab_rows)
    state = abstract_train_state(tx, trainable, train_step.state_shardings)
    frozen = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), frozen,
                          train_step.frozen_shardings)
    accum, seq = cfg.optim.gradient_accumulation_steps, job_seq_len(cfg, kind)
    rows = cfg.per_device_train_batch_size * len(mesh.devices.flat)
    batch = {k: jax.ShapeDtypeStruct((accum, rows, seq), jnp.int32, sharding=train_step.batch_sharding)
             for k in batch_keys(cfg, kind)}
    embed_trainable = any(str(p[0]) == "embed_tokens" for p, _ in nnx.to_flat_state(trainable))
    return LoweredJob(train_step.lower(state, frozen, batch), mesh, model_cfg, accum, seq, count_params(trainable),
                      count_params(frozen), embed_trainable)


def plan_job(cfg: JobConfig, kind: str, devices: Sequence, capacity_bytes: float,
             *, describe_devices: str | None = None) -> Plan:
    """Compile the job's train step on `devices` from abstract shapes and return its memory plan."""
    start = time.perf_counter()
    job = lower_job(cfg, kind, devices)
    n = len(job.mesh.devices.flat)
    plan = Plan(
        devices=describe_devices or f"{n} x {devices[0].device_kind}",
        num_devices=n,
        mesh=dict(job.mesh.shape),
        per_device_batch=cfg.per_device_train_batch_size,
        accum=job.accum,
        seq_len=job.seq_len,
        trainable_params=job.trainable_params,
        frozen_params=job.frozen_params,
        flops_per_token=flops_per_token(job.model, job.trainable_params, job.frozen_params, job.seq_len,
                                        embed_trainable=job.embed_trainable),
        capacity_bytes=capacity_bytes,
    )
    try:
        with jax.set_mesh(job.mesh):
            compiled = job.lowered.compile()
    except Exception as e:  # XLA's out-of-memory error is a JaxRuntimeError/XlaRuntimeError by message only
        needed = _oom_bytes(str(e))
        if needed is None:
            raise
        plan.total_bytes, plan.oom_message = needed, _first_line(str(e))
        plan.compile_seconds = time.perf_counter() - start
        return plan
    plan.compile_seconds = time.perf_counter() - start
    ma = compiled.memory_analysis()
    plan.argument_bytes = int(ma.argument_size_in_bytes)
    plan.output_bytes = int(ma.output_size_in_bytes)
    plan.alias_bytes = int(ma.alias_size_in_bytes)
    plan.temp_bytes = int(ma.temp_size_in_bytes)
    plan.code_bytes = int(getattr(ma, "generated_code_size_in_bytes", 0) or 0)
    plan.total_bytes = plan.argument_bytes + plan.output_bytes - plan.alias_bytes + plan.temp_bytes + plan.code_bytes
    return plan


# XLA's out-of-memory errors: "... required for HLO temporaries (249.64G) exceeds available HBM (15.75G)" and
# "Ran out of memory in memory space hbm. Used 20.5G of 15.75G hbm."
_OOM = (re.compile(r"\(([\d.]+)([KMGT]?)\) exceeds available HBM"), re.compile(r"Used ([\d.]+)([KMGT]?) of [\d.]+[KMGT]? hbm"))
_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


def _oom_bytes(message: str) -> int | None:
    """Bytes XLA said a program needs when it refused it for lack of device memory (-1: not stated); else None.

    The figure is a lower bound on the total (the temporaries alone, in the first format).
    """
    if "RESOURCE_EXHAUSTED" not in message and "out of memory" not in message.lower():
        return None
    for pattern in _OOM:
        if m := pattern.search(message):
            return int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    return -1


def _first_line(message: str) -> str:
    return next((line.strip() for line in message.splitlines() if line.strip()), message)[:300]


def largest_batch(make_plan: Callable[[int], Plan], *, guess: int | None = None, limit: int = 1024,
                  report: Callable[[Plan], None] | None = None) -> Plan | None:
    """The plan at the largest per-device batch that fits (at most `limit`), or None when batch 1 does not.

    Memory grows about linearly with the batch, so after two probes (1 and 2, or `guess` and `guess + 1`) the
    next probe is where the line through the measured batches nearest the bracket's ends crosses the capacity;
    once a batch that does not fit is known, secant and bisection probes alternate, so a curve far from linear
    still costs only logarithmically many compiles, and a linear one 4. The bracket (largest batch known to fit, smallest known not to) makes the
    answer exact.
    """
    tried: dict[int, Plan] = {}
    lo, hi = 0, limit + 1  # lo fits (0: nothing yet), hi does not

    def probe(b: int) -> None:
        nonlocal lo, hi
        if b in tried or not lo < b < hi:
            return
        tried[b] = make_plan(b)
        if report is not None:
            report(tried[b])
        if tried[b].fits:
            lo = b
        else:
            hi = b

    for b in ((guess, guess + 1) if guess else (1, 2)):
        probe(b)
    if guess and hi == guess:  # the guess was too high: restart from the bottom
        probe(1)
    secants = 0
    while hi - lo > 1 and (lo or 1 not in tried):
        bisect = secants == 1 and hi <= limit  # secant and bisection alternate once the top is known
        probe((lo + hi) // 2 if bisect else _secant(tried, lo, hi))
        secants = 0 if bisect else secants + 1
    return tried.get(lo)


def _secant(tried: dict[int, Plan], lo: int, hi: int) -> int:
    """The batch where memory, interpolated linearly between the measured batches nearest the bracket's ends
    (the two largest that fit while nothing has failed), meets capacity."""
    points = sorted((b, p.total_bytes) for b, p in tried.items() if p.total_bytes > 0)
    below = [pt for pt in points if pt[0] <= lo]
    above = [pt for pt in points if pt[0] >= hi]
    pair = (below[-1], above[0]) if below and above else tuple(below[-2:])
    if len(pair) == 2:
        (b1, t1), (b2, t2) = pair
        per_row = (t2 - t1) / (b2 - b1)
        capacity = tried[b1].capacity_bytes
        if per_row > 0:
            return min(max(int(b1 + (capacity - t1) // per_row), lo + 1), hi - 1)
    return min(max(lo * 2, lo + 1), hi - 1)


def zero2_bytes_per_gpu(model: ModelConfig, trainable_params: int, frozen_params: int, *, gpus: int,
                        batch: int, seq_len: int, gradient_checkpointing: bool = True) -> dict[str, float]:
    """Per-GPU memory of the seed's setup for the same job: DeepSpeed ZeRO-2, fp16 mixed precision, PEFT LoRA.

    ```
    weights      = 2 * (trainable + frozen)            fp16 model, every parameter replicated on every GPU
    grads        = 2 * trainable / gpus                fp16 gradients, partitioned (ZeRO-2)
    optimizer    = 12 * trainable / gpus               fp32 master weights + Adam m and v, partitioned
    activations  = layers * 2*b*s*h                    checkpointed layer inputs (fp16), with checkpointing
                 + 34*b*s*h + 5*b*heads*s^2            one layer's activations during its backward (fp16)
                 + 10*b*s*vocab                        fp16 logits, their fp32 copy and fp32 softmax gradient
    ```

    The layer terms are Korthikanti et al. (2022), eq. 1, for a transformer layer in 16-bit without flash
    attention (the seed's first release used none); without checkpointing every layer keeps them. Buffers,
    fragmentation and the CUDA context (about 1-2 GiB in practice) are not included.
    """
    b, s, h = batch, seq_len, model.hidden_size
    layer = 34 * b * s * h + 5 * b * model.num_attention_heads * s * s
    if gradient_checkpointing:
        act = model.num_hidden_layers * 2 * b * s * h + layer
    else:
        act = model.num_hidden_layers * layer
    act += 10 * b * s * model.vocab_size
    parts = {
        "weights": 2.0 * (trainable_params + frozen_params),
        "grads": 2.0 * trainable_params / gpus,
        "optimizer": 12.0 * trainable_params / gpus,
        "activations": float(act),
    }
    parts["total"] = sum(parts.values())
    return parts


def format_plan(plan: Plan, *, title: str, model: ModelConfig, source: str) -> list[str]:
    """The human-readable report of `zhjax plan`, ending with `Plan.last_line`."""
    mesh = " ".join(f"{k}={v}" for k, v in plan.mesh.items())
    lines = [
        title,
        f"devices: {plan.devices}, mesh {mesh}",
        f"model ({source}): {model.num_hidden_layers} layers, hidden {model.hidden_size}, heads "
        f"{model.num_attention_heads}/{model.num_key_value_heads}, vocab {model.vocab_size}, dtype {model.dtype}, "
        f"remat {model.remat}, attention {model.attention}",
        f"batch: {plan.per_device_batch} per device x {plan.num_devices} devices x {plan.accum} accumulation = "
        f"{plan.per_device_batch * plan.num_devices * plan.accum} rows of {plan.seq_len} tokens per step",
        f"parameters: trainable {plan.trainable_params:,} (float32, with Adam state), frozen {plan.frozen_params:,} "
        f"({model.param_dtype})",
        f"FLOPs per token: {plan.flops_per_token:.4g} (training step; 4 per frozen and 6 per trained matmul "
        f"parameter, plus attention)",
    ]
    if plan.oom_message:
        lines.append(f"the compiler ran out of device memory: {plan.oom_message}")
    else:
        lines += [
            "per-device memory (XLA memory_analysis of the compiled step):",
            f"  arguments    {plan.argument_bytes / GIB:8.3f} GiB   (trainable, Adam state, frozen base, batch)",
            f"  outputs      {plan.output_bytes / GIB:8.3f} GiB   ({plan.alias_bytes / GIB:.3f} GiB of them reuse "
            "donated arguments)",
            f"  temporaries  {plan.temp_bytes / GIB:8.3f} GiB   (activations, gradients, workspace)",
            f"  code         {plan.code_bytes / GIB:8.3f} GiB",
        ]
    lines.append(f"compiled in {plan.compile_seconds:.1f} s")
    lines.append(plan.last_line())
    return lines
