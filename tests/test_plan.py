"""`zhjax plan`: the real train step compiled ahead of time, its memory read from XLA, on CPU meshes and TPU slices."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAST_LINE = re.compile(r"^per-device total: (\d+\.\d+) GiB of (\d+\.\d+) GiB \((fits|does not fit)\)$")
GIB = 1024**3


def test_plan_cli_on_the_tiny_preset_with_8_cpu_devices_ends_with_the_verdict_line(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, "-m", "zhjax.train.plan_cli", "--config", "configs/pretrain/tiny.yaml", "--cpu-devices", "8",
         "--json", str(tmp_path / "plan.json")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    m = LAST_LINE.match(lines[-1])
    assert m, lines[-1]
    used, capacity, verdict = float(m.group(1)), float(m.group(2)), m.group(3)
    assert 0 < used < capacity and verdict == "fits"
    text = proc.stdout
    assert "mesh data=1 fsdp=8 tensor=1" in text
    trainable, frozen = (int(x.replace(",", "")) for x in re.search(r"trainable ([\d,]+).*frozen ([\d,]+)", text).groups())
    assert trainable > 0 and frozen > 0
    assert float(re.search(r"FLOPs per token: ([\d.e+]+)", text).group(1)) > 0
    for part in ("arguments", "temporaries"):
        assert re.search(rf"{part}\s+([\d.]+) GiB", text)
    # ZeRO-3: each weight and both its Adam moments are split over fsdp=8 as the rules table says (a LoRA B, whose
    # dims are the rank and heads/mlp, stays whole), and so is the batch
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert (plan["trainable_params"], plan["frozen_params"]) == (trainable, frozen)
    expected = _per_device_bytes("pretrain", fsdp=8) + 3 * 8 * 8 * 64 * 4 / 8  # input_ids, labels, positions
    assert expected <= plan["argument_bytes"] <= expected + 64, (plan["argument_bytes"], expected)
    assert 0 < plan["total_bytes"] and plan["fits"]


def _per_device_bytes(kind: str, fsdp: int) -> float:
    """float32 trainable x 3 (weights, Adam mu, nu) + frozen, each leaf divided by its shards under RULES."""
    import types

    from flax import nnx

    from zhjax.model.llama import LlamaForCausalLM
    from zhjax.model.params import split_model, trainable_filter
    from zhjax.parallel.rules import logical_to_spec

    cfg = _tiny(kind)
    mesh = types.SimpleNamespace(shape={"data": 1, "fsdp": fsdp, "tensor": 1})
    abstract = nnx.eval_shape(lambda: LlamaForCausalLM(cfg.model, cfg.lora, rngs=nnx.Rngs(0)))
    _, trainable, frozen = split_model(abstract, trainable_filter(cfg.lora))

    def total(state, copies):
        out = 0.0
        for _, var in nnx.to_flat_state(state):
            spec = logical_to_spec(tuple(var.get_metadata()["logical_axes"]), tuple(var.shape), mesh)
            shards = fsdp if any(a == "fsdp" or (isinstance(a, tuple) and "fsdp" in a) for a in spec) else 1
            out += copies * 4 * math.prod(var.shape) / shards
        return out

    return total(trainable, 3) + total(frozen, 1)


def _tiny(kind: str, **changes):
    from zhjax.train.config import load_job_config

    cfg = load_job_config(kind, str(REPO / "configs" / kind / "tiny.yaml"), [])
    return dataclasses.replace(cfg, **changes)


def test_sft_batches_carry_segment_ids_and_pretraining_ones_only_when_documents_are_kept_apart():
    from zhjax.train.plan import batch_keys

    assert "segment_ids" in batch_keys(_tiny("sft"), "sft")
    assert "segment_ids" not in batch_keys(_tiny("pretrain"), "pretrain")
    pretrain = _tiny("pretrain")
    separate = dataclasses.replace(pretrain, data=dataclasses.replace(pretrain.data, attend_across_documents=False))
    assert "segment_ids" in batch_keys(separate, "pretrain")


@pytest.mark.parametrize("kind", ["pretrain"])
def test_plan_arguments_are_exactly_the_trainer_state_and_batch(kind, monkeypatch):
    """On one device nothing is sharded: the arguments are float32 trainable + 2 Adam moments + frozen + batch."""
    import jax

    from zhjax.model.llama import LlamaForCausalLM
    from zhjax.model.params import count_params, split_model, trainable_filter
    from zhjax.train.plan import batch_keys, job_seq_len, plan_job

    monkeypatch.chdir(REPO)
    cfg = _tiny(kind, per_device_train_batch_size=2)
    plan = plan_job(cfg, kind, jax.devices()[:1], 1 * GIB)
    model = LlamaForCausalLM(cfg.model, cfg.lora)
    _, trainable, frozen = split_model(model, trainable_filter(cfg.lora))
    assert (plan.trainable_params, plan.frozen_params) == (count_params(trainable), count_params(frozen))
    seq = job_seq_len(cfg, kind)
    batch = len(batch_keys(cfg, kind)) * 2 * seq * 4
    expected = 4 * (3 * plan.trainable_params + plan.frozen_params) + batch  # float32 tiny preset
    # plus a handful of scalars: the step, the RNG key, Adam's step count
    assert expected <= plan.argument_bytes <= expected + 64, (plan.argument_bytes, expected)
    assert plan.alias_bytes > 0  # trainable and Adam state are donated and updated in place
    assert plan.temp_bytes > 0 and plan.fits and plan.last_line().endswith("(fits)")


def test_plan_main_says_does_not_fit_and_exits_1_when_memory_is_too_small(capsys, monkeypatch):
    from zhjax.train.plan_cli import plan_main

    monkeypatch.chdir(REPO)
    rc = plan_main(["--config", "configs/pretrain/tiny.yaml", "--cpu-devices", "1", "--memory-gib", "0.001"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert rc == 1 and LAST_LINE.match(last) and last.endswith("of 0.00 GiB (does not fit)")


def test_plan_refuses_a_bad_config_with_status_2(capsys, monkeypatch):
    from zhjax.train.plan_cli import plan_main

    monkeypatch.chdir(REPO)
    assert plan_main(["--config", "configs/pretrain/tiny.yaml", "--cpu-devices", "1", "optim.lr_scheduler_type=x"]) == 2
    assert plan_main(["--config", "configs/pretrain/tiny.yaml"]) == 2  # neither --topology nor --cpu-devices
    assert "--topology" in capsys.readouterr().err


def test_largest_batch_is_exact_and_needs_few_compiles():
    from zhjax.train.plan import Plan, largest_batch

    def fake(memory, capacity: float, calls: list):
        def make(b: int) -> Plan:
            calls.append(b)
            p = Plan("x", 8, {}, b, 1, 512, 1, 1, 1.0, capacity)
            p.total_bytes = int(memory(b))
            return p
        return make

    cases = [  # (memory of a batch, capacity, most compiles allowed)
        (lambda b: 5 + b, 16, 4),
        (lambda b: 3e9 + 7e8 * b, 16 * GIB, 4),
        (lambda b: 1 + 100 * b, 1e6, 4),  # beyond the limit: the limit itself
        (lambda b: 20 + b, 16, 1),  # not even batch 1
        (lambda b: 3e9 + 7e8 * b + (4e8 * b if b > 6 else 0), 16 * GIB, 7),  # a kink (XLA changes strategy)
        (lambda b: 1 + 100 * b + b * b, 1e6, 24),  # strongly super-linear: bisection keeps it bounded
    ]
    for memory, capacity, most in cases:
        calls: list[int] = []
        best = largest_batch(fake(memory, capacity, calls), limit=2048)
        truth = max((b for b in range(1, 2049) if memory(b) <= capacity), default=None)
        assert (best.per_device_batch if best else None) == truth
        assert len(calls) <= most and len(set(calls)) == len(calls), calls
    calls = []
    best = largest_batch(fake(lambda b: 5 + b, 16, calls), guess=11)
    assert best.per_device_batch == 11 and calls == [11, 12]  # a right guess costs two compiles


def test_zero2_formula_for_the_seed_7b_job():
    from zhjax.train.config import load_job_config
    from zhjax.train.plan import zero2_bytes_per_gpu

    model = load_job_config("pretrain", str(REPO / "configs/pretrain/llama-7b-lora.yaml"), []).model
    trainable, frozen = 429_203_456, 6_476_271_616
    z = zero2_bytes_per_gpu(model, trainable, frozen, gpus=8, batch=1, seq_len=512)
    assert z["weights"] == 2 * (trainable + frozen)  # fp16, replicated: 12.9 GiB on every GPU
    assert z["optimizer"] == 12 * trainable / 8
    assert z["activations"] == 32 * 2 * 512 * 4096 + 34 * 512 * 4096 + 5 * 32 * 512**2 + 10 * 512 * 49953
    assert 13.5 < z["total"] / GIB < 15.0  # does not fit a 16 GiB chip once CUDA context and buffers are added


# Parameter counts of the released LLaMA checkpoints (HF, vocab 32000): the presets are the real architectures.
RELEASED = {"llama-7b": 6_738_415_616, "llama-13b": 13_015_864_320, "llama-33b": 32_528_943_616,
            "llama2-7b": 6_738_415_616, "llama2-13b": 13_015_864_320, "smollm2-135m": 134_515_008}


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_model_presets_have_the_released_parameter_counts(name):
    import yaml
    from flax import nnx

    from zhjax.config import ModelConfig
    from zhjax.model.llama import LlamaForCausalLM
    from zhjax.model.params import count_params

    config = ModelConfig(**yaml.safe_load((REPO / "configs/models" / f"{name}.yaml").read_text()))
    abstract = nnx.eval_shape(lambda: LlamaForCausalLM(config, rngs=nnx.Rngs(0)))
    assert count_params(nnx.state(abstract)) == RELEASED[name]


@pytest.mark.parametrize("path", sorted(str(p.relative_to(REPO)) for p in (REPO / "configs").glob("*/*-lora.yaml")))
def test_recipes_follow_the_seed(path):
    from zhjax.config import LORA_TARGETS
    from zhjax.train.config import load_job_config

    kind = "sft" if path.startswith("configs/sft") else "pretrain"
    cfg = load_job_config(kind, str(REPO / path), [])
    assert (cfg.lora.r, cfg.lora.lora_alpha, cfg.lora.lora_dropout) == (8, 32, 0.05)
    assert set(cfg.lora.target_modules) == set(LORA_TARGETS)
    assert cfg.lora.modules_to_save == ("embed_tokens", "lm_head")
    if "llama-" in path:  # the seed's own jobs
        assert cfg.model.vocab_size == (49953 if kind == "pretrain" else 49954)
        assert (cfg.dtype, cfg.remat) == ("bfloat16", "full")
        assert (cfg.data.block_size if kind == "pretrain" else cfg.data.max_seq_length) == 512
        assert cfg.per_device_train_batch_size * cfg.optim.gradient_accumulation_steps == 8


# ------------------------------------------------------------------------------------------------ TPU slices

needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None,
    reason="libtpu is not installed (pip install -e '.[tpu]'); TPU topologies cannot be compiled for here",
)


def _plan_on(topology: str, config: str, kind: str, overrides=(), **changes):
    import jax

    from zhjax.train.config import load_job_config
    from zhjax.train.plan import plan_job
    from zhjax.train.plan_cli import tpu_target

    if jax.default_backend() != "cpu":
        pytest.skip("TPU plans are checked on a CPU host")
    cfg = dataclasses.replace(load_job_config(kind, str(REPO / config), list(overrides)), **changes)
    devices, usable = tpu_target(topology)  # HBM less the runtime's reserve, as the compiler reports it
    return plan_job(cfg, kind, devices, usable)


@needs_libtpu
@pytest.mark.parametrize("topology, chips", [("v5e-8", 8), ("v4-8", 4), ("v5p-8", 4), ("v6e-8", 8)])
def test_tiny_preset_compiles_for_each_tpu_slice(topology, chips):
    plan = _plan_on(topology, "configs/pretrain/tiny.yaml", "pretrain")
    assert plan.num_devices == chips and plan.fits and 0 < plan.total_bytes < GIB


@needs_libtpu
def test_splash_kernel_compiles_for_tpu_and_keeps_no_attention_matrices():
    # the Pallas kernel lowers through Mosaic for a v5e slice here; it never materialises [batch, heads, t, t]
    # scores, so at 512 tokens the step needs far less memory than the XLA path (here 88 vs 336 MiB; the seed's 7B job on
    # v5e-8 at batch 8: 6.66 vs 10.29 GiB)
    common = ["data.block_size=512", "per_device_train_batch_size=8", "remat=none"]
    xla = _plan_on("v5e-8", "configs/pretrain/tiny.yaml", "pretrain", [*common, "attention=xla"])
    splash = _plan_on("v5e-8", "configs/pretrain/tiny.yaml", "pretrain", [*common, "attention=splash"])
    scores = 8 * 4 * 512 * 512 * 4  # one layer's float32 attention probabilities per chip
    assert splash.fits and splash.total_bytes + scores < xla.total_bytes, (splash.last_line(), xla.last_line())


@needs_libtpu
def test_splash_lowers_to_the_mosaic_kernel_for_tpu_devices_from_a_cpu_host():
    import jax
    import jax.numpy as jnp

    from zhjax.model.splash import splash_attention
    from zhjax.parallel.mesh import MeshConfig, make_mesh
    from zhjax.train.plan_cli import tpu_target

    if jax.default_backend() != "cpu":
        pytest.skip("TPU plans are checked on a CPU host")
    mesh = make_mesh(MeshConfig(fsdp=8), tpu_target("v5e-8")[0])
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp"))
    q = jax.ShapeDtypeStruct((8, 512, 4, 128), jnp.bfloat16, sharding=rows)
    seg = jax.ShapeDtypeStruct((8, 512), jnp.int32, sharding=rows)
    with jax.set_mesh(mesh):
        text = jax.jit(lambda q, s: splash_attention(q, q, q, s, scale=0.1)).lower(q, seg).as_text()
    assert "tpu_custom_call" in text  # the compiled kernel, not the interpreter used on CPU devices


@needs_libtpu
def test_seed_7b_pretraining_fits_v5e_8_at_batch_4_per_chip():
    plan = _plan_on("v5e-8", "configs/pretrain/llama-7b-lora.yaml", "pretrain", per_device_train_batch_size=4)
    assert plan.fits, plan.last_line()
    assert 15 * GIB < plan.capacity_bytes <= 16 * GIB


@needs_libtpu
def test_seed_13b_pretraining_fits_v5e_8():
    plan = _plan_on("v5e-8", "configs/pretrain/llama-13b-lora.yaml", "pretrain", per_device_train_batch_size=1)
    assert plan.fits, plan.last_line()


def test_the_planner_lowers_the_program_the_trainer_runs(tmp_path):
    """`zhjax plan` and `zhjax pretrain` build their step with the same function; for one tiny job their lowered
    programs (StableHLO text) are the same, shardings, optimizer state and dropout included."""
    import jax

    from zhjax.train.config import load_job_config
    from zhjax.train.plan import batch_keys, job_seq_len, lower_job
    from zhjax.train.trainer import set_up

    cfg = load_job_config("pretrain", str(REPO / "configs/pretrain/tiny.yaml"),
                          [f"output_dir={tmp_path / 'run'}", "max_steps=7", "per_device_train_batch_size=2",
                           f"data.data_cache_dir={tmp_path / 'cache'}"])
    cfg = dataclasses.replace(cfg, tokenizer=str(REPO / cfg.tokenizer),
                              data=dataclasses.replace(cfg.data, train_files=[str(REPO / f) for f in cfg.data.train_files]))
    planned = lower_job(cfg, "pretrain", jax.devices()).lowered.as_text()

    run = set_up(cfg, "pretrain")
    rows = cfg.per_device_train_batch_size * len(run.mesh.devices.flat)
    shape = (cfg.optim.gradient_accumulation_steps, rows, job_seq_len(cfg, "pretrain"))
    batch = {k: jax.ShapeDtypeStruct(shape, "int32", sharding=run.train_step.batch_sharding)
             for k in batch_keys(cfg, "pretrain")}
    trained = run.train_step.lower(run.state, run.frozen, batch).as_text()
    run.ckpt.close()
    assert "dot_general" in planned and trained == planned
