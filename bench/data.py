"""Pre-training preprocessing throughput: zhjax's `build_blocks` against the seed's method, same tokenizer.

The seed's method (re-implemented here from its description, not copied): ``datasets.load_dataset("text")``,
a ``map`` that tokenizes every line with its own tokenizer call (what the seed's slow ``LlamaTokenizer`` does
inside a batched map), a second batched ``map`` that concatenates each batch of 1000 lines and drops the
remainder that does not fill a block (with an ``attention_mask`` and a copy of ``input_ids`` as ``labels``),
then ``save_to_disk``. zhjax: `zhjax.data.pretrain.build_blocks_with_summary` into an empty cache dir. Both
add BOS and EOS per line, both use ``--num-proc`` worker processes.

Every measurement runs in a fresh Python process (a tokenizer's word cache would otherwise favour whichever
runs second), timed from after the tokenizer is loaded to the blocks on disk; the runs alternate A B A B and
the table shows the median. The load average is printed first; a busy machine is refused
(`bench/quiet.py`). Tokens/s counts the tokens of the corpus (BOS/EOS included), the same for both.

Two tokenizers:

- ``smollm2``: SmolLM2's byte-level BPE, one tokenizer object for both methods.
- ``sentencepiece``: the LLaMA-style Mistral v1 SentencePiece model; the seed's method uses the slow
  SentencePiece-backed tokenizer (as the seed's ``LlamaTokenizer``), zhjax its ``tokenizers`` conversion.
  Both give the same ids on the corpus (checked before timing; the table says so).

Usage: ``python bench/data.py [--rounds 3] [--num-proc N] [--block-size 512] [--tokenizers smollm2,sentencepiece] [--force]``
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def load_tokenizer(kind: str, method: str, assets):
    """The tokenizer a method uses: the same object for smollm2; slow vs fast builds of one SP model."""
    import transformers

    if kind == "smollm2":
        return transformers.AutoTokenizer.from_pretrained(assets.smollm2_dir)
    folder = Path(tempfile.mkdtemp(prefix="zhjax-bench-sp-"))
    shutil.copy(assets.mistral_sp_model, folder / "tokenizer.model")
    if method == "seed":
        return transformers.SentencePieceBackend(vocab_file=str(folder / "tokenizer.model"), bos_token="<s>",
                                                 eos_token="</s>", unk_token="<unk>")
    return transformers.AutoTokenizer.from_pretrained(folder)


def seed_method(corpus: Path, tokenizer, block_size: int, num_proc: int, work: Path) -> dict:
    """The seed's preprocessing: per-line tokenization, then blocks per 1000-line batch (remainders dropped)."""
    import datasets

    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id

    def tokenize(batch):
        out = {"input_ids": [], "attention_mask": []}
        for line in batch["text"]:
            ids = [bos] + tokenizer(line, add_special_tokens=False)["input_ids"] + [eos]
            out["input_ids"].append(ids)
            out["attention_mask"].append([1] * len(ids))
        return out

    def group(batch):
        joined = {k: list(itertools.chain.from_iterable(batch[k])) for k in ("input_ids", "attention_mask")}
        usable = len(joined["input_ids"]) // block_size * block_size
        out = {k: [v[i:i + block_size] for i in range(0, usable, block_size)] for k, v in joined.items()}
        out["labels"] = [list(x) for x in out["input_ids"]]
        return out

    raw = datasets.load_dataset("text", data_files=str(corpus), split="train", cache_dir=str(work / "hf"))
    raw = raw.filter(lambda t: bool(t.strip()), input_columns="text", num_proc=num_proc)
    tokens = raw.map(tokenize, batched=True, remove_columns=["text"], num_proc=num_proc)
    blocks = tokens.map(group, batched=True, num_proc=num_proc)
    blocks.save_to_disk(str(work / "blocks"))
    n_tokens = sum(len(x) for x in tokens["attention_mask"])
    return {"tokens": n_tokens, "blocks": len(blocks), "lost": n_tokens - len(blocks) * block_size}


def zhjax_method(corpus: Path, tokenizer, block_size: int, num_proc: int, work: Path) -> dict:
    from zhjax.data.pretrain import build_blocks_with_summary

    _, s = build_blocks_with_summary(corpus, tokenizer, block_size, cache_dir=work / "cache", num_proc=num_proc)
    return {"tokens": s.tokens, "blocks": s.blocks, "lost": s.dropped_tail_tokens}


def worker(args) -> None:
    """One timed run in this (fresh) process; prints a JSON line."""
    import datasets

    from zhjax.assets import ensure_assets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    assets = ensure_assets(REPO / "assets", quiet=True)
    tokenizer = load_tokenizer(args.tokenizer, args.method, assets)
    work = Path(tempfile.mkdtemp(prefix="zhjax-bench-"))
    try:
        run = seed_method if args.method == "seed" else zhjax_method
        start = time.perf_counter()
        result = run(assets.corpus_text, tokenizer, args.block_size, args.num_proc, work)
        result["seconds"] = time.perf_counter() - start
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result))


def ids_agree(kind: str) -> str:
    """For the SP pair: how many corpus lines the slow and fast tokenizers encode differently."""
    if kind != "sentencepiece":
        return "same tokenizer object"
    from zhjax.assets import ensure_assets
    from zhjax.data.pretrain import encode_texts

    assets = ensure_assets(REPO / "assets", quiet=True)
    slow, fast = load_tokenizer(kind, "seed", assets), load_tokenizer(kind, "zhjax", assets)
    lines = [x for x in assets.corpus_text.read_text(encoding="utf-8").splitlines() if x.strip()]
    differ = sum(slow(x, add_special_tokens=False)["input_ids"] != y for x, y in zip(lines, encode_texts(fast, lines),
                                                                                     strict=True))
    return f"slow vs fast ids differ on {differ} of {len(lines)} lines"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--num-proc", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--block-size", type=int, default=512)
    parser.add_argument("--tokenizers", default="smollm2,sentencepiece")
    parser.add_argument("--method", choices=["seed", "zhjax"], help=argparse.SUPPRESS)
    parser.add_argument("--tokenizer", help=argparse.SUPPRESS)
    parser.add_argument("--force", action="store_true", help="run even when the load average is above 1.0")
    args = parser.parse_args()
    if args.method:
        return worker(args)
    from quiet import load_line, require_quiet_machine

    require_quiet_machine(args.force)

    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    rows = []
    for kind in args.tokenizers.split(","):
        note = ids_agree(kind)
        runs: dict[str, list[dict]] = {"seed": [], "zhjax": []}
        for _, method in itertools.product(range(args.rounds), ("seed", "zhjax")):  # A B A B ...
            cmd = [sys.executable, __file__, "--method", method, "--tokenizer", kind, "--num-proc", str(args.num_proc),
                   "--block-size", str(args.block_size)]
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
            if out.returncode:
                sys.exit(f"{method}/{kind} failed:\n{out.stderr[-3000:]}")
            runs[method].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"  {kind:<13} {method:<6} {runs[method][-1]['seconds']:.2f}s", file=sys.stderr)
        med = {m: statistics.median(r["seconds"] for r in rs) for m, rs in runs.items()}
        for m in ("seed", "zhjax"):
            r = runs[m][0]
            rows.append((kind, m, med[m], r["tokens"] / med[m], r["blocks"], r["lost"], ""))
        rows[-1] = (*rows[-1][:6], f"{med['seed'] / med['zhjax']:.2f}x")
        rows.append((kind, f"({note})", None, None, None, None, ""))

    print(f"\nPeople's Daily 1998-01, block_size {args.block_size}, num_proc {args.num_proc}, "
          f"median of {args.rounds} interleaved runs, {os.cpu_count()} CPUs; after: {load_line()}")
    header = f"{'tokenizer':<14}{'method':<8}{'seconds':>9}{'tokens/s':>12}{'blocks':>8}{'tokens lost':>13}{'speed-up':>10}"
    print(header + "\n" + "-" * len(header))
    for kind, m, sec, tps, blocks, lost, ratio in rows:
        if sec is None:
            print(f"{'':<14}{m}")
            continue
        print(f"{kind:<14}{m:<8}{sec:>9.2f}{tps:>12,.0f}{blocks:>8}{lost:>13,}{ratio:>10}")


if __name__ == "__main__":
    main()
