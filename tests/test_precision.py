"""`dtype: auto` (zhjax.precision): bf16 where the hardware multiplies it natively, float32 on an AVX2-only CPU."""

from __future__ import annotations

import numpy as np
import pytest

import zhjax.precision
from zhjax.precision import cpu_has_fast_bf16, resolve_dtype

AVX2_ONLY = "flags\t\t: fpu vme sse sse2 ssse3 fma avx avx2 bmi1 bmi2\n"
SAPPHIRE_RAPIDS = "flags\t\t: fpu sse2 avx avx2 avx512f avx512bw avx512_bf16 amx_bf16 amx_tile amx_int8\n"
ZEN4 = "flags\t\t: fpu sse2 avx avx2 avx512f avx512_bf16 avx512_vnni\n"


@pytest.mark.parametrize("flags, fast", [(AVX2_ONLY, False), (SAPPHIRE_RAPIDS, True), (ZEN4, True)])
def test_the_cpu_counts_as_bf16_capable_only_with_avx512_bf16_or_amx(tmp_path, flags, fast):
    path = tmp_path / "cpuinfo"
    path.write_text("processor\t: 0\nmodel name\t: some cpu\n" + flags + "\nprocessor\t: 1\n" + flags)
    assert cpu_has_fast_bf16(str(path)) is fast


def test_an_unreadable_cpuinfo_counts_as_no_bf16(tmp_path):
    assert cpu_has_fast_bf16(str(tmp_path / "missing")) is False


@pytest.mark.parametrize("fast", [False, True])
def test_auto_is_float32_only_on_a_cpu_without_native_bf16(monkeypatch, fast):
    monkeypatch.setattr(zhjax.precision, "cpu_has_fast_bf16", lambda: fast)
    assert resolve_dtype("auto", "cpu") == ("bfloat16" if fast else "float32")
    for accelerator in ("gpu", "cuda", "tpu"):
        assert resolve_dtype("auto", accelerator) == "bfloat16"
    for explicit in ("float32", "bfloat16", "float16"):  # an explicit dtype is never changed
        assert resolve_dtype(explicit, "cpu") == explicit


@pytest.mark.parametrize("fast, expected", [(False, "float32"), (True, "bfloat16")])
def test_a_training_job_with_dtype_auto_builds_the_model_in_the_resolved_dtype(monkeypatch, fast, expected):
    from zhjax.parallel.mesh import make_mesh
    from zhjax.train.config import load_job_config
    from zhjax.train.trainer import build_model

    monkeypatch.setattr(zhjax.precision, "cpu_has_fast_bf16", lambda: fast)
    cfg = load_job_config("pretrain", "configs/pretrain/tiny.yaml", ["dtype=auto"])
    model = build_model(cfg, make_mesh(cfg.mesh))
    assert model.config.dtype == expected and model.config.param_dtype == expected
    assert model.layers.self_attn.q_proj.kernel[...].dtype == np.dtype(expected)


def test_an_unknown_training_dtype_is_refused_naming_auto():
    from zhjax.train.config import load_job_config
    from zhjax.train.validate import JobConfigError, check_job

    cfg = load_job_config("pretrain", "configs/pretrain/tiny.yaml", ["dtype=fp8"])
    with pytest.raises(JobConfigError, match="dtype='fp8': expected auto, float32, bfloat16 or float16"):
        check_job(cfg, "pretrain", 1)
    check_job(load_job_config("pretrain", "configs/pretrain/tiny.yaml", ["dtype=auto"]), "pretrain", 1)


def test_held_out_scoring_with_auto_is_float32_on_a_cpu_without_bf16(monkeypatch, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from zhjax.eval.hf import bits_per_character

    config = transformers.LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()

    class ByteTokenizer:  # ids 3..258 are bytes
        bos_token_id, eos_token_id = 1, 2

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [3 + b for b in text.encode("utf-8")]}

        def decode(self, ids):
            return bytes(i - 3 for i in ids).decode("utf-8", errors="replace")

    lines = ["中文的句子。", "另一个较长的中文句子，有标点。"]
    scores = {}
    for fast in (False, True):
        monkeypatch.setattr(zhjax.precision, "cpu_has_fast_bf16", lambda fast=fast: fast)
        scores[fast] = bits_per_character(model, ByteTokenizer(), lines, max_tokens=None, dtype="auto").bits_per_char
    f32 = bits_per_character(model, ByteTokenizer(), lines, max_tokens=None, dtype="float32").bits_per_char
    b16 = bits_per_character(model, ByteTokenizer(), lines, max_tokens=None, dtype="bfloat16").bits_per_char
    assert scores[False] == f32 and scores[True] == b16 and f32 != b16
