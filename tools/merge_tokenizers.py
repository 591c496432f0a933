"""Extend a base tokenizer with Chinese tokens and print what it costs on Chinese and English text.

SentencePiece base (the seed's merge, `zhjax.tokenizer.merge`):

    python tools/merge_tokenizers.py [--kind sp] --base BASE.model --chinese ZH.model --out DIR \
        [--pad-token] [--score-mode rank|seed] [--eval-text FILE ...]

Byte-level BPE base, an HF dir with tokenizer.json (`zhjax.tokenizer.bpe`):

    python tools/merge_tokenizers.py --kind bpe --base HF_TOKENIZER_DIR --corpus FILE ... --new-tokens N \
        --out DIR [--min-frequency 2] [--eval-text FILE ...]

Both write an HF tokenizer dir that `transformers.AutoTokenizer` loads (plus DIR/tokenizer.model for sp).
The report gives tokens per Chinese character and per English word, before and after, on --eval-text
(a small built-in sample otherwise), and for sp the share of lines on which HF ids == SentencePiece ids.
"""

from __future__ import annotations

import argparse
import sys


def _report_sp(args: argparse.Namespace, lines: list[str]) -> None:
    import sentencepiece as spm
    from transformers import AutoTokenizer

    from zhjax.tokenizer.merge import known_differences, load_sp_proto, tokenization_report

    base = spm.SentencePieceProcessor(model_file=args.base)
    merged = spm.SentencePieceProcessor(model_file=f"{args.out}/tokenizer.model")
    hf = AutoTokenizer.from_pretrained(args.out)
    print(tokenization_report(base.encode, lines).describe("base (SentencePiece)"))
    print(
        tokenization_report(merged.encode, lines).describe(f"merged, {args.score_mode} mode (SentencePiece)")
    )
    report = tokenization_report(
        lambda s: hf.encode(s, add_special_tokens=False), lines, reference=merged.encode
    )
    print(report.describe(f"merged, {args.score_mode} mode (HF)"))
    for line in known_differences(load_sp_proto(f"{args.out}/tokenizer.model")):
        print(f"HF vs SentencePiece: {line}")


def _report_bpe(args: argparse.Namespace, lines: list[str]) -> None:
    from transformers import AutoTokenizer

    from zhjax.tokenizer.merge import is_english_line, tokenization_report

    base = AutoTokenizer.from_pretrained(args.base)
    extended = AutoTokenizer.from_pretrained(args.out)
    before = lambda s: base.encode(s, add_special_tokens=False)
    after = lambda s: extended.encode(s, add_special_tokens=False)
    print(tokenization_report(before, lines).describe("base"))
    print(tokenization_report(after, lines).describe("extended"))
    english = [line for line in lines if is_english_line(line)]
    same = sum(before(line) == after(line) for line in english)
    print(f"extended: same ids as the base on {same} of {len(english)} English lines")


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, build the extended tokenizer, print the report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--kind", choices=("sp", "bpe"), default="sp", help="base tokenizer kind (default: sp)"
    )
    parser.add_argument(
        "--base", required=True, help="sp: base SentencePiece .model; bpe: HF dir with tokenizer.json"
    )
    parser.add_argument("--out", required=True, help="output tokenizer dir (a new one, or one zhjax wrote)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace --out even when it holds files zhjax did not write")
    parser.add_argument("--chinese", help="sp: Chinese SentencePiece .model to merge in")
    parser.add_argument(
        "--score-mode", choices=("rank", "seed"), default="rank", help="sp: scores of new pieces"
    )
    parser.add_argument(
        "--pad-token",
        nargs="?",
        const="[PAD]",
        default=None,
        help="sp: append a pad piece (default [PAD], as Alpaca)",
    )
    parser.add_argument("--corpus", nargs="+", help="bpe: Chinese text files/directories to learn merges on")
    parser.add_argument("--new-tokens", type=int, help="bpe: number of tokens to add")
    parser.add_argument(
        "--min-frequency", type=int, default=2, help="bpe: least frequency of a learned merge"
    )
    parser.add_argument(
        "--form", choices=("merges", "words"), default="merges",
        help="bpe: new tokens as learned merges (single characters too) or as added words of 2+ characters",
    )
    parser.add_argument("--eval-text", nargs="*", default=None, help="held-out text files for the report")
    args = parser.parse_args(argv)

    from zhjax.tokenizer.merge import BUILTIN_EVAL_LINES, read_eval_lines, with_english

    try:
        if args.kind == "sp":
            if not args.chinese:
                parser.error("--kind sp needs --chinese ZH.model")
            from zhjax.tokenizer.merge import merge_tokenizers

            result = merge_tokenizers(
                args.base, args.chinese, args.out, score_mode=args.score_mode, pad_token=args.pad_token,
                overwrite=args.overwrite,
            )
            print(
                f"wrote {args.out}: {result.vocab_size} pieces = {result.base_size} base + {result.added} Chinese"
                + (f" + {args.pad_token} (id {result.pad_id})" if result.pad_id is not None else "")
                + f", score mode {args.score_mode}"
            )
        else:
            if not args.corpus or not args.new_tokens:
                parser.error("--kind bpe needs --corpus FILE ... and --new-tokens N")
            from zhjax.tokenizer.bpe import extend_bpe_tokenizer

            ext = extend_bpe_tokenizer(
                args.base,
                args.corpus,
                args.new_tokens,
                args.out,
                min_frequency=args.min_frequency,
                show_progress=sys.stderr.isatty(),
                overwrite=args.overwrite,
                form=args.form,
            )
            print(
                f"wrote {args.out}: {ext.vocab_size} tokens = {ext.base_vocab_size} base + {ext.added_tokens} new "
                + (f"({ext.added_merges} merges appended, of {ext.learned_merges} learned)" if args.form == "merges" else
                   f"(words of 2+ characters added as tokens, of {ext.learned_merges} merges learned)")
            )
        lines, padded = with_english(
            read_eval_lines(args.eval_text) if args.eval_text else BUILTIN_EVAL_LINES
        )
        source = ", ".join(args.eval_text) if args.eval_text else "the built-in sample"
        print(
            f"on {source}"
            + (" (no English there: English lines of the built-in sample added)" if padded else "")
            + ":"
        )
        (_report_sp if args.kind == "sp" else _report_bpe)(args, lines)
    except (OSError, ValueError) as err:
        print(f"merge_tokenizers: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
