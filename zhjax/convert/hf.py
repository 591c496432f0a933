"""Hugging Face <-> zhjax: config.json, tensor names and layouts, safetensors streaming.

This is the only module that knows HF names. The mapping is mechanical:

    model.embed_tokens.weight [V, D]              <-> embed_tokens/embedding [V, D]
    model.layers.{i}.<module>.weight [out, in]    <-> layers/<module>/kernel [L, in, out]   (transposed, stacked)
    model.layers.{i}.<module>.bias                <-> layers/<module>/bias [L, out]
    model.layers.{i}.<norm>.weight                <-> layers/<norm>/scale [L, D]
    model.norm.weight                             <-> norm/scale
    lm_head.weight [V, D]                         <-> lm_head/kernel [D, V]   (absent when embeddings are tied)

HF's q/k row order (rotate-half RoPE) is zhjax's, so nothing is permuted. Import reads one tensor at a time
from memory-mapped safetensors (or a `.bin` through `torch.load(weights_only=True)`) straight into each
parameter's (possibly sharded) device buffer; export writes shards one tensor at a time, into a temporary
directory that replaces the destination only when complete.
"""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from zhjax._extras import require
from zhjax.config import LoraConfig, ModelConfig, RopeScaling
from zhjax.model.lora import fold_lora
from zhjax.model.params import variable_value
from zhjax.ownership import staged_dir
from zhjax.tokenizer.files import TOKENIZER_FILES

SUPPORTED_MODEL_TYPES = ("llama", "mistral")
_ST_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
_ST_NAMES = {np.dtype(v): k for k, v in _ST_DTYPES.items()}


class ConversionError(ValueError):
    """A checkpoint that cannot be converted; the message names the file and the tensor or field."""


# --------------------------------------------------------------------------------------------- config.json


def config_from_hf(hf: dict, *, source: str = "config.json") -> ModelConfig:
    """A `ModelConfig` from an HF config dict, accepting legacy `rope_theta`/`rope_scaling` and `rope_parameters`."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConversionError(
            f"{source}: model_type {model_type!r} is not supported; expected one of {SUPPORTED_MODEL_TYPES}"
        )
    sliding = hf.get("sliding_window")
    if model_type == "mistral" and sliding is not None and sliding < hf.get("max_position_embeddings", 0):
        raise ConversionError(
            f"{source}: sliding_window={sliding} is not supported (zhjax attends over the full context); "
            "set it to null to use the model with full attention"
        )
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        if not isinstance(hf.get(key), int):
            raise ConversionError(f"{source}: field {key!r} is missing or not an integer (got {hf.get(key)!r})")

    params = hf.get("rope_parameters")
    if isinstance(params, dict) and params:
        theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
        scaling = dict(params)
    else:
        theta = hf.get("rope_theta", 10000.0)  # LLaMA-1/2 checkpoints may omit it: 10000 then
        scaling = dict(hf.get("rope_scaling") or {})
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    field = "rope_parameters" if params else "rope_scaling"
    if rope_type not in ("default", "linear", "dynamic", "llama3"):
        raise ConversionError(
            f"{source}: {field}.rope_type {rope_type!r} is not supported; expected default, linear, dynamic or llama3"
        )
    if rope_type != "default" and "factor" not in scaling:
        raise ConversionError(f"{source}: {field} of type {rope_type!r} needs a 'factor'")
    rope = RopeScaling(
        rope_type=rope_type,
        factor=float(scaling.get("factor", 1.0)),
        low_freq_factor=float(scaling.get("low_freq_factor", 1.0)),
        high_freq_factor=float(scaling.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=scaling.get("original_max_position_embeddings"),
    )
    if rope_type == "llama3" and rope.original_max_position_embeddings is None:
        raise ConversionError(f"{source}: {field} of type 'llama3' needs 'original_max_position_embeddings'")
    eos = hf.get("eos_token_id", 2)
    return ModelConfig(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_hidden_layers=hf["num_hidden_layers"],
        num_attention_heads=hf["num_attention_heads"],
        num_key_value_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        head_dim=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=float(theta),
        rope_scaling=rope,
        max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attention_bias=bool(hf.get("attention_bias", False)),
        mlp_bias=bool(hf.get("mlp_bias", False)),
        initializer_range=float(hf.get("initializer_range", 0.02)),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
        pad_token_id=hf.get("pad_token_id"),
    )


def config_to_hf(config: ModelConfig, *, dtype: str = "float32", legacy_rope: bool = False) -> dict:
    """An HF `config.json` dict for `LlamaForCausalLM`.

    By default rope settings go into transformers 5's `rope_parameters`; `legacy_rope=True` writes the
    `rope_theta` + `rope_scaling` keys that LLaMA-1/2 era readers expect.
    """
    c = config
    rs = c.rope_scaling
    rope: dict = {"rope_type": rs.rope_type}
    if rs.rope_type != "default":
        rope["factor"] = rs.factor
    if rs.rope_type == "llama3":
        rope.update(
            low_freq_factor=rs.low_freq_factor,
            high_freq_factor=rs.high_freq_factor,
            original_max_position_embeddings=rs.original_max_position_embeddings,
        )
    hf = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads,
        "head_dim": c.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": c.rms_norm_eps,
        "max_position_embeddings": c.max_position_embeddings,
        "tie_word_embeddings": c.tie_word_embeddings,
        "attention_bias": c.attention_bias,
        "mlp_bias": c.mlp_bias,
        "initializer_range": c.initializer_range,
        "bos_token_id": c.bos_token_id,
        "eos_token_id": list(c.eos_token_id) if isinstance(c.eos_token_id, tuple) else c.eos_token_id,
        "pad_token_id": c.pad_token_id,
        "dtype": dtype,
    }
    if legacy_rope:
        hf["rope_theta"] = c.rope_theta
        hf["rope_scaling"] = None if rs.rope_type == "default" else {**rope, "type": rs.rope_type}
    else:
        hf["rope_parameters"] = {**rope, "rope_theta": c.rope_theta}
    return hf


def read_config(path: str | Path) -> tuple[ModelConfig, dict]:
    """Read `path/config.json`: the zhjax config and the raw dict."""
    file = Path(path) / "config.json"
    if not file.exists():
        raise ConversionError(f"{file}: not found; an HF model directory needs a config.json")
    try:
        raw = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ConversionError(f"{file}: not valid JSON ({e})") from e
    return config_from_hf(raw, source=str(file)), raw


# --------------------------------------------------------------------------------------------- names


def _hf_base_name(path: tuple[str, ...]) -> tuple[str, bool]:
    """HF name template (with `{i}` for the layer) of a zhjax parameter path, and whether it is transposed."""
    *modules, leaf = path
    suffix = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}[leaf]
    if modules[0] == "layers":
        name = "model.layers.{i}." + ".".join(modules[1:]) + "." + suffix
    elif modules[0] in ("embed_tokens", "norm"):
        name = f"model.{modules[0]}.{suffix}"
    else:
        name = f"{'.'.join(modules)}.{suffix}"
    return name, leaf == "kernel"


def hf_tensor_names(path: tuple[str, ...], num_layers: int) -> list[str]:
    """The HF tensor names that make up one zhjax parameter (one per layer for stacked ones)."""
    template, _ = _hf_base_name(path)
    if "{i}" in template:
        return [template.format(i=i) for i in range(num_layers)]
    return [template]


# --------------------------------------------------------------------------------------------- reading


class _SafetensorsFile:
    """Memory-mapped safetensors reader with every dtype (numpy's safetensors backend lacks bfloat16)."""

    def __init__(self, path: Path):
        self.path = path
        with open(path, "rb") as f:
            try:
                (n,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(n))
            except (struct.error, json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ConversionError(f"{path}: not a safetensors file ({e})") from e
        header.pop("__metadata__", None)
        self.header = header
        self.offset = 8 + n
        self._mmap = None

    def keys(self):
        return self.header.keys()

    def get(self, name: str) -> np.ndarray:
        if self._mmap is None:
            self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
        info = self.header[name]
        if info["dtype"] not in _ST_DTYPES:
            raise ConversionError(f"{self.path}: tensor {name!r} has unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        raw = self._mmap[self.offset + start : self.offset + end]
        return raw.view(_ST_DTYPES[info["dtype"]]).reshape(info["shape"])


class _TorchBinFile:
    """A `.bin` state dict (`pytorch_model*.bin`, the seed's `adapter_model.bin`), read only through
    `torch.load(weights_only=True)` (never unpickling code), memory-mapped when its format allows."""

    def __init__(self, path: Path):
        require("torch", extra="torch", why=f"{path}: reading a .bin state dict")
        import torch

        try:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:  # the legacy (pre-zipfile) format cannot be memory-mapped
                if "mmap" not in str(e):
                    raise
                state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ConversionError(f"{path}: not a plain PyTorch state dict loadable with weights_only=True ({e})") from e
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ConversionError(f"{path}: expected a plain state dict of name -> tensor, got {type(state).__name__}")
        self.path = path
        self.state = state

    def keys(self):
        return self.state.keys()

    def get(self, name: str) -> np.ndarray:
        import torch

        t = self.state[name]
        if t.dtype == torch.bfloat16:
            return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return t.numpy()


def open_tensor_file(path: Path) -> _SafetensorsFile | _TorchBinFile:
    """The reader of one weights file: memory-mapped safetensors, or a `.bin` state dict through torch."""
    return _SafetensorsFile(path) if path.suffix == ".safetensors" else _TorchBinFile(path)


class CheckpointReader:
    """All tensors of an HF model directory (single or sharded safetensors, or `.bin`), by name."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            files = sorted(self.path.glob("pytorch_model*.bin"))
        if not files:
            raise ConversionError(f"{self.path}: no *.safetensors or pytorch_model*.bin weights found")
        self.files = [open_tensor_file(f) for f in files]
        self.where = {k: f for f in self.files for k in f.keys()}

    def get(self, name: str, expected_shape: tuple[int, ...] | None = None) -> np.ndarray:
        f = self.where.get(name)
        if f is None:
            raise ConversionError(f"{self.path}: tensor {name!r} is missing from the checkpoint")
        arr = f.get(name)
        if expected_shape is not None and tuple(arr.shape) != tuple(expected_shape):
            raise ConversionError(
                f"{f.path}: tensor {name!r} has shape {tuple(arr.shape)}, expected {tuple(expected_shape)} "
                "from config.json"
            )
        return arr


def _param_loader(reader: CheckpointReader, path: tuple[str, ...], shape, dtype, num_layers: int) -> Callable:
    """A `make_array_from_callback` callback that reads the requested shard of one zhjax parameter."""
    template, transpose = _hf_base_name(path)
    stacked = "{i}" in template
    layer_shape = tuple(shape[1:]) if stacked else tuple(shape)
    hf_shape = layer_shape[::-1] if transpose else layer_shape

    def read(name: str) -> np.ndarray:
        arr = reader.get(name, hf_shape)
        return arr.T if transpose else arr

    def callback(index: tuple[slice, ...]) -> np.ndarray:
        if not stacked:
            return np.asarray(read(template)[index], dtype=dtype)
        layers = range(num_layers)[index[0]]
        shard_shape = np.broadcast_to(np.zeros((), np.int8), (len(layers), *layer_shape))[(slice(None), *index[1:])].shape
        out = np.empty(shard_shape, dtype)
        for j, i in enumerate(layers):
            out[j] = read(template.format(i=i))[index[1:]]
        return out

    return callback


def load_params(
    path: str | Path,
    config: ModelConfig,
    lora: LoraConfig | None = None,
    *,
    shardings: Callable[[tuple[str, ...], jax.ShapeDtypeStruct], jax.sharding.Sharding] | None = None,
    seed: int = 0,
) -> nnx.Module:
    """Build a `LlamaForCausalLM` whose base weights come from the HF checkpoint at `path`.

    Each parameter is read tensor by tensor into its device buffers (sharded when `shardings` maps a parameter
    path to a sharding), so the host never holds the model twice. LoRA adapters, if any, get PEFT's fresh init.
    """
    from zhjax.model.llama import LlamaForCausalLM

    reader = CheckpointReader(path)
    abstract = nnx.eval_shape(lambda: LlamaForCausalLM(config, lora, rngs=nnx.Rngs(seed)))
    graphdef, lora_abs, base_abs = nnx.split(abstract, nnx.LoRAParam, ...)
    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])

    flat = []
    for p, var in nnx.to_flat_state(base_abs):
        sds = variable_value(var)
        sharding = shardings(p, sds) if shardings else default
        cb = _param_loader(reader, tuple(str(k) for k in p), sds.shape, np.dtype(sds.dtype), config.num_hidden_layers)
        flat.append((p, var.replace(jax.make_array_from_callback(sds.shape, sharding, cb))))
    base = nnx.from_flat_state(flat)

    if lora is not None:
        # Initialise only the adapters: the base initialisers are dead code under jit and are removed by XLA.
        @jax.jit
        def init_lora():
            return nnx.split(LlamaForCausalLM(config, lora, rngs=nnx.Rngs(seed)), nnx.LoRAParam, ...)[1]

        lora_state = init_lora()
        return nnx.merge(graphdef, lora_state, base)
    return nnx.merge(graphdef, lora_abs, base)


# --------------------------------------------------------------------------------------------- writing


def iter_hf_tensors(model: nnx.Module, dtype=None) -> Iterator[tuple[str, np.ndarray]]:
    """`(hf_name, array)` for every base tensor of `model`, one at a time.

    LoRA adapters are folded in on the fly (`W + A B alpha/r` in float32, then cast), one layer at a time, so
    exporting never needs a merged copy of the model.
    """
    _, lora_state, base = nnx.split(model, nnx.LoRAParam, ...)
    lora = {tuple(str(k) for k in p): variable_value(v) for p, v in nnx.to_flat_state(lora_state)}
    scaling = model.lora.scaling if model.lora is not None else 0.0
    num_layers = model.config.num_hidden_layers
    for p, var in nnx.to_flat_state(base):
        path = tuple(str(k) for k in p)
        template, transpose = _hf_base_name(path)
        value = variable_value(var)
        a, b = lora.get((*path[:-1], "lora_a")), lora.get((*path[:-1], "lora_b"))
        stacked = "{i}" in template
        for i, name in enumerate(hf_tensor_names(path, num_layers)):
            arr = np.asarray(jax.device_get(value[i] if stacked else value))
            if path[-1] == "kernel" and a is not None:
                a_i, b_i = (np.asarray(jax.device_get(x[i] if stacked else x)) for x in (a, b))
                arr = fold_lora(arr, a_i, b_i, scaling)
            arr = arr.T if transpose else arr
            if dtype is not None:
                arr = arr.astype(dtype)
            yield name, np.ascontiguousarray(arr)


def _write_safetensors(path: Path, tensors: dict[str, np.ndarray]) -> None:
    header, offset = {}, 0
    for name, arr in tensors.items():
        header[name] = {"dtype": _ST_NAMES[arr.dtype], "shape": list(arr.shape), "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
    header["__metadata__"] = {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for arr in tensors.values():
            f.write(arr.tobytes())


def write_hf_dir(
    tensors: Iterator[tuple[str, np.ndarray]],
    out_dir: str | Path,
    config_json: dict,
    *,
    generation_config: dict | None = None,
    tokenizer_dir: str | Path | None = None,
    max_shard_bytes: int = 2 * 1024**3,
    inputs: Sequence[str | Path | None] = (),
    overwrite: bool = False,
) -> Path:
    """Write an HF model directory: sharded safetensors (+ index), config.json, generation_config.json, tokenizer.

    Tensors are streamed: at most one shard is in memory. Everything is written to a temporary sibling folder
    that replaces `out_dir` only when complete, so a crash never leaves a half-written model behind. `out_dir` may
    not be one of `inputs` (nor inside or around one), and an existing `out_dir` that zhjax did not write is
    refused unless `overwrite` (`zhjax.ownership`).
    """
    out_dir = Path(out_dir)
    with staged_dir(out_dir, inputs=[*inputs, tokenizer_dir], overwrite=overwrite) as tmp:
        shards: list[list[str]] = []
        buffer: dict[str, np.ndarray] = {}
        size, total = 0, 0
        shard_files: list[Path] = []

        def flush():
            nonlocal buffer, size
            if buffer:
                f = tmp / f"shard-{len(shard_files):05d}.safetensors"
                _write_safetensors(f, buffer)
                shard_files.append(f)
                shards.append(list(buffer))
                buffer, size = {}, 0

        for name, arr in tensors:
            if buffer and size + arr.nbytes > max_shard_bytes:
                flush()
            buffer[name] = arr
            size += arr.nbytes
            total += arr.nbytes
        flush()
        n = len(shard_files)
        if n == 1:
            shard_files[0].rename(tmp / "model.safetensors")
        else:
            weight_map = {}
            for k, (f, names) in enumerate(zip(shard_files, shards, strict=True)):
                final = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
                f.rename(tmp / final)
                weight_map.update({name: final for name in names})
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        (tmp / "config.json").write_text(json.dumps(config_json, indent=2))
        gen = {"bos_token_id": config_json.get("bos_token_id"), "eos_token_id": config_json.get("eos_token_id")}
        if config_json.get("pad_token_id") is not None:
            gen["pad_token_id"] = config_json["pad_token_id"]
        gen.update(generation_config or {})
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2))
        if tokenizer_dir is not None:
            for name in TOKENIZER_FILES:
                if (Path(tokenizer_dir) / name).exists():
                    shutil.copy2(Path(tokenizer_dir) / name, tmp / name)
    return out_dir


def save_hf(
    model: nnx.Module,
    out_dir: str | Path,
    *,
    dtype: str | None = None,
    tokenizer_dir: str | Path | None = None,
    legacy_rope: bool = False,
    max_shard_bytes: int = 2 * 1024**3,
    overwrite: bool = False,
) -> Path:
    """Export a zhjax model (LoRA merged on the fly) as an HF `LlamaForCausalLM` dir; `dtype` defaults to the params'.

    An existing `out_dir` that zhjax did not write is refused unless `overwrite` (`zhjax.ownership`).
    """
    out_dtype = np.dtype(jnp.dtype(dtype or model.config.param_dtype))
    config_json = config_to_hf(model.config, dtype=str(jnp.dtype(out_dtype)), legacy_rope=legacy_rope)
    return write_hf_dir(
        iter_hf_tensors(model, out_dtype),
        out_dir,
        config_json,
        tokenizer_dir=tokenizer_dir,
        max_shard_bytes=max_shard_bytes,
        overwrite=overwrite,
    )


def _dtype_name(dtype) -> str:
    try:
        return jnp.dtype(dtype).name
    except TypeError as e:
        raise ValueError(f"dtype {dtype!r} is not a dtype name such as 'float32' or 'bfloat16'") from e


def load_pretrained(path: str | Path, dtype="float32", lora: LoraConfig | None = None, **model_overrides):
    """Load an HF LLaMA-family directory as a zhjax model (weights and compute in `dtype`); `zhjax.load_pretrained`.

    `lora` adds fresh PEFT-initialised adapters; `model_overrides` change `ModelConfig` fields such as
    `remat` or `attention`.
    """
    name = _dtype_name(dtype)
    config, _ = read_config(path)
    config = config.replace(dtype=name, param_dtype=name, **model_overrides)
    return load_params(path, config, lora)


def save_pretrained(model, out_dir: str | Path, tokenizer=None, dtype: str | None = None) -> Path:
    """Write `model` as an HF directory, LoRA merged in; `zhjax.save_pretrained`.

    `tokenizer` is a directory whose tokenizer files are copied, or an HF tokenizer object (`save_pretrained`
    is called on it).
    """
    import tempfile

    if tokenizer is None or isinstance(tokenizer, (str, Path)):
        return save_hf(model, out_dir, dtype=dtype, tokenizer_dir=tokenizer)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        return save_hf(model, out_dir, dtype=dtype, tokenizer_dir=tmp)
