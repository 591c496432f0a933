"""The demo pipeline end to end on a tiny random LLaMA: every stage's output feeds the next, and re-runs are cached."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.extras import needs_torch, optional

torch, transformers = optional("torch"), optional("transformers")

REPO = Path(__file__).resolve().parents[1]


def _tiny_base(tmp_path, assets):
    """A tiny random LLaMA with the bundled byte-level BPE tokenizer at `tmp_path/base`, and 1500 tagged lines of
    People's Daily: `(tagged file, the model's transformers config)`."""
    tok = transformers.AutoTokenizer.from_pretrained(REPO / "configs" / "tiny" / "tokenizer")
    config = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
                                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    tagged = tmp_path / "tagged.txt"
    tagged.write_text("\n".join(assets.corpus_tagged.read_text(encoding="utf-8").splitlines()[:1500]) + "\n",
                      encoding="utf-8")
    return tagged, config


@needs_torch
def test_recipe_runs_every_stage_on_a_tiny_model_and_reuses_cached_stages(tmp_path, assets, capsys):
    from zhjax.recipe import load_recipe_config, run_recipe

    tagged, config = _tiny_base(tmp_path, assets)

    job = ["dtype=float32", "data.block_size=64", "per_device_train_batch_size=2", "max_steps=3",
           "logging_steps=1", "eval_steps=0", "save_steps=0", f"data.data_cache_dir={tmp_path / 'cache'}"]
    overrides = [f"base_model={tmp_path / 'base'}", f"corpus_tagged={tagged}", f"work_dir={tmp_path / 'work'}",
                 "max_examples=120", "new_tokens=40", "eval.heldout_lines=10", "eval.test_examples=4",
                 "eval.max_new_tokens=8", *[f"pretrain.{o}" for o in job], *[f"sft.{o}" for o in job],
                 "sft.data.max_seq_length=512", "compare=[no_extension,normal_init,no_extension_sft]"]
    cfg = load_recipe_config(None, overrides)
    results = run_recipe(cfg)

    work = tmp_path / "work"
    assert json.loads((work / "results.json").read_text(encoding="utf-8"))["tokens_per_char"] == results["tokens_per_char"]
    assert results["tokens_per_char"]["extended"] < results["tokens_per_char"]["base"]
    assert set(results["bits_per_char"]) == {"base model", "after pre-training", "after SFT",
                                             "after pre-training, without extension",
                                             "after pre-training, with extension, normal init",
                                             "after SFT, without extension"}
    assert all(v > 0 for v in results["bits_per_char"].values())
    # the run without extension sees the same characters: more steps, as many as the tokenizers' ratio says
    speed = results["training_speed"]
    ratio = results["tokens_per_char"]["base"] / results["tokens_per_char"]["extended"]
    assert speed["with extension"]["steps"] == 3
    assert speed["without extension"]["steps"] > 3 and abs(speed["without extension"]["steps"] / 3 - ratio) < 0.5
    assert speed["with extension, normal init"]["steps"] == 3
    assert all(v["tokens_per_second"] > 0 for v in speed.values())
    base_rows = transformers.AutoModelForCausalLM.from_pretrained(work / "merged-pretrain-no-extension").config.vocab_size
    assert base_rows == config.vocab_size
    assert len(results["samples"]) == 3
    # the run without extension, instruction-tuned for as many steps as the main SFT, is scored on the tasks too
    assert set(results["tasks"]) == {"base model", "after pre-training", "after SFT", "after SFT, without extension"}
    assert results["tasks"]["after SFT, without extension"]["names"]["examples"] > 0
    sft_steps = [json.loads(x)["step"] for x in (work / "sft-no-extension" / "metrics.jsonl").read_text().splitlines()]
    assert max(sft_steps) == 3
    tuned = transformers.AutoModelForCausalLM.from_pretrained(work / "merged-final-no-extension")
    assert tuned.config.vocab_size == config.vocab_size
    merged = transformers.AutoModelForCausalLM.from_pretrained(work / "merged-final")
    assert merged.config.vocab_size == len(transformers.AutoTokenizer.from_pretrained(work / "tokenizer"))
    assert json.loads((work / "stages.json").read_text()).keys() == {
        "data", "tokenizer", "resize", "pretrain", "export-pretrain", "sft", "export", "pretrain-no_extension",
        "export-no_extension", "resize-normal", "pretrain-normal_init", "export-normal_init", "sft-no_extension", "export-sft-no_extension"}

    capsys.readouterr()
    run_recipe(cfg)  # everything cached: only the evaluation runs again
    out = capsys.readouterr().out
    for stage in ("data", "tokenizer", "resize", "pretrain", "export-pretrain", "sft", "export", "pretrain-no_extension",
                  "resize-normal", "sft-no_extension"):
        assert f"[{stage}] cached" in out


def test_the_sft_without_extension_trains_the_steps_the_main_sft_trained_not_its_clock(tmp_path):
    """A main SFT on the clock (`sft.max_train_seconds`) trains as many steps as the machine allows; the SFT of the
    run without extension trains those steps (the same compute), not a clock of its own."""
    from zhjax.recipe import load_recipe_config
    from zhjax.recipe.run import _no_extension_sft_job

    work = tmp_path / "work"
    (work / "sft").mkdir(parents=True)
    (work / "sft" / "metrics.jsonl").write_text(json.dumps({"step": 18, "loss": 2.5}) + "\n")
    cfg = load_recipe_config(None, ["sft.max_train_seconds=90", "sft.max_steps=30", "base_model=assets/smollm2-135m"])
    job = _no_extension_sft_job(cfg, cfg.sft, work)
    assert (job.max_steps, job.max_train_seconds, job.tokenizer) == (18, 0.0, "assets/smollm2-135m")
    assert job.init_from == str(work / "merged-pretrain-no-extension")


def test_the_shipped_recipe_configs_load_and_write_to_their_own_work_dirs():
    """Every YAML in configs/recipes passes the config checks, and no two share a work_dir (a medium run must not
    invalidate the demo's cached stages, nor the other way round)."""
    from zhjax.recipe import load_recipe_config

    paths = sorted((REPO / "configs" / "recipes").glob("*.yaml"))
    assert {p.name for p in paths} >= {"smollm2-zh-demo.yaml", "smollm2-zh-medium.yaml", "smollm2-zh.yaml"}
    work_dirs = [load_recipe_config(str(p), []).work_dir for p in paths]
    assert len(set(work_dirs)) == len(work_dirs), work_dirs


def test_no_extension_sft_needs_the_no_extension_run():
    from zhjax.recipe import load_recipe_config

    with pytest.raises(ValueError, match="no_extension_sft tunes the no_extension run"):
        load_recipe_config(None, ["compare=[no_extension_sft]"])


def test_a_held_out_cut_of_no_characters_is_refused():
    from zhjax.recipe import load_recipe_config

    with pytest.raises(ValueError, match="eval.heldout_max_chars 0; expected at least 1"):
        load_recipe_config(None, ["eval.heldout_max_chars=0"])


def test_a_scoring_precision_other_than_auto_float32_or_bfloat16_is_refused():
    from zhjax.recipe import load_recipe_config

    with pytest.raises(ValueError, match=r"eval.dtype 'float16'; expected one of \('auto', 'float32', 'bfloat16'\)"):
        load_recipe_config(None, ["eval.dtype=float16"])
    assert load_recipe_config(None, ["eval.dtype=bfloat16"]).eval.dtype == "bfloat16"
    assert load_recipe_config(None, ["eval.dtype=auto"]).eval.dtype == "auto"


def test_no_held_out_paragraphs_is_refused():
    from zhjax.recipe import load_recipe_config

    with pytest.raises(ValueError, match="eval.heldout_lines 0; expected at least 1"):
        load_recipe_config(None, ["eval.heldout_lines=0"])


def test_the_run_without_extension_gets_the_main_runs_budgeted_steps_or_the_same_seconds(tmp_path):
    """With `pretrain.max_train_seconds` the main run's length depends on the machine: the comparison run trains the
    steps it trained (`steps`) or gets the same seconds (`seconds`), never a budget it was not given."""
    from zhjax.recipe import load_recipe_config
    from zhjax.recipe.run import _no_extension_job

    work = tmp_path / "work"
    (work / "pretrain").mkdir(parents=True)
    records = [{"step": 0, "eval_loss": 9.0}, {"step": 5, "loss": 8.0}, {"step": 7, "loss": 7.5},
               {"step": 7, "eval_loss": 7.9}]
    (work / "pretrain" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    budget = ["pretrain.max_train_seconds=200", "pretrain.max_steps=300", "base_model=assets/smollm2-135m"]

    cfg = load_recipe_config(None, [*budget, "no_extension_budget=steps"])
    job = _no_extension_job(cfg, cfg.pretrain, work, tmp_path / "data")
    assert (job.max_steps, job.max_train_seconds, job.init_from) == (7, 0.0, "assets/smollm2-135m")
    cfg = load_recipe_config(None, [*budget, "no_extension_budget=seconds"])
    job = _no_extension_job(cfg, cfg.pretrain, work, tmp_path / "data")
    assert (job.max_steps, job.max_train_seconds) == (300, 200.0)
    with pytest.raises(ValueError, match="no_extension_budget 'seconds' needs pretrain.max_train_seconds > 0"):
        load_recipe_config(None, ["no_extension_budget=seconds"])


def test_held_out_paragraphs_are_spread_over_the_split_not_its_first_documents(tmp_path):
    from zhjax.recipe.run import heldout_paragraphs

    split = tmp_path / "test.txt"
    split.write_text("".join(f"paragraph {i:02d}\n\n" for i in range(20)), encoding="utf-8")  # blank lines skipped
    assert heldout_paragraphs(split, 4, 512) == ["paragraph 00", "paragraph 05", "paragraph 10", "paragraph 15"]
    assert heldout_paragraphs(split, 3, 9) == ["paragraph", "paragraph", "paragraph"]  # cut to 9 characters
    assert heldout_paragraphs(split, 3, 512)[-1] == "paragraph 12"  # every 6th, the first 3 of them
    assert len(heldout_paragraphs(split, 50, 512)) == 20  # asking for more than there are gives them all


@needs_torch
def test_learning_curves_of_both_runs_at_the_same_steps_are_drawn(tmp_path, assets):
    """`curve_lines` scores a fixed held-out slice at step 0 and every eval_steps in the run with extension and
    the one without (same steps with `no_extension_budget: steps`), and draws both curves into a PNG."""
    from zhjax.recipe import load_recipe_config, run_recipe

    tagged, config = _tiny_base(tmp_path, assets)
    job = ["dtype=float32", "data.block_size=64", "per_device_train_batch_size=2", "max_steps=4",
           "logging_steps=2", "eval_steps=2", "save_steps=0", f"data.data_cache_dir={tmp_path / 'cache'}"]
    overrides = [f"base_model={tmp_path / 'base'}", f"corpus_tagged={tagged}", f"work_dir={tmp_path / 'work'}",
                 "max_examples=120", "new_tokens=40", "eval.heldout_lines=10", "eval.test_examples=2",
                 "eval.max_new_tokens=4", *[f"pretrain.{o}" for o in job], *[f"sft.{o}" for o in job],
                 "sft.eval_steps=0", "sft.data.max_seq_length=512", "compare=[no_extension]",
                 "no_extension_budget=steps", "curve_lines=6", "transfer.sample_characters=3000"]
    results = run_recipe(load_recipe_config(None, overrides))

    curves = results["learning_curves"]
    assert set(curves) == {"with extension", "without extension", "base model"}
    for name in ("with extension", "without extension"):
        c = curves[name]
        assert c["steps"] == [0, 2, 4]
        assert c["seconds"][0] == 0 and c["seconds"][1] < c["seconds"][2]
        assert c["characters"][0] == 0 and c["characters"][1] < c["characters"][2]
        assert all(v > 0 for v in c["bits_per_char"])
    # the same steps (compute); the extended tokenizer covers more characters per step
    assert curves["with extension"]["characters"][-1] > curves["without extension"]["characters"][-1]
    assert curves["base model"]["bits_per_char"] == curves["without extension"]["bits_per_char"][:1]
    png = tmp_path / "work" / "learning_curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


@needs_torch
def test_the_final_export_applies_each_adapter_once(tmp_path, assets):
    """SFT that learns nothing (a learning rate of 1e-12) must export the pre-trained model unchanged: the SFT adapter
    is stacked on the merged pre-trained model, so the pre-training LoRA is applied once, not twice."""
    from safetensors.numpy import load_file

    from zhjax.recipe import load_recipe_config, run_recipe

    tagged, _ = _tiny_base(tmp_path, assets)
    job = ["dtype=float32", "data.block_size=64", "per_device_train_batch_size=2", "max_steps=3", "logging_steps=1",
           "eval_steps=0", "save_steps=0", f"data.data_cache_dir={tmp_path / 'cache'}"]
    overrides = [f"base_model={tmp_path / 'base'}", f"corpus_tagged={tagged}", f"work_dir={tmp_path / 'work'}",
                 "max_examples=120", "new_tokens=40", "eval.heldout_lines=4", "eval.test_examples=2",
                 "eval.max_new_tokens=4", "compare=[]", "curve_lines=0", *[f"pretrain.{o}" for o in job],
                 *[f"sft.{o}" for o in job], "sft.data.max_seq_length=512", "sft.optim.learning_rate=1e-12"]
    run_recipe(load_recipe_config(None, overrides))
    pretrained = load_file(tmp_path / "work" / "merged-pretrain" / "model.safetensors")
    final = load_file(tmp_path / "work" / "merged-final" / "model.safetensors")
    base = load_file(tmp_path / "work" / "base-zh" / "model.safetensors")
    assert set(final) == set(pretrained)
    name = "model.layers.0.self_attn.q_proj.weight"
    assert abs(pretrained[name] - base[name]).max() > 1e-4  # pre-training moved the LoRA'd weights
    for k in final:
        np.testing.assert_allclose(final[k], pretrained[k], rtol=0, atol=1e-6, err_msg=k)


def test_an_unknown_new_token_form_is_refused_and_the_demo_adds_words():
    from zhjax.recipe import load_recipe_config

    with pytest.raises(ValueError, match=r"new_token_form 'chars'; expected one of \('merges', 'words'\)"):
        load_recipe_config(None, ["new_token_form=chars"])
    assert load_recipe_config(str(REPO / "configs" / "recipes" / "smollm2-zh-demo.yaml"), []).new_token_form == "words"
