"""The training data loader: deterministic, resumable, host-sharded global batches with background prefetch.

Batch format (what the trainer consumes)
----------------------------------------
Each batch is a dict of four int32 arrays of shape ``[global_batch_size, L]``: ``jax.Array``s sharded over the
mesh axes ("data", "fsdp") on the batch dim when the loader has a mesh, else host-local numpy arrays.

- ``input_ids``: token ids; padding holds ``pad_id``.
- ``labels``: aligned with ``input_ids`` (the loss compares the logits at t with the label at t+1); -100 is
  ignored (prompts, padding). Pre-training blocks have no labels column: labels are the inputs.
- ``segment_ids``: 0 on padding; the documents (pre-training) or examples (packed SFT) of a row are numbered
  1, 2, ... An attention mask ``causal & (seg_q == seg_k) & (seg_k > 0)`` keeps attention inside a document
  and makes a packed row compute exactly what separate rows would. Pre-training may instead attend across
  documents, as the seed did; SFT rows must use the segment mask.
- ``positions``: RoPE position ids. Packed SFT rows and bucketed examples restart at 0 for every example.
  Pre-training blocks count 0..L-1 through the block: RoPE scores depend only on relative positions, so
  under the segment mask this equals restarting at each document, and without it this is the seed's
  behaviour.

``L`` is the dataset's row length (``block_size`` or ``max_seq_length``) or, with ``bucket_lengths``, the
bucket of that batch (all rows of a batch share one bucket, and all hosts agree on it).

Order and resumption
--------------------
Epoch ``e`` visits the rows in a permutation drawn from ``(seed, e)``; every host computes the same one and
reads only its own rows of each global batch (its slice is the rows that the batch sharding puts on its
devices; a simulated host, ``process_index``/``process_count`` injected, takes the ``process_index``-th
contiguous share). The last batch of an epoch is filled with empty rows (all padding, labels -100), so every
sample is seen exactly once per epoch, unless ``drop_remainder``. `DataLoader.state_dict` is
``{"epoch": e, "position": p}`` with ``p`` the global sample slots consumed in epoch ``e`` (batches x
``global_batch_size``); it counts what the consumer has taken, not what the prefetch thread has read ahead,
so a loader restored from it yields exactly the batch that would have come next.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator, Sequence

import datasets
import jax
import numpy as np
import pyarrow as pa

from zhjax.config import AXIS_RULES as RULES  # not zhjax.parallel.rules: that imports flax (0.2 s)

IGNORE_INDEX = -100
BATCH_KEYS = ("input_ids", "labels", "segment_ids", "positions")


def host_topology(process_index: int | None = None, process_count: int | None = None,
                  barrier: Callable[[str], None] | None = None) -> tuple[int, int, Callable[[str], None] | None]:
    """This host's index, the host count (default: from ``jax``) and a barrier between hosts.

    Injecting ``process_index``/``process_count`` simulates hosts in one process (tests); a multi-host caller
    that needs a barrier must then pass one, since the default (``multihost_utils.sync_global_devices``) spans
    real processes only.
    """
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    if not 0 <= index < count:
        raise ValueError(f"process_index {index} is not in [0, {count})")
    if count > 1 and barrier is None and count == jax.process_count():
        from jax.experimental import multihost_utils

        barrier = multihost_utils.sync_global_devices
    return index, count, barrier


def default_bucket_lengths(max_length: int, smallest: int = 64) -> tuple[int, ...]:
    """Powers of two from ``smallest`` up to the first one >= ``max_length`` (capped at ``max_length``)."""
    lengths, n = [], smallest
    while n < max_length:
        lengths.append(n)
        n *= 2
    return (*lengths, max_length)


class DataLoader:
    """Global batches of a ``datasets.Dataset`` in a seeded order, sharded over hosts and resumable.

    Args:
        dataset: rows with ``input_ids`` and optionally ``labels``, ``segment_ids``, ``positions``: fixed-length
            (pre-training blocks, packed SFT rows) or, with ``bucket_lengths``, variable-length examples.
        global_batch_size: rows per global batch (across all hosts).
        seed: the order of epoch ``e`` comes from ``(seed, e)``.
        mesh: a ``jax.sharding.Mesh``; batches become global ``jax.Array``s sharded over ``batch_axes``.
            None yields host-local numpy batches.
        batch_axes: mesh axes that shard the batch dim.
        bucket_lengths: pad variable-length examples to the smallest of these that fits (static shapes).
        pad_id: the token id of padding.
        drop_remainder: drop the last, incomplete batch of each epoch (and bucket) instead of filling it.
        num_epochs: stop after this many epochs; None runs forever.
        prefetch: batches read ahead by a background thread (0: read in the caller's thread).
        process_index, process_count: this host and the number of hosts (default: from ``jax``).
    """

    def __init__(self, dataset: datasets.Dataset, global_batch_size: int, *, seed: int = 0,
                 mesh: jax.sharding.Mesh | None = None, batch_axes: Sequence[str] = RULES["batch"],
                 bucket_lengths: Sequence[int] | None = None, pad_id: int = 0, drop_remainder: bool = False,
                 num_epochs: int | None = None, prefetch: int = 2, process_index: int | None = None,
                 process_count: int | None = None):
        self.dataset, self.global_batch_size, self.seed = dataset, global_batch_size, seed
        self.pad_id, self.drop_remainder, self.num_epochs, self.prefetch = pad_id, drop_remainder, num_epochs, prefetch
        self.process_index, self.process_count, _ = host_topology(process_index, process_count)
        if len(dataset) == 0:
            raise ValueError("the dataset is empty")
        if global_batch_size % self.process_count:
            raise ValueError(f"global_batch_size {global_batch_size} is not divisible by {self.process_count} hosts")
        feature = dataset.features["input_ids"]
        self.row_length = getattr(feature, "length", -1)
        self.bucket_lengths = tuple(sorted(bucket_lengths)) if bucket_lengths else None
        if self.bucket_lengths is None and self.row_length < 1:
            raise ValueError("variable-length examples need bucket_lengths (or pack them into fixed rows)")
        self.sharding = None
        if mesh is not None:
            spec = jax.sharding.PartitionSpec(tuple(batch_axes))
            self.sharding = jax.sharding.NamedSharding(mesh, spec)
            shards = int(np.prod([mesh.shape[a] for a in batch_axes]))
            if global_batch_size % shards:
                raise ValueError(f"global_batch_size {global_batch_size} is not divisible by the {shards} batch "
                                 f"shards of mesh axes {tuple(batch_axes)}")
        self._local_rows = self._host_rows()
        self._lengths = None
        if self.bucket_lengths is not None:
            lengths = pa.compute.list_value_length(dataset.with_format("arrow")[:]["input_ids"]).to_numpy()
            if lengths.max() > self.bucket_lengths[-1]:
                raise ValueError(f"an example has {lengths.max()} tokens, more than the largest bucket "
                                 f"{self.bucket_lengths[-1]}")
            self._lengths = lengths
        self._state = {"epoch": 0, "position": 0}
        self._plan_cache: tuple[int, np.ndarray, np.ndarray] | None = None

    # --------------------------------------------------------------------------------- order and slices

    def _host_rows(self) -> np.ndarray:
        """Indices (within a global batch) of the rows this host reads, in the order its devices hold them."""
        g = self.global_batch_size
        if self.sharding is not None and self.process_count == jax.process_count():
            indices = self.sharding.addressable_devices_indices_map((g, 1))
            starts = sorted({(s[0].start or 0, s[0].stop if s[0].stop is not None else g) for s in indices.values()})
            return np.concatenate([np.arange(a, b) for a, b in starts])
        share = g // self.process_count
        return np.arange(self.process_index * share, (self.process_index + 1) * share)

    def _plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(row index per global sample slot, -1 = empty row; row length per slot) of ``epoch``."""
        if self._plan_cache is not None and self._plan_cache[0] == epoch:
            return self._plan_cache[1], self._plan_cache[2]
        rng, g = np.random.default_rng([self.seed, epoch]), self.global_batch_size
        if self._lengths is None:
            groups = [(self.row_length, rng.permutation(len(self.dataset)))]
        else:
            bucket_of = np.searchsorted(self.bucket_lengths, self._lengths)
            groups = [(b, rng.permutation(np.flatnonzero(bucket_of == i))) for i, b in enumerate(self.bucket_lengths)]
        batches, lengths = [], []
        for length, rows in groups:
            n = len(rows) // g * g if self.drop_remainder else -(-len(rows) // g) * g
            rows = np.concatenate([rows, np.full(max(0, n - len(rows)), -1)])[:n].reshape(-1, g)
            batches.append(rows)
            lengths += [length] * len(rows)
        order = rng.permutation(len(lengths)) if self._lengths is not None else np.arange(len(lengths))
        slots = np.concatenate(batches)[order].reshape(-1) if lengths else np.zeros(0, np.int64)
        slot_lengths = np.repeat(np.asarray(lengths, np.int64)[order], g) if lengths else np.zeros(0, np.int64)
        self._plan_cache = (epoch, slots, slot_lengths)
        return slots, slot_lengths

    def __len__(self) -> int:
        """Global batches per epoch."""
        return len(self._plan(0)[0]) // self.global_batch_size

    # ------------------------------------------------------------------------------------------- state

    def state_dict(self) -> dict[str, int]:
        """``{"epoch", "position"}`` after the last batch the consumer took; save it with the checkpoint."""
        return dict(self._state)

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from a `state_dict`: the next batch is the one that followed it in the saved run."""
        epoch, position = int(state["epoch"]), int(state["position"])
        if position < 0 or (self.bucket_lengths is not None and position % self.global_batch_size):
            raise ValueError(f"position {position} does not start a batch of {self.global_batch_size}")
        self._state = {"epoch": epoch, "position": position}

    # ----------------------------------------------------------------------------------------- batches

    def _read(self, rows: np.ndarray, length: int) -> dict[str, np.ndarray]:
        """The host-local batch of dataset ``rows`` (-1: an empty row), padded to ``length``."""
        n = len(rows)
        out = {"input_ids": np.full((n, length), self.pad_id, np.int32),
               "labels": np.full((n, length), IGNORE_INDEX, np.int32),
               "segment_ids": np.zeros((n, length), np.int32), "positions": np.zeros((n, length), np.int32)}
        real = np.flatnonzero(rows >= 0)
        if not len(real):
            return out
        table = self.dataset.with_format("arrow")[rows[real].tolist()]
        if self._lengths is None:  # fixed-length rows
            cols = {k: table.column(k).combine_chunks().flatten().to_numpy().reshape(len(real), -1)
                    for k in BATCH_KEYS if k in table.column_names}
            out["input_ids"][real] = cols["input_ids"]
            out["labels"][real] = cols.get("labels", cols["input_ids"])
            out["segment_ids"][real] = cols.get("segment_ids", 1)
            out["positions"][real] = cols.get("positions", np.arange(length))
            return out
        ids = table.column("input_ids").to_pylist()
        labels = table.column("labels").to_pylist() if "labels" in table.column_names else ids
        for r, x, y in zip(real, ids, labels, strict=True):
            out["input_ids"][r, : len(x)] = x
            out["labels"][r, : len(x)] = y
            out["segment_ids"][r, : len(x)] = 1
            out["positions"][r, : len(x)] = np.arange(len(x))
        return out

    def _global(self, local: dict[str, np.ndarray], to_global: bool) -> dict:
        if self.sharding is None or not to_global:
            return local
        shape = (self.global_batch_size, local["input_ids"].shape[1])
        return {k: jax.make_array_from_process_local_data(self.sharding, v, shape) for k, v in local.items()}

    def _produce(self, epoch: int, position: int, to_global: bool) -> Iterator[tuple[dict, dict[str, int]]]:
        """(batch, state after it) from ``(epoch, position)`` on, across epochs."""
        g = self.global_batch_size
        while self.num_epochs is None or epoch < self.num_epochs:
            slots, lengths = self._plan(epoch)
            if len(slots) == 0:
                raise ValueError(f"{len(self.dataset)} rows make no batch of {g} with drop_remainder")
            while position + g <= len(slots):
                rows = slots[position:position + g][self._local_rows]
                batch = self._global(self._read(rows, int(lengths[position])), to_global)
                position += g
                yield batch, {"epoch": epoch, "position": position}
            epoch, position = epoch + 1, 0

    def __iter__(self) -> Iterator[dict]:
        """Batches from the current state on; the state advances as each batch is taken."""
        return self._iterate(to_global=True)

    def local_batches(self) -> Iterator[dict[str, np.ndarray]]:
        """Like iterating the loader, but this host's numpy rows only (no device transfer)."""
        return self._iterate(to_global=False)

    def _iterate(self, to_global: bool) -> Iterator[dict]:
        source = self._produce(self._state["epoch"], self._state["position"], to_global)
        if self.prefetch <= 0:
            for batch, state in source:
                self._state = state
                yield batch
            return
        items: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        done = object()

        def work() -> None:
            try:
                for item in source:
                    while not stop.is_set():
                        try:
                            items.put(item, timeout=0.1)
                            break
                        except queue.Full:
                            continue
                    if stop.is_set():
                        return
                items.put(done)
            except BaseException as e:  # re-raised in the consumer's thread
                items.put(e)

        thread = threading.Thread(target=work, name="zhjax-data-prefetch", daemon=True)
        thread.start()
        try:
            while (item := items.get()) is not done:
                if isinstance(item, BaseException):
                    raise item
                batch, self._state = item
                yield batch
        finally:
            stop.set()
            while thread.is_alive():
                try:
                    items.get_nowait()
                except queue.Empty:
                    thread.join(timeout=0.05)
