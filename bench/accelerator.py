"""LoRA pre-training throughput on the accelerator at hand: zhjax vs transformers + peft, tokens/s and MFU.

    .venv/bin/python bench/accelerator.py                       # 1B-class and 7B-shaped LLaMA, one GPU or TPU
    .venv/bin/python bench/accelerator.py --shapes tiny --steps 2 --torch-on-cpu   # smoke test (CPU)

The seed's pre-training job at each shape: random weights, vocabulary 49953, 512-token blocks, bf16 base and
matmuls, LoRA r=8 / alpha 32 / dropout 0.05 on all seven projections, embed_tokens and lm_head trained, float32
trainable weights and AdamW state, clipping 1.0. zhjax runs its real train step (`build_train_step`, attention
`cudnn` on GPUs, `xla` elsewhere); transformers + peft runs the same job in PyTorch (bf16 base, float32
trainable weights under `torch.autocast(bfloat16)`, SDPA attention, fused AdamW), on CUDA only. Both use the
first device only. Each system and shape runs in its own process (so each gets the whole device), compiles /
warms up, then times `--steps` steps; the two systems alternate for `--rounds` rounds (A B A B), and the table
gives each system's median and the median of the per-round ratios.
MFU = tokens/s x training FLOPs per token (`zhjax.train.metrics.flops_per_token`, the same count for both) / the
device's dense bf16 peak (`zhjax.train.metrics.PEAK_FLOPS`). Meant to finish within 8 minutes on one H100
(2 shapes x 2 systems x 2 rounds = 8 processes); not yet timed on one: this project has had no GPU.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import time

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VOCAB, SEQ = 49953, 512

# name -> (architecture, per-device batch): TinyLlama-1.1B's shape, LLaMA-7B's shape, and a CPU-sized smoke shape
SHAPES = {
    "1b": (dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                num_key_value_heads=4), 16),
    "7b": (dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=32), 8),
    "tiny": (dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2), 2),
}


def zhjax_worker(conn, shape: str, batch: int, steps: int, remat: str) -> None:
    """Build the random model on the first device, compile the step, time `steps` steps."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from zhjax.config import LoraConfig, ModelConfig
    from zhjax.model.llama import LlamaForCausalLM
    from zhjax.model.params import count_params, split_model, trainable_filter
    from zhjax.parallel.mesh import make_mesh
    from zhjax.parallel.rules import state_shardings
    from zhjax.train.metrics import flops_per_token, peak_flops
    from zhjax.train.optim import OptimConfig, build_optimizer
    from zhjax.train.state import init_train_state
    from zhjax.train.step import build_train_step

    device = jax.devices()[0]
    arch, _ = SHAPES[shape]
    attention = "cudnn" if device.platform == "gpu" else "xla"
    config = ModelConfig(vocab_size=VOCAB, **arch, dtype="bfloat16", param_dtype="bfloat16", remat=remat,
                         attention=attention)
    lora = LoraConfig(r=8, lora_alpha=32, lora_dropout=0.05)
    mesh = make_mesh(None, devices=[device])
    abstract = nnx.eval_shape(lambda: LlamaForCausalLM(config, lora, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    state = jax.jit(lambda: nnx.split(LlamaForCausalLM(config, lora, rngs=nnx.Rngs(0)))[1],
                    out_shardings=state_shardings(state, mesh))()
    model = nnx.merge(graphdef, state)
    graphdef, trainable, frozen = split_model(model, trainable_filter(lora))
    del model, state
    trainable = jax.tree.map(lambda x: x.astype(jnp.float32), trainable)
    n_train, n_frozen = count_params(trainable), count_params(frozen)
    tx = build_optimizer(OptimConfig(), trainable, 1000)
    step = build_train_step(graphdef, tx, trainable, frozen, mesh, lora=lora)  # the trainer's step
    train_state = init_train_state(tx, trainable, 0, step.state_shardings)
    del trainable
    rows = batch
    ids = np.random.default_rng(0).integers(0, VOCAB, (1, rows, SEQ), dtype=np.int32)
    data = {"input_ids": jax.device_put(ids, step.batch_sharding), "labels": jax.device_put(ids, step.batch_sharding)}
    start = time.perf_counter()
    train_state, metrics = step(train_state, frozen, data)
    float(metrics["loss"])
    compile_s = time.perf_counter() - start
    train_state, metrics = step(train_state, frozen, data)  # one more warm-up
    float(metrics["loss"])
    start = time.perf_counter()
    for _ in range(steps):
        train_state, metrics = step(train_state, frozen, data)
    float(metrics["loss"])
    elapsed = time.perf_counter() - start
    fpt = flops_per_token(config, n_train, n_frozen, SEQ, embed_trainable=True)
    stats = device.memory_stats() or {}
    conn.send(dict(
        tokens_per_s=rows * SEQ * steps / elapsed, fpt=fpt, peak=peak_flops(device),
        device=device.device_kind, compile_s=compile_s, memory_gib=stats.get("peak_bytes_in_use", 0) / 2**30,
        attention=attention, rows=rows,
    ))


def torch_worker(conn, shape: str, batch: int, steps: int, remat: str) -> None:
    """The same job with transformers + peft + torch AdamW on one CUDA device (the CPU for smoke tests)."""
    import peft
    import torch
    import transformers

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    arch, _ = SHAPES[shape]
    config = transformers.LlamaConfig(vocab_size=VOCAB, max_position_embeddings=2048, **arch)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(dev):  # initialised in place, in bf16
        model = transformers.LlamaForCausalLM(config)
    torch.set_default_dtype(torch.float32)
    if remat != "none":
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=32, lora_dropout=0.05, target_modules=TARGETS,
                                                       modules_to_save=["embed_tokens", "lm_head"]))
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:  # float32 master weights, as zhjax keeps them
        p.data = p.data.float()
    opt = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.01, fused=dev == "cuda")
    ids = torch.randint(0, VOCAB, (batch, SEQ), device=dev)
    model.train()

    def one_step():
        with torch.autocast(dev, dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    for _ in range(2):
        one_step()
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        one_step()
    sync()
    elapsed = time.perf_counter() - start
    cuda = dev == "cuda"
    conn.send(dict(tokens_per_s=batch * SEQ * steps / elapsed, rows=batch,
                   memory_gib=torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0,
                   device=torch.cuda.get_device_name() if cuda else "cpu"))


def run_worker(fn, *args) -> dict:
    """Run `fn` in a fresh process (the device to itself) and return what it sent, or the error."""
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=fn, args=(child, *args))
    proc.start()
    proc.join()
    if parent.poll():
        return parent.recv()
    return {"error": f"exit code {proc.exitcode}"}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="1b,7b", help=f"comma-separated, of {', '.join(SHAPES)}")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per system, shape and round")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds (zhjax, transformers, zhjax, "
                        "...); the table shows each system's median and the median of the per-round ratios")
    parser.add_argument("--batch", type=int, help="per-device batch (default: per shape, 16 for 1b, 8 for 7b)")
    parser.add_argument("--remat", default="none", help="zhjax remat policy; anything but none turns on "
                        "gradient checkpointing in transformers")
    parser.add_argument("--json", help="also write the results here (rewritten after every run, so an interrupted "
                        "benchmark keeps what it measured)")
    parser.add_argument("--torch-on-cpu", action="store_true", help="run the PyTorch side without CUDA (smoke test)")
    args = parser.parse_args(argv)

    import torch

    torch_ok = torch.cuda.is_available() or args.torch_on_cpu
    runs = []  # (shape, batch, round, zhjax result, torch result)
    for shape in args.shapes.split(","):
        batch = args.batch or SHAPES[shape][1]
        for r in range(args.rounds):
            z = run_worker(zhjax_worker, shape, batch, args.steps, args.remat)
            t = run_worker(torch_worker, shape, batch, args.steps, args.remat) if torch_ok else {"error": "no CUDA device"}
            runs.append((shape, batch, r, z, t))
            print(f"{shape} round {r}: zhjax {json.dumps(z)}\n{shape} round {r}: transformers+peft {json.dumps(t)}",
                  flush=True)
            if args.json:
                with open(args.json, "w") as f:
                    json.dump([dict(shape=s, batch=b, round=i, zhjax=zr, torch=tr) for s, b, i, zr, tr in runs], f,
                              indent=2)
    print(format_table(runs, args.remat))


def format_table(runs: list, remat: str) -> str:
    """Per shape and system: median tokens/s over the rounds, MFU, peak memory and the median per-round ratio."""
    import statistics

    device = next((z["device"] for *_, z, _ in runs if "device" in z), "unknown")
    out = [f"\nLoRA pre-training step (vocab {VOCAB}, block {SEQ}, bf16, r=8 on 7 targets + embed/head) on {device}, "
           f"remat {remat}, {max(r for _, _, r, _, _ in runs) + 1} interleaved rounds\n",
           "| shape | system | rows/step | tokens/s (median) | MFU | peak memory GiB | vs transformers+peft |",
           "|---|---|---|---|---|---|---|"]
    for shape in dict.fromkeys(s for s, *_ in runs):
        rows = [(z, t) for s, _, _, z, t in runs if s == shape]
        ratios = [z["tokens_per_s"] / t["tokens_per_s"] for z, t in rows if "tokens_per_s" in z and "tokens_per_s" in t]
        fpt_peak = next(((z["fpt"], z["peak"]) for z, _ in rows if z.get("peak")), None)
        for i, name in enumerate(("zhjax", "transformers+peft")):
            ok = [pair[i] for pair in rows if "tokens_per_s" in pair[i]]
            if not ok:
                errors = {pair[i].get("error", "no result") for pair in rows}
                out.append(f"| {shape} | {name} | - | {'; '.join(sorted(errors))} | - | - | - |")
                continue
            tps = statistics.median(r["tokens_per_s"] for r in ok)
            mfu = f"{tps * fpt_peak[0] / fpt_peak[1]:.1%}" if fpt_peak else "n/a"
            ratio = "-" if not ratios else f"{statistics.median(ratios):.2f}x" if i == 0 else "1.00x"
            out.append(f"| {shape} | {name} | {ok[0]['rows']} | {tps:,.0f} | {mfu} | "
                       f"{max(r['memory_gib'] for r in ok):.1f} | {ratio} |")
    return "\n".join(out)


if __name__ == "__main__":
    main()
