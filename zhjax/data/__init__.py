"""Data pipelines: text files and instruction records in, fixed-shape token batches out.

- `zhjax.data.pretrain`: text files -> cached, memory-mapped ``block_size`` blocks (`build_blocks`).
- `zhjax.data.sft`: Alpaca records / conversations -> masked examples (`encode_example`) -> packed rows.
- `zhjax.data.templates`: the prompt templates (`TEMPLATES`), and nowhere else.
- `zhjax.data.loader`: deterministic, resumable, host-sharded global batches (`DataLoader`); its module
  docstring defines the batch format the trainer consumes.
"""

from zhjax.data.loader import DataLoader
from zhjax.data.pretrain import DataError, PretrainData, PretrainSummary, build_blocks, prepare_pretrain_data
from zhjax.data.sft import SFTSummary, build_sft_dataset, encode_example, pack_examples
from zhjax.data.templates import TEMPLATES

__all__ = [
    "TEMPLATES",
    "DataError",
    "DataLoader",
    "PretrainData",
    "PretrainSummary",
    "SFTSummary",
    "build_blocks",
    "build_sft_dataset",
    "encode_example",
    "pack_examples",
    "prepare_pretrain_data",
]
