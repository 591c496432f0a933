"""Pre-training data: text files -> tokens -> fixed-length blocks, cached as memory-mapped Arrow.

The pipeline, one step per stage:

1. **Discover.** ``paths`` (files, directories, globs; local or any fsspec URL such as ``gs://``) become a sorted
   list of ``.txt`` files (one document per line, as the seed) and ``.jsonl`` files (a ``text`` field per line),
   each optionally ``.gz``.
2. **Key.** Each file's key hashes its content, the tokenizer's fingerprint and the BOS/EOS flags, so a changed
   file, tokenizer or flag never reuses a stale cache. Blocks are keyed by the ordered file keys and
   ``block_size``. A second run with the same inputs loads everything from ``cache_dir``.
3. **Tokenize, file-parallel.** Work units (a file, or a newline-aligned byte range of a large uncompressed
   file) go through ``datasets.Dataset.map(num_proc=...)``; each worker streams its lines, encodes them in
   batches with the fast tokenizer and writes one Arrow file of documents. BOS and EOS are added as ids.
4. **Group.** The documents of all files, in order, form one token stream cut into ``block_size`` blocks;
   only the final tail of the whole corpus (< ``block_size`` tokens) is dropped, where the seed dropped the
   remainder of every 1000 lines. ``segment_ids`` number the documents inside each block from 1, so attention
   can optionally stay inside a document. Labels are the inputs (the loss shifts them).

No stage holds the tokenized corpus in memory: workers stream batches of lines, grouping streams record
batches of memory-mapped Arrow files, and the result is a memory-mapped ``datasets.Dataset``.

Multi-host: every host hashes and tokenizes only its own subset of the files (balanced by size) into the
shared ``cache_dir``, publishes its file keys, and waits at a barrier; host 0 then groups the blocks while the
others wait, and every host memory-maps the result. A remote ``cache_dir`` (``gs://...``) is written through
fsspec and mirrored to a local directory for memory mapping.

Bad input fails loudly with the file and the line or byte offset (see `DataError`); empty files and blank
lines are skipped and counted in the `PretrainSummary` that every build logs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa

from zhjax.data.files import (  # noqa: F401 (re-exported: the file helpers were first defined here)
    Cache,
    DataError,
    DataFile,
    assign_to_hosts,
    check_encoding,
    content_hashes,
    decode,
    discover_files,
    encode_texts,
    forking_workers,
    iter_lines,
    line_number_at,
    open_binary,
    tokenizer_fingerprint,
)
from zhjax.data.loader import host_topology

logger = logging.getLogger(__name__)

PRETRAIN_EXTENSIONS = (".txt", ".jsonl")
_FORMAT_VERSION = 1  # bump when the cached layout or tokenization rule changes
_MAX_CHUNK_BYTES = 64 << 20
_MIN_CHUNK_BYTES = 1 << 20
_ENCODE_BATCH = 2000  # lines per tokenizer call in a worker
_GROUP_ROWS = 4096  # blocks per written record batch


@dataclass
class PretrainSummary:
    """What preprocessing saw and produced; logged after every build and saved beside the cached blocks."""

    files: int = 0
    empty_files: int = 0
    documents: int = 0
    empty_lines: int = 0
    tokens: int = 0
    blocks: int = 0
    block_size: int = 0
    dropped_tail_tokens: int = 0
    tokenized_files: int = 0
    cached_files: int = 0
    empty_file_paths: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        rows = [
            ("files", f"{self.files} ({self.tokenized_files} tokenized, {self.cached_files} from cache)"),
            ("empty files (skipped)", str(self.empty_files)),
            ("documents", str(self.documents)),
            ("empty lines (skipped)", str(self.empty_lines)),
            ("tokens", str(self.tokens)),
            (f"blocks of {self.block_size}", str(self.blocks)),
            ("tail tokens dropped", str(self.dropped_tail_tokens)),
        ]
        return "pre-training data\n" + "\n".join(f"  {k:<24}{v}" for k, v in rows)


# ----------------------------------------------------------------------------------------------- keys


def _file_key(content_hash: str, compression: str | None, tok_fp: str, add_bos: bool, add_eos: bool, errors: str,
              text_field: str, encoding: str) -> str:
    # the bytes as stored *and* how they are read: the same bytes named .gz must not hit a plain file's entry
    parts = [_FORMAT_VERSION, content_hash, compression, tok_fp, add_bos, add_eos, errors, text_field, encoding]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:32]


# ------------------------------------------------------------------------------------------ tokenize


def _documents(unit: dict, errors: str, text_field: str, encoding: str = "utf-8"):
    """Yield ``(text or None)`` per line of a work unit; None marks a blank line. Errors name file and line."""
    path, compression, fmt = unit["path"], unit["compression"], unit["fmt"]
    for offset, raw in iter_lines(path, compression, unit["start"], unit["end"]):
        line = decode(raw, path, encoding, errors, at_start=offset == 0,
                      line_of=lambda at, offset=offset: line_number_at(path, compression, offset + at))
        if fmt == ".jsonl":
            if not line.strip():
                yield None
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{line_number_at(path, compression, offset)}: malformed JSON: "
                                f"{e.msg} (column {e.colno})") from None
            text = record.get(text_field) if isinstance(record, dict) else None
            if not isinstance(text, str):
                got = "missing" if not isinstance(record, dict) or text_field not in record else type(text).__name__
                raise DataError(f"{path}:{line_number_at(path, compression, offset)}: record field {text_field!r} must be a string ({got})")
            line = text
        else:
            line = line.rstrip("\r\n")
        yield line if line.strip() else None


def _tokenize_unit(unit: dict, tokenizer, add_bos: bool, add_eos: bool, errors: str, text_field: str,
                   encoding: str = "utf-8") -> dict:
    """Tokenize one work unit into ``unit["out"]`` (an Arrow file of documents); return its counts."""
    bos = [tokenizer.bos_token_id] if add_bos and tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if add_eos and tokenizer.eos_token_id is not None else []
    features = datasets.Features({"input_ids": datasets.List(datasets.Value("int32"))})
    writer = datasets.arrow_writer.ArrowWriter(features=features, path=unit["out"])
    counts = {"documents": 0, "tokens": 0, "empty_lines": 0}

    def flush(texts: list[str]) -> None:
        ids = [bos + x + eos for x in encode_texts(tokenizer, texts)]
        counts["documents"] += len(ids)
        counts["tokens"] += sum(map(len, ids))
        writer.write_table(pa.table({"input_ids": pa.array(ids, type=pa.list_(pa.int32()))}))

    texts: list[str] = []
    for text in _documents(unit, errors, text_field, encoding):
        if text is None:
            counts["empty_lines"] += 1
            continue
        texts.append(text)
        if len(texts) >= _ENCODE_BATCH:
            flush(texts)
            texts = []
    if texts:
        flush(texts)
    writer.finalize()
    return counts


def _tokenize_batch(batch: dict, **kwargs) -> dict:
    units = [dict(zip(batch, values, strict=True)) for values in zip(*batch.values(), strict=True)]
    out = [_tokenize_unit(u, **kwargs) for u in units]
    return {k: [c[k] for c in out] for k in ("documents", "tokens", "empty_lines")} | {"out": batch["out"]}


def _work_units(files: list[DataFile], num_proc: int, staging: Path) -> list[dict]:
    """Split files into units: whole files, or newline-aligned byte ranges of large uncompressed files."""
    total = sum(f.size for f in files)
    chunk = min(_MAX_CHUNK_BYTES, max(_MIN_CHUNK_BYTES, math.ceil(total / (2 * max(num_proc, 1)))))
    units = []
    for i, f in enumerate(files):
        if f.compression or f.size <= chunk:
            ranges = [(0, None)]
        else:
            starts = list(range(0, f.size, chunk))
            ranges = [(s, s + chunk if s + chunk < f.size else None) for s in starts]
        for j, (start, end) in enumerate(ranges):
            units.append({"path": f.path, "compression": f.compression or "", "fmt": f.fmt, "start": start,
                          "end": -1 if end is None else end, "file": i, "out": str(staging / f"{i:06d}-{j:05d}.arrow")})
    return units


def _tokenize_files(files: list[DataFile], keys: list[str], tokenizer, cache: Cache, *, add_bos: bool,
                    add_eos: bool, errors: str, text_field: str, encoding: str, num_proc: int) -> None:
    """Tokenize ``files`` with ``datasets.map(num_proc)`` and publish each file's Arrow documents under its key."""
    with cache.staging() as staging:
        units = _work_units(files, num_proc, staging)
        table = datasets.Dataset.from_list(units)
        kwargs = dict(tokenizer=tokenizer, add_bos=add_bos, add_eos=add_eos, errors=errors, text_field=text_field,
                      encoding=encoding)
        nproc = min(num_proc, len(units))
        with forking_workers():
            done = table.map(_tokenize_batch, batched=True, batch_size=1, fn_kwargs=kwargs, keep_in_memory=True,
                             num_proc=nproc if nproc > 1 else None, new_fingerprint=hashlib.sha1(
                                 json.dumps(keys).encode()).hexdigest(), desc="tokenizing")
        for i, (f, key) in enumerate(zip(files, keys, strict=True)):
            mine = [j for j, u in enumerate(units) if u["file"] == i]
            meta = {"path": f.path, "chunks": [Path(units[j]["out"]).name for j in mine]}
            for k in ("documents", "tokens", "empty_lines"):
                meta[k] = int(sum(done[j][k] for j in mine))
            cache.publish_dir(f"tokens/{key}", [Path(units[j]["out"]) for j in mine], meta)


# --------------------------------------------------------------------------------------------- group


class _Grouper:
    """Cuts a stream of documents into ``block_size`` blocks, carrying the remainder across batches and files."""

    def __init__(self, block_size: int):
        self.block_size = block_size
        self.carry_ids = np.zeros(0, np.int32)
        self.carry_docs = np.zeros(0, np.int64)
        self.next_doc = 0

    def add(self, flat: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        docs = np.repeat(np.arange(self.next_doc, self.next_doc + len(lengths)), lengths)
        self.next_doc += len(lengths)
        ids = np.concatenate([self.carry_ids, flat.astype(np.int32, copy=False)])
        docs = np.concatenate([self.carry_docs, docs])
        n = len(ids) // self.block_size * self.block_size
        self.carry_ids, self.carry_docs = ids[n:], docs[n:]
        blocks = ids[:n].reshape(-1, self.block_size)
        doc_blocks = docs[:n].reshape(-1, self.block_size)
        segments = (doc_blocks - doc_blocks[:, :1] + 1).astype(np.int32)
        return blocks, segments


def _fixed_list(rows: np.ndarray) -> pa.Array:
    return pa.FixedSizeListArray.from_arrays(pa.array(rows.reshape(-1)), rows.shape[1])


def _group_blocks(token_files: list[Path], block_size: int, out: Path) -> tuple[int, int]:
    """Stream the documents of ``token_files`` (in order) into blocks written to ``out``; (blocks, tail)."""
    column = datasets.List(datasets.Value("int32"), length=block_size)
    features = datasets.Features({"input_ids": column, "segment_ids": column})
    writer = datasets.arrow_writer.ArrowWriter(features=features, path=str(out))
    grouper, blocks = _Grouper(block_size), 0
    for path in token_files:
        table = datasets.Dataset.from_file(str(path)).data.table
        for batch in table.to_batches(max_chunksize=_GROUP_ROWS * 4):
            col = batch.column(0)
            lengths = np.diff(col.offsets.to_numpy())
            ids, segs = grouper.add(col.flatten().to_numpy(), lengths)
            if len(ids):
                writer.write_table(pa.table({"input_ids": _fixed_list(ids), "segment_ids": _fixed_list(segs)}))
                blocks += len(ids)
    writer.finalize()
    return blocks, len(grouper.carry_ids)


# ----------------------------------------------------------------------------------------- public API


def build_blocks_with_summary(
    paths: str | Path | Sequence[str | Path],
    tokenizer,
    block_size: int,
    cache_dir: str | Path | None = None,
    add_eos: bool = True,
    *,
    add_bos: bool = True,
    num_proc: int | None = None,
    errors: str = "strict",
    text_field: str = "text",
    encoding: str = "utf-8",
    process_index: int | None = None,
    process_count: int | None = None,
    barrier: Callable[[str], None] | None = None,
    local_cache_dir: str | Path | None = None,
) -> tuple[datasets.Dataset, PretrainSummary]:
    """`build_blocks`, also returning the `PretrainSummary` (see `build_blocks` for the arguments)."""
    if block_size < 1:
        raise ValueError(f"block_size must be positive, got {block_size}")
    check_encoding(encoding, errors)
    host, hosts, barrier = host_topology(process_index, process_count, barrier)
    if hosts > 1 and barrier is None:
        raise ValueError("simulated hosts (process_count != jax.process_count()) need an explicit barrier")
    if hosts > 1 and cache_dir is None:
        raise ValueError("a multi-host build needs a cache_dir that every host can reach")
    cache = Cache(cache_dir, local_cache_dir)
    files = discover_files(paths, PRETRAIN_EXTENSIONS)
    tok_fp = tokenizer_fingerprint(tokenizer)
    flags = dict(add_bos=add_bos, add_eos=add_eos, errors=errors, text_field=text_field, encoding=encoding)

    # this host's files: hash, then tokenize the ones not cached yet
    mine = assign_to_hosts(files, hosts)[host]
    my_keys = [_file_key(h, files[i].compression, tok_fp, **flags)
               for i, h in zip(mine, content_hashes([files[i] for i in mine]), strict=True)]
    todo = [(i, k) for i, k in zip(mine, my_keys, strict=True) if not cache.exists(f"tokens/{k}")]
    if todo:
        _tokenize_files([files[i] for i, _ in todo], [k for _, k in todo], tokenizer, cache,
                        num_proc=max(1, num_proc or 1), **flags)
    keys: dict[int, str] = dict(zip(mine, my_keys, strict=True))
    if hosts > 1:
        run = hashlib.sha256(json.dumps([[f.path for f in files], tok_fp, flags, hosts]).encode()).hexdigest()[:24]
        cache.write_json(f"manifests/{run}/host-{host:05d}.json", {"keys": {str(i): keys[i] for i in mine}})
        barrier(f"zhjax-pretrain-tokens-{run}")
        for h in range(hosts):
            keys.update({int(i): k for i, k in cache.read_json(f"manifests/{run}/host-{h:05d}.json")["keys"].items()})
    ordered = [keys[i] for i in range(len(files))]

    block_key = hashlib.sha256(json.dumps([_FORMAT_VERSION, ordered, block_size]).encode()).hexdigest()[:32]
    name = f"blocks/{block_key}"
    if host == 0 and not cache.exists(name):
        metas = [cache.read_json(f"tokens/{k}/meta.json") for k in ordered]
        summary = PretrainSummary(files=len(files), block_size=block_size)
        for f, m in zip(files, metas, strict=True):
            summary.documents += m["documents"]
            summary.tokens += m["tokens"]
            summary.empty_lines += m["empty_lines"]
            if m["documents"] == 0:
                summary.empty_files += 1
                summary.empty_file_paths.append(f.path)
        if summary.tokens < block_size:
            raise DataError(f"the corpus ({len(files)} files, {summary.documents} documents) has {summary.tokens} "
                            f"tokens, fewer than one block of block_size={block_size}")
        token_files = [cache.local_file(f"tokens/{k}/{c}") for k, m in zip(ordered, metas, strict=True)
                       for c in m["chunks"]]
        with cache.staging() as staging:
            summary.blocks, summary.dropped_tail_tokens = _group_blocks(token_files, block_size, staging / "blocks.arrow")
            cache.publish_dir(name, [staging / "blocks.arrow"], asdict(summary))
    if hosts > 1:
        barrier(f"zhjax-pretrain-blocks-{block_key}")
    summary = PretrainSummary(**cache.read_json(f"{name}/meta.json"))
    summary.tokenized_files = len(todo)
    summary.cached_files = len(mine) - len(todo)
    for p in summary.empty_file_paths:
        logger.warning("empty file skipped: %s", p)
    logger.info("%s", summary)
    return datasets.Dataset.from_file(str(cache.local_file(f"{name}/blocks.arrow"))), summary


def build_blocks(
    paths: str | Path | Sequence[str | Path],
    tokenizer,
    block_size: int,
    cache_dir: str | Path | None = None,
    add_eos: bool = True,
    **kwargs,
) -> datasets.Dataset:
    """Tokenize text files and group them into ``block_size`` blocks (cached); return a memory-mapped Dataset.

    Args:
        paths: files, directories or globs (local paths or fsspec URLs) of ``.txt`` (one document per line)
            and ``.jsonl`` (a ``text`` field per line) files, optionally ``.gz``.
        tokenizer: a Hugging Face tokenizer (fast ones are much faster).
        block_size: tokens per block.
        cache_dir: where tokens and blocks are cached (local or fsspec URL); None uses a fresh temporary dir.
        add_eos: append EOS to every document (the seed's v1 did not, v2 did). BOS is added unless
            ``add_bos=False``.
        **kwargs: ``add_bos``, ``num_proc`` (worker processes), ``encoding`` (of the text files, default utf-8; a
            UTF-8 BOM is dropped), ``errors`` ("strict" or "replace" for undecodable bytes), ``text_field`` (jsonl), ``process_index``/``process_count``/``barrier``
            (multi-host; default from ``jax``), ``local_cache_dir`` (mirror of a remote cache).

    Returns:
        A Dataset with ``input_ids`` and ``segment_ids`` (int32, length ``block_size``); documents are numbered
        from 1 within each block.

    Raises:
        DataError: bad input (file and line/byte offset named), or fewer tokens than one block.
    """
    return build_blocks_with_summary(paths, tokenizer, block_size, cache_dir, add_eos, **kwargs)[0]


@dataclass
class PretrainData:
    """Train and validation blocks of one pre-training run, and the summary of the train build."""

    train: datasets.Dataset
    validation: datasets.Dataset | None
    summary: PretrainSummary


def split_validation(blocks: datasets.Dataset, fraction: float, seed: int) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Split blocks into (train, validation) with ``fraction`` of them, chosen at random from ``seed``."""
    if not 0 < fraction < 1:
        raise ValueError(f"validation_split_percentage is a fraction in (0, 1) as in the seed (0.05 = 5%), got {fraction}")
    n = len(blocks)
    n_val = max(1, round(n * fraction))
    if n_val >= n:
        raise DataError(f"{n} blocks are too few to hold out {fraction:.1%} for validation and still train")
    chosen = np.zeros(n, bool)
    chosen[np.random.default_rng(seed).permutation(n)[:n_val]] = True
    return blocks.select(np.flatnonzero(~chosen)), blocks.select(np.flatnonzero(chosen))


def prepare_pretrain_data(
    train_paths: str | Path | Sequence[str | Path],
    tokenizer,
    block_size: int,
    *,
    validation_paths: str | Path | Sequence[str | Path] | None = None,
    validation_split_percentage: float = 0.05,
    seed: int = 42,
    **kwargs,
) -> PretrainData:
    """Blocks for training and validation: an explicit validation file, else a seeded fraction of the blocks.

    ``validation_split_percentage`` is a fraction, as the seed uses it (0.05 holds out 5 %); 0 means no
    validation set. Other keyword arguments go to `build_blocks`.
    """
    train, summary = build_blocks_with_summary(train_paths, tokenizer, block_size, **kwargs)
    if validation_paths:
        validation = build_blocks(validation_paths, tokenizer, block_size, **kwargs)
    elif validation_split_percentage:
        train, validation = split_validation(train, validation_split_percentage, seed)
    else:
        validation = None
    return PretrainData(train, validation, summary)
