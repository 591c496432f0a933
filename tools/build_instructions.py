"""Build instruction data (name extraction, word segmentation) from People's Daily's word/POS tags.

    python tools/build_instructions.py --tagged assets/corpus/199801_tagged.txt --out DIR \
        [--max-examples 4000] [--seed 0] [--max-chars 80]

Writes DIR/{train,validation,test}.json (Alpaca records: instruction/input/output, plus task and doc), the raw
text of each split's documents in DIR/text/{split}.txt (for pre-training and held-out evaluation on the same
split), and DIR/manifest.json. Documents, splits, answer format and scoring: `zhjax.data.instructions`.
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, build the data, print the counts and one example of each task."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tagged", required=True, help="word/tag corpus file (People's Daily 1998 format)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--max-examples", type=int, default=4000, help="examples over all splits (default 4000)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (the split does not depend on it)")
    parser.add_argument("--min-chars", type=int, default=8, help="shortest sentence, in characters")
    parser.add_argument("--max-chars", type=int, default=80, help="longest sentence, in characters")
    args = parser.parse_args(argv)

    from zhjax.data.instructions import build_instructions

    try:
        summary = build_instructions(
            args.tagged, args.out, max_examples=args.max_examples, seed=args.seed,
            min_chars=args.min_chars, max_chars=args.max_chars,
        )
    except (OSError, ValueError) as err:
        print(f"build_instructions: {err}", file=sys.stderr)
        return 1
    print(summary)
    records = json.loads(summary.files["train"].read_text(encoding="utf-8"))
    for task in ("names", "segmentation"):
        example = next((r for r in records if r["task"] == task), None)
        if example is not None:
            print(f"\n{task} example:\n  input:  {example['input']}\n  output: "
                  + example["output"].replace("\n", "\n          "))
    return 0


if __name__ == "__main__":
    sys.exit(main())
