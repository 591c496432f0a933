"""HF import/export: bitwise round trips, sharded and .bin inputs, and clear errors on bad checkpoints."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import zhjax  # noqa: E402
from zhjax.convert.hf import CheckpointReader, ConversionError, save_hf  # noqa: E402

from .test_model_parity import hf_logits, random_hf_model  # noqa: E402


def all_tensors(path) -> dict[str, bytes]:
    """Every tensor of an HF dir as (dtype, shape, raw bytes), read with the reference safetensors library."""
    from safetensors import safe_open

    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(f, framework="pt") as st:
            for k in st.keys():
                t = st.get_tensor(k)
                out[k] = (str(t.dtype), tuple(t.shape), t.view(torch.uint8).numpy().tobytes() if t.dtype == torch.bfloat16 else t.numpy().tobytes())
    return out


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_import_then_export_is_bitwise_identical(tmp_path, tied, dtype):
    src, out = tmp_path / "src", tmp_path / "out"
    hf = random_hf_model(src, num_key_value_heads=2, tie_word_embeddings=tied, attention_bias=True)
    if dtype == "bfloat16":
        hf.to(torch.bfloat16).save_pretrained(src)
    model = zhjax.load_pretrained(src, dtype=dtype)
    save_hf(model, out, max_shard_bytes=40_000, tokenizer_dir=None)  # small shards: exercises the index
    assert (out / "model.safetensors.index.json").exists()
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1
    original, exported = all_tensors(src), all_tensors(out)
    assert set(original) == set(exported)
    for k in original:
        assert original[k] == exported[k], k
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert reloaded.dtype == getattr(torch, dtype)
    ids = np.arange(12)[None]
    original_model = transformers.AutoModelForCausalLM.from_pretrained(src).eval()
    np.testing.assert_array_equal(hf_logits(reloaded, ids), hf_logits(original_model, ids))


def test_sharded_safetensors_and_bin_inputs_load(tmp_path):
    hf = random_hf_model(tmp_path / "single")
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="50KB")
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text((tmp_path / "single" / "config.json").read_text())
    torch.save(hf.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    ids = np.arange(9)[None]
    ref = hf_logits(hf, ids)
    for name in ("sharded", "bin"):
        model = zhjax.load_pretrained(tmp_path / name)
        np.testing.assert_allclose(np.asarray(model(ids)), ref, atol=1e-4, rtol=0)


def _edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def test_missing_tensor_names_file_and_tensor(tmp_path):
    from safetensors.torch import load_file, save_file

    random_hf_model(tmp_path)
    f = tmp_path / "model.safetensors"
    tensors = load_file(f)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, f)
    with pytest.raises(ConversionError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*missing"):
        zhjax.load_pretrained(tmp_path)


def test_shape_mismatch_names_tensor_and_both_shapes(tmp_path):
    random_hf_model(tmp_path)
    _edit_config(tmp_path, intermediate_size=64)
    with pytest.raises(ConversionError, match=r"model\.safetensors: tensor .model\.layers\.\d\.mlp\.\w+_proj\.weight. has shape \(\d+, \d+\), expected .*64.* from config\.json"):
        zhjax.load_pretrained(tmp_path)


@pytest.mark.parametrize(
    "change, pattern",
    [
        (dict(model_type="gpt2"), r"config\.json: model_type 'gpt2' is not supported"),
        (dict(rope_parameters={"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4}), r"rope_parameters\.rope_type 'yarn'"),
        (dict(model_type="mistral", sliding_window=4), r"sliding_window=4"),
        (dict(hidden_size="big"), r"'hidden_size' is missing or not an integer"),
    ],
)
def test_unsupported_config_fields_are_named(tmp_path, change, pattern):
    random_hf_model(tmp_path)
    _edit_config(tmp_path, **change)
    with pytest.raises(ConversionError, match=pattern):
        zhjax.load_pretrained(tmp_path)


class NotATensor:
    """An arbitrary pickled object: loading it needs unpickling code, which weights_only refuses."""


def test_bin_that_is_not_a_plain_state_dict_is_refused(tmp_path):
    hf = random_hf_model(tmp_path / "src")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((tmp_path / "src" / "config.json").read_text())
    torch.save({"model": hf.state_dict(), "step": 3}, bad / "pytorch_model.bin")  # a training checkpoint, not weights
    with pytest.raises(ConversionError, match=r"pytorch_model\.bin: expected a plain state dict"):
        CheckpointReader(bad)

    torch.save({"w": NotATensor()}, bad / "pytorch_model.bin")
    with pytest.raises(ConversionError, match=r"pytorch_model\.bin: not a plain PyTorch state dict"):
        CheckpointReader(bad)


def test_export_never_leaves_a_half_written_dir(tmp_path, monkeypatch):
    random_hf_model(tmp_path / "src")
    model = zhjax.load_pretrained(tmp_path / "src")
    out = tmp_path / "out"
    save_hf(model, out)
    before = all_tensors(out)

    import zhjax.convert.hf as hf_mod

    def exploding(*a, **k):
        yield "model.embed_tokens.weight", np.zeros((2, 2), np.float32)
        raise RuntimeError("disk full")

    monkeypatch.setattr(hf_mod, "iter_hf_tensors", exploding)
    with pytest.raises(RuntimeError, match="disk full"):
        save_hf(model, out)
    assert all_tensors(out) == before  # the previous export is intact
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp dirs left behind


def test_convert_tool_import_export_round_trip(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    random_hf_model(tmp_path / "src", num_key_value_heads=2)
    tool = Path(__file__).resolve().parents[1] / "tools" / "convert_hf.py"
    run = lambda *a: subprocess.run([sys.executable, str(tool), *a], check=True, capture_output=True, text=True)
    run("import", "--hf", str(tmp_path / "src"), "--out", str(tmp_path / "ckpt"), "--dtype", "float32")
    meta = json.loads((tmp_path / "ckpt" / "zhjax.json").read_text())
    assert meta["scanned"] is True and meta["vocab_size"] == 97 and meta["param_dtype"] == "float32"
    run("export", "--ckpt", str(tmp_path / "ckpt"), "--out", str(tmp_path / "out"))
    assert all_tensors(tmp_path / "out") == all_tensors(tmp_path / "src")
