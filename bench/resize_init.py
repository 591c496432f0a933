"""SmolLM2's loss per character on held-out People's Daily text right after vocabulary extension, per init.

    .venv/bin/python bench/resize_init.py [--model assets/smollm2-135m] [--new-tokens 6000] [--train-lines 8000]
        [--eval-lines 100] [--work outputs/bench_resize_init] [--sample-characters 10000 40000]

Issue 3, point 4. SmolLM2's byte-level BPE is extended with `--new-tokens` Chinese tokens learned on the first
`--train-lines` paragraphs of the corpus (`zhjax.tokenizer.bpe`, as `tools/merge_tokenizers.py --kind bpe`
does), the model is grown with each init (`zhjax.convert.resize_model.resize_model`; `distill`, which fits the
new rows to the base model on those paragraphs and unties the head, through `resize_hf_checkpoint` as the recipe
and `tools/resize_model.py` do, timed), and the zhjax model
(fp32) scores the last `--eval-lines` paragraphs, which the merges never saw. Every token is predicted, the first
from BOS; the summed loss is divided by the characters, so tokenizers compare. No training happens: this is
where continued pre-training starts from. The base tokenizer's row is the unextended model, for reference.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from transformers import AutoTokenizer

import zhjax
from zhjax.convert.resize_model import resize_hf_checkpoint, resize_model
from zhjax.tokenizer.bpe import extend_bpe_tokenizer
from zhjax.tokenizer.resize import INITS, subword_source_ids
from zhjax.tokenizer.transfer import TransferConfig


def summed_nll(model, tokenizer, lines: list[str], batch_size: int, bucket: int = 64) -> tuple[float, int]:
    """(summed next-token loss in nats over every token of `lines`, number of tokens), fp32, one jit per width."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def nll(state, ids, mask):
        logits = nnx.merge(graphdef, state)(ids)[:, :-1]
        logp = jax.nn.log_softmax(logits, axis=-1)
        picked = jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
        return -(picked * mask[:, 1:]).sum()

    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    rows = [[start, *tokenizer.encode(line, add_special_tokens=False)] for line in lines]
    total, tokens = 0.0, 0
    for i in range(0, len(rows), batch_size):
        chunk = rows[i : i + batch_size]
        width = -(-max(map(len, chunk)) // bucket) * bucket
        ids = np.zeros((batch_size, width), np.int32)
        mask = np.zeros((batch_size, width), np.float32)
        for r, row in enumerate(chunk):
            ids[r, : len(row)], mask[r, : len(row)] = row, 1.0
        total += float(nll(state, jnp.asarray(ids), jnp.asarray(mask)))
        tokens += sum(len(row) - 1 for row in chunk)
    return total, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="assets/smollm2-135m")
    parser.add_argument("--corpus", default=None, help="raw text, one paragraph per line (default: People's Daily)")
    parser.add_argument("--new-tokens", type=int, default=6000)
    parser.add_argument("--train-lines", type=int, default=8000, help="paragraphs the new merges are learned on")
    parser.add_argument("--eval-lines", type=int, default=100, help="held-out paragraphs (from the corpus's end)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-distill", action="store_true", help="leave out the distill init (minutes on a CPU)")
    parser.add_argument("--sample-characters", type=int, nargs="+", default=[TransferConfig().sample_characters],
                        help="the distill fit's sample sizes, one row each (default: the recipes' default)")
    parser.add_argument("--work", default="outputs/bench_resize_init", help="where the extended tokenizer goes")
    args = parser.parse_args()
    corpus = args.corpus
    if corpus is None or args.model == "assets/smollm2-135m":
        from zhjax.assets import ensure_assets

        assets = ensure_assets("assets", quiet=True)
        corpus = corpus or str(assets.corpus_text)

    paragraphs = [line.strip() for line in open(corpus, encoding="utf-8") if line.strip()]
    train, rest = paragraphs[: args.train_lines], paragraphs[args.train_lines :]
    held_out = [line for line in rest if 20 <= len(line) <= 300][-args.eval_lines :]
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    (work / "train.txt").write_text("\n".join(train) + "\n", encoding="utf-8")

    t0 = time.perf_counter()
    ext = extend_bpe_tokenizer(args.model, [work / "train.txt"], args.new_tokens, work / "tokenizer")
    print(f"extended tokenizer: {ext.base_vocab_size} -> {ext.vocab_size} tokens in {time.perf_counter() - t0:.0f}s")
    base_tok, new_tok = AutoTokenizer.from_pretrained(args.model), AutoTokenizer.from_pretrained(ext.out_dir)
    model = zhjax.load_pretrained(args.model, dtype="float32")
    sources = subword_source_ids(base_tok, new_tok, model.config.vocab_size)
    chars = sum(map(len, held_out))

    results = []
    t0 = time.perf_counter()
    nll, tokens = summed_nll(model, base_tok, held_out, args.batch)
    results.append(("base tokenizer, no resize", tokens, nll))
    for init in INITS:
        grown = resize_model(model, len(new_tok), init, sources, seed=args.seed)
        nll, tokens = summed_nll(grown, new_tok, held_out, args.batch)
        results.append((f"extended + {init} init", tokens, nll))
    elapsed = time.perf_counter() - t0
    for characters in [] if args.skip_distill else args.sample_characters:
        fit_start = time.perf_counter()
        out = resize_hf_checkpoint(args.model, ext.out_dir, work / f"distill-{characters}", "distill", seed=args.seed,
                                   sample_files=[work / "train.txt"],
                                   transfer=TransferConfig(sample_characters=characters, seed=args.seed))
        fit_seconds = time.perf_counter() - fit_start
        nll, tokens = summed_nll(zhjax.load_pretrained(out.out_dir, dtype="float32"), new_tok, held_out, args.batch)
        results.append((f"extended + distill, {characters // 1000} k chars ({fit_seconds:.0f}s)", tokens, nll))

    print(f"\nheld-out: {len(held_out)} paragraphs, {chars} characters (last paragraphs of {corpus}); "
          f"model {args.model}, zhjax fp32, {jax.devices()[0].platform}, {elapsed:.0f}s for the first 4 passes")
    print(f"{'tokenizer / init':<40}{'tokens/char':>12}{'nats/char':>11}{'bits/char':>11}{'nats/token':>12}")
    for name, tokens, nll in results:
        print(f"{name:<40}{tokens / chars:>12.3f}{nll / chars:>11.3f}{nll / chars / math.log(2):>11.3f}"
              f"{nll / tokens:>12.3f}")


if __name__ == "__main__":
    main()
