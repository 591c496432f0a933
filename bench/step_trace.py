"""Where the demo's compiled training step spends its time, by the source function of each compiled op.

    .venv/bin/python bench/step_trace.py [--dtype bfloat16|float32] [--tied] [--top N]

The trainer's step on the demo's shape (SmolLM2-135M at 55152 rows, LoRA r8 on the seven projections + embed/head,
4 x 256 tokens, random weights) runs twice, then once under `jax.profiler`. Each op XLA:CPU ran (a fusion, a
matmul-library call) is charged to the part of the model its instructions come from, read from the compiled
HLO's stack frames (the innermost zhjax or jax function that names a part), and split into matmul-library time
(XLA:CPU's YNNPACK fusions) and everything else. Times are each op's duration as traced, summed over both
threads: where two ops run at once both count, so the total exceeds the step's wall time, and an op split across
threads is traced on the one that ran it. XLA:CPU's per-execution scratch is fresh memory every step (page faults),
charged to whichever op touches a page first: the zero-fills (`wrapped_broadcast`) and the scan's stacking writes
(`dynamic-update-slice`) of the layer loop carry most of it, and which ones varies from run to run.
`bench/step_profile.py` times parts alone instead.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from zhjax.config import LoraConfig
from zhjax.convert.hf import read_config
from zhjax.model.llama import LlamaForCausalLM
from zhjax.model.params import split_model, trainable_filter
from zhjax.parallel.mesh import make_mesh
from zhjax.train.optim import OptimConfig, build_optimizer
from zhjax.train.state import init_train_state
from zhjax.train.step import build_train_step

# part of the step <- substrings of a stack frame's function name or file path; each frame is tried against the
# parts in this order
PARTS = [
    ("LoRA dropout masks", ("_mix32", "random_bytes", "dropout")),
    ("RoPE", ("apply_rope", "rope_tables")),
    ("attention", ("grouped_attention", "_batch", "dot_product_attention", "splash")),
    ("norms", ("rms_norm", "RMSNorm")),
    ("MLP activation", ("MLP.__call__",)),
    ("attention (q, k, v layout)", ("Attention.__call__",)),
    ("LM head + loss", ("token_losses", "chunked_head_loss", "logits_from_hidden", "lm_head_weight")),
    ("linear + LoRA products", ("matmul", "_matmul_2d", "_bwd", "_dot", "row_major_t")),
    ("embedding", ("Embed.",)),
    ("optimizer (clip, AdamW)", ("optax", "optim.py", "global_norm", "schedule", "accumulate_gradients")),
    ("layer loop (residuals, weight slices)", ("run_layers", "DecoderLayer")),
]


def stack_tables(hlo: str) -> dict[int, list[tuple[str, str]]]:
    """stack frame id -> [(file, function), ...] innermost first, from the HLO text's frame tables."""
    tables = {name: {} for name in ("FileNames", "FunctionNames", "FileLocations", "StackFrames")}
    current = None
    for line in hlo.splitlines():
        if line in tables:
            current = tables[line]
        elif line.startswith(("%", "ENTRY")):
            break
        elif current is not None and (m := re.match(r"(\d+) (.*)", line)):
            current[int(m.group(1))] = m.group(2)
    field = lambda text, key: int(re.search(key + r"=(\d+)", text).group(1))
    files = {i: v.strip('"') for i, v in tables["FileNames"].items()}
    funcs = {i: v.strip('"') for i, v in tables["FunctionNames"].items()}
    locs = {i: (files[field(v, "file_name_id")], funcs[field(v, "function_name_id")])
            for i, v in tables["FileLocations"].items()}
    frames = {i: (field(v, "file_location_id"), field(v, "parent_frame_id")) for i, v in tables["StackFrames"].items()}

    def walk(i):
        out = []
        while i in frames and len(out) < 64:
            loc, parent = frames[i]
            out.append(locs[loc])
            if parent == i:
                break
            i = parent
        return out

    return {i: walk(i) for i in frames}


def part_of(stack: list[tuple[str, str]]) -> str:
    """The part named by the innermost frame that names one (a projection inside `Attention.__call__` is a
    product, not attention)."""
    for file, func in stack:
        for part, keys in PARTS:
            if any(k in func or k in file for k in keys):
                return part
    return "other"


def op_parts(hlo: str) -> dict[str, tuple[str, str]]:
    """compiled op name -> (part, "forward" | "backward"), by the majority of its fused instructions."""
    stacks = stack_tables(hlo)
    votes, current = {}, None
    for line in hlo.splitlines():
        if (m := re.match(r"%(\S+) .*\{$", line)) and not line.startswith(" "):
            current = votes.setdefault(m.group(1), collections.Counter())
        elif current is not None and (m := re.search(r"stack_frame_id=(\d+)", line)):
            stack = stacks.get(int(m.group(1)), [])
            # autodiff's transposes, or a custom_vjp backward (`matmul`'s `_bwd`, `batched_matmul`'s `_batched_bwd`)
            backward = "transpose(jvp" in line or any(func.endswith("_bwd") for _, func in stack)
            current[(part_of(stack), "backward" if backward else "forward")] += 1
    out = {}
    for m in re.finditer(r"\n\s+%(\S+) = [^\n]*? calls=%([\w.\-]+)", hlo):
        if votes.get(m.group(2)):
            out[m.group(1)] = votes[m.group(2)].most_common(1)[0][0]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="assets/smollm2-135m")
    parser.add_argument("--vocab", type=int, default=55152)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--tied", action="store_true", help="tied embedding/head (the demo's grown model is untied)")
    parser.add_argument("--top", type=int, default=0, help="also list each part's N longest ops")
    args = parser.parse_args()
    load = os.getloadavg()
    print(f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} (1, 5, 15 min): a trace of a busy machine "
          "times the other jobs too", flush=True)

    cfg, _ = read_config(args.model)
    cfg = cfg.replace(vocab_size=args.vocab, tie_word_embeddings=args.tied, dtype=args.dtype, param_dtype=args.dtype)
    lora = LoraConfig(r=8, lora_alpha=32, lora_dropout=0.05)
    graphdef, trainable, frozen = split_model(LlamaForCausalLM(cfg, lora, rngs=nnx.Rngs(0)), trainable_filter(lora))
    trainable = jax.tree.map(lambda x: x.astype(jnp.float32), trainable)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, args.vocab, (1, 4, 256)), jnp.int32)
    batch = {"input_ids": ids, "labels": ids}
    tx = build_optimizer(OptimConfig(), trainable, 1000)
    step = build_train_step(graphdef, tx, trainable, frozen, make_mesh(), lora=lora)
    state = init_train_state(tx, trainable, 0, step.state_shardings)
    hlo = step.lower(state, frozen, batch).compile().as_text()
    for _ in range(2):
        state, _ = step(state, frozen, batch)
        jax.block_until_ready(state)
    with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir)
        start = time.perf_counter()
        state, _ = step(state, frozen, batch)
        jax.block_until_ready(state)
        wall = time.perf_counter() - start
        jax.profiler.stop_trace()
        data = jax.profiler.ProfileData.from_file(str(next(Path(trace_dir).rglob("*.xplane.pb"))))
        durations = collections.Counter()
        for plane in data.planes:
            for line in plane.lines:
                if line.name.startswith("tf_XLAEigen"):  # XLA:CPU's worker threads
                    for event in line.events:
                        if not event.name.startswith(("ThunkExecutor", "SlinkyThreadPool", "end:")):
                            durations[event.name] += event.duration_ns / 1e6

    parts = op_parts(hlo)
    table = collections.defaultdict(lambda: [0.0, 0.0])  # (part, direction) -> [matmul library ms, other ms]
    ops = collections.defaultdict(list)
    for op, ms in durations.items():
        part, direction = parts.get(op, ("other", "forward"))
        table[(part, direction)][0 if op.startswith("ynn") else 1] += ms
        ops[(part, direction)].append((ms, op))
    total = sum(durations.values())
    print(f"train step, {args.dtype}, {'tied' if args.tied else 'untied'} head, {args.vocab} rows, 4 x 256: "
          f"{wall:.2f} s traced; ops {total / 1e3:.2f} s summed over the threads\n")
    print("| part | direction | matmul library ms | other ops ms | share of op time |")
    print("|---|---|---|---|---|")
    for (part, direction), (mm, other) in sorted(table.items(), key=lambda kv: -sum(kv[1])):
        print(f"| {part} | {direction} | {mm:.0f} | {other:.0f} | {(mm + other) / total:.1%} |")
    for (part, direction), listed in ops.items() if args.top else ():
        print(f"{part}, {direction}: " + ", ".join(f"{op} {ms:.0f} ms" for ms, op in sorted(listed)[::-1][:args.top]))


if __name__ == "__main__":
    main()
