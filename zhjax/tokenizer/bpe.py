"""Extend a byte-level BPE tokenizer (HF `tokenizer.json`: SmolLM2, Llama-3, Qwen) with Chinese tokens.

The extension must keep every existing id, special token and English segmentation, so new merges are learned
*on top of* the base tokenizer, not from scratch:

1. The Chinese corpus is cut into words by the base's own pipeline (its normalizer and byte-level
   pre-tokenizer) and every word is segmented by the base's BPE: the state the base leaves a word in.
2. Each base token seen gets one private-use Unicode character, and `tokenizers`' `BpeTrainer` learns merges
   over those characters (one word per whitespace-separated item). Its merges are therefore merges of base
   tokens, learned in the order in which they would fire after all base merges.
3. The learned merges are mapped back to byte-level strings and appended, in order, after the base merges;
   their results become new tokens with ids after every existing id (model vocab and added tokens). A merge
   is kept only when both of its parts can occur (base tokens or results of kept merges), when the pair is
   not a base merge already (re-adding one would change its rank), and when the merged bytes contain a
   non-ASCII byte. The last rule is what keeps English intact: ASCII text only ever holds ASCII tokens, so
   no new merge can fire on it, and its ids stay exactly the base's.

`extend_bpe_tokenizer` writes an HF dir (the base's tokenizer files, `tokenizer.json` updated, plus
`vocab.json`/`merges.txt` regenerated when the base has them) that `transformers.AutoTokenizer` loads.

Two forms of the new tokens (`form`):

- `"merges"`: the learned merges and their results, as above. A merge learned for a word first completes its
  characters, so every character on the way to a word becomes a token of its own, and a character that stands
  where no word was merged is then one new token (a row the model must learn) instead of the base's 2-3 byte
  tokens (rows the base already knows).
- `"words"` (the demo's): only the results that are whole text of two or more characters, as *added tokens*
  (`tokenizer.json`'s `added_tokens`, not special, matched in the text before the base's pipeline runs,
  leftmost-longest); base merges and vocab are unchanged, so every character not inside a word keeps the base's
  spelling. The same merges are learned, so `new_tokens` bounds the merges and fewer words come back (the demo's
  30 000 merges give 26 480 words). llama.cpp loads them as user-defined tokens but matches the longest first
  instead of the leftmost: where two words overlap (`上的`+`重要` against `上`+`的重要`) it can segment Chinese
  differently, still into the same dictionary's words (README "Vocabulary extension: words").
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from zhjax.ownership import check_output_dir, staged_dir
from zhjax.tokenizer.files import TOKENIZER_FILES
from zhjax.tokenizer.train import iter_corpus_lines

__all__ = [
    "FORMS", "BpeExtensionResult", "byte_level_decoder_table", "byte_level_form", "byte_level_token",
    "extend_bpe_tokenizer", "learn_chinese_merges",
]

FORMS = ("merges", "words")

# written here (the extended segmentation); every other tokenizer file of the base is copied as it is
_REWRITTEN = ("tokenizer.json", "vocab.json", "merges.txt")
# private-use code points that stand for base tokens while the trainer runs
_PRIVATE_USE = [range(0xE000, 0xF900), range(0xF0000, 0xFFFFE), range(0x100000, 0x10FFFE)]


@dataclass(frozen=True)
class BpeExtensionResult:
    """What the extension did: sizes before and after and where it wrote the tokenizer."""

    out_dir: Path
    base_vocab_size: int
    vocab_size: int
    added_tokens: int
    added_merges: int
    learned_merges: int


def byte_level_decoder_table() -> dict[str, int]:
    """The GPT-2 byte-level alphabet: each of the 256 characters a byte-level token is made of -> its byte.

    Printable Latin-1 bytes stand for themselves; the others (control bytes, space, 0x7F-0xA0, 0xAD) are
    shifted to code points 256 and up, in byte order.
    """
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {chr(b): b for b in printable}
    shifted = 0
    for b in range(256):
        if b not in table.values():
            table[chr(256 + shifted)] = b
            shifted += 1
    return table


def byte_level_form(text: str) -> str:
    """`text` written in the byte-level alphabet, as a byte-level BPE's vocab holds it ("中" -> "ä¸Ń")."""
    char_of = {b: c for c, b in byte_level_decoder_table().items()}
    return "".join(char_of[b] for b in text.encode("utf-8"))


def byte_level_token(token: str, alphabet: dict[str, int] | None = None) -> str:
    """A byte-level BPE's token string as its vocab would hold it: a vocab token as it is, a word added as plain text
    (form "words", which `_word_text` keeps out of the alphabet) in the byte-level alphabet. `alphabet`:
    `byte_level_decoder_table()`, passed by callers that convert many tokens."""
    alphabet = alphabet if alphabet is not None else byte_level_decoder_table()
    return token if all(c in alphabet for c in token) else byte_level_form(token)


def _word_text(token: str, byte_of: dict[str, int]) -> str | None:
    """The text of a byte-level token when it is two or more whole characters and cannot be read as a
    byte-level string itself (every character in the alphabet would make the added token ambiguous), else None."""
    try:
        text = bytes(byte_of[c] for c in token).decode("utf-8")
    except UnicodeDecodeError:
        return None
    if len(text) < 2 or all(c in byte_of for c in text):
        return None
    return text


def _is_byte_level(node: dict | None) -> bool:
    if not node:
        return False
    if node.get("type") == "ByteLevel":
        return True
    return any(_is_byte_level(child) for child in node.get("pretokenizers", []) or [])


def _load_base(base_dir: Path) -> dict:
    path = base_dir / "tokenizer.json"
    if not path.is_file():
        present = sorted(p.name for p in base_dir.iterdir()) if base_dir.is_dir() else []
        raise FileNotFoundError(
            f"base tokenizer dir {base_dir} has no tokenizer.json (found: {present or 'nothing'}); "
            "the byte-level BPE extension needs an HF tokenizer.json"
        )
    spec = json.loads(path.read_text(encoding="utf-8"))
    model = spec.get("model", {})
    if model.get("type") != "BPE" or not _is_byte_level(spec.get("pre_tokenizer")):
        raise ValueError(
            f"{path}: expected a byte-level BPE tokenizer (model.type 'BPE' with a ByteLevel pre_tokenizer), got "
            f"model.type={model.get('type')!r}, pre_tokenizer={(spec.get('pre_tokenizer') or {}).get('type')!r}"
        )
    return spec


def _count_symbol_words(
    base: Tokenizer, lines: Iterator[str], symbols: dict[int, str], batch: int = 512
) -> Counter:
    """Counts of the base-segmented words of the lines, each token written as its private-use character.

    Only distinct words are kept, so memory follows the corpus's vocabulary, not its length.
    """
    counts: Counter = Counter()
    code_points = (cp for block in _PRIVATE_USE for cp in block)
    chunk: list[str] = []

    def flush() -> None:
        for enc in base.encode_batch(chunk, add_special_tokens=False):
            current: list[str] = []
            last = None
            for token_id, word in zip(enc.ids, enc.word_ids, strict=True):
                if word is None or word != last:
                    if current:
                        counts["".join(current)] += 1
                    current = []
                last = word
                if word is None:  # an added/special token inside the text: never merged
                    continue
                if token_id not in symbols:
                    try:
                        symbols[token_id] = chr(next(code_points))
                    except StopIteration:
                        raise ValueError(
                            "the corpus uses more distinct base tokens than private-use code points"
                        ) from None
                current.append(symbols[token_id])
            if current:
                counts["".join(current)] += 1
        chunk.clear()

    for line in lines:
        chunk.append(line)
        if len(chunk) >= batch:
            flush()
    if chunk:
        flush()
    return counts


def _repeat_words(counts: Counter, per_line: int = 1024) -> Iterator[str]:
    """Feed the trainer each distinct word as often as it occurs, a bounded number per line."""
    for word, count in counts.items():
        while count > 0:
            n = min(count, per_line)
            yield " ".join([word] * n)
            count -= n


def learn_chinese_merges(
    base_spec: dict,
    corpus: Sequence[str | Path],
    new_tokens: int,
    *,
    min_frequency: int = 2,
    slack: float = 0.25,
    show_progress: bool = False,
) -> tuple[list[tuple[str, str]], int]:
    """Merges (byte-level strings) to append to `base_spec`, adding at most `new_tokens` new tokens.

    Returns the merges and how many the trainer learned before filtering. Some learned merges are filtered
    out (see the module docstring), so the trainer is asked for `slack` (a fraction) more; when that is not
    enough it is asked again with twice the slack (four rounds at most). Fewer than `new_tokens` come back
    when the corpus has no more pairs of at least `min_frequency` occurrences.
    """
    base = Tokenizer.from_str(json.dumps(base_spec))
    symbols: dict[int, str] = {}
    counts = _count_symbol_words(base, iter_corpus_lines(corpus), symbols)
    if not counts:
        raise ValueError(f"the corpus {[str(p) for p in corpus]} has no text to learn merges from")

    to_token = {sym: base.id_to_token(token_id) for token_id, sym in symbols.items()}
    existing = {
        tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in base_spec["model"]["merges"]
    }
    for _ in range(4):
        wanted = int(new_tokens * (1 + slack)) + 64
        learned = _train_merges(counts, len(symbols) + wanted, min_frequency, show_progress)
        kept, added = _filter_merges(learned, to_token, base_spec["model"]["vocab"], existing, new_tokens)
        if added == new_tokens or len(learned) < wanted:  # enough, or the corpus has no more frequent pairs
            return kept, len(learned)
        slack *= 2  # too many learned merges were filtered out: ask the trainer for more
    return kept, len(learned)


def _train_merges(counts: Counter, vocab_size: int, min_frequency: int, show_progress: bool) -> list:
    """BpeTrainer's merges over the private-use symbols (its vocab = the symbols plus the merges)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, show_progress=show_progress, special_tokens=[]
    )
    tokenizer.train_from_iterator(_repeat_words(counts), trainer=trainer)
    return json.loads(tokenizer.to_str())["model"]["merges"]


def _filter_merges(
    learned: list, to_token: dict[str, str], vocab: dict[str, int], existing: set, new_tokens: int
) -> tuple[list[tuple[str, str]], int]:
    """The learned merges, as byte-level string pairs, that are safe to append (see the module docstring)."""
    byte_of = byte_level_decoder_table()
    pairs = set(existing)
    reachable = set(to_token.values())
    kept: list[tuple[str, str]] = []
    added: set[str] = set()
    for merge in learned:
        left_sym, right_sym = merge.split(" ", 1) if isinstance(merge, str) else merge
        left = "".join(to_token[c] for c in left_sym)
        right = "".join(to_token[c] for c in right_sym)
        merged = left + right
        if left not in reachable or right not in reachable or (left, right) in pairs:
            continue
        if all(byte_of.get(c, 0) < 0x80 for c in merged):  # could fire on ASCII (English) text
            continue
        if merged not in vocab and merged not in added:
            if len(added) == new_tokens:
                break
            added.add(merged)
        reachable.add(merged)
        pairs.add((left, right))
        kept.append((left, right))
    return kept, len(added)


def extend_bpe_tokenizer(
    base_dir: str | Path,
    corpus: Sequence[str | Path],
    new_tokens: int,
    out_dir: str | Path,
    *,
    min_frequency: int = 2,
    show_progress: bool = False,
    overwrite: bool = False,
    form: str = "merges",
) -> BpeExtensionResult:
    """Learn up to `new_tokens` Chinese tokens on `corpus` and write the extended tokenizer to `out_dir`.

    `base_dir` is an HF dir with a byte-level BPE `tokenizer.json`; `corpus` are text files or directories.
    Existing ids, merges (and their ranks), added/special tokens and the pre/post-processing are unchanged;
    new tokens take the ids after the largest existing id. `out_dir` is refused (before any work) when it is,
    contains or lies in `base_dir`, or holds files zhjax did not write unless `overwrite` (`zhjax.ownership`).
    `form` is "merges" or "words" (the module docstring); with "words" the result's `added_merges` is 0.
    """
    if form not in FORMS:
        raise ValueError(f"form={form!r}: expected one of {FORMS}")
    if new_tokens <= 0:
        raise ValueError(f"new_tokens={new_tokens}: expected a positive number of tokens to add")
    base_dir, out = Path(base_dir), Path(out_dir)
    spec = _load_base(base_dir)
    check_output_dir(out, inputs=[base_dir], overwrite=overwrite)  # before the (long) learning
    base_size = Tokenizer.from_str(json.dumps(spec)).get_vocab_size(with_added_tokens=True)
    merges, learned = learn_chinese_merges(
        spec, corpus, new_tokens, min_frequency=min_frequency, show_progress=show_progress
    )

    vocab: dict[str, int] = spec["model"]["vocab"]
    next_id = max([*vocab.values(), *(t["id"] for t in spec.get("added_tokens", []))]) + 1
    added = 0
    if form == "words":
        byte_of = byte_level_decoder_table()
        taken = {t["content"] for t in spec.get("added_tokens", [])}
        for left, right in merges:
            text = _word_text(left + right, byte_of)
            if text is None or text in taken:
                continue
            taken.add(text)
            spec.setdefault("added_tokens", []).append({
                "id": next_id, "content": text, "single_word": False, "lstrip": False, "rstrip": False,
                "normalized": False, "special": False,
            })
            next_id += 1
            added += 1
        merges = []
    for left, right in merges:
        if left + right not in vocab:
            vocab[left + right] = next_id
            next_id += 1
            added += 1
    string_merges = bool(spec["model"]["merges"]) and isinstance(spec["model"]["merges"][0], str)
    spec["model"]["merges"].extend(f"{a} {b}" if string_merges else [a, b] for a, b in merges)

    with staged_dir(out, inputs=[base_dir], overwrite=overwrite) as tmp:
        for name in TOKENIZER_FILES:
            if name not in _REWRITTEN and (base_dir / name).is_file():
                shutil.copyfile(base_dir / name, tmp / name)
        (tmp / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False, indent=2), encoding="utf-8")
        if (base_dir / "vocab.json").is_file():
            (tmp / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
        if (base_dir / "merges.txt").is_file():
            lines = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
            (tmp / "merges.txt").write_text("#version: 0.2\n" + "\n".join(lines) + "\n", encoding="utf-8")
    size = Tokenizer.from_file(str(out / "tokenizer.json")).get_vocab_size(with_added_tokens=True)
    return BpeExtensionResult(out, base_size, size, added, len(merges), learned)
