"""LoRA (+ embed/head) training tokens/s on the demo's model: zhjax (fp32 and fast) vs transformers + peft.

    .venv/bin/python bench/train.py [--vocab 55152] [--untied] [--batch 4] [--seq 256] [--rounds 6] [--force]
                                    [--only ROW ...] [--baseline REV]

The model is SmolLM2-135M grown to 55152 rows (`--vocab`: the demo's shape with 6000 new tokens, which the README's
tables measured; the demo has 79152 since it extends by 30000; new rows random, which does not change the cost),
tied as SmolLM2 is or with an untied head (`--untied`), written once as an HF checkpoint under `outputs/bench-train/`
that both systems load. Each system runs in its own worker process (so each one's peak
RSS is its own); the parent makes them take turns, one optimizer step at a time (A B C A B C ...), because
these machines' speed drifts 2-5x within minutes and only per-pair ratios from one run mean anything. The load
average is printed first and a run refuses to start above 1.0 (other jobs skew the ratios) unless `--force`.

All rows: r=8, alpha=32, dropout 0.05 on all seven targets, embed_tokens + lm_head trained, clipping 1.0,
AdamW. Rows: zhjax fp32 (the setting the training-parity test pins against PyTorch), zhjax bf16 (`dtype:
bfloat16`: bf16 products with float32 accumulation, float32 master weights and Adam state), the same with every
activation saved for the backward (`remat: none`; the other zhjax rows run the trainer's default policy), the
same with the fused chunked LM head + loss (`loss_chunk_size: 256`), and transformers + peft fp32. `--only`
picks rows (default: all but the chunked loss, which would not fit a 24 GiB machine beside the others); `--baseline REV` adds zhjax as it was at git revision REV (that revision's own fp32 worker and
package, extracted under `outputs/bench-train/`), so a speed-up is measured against the code it started from, in
the same run. The table also gives how close each gets to the machine: the step's matmul FLOPs (counted, see
`zhjax.train.metrics.flops_per_token`) over the rate of a large GEMM measured in the same run (fp32 numpy; the
bf16 row's ceiling is about twice that on AVX-512 BF16 CPUs).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import statistics
import time

import numpy as np

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def zhjax_worker(conn, model_dir: str, batch: int, seq: int, dtype: str = "float32", loss_chunk: int = 0,
                 remat: str = "none") -> None:
    import jax
    import jax.numpy as jnp

    import zhjax
    from zhjax.model.params import count_params, split_model, trainable_filter
    from zhjax.parallel.mesh import make_mesh
    from zhjax.train.metrics import flops_per_token
    from zhjax.train.optim import OptimConfig, build_optimizer
    from zhjax.train.state import init_train_state
    from zhjax.train.step import build_train_step

    lora = zhjax.LoraConfig(r=8, lora_alpha=32, lora_dropout=0.05)
    model = zhjax.load_pretrained(model_dir, dtype=dtype, lora=lora, remat=remat)
    graphdef, trainable, frozen = split_model(model, trainable_filter(lora))
    trainable = jax.tree.map(lambda x: x.astype(jnp.float32), trainable)  # master weights in fp32, as the trainer
    fpt = flops_per_token(model.config, count_params(trainable), count_params(frozen), seq, embed_trainable=True)
    tx = build_optimizer(OptimConfig(), trainable, 1000)
    step = build_train_step(graphdef, tx, trainable, frozen, make_mesh(), lora=lora, loss_chunk=loss_chunk)
    state = init_train_state(tx, trainable, 0, step.state_shardings)
    del trainable
    ids = jnp.asarray(np.random.default_rng(0).integers(0, model.config.vocab_size, (1, batch, seq)), jnp.int32)
    b = {"input_ids": ids, "labels": ids}
    state, m = step(state, frozen, b)  # compile
    jax.block_until_ready(m)
    conn.send(("ready", fpt))
    while conn.recv() == "step":
        t = time.perf_counter()
        state, m = step(state, frozen, b)
        jax.block_until_ready(m)
        conn.send(time.perf_counter() - t)
    conn.send(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def torch_worker(conn, model_dir: str, batch: int, seq: int, *_) -> None:
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


def baseline_worker(conn, model_dir: str, batch: int, seq: int, tree: str, dtype: str = "float32",
                    remat: str | None = None) -> None:
    """The zhjax worker of an earlier revision (`--baseline`): its own `bench/train.py` and `zhjax`, from `tree`;
    `dtype` and `remat` are passed on only for a bf16 baseline (the oldest workers take neither)."""
    import importlib.util
    import sys

    sys.path.insert(0, tree)  # before the installed (editable) zhjax: this process imports the old package
    spec = importlib.util.spec_from_file_location("baseline_bench_train", os.path.join(tree, "bench", "train.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    import zhjax

    assert os.path.dirname(zhjax.__file__) == os.path.join(tree, "zhjax"), zhjax.__file__
    kwargs = {} if dtype == "float32" else {"dtype": dtype, "remat": remat}
    module.zhjax_worker(conn, model_dir, batch, seq, **kwargs)  # the earlier worker speaks the same pipe protocol


def baseline_tree(rev: str) -> str:
    """The files of git revision `rev` under outputs/bench-train/ (`git archive`, once per commit)."""
    import subprocess
    from pathlib import Path

    from zhjax.ownership import atomic_path

    sha = subprocess.run(["git", "rev-parse", "--verify", f"{rev}^{{commit}}"], capture_output=True, text=True,
                         check=True).stdout.strip()
    tree = os.path.abspath(f"outputs/bench-train/rev-{sha[:12]}")
    if not os.path.exists(tree):
        archive = subprocess.run(["git", "archive", sha], capture_output=True, check=True).stdout
        with atomic_path(Path(tree)) as tmp:  # an interrupted extraction leaves no half tree behind
            tmp.mkdir()
            subprocess.run(["tar", "-x", "-C", str(tmp)], input=archive, check=True)
    return tree


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


def demo_model(base: str, vocab: int, untied: bool) -> str:
    """`base` grown to `vocab` rows (and untied), saved once as an HF checkpoint; returns its directory."""
    out = f"outputs/bench-train/{os.path.basename(base.rstrip('/'))}-{vocab}-{'untied' if untied else 'tied'}"
    if os.path.exists(os.path.join(out, "config.json")):
        return out
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if untied:
        model.config.tie_word_embeddings = False
        model.lm_head.weight = torch.nn.Parameter(model.get_input_embeddings().weight.detach().clone())
    if vocab != model.config.vocab_size:
        model.resize_token_embeddings(vocab, mean_resizing=False)
    model.save_pretrained(out)
    return out


SYSTEMS = {  # row name -> (worker, dtype, loss_chunk_size, remat); remat None: the trainer's default
    "zhjax fp32": (zhjax_worker, "float32", 0, None),
    "zhjax bf16": (zhjax_worker, "bfloat16", 0, None),
    "zhjax bf16, remat none": (zhjax_worker, "bfloat16", 0, "none"),
    "zhjax bf16 + chunked loss": (zhjax_worker, "bfloat16", 256, None),
    "transformers+peft fp32": (torch_worker, "float32", 0, None),
}
# without --only: four workers, about 18 GiB of peak RSS together (all five with a baseline do not fit 23 GiB)
DEFAULT_ROWS = ["zhjax fp32", "zhjax bf16", "zhjax bf16, remat none", "transformers+peft fp32"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="assets/smollm2-135m")
    parser.add_argument("--vocab", type=int, default=55152, help="rows of the embedding/head (55152: the 6000-token demo's; the demo now has 79152)")
    parser.add_argument("--untied", action="store_true", help="a separate trainable lm_head")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--only", nargs="*", choices=list(SYSTEMS), help="a subset of the rows")
    parser.add_argument("--force", action="store_true", help="run even when the load average is above 1.0")
    parser.add_argument("--baseline", metavar="REV", help="add a row: zhjax at git revision REV, as that revision's "
                        "own bench/train.py ran it (its zhjax worker, its package), e.g. the commit an issue measured")
    parser.add_argument("--baseline-dtype", choices=["float32", "bfloat16"], default="float32",
                        help="the baseline row's dtype (bfloat16 needs a revision whose worker takes one; it then runs "
                             "with this revision's default remat, as the zhjax rows do)")
    args = parser.parse_args()
    from zhjax._extras import require
    from zhjax.train.config import JobConfig  # the trainer's default remat policy, what the zhjax rows run

    require("torch", "peft", extra="torch", why="the reference side (transformers + peft)", prog="bench/train.py")
    from quiet import require_quiet_machine

    load = require_quiet_machine(args.force)
    if args.model == "assets/smollm2-135m":
        from zhjax.assets import ensure_assets

        ensure_assets("assets", quiet=True)
    model_dir = demo_model(args.model, args.vocab, args.untied)

    ctx = mp.get_context("spawn")
    workers = {}
    for name in args.only or DEFAULT_ROWS:
        fn, dtype, chunk, remat = SYSTEMS[name]
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=fn, args=(child, model_dir, args.batch, args.seq, dtype, chunk, remat or JobConfig.remat))
        proc.start()
        workers[name] = (proc, parent)
    if args.baseline:
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=baseline_worker, args=(child, model_dir, args.batch, args.seq,
                                                         baseline_tree(args.baseline), args.baseline_dtype,
                                                         JobConfig.remat))
        proc.start()
        suffix = "" if args.baseline_dtype == "float32" else " bf16"
        workers[f"zhjax at {args.baseline}{suffix}"] = (proc, parent)
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
        print(f"round {r + 1}: " + "  ".join(f"{n} {t[-1]:6.2f} s" for n, t in times.items()), flush=True)
    rss = {}
    for name, (proc, conn) in workers.items():
        conn.send("stop")
        rss[name] = conn.recv()
        proc.join()

    rate = statistics.median(rates)
    step_flops = (fpt or 0) * tokens
    head = "untied" if args.untied else "tied"
    print(f"\nLoRA r=8 + embed/head training step, SmolLM2-135M with {args.vocab} rows ({head}), batch {args.batch} "
          f"x {args.seq}, CPU, load average at start {load:.2f}")
    print(f"step matmul FLOPs {step_flops / 1e9:.0f} GFLOP; large fp32 GEMM in this run {rate / 1e9:.0f} GFLOP/s\n")
    print("| system | median s/step | tokens/s | peak RSS MiB | FLOPs / fp32 GEMM rate |")
    print("|---|---|---|---|---|")
    for name in workers:
        med = statistics.median(times[name])
        print(f"| {name} | {med:.2f} | {tokens / med:.0f} | {rss[name]:.0f} | {step_flops / med / rate:.0%} |")
    names = list(workers)
    print()
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            ratios = [tb / ta for ta, tb in zip(times[a], times[b], strict=True)]
            print(f"per-pair speed ratio {a} / {b}: median {statistics.median(ratios):.2f}x "
                  f"(min {min(ratios):.2f}x, max {max(ratios):.2f}x)")


if __name__ == "__main__":
    main()
