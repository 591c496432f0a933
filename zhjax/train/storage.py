"""Where a run's outputs go: a local directory, or a remote fsspec URL such as ``gs://bucket/run``.

A run writes two kinds of files, and a remote ``output_dir`` gives them two routes:

- **Checkpoints go straight to the URL.** Every process writes its own shards of each orbax checkpoint to
  ``<output_dir>/checkpoints``; orbax opens a remote path through ``etils.epath`` (fsspec, e.g. gcsfs, for
  its metadata files) and tensorstore's own driver (e.g. ``gcs``) for the arrays. Nothing is staged, so a
  multi-host run needs no filesystem its hosts share, and resuming reads the newest complete checkpoint there.
- **Process 0's files are staged and uploaded.** ``metrics.jsonl``, TensorBoard events, ``job_config.json``,
  the PEFT adapter with its tokenizer files and the export of a random-init base are written by libraries
  that want a local path (safetensors, tokenizers, tensorboardX, an open file appended to line by line), and
  an object store has no append. So they are written to a staging directory,
  ``$XDG_CACHE_HOME/zhjax/staging/<hash of the URL>`` (``~/.cache`` by default), and `OutputDir.sync`
  uploads whatever changed since the last upload, whole files at a time; the trainer calls it at each save
  and at the end. On resume the remote ``metrics.jsonl`` and TensorBoard event files are downloaded into the
  staging directory first, so the appended file keeps the run's history and both can be rewound to the
  restored step (the rewritten files are uploaded over the remote ones).

A local ``output_dir`` is used as it is: no staging directory and no copies.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import shutil
from pathlib import Path

import fsspec
from fsspec.registry import known_implementations

# fsspec backends zhjax installs through one of its extras
_EXTRAS = {"gcsfs": "zhjax[gcs]"}

# where orbax can write checkpoints besides a local path: object stores with a tensorstore driver and an etils.epath
# backend (gcs, s3). Any other fsspec URL (memory://, az://, sftp://, ...) is refused before a run starts.
CHECKPOINT_PROTOCOLS = ("gs", "s3")

# process 0's files (and folders) that a resumed run appends to or rewinds, so they are downloaded before it starts
_APPENDED = ("metrics.jsonl", "tensorboard")


class OutputDirError(ValueError):
    """`output_dir` cannot be written: an unknown URL protocol, or its filesystem package is not installed."""


class OutputDir:
    """A run's `output_dir`: local, or a remote URL whose process-0 files are staged locally (module docstring).

    ``local`` is where process 0 writes its files: the directory itself when it is local, the staging
    directory when it is remote. ``location(name)`` is where ``name`` lives for readers and for orbax: a local
    absolute path, or a URL string.
    """

    def __init__(self, output_dir: str | Path):
        given = str(output_dir)
        protocol, path = fsspec.core.split_protocol(given)
        self.is_remote = protocol not in (None, "file", "local")
        self._uploaded: dict[str, tuple[int, int]] = {}
        if not self.is_remote:
            self.fs = None
            self.local = Path(path)
            self.url = str(self.local)
            return
        self.protocol = protocol
        self.url = given.rstrip("/")
        self.fs, self._root = _filesystem(self.url, protocol)
        cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        self.local = cache / "zhjax" / "staging" / hashlib.sha1(self.url.encode()).hexdigest()[:12]

    def __str__(self) -> str:
        return self.url

    def location(self, name: str) -> str | Path:
        """Where ``name`` (a relative path such as ``"checkpoints"``) lives: an absolute local path or a URL."""
        return f"{self.url}/{name}" if self.is_remote else self.local.absolute() / name

    def exists(self, name: str = "") -> bool:
        """Whether the output dir (or ``name`` inside it) exists at its real location (remote, not staged)."""
        if not self.is_remote:
            return (self.local / name).exists()
        return self.fs.exists(f"{self._root}/{name}" if name else self._root)

    def remove(self) -> None:
        """Delete the output dir and everything in it (and a remote dir's staging directory)."""
        if not self.is_remote:
            if self.local.exists():
                shutil.rmtree(self.local)
            return
        if self.fs.exists(self._root):
            self.fs.rm(self._root, recursive=True)
        shutil.rmtree(self.local, ignore_errors=True)

    def prepare(self, is_main: bool) -> None:
        """Create the directory (local), or a fresh staging directory holding the files a resumed run appends to.

        Staging is emptied first: left over from a crashed run, its files may be older than the remote ones.
        """
        if not self.is_remote:
            self.local.mkdir(parents=True, exist_ok=True)
            return
        if not is_main:
            return
        shutil.rmtree(self.local, ignore_errors=True)
        self.local.mkdir(parents=True)
        for name in _APPENDED:
            remote = f"{self._root}/{name}"
            for path in sorted(self.fs.find(remote)) if self.fs.isdir(remote) else [remote] * self.fs.isfile(remote):
                rel = name + path[len(remote):]
                (self.local / rel).parent.mkdir(parents=True, exist_ok=True)
                self.fs.get_file(path, str(self.local / rel))
                self._uploaded[rel] = _signature(self.local / rel)

    def sync(self) -> None:
        """Upload the staged files that are new or changed since the last upload (remote only; process 0)."""
        if not self.is_remote or not self.local.exists():
            return
        changed = []
        for path in sorted(p for p in self.local.rglob("*") if p.is_file()):
            name = path.relative_to(self.local).as_posix()
            if self._uploaded.get(name) != _signature(path):
                changed.append((path, name))
        if not changed:
            return
        self.fs.put([str(p) for p, _ in changed], [f"{self._root}/{n}" for _, n in changed])
        for path, name in changed:
            self._uploaded[name] = _signature(path)

    def close(self) -> None:
        """The final upload; then the staging directory is removed (remote only; process 0)."""
        if not self.is_remote:
            return
        self.sync()
        shutil.rmtree(self.local, ignore_errors=True)


def check_output_dir(output_dir: str | Path) -> OutputDir:
    """Raise `OutputDirError` now if ``output_dir`` is a URL this installation cannot write (an unknown protocol, a
    missing filesystem package, or a store orbax cannot write checkpoints to); else return its `OutputDir`."""
    out = OutputDir(output_dir)
    if out.is_remote and out.protocol not in CHECKPOINT_PROTOCOLS:
        raise OutputDirError(
            f"output_dir {out.url}: orbax cannot write checkpoints to {out.protocol}:// (it writes a local path, "
            f"{', '.join(p + '://' for p in CHECKPOINT_PROTOCOLS)}); choose one of those"
        )
    return out


def _filesystem(url: str, protocol: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem of ``url`` and the path in it, or an `OutputDirError` naming the package to install."""
    known = known_implementations.get(protocol)
    if protocol not in fsspec.available_protocols():
        raise OutputDirError(
            f"output_dir {url}: unknown protocol {protocol!r}; expected a local path or an fsspec URL "
            f"such as gs://bucket/path"
        )
    module = known["class"].rsplit(".", 1)[0] if known else None
    try:
        # import the backend explicitly: fsspec would reuse a class registered earlier in the process
        if module:
            importlib.import_module(module)
        return fsspec.core.url_to_fs(url)
    except ImportError as e:
        package = module.split(".")[0] if module else protocol
        extra = _EXTRAS.get(package)
        how = f"pip install '{extra}'" if extra else f"pip install {package}"
        raise OutputDirError(f"output_dir {url}: install {package} ({how})") from e


def _signature(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns
