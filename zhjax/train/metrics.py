"""Run metrics: a tqdm bar, stdout lines, `metrics.jsonl` and TensorBoard, plus FLOPs accounting for MFU.

A resumed run logs again the steps after its checkpoint: `rewind_tensorboard` first moves those events out of the
TensorBoard event files (as `zhjax.train.validate.rewind_metrics` does for `metrics.jsonl`), so every reader of
the event files, TensorBoard or a raw one, sees each step once.

Only process 0 writes (`enabled=False` elsewhere). FLOPs per token count the matmuls of a LoRA step honestly:
a frozen weight costs a forward and an input-gradient matmul (4 FLOPs per parameter per token), a trained one
also its weight gradient (6), and attention adds 12 * layers * hidden * seq (forward + backward of QK^T and AV).
"""

from __future__ import annotations

import json
import struct
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from tqdm.auto import tqdm

from zhjax.config import ModelConfig
from zhjax.data.files import jsonl_records

# Dense bf16 peak FLOP/s per device, by `device_kind` substring.
PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6": 918e12,
    "A100": 312e12,
    "H100": 989e12,
    "H200": 989e12,
}


def peak_flops(device) -> float | None:
    """Known peak bf16 FLOP/s of a device, or None (CPUs: give `peak_tflops_per_device` in the config)."""
    kind = getattr(device, "device_kind", "")
    for name, value in PEAK_FLOPS.items():
        if name in kind:
            return value
    return None


def flops_per_token(
    config: ModelConfig, trainable_params: int, frozen_params: int, seq_len: int, *, embed_trainable: bool
) -> float:
    """Training FLOPs per token of one step (see the module docstring)."""
    # An untied input embedding is a gather, not a matmul; a tied one is counted once, as the LM head.
    lookup = 0 if config.tie_word_embeddings else config.vocab_size * config.hidden_size
    if embed_trainable:
        trainable_params -= lookup
    else:
        frozen_params -= lookup
    attention = 12 * config.num_hidden_layers * config.num_attention_heads * config.head_dim * seq_len
    return 4.0 * frozen_params + 6.0 * trainable_params + attention



def read_metrics(output_dir: str | Path) -> list[dict]:
    """The records a run wrote to `output_dir/metrics.jsonl`, in order (what `MetricsLogger` writes)."""
    path = Path(output_dir) / "metrics.jsonl"
    return [record for _, record in jsonl_records(path.read_text(encoding="utf-8"), path)]


class MetricsLogger:
    """Writes metric records to stdout, `output_dir/metrics.jsonl` and TensorBoard (`output_dir/tensorboard`)."""

    def __init__(self, output_dir: str | Path, *, enabled: bool = True):
        self.enabled = enabled
        self.bar = None
        if not enabled:
            return
        self.jsonl = open(Path(output_dir) / "metrics.jsonl", "a", encoding="utf-8")
        try:
            from tensorboardX.event_file_writer import EventsWriter
        except ImportError:  # pragma: no cover - tensorboardX is a dependency
            self.tb = None
        else:
            # Written in `log`, not through SummaryWriter's queue and thread: a run killed right after logging a
            # step would lose the queued events, and the resume (which keeps the steps up to its checkpoint) could
            # not bring them back. A unique name: the default (seconds and host) would let a run resumed within the
            # same second open, and truncate, the file of the run it continues.
            (Path(output_dir) / "tensorboard").mkdir(parents=True, exist_ok=True)
            self.tb = EventsWriter(str(Path(output_dir) / "tensorboard" / "events"), f".{time.time_ns()}")

    def progress(self, iterable, *, initial: int, total: int):
        """Iterate with a progress bar on process 0."""
        if not self.enabled:
            return iterable
        self.bar = tqdm(iterable, initial=initial, total=total, desc="train", dynamic_ncols=True, file=sys.stderr)
        return self.bar

    def set_total(self, total: int) -> None:
        """The progress bar's new end (a time-budgeted run fixes its length after its first step)."""
        if self.bar is not None:
            self.bar.total = total
            self.bar.refresh()

    def text(self, line: str) -> None:
        if self.enabled:
            (self.bar.write if self.bar is not None else print)(line)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        shown = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items())
        self.text(shown)
        if self.tb is not None:
            from tensorboardX.proto.event_pb2 import Event
            from tensorboardX.summary import scalar

            values = [scalar(k, v) for k, v in record.items() if k != "step" and isinstance(v, (int, float))]
            for summary in values:
                self.tb.write_event(Event(wall_time=time.time(), step=record["step"], summary=summary))
            if values:
                self.tb.flush()  # as durable as the metrics.jsonl line above

    def flush(self) -> None:
        """Push buffered records to the files (before they are uploaded from a staging directory)."""
        if not self.enabled:
            return
        self.jsonl.flush()
        if self.tb is not None:
            self.tb.flush()

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        self.jsonl.close()
        if self.tb is not None:
            self.tb.close()


def read_event_records(path: str | Path) -> Iterator[bytes]:
    """The serialized `Event` records of a TensorBoard event file (TFRecord framing, CRCs checked).

    A torn last record (a run killed mid-write) ends the file; a damaged one elsewhere raises `ValueError`.
    """
    from tensorboardX.record_writer import masked_crc32c

    with open(path, "rb") as f:
        while True:
            header = f.read(12)
            if len(header) < 12:
                return
            (length,), (header_crc,) = struct.unpack("<Q", header[:8]), struct.unpack("<I", header[8:])
            if masked_crc32c(header[:8]) != header_crc:
                raise ValueError(f"{path}: damaged record header at byte {f.tell() - 12}")
            data, footer = f.read(length), f.read(4)
            if len(data) < length or len(footer) < 4:
                return
            if masked_crc32c(data) != struct.unpack("<I", footer)[0]:
                raise ValueError(f"{path}: damaged record at byte {f.tell() - length - 4}")
            yield data


def rewind_tensorboard(run_dir: str | Path, step: int) -> int:
    """Move the TensorBoard events logged past `step` out of `run_dir/tensorboard`; returns how many were moved.

    Each event file keeps its events up to `step` (rewritten in place, atomically); the later ones go to a file of
    the same name under `run_dir/tensorboard.rewound/` (kept, not deleted). A torn last record is dropped.
    """
    from tensorboardX.proto.event_pb2 import Event
    from tensorboardX.record_writer import RecordWriter

    run_dir = Path(run_dir)
    moved = 0
    for path in sorted((run_dir / "tensorboard").rglob("events.out.tfevents.*")):
        keep, past = [], []
        for data in read_event_records(path):
            (past if Event.FromString(data).step > step else keep).append(data)
        if not past:
            continue
        aside = run_dir / "tensorboard.rewound" / path.relative_to(run_dir / "tensorboard")
        aside.parent.mkdir(parents=True, exist_ok=True)
        for target, records in ((aside.with_name(f"{aside.name}.{step}"), past), (path.with_name(f".{path.name}.tmp"), keep)):
            writer = RecordWriter(str(target))
            for data in records:
                writer.write(data)
            writer.close()
        path.with_name(f".{path.name}.tmp").replace(path)
        moved += len(past)
    return moved
