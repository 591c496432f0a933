"""Optional dependencies (the extras of pyproject.toml), checked where a command starts, not hours into it.

A command that will need an extra calls `require` before it does any work, so a missing `torch` is one clear
line at start-up (`zhjax recipe: the recipe's evaluate stage ... needs torch, which is not installed: pip install
'zhjax[torch]'`) rather than an `ImportError` after the training stages. The check only looks the module up
(`importlib.util.find_spec`); it does not import it, so it costs nothing when the extra is there.
"""

from __future__ import annotations

import importlib.util
import sys


class MissingExtra(RuntimeError):
    """A module of an optional extra that this command needs is not installed; the message says which to install."""


def is_installed(module: str) -> bool:
    """Whether `module` can be imported here (looked up, not imported)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a broken parent package, or a module left without a spec
        return False


def require(*modules: str, extra: str, why: str, prog: str | None = None) -> None:
    """Refuse, in one line naming `why`, the missing modules and the install command, unless all are installed.

    `why` says what needs them, e.g. "the recipe's evaluate stage (transformers on PyTorch)". Raises
    `MissingExtra`; a script passes its name as `prog` instead, and the line goes to stderr as `prog: ...`
    followed by exit status 2.
    """
    missing = [m for m in modules if not is_installed(m)]
    if not missing:
        return
    names = " and ".join(missing)
    verb = "is" if len(missing) == 1 else "are"
    message = f"{why} needs {names}, which {verb} not installed: pip install 'zhjax[{extra}]'"
    if prog is None:
        raise MissingExtra(message)
    print(f"{prog}: {message}", file=sys.stderr)
    raise SystemExit(2)
