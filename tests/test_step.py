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
