"""Weight types of a GGUF export: float, the block quantizations of the `gguf` package, llama.cpp's k-quants.

- `f32`, `f16`: every matrix in that type (norms and other vectors stay f32, as llama.cpp's converter writes them).
- `q8_0`, `q5_0`, `q5_1`, `q4_0`, `q4_1`: quantized here, row by row in blocks of 32 values, by the `gguf` package
  (`gguf.quants.quantize`, the reference quantizers of ggml ported to numpy). Every matrix gets the type, except
  the output head (`output.weight`, or the tied `token_embd.weight` that serves as the head) for the 4- and 5-bit
  types: it stays q8_0, as llama.cpp's own `llama-quantize` keeps the head at a higher precision (q6_k there, a
  k-quant the `gguf` package cannot write) because the head's error lands directly on every logit.
  A matrix whose rows are not a whole number of blocks is refused before anything is written.
- `q6_k`, `q5_k_m`, `q4_k_m`, `q3_k_m`: llama.cpp's own quantizer (`llama_model_quantize` from the library that
  `llama-cpp-python` builds, the `llamacpp` extra) run on an f16 file written first; its per-tensor choices are
  llama.cpp's (the `_m` mixes keep some attention-v and FFN-down matrices one step higher; a matrix whose rows are
  not a whole number of 256-value super-blocks gets llama.cpp's fallback type for it, e.g. SmolLM2's 576-wide
  rows take q5_0 in q4_k_m).
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import numpy as np

FLOAT_TYPES = ("f32", "f16")
GGUF_PACKAGE_TYPES = ("q8_0", "q5_0", "q5_1", "q4_0", "q4_1")
LLAMA_CPP_TYPES = ("q6_k", "q5_k_m", "q4_k_m", "q3_k_m")
GGUF_DTYPES = (*FLOAT_TYPES, *GGUF_PACKAGE_TYPES, *LLAMA_CPP_TYPES)
HEAD_TYPE = "q8_0"  # the output head of a 4/5-bit file written by the gguf package (see the module doc)


def file_type(dtype: str) -> int:
    """`general.file_type` (llama.cpp's `llama_ftype`) of a file whose matrices are mostly `dtype`."""
    import gguf

    names = {"f32": "ALL_F32", "f16": "MOSTLY_F16"}
    return int(gguf.LlamaFileType[names.get(dtype, "MOSTLY_" + dtype.upper())])


def tensor_type(dtype: str, gguf_name: str, shape: tuple[int, ...], *, head: str):
    """The GGML type of tensor `gguf_name` in a `dtype` file (`dtype` a float or gguf-package type); `head` is the
    name of the tensor that computes the logits (output.weight, or token_embd.weight when tied)."""
    import gguf

    if len(shape) < 2:
        return gguf.GGMLQuantizationType.F32
    if dtype in FLOAT_TYPES:
        return gguf.GGMLQuantizationType[dtype.upper()]
    if gguf_name == head and dtype != "q8_0":
        dtype = HEAD_TYPE
    return gguf.GGMLQuantizationType[dtype.upper()]


def check_block_shape(qtype, gguf_name: str, hf_name: str, shape: tuple[int, ...], source: Path) -> None:
    """Refuse (ConversionError) a matrix whose rows are not a whole number of `qtype` blocks."""
    import gguf

    from zhjax.convert.hf import ConversionError

    block, _ = gguf.GGML_QUANT_SIZES[qtype]
    if shape[-1] % block:
        raise ConversionError(
            f"{source}: tensor {hf_name!r} ({gguf_name}) has rows of {shape[-1]} values, not a multiple of "
            f"{qtype.name}'s block of {block}; choose f16/f32 or a type with a block that divides {shape[-1]}"
        )


def stored_shape(qtype, shape: tuple[int, ...]) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, numpy dtype, bytes) of the tensor as the writer stores it: bytes per row for quantized types."""
    import gguf

    if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
        dtype = np.dtype(np.float32 if qtype == gguf.GGMLQuantizationType.F32 else np.float16)
        return tuple(shape), dtype, int(np.prod(shape)) * dtype.itemsize
    byte_shape = gguf.quants.quant_shape_to_byte_shape(shape, qtype)
    return tuple(byte_shape), np.dtype(np.uint8), int(np.prod(byte_shape))


def to_type(arr: np.ndarray, qtype) -> np.ndarray:
    """`arr` (float) in GGML type `qtype`: a cast for f32/f16, the `gguf` package's quantizer otherwise."""
    import gguf

    if qtype == gguf.GGMLQuantizationType.F32:
        return np.ascontiguousarray(arr.astype(np.float32))
    if qtype == gguf.GGMLQuantizationType.F16:
        return np.ascontiguousarray(arr.astype(np.float16))
    return np.ascontiguousarray(gguf.quants.quantize(np.ascontiguousarray(arr, dtype=np.float32), qtype))


def require_llama_cpp(dtype: str) -> None:
    """Refuse a llama.cpp type, before any work, when llama-cpp-python is not installed."""
    from zhjax._extras import require

    require("llama_cpp", extra="llamacpp", why=f"GGUF export as {dtype} (llama.cpp's own quantizer)")


def llama_cpp_quantize(src: Path, dst: Path, dtype: str) -> None:
    """Quantize the GGUF file `src` into `dst` with llama.cpp's `llama_model_quantize` (k-quant mixes)."""
    import llama_cpp

    from zhjax.convert.hf import ConversionError

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = file_type(dtype)
    params.nthread = os.cpu_count() or 1
    status = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if status != 0:
        raise ConversionError(f"{src}: llama.cpp's quantizer failed ({status}) writing {dtype}")
