"""Input files shared by the pre-training and SFT pipelines: discovery (local paths, directories, globs and fsspec
URLs such as ``gs://``, optionally gzip), line iteration by byte range, content hashes, the split of files between
hosts, the cache directory (local, or remote through fsspec with a local mirror), the tokenizer fingerprint that
keys caches, and batch encoding through the fast tokenizer.
"""

from __future__ import annotations

import codecs
import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import uuid
import warnings
import zlib
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import fsspec

from zhjax.ownership import PARTIAL, atomic_path, remove_path, replace_path


class DataError(ValueError):
    """Bad input data; the message names the file and the line, byte offset, record or field at fault."""


def jsonl_records(text: str, path: str | Path) -> list[tuple[int, object]]:
    """`(line number, record)` for every non-blank line of a JSON Lines text; a malformed line is a `DataError` naming
    `path:line`. The one JSONL reader of examples, prompt files and metrics (the streaming pre-training reader, which
    reads byte ranges of files too large to hold, decodes its lines itself)."""
    out = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append((lineno, json.loads(line)))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: malformed JSON: {e.msg} (column {e.colno})") from None
    return out


@dataclass(frozen=True)
class DataFile:
    """One input file: its fsspec URL or path, size in bytes, format (".txt", ".jsonl", ".json") and compression."""

    path: str
    size: int
    fmt: str
    compression: str | None


def discover_files(paths: str | Path | Sequence[str | Path], extensions: Sequence[str]) -> list[DataFile]:
    """Expand files, directories and globs (local or fsspec URLs) into the data files they name, sorted.

    A directory contributes its files (recursively) with one of ``extensions`` (optionally ``.gz``); a file
    named explicitly must have one of them, so a typo fails here instead of training on nothing.
    """
    paths = [paths] if isinstance(paths, str | Path) else list(paths)
    if not paths:
        raise DataError("no data files given")
    found: list[DataFile] = []
    for given in map(str, paths):
        fs, root = fsspec.core.url_to_fs(given)
        protocol = given.split("://", 1)[0] + "://" if "://" in given else ""
        if fs.isdir(root):
            names = [n for n in sorted(fs.find(root)) if _format_of(n, extensions)]
        elif any(c in root for c in "*?["):
            names = sorted(fs.glob(root))
        elif fs.exists(root):
            names = [root]
        else:
            raise DataError(f"{given}: no such file or directory")
        if not names:
            raise DataError(f"{given}: no {'/'.join(extensions)} files (optionally .gz) found")
        for name in names:
            fmt = _format_of(name, extensions)
            if fmt is None:
                raise DataError(f"{name}: unsupported file type; expected {'/'.join(extensions)} (optionally .gz)")
            url = protocol + name if protocol and not name.startswith(protocol) else name
            found.append(DataFile(url, int(fs.size(name)), fmt, "gzip" if name.endswith(".gz") else None))
    return found


def _format_of(name: str, extensions: Sequence[str]) -> str | None:
    base = name[:-3] if name.endswith(".gz") else name
    return next((ext for ext in extensions if base.endswith(ext)), None)


def open_binary(path: str, compression: str | None):
    """Open a (possibly remote, possibly gzip) file for binary reading through fsspec."""
    fs, p = fsspec.core.url_to_fs(path)
    return fs.open(p, "rb", compression=compression or None)


# what a damaged compressed stream raises while it is read (gzip.BadGzipFile is an OSError; a cut file EOFError)
_DECOMPRESS_ERRORS = (OSError, EOFError, zlib.error)


@contextlib.contextmanager
def naming_decompress_errors(path: str, compression: str | None):
    """Turn a damaged compressed stream's error, raised inside the block, into a `DataError` naming ``path``."""
    try:
        yield
    except _DECOMPRESS_ERRORS as e:
        if not compression:
            raise
        raise DataError(f"{path}: cannot decompress ({compression}): {e or type(e).__name__}") from None


def read_all(f: DataFile) -> bytes:
    """The whole (decompressed) content of ``f``; a damaged compressed file is named in the error."""
    with naming_decompress_errors(f.path, f.compression), open_binary(f.path, f.compression) as fh:
        return fh.read()


def check_encoding(encoding: str, errors: str) -> None:
    """Raise ValueError unless ``encoding`` is a known codec that keeps ``\\n`` as one byte, and ``errors`` is valid."""
    try:
        codecs.lookup(encoding)
    except LookupError:
        raise ValueError(f"data.encoding={encoding!r}: not a known text encoding (e.g. utf-8, gbk, gb18030)") from None
    if "\n".encode(encoding) != b"\n":
        raise ValueError(f"data.encoding={encoding!r}: files are read line by line; expected an ASCII-compatible "
                         "encoding (utf-8, gbk, gb18030, big5, ...)")
    if errors not in ("strict", "replace"):
        raise ValueError(f"data.encoding_errors={errors!r}: expected 'strict' or 'replace'")


def _is_utf8(encoding: str) -> bool:
    return codecs.lookup(encoding).name in ("utf-8", "utf-8-sig")


def decode(raw: bytes, path: str, encoding: str, errors: str, *, at_start: bool, line_of) -> str:
    """``raw`` decoded; a UTF-8 BOM at the start of a file is dropped; a bad byte is named by line (``line_of``)."""
    if at_start and _is_utf8(encoding) and raw.startswith(codecs.BOM_UTF8):
        raw = raw[len(codecs.BOM_UTF8):]
        line_shift = len(codecs.BOM_UTF8)
    else:
        line_shift = 0
    try:
        return raw.decode(encoding, errors=errors)
    except UnicodeDecodeError as e:
        bad = e.start + line_shift
        raise DataError(
            f"{path}:{line_of(bad)}: byte {raw[e.start]:#04x} is not valid {encoding}; set data.encoding "
            "to the file's encoding (e.g. gbk), or data.encoding_errors=replace to substitute U+FFFD") from None


def iter_lines(path: str, compression: str | None, start: int = 0, end: int = -1) -> Iterator[tuple[int, bytes]]:
    """Yield ``(byte offset, raw line)`` for the lines that start in ``[start, end)`` (end -1: to the end).

    Ranges that tile a file yield every line exactly once: a range that starts inside a line skips to the next.
    A damaged compressed file raises a `DataError` naming it.
    """
    with naming_decompress_errors(path, compression), open_binary(path, compression) as f:
        offset = 0
        if start > 0:
            f.seek(start - 1)
            offset = start - 1 + len(f.readline())
        for raw in f:
            if 0 <= end <= offset:
                break
            yield offset, raw
            offset += len(raw)


def line_number_at(path: str, compression: str | None, offset: int) -> int:
    """The 1-based line number of byte ``offset`` (read only to build an error message)."""
    with open_binary(path, compression) as f:
        return f.read(offset).count(b"\n") + 1


def content_hashes(files: Sequence[DataFile]) -> list[str]:
    """BLAKE2b of each file's bytes as stored, computed in threads (hashlib releases the GIL)."""

    def one(f: DataFile) -> str:
        h = hashlib.blake2b(digest_size=20)
        with open_binary(f.path, None) as fh:
            while chunk := fh.read(8 << 20):
                h.update(chunk)
        return h.hexdigest()

    with ThreadPoolExecutor(max_workers=min(8, max(1, len(files)))) as pool:
        return list(pool.map(one, files))


def assign_to_hosts(files: Sequence[DataFile], hosts: int) -> list[list[int]]:
    """Deal file indices to hosts, largest first to the least loaded host; the same answer on every host."""
    loads, owned = [0] * hosts, [[] for _ in range(hosts)]
    for i in sorted(range(len(files)), key=lambda i: (-files[i].size, i)):
        h = min(range(hosts), key=lambda h: (loads[h], h))
        loads[h] += files[i].size
        owned[h].append(i)
    return [sorted(o) for o in owned]


class Cache:
    """A cache directory, local or remote (fsspec), of entries ``<kind>/<key>/`` completed by their ``meta.json``.

    Entries are built in a local staging dir and published whole: renamed into place locally, or uploaded with
    ``meta.json`` last remotely, so an entry with ``meta.json`` is complete. Remote files are mirrored into a
    local dir before they are memory-mapped.
    """

    def __init__(self, root: str | Path | None, local_root: str | Path | None = None):
        root = str(root) if root is not None else tempfile.mkdtemp(prefix="zhjax-data-")
        self.fs, self.root = fsspec.core.url_to_fs(root)
        self.remote = "file" not in self.fs.protocol
        if self.remote:
            digest = hashlib.sha1(root.encode()).hexdigest()[:12]
            default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "zhjax" / "mirror" / digest
            self.local = Path(local_root or default)
        else:
            self.local = Path(self.root)
        self.local.mkdir(parents=True, exist_ok=True)

    def exists(self, name: str) -> bool:
        return self.fs.exists(f"{self.root}/{name}/meta.json")

    def read_json(self, name: str) -> dict:
        with self.fs.open(f"{self.root}/{name}", "r") as f:
            return json.load(f)

    def write_json(self, name: str, obj: dict) -> None:
        self.fs.makedirs(f"{self.root}/{name}".rsplit("/", 1)[0], exist_ok=True)
        with self.fs.open(f"{self.root}/{name}", "w") as f:
            json.dump(obj, f)

    @contextlib.contextmanager
    def staging(self) -> Iterator[Path]:
        """A scratch dir on the same disk as the local cache (so publishing is a rename), removed afterwards."""
        (self.local / "staging").mkdir(exist_ok=True)
        path = Path(tempfile.mkdtemp(dir=self.local / "staging"))
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)

    def publish_dir(self, name: str, files: Sequence[Path], meta: dict) -> None:
        """Publish ``files`` and ``meta`` as entry ``name``; if another host already did, keep theirs."""
        if self.remote:
            for f in files:
                self.fs.put_file(str(f), f"{self.root}/{name}/{f.name}")
            self.write_json(f"{name}/meta.json", meta)
            return
        final = self.local / name
        tmp = final.parent / f"{PARTIAL}{final.name}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        for f in files:
            os.replace(f, tmp / f.name)
        (tmp / "meta.json").write_text(json.dumps(meta))
        if final.exists() and not (final / "meta.json").exists():  # a stale entry a crashed writer left
            remove_path(final)
        replace_path(tmp, final, keep_existing=True)  # a concurrent writer that finished first keeps its copy

    def local_file(self, name: str) -> Path:
        """A local path of cache file ``name``, downloaded into the mirror first when the cache is remote."""
        path = self.local / name
        if self.remote and not path.exists():
            with atomic_path(path) as tmp:
                self.fs.get_file(f"{self.root}/{name}", str(tmp))
        return path


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of everything in ``tokenizer`` that decides its token ids (vocab, merges, normalizer, specials)."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:  # a Python/SentencePiece tokenizer: hash the whole object
        from datasets.fingerprint import Hasher

        h.update(Hasher.hash(tokenizer).encode())
    specials = [type(tokenizer).__name__, tokenizer.bos_token_id, tokenizer.eos_token_id,
                getattr(tokenizer, "split_special_tokens", False)]
    h.update(json.dumps(specials).encode())
    return h.hexdigest()[:32]


@contextlib.contextmanager
def forking_workers() -> Iterator[None]:
    """Silence JAX's warning about ``os.fork`` while ``datasets`` forks workers that never call JAX."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called", category=RuntimeWarning)
        yield


def encode_texts(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each text without special tokens, exactly as ``tokenizer(texts, add_special_tokens=False)``.

    A tokenizers-backed tokenizer is called through its Rust backend (``encode_batch_fast``), which skips the
    per-encoding Python conversion of ``__call__``; the ids are the same (the tests check it).
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    fast = getattr(backend, "encode_batch_fast", None)
    if fast is not None and getattr(tokenizer, "is_fast", False):
        return [e.ids for e in fast(texts, add_special_tokens=False)]
    return tokenizer(texts, add_special_tokens=False, return_attention_mask=False)["input_ids"]
