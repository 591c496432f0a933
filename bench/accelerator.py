"""LoRA pre-training throughput on the accelerator at hand: zhjax vs transformers + peft, tokens/s and MFU.

    .venv/bin/python bench/accelerator.py                       # 1B-class and 7B-shaped LLaMA, one GPU or TPU
    .venv/bin/python bench/accelerator.py --shapes tiny --steps 3   # smoke test of the script itself (CPU)

The seed's pre-training job at each shape: random weights, vocabulary 49953, 512-token blocks, bf16 base and
matmuls, LoRA r=8 / alpha 32 / dropout 0.05 on all seven projections, embed_tokens and lm_head trained, float32
trainable weights and AdamW state, clipping 1.0. zhjax runs its real train step (`make_train_step`, attention
`cudnn` on GPUs, `xla` elsewhere); transformers + peft runs the same job in PyTorch (bf16 base, float32
trainable weights under `torch.autocast(bfloat16)`, SDPA attention, fused AdamW), on CUDA only. Both use the
first device only. Each system and shape runs in its own process (so each gets the whole device), compiles /
warms up, then times `--steps` steps.
MFU = tokens/s x training FLOPs per token (`zhjax.train.metrics.flops_per_token`, the same count for both) / the
device's dense bf16 peak (`zhjax.train.metrics.PEAK_FLOPS`). Sized to finish within 8 minutes on one H100.
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
    from zhjax.parallel.rules import batch_sharding, state_shardings
    from zhjax.train.metrics import flops_per_token, peak_flops
    from zhjax.train.optim import OptimConfig, build_optimizer
    from zhjax.train.step import make_train_step

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
    opt_state = jax.jit(tx.init)(trainable)
    rows = batch
    ids = np.random.default_rng(0).integers(0, VOCAB, (1, rows, SEQ), dtype=np.int32)
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, *batch_sharding(mesh).spec))
    data = {"input_ids": jax.device_put(ids, sharding), "labels": jax.device_put(ids, sharding)}
    step = jax.jit(make_train_step(graphdef, tx, use_dropout=True), donate_argnums=(0, 1))
    key = jax.random.key(0)
    start = time.perf_counter()
    trainable, opt_state, metrics = step(trainable, opt_state, frozen, data, key, 0)
    float(metrics["loss"])
    compile_s = time.perf_counter() - start
    trainable, opt_state, metrics = step(trainable, opt_state, frozen, data, key, 1)  # one more warm-up
    float(metrics["loss"])
    start = time.perf_counter()
    for i in range(steps):
        trainable, opt_state, metrics = step(trainable, opt_state, frozen, data, key, 2 + i)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="1b,7b", help=f"comma-separated, of {', '.join(SHAPES)}")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per system and shape")
    parser.add_argument("--batch", type=int, help="per-device batch (default: per shape, 16 for 1b, 8 for 7b)")
    parser.add_argument("--remat", default="none", help="zhjax remat policy; anything but none turns on "
                        "gradient checkpointing in transformers")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--torch-on-cpu", action="store_true", help="run the PyTorch side without CUDA (smoke test)")
    args = parser.parse_args()

    import torch

    results = []
    for shape in args.shapes.split(","):
        batch = args.batch or SHAPES[shape][1]
        z = run_worker(zhjax_worker, shape, batch, args.steps, args.remat)
        t = (run_worker(torch_worker, shape, batch, args.steps, args.remat)
             if torch.cuda.is_available() or args.torch_on_cpu else {"error": "no CUDA device"})
        results.append((shape, batch, z, t))
        print(f"{shape}: zhjax {json.dumps(z)}\n{shape}: transformers+peft {json.dumps(t)}", flush=True)

    device = next((z["device"] for _, _, z, _ in results if "device" in z), "unknown")
    print(f"\nLoRA pre-training step (vocab {VOCAB}, block {SEQ}, bf16, r=8 on 7 targets + embed/head) on {device}, "
          f"remat {args.remat}\n")
    print("| shape | system | rows/step | tokens/s | MFU | peak memory GiB | vs transformers+peft |")
    print("|---|---|---|---|---|---|---|")
    for shape, _, z, t in results:
        for name, r in (("zhjax", z), ("transformers+peft", t)):
            if "error" in r:
                print(f"| {shape} | {name} | - | {r['error']} | - | - | - |")
                continue
            mfu = r["tokens_per_s"] * z["fpt"] / z["peak"] if "fpt" in z and z.get("peak") else None
            ratio = r["tokens_per_s"] / t["tokens_per_s"] if "tokens_per_s" in t else None
            print(f"| {shape} | {name} | {r['rows']} | {r['tokens_per_s']:,.0f} | "
                  f"{f'{mfu:.1%}' if mfu is not None else 'n/a'} | {r['memory_gib']:.1f} | "
                  f"{f'{ratio:.2f}x' if ratio else '-'} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([dict(shape=s, batch=b, zhjax=z, torch=t) for s, b, z, t in results], f, indent=2)


if __name__ == "__main__":
    main()
