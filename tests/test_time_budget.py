"""`max_train_seconds`: a run trains as many steps as fit in its budget at the rate of its first step (timed alone,
after compiling), and those steps are exactly what a run of that many steps trains; when more steps follow, the
length is corrected from the mean time of steps 5-12 and once more halfway through the rest; a resumed run keeps
its length."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.extras import needs_torch

REPO = Path(__file__).resolve().parents[1]


class StepClock:
    """A stand-in for the trainer's `time` module: every `perf_counter()` reading is one second after the last, so
    the first step, timed between two readings, takes exactly 1 s."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self) -> float:
        self.now += 1.0
        return self.now


class StepTimes:
    """A stand-in clock that moves only when a train step is called, by `seconds(k)` for the k-th call (installed
    on the trainer's `time` and on `TrainStep.__call__`)."""

    def __init__(self, monkeypatch, seconds):
        from zhjax.train import step, trainer

        self.now, self.calls = 0.0, 0
        original = step.TrainStep.__call__

        def call(train_step, *args):
            self.now += seconds(self.calls)
            self.calls += 1
            return original(train_step, *args)

        monkeypatch.setattr(step.TrainStep, "__call__", call)
        monkeypatch.setattr(trainer, "time", self)

    def perf_counter(self) -> float:
        return self.now


def _cfg(out: Path, cache: Path, *overrides):
    from zhjax.train.config import load_job_config

    return load_job_config("pretrain", str(REPO / "configs/pretrain/tiny.yaml"), [
        f"output_dir={out}", "max_steps=8", "logging_steps=1", "save_steps=2", "eval_steps=0", "save_total_limit=null",
        f"data.data_cache_dir={cache}", f"data.train_files=[{REPO / 'configs/tiny/corpus.txt'}]",
        f"tokenizer={REPO / 'configs/tiny/tokenizer'}", *overrides,
    ])


def _adapter(out: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(out / "adapter" / "adapter_model.safetensors")


def _assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-6, atol=1e-7, err_msg=k)


def test_a_budget_trains_the_steps_that_fit_at_step_0s_rate_exactly_as_a_run_of_that_length(tmp_path, monkeypatch,
                                                                                            capsys):
    from zhjax.train import trainer

    cache = tmp_path / "cache"
    fixed = trainer.train(_cfg(tmp_path / "fixed", cache, "max_steps=5"))
    monkeypatch.setattr(trainer, "time", StepClock())
    budget = trainer.train(_cfg(tmp_path / "budget", cache, "max_train_seconds=5.5"))  # 5 steps of 1 s fit

    assert budget["step"] == 5 and len(budget["losses"]) == 5
    assert "time budget 5.5 s at 1 s a step (step 0, timed alone): 5 steps (at most 8)" in capsys.readouterr().out
    np.testing.assert_allclose(budget["losses"], fixed["losses"], rtol=1e-6)
    _assert_same_weights(_adapter(tmp_path / "budget"), _adapter(tmp_path / "fixed"))
    saved = sorted(int(p.name) for p in (tmp_path / "budget" / "checkpoints").iterdir() if p.name.isdigit())
    assert saved == [2, 4, 5]  # the last step is saved as in any run


@needs_torch
def test_the_length_is_corrected_once_from_steps_5_to_12_and_the_schedule_ends_with_the_run(tmp_path, monkeypatch,
                                                                                             capsys):
    from zhjax.train import trainer

    # step 0 takes 2 s, steps 1-4 1.5 s (slower after a fresh compile, as on the demo's machine), the rest 1 s
    StepTimes(monkeypatch, lambda k: 2.0 if k == 0 else 1.5 if k <= 4 else 1.0)
    out = tmp_path / "run"
    summary = trainer.train(_cfg(out, tmp_path / "cache", "max_train_seconds=30", "max_steps=40", "save_steps=0"))

    # step 0 buys 15 steps; after step 12, 2 + 4 x 1.5 + 8 x 1 = 16 s are spent and steps 5-12 ran at 1 s, so the
    # 14 s left buy 14 more: 27 steps in 30 s (with steps 1-4 in the mean, 1.17 s a step would buy 25)
    assert summary["step"] == 27 and len(summary["losses"]) == 27
    said = capsys.readouterr().out
    assert "time budget 30 s at 2 s a step (step 0, timed alone): about 15 steps, corrected after step 12 from " \
           "steps 5-12" in said
    assert "time budget 30 s at 1 s a step (steps 5-12; 16 s spent): 27 steps (at most 40)" in said
    # the logged learning rates after the correction: HF's cosine over 27 steps, with the 15 steps' warmup (1)
    from tests.test_optim import hf_lrs

    hf = hf_lrs(_cfg(out, tmp_path / "cache").optim, 27, num_warmup_steps=1)
    logged = {r["step"]: r["lr"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
              if "lr" in r}
    np.testing.assert_allclose([logged[k] for k in range(14, 28)], hf[13:], rtol=1e-5)


def test_a_second_correction_halfway_follows_a_machine_that_speeds_up(tmp_path, monkeypatch, capsys):
    from zhjax.train import trainer

    StepTimes(monkeypatch, lambda k: 2.0 if k == 0 else 1.0 if k <= 12 else 0.5)  # twice as fast from step 13
    summary = trainer.train(_cfg(tmp_path / "run", tmp_path / "cache", "max_train_seconds=40", "max_steps=100",
                                 "save_steps=0", "logging_steps=5"))

    # step 0 buys 20; after step 12 (14 s spent, 1 s a step) 39; halfway through the 26 left, after step 25 (steps
    # 13-25 at 0.5 s: 20.5 s spent), the 19.5 s left buy 39 more: 65 steps in 40 s
    said = capsys.readouterr().out
    assert "time budget 40 s at 1 s a step (steps 5-12; 14 s spent): 39 steps (at most 100)" in said
    assert "time budget 40 s at 0.5 s a step (steps 13-25; 20.5 s spent): 65 steps (at most 100)" in said
    assert summary["step"] == 65 and len(summary["losses"]) == 65


def test_a_resumed_budgeted_run_keeps_its_length_and_continues_the_same_schedule(tmp_path, monkeypatch):
    from zhjax.train import trainer

    cache, out = tmp_path / "cache", tmp_path / "run"
    monkeypatch.setattr(trainer, "time", StepClock())
    straight = trainer.train(_cfg(out, cache, "max_train_seconds=5.5"))
    assert straight["step"] == 5
    weights = _adapter(out)
    shutil.rmtree(out / "checkpoints" / "5")  # as if the machine died after the save at step 4
    monkeypatch.undo()  # the real clock: a re-timed first step would buy a different length (the bound, 8)
    resumed = trainer.train(_cfg(out, cache, "max_train_seconds=5.5"))
    assert resumed["step"] == 5 and len(resumed["losses"]) == 1
    np.testing.assert_allclose(resumed["losses"], straight["losses"][-1:], rtol=1e-6)
    _assert_same_weights(_adapter(out), weights)


@pytest.mark.parametrize(("seconds", "steps"), [(1e-9, 1), (1e9, 8)])
def test_a_budget_trains_at_least_the_timed_step_and_at_most_max_steps(tmp_path, seconds, steps):
    from zhjax.train.trainer import train

    assert train(_cfg(tmp_path / "run", tmp_path / "cache", f"max_train_seconds={seconds}"))["step"] == steps


def test_a_negative_budget_is_refused_before_any_work(tmp_path):
    from zhjax.train.trainer import train
    from zhjax.train.validate import JobConfigError

    with pytest.raises(JobConfigError, match=r"max_train_seconds=-1.0: expected a number of seconds >= 0"):
        train(_cfg(tmp_path / "run", tmp_path / "cache", "max_train_seconds=-1"))
    assert not (tmp_path / "run").exists()
