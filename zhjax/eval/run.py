"""`zhjax eval`: a model (HF dir or zhjax checkpoint, PEFT adapters merged in order) on C-Eval / CMMLU-style files.

    zhjax eval --model DIR [--adapter A ...] --task ceval|cmmlu --data DIR [--shots 0|5] [--split val|test]
               [--method logits|generate] [--batch-size 8] [--output results.json] [--submission FILE]

The files are read and checked first (`zhjax.eval.choice`), then the model is loaded the way `zhjax generate`
loads it, every prompt is scored in batches (`zhjax.eval.scoring.Scorer`, one forward pass per question with
`logits`; the KV-cached decoder with `generate`) under a progress bar, and the accuracies are printed and written
as JSON with each question's prediction (and, with `logits`, its four option log-probabilities). Questions without
answers (C-Eval's published test split) go to a submission file in the benchmark's format (`{subject: {id:
letter}}`), by default `submission.json` beside `--output`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from zhjax.eval.choice import (
    CHOICES,
    BenchmarkDataError,
    Subject,
    build_prompt,
    extract_answer,
    load_benchmark,
    submission,
    summarize,
)


def letter_tokens(tokenizer) -> list[int]:
    """The token ids of A-D as they follow `答案：` (the last token of `：A`, as the seed takes them)."""
    ids = [tokenizer("：" + c, add_special_tokens=False)["input_ids"][-1] for c in CHOICES]
    if len(set(ids)) != len(CHOICES):
        raise ValueError(f"the tokenizer gives the option letters A-D the ids {ids}; four distinct tokens expected")
    return ids


def prompt_ids(tokenizer, prompt: str, max_len: int) -> list[int]:
    """The prompt's tokens as the seed encodes them (with the tokenizer's special tokens, e.g. LLaMA's BOS), its
    last `max_len` kept."""
    return tokenizer(prompt, add_special_tokens=True)["input_ids"][-max_len:]


def score_logits(scorer, tokenizer, subjects: list[Subject], *, progress: bool = True) -> dict[str, list[dict]]:
    """Per subject, per question: the four option log-probabilities after `答案：` and the predicted letter."""
    from tqdm import tqdm

    letters = np.asarray([letter_tokens(tokenizer)], np.int32)
    max_len = scorer.config.max_position_embeddings
    items = [(s.key, build_prompt(s, q)) for s in subjects for q in s.questions]
    rows = [prompt_ids(tokenizer, p, max_len) for _, p in items]
    with tqdm(total=len(rows), desc="questions", unit="q", disable=not progress) as bar:
        scored = scorer.score(rows, [[len(r) - 1] for r in rows], [letters] * len(rows), progress=bar.update)
    out: dict[str, list[dict]] = {s.key: [] for s in subjects}
    for (key, _), sc in zip(items, scored, strict=True):
        logp = sc.logprobs[0].tolist()
        out[key].append({"prediction": CHOICES[int(np.argmax(logp))], "logprobs": dict(zip(CHOICES, logp, strict=True))})
    return out


def score_generate(decoder, tokenizer, subjects: list[Subject], *, batch_size: int = 8, max_new_tokens: int = 20,
                   progress: bool = True) -> dict[str, list[dict]]:
    """Per subject, per question: the greedy answer text and the letter read off it (None when it names none)."""
    from tqdm import tqdm

    from zhjax.infer.generate import generate

    max_len = decoder.config.max_position_embeddings - max_new_tokens
    items = [(s.key, q, prompt_ids(tokenizer, build_prompt(s, q), max_len)) for s in subjects for q in s.questions]
    order = sorted(range(len(items)), key=lambda i: -len(items[i][2]))
    texts: list[str] = [""] * len(items)
    with tqdm(total=len(items), desc="questions", unit="q", disable=not progress) as bar:
        for start in range(0, len(order), batch_size):
            chunk = order[start: start + batch_size]
            outs = generate(decoder, tokenizer, [items[i][2] for i in chunk], max_new_tokens=max_new_tokens,
                            greedy=True, repetition_penalty=1.0, stop=["\n\n"])
            for i, text in zip(chunk, outs, strict=True):
                texts[i] = text
            bar.update(len(chunk))
    out: dict[str, list[dict]] = {s.key: [] for s in subjects}
    for (key, q, _), text in zip(items, texts, strict=True):
        out[key].append({"prediction": extract_answer(text, q), "response": text})
    return out


def format_table(summary: dict) -> str:
    """The accuracies as a small Markdown table (percent)."""
    lines = ["| subject | questions | accuracy |", "|---|---:|---:|"]
    for key, s in summary["subjects"].items():
        lines.append(f"| {key} ({s['name']}) | {s['num']} | {100 * s['accuracy']:.1f} |")
    for name, c in summary["categories"].items():
        lines.append(f"| category: {name} | {c['num']} | {100 * c['accuracy']:.1f} |")
    for name in ("hard", "average"):
        if name in summary:
            lines.append(f"| **{name}** | {summary[name]['num']} | {100 * summary[name]['accuracy']:.1f} |")
    return "\n".join(lines)


def evaluate_model(model, tokenizer, subjects: list[Subject], *, method: str = "logits", batch_size: int = 8,
                   max_new_tokens: int = 20, progress: bool = True) -> dict[str, list[dict]]:
    """Score `subjects` with `model` by `method` ("logits" or "generate"); per subject, one dict per question."""
    if method == "logits":
        from zhjax.eval.scoring import Scorer

        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
        return score_logits(Scorer(model, batch_size=batch_size, pad_id=pad), tokenizer, subjects, progress=progress)
    if method == "generate":
        from zhjax.infer.generate import Decoder

        return score_generate(Decoder(model), tokenizer, subjects, batch_size=batch_size,
                              max_new_tokens=max_new_tokens, progress=progress)
    raise ValueError(f"unknown method {method!r}; expected 'logits' or 'generate'")


def eval_main(argv: list[str]) -> int:
    """`zhjax eval` (see the module doc)."""
    parser = argparse.ArgumentParser(prog="zhjax eval", description="C-Eval / CMMLU-style multiple choice.")
    parser.add_argument("--model", required=True, help="HF model dir or zhjax base checkpoint dir")
    parser.add_argument("--adapter", action="append", default=[], help="PEFT LoRA dir, applied in order (repeatable)")
    parser.add_argument("--tokenizer", help="tokenizer dir (default: the last adapter's, else the model's)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="default: float32 on CPU, else bfloat16")
    parser.add_argument("--task", required=True, choices=("ceval", "cmmlu"), help="the data's layout and subject map")
    parser.add_argument("--data", required=True, help="the benchmark's directory (dev/, val/, test/)")
    parser.add_argument("--shots", type=int, default=5, help="dev examples in each prompt (default 5)")
    parser.add_argument("--split", help="split to evaluate (default: val for ceval, test for cmmlu)")
    parser.add_argument("--method", choices=("logits", "generate"), default="logits")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=20, help="with --method generate")
    parser.add_argument("--output", help="results JSON")
    parser.add_argument("--submission", help="submission JSON for questions without answers (default: beside --output)")
    parser.add_argument("--limit", type=int, help="the first N questions of each subject only")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    split = args.split or ("val" if args.task == "ceval" else "test")
    if args.shots < 0:
        parser.error(f"--shots must be at least 0, got {args.shots}")
    try:
        subjects = load_benchmark(args.task, args.data, split, args.shots, limit=args.limit)
    except (BenchmarkDataError, OSError) as e:
        print(f"zhjax eval: {e}", file=sys.stderr)
        return 2

    from zhjax.infer.cli import load_model, load_tokenizer_for
    from zhjax.tokenizer.guards import check_vocab_match

    model = load_model(args.model, adapters=args.adapter, dtype=args.dtype)
    tokenizer = load_tokenizer_for(args.model, args.adapter, args.tokenizer)
    check_vocab_match(model.config.vocab_size, tokenizer, f"{args.model} with its tokenizer", allow_padding=True)
    n = sum(len(s.questions) for s in subjects)
    print(f"{args.task} {split}: {len(subjects)} subjects, {n} questions, {args.shots}-shot, {args.method}",
          file=sys.stderr)
    start = time.perf_counter()
    results = evaluate_model(model, tokenizer, subjects, method=args.method, batch_size=args.batch_size,
                             max_new_tokens=args.max_new_tokens, progress=not args.no_progress)
    seconds = time.perf_counter() - start
    predictions = {k: [r["prediction"] for r in v] for k, v in results.items()}
    summary = summarize(args.task, Path(args.data), subjects, predictions)
    print(format_table(summary) if summary["subjects"] else "no answers in this split: predictions only")
    print(f"{n} questions in {seconds:.1f} s ({n / seconds:.2f} questions/s)", file=sys.stderr)
    record = {"task": args.task, "data": args.data, "split": split, "shots": args.shots, "method": args.method,
              "model": args.model, "adapters": args.adapter, **summary, "questions": n, "seconds": seconds,
              "questions_per_second": n / seconds,
              "predictions": {s.key: [{"id": q.id, "answer": q.answer, **r} for q, r in zip(s.questions, results[s.key],
                                                                                         strict=True)]
                              for s in subjects}}
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(record, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    answerless = submission(subjects, predictions)
    if answerless:
        target = Path(args.submission or (Path(args.output).parent / "submission.json" if args.output
                                          else "submission.json"))
        target.write_text(json.dumps(answerless, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
        print(f"submission ({sum(map(len, answerless.values()))} answers): {target}", file=sys.stderr)
    return 0
