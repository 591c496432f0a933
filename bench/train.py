"""LoRA (+ embed/head) training tokens/s on SmolLM2-135M: zhjax vs transformers + peft + torch AdamW.

    .venv/bin/python bench/train.py [--batch 4] [--seq 256] [--rounds 6]

Each system runs in its own worker process (so each one's peak RSS is its own); the parent makes them take
turns, one optimizer step at a time (A B A B ...), because these machines' speed drifts 2-5x within minutes and
only per-pair ratios from one run mean anything. Both: fp32, r=8, alpha=32, dropout 0.05 on all seven targets,
embed_tokens + lm_head trained, clipping 1.0, AdamW. The table also gives how close each gets to the machine:
the step's matmul FLOPs (counted, see `zhjax.train.metrics.flops_per_token`) over the rate of a large fp32 GEMM
measured in the same run.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import statistics
import time

import numpy as np

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def zhjax_worker(conn, model_dir: str, batch: int, seq: int) -> None:
    import jax
    import jax.numpy as jnp

    import zhjax
    from zhjax.model.params import count_params, split_model, trainable_filter
    from zhjax.train.metrics import flops_per_token
    from zhjax.train.optim import OptimConfig, build_optimizer
    from zhjax.train.step import make_train_step

    lora = zhjax.LoraConfig(r=8, lora_alpha=32, lora_dropout=0.05)
    model = zhjax.load_pretrained(model_dir, dtype="float32", lora=lora)
    graphdef, trainable, frozen = split_model(model, trainable_filter(lora))
    fpt = flops_per_token(model.config, count_params(trainable), count_params(frozen), seq, embed_trainable=True)
    tx = build_optimizer(OptimConfig(), trainable, 1000)
    opt_state = tx.init(trainable)
    step = jax.jit(make_train_step(graphdef, tx, use_dropout=True), donate_argnums=(0, 1))
    ids = jnp.asarray(np.random.default_rng(0).integers(0, model.config.vocab_size, (1, batch, seq)), jnp.int32)
    b = {"input_ids": ids, "labels": ids}
    key = jax.random.key(0)
    trainable, opt_state, m = step(trainable, opt_state, frozen, b, key, 0)  # compile
    jax.block_until_ready(m)
    conn.send(("ready", fpt))
    i = 1
    while conn.recv() == "step":
        t = time.perf_counter()
        trainable, opt_state, m = step(trainable, opt_state, frozen, b, key, i)
        jax.block_until_ready(m)
        conn.send(time.perf_counter() - t)
        i += 1
    conn.send(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def torch_worker(conn, model_dir: str, batch: int, seq: int) -> None:
    import peft
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    cfg = peft.LoraConfig(r=8, lora_alpha=32, lora_dropout=0.05, target_modules=TARGETS,
                          modules_to_save=["embed_tokens", "lm_head"])
    model = peft.get_peft_model(model, cfg)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.01)
    ids = torch.tensor(np.random.default_rng(0).integers(0, model.config.vocab_size, (batch, seq)))

    def one_step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    one_step()  # warm up
    conn.send(("ready", None))
    while conn.recv() == "step":
        t = time.perf_counter()
        one_step()
        conn.send(time.perf_counter() - t)
    conn.send(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def gemm_rate(n: int = 2048, repeats: int = 3) -> float:
    """FLOP/s of a large fp32 matmul (numpy's BLAS) on this machine, now."""
    a = np.random.default_rng(0).standard_normal((n, n), np.float32)
    b = np.random.default_rng(1).standard_normal((n, n), np.float32)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * n**3 / best


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="assets/smollm2-135m")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    from zhjax._extras import require

    require("torch", "peft", extra="torch", why="the reference side (transformers + peft)", prog="bench/train.py")
    if args.model == "assets/smollm2-135m":
        from zhjax.assets import ensure_assets

        ensure_assets("assets", quiet=True)

    ctx = mp.get_context("spawn")
    workers = {}
    for name, fn in (("zhjax", zhjax_worker), ("transformers+peft", torch_worker)):
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=fn, args=(child, args.model, args.batch, args.seq))
        proc.start()
        workers[name] = (proc, parent)
    fpt = None
    for _, conn in workers.values():
        tag, value = conn.recv()
        fpt = value if value is not None else fpt

    tokens = args.batch * args.seq
    times = {name: [] for name in workers}
    rates = []
    for r in range(args.rounds):
        rates.append(gemm_rate())
        for name, (_, conn) in workers.items():
            conn.send("step")
            times[name].append(conn.recv())
        a, b = times["zhjax"][-1], times["transformers+peft"][-1]
        print(f"round {r + 1}: zhjax {a:6.2f} s  transformers+peft {b:6.2f} s  ratio {b / a:.2f}x", flush=True)
    rss = {}
    for name, (proc, conn) in workers.items():
        conn.send("stop")
        rss[name] = conn.recv()
        proc.join()

    rate = statistics.median(rates)
    step_flops = fpt * tokens
    print(f"\nLoRA r=8 + embed/head training step, SmolLM2-135M, batch {args.batch} x {args.seq}, fp32, CPU")
    print(f"step matmul FLOPs {step_flops / 1e9:.0f} GFLOP; large fp32 GEMM in this run {rate / 1e9:.0f} GFLOP/s\n")
    print("| system | median s/step | tokens/s | peak RSS MiB | FLOPs / GEMM rate |")
    print("|---|---|---|---|---|")
    for name in workers:
        med = statistics.median(times[name])
        print(f"| {name} | {med:.2f} | {tokens / med:.0f} | {rss[name]:.0f} | {step_flops / med / rate:.0%} |")
    ratios = [b / a for a, b in zip(times["zhjax"], times["transformers+peft"], strict=True)]
    print(f"\nper-pair speed ratio zhjax / transformers+peft: median {statistics.median(ratios):.2f}x "
          f"(min {min(ratios):.2f}x, max {max(ratios):.2f}x)")


if __name__ == "__main__":
    main()
