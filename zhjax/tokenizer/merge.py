"""Merge a Chinese SentencePiece model into a LLaMA-style base SentencePiece model (the seed's method).

The merge works on the SentencePiece model proto (`sentencepiece_model_pb2.ModelProto`): the base proto is
kept whole (normalizer spec, trainer spec, every piece with its id, type and score), and every piece of the
Chinese model whose string is not already a base piece is appended, in the Chinese model's order, as a
NORMAL piece. Base ids therefore never move, and new ids follow the Chinese model's order.

Scores decide which merges SentencePiece's BPE applies first, so they are a choice:

- `score_mode="seed"` gives every new piece score 0, as the seed's `merge_tokenizers.py` did. 0 is above every
  base score, so new pieces outrank base merges, and the ~18k tied scores leave the order among them to
  SentencePiece's tie-break (leftmost pair), which a ranked merge list (Hugging Face `tokenizers`) cannot
  express: the two then segment about a quarter of Chinese lines differently.
- `score_mode="rank"` (default) gives the new pieces distinct scores below the base's lowest, decreasing in
  their own order. Same pieces, same ids, about the same compression, and a strict order that a ranked
  merge list reproduces exactly, so HF ids equal SentencePiece ids.

`save_merged_tokenizer` writes `tokenizer.model` and, beside it, the Hugging Face files (`tokenizer.json`,
`tokenizer_config.json`) that `transformers.AutoTokenizer.from_pretrained(DIR)` loads. The `tokenizers`
pipeline is built here from the proto (`sentencepiece_to_tokenizers`) rather than left to transformers'
load-time conversion, so the dir's behaviour is fixed when it is written: BPE merges ranked by
(score desc, id asc), byte fallback, the base's normalizer spec, and a BOS post-processor like LLaMA's.
`tokenizer_config.json` names the generic `TokenizersBackend` class on purpose: naming `LlamaTokenizer` would
make transformers 5 rebuild the pipeline with its own Metaspace pre-tokenizer, which drops SentencePiece's
dummy prefix before a leading space (" lead" -> ['▁lead'] instead of ['▁', '▁lead']).

`tokenization_report` measures a tokenizer on held-out text: tokens per Chinese character, tokens per
English word, and the share of lines on which the HF ids equal the SentencePiece ids.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as sp_pb2
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, processors

from zhjax.ownership import check_output_dir, staged_dir

__all__ = [
    "MergeResult",
    "TokenizationReport",
    "BUILTIN_EVAL_LINES",
    "is_chinese_line",
    "is_english_line",
    "with_english",
    "read_eval_lines",
    "load_sp_proto",
    "merge_sentencepiece",
    "known_differences",
    "merge_tokenizers",
    "save_merged_tokenizer",
    "sentencepiece_to_tokenizers",
    "tokenization_report",
]

_PIECE = sp_pb2.ModelProto.SentencePiece  # SentencePiece's own piece types
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = (
    _PIECE.NORMAL, _PIECE.UNKNOWN, _PIECE.CONTROL, _PIECE.USER_DEFINED, _PIECE.UNUSED, _PIECE.BYTE
)
SCORE_MODES = ("rank", "seed")
PAD_TOKEN = "[PAD]"
_LATIN = re.compile(r"[A-Za-z]")
_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f]")


@dataclass(frozen=True)
class MergeResult:
    """The merged proto and how it was made."""

    proto: sp_pb2.ModelProto
    base_size: int
    added: int
    score_mode: str
    pad_id: int | None

    @property
    def vocab_size(self) -> int:
        return len(self.proto.pieces)


def load_sp_proto(path: str | Path) -> sp_pb2.ModelProto:
    """Parse a SentencePiece `.model` file; errors name the file and what was expected."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"SentencePiece model {path} does not exist")
    proto = sp_pb2.ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except Exception as err:  # protobuf raises its own DecodeError
        raise ValueError(f"{path} is not a SentencePiece model proto ({err})") from err
    if not proto.pieces:
        raise ValueError(f"{path} parsed as a SentencePiece model but has no pieces")
    return proto


def merge_sentencepiece(
    base: sp_pb2.ModelProto,
    chinese: sp_pb2.ModelProto,
    *,
    score_mode: str = "rank",
    pad_token: str | None = None,
) -> MergeResult:
    """Append the Chinese pieces missing from `base` (in the Chinese order, type NORMAL) to a copy of it.

    `score_mode` is "rank" (new scores below the base's lowest, strictly decreasing) or "seed" (every new
    score 0, as the seed). `pad_token` (e.g. "[PAD]", as the Chinese-Alpaca tokenizer) is appended last as a
    CONTROL piece, which SentencePiece never produces from text. The inputs are not modified.
    """
    if score_mode not in SCORE_MODES:
        raise ValueError(f"score_mode={score_mode!r}: expected one of {SCORE_MODES}")
    merged = sp_pb2.ModelProto()
    merged.CopyFrom(base)
    known = {p.piece for p in base.pieces}
    new_pieces = []
    for piece in chinese.pieces:
        if piece.piece not in known:
            known.add(piece.piece)
            new_pieces.append(piece.piece)
    scores = (
        _rank_scores(min(p.score for p in base.pieces), len(new_pieces)) if score_mode == "rank" else None
    )
    for i, text in enumerate(new_pieces):
        entry = merged.pieces.add()
        entry.piece = text
        entry.score = 0.0 if scores is None else float(scores[i])
        entry.type = NORMAL
    pad_id = None
    if pad_token is not None:
        if pad_token in known:
            raise ValueError(f"pad_token {pad_token!r} is already a piece of the merged model")
        entry = merged.pieces.add()
        entry.piece, entry.score, entry.type = pad_token, 0.0, CONTROL
        pad_id = len(merged.pieces) - 1
    return MergeResult(merged, len(base.pieces), len(new_pieces), score_mode, pad_id)


def _rank_scores(lowest: float, count: int) -> np.ndarray:
    """`count` float32 scores below `lowest`, strictly decreasing, evenly spaced and exactly representable.

    The step is a power of two at least as large as float32's spacing at the far end, so that the scores stay
    distinct after the proto stores them as float32 (LLaMA's lowest score is -1e9, where the spacing is 64).
    """
    start = float(np.floor(lowest))
    step = 1.0
    while float(np.spacing(np.float32(abs(start) + step * (count + 1)))) > step:
        step *= 2.0
    scores = (start - step * np.arange(1, count + 1, dtype=np.float64)).astype(np.float32)
    if count and not (np.all(np.diff(scores) < 0) and scores[0] < np.float32(lowest)):
        raise AssertionError(f"could not place {count} distinct float32 scores below {lowest}")
    return scores


def sentencepiece_to_tokenizers(proto: sp_pb2.ModelProto) -> Tokenizer:
    """A Hugging Face `tokenizers.Tokenizer` that segments like `SentencePieceProcessor.encode` on the proto.

    BPE models become a `BPE` model whose merges are every split (left, right) of a NORMAL piece into two
    NORMAL pieces, ranked by the piece's (score descending, id ascending) — SentencePiece's merge order when
    scores are distinct. Unigram models become a `Unigram` model with the same scores. The normalizer follows
    the normalizer spec (precompiled charsmap, extra whitespace removal, dummy prefix, "▁" escaping); the
    decoder undoes it; the post-processor prepends BOS as LLaMA's tokenizer does.
    """
    spec = proto.trainer_spec
    byte_fallback = bool(spec.byte_fallback)
    unk_piece = proto.pieces[spec.unk_id].piece if spec.unk_id >= 0 else None
    if spec.model_type == sp_pb2.TrainerSpec.BPE:
        vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
        normal = {p.piece: (-p.score, i) for i, p in enumerate(proto.pieces) if p.type == NORMAL}
        ranked = []
        for piece, key in normal.items():
            for cut in range(1, len(piece)):
                left, right = piece[:cut], piece[cut:]
                if left in normal and right in normal:
                    ranked.append((key, cut, left, right))
        ranked.sort()
        merges = [(left, right) for _, _, left, right in ranked]
        model = models.BPE(
            vocab=vocab,
            merges=merges,
            unk_token=unk_piece,
            fuse_unk=True,
            byte_fallback=byte_fallback,
            dropout=None,
        )
    elif spec.model_type == sp_pb2.TrainerSpec.UNIGRAM:
        model = models.Unigram(
            [(p.piece, p.score) for p in proto.pieces],
            unk_id=spec.unk_id if spec.unk_id >= 0 else None,
            byte_fallback=byte_fallback,
        )
    else:
        raise ValueError(
            f"SentencePiece model_type {spec.model_type} is not supported (expected BPE or UNIGRAM)"
        )
    tokenizer = Tokenizer(model)

    norm = proto.normalizer_spec
    steps: list[normalizers.Normalizer] = []
    if norm.precompiled_charsmap:
        steps.append(normalizers.Precompiled(norm.precompiled_charsmap))
    if norm.remove_extra_whitespaces:
        # SentencePiece only squeezes spaces; other whitespace (newlines, tabs) is left alone
        steps += [normalizers.Replace(Regex(r"^ +| +$"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
    user_defined = [p.piece for p in proto.pieces if p.type == USER_DEFINED]
    if norm.add_dummy_prefix and user_defined:
        # SentencePiece finds user-defined pieces in the normalized text (dummy prefix added once, to the whole
        # line), so they are matched after normalization here too (`normalized=True` below). tokenizers also
        # normalizes each such piece's own string: the prefix must not be added to a string that *is* one.
        alone = "|".join(re.escape(piece) for piece in user_defined)
        steps.append(normalizers.Replace(Regex(f"^(?!(?:{alone})$)"), " "))
    elif norm.add_dummy_prefix:
        steps.append(normalizers.Prepend(" "))
    if norm.escape_whitespaces:
        steps.append(normalizers.Replace(" ", "▁"))
    tokenizer.normalizer = normalizers.Sequence(steps)

    steps_back: list[decoders.Decoder] = [decoders.Replace("▁", " ")]
    if byte_fallback:
        steps_back.append(decoders.ByteFallback())
    steps_back.append(decoders.Fuse())
    if norm.add_dummy_prefix:
        steps_back.append(decoders.Strip(content=" ", left=1, right=0))
    tokenizer.decoder = decoders.Sequence(steps_back)

    specials = [p.piece for p in proto.pieces if p.type in (CONTROL, UNKNOWN)]
    tokenizer.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    if user_defined:
        tokenizer.add_tokens([AddedToken(s, special=False, normalized=True) for s in user_defined])
    if spec.bos_id >= 0:
        bos = proto.pieces[spec.bos_id].piece
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, spec.bos_id)]
        )
    return tokenizer


def save_merged_tokenizer(
    proto: sp_pb2.ModelProto, out_dir: str | Path, *, pad_token: str | None = None, inputs=(), overwrite: bool = False
) -> Path:
    """Write `OUT_DIR/tokenizer.model` and the HF files that `AutoTokenizer.from_pretrained(OUT_DIR)` loads.

    The proto is checked to load in SentencePiece first. `pad_token` names a piece of the proto to declare
    as the HF pad token (e.g. the "[PAD]" of `merge_sentencepiece(..., pad_token=...)`). `out_dir` is refused
    when it is, contains or lies in one of `inputs`, or holds files zhjax did not write unless `overwrite`
    (`zhjax.ownership`); it appears only when complete.
    """
    from transformers import PreTrainedTokenizerFast

    out = Path(out_dir)
    data = proto.SerializeToString()
    spm.SentencePieceProcessor(model_proto=data)  # raises if SentencePiece cannot use the merged proto
    spec = proto.trainer_spec

    def piece(index: int) -> str | None:
        return proto.pieces[index].piece if 0 <= index < len(proto.pieces) else None

    pieces = {p.piece for p in proto.pieces}
    if pad_token is not None and pad_token not in pieces:
        raise ValueError(f"pad_token {pad_token!r} is not a piece of the model being saved to {out}")
    hf = PreTrainedTokenizerFast(
        tokenizer_object=sentencepiece_to_tokenizers(proto),
        bos_token=piece(spec.bos_id),
        eos_token=piece(spec.eos_id),
        unk_token=piece(spec.unk_id),
        pad_token=pad_token or piece(spec.pad_id),
        clean_up_tokenization_spaces=False,
    )
    with staged_dir(out, inputs=inputs, overwrite=overwrite) as tmp:
        hf.save_pretrained(str(tmp))
        (tmp / "tokenizer.model").write_bytes(data)
    return out


def known_differences(proto: sp_pb2.ModelProto) -> list[str]:
    """The inputs on which the HF files written for `proto` segment differently from SentencePiece, and why.

    Everything else agrees id for id, user-defined pieces included (they are matched after normalization, as
    SentencePiece matches them; the tests check lines around them).
    """
    out = []
    control = [p.piece for p in proto.pieces if p.type == CONTROL]
    if control:
        out.append(
            f"text containing a control piece's string ({', '.join(control[:4])}) differs: HF reads it as that "
            "special token, SentencePiece as plain characters (pass split_special_tokens=True to HF to read it as text)"
        )
    user_defined = [p.piece for p in proto.pieces if p.type == USER_DEFINED]
    if user_defined and proto.normalizer_spec.add_dummy_prefix:
        out.append(
            f"a line that is exactly one user-defined piece (e.g. {user_defined[0]!r}) differs: SentencePiece puts "
            "a lone '▁' before it, HF does not"
        )
    return out


def merge_tokenizers(
    base_model: str | Path,
    chinese_model: str | Path,
    out_dir: str | Path,
    *,
    score_mode: str = "rank",
    pad_token: str | None = None,
    overwrite: bool = False,
) -> MergeResult:
    """Merge `chinese_model` into `base_model` (both `.model` files) and save the result to `out_dir`.

    `out_dir` is checked first (`save_merged_tokenizer`): never an input's folder, never someone else's files.
    """
    inputs = [base_model, chinese_model]  # a folder holding either is refused as the output
    check_output_dir(out_dir, inputs=inputs, overwrite=overwrite)
    result = merge_sentencepiece(
        load_sp_proto(base_model), load_sp_proto(chinese_model), score_mode=score_mode, pad_token=pad_token
    )
    save_merged_tokenizer(result.proto, out_dir, pad_token=pad_token, inputs=inputs, overwrite=overwrite)
    return result


@dataclass(frozen=True)
class TokenizationReport:
    """Tokenizer cost on held-out text; `agreement` is None when no SentencePiece reference was given."""

    zh_lines: int
    zh_chars: int
    zh_tokens: int
    en_lines: int
    en_words: int
    en_tokens: int
    lines: int
    agreement: float | None
    disagreeing_lines: int | None

    @property
    def tokens_per_zh_char(self) -> float:
        return self.zh_tokens / self.zh_chars if self.zh_chars else float("nan")

    @property
    def tokens_per_en_word(self) -> float:
        return self.en_tokens / self.en_words if self.en_words else float("nan")

    def describe(self, name: str = "tokenizer") -> str:
        """A short multi-line summary for the tools to print."""
        lines = [
            f"{name}: {self.tokens_per_zh_char:.3f} tokens per Chinese character "
            f"({self.zh_tokens:,} tokens / {self.zh_chars:,} characters on {self.zh_lines:,} lines)"
            if self.zh_lines
            else f"{name}: no Chinese line to measure",
            f"{name}: {self.tokens_per_en_word:.3f} tokens per English word "
            f"({self.en_tokens:,} tokens / {self.en_words:,} words on {self.en_lines:,} lines)"
            if self.en_lines
            else f"{name}: no English line to measure",
        ]
        if self.agreement is not None:
            lines.append(
                f"{name}: HF ids == SentencePiece ids on {self.agreement:.1%} of lines "
                f"({self.disagreeing_lines} of {self.lines} differ)"
            )
        return "\n".join(lines)


# A small bilingual sample for the tools' report when no --eval-text is given (written for zhjax).
BUILTIN_EVAL_LINES = [
    "今天天气很好，我们一起去公园散步，顺便看看湖边新开的书店。",
    "中国科学院的研究人员发布了一份关于气候变化的报告，引起了广泛关注。",
    "这家公司去年的营业收入增长了百分之十二，主要来自海外市场。",
    "学习一门新的语言需要耐心，每天坚持练习才能慢慢进步。",
    "人工智能技术正在改变医疗、教育和交通等许多行业。",
    "春节期间，许多人回到家乡与家人团聚，火车站里人山人海。",
    "请把会议记录整理好，明天上午九点之前发给我。",
    "他在北京大学读了四年书，毕业后去上海工作。",
    "The committee will publish its final report on renewable energy next month.",
    "Learning a new language takes patience, and daily practice makes the difference.",
    "She moved to Shanghai after four years of study in Beijing.",
    "Please send me the meeting notes before nine o'clock tomorrow morning.",
    "Artificial intelligence is changing medicine, education and transport.",
    "Revenue grew by twelve percent last year, mostly from overseas markets.",
]


def read_eval_lines(paths: Sequence[str | Path]) -> list[str]:
    """The non-empty lines (newline stripped) of the given UTF-8 text files, for `tokenization_report`."""
    lines: list[str] = []
    for path in paths:
        with open(path, encoding="utf-8") as handle:
            lines.extend(line.rstrip("\n") for line in handle if line.strip())
    return lines


def is_chinese_line(line: str) -> bool:
    """Whether the line contains at least one CJK ideograph."""
    return _CJK.search(line) is not None


def is_english_line(line: str) -> bool:
    """Whether the line has an ASCII letter and no CJK ideograph (what the report counts as English)."""
    return _LATIN.search(line) is not None and not is_chinese_line(line)


def with_english(lines: Sequence[str]) -> tuple[list[str], bool]:
    """`lines`, plus the built-in sample's English lines when `lines` has none; and whether they were added."""
    if any(is_english_line(line) for line in lines):
        return list(lines), False
    return list(lines) + [line for line in BUILTIN_EVAL_LINES if is_english_line(line)], True


def tokenization_report(
    encode: Callable[[str], Sequence[int]],
    lines: Sequence[str],
    *,
    reference: Callable[[str], Sequence[int]] | None = None,
) -> TokenizationReport:
    """Measure `encode` (text -> ids, no special tokens) on `lines`.

    Lines with a CJK ideograph count as Chinese: tokens per character = all their tokens / all their
    characters (punctuation and digits included, as the seed measured). Lines with an ASCII letter and no
    ideograph count as English: tokens per whitespace-separated word. Other lines (numbers, symbols) only
    count for the agreement. With `reference` (e.g. SentencePiece's encode), the agreement is the share of
    non-empty lines whose ids are identical.
    """
    zh = [0, 0, 0]
    en = [0, 0, 0]
    total = differ = 0
    for line in lines:
        if not line.strip():
            continue
        ids = list(encode(line))
        total += 1
        if is_chinese_line(line):
            zh[0] += 1
            zh[1] += len(line)
            zh[2] += len(ids)
        elif is_english_line(line):
            en[0] += 1
            en[1] += len(line.split())
            en[2] += len(ids)
        if reference is not None and list(reference(line)) != ids:
            differ += 1
    if reference is None:
        return TokenizationReport(*zh, *en, total, None, None)
    return TokenizationReport(*zh, *en, total, 1.0 - differ / total if total else float("nan"), differ)
