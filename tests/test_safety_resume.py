"""A run killed with SIGKILL mid-run or mid-save resumes bit for bit; metrics.jsonl and TensorBoard hold each step once.

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
        assert tensorboard_scalars(out / "tensorboard")["loss"] == list(range(1, 13)), f"{mode}: TensorBoard"
        from safetensors.numpy import load_file

        a = load_file(straight / "adapter" / "adapter_model.safetensors")
        b = load_file(out / "adapter" / "adapter_model.safetensors")
        assert set(a) == set(b) and all((a[k] == b[k]).all() for k in a)


def tensorboard_scalars(logdir: Path) -> dict[str, list[int]]:
    """`{tag: [step, ...]}` of every scalar in the event files under `logdir`, read raw by tensorboard's own loader
    (no purging of restarted runs: what any reader of the files sees)."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    steps: dict[str, list[int]] = {}
    for path in sorted(logdir.rglob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                steps.setdefault(value.tag, []).append(event.step)
    return {tag: sorted(s) for tag, s in steps.items()}


def test_tensorboard_events_past_the_restored_step_are_moved_aside_so_each_step_appears_once(tmp_path):
    from zhjax.train.metrics import MetricsLogger
    from zhjax.train.validate import rewind_metrics

    first = MetricsLogger(tmp_path)  # a run that logged steps 1..10, then died after its step-8 checkpoint
    for step in range(1, 11):
        first.log({"step": step, "loss": 1.0 / step, "lr": 1e-3})
    first.close()
    assert tensorboard_scalars(tmp_path / "tensorboard")["loss"] == list(range(1, 11))

    assert rewind_metrics(tmp_path, 8) == 2  # what the trainer does on resuming at step 8
    resumed = MetricsLogger(tmp_path)
    for step in range(9, 13):
        resumed.log({"step": step, "loss": 2.0 / step, "lr": 1e-3})
    resumed.close()

    scalars = tensorboard_scalars(tmp_path / "tensorboard")
    assert scalars == {"loss": list(range(1, 13)), "lr": list(range(1, 13))}
    assert tensorboard_scalars(tmp_path / "tensorboard.rewound") == {"loss": [9, 10], "lr": [9, 10]}  # kept
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    shown = EventAccumulator(str(tmp_path / "tensorboard")).Reload().Scalars("loss")  # what TensorBoard plots
    assert [(e.step, round(e.value, 6)) for e in shown] == [(s, round((1.0 if s <= 8 else 2.0) / s, 6))
                                                          for s in range(1, 13)]


def test_a_torn_last_event_record_is_dropped_by_the_rewind(tmp_path):
    from zhjax.train.metrics import MetricsLogger, rewind_tensorboard

    logger = MetricsLogger(tmp_path)
    for step in range(1, 5):
        logger.log({"step": step, "loss": 1.0})
    logger.close()
    (events,) = (tmp_path / "tensorboard").glob("events.out.tfevents.*")
    events.write_bytes(events.read_bytes()[:-7])  # killed mid-write
    assert rewind_tensorboard(tmp_path, 2) == 1  # step 3 moved; step 4's torn record dropped
    assert tensorboard_scalars(tmp_path / "tensorboard") == {"loss": [1, 2]}


def test_a_remote_run_rewinds_its_uploaded_tensorboard_events_too(tmp_path, monkeypatch):
    """A remote output_dir (fsspec's memory filesystem here): the event files are downloaded with metrics.jsonl,
    rewound in the staging directory, and the rewritten files uploaded over the remote ones."""
    import fsspec

    from zhjax.train.metrics import MetricsLogger
    from zhjax.train.storage import OutputDir
    from zhjax.train.validate import rewind_metrics

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    url = f"memory://zhjax-{tmp_path.name}/run"
    fs, root = fsspec.core.url_to_fs(url)
    first = OutputDir(url)  # the run before the kill: steps 1..10 logged and uploaded
    first.prepare(is_main=True)
    logger = MetricsLogger(first.local)
    for step in range(1, 11):
        logger.log({"step": step, "loss": 1.0})
    logger.close()
    first.close()
    assert fs.glob(f"{root}/tensorboard/events.out.tfevents.*")

    again = OutputDir(url)  # the resumed run, from the step-8 checkpoint
    again.prepare(is_main=True)
    assert rewind_metrics(again.local, 8) == 2
    logger = MetricsLogger(again.local)
    for step in range(9, 13):
        logger.log({"step": step, "loss": 2.0})
    logger.close()
    again.close()

    fs.get(f"{root}/", str(tmp_path / "copy"), recursive=True)
    assert tensorboard_scalars(tmp_path / "copy" / "tensorboard") == {"loss": list(range(1, 13))}
    assert [r["step"] for r in records(tmp_path / "copy")] == list(range(1, 13))
    fs.rm(root, recursive=True)


def test_every_logged_step_is_in_the_event_files_when_the_process_is_killed_right_after(tmp_path):
    """SIGKILL right after `log` returns: the event files hold every step `metrics.jsonl` holds (CI saw step 8 of a
    killed run lost from TensorBoard, tensorboardX's queue unwritten, so the resumed run's curve lacked it)."""
    script = textwrap.dedent(
        """
        import os, signal, sys
        from zhjax.train.metrics import MetricsLogger

        logger = MetricsLogger(sys.argv[1])
        for step in range(1, 9):
            logger.log({"step": step, "loss": 1.0 / step})
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    killed = run([sys.executable, "-c", script, str(tmp_path)], check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert [r["step"] for r in records(tmp_path)] == list(range(1, 9))
    assert tensorboard_scalars(tmp_path / "tensorboard") == {"loss": list(range(1, 9))}
