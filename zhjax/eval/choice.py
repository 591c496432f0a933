"""C-Eval / CMMLU-style multiple choice as the seed runs it: the published files, its prompt, letter logits.

Files (each benchmark's own published layout, one CSV per subject):

- C-Eval: `DATA/{dev,val,test}/{subject}_{split}.csv` with `id,question,A,B,C,D,answer` (test files have no
  `answer`; extra columns such as `explanation` are ignored);
- CMMLU: `DATA/{dev,test}/{subject}.csv` with an unnamed index column and `Question,A,B,C,D,Answer`.

Column names are matched without regard to case. Everything is read and checked before the model is loaded: a
missing column, an answer outside A-D, an empty question or an empty subject file stops the run with one line that
names the file and the row.

The prompt is the seed's (Chinese-LLaMA-Alpaca `scripts/ceval`, `scripts/cmmlu`)::

    以下是中国关于{科目}考试的单项选择题，请选出其中的正确答案。\\n\\n
    {dev question 1}\\nA. {A}\\nB. {B}\\nC. {C}\\nD. {D}\\n答案：{answer}\\n\\n      (x shots, the dev file's first rows)
    {question}\\nA. {A}\\nB. {B}\\nC. {C}\\nD. {D}\\n答案：

with the subject's Chinese name (`subjects.json`, or the data dir's own `subject_mapping.json`). Two choices differ
from the seed's scripts, both as C-Eval's paper and lm-evaluation-harness have them: the subject is named in
Chinese (the seed wrote the file's English stem, `computer_network`), and a 0-shot prompt keeps the header (the
seed's had only the question).

Methods: `logits` (the seed's "constrained decoding") reads the next-token distribution after `答案：` in one
forward pass per question and picks the option letter with the highest log-probability; the letters are the tokens
that follow a full-width colon (the seed's `encode("：A")[-1]`). The seed also added the logit of the bare letter's
first token (`encode("A")[0]`), which for a byte-level BPE is the same token; for a SentencePiece vocabulary it is
`▁A`, a token that cannot follow `：` in the text, so zhjax leaves it out. `generate` decodes greedily and reads
the answer off the text (`extract_answer`).

Accuracy is reported per subject, per category (a question counts in each of its subject's categories) and over
all questions (the seed's average: correct / questions), and for C-Eval also over its hard subset.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

CHOICES = ("A", "B", "C", "D")
HEADER = "以下是中国关于{subject}考试的单项选择题，请选出其中的正确答案。\n\n"
TASKS = ("ceval", "cmmlu")
SPLITS = {"ceval": ("dev", "val", "test"), "cmmlu": ("dev", "test")}


class BenchmarkDataError(ValueError):
    """A benchmark file that does not hold what its layout promises; the message names the file and row."""


@dataclass
class Question:
    """One question of a subject file; `answer` is None in a test file published without answers."""

    id: str
    question: str
    options: tuple[str, str, str, str]
    answer: str | None
    where: str  # "file: row N" for messages


@dataclass
class Subject:
    key: str
    name: str
    categories: list[str]
    questions: list[Question]
    shots: list[Question] = field(default_factory=list)


def _file(data: Path, task: str, split: str, subject: str) -> Path:
    return data / split / (f"{subject}_{split}.csv" if task == "ceval" else f"{subject}.csv")


def _subject_keys(data: Path, task: str, split: str) -> list[str]:
    folder = data / split
    suffix = f"_{split}.csv" if task == "ceval" else ".csv"
    keys = sorted(p.name[: -len(suffix)] for p in folder.glob(f"*{suffix}")) if folder.is_dir() else []
    if not keys:
        pattern = f"{{subject}}{suffix}"
        raise BenchmarkDataError(f"{folder}: no {task} subject files ({pattern}); expected the benchmark's "
                                 f"published layout: {', '.join(f'{s}/' for s in SPLITS[task])}")
    return keys


def read_subject_file(path: Path, *, task: str, need_answers: bool | None = None) -> list[Question]:
    """The questions of one subject CSV, checked (see the module doc). `need_answers`: True for dev files, None
    where a file may come without the answer column (a test split), False to ignore answers."""
    question_col = "question"
    answer_col = "answer"
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None:
                raise BenchmarkDataError(f"{path}: empty subject file (no header row, no questions)")
            columns = {name.strip().lower(): i for i, name in enumerate(header)}
            required = [question_col, *CHOICES] + ([answer_col] if need_answers else [])
            missing = [c for c in required if c.lower() not in columns]
            if missing:
                raise BenchmarkDataError(
                    f"{path}: missing column {', '.join(repr(m) for m in missing)} (header: {','.join(header)}); "
                    f"expected {'id,' if task == 'ceval' else ''}question,A,B,C,D,answer")
            has_answers = answer_col in columns and need_answers is not False
            questions = []
            for n, row in enumerate(reader, 1):
                if not any(cell.strip() for cell in row):
                    continue
                where = f"{path}: row {n} (line {reader.line_num})"
                if len(row) < len(header):
                    raise BenchmarkDataError(f"{where}: {len(row)} fields, the header has {len(header)}")
                text = row[columns[question_col]]
                if not text.strip():
                    raise BenchmarkDataError(f"{where}: empty question")
                answer = row[columns[answer_col]].strip() if has_answers else None
                if has_answers and answer not in CHOICES:
                    raise BenchmarkDataError(f"{where}: answer {answer!r} is not one of A, B, C, D")
                if "id" in columns:
                    ident = row[columns["id"]].strip()
                else:  # CMMLU's unnamed index column; else the row's place in the file
                    ident = row[0].strip() if task == "cmmlu" and row[0].strip() else str(n - 1)
                options = tuple(row[columns[c.lower()]] for c in CHOICES)
                questions.append(Question(ident, text, options, answer, where))  # type: ignore[arg-type]
    except UnicodeDecodeError as e:
        raise BenchmarkDataError(f"{path}: not UTF-8 text ({e})") from e
    if not questions:
        raise BenchmarkDataError(f"{path}: empty subject file (a header and no questions)")
    return questions


def subject_info(task: str, data: Path) -> tuple[dict[str, dict], list[str], list[str]]:
    """(subject -> {name, categories}, category order, hard subset) for `task`: the package's map, updated by
    `DATA/subject_mapping.json` when the data dir has one (the cloze set does)."""
    table = json.loads(resources.files("zhjax.eval").joinpath("subjects.json").read_text(encoding="utf-8"))[task]
    subjects, order, hard = dict(table["subjects"]), list(table["categories"]), list(table.get("hard", []))
    own = data / "subject_mapping.json"
    if own.exists():
        try:
            extra = json.loads(own.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise BenchmarkDataError(f"{own}: not JSON ({e})") from e
        for key, value in extra.items():
            if isinstance(value, list):  # C-Eval's own subject_mapping.json: [English, Chinese, category]
                value = {"name": value[1], "categories": [value[2]]}
            subjects[key] = value
            order += [c for c in value.get("categories", []) if c not in order]
    return subjects, order, hard


def load_benchmark(task: str, data: str | Path, split: str, shots: int, *, limit: int | None = None) -> list[Subject]:
    """Every subject of `split` with its questions (the first `limit` of each, if given) and, for `shots` > 0, its
    dev file's first `shots` rows. A val file must have answers; a test file may come without."""
    if task not in TASKS:
        raise BenchmarkDataError(f"unknown task {task!r}; expected one of {TASKS}")
    if split not in SPLITS[task] or split == "dev":
        raise BenchmarkDataError(f"{task} has no {split!r} split to evaluate; expected one of "
                                 f"{[s for s in SPLITS[task] if s != 'dev']}")
    data = Path(data)
    info, _, _ = subject_info(task, data)
    subjects = []
    for key in _subject_keys(data, task, split):
        questions = read_subject_file(_file(data, task, split, key), task=task,
                                      need_answers=True if split == "val" else None)[:limit]
        shots_rows: list[Question] = []
        if shots:
            dev = _file(data, task, "dev", key)
            if not dev.exists():
                raise BenchmarkDataError(f"{dev}: missing; {shots}-shot prompts take their examples from the dev split")
            shots_rows = read_subject_file(dev, task=task, need_answers=True)[:shots]
            if len(shots_rows) < shots:
                raise BenchmarkDataError(f"{dev}: {len(shots_rows)} questions, fewer than the {shots} shots asked")
        meta = info.get(key, {})
        subjects.append(Subject(key, meta.get("name", key), list(meta.get("categories", [])), questions, shots_rows))
    return subjects


def format_question(q: Question, *, with_answer: bool) -> str:
    """A question as the seed lays it out: the text, `A. ...` to `D. ...`, then `答案：` (and the answer + a blank line)."""
    text = q.question + "".join(f"\n{c}. {o}" for c, o in zip(CHOICES, q.options, strict=True)) + "\n答案："
    return text + f"{q.answer}\n\n" if with_answer else text


def build_prompt(subject: Subject, q: Question) -> str:
    """The seed's prompt for `q` (see the module doc): header, the subject's shots, the question."""
    return (HEADER.format(subject=subject.name) + "".join(format_question(s, with_answer=True) for s in subject.shots)
            + format_question(q, with_answer=False))


_ANSWER_PATTERNS = [re.compile(p) for p in (
    r"所以答案是\s*([ABCD])", r"答案[是为：:]\s*([ABCD])", r"([ABCD])\s*是正确的", r"选项\s*([ABCD])\s*正确",
    r"选择\s*([ABCD])", r"答案\s*([ABCD])",
)]


def extract_answer(text: str, q: Question) -> str | None:
    """The option a generated answer names: an explicit phrase (答案是B, 选择C, ...), else the first letter A-D, else
    the one option whose text it contains; None when it names none."""
    for pattern in _ANSWER_PATTERNS:
        if m := pattern.search(text):
            return m[1]
    if m := re.search(r"[ABCD]", text):
        return m[0]
    named = [c for c, o in zip(CHOICES, q.options, strict=True) if o.strip() and o.strip() in text]
    return named[0] if len(named) == 1 else None


def summarize(task: str, data: Path, subjects: list[Subject], predictions: dict[str, list[str | None]]) -> dict:
    """Accuracy per subject, per category, C-Eval's hard subset and overall, from `predictions` (subject -> letter
    per question); subjects without answers are left out (they go to the submission file)."""
    _, order, hard = subject_info(task, data)
    per_subject, categories = {}, {c: [0, 0] for c in order}
    total, hard_total = [0, 0], [0, 0]
    for s in subjects:
        scored = [(p, q.answer) for p, q in zip(predictions[s.key], s.questions, strict=True) if q.answer is not None]
        if not scored:
            continue
        correct = sum(p == a for p, a in scored)
        per_subject[s.key] = {"name": s.name, "correct": correct, "num": len(scored), "accuracy": correct / len(scored)}
        buckets = [categories.setdefault(c, [0, 0]) for c in s.categories] + [total]
        if s.key in hard:
            buckets.append(hard_total)
        for b in buckets:
            b[0] += correct
            b[1] += len(scored)

    def acc(b):
        return {"correct": b[0], "num": b[1], "accuracy": b[0] / b[1]}

    out = {"subjects": per_subject, "categories": {c: acc(b) for c, b in categories.items() if b[1]}}
    if hard_total[1]:
        out["hard"] = acc(hard_total)
    if total[1]:
        out["average"] = acc(total)
    return out


def submission(subjects: list[Subject], predictions: dict[str, list[str | None]]) -> dict:
    """The benchmark's submission format for questions without answers: {subject: {id: letter}}."""
    return {s.key: {q.id: p or "" for q, p in zip(s.questions, predictions[s.key], strict=True) if q.answer is None}
            for s in subjects if any(q.answer is None for q in s.questions)}
