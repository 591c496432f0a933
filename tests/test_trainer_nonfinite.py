"""A NaN step in the middle of a run: the trainer reads metrics only at logging/eval/save steps, yet it still names
the exact step, never saves (stop) or applies (skip_nonfinite) that step's update."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
NAN_STEP = 5  # 1-based, as the trainer reports steps


@pytest.fixture
def nan_at_step(monkeypatch):
    """The NAN_STEP-th train batch gets a token id past the vocabulary: its embedding gather fills NaN."""
    from zhjax.train import data_setup

    original = data_setup.TrainData.next_train_batch
    calls = {"n": 0}

    def patched(self):
        batch = original(self)
        calls["n"] += 1
        if calls["n"] == NAN_STEP:
            batch = dict(batch, input_ids=batch["input_ids"].at[0, 0, 0].set(10**6))
        return batch

    monkeypatch.setattr(data_setup.TrainData, "next_train_batch", patched)


def _cfg(tmp_path, *overrides):
    from zhjax.train.config import load_job_config

    return load_job_config("pretrain", str(REPO / "configs/pretrain/tiny.yaml"), [
        f"output_dir={tmp_path / 'run'}", "max_steps=8", "logging_steps=4", "save_steps=2", "eval_steps=0",
        "lora.lora_dropout=0.0", f"data.data_cache_dir={tmp_path / 'cache'}",
        f"data.train_files=[{REPO / 'configs/tiny/corpus.txt'}]", f"tokenizer={REPO / 'configs/tiny/tokenizer'}",
        *overrides,
    ])


def test_a_nan_step_stops_the_run_at_that_step_before_it_is_saved(tmp_path, nan_at_step):
    from zhjax.train.trainer import NonFiniteLossError, train

    with pytest.raises(NonFiniteLossError, match=f"non-finite loss or gradient at step {NAN_STEP} .*last good "
                       "checkpoint: .*checkpoints/4"):
        train(_cfg(tmp_path))
    saved = sorted(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit())
    assert saved == [2, 4]


def test_skip_nonfinite_skips_exactly_that_step_and_trains_on(tmp_path, nan_at_step, capsys):
    from zhjax.train.trainer import train

    summary = train(_cfg(tmp_path, "skip_nonfinite=true"))
    assert summary["step"] == 8
    losses = summary["losses"]
    assert len(losses) == 8 and not np.isfinite(losses[NAN_STEP - 1])
    assert np.isfinite(np.delete(losses, NAN_STEP - 1)).all()
    text = capsys.readouterr()
    assert f"non-finite loss or gradient at step {NAN_STEP}: update skipped" in text.out + text.err
    assert "at step 4:" not in text.out + text.err and "at step 6:" not in text.out + text.err
    # the skipped update left finite weights: the saved adapter after the NaN step is finite
    from safetensors.numpy import load_file

    adapter = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    assert all(np.isfinite(v).all() for v in adapter.values())
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [4, 8]
