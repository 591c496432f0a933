"""C-Eval/CMMLU-style evaluation: the cloze set, the seed's prompt, bad files, and parity with lm-evaluation-harness.

The parity tests run the harness's own `hf` model (transformers on PyTorch) in the test on the cloze set's harness
task and compare, option by option, the log-likelihoods that `zhjax eval` and the `zhjax` harness model compute
with zhjax's forward pass; the accuracies then agree as well.
"""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from tests.extras import needs_lm_eval, needs_torch
from zhjax.data.cloze import BLANK, build_cloze
from zhjax.data.instructions import read_documents, split_of
from zhjax.eval.choice import (
    BenchmarkDataError,
    Question,
    build_prompt,
    extract_answer,
    load_benchmark,
    read_subject_file,
)

CORPUS_LINES = 3000  # the corpus's first paragraphs: enough documents in every split, built in a second


@pytest.fixture(scope="module")
def corpus(assets, tmp_path_factory) -> Path:
    lines = assets.corpus_tagged.read_text(encoding="utf-8").splitlines(keepends=True)[:CORPUS_LINES]
    path = tmp_path_factory.mktemp("corpus") / "tagged.txt"
    path.write_text("".join(lines), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def cloze(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cloze")
    build_cloze(corpus, out, val=6, test=6, shots=5, seed=0, subjects=["noun", "verb", "idiom"])
    return out


def _rows(path: Path) -> list[dict]:
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


# ------------------------------------------------------------------------------------------------- cloze set


def test_cloze_questions_blank_one_word_of_their_sentence_and_follow_the_document_split(cloze, corpus):
    manifest = json.loads((cloze / "manifest.json").read_text(encoding="utf-8"))
    documents, _ = read_documents(corpus)
    train = {s.text for d in documents if split_of(d.id) == "train" for s in d.sentences()}
    expected_split = {"dev": "validation", "val": "validation", "test": "test"}
    letters = set()
    for subject, by_split in manifest["questions"].items():
        for split, sources in by_split.items():
            rows = _rows(cloze / split / f"{subject}_{split}.csv")
            assert len(rows) == len(sources) == manifest["counts"][subject][split] > 0
            for row, source in zip(rows, sources, strict=True):
                options = [row[c] for c in "ABCD"]
                assert row["question"].count(BLANK) == 1
                assert row["question"].replace(BLANK, row[row["answer"]]) == source["sentence"]
                assert len(set(options)) == 4 and len({len(o) for o in options}) == 1
                assert split_of(source["doc"]) == expected_split[split]
                assert source["sentence"] not in train
                letters.add(row["answer"])
    assert letters == set("ABCD")
    mapping = json.loads((cloze / "subject_mapping.json").read_text(encoding="utf-8"))
    assert mapping["idiom"] == {"name": "成语", "categories": ["成语"]}


def test_cloze_build_is_deterministic_for_a_seed_and_the_seed_changes_it(corpus, tmp_path):
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        build_cloze(corpus, tmp_path / name, val=4, test=4, shots=2, seed=seed, subjects=["noun", "adverb"])
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.csv"))
    assert len(files) == 6
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)
    assert any((tmp_path / "a" / f).read_bytes() != (tmp_path / "c" / f).read_bytes() for f in files)


# ------------------------------------------------------------------------------------------------- prompt


def _write(path: Path, header: str, rows: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
    return path


def test_five_shot_prompt_is_the_seeds_layout(tmp_path):
    header = "id,question,A,B,C,D,answer,explanation"
    dev = [f"{i},第{i}题____是什么？,甲{i},乙{i},丙{i},丁{i},{'ABCDAB'[i]},因为" for i in range(6)]
    _write(tmp_path / "dev" / "computer_network_dev.csv", header, dev)
    _write(tmp_path / "val" / "computer_network_val.csv", "id,question,A,B,C,D,answer", ["0,问题？,一,二,三,四,C"])
    (subject,) = load_benchmark("ceval", tmp_path, "val", 5)
    expected = (
        "以下是中国关于计算机网络考试的单项选择题，请选出其中的正确答案。\n\n"
        "第0题____是什么？\nA. 甲0\nB. 乙0\nC. 丙0\nD. 丁0\n答案：A\n\n"
        "第1题____是什么？\nA. 甲1\nB. 乙1\nC. 丙1\nD. 丁1\n答案：B\n\n"
        "第2题____是什么？\nA. 甲2\nB. 乙2\nC. 丙2\nD. 丁2\n答案：C\n\n"
        "第3题____是什么？\nA. 甲3\nB. 乙3\nC. 丙3\nD. 丁3\n答案：D\n\n"
        "第4题____是什么？\nA. 甲4\nB. 乙4\nC. 丙4\nD. 丁4\n答案：A\n\n"
        "问题？\nA. 一\nB. 二\nC. 三\nD. 四\n答案："
    )
    assert build_prompt(subject, subject.questions[0]) == expected
    (zero,) = load_benchmark("ceval", tmp_path, "val", 0)
    assert build_prompt(zero, zero.questions[0]) == (
        "以下是中国关于计算机网络考试的单项选择题，请选出其中的正确答案。\n\n问题？\nA. 一\nB. 二\nC. 三\nD. 四\n答案：")


def test_cmmlu_layout_reads_its_index_column_and_capitalised_names(tmp_path):
    _write(tmp_path / "test" / "agronomy.csv", ",Question,A,B,C,D,Answer", ["0,问？,a,b,c,d,D", "1,又问？,a,b,c,d,A"])
    (subject,) = load_benchmark("cmmlu", tmp_path, "test", 0)
    assert subject.name == "农学" and subject.categories == ["Other"]
    assert [(q.id, q.answer) for q in subject.questions] == [("0", "D"), ("1", "A")]


def test_generated_answers_are_read_as_the_seed_reads_them():
    q = Question("0", "?", ("北京", "上海", "广州", "深圳"), "A", "f: row 1")
    assert extract_answer("所以答案是C。", q) == "C"
    assert extract_answer("我认为答案：B，因为", q) == "B"
    assert extract_answer(" D", q) == "D"
    assert extract_answer("应该是上海吧", q) == "B"
    assert extract_answer("不知道", q) is None


# ------------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("header", "rows", "message"),
    [
        ("id,question,A,B,C,answer", ["0,问？,a,b,c,A"], r"missing column 'D'"),
        ("id,question,A,B,C,D,answer", ["0,问？,a,b,c,d,A", "1,问？,a,b,c,d,E"], r"row 2 \(line 3\): answer 'E' is not one of A, B, C, D"),
        ("id,question,A,B,C,D,answer", [], r"empty subject file \(a header and no questions\)"),
        ("", [], r"empty subject file"),
        ("id,question,A,B,C,D,answer", ["0, ,a,b,c,d,A"], r"row 1 \(line 2\): empty question"),
    ],
    ids=["missing-column", "answer-outside-A-D", "header-only", "zero-bytes", "empty-question"],
)
def test_bad_subject_files_are_refused_naming_the_file_and_row(tmp_path, header, rows, message):
    path = tmp_path / "val" / "law_val.csv"
    path.parent.mkdir()
    path.write_text("\n".join([header, *rows]) if header else "", encoding="utf-8")
    with pytest.raises(BenchmarkDataError, match=re.escape(str(path)) + ".*" + message):
        read_subject_file(path, task="ceval", need_answers=True)


def test_cli_refuses_bad_data_in_one_line_before_loading_any_model(tmp_path, capsys):
    from zhjax.cli import main

    _write(tmp_path / "val" / "law_val.csv", "id,question,A,B,C,D,answer", ["0,问？,a,b,c,d,X"])
    assert main(["eval", "--model", str(tmp_path / "no-model"), "--task", "ceval", "--data", str(tmp_path),
                 "--shots", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "law_val.csv: row 1 (line 2): answer 'X'" in err
    _write(tmp_path / "val" / "law_val.csv", "id,question,A,B,C,D,answer", ["0,问？,a,b,c,d,A"])
    assert main(["eval", "--model", "m", "--task", "ceval", "--data", str(tmp_path), "--shots", "5"]) == 2
    assert "dev/law_dev.csv: missing" in capsys.readouterr().err
    assert main(["eval", "--model", "m", "--task", "cmmlu", "--data", str(tmp_path), "--split", "val"]) == 2
    assert "cmmlu has no 'val' split" in capsys.readouterr().err


def test_cli_writes_results_and_a_submission_for_a_split_without_answers(assets, tmp_path, capsys):
    from zhjax.cli import main

    _write(tmp_path / "test" / "law_test.csv", "id,question,A,B,C,D", ["7,中国的首都是____。,上海,北京,广州,深圳",
                                                                       "9,一加一等于____。,三,四,二,五"])
    out = tmp_path / "out" / "results.json"
    assert main(["eval", "--model", str(assets.smollm2_dir), "--task", "ceval", "--data", str(tmp_path), "--shots",
                 "0", "--split", "test", "--output", str(out), "--no-progress"]) == 0
    record = json.loads(out.read_text(encoding="utf-8"))
    predictions = record["predictions"]["law"]
    assert [p["id"] for p in predictions] == ["7", "9"] and all(len(p["logprobs"]) == 4 for p in predictions)
    assert json.loads((out.parent / "submission.json").read_text()) == {"law": {p["id"]: p["prediction"]
                                                                                for p in predictions}}
    assert "average" not in record and "predictions only" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------- parity


def _harness_option_logliks(result: dict, task: str) -> list[list[float]]:
    samples = sorted(result["samples"][task], key=lambda s: s["doc_id"])
    return [[float(r[0]) for r in s["filtered_resps"]] for s in samples]


@needs_torch
@needs_lm_eval
def test_option_loglikelihoods_and_accuracy_equal_the_harness_hf_models(assets, cloze):
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    import zhjax.eval.harness  # noqa: F401  (registers the `zhjax` model)
    from zhjax.eval.run import evaluate_model
    from zhjax.infer.cli import load_model, load_tokenizer_for

    task, shots, limit = "zhjax_cloze_noun", 2, 4
    tasks = TaskManager(include_path=str(cloze / "lm_eval"), include_defaults=False)
    run = dict(tasks=[task], num_fewshot=shots, limit=limit, task_manager=tasks, log_samples=True)
    hf = lm_eval.simple_evaluate(model=HFLM(pretrained=str(assets.smollm2_dir), dtype="float32", device="cpu",
                                            batch_size=4), **run)
    ours = lm_eval.simple_evaluate(model="zhjax", model_args=f"pretrained={assets.smollm2_dir},batch_size=4", **run)
    reference = _harness_option_logliks(hf, task)
    assert len(reference) == limit
    np.testing.assert_allclose(_harness_option_logliks(ours, task), reference, rtol=0, atol=1e-4)

    subjects = [s for s in load_benchmark("ceval", cloze, "val", shots, limit=limit) if s.key == "noun"]
    model = load_model(assets.smollm2_dir, dtype="float32")
    scored = evaluate_model(model, load_tokenizer_for(assets.smollm2_dir), subjects, batch_size=4, progress=False)["noun"]
    np.testing.assert_allclose([[r["logprobs"][c] for c in "ABCD"] for r in scored], reference, rtol=0, atol=1e-4)
    accuracy = sum(r["prediction"] == q.answer for r, q in zip(scored, subjects[0].questions, strict=True)) / limit
    assert accuracy == hf["results"][task]["acc,none"] == ours["results"][task]["acc,none"]


@needs_torch
@needs_lm_eval
def test_rolling_loglikelihood_and_greedy_generation_equal_the_harness_hf_models(assets):
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from zhjax.eval.harness import ZhjaxLM

    hf = HFLM(pretrained=str(assets.smollm2_dir), dtype="float32", device="cpu", batch_size=2, max_length=24)
    ours = ZhjaxLM(pretrained=str(assets.smollm2_dir), batch_size=2, max_length=24)
    texts = ["人民日报一九九八年元旦社论：迈向充满希望的新世纪。", "The quick brown fox jumps over the lazy dog, twice."]
    rolling = [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)]
    assert ours.loglikelihood_rolling(rolling, disable_tqdm=True) == pytest.approx(
        hf.loglikelihood_rolling(rolling, disable_tqdm=True), abs=1e-3)  # sums over ~40 tokens: 1e-4 per token

    until = {"until": ["。", "\n"], "max_gen_toks": 12, "do_sample": False}
    prompts = ["中国的首都是", "问：一加一等于几？\n答："]
    requests = [Instance("generate_until", {}, (p, dict(until)), i) for i, p in enumerate(prompts)]
    assert ours.generate_until(requests, disable_tqdm=True) == hf.generate_until(requests, disable_tqdm=True)


def test_recipe_cloze_accuracy_scores_each_model_on_the_test_split(assets, corpus, tmp_path):
    from zhjax.recipe import format_results
    from zhjax.recipe.cloze import build_cloze_set, cloze_accuracy

    build_cloze_set(corpus, tmp_path / "cloze", questions=2, shots=0, seed=0)
    manifest = json.loads((tmp_path / "cloze" / "manifest.json").read_text(encoding="utf-8"))
    for subject in manifest["subjects"][1:]:  # one subject is enough to score
        for split in ("dev", "val", "test"):
            (tmp_path / "cloze" / split / f"{subject}_{split}.csv").unlink(missing_ok=True)
    result = cloze_accuracy({"base model": assets.smollm2_dir}, tmp_path / "cloze", shots=0)
    assert result["base model"]["questions"] == 2 and 0.0 <= result["base model"]["average"] <= 1.0
    table = format_results({"tokens_per_char": {"base": 1.0, "extended": 1.0}, "bits_per_char": {}, "tasks": {},
                            "cloze_accuracy": result, "heldout_characters": 0, "test_examples": 0, "samples": []})
    assert (f"| cloze accuracy (test split, 2 questions, chance 0.25), base model | {result['base model']['average']:.3f} "
            f"(95% interval ") in table


def test_cloze_accuracy_interval_is_the_wilson_interval():
    from zhjax.recipe.cloze import accuracy_interval

    # 8 of 40 right: (p + z^2/2n +- z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n), z = 1.96, worked by hand: 0.1050-0.3476
    low, high = accuracy_interval(0.2, 40)
    assert abs(low - 0.1050) < 5e-4 and abs(high - 0.3476) < 5e-4
    low, high = accuracy_interval(1.0, 10)
    assert high == 1.0 and abs(low - 10 / (10 + 1.96**2)) < 5e-4  # all right: n / (n + z^2)


MESH_SCORE = textwrap.dedent(
    """
    import json
    import jax
    import numpy as np
    from flax import nnx
    from zhjax.config import ModelConfig
    from zhjax.eval.scoring import Scorer
    from zhjax.model.llama import LlamaForCausalLM
    from zhjax.parallel.mesh import MeshConfig, make_mesh

    config = ModelConfig(vocab_size=96, hidden_size=48, intermediate_size=80, num_hidden_layers=3,
                         num_attention_heads=4, max_position_embeddings=64, initializer_range=0.2)
    model = LlamaForCausalLM(config, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    rows = [rng.integers(0, 96, n).tolist() for n in (5, 17, 9, 30, 3)]
    positions = [list(range(len(r) - 2, len(r))) for r in rows]
    targets = [rng.integers(0, 96, (2, 3)) for _ in rows]
    one = Scorer(model, batch_size=2, mesh=make_mesh(MeshConfig(fsdp=1), devices=jax.devices()[:1]))
    four = Scorer(model, batch_size=2, mesh=make_mesh(MeshConfig(data=2, fsdp=2)))
    a, b = one.score(rows, positions, targets), four.score(rows, positions, targets)
    embed = four.state["embed_tokens"]["embedding"][...]
    print("RESULT" + json.dumps({
        "diff": max(float(np.abs(x.logprobs - y.logprobs).max()) for x, y in zip(a, b)),
        "greedy_equal": all((x.greedy == y.greedy).all() for x, y in zip(a, b)),
        "shapes": [list(x.logprobs.shape) for x in b], "batch": four.batch_size,
        "embed_shard": list(embed.addressable_shards[0].data.shape), "embed": list(embed.shape)}))
    """
)


def test_scores_on_a_four_device_mesh_equal_one_devices(tmp_path):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, "-c", MESH_SCORE], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(next(x for x in proc.stdout.splitlines() if x.startswith("RESULT"))[len("RESULT"):])
    assert res["diff"] < 1e-5 and res["greedy_equal"]
    assert res["shapes"] == [[2, 3]] * 5 and res["batch"] == 4  # rounded up to whole rows per data x fsdp shard
    assert res["embed_shard"] == [res["embed"][0], res["embed"][1] // 2]  # FSDP-sharded as the rules say


def test_rows_sharing_a_prefix_score_as_the_full_rows_do():
    import jax
    from flax import nnx

    from zhjax.config import ModelConfig
    from zhjax.eval.scoring import Scorer, shared_groups
    from zhjax.model.llama import LlamaForCausalLM
    from zhjax.parallel.mesh import MeshConfig, make_mesh

    config = ModelConfig(vocab_size=96, hidden_size=48, intermediate_size=80, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         initializer_range=0.2)
    model = LlamaForCausalLM(config, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    shots, other = rng.integers(0, 96, 40).tolist(), rng.integers(0, 96, 37).tolist()
    rows = [shots + rng.integers(0, 96, n).tolist() for n in (3, 11, 1, 25, 7)]  # five questions, one prefix
    rows += [other + rng.integers(0, 96, n).tolist() for n in (4, 9)]  # another subject
    rows += [rng.integers(0, 96, 20).tolist(), shots[:30]]  # a row alone; one that is all prefix
    positions = [[len(r) - 1] for r in rows]
    positions[3] = [len(rows[3]) - 5, len(rows[3]) - 1]  # two read positions
    positions[5] = [20, len(rows[5]) - 1]  # reads inside the shared part: its group's prefix ends before 20
    targets = [rng.integers(0, 96, (len(p), 4)) for p in positions]

    groups = sorted((n, sorted(m)) for n, m in shared_groups(rows, positions, min_shared=16))
    assert groups == [(20, [5, 6]), (29, [0, 1, 2, 3, 4, 8])]  # the all-prefix row keeps one token of its own

    one = make_mesh(MeshConfig(fsdp=1), devices=jax.devices()[:1])
    plain_scorer, shared_scorer = (Scorer(model, batch_size=4, mesh=one, share_prefix=False),
                                   Scorer(model, batch_size=4, mesh=one, min_shared=16))
    assert shared_scorer.shares_prefix and not plain_scorer.shares_prefix
    plain, shared = (s.score(rows, positions, targets) for s in (plain_scorer, shared_scorer))
    for a, b in zip(plain, shared, strict=True):
        assert a.logprobs.shape == b.logprobs.shape
        np.testing.assert_allclose(b.logprobs, a.logprobs, rtol=0, atol=2e-5)
        assert (a.greedy == b.greedy).all()
