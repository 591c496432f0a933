"""Multiple-choice evaluation speed on this machine: `zhjax eval` vs lm-evaluation-harness's `hf` model, same task.

    .venv/bin/python bench/eval.py --data CLOZE_DIR [--subjects noun,verb] [--limit 20] [--shots 5] [--rounds 3]

CLOZE_DIR is a cloze set from `tools/build_cloze.py` (its `lm_eval/` folder holds the harness tasks, the same
questions and the same prompt). Three systems score the same questions (the first `--limit` val questions of each
subject, `--shots`-shot), fp32, batch `--batch-size`:

- `zhjax eval`: zhjax's batched forward pass, one per question (`zhjax.eval.run.score_logits`);
- `harness hf`: `lm_eval.simple_evaluate` with the harness's own `hf` model (transformers on PyTorch);
- `harness zhjax`: the same harness run with the `zhjax` model (`zhjax.eval.harness`).

Models are loaded once, outside the timings; one untimed warm-up round compiles zhjax's shapes. Then the rounds
alternate the systems (A B C A B C ...) so all see the same machine load, and the medians are reported as
questions per second, with the load average before and after (the script refuses a 1-minute load above 1.0
unless `--force`).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="assets/smollm2-135m")
    parser.add_argument("--data", required=True, help="cloze set dir (tools/build_cloze.py)")
    parser.add_argument("--subjects", default="noun,verb,idiom")
    parser.add_argument("--limit", type=int, default=16, help="val questions per subject")
    parser.add_argument("--shots", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--force", action="store_true", help="run even when the load average is above 1.0")
    args = parser.parse_args()
    from zhjax._extras import require

    require("torch", extra="torch", why="the harness's hf model", prog="bench/eval.py")
    require("lm_eval", extra="lm-eval", why="lm-evaluation-harness", prog="bench/eval.py")
    from quiet import load_line, require_quiet_machine

    require_quiet_machine(args.force)

    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from zhjax.eval.choice import load_benchmark
    from zhjax.eval.harness import ZhjaxLM
    from zhjax.eval.run import score_logits
    from zhjax.eval.scoring import Scorer
    from zhjax.infer.cli import load_model, load_tokenizer_for

    keys = args.subjects.split(",")
    subjects = [s for s in load_benchmark("ceval", args.data, "val", args.shots, limit=args.limit) if s.key in keys]
    n = sum(len(s.questions) for s in subjects)
    tasks = TaskManager(include_path=str(Path(args.data) / "lm_eval"), include_defaults=False)
    harness_run = dict(tasks=[f"zhjax_cloze_{k}" for k in keys], num_fewshot=args.shots, limit=args.limit,
                       task_manager=tasks, verbosity="ERROR")

    tokenizer = load_tokenizer_for(args.model)
    scorer = Scorer(load_model(args.model, dtype="float32"), batch_size=args.batch_size,
                    pad_id=tokenizer.eos_token_id)
    hf = HFLM(pretrained=args.model, dtype="float32", device="cpu", batch_size=args.batch_size)
    ours = ZhjaxLM(pretrained=args.model, dtype="float32", batch_size=args.batch_size)
    systems = {
        "zhjax eval": lambda: score_logits(scorer, tokenizer, subjects, progress=False),
        "harness hf": lambda: lm_eval.simple_evaluate(model=hf, **harness_run),
        "harness zhjax": lambda: lm_eval.simple_evaluate(model=ours, **harness_run),
    }
    print(f"{n} questions ({len(subjects)} subjects, {args.shots}-shot), batch {args.batch_size}; warm-up round",
          flush=True)
    for fn in systems.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in systems}
    for r in range(args.rounds):
        for name, fn in systems.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f} s" for k, v in times.items()), flush=True)
    base = n / statistics.median(times["harness hf"])
    print("\n| system | questions/s (median) | vs harness hf |\n|---|---:|---:|")
    for name, t in times.items():
        qps = n / statistics.median(t)
        print(f"| {name} | {qps:.2f} | {qps / base:.2f}x |")
    print(load_line())


if __name__ == "__main__":
    main()
