"""Checkpoints are verified before they are trusted: a damaged newest one is reported and the run falls back.

Issue 17, items 2 and 3: flipped bytes in a checkpoint's data file, a truncated data file and a missing
`meta/metadata`, each in the newest of two checkpoints of the tiny pre-training run.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def tiny(out: Path, cache: Path, **overrides):
    from zhjax.train.config import load_job_config

    args = {"output_dir": out, "max_steps": 4, "save_steps": 2, "save_total_limit": 3, "logging_steps": 1,
            "eval_steps": 0, "data.data_cache_dir": cache, "async_checkpointing": "false", **overrides}
    return load_job_config("pretrain", str(REPO / "configs/pretrain/tiny.yaml"), [f"{k}={v}" for k, v in args.items()])


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """Four steps with checkpoints at 2 and 4: the run every damaged copy is compared with."""
    from zhjax.train.trainer import train

    root = tmp_path_factory.mktemp("ckpt")
    summary = train(tiny(root / "run", root / "cache"), "pretrain")
    return root, summary["losses"]


def largest_data_file(step_dir: Path) -> Path:
    return max((p for p in (step_dir / "trainable").rglob("*") if p.is_file() and p.parent.name == "d"),
               key=lambda p: p.stat().st_size)


def flip_bytes(step_dir: Path) -> None:
    f = largest_data_file(step_dir)
    data = bytearray(f.read_bytes())
    middle = len(data) // 2
    for i in range(middle, middle + 64):
        data[i] ^= 0xFF
    f.write_bytes(bytes(data))


def truncate(step_dir: Path) -> None:
    f = largest_data_file(step_dir)
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def drop_meta(step_dir: Path) -> None:
    (step_dir / "meta" / "metadata").unlink()


@pytest.mark.parametrize("damage", [flip_bytes, truncate, drop_meta], ids=["flipped", "truncated", "no_meta"])
def test_damaged_newest_checkpoint_is_named_and_the_run_falls_back_to_the_older_good_one(straight, tmp_path, damage,
                                                                                         capsys):
    from zhjax.train.trainer import train

    root, losses = straight
    run = tmp_path / "run"
    shutil.copytree(root / "run", run)
    damage(run / "checkpoints" / "4")
    summary = train(tiny(run, root / "cache"), "pretrain")
    said = capsys.readouterr()
    text = said.out + said.err
    assert f"checkpoint {run / 'checkpoints' / '4'} is damaged" in text
    assert f"resumed from {run / 'checkpoints' / '2'} at step 2" in text
    # steps 3 and 4 repeat the straight run's losses bit for bit: the damaged weights were never used
    assert summary["losses"] == losses[2:4]
    # the damaged checkpoint is kept (moved aside, not deleted) and a fresh step 4 was saved in its place
    assert list(run.glob("checkpoints/damaged/4*"))
    assert (run / "checkpoints" / "4" / "meta" / "metadata").exists()


def test_no_good_checkpoint_stops_with_one_clear_line_and_deletes_nothing(straight, tmp_path):
    import subprocess
    import sys

    root, _ = straight
    run = tmp_path / "run"
    shutil.copytree(root / "run", run)
    flip_bytes(run / "checkpoints" / "4")
    drop_meta(run / "checkpoints" / "2")
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    cfg = tiny(run, root / "cache")
    args = [f"output_dir={run}", "max_steps=4", "save_steps=2", "logging_steps=1", "eval_steps=0",
            f"data.data_cache_dir={root / 'cache'}"]
    proc = subprocess.run([sys.executable, "-m", "zhjax.cli", "pretrain", "--config", "configs/pretrain/tiny.yaml",
                           *args], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert cfg.output_dir == str(run)
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("zhjax pretrain: no usable checkpoint in") and "overwrite_output_dir" in last
    assert "Traceback" not in proc.stderr
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before


def test_checksums_see_one_flipped_bit_in_any_dtype_and_not_the_layout():
    import jax
    import jax.numpy as jnp
    import numpy as np

    from zhjax.train.checkpoint import tree_checksums

    rng = np.random.default_rng(0)
    tree = {"w": jnp.asarray(rng.normal(size=(7, 5)), jnp.float32), "b": jnp.asarray(rng.normal(size=9), jnp.bfloat16),
            "count": jnp.asarray(3, jnp.int32), "mask": jnp.asarray([True, False])}
    base = tree_checksums(tree)
    assert tree_checksums(jax.tree.map(lambda x: x + 0, tree)) == base  # same values, fresh buffers
    for name, bit in (("w", 0), ("w", 31), ("b", 15), ("count", 30)):
        x = np.asarray(tree[name])
        bits = x.view({4: np.uint32, 2: np.uint16}[x.dtype.itemsize]).copy()
        bits.reshape(-1)[bits.size // 2] ^= np.array(1 << bit, bits.dtype)
        flipped = {**tree, name: jnp.asarray(bits.view(x.dtype))}
        assert tree_checksums(flipped)[f"['{name}']"] != base[f"['{name}']"], (name, bit)
    swapped = {**tree, "w": tree["w"][::-1]}  # the same values in other places
    assert tree_checksums(swapped)["['w']"] != base["['w']"]
