"""GGUF export: transformers' own GGUF reader (`from_pretrained(..., gguf_file=)`) gets the source's logits and tokens.

transformers undoes llama.cpp's interleaved q/k row order when it reads a GGUF, so equal logits check the
permutation per head (q) and per kv head (k); its tokenizer is rebuilt from the file's metadata alone, so equal ids
check the tokenizer export (byte-level BPE and SentencePiece).
"""

from __future__ import annotations

import copy
import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")
spm = pytest.importorskip("sentencepiece")

from zhjax.convert.gguf import write_gguf  # noqa: E402
from zhjax.convert.hf import ConversionError  # noqa: E402

from .test_model_parity import hf_logits, random_hf_model  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TINY_TOKENIZER = REPO / "configs" / "tiny" / "tokenizer"
LINES = [line.strip() for line in (REPO / "configs" / "tiny" / "corpus.txt").read_text(encoding="utf-8").splitlines()][:40]
TEXTS = [*LINES, "Hello  world 123, 4567! ÆØÅ 🙂\n\ttabs", "科学家 improves科学技术。"]


def load_gguf(path: Path):
    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return model, tokenizer


def read_fields(path: Path) -> tuple[dict, set]:
    reader = gguf.GGUFReader(path)
    arrays = {"tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.scores", "tokenizer.ggml.token_type"}
    fields = {k: f.contents() for k, f in reader.fields.items() if k not in arrays}
    return fields, {t.name for t in reader.tensors}


def tiny_byte_level_model(path: Path, **overrides):
    hf = random_hf_model(path, vocab_size=400, num_key_value_heads=2, head_dim=16, **overrides)
    source = transformers.AutoTokenizer.from_pretrained(TINY_TOKENIZER)
    source.save_pretrained(path)
    return hf, source


def rounded_to_f16(model):
    """`model` with every matrix rounded to float16 (norms stay float32, as a GGUF stores them)."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim > 1:
                p.copy_(p.half().float())
    return model


def assert_f16_logits(got: np.ndarray, source, ids) -> None:
    """An f16 file computes what the source computes with f16-rounded matrices; rounding costs ~1e-3 relative."""
    ref = hf_logits(source, ids)
    np.testing.assert_allclose(got, hf_logits(rounded_to_f16(source), ids), atol=1e-4, rtol=0)
    assert np.abs(got - ref).max() < 1e-2 * np.abs(ref).max()


@pytest.mark.parametrize("dtype", ["f32", "f16"])
def test_byte_level_bpe_model_round_trips_through_transformers_gguf_reader(tmp_path, dtype):
    hf, source = tiny_byte_level_model(tmp_path / "hf")  # GQA (4 heads, 2 kv heads), head_dim 16 != 48 / 4
    out = write_gguf(tmp_path / "hf", tmp_path / f"tiny-{dtype}.gguf", dtype=dtype)
    model, tokenizer = load_gguf(out)
    ids = np.random.default_rng(0).integers(0, 400, (2, 16))
    if dtype == "f32":
        np.testing.assert_allclose(hf_logits(model, ids), hf_logits(hf, ids), atol=1e-4, rtol=0)
    else:
        assert_f16_logits(hf_logits(model, ids), hf, ids)
    for text in TEXTS:
        assert tokenizer(text).input_ids == source(text).input_ids, text
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("<s>", "</s>", "<pad>")

    fields, tensors = read_fields(out)
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    assert fields["llama.attention.key_length"] == 16 and fields["general.file_type"] == (1 if dtype == "f16" else 0)
    assert "output.weight" in tensors


def test_sentencepiece_tied_model_with_added_pad_token(tmp_path):
    """A LLaMA-style SentencePiece BPE (byte fallback, no normalization) plus an added [PAD] as in Chinese-Alpaca; tied."""
    from sentencepiece import sentencepiece_model_pb2

    from zhjax.tokenizer.merge import save_merged_tokenizer

    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(LINES * 3), model_writer=buffer, vocab_size=600, model_type="bpe", byte_fallback=True,
        character_coverage=1.0, normalization_rule_name="identity", remove_extra_whitespaces=False, num_threads=1,
        minloglevel=2,
    )
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(buffer.getvalue())
    save_merged_tokenizer(proto, tmp_path / "hf")
    source = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    source.add_special_tokens({"pad_token": "[PAD]"})
    source.save_pretrained(tmp_path / "hf")
    assert len(source) == 601
    hf = random_hf_model(tmp_path / "hf", vocab_size=601, num_key_value_heads=1, tie_word_embeddings=True)

    out = write_gguf(tmp_path / "hf", tmp_path / "sp.gguf", dtype="f32")
    model, tokenizer = load_gguf(out)
    assert model.config.tie_word_embeddings
    ids = np.random.default_rng(1).integers(0, 601, (2, 16))
    np.testing.assert_allclose(hf_logits(model, ids), hf_logits(hf, ids), atol=1e-4, rtol=0)
    sp = spm.SentencePieceProcessor(model_proto=buffer.getvalue())
    for text in TEXTS:
        expected = [sp.bos_id(), *sp.encode(text)]
        assert tokenizer(text).input_ids == expected == source(text).input_ids, text
    assert tokenizer.convert_tokens_to_ids("[PAD]") == 600

    fields, tensors = read_fields(out)
    assert fields["tokenizer.ggml.model"] == "llama" and "output.weight" not in tensors
    types = gguf.GGUFReader(out).fields["tokenizer.ggml.token_type"].contents()
    assert types[600] == 3 and types.count(6) == 256  # [PAD] is a control token; the 256 byte-fallback pieces


def test_rope_scaling_is_written_as_llama_cpp_reads_it(tmp_path):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 16, "rope_theta": 500000.0}
    tiny_byte_level_model(tmp_path / "l3", rope_parameters=llama3)
    fields, tensors = read_fields(write_gguf(tmp_path / "l3", tmp_path / "l3.gguf", dtype="f32"))
    factors = next(t for t in gguf.GGUFReader(tmp_path / "l3.gguf").tensors if t.name == "rope_freqs.weight").data
    config = transformers.AutoConfig.from_pretrained(tmp_path / "l3")
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    plain = 1.0 / (500000.0 ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16))
    np.testing.assert_allclose(factors, (plain / scaled).numpy(), rtol=1e-5)

    tiny_byte_level_model(tmp_path / "lin", rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0})
    fields, _ = read_fields(write_gguf(tmp_path / "lin", tmp_path / "lin.gguf", dtype="f32"))
    assert fields["llama.rope.scaling.type"] == "linear" and fields["llama.rope.scaling.factor"] == 4.0


def test_export_tool_and_its_errors(tmp_path):
    tiny_byte_level_model(tmp_path / "hf")
    run = [sys.executable, "tools/export_gguf.py", "--model"]
    ok = subprocess.run([*run, str(tmp_path / "hf"), "--out", str(tmp_path / "m.gguf")], cwd=REPO,
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert read_fields(tmp_path / "m.gguf")[0]["general.file_type"] == 1  # f16 by default

    tiny_byte_level_model(tmp_path / "bias", attention_bias=True)
    bad = subprocess.run([*run, str(tmp_path / "bias"), "--out", str(tmp_path / "b.gguf")], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "biases are not supported" in bad.stderr
    assert not (tmp_path / "b.gguf").exists()
    (tmp_path / "hf" / "tokenizer.json").unlink()
    with pytest.raises(ConversionError, match="no tokenizer.json or tokenizer.model"):
        write_gguf(tmp_path / "hf", tmp_path / "x.gguf")


@pytest.mark.slow
def test_smollm2_f16_gguf_matches_the_source(assets, tmp_path):
    source_dir = assets.smollm2_dir
    out = write_gguf(source_dir, tmp_path / "smollm2-f16.gguf", dtype="f16")
    model, tokenizer = load_gguf(out)
    source = transformers.AutoTokenizer.from_pretrained(source_dir)
    text = "The capital of France is Paris. 北京是中国的首都。 12345 <|im_start|>user"
    ids = source(text).input_ids
    assert tokenizer(text).input_ids == ids
    reference = transformers.AutoModelForCausalLM.from_pretrained(source_dir).eval()
    assert_f16_logits(hf_logits(model, [ids]), reference, [ids])


@pytest.mark.parametrize("dtype", ["q8_0", "q4_0"])
def test_quantized_export_holds_the_weights_within_the_types_error(tmp_path, dtype):
    """Read back with the gguf package and dequantized: every matrix is the (q/k-permuted) source within the type's
    rounding; the head stays q8_0 in a 4-bit file; norms stay f32. (llama.cpp runs them: test_gguf_llamacpp.py.)"""
    from gguf.quants import dequantize

    from zhjax.convert.gguf import rope_interleave_rows

    hf, _ = tiny_byte_level_model(tmp_path / "hf", hidden_size=64, intermediate_size=96)
    out = write_gguf(tmp_path / "hf", tmp_path / f"tiny-{dtype}.gguf", dtype=dtype)
    reader = gguf.GGUFReader(out)
    assert reader.fields["general.file_type"].contents() == {"q8_0": 7, "q4_0": 2}[dtype]
    assert reader.fields["general.quantization_version"].contents() == gguf.GGML_QUANT_VERSION
    state = {k: v.float().numpy() for k, v in hf.state_dict().items()}
    sources = {"token_embd.weight": state["model.embed_tokens.weight"], "output.weight": state["lm_head.weight"],
               "blk.0.attn_q.weight": rope_interleave_rows(state["model.layers.0.self_attn.q_proj.weight"], 4),
               "blk.0.attn_k.weight": rope_interleave_rows(state["model.layers.0.self_attn.k_proj.weight"], 2),
               "blk.0.ffn_down.weight": state["model.layers.0.mlp.down_proj.weight"],
               "blk.0.attn_norm.weight": state["model.layers.0.input_layernorm.weight"]}
    tensors = {t.name: t for t in reader.tensors}
    for name, source in sources.items():
        t = tensors[name]
        expected = "F32" if source.ndim == 1 else "Q8_0" if name == "output.weight" else dtype.upper()
        assert t.tensor_type.name == expected, name
        got = dequantize(t.data, t.tensor_type).reshape(source.shape)
        step = np.abs(source).max() / (127 if t.tensor_type.name == "Q8_0" else 7)  # one quantization step, at most
        assert np.abs(got - source).max() <= step, name


def test_unsupported_quantization_shape_is_refused_before_writing(tmp_path):
    tiny_byte_level_model(tmp_path / "hf")  # hidden 48: not a whole number of 32-value blocks
    with pytest.raises(ConversionError, match=r"rows of 48 values, not a multiple of Q8_0's block of 32"):
        write_gguf(tmp_path / "hf", tmp_path / "m.gguf", dtype="q8_0")
    with pytest.raises(ValueError, match="expected one of"):
        write_gguf(tmp_path / "hf", tmp_path / "m.gguf", dtype="q3_0")
    assert list(tmp_path.glob("*.gguf*")) == [] and list(tmp_path.glob(".m.gguf*")) == []
