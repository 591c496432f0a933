"""Grow a whole model to an extended tokenizer: an HF checkpoint on disk (streamed) or a zhjax model in memory.

`zhjax.tokenizer.resize` grows one `[V, D]` matrix; this module applies it to a model:

- `resize_hf_checkpoint(base_dir, new_tokenizer_dir, out_dir, init)` reads the base HF dir tensor by tensor
  and writes a new HF dir in which `embed_tokens` and, when the model is untied, `lm_head` have the new
  tokenizer's vocab size. Every other tensor passes through unchanged, `config.json` changes only its
  `vocab_size`, and the new tokenizer's files are copied in. At most one shard is held in memory, so a 7B
  model resizes on a laptop.
- `resize_model(model, new_vocab_size, init, source_ids, seed)` does the same to a zhjax model in memory and
  returns a new model (its config's `vocab_size` updated); the input model is left as it was.

In both, the old rows are copied bit for bit, so the logits of the old tokens are unchanged by a resize. With
`normal`, `mean` and `subword` a tied model stays tied: its one matrix is grown once and serves as embedding and
head. With `distill` (`zhjax.tokenizer.transfer`: new rows fitted to the frozen base model on sample text) the
grown model is always untied: a tied base gets its own `lm_head` (old rows copied from the embedding), because a
new token's input and output rows want different vectors. An untied head is grown with
the same init rule, applied to the head's own rows in HF's `[V, D]` layout (for `subword`, the mean of the
*head* rows of the base pieces), with its own random draws (`seed + 1`) for `normal` and `mean`.

Before anything is written, `check_extends` makes sure the new tokenizer extends the base: every id the base
tokenizer has names the same token in the new one. A resize keeps row `i` for id `i`, so any other tokenizer
would silently pair old rows with the wrong tokens.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from zhjax.convert.hf import CheckpointReader, hf_tensor_names, read_config, write_hf_dir
from zhjax.ownership import check_output_dir
from zhjax.tokenizer.guards import load_tokenizer, tokenizer_vocab_size
from zhjax.tokenizer.resize import INITS, resize_embedding, subword_source_ids
from zhjax.tokenizer.transfer import TransferConfig, transfer_rows

__all__ = ["ALL_INITS", "ResizeResult", "check_extends", "read_sample_lines", "resize_hf_checkpoint", "resize_model"]

ALL_INITS = (*INITS, "distill")

EMBED_PATH = ("embed_tokens", "embedding")
HEAD_PATH = ("lm_head", "kernel")


@dataclass(frozen=True)
class ResizeResult:
    """What `resize_hf_checkpoint` wrote: sizes, init and which tensors were grown."""

    out_dir: Path
    old_vocab_size: int
    new_vocab_size: int
    init: str
    tied: bool  # whether the written model ties embed_tokens and lm_head
    resized: tuple[str, ...]
    transfer: Any = None  # the `TransferResult` of a `distill` resize


def _vocab(tokenizer: Any) -> dict[str, int]:
    """token -> id of an HF (tokenizers-backed) tokenizer or a `tokenizers.Tokenizer`, added tokens included."""
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    if hasattr(backend, "get_vocab"):
        try:
            return dict(backend.get_vocab(with_added_tokens=True))
        except TypeError:  # an HF tokenizer without a tokenizers backend
            return dict(backend.get_vocab())
    raise TypeError(f"cannot read the vocabulary of a {type(tokenizer).__name__}")


def check_extends(base_tokenizer: Any, new_tokenizer: Any, model_vocab_size: int, *, where: str = "") -> None:
    """Raise ValueError unless `new_tokenizer` extends `base_tokenizer` for a model of `model_vocab_size` rows.

    Extends means: every base token keeps its id in the new tokenizer, the new one is not smaller than the
    model, and its new ids start at `model_vocab_size` (when the model has padding rows past the base
    tokenizer's ids, a new token may not take one of them). `where` names the tokenizers in the message.
    """
    prefix = f"{where}: " if where else ""
    base, new = _vocab(base_tokenizer), _vocab(new_tokenizer)
    base_size, new_size = tokenizer_vocab_size(base_tokenizer), tokenizer_vocab_size(new_tokenizer)
    if base_size > model_vocab_size:
        raise ValueError(
            f"{prefix}the base tokenizer has {base_size} tokens but the model only {model_vocab_size} rows: "
            "it is not the tokenizer this model was trained with (pass the model's own tokenizer as the base)"
        )
    if new_size < model_vocab_size:
        raise ValueError(
            f"{prefix}the new tokenizer has {new_size} tokens, fewer than the model's {model_vocab_size} rows; "
            "a resize only grows a vocabulary. Is it the base tokenizer rather than the extended one?"
        )
    moved = [(token, i, new.get(token)) for token, i in sorted(base.items(), key=lambda kv: kv[1])
             if new.get(token) != i]
    if moved:
        token, old_id, new_id = moved[0]
        now = "is missing" if new_id is None else f"has id {new_id}"
        raise ValueError(
            f"{prefix}the new tokenizer does not extend the base tokenizer: {len(moved)} of {len(base)} base tokens "
            f"changed id, e.g. {token!r} has id {old_id} in the base but {now} in the new one. A resize keeps "
            "row i for id i, so the new tokenizer must keep every base id: build it from this base with "
            "tools/merge_tokenizers.py."
        )
    squatters = sorted(i for token, i in new.items() if base_size <= i < model_vocab_size and token not in base)
    if squatters:
        raise ValueError(
            f"{prefix}the model has {model_vocab_size} rows but its base tokenizer only {base_size} ids, and the "
            f"new tokenizer puts new tokens on padding rows {squatters[0]}..{squatters[-1]}; new tokens must "
            f"take ids from {model_vocab_size} on"
        )


def _source_ids(init: str, base_tokenizer: Any, new_tokenizer: Any, old_vocab: int) -> list[list[int]] | None:
    needs = init in ("subword", "distill")
    return subword_source_ids(base_tokenizer, new_tokenizer, old_vocab) if needs else None


def read_sample_lines(files: Sequence[str | Path]) -> list[str]:
    """The non-empty lines of the sample text files of a `distill` resize (UTF-8); a clear error when there are
    none or a file is missing."""
    if not files:
        raise ValueError("init='distill' fits the new rows to the base model on sample text: pass sample files "
                         "(training text, one paragraph per line; tools/resize_model.py --sample-file)")
    lines = []
    for f in files:
        path = Path(f)
        if not path.is_file():
            raise FileNotFoundError(f"sample file {path}: not found")
        try:
            lines += [x.strip() for x in path.read_text(encoding="utf-8-sig").splitlines() if x.strip()]
        except UnicodeDecodeError as e:
            raise ValueError(f"sample file {path}: not UTF-8 text ({e.reason} at byte {e.start})") from e
    if not lines:
        raise ValueError(f"sample files {', '.join(map(str, files))}: no non-empty line; the distill init needs "
                         "training text to fit the new rows on")
    return lines


def resize_hf_checkpoint(
    base_dir: str | Path,
    new_tokenizer_dir: str | Path,
    out_dir: str | Path,
    init: str = "subword",
    seed: int = 0,
    *,
    base_tokenizer_dir: str | Path | None = None,
    max_shard_bytes: int = 2 * 1024**3,
    sample_files: Sequence[str | Path] | None = None,
    transfer: TransferConfig | None = None,
    overwrite: bool = False,
) -> ResizeResult:
    """Write `out_dir`: the HF model of `base_dir` grown to the tokenizer of `new_tokenizer_dir`.

    `init` is "normal", "mean" or "subword" (see `zhjax.tokenizer.resize`) or "distill" (new rows fitted to the
    base model on the text of `sample_files`, with `transfer`'s sizes; the output is untied, see
    `zhjax.tokenizer.transfer`); `seed` makes every init reproducible. The base tokenizer (for the extension check and the subword pieces) is read from
    `base_tokenizer_dir`, by default `base_dir`. Tensors stream from the base's safetensors (or `.bin`) files
    into sharded safetensors; `out_dir` appears only when complete. An existing `out_dir` that zhjax did not
    write is refused unless `overwrite` (`zhjax.ownership`).

    Raises:
        ValueError: unknown init, `out_dir` equal to `base_dir`, a new tokenizer that does not extend the
            base (see `check_extends`), or `distill` without sample text.
        ConversionError: an unreadable checkpoint, or an untied model without its `lm_head` tensor.
    """
    if init not in ALL_INITS:
        raise ValueError(f"init={init!r}: expected one of {ALL_INITS}")
    base_dir = Path(base_dir)
    if Path(out_dir).resolve() == base_dir.resolve():
        raise ValueError(f"out_dir {out_dir} is the base dir: the base is read while the output is written")
    check_output_dir(out_dir, inputs=[base_dir, base_tokenizer_dir], overwrite=overwrite)  # before any read
    config, raw = read_config(base_dir)
    old_vocab = config.vocab_size
    base_tok = load_tokenizer(base_tokenizer_dir or base_dir)
    new_tok = load_tokenizer(new_tokenizer_dir)
    check_extends(
        base_tok, new_tok, old_vocab,
        where=f"base {base_tokenizer_dir or base_dir}, new tokenizer {new_tokenizer_dir}",
    )
    new_vocab = tokenizer_vocab_size(new_tok)
    lines = read_sample_lines(sample_files or ()) if init == "distill" else None  # refuse before any work
    sources = _source_ids(init, base_tok, new_tok, old_vocab)

    reader = CheckpointReader(base_dir)
    layers = config.num_hidden_layers
    embed_name = hf_tensor_names(EMBED_PATH, layers)[0]
    head_name = hf_tensor_names(HEAD_PATH, layers)[0]
    # A tied checkpoint usually omits lm_head; if it holds one, it is grown with the embedding's draws.
    seeds = {embed_name: seed, head_name: seed if config.tie_word_embeddings else seed + 1}
    to_resize = [embed_name] + ([head_name] if head_name in reader.where or not config.tie_word_embeddings else [])
    for name in to_resize:
        reader.get(name, (old_vocab, config.hidden_size))  # fail before writing anything

    fitted = None
    if init == "distill":
        from zhjax.convert.hf import load_params

        model = load_params(base_dir, config.replace(dtype="float32", param_dtype="float32"), None)
        fitted = transfer_rows(model, base_tok, new_tok, sources, lines, transfer or TransferConfig(seed=seed))
        del model
    tied_out = config.tie_word_embeddings and fitted is None

    def grown(name: str, arr: np.ndarray) -> np.ndarray:
        if fitted is None:
            return resize_embedding(np.asarray(arr), new_vocab, init, source_ids=sources, rng_seed=seeds[name])
        old = np.array(arr)
        if name == embed_name:
            return np.concatenate([old, fitted.embed_rows.astype(old.dtype)])
        old[fitted.head_old_ids] = fitted.head_old_rows.astype(old.dtype)  # refitted old head rows (output_rows="seen")
        return np.concatenate([old, fitted.head_rows.astype(old.dtype)])

    def tensors() -> Iterator[tuple[str, np.ndarray]]:
        for name in reader.where:
            arr = reader.get(name)
            yield name, grown(name, arr) if name in to_resize else arr
        if not tied_out and head_name not in reader.where:  # untie: the head starts as a copy of the embedding
            yield head_name, grown(head_name, reader.get(embed_name))

    config_json = {**raw, "vocab_size": new_vocab, "tie_word_embeddings": tied_out}
    generation = base_dir / "generation_config.json"
    written = write_hf_dir(
        tensors(),
        out_dir,
        config_json,
        generation_config=json.loads(generation.read_text()) if generation.is_file() else None,
        tokenizer_dir=new_tokenizer_dir,
        max_shard_bytes=max_shard_bytes,
        inputs=[base_dir, base_tokenizer_dir],
        overwrite=overwrite,
    )
    resized = tuple(to_resize) + (() if tied_out or head_name in to_resize else (head_name,))
    return ResizeResult(written, old_vocab, new_vocab, init, tied_out, resized, fitted)


def _grow(value: jax.Array, new_vocab: int, init: str, sources, seed: int, *, transposed: bool) -> jax.Array:
    """Grow one parameter on the host and put it back with its old sharding (`transposed`: `[D, V]` layout)."""
    host = np.asarray(jax.device_get(value))
    # contiguous [V, D] rows: numpy's summation order (so the mean init's bits) follows the memory layout
    rows = np.ascontiguousarray(host.T if transposed else host)
    grown = resize_embedding(rows, new_vocab, init, source_ids=sources, rng_seed=seed)
    grown = np.ascontiguousarray(grown.T if transposed else grown)
    return jax.device_put(grown, value.sharding)


def resize_model(
    model: nnx.Module,
    new_vocab_size: int,
    init: str = "subword",
    source_ids: Sequence[Sequence[int]] | None = None,
    seed: int = 0,
) -> nnx.Module:
    """A copy of zhjax `model` with `embed_tokens` (and an untied `lm_head`) grown to `new_vocab_size` rows.

    `source_ids` are required for "subword" (see `zhjax.tokenizer.resize.subword_source_ids`); `seed` drives
    "normal" and "mean" (the untied head uses `seed + 1`). The copy's config has the new `vocab_size`; every
    other variable (LoRA adapters included) is shared with `model`, which is not modified.
    """
    from zhjax.model.llama import LlamaForCausalLM

    config = model.config
    if init not in INITS:
        raise ValueError(f"init={init!r}: expected one of {INITS}")
    new_config = config.replace(vocab_size=new_vocab_size)
    abstract = nnx.eval_shape(lambda: LlamaForCausalLM(new_config, model.lora, rngs=nnx.Rngs(0)))
    graphdef, _ = nnx.split(abstract)
    _, state = nnx.split(model)
    flat = []
    for path, var in nnx.to_flat_state(state):
        key = tuple(str(k) for k in path)
        if key in (EMBED_PATH, HEAD_PATH):
            value = var.get_value() if hasattr(var, "get_value") else var.value
            offset = 0 if key == EMBED_PATH else 1
            var = var.replace(
                _grow(value, new_vocab_size, init, source_ids, seed + offset, transposed=key == HEAD_PATH)
            )
        flat.append((path, var))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))
