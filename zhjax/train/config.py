"""The job config of `zhjax pretrain` / `zhjax sft`: model source, data, optimizer, mesh and schedule of one run.

YAML files set it and `a.b=value` arguments override it (`load_job_config`, parsed with draccus). The model's own
architecture and LoRA settings are `zhjax.config.ModelConfig` / `LoraConfig`, which know nothing of training.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from zhjax.config import LoraConfig, ModelConfig
from zhjax.parallel.mesh import MeshConfig
from zhjax.train.optim import OptimConfig


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
    # the loss covers the prompts (instruction + input) as well as the responses (alpaca-lora's option); the
    # seed masks prompts. On: SFT keeps modelling the text its inputs hold (README "The demo, measured")
    train_on_inputs: bool = False


@dataclass
class JobConfig:
    """One `zhjax pretrain` / `zhjax sft` run. YAML files set it; `a.b=value` arguments override it.

    The model comes from `init_from` (an HF directory or a zhjax base checkpoint) or, when that is unset, is
    initialised at random from `model` (tiny test presets). `dtype` is the compute dtype and the storage dtype of
    the frozen base ("auto": bfloat16 where the devices multiply it natively, else float32, `zhjax.precision`);
    trainable weights and optimizer state are always float32.
    """

    init_from: str | None = None
    model: ModelConfig | None = None
    tokenizer: str | None = None
    adapters_from: str | None = None
    full_finetuning: bool = False
    lora: LoraConfig = field(default_factory=LoraConfig)
    dtype: str = "auto"
    # the stacked layers' saved activations cost more to write and read back than recomputing all but the
    # projections' outputs (README: "The training step"); `none` saves everything
    remat: str = "dots_with_no_batch_dims"
    remat_names: tuple[str, ...] = ("query_proj", "key_proj", "value_proj", "context")
    attention: str = "xla"
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    per_device_train_batch_size: int = 1
    per_device_eval_batch_size: int = 1
    max_steps: int = -1
    num_train_epochs: float = 1.0
    # > 0: train for this many seconds of steps instead: the run times step 0 (compiled first) and trains as many
    # steps as fit at that rate, at most max_steps (or the epochs'); the schedule runs over that count. Evaluation,
    # saving and compilation are not counted. The run's length then depends on the machine: for "what fits in N
    # minutes here", e.g. `make demo`
    max_train_seconds: float = 0.0
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
