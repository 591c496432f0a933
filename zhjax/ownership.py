"""Output directories are created, never taken over: the one helper every writer of a directory uses.

zhjax writes a directory (an HF export, a PEFT adapter, a base checkpoint) into a temporary sibling folder and
renames it into place only when complete, with a manifest (`.zhjax-manifest.json`) that lists every file it wrote.
Before anything is read or written:

- the output may not be an input, lie inside one, or contain one (`--out` equal to `--base` would replace the base
  weights; `--out` above an adapter would delete it);
- an existing non-empty output is replaced only when its manifest says zhjax wrote every file in it; a directory
  zhjax did not write, or one a user has added files to, is refused by name unless `overwrite` is given.

Only stdlib: every layer (convert, train, tools) may use it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

MANIFEST = ".zhjax-manifest.json"


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
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old)
    else:
        tmp.rename(out)
