"""The recipe's cloze accuracy: base vs adapted models on the People's Daily cloze set, logit-scored like C-Eval.

The set is built from the recipe's corpus (`zhjax.data.cloze`) with the same document split as the instruction
data, and each model answers its *test* questions (documents no training stage saw), `shots`-shot from the dev
file, with `zhjax eval`'s method: the option letter with the highest next-token log-probability after `答案：`.
"""

from __future__ import annotations

from pathlib import Path


def build_cloze_set(tagged: str | Path, out: Path, *, questions: int, shots: int, seed: int) -> None:
    """The cloze set of the recipe: `questions` test (and val) questions per subject."""
    from zhjax.data.cloze import build_cloze

    build_cloze(tagged, out, val=questions, test=questions, shots=shots, seed=seed)


def cloze_accuracy(models: dict[str, Path | str], cloze: Path, *, shots: int, batch_size: int = 8) -> dict:
    """{model name: {"average": accuracy, "questions": n, "interval": (low, high) at 95%, "categories": {category:
    accuracy}}} on the set's test split."""
    from zhjax.eval.choice import load_benchmark, summarize
    from zhjax.eval.run import evaluate_model
    from zhjax.infer.cli import load_model, load_tokenizer_for

    subjects = load_benchmark("ceval", cloze, "test", shots)
    out = {}
    for name, path in models.items():
        print(f"[cloze] {name}", flush=True)  # then the questions' progress bar
        model, tokenizer = load_model(path, dtype="float32"), load_tokenizer_for(path)
        scored = evaluate_model(model, tokenizer, subjects, batch_size=batch_size)
        summary = summarize("ceval", cloze, subjects, {k: [r["prediction"] for r in v] for k, v in scored.items()})
        accuracy, n = summary["average"]["accuracy"], summary["average"]["num"]
        out[name] = {"average": accuracy, "questions": n, "interval": accuracy_interval(accuracy, n),
                     "categories": {c: v["accuracy"] for c, v in summary["categories"].items()}}
    return out


def accuracy_interval(accuracy: float, questions: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of an accuracy over `questions` questions: at the demo's few questions per model, what
    the differences between models are worth (chance is 0.25 with four options)."""
    from scipy.stats import binomtest

    ci = binomtest(round(accuracy * questions), questions).proportion_ci(confidence_level=confidence, method="wilson")
    return float(ci.low), float(ci.high)
