"""pyproject.toml declares what zhjax imports, and nothing it does not; extras are imported only where needed.

Read from the source (every `import` of every module) and mapped to distributions with the installed
packages' own metadata (`importlib.metadata.packages_distributions`), so a new import without its declaration,
or a declaration that nothing imports any more, fails here rather than on a user's fresh machine.
"""

from __future__ import annotations

import ast
import functools
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
FIRST_PARTY = {"zhjax", "tools", "tests", "bench", "accelerator", "memory", "quiet"}  # bench/ modules import each other

# Declared but never imported by name, each for a reason.
USED_INDIRECTLY = {
    "protobuf": "sentencepiece's sentencepiece_model_pb2 (the tokenizer merge edits the model proto) needs it "
    "and sentencepiece does not declare it",
}


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()  # PEP 503


def _names(requirements: list[str]) -> set[str]:
    return {_canonical(re.match(r"[A-Za-z0-9._-]+", r).group()) for r in requirements}


MAIN = _names(PYPROJECT["project"]["dependencies"])
EXTRAS = {extra: _names(reqs) for extra, reqs in PYPROJECT["project"]["optional-dependencies"].items()}


def _imports(folder: str) -> dict[str, list[tuple[str, bool]]]:
    """Top-level module -> [(file:line, at module level?)] for every absolute import under `folder`."""
    found: dict[str, list[tuple[str, bool]]] = {}
    for path in sorted((REPO / folder).rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        top_level = {id(n) for n in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in FIRST_PARTY:
                    where = f"{path.relative_to(REPO)}:{node.lineno}"
                    found.setdefault(top, []).append((where, id(node) in top_level))
    return found


@functools.cache
def _providers() -> dict[str, list[str]]:
    return importlib.metadata.packages_distributions()


# Modules published under another name, for when they are not installed here (CI does not build llama.cpp).
PUBLISHED_AS = {"llama_cpp": "llama-cpp-python"}


def _distributions(module: str) -> set[str]:
    """The distributions that provide `module`; for one not installed here (torch on a torch-free machine), its
    published name: its own for torch and peft, `PUBLISHED_AS` for the others."""
    return {_canonical(d) for d in _providers().get(module, [PUBLISHED_AS.get(module, module)])}


def test_every_imported_package_is_declared():
    allowed = {
        "zhjax": MAIN | EXTRAS["torch"] | EXTRAS["gcs"] | EXTRAS["serve"] | EXTRAS["llamacpp"] | EXTRAS["lm-eval"],
        "tools": MAIN,
        # bench/serve.py drives the server with openai; bench/gguf_ppl.py and bench/llamacpp.py run llama.cpp;
        # bench/eval.py runs the harness
        "bench": MAIN | EXTRAS["torch"] | EXTRAS["serve"] | EXTRAS["dev"] | EXTRAS["llamacpp"] | EXTRAS["lm-eval"],
        "tests": MAIN | EXTRAS["torch"] | EXTRAS["dev"] | EXTRAS["llamacpp"] | EXTRAS["lm-eval"],
    }
    undeclared = []
    for folder, declared in allowed.items():
        for module, places in _imports(folder).items():
            if not _distributions(module) & declared:
                undeclared.append(f"{places[0][0]}: imports {module} ({sorted(_distributions(module)) or 'not installed'})")
    assert not undeclared, "imported but not declared in pyproject.toml:\n" + "\n".join(undeclared)


def test_every_declared_dependency_is_imported():
    imported = set().union(*(_distributions(m) for folder in ("zhjax", "tools") for m in _imports(folder)))
    unused = sorted(MAIN - imported - set(USED_INDIRECTLY))
    assert not unused, f"declared in [project.dependencies] but imported nowhere in zhjax/ or tools/: {unused}"


def test_extras_are_imported_only_inside_the_functions_that_need_them():
    # `import zhjax.<anything>` must work without the torch extra: torch-free commands and tests need that.
    # zhjax/eval/harness.py is the harness plugin itself (its class subclasses lm-eval's): only `zhjax lm-eval`
    # imports it, after checking for the extra.
    only_extra = (EXTRAS["torch"] | EXTRAS["gcs"] | EXTRAS["llamacpp"] | EXTRAS["lm-eval"]) - MAIN
    at_module_level = [
        f"{where}: {module}"
        for module, places in _imports("zhjax").items()
        if _distributions(module) & only_extra
        for where, top_level in places
        if top_level and not where.startswith("zhjax/eval/harness.py:")
    ]
    assert not at_module_level, "extras imported at module level:\n" + "\n".join(at_module_level)
