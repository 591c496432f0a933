"""Where the demo's training step spends its time: each part timed alone, interleaved with the whole step.

    .venv/bin/python bench/step_profile.py [--dtype float32|bfloat16] [--loss-chunk 0|256] [--untied] [--remat P]
                                           [--rounds 3]

SmolLM2-135M's shape grown to 55152 rows (random weights: the cost does not depend on them), LoRA r8 on all
seven projections + embed/head trained, batch 4 x 256, as `bench/train.py`. Every part is jitted on the real
shapes; each round runs the whole step and then every part once, so each part's share is its time over the
step's time *in the same round* (this machine's speed drifts too much for shares across rounds). Parts overlap
by construction (the body includes the base products and attention), so the shares do not add up to 100%.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from zhjax.config import LoraConfig
from zhjax.convert.hf import read_config
from zhjax.model.llama import LlamaForCausalLM
from zhjax.model.matmul import matmul
from zhjax.model.params import modules_filter, split_model, trainable_filter
from zhjax.parallel.mesh import make_mesh
from zhjax.train.config import JobConfig
from zhjax.train.optim import OptimConfig, build_optimizer
from zhjax.train.state import init_train_state
from zhjax.train.step import build_train_step, loss_sum_fn


def parts(args) -> dict:
    """name -> a zero-argument function running that part once (compiled on first call)."""
    cfg, _ = read_config(args.model)
    cfg = cfg.replace(vocab_size=args.vocab, tie_word_embeddings=not args.untied, dtype=args.dtype,
                      param_dtype=args.dtype, remat=args.remat)
    lora = LoraConfig(r=8, lora_alpha=32, lora_dropout=0.05)
    gd, tr, fr = split_model(LlamaForCausalLM(cfg, lora, rngs=nnx.Rngs(0)), trainable_filter(lora))
    tr = jax.tree.map(lambda x: x.astype(jnp.float32), tr)
    b, t, d = args.batch, args.seq, cfg.hidden_size
    ids = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (b, t)), jnp.int32)
    batch = {"input_ids": ids, "labels": ids}
    key = jax.random.key(0)
    tx = build_optimizer(OptimConfig(), tr, 1000)
    chunk = args.loss_chunk
    step = build_train_step(gd, tx, tr, fr, make_mesh(), lora=lora, loss_chunk=chunk)  # the trainer's step
    # the step donates its state: the timed calls start from a copy, so `tr` and `opt` stay usable for the parts
    state = init_train_state(tx, jax.tree.map(jnp.copy, tr), 0, step.state_shardings)
    opt = jax.tree.map(jnp.copy, state.opt_state)
    b1 = {k: v[None] for k, v in batch.items()}
    whole = {"state": state}

    def whole_step():
        whole["state"], metrics = step(whole["state"], fr, b1)
        return metrics

    out = {"whole step": whole_step}
    vg = jax.jit(jax.grad(lambda p, r: loss_sum_fn(gd, p, fr, batch, r, chunk)[0]))
    out["loss fwd+bwd (no optimizer)"] = lambda: vg(tr, key)
    grads = jax.tree.map(lambda x: x * 1e-3, tr)
    upd = jax.jit(lambda g, o, p: optax.apply_updates(p, tx.update(g, o, p)[0]))
    out["clip + AdamW update (32 M trainable)"] = lambda: upd(grads, opt, tr)

    r = jnp.asarray(np.random.default_rng(2).standard_normal((b, t, d)), jnp.float32)

    def body(p, rng):
        return jnp.sum(nnx.merge(gd, p, fr).hidden_states(ids, dropout_rng=rng).astype(jnp.float32) * r)

    bg = jax.jit(jax.grad(body))
    out["decoder body fwd+bwd (dropout)"] = lambda: bg(tr, key)
    bg0 = jax.jit(jax.grad(lambda p: body(p, None)))
    out["decoder body fwd+bwd (no dropout)"] = lambda: bg0(tr)
    gd2, tr2, fr2 = split_model(LlamaForCausalLM(cfg, None, rngs=nnx.Rngs(0)), modules_filter(("embed_tokens",)))
    tr2 = jax.tree.map(lambda x: x.astype(jnp.float32), tr2)
    b2 = jax.jit(jax.grad(lambda p: jnp.sum(nnx.merge(gd2, p, fr2).hidden_states(ids).astype(jnp.float32) * r)))
    out["decoder body fwd+bwd, no LoRA"] = lambda: b2(tr2)

    h = jnp.asarray(np.random.default_rng(1).standard_normal((b, t, d)), jnp.dtype(args.dtype))

    def head(p, h):  # the loss from the final hidden states: LM head + cross-entropy
        m = nnx.merge(gd, p, fr)
        return _head(m, h)

    def _head(m, h):
        from zhjax.train.loss import chunked_head_loss
        from zhjax.train.step import next_token_targets, token_losses

        if not chunk:
            return token_losses(m.logits_from_hidden(h), batch)[0].sum()
        tgt, w = next_token_targets(batch)
        hh = h[:, :-1].reshape(-1, d)
        return chunked_head_loss(hh, m.lm_head_weight(), tgt.reshape(-1), w.reshape(-1).astype(jnp.float32), chunk)

    hg = jax.jit(jax.grad(head, argnums=(0, 1)))
    out["LM head + cross-entropy fwd+bwd"] = lambda: hg(tr, h)

    dt = jnp.dtype(args.dtype)
    rng = np.random.default_rng(3)
    shapes = [(d, cfg.num_attention_heads * cfg.head_dim), (d, cfg.num_key_value_heads * cfg.head_dim),
              (d, cfg.num_key_value_heads * cfg.head_dim), (cfg.num_attention_heads * cfg.head_dim, d),
              (d, cfg.intermediate_size), (d, cfg.intermediate_size), (cfg.intermediate_size, d)]
    ws = [jnp.asarray(rng.standard_normal(s) * 0.02, dt) for s in shapes]
    xs = [jnp.asarray(rng.standard_normal((b * t, s[0])), dt) for s in shapes]
    base = jax.jit(jax.grad(lambda xs, ws: sum(jnp.sum(matmul(x, w).astype(jnp.float32))
                                               for x, w in zip(xs, ws, strict=True))))
    n = cfg.num_hidden_layers
    out[f"frozen base products fwd + input grad (x{n} layers)"] = (lambda: base(xs, ws), n)
    a_ = [jnp.asarray(rng.standard_normal((s[0], 8)) * 0.02, jnp.float32) for s in shapes]
    b_ = [jnp.asarray(rng.standard_normal((8, s[1])) * 0.02, jnp.float32) for s in shapes]

    def lora_loss(ab, xs):
        return sum(jnp.sum(matmul(matmul(x, a.astype(dt)), bb.astype(dt)).astype(jnp.float32))
                   for x, a, bb in zip(xs, *ab, strict=True))

    lg = jax.jit(jax.grad(lora_loss, argnums=(0, 1)))
    out[f"LoRA r8 products fwd+bwd (x{n} layers)"] = (lambda: lg((a_, b_), xs), n)
    hq, hk, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    q = jnp.asarray(rng.standard_normal((b, t, hq, hd)), dt)
    k = jnp.asarray(rng.standard_normal((b, t, hk, hd)), dt)
    v = jnp.asarray(rng.standard_normal((b, t, hk, hd)), dt)
    att = jax.jit(jax.grad(lambda q, k, v: jnp.sum(jax.nn.dot_product_attention(
        q, k, v, is_causal=True, scale=hd**-0.5).astype(jnp.float32)), argnums=(0, 1, 2)))
    out[f"attention fwd+bwd (x{n} layers)"] = (lambda: att(q, k, v), n)
    e = jnp.asarray(rng.standard_normal((cfg.vocab_size, d)) * 0.02, jnp.float32)
    eg = jax.jit(jax.grad(lambda e: jnp.sum(jnp.take(e, ids, axis=0) * r)))
    out["embedding gather + scatter grad"] = lambda: eg(e)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="assets/smollm2-135m", help="an HF dir; only its config is read")
    parser.add_argument("--vocab", type=int, default=55152)
    parser.add_argument("--untied", action="store_true")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--loss-chunk", type=int, default=0)
    parser.add_argument("--remat", default=JobConfig.remat, help="the layers' remat policy (default: the trainer's)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    fns = {name: (f if isinstance(f, tuple) else (f, 1)) for name, f in parts(args).items()}
    for name, (f, _) in fns.items():  # compile
        jax.block_until_ready(f())
        print(f"compiled {name}", flush=True)
    times = {name: [] for name in fns}
    for _ in range(args.rounds):
        for name, (f, mult) in fns.items():
            t = time.perf_counter()
            jax.block_until_ready(f())
            times[name].append((time.perf_counter() - t) * mult)
    whole = times["whole step"]
    setting = f"{args.dtype}, loss_chunk_size {args.loss_chunk}, {'untied' if args.untied else 'tied'} head, remat {args.remat}"
    print(f"\n{setting}; median of {args.rounds} interleaved rounds\n")
    print("| part | s | share of the step (same round) |")
    print("|---|---|---|")
    for name, ts in times.items():
        share = statistics.median(t / w for t, w in zip(ts, whole, strict=True))
        print(f"| {name} | {statistics.median(ts):.2f} | {share:.0%} |")


if __name__ == "__main__":
    main()
