"""An offline Chinese multiple-choice set from People's Daily's word/POS tags: cloze questions in C-Eval's layout.

A question is a corpus sentence with one word blanked out (`____`) and four candidates of the same part of speech
and the same length in characters: the removed word and three distractors. The distractors are drawn, with the
question's seed, from the corpus's words of that tag that sit near the answer in frequency (so neither length nor
frequency gives the answer away) and that do not occur in the sentence. The answer's letter is drawn uniformly.

Subjects are parts of speech (`SUBJECTS`: the corpus tag, the Chinese name the prompt uses, a category), so the
results read like C-Eval's: per subject, per category (content words, function words, idioms) and overall.

Splits follow the instruction data's document split (`zhjax.data.instructions.split_of`: a hash of each document's
id), so a model trained on the recipe's train split has seen no document of `val` or `test`:

- `dev`  (the few-shot examples, `shots` per subject) and `val` come from the *validation* documents,
- `test` from the *test* documents; sentences whose text also occurs in a train document are skipped.

The files are C-Eval's published layout, so `zhjax eval --task ceval` and a harness task read them unchanged::

    OUT/dev/{subject}_dev.csv    OUT/val/{subject}_val.csv    OUT/test/{subject}_test.csv
    OUT/subject_mapping.json     {subject: {"name": Chinese name, "categories": [category]}}
    OUT/manifest.json            settings, counts, and each question's document and sentence
    OUT/lm_eval/                 lm-evaluation-harness tasks over the same files (`write_harness_tasks`)

with columns `id,question,A,B,C,D,answer`. The same corpus, seed and sizes give byte-identical CSV files.

The harness tasks (`zhjax_cloze_{subject}` on the val split, and the group `zhjax_cloze`) reproduce the seed's
prompt exactly: the header as the task's description, the dev file's first rows as the shots, `答案：` followed
directly by the letter (`target_delimiter: ""`), examples separated by a blank line. Their data files are named by
absolute path, so a moved directory needs its tasks written again (`write_harness_tasks`).
"""

from __future__ import annotations

import csv
import json
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from zhjax.data.instructions import Sentence, read_documents, split_of

__all__ = ["BLANK", "CHOICES", "SUBJECTS", "ClozeQuestion", "build_cloze", "write_ceval_csv", "write_harness_tasks"]

BLANK = "____"
CHOICES = ("A", "B", "C", "D")
# subject: (corpus tag, Chinese name for the prompt, category)
SUBJECTS = {
    "noun": ("n", "名词", "实词"),
    "verb": ("v", "动词", "实词"),
    "adjective": ("a", "形容词", "实词"),
    "measure_word": ("q", "量词", "实词"),
    "adverb": ("d", "副词", "虚词"),
    "preposition": ("p", "介词", "虚词"),
    "conjunction": ("c", "连词", "虚词"),
    "idiom": ("i", "成语", "成语"),
}
CSV_COLUMNS = ("id", "question", "A", "B", "C", "D", "answer")
FREQUENCY_WINDOW = 40  # distractors come from this many words of the same tag and length on each side in frequency


@dataclass(frozen=True)
class ClozeQuestion:
    """One question: the sentence with the blank, four options, the answer letter, and where it came from."""

    question: str
    options: tuple[str, str, str, str]
    answer: str
    doc: str
    sentence: str

    def row(self, index: int) -> dict[str, str]:
        """The C-Eval CSV row of this question as the `index`-th of its file."""
        return {"id": str(index), "question": self.question, **dict(zip(CHOICES, self.options, strict=True)),
                "answer": self.answer}


def _vocabulary(documents) -> dict[str, dict[int, list[tuple[str, int]]]]:
    """Per tag and word length: the corpus's words, most frequent first (ties by the word, for determinism)."""
    counts: dict[str, Counter] = {tag: Counter() for tag, _, _ in SUBJECTS.values()}
    for doc in documents:
        for paragraph in doc.paragraphs:
            for unit in paragraph:
                if unit.tag in counts and len(unit.words) == 1:
                    counts[unit.tag][unit.text] += 1
    vocab: dict[str, dict[int, list[tuple[str, int]]]] = {}
    for tag, counter in counts.items():
        by_len: dict[int, list[tuple[str, int]]] = {}
        for word, n in sorted(counter.items(), key=lambda x: (-x[1], x[0])):
            if n >= 2:  # a word seen once may be a typo
                by_len.setdefault(len(word), []).append((word, n))
        vocab[tag] = by_len
    return vocab


def _distractors(rng: random.Random, answer: str, sentence: str, ranked: list[tuple[str, int]]) -> list[str] | None:
    """Three words near `answer` in frequency (same tag and length), none of them in the sentence; None if short."""
    words = [w for w, _ in ranked]
    try:
        at = words.index(answer)
    except ValueError:
        return None
    near = words[max(0, at - FREQUENCY_WINDOW): at + FREQUENCY_WINDOW + 1]
    pool = [w for w in near if w != answer and w not in sentence]
    return rng.sample(pool, 3) if len(pool) >= 3 else None


def _question(rng: random.Random, sentence: Sentence, tag: str, vocab) -> ClozeQuestion | None:
    """A question blanking one word of `tag` in `sentence` (one that occurs once there), or None if none fits."""
    text = sentence.text
    spots = [i for i, u in enumerate(sentence.units)
             if u.tag == tag and len(u.words) == 1 and text.count(u.text) == 1 and BLANK not in text]
    rng.shuffle(spots)
    for i in spots:
        answer = sentence.units[i].text
        others = _distractors(rng, answer, text, vocab[tag].get(len(answer), []))
        if others is None:
            continue
        options = [answer, *others]
        rng.shuffle(options)
        blanked = "".join(BLANK if j == i else u.text for j, u in enumerate(sentence.units))
        return ClozeQuestion(blanked, tuple(options), CHOICES[options.index(answer)], sentence.doc, text)
    return None


def _sentences(documents, split: str, train_texts: set[str], min_chars: int, max_chars: int) -> list[Sentence]:
    seen: set[str] = set()
    out = []
    for doc in documents:
        if split_of(doc.id) != split:
            continue
        for sentence in doc.sentences():
            text = sentence.text
            if min_chars <= len(text) <= max_chars and text not in train_texts and text not in seen:
                seen.add(text)
                out.append(sentence)
    return out


def _pick(rng: random.Random, pool: list[Sentence], n: int, tag: str, vocab, taken: set[str]) -> list[ClozeQuestion]:
    """Up to `n` questions of `tag` from `pool` in the seed's order, each sentence used once per subject."""
    order = list(range(len(pool)))
    rng.shuffle(order)
    out = []
    for k in order:
        if len(out) == n:
            break
        sentence = pool[k]
        if sentence.text in taken or not any(u.tag == tag for u in sentence.units):
            continue
        q = _question(rng, sentence, tag, vocab)
        if q is not None:
            out.append(q)
            taken.add(sentence.text)
    return out


def write_ceval_csv(path: Path, questions: Sequence[ClozeQuestion]) -> None:
    """Write questions as a C-Eval CSV (`id,question,A,B,C,D,answer`, ids from 0)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, lineterminator="\n")
        writer.writeheader()
        for i, q in enumerate(questions):
            writer.writerow(q.row(i))


def _yaml_str(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)  # a JSON string is a YAML double-quoted scalar


_TASK_YAML = """task: zhjax_cloze_{key}
dataset_path: csv
dataset_kwargs:
  data_files:
    validation: {val}
    dev: {dev}
validation_split: validation
fewshot_split: dev
fewshot_config:
  sampler: first_n
output_type: multiple_choice
description: {description}
doc_to_text: {doc_to_text}
doc_to_choice: ["A", "B", "C", "D"]
doc_to_target: "{{{{['A', 'B', 'C', 'D'].index(answer)}}}}"
target_delimiter: ""
fewshot_delimiter: "\\n\\n"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""
_DOC_TO_TEXT = "{{question}}\nA. {{A}}\nB. {{B}}\nC. {{C}}\nD. {{D}}\n答案："


def write_harness_tasks(out_dir: str | Path, subjects: dict[str, str]) -> Path:
    """Write lm-evaluation-harness task YAMLs over the C-Eval files in `out_dir` to `out_dir/lm_eval/`: one task
    per subject (`subjects`: key -> Chinese name) and the group `zhjax_cloze` (accuracy over all questions)."""
    out = Path(out_dir).resolve()
    folder = out / "lm_eval"
    folder.mkdir(parents=True, exist_ok=True)
    for key, name in subjects.items():
        (folder / f"zhjax_cloze_{key}.yaml").write_text(_TASK_YAML.format(
            key=key, val=_yaml_str(str(out / "val" / f"{key}_val.csv")),
            dev=_yaml_str(str(out / "dev" / f"{key}_dev.csv")),
            description=_yaml_str(f"以下是中国关于{name}考试的单项选择题，请选出其中的正确答案。\n\n"),
            doc_to_text=_yaml_str(_DOC_TO_TEXT)), encoding="utf-8")
    group = ["group: zhjax_cloze", "task:", *(f"  - zhjax_cloze_{key}" for key in subjects),
             "aggregate_metric_list:", "  - metric: acc", "    aggregation: mean", "    weight_by_size: true", ""]
    (folder / "zhjax_cloze.yaml").write_text("\n".join(group), encoding="utf-8")
    return folder


def build_cloze(tagged: str | Path, out_dir: str | Path, *, val: int = 50, test: int = 50, shots: int = 5,
                seed: int = 0, subjects: Sequence[str] | None = None, min_chars: int = 10,
                max_chars: int = 60) -> dict:
    """Write the cloze set (see the module doc) to `out_dir`; returns the manifest (also in `manifest.json`).

    Per subject: `shots` dev questions, `val` val questions and `test` test questions (fewer where the split's
    sentences run out; the manifest's counts say how many; a subject left without val or test questions gets no
    files, and the manifest's `subjects` lists those written). Deterministic for a given corpus and `seed`.
    """
    subjects = list(subjects or SUBJECTS)
    unknown = [s for s in subjects if s not in SUBJECTS]
    if unknown:
        raise ValueError(f"unknown cloze subjects {unknown}; expected some of {list(SUBJECTS)}")
    documents, rule = read_documents(tagged)
    vocab = _vocabulary(documents)
    train_texts = {s.text for d in documents if split_of(d.id) == "train" for s in d.sentences()}
    pools = {split: _sentences(documents, split, train_texts, min_chars, max_chars) for split in ("validation", "test")}
    out = Path(out_dir)
    counts: dict[str, dict[str, int]] = {}
    sources: dict[str, dict[str, list[dict]]] = {}
    for subject in subjects:
        tag = SUBJECTS[subject][0]
        rng = random.Random(f"{seed}:{subject}")
        taken: set[str] = set()
        dev_val = _pick(rng, pools["validation"], shots + val, tag, vocab, taken)
        files = {"dev": dev_val[:shots], "val": dev_val[shots:], "test": _pick(rng, pools["test"], test, tag, vocab, set())}
        counts[subject] = {split: len(q) for split, q in files.items()}
        if (shots and not files["dev"]) or not files["val"] or not files["test"]:
            continue  # a corpus too small for this subject: no files, so no empty subject file
        for split, questions in files.items():
            write_ceval_csv(out / split / f"{subject}_{split}.csv", questions)
        sources[subject] = {split: [{"doc": q.doc, "sentence": q.sentence} for q in qs] for split, qs in files.items()}
    written = [s for s in subjects if s in sources]
    mapping = {s: {"name": SUBJECTS[s][1], "categories": [SUBJECTS[s][2]]} for s in written}
    out.mkdir(parents=True, exist_ok=True)
    (out / "subject_mapping.json").write_text(json.dumps(mapping, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    write_harness_tasks(out, {s: SUBJECTS[s][1] for s in written})
    manifest = {"source": str(tagged), "documents": rule, "seed": seed, "val": val, "test": test, "shots": shots,
                "min_chars": min_chars, "max_chars": max_chars, "counts": counts, "subjects": written,
                "questions": sources}
    (out / "manifest.json").write_text(json.dumps(manifest, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    return manifest

