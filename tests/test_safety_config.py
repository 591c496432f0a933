"""One validation pass over the whole job before anything is written; resumes compared with the saved config.

Issue 17, items 4 and 5: values that used to fail late (after the model was built and `base/` written) or never,
`--overwrite_output_dir` deleting the earlier run before a bad mesh was noticed, the flag not working after the
overrides, a resume with a changed learning rate, block size or seed going through silently.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def job(kind: str, out: Path, *overrides: str):
    from zhjax.train.config import load_job_config

    return load_job_config(kind, str(REPO / f"configs/{kind}/tiny.yaml"), [f"output_dir={out}", *overrides])


BAD = {
    # override: what the one message must say
    "per_device_train_batch_size=0": "per_device_train_batch_size=0: expected a positive integer",
    "per_device_train_batch_size=-1": "per_device_train_batch_size=-1: expected a positive integer",
    "logging_steps=0": "logging_steps=0: expected a positive integer",
    "data.block_size=512": "data.block_size=512: the model has 256 positions",
    "mesh.fsdp=3": "mesh:",
    "data.train_files=[configs/tiny/nope.txt]": "data.train_files: configs/tiny/nope.txt does not exist",
    "max_steps=0": "max_steps=0: expected a positive integer, or -1",
}


@pytest.mark.parametrize("override", list(BAD))
def test_bad_values_are_refused_before_any_file_is_written(tmp_path, override):
    from zhjax.train.trainer import train
    from zhjax.train.validate import JobConfigError

    out = tmp_path / "run"
    with pytest.raises(JobConfigError, match="invalid pretrain config: .*" + BAD[override].replace("[", r"\[")):
        train(job("pretrain", out, override), "pretrain")
    assert not out.exists()


def test_unknown_template_is_refused_at_validation(tmp_path):
    from zhjax.train.trainer import train
    from zhjax.train.validate import JobConfigError

    with pytest.raises(JobConfigError, match=r"data.template='alpacaa': expected one of \['alpaca', 'alpaca2', 'chat'\]"):
        train(job("sft", tmp_path / "run", "data.template=alpacaa"), "sft")
    assert not (tmp_path / "run").exists()


def test_every_problem_is_listed_at_once(tmp_path):
    from zhjax.train.validate import JobConfigError, check_job

    with pytest.raises(JobConfigError) as err:
        check_job(job("pretrain", tmp_path / "run", "logging_steps=0", "data.block_size=512", "eval_steps=-1"),
                  "pretrain", 1)
    message = str(err.value)
    assert "\n" not in message
    assert all(s in message for s in ("logging_steps=0", "data.block_size=512", "eval_steps=-1"))


def fake_run(out: Path, cfg, kind: str = "pretrain") -> None:
    """What a run leaves on disk, as far as validation reads it: its record, config, a checkpoint, metrics."""
    from zhjax.train.validate import write_run_record

    (out / "checkpoints" / "20").mkdir(parents=True)
    (out / "adapter").mkdir()
    (out / "adapter" / "adapter_config.json").write_text("{}")
    (out / "metrics.jsonl").write_text(json.dumps({"step": 10, "loss": 1.0}) + "\n")
    write_run_record(out, cfg, kind, 1)


def test_overwrite_with_a_bad_mesh_deletes_nothing(tmp_path):
    from zhjax.train.trainer import train
    from zhjax.train.validate import JobConfigError

    out = tmp_path / "run"
    fake_run(out, job("pretrain", out))
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    with pytest.raises(JobConfigError, match="mesh:"):
        train(job("pretrain", out, "overwrite_output_dir=true", "mesh.fsdp=3"), "pretrain")
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before


def test_overwrite_deletes_only_what_a_run_writes(tmp_path):
    from zhjax.train.storage import OutputDir
    from zhjax.train.validate import clear_run_outputs

    out = tmp_path / "run"
    fake_run(out, job("pretrain", out))
    (out / "notes.txt").write_text("mine")
    clear_run_outputs(OutputDir(out))
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


@pytest.mark.parametrize("change", ["optim.learning_rate=1e-3", "data.block_size=32", "seed=7",
                                    "per_device_train_batch_size=4"])
def test_resume_with_a_changed_setting_that_shapes_the_weights_is_refused_with_the_difference(tmp_path, change):
    from zhjax.train.validate import JobConfigError, check_job

    out = tmp_path / "run"
    fake_run(out, job("pretrain", out))
    with pytest.raises(JobConfigError, match="differs from the saved one") as err:
        check_job(job("pretrain", out, change), "pretrain", 1)
    field = change.split("=")[0]
    assert field in str(err.value) or "global batch" in str(err.value)


def test_resume_may_change_length_logging_and_mesh(tmp_path):
    from zhjax.train.validate import check_job

    out = tmp_path / "run"
    fake_run(out, job("pretrain", out))
    check_job(job("pretrain", out, "max_steps=80", "logging_steps=5", "save_steps=40", "mesh.fsdp=1"), "pretrain", 1)
    check_job(job("pretrain", out, "seed=7", "overwrite_output_dir=true"), "pretrain", 1)  # starting over: anything


def test_a_directory_of_someone_elses_files_is_not_a_run_dir(tmp_path):
    from zhjax.train.validate import JobConfigError, check_job

    out = tmp_path / "photos"
    out.mkdir()
    (out / "cat.jpg").write_bytes(b"\xff\xd8")
    with pytest.raises(JobConfigError, match=r"holds files zhjax did not write \(cat.jpg\)"):
        check_job(job("pretrain", out), "pretrain", 1)
    check_job(job("pretrain", out, "overwrite_output_dir=true"), "pretrain", 1)
    assert (out / "cat.jpg").exists()


def test_cli_says_one_line_exit_2_and_takes_the_flag_after_the_overrides(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "zhjax.cli", "pretrain", "--config", "configs/pretrain/tiny.yaml",
                           f"output_dir={out}", "--overwrite_output_dir", "per_device_train_batch_size=0"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [
        "zhjax pretrain: invalid pretrain config: per_device_train_batch_size=0: expected a positive integer"]
    assert not out.exists()


# ----------------------------------------------------------------------------------- remote output dirs
# A remote output_dir (gs://, s3://, any fsspec URL) is checked through the same code as a local one, reading it with
# its fsspec filesystem. fsspec's in-memory filesystem stands in for the bucket here (tests/test_remote_output.py
# runs whole training runs against a GCS emulator).


@pytest.fixture
def memory_url(tmp_path, monkeypatch):
    """A fresh `memory://` URL, its filesystem and its path there, accepted as an output dir (standing in for gs://,
    which is where orbax can write checkpoints); emptied afterwards."""
    import fsspec

    from zhjax.train import storage

    monkeypatch.setattr(storage, "CHECKPOINT_PROTOCOLS", (*storage.CHECKPOINT_PROTOCOLS, "memory"))

    url = f"memory://zhjax-checks-{tmp_path.name}/run"
    fs, root = fsspec.core.url_to_fs(url)
    yield url, fs, root
    if fs.exists(root):
        fs.rm(root, recursive=True)


def remote_fake_run(tmp_path: Path, url: str, fs, root: str, *overrides: str) -> None:
    """`fake_run` written locally and uploaded to `url`, as a run with `output_dir=url` leaves it."""
    local = tmp_path / "fake"
    fake_run(local, job("pretrain", url, *overrides))
    (local / "checkpoints" / "20" / "meta").write_text("{}")  # an object store holds no empty folders
    fs.put(str(local), root, recursive=True)
    assert fs.isfile(f"{root}/job_config.json") and fs.isdir(f"{root}/checkpoints/20")


@pytest.mark.parametrize("change", ["optim.learning_rate=1e-3", "seed=7"])
def test_remote_resume_with_a_changed_setting_is_refused_like_a_local_one(tmp_path, memory_url, change):
    from zhjax.train.trainer import train
    from zhjax.train.validate import JobConfigError, check_job

    url, fs, root = memory_url
    remote_fake_run(tmp_path, url, fs, root)
    before = sorted(fs.find(root))
    with pytest.raises(JobConfigError, match=f"resuming {url} with a config that differs .*{change.split('=')[0]}"):
        train(job("pretrain", url, change), "pretrain")
    assert sorted(fs.find(root)) == before  # nothing written, nothing deleted
    check_job(job("pretrain", url, "max_steps=80", "logging_steps=5"), "pretrain", 1)  # what may change, may


def test_a_remote_directory_of_someone_elses_files_is_refused_and_overwrite_keeps_them(tmp_path, memory_url):
    from zhjax.train.storage import OutputDir
    from zhjax.train.validate import JobConfigError, check_job, clear_run_outputs

    url, fs, root = memory_url
    fs.pipe(f"{root}/photos/cat.jpg", b"\xff\xd8")
    with pytest.raises(JobConfigError, match=rf"output_dir {url}: holds files zhjax did not write \(photos\)"):
        check_job(job("pretrain", url), "pretrain", 1)
    check_job(job("pretrain", url, "overwrite_output_dir=true"), "pretrain", 1)  # writes beside them
    clear_run_outputs(OutputDir(url))
    assert fs.cat(f"{root}/photos/cat.jpg") == b"\xff\xd8"


def test_a_strangers_file_in_a_remote_runs_adapter_is_refused(tmp_path, memory_url):
    from zhjax.train.validate import JobConfigError, check_job

    url, fs, root = memory_url
    remote_fake_run(tmp_path, url, fs, root)
    fs.pipe(f"{root}/adapter/notes.txt", b"mine")
    with pytest.raises(JobConfigError, match=rf"output_dir {url}/adapter: holds files zhjax did not write \(notes.txt\)"):
        check_job(job("pretrain", url), "pretrain", 1)
    assert fs.cat(f"{root}/adapter/notes.txt") == b"mine"


def test_overwrite_of_a_remote_run_deletes_only_what_a_run_writes(tmp_path, memory_url):
    from zhjax.train.storage import OutputDir
    from zhjax.train.validate import clear_run_outputs

    url, fs, root = memory_url
    remote_fake_run(tmp_path, url, fs, root)
    fs.pipe(f"{root}/notes.txt", b"mine")
    clear_run_outputs(OutputDir(url))
    assert [p.rsplit("/", 1)[-1] for p in fs.find(root)] == ["notes.txt"]


def test_a_remote_store_orbax_cannot_write_checkpoints_to_is_refused_before_any_work(tmp_path, capsys):
    from zhjax.cli import main

    url = f"memory://zhjax-{tmp_path.name}/run"
    assert main(["pretrain", "--config", str(REPO / "configs/pretrain/tiny.yaml"), f"output_dir={url}"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"zhjax pretrain: output_dir {url}: orbax cannot write checkpoints to memory:// (it writes a local path, "
        "gs://, s3://); choose one of those")
