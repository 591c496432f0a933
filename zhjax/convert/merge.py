"""Apply PEFT LoRA adapters, in order, to a Hugging Face base: merged into a new HF directory, or unmerged in zhjax.

The seed's "Plus" recipe stacks two adapters on the original LLaMA: the pre-training LoRA (whose full
`embed_tokens`/`lm_head` grow the vocabulary 32000 -> 49953) and the instruction LoRA trained on top of the
first (49954 rows: it adds [PAD]). Applying adapter k means: its LoRA factors add `(B A) * lora_alpha / r` to
the linear weights it targets, and its full `embed_tokens` / `lm_head` replace the current ones. LoRA never
touches the embeddings, so "in order" reduces to: every linear weight is the base weight plus the sum of the
adapters' deltas, and the embedding and head are those of the last adapter that carries them.

- `plan_merge` opens the base and every adapter and runs every check before any work, each error naming the file:
  r and lora_alpha present, LoRA targets the base has, LoRA shapes, and the vocabulary sizes of base, adapters
  and tokenizers (the size mismatch is the seed's most reported merge failure). A vocabulary that shrinks
  between adapters means they were given out of order.
- `merge_adapters` streams the merge: one base tensor is read (memory-mapped), every adapter's delta for it is
  folded in float32, the result is cast and handed to `write_hf_dir`, which keeps at most one shard in memory.
  It writes config.json (new vocab size), generation_config.json and the tokenizer of the last adapter that
  has one (zhjax's trainer, like the seed, saves the tokenizer beside the adapter).
- `load_with_adapters` builds the same function in zhjax without merging, for parity checks and for running the
  published LoRAs in JAX: the model is built with the final vocabulary, base weights come from the base, the
  embedding/head from the adapters, and the LoRA factors are kept. Several adapters become one LoRA whose rank
  is the sum of theirs: with A = [s1 A1, s2 A2] and B = [B1; B2] (scale 1), x A B = s1 x A1 B1 + s2 x A2 B2.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from zhjax.config import LoraConfig, ModelConfig
from zhjax.convert.hf import CheckpointReader, ConversionError, read_config, write_hf_dir
from zhjax.convert.peft import PeftAdapter, check_adapter_against_base, read_peft_adapter
from zhjax.model.params import variable_value
from zhjax.ownership import check_output_dir

EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"
_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": jnp.bfloat16}


@dataclass
class MergePlan:
    """The checked inputs of a merge and what it will produce."""

    base: Path
    config: ModelConfig
    raw_config: dict
    reader: CheckpointReader
    adapters: list[PeftAdapter]
    vocab_size: int
    embed_from: PeftAdapter | None  # last adapter with embed_tokens (None: the base's)
    head_from: PeftAdapter | None  # last adapter with lm_head
    tie_word_embeddings: bool
    tokenizer_dir: Path | None

    @property
    def base_dtype(self) -> np.dtype:
        """Storage dtype of the base's embedding, the default output dtype."""
        return self.reader.get(EMBED).dtype


def _tokenizer_size(directory: Path) -> int | None:
    """Number of token ids (added tokens included) of the tokenizer files in `directory`; None when it has none."""
    from zhjax.tokenizer.guards import load_tokenizer, tokenizer_vocab_size

    if not _has_tokenizer(directory):
        return None
    try:
        return tokenizer_vocab_size(load_tokenizer(directory))
    except Exception as e:
        raise ConversionError(f"{directory}: its tokenizer files do not load in transformers ({e})") from e


def _check_tokenizer(directory: Path, vocab_size: int, what: str, *, allow_padding: bool = False, hint: str = "") -> None:
    from zhjax.tokenizer.guards import check_vocab_match

    size = _tokenizer_size(directory)
    if size is not None:
        try:
            check_vocab_match(vocab_size, size, f"{directory} ({what})", allow_padding=allow_padding)
        except ValueError as e:
            raise ConversionError(f"{e}{hint}") from e


def plan_merge(
    base: str | Path, adapters: Sequence[str | Path], *, tokenizer_dir: str | Path | None = None
) -> MergePlan:
    """Open and check a base HF directory and adapter directories (applied in the given order); no weights read.

    `tokenizer_dir` overrides where the output's tokenizer comes from (default: the last adapter with tokenizer
    files, else the base). Raises `ConversionError` naming the file on the first problem found.
    """
    base = Path(base)
    config, raw = read_config(base)
    reader = CheckpointReader(base)

    def shape_of(name: str) -> tuple[int, ...] | None:
        return tuple(reader.get(name).shape) if name in reader.where else None

    embed_shape = shape_of(EMBED)
    if embed_shape != (config.vocab_size, config.hidden_size):
        raise ConversionError(
            f"{base}: {EMBED} has shape {embed_shape}, but config.json says vocab_size={config.vocab_size}, "
            f"hidden_size={config.hidden_size}"
        )
    _check_tokenizer(base, config.vocab_size, "the base's tokenizer", allow_padding=True)
    state = _VocabState(config.vocab_size, config.tie_word_embeddings or shape_of(HEAD) is None)
    opened: list[PeftAdapter] = []
    for adapter_dir in adapters:
        adapter = read_peft_adapter(adapter_dir)
        check_adapter_against_base(adapter, config, shape_of, str(base))
        state.apply(adapter)
        _check_adapter_tokenizer(adapter, state.vocab, len(opened) + 1)
        opened.append(adapter)
    state.finish(base, config.vocab_size)

    if tokenizer_dir is None:
        candidates = [a.path for a in reversed(opened) if _has_tokenizer(a.path)] + [base] * _has_tokenizer(base)
        tokenizer_dir = candidates[0] if candidates else None
    elif not _has_tokenizer(Path(tokenizer_dir)):
        raise ConversionError(f"{tokenizer_dir}: no tokenizer.json or tokenizer.model to copy into the output")
    if tokenizer_dir is not None:
        tokenizer_dir = Path(tokenizer_dir)
        grown = state.embed_from is not None or state.head_from is not None
        _check_tokenizer(tokenizer_dir, state.vocab, "the tokenizer for the merged model", allow_padding=not grown)
    return MergePlan(base, config, raw, reader, opened, state.vocab, state.embed_from, state.head_from, state.tied,
                     tokenizer_dir)


@dataclass
class _VocabState:
    """Vocabulary size, tying and the source of embed_tokens / lm_head as adapters are applied in order."""

    vocab: int
    tied: bool
    embed_from: PeftAdapter | None = None
    head_from: PeftAdapter | None = None

    def apply(self, adapter: PeftAdapter) -> None:
        file, size = adapter.weights_file, adapter.vocab_size
        if size is None:
            return
        if size < self.vocab:
            raise ConversionError(
                f"{file}: its embed_tokens/lm_head have {size} rows, fewer than the {self.vocab} of the model it is "
                "applied to: the adapters are out of order? Apply them as trained: base, then the pre-training LoRA, "
                "then the instruction LoRA (e.g. 32000 -> 49953 -> 49954)"
            )
        has_embed, has_head = "embed_tokens" in adapter.modules, "lm_head" in adapter.modules
        if size != self.vocab and not self.tied and not (has_embed and has_head):
            present = "embed_tokens" if has_embed else "lm_head"
            raise ConversionError(
                f"{file}: carries {present} with {size} rows but not the other of embed_tokens/lm_head, which the "
                f"(untied) model has with {self.vocab} rows; an adapter that grows the vocabulary must save both"
            )
        if self.tied and has_head:
            # PEFT without ensure_weight_tying trains two copies of a tied matrix: keep the head it trained, untied.
            embed, head = adapter.module_weight("embed_tokens"), adapter.module_weight("lm_head")
            self.tied = has_embed and np.array_equal(head, embed)
        self.embed_from = adapter if has_embed else self.embed_from
        self.head_from = adapter if has_head else self.head_from
        self.vocab = size

    def finish(self, base: Path, base_vocab: int) -> None:
        if self.tied and self.head_from is not None and self.head_from is not self.embed_from:
            self.tied = False  # a later adapter replaced only the embedding: the earlier head is a separate matrix
        head_rows = self.head_from.vocab_size if self.head_from else base_vocab
        if not self.tied and head_rows != self.vocab:
            source = self.head_from.weights_file if self.head_from else base
            raise ConversionError(
                f"{source}: lm_head has {head_rows} rows but the merged embed_tokens has {self.vocab}; "
                "the adapters do not describe one model"
            )


def _check_adapter_tokenizer(adapter: PeftAdapter, vocab: int, position: int) -> None:
    """The tokenizer saved beside an adapter must fit the model as it is once that adapter is applied."""
    if adapter.vocab_size is None:
        hint = (
            " The adapter carries no embed_tokens/lm_head (modules_to_save), so it cannot grow the vocabulary: it was "
            "trained on a resized model without saving the embeddings, or it belongs after an adapter that grows it."
        )
    else:
        hint = (
            f" {adapter.weights_file.name} has {adapter.vocab_size}-row embeddings, so the tokenizer beside it is not "
            "the one it was trained with (e.g. the Chinese-Alpaca tokenizer, 49954, beside a Chinese-LLaMA adapter)."
        )
    _check_tokenizer(adapter.path, vocab, f"adapter {position}: its tokenizer vs the model it yields",
                     allow_padding=adapter.vocab_size is None, hint=hint)


def _has_tokenizer(directory: Path) -> bool:
    return (directory / "tokenizer.json").exists() or (directory / "tokenizer.model").exists()


def _layer_target(name: str) -> tuple[int, str, str] | None:
    """`(layer, block, module)` of `model.layers.{i}.{block}.{module}.weight`, else None."""
    parts = name.split(".")
    if len(parts) == 6 and parts[:2] == ["model", "layers"] and parts[5] == "weight":
        return int(parts[2]), parts[3], parts[4]
    return None


def iter_merged_tensors(plan: MergePlan, dtype=None) -> Iterator[tuple[str, np.ndarray]]:
    """`(hf_name, array)` of the merged model, one tensor at a time, in `dtype` (default: the base's).

    Each linear weight is read from the base, every adapter's `(B A) * scaling` for it is added in float32, and
    the sum is cast once; embeddings and head come from the last adapter that has them.
    """
    out_dtype = np.dtype(dtype) if dtype is not None else plan.base_dtype
    embed = plan.embed_from.modules["embed_tokens"] if plan.embed_from else None
    head = plan.head_from.modules["lm_head"] if plan.head_from else None
    names = list(plan.reader.where)
    for name in names:
        if name.endswith("rotary_emb.inv_freq"):
            continue  # a buffer some old LLaMA conversions saved; transformers recomputes it
        if name == HEAD and plan.tie_word_embeddings:
            continue
        if name == EMBED and embed is not None:
            arr = plan.embed_from.tensor(embed)
        elif name == HEAD and head is not None:
            arr = plan.head_from.tensor(head)
        else:
            arr = plan.reader.get(name)
            target = _layer_target(name)
            deltas = [d for a in plan.adapters if target and (d := a.delta(*target)) is not None]
            if deltas:
                arr = arr.astype(np.float32) + sum(deltas)
        yield name, np.ascontiguousarray(arr.astype(out_dtype))
    if not plan.tie_word_embeddings and HEAD not in plan.reader.where:
        source = plan.head_from.tensor(head) if head is not None else plan.reader.get(EMBED)
        yield HEAD, np.ascontiguousarray(source.astype(out_dtype))


def merge_adapters(
    base: str | Path,
    adapters: Sequence[str | Path],
    out_dir: str | Path,
    *,
    dtype: str | None = None,
    tokenizer_dir: str | Path | None = None,
    max_shard_bytes: int = 2 * 1024**3,
    overwrite: bool = False,
) -> Path:
    """Merge `adapters` (in order) into the HF model at `base`, writing a plain HF `LlamaForCausalLM` to `out_dir`.

    `dtype` is float32, float16 or bfloat16 (default: the base's). All checks run first (`plan_merge`); the
    output appears only when complete. `out_dir` may not be, contain or lie inside an input, and an existing one
    that zhjax did not write is refused unless `overwrite` (`zhjax.ownership.OutputRefused`). Returns `out_dir`.
    """
    if dtype is not None and dtype not in _DTYPES:
        raise ValueError(f"dtype {dtype!r}: expected one of {sorted(_DTYPES)}")
    inputs = [base, *adapters, tokenizer_dir]
    check_output_dir(out_dir, inputs=inputs, overwrite=overwrite)
    plan = plan_merge(base, adapters, tokenizer_dir=tokenizer_dir)
    out_dtype = np.dtype(_DTYPES[dtype]) if dtype else plan.base_dtype
    config_json = dict(plan.raw_config)
    config_json.update(vocab_size=plan.vocab_size, tie_word_embeddings=plan.tie_word_embeddings, dtype=str(out_dtype))
    if "torch_dtype" in config_json:
        config_json["torch_dtype"] = str(out_dtype)
    generation = plan.base / "generation_config.json"
    generation_config = json.loads(generation.read_text()) if generation.exists() else None
    return write_hf_dir(
        iter_merged_tensors(plan, out_dtype),
        out_dir,
        config_json,
        generation_config=generation_config,
        tokenizer_dir=plan.tokenizer_dir,
        max_shard_bytes=max_shard_bytes,
        inputs=inputs,
        overwrite=overwrite,
    )


def _stacked_lora(plan: MergePlan) -> tuple[LoraConfig | None, dict[tuple[str, ...], np.ndarray]]:
    """One zhjax LoRA config and its factors `[L, in, R]` / `[L, R, out]` holding every adapter's LoRA unmerged."""
    with_lora = [a for a in plan.adapters if a.lora]
    if not with_lora:
        return None, {}
    targets = tuple(dict.fromkeys(m for a in with_lora for m in a.target_modules))
    modules = tuple(dict.fromkeys(m for a in plan.adapters for m in a.modules))
    if len(with_lora) == 1:
        # one adapter is kept exactly (so it can be saved back or trained further); alpha carries rsLoRA's scale too
        a = with_lora[0]
        alpha = a.scaling * a.r if a.config.get("use_rslora") else a.lora_alpha
        lora = LoraConfig(r=a.r, lora_alpha=alpha, lora_dropout=a.lora_dropout, target_modules=targets,
                          modules_to_save=modules)
        scales = [1.0]
    else:
        rank = sum(a.r for a in with_lora)
        lora = LoraConfig(r=rank, lora_alpha=float(rank), lora_dropout=0.0, target_modules=targets,
                          modules_to_save=modules)
        scales = [a.scaling for a in with_lora]
    layers = plan.config.num_hidden_layers
    factors = {}
    for block, module in {(b, m) for a in with_lora for (_, b, m) in a.lora}:
        out_features, in_features = plan.reader.get(f"model.layers.0.{block}.{module}.weight").shape
        a_all = np.zeros((layers, in_features, lora.r), np.float32)
        b_all = np.zeros((layers, lora.r, out_features), np.float32)
        offset = 0
        for adapter, scale in zip(with_lora, scales, strict=True):
            for layer in range(layers):
                keys = adapter.lora.get((layer, block, module))
                if keys is not None:
                    a_all[layer, :, offset : offset + adapter.r] = adapter.tensor(keys[0]).astype(np.float32).T * scale
                    b_all[layer, offset : offset + adapter.r] = adapter.tensor(keys[1]).astype(np.float32).T
            offset += adapter.r
        factors[("layers", block, module, "lora_a")] = a_all
        factors[("layers", block, module, "lora_b")] = b_all
    return lora, factors


def load_with_adapters(base: str | Path, adapters: Sequence[str | Path], *, dtype: str = "float32") -> nnx.Module:
    """A zhjax `LlamaForCausalLM` computing base + adapters (in order) with the LoRA factors *not* merged.

    Same checks as `merge_adapters`. The model has the final vocabulary (embedding and head from the adapters);
    one adapter keeps its own LoRA config; several are stacked into one LoRA of the summed rank (see module doc).
    """
    from zhjax.convert.hf import load_pretrained
    from zhjax.model.llama import LlamaForCausalLM

    plan = plan_merge(base, adapters)
    base_model = load_pretrained(plan.base, dtype=dtype)
    lora, factors = _stacked_lora(plan)
    config = base_model.config.replace(vocab_size=plan.vocab_size, tie_word_embeddings=plan.tie_word_embeddings)
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: LlamaForCausalLM(config, lora, rngs=nnx.Rngs(0))))
    loaded = {tuple(str(k) for k in p): v for p, v in nnx.to_flat_state(nnx.state(base_model))}
    embed = plan.embed_from.module_weight("embed_tokens") if plan.embed_from else None
    head = plan.head_from.module_weight("lm_head") if plan.head_from else None
    flat = []
    for p, var in nnx.to_flat_state(abstract):
        path = tuple(str(k) for k in p)
        if path in factors:
            value = factors[path]
        elif path == ("embed_tokens", "embedding") and embed is not None:
            value = embed
        elif path == ("lm_head", "kernel"):
            value = head.T if head is not None else variable_value(loaded[path])
        else:
            value = variable_value(loaded[path])
        if tuple(value.shape) != tuple(var.shape):
            raise ConversionError(f"{plan.base}: {'/'.join(path)} has shape {tuple(value.shape)}, expected {tuple(var.shape)}")
        flat.append((p, var.replace(jnp.asarray(value, var.dtype))))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))

