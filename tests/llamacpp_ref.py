"""llama.cpp as the reference for the GGUF tests: its Python converter (from the installed version's source) and
greedy decoding through its library.

`convert_hf_to_gguf.py` is not installed by `llama-cpp-python`; it ships inside the same source distribution. The
source is found in `$ZHJAX_LLAMA_CPP_SRC` (a llama.cpp checkout) or fetched once with `pip download` of the
installed version's sdist (pip serves it from its cache when it built the wheel from it) and unpacked into
`~/.cache/zhjax/llama.cpp-<version>` (only the converter, its `conversion/` package and `gguf-py/`).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np

# runs the converter with its own gguf-py; `pre` replaces its pre-tokenizer detection (a hash of the token ids of
# one test string, which a vocabulary extension changes: the converter then refuses a tokenizer it would handle)
_DRIVER = """
import runpy, sys
src, pre, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
sys.path[:0] = [src, src + "/gguf-py"]
if pre != "-":
    import conversion.base
    conversion.base.TextModel.get_vocab_base_pre = lambda self, tokenizer: pre
sys.argv = [src + "/convert_hf_to_gguf.py", *argv]
runpy.run_path(src + "/convert_hf_to_gguf.py", run_name="__main__")
"""
_MEMBERS = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/gguf/", "gguf-py/pyproject.toml")


def llama_cpp_source() -> Path:
    """A folder with llama.cpp's `convert_hf_to_gguf.py` of the installed llama-cpp-python version."""
    if os.environ.get("ZHJAX_LLAMA_CPP_SRC"):
        return Path(os.environ["ZHJAX_LLAMA_CPP_SRC"])
    import llama_cpp

    version = llama_cpp.__version__
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "zhjax" / f"llama.cpp-{version}"
    if (cache / "convert_hf_to_gguf.py").exists():
        return cache
    cache.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache.parent) as tmp:
        got = subprocess.run(
            # `--no-binary` for this package only: with `:all:` pip also builds the sdist's build requirements
            # (cmake, ninja, scikit-build-core) from source to read its metadata, 3.5 minutes against 6 s
            [sys.executable, "-m", "pip", "download", "--no-binary", "llama-cpp-python", "--no-deps", "-q", "-d", tmp,
             f"llama-cpp-python=={version}"], capture_output=True, text=True, timeout=900,
        )
        sdists = list(Path(tmp).glob("*.tar.gz"))
        if got.returncode or not sdists:
            raise RuntimeError(
                f"could not fetch llama-cpp-python {version}'s source for convert_hf_to_gguf.py ({got.stderr[-500:]}); "
                "set ZHJAX_LLAMA_CPP_SRC to a llama.cpp checkout of the same version"
            )
        unpacked = Path(tmp) / "src"
        with tarfile.open(sdists[0]) as tar:
            for member in tar.getmembers():
                _, _, rest = member.name.partition("/vendor/llama.cpp/")
                if rest and rest.startswith(_MEMBERS) and member.isfile():
                    member.name = rest
                    tar.extract(member, unpacked, filter="data")
        try:
            unpacked.rename(cache)
        except OSError:  # another session unpacked it first
            pass
    return cache


def convert_hf_to_gguf(model_dir: Path, out_file: Path, outtype: str = "f32", *, pre: str | None = None) -> Path:
    """llama.cpp's `convert_hf_to_gguf.py` on `model_dir` (`pre`: the BPE pre-tokenizer name to assume)."""
    src = llama_cpp_source()
    run = subprocess.run(
        [sys.executable, "-c", _DRIVER, str(src), pre or "-", str(model_dir), "--outfile", str(out_file),
         "--outtype", outtype], capture_output=True, text=True, timeout=1800,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return out_file


AMX_BUILD = (
    "llama-cpp-python was built with ggml's AMX kernels, whose matrix product segfaults on these files on CPUs with "
    "AMX (llama.cpp issue 20824; it killed the whole test run): `make test` rebuilds it without them (Makefile, "
    "LLAMA_CPP_CMAKE_ARGS)"
)


def built_with_amx() -> bool:
    """Whether this llama.cpp build runs ggml's AMX kernels (its system info lists what it was compiled to use)."""
    import llama_cpp

    return "AMX_INT8 = 1" in llama_cpp.llama_print_system_info().decode()


def load(path: Path, n_ctx: int = 512):
    """The GGUF file in llama.cpp (CPU, quiet). `logits_all`: llama-cpp-python keeps logits (`Llama.scores`) only
    with it; without, sampling happens inside llama.cpp and no logits come back. A build with ggml's AMX kernels
    fails the test here, before it can take the test process down."""
    import llama_cpp

    assert not built_with_amx(), AMX_BUILD
    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_threads=os.cpu_count(), logits_all=True,
                           verbose=False)


def greedy(llm, prompt_ids: list[int], steps: int) -> list[int]:
    """`steps` tokens chosen by argmax of llama.cpp's logits (no sampler, no stop token)."""
    llm.reset()
    llm.eval(prompt_ids)
    out = []
    for _ in range(steps):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(token)
        llm.eval([token])
    return out


def hf_greedy(model, prompt_ids: list[int], steps: int) -> tuple[list[int], list[np.ndarray]]:
    """`steps` argmax tokens of a transformers model (KV cache; no stop token) and the logits of each step."""
    import torch

    out, logits = [], []
    with torch.no_grad():
        result = model(torch.tensor([prompt_ids]), use_cache=True)
        for _ in range(steps):
            last = result.logits[0, -1].float().numpy()
            logits.append(last)
            out.append(int(last.argmax()))
            result = model(torch.tensor([[out[-1]]]), past_key_values=result.past_key_values, use_cache=True)
    return out, logits
