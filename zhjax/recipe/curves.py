"""Learning curves of the recipe's pre-training runs: held-out bits per character against training seconds and
training characters, read from each run's `metrics.jsonl` and drawn with matplotlib.

A run scores a fixed held-out slice (`work_dir/data/text/curve.txt`) at step 0 and every `eval_steps`; its
`eval_loss` is the mean loss per predicted token of that slice packed as the training data is (every paragraph
`BOS text EOS`, each of its tokens and the EOS predicted), so

    bits per character = eval_loss * (tokens + EOS of the slice) / (characters of the slice) / ln 2,

with the tokens counted by the run's own tokenizer: runs with different tokenizers compare. Training seconds are
the logged windows' step times (compilation, in the first window, replaced by the run's median step time;
evaluation time is not in the windows), training characters the tokens trained on divided by the tokenizer's
tokens per character on the training text.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from zhjax.train.metrics import read_metrics

__all__ = ["draw_learning_curves", "learning_curve"]


def _tokens_per_char(tokenizer_dir: Path, lines: list[str], per_line: int = 0) -> float:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokens = sum(len(tok(x, add_special_tokens=False)["input_ids"]) + per_line for x in lines)
    return tokens / sum(len(x) for x in lines)


def _lines(path: Path, limit: int | None = None) -> list[str]:
    return [x for x in path.read_text(encoding="utf-8").splitlines() if x][:limit]


def learning_curve(out: Path, tokenizer: Path, data: Path, tokens_per_step: int) -> dict:
    """`{"steps", "seconds", "characters", "bits_per_char"}` of one run (lists, one entry per evaluation)."""
    records = read_metrics(out)
    evals = sorted({r["step"]: r["eval_loss"] for r in records if "eval_loss" in r}.items())
    windows = sorted({r["step"]: r["tokens_per_second"] for r in records if "tokens_per_second" in r}.items())
    if not evals or not windows:
        raise ValueError(f"{out}/metrics.jsonl: no eval_loss or tokens_per_second records to draw a curve from")
    step_seconds = [tokens_per_step / tps for _, tps in windows]
    typical = statistics.median(step_seconds[1:] or step_seconds)
    step_seconds[0] = typical  # the first window holds compilation
    elapsed, prev, clock = {0: 0.0}, 0, 0.0
    for (step, _), secs in zip(windows, step_seconds, strict=True):
        clock += (step - prev) * secs
        elapsed[step], prev = clock, step
    curve_tpc = _tokens_per_char(tokenizer, _lines(data / "text" / "curve.txt"), per_line=1)
    train_tpc = _tokens_per_char(tokenizer, _lines(data / "text" / "train.txt", 2000))
    steps = [s for s, _ in evals]
    return {
        "steps": steps,
        "seconds": [elapsed.get(s, s * typical) for s in steps],
        "characters": [s * tokens_per_step / train_tpc for s in steps],
        "bits_per_char": [loss * curve_tpc / math.log(2) for _, loss in evals],
    }


def draw_learning_curves(curves: dict[str, dict], path: Path) -> Path:
    """Two panels (against training seconds, against training characters), one line per run; a run with only
    `bits_per_char` (the base model) is drawn as a horizontal reference line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, x_key, label in ((axes[0], "seconds", "training seconds"),
                             (axes[1], "characters", "training characters")):
        for name, c in curves.items():
            if "steps" not in c:
                ax.axhline(c["bits_per_char"][0], color="grey", linestyle="--", linewidth=1, label=name)
                continue
            ax.plot(c[x_key], c["bits_per_char"], marker="o", markersize=3, label=name)
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("held-out bits per character")
    axes[0].legend(fontsize=8)
    fig.suptitle("Pre-training on People's Daily: held-out bits per character (lower is better)")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
