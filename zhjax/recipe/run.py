"""`zhjax recipe`: the whole Chinese-LLaMA method on one config, stage by stage, each stage cached.

    zhjax recipe --config configs/recipes/smollm2-zh-demo.yaml [key.sub=value ...]

Stages (the same library calls the tools make; outputs under `work_dir`):

1. `data`      instruction data and a document-level train/validation/test split of the corpus
               (`zhjax.data.instructions.build_instructions`, as `tools/build_instructions.py`)
2. `tokenizer` extend the base's byte-level BPE with Chinese tokens learned on the train split
               (`zhjax.tokenizer.bpe.extend_bpe_tokenizer`, as `tools/merge_tokenizers.py --kind bpe`)
3. `resize`    grow embed_tokens / lm_head to the new vocab (`resize_hf_checkpoint`, as `tools/resize_model.py`)
4. `pretrain`  LoRA + embed/head continued pre-training on the train split (`zhjax pretrain`)
5. `sft`       Alpaca-template instruction tuning, a new LoRA on the merged pre-trained model (`zhjax sft`)
6. `export`    base + PT adapter merged before SFT (`export-pretrain`), then + SFT adapter, into plain HF dirs
               (`tools/export_hf.py`): each adapter applied once, as the seed's Plus recipe stacks them
7. `evaluate`  with `transformers`: tokens per character, held-out bits per character, task scores before and
               after SFT, sample answers; printed as a table and written to `work_dir/results.json`; with
               `eval.cloze_questions`, also cloze accuracy of the base and adapted models (`zhjax.recipe.cloze`)

`compare` adds the seed's central comparison as extra pre-training runs, each exported and scored by held-out
bits per character beside the main run: `no_extension` (LoRA + embed/head on the base model with its own
tokenizer, over the same number of training characters, as many steps, or the same training seconds:
`no_extension_budget`) and `normal_init` (the same extension with the new rows drawn from a normal distribution instead of
`subword`). Their training tokens/s and characters/s are reported too. `no_extension_sft` (with `no_extension`)
also instruction-tunes the run without extension with the same SFT job and as many steps (its own tokenizer) and
scores it on the tasks beside the main model.

A stage whose output exists with the same settings is skipped, so a re-run resumes where the last one stopped
(the training stages also resume from their own checkpoints).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from zhjax._extras import require
from zhjax.tokenizer.transfer import TransferConfig
from zhjax.train.config import PretrainConfig, SFTConfig
from zhjax.train.metrics import read_metrics
from zhjax.train.validate import jsonable


@dataclass
class EvalConfig:
    heldout_lines: int = 200  # test paragraphs scored for bits per character, spread over the split (heldout_paragraphs)
    # each held-out paragraph is cut to this many characters before any tokenizer sees it, so that every model is
    # scored on the same text (a cut in tokens would keep 2.7x more of a paragraph for the extended tokenizer)
    heldout_max_chars: int = 512
    # the precision the held-out text is scored in: "float32", "bfloat16" (bf16 products under torch.autocast, the
    # loss in float32: half the time on a CPU with AVX-512 BF16, 0.002-0.005 bits per character off float32; 6.3x
    # the time on one without it) or "auto" (bf16 where the CPU or GPU multiplies it natively: zhjax.precision)
    dtype: str = "float32"
    test_examples: int = 60
    max_new_tokens: int = 64
    batch_size: int = 8
    show_answers: int = 3
    evaluate_base_tasks: bool = True
    # the tasks scored on the pre-trained model too (before SFT it has not seen the instructions: the demo skips it)
    evaluate_pretrain_tasks: bool = True
    # cloze accuracy (zhjax.recipe.cloze), base vs adapted: test questions per part of speech (0: off) and shots
    cloze_questions: int = 0
    cloze_shots: int = 5


@dataclass
class RecipeConfig:
    """The stages' settings; `pretrain` and `sft` are ordinary job configs (paths are filled in by the recipe)."""

    base_model: str = "assets/smollm2-135m"
    corpus_tagged: str = "assets/corpus/199801_tagged.txt"
    work_dir: str = "outputs/smollm2-zh-demo"
    max_examples: int = 3000
    new_tokens: int = 6000
    # how the new tokens enter the tokenizer (zhjax.tokenizer.bpe): "merges" (every learned merge's result, single
    # characters included) or "words" (only the results of two or more characters, as added tokens: a character
    # outside a word keeps the base's byte spelling)
    new_token_form: str = "merges"
    resize_init: str = "distill"
    transfer: TransferConfig = field(default_factory=TransferConfig)  # sizes of the distill init's fit
    compare: tuple[str, ...] = ()  # extra runs: "no_extension", "normal_init", "no_extension_sft"
    # the no_extension run trains on as many characters as the main run ("characters": more steps, since the base
    # tokenizer spends more tokens per character), for as many steps as the main run trained ("steps": the same
    # tokens, about the same compute) or for the same `pretrain.max_train_seconds` ("seconds": the same training
    # seconds, each run as many steps as fit at its own rate)
    no_extension_budget: str = "characters"
    # held-out bits per character during pre-training, every `eval_steps`, on this many validation paragraphs,
    # for the main run and the comparison runs, drawn into work_dir/learning_curves.png (0: off)
    curve_lines: int = 0
    seed: int = 0
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


COMPARISONS = ("no_extension", "normal_init", "no_extension_sft")


def load_recipe_config(path: str | None, overrides: list[str]) -> RecipeConfig:
    """YAML + dotted overrides, as for training jobs."""
    import draccus

    args = [a if a.startswith("--") else f"--{a}" for a in overrides]
    try:
        cfg = draccus.parse(RecipeConfig, config_path=path, args=args, exit_on_error=False)
    except (draccus.utils.DraccusException, draccus.utils.ParsingError, ValueError, TypeError) as e:
        cause = f" ({e.__cause__})" if e.__cause__ else ""
        raise ValueError(f"invalid recipe config {path or ''}: {e}{cause}") from e
    unknown = [c for c in cfg.compare if c not in COMPARISONS]
    if unknown:
        raise ValueError(f"invalid recipe config {path or ''}: compare {unknown} unknown; expected some of {COMPARISONS}")
    if cfg.no_extension_budget not in ("characters", "steps", "seconds"):
        raise ValueError(f"invalid recipe config {path or ''}: no_extension_budget {cfg.no_extension_budget!r}; "
                         "expected 'characters', 'steps' or 'seconds'")
    if cfg.no_extension_budget == "seconds" and not cfg.pretrain.max_train_seconds > 0:
        raise ValueError(f"invalid recipe config {path or ''}: no_extension_budget 'seconds' needs "
                         "pretrain.max_train_seconds > 0 (the training seconds both runs get)")
    from zhjax.tokenizer.bpe import FORMS

    if cfg.new_token_form not in FORMS:
        raise ValueError(f"invalid recipe config {path or ''}: new_token_form {cfg.new_token_form!r}; expected one of "
                         f"{FORMS}")
    from zhjax.convert.resize_model import ALL_INITS

    if cfg.resize_init not in ALL_INITS:
        raise ValueError(f"invalid recipe config {path or ''}: resize_init {cfg.resize_init!r}; expected one of "
                         f"{ALL_INITS}")
    if cfg.curve_lines and cfg.pretrain.eval_steps <= 0:
        raise ValueError(f"invalid recipe config {path or ''}: curve_lines {cfg.curve_lines} needs "
                         "pretrain.eval_steps > 0 (the curve is scored every eval_steps)")
    if cfg.eval.heldout_max_chars < 1:
        raise ValueError(f"invalid recipe config {path or ''}: eval.heldout_max_chars {cfg.eval.heldout_max_chars}; "
                         "expected at least 1 (characters kept of each held-out paragraph)")
    from zhjax.eval.hf import SCORING_DTYPES

    if cfg.eval.dtype not in SCORING_DTYPES:
        raise ValueError(f"invalid recipe config {path or ''}: eval.dtype {cfg.eval.dtype!r}; expected one of "
                         f"{SCORING_DTYPES} (the precision held-out text is scored in)")
    if cfg.eval.heldout_lines < 1:
        raise ValueError(f"invalid recipe config {path or ''}: eval.heldout_lines {cfg.eval.heldout_lines}; "
                         "expected at least 1 (held-out paragraphs scored)")
    if "no_extension_sft" in cfg.compare and "no_extension" not in cfg.compare:
        raise ValueError(f"invalid recipe config {path or ''}: compare no_extension_sft tunes the no_extension run; "
                         "add no_extension to compare")
    return cfg


class Stages:
    """Runs named stages once per settings fingerprint, recording each in `work_dir/stages.json`."""

    def __init__(self, work: Path):
        self.work = work
        self.file = work / "stages.json"
        self.done = json.loads(self.file.read_text()) if self.file.exists() else {}
        self.rerun = False

    def run(self, name: str, settings: dict, fn) -> None:
        key = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]
        if self.done.get(name) == key:
            print(f"[{name}] cached")
            return
        start = time.perf_counter()
        print(f"[{name}] running", flush=True)
        # a stage that completed before with other settings starts afresh (its old checkpoints are not resumed);
        # one that never completed resumes from its own checkpoints
        self.rerun = name in self.done
        fn()
        self.done[name] = key
        self.file.write_text(json.dumps(self.done, indent=2))
        print(f"[{name}] done in {time.perf_counter() - start:.0f} s", flush=True)


def run_recipe(cfg: RecipeConfig) -> dict:
    """Run every stage (cached ones are skipped) and return the results table as a dict."""
    require("torch", extra="torch", why="the recipe's evaluate stage (the exported models scored by transformers on PyTorch)")
    from zhjax.train.trainer import train

    work = Path(cfg.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    stages = Stages(work)
    data, tok, base_zh = work / "data", work / "tokenizer", work / "base-zh"
    pt_out, sft_out = work / "pretrain", work / "sft"
    pt_merged, final = work / "merged-pretrain", work / "merged-final"
    t0 = time.perf_counter()

    def build_data():
        from zhjax.data.instructions import build_instructions

        print(build_instructions(cfg.corpus_tagged, data, max_examples=cfg.max_examples, seed=cfg.seed))

    stages.run("data", {"tagged": cfg.corpus_tagged, "n": cfg.max_examples, "seed": cfg.seed}, build_data)

    def build_tokenizer():
        from zhjax.tokenizer.bpe import extend_bpe_tokenizer

        print(extend_bpe_tokenizer(cfg.base_model, [data / "text" / "train.txt"], cfg.new_tokens, tok, overwrite=True,
                                   form=cfg.new_token_form))

    tok_key = {"base": cfg.base_model, "n": cfg.new_tokens, "data": stages.done.get("data")}
    if cfg.new_token_form != "merges":  # (keyed only when set, so work dirs of the merges form stay cached)
        tok_key["form"] = cfg.new_token_form
    stages.run("tokenizer", tok_key, build_tokenizer)

    def resize():
        from zhjax.convert.resize_model import resize_hf_checkpoint

        result = resize_hf_checkpoint(cfg.base_model, tok, base_zh, init=cfg.resize_init, seed=cfg.seed,
                                      sample_files=[data / "text" / "train.txt"],
                                      transfer=dataclasses.replace(cfg.transfer, seed=cfg.seed), overwrite=True)
        print(_describe_resize(result))

    transfer_key = jsonable(cfg.transfer) if cfg.resize_init == "distill" else None
    stages.run("resize", {"init": cfg.resize_init, "tok": stages.done.get("tokenizer"), "transfer": transfer_key},
               resize)

    validation = data / "text" / "validation.txt"
    if cfg.curve_lines:  # a fixed held-out slice scored every eval_steps: the learning curves
        validation = data / "text" / "curve.txt"
        heldout = [x for x in (data / "text" / "validation.txt").read_text(encoding="utf-8").splitlines() if x]
        validation.write_text("\n".join(heldout[: cfg.curve_lines]) + "\n", encoding="utf-8")
    pt = dataclasses.replace(
        cfg.pretrain, init_from=str(base_zh), tokenizer=str(tok), output_dir=str(pt_out),
        data=dataclasses.replace(cfg.pretrain.data, train_files=[str(data / "text" / "train.txt")],
                                 validation_files=[str(validation)]),
        max_eval_batches=None if cfg.curve_lines else cfg.pretrain.max_eval_batches,
    )
    stages.run("pretrain", {"job": jsonable(pt), "base": stages.done.get("resize")}, lambda: train(_fresh(pt, stages), "pretrain"))

    # the seed's Plus recipe: the instruction LoRA is a new adapter trained on the merged pre-trained model, so the
    # final model is base + PT adapter + SFT adapter, each applied once (continuing the PT adapter instead, as
    # `adapters_from` does, and then merging both would apply the PT LoRA twice)
    stages.run("export-pretrain", {"pt": stages.done.get("pretrain")},
               lambda: _merge(base_zh, [pt_out / "adapter"], pt_merged))
    sft = dataclasses.replace(
        cfg.sft, init_from=str(pt_merged), tokenizer=str(tok), adapters_from=None, output_dir=str(sft_out),
        data=dataclasses.replace(cfg.sft.data, train_files=[str(data / "train.json")],
                                 validation_files=[str(data / "validation.json")]),
    )
    stages.run("sft", {"job": jsonable(sft), "pt": stages.done.get("export-pretrain")},
               lambda: train(_fresh(sft, stages), "sft"))
    stages.run("export", {"pt": stages.done.get("export-pretrain"), "sft": stages.done.get("sft")},
               lambda: _merge(pt_merged, [sft_out / "adapter"], final))

    runs = {"with extension": (pt_out, work / "tokenizer")}
    extra = {"after pre-training": pt_merged}  # models scored by bits per character beside the main ones
    for variant in (v for v in cfg.compare if v in _VARIANT_NAMES):
        out, model_dir, tokenizer = _compare_run(cfg, variant, pt, stages, work, data)
        runs[_VARIANT_NAMES[variant]] = (out, tokenizer)
        extra[f"after pre-training, {_VARIANT_NAMES[variant]}"] = model_dir

    tuned = {}  # further models scored on the tasks too
    if "no_extension_sft" in cfg.compare:
        tuned["after SFT, without extension"] = _compare_sft(cfg, sft, stages, work)
    results = evaluate(cfg, data, work, extra_models={k: v for k, v in extra.items() if k != "after pre-training"},
                       tuned_models=tuned)
    results["training_speed"] = {name: _training_speed(out, tokenizer, data) for name, (out, tokenizer) in runs.items()}
    if cfg.eval.cloze_questions:
        from zhjax.recipe.cloze import build_cloze_set, cloze_accuracy

        e = cfg.eval
        stages.run("cloze", {"tagged": cfg.corpus_tagged, "n": e.cloze_questions, "shots": e.cloze_shots, "seed": cfg.seed},
                   lambda: build_cloze_set(cfg.corpus_tagged, work / "cloze", questions=e.cloze_questions,
                                           shots=e.cloze_shots, seed=cfg.seed))
        results["cloze_accuracy"] = cloze_accuracy({"base model": cfg.base_model, "after pre-training": pt_merged,
                                                    "after SFT": final}, work / "cloze", shots=e.cloze_shots)
    if cfg.curve_lines:
        from zhjax.recipe.curves import draw_learning_curves, learning_curve

        curves = {name: learning_curve(out, tokenizer, data, cfg.pretrain.per_device_train_batch_size
                                       * cfg.pretrain.data.block_size)
                  for name, (out, tokenizer) in runs.items()}
        if "without extension" in curves:  # its step-0 score is the base model's (LoRA starts at zero)
            curves["base model"] = {"bits_per_char": curves["without extension"]["bits_per_char"][:1]}
        results["learning_curves"] = curves
        print(f"learning curves: {draw_learning_curves(curves, work / 'learning_curves.png')}")
    results["wall_seconds"] = time.perf_counter() - t0
    (work / "results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False))
    print(format_results(results))
    return results


def _merge(base: Path, adapters: list[Path], out: Path) -> None:
    from zhjax.convert.merge import merge_adapters

    merge_adapters(base, adapters, out, dtype="float32", overwrite=True)


def _fresh(job, stages: Stages):
    """The training job of a stage, told to replace its earlier run when the stage's settings changed."""
    return dataclasses.replace(job, overwrite_output_dir=True) if stages.rerun else job


def _describe_resize(result) -> str:
    """One line on what the resize stage wrote (and, for `distill`, what the fit achieved on its sample)."""
    layout = "tied" if result.tied else "untied embed_tokens and lm_head"
    line = (f"{result.out_dir}: vocab {result.old_vocab_size} -> {result.new_vocab_size}, init {result.init}, "
            f"{layout}")
    t = result.transfer
    if t is not None:
        line += f"; fitted on {t.chunks} sample windows ({t.positions} positions) in {t.seconds:.0f} s: "
        if t.input_kl[0] == t.input_kl[0]:  # the input rows were distilled (not nan)
            line += f"KL to the base {t.input_kl[0]:.3f} -> {t.input_kl[1]:.3f} nats, "
        line += f"next-token loss {t.output_nll[0]:.3f} -> {t.output_nll[1]:.3f} nats"
    return line


_VARIANT_NAMES = {"no_extension": "without extension", "normal_init": "with extension, normal init"}


def _compare_run(cfg: RecipeConfig, variant: str, pt, stages: Stages, work: Path, data: Path) -> tuple[Path, Path, Path]:
    """One comparison pre-training run, trained and merged: `(output_dir, merged_dir, tokenizer_dir)`."""
    from zhjax.convert.merge import merge_adapters
    from zhjax.train.trainer import train

    out, merged = work / f"pretrain-{variant.replace('_', '-')}", work / f"merged-pretrain-{variant.replace('_', '-')}"
    if variant == "normal_init":
        base, tokenizer = work / "base-zh-normal", work / "tokenizer"

        def resize():
            from zhjax.convert.resize_model import resize_hf_checkpoint

            print(resize_hf_checkpoint(cfg.base_model, tokenizer, base, init="normal", seed=cfg.seed, overwrite=True))

        stages.run("resize-normal", {"tok": stages.done.get("tokenizer"), "seed": cfg.seed}, resize)
        job = dataclasses.replace(pt, init_from=str(base), output_dir=str(out))
    else:
        base = tokenizer = Path(cfg.base_model)
        job = _no_extension_job(cfg, dataclasses.replace(pt, output_dir=str(out)), work, data)
    upstream = stages.done.get("resize-normal") if variant == "normal_init" else stages.done.get("data")
    stages.run(f"pretrain-{variant}", {"job": jsonable(job), "upstream": upstream},
               lambda: train(_fresh(job, stages), "pretrain"))
    stages.run(f"export-{variant}", {"pt": stages.done.get(f"pretrain-{variant}")},
               lambda: merge_adapters(base, [out / "adapter"], merged, dtype="float32", overwrite=True))
    return out, merged, tokenizer


def _no_extension_job(cfg: RecipeConfig, pt, work: Path, data: Path):
    """The main pre-training job `pt` on the base model with its own tokenizer, as long as `no_extension_budget`
    says: as many training characters, as many steps as the main run trained, or the same time budget."""
    base = str(cfg.base_model)
    job = dataclasses.replace(pt, init_from=base, tokenizer=base)
    if pt.max_train_seconds > 0 and cfg.no_extension_budget != "seconds":
        # the steps the main run's time budget bought, not a budget of its own
        job = dataclasses.replace(job, max_steps=_trained_steps(work / "pretrain"), max_train_seconds=0.0)
    if job.max_steps > 0 and cfg.no_extension_budget == "characters":
        # the same training characters as the main run: the base tokenizer needs more tokens
        ratio = _tokens_per_char(Path(base), data) / _tokens_per_char(work / "tokenizer", data)
        main_steps = job.max_steps
        job = dataclasses.replace(job, max_steps=max(1, round(main_steps * ratio)))
        print(f"[pretrain-no_extension] {job.max_steps} steps for the main run's {main_steps}: the base tokenizer "
              f"spends {ratio:.2f}x the tokens per character")
    return job


def _compare_sft(cfg: RecipeConfig, sft, stages: Stages, work: Path) -> Path:
    """The main run's SFT job on the merged pre-training run without extension (its own tokenizer) for as many steps
    as the main SFT took (the same compute; its own tokenizer packs fewer examples per step), merged."""
    from zhjax.train.trainer import train

    pt_merged = work / "merged-pretrain-no-extension"
    out, merged = work / "sft-no-extension", work / "merged-final-no-extension"
    job = _no_extension_sft_job(cfg, sft, work)
    stages.run("sft-no_extension", {"job": jsonable(job), "pt": stages.done.get("export-no_extension")},
               lambda: train(_fresh(job, stages), "sft"))
    stages.run("export-sft-no_extension", {"sft": stages.done.get("sft-no_extension")},
               lambda: _merge(pt_merged, [out / "adapter"], merged))
    return merged


def _no_extension_sft_job(cfg: RecipeConfig, sft, work: Path):
    """The main SFT job `sft` on the merged run without extension, for the steps the main SFT trained (a main SFT on
    the clock gives its steps, not its seconds)."""
    return dataclasses.replace(sft, init_from=str(work / "merged-pretrain-no-extension"),
                               tokenizer=str(cfg.base_model), adapters_from=None,
                               output_dir=str(work / "sft-no-extension"), max_steps=_trained_steps(work / "sft"),
                               max_train_seconds=0.0)


def _tokens_per_char(tokenizer_dir: Path, data: Path, lines: int = 2000) -> float:
    """Tokens per character of the first `lines` lines of the training text."""
    from transformers import AutoTokenizer

    text = [x for x in (data / "text" / "train.txt").read_text(encoding="utf-8").splitlines() if x][:lines]
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    return sum(len(tok(x, add_special_tokens=False)["input_ids"]) for x in text) / sum(len(x) for x in text)


def _training_speed(out: Path, tokenizer: Path, data: Path) -> dict:
    """Median training tokens/s of a run (its first logged window, which includes compilation, left out) and the
    characters/s it means for that run's tokenizer."""
    import statistics

    records = read_metrics(out)
    rates = [r["tokens_per_second"] for r in records if "tokens_per_second" in r]
    tps = statistics.median(rates[1:] or rates) if rates else float("nan")
    return {"tokens_per_second": tps, "characters_per_second": tps / _tokens_per_char(tokenizer, data),
            "steps": _trained_steps(out)}


def _trained_steps(out: Path) -> int:
    """The last step a training run logged (it always logs its final step)."""
    records = read_metrics(out)
    return max((r["step"] for r in records if "loss" in r), default=0)


def heldout_paragraphs(path: Path, n: int, max_chars: int) -> list[str]:
    """`n` paragraphs of `path` spread evenly over it (every `len // n`-th), each cut to `max_chars` characters.

    Not the first `n`: the split's paragraphs come document by document, so its first 60 are a few documents, and
    on the demo's split they were measured unlike the rest (README: "The demo, measured").
    """
    paragraphs = [x for x in path.read_text(encoding="utf-8").splitlines() if x]
    return [x[:max_chars] for x in paragraphs[:: max(1, len(paragraphs) // n)][:n]]


def evaluate(cfg: RecipeConfig, data: Path, work: Path, extra_models: dict | None = None,
             tuned_models: dict | None = None) -> dict:
    """The results table's numbers, computed with `transformers` on the exported models: `extra_models` get bits
    per character only, `tuned_models` the task scores too."""
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer

    from zhjax.data.instructions import NAMES_INSTRUCTION, aggregate_scores, score_names, score_segmentation
    from zhjax.data.templates import join_instruction, render_prompt
    from zhjax.eval.hf import bits_per_character, generate_answers, load_hf

    e = cfg.eval
    lines = heldout_paragraphs(data / "text" / "test.txt", e.heldout_lines, e.heldout_max_chars)
    chars = sum(len(x) for x in lines)
    tokens_per_char = {}
    for name, d in (("base", cfg.base_model), ("extended", work / "tokenizer")):
        t = AutoTokenizer.from_pretrained(d)
        tokens_per_char[name] = sum(len(t(x, add_special_tokens=False)["input_ids"]) for x in lines) / chars

    examples = json.loads((data / "test.json").read_text(encoding="utf-8"))[: e.test_examples]
    prompts = [render_prompt("alpaca", join_instruction(x["instruction"], x["input"])) for x in examples]
    # the pre-training comparisons (`extra_models`) get bits per character only
    models = {"base model": cfg.base_model, "after pre-training": work / "merged-pretrain", **(extra_models or {}),
              "after SFT": work / "merged-final", **(tuned_models or {})}
    bpc, tasks, answers = {}, {}, {}
    bar = tqdm(models.items(), desc="[evaluate] models", unit="model")
    for name, path in bar:
        bar.set_postfix_str(name)
        model, tok = load_hf(str(path))
        bpc[name] = bits_per_character(model, tok, lines, max_tokens=None,  # the same characters for every model
                                       dtype=e.dtype).bits_per_char
        if name in (extra_models or {}) or (name == "base model" and not e.evaluate_base_tasks) or (
                name == "after pre-training" and not e.evaluate_pretrain_tasks):
            continue
        preds = generate_answers(model, tok, prompts, max_new_tokens=e.max_new_tokens, batch_size=e.batch_size)
        answers[name] = preds
        names = [score_names(p, x["output"]) for p, x in zip(preds, examples, strict=True) if x["instruction"] == NAMES_INSTRUCTION]
        segs = [score_segmentation(p, x["output"]) for p, x in zip(preds, examples, strict=True) if x["instruction"] != NAMES_INSTRUCTION]
        tasks[name] = {"names": aggregate_scores(names) if names else {}, "segmentation": aggregate_scores(segs) if segs else {}}
    samples = [
        {"instruction": x["instruction"], "input": x["input"], "gold": x["output"], "answer": answers["after SFT"][i]}
        for i, x in enumerate(examples[: e.show_answers])
    ]
    return {"tokens_per_char": tokens_per_char, "bits_per_char": bpc, "tasks": tasks, "samples": samples,
            "heldout_characters": chars, "test_examples": len(examples)}


def format_results(r: dict) -> str:
    """The results as a Markdown table plus sample answers."""
    out = ["", "| measure | value |", "|---|---|"]
    t = r["tokens_per_char"]
    out.append(f"| tokens per Chinese character, base -> extended tokenizer | {t['base']:.3f} -> {t['extended']:.3f} |")
    for name, v in r["bits_per_char"].items():
        out.append(f"| held-out bits per character, {name} | {v:.3f} |")
    for name, s in r["tasks"].items():
        n, g = s.get("names", {}), s.get("segmentation", {})
        if n:
            out.append(f"| names exact match / F1, {name} | {n.get('exact_match', 0):.3f} / {n.get('f1', 0):.3f} |")
        if g:
            out.append(f"| segmentation boundary F1 / word F1, {name} | {g.get('f1', 0):.3f} / {g.get('word_f1', 0):.3f} |")
    for name, v in r.get("training_speed", {}).items():
        out.append(f"| pre-training speed, {name} | {v['tokens_per_second']:.0f} tokens/s = "
                   f"{v['characters_per_second']:.0f} characters/s ({v['steps']} steps) |")
    for name, v in r.get("cloze_accuracy", {}).items():
        low, high = v["interval"]
        out.append(f"| cloze accuracy (test split, {v['questions']} questions, chance 0.25), {name} | {v['average']:.3f} "
                   f"(95% interval {low:.2f}-{high:.2f}) |")
    out.append(f"\nheld-out text: {r['heldout_characters']} characters; test examples: {r['test_examples']}")
    for s in r["samples"]:
        out += ["", f"Q: {s['instruction']}\n   {s['input']}", f"gold:   {s['gold']}", f"answer: {s['answer']}"]
    return "\n".join(out)
