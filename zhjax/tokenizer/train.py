"""Train a Chinese SentencePiece model from plain-text files, streamed.

This is step one of the Chinese-LLaMA method: learn Chinese pieces on a Chinese corpus, which
`zhjax.tokenizer.merge` then appends to the base (LLaMA-style) tokenizer.

Design:

- The corpus is never loaded by us: `iter_corpus_lines` walks the files (directories are expanded
  recursively, in sorted order, so runs are reproducible) and yields one stripped, non-empty line at a
  time into SentencePiece's `sentence_iterator`. SentencePiece itself keeps at most
  `input_sentence_size` sentences (a uniform reservoir sample when the input is larger), which bounds
  the trainer's memory on corpora of any size.
- `SentencePieceTrainConfig` carries the knobs the seed used (vocab size, model type, character
  coverage 0.9995, max sentence length, threads, sample size) and nothing is hidden: every field is
  passed to the trainer as is, and `extra_options` passes anything else SentencePiece accepts.
- Progress is reported through a callback (lines and megabytes read, lines too long for the trainer,
  elapsed time), so a tool can print it and a test can stay quiet.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import sentencepiece as spm

__all__ = [
    "SentencePieceTrainConfig",
    "TrainProgress",
    "TrainResult",
    "expand_inputs",
    "iter_corpus_lines",
    "train_sentencepiece",
]

MODEL_TYPES = ("unigram", "bpe", "char", "word")


@dataclass(frozen=True)
class SentencePieceTrainConfig:
    """Options of one SentencePiece training run (names follow SentencePiece's own flags).

    `input_sentence_size` is the number of sentences the trainer keeps (0 keeps all); when the corpus is
    larger, SentencePiece draws a uniform sample of that many. Lines longer than `max_sentence_length`
    bytes are skipped by SentencePiece; the progress report counts them so that nothing is lost silently.
    """

    vocab_size: int = 20000
    model_type: str = "unigram"
    character_coverage: float = 0.9995
    max_sentence_length: int = 16384
    num_threads: int = 4
    input_sentence_size: int = 0
    normalization_rule_name: str = "nmt_nfkc"
    byte_fallback: bool = False
    split_digits: bool = False
    seed_sentencepiece_size: int = 1_000_000
    extra_options: dict[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"model_type={self.model_type!r}: expected one of {MODEL_TYPES}")
        if self.vocab_size < 4:
            raise ValueError(f"vocab_size={self.vocab_size}: expected at least 4 (3 special pieces + 1)")
        if not 0.0 < self.character_coverage <= 1.0:
            raise ValueError(f"character_coverage={self.character_coverage}: expected a value in (0, 1]")
        if self.max_sentence_length <= 0 or self.num_threads <= 0 or self.input_sentence_size < 0:
            raise ValueError(
                "max_sentence_length and num_threads must be positive and input_sentence_size >= 0, got "
                f"{self.max_sentence_length}, {self.num_threads}, {self.input_sentence_size}"
            )


@dataclass
class TrainProgress:
    """What has been read so far; passed to the progress callback and returned at the end."""

    files: int = 0
    lines: int = 0
    bytes: int = 0
    too_long: int = 0
    seconds: float = 0.0

    def describe(self) -> str:
        """One human-readable line, e.g. for a tool's progress output."""
        return (
            f"{self.lines:,} lines, {self.bytes / 1e6:.1f} MB from {self.files} file(s) in {self.seconds:.1f}s"
            + (
                f"; {self.too_long:,} lines over max_sentence_length (skipped by SentencePiece)"
                if self.too_long
                else ""
            )
        )


@dataclass(frozen=True)
class TrainResult:
    """The trained model's path, its number of pieces and what was read."""

    model_file: Path
    vocab_size: int
    progress: TrainProgress


def expand_inputs(inputs: Sequence[str | Path]) -> list[Path]:
    """Files named directly, plus every regular file under each named directory (recursively, sorted).

    Raises FileNotFoundError naming the first path that does not exist, and ValueError when the inputs
    contain no file at all.
    """
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")))
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(
                f"corpus input {path} does not exist (expected a text file or a directory)"
            )
    if not files:
        raise ValueError(f"no corpus files found in {[str(p) for p in inputs]}")
    return files


def iter_corpus_lines(
    inputs: Sequence[str | Path],
    *,
    progress: TrainProgress | None = None,
    on_progress: Callable[[TrainProgress], None] | None = None,
    report_every: int = 100_000,
    max_sentence_length: int | None = None,
) -> Iterator[str]:
    """Yield the stripped, non-empty lines of the inputs (files or directories), one at a time.

    Files are read as UTF-8 and a decoding error names the file. When given, `progress` is updated in
    place and `on_progress` is called every `report_every` lines and once at the end.
    """
    progress = progress if progress is not None else TrainProgress()
    start = time.perf_counter()
    for path in expand_inputs(inputs):
        progress.files += 1
        with open(path, encoding="utf-8") as handle:
            try:
                for raw in handle:
                    line = raw.strip()
                    if not line:
                        continue
                    size = len(line.encode("utf-8"))
                    progress.lines += 1
                    progress.bytes += size
                    if max_sentence_length is not None and size > max_sentence_length:
                        progress.too_long += 1
                    if on_progress is not None and progress.lines % report_every == 0:
                        progress.seconds = time.perf_counter() - start
                        on_progress(progress)
                    yield line
            except UnicodeDecodeError as err:
                raise ValueError(f"{path}: not valid UTF-8 text ({err})") from err
    progress.seconds = time.perf_counter() - start
    if on_progress is not None:
        on_progress(progress)


def train_sentencepiece(
    inputs: Sequence[str | Path],
    model_prefix: str | Path,
    config: SentencePieceTrainConfig | None = None,
    *,
    on_progress: Callable[[TrainProgress], None] | None = None,
    report_every: int = 100_000,
    quiet: bool = True,
) -> TrainResult:
    """Train a SentencePiece model on text files/directories; write `MODEL_PREFIX.model` and `.vocab`.

    The files are streamed line by line into the trainer (see `iter_corpus_lines`). `quiet` silences
    SentencePiece's own log; the progress callback still runs.
    """
    if isinstance(inputs, str | Path):
        inputs = [inputs]
    config = config or SentencePieceTrainConfig()
    progress = TrainProgress()
    sentences = iter_corpus_lines(
        inputs,
        progress=progress,
        on_progress=on_progress,
        report_every=report_every,
        max_sentence_length=config.max_sentence_length,
    )
    prefix = Path(model_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    options = {
        f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name != "extra_options"
    }
    options.update(config.extra_options)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=sentences,
            model_prefix=str(prefix),
            shuffle_input_sentence=True,
            minloglevel=2 if quiet else 0,
            **options,
        )
    except RuntimeError as err:
        raise RuntimeError(
            f"SentencePiece training on {[str(p) for p in inputs]} ({progress.describe()}) failed: {err}"
        ) from err
    model_file = prefix.with_name(prefix.name + ".model")
    processor = spm.SentencePieceProcessor(model_file=str(model_file))
    return TrainResult(model_file=model_file, vocab_size=processor.get_piece_size(), progress=progress)
