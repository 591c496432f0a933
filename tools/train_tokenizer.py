"""Train a Chinese SentencePiece model on text files or directories (streamed), with a progress report.

    python tools/train_tokenizer.py --input CORPUS [CORPUS ...] --model-prefix OUT/chinese_sp \
        [--vocab-size 20000] [--model-type unigram] [--character-coverage 0.9995] \
        [--max-sentence-length 16384] [--num-threads 4] [--input-sentence-size 0] [--eval-text FILE ...]

Writes OUT/chinese_sp.model and .vocab. See `zhjax.tokenizer.train`.
"""

from __future__ import annotations

import argparse
import sys

from zhjax.tokenizer.merge import BUILTIN_EVAL_LINES, read_eval_lines, tokenization_report, with_english
from zhjax.tokenizer.train import MODEL_TYPES, SentencePieceTrainConfig, train_sentencepiece


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, train, print progress and tokens per character on the eval text."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--input", nargs="+", required=True, help="text files and/or directories (one sentence per line)"
    )
    parser.add_argument(
        "--model-prefix", required=True, help="output prefix: writes PREFIX.model and PREFIX.vocab"
    )
    parser.add_argument("--vocab-size", type=int, default=20000)
    parser.add_argument("--model-type", choices=MODEL_TYPES, default="unigram")
    parser.add_argument("--character-coverage", type=float, default=0.9995)
    parser.add_argument(
        "--max-sentence-length", type=int, default=16384, help="in bytes; longer lines are skipped"
    )
    parser.add_argument("--num-threads", type=int, default=4)
    parser.add_argument("--input-sentence-size", type=int, default=0, help="sample this many lines (0: all)")
    parser.add_argument("--normalization", default="nmt_nfkc", help="SentencePiece normalization rule name")
    parser.add_argument("--byte-fallback", action="store_true")
    parser.add_argument("--report-every", type=int, default=100_000, help="progress line every N lines")
    parser.add_argument(
        "--eval-text", nargs="*", default=None, help="held-out text for the tokens-per-character report"
    )
    parser.add_argument("--verbose", action="store_true", help="show SentencePiece's own log")
    args = parser.parse_args(argv)

    config = SentencePieceTrainConfig(
        vocab_size=args.vocab_size,
        model_type=args.model_type,
        character_coverage=args.character_coverage,
        max_sentence_length=args.max_sentence_length,
        num_threads=args.num_threads,
        input_sentence_size=args.input_sentence_size,
        normalization_rule_name=args.normalization,
        byte_fallback=args.byte_fallback,
    )
    try:
        result = train_sentencepiece(
            args.input,
            args.model_prefix,
            config,
            on_progress=lambda p: print(f"read {p.describe()}", flush=True),
            report_every=args.report_every,
            quiet=not args.verbose,
        )
    except (OSError, ValueError, RuntimeError) as err:
        print(f"train_tokenizer: {err}", file=sys.stderr)
        return 1
    print(f"wrote {result.model_file} ({result.vocab_size} pieces, {args.model_type})")

    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(result.model_file))
    lines, padded = with_english(read_eval_lines(args.eval_text) if args.eval_text else BUILTIN_EVAL_LINES)
    source = ", ".join(args.eval_text) if args.eval_text else "the built-in sample"
    print(
        f"on {source}"
        + (" (no English there: English lines of the built-in sample added)" if padded else "")
        + ":"
    )
    print(tokenization_report(sp.encode, lines).describe("chinese sp"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
