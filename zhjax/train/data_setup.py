"""From a job's `DataConfig` to the batches the train step takes.

Pre-training reads blocks (`zhjax.data.pretrain`), SFT reads encoded and packed examples (`zhjax.data.sft`);
both go through the resumable, host-sharded `DataLoader`. The train step wants `[accum, batch, seq]` arrays:
each host reshapes its own rows of one optimizer step into `accum` micro-batches and the global array is
assembled with `jax.make_array_from_process_local_data`, sharded over (`data`, `fsdp`) on the batch dim.
"""

from __future__ import annotations

from collections.abc import Iterator

import jax

from zhjax.config import ModelConfig
from zhjax.data.loader import DataLoader
from zhjax.parallel.rules import microbatch_sharding
from zhjax.train.config import JobConfig


class TrainData:
    """Train batches (resumable) and validation batches of one job."""

    def __init__(self, train, validation, *, cfg: JobConfig, mesh, global_batch: int, accum: int, pad_id: int,
                 use_segments: bool, bucket_lengths: tuple[int, ...] | None = None):
        self.mesh, self.accum, self.use_segments = mesh, accum, use_segments
        self.global_batch = global_batch  # rows per optimizer step (all micro-batches)
        self.bucket_lengths = bucket_lengths  # unpacked SFT: a few static lengths, one compiled step each
        self.loader = DataLoader(train, global_batch, seed=cfg.seed, pad_id=pad_id, mesh=None,
                                 bucket_lengths=bucket_lengths)
        self.validation = validation
        self.eval_batch = cfg.per_device_eval_batch_size * len(mesh.devices.flat)
        self.pad_id = pad_id
        self.seq_len = bucket_lengths[-1] if bucket_lengths else self.loader.row_length
        self.steps_per_epoch = max(len(self.loader), 1)
        self._micro_sharding = microbatch_sharding(mesh)
        self._iter: Iterator | None = None

    @property
    def has_eval(self) -> bool:
        return self.validation is not None and len(self.validation) > 0

    def _prepare(self, batch: dict) -> dict:
        if not self.use_segments:
            batch = {k: v for k, v in batch.items() if k not in ("segment_ids",)}
        return batch

    def next_train_batch(self) -> dict[str, jax.Array]:
        """The next optimizer step's `[accum, batch, seq]` global arrays."""
        if self._iter is None:
            self._iter = self.loader.local_batches()
        local = self._prepare(next(self._iter))
        out = {}
        for k, v in local.items():
            v = v.reshape(self.accum, -1, v.shape[-1])
            shape = (self.accum, self.global_batch // self.accum, v.shape[-1])
            out[k] = jax.make_array_from_process_local_data(self._micro_sharding, v, shape)
        return out

    def eval_batches(self) -> Iterator[dict[str, jax.Array]]:
        """One pass over the validation rows, in order, as global `[batch, seq]` arrays."""
        loader = DataLoader(self.validation, self.eval_batch, seed=0, pad_id=self.pad_id, mesh=self.mesh,
                            num_epochs=1, prefetch=0, bucket_lengths=self.bucket_lengths)
        for batch in loader:
            yield self._prepare(batch)

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)
        self._iter = None

    def epoch_progress(self) -> float:
        s = self.loader.state_dict()
        return s["epoch"] + s["position"] / max(self.steps_per_epoch * self.global_batch, 1)


def build_data(cfg: JobConfig, kind: str, model_config: ModelConfig, mesh, rows_per_step: int) -> TrainData:
    """Preprocess (or load from cache) the job's data and wrap it in loaders."""
    from transformers import AutoTokenizer

    tok_dir = cfg.tokenizer or cfg.init_from
    if not tok_dir:
        raise ValueError("the job needs `tokenizer` (an HF tokenizer dir) when `init_from` is not an HF dir")
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    from zhjax.tokenizer.guards import check_vocab_match

    check_vocab_match(model_config.vocab_size, tokenizer, where=f"model vs tokenizer {tok_dir}")
    d = cfg.data
    if not d.train_files:
        raise ValueError("data.train_files is empty: give the training text files or directories")
    buckets = None
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    if kind == "pretrain":
        from zhjax.data.pretrain import prepare_pretrain_data

        prepared = prepare_pretrain_data(
            d.train_files, tokenizer, d.block_size, validation_paths=d.validation_files or None,
            validation_split_percentage=d.validation_split_percentage, seed=cfg.seed, cache_dir=d.data_cache_dir,
            add_eos=d.add_eos, num_proc=d.preprocessing_num_workers, encoding=d.encoding, errors=d.encoding_errors,
        )
        train, validation = prepared.train, prepared.validation
        use_segments = not d.attend_across_documents
        print(prepared.summary)
    else:
        from zhjax.data.pretrain import split_validation
        from zhjax.data.sft import build_sft_dataset

        rows, summary = build_sft_dataset(
            d.train_files, tokenizer, d.template, d.max_seq_length, d.max_prompt_length, pack=d.pack,
            train_on_inputs=d.train_on_inputs, num_proc=d.preprocessing_num_workers, encoding=d.encoding,
            errors=d.encoding_errors,
        )
        print(summary)
        if d.validation_files:
            validation, _ = build_sft_dataset(
                d.validation_files, tokenizer, d.template, d.max_seq_length, d.max_prompt_length, pack=d.pack,
                train_on_inputs=d.train_on_inputs, encoding=d.encoding, errors=d.encoding_errors,
            )
        elif d.validation_split_percentage:
            rows, validation = split_validation(rows, d.validation_split_percentage, cfg.seed)
        else:
            validation = None
        train = rows
        use_segments = True  # packed examples must not see each other; padding is segment 0
        if not d.pack:
            from zhjax.data.loader import default_bucket_lengths

            buckets = default_bucket_lengths(d.max_seq_length)
    return TrainData(train, validation, cfg=cfg, mesh=mesh, global_batch=rows_per_step,
                     accum=cfg.optim.gradient_accumulation_steps, pad_id=pad_id, use_segments=use_segments,
                     bucket_lengths=buckets)
