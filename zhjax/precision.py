"""`dtype: auto`: bf16 products where the hardware multiplies bf16 natively, float32 where it would emulate them.

GPUs and TPUs multiply bf16 natively, and so do x86 CPUs with AVX-512 BF16 (Intel Cooper Lake, Sapphire Rapids and
later with AMX; AMD Zen 4 and later). Other CPUs (AVX2 only: most laptops, older servers) convert every product,
which makes bf16 the slower choice there: on a 2-core AMD EPYC with AVX2 only, the demo's training step took 13.7 s
in bf16 against 9.2 s in float32 (`bench/train.py`), and scoring held-out text under torch's bf16 autocast 110 s
against 17 s (`bench/precision.py`; README: "Performance"). `resolve_dtype("auto")` picks per machine: the training
jobs and the transfer init's output fit default to "auto", and the recipe's held-out scoring (`eval.dtype`) takes it.

The CPU's features come from `/proc/cpuinfo` (Linux); where it cannot be read, a CPU counts as without them.
"""

from __future__ import annotations

import functools

__all__ = ["AUTO", "cpu_has_fast_bf16", "resolve_dtype"]

AUTO = "auto"
# the x86 feature flags (as /proc/cpuinfo names them) of native bf16 products
_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


@functools.cache
def cpu_has_fast_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this machine's CPU multiplies bf16 natively (AVX-512 BF16 or AMX-BF16)."""
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return not _BF16_FLAGS.isdisjoint(line.partition(":")[2].split())
    except OSError:
        pass
    return False


def resolve_dtype(dtype: str, backend: str) -> str:
    """`dtype`, with "auto" made "bfloat16" or "float32" for `backend` ("cpu", "gpu"/"cuda", "tpu").

    `backend` is where the products run: `jax.default_backend()` for zhjax, `tensor.device.type` for torch.
    """
    if dtype != AUTO:
        return dtype
    return "bfloat16" if backend != "cpu" or cpu_has_fast_bf16() else "float32"
