"""Build the offline Chinese cloze set (C-Eval layout) from People's Daily's word/POS tags.

    python tools/build_cloze.py --tagged assets/corpus/199801_tagged.txt --out DIR [--val 50] [--test 50] [--seed 0]

Writes DIR/{dev,val,test}/{subject}_{split}.csv (`id,question,A,B,C,D,answer`), DIR/subject_mapping.json and
DIR/manifest.json; `zhjax eval --task ceval --data DIR` reads them. Questions, subjects and splits:
`zhjax.data.cloze`.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, build the set, print the counts per subject and one question."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tagged", required=True, help="word/tag corpus file (People's Daily 1998 format)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--val", type=int, default=50, help="val questions per subject (default 50)")
    parser.add_argument("--test", type=int, default=50, help="test questions per subject (default 50)")
    parser.add_argument("--shots", type=int, default=5, help="dev (few-shot) questions per subject (default 5)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (the document split does not depend on it)")
    parser.add_argument("--subjects", help="comma-separated subset of the subjects (default: all)")
    args = parser.parse_args(argv)

    from zhjax.data.cloze import build_cloze

    try:
        manifest = build_cloze(args.tagged, args.out, val=args.val, test=args.test, shots=args.shots, seed=args.seed,
                               subjects=args.subjects.split(",") if args.subjects else None)
    except (OSError, ValueError) as err:
        print(f"build_cloze: {err}", file=sys.stderr)
        return 1
    print(f"documents delimited by {manifest['documents']}; questions per subject (dev / val / test):")
    for subject, c in manifest["counts"].items():
        print(f"  {subject:<14}{c['dev']:>4} {c['val']:>5} {c['test']:>5}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
