"""Can the model copy? Bits per character on the second copy of a held-out paragraph, for each model of a recipe.

    .venv/bin/python bench/copy_probe.py outputs/smollm2-zh-medium [--lines 30] [--chars 200]

Both of the demo's tasks are copying: name extraction answers with spans of the sentence, segmentation with the
sentence itself, spaced. A language model copies a span it has seen in its context through induction (find the
earlier occurrence of the current token, predict the token that followed it), which a base model does almost
perfectly. This probe scores each of the first `--lines` test paragraphs (cut to `--chars` characters) written
twice, `P + "\\n" + P`, every token from BOS, and reports bits per character on the first copy (plain held-out
text) and on the second (copying), and the share of the second copy's tokens that are the model's top-1
prediction, split by whether the token to copy is one of the extension's new tokens or an old one.

Models, each read from `work_dir` where present: `base-zh` (the grown model right after the resize, untrained),
`merged-pretrain`, `merged-pretrain-no-extension`, `merged-final` (after SFT), and the base model (`--base`).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from zhjax.eval.hf import load_hf

MODELS = {
    "base model": None,
    "right after the resize (base-zh)": "base-zh",
    "after pre-training": "merged-pretrain",
    "after pre-training, without extension": "merged-pretrain-no-extension",
    "after SFT": "merged-final",
}


def copy_scores(model, tokenizer, lines: list[str], old_vocab: int) -> dict[str, float]:
    """Bits per character of the first and second copies, and top-1 accuracy on the second copy's new/old tokens."""
    import torch

    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
    first = second = 0.0
    hits = {"new": [0, 0], "old": [0, 0]}  # [right, all]
    for line in lines:
        ids = tokenizer(line, add_special_tokens=False)["input_ids"]
        seq = [start, *ids, *newline, *ids]
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([seq])).logits[0, :-1].float(), -1)
        target = torch.tensor(seq[1:])
        nll = -logp[torch.arange(len(target)), target].numpy()
        top = logp.argmax(-1).numpy()
        copy_from = len(ids) + len(newline)  # index into `target` of the second copy's first token
        first += nll[: len(ids)].sum()
        second += nll[copy_from:].sum()
        for k in range(copy_from, len(target)):
            kind = "new" if seq[k + 1] >= old_vocab else "old"
            hits[kind][0] += int(top[k] == seq[k + 1])
            hits[kind][1] += 1
    chars = sum(len(line) for line in lines)
    share = lambda kind: hits[kind][0] / hits[kind][1] if hits[kind][1] else float("nan")
    return {"first": first / chars / math.log(2), "second": second / chars / math.log(2),
            "top1 new": share("new"), "top1 old": share("old"), "new tokens": hits["new"][1],
            "old tokens": hits["old"][1]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("work_dir", type=Path)
    ap.add_argument("--base", default="assets/smollm2-135m", help="the recipe's base_model")
    ap.add_argument("--lines", type=int, default=30)
    ap.add_argument("--chars", type=int, default=200)
    args = ap.parse_args()
    test = args.work_dir / "data" / "text" / "test.txt"
    lines = [x[: args.chars] for x in test.read_text(encoding="utf-8").splitlines() if x][: args.lines]
    _, base_tok = load_hf(args.base)
    old_vocab = len(base_tok)
    print(f"{args.work_dir}: {len(lines)} test paragraphs of at most {args.chars} characters "
          f"({sum(map(len, lines))} characters), each written twice")
    print("| model | first copy, bits/char | second copy, bits/char | second copy top-1: new tokens | old tokens |")
    print("|---|---|---|---|---|")
    for name, sub in MODELS.items():
        path = Path(args.base) if sub is None else args.work_dir / sub
        if not (path / "config.json").exists():
            continue
        model, tokenizer = load_hf(str(path))
        s = copy_scores(model, tokenizer, lines, old_vocab)
        new = "-" if not s["new tokens"] else f"{s['top1 new']:.2f} ({s['new tokens']})"
        print(f"| {name} | {s['first']:.3f} | {s['second']:.3f} | {new} | {s['top1 old']:.2f} ({s['old tokens']}) |",
              flush=True)


if __name__ == "__main__":
    main()
