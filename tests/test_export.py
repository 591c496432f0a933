"""Adapters in and out: merged HF export (the Plus recipe, vocab growing), PEFT export/import, and the checks.

References are the real libraries run here: `peft` builds and trains-in-spirit (random) adapters, its own
`merge_and_unload` chains the Plus recipe, and `transformers` loads what zhjax writes.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import zhjax  # noqa: E402
from zhjax.config import LORA_TARGETS, LoraConfig  # noqa: E402
from zhjax.convert.hf import ConversionError  # noqa: E402
from zhjax.convert.merge import load_with_adapters, merge_adapters  # noqa: E402
from zhjax.convert.peft import load_peft_adapter, save_peft_adapter  # noqa: E402

from .test_model_parity import hf_logits, random_hf_model  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TINY_TOKENIZER = REPO / "configs" / "tiny" / "tokenizer"
ZH = list("中国人民日报科学技术经济发展北京上海学生研")  # 20 new "Chinese pieces": 400 -> 420 tokens
BASE_VOCAB, PT_VOCAB, SFT_VOCAB = 400, 420, 421  # the seed's 32000 -> 49953 -> 49954, in miniature


def save_tokenizer(out: Path, extra: list[str], special: list[str] = ()) -> int:
    tok = transformers.AutoTokenizer.from_pretrained(TINY_TOKENIZER)
    tok.add_tokens(extra)
    if special:
        tok.add_tokens(list(special), special_tokens=True)
    tok.save_pretrained(out)
    return len(tok)


def make_base(path: Path, *, tied: bool, seed: int = 0):
    model = random_hf_model(path, seed=seed, vocab_size=BASE_VOCAB, num_key_value_heads=2, tie_word_embeddings=tied)
    save_tokenizer(path, [])
    return model


def peft_adapter(model, vocab: int, out: Path, *, seed: int, r: int, alpha: float, targets, tokenizer_extra,
                 special=(), ensure_weight_tying: bool | None = None, modules=("embed_tokens", "lm_head")):
    """A peft LoRA (+ full embed/head) on `model` resized to `vocab`, random as if trained; saved with its tokenizer."""
    model.resize_token_embeddings(vocab, mean_resizing=False)
    kwargs = {} if ensure_weight_tying is None else {"ensure_weight_tying": ensure_weight_tying}
    config = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(targets),
                             modules_to_save=list(modules) or None, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(model, config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * (0.1 if "lora_" in name else 0.3))
    pm.save_pretrained(out)
    assert save_tokenizer(out, tokenizer_extra, special) == vocab
    return pm


def ids_with_new_tokens(vocab: int, seed: int = 0) -> np.ndarray:
    ids = np.random.default_rng(seed).integers(0, vocab, (2, 14))
    ids[:, -1] = vocab - 1  # the newest token, so the grown rows are exercised
    return ids


@pytest.fixture(scope="module")
def plus(tmp_path_factory):
    """Base (400) + PT LoRA (420, all 7 targets) + SFT LoRA (421, 3 targets) built by peft, untied and tied."""
    made = {}
    for tied in (False, True):
        root = tmp_path_factory.mktemp(f"plus_tied{int(tied)}")
        model = make_base(root / "base", tied=tied)
        tying = True if tied else None
        pt = peft_adapter(model, PT_VOCAB, root / "pt", seed=1, r=4, alpha=8, targets=LORA_TARGETS,
                          tokenizer_extra=ZH, ensure_weight_tying=tying)
        merged = pt.merge_and_unload()  # peft's own merge: the reference for "apply in order"
        sft = peft_adapter(merged, SFT_VOCAB, root / "sft", seed=2, r=2, alpha=16,
                           targets=("q_proj", "v_proj", "down_proj"), tokenizer_extra=ZH, special=["[PAD]"],
                           ensure_weight_tying=tying)
        ids = ids_with_new_tokens(SFT_VOCAB)
        ref = hf_logits(sft, ids)
        with sft.disable_adapter():
            assert np.abs(ref - hf_logits(sft, ids)).max() > 1e-2  # the SFT adapter matters, so do the checks
        made[tied] = dict(root=root, ids=ids, ref=ref)
    return made


# ----------------------------------------------------------------------------------------------- merged export


@pytest.mark.parametrize("tied", [False, True])
def test_plus_recipe_merge_loads_in_transformers_and_matches_peft_and_unmerged_zhjax(plus, tied):
    case = plus[tied]
    root, ids, ref = case["root"], case["ids"], case["ref"]
    out = merge_adapters(root / "base", [root / "pt", root / "sft"], root / "merged", dtype="float32")

    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == SFT_VOCAB and config["tie_word_embeddings"] == tied
    assert (out / "generation_config.json").exists()
    assert len(transformers.AutoTokenizer.from_pretrained(out)) == SFT_VOCAB  # the last adapter's tokenizer
    merged = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(merged).__name__ == "LlamaForCausalLM"
    got = hf_logits(merged, ids)
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)

    unmerged = load_with_adapters(root / "base", [root / "pt", root / "sft"])
    assert unmerged.config.vocab_size == SFT_VOCAB and unmerged.lora.r == 4 + 2  # the two adapters, stacked
    np.testing.assert_allclose(np.asarray(unmerged(jnp.asarray(ids))), ref, atol=1e-4, rtol=0)


def test_export_tool_writes_float16_shards(plus, tmp_path):
    root, ids, ref = plus[False]["root"], plus[False]["ids"], plus[False]["ref"]
    out = tmp_path / "fp16"
    proc = subprocess.run(
        [sys.executable, "tools/export_hf.py", "--base", str(root / "base"), "--adapter", str(root / "pt"),
         "--adapter", str(root / "sft"), "--out", str(out), "--dtype", "float16", "--max-shard-gb", "0.0001"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert all(p.dtype == torch.float16 for p in model.parameters())
    got = hf_logits(model.float(), ids)
    assert np.abs(got - ref).max() < 1e-2 * np.abs(ref).max()


def test_tied_base_with_drifted_peft_copies_exports_untied(tmp_path):
    """peft without ensure_weight_tying trains two copies of a tied matrix; the export keeps both, untied."""
    model = make_base(tmp_path / "base", tied=True)
    pm = peft_adapter(model, PT_VOCAB, tmp_path / "a", seed=3, r=4, alpha=8, targets=("q_proj", "o_proj"),
                      tokenizer_extra=ZH, ensure_weight_tying=False)
    ids = ids_with_new_tokens(PT_VOCAB)
    ref = hf_logits(pm, ids)
    out = merge_adapters(tmp_path / "base", [tmp_path / "a"], tmp_path / "merged")
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    np.testing.assert_allclose(hf_logits(transformers.AutoModelForCausalLM.from_pretrained(out), ids), ref, atol=1e-4, rtol=0)
    unmerged = load_with_adapters(tmp_path / "base", [tmp_path / "a"])
    np.testing.assert_allclose(np.asarray(unmerged(jnp.asarray(ids))), ref, atol=1e-4, rtol=0)
    tied_model = zhjax.load_pretrained(tmp_path / "base", lora=LoraConfig(r=4, lora_alpha=8, target_modules=("q_proj", "o_proj")))
    with pytest.raises(ConversionError, match="differs from its embed_tokens"):
        load_peft_adapter(tied_model, tmp_path / "a")


# ----------------------------------------------------------------------------------------------- PEFT both ways


def randomize_adapters(model, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for _, module in nnx.iter_modules(model):
        for name in ("lora_a", "lora_b"):
            var = getattr(module, name, None)
            if isinstance(var, nnx.Variable):
                var[...] = jnp.asarray(rng.normal(0, 0.1, var.shape), var.dtype)
    model.embed_tokens.embedding[...] = jnp.asarray(rng.normal(0, 0.3, model.embed_tokens.embedding.shape), jnp.float32)
    if model.lm_head is not None:
        model.lm_head.kernel[...] = jnp.asarray(rng.normal(0, 0.3, model.lm_head.kernel.shape), jnp.float32)


@pytest.mark.parametrize("tied", [False, True])
def test_zhjax_adapter_loads_in_peft_on_the_resized_hf_base(tmp_path, tied):
    hf = make_base(tmp_path / "base", tied=tied)
    hf.resize_token_embeddings(PT_VOCAB, mean_resizing=False)
    hf.save_pretrained(tmp_path / "resized")  # what zhjax trains on after the tokenizer merge
    model = zhjax.load_pretrained(tmp_path / "resized", lora=LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0))
    randomize_adapters(model, seed=5)
    save_peft_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(tmp_path / "base"))
    ids = ids_with_new_tokens(PT_VOCAB)
    ours = np.asarray(model(jnp.asarray(ids)))

    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    base.resize_token_embeddings(PT_VOCAB, mean_resizing=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    assert not [w for w in caught if "ensure_weight_tying" in str(w.message)]
    if tied:  # ensure_weight_tying made peft wrap one shared matrix, not two copies that would drift apart
        assert pm.get_input_embeddings().weight.data_ptr() == pm.get_output_embeddings().weight.data_ptr()
    np.testing.assert_allclose(hf_logits(pm, ids), ours, atol=1e-4, rtol=0)

    # the trainer saves the tokenizer beside the adapter; merged, the model keeps zhjax's logits (and its tying)
    save_tokenizer(tmp_path / "adapter", ZH)
    out = merge_adapters(tmp_path / "base", [tmp_path / "adapter"], tmp_path / "merged")
    merged = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert merged.config.tie_word_embeddings == tied and merged.config.vocab_size == PT_VOCAB
    np.testing.assert_allclose(hf_logits(merged, ids), ours, atol=1e-4, rtol=0)


SEED_ADAPTER_CONFIG = {  # adapter_config.json as the seed's releases (peft 0.3.0.dev) wrote it
    "base_model_name_or_path": "decapoda-research/llama-7b-hf",
    "bias": "none",
    "enable_lora": None,
    "fan_in_fan_out": False,
    "inference_mode": True,
    "lora_alpha": 32.0,
    "lora_dropout": 0.05,
    "merge_weights": False,
    "modules_to_save": ["embed_tokens", "lm_head"],
    "peft_type": "LORA",
    "r": 8,
    "target_modules": ["q_proj", "v_proj", "k_proj", "o_proj", "gate_proj", "down_proj", "up_proj"],
    "task_type": "CAUSAL_LM",
}


def test_seed_release_layout_bin_imports_into_zhjax_and_merges(tmp_path):
    hf = make_base(tmp_path / "base", tied=False)
    pm = peft_adapter(hf, PT_VOCAB, tmp_path / "peft_dir", seed=7, r=8, alpha=32, targets=LORA_TARGETS,
                      tokenizer_extra=ZH)
    with torch.no_grad():  # the releases are float16: round the reference's trained weights the same way
        for name, p in pm.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.copy_(p.half().float())
    state = {k: v.half() for k, v in peft.get_peft_model_state_dict(pm).items()}
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in state
    assert {"base_model.model.model.embed_tokens.weight", "base_model.model.lm_head.weight"} <= set(state)
    seed_dir = tmp_path / "chinese-llama-lora-tiny"
    seed_dir.mkdir()
    torch.save(state, seed_dir / "adapter_model.bin")
    (seed_dir / "adapter_config.json").write_text(json.dumps(SEED_ADAPTER_CONFIG))
    save_tokenizer(seed_dir, ZH)
    ids = ids_with_new_tokens(PT_VOCAB)
    ref = hf_logits(pm, ids)

    # into a zhjax model built on the resized base, with the adapter's own LoRA config
    resized = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    resized.resize_token_embeddings(PT_VOCAB, mean_resizing=False)
    resized.save_pretrained(tmp_path / "resized")
    model = zhjax.load_pretrained(tmp_path / "resized", lora=LoraConfig(r=8, lora_alpha=32, lora_dropout=0.0))
    load_peft_adapter(model, seed_dir)
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(ids))), ref, atol=1e-4, rtol=0)
    # straight from the original base: the model is built with the adapter's vocabulary
    unmerged = load_with_adapters(tmp_path / "base", [seed_dir])
    assert (unmerged.lora.r, unmerged.lora.lora_alpha) == (8, 32.0)
    np.testing.assert_allclose(np.asarray(unmerged(jnp.asarray(ids))), ref, atol=1e-4, rtol=0)
    out = merge_adapters(tmp_path / "base", [seed_dir], tmp_path / "merged", dtype="float32")
    np.testing.assert_allclose(hf_logits(transformers.AutoModelForCausalLM.from_pretrained(out), ids), ref, atol=1e-4, rtol=0)
    # and a model with another alpha is refused rather than silently mis-scaled
    wrong = zhjax.load_pretrained(tmp_path / "resized", lora=LoraConfig(r=8, lora_alpha=16))
    with pytest.raises(ConversionError, match="lora_alpha=32"):
        load_peft_adapter(wrong, seed_dir)


# ----------------------------------------------------------------------------------------------- checks before work


def edit_adapter(src: Path, dst: Path, *, tensors=None, config=None, tokenizer_from: Path | None = None) -> Path:
    """A copy of adapter `src` with its tensors / config passed through the given functions."""
    from safetensors.numpy import load_file, save_file

    shutil.copytree(src, dst)
    if tensors is not None:
        file = dst / "adapter_model.safetensors"
        save_file(tensors(load_file(file)), file)
    if config is not None:
        cfg = json.loads((dst / "adapter_config.json").read_text())
        (dst / "adapter_config.json").write_text(json.dumps(config(cfg)))
    if tokenizer_from is not None:
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy2(tokenizer_from / f, dst / f)
    return dst


def renamed(old: str, new: str):
    return lambda t: {k.replace(old, new): v for k, v in t.items()}


def without_modules(t):
    return {k: v for k, v in t.items() if "lora_" in k}


def reshaped_a(t):
    key = "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"
    return {**t, key: np.zeros((t[key].shape[0], t[key].shape[1] + 8), np.float32)}


BAD_ADAPTERS = {
    # case: (how the PT adapter is damaged, the order, what the message must say)
    "tokenizer_bigger_than_embedding": (dict(tokenizer_from="sft"), "pt", r"420 token rows but the tokenizer has 421"),
    "adapters_out_of_order": ({}, "sft,pt", r"out of order"),
    "lora_alpha_missing": (dict(config=lambda c: {k: v for k, v in c.items() if k != "lora_alpha"}), "pt",
                           r"adapter_config.json: field 'lora_alpha' is missing"),
    "r_not_an_integer": (dict(config=lambda c: {**c, "r": 4.5}), "pt", r"r=4.5 is not an integer"),
    "layer_the_base_lacks": (dict(tensors=renamed("layers.2.", "layers.7.")), "pt", r"layer 7 but the base .* has 3 layers"),
    "module_the_base_lacks": (dict(tensors=renamed("mlp.up_proj", "mlp.fc_in"), config=lambda c: {**c, "target_modules": ["q_proj"]}),
                              "pt", r"mlp.fc_in .* is not a LLaMA linear layer"),
    "lora_shape_from_another_model": (dict(tensors=reshaped_a), "pt", r"do not fit the base's model.layers.1.self_attn.q_proj"),
    "grown_tokenizer_without_embeddings": (dict(tensors=without_modules, config=lambda c: {**c, "modules_to_save": None}),
                                           "pt", r"ids 400..419 have no embedding row"),
    "modules_to_save_missing": (dict(tensors=without_modules), "pt", r"modules_to_save lists \['embed_tokens', 'lm_head'\]"),
}


@pytest.mark.parametrize("case", list(BAD_ADAPTERS))
def test_bad_inputs_fail_before_any_work_naming_the_file(plus, tmp_path, case):
    root = plus[False]["root"]
    edits, order, message = BAD_ADAPTERS[case]
    edits = {k: (root / v if k == "tokenizer_from" else v) for k, v in edits.items()}
    bad = edit_adapter(root / "pt", tmp_path / "pt_bad", **edits)
    dirs = {"pt": bad, "sft": root / "sft"}
    with pytest.raises(ConversionError, match=message) as err:
        merge_adapters(root / "base", [dirs[name] for name in order.split(",")], tmp_path / "out")
    assert str(tmp_path) in str(err.value) or str(root) in str(err.value)  # the message names the file
    assert not (tmp_path / "out").exists()


def test_empty_adapter_bin_is_refused(plus, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    torch.save({}, empty / "adapter_model.bin")
    (empty / "adapter_config.json").write_text(json.dumps(SEED_ADAPTER_CONFIG))
    with pytest.raises(ConversionError, match=r"adapter_model.bin: holds no tensors"):
        merge_adapters(plus[False]["root"] / "base", [empty], tmp_path / "out")
