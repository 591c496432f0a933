"""PEFT LoRA adapters <-> zhjax LoRA state, and reading adapter directories as PEFT and the seed wrote them.

PEFT names an adapter weight `base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight` (`[r, in]`) and
`...lora_B.weight` (`[out, r]`); zhjax stacks them over layers as `layers/self_attn/q_proj/lora_a` `[L, in, r]`
and `.../lora_b` `[L, r, out]`. `modules_to_save` weights (full `embed_tokens` / `lm_head`) are stored by PEFT
under `base_model.model.` with the plain HF names.

Two layers of API:

- Model verbs: `load_lora_weights` / `lora_state_dict` move LoRA factors between a zhjax model and a PEFT state
  dict; `save_peft_adapter` writes a directory `peft.PeftModel.from_pretrained` loads (with
  `ensure_weight_tying` on a tied model, so PEFT keeps one shared embedding/head matrix); `load_peft_adapter`
  puts an adapter directory into a zhjax model whose LoRA config and vocabulary already match.
- Adapter files: `read_peft_adapter` opens an adapter directory without a model: `adapter_config.json` plus
  `adapter_model.safetensors`, or `adapter_model.bin` (the layout of the seed's published Chinese-LLaMA/Alpaca
  LoRAs, read only through `torch.load(weights_only=True)`). It checks everything that needs no base model
  (r and lora_alpha present, every key understood, A/B pairs complete and of rank r, no feature zhjax does not
  compute such as DoRA) and reads tensors lazily, one at a time, so that `zhjax.convert.merge` can stream a 7B
  merge. `check_adapter_against_base` then checks it against the tensor shapes of a base checkpoint.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from zhjax.config import LORA_TARGETS, ModelConfig
from zhjax.convert.hf import ConversionError, open_tensor_file
from zhjax.model.lora import lora_delta
from zhjax.ownership import staged_dir
from zhjax.tokenizer.files import TOKENIZER_FILES

PEFT_PREFIX = "base_model.model."
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.\w+)?\.weight$")
# `modules_to_save` weights as `get_peft_model_state_dict` writes them (optionally still carrying the wrapper's names)
_MODULE_KEY = re.compile(r"^(?:base_model\.model\.)?(model\.embed_tokens|lm_head)(?:\.modules_to_save\.\w+)?\.weight$")
_MODULE_NAMES = {"model.embed_tokens": "embed_tokens", "lm_head": "lm_head"}


# --------------------------------------------------------------------------------------------- model verbs


def load_lora_weights(model: nnx.Module, state_dict: dict[str, np.ndarray], *, source: str = "adapter") -> None:
    """Set `model`'s LoRA factors from a PEFT state dict (as `peft.get_peft_model_state_dict` returns), in place.

    Every LoRA factor of the model must be present with the right shape; unknown LoRA keys are an error.
    """
    num_layers = model.config.num_hidden_layers
    _, lora_state, _ = nnx.split(model, nnx.LoRAParam, ...)
    targets = {tuple(str(k) for k in p): v for p, v in nnx.to_flat_state(lora_state)}
    collected: dict[tuple[str, ...], list] = {p: [None] * num_layers for p in targets}
    for key, value in state_dict.items():
        m = _LORA_KEY.match(key)
        if not m:
            continue
        layer, block, module, ab = int(m[1]), m[2], m[3], m[4]
        path = ("layers", block, module, "lora_a" if ab == "A" else "lora_b")
        if path not in collected or layer >= num_layers:
            raise ConversionError(f"{source}: LoRA weight {key!r} has no matching LoRA target in the model")
        collected[path][layer] = np.asarray(value, np.float32).T
    for path, var in targets.items():
        missing = [i for i, x in enumerate(collected[path]) if x is None]
        if missing:
            raise ConversionError(f"{source}: LoRA weight for {'/'.join(path)} of layer {missing[0]} is missing")
        stacked = np.stack(collected[path])
        if stacked.shape != tuple(var.shape):
            raise ConversionError(
                f"{source}: LoRA weights for {'/'.join(path)} have shape {stacked.shape}, the model expects {tuple(var.shape)}"
            )
        var[...] = jnp.asarray(stacked, var.dtype)


def lora_state_dict(model: nnx.Module) -> dict[str, np.ndarray]:
    """The model's LoRA factors as a PEFT adapter state dict (`[r, in]` / `[out, r]`, float32)."""
    _, lora_state, _ = nnx.split(model, nnx.LoRAParam, ...)
    out = {}
    for p, var in nnx.to_flat_state(lora_state):
        _, block, module, leaf = (str(k) for k in p)
        value = np.asarray(jax.device_get(var[...]), np.float32)
        ab = "A" if leaf == "lora_a" else "B"
        for i in range(value.shape[0]):
            out[f"{PEFT_PREFIX}model.layers.{i}.{block}.{module}.lora_{ab}.weight"] = np.ascontiguousarray(value[i].T)
    return out


def modules_to_save_state_dict(model: nnx.Module, modules: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Fully trained modules (`embed_tokens`, `lm_head`) as PEFT stores them, `[V, D]` float32.

    On a tied model the one shared matrix is written under both names, so PEFT's two copies start equal.
    """
    out = {}
    embed = np.asarray(jax.device_get(model.embed_tokens.embedding[...]), np.float32)
    if "embed_tokens" in modules:
        out[f"{PEFT_PREFIX}model.embed_tokens.weight"] = embed
    if "lm_head" in modules:
        head = embed if model.lm_head is None else np.asarray(jax.device_get(model.lm_head.kernel[...]), np.float32).T
        out[f"{PEFT_PREFIX}lm_head.weight"] = np.ascontiguousarray(head)
    return out


def save_peft_adapter(model: nnx.Module, out_dir: str | Path, *, base_model_name_or_path: str | None = None,
                      tokenizer_dir: str | Path | None = None, overwrite: bool = False) -> None:
    """Write `adapter_config.json` + `adapter_model.safetensors` (LoRA and `modules_to_save`) that peft loads.

    Written to a temporary folder first and renamed into place, so an interrupted save never leaves an empty
    or partial adapter (the seed's 443-byte adapter files). On a tied model the config asks PEFT for
    `ensure_weight_tying`, so that PEFT (>= 0.18) wraps one shared matrix instead of two copies that drift apart.
    `tokenizer_dir`'s tokenizer files are written beside the weights. The folder gets the umask's modes (as the HF
    export), and an existing `out_dir` zhjax did not write is refused unless `overwrite` (`zhjax.ownership`).
    """
    from safetensors.numpy import save_file

    lora = model.lora
    if lora is None:
        raise ValueError("the model has no LoRA adapters to save")
    out_dir = Path(out_dir)
    tensors = {**lora_state_dict(model), **modules_to_save_state_dict(model, lora.modules_to_save)}
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": lora.r,
        "lora_alpha": lora.lora_alpha,
        "lora_dropout": lora.lora_dropout,
        "target_modules": sorted(lora.target_modules),
        "modules_to_save": list(lora.modules_to_save) or None,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
    }
    if model.config.tie_word_embeddings and {"embed_tokens", "lm_head"} <= set(lora.modules_to_save):
        config["ensure_weight_tying"] = True
    with staged_dir(out_dir, inputs=[tokenizer_dir], overwrite=overwrite) as tmp:
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))
        if tokenizer_dir is not None:
            for name in TOKENIZER_FILES:
                if (Path(tokenizer_dir) / name).exists():
                    shutil.copy2(Path(tokenizer_dir) / name, tmp / name)


def load_peft_adapter(model: nnx.Module, adapter_dir: str | Path, *, source: str | None = None) -> None:
    """Load a PEFT adapter dir (safetensors, or the seed's `adapter_model.bin`) into `model`'s LoRA and modules.

    The model must already have the adapter's LoRA layout (rank, targets, same `lora_alpha / r`) and vocabulary;
    `zhjax.convert.merge.load_with_adapters` builds such a model from a base directory and adapter directories.
    """
    adapter = read_peft_adapter(adapter_dir)
    source = source or str(adapter.weights_file)
    if adapter.lora:
        if model.lora is None:
            raise ConversionError(
                f"{source}: the adapter has LoRA factors but the model has no LoRA; build it with "
                f"LoraConfig(r={adapter.r}, lora_alpha={adapter.lora_alpha}, target_modules={adapter.target_modules})"
            )
        if not math.isclose(model.lora.scaling, adapter.scaling, rel_tol=1e-6):
            raise ConversionError(
                f"{source}: the adapter scales LoRA by {adapter.scaling:g} (lora_alpha={adapter.lora_alpha:g}, "
                f"r={adapter.r}) but the model's LoRA config scales by {model.lora.scaling:g}; build the model with "
                f"LoraConfig(r={adapter.r}, lora_alpha={adapter.lora_alpha:g})"
            )
    load_lora_weights(model, {k: adapter.tensor(k) for pair in adapter.lora.values() for k in pair}, source=source)
    embed, head = adapter.module_weight("embed_tokens"), adapter.module_weight("lm_head")
    if model.lm_head is None and head is not None and embed is not None and not np.array_equal(head, embed):
        raise ConversionError(
            f"{source}: the adapter's lm_head differs from its embed_tokens but the model ties them "
            "(tie_word_embeddings); load it with zhjax.convert.merge.load_with_adapters, which unties the head"
        )
    for name, value, var in (
        ("embed_tokens", embed, model.embed_tokens.embedding),
        ("lm_head", head, None if model.lm_head is None else model.lm_head.kernel),
    ):
        if value is None or var is None:
            continue
        value = value if name == "embed_tokens" else value.T
        if tuple(value.shape) != tuple(var.shape):
            raise ConversionError(
                f"{source}: {name} has shape {tuple(value.shape)} but the model's is {tuple(var.shape)}: "
                "the adapter was trained with a different vocabulary size (resize the base first, or use "
                "zhjax.convert.merge.load_with_adapters)"
            )
        var[...] = jnp.asarray(value, var.dtype)


# --------------------------------------------------------------------------------------------- adapter files


@dataclass
class PeftAdapter:
    """A LoRA adapter directory, checked and indexed; tensors are read on demand.

    `lora` maps `(layer, block, module)` (e.g. `(3, "self_attn", "q_proj")`) to the keys of its A and B factors;
    `modules` maps `embed_tokens` / `lm_head` to the key of the full matrix the adapter replaces.
    """

    path: Path
    weights_file: Path
    config: dict
    r: int
    lora_alpha: float
    scaling: float
    lora_dropout: float
    lora: dict[tuple[int, str, str], tuple[str, str]]
    modules: dict[str, str]
    _tensors: Any = field(repr=False)

    @property
    def target_modules(self) -> tuple[str, ...]:
        """The LLaMA linear modules the adapter has factors for, in the usual order."""
        found = {module for _, _, module in self.lora}
        return tuple(m for m in LORA_TARGETS if m in found)

    def tensor(self, key: str) -> np.ndarray:
        """One tensor of the weights file as stored (any float dtype)."""
        return np.asarray(self._tensors.get(key))

    def module_weight(self, name: str) -> np.ndarray | None:
        """The full `[vocab, hidden]` matrix the adapter stores for `embed_tokens` or `lm_head`, if any."""
        key = self.modules.get(name)
        return None if key is None else self.tensor(key)

    @property
    def vocab_size(self) -> int | None:
        """Rows of the adapter's `embed_tokens` (or `lm_head`): the vocabulary it was trained with, if it has one."""
        key = self.modules.get("embed_tokens") or self.modules.get("lm_head")
        return None if key is None else int(self.shape(key)[0])

    def delta(self, layer: int, block: str, module: str) -> np.ndarray | None:
        """`(B @ A) * scaling` in float32, `[out, in]` as HF stores the weight, or None if not targeted."""
        keys = self.lora.get((layer, block, module))
        if keys is None:
            return None
        a, b = (self.tensor(k) for k in keys)
        return lora_delta(b, a, self.scaling)

    def shape(self, key: str) -> tuple[int, ...]:
        """Shape of one stored tensor (read from the header or a memory map, not the data)."""
        return tuple(self._tensors.get(key).shape)


def _positive(cfg: dict, key: str, file: Path) -> float:
    value = cfg.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConversionError(
            f"{file}: field {key!r} is missing or not a positive number (got {value!r}); a LoRA adapter must record "
            "its rank r and lora_alpha, which set the scale lora_alpha / r of every update"
        )
    return value


def _check_supported(cfg: dict, file: Path) -> None:
    peft_type = str(cfg.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise ConversionError(f"{file}: peft_type is {peft_type!r}; only LoRA adapters are supported")
    unsupported = {
        "use_dora": "DoRA",
        "fan_in_fan_out": "fan_in_fan_out (GPT-2 style Conv1D weights)",
        "rank_pattern": "per-module ranks (rank_pattern)",
        "alpha_pattern": "per-module alphas (alpha_pattern)",
        "lora_bias": "LoRA biases",
        "layer_replication": "layer replication",
    }
    for key, what in unsupported.items():
        if cfg.get(key):
            raise ConversionError(f"{file}: {key}={cfg[key]!r}: {what} is not supported by zhjax")
    if cfg.get("bias", "none") != "none":
        raise ConversionError(f"{file}: bias={cfg['bias']!r}: adapters that train biases are not supported")


def read_peft_adapter(path: str | Path) -> PeftAdapter:
    """Open and check a PEFT LoRA adapter directory; every error names the file and the field or tensor."""
    path = Path(path)
    if not path.is_dir():
        raise ConversionError(f"{path}: not a directory; an adapter is a directory with {ADAPTER_CONFIG}")
    cfg_file = path / ADAPTER_CONFIG
    if not cfg_file.exists():
        raise ConversionError(f"{cfg_file}: not found; a PEFT adapter directory needs it (r, lora_alpha, targets)")
    try:
        cfg = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConversionError(f"{cfg_file}: not valid JSON ({e})") from e
    _check_supported(cfg, cfg_file)
    r_value, alpha = _positive(cfg, "r", cfg_file), float(_positive(cfg, "lora_alpha", cfg_file))
    if r_value != int(r_value):
        raise ConversionError(f"{cfg_file}: r={r_value!r} is not an integer")
    r = int(r_value)
    scaling = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r

    files = [path / name for name in ADAPTER_WEIGHTS if (path / name).exists()]
    if not files:
        raise ConversionError(f"{path}: no {' or '.join(ADAPTER_WEIGHTS)} found")
    file = files[0]
    tensors = open_tensor_file(file)
    keys = list(tensors.keys())
    if not keys:
        raise ConversionError(
            f"{file}: holds no tensors, an empty adapter (the seed's 443-byte adapter_model.bin, saved before the "
            "weights were attached, was one); re-save it from the training run"
        )

    factors: dict[tuple[int, str, str], dict[str, str]] = {}
    modules: dict[str, str] = {}
    unknown = []
    for key in keys:
        if m := _LORA_KEY.match(key):
            factors.setdefault((int(m[1]), m[2], m[3]), {})[m[4]] = key
        elif m := _MODULE_KEY.match(key):
            modules[_MODULE_NAMES[m[1]]] = key
        else:
            unknown.append(key)
    if unknown:
        raise ConversionError(
            f"{file}: {len(unknown)} key(s) are neither LoRA factors of LLaMA's linear layers nor full "
            f"embed_tokens/lm_head weights, e.g. {unknown[:3]} (LoRA on embeddings or the LM head, trained biases "
            "and full model state dicts are not supported)"
        )
    def shape(key: str) -> tuple[int, ...]:
        return tuple(tensors.get(key).shape)

    lora = {}
    for (layer, block, module), pair in sorted(factors.items()):
        if module not in LORA_TARGETS:
            raise ConversionError(f"{file}: LoRA on {block}.{module} ({next(iter(pair.values()))}) is not a LLaMA linear layer")
        if set(pair) != {"A", "B"}:
            have = next(iter(pair.values()))
            raise ConversionError(f"{file}: {have} has no matching lora_{'B' if 'A' in pair else 'A'} factor")
        a_shape, b_shape = shape(pair["A"]), shape(pair["B"])
        if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != r or b_shape[1] != r:
            raise ConversionError(
                f"{file}: {pair['A']} has shape {a_shape} and {pair['B']} {b_shape}; with r={r} from {ADAPTER_CONFIG} "
                f"they must be [{r}, in] and [out, {r}]"
            )
        lora[(layer, block, module)] = (pair["A"], pair["B"])
    shapes = {name: shape(key) for name, key in modules.items()}
    if any(len(s) != 2 for s in shapes.values()) or len(set(shapes.values())) > 1:
        raise ConversionError(f"{file}: embed_tokens and lm_head must both be [vocab, hidden] matrices, got {shapes}")

    adapter = PeftAdapter(
        path=path,
        weights_file=file,
        config=cfg,
        r=r,
        lora_alpha=alpha,
        scaling=scaling,
        lora_dropout=float(cfg.get("lora_dropout") or 0.0),
        lora=lora,
        modules=modules,
        _tensors=tensors,
    )
    # entries may be suffixes ("q_proj") or full module names ("model.embed_tokens"): compare the last component
    listed = cfg.get("target_modules")
    if isinstance(listed, list):
        missing = sorted({m.split(".")[-1] for m in listed} - set(adapter.target_modules))
        if missing:
            raise ConversionError(f"{cfg_file}: target_modules lists {missing} but {file.name} has no LoRA factors for them")
    missing = sorted({m.split(".")[-1] for m in cfg.get("modules_to_save") or ()} - set(modules))
    if missing:
        raise ConversionError(f"{cfg_file}: modules_to_save lists {missing} but {file.name} does not contain them")
    return adapter


def check_adapter_against_base(
    adapter: PeftAdapter, config: ModelConfig, shape_of: Callable[[str], tuple[int, ...] | None], base: str
) -> None:
    """Check that `adapter` fits a base model: its layers and modules exist, LoRA shapes fit, hidden size agrees.

    `shape_of(hf_name)` gives the shape of a base tensor (None if absent); `base` names the base in messages.
    """
    file = adapter.weights_file
    for (layer, block, module), (ka, kb) in adapter.lora.items():
        if layer >= config.num_hidden_layers:
            raise ConversionError(f"{file}: {ka} is for layer {layer} but the base {base} has {config.num_hidden_layers} layers")
        name = f"model.layers.{layer}.{block}.{module}.weight"
        base_shape = shape_of(name)
        if base_shape is None:
            raise ConversionError(f"{file}: {ka} targets {block}.{module}, which the base {base} does not have ({name})")
        out_features, in_features = base_shape
        a_shape, b_shape = adapter.shape(ka), adapter.shape(kb)
        if a_shape[1] != in_features or b_shape[0] != out_features:
            raise ConversionError(
                f"{file}: {ka} {a_shape} and {kb} {b_shape} do not fit the base's {name} {base_shape} (expected "
                f"[r, {in_features}] and [{out_features}, r]): the adapter was trained on another model"
            )
    for key in adapter.modules.values():
        hidden = adapter.shape(key)[1]
        if hidden != config.hidden_size:
            raise ConversionError(
                f"{file}: {key} has hidden size {hidden} but the base {base} has hidden_size {config.hidden_size}"
            )
