"""A run killed with SIGKILL mid-run or mid-save resumes bit for bit, and metrics.jsonl holds each step once.

Issue 17, item 6: the steps between the last checkpoint and the kill were logged twice after the resume.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

KILLED_RUN = textwrap.dedent(
    """
    import os, signal, sys
    import zhjax.train.data_setup as data_setup
    import zhjax.train.trainer as trainer
    from zhjax.train.config import load_job_config

    mode, at = sys.argv[1], int(sys.argv[2])
    if mode == "run":  # SIGKILL when the batch of step `at` + 1 is asked for: steps 1..at are done and logged
        calls = {"n": 0}
        original_next = data_setup.TrainData.next_train_batch

        def next_train_batch(self):
            calls["n"] += 1
            if calls["n"] == at + 1:
                os.kill(os.getpid(), signal.SIGKILL)
            return original_next(self)

        data_setup.TrainData.next_train_batch = next_train_batch
    else:  # SIGKILL while the async write of checkpoint `at` is in flight
        original_save = trainer.save

        def save(ckpt, step, *args, **kwargs):
            original_save(ckpt, step, *args, **kwargs)
            if step == at:
                os.kill(os.getpid(), signal.SIGKILL)

        trainer.save = save
    trainer.train(load_job_config("pretrain", "configs/pretrain/tiny.yaml", sys.argv[3:]), "pretrain")
    """
)


def run(args, check=True):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_kill_mid_run_and_mid_save_resume_bitwise_with_one_metrics_record_per_step(tmp_path):
    common = ["max_steps=12", "save_steps=4", "logging_steps=1", "eval_steps=0", "async_checkpointing=true",
              f"data.data_cache_dir={tmp_path / 'cache'}"]
    train = [sys.executable, "-m", "zhjax.cli", "pretrain", "--config", "configs/pretrain/tiny.yaml", *common]
    straight = tmp_path / "straight"
    run([*train, f"output_dir={straight}"])
    reference = {r["step"]: r["loss"] for r in records(straight)}
    assert sorted(reference) == list(range(1, 13))

    for mode, at in (("run", 10), ("save", 8)):
        out = tmp_path / mode
        killed = run([sys.executable, "-c", KILLED_RUN, mode, str(at), f"output_dir={out}", *common], check=False)
        assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
        logged = [r["step"] for r in records(out)]
        assert logged == list(range(1, at + 1))  # 9, 10 (mode run) are past the step-8 checkpoint
        again = run([*train, f"output_dir={out}"])
        assert "resumed from" in again.stdout + again.stderr
        steps = [r["step"] for r in records(out)]
        assert steps == list(range(1, 13)), f"{mode}: each step once, in order: {steps}"
        assert {r["step"]: r["loss"] for r in records(out)} == reference  # bitwise: the same floats
        from safetensors.numpy import load_file

        a = load_file(straight / "adapter" / "adapter_model.safetensors")
        b = load_file(out / "adapter" / "adapter_model.safetensors")
        assert set(a) == set(b) and all((a[k] == b[k]).all() for k in a)
