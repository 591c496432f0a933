"""Perplexity of each GGUF weight type through llama.cpp, on held-out People's Daily text (the README's table).

    .venv/bin/python bench/gguf_ppl.py [--model assets/smollm2-135m] [--types f16,q8_0,q4_0,q4_k_m]
        [--text FILE --last-lines 400] [--n-ctx 512] [--chunks 24] [--work-dir outputs/gguf-ppl]

Each type is written by tools/export_gguf.py's `write_gguf` from the same HF directory, then scored the way
llama.cpp's `llama-perplexity` scores a file: the text (the last `--last-lines` paragraphs of `--text`, by default
the People's Daily corpus, which SmolLM2 never saw) is tokenized by llama.cpp, cut into chunks of `--n-ctx`
tokens, and each chunk is evaluated alone (a fresh KV cache, BOS first when the model adds one); the second half
of each chunk is scored, so every scored token has at least n_ctx/2 tokens of context. Perplexity is exp of the
mean negative log-likelihood of the scored tokens. Needs the `llamacpp` extra. The numbers do not depend on the
machine's load (only the time does).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REPO = Path(__file__).resolve().parents[1]


def held_out_text(path: Path, last_lines: int) -> str:
    """The last `last_lines` non-empty paragraphs of `path`, one per line."""
    lines = [x.strip() for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]
    return "\n".join(lines[-last_lines:])


def perplexity(gguf_file: Path, text: str, n_ctx: int, chunks: int) -> tuple[float, int]:
    """(perplexity, scored tokens) of `text` under the GGUF file, llama-perplexity's way (see the module doc)."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(gguf_file), n_ctx=n_ctx, n_batch=n_ctx, logits_all=True,
                          n_threads=os.cpu_count(), verbose=False)
    ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
    bos = llm.token_bos() if llm.metadata.get("tokenizer.ggml.add_bos_token") == "true" else None
    available = len(ids) // n_ctx
    if available < chunks:
        raise SystemExit(f"gguf_ppl: the text has {len(ids)} tokens, {available} chunks of {n_ctx}; asked for {chunks}")
    nll, count = 0.0, 0
    for c in range(chunks):
        chunk = list(ids[c * n_ctx:(c + 1) * n_ctx])
        if bos is not None:
            chunk[0] = bos
        llm.reset()
        llm.eval(chunk)
        logits = np.asarray(llm.scores[: n_ctx - 1], dtype=np.float64)
        first = n_ctx // 2
        logits = logits[first - 1:]
        targets = np.asarray(chunk[first:])
        top = logits.max(axis=1, keepdims=True)
        logz = top[:, 0] + np.log(np.exp(logits - top).sum(axis=1))
        nll += float((logz - logits[np.arange(len(targets)), targets]).sum())
        count += len(targets)
    return float(np.exp(nll / count)), count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(REPO / "assets" / "smollm2-135m"), help="HF model dir")
    parser.add_argument("--types", default="f16,q8_0,q4_0,q4_k_m", help="comma-separated GGUF types")
    parser.add_argument("--text", default=str(REPO / "assets" / "corpus" / "peoples_daily_199801.txt"))
    parser.add_argument("--last-lines", type=int, default=400, help="held-out paragraphs from the end of --text")
    parser.add_argument("--n-ctx", type=int, default=512)
    parser.add_argument("--chunks", type=int, default=24)
    parser.add_argument("--work-dir", default=str(REPO / "outputs" / "gguf-ppl"), help="where the files are written")
    args = parser.parse_args(argv)

    from zhjax._extras import require
    from zhjax.convert.gguf import write_gguf

    require("llama_cpp", extra="llamacpp", why="bench/gguf_ppl.py (perplexity through llama.cpp)", prog="gguf_ppl")
    model = Path(args.model)
    text = held_out_text(Path(args.text), args.last_lines)
    work = Path(args.work_dir)
    rows = []
    for dtype in args.types.split(","):
        out = work / f"{model.name}-{dtype}.gguf"
        start = time.perf_counter()
        if not out.exists():
            write_gguf(model, out, dtype=dtype)
        written = time.perf_counter() - start
        ppl, scored = perplexity(out, text, args.n_ctx, args.chunks)
        rows.append((dtype, out.stat().st_size / 2**20, ppl, scored))
        print(f"{dtype}: {ppl:.4f} on {scored} tokens ({written:.0f} s to write, {time.perf_counter() - start:.0f} s)",
              file=sys.stderr, flush=True)
    base = next((ppl for dtype, _, ppl, _ in rows if dtype == "f16"), rows[0][2])
    print(f"\n{model.name}: perplexity through llama.cpp on {rows[0][3]} held-out People's Daily tokens "
          f"(n_ctx {args.n_ctx}, second half of each of {args.chunks} chunks scored)\n")
    print("| type | file MiB | perplexity | vs f16 |")
    print("| --- | ---: | ---: | ---: |")
    for dtype, mib, ppl, _ in rows:
        print(f"| {dtype} | {mib:.0f} | {ppl:.3f} | {100 * (ppl / base - 1):+.2f}% |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
