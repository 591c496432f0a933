"""Output directories are created, never taken over: the one helper every writer of a directory uses.

zhjax writes a directory (an HF export, a PEFT adapter, a base checkpoint) into a temporary sibling folder and
renames it into place only when complete, with a manifest (`.zhjax-manifest.json`) that lists every file it wrote.
Before anything is read or written:

- the output may not be an input, lie inside one, or contain one (`--out` equal to `--base` would replace the base
  weights; `--out` above an adapter would delete it);
- an existing non-empty output is replaced only when its manifest says zhjax wrote every file in it; a directory
  zhjax did not write, or one a user has added files to, is refused by name unless `overwrite` is given.

The rename itself is `replace_path` (and `atomic_path` around it): asset builds and the tokenized-data cache
publish through it too, so every directory zhjax writes appears whole or not at all.

Only stdlib: every layer (convert, train, tools) may use it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

MANIFEST = ".zhjax-manifest.json"
PARTIAL = ".partial-"  # the name prefix of a path being written (`atomic_path`); leftovers are safe to remove


class OutputRefused(ValueError):
    """The output directory belongs to someone else, or is one of the inputs; nothing was written or deleted."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def foreign_files(directory: str | Path) -> list[str]:
    """Files (relative paths) in `directory` that its zhjax manifest does not list; every file when it has none."""
    directory = Path(directory)
    files = sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*") if not p.is_dir())
    manifest = directory / MANIFEST
    try:
        owned = set(json.loads(manifest.read_text())["files"]) if manifest.is_file() else set()
    except (ValueError, KeyError, TypeError):
        owned = set()
    return [f for f in files if f not in owned and f != MANIFEST]


def check_output_dir(out: str | Path, *, inputs: Iterable[str | Path | None] = (), overwrite: bool = False,
                     flag: str = "--overwrite") -> Path:
    """Raise `OutputRefused` unless `out` may be (re)written; returns `out` resolved. Reads and writes nothing else.

    `flag` is how the caller's user says "replace it anyway" (named in the message).
    """
    resolved = Path(out).resolve()
    for given in inputs:
        if given is None or "://" in str(given):
            continue
        src = Path(given).resolve()
        if resolved == src or src in resolved.parents:
            raise OutputRefused(f"{out}: the output is the input {given} or inside it; choose another directory")
        if resolved in src.parents:
            raise OutputRefused(f"{out}: the output contains the input {given}; choose another directory")
    if resolved.exists() and not resolved.is_dir():
        raise OutputRefused(f"{out}: exists and is not a directory")
    if resolved.is_dir() and not overwrite:
        strangers = foreign_files(resolved)
        if strangers:
            shown = ", ".join(strangers[:5]) + (f" and {len(strangers) - 5} more" if len(strangers) > 5 else "")
            raise OutputRefused(
                f"{out}: holds files zhjax did not write ({shown}); choose a new directory, or pass {flag} to "
                "replace it"
            )
    return resolved


@contextlib.contextmanager
def staged_dir(out: str | Path, *, inputs: Iterable[str | Path | None] = (), overwrite: bool = False,
               flag: str = "--overwrite") -> Iterator[Path]:
    """Yield a temporary folder beside `out`; on a clean exit it becomes `out`, with a manifest of its files.

    `out` is checked first (`check_output_dir`) and checked again just before the swap, so a file a user drops
    into it meanwhile is not deleted. Modes follow the umask (0755/0644 usually), as any file the user writes.
    On an error the temporary folder is removed and `out` is untouched.
    """
    inputs = list(inputs)
    check_output_dir(out, inputs=inputs, overwrite=overwrite, flag=flag)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        publish(tmp, out, overwrite=overwrite, flag=flag)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def publish(tmp: Path, out: Path, *, overwrite: bool = False, flag: str = "--overwrite") -> None:
    """Write the manifest of `tmp`, set its modes from the umask, and rename it to `out` (replacing an owned one)."""
    mask = _umask()
    files = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if not p.is_dir())
    (tmp / MANIFEST).write_text(json.dumps({"written_by": "zhjax", "files": files}, indent=1))
    for p in [tmp, *tmp.rglob("*")]:
        p.chmod((0o777 if p.is_dir() else 0o666) & ~mask)
    check_output_dir(out, overwrite=overwrite, flag=flag)
    replace_path(tmp, out)


def remove_path(path: Path) -> None:
    """Remove a file, link or folder tree at `path`; nothing when there is none."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def replace_path(tmp: Path, final: Path, *, keep_existing: bool = False) -> bool:
    """Rename the complete `tmp` (a file or a folder beside `final`) to `final`; True when `tmp` became `final`.

    An existing folder at `final` is moved aside, `tmp` renamed in, and the old one removed after (a folder cannot
    be replaced by one rename). `keep_existing=True` is for writers that race to publish the same content (hosts of
    a multi-host job): if `final` exists, or appears while renaming, it is kept and `tmp` removed.
    """
    if keep_existing and final.exists():
        remove_path(tmp)
        return False
    if final.is_dir() and not final.is_symlink():
        old = final.with_name(f".{final.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
        return True
    try:
        os.replace(tmp, final)
    except OSError:
        if not (keep_existing and final.exists()):
            raise
        remove_path(tmp)  # another writer's identical copy landed first
        return False
    return True


@contextlib.contextmanager
def atomic_path(final: Path, *, prefix: str = PARTIAL) -> Iterator[Path]:
    """A fresh temporary path beside `final` for the block to write (as a file or a folder); it replaces `final`
    when the block succeeds and is removed on any error, so `final` is the old content or the new, never half."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f"{prefix}{final.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        replace_path(tmp, final)
    finally:
        remove_path(tmp)
