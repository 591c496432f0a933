"""Optional extras in the tests: a test that compares with PyTorch carries `needs_torch` and skips without it.

The rest of its file still runs, so the pure-JAX tests run on a machine without the torch extra.
"""

from __future__ import annotations

import importlib

import pytest

from zhjax._extras import is_installed


def optional(name: str):
    """The module `name`, or None where it is not installed (only tests marked `needs_torch` may use it then)."""
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


needs_torch = pytest.mark.skipif(not is_installed("torch"), reason="compares with PyTorch: needs the torch extra")
needs_lm_eval = pytest.mark.skipif(not is_installed("lm_eval"),
                                   reason="compares with lm-evaluation-harness: needs the lm-eval extra")
