"""`zhjax plan`: will this job fit, and at what batch? Answered by compiling its train step ahead of time.

    zhjax plan --config configs/pretrain/llama-7b-lora.yaml --topology v5e-8
    zhjax plan --config configs/pretrain/tiny.yaml --cpu-devices 8 per_device_train_batch_size=4
    zhjax plan --config configs/sft/llama-13b-lora.yaml --topology v4-8 --max-batch
    python -m zhjax.train.plan_cli --table > table.md      # the docs/scale.md table (needs libtpu)

`--topology` compiles for a TPU slice with compile-only devices (libtpu, the `tpu` extra; no TPU needed);
`--cpu-devices N` for N simulated CPU devices (re-executed in a fresh process when JAX is already running
here). The last line reads `per-device total: X GiB of Y GiB (fits)` or `(does not fit)`; the exit status is 0
when it fits, 1 when it does not, 2 for a bad config. The work is in `zhjax.train.plan`.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

GIB = 1024**3

# The seed's jobs in the table of docs/scale.md: (label, recipe, kind).
TABLE_JOBS = (
    ("Chinese-LLaMA-7B LoRA PT", "configs/pretrain/llama-7b-lora.yaml", "pretrain"),
    ("Chinese-Alpaca-7B LoRA SFT", "configs/sft/llama-7b-lora.yaml", "sft"),
    ("Chinese-LLaMA-13B LoRA PT", "configs/pretrain/llama-13b-lora.yaml", "pretrain"),
    ("Chinese-Alpaca-13B LoRA SFT", "configs/sft/llama-13b-lora.yaml", "sft"),
    ("Chinese-LLaMA-33B LoRA PT", "configs/pretrain/llama-33b-lora.yaml", "pretrain"),
    ("Chinese-Alpaca-33B LoRA SFT", "configs/sft/llama-33b-lora.yaml", "sft"),
)
TABLE_TOPOLOGIES = ("v5e-8", "v4-8", "v5p-8")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="zhjax plan",
        description="Compile a job's train step ahead of time for a device topology and report per-device memory, "
        "parameter counts and FLOPs per token. Overrides are dotted keys, as for zhjax pretrain/sft.",
    )
    parser.add_argument("--config", help="YAML job config (configs/pretrain/*.yaml, configs/sft/*.yaml)")
    parser.add_argument("--kind", choices=("pretrain", "sft", "auto"), default="auto",
                        help="job kind (default: sft when the config lives under an sft/ folder)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--topology", help="TPU slice: v5e-8, v4-8, v5p-8, v6e-8 (compile-only; needs libtpu)")
    where.add_argument("--cpu-devices", type=int, metavar="N", help="N simulated CPU devices")
    parser.add_argument("--memory-gib", type=float,
                        help="per-device memory to fit in (default: the chip's HBM; CPU: host memory / N)")
    parser.add_argument("--max-batch", action="store_true",
                        help="search the largest per-device batch that fits and report the plan at it")
    parser.add_argument("--table", action="store_true",
                        help="print the docs/scale.md table: the seed's 7B/13B/33B PT and SFT jobs on v5e-8, v4-8, "
                        "v5p-8 at their largest batch, beside the seed's ZeRO-2 per-GPU memory")
    parser.add_argument("--jobs", metavar="NAMES", help="--table: only the rows whose label contains one of these "
                        "comma-separated words (e.g. 7B,SFT)")
    parser.add_argument("--json", metavar="FILE", help="also write the plan (bytes, counts, verdict) as JSON")
    parser.add_argument("--cache", metavar="FILE", help="--table: keep compiled plans in this JSON file and reuse them")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides of the YAML config")
    return parser


def plan_main(argv: list[str]) -> int:
    """Entry point of `zhjax plan` (the `zhjax` command dispatches here)."""
    args = build_parser().parse_args(argv)
    if not args.table and not args.config:
        print("zhjax plan: --config is required (or --table)", file=sys.stderr)
        return 2
    if not args.table and not args.topology and not args.cpu_devices:
        print("zhjax plan: give --topology NAME or --cpu-devices N", file=sys.stderr)
        return 2
    if args.cpu_devices and not _use_cpu_devices(args.cpu_devices):
        # JAX is already initialised in this process: plan in a fresh one that can have N devices
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": str(args.cpu_devices)}
        return subprocess.run([sys.executable, "-m", "zhjax.train.plan_cli", *argv], env=env).returncode
    if not args.cpu_devices:
        _compile_only_host()
    if args.table:
        topologies = args.topology.split(",") if args.topology else list(TABLE_TOPOLOGIES)
        return print_table(topologies, args.cache, args.jobs.split(",") if args.jobs else None)
    return plan_one(args)


def _use_cpu_devices(n: int) -> bool:
    """Make this process's CPU backend have `n` devices; False when JAX has already started its backends."""
    import jax

    try:
        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_num_cpu_devices", n)
    except RuntimeError:
        return len(jax.devices()) == n and jax.devices()[0].platform == "cpu"
    return True


def _compile_only_host() -> None:
    """TPU plans need no accelerator here: keep JAX's own backend on the CPU unless the user chose one."""
    import jax

    if not os.environ.get("JAX_PLATFORMS"):
        try:
            jax.config.update("jax_platforms", "cpu")
        except RuntimeError:  # pragma: no cover - backends already up; planning still works
            pass


def _job_kind(args) -> str:
    if args.kind != "auto":
        return args.kind
    return "sft" if "sft" in Path(args.config).parts else "pretrain"


def _load(config: str, kind: str, overrides: list[str]):
    from zhjax.train.config import load_job_config

    return load_job_config(kind, config, overrides)


def _target(args) -> tuple[list, float, str]:
    """(devices, per-device capacity in bytes, description) of `--topology` / `--cpu-devices`."""
    import jax

    from zhjax.train import plan

    if args.topology:
        devices, capacity = tpu_target(args.topology)
        hbm = plan.TOPOLOGIES[args.topology].hbm_gib
        where = f"{args.topology}: {len(devices)} x {devices[0].device_kind}, {hbm:g} GiB HBM each"
        if args.memory_gib:
            return devices, args.memory_gib * GIB, where
        return devices, capacity, where + f" ({capacity / GIB:.2f} GiB usable by XLA)"
    devices = jax.devices()
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    capacity = args.memory_gib * GIB if args.memory_gib else host / len(devices)
    return devices, capacity, f"{len(devices)} simulated CPU devices sharing {host / GIB:.1f} GiB of host memory"


def tpu_target(topology: str) -> tuple[list, float]:
    """Compile-only devices of a TPU slice and the memory per chip a program may use (usable HBM as XLA says)."""
    from zhjax.train import plan

    devices = plan.tpu_devices(topology)
    usable = plan.usable_hbm_bytes(devices[0])
    return devices, float(usable if usable else plan.TOPOLOGIES[topology].hbm_gib * GIB)


def plan_one(args) -> int:
    """Plan one job (at its batch, or at the largest that fits with `--max-batch`) and print the report."""
    import dataclasses

    from zhjax.train import plan

    kind = _job_kind(args)
    try:
        cfg = _load(args.config, kind, args.overrides)
        devices, capacity, where = _target(args)
        model, source = plan.job_model_config(cfg, devices[0].platform)
    except (ValueError, RuntimeError) as e:
        print(f"zhjax plan: {e}", file=sys.stderr)
        return 2

    def at(batch: int) -> plan.Plan:
        return plan.plan_job(dataclasses.replace(cfg, per_device_train_batch_size=batch), kind, devices, capacity,
                             describe_devices=where)

    if args.max_batch:
        def report(p: plan.Plan) -> None:
            print(f"  per-device batch {p.per_device_batch:4d}: {p.total_bytes / GIB:8.2f} GiB "
                  f"({'fits' if p.fits else 'does not fit'}, compiled in {p.compile_seconds:.0f} s)", flush=True)

        print(f"searching the largest per-device batch of {kind} {args.config} that fits {capacity / GIB:.2f} GiB:")
        result = plan.largest_batch(at, report=report)
        if result is None:
            print("not even a per-device batch of 1 fits")
            result = at(1)
    else:
        result = at(cfg.per_device_train_batch_size)
    title = f"zhjax plan: {kind} {args.config}"
    print("\n".join(plan.format_plan(result, title=title, model=model, source=source)))
    if args.json:
        import json

        Path(args.json).write_text(json.dumps({**dataclasses.asdict(result), "fits": result.fits}, indent=2))
    return 0 if result.fits else 1


def print_table(topologies: list[str], cache_path: str | None = None, only: list[str] | None = None) -> int:
    """The markdown table of docs/scale.md: every `TABLE_JOBS` job on every topology at its largest batch.

    Rows are printed as they are done. With `cache_path` every compiled plan is also kept in a JSON file, so an
    interrupted run continues where it stopped.
    """
    from zhjax.train import plan

    cache = _PlanCache(cache_path)
    header = ["job", "trainable / frozen params", "FLOPs/token"]
    header += [f"{t} ({plan.TOPOLOGIES[t].hbm_gib:g} GiB HBM/chip)" for t in topologies]
    header += [f"seed ZeRO-2 per GPU (8 GPUs, batch as on {topologies[0]})"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header), flush=True)
    guesses: dict[tuple[int, str], int] = {}
    for label, config, kind in TABLE_JOBS:
        if only and not any(word in label for word in only):
            continue
        cfg = _load(config, kind, [])
        model, _ = plan.job_model_config(cfg, "tpu")
        cells, first = [], None
        for topo in topologies:
            # start from the recipe's batch, or where the same architecture's search on this slice ended
            key = (model.hidden_size, topo)
            best = _largest_batch_on(cfg, config, kind, topo, label, guesses.get(key, cfg.per_device_train_batch_size),
                                     cache)
            if best is None:
                cells.append("batch 1 does not fit")
                continue
            guesses[key] = best.per_device_batch
            first = first or best
            cells.append(f"batch {best.per_device_batch}: {best.total_bytes / GIB:.1f} GiB")
        if first is None:
            row = [label, "-", "-", *cells, "-"]
        else:
            z = plan.zero2_bytes_per_gpu(model, first.trainable_params, first.frozen_params, gpus=8,
                                         batch=first.per_device_batch, seq_len=first.seq_len)
            row = [
                label,
                f"{first.trainable_params / 1e6:.0f} M / {first.frozen_params / 1e9:.2f} B",
                f"{first.flops_per_token / 1e9:.1f} G",
                *cells,
                f"{z['total'] / GIB:.1f} GiB (fp16 weights {z['weights'] / GIB:.1f}, activations "
                f"{z['activations'] / GIB:.1f})",
            ]
        print("| " + " | ".join(row) + " |", flush=True)
    return 0


class _PlanCache:
    """Compiled plans by (config, kind, topology, batch) in an optional JSON file."""

    def __init__(self, path: str | None):
        import json

        self.path = Path(path) if path else None
        self.entries = json.loads(self.path.read_text()) if self.path and self.path.exists() else {}

    def get(self, key: str, capacity: float, compute):
        import dataclasses
        import json

        from zhjax.train.plan import Plan

        if key in self.entries:  # the verdict is re-made against today's capacity
            return dataclasses.replace(Plan(**self.entries[key]), capacity_bytes=capacity)
        result = compute()
        if self.path:
            self.entries[key] = dataclasses.asdict(result)
            self.path.write_text(json.dumps(self.entries, indent=1))
        return result


def _largest_batch_on(cfg, config: str, kind: str, topo: str, label: str, guess: int | None, cache: _PlanCache):
    """`largest_batch` of one job on one TPU slice, each compile reported on stderr."""
    import dataclasses

    from zhjax.train import plan

    devices, capacity = tpu_target(topo)

    def at(batch: int) -> plan.Plan:
        job = dataclasses.replace(cfg, per_device_train_batch_size=batch)
        return cache.get(f"{config}|{kind}|{topo}|{batch}", capacity,
                         lambda: plan.plan_job(job, kind, devices, capacity, describe_devices=topo))

    def report(p: plan.Plan) -> None:
        print(f"{label} on {topo}, batch {p.per_device_batch}: {p.total_bytes / GIB:.2f} GiB "
              f"({'fits' if p.fits else 'does not fit'}, {p.compile_seconds:.0f} s)", file=sys.stderr, flush=True)

    return plan.largest_batch(at, guess=guess, report=report)


def main() -> int:
    return plan_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
