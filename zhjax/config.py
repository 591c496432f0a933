"""Typed configuration for zhjax.

Architecture and numerics of the model (`ModelConfig`) and the LoRA adapter (`LoraConfig`) are plain frozen
dataclasses: hashable, so they can be static arguments of jitted functions, and free of any Hugging Face
naming (reading and writing HF `config.json` lives in `zhjax.convert.hf`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from zhjax.parallel.mesh import MeshConfig
from zhjax.train.optim import OptimConfig

ROPE_TYPES = ("default", "linear", "dynamic", "llama3")
REMAT_POLICIES = ("none", "full", "dots", "dots_with_no_batch_dims", "save_only_these_names")
# Activations of a decoder layer tagged with `checkpoint_name` (zhjax.model.llama), for `save_only_these_names`.
REMAT_NAMES = ("query_proj", "key_proj", "value_proj", "context", "out_proj", "mlp_gate", "mlp_up", "mlp_out")
# xla: jax.nn.dot_product_attention; cudnn: the same with cuDNN flash attention (GPU); splash: the Pallas TPU kernel
ATTENTION_BACKENDS = ("xla", "cudnn", "splash")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


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


@dataclass
class DataConfig:
    """Where the training text comes from and how it becomes fixed-shape rows."""

    train_files: list[str] = field(default_factory=list)
    validation_files: list[str] = field(default_factory=list)
    validation_split_percentage: float = 0.05  # a fraction, as in the seed (0.05 = 5%)
    data_cache_dir: str | None = None
    preprocessing_num_workers: int = 1
    # how the files' bytes become text: any ASCII-compatible codec (gbk, gb18030, ...); a UTF-8 BOM is dropped.
    # encoding_errors "replace" substitutes U+FFFD for undecodable bytes instead of stopping at the first one
    encoding: str = "utf-8"
    encoding_errors: str = "strict"
    # pre-training
    block_size: int = 512
    add_eos: bool = True
    attend_across_documents: bool = True
    # instruction tuning
    template: str = "alpaca"
    max_seq_length: int = 512
    max_prompt_length: int | None = None
    pack: bool = True


@dataclass
class JobConfig:
    """One `zhjax pretrain` / `zhjax sft` run. YAML files set it; `a.b=value` arguments override it.

    The model comes from `init_from` (an HF directory or a zhjax base checkpoint) or, when that is unset, is
    initialised at random from `model` (tiny test presets). `dtype` is the compute dtype and the storage dtype of
    the frozen base; trainable weights and optimizer state are always float32.
    """

    init_from: str | None = None
    model: ModelConfig | None = None
    tokenizer: str | None = None
    adapters_from: str | None = None
    full_finetuning: bool = False
    lora: LoraConfig = field(default_factory=LoraConfig)
    dtype: str = "bfloat16"
    remat: str = "none"
    remat_names: tuple[str, ...] = ("query_proj", "key_proj", "value_proj", "context")
    attention: str = "xla"
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    per_device_train_batch_size: int = 1
    per_device_eval_batch_size: int = 1
    max_steps: int = -1
    num_train_epochs: float = 1.0
    logging_steps: int = 10
    eval_steps: int = 100
    save_steps: int = 200
    save_total_limit: int | None = 3
    seed: int = 42
    output_dir: str = "outputs/run"
    overwrite_output_dir: bool = False
    peak_tflops_per_device: float | None = None
    skip_nonfinite: bool = False
    async_checkpointing: bool = True
    max_eval_batches: int | None = None
    # > 0: the LM head + cross-entropy run fused, this many tokens at a time (zhjax.train.loss); 0: full logits
    loss_chunk_size: int = 0


@dataclass
class PretrainConfig(JobConfig):
    """`zhjax pretrain`: the seed's run_clm_pt_with_peft.py defaults (lr 2e-4, warmup 5%, weight decay 0.01)."""


@dataclass
class SFTConfig(JobConfig):
    """`zhjax sft`: the seed's run_clm_sft_with_peft.py defaults (lr 1e-4, warmup 3%, no weight decay)."""

    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(learning_rate=1e-4, warmup_ratio=0.03, weight_decay=0.0)
    )


def load_job_config(kind: str, config_path: str | None, overrides: list[str]) -> JobConfig:
    """Parse a job config: YAML file, then `a.b=value` (or `--a.b=value`) overrides, validated up front."""
    import draccus

    cls = {"pretrain": PretrainConfig, "sft": SFTConfig}[kind]
    args = [a if a.startswith("--") else f"--{a}" for a in overrides]
    bad = [a for a in args if "=" not in a]
    if bad:
        raise ValueError(f"overrides must look like key.sub=value, got {bad}")
    try:
        return draccus.parse(cls, config_path=config_path, args=args, exit_on_error=False)
    except (draccus.utils.DraccusException, draccus.utils.ParsingError, ValueError, TypeError) as e:
        where = f" in {config_path}" if config_path else ""
        cause = f" ({e.__cause__})" if e.__cause__ else ""
        raise ValueError(f"invalid {kind} config{where}: {e}{cause}") from e
