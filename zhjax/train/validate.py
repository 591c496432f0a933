"""One check of a whole training job before any file is written or any model built, and the resume rules.

`check_job` reads the config and what is already on disk (the model's `config.json`, the output directory's saved
run record) and raises one `JobConfigError` listing every problem it finds: sizes and step counts, positions
against the model, template names, files that do not exist, the mesh against the devices, an output directory
that belongs to someone else, and a resume whose config differs from the saved one in a field that may not change.

A run directory is recognised by `zhjax_run.json` (kind, global batch, device count), written with
`job_config.json` (the whole config) when a run starts. `overwrite_output_dir` deletes only the entries a run
writes (`RUN_ENTRIES`), and only after every check has passed; anything else in the directory stays.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

RUN_RECORD = "zhjax_run.json"
RUN_ENTRIES = ("checkpoints", "adapter", "base", "metrics.jsonl", "metrics.rewound.jsonl", "tensorboard",
               "tensorboard.rewound", "job_config.json", RUN_RECORD)
# Fields a resumed run may change: how long it runs, how it logs and saves, and how the same math is laid out on
# the devices. Everything else (model, data, optimizer, seed, LoRA, dtype) shapes the weights being continued.
RESUMABLE_CHANGES = ("max_steps", "num_train_epochs", "logging_steps", "eval_steps", "save_steps", "save_total_limit",
                     "output_dir", "overwrite_output_dir", "peak_tflops_per_device", "async_checkpointing",
                     "max_eval_batches", "per_device_eval_batch_size", "per_device_train_batch_size", "skip_nonfinite",
                     "remat", "remat_names", "attention", "mesh.data", "mesh.fsdp", "mesh.tensor",
                     "data.data_cache_dir", "data.preprocessing_num_workers")
# Names zhjax itself writes into a run's adapter/ and base/ (accepted there without a manifest: older runs)
_RUN_SUBDIR_FILES = ("adapter_config.json", "adapter_model.safetensors", "config.json", "generation_config.json",
                     "model.safetensors", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
                     "special_tokens_map.json", "chat_template.jinja", "added_tokens.json")


class JobConfigError(ValueError):
    """The job cannot start as configured; the message lists every problem. Nothing was written."""


def check_job(cfg, kind: str, num_devices: int) -> None:
    """Raise `JobConfigError` naming every problem of `cfg` (module docstring); reads, never writes."""
    problems = _check_numbers(cfg) + _check_data(cfg, kind) + _check_sources(cfg, kind)
    problems += _check_mesh(cfg, num_devices)
    problems += _check_output(cfg, kind, num_devices)
    if problems:
        raise JobConfigError(f"invalid {kind} config: " + "; ".join(problems))


def _check_numbers(cfg) -> list[str]:
    out = []
    for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "logging_steps"):
        if not _int_at_least(getattr(cfg, name), 1):
            out.append(f"{name}={getattr(cfg, name)!r}: expected a positive integer")
    for name in ("eval_steps", "save_steps"):
        if not _int_at_least(getattr(cfg, name), 0):
            out.append(f"{name}={getattr(cfg, name)!r}: expected an integer >= 0 (0 turns it off)")
    if not (cfg.max_steps == -1 or _int_at_least(cfg.max_steps, 1)):
        out.append(f"max_steps={cfg.max_steps!r}: expected a positive integer, or -1 for num_train_epochs")
    if cfg.max_steps == -1 and not cfg.num_train_epochs > 0:
        out.append(f"num_train_epochs={cfg.num_train_epochs!r}: expected > 0 when max_steps is -1")
    budget = cfg.max_train_seconds
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 <= budget < float("inf"):
        out.append(f"max_train_seconds={budget!r}: expected a number of seconds >= 0 (0 turns the time budget off)")
    for name in ("save_total_limit", "max_eval_batches"):
        value = getattr(cfg, name)
        if value is not None and not _int_at_least(value, 1):
            out.append(f"{name}={value!r}: expected a positive integer or null")
    if cfg.dtype not in ("auto", "float32", "bfloat16", "float16"):
        out.append(f"dtype={cfg.dtype!r}: expected auto, float32, bfloat16 or float16")
    return out


def _check_data(cfg, kind: str) -> list[str]:
    from zhjax.data.templates import TEMPLATE_NAMES

    d, out = cfg.data, []
    if not d.train_files:
        out.append("data.train_files is empty: give the training text files or directories")
    for field in ("train_files", "validation_files"):
        for f in getattr(d, field):
            if "://" not in str(f) and not any(ch in str(f) for ch in "*?[") and not Path(f).exists():
                out.append(f"data.{field}: {f} does not exist")
    if not 0 <= d.validation_split_percentage < 1:
        out.append(f"data.validation_split_percentage={d.validation_split_percentage}: expected a fraction in [0, 1)")
    from zhjax.data.files import check_encoding

    try:
        check_encoding(d.encoding, d.encoding_errors)
    except ValueError as e:
        out.append(str(e))
    if not _int_at_least(d.preprocessing_num_workers, 1):
        out.append(f"data.preprocessing_num_workers={d.preprocessing_num_workers!r}: expected a positive integer")
    if kind == "pretrain" and not _int_at_least(d.block_size, 2):
        out.append(f"data.block_size={d.block_size!r}: expected an integer >= 2")
    if kind == "sft":
        if d.template not in TEMPLATE_NAMES:
            out.append(f"data.template={d.template!r}: expected one of {list(TEMPLATE_NAMES)}")
        if not _int_at_least(d.max_seq_length, 2):
            out.append(f"data.max_seq_length={d.max_seq_length!r}: expected an integer >= 2")
        elif d.max_prompt_length is not None and not (1 <= d.max_prompt_length < d.max_seq_length):
            out.append(f"data.max_prompt_length={d.max_prompt_length!r}: expected 1 .. max_seq_length - 1")
    return out


def _check_sources(cfg, kind: str) -> list[str]:
    out = []
    for name in ("init_from", "tokenizer", "adapters_from"):
        value = getattr(cfg, name)
        if not value or "://" in str(value) or Path(value).exists():
            continue
        # a tokenizer may be a Hub id ("org/name"), which transformers resolves itself
        if name != "tokenizer" or str(value).startswith(("/", ".", "~")) or str(value).count("/") != 1:
            out.append(f"{name}: {value} does not exist")
    if out:
        return out
    if not cfg.init_from and cfg.model is None:
        return ["the job needs `init_from` (an HF dir or zhjax checkpoint) or a `model` section"]
    if not (cfg.tokenizer or cfg.init_from):
        out.append("the job needs `tokenizer` (an HF tokenizer dir) when `init_from` is not an HF dir")
    try:
        positions = _max_positions(cfg)
    except (OSError, ValueError, KeyError) as e:
        return [*out, f"init_from: {e}"]
    length, name = (cfg.data.block_size, "data.block_size") if kind == "pretrain" else (
        cfg.data.max_seq_length, "data.max_seq_length")
    if isinstance(length, int) and positions is not None and length > positions:
        out.append(f"{name}={length}: the model has {positions} positions (max_position_embeddings)")
    return out


def _max_positions(cfg) -> int | None:
    if not cfg.init_from:
        return cfg.model.max_position_embeddings
    if "://" in str(cfg.init_from):
        return None
    meta = Path(cfg.init_from) / "zhjax.json"
    if meta.exists():
        return json.loads(meta.read_text())["config"]["max_position_embeddings"]
    from zhjax.convert.hf import read_config

    return read_config(cfg.init_from)[0].max_position_embeddings


def _check_mesh(cfg, num_devices: int) -> list[str]:
    from zhjax.parallel.mesh import mesh_shape

    try:
        data, fsdp, _ = mesh_shape(cfg.mesh, num_devices)
    except ValueError as e:
        return [str(e)]
    if _int_at_least(cfg.per_device_train_batch_size, 1):
        global_batch = cfg.per_device_train_batch_size * num_devices
        if global_batch % (data * fsdp):
            return [f"global batch {global_batch} is not divisible by the data-parallel size {data * fsdp}"]
    return []


class _RunDirView:
    """Read-only view of an output directory for the checks: local, or a remote URL read through its fsspec
    filesystem (the one `zhjax.train.storage.OutputDir` writes with), so both take the same path through them."""

    def __init__(self, output_dir):
        import fsspec

        from zhjax.train.storage import check_output_dir

        out = check_output_dir(output_dir)  # a URL this installation cannot use raises OutputDirError
        self.name = str(output_dir)
        self.fs, self.root = (out.fs, out._root) if out.is_remote else (fsspec.filesystem("file"), str(out.local.absolute()))

    def path(self, name: str = "") -> str:
        return f"{self.root}/{name}" if name else self.root

    def isdir(self, name: str = "") -> bool:
        return self.fs.isdir(self.path(name))

    def isfile(self, name: str) -> bool:
        return self.fs.isfile(self.path(name))

    def names(self, name: str = "") -> list[str]:
        """The entries directly in the directory (or in `name` inside it), sorted."""
        return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self.path(name), detail=False))

    def files(self, name: str) -> list[str]:
        """Every file under `name`, relative to it."""
        base = self.fs._strip_protocol(self.path(name)).rstrip("/")
        return sorted(p[len(base) + 1:] for p in self.fs.find(base))

    def read_json(self, name: str):
        return json.loads(self.fs.cat_file(self.path(name)))


def _check_output(cfg, kind: str, num_devices: int) -> list[str]:
    from zhjax.train.storage import OutputDirError

    try:
        out = _RunDirView(cfg.output_dir)
    except OutputDirError as e:
        return [str(e)]
    if out.fs.exists(out.root) and not out.isdir():
        return [f"output_dir {out.name}: exists and is not a directory"]
    if not out.isdir() or not out.names():
        return []
    if not is_run_dir(out):
        if cfg.overwrite_output_dir:
            return []  # told to: the run writes beside what is there and deletes none of it
        return [f"output_dir {out.name}: holds files zhjax did not write ({', '.join(out.names()[:5])}); choose a new "
                "directory, or set overwrite_output_dir=true to write beside them (nothing of theirs is deleted)"]
    problems = []
    for sub in ("adapter", "base"):
        if out.isdir(sub):
            strangers = [f for f in _foreign_files(out, sub) if f not in _RUN_SUBDIR_FILES]
            if strangers:
                problems.append(f"output_dir {out.name.rstrip('/')}/{sub}: "
                                f"holds files zhjax did not write ({', '.join(strangers[:5])}); move them away first")
    if not cfg.overwrite_output_dir and has_checkpoints(out):
        problems += resume_differences(out, cfg, kind, num_devices)
    return problems


def _foreign_files(out: _RunDirView, sub: str) -> list[str]:
    """`zhjax.ownership.foreign_files` of `sub`, read through the view's filesystem."""
    from zhjax.ownership import MANIFEST

    files = out.files(sub)
    try:
        owned = set(out.read_json(f"{sub}/{MANIFEST}")["files"]) if MANIFEST in files else set()
    except (ValueError, KeyError, TypeError):
        owned = set()
    return [f for f in files if f not in owned and f != MANIFEST]


def _view(out) -> _RunDirView:
    return out if isinstance(out, _RunDirView) else _RunDirView(out)


def is_run_dir(out) -> bool:
    """Whether `out` (a local path, a URL or a `_RunDirView`) was written by a zhjax training run."""
    names = _view(out).names()
    return any(name in names for name in (RUN_RECORD, "job_config.json", "checkpoints"))


def has_checkpoints(out) -> bool:
    """Whether `out` (a local path, a URL or a `_RunDirView`) holds at least one step's checkpoint."""
    out = _view(out)
    return out.isdir("checkpoints") and any(name.isdigit() for name in out.names("checkpoints"))


def resume_differences(out, cfg, kind: str, num_devices: int) -> list[str]:
    """The fields that differ between the saved run in `out` (path, URL or view) and `cfg` and may not change on a
    resume (one message)."""
    out = _view(out)
    if not out.isfile("job_config.json"):
        return []
    saved = _flatten(out.read_json("job_config.json"))
    now = _flatten(json.loads(json.dumps(jsonable(cfg))))
    changed = [k for k in sorted(set(saved) | set(now))
               if k not in RESUMABLE_CHANGES and saved.get(k, "<unset>") != now.get(k, "<unset>")]
    diffs = [f"{k}: saved {saved.get(k, '<unset>')!r}, now {now.get(k, '<unset>')!r}" for k in changed]
    if out.isfile(RUN_RECORD):
        run = out.read_json(RUN_RECORD)
        if run.get("kind") not in (None, kind):
            diffs.insert(0, f"kind: saved {run['kind']!r}, now {kind!r}")
        global_batch = cfg.per_device_train_batch_size * num_devices
        if run.get("global_batch") not in (None, global_batch):
            diffs.append(f"global batch (per_device_train_batch_size x devices): saved {run['global_batch']}, "
                         f"now {global_batch}")
    if not diffs:
        return []
    return [f"resuming {out.name} with a config that differs from the saved one in fields a resume may not change "
            f"({' | '.join(diffs)}); restore them, or set overwrite_output_dir=true to start over"]


def write_run_record(out: Path, cfg, kind: str, num_devices: int) -> None:
    """`zhjax_run.json` and `job_config.json`: the run's marker and the config a resume is compared with."""
    global_batch = cfg.per_device_train_batch_size * num_devices
    (out / RUN_RECORD).write_text(json.dumps({"kind": kind, "global_batch": global_batch,
                                              "num_devices": num_devices}, indent=2))
    (out / "job_config.json").write_text(json.dumps(jsonable(cfg), indent=2))


def rewind_metrics(run_dir: Path, step: int) -> int:
    """Move `metrics.jsonl` records and TensorBoard events past `step` (logged after the checkpoint a resume starts
    from) aside.

    The records go to `metrics.rewound.jsonl`, the events to `tensorboard.rewound/` (kept, not deleted,
    `zhjax.train.metrics.rewind_tensorboard`), so `metrics.jsonl` and the event files hold each step once.
    Returns how many records were moved.
    """
    from zhjax.train.metrics import rewind_tensorboard

    rewind_tensorboard(run_dir, step)
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return 0
    keep, past = [], []
    for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
        try:
            later = json.loads(line).get("step", 0) > step
        except (ValueError, AttributeError, TypeError):
            later = False  # a torn last line of a killed run is kept where it is
            if not line.endswith("\n"):
                later, line = True, line + "\n"
        (past if later else keep).append(line)
    if past:
        with open(path.with_name("metrics.rewound.jsonl"), "a", encoding="utf-8") as f:
            f.writelines(past)
        tmp = path.with_name(".metrics.jsonl.tmp")
        tmp.write_text("".join(keep), encoding="utf-8")
        tmp.replace(path)
    return len(past)


def clear_run_outputs(output_dir) -> list[str]:
    """Delete the entries a run writes (`RUN_ENTRIES`) from an `OutputDir`; returns what was deleted."""
    import shutil

    removed = []
    for name in RUN_ENTRIES:
        if not output_dir.exists(name):
            continue
        if output_dir.is_remote:
            output_dir.fs.rm(f"{output_dir._root}/{name}", recursive=True)
        else:
            path = output_dir.local / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        removed.append(name)
    if output_dir.is_remote:
        shutil.rmtree(output_dir.local, ignore_errors=True)
    return removed


def _int_at_least(value, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def jsonable(cfg):
    """A (nested) config dataclass as plain dicts and lists, for JSON and for comparing configs."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: jsonable(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [jsonable(v) for v in cfg]
    return cfg
