"""Forward tokens/s of SmolLM2-135M, zhjax vs transformers, fp32, batch 4 x 256, runs interleaved A B A B.

    .venv/bin/python bench/forward.py [--model assets/smollm2-135m] [--batch 4] [--seq 256] [--rounds 5] [--force]

These machines' speed drifts by 2-5x within minutes, so only the per-pair ratios of one run mean anything.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers
from flax import nnx

import zhjax


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="assets/smollm2-135m")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--force", action="store_true", help="run even when the load average is above 1.0")
    args = parser.parse_args()
    from quiet import load_line, require_quiet_machine

    require_quiet_machine(args.force)
    if args.model == "assets/smollm2-135m":
        from zhjax.assets import ensure_assets

        ensure_assets("assets", quiet=True)

    ids = np.random.default_rng(0).integers(0, 49152, (args.batch, args.seq))
    tokens = args.batch * args.seq

    model = zhjax.load_pretrained(args.model, dtype="float32")
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda state, ids: nnx.merge(graphdef, state)(ids))
    jids = jnp.asarray(ids)
    forward(state, jids).block_until_ready()  # compile

    torch.set_grad_enabled(False)
    ref = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    tids = torch.tensor(ids)
    ref(tids)  # warm up

    def run_zhjax():
        t = time.perf_counter()
        forward(state, jids).block_until_ready()
        return time.perf_counter() - t

    def run_torch():
        t = time.perf_counter()
        ref(tids)
        return time.perf_counter() - t

    rows = []
    for r in range(args.rounds):
        a, b = run_zhjax(), run_torch()
        rows.append((a, b))
        print(f"round {r + 1}: zhjax {tokens / a:8.0f} tok/s   transformers {tokens / b:8.0f} tok/s   ratio {b / a:.2f}x")
    za = statistics.median(a for a, _ in rows)
    tb = statistics.median(b for _, b in rows)
    ratios = [b / a for a, b in rows]
    print()
    print(f"| system | median s/forward | tokens/s | (batch {args.batch} x {args.seq}, fp32, {jax.devices()[0].platform}) |")
    print("|---|---|---|---|")
    print(f"| zhjax | {za:.3f} | {tokens / za:.0f} | |")
    print(f"| transformers {transformers.__version__} (torch {torch.__version__}) | {tb:.3f} | {tokens / tb:.0f} | |")
    print(f"\nper-pair speed ratio zhjax/transformers: median {statistics.median(ratios):.2f}x "
          f"(min {min(ratios):.2f}x, max {max(ratios):.2f}x)")
    print(f"after: {load_line()}")


if __name__ == "__main__":
    main()
