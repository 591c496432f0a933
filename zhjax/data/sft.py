"""Instruction-tuning data: Alpaca records and conversations -> masked token sequences -> packed rows.

`encode_example` turns one record into ``input_ids`` and ``labels``: the prompt (rendered by a template from
`zhjax.data.templates`, BOS first) is labelled -100 (with ``train_on_inputs``, with its own tokens), the
response is followed by the EOS token *id* (never the string, which some tokenizers split into pieces) and
labelled with itself. Labels are aligned with the inputs;
the loss shifts them.

Truncation keeps the response. ``max_prompt_length`` shortens the instruction text (its end, so a long
``input`` goes first) until the rendered prompt fits, and the response gets what is left of
``max_seq_length`` (a cut response loses its EOS, since the model should not learn to stop there). An example
whose response would be empty is dropped and counted, never trained with every label -100 (the seed's NaN
loss). Multi-turn conversations keep whole turns from the start while they fit.

`build_sft_dataset` reads ``.json`` (a list) and ``.jsonl`` files, encodes every record with
``datasets.map(num_proc=...)`` and, by default, packs examples into ``max_seq_length`` rows (best fit,
longest first) with ``segment_ids`` numbering the examples of a row from 1 and ``positions`` restarting at 0
for each, so an attention mask built from the segments makes a packed row compute exactly what separate rows
would. With ``pack=False`` examples stay whole and the loader pads them to bucket lengths.
"""

from __future__ import annotations

import bisect
import json
import logging
import re
import sys
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa

from zhjax.data.files import (
    DataError,
    check_encoding,
    decode,
    discover_files,
    encode_texts,
    forking_workers,
    jsonl_records,
    read_all,
)
from zhjax.data.loader import IGNORE_INDEX
from zhjax.data.templates import CHAT, TEMPLATE_NAMES, join_instruction, render_prompt

logger = logging.getLogger(__name__)

SFT_EXTENSIONS = (".json", ".jsonl")
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
# drop and truncation reasons, as counted in `SFTSummary.counts`
KEPT, TRUNCATED_PROMPT, TRUNCATED_RESPONSE = "kept", "truncated_prompt", "truncated_response"
DROPPED_EMPTY_RESPONSE, DROPPED_NO_ROOM = "dropped_empty_response", "dropped_no_room_for_response"


def _string(record: dict, name: str, *, optional: bool = False) -> str:
    value = record.get(name)
    if value is None and optional:
        return ""
    if not isinstance(value, str):
        got = "missing" if name not in record else f"a {type(value).__name__}"
        raise ValueError(f"field {name!r} must be a string ({got})")
    return value


def parse_turns(record: dict) -> tuple[str | None, list[tuple[str, str]]]:
    """(system prompt or None, [(user text, assistant text), ...]) of an Alpaca record or a conversation.

    Raises:
        ValueError: naming the field that is missing or not a string (callers add file and record).
    """
    if not isinstance(record, dict):
        raise ValueError(f"record must be a JSON object, got {type(record).__name__}")
    if "conversations" not in record:
        instruction = join_instruction(_string(record, "instruction"), _string(record, "input", optional=True))
        system = record.get("system")
        if system is not None and not isinstance(system, str):
            raise ValueError("field 'system' must be a string")
        return system, [(instruction, _string(record, "output"))]
    messages = record["conversations"]
    if not isinstance(messages, list) or not messages:
        raise ValueError("field 'conversations' must be a non-empty list")
    system, turns, pending = None, [], None
    for i, message in enumerate(messages):
        where = f"conversations[{i}]"
        if not isinstance(message, dict):
            raise ValueError(f"field {where!r} must be an object")
        role_key = "from" if "from" in message else "role"
        role = _ROLES.get(message.get(role_key)) if isinstance(message.get(role_key), str) else None
        if role is None:
            raise ValueError(f"field '{where}.{role_key}' must be one of {sorted(_ROLES)}")
        text_key = "value" if role_key == "from" else "content"
        try:
            text = _string(message, text_key)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        if role == "system" and i == 0:
            system = text
        elif role == "user" and pending is None:
            pending = text
        elif role == "assistant" and pending is not None:
            turns.append((pending, text))
            pending = None
        else:
            raise ValueError(f"field '{where}.{role_key}': roles must alternate user, assistant (system first)")
    if not turns:
        raise ValueError("field 'conversations' has no user/assistant pair")
    return system, turns


def _chat_segments(tokenizer, system: str | None, turns: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """(prompt text, response text) per turn, cut out of the tokenizer's own chat template rendering.

    The template renders placeholders instead of the messages, so a response is found by position, never by
    searching for its text (which may also occur in a prompt).
    """
    messages = [{"role": "system", "content": system}] if system is not None else []
    for user, assistant in turns:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    marks = [f"\ue000{i}\ue001" for i in range(len(messages))]  # private-use characters: never in real text
    rendered = tokenizer.apply_chat_template([m | {"content": k} for m, k in zip(messages, marks, strict=True)],
                                             tokenize=False)
    pieces = re.split("(\ue000\\d+\ue001)", rendered)
    if pieces[1::2] != marks:
        raise ValueError("the tokenizer's chat template drops, repeats or reorders messages")
    segments, prompt = [], pieces[0]
    for mark, text in zip(pieces[1::2], pieces[2::2], strict=True):
        message = messages[marks.index(mark)]
        if message["role"] != "assistant":
            prompt += message["content"] + text
            continue
        segments.append((prompt, message["content"]))
        eos = tokenizer.eos_token or ""
        prompt = text[len(eos):] if eos and text.startswith(eos) else text  # the EOS id is appended instead
    return segments


def encode_example(
    record: dict,
    tokenizer,
    template: str = "alpaca",
    max_seq_length: int = 512,
    max_prompt_length: int | None = None,
    *,
    system_prompt: str | None = None,
    train_on_inputs: bool = False,
    stats: Counter | None = None,
) -> dict[str, list[int]] | None:
    """Token ids and labels of one record; None when the example must be dropped.

    Args:
        record: ``{"instruction", "input" (optional), "output"}`` or ``{"conversations": [{"from"|"role",
            "value"|"content"}, ...]}``.
        tokenizer: a Hugging Face tokenizer with an EOS token (and a chat template for ``template="chat"``).
        template: "alpaca", "alpaca2" or "chat" (see `zhjax.data.templates`).
        max_seq_length: the most tokens of prompt + response.
        max_prompt_length: the most tokens of the first prompt; longer instructions are shortened.
        system_prompt: for "alpaca2" and "chat"; a record's own ``system`` field wins.
        train_on_inputs: label the prompts with their own tokens too (alpaca-lora's option of that name), so
            the loss also covers the instruction and input text; the default masks them, as the seed does.
        stats: a Counter that gets one of the reason keys of this module (kept, truncated, dropped ...).

    Returns:
        ``{"input_ids": [...], "labels": [...]}`` with labels -100 on prompts, or None (response empty or no
        room left for any of it).
    """
    if template not in TEMPLATE_NAMES:
        raise ValueError(f"unknown template {template!r}; choose one of {TEMPLATE_NAMES}")
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token; SFT targets end with its id")
    stats = Counter() if stats is None else stats
    system, turns = parse_turns(record)
    system = system if system is not None else system_prompt
    if not turns[0][1].strip():
        stats[DROPPED_EMPTY_RESPONSE] += 1
        return None
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None and template != CHAT else []

    def prompt_ids(turn: int, instruction: str) -> list[int]:
        if template == CHAT:  # the template text carries its own special tokens
            cut = [(instruction, turns[0][1]), *turns[1:]] if turn == 0 else turns
            return encode_texts(tokenizer, [_chat_segments(tokenizer, system, cut)[turn][0]])[0]
        text = render_prompt(template, instruction, system_prompt=system, first_turn=turn == 0)
        return bos + encode_texts(tokenizer, [text])[0]

    prompts = [prompt_ids(i, user) for i, (user, _) in enumerate(turns)]
    if max_prompt_length is not None and len(prompts[0]) > max_prompt_length:
        user = turns[0][0]
        lo, hi = 0, len(user)  # the longest prefix of the instruction whose prompt fits (binary search)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if len(prompt_ids(0, user[:mid])) <= max_prompt_length else (lo, mid - 1)
        prompts[0] = prompt_ids(0, user[:lo])
        if len(prompts[0]) > max_prompt_length:
            stats[DROPPED_NO_ROOM] += 1
            return None
        stats[TRUNCATED_PROMPT] += 1

    input_ids: list[int] = []
    labels: list[int] = []
    responses = encode_texts(tokenizer, [assistant for _, assistant in turns])
    for prompt, response in zip(prompts, responses, strict=True):
        target = response + [tokenizer.eos_token_id]
        room = max_seq_length - len(input_ids) - len(prompt)
        if room <= 0 or not response:
            break
        if room < len(target):
            target = target[:room]
            stats[TRUNCATED_RESPONSE] += 1
        input_ids += prompt + target
        labels += (list(prompt) if train_on_inputs else [IGNORE_INDEX] * len(prompt)) + target
        if len(target) < len(response) + 1:
            break
    if not input_ids:
        stats[DROPPED_NO_ROOM] += 1
        return None
    stats[KEPT] += 1
    return {"input_ids": input_ids, "labels": labels}


# ------------------------------------------------------------------------------------------- files


def iter_records(paths: str | Path | Sequence[str | Path], *, encoding: str = "utf-8",
                 errors: str = "strict") -> Iterator[tuple[str, int, object]]:
    """Yield ``(file, line, record)`` from ``.json`` lists and ``.jsonl`` files; ``line`` is where the record opens.

    A UTF-8 BOM is accepted; ``encoding``/``errors`` say how the bytes are decoded. A file without records is
    skipped with a warning that names it.
    """
    check_encoding(encoding, errors)
    for f in discover_files(paths, SFT_EXTENSIONS):
        raw = read_all(f)
        text = decode(raw, f.path, encoding, errors, at_start=True, line_of=lambda at, raw=raw: raw[:at].count(b"\n") + 1)
        records = _json_list(text, f.path) if f.fmt == ".json" else jsonl_records(text, f.path)
        if not records:
            print(f"zhjax: warning: {f.path}: holds no records (skipped)", file=sys.stderr)
        yield from ((f.path, line, r) for line, r in records)


def _json_list(text: str, path: str) -> list[tuple[int, object]]:
    """The records of a JSON list with the line each opens on (`json.loads` gives values, not positions)."""
    decoder = json.JSONDecoder()
    lines = _LineCounter(text)

    def fail(e: json.JSONDecodeError):
        return DataError(f"{path}:{e.lineno}: malformed JSON: {e.msg} (column {e.colno})")

    at = _skip_space(text, 0)
    if not text[at:at + 1] == "[":
        try:
            json.loads(text)
        except json.JSONDecodeError as e:
            raise fail(e) from None
        raise DataError(f"{path}: a .json examples file must hold a list of records")
    at, out = _skip_space(text, at + 1), []
    if text[at:at + 1] == "]":
        return out
    while True:
        try:
            record, end = decoder.raw_decode(text, at)
        except json.JSONDecodeError as e:
            raise fail(e) from None
        out.append((lines.line_of(at), record))
        at = _skip_space(text, end)
        if text[at:at + 1] == ",":
            at = _skip_space(text, at + 1)
            continue
        if text[at:at + 1] == "]" and not text[_skip_space(text, at + 1):].strip():
            return out
        try:  # the standard library's own message and position for what follows
            json.loads(text)
        except json.JSONDecodeError as e:
            raise fail(e) from None
        raise DataError(f"{path}:{lines.line_of(at)}: malformed JSON after a record")


def _skip_space(text: str, at: int) -> int:
    while at < len(text) and text[at] in " \t\r\n":
        at += 1
    return at


class _LineCounter:
    """1-based line numbers of increasing character offsets, counted once through the text."""

    def __init__(self, text: str):
        self.text, self.at, self.line = text, 0, 1

    def line_of(self, offset: int) -> int:
        self.line += self.text.count("\n", self.at, offset)
        self.at = offset
        return self.line


def _encode_batch(batch: dict, **kwargs) -> dict:
    out: dict[str, list] = {"input_ids": [], "labels": [], "status": []}
    for source, number, payload in zip(batch["source"], batch["record"], batch["json"], strict=True):
        stats: Counter = Counter()
        try:
            example = encode_example(json.loads(payload), stats=stats, **kwargs)
        except ValueError as e:
            raise DataError(f"{source}:{number}: {e}") from None
        out["input_ids"].append(example["input_ids"] if example else [])
        out["labels"].append(example["labels"] if example else [])
        out["status"].append(",".join(sorted(stats)))
    return out


@dataclass
class SFTSummary:
    """What SFT preprocessing kept, cut and dropped; logged after every build."""

    files: int = 0
    records: int = 0
    examples: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    rows: int = 0
    row_length: int = 0
    counts: dict[str, int] = field(default_factory=dict)

    def __str__(self) -> str:
        rows = [("files", self.files), ("records", self.records), ("examples kept", self.examples)]
        rows += [(k.replace("_", " "), v) for k, v in sorted(self.counts.items()) if k != KEPT]
        rows += [("tokens", self.tokens), ("trained tokens", self.trained_tokens)]
        if self.rows:
            fill = self.tokens / (self.rows * self.row_length)
            rows.append((f"rows of {self.row_length}", f"{self.rows} ({fill:.1%} filled)"))
        return "instruction data\n" + "\n".join(f"  {k:<30}{v}" for k, v in rows)


def pack_examples(examples: datasets.Dataset, max_seq_length: int, pad_id: int = 0) -> datasets.Dataset:
    """Pack variable-length examples into ``max_seq_length`` rows (best fit, longest first; deterministic).

    Each row has ``input_ids``, ``labels`` (-100 on padding), ``segment_ids`` (examples numbered from 1, 0 on
    padding) and ``positions`` (restarting at 0 for each example), all int32 of length ``max_seq_length``.
    """
    lengths = np.array([len(x) for x in examples["input_ids"]])
    if len(lengths) and lengths.max() > max_seq_length:
        raise ValueError(f"an example has {lengths.max()} tokens, more than max_seq_length={max_seq_length}")
    free: list[tuple[int, int]] = []  # (room left, row), sorted, for the rows that still have room
    rows: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        n = int(lengths[i])
        at = bisect.bisect_left(free, (n, -1))  # the fullest row that still fits this example
        if at == len(free):
            room, row = max_seq_length, len(rows)
            rows.append([])
        else:
            room, row = free.pop(at)
        rows[row].append(i)
        if room - n > 0:
            bisect.insort(free, (room - n, row))
    columns = {k: np.zeros((len(rows), max_seq_length), np.int32) for k in ("segment_ids", "positions")}
    columns["input_ids"] = np.full((len(rows), max_seq_length), pad_id, np.int32)
    columns["labels"] = np.full((len(rows), max_seq_length), IGNORE_INDEX, np.int32)
    # the examples' own rows: after a filter, `.data.table` still holds the dropped ones (an indices mapping hides them)
    table = examples.select_columns(["input_ids", "labels"]).flatten_indices(keep_in_memory=True).data.table
    ids_col, labels_col = table.column("input_ids"), table.column("labels")
    for r, members in enumerate(rows):
        start = 0
        for s, i in enumerate(sorted(members), 1):
            n = int(lengths[i])
            columns["input_ids"][r, start:start + n] = ids_col[i].values.to_numpy()
            columns["labels"][r, start:start + n] = labels_col[i].values.to_numpy()
            columns["segment_ids"][r, start:start + n] = s
            columns["positions"][r, start:start + n] = np.arange(n)
            start += n
    fixed = datasets.List(datasets.Value("int32"), length=max_seq_length)
    features = datasets.Features({k: fixed for k in ("input_ids", "labels", "segment_ids", "positions")})
    arrays = {k: pa.FixedSizeListArray.from_arrays(pa.array(v.reshape(-1)), max_seq_length) for k, v in columns.items()}
    return datasets.Dataset(pa.table(arrays)).cast(features)


def build_sft_dataset(
    paths: str | Path | Sequence[str | Path],
    tokenizer,
    template: str = "alpaca",
    max_seq_length: int = 512,
    max_prompt_length: int | None = None,
    *,
    pack: bool = True,
    system_prompt: str | None = None,
    train_on_inputs: bool = False,
    num_proc: int | None = None,
    encoding: str = "utf-8",
    errors: str = "strict",
) -> tuple[datasets.Dataset, SFTSummary]:
    """Read, encode and (by default) pack instruction data; return the rows and a `SFTSummary`.

    With ``pack=True`` the rows are fixed-length packed rows (see `pack_examples`); with ``pack=False`` they
    are the encoded examples (``input_ids``, ``labels`` of varying length) for the loader's bucketing.

    Raises:
        DataError: malformed files or records (file, record and field named), or no usable example at all.
    """
    records = list(iter_records(paths, encoding=encoding, errors=errors))
    summary = SFTSummary(files=len({s for s, _, _ in records}), records=len(records))
    if not records:
        raise DataError(f"{paths}: the examples files hold no records")
    table = datasets.Dataset.from_dict({"source": [s for s, _, _ in records], "record": [n for _, n, _ in records],
                                        "json": [json.dumps(r, ensure_ascii=False) for _, _, r in records]})
    kwargs = dict(tokenizer=tokenizer, template=template, max_seq_length=max_seq_length,
                  max_prompt_length=max_prompt_length, system_prompt=system_prompt, train_on_inputs=train_on_inputs)
    nproc = min(num_proc or 1, len(records))
    with forking_workers():
        encoded = table.map(_encode_batch, batched=True, fn_kwargs=kwargs, remove_columns=table.column_names,
                            num_proc=nproc if nproc > 1 else None, keep_in_memory=True, desc="encoding examples")
    counts: Counter = Counter()
    kept_per_file: Counter = Counter({source: 0 for source, _, _ in records})
    for (source, _, _), status in zip(records, encoded["status"], strict=True):
        counts.update(s for s in status.split(",") if s)
        kept_per_file[source] += KEPT in status.split(",")
    summary.counts = dict(counts)
    for source, n in kept_per_file.items():
        if not n:
            raise DataError(f"{source}: none of its records gave a usable example "
                            f"(all dropped; {dict(counts)} over all files)")
    kept = encoded.filter(lambda s: KEPT in s.split(","), input_columns="status", keep_in_memory=True)
    kept = kept.remove_columns("status")
    summary.examples = len(kept)
    summary.tokens = int(sum(map(len, kept["input_ids"])))
    summary.trained_tokens = int(sum(sum(x != IGNORE_INDEX for x in lab) for lab in kept["labels"]))
    if pack:
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        kept = pack_examples(kept, max_seq_length, pad_id)
        summary.rows, summary.row_length = len(kept), max_seq_length
    logger.info("%s", summary)
    return kept, summary
