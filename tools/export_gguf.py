"""Write a merged HF model directory (weights + tokenizer) as one GGUF file that llama.cpp runs.

    python tools/export_hf.py --base llama-7b-hf --adapter ... --out merged/     (merge the adapters first)
    python tools/export_gguf.py --model merged/ --out chinese-alpaca-7b-q4_k_m.gguf --dtype q4_k_m

q/k rows are permuted into llama.cpp's interleaved-RoPE order; the tokenizer (SentencePiece tokenizer.model or
byte-level BPE tokenizer.json) is written as GGUF metadata. --dtype: f32, f16; q8_0, q5_0, q5_1, q4_0, q4_1
(quantized by the gguf package); q6_k, q5_k_m, q4_k_m, q3_k_m (llama.cpp's quantizer, needs the llamacpp extra:
pip install 'zhjax[llamacpp]'). README "llama.cpp" has the perplexity of each.
"""

from __future__ import annotations

import argparse
import sys

from zhjax._extras import MissingExtra
from zhjax.convert.gguf import GGUF_DTYPES, write_gguf
from zhjax.convert.hf import ConversionError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="HF model directory with its tokenizer files")
    parser.add_argument("--out", required=True, help="output .gguf file (written only when complete)")
    parser.add_argument("--dtype", choices=GGUF_DTYPES, default="f16",
                        help="weight type of the matrices (norms stay f32); default f16")
    parser.add_argument("--name", default=None, help="general.name in the file (default: the model dir's name)")
    args = parser.parse_args(argv)
    try:
        out = write_gguf(args.model, args.out, dtype=args.dtype, name=args.name)
    except (ConversionError, MissingExtra, OSError) as e:
        print(f"export_gguf: {e}", file=sys.stderr)
        return 1
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
