"""Grow an HF model's embed_tokens and lm_head to an extended tokenizer (zhjax.convert.resize_model).

    python tools/resize_model.py --base HF_MODEL_DIR --tokenizer NEW_TOKENIZER_DIR --out DIR \
        --sample-file TRAIN.txt [--init distill|subword|mean|normal] [--seed 0] [--base-tokenizer DIR]

The new tokenizer must extend the model's own (tools/merge_tokenizers.py writes one). Old rows are kept bit
for bit; new rows follow --init. The default, distill, fits them to the base model on the text of --sample-file
(training text, one paragraph per line; zhjax.tokenizer.transfer) and writes an untied model; subword is the
mean of the rows of the base pieces of each new token. The output is an HF dir with the new tokenizer's files
that transformers and zhjax load.
"""

from __future__ import annotations

import argparse
import sys
import time


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, resize, print what was written."""
    from zhjax.convert.resize_model import ALL_INITS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="HF model dir (config.json + safetensors or .bin)")
    parser.add_argument("--tokenizer", required=True, help="extended tokenizer dir (HF files)")
    parser.add_argument("--out", required=True, help="output HF model dir (replaced when complete)")
    parser.add_argument("--init", choices=ALL_INITS, default="distill", help="init of the new rows (default: distill)")
    parser.add_argument("--sample-file", action="append", default=[],
                        help="training text the distill init fits the new rows on (repeatable)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the normal and mean inits")
    parser.add_argument("--base-tokenizer", default=None, help="the model's tokenizer dir if not in --base")
    args = parser.parse_args(argv)

    from zhjax.convert.hf import ConversionError
    from zhjax.convert.resize_model import resize_hf_checkpoint

    start = time.perf_counter()
    try:
        result = resize_hf_checkpoint(
            args.base, args.tokenizer, args.out, args.init, args.seed, base_tokenizer_dir=args.base_tokenizer,
            sample_files=args.sample_file,
        )
    except (OSError, ValueError, ConversionError) as err:
        print(f"resize_model: {err}", file=sys.stderr)
        return 1
    added = result.new_vocab_size - result.old_vocab_size
    layout = "tied embeddings, one matrix" if result.tied else "untied embed_tokens and lm_head"
    print(
        f"wrote {result.out_dir}: vocab {result.old_vocab_size} -> {result.new_vocab_size} ({added} new rows, "
        f"init {result.init}, {layout}; grew {', '.join(result.resized)}) in {time.perf_counter() - start:.1f}s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
