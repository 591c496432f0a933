"""Greedy decoding speed of SmolLM2-135M on this CPU: zhjax vs transformers `generate`, fp32 both.

    .venv/bin/python bench/generate.py [--new-tokens 64] [--repeats 3] [--torch-threads N] [--force]

For batch 1 and batch 8 (left-padded prompts of different lengths), each system generates `--new-tokens` tokens
(EOS ignored) and, separately, 1 token; runs alternate A B A B so both see the same machine load. Decode speed
is (new tokens - 1) * batch over the difference of the two times, so prompt processing and per-call setup cancel
out; the medians are reported, and end-to-end tokens/s (prefill included) beside them.

Batch-1 decoding reads every weight once per token, so it is bounded by memory bandwidth: the bound is
(bytes of the weights read per token) / (copy bandwidth), the bandwidth measured in the same run by copying a
1 GiB NumPy array (counted as STREAM counts a copy: bytes read + bytes written, per second). Each system's
batch-1 decode speed is printed as a fraction of that bound.

The last column is each system's matmuls alone: the same weight products a decode step runs (zhjax's fused
layout through XLA with its own `dense`, which at 2-32 rows is a fused multiply-sum rather than a matmul call;
transformers' `nn.Linear` weights through PyTorch), chained with nothing else, timed in the same interleaved
runs. The gap between a system's step and its matmuls is everything else (attention over the cache, norms,
sampling, framework overhead); the matmuls are the floor a system cannot go below without faster matmuls.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROMPTS = [
    "人民日报一九九八年元旦献词：迈向充满希望的新世纪。In English, this headline says",
    "The Great Wall (长城) is",
    "SmolLM2 是一个小型语言模型，它的中文能力有限。",
    "Once upon a time, in a small village,",
    "北京是中华人民共和国的首都，",
    "The three laws of robotics are",
    "请用一句话介绍上海。",
    "def fibonacci(n):",
]


def copy_bandwidth(nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """Best copy bandwidth in bytes/s over `repeats` copies of `nbytes` (read + written bytes, as STREAM)."""
    import numpy as np

    src = np.ones(nbytes // 8)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # fault the pages in
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t)
    return 2 * src.nbytes / best


def weight_bytes_per_token(model) -> int:
    """Bytes of the weights one decode step reads: every parameter, except that an untied input embedding
    is only gathered (one row per token), while a tied one is read whole as the LM head."""
    import jax
    from flax import nnx

    total = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    if not model.config.tie_word_embeddings:
        total -= model.embed_tokens.embedding[...].nbytes
    return total


def zhjax_matmuls(decoder, batch: int):
    """A callable that runs the decode step's weight products for `batch` rows through XLA, and nothing else."""
    import jax
    import jax.numpy as jnp

    from zhjax.model.decode import dense

    w, c = decoder.weights, decoder.config
    q_width, inter, f32 = c.num_attention_heads * c.head_dim, c.intermediate_size, jnp.float32

    @jax.jit
    def chain(h, w):
        for p in w.layers:
            h = h + dense(dense(h, p.qkv, None, f32)[:, :q_width], p.o, None, f32)
            gate_up = dense(h, p.gate_up, None, f32)
            h = h + dense(gate_up[:, :inter] * gate_up[:, inter:], p.down, None, f32)
        return dense(h, w.embed if w.lm_head is None else w.lm_head, None, f32)

    h = jnp.ones((batch, c.hidden_size), jnp.float32)
    return lambda: jax.block_until_ready(chain(h, w))


def torch_matmuls(ref, batch: int):
    """The same for transformers' model: its `nn.Linear` weights through PyTorch, and nothing else."""
    import torch
    from torch.nn.functional import linear

    layers = ref.model.layers
    head = ref.lm_head.weight
    h0 = torch.ones(batch, ref.config.hidden_size)

    def chain():
        with torch.no_grad():
            h = h0
            for layer in layers:
                a, m = layer.self_attn, layer.mlp
                q, k, v = linear(h, a.q_proj.weight), linear(h, a.k_proj.weight), linear(h, a.v_proj.weight)
                h = h + linear(q + k.sum() + v.sum(), a.o_proj.weight)
                h = h + linear(linear(h, m.gate_proj.weight) * linear(h, m.up_proj.weight), m.down_proj.weight)
            return linear(h, head)

    return chain


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--torch-threads", type=int, help="torch.set_num_threads (default: torch's own choice)")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--force", action="store_true", help="run even when the load average is above 1.0")
    args = parser.parse_args(argv)
    from quiet import load_line, require_quiet_machine

    require_quiet_machine(args.force)

    import torch
    import transformers

    import zhjax
    from zhjax.assets import ensure_assets
    from zhjax.infer.generate import Decoder, generate_ids

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    model_dir = ensure_assets(Path(__file__).resolve().parents[1] / "assets").smollm2_dir
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"
    ref = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    model = zhjax.load_pretrained(model_dir, dtype="float32")
    decoder = Decoder(model)
    weight_bytes = weight_bytes_per_token(model)

    def run_zhjax(prompts, n):
        ids = [tok(p)["input_ids"] for p in prompts]
        t = time.perf_counter()
        out = generate_ids(decoder, ids, max_new_tokens=n, greedy=True, repetition_penalty=1.0, eos_token_id=())
        elapsed = time.perf_counter() - t
        assert all(len(row) == n for row in out)
        return elapsed

    def run_hf(prompts, n):
        batch = tok(prompts, return_tensors="pt", padding=True)
        t = time.perf_counter()
        with torch.no_grad():
            out = ref.generate(**batch, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                               pad_token_id=tok.pad_token_id)
        elapsed = time.perf_counter() - t
        assert out.shape[1] - batch["input_ids"].shape[1] == n
        return elapsed

    systems = {"zhjax": run_zhjax, "transformers": run_hf}
    batches = [int(b) for b in args.batches.split(",")]
    n = args.new_tokens
    for b in batches:  # warm up: compile, first-call setup
        for run in systems.values():
            run(PROMPTS[:b], n)
            run(PROMPTS[:b], 1)
    matmuls = {("zhjax", b): zhjax_matmuls(decoder, b) for b in batches}
    matmuls.update({("transformers", b): torch_matmuls(ref, b) for b in batches})
    for chain in matmuls.values():
        chain()

    def time_matmuls(chain, reps: int = 10) -> float:
        t = time.perf_counter()
        for _ in range(reps):
            chain()
        return (time.perf_counter() - t) / reps

    times = {(name, b, k): [] for name in systems for b in batches for k in (1, n)}
    matmul_times = {key: [] for key in matmuls}
    bandwidths = []
    for _ in range(args.repeats):
        bandwidths.append(copy_bandwidth())
        for b in batches:
            for name, run in systems.items():  # A B A B: the systems alternate within each repeat
                times[(name, b, n)].append(run(PROMPTS[:b], n))
                times[(name, b, 1)].append(run(PROMPTS[:b], 1))
                matmul_times[(name, b)].append(time_matmuls(matmuls[(name, b)]))
    bandwidth = statistics.median(bandwidths)
    bound = bandwidth / weight_bytes

    print(f"\nSmolLM2-135M fp32, greedy, {n} new tokens, medians of {args.repeats} interleaved runs; "
          f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, jax {__import__('jax').__version__}; "
          f"after: {load_line()}")
    print(f"copy bandwidth {bandwidth / 1e9:.1f} GB/s (read + write); weights read per token {weight_bytes / 1e6:.0f} MB; "
          f"batch-1 bound {bound:.1f} tokens/s ({1e3 / bound:.1f} ms/token)\n")
    header = (f"{'batch':>5}  {'system':<12} {'decode tok/s':>12} {'ms/step':>8} {'end-to-end tok/s':>16} {'speedup':>8} "
              f"{'of bound':>8} {'matmuls ms':>10}")
    print(header)
    print("-" * len(header))
    for b in batches:
        rates = {}
        for name in systems:
            t_n, t_1 = statistics.median(times[(name, b, n)]), statistics.median(times[(name, b, 1)])
            step = (t_n - t_1) / (n - 1)
            rates[name] = (b / step, step, b * n / t_n)
        for name in systems:
            rate, step, e2e = rates[name]
            speedup = rate / rates["transformers"][0]
            frac = f"{rate / bound:.0%}" if b == 1 else ""
            mm = statistics.median(matmul_times[(name, b)]) * 1e3
            print(f"{b:>5}  {name:<12} {rate:>12.1f} {step * 1e3:>8.1f} {e2e:>16.1f} {speedup:>7.2f}x {frac:>8} {mm:>10.1f}")
    print("\nraw medians (s): " + ", ".join(f"{k[0]} b{k[1]} n{k[2]}: {statistics.median(v):.2f}" for k, v in times.items()))
    print("spread (min-max s): " + ", ".join(f"{k[0]} b{k[1]} n{k[2]}: {min(v):.2f}-{max(v):.2f}" for k, v in times.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
