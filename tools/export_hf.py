"""Merge PEFT LoRA adapters, in order, into an HF base and write a plain HF model that transformers loads.

    python tools/export_hf.py --base llama-7b-hf --adapter chinese-llama-plus-lora-7b \\
        --adapter chinese-alpaca-plus-lora-7b --out chinese-alpaca-plus-7b --dtype float16

Each adapter's full embed_tokens/lm_head replace the model's (the vocabulary may grow, 32000 -> 49953 -> 49954),
each LoRA is folded in as W + (B A) * lora_alpha / r in float32, and the tensors are streamed one at a time. The
output gets the last adapter's tokenizer (or --tokenizer). Every check runs before any weight is read.
"""

from __future__ import annotations

import argparse
import sys

from zhjax._extras import MissingExtra
from zhjax.convert.hf import ConversionError
from zhjax.convert.merge import merge_adapters
from zhjax.ownership import OutputRefused


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="HF model directory (safetensors or pytorch_model*.bin)")
    parser.add_argument("--adapter", action="append", default=[], help="PEFT adapter directory; repeat, in order")
    parser.add_argument("--out", required=True,
                        help="output directory: new, empty, or an earlier export (replaced only when complete)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace --out even if it holds files zhjax did not write")
    parser.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default=None,
                        help="output dtype (default: the base's)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer directory for the output (default: last adapter's)")
    parser.add_argument("--max-shard-gb", type=float, default=2.0, help="largest safetensors shard, in GiB")
    args = parser.parse_args(argv)
    try:
        out = merge_adapters(args.base, args.adapter, args.out, dtype=args.dtype, tokenizer_dir=args.tokenizer,
                             max_shard_bytes=int(args.max_shard_gb * 1024**3), overwrite=args.overwrite)
    except OutputRefused as e:
        print(f"export_hf: {e}", file=sys.stderr)
        return 2
    except (ConversionError, MissingExtra) as e:
        print(f"export_hf: {e}", file=sys.stderr)
        return 1
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
