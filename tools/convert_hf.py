"""Convert between HF LLaMA directories and zhjax: `import` checks and re-exports, `export` writes an HF dir.

    python tools/convert_hf.py import --hf DIR --out zhjax_ckpt/     (orbax checkpoint of the base, stacked layers)
    python tools/convert_hf.py export --ckpt zhjax_ckpt/ --out DIR [--dtype bfloat16] [--tokenizer TOKDIR]
    python tools/convert_hf.py roundtrip --hf DIR --out DIR2          (import then export, for checking)
"""

from __future__ import annotations

import argparse
import sys

import zhjax
from zhjax.convert.base import load_base_checkpoint, save_base_checkpoint
from zhjax.convert.hf import save_hf
from zhjax.ownership import OutputRefused, check_output_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    imp = sub.add_parser("import", help="HF dir -> zhjax base checkpoint")
    imp.add_argument("--hf", required=True)
    imp.add_argument("--out", required=True, help="new or empty directory, or an earlier zhjax output")
    imp.add_argument("--dtype", default="bfloat16", help="storage dtype of the base weights")
    exp = sub.add_parser("export", help="zhjax base checkpoint -> HF dir")
    exp.add_argument("--ckpt", required=True)
    exp.add_argument("--out", required=True, help="new or empty directory, or an earlier zhjax output")
    exp.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: as stored)")
    exp.add_argument("--tokenizer", default=None, help="directory whose tokenizer files are copied")
    rt = sub.add_parser("roundtrip", help="HF dir -> zhjax -> HF dir")
    rt.add_argument("--hf", required=True)
    rt.add_argument("--out", required=True, help="new or empty directory, or an earlier zhjax output")
    rt.add_argument("--dtype", default="float32")
    args = parser.parse_args()

    src = args.ckpt if args.cmd == "export" else args.hf
    try:  # before any weight is read: the output may not be an input nor a directory zhjax did not write
        check_output_dir(args.out, inputs=[src, getattr(args, "tokenizer", None)])
    except OutputRefused as e:
        sys.exit(f"convert_hf: {e}")
    if args.cmd == "import":
        model = zhjax.load_pretrained(args.hf, dtype=args.dtype)
        print(save_base_checkpoint(model, args.out, source=args.hf))
    elif args.cmd == "export":
        model = load_base_checkpoint(args.ckpt)
        print(save_hf(model, args.out, dtype=args.dtype, tokenizer_dir=args.tokenizer))
    else:
        model = zhjax.load_pretrained(args.hf, dtype=args.dtype)
        print(save_hf(model, args.out, tokenizer_dir=args.hf))


if __name__ == "__main__":
    main()
