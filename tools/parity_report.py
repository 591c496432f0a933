"""Print the zhjax-vs-transformers logits parity report for an HF LLaMA directory (default: SmolLM2-135M)."""

from __future__ import annotations

import argparse
import sys

from zhjax._extras import require
from zhjax.convert.parity import DEFAULT_TEXTS, compare_with_transformers


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="assets/smollm2-135m", help="HF model directory")
    parser.add_argument("--text", action="append", help="text to compare on (repeatable); default: mixed zh/en")
    args = parser.parse_args()
    require("torch", extra="torch", why="the parity report (transformers on PyTorch is the reference)", prog="parity_report")
    report = compare_with_transformers(args.model, args.text or DEFAULT_TEXTS)
    print(report.table())
    worst = max(report.max_abs_diff)
    print(f"\nworst max |diff| {worst:.2e} (target <= 1e-3); argmax agreement {min(report.argmax_agree):.1%} (target 100%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
