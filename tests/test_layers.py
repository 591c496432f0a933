"""zhjax's layers point down only: the import-linter contract in pyproject.toml holds, and it catches a breach; no
module imports the package root, and no import cycle exists (function-local imports included)."""

from __future__ import annotations

import json
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


def _import_graph(root: Path) -> dict[str, set[str]]:
    """zhjax's module -> the zhjax modules it imports, function-local imports included (grimp reads every import
    statement), from the package under root."""
    code = ("import grimp, json; g = grimp.build_graph('zhjax', cache_dir=None); "
            "print(json.dumps({m: sorted(g.find_modules_directly_imported_by(m)) for m in g.modules}))")
    result = subprocess.run([sys.executable, "-c", code], cwd=root, env={**os.environ, "PYTHONPATH": str(root)},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return {m: set(targets) for m, targets in json.loads(result.stdout).items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle_and_no_import_of_the_package_root():
    graph = _import_graph(REPO)
    assert len(graph) > 50  # the whole package was read
    assert _cycles(graph) == []
    assert sorted(m for m, targets in graph.items() if "zhjax" in targets and m != "zhjax") == []


def test_a_function_local_import_cycle_is_found(tmp_path):
    shutil.copytree(REPO / "zhjax", tmp_path / "zhjax", ignore=shutil.ignore_patterns("__pycache__"))
    hf = tmp_path / "zhjax" / "convert" / "hf.py"
    hf.write_text(hf.read_text() + "\n\ndef _late():\n    from zhjax.convert import merge  # noqa: F401\n")
    cli = tmp_path / "zhjax" / "infer" / "cli.py"
    cli.write_text(cli.read_text() + "\n\ndef _root():\n    import zhjax  # noqa: F401\n")
    graph = _import_graph(tmp_path)
    assert any({"zhjax.convert.hf", "zhjax.convert.merge"} <= set(cycle) for cycle in _cycles(graph))
    assert "zhjax" in graph["zhjax.infer.cli"]


def test_the_data_pipeline_imports_no_flax():
    # the pre-training pipeline runs in data-only processes and its import is inside bench/data.py's clock: flax
    # costs 0.2 s there (the loader once took its batch axes from zhjax.parallel.rules, which imports flax)
    code = "import sys, zhjax.data.pretrain, zhjax.data.sft; print(sorted(m for m in sys.modules if m.split('.')[0] == 'flax'))"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**os.environ, "JAX_PLATFORMS": "cpu"},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
