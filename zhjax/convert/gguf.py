"""Write an HF LLaMA-family directory (a merged model) as one GGUF file, llama.cpp's format, with its tokenizer.

Weights: every tensor keeps its HF `[out, in]` layout under the GGUF name the `gguf` package's own name map
gives it (`model.layers.0.self_attn.q_proj.weight` -> `blk.0.attn_q.weight`), in f32, f16 or a quantized type
(`zhjax.convert.gguf_quant`; norms stay f32, as llama.cpp's converter writes them). The one change of layout is RoPE's: HF rotates the pairs (i, i + d/2) of each
head (rotate-half), llama.cpp the adjacent pairs (2i, 2i + 1), so the rows of q (per attention head) and of k (per
key/value head) are interleaved: GGUF row 2i of a head is HF row i, row 2i + 1 is HF row i + d/2. The file is
streamed: tensor infos are declared from shapes first, then each tensor is read (memory-mapped), converted and
written, into a temporary file renamed into place when complete.

Tokenizer metadata, from the files beside the model:

- SentencePiece (`tokenizer.model`: LLaMA, Chinese-LLaMA/Alpaca): `tokenizer.ggml.model = llama`, every piece
  with its score and type (SentencePiece's piece types are GGUF's token types), then the tokens added on top
  (the Alpaca `[PAD]`), as the HF tokenizer numbers them.
- Byte-level BPE (`tokenizer.json` with a ByteLevel pre-tokenizer: SmolLM2, the tiny preset):
  `tokenizer.ggml.model = gpt2`, the tokens in id order, the merges, token types (special added tokens are
  control tokens) and `tokenizer.ggml.pre`, the pre-tokenizer's regex family as llama.cpp names it.

Both are padded with unused `[PAD{id}]` tokens up to the model's vocab size when the embedding has spare rows.
Merges, special token ids, add-bos/eos flags and the chat template come from `gguf.SpecialVocab`, the reader
llama.cpp's `convert_hf_to_gguf.py` uses. tests/test_gguf_llamacpp.py checks the files against llama.cpp itself
and against that converter's output.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from gguf import TokenType

from zhjax.config import ModelConfig, RopeScaling
from zhjax.convert.gguf_quant import (
    FLOAT_TYPES,
    GGUF_DTYPES,
    LLAMA_CPP_TYPES,
    check_block_shape,
    file_type,
    llama_cpp_quantize,
    require_llama_cpp,
    stored_shape,
    tensor_type,
    to_type,
)
from zhjax.convert.hf import CheckpointReader, ConversionError, read_config

__all__ = ["GGUF_DTYPES", "GGUFTokenizer", "read_gguf_tokenizer", "rope_interleave_rows", "write_gguf"]
# GGUF's token types, from the gguf package (the same numbers as SentencePiece's piece types)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = (int(t) for t in (
    TokenType.NORMAL, TokenType.UNKNOWN, TokenType.CONTROL, TokenType.USER_DEFINED, TokenType.UNUSED, TokenType.BYTE
))


@dataclass
class GGUFTokenizer:
    """The tokenizer metadata a GGUF file carries (`tokenizer.ggml.*`).

    The vocabulary (tokens, types, scores) is built here; merges, special token ids, add-bos/eos flags and the
    chat template are read by `gguf.SpecialVocab` (llama.cpp's converter reads them with it too) into `special`.
    """

    model: str  # "llama" (SentencePiece) or "gpt2" (byte-level BPE)
    tokens: list[str]
    token_types: list[int]
    scores: list[float] | None = None
    pre: str | None = None
    special_ids: dict[str, int] = field(default_factory=dict)  # defaults of bos/eos/unk/pad (SentencePiece's own)
    add_space_prefix: bool | None = None
    special: object | None = None  # gguf.SpecialVocab, filled by read_gguf_tokenizer


def rope_interleave_rows(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """HF q/k projection rows `[n_heads * head_dim, ...]` in llama.cpp's interleaved-RoPE order (see module doc)."""
    head_dim = weight.shape[0] // n_heads
    if head_dim * n_heads != weight.shape[0] or head_dim % 2:
        raise ValueError(f"{weight.shape[0]} rows do not split into {n_heads} heads of an even size")
    return weight.reshape(n_heads, 2, head_dim // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


# --------------------------------------------------------------------------------------------- tokenizer


def _json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


def _token_content(value) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


def _pre_tokenizer_name(pre: dict | None) -> str:
    """llama.cpp's name for a byte-level tokenizer's pre-tokenizer (its regex family)."""
    steps = (pre or {}).get("pretokenizers", [pre] if pre else [])
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and "p{N}{1,3}" in str(steps[0].get("pattern")):
        return "llama-bpe"
    warnings.warn(f"pre-tokenizer {kinds} has no llama.cpp name known to zhjax; writing 'default'", stacklevel=3)
    return "default"


def _added_tokens(model_dir: Path, tokenizer_json: dict) -> dict[int, tuple[str, bool]]:
    """id -> (content, special) of tokens added on top of the model's vocabulary."""
    added = {t["id"]: (t["content"], bool(t.get("special"))) for t in tokenizer_json.get("added_tokens", [])}
    config = _json(model_dir / "tokenizer_config.json")
    for token_id, t in (config.get("added_tokens_decoder") or {}).items():
        added.setdefault(int(token_id), (t["content"], bool(t.get("special"))))
    for content, token_id in _json(model_dir / "added_tokens.json").items():
        added.setdefault(int(token_id), (content, True))
    return added


def _sentencepiece_tokens(model_dir: Path, tokenizer_json: dict) -> GGUFTokenizer:
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString((model_dir / "tokenizer.model").read_bytes())
    tokens = [p.piece for p in proto.pieces]
    scores = [float(p.score) for p in proto.pieces]
    types = [int(p.type) for p in proto.pieces]
    for token_id, (content, special) in sorted(_added_tokens(model_dir, tokenizer_json).items()):
        if token_id < len(tokens):  # a piece the HF tokenizer also lists as added (<unk>, <s>, </s>)
            if types[token_id] == NORMAL:  # SentencePiece's own control/unknown pieces keep type and score, as
                types[token_id] = CONTROL if special else USER_DEFINED  # llama.cpp's converter keeps them
                scores[token_id] = -1000.0
            continue
        if token_id != len(tokens):
            raise ConversionError(f"{model_dir}: added token {content!r} has id {token_id}, leaving a gap after {len(tokens) - 1}")
        tokens.append(content)
        scores.append(-1000.0)
        types.append(CONTROL if special else USER_DEFINED)
    spec = proto.trainer_spec
    ids = {"bos": spec.bos_id, "eos": spec.eos_id, "unk": spec.unk_id, "pad": spec.pad_id}
    return GGUFTokenizer(
        model="llama",
        tokens=tokens,
        token_types=types,
        scores=scores,
        pre="default",
        special_ids={k: v for k, v in ids.items() if v >= 0},
        add_space_prefix=bool(proto.normalizer_spec.add_dummy_prefix),
    )


def _byte_level_tokens(model_dir: Path, tokenizer_json: dict) -> GGUFTokenizer:
    model = tokenizer_json["model"]
    by_id = {i: t for t, i in model["vocab"].items()}
    added = _added_tokens(model_dir, tokenizer_json)
    size = max([*by_id, *added]) + 1
    tokens, types = [], []
    for i in range(size):
        if i in added:
            tokens.append(added[i][0])
            types.append(CONTROL if added[i][1] else USER_DEFINED)
        elif i in by_id:
            tokens.append(by_id[i])
            types.append(NORMAL)
        else:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
    return GGUFTokenizer(
        model="gpt2", tokens=tokens, token_types=types, pre=_pre_tokenizer_name(tokenizer_json.get("pre_tokenizer"))
    )


def read_gguf_tokenizer(model_dir: str | Path, config: ModelConfig | None = None) -> GGUFTokenizer:
    """The GGUF tokenizer metadata of the tokenizer files in `model_dir` (SentencePiece or byte-level BPE)."""
    model_dir = Path(model_dir)
    tokenizer_json = _json(model_dir / "tokenizer.json")
    if (model_dir / "tokenizer.model").exists():
        tok = _sentencepiece_tokens(model_dir, tokenizer_json)
    elif tokenizer_json.get("model", {}).get("type") == "BPE" and "ByteLevel" in json.dumps(tokenizer_json.get("pre_tokenizer")):
        tok = _byte_level_tokens(model_dir, tokenizer_json)
    elif tokenizer_json:
        raise ConversionError(
            f"{model_dir / 'tokenizer.json'}: a {tokenizer_json.get('model', {}).get('type')} tokenizer without a "
            "ByteLevel pre-tokenizer; GGUF export needs a byte-level BPE tokenizer.json or a SentencePiece tokenizer.model"
        )
    else:
        raise ConversionError(f"{model_dir}: no tokenizer.json or tokenizer.model; a GGUF file must carry its tokenizer")

    import gguf

    # merges, special ids, add-bos/eos and the chat template as llama.cpp's converter reads them
    special = gguf.SpecialVocab(model_dir, load_merges=tok.model == "gpt2",
                                n_vocab=config.vocab_size if config is not None else len(tok.tokens))
    tok_config = _json(model_dir / "tokenizer_config.json")
    index = {t: i for i, t in enumerate(tok.tokens)}
    for name in ("bos", "eos", "unk", "pad"):  # a special token that is a plain piece, not an added token
        content = _token_content(tok_config.get(f"{name}_token"))
        if name not in special.special_token_ids and content is not None and content in index:
            special.special_token_ids[name] = index[content]
    for name, token_id in tok.special_ids.items():  # SentencePiece's own ids, when nothing else names them
        special.special_token_ids.setdefault(name, token_id)
    # written explicitly, so llama.cpp's per-vocabulary defaults do not decide
    special.add_special_token.setdefault("bos", tok.model == "llama")
    special.add_special_token.setdefault("eos", False)
    tok.special = special
    return tok


def _pad_vocab(tok: GGUFTokenizer, vocab_size: int, source: Path) -> None:
    if len(tok.tokens) > vocab_size:
        raise ConversionError(
            f"{source}: the tokenizer has {len(tok.tokens)} tokens but the model only {vocab_size} embedding rows"
        )
    for i in range(len(tok.tokens), vocab_size):
        tok.tokens.append(f"[PAD{i}]")
        tok.token_types.append(UNUSED)
        if tok.scores is not None:
            tok.scores.append(-1000.0)


# --------------------------------------------------------------------------------------------- model


def _check_supported(config: ModelConfig, model_dir: Path) -> None:
    if config.attention_bias or config.mlp_bias:
        raise ConversionError(f"{model_dir / 'config.json'}: attention/MLP biases are not supported in the GGUF export")
    if config.rope_scaling.rope_type == "dynamic":
        raise ConversionError(
            f"{model_dir / 'config.json'}: dynamic (NTK) RoPE scaling has no GGUF form; llama.cpp sets RoPE scaling "
            "at run time (--rope-scaling, --rope-freq-base)"
        )


def _rope_freq_factors(config: ModelConfig) -> np.ndarray:
    """llama3 scaling as llama.cpp reads it: per-frequency divisors in a `rope_freqs` tensor."""
    import jax.numpy as jnp

    from zhjax.model.llama import rope_inv_freq

    positions = jnp.zeros((1, 1), jnp.int32)
    plain = np.asarray(rope_inv_freq(config.replace(rope_scaling=RopeScaling()), positions), np.float64)
    scaled = np.asarray(rope_inv_freq(config, positions), np.float64)
    return (plain / scaled).astype(np.float32)


def _add_metadata(writer, config: ModelConfig, tok: GGUFTokenizer, name: str, file_type: int) -> None:
    import gguf

    c = config
    writer.add_name(name)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_rope_dimension_count(c.head_dim)
    if c.head_dim * c.num_attention_heads != c.hidden_size:
        writer.add_key_length(c.head_dim)
        writer.add_value_length(c.head_dim)
    writer.add_rope_freq_base(c.rope_theta)
    if c.rope_scaling.rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(c.rope_scaling.factor)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_vocab_size(c.vocab_size)
    writer.add_file_type(file_type)

    writer.add_tokenizer_model(tok.model)
    if tok.pre is not None:
        writer.add_tokenizer_pre(tok.pre)
    writer.add_token_list(tok.tokens)
    writer.add_token_types(tok.token_types)
    if tok.scores is not None:
        writer.add_token_scores(tok.scores)
    if tok.add_space_prefix is not None:
        writer.add_add_space_prefix(tok.add_space_prefix)
    tok.special.add_to_gguf(writer, quiet=True)


@contextmanager
def _written_whole(out_file: Path) -> Iterator[Path]:
    """A temporary path beside `out_file`, renamed to it when the block completes and removed when it fails."""
    out_file.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{out_file.name}.tmp-", dir=out_file.parent)
    os.close(fd)
    tmp = Path(name)
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o666 & ~umask)  # mkstemp's 0600 would make the published file private
    try:
        yield tmp
        tmp.replace(out_file)
    finally:
        tmp.unlink(missing_ok=True)


def write_gguf(model_dir: str | Path, out_file: str | Path, *, dtype: str = "f16", name: str | None = None) -> Path:
    """Write the HF model at `model_dir` (config, weights, tokenizer) as a GGUF file of weight type `dtype`.

    `dtype` is one of `GGUF_DTYPES`: f32/f16, a type the `gguf` package quantizes (q8_0, q4_0, ...) or one of
    llama.cpp's k-quant mixes (q4_k_m, ...; needs the `llamacpp` extra), see `zhjax.convert.gguf_quant`. Every
    check (architecture, tokenizer files, tensor names, block shapes) runs before the file is opened; the file
    appears only when complete. llama.cpp runs the result directly (`llama-cli -m out.gguf`).
    """
    if dtype not in GGUF_DTYPES:
        raise ValueError(f"dtype {dtype!r}: expected one of {GGUF_DTYPES}")
    if dtype in LLAMA_CPP_TYPES:
        require_llama_cpp(dtype)
    model_dir, out_file = Path(model_dir), Path(out_file)
    if dtype not in LLAMA_CPP_TYPES:
        with _written_whole(out_file) as tmp:
            _write(model_dir, tmp, dtype, name)
        return out_file
    plan = _Plan(model_dir, "f16")  # every check, before the f16 file that llama.cpp quantizes is written
    out_file.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out_file.name}.", dir=out_file.parent) as work:
        f16 = Path(work) / "f16.gguf"
        _write(model_dir, f16, "f16", name, plan=plan)
        with _written_whole(out_file) as tmp:
            llama_cpp_quantize(f16, tmp, dtype)
    return out_file


class _Plan:
    """What a GGUF export of `model_dir` in `dtype` will write: config, tokenizer, tensors and their types (checked)."""

    def __init__(self, model_dir: Path, dtype: str):
        import gguf

        self.model_dir, self.dtype = model_dir, dtype
        self.config, _ = read_config(model_dir)
        config = self.config
        _check_supported(config, model_dir)
        self.reader = CheckpointReader(model_dir)
        self.tok = read_gguf_tokenizer(model_dir, config)
        _pad_vocab(self.tok, config.vocab_size, model_dir)
        names = [n for n in self.reader.where if not n.endswith("rotary_emb.inv_freq")]
        if config.tie_word_embeddings:
            names = [n for n in names if n != "lm_head.weight"]
        name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
        head = "token_embd.weight" if config.tie_word_embeddings else "output.weight"
        self.tensors = []  # (hf name, gguf name, shape, ggml type)
        for hf_name in names:
            gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if gguf_name is None:
                raise ConversionError(f"{model_dir}: tensor {hf_name!r} has no GGUF name in the llama architecture")
            shape = tuple(self.reader.get(hf_name).shape)
            qtype = tensor_type(dtype, gguf_name, shape, head=head)
            if dtype not in FLOAT_TYPES and len(shape) > 1:
                check_block_shape(qtype, gguf_name, hf_name, shape, model_dir)
            self.tensors.append((hf_name, gguf_name, shape, qtype))
        self.rope_freqs = _rope_freq_factors(config) if config.rope_scaling.rope_type == "llama3" else None

    def array(self, hf_name: str, qtype) -> np.ndarray:
        """Tensor `hf_name` in llama.cpp's layout (q/k rows interleaved per head) and type `qtype`."""
        heads = {".self_attn.q_proj.": self.config.num_attention_heads,
                 ".self_attn.k_proj.": self.config.num_key_value_heads}
        arr = np.asarray(self.reader.get(hf_name), dtype=np.float32)
        for part, n_heads in heads.items():
            if part in hf_name:
                arr = rope_interleave_rows(arr, n_heads)
        if not np.isfinite(arr).all():
            raise ConversionError(f"{self.model_dir}: tensor {hf_name!r} holds NaN or infinite values")
        out = to_type(arr, qtype)
        if out.dtype == np.float16 and not np.isfinite(out).all():
            raise ConversionError(f"{self.model_dir}: tensor {hf_name!r} overflows float16; export with dtype f32")
        return out


def _write(model_dir: Path, path: Path, dtype: str, name: str | None, *, plan: _Plan | None = None) -> None:
    """Stream the GGUF file of `model_dir` into `path`: tensor infos from shapes, then each tensor converted."""
    import gguf

    plan = plan or _Plan(model_dir, dtype)
    writer = gguf.GGUFWriter(None, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    try:
        _add_metadata(writer, plan.config, plan.tok, name or model_dir.name, file_type(dtype))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)  # in every file, as llama.cpp's converter does
        if plan.rope_freqs is not None:
            writer.add_tensor_info(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", plan.rope_freqs.shape,
                                   plan.rope_freqs.dtype, plan.rope_freqs.nbytes)
        for _, gguf_name, shape, qtype in plan.tensors:
            stored, np_dtype, nbytes = stored_shape(qtype, shape)
            writer.add_tensor_info(gguf_name, stored, np_dtype, nbytes,
                                   raw_dtype=None if np_dtype != np.uint8 else qtype)
        writer.write_header_to_file(path)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        if plan.rope_freqs is not None:
            writer.write_tensor_data(plan.rope_freqs)
        for hf_name, _, _, qtype in plan.tensors:
            writer.write_tensor_data(plan.array(hf_name, qtype))
    finally:
        writer.close()
