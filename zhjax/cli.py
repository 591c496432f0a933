"""The `zhjax` command: `zhjax pretrain | sft | recipe | plan | generate | chat | serve | eval | lm-eval ...`.

Argument parsing only; the work is in `zhjax.train.trainer`, `zhjax.recipe`, `zhjax.train.plan_cli`, `zhjax.infer` and `zhjax.eval`.
"""

from __future__ import annotations

import argparse
import sys


def _train(kind: str, argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog=f"zhjax {kind}",
        description=f"{'Continued pre-training' if kind == 'pretrain' else 'Instruction tuning'} with LoRA "
        "(+ trainable embed/head). Overrides are dotted keys: optim.learning_rate=1e-4 mesh.fsdp=8",
    )
    parser.add_argument("--config", help="YAML job config (see configs/)")
    parser.add_argument("--overwrite_output_dir", action="store_true", help="start fresh instead of resuming")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides of the YAML config")
    from zhjax.parallel.mesh import add_distributed_args, explain_peer_failures, initialize_from_args

    add_distributed_args(parser)
    args = parser.parse_intermixed_args(argv)  # flags may follow the overrides
    try:
        initialize_from_args(args)  # before anything touches a device; a no-op for one process
    except ValueError as e:
        print(f"zhjax {kind}: {e}", file=sys.stderr)
        return 2

    from zhjax.train.config import load_job_config

    overrides = list(args.overrides)
    if args.overwrite_output_dir:
        overrides.append("overwrite_output_dir=true")
    try:
        cfg = load_job_config(kind, args.config, overrides)
        from zhjax.train.storage import check_output_dir

        check_output_dir(cfg.output_dir)  # e.g. gs:// without gcsfs: say so before any training work
    except ValueError as e:
        print(f"zhjax {kind}: {e}", file=sys.stderr)
        return 2

    from zhjax.data.files import DataError
    from zhjax.train.checkpoint import CheckpointError
    from zhjax.train.trainer import train
    from zhjax.train.validate import JobConfigError

    try:
        with explain_peer_failures():
            summary = train(cfg, kind)
    except (JobConfigError, CheckpointError, DataError) as e:  # one line naming the file/field; no traceback
        print(f"zhjax {kind}: {e}", file=sys.stderr)
        return 2
    print(f"done: {summary['step']} steps, output in {summary['output_dir']}")
    return 0


def _recipe(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="zhjax recipe", description="Run the whole method, stage by stage (cached).")
    parser.add_argument("--config", required=True, help="recipe YAML (configs/recipes/)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    args = parser.parse_args(argv)
    from zhjax.recipe import load_recipe_config, run_recipe

    try:
        cfg = load_recipe_config(args.config, args.overrides)
    except ValueError as e:
        print(f"zhjax recipe: {e}", file=sys.stderr)
        return 2
    from zhjax._extras import MissingExtra

    try:
        run_recipe(cfg)
    except MissingExtra as e:  # raised before any stage runs
        print(f"zhjax recipe: {e}", file=sys.stderr)
        return 2
    return 0


def _plan(argv: list[str]) -> int:
    from zhjax.train.plan_cli import plan_main

    return plan_main(argv)


def _generate(argv: list[str]) -> int:
    from zhjax.infer.cli import generate_main

    return generate_main(argv)


def _chat(argv: list[str]) -> int:
    from zhjax.infer.cli import chat_main

    return chat_main(argv)


def _eval(argv: list[str]) -> int:
    from zhjax.eval.run import eval_main

    return eval_main(argv)


def _lm_eval(argv: list[str]) -> int:
    from zhjax._extras import require

    require("lm_eval", extra="lm-eval", why="the lm-evaluation-harness command", prog="zhjax lm-eval")
    from zhjax.eval.harness import harness_main

    return harness_main(argv)


def _serve(argv: list[str]) -> int:
    from zhjax._extras import require

    require("fastapi", "uvicorn", extra="serve", why="the server (FastAPI + uvicorn)", prog="zhjax serve")
    from zhjax.infer.serve import serve_main

    return serve_main(argv)


COMMANDS = {
    "plan": _plan,
    "pretrain": lambda argv: _train("pretrain", argv),
    "sft": lambda argv: _train("sft", argv),
    "recipe": _recipe,
    "generate": _generate,
    "chat": _chat,
    "serve": _serve,
    "eval": _eval,
    "lm-eval": _lm_eval,
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(f"usage: zhjax {{{','.join(COMMANDS)}}} [--config FILE] [key.sub=value ...]", file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
