"""One train step: what `zhjax plan` compiles is the program `zhjax pretrain` / `zhjax sft` runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# In a child with 4 CPU devices (fsdp=4), so that the shardings in the program are not all trivial.
LOWER_BOTH = textwrap.dedent(
    """
    import json, sys
    import jax
    from flax import nnx
    import zhjax.train.trainer as trainer
    from zhjax.train.config import load_job_config
    from zhjax.train.plan import lower_job

    kind, out = sys.argv[1], sys.argv[2]
    cfg = load_job_config(kind, f"configs/{kind}/tiny.yaml", [f"output_dir={out}", f"data.data_cache_dir={out}-cache",
                                                              "max_steps=7"])
    run = trainer.set_up(cfg, kind)
    batch = run.data.next_train_batch()
    ran = run.train_step.lower(run.state, run.frozen, batch).as_text()
    run.ckpt.close()
    planned = lower_job(cfg, kind, jax.devices()).lowered.as_text()

    # every Adam moment is sharded like its parameter
    sh = run.train_step.state_shardings
    params = [s.spec for s in jax.tree.leaves(sh.trainable)]
    adam = next(part for part in sh.opt_state if hasattr(part, "mu"))  # the chain's Adam state
    moments = [[s.spec for s in jax.tree.leaves(t)] for t in (adam.mu, adam.nu)]
    print("RESULT" + json.dumps({"equal": ran == planned, "ran": ran, "planned": planned,
                                 "sharded": sum(any(a is not None for a in p) for p in params),
                                 "moments_follow": all(m == params for m in moments),
                                 "count_replicated": adam.count.spec == jax.sharding.PartitionSpec()}))
    """
)


@pytest.mark.parametrize("kind", ["pretrain", "sft"])
def test_the_planner_lowers_the_same_train_step_as_the_trainer(tmp_path, kind):
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    proc = subprocess.run([sys.executable, "-c", LOWER_BOTH, kind, str(tmp_path / "run")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(next(line[6:] for line in proc.stdout.splitlines() if line.startswith("RESULT")))
    if not result["equal"]:
        import difflib

        diff = difflib.unified_diff(result["planned"].splitlines(), result["ran"].splitlines(), "planned", "ran",
                                    lineterm="", n=1)
        pytest.fail("the planned and the trained step differ:\n" + "\n".join(list(diff)[:60]))
    assert "fsdp" in result["ran"] or "devices=[" in result["ran"]  # a sharded program, not a trivial one
    assert result["sharded"] > 0 and result["moments_follow"] and result["count_replicated"]


def test_the_cpu_bf16_step_does_not_copy_the_frozen_weight_stack_to_float32():
    """XLA:CPU computes bf16 `dynamic-slice`s in float32; with while-loop-invariant code motion it converted the
    whole scanned stack of frozen weights to float32 once per step (`compiler_options` turns the pass off)."""
    import re

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from zhjax.config import LoraConfig, ModelConfig
    from zhjax.model.llama import LlamaForCausalLM
    from zhjax.model.params import split_model, trainable_filter
    from zhjax.parallel.mesh import make_mesh
    from zhjax.train.optim import OptimConfig, build_optimizer
    from zhjax.train.state import init_train_state
    from zhjax.train.step import build_train_step

    config = ModelConfig(vocab_size=64, hidden_size=48, intermediate_size=80, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, dtype="bfloat16", param_dtype="bfloat16")
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1)
    graphdef, trainable, frozen = split_model(LlamaForCausalLM(config, lora, rngs=nnx.Rngs(0)), trainable_filter(lora))
    trainable = jax.tree.map(lambda x: x.astype(jnp.float32), trainable)
    tx = build_optimizer(OptimConfig(), trainable, 10)
    step = build_train_step(graphdef, tx, trainable, frozen, make_mesh(), lora=lora)
    state = init_train_state(tx, trainable, 0, step.state_shardings)
    ids = jnp.zeros((1, 2, 16), jnp.int32)
    hlo = step.lower(state, frozen, {"input_ids": ids, "labels": ids}).compile().as_text()
    assert re.search(r"bf16\[3,48,80\]", hlo), "the stacked gate/up kernels are inputs of the step"
    written = re.findall(r"= (f32\[3,(?:48,80|80,48)\])\S* fusion\(", hlo)  # a fusion's output is a buffer
    assert not written, f"the step writes a float32 copy of a frozen weight stack: {written}"
