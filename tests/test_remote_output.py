"""`output_dir` on `gs://`: a tiny pre-training run against a GCS emulator, resumed from its remote checkpoint.

The emulator (gcp-storage-emulator, in memory) serves GCS's JSON API from a thread of this process; the runs
are `zhjax pretrain` subprocesses, like a user's, pointed at it by environment variables:

- `STORAGE_EMULATOR_HOST` sends gcsfs (staged files, orbax's metadata through etils.epath) to the emulator;
  `FSSPEC_GCS` gives gcsfs anonymous credentials instead of searching for real ones.
- `TENSORSTORE_GCS_HTTP_URL` sends tensorstore's `gcs` driver (orbax's arrays) there, and
  `GOOGLE_AUTH_TOKEN_FOR_TESTING` gives it a bearer token instead of searching for credentials.
- `GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false`: recent gcsfs asks GCS's gRPC control plane for each bucket's
  type (zonal / hierarchical) before using it; the emulator speaks no gRPC, so each lookup would wait for a
  60 s timeout and fall back to the plain JSON API that this turns on from the start.

The emulator leaves out one part of the JSON API that tensorstore relies on, which `emulate_generations` adds:
object generations on media downloads and as preconditions (see there).
"""

from __future__ import annotations

import http.server
import json
import os
import socket
import subprocess
import sys
from http import HTTPStatus
from pathlib import Path

import pytest
from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects
from gcp_storage_emulator.server import create_server
from gcsfs.core import GCSFileSystem
from safetensors.numpy import load as load_safetensors

REPO = Path(__file__).resolve().parents[1]
BUCKET = "zhjax-test"
# a constant learning rate, so a 4-step run resumed to 6 steps follows the schedule of a straight 6-step run
COMMON = ["save_steps=2", "logging_steps=1", "eval_steps=0", "optim.lr_scheduler_type=constant_with_warmup",
          "optim.warmup_ratio=0"]


def pretrain(overrides: list[str]) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "zhjax.cli", "pretrain", "--config", "configs/pretrain/tiny.yaml", *COMMON, *overrides]
    proc = subprocess.run(args, cwd=REPO, env=dict(os.environ), capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise AssertionError(f"{args} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def emulate_generations(monkeypatch) -> None:
    """Give the emulator GCS's object generations where tensorstore reads them.

    OCDBT (orbax's array format) updates its manifest by compare-and-swap on the object's generation: writes
    carry `ifGenerationMatch`, re-reads carry `ifGenerationNotMatch` and take the new generation from the
    `x-goog-generation` response header. gcp-storage-emulator ignores both preconditions and sends no such
    header, so the first re-read of a manifest fails with "Malformed StorageGeneration" (a resumed run hits it
    on its first save). These wrappers answer as GCS documents: 304 when `ifGenerationNotMatch` names the
    current generation, 412 when `ifGenerationMatch` does not (0 meaning "does not exist yet"), and the header
    on every download.
    """
    download, media_upload = objects.download, objects._media_upload

    def generation(storage, bucket: str, name: str) -> str | None:
        try:
            return str(storage.get_file_obj(bucket, name)["generation"])
        except NotFound:
            return None

    def failed_precondition(request, current: str | None) -> bool:
        match, not_match = request.query.get("ifGenerationMatch"), request.query.get("ifGenerationNotMatch")
        return (match is not None and match[0] != (current or "0")) or (
            not_match is not None and not_match[0] == (current or "0")
        )

    def download_with_generation(request, response, storage, *args, **kwargs):
        current = generation(storage, request.params["bucket_name"], request.params["object_id"])
        if current is not None and failed_precondition(request, current):
            not_modified = request.query.get("ifGenerationNotMatch", [None])[0] == current
            response.status = HTTPStatus.NOT_MODIFIED if not_modified else HTTPStatus.PRECONDITION_FAILED
            return
        download(request, response, storage, *args, **kwargs)
        if current is not None:
            response["x-goog-generation"] = current

    def media_upload_with_preconditions(request, response, storage):
        if failed_precondition(request, generation(storage, request.params["bucket_name"], request.query["name"][0])):
            response.status = HTTPStatus.PRECONDITION_FAILED
            return
        media_upload(request, response, storage)

    monkeypatch.setattr(objects, "download", download_with_generation)
    monkeypatch.setattr(objects, "_media_upload", media_upload_with_preconditions)


@pytest.fixture
def gcs(monkeypatch):
    """A fresh in-memory GCS emulator with bucket `BUCKET`; yields a gcsfs client of it."""
    emulate_generations(monkeypatch)
    report = http.server.HTTPServer.handle_error

    def handle_error(server, request, client_address):
        # gcsfs looks a path up as an object and as a prefix at once and hangs up on the slower answer; the
        # emulator would print a BrokenPipeError traceback for each
        if not isinstance(sys.exc_info()[1], ConnectionError):
            report(server, request, client_address)

    monkeypatch.setattr(http.server.HTTPServer, "handle_error", handle_error)
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    server = create_server("localhost", port, in_memory=True, default_bucket=BUCKET)
    server.start()
    endpoint = f"http://localhost:{port}"
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", endpoint)
    monkeypatch.setenv("FSSPEC_GCS", json.dumps({"token": "anon"}))
    monkeypatch.setenv("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    monkeypatch.setenv("TENSORSTORE_GCS_HTTP_URL", endpoint)
    monkeypatch.setenv("GOOGLE_AUTH_TOKEN_FOR_TESTING", "emulator")
    try:
        # no listings cache: the runs change the bucket between this client's reads
        yield GCSFileSystem(token="anon", endpoint_url=endpoint, use_listings_cache=False, skip_instance_cache=True)
    finally:
        server.stop()


def remote_metrics(fs, root: str) -> list[dict]:
    return [json.loads(line) for line in fs.cat(f"{root}/metrics.jsonl").decode().splitlines()]


def checkpoint_steps(fs, root: str) -> list[int]:
    """Steps whose checkpoint orbax finished (on GCS it writes `commit_success.txt` last instead of renaming)."""
    names = [p.rsplit("/", 1)[-1] for p in fs.ls(f"{root}/checkpoints", detail=False)]
    return sorted(int(n) for n in names if n.isdigit() and fs.exists(f"{root}/checkpoints/{n}/commit_success.txt"))


def test_gs_output_dir_gets_checkpoints_and_files_and_resumes_like_a_local_run(gcs, tmp_path, monkeypatch):
    fs, root = gcs, f"{BUCKET}/run"
    url = f"gs://{root}"
    xdg = tmp_path / "xdg"
    monkeypatch.setenv("XDG_CACHE_HOME", str(xdg))  # where a remote run stages process 0's files
    data = f"data.data_cache_dir={tmp_path / 'cache'}"

    # the reference: 6 steps straight into a local dir, which is written in place (no staging dir appears)
    local = tmp_path / "local"
    pretrain([f"output_dir={local}", "max_steps=6", data])
    assert not (xdg / "zhjax" / "staging").exists()
    straight = {m["step"]: m["loss"] for m in map(json.loads, (local / "metrics.jsonl").read_text().splitlines())}
    assert sorted(straight) == [1, 2, 3, 4, 5, 6]

    # 4 steps to gs://: checkpoints at 2 and 4 straight from orbax, process 0's files uploaded from staging
    pretrain([f"output_dir={url}", "max_steps=4", data])
    assert checkpoint_steps(fs, root) == [2, 4]
    first = remote_metrics(fs, root)
    assert [m["step"] for m in first] == [1, 2, 3, 4]
    adapter_config = json.loads(fs.cat(f"{root}/adapter/adapter_config.json"))
    assert adapter_config["base_model_name_or_path"] == f"{url}/base"
    assert fs.size(f"{root}/adapter/adapter_model.safetensors") > 100_000
    assert fs.exists(f"{root}/adapter/tokenizer.json") and fs.exists(f"{root}/adapter/tokenizer_config.json")
    assert fs.exists(f"{root}/base/config.json") and fs.exists(f"{root}/base/model.safetensors")
    assert fs.glob(f"{root}/tensorboard/events.out.tfevents.*")
    assert json.loads(fs.cat(f"{root}/job_config.json"))["output_dir"] == url
    assert list((xdg / "zhjax" / "staging").iterdir()) == []  # removed after the final upload

    # 6 steps: resumes from the remote step-4 checkpoint, keeps the remote metrics history and appends to it
    proc = pretrain([f"output_dir={url}", "max_steps=6", data])
    assert f"resumed from {url}/checkpoints/4 at step 4" in proc.stdout + proc.stderr
    assert checkpoint_steps(fs, root) == [4, 6]  # save_total_limit 2 in tiny.yaml: orbax deleted step 2 remotely
    resumed = remote_metrics(fs, root)
    assert resumed[:4] == first
    assert [m["step"] for m in resumed] == [1, 2, 3, 4, 5, 6]
    assert {m["step"]: m["loss"] for m in resumed} == straight  # bitwise, as a local resume is

    remote_adapter = load_safetensors(fs.cat(f"{root}/adapter/adapter_model.safetensors"))
    local_adapter = load_safetensors((local / "adapter" / "adapter_model.safetensors").read_bytes())
    assert set(remote_adapter) == set(local_adapter)
    for name, value in local_adapter.items():
        assert (remote_adapter[name] == value).all(), name


def test_gs_output_dir_without_gcsfs_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    import zhjax.train.trainer as trainer
    from zhjax.cli import main
    from zhjax.train.config import load_job_config
    from zhjax.train.storage import OutputDirError

    monkeypatch.setitem(sys.modules, "gcsfs", None)  # `import gcsfs` now raises ImportError
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    expected = "output_dir gs://some-bucket/run: install gcsfs (pip install 'zhjax[gcs]')"
    config = str(REPO / "configs" / "pretrain" / "tiny.yaml")

    assert main(["pretrain", "--config", config, "output_dir=gs://some-bucket/run"]) == 2
    assert expected in capsys.readouterr().err

    started = []
    monkeypatch.setattr(trainer, "make_mesh", lambda *a, **k: started.append("mesh"))
    cfg = load_job_config("pretrain", config, ["output_dir=gs://some-bucket/run"])
    with pytest.raises(OutputDirError) as err:
        trainer.train(cfg)
    assert expected in str(err.value)
    assert started == [] and not (tmp_path / "xdg").exists()


def test_remote_output_dir_stages_uploads_only_changes_and_removes(tmp_path, monkeypatch):
    """`OutputDir` on fsspec's in-memory filesystem: the staging and upload rules, without a training run."""
    import fsspec

    from zhjax.train.storage import OutputDir

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    url = f"memory://zhjax-{tmp_path.name}/run"
    fs, root = fsspec.core.url_to_fs(url)
    fs.pipe(f"{root}/metrics.jsonl", b'{"step": 1}\n')

    out = OutputDir(url)
    assert out.is_remote and out.location("checkpoints") == f"{url}/checkpoints"
    assert out.local.is_relative_to(tmp_path / "xdg" / "zhjax" / "staging")
    (out.local / "stale.txt").parent.mkdir(parents=True)
    (out.local / "stale.txt").write_text("left by a crashed run")
    out.prepare(is_main=True)
    assert sorted(p.name for p in out.local.iterdir()) == ["metrics.jsonl"]  # fresh, with the remote history

    with open(out.local / "metrics.jsonl", "a") as f:
        f.write('{"step": 2}\n')
    (out.local / "adapter").mkdir()
    (out.local / "adapter" / "adapter_config.json").write_text("{}")
    out.sync()
    assert fs.cat(f"{root}/metrics.jsonl") == b'{"step": 1}\n{"step": 2}\n'
    assert fs.cat(f"{root}/adapter/adapter_config.json") == b"{}"

    fs.pipe(f"{root}/adapter/adapter_config.json", b"changed remotely")  # an unchanged staged file is not re-sent
    out.sync()
    assert fs.cat(f"{root}/adapter/adapter_config.json") == b"changed remotely"

    out.close()
    assert not out.local.exists() and fs.exists(f"{root}/metrics.jsonl")
    out.remove()
    assert not out.exists() and not fs.exists(f"{root}/metrics.jsonl")


def test_local_output_dir_is_used_in_place(tmp_path, monkeypatch):
    from zhjax.train.storage import OutputDir

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    out = OutputDir(tmp_path / "run")
    assert not out.is_remote and out.local == tmp_path / "run"
    assert out.location("checkpoints") == tmp_path / "run" / "checkpoints"
    out.prepare(is_main=True)
    (out.local / "metrics.jsonl").write_text("{}\n")
    out.sync()
    out.close()
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == "{}\n"
    assert not (tmp_path / "xdg").exists()
    out.remove()
    assert not (tmp_path / "run").exists()
