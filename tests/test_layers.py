"""zhjax's layers point down only: the import-linter contract in pyproject.toml holds, and it catches a breach."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("importlinter")  # the dev extra

REPO = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    """`lint-imports` with the contract of root/pyproject.toml, on the zhjax package under root."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([str(LINT_IMPORTS), "--config", str(root / "pyproject.toml"), "--no-cache"], cwd=root,
                          env=env, capture_output=True, text=True, timeout=300)


def test_the_layer_contract_holds():
    result = lint_imports(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_an_upward_import_breaks_the_contract(tmp_path):
    shutil.copytree(REPO / "zhjax", tmp_path / "zhjax", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    params = tmp_path / "zhjax" / "model" / "params.py"
    params.write_text(params.read_text() + "\nfrom zhjax.train import optim  # noqa: E402\n")
    result = lint_imports(tmp_path)
    assert result.returncode != 0
    assert "zhjax.model is not allowed to import zhjax.train" in result.stdout, result.stdout
