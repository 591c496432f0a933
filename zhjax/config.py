"""Typed configuration for zhjax.

Architecture and numerics of the model (`ModelConfig`) and the LoRA adapter (`LoraConfig`) are plain frozen
dataclasses: hashable, so they can be static arguments of jitted functions, and free of any Hugging Face
naming (reading and writing HF `config.json` lives in `zhjax.convert.hf`). The job config (data, optimizer,
mesh and schedule of a training run) lives with training, in `zhjax.train.config`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

ROPE_TYPES = ("default", "linear", "dynamic", "llama3")
REMAT_POLICIES = ("none", "full", "dots", "dots_with_no_batch_dims", "save_only_these_names")
# Activations of a decoder layer tagged with `checkpoint_name` (zhjax.model.llama), for `save_only_these_names`.
REMAT_NAMES = ("query_proj", "key_proj", "value_proj", "context", "out_proj", "mlp_gate", "mlp_up", "mlp_out")
# xla: jax.nn.dot_product_attention; cudnn: the same with cuDNN flash attention (GPU); splash: the Pallas TPU kernel
ATTENTION_BACKENDS = ("xla", "cudnn", "splash")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# The mesh axes and the one table from logical array axes to them (MaxText keeps its `logical_axis_rules` in its
# config too): `zhjax.parallel.rules` turns it into shardings; the model's splash-attention wrapper reads the
# batch axes from it, since the model layer sits below `parallel`.
MESH_AXES = ("data", "fsdp", "tensor")
AXIS_RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "head_dim": None,
    "layers": None,
    "lora_rank": None,
}


@dataclass(frozen=True)
class RopeScaling:
    """Rotary-embedding frequency scaling, as transformers' `rope_parameters` describe it."""

    rope_type: str = "default"
    factor: float = 1.0
    # llama3 only
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int | None = None

    def __post_init__(self) -> None:
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"rope_type {self.rope_type!r} is not supported; expected one of {ROPE_TYPES}")


@dataclass(frozen=True)
class ModelConfig:
    """A LLaMA-family decoder: LLaMA-1/2/3, Mistral (no sliding window), SmolLM.

    `dtype` is the compute dtype of matmuls; `param_dtype` the storage dtype of weights. Norms, softmax and
    logits are always computed in float32.
    """

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    initializer_range: float = 0.02
    bos_token_id: int | None = 1
    eos_token_id: int | tuple[int, ...] | None = 2
    pad_token_id: int | None = None
    # numerics and memory
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: str = "none"
    remat_names: tuple[str, ...] = ("query_proj", "key_proj", "value_proj", "context")
    attention: str = "xla"

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat {self.remat!r} is not supported; expected one of {REMAT_POLICIES}")
        object.__setattr__(self, "remat_names", tuple(self.remat_names))
        unknown = [n for n in self.remat_names if n not in REMAT_NAMES]
        if unknown:
            raise ValueError(f"remat_names {unknown} are not tagged in the layer; expected a subset of {REMAT_NAMES}")
        if self.attention not in ATTENTION_BACKENDS:
            raise ValueError(f"attention {self.attention!r} is not supported; expected one of {ATTENTION_BACKENDS}")

    def replace(self, **changes) -> ModelConfig:
        """A copy with some fields changed (`dtype`, `remat`, `vocab_size`, ...)."""
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class LoraConfig:
    """LoRA as in PEFT: `W x + (B A dropout(x)) * lora_alpha / r` on each target module.

    `modules_to_save` are trained in full (the seed trains `embed_tokens` and `lm_head` this way).
    """

    r: int = 8
    lora_alpha: float = 32.0
    lora_dropout: float = 0.05
    target_modules: tuple[str, ...] = LORA_TARGETS
    modules_to_save: tuple[str, ...] = ("embed_tokens", "lm_head")

    def __post_init__(self) -> None:
        object.__setattr__(self, "target_modules", tuple(self.target_modules))
        object.__setattr__(self, "modules_to_save", tuple(self.modules_to_save))
        unknown = [m for m in self.target_modules if m not in LORA_TARGETS]
        if unknown:
            raise ValueError(f"LoRA target_modules {unknown} are not LLaMA modules; expected a subset of {LORA_TARGETS}")
        if self.r <= 0:
            raise ValueError(f"LoRA rank r must be positive, got {self.r}")

    @property
    def scaling(self) -> float:
        return self.lora_alpha / self.r
