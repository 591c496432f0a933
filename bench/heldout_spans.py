"""Where the extended model's held-out bits per character go, against the run without extension, span by span.

    .venv/bin/python bench/heldout_spans.py outputs/smollm2-zh-medium [--lines 60] [--count-lines 3000]
        [--group use|length] [--without OTHER_WORK_DIR/merged-pretrain-no-extension]

Reads a finished recipe's `work_dir` (with `compare: [no_extension]`): `merged-pretrain` (the extended model and
tokenizer), `merged-pretrain-no-extension`, and the base model (`--base`, the recipe's `base_model`). Each of
`--lines` test paragraphs spread over the split and cut at 512 characters (the recipe's held-out text,
`zhjax.recipe.run.heldout_paragraphs`; before the fourteenth session the first `--lines`, uncut) is scored by all
three, every token from BOS, one paragraph at a time, and each token's loss is charged to the character its text
ends in (a byte-level token that ends inside a character is charged to that character too). A character belongs to
the span of the extended tokenizer's token that covers it: a new token (grouped by how often the first
`--count-lines` training paragraphs use it) or an old one (a character no new token covers: punctuation, digits,
rare characters). With `--group length` a character's group is instead the length of that token in characters (a
token that is part of a character, U+FFFD when decoded alone, is its own group). `--without` takes the run without
extension from another work dir of the same split (for a WORK_DIR that ran with `compare: []`). The table gives,
per group, its share of the characters, the three models' bits per character on those characters, and the group's part of the overall gap between the extended run and the run without extension.
"""

from __future__ import annotations

import argparse
import collections
import math
from pathlib import Path

import numpy as np

from zhjax.eval.hf import load_hf
from zhjax.recipe.run import heldout_paragraphs


def charged_losses(model, tokenizer, line: str, max_tokens: int = 4096) -> tuple[list[int], list[tuple], np.ndarray]:
    """`(ids, char offsets, loss of each token in nats)` of one paragraph, every token predicted from BOS."""
    import torch

    enc = tokenizer(line, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"][:max_tokens], enc["offset_mapping"][:max_tokens]
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[start, *ids]])).logits[0, :-1].float()
    nll = -torch.log_softmax(logits, -1)[torch.arange(len(ids)), torch.tensor(ids)]
    return ids, offsets, nll.numpy()


def per_character(offsets, nll: np.ndarray, length: int) -> np.ndarray:
    """Each token's loss added to the character its span ends in; characters from `length` on are dropped."""
    out = np.zeros(length)
    for (begin, end), loss in zip(offsets, nll, strict=True):
        where = max(end - 1, begin)
        if where < length:
            out[where] += loss
    return out


def length_group(text: str, new: bool) -> str:
    """`new token, 2 characters`, `old token, part of a character`, ... (4 and more characters are one group)."""
    kind = "new token" if new else "old token"
    if "\ufffd" in text:
        return f"{kind}, part of a character"
    size = len(text)
    return f"{kind}, {'4+ characters' if size >= 4 else '1 character' if size == 1 else f'{size} characters'}"


def bucket(count: int) -> str:
    return "0" if count == 0 else "1-9" if count < 10 else "10-99" if count < 100 else "100+"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("work_dir", type=Path)
    ap.add_argument("--base", default="assets/smollm2-135m", help="the recipe's base_model")
    ap.add_argument("--lines", type=int, default=60)
    ap.add_argument("--count-lines", type=int, default=3000)
    ap.add_argument("--group", choices=("use", "length"), default="use",
                    help="group new tokens by how often training uses them, or every token by its length")
    ap.add_argument("--without", type=Path, help="the run without extension (default: WORK_DIR/merged-pretrain-no-extension)")
    args = ap.parse_args()
    work = args.work_dir
    text = lambda name: [x for x in (work / "data" / "text" / name).read_text(encoding="utf-8").splitlines() if x]
    lines = heldout_paragraphs(work / "data" / "text" / "test.txt", args.lines, 512)
    models = {"extended": work / "merged-pretrain",
              "without extension": args.without or work / "merged-pretrain-no-extension",
              "base": Path(args.base)}
    scored = {}
    for name, path in models.items():
        model, tokenizer = load_hf(str(path))
        scored[name] = [charged_losses(model, tokenizer, line) for line in lines]
        if name == "extended":
            ext_tokenizer = tokenizer
        elif name == "base":
            old_vocab = len(tokenizer)
    counts = collections.Counter()
    for line in text("train.txt")[: args.count_lines] if args.group == "use" else []:
        counts.update(i for i in ext_tokenizer(line, add_special_tokens=False)["input_ids"] if i >= old_vocab)

    sums = collections.defaultdict(lambda: np.zeros(1 + len(models)))
    for i in range(len(lines)):
        runs = [scored[name][i] for name in models]
        length = min(max(end for _, end in offsets) for _, offsets, _ in runs)
        charged = [per_character(offsets, nll, length) for _, offsets, nll in runs]
        group = [None] * length
        for token, (begin, end) in zip(*scored["extended"][i][:2], strict=True):
            if args.group == "length":
                name = length_group(ext_tokenizer.decode([token]), token >= old_vocab)
            else:
                name = f"new token, used {bucket(counts[token])} times" if token >= old_vocab else "old token"
            for c in range(begin, min(end, length)):
                group[c] = name
        for c in range(length):
            sums[group[c]] += (1, *(x[c] for x in charged))

    total = sum(sums.values())
    bits = lambda nats, chars: nats / chars / math.log(2)
    print(f"{work}: {len(lines)} test paragraphs, {int(total[0])} characters; new tokens counted on "
          f"{args.count_lines} training paragraphs")
    print("| span | characters | share | extended | without extension | base | part of the gap |")
    print("|---|---|---|---|---|---|---|")
    for name in sorted(sums) + ["all"]:
        row = total if name == "all" else sums[name]
        chars, ext, noext, base = row
        print(f"| {name} | {int(chars)} | {chars / total[0]:.1%} | {bits(ext, chars):.3f} | {bits(noext, chars):.3f} | "
              f"{bits(base, chars):.3f} | {bits(ext - noext, total[0]):+.3f} |")


if __name__ == "__main__":
    main()
