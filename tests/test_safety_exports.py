"""Exports never take over what they did not write: a stranger's file stays, inputs are never outputs.

The reproductions of issue 17, items 1 and 9: `tools/export_hf.py --out DIR` onto a directory holding someone
else's file, `--out` equal to or around `--base`, and the adapter written with the HF export's permissions.
"""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from flax import nnx

REPO = Path(__file__).resolve().parents[1]
TINY_TOKENIZER = REPO / "configs" / "tiny" / "tokenizer"


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def base_and_adapter(tmp_path_factory):
    """The tiny model as an HF base and a PEFT adapter trained-in-spirit on it (zhjax's own writers)."""
    import zhjax
    from zhjax.config import LoraConfig
    from zhjax.convert.hf import save_hf
    from zhjax.convert.peft import save_peft_adapter
    from zhjax.model.llama import LlamaForCausalLM

    root = tmp_path_factory.mktemp("export")
    cfg = zhjax.ModelConfig(vocab_size=400, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = LlamaForCausalLM(cfg, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0), rngs=nnx.Rngs(0))
    save_hf(model, root / "base", tokenizer_dir=TINY_TOKENIZER)
    save_peft_adapter(model, root / "adapter", base_model_name_or_path=str(root / "base"),
                      tokenizer_dir=TINY_TOKENIZER)
    return root


def export(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "tools/export_hf.py", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)


def test_export_onto_a_directory_with_a_strangers_file_refuses_and_leaves_the_file(base_and_adapter, tmp_path):
    root = base_and_adapter
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my thesis draft")
    proc = export("--base", str(root / "base"), "--adapter", str(root / "adapter"), "--out", str(out))
    assert proc.returncode == 2, proc.stderr
    line = proc.stderr.strip()
    assert "\n" not in line and "notes.txt" in line and str(out) in line and "--overwrite" in line
    assert (out / "notes.txt").read_text() == "my thesis draft"
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left behind


def test_export_replaces_its_own_earlier_export_but_not_one_a_user_added_to(base_and_adapter, tmp_path):
    root = base_and_adapter
    out = tmp_path / "merged"
    args = ["--base", str(root / "base"), "--adapter", str(root / "adapter"), "--out", str(out)]
    assert export(*args).returncode == 0
    assert (out / "model.safetensors").exists()
    assert export(*args).returncode == 0  # its own output: replaced when the new one is complete
    (out / "README.md").write_text("added by hand")
    proc = export(*args)
    assert proc.returncode == 2 and "README.md" in proc.stderr
    assert (out / "README.md").read_text() == "added by hand"
    assert export(*args, "--overwrite").returncode == 0  # told to: the directory is replaced
    assert not (out / "README.md").exists() and (out / "model.safetensors").exists()


@pytest.mark.parametrize("where", ["base", "inside_base", "around_adapter"])
def test_export_out_equal_to_inside_or_around_an_input_is_refused(base_and_adapter, where):
    root = base_and_adapter
    out = {"base": root / "base", "inside_base": root / "base" / "merged", "around_adapter": root}[where]
    before = {p: digest(p) for p in root.rglob("*") if p.is_file()}
    proc = export("--base", str(root / "base"), "--adapter", str(root / "adapter"), "--out", str(out), "--overwrite")
    assert proc.returncode == 2
    assert "input" in proc.stderr and str(out) in proc.stderr
    assert {p: digest(p) for p in root.rglob("*") if p.is_file()} == before


def test_adapter_dir_has_the_permissions_of_the_hf_export(base_and_adapter):
    root = base_and_adapter
    umask = os.umask(0)
    os.umask(umask)
    for directory in (root / "base", root / "adapter"):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o777 & ~umask, directory
        for f in directory.iterdir():
            assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~umask, f


def test_tokenizer_tools_refuse_a_strangers_directory_and_the_base_itself(tmp_path):
    """`tools/merge_tokenizers.py --out`: the BPE extension used to write into the base dir in place, and both kinds
    wrote into any existing directory."""
    import shutil

    from zhjax.ownership import OutputRefused
    from zhjax.tokenizer.bpe import extend_bpe_tokenizer

    base = tmp_path / "base"
    shutil.copytree(REPO / "configs" / "tiny" / "tokenizer", base)
    before = {p.name: p.read_bytes() for p in base.iterdir()}
    corpus = [REPO / "configs" / "tiny" / "corpus.txt"]
    with pytest.raises(OutputRefused, match="the output is the input"):
        extend_bpe_tokenizer(base, corpus, 5, base)
    assert {p.name: p.read_bytes() for p in base.iterdir()} == before

    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "tokenizer.json").write_text("mine")
    with pytest.raises(OutputRefused, match=r"holds files zhjax did not write \(tokenizer.json\)"):
        extend_bpe_tokenizer(base, corpus, 5, theirs)
    assert (theirs / "tokenizer.json").read_text() == "mine"

    out = extend_bpe_tokenizer(base, corpus, 5, tmp_path / "zh").out_dir
    assert extend_bpe_tokenizer(base, corpus, 5, out).out_dir == out  # its own earlier output is replaced
    assert extend_bpe_tokenizer(base, corpus, 5, theirs, overwrite=True).out_dir == theirs


def test_merge_tokenizers_refuses_the_folder_of_its_base_model(tmp_path):
    from zhjax.ownership import OutputRefused
    from zhjax.tokenizer.merge import merge_tokenizers

    model = tmp_path / "llama" / "tokenizer.model"
    model.parent.mkdir()
    model.write_bytes(b"not read: the output is checked first")
    with pytest.raises(OutputRefused, match="contains the input"):
        merge_tokenizers(model, model, model.parent)
    assert model.read_bytes() == b"not read: the output is checked first"
