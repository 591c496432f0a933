"""Write an HF LLaMA-family directory (a merged model) as one GGUF file, llama.cpp's format, with its tokenizer.

Weights: every tensor keeps its HF `[out, in]` layout under the GGUF name the `gguf` package's own name map
gives it (`model.layers.0.self_attn.q_proj.weight` -> `blk.0.attn_q.weight`), in f32 or f16 (norms stay f32, as
llama.cpp's converter writes them). The one change of layout is RoPE's: HF rotates the pairs (i, i + d/2) of each
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
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from zhjax.config import ModelConfig, RopeScaling
from zhjax.convert.hf import CheckpointReader, ConversionError, read_config

GGUF_DTYPES = ("f16", "f32")
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6  # GGUF token types (= SentencePiece's)


@dataclass
class GGUFTokenizer:
    """The tokenizer metadata a GGUF file carries (`tokenizer.ggml.*`)."""

    model: str  # "llama" (SentencePiece) or "gpt2" (byte-level BPE)
    tokens: list[str]
    token_types: list[int]
    scores: list[float] | None = None
    merges: list[str] | None = None
    pre: str | None = None
    special_ids: dict[str, int] = field(default_factory=dict)  # bos, eos, unk, pad
    add_bos: bool = False
    add_eos: bool = False
    add_space_prefix: bool | None = None
    chat_template: str | None = None


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
        if token_id < len(tokens):
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
        special_ids={k: v for k, v in ids.items() if v >= 0},
        add_bos=True,
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
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    post = tokenizer_json.get("post_processor") or {}
    single = post.get("single") or []
    return GGUFTokenizer(
        model="gpt2",
        tokens=tokens,
        token_types=types,
        merges=merges,
        pre=_pre_tokenizer_name(tokenizer_json.get("pre_tokenizer")),
        add_bos=bool(single) and "SpecialToken" in single[0],
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

    tok_config = _json(model_dir / "tokenizer_config.json")
    index = {t: i for i, t in enumerate(tok.tokens)}
    for name in ("bos", "eos", "unk", "pad"):
        content = _token_content(tok_config.get(f"{name}_token"))
        if content is not None and content in index:
            tok.special_ids[name] = index[content]
    if config is not None:
        for name in ("bos", "eos", "pad"):
            value = getattr(config, f"{name}_token_id")
            value = value[0] if isinstance(value, tuple) else value
            if name not in tok.special_ids and isinstance(value, int):
                tok.special_ids[name] = value
    for flag in ("add_bos", "add_eos"):
        if isinstance(tok_config.get(f"{flag}_token"), bool):
            setattr(tok, flag, tok_config[f"{flag}_token"])
    template = model_dir / "chat_template.jinja"
    tok.chat_template = template.read_text(encoding="utf-8") if template.exists() else tok_config.get("chat_template")
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
    if tok.merges is not None:
        writer.add_token_merges(tok.merges)
    adders = {"bos": writer.add_bos_token_id, "eos": writer.add_eos_token_id, "unk": writer.add_unk_token_id,
              "pad": writer.add_pad_token_id}
    for key, token_id in tok.special_ids.items():
        adders[key](token_id)
    writer.add_add_bos_token(tok.add_bos)
    writer.add_add_eos_token(tok.add_eos)
    if tok.add_space_prefix is not None:
        writer.add_add_space_prefix(tok.add_space_prefix)
    if tok.chat_template:
        writer.add_chat_template(tok.chat_template)


def write_gguf(model_dir: str | Path, out_file: str | Path, *, dtype: str = "f16", name: str | None = None) -> Path:
    """Write the HF model at `model_dir` (config, weights, tokenizer) as a GGUF file; `dtype` is f16 or f32.

    llama.cpp runs the result directly (`llama-cli -m out.gguf`) and can quantize it further (`llama-quantize`).
    """
    import gguf

    if dtype not in GGUF_DTYPES:
        raise ValueError(f"dtype {dtype!r}: expected one of {GGUF_DTYPES}")
    model_dir, out_file = Path(model_dir), Path(out_file)
    config, _ = read_config(model_dir)
    _check_supported(config, model_dir)
    reader = CheckpointReader(model_dir)
    tok = read_gguf_tokenizer(model_dir, config)
    _pad_vocab(tok, config.vocab_size, model_dir)

    names = [n for n in reader.where if not n.endswith("rotary_emb.inv_freq")]
    if config.tie_word_embeddings:
        names = [n for n in names if n != "lm_head.weight"]
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    heads = {".self_attn.q_proj.": config.num_attention_heads, ".self_attn.k_proj.": config.num_key_value_heads}
    half = np.float16 if dtype == "f16" else np.float32

    def target(hf_name: str) -> tuple[str, np.dtype]:
        gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ConversionError(f"{model_dir}: tensor {hf_name!r} has no GGUF name in the llama architecture")
        return gguf_name, np.dtype(half if len(reader.get(hf_name).shape) > 1 else np.float32)

    def convert(hf_name: str, out_dtype: np.dtype) -> np.ndarray:
        arr = np.asarray(reader.get(hf_name))
        for part, n_heads in heads.items():
            if part in hf_name:
                arr = rope_interleave_rows(arr, n_heads)
        arr = np.ascontiguousarray(arr.astype(out_dtype))
        if out_dtype == np.float16 and not np.isfinite(arr).all():
            raise ConversionError(f"{model_dir}: tensor {hf_name!r} overflows float16; export with dtype f32")
        return arr

    plan = [(n, *target(n)) for n in names]
    rope_freqs = _rope_freq_factors(config) if config.rope_scaling.rope_type == "llama3" else None
    out_file.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out_file.name}.tmp-", dir=out_file.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    writer = gguf.GGUFWriter(None, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    try:
        file_type = gguf.LlamaFileType.MOSTLY_F16 if dtype == "f16" else gguf.LlamaFileType.ALL_F32
        _add_metadata(writer, config, tok, name or model_dir.name, int(file_type))
        if rope_freqs is not None:
            writer.add_tensor_info(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", rope_freqs.shape,
                                   rope_freqs.dtype, rope_freqs.nbytes)
        for hf_name, gguf_name, out_dtype in plan:
            shape = reader.get(hf_name).shape
            writer.add_tensor_info(gguf_name, shape, out_dtype, int(np.prod(shape)) * out_dtype.itemsize)
        writer.write_header_to_file(tmp)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        if rope_freqs is not None:
            writer.write_tensor_data(rope_freqs)
        for hf_name, _, out_dtype in plan:
            writer.write_tensor_data(convert(hf_name, out_dtype))
        writer.close()
        tmp.replace(out_file)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return out_file
