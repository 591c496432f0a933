"""What `dtype: auto` decides on this machine, and what bf16 and float32 cost here, side by side in one run.

    .venv/bin/python bench/precision.py [--model assets/smollm2-135m] [--lines 20] [--rounds 3] [--force]

Prints whether the CPU multiplies bf16 natively (`zhjax.precision.cpu_has_fast_bf16`: AVX-512 BF16 or AMX) and
what "auto" resolves to, then times two things interleaved, float32 then bfloat16, `--rounds` times:

- held-out scoring as the recipe does it (`zhjax.eval.hf.bits_per_character`, transformers on torch, bf16 under
  `torch.autocast`) on `--lines` paragraphs of the corpus's text, cut at 512 characters;
- the transfer init's output-fit product (`zhjax.tokenizer.transfer`): `[2048 positions, 576] x [79152 rows, 576]^T`
  with fp32 accumulation, forward and gradient (XLA:CPU).

The training step's two rows are `bench/train.py --only "zhjax fp32" "zhjax bf16"` (a run of its own: the workers
take 3-4 GiB each).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from quiet import require_quiet_machine  # noqa: E402

DTYPES = ("float32", "bfloat16")


def scoring_timer(model_dir: str, corpus: str, n_lines: int):
    from zhjax.data.instructions import parse_tagged_line
    from zhjax.eval.hf import bits_per_character, load_hf

    raw = ("".join(u.text for u in parse_tagged_line(x)[1]) for x in Path(corpus).read_text(encoding="utf-8").splitlines())
    paragraphs = [x for x in raw if len(x) > 100]
    lines = [x[:512] for x in paragraphs[:: max(1, len(paragraphs) // n_lines)][:n_lines]]
    model, tok = load_hf(model_dir)

    def run(dtype: str) -> tuple[float, float]:
        start = time.perf_counter()
        bpc = bits_per_character(model, tok, lines, max_tokens=None, dtype=dtype).bits_per_char
        return time.perf_counter() - start, bpc

    return run


def product_timer():
    import jax
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(0)
    h = jnp.asarray(rng.standard_normal((2048, 576), np.float32))
    w = jnp.asarray(0.02 * rng.standard_normal((79152, 576), np.float32))

    def loss(w, h, dt):
        logits = jnp.einsum("pd,rd->pr", h.astype(dt), w.astype(dt), preferred_element_type=jnp.float32)
        return jax.nn.logsumexp(logits, axis=-1).sum()

    steps = {dt: jax.jit(jax.value_and_grad(lambda w, h, dt=dt: loss(w, h, jnp.dtype(dt)))) for dt in DTYPES}
    for dt in DTYPES:  # compile outside the clock
        jax.block_until_ready(steps[dt](w, h))

    def run(dtype: str) -> tuple[float, float]:
        start = time.perf_counter()
        value, _ = jax.block_until_ready(steps[dtype](w, h))
        return time.perf_counter() - start, float(value)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="assets/smollm2-135m")
    parser.add_argument("--corpus", default="assets/corpus/199801_tagged.txt", help="the tagged corpus (its text is scored)")
    parser.add_argument("--lines", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--force", action="store_true", help="run even when the load average is above 1.0")
    args = parser.parse_args()
    load = require_quiet_machine(args.force)
    import jax

    from zhjax.precision import cpu_has_fast_bf16, resolve_dtype

    fast = cpu_has_fast_bf16()
    print(f"CPU multiplies bf16 natively (AVX-512 BF16 / AMX): {'yes' if fast else 'no'}; dtype auto -> "
          f"{resolve_dtype('auto', jax.default_backend())} (jax backend {jax.default_backend()})", flush=True)
    timers = {"held-out scoring, transformers (s)": scoring_timer(args.model, args.corpus, args.lines),
              "transfer output-fit product + gradient, XLA (s)": product_timer()}
    times = {(name, dt): [] for name in timers for dt in DTYPES}
    values = {}
    for r in range(args.rounds):
        for name, timer in timers.items():
            for dt in DTYPES:
                seconds, values[name, dt] = timer(dt)
                times[name, dt].append(seconds)
        print(f"round {r + 1}: " + "  ".join(f"{n.split(',')[0]} {dt} {times[n, dt][-1]:.2f}"
                                             for n in timers for dt in DTYPES), flush=True)
    print(f"\nbf16 against float32, {args.lines} held-out paragraphs and one [2048 x 576] x [79152 x 576]^T product, "
          f"load average at start {load:.2f}\n")
    print("| what | float32, median s | bfloat16, median s | bf16 / fp32 time, per round (median, min-max) | value fp32 / bf16 |")
    print("|---|---|---|---|---|")
    for name in timers:
        ratios = [b / a for a, b in zip(times[name, "float32"], times[name, "bfloat16"], strict=True)]
        print(f"| {name} | {statistics.median(times[name, 'float32']):.2f} | "
              f"{statistics.median(times[name, 'bfloat16']):.2f} | {statistics.median(ratios):.2f}x "
              f"({min(ratios):.2f}-{max(ratios):.2f}x) | {values[name, 'float32']:.4f} / {values[name, 'bfloat16']:.4f} |")


if __name__ == "__main__":
    main()
