"""Batched scoring with zhjax's forward pass: log-probabilities of chosen next tokens, many candidates per pass.

Both evaluations reduce to one question asked of token rows: *given this row, how likely are these tokens at
these positions?* A C-Eval question is a prompt row and four candidate tokens (the option letters) at its last
position; an lm-eval `loglikelihood` request is a context + continuation row and the continuation's tokens at the
positions that predict them. `Scorer.score` answers it for many rows at once:

- a row is a list of token ids; `positions[i]` are the `k` positions of row `i` whose next-token distribution is
  read, and `targets[i]` `[k, c]` the `c` candidate tokens at each (the continuation of several requests that share
  a row, or the four letters);
- rows are sorted by length and cut into batches of `batch_size` rows, right-padded to a length bucket
  (`length_bucket`: powers of two and 1.5 times powers of two, so there are few compiled shapes and at most a third
  is padding); padding at the end of a causal row changes nothing before it, so no attention mask is needed;
- one jitted pass per batch runs the decoder (`LlamaForCausalLM.hidden_states`), applies the LM head only at the
  `k` read positions (not at every position, as a plain forward pass would: the head is a fifth of SmolLM2's
  work per token), and returns the log-softmax at the targets (float32) and the arg-max token at each position;
- rows that begin with the same long run of tokens (every question of a few-shot subject starts with the same
  header and shots) share it (`share_prefix`, at least `min_shared` tokens, on a one-device mesh): the shared
  prefix runs once into a KV cache (`zhjax.model.decode`, the generation layout), and each row then runs only its
  own tail against that cache. A 5-shot question's tail is a fifth of its row or less, so most of the work goes;
  the scores equal the full rows' (the same model, within float rounding: `tests/test_eval.py`);
- the parameters are placed on the mesh by the project's sharding rules (`zhjax.parallel.rules`, FSDP over every
  device by default) and each batch is sharded over (`data`, `fsdp`), so the same code runs on a TPU slice, a
  GPU host or this CPU.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from zhjax.model.decode import DecodeLayer, decode, decode_logits, decode_weights, init_kv_cache
from zhjax.parallel.mesh import MeshConfig, make_mesh
from zhjax.parallel.rules import batch_sharding, state_shardings


def length_bucket(n: int, smallest: int = 32) -> int:
    """The padded length of a row of `n` tokens: the next of smallest, 1.5x, 2x, 3x, 4x, ... (at most 1/3 padding)."""
    width = smallest
    while True:
        if n <= width:
            return width
        if n <= width * 3 // 2:
            return width * 3 // 2
        width *= 2


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _score_batch(graphdef, state, ids, positions, targets):
    """Log-probs `[b, k, c]` of `targets` at `positions` and the arg-max `[b, k]` there (float32 softmax)."""
    model = nnx.merge(graphdef, state)
    hidden = model.hidden_states(ids)
    read = jnp.take_along_axis(hidden, positions[..., None], axis=1)
    logits = model.logits_from_hidden(read)
    logp = jax.nn.log_softmax(logits, axis=-1)
    return jnp.take_along_axis(logp, targets, axis=-1), jnp.argmax(logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("config",))
def _prefix_cache(weights, ids, *, config):
    """The KV cache `[1 row, len(ids) slots]` of one shared prefix (right-padded: every slot is written, the
    padding's slots are hidden later by `kv_valid`)."""
    n = ids.shape[1]
    cache = init_kv_cache(config, 1, n, stacked=isinstance(weights.layers, DecodeLayer))
    _, cache = decode(config, weights, ids, cache, positions=jnp.arange(n)[None], cache_index=0,
                      kv_valid=jnp.ones((1, n), bool))
    return cache


@functools.partial(jax.jit, static_argnames=("config",))
def _score_tails(weights, prefix, n_prefix, ids, positions, targets, *, config):
    """`_score_batch` for rows `prefix[:n_prefix] + ids[i]`: the tails `ids` `[b, t]` run against the prefix's
    cache (broadcast to the batch); `positions` count within the tails."""
    b, t = ids.shape
    slots = (prefix.k if isinstance(prefix.k, jax.Array) else prefix.k[0]).shape[-2]

    def grow(c):  # [.., 1, kv_heads, slots, d] -> [.., b, kv_heads, slots + t, d]
        shape = (*c.shape[:-4], b, c.shape[-3], t, c.shape[-1])
        return jnp.concatenate([jnp.broadcast_to(c, (*shape[:-2], slots, shape[-1])), jnp.zeros(shape, c.dtype)],
                               axis=-2)

    cache = jax.tree.map(grow, prefix)
    kv_valid = jnp.concatenate([jnp.broadcast_to(jnp.arange(slots) < n_prefix, (b, slots)),
                                jnp.ones((b, t), bool)], axis=1)
    pos = jnp.broadcast_to(n_prefix + jnp.arange(t), (b, t))
    hidden, _ = decode(config, weights, ids, cache, positions=pos, cache_index=slots, kv_valid=kv_valid)
    read = jnp.take_along_axis(hidden, positions[..., None], axis=1)
    logits = decode_logits(config, weights, read)
    logp = jax.nn.log_softmax(logits, axis=-1)
    return jnp.take_along_axis(logp, targets, axis=-1), jnp.argmax(logits, axis=-1).astype(jnp.int32)


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    diff = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(diff[0]) if len(diff) else n


def shared_groups(rows: Sequence[Sequence[int]], positions: Sequence[Sequence[int]],
                  min_shared: int) -> list[tuple[int, list[int]]]:
    """Rows grouped by a shared prefix: `(prefix length, row indices)`, each group of at least two rows whose
    first `prefix length >= min_shared` tokens are equal, the prefix ending before every position read in them.
    Rows sorted in token order are walked once; rows in no group are left out."""
    order = sorted(range(len(rows)), key=lambda i: list(rows[i]))
    groups: list[tuple[int, list[int]]] = []
    members: list[int] = []
    shared = 0

    def limit(i):  # a row's prefix must end before its first read position and its last token
        return min(min(positions[i]), len(rows[i]) - 1)

    for i in order:
        if members:
            n = min(shared, _common_prefix(rows[members[-1]], rows[i]), limit(i))
            if n >= min_shared:
                members.append(i)
                shared = n
                continue
            if len(members) > 1:
                groups.append((shared, members))
        members, shared = [i], limit(i)
    if len(members) > 1:
        groups.append((shared, members))
    return groups


@dataclass
class Scored:
    """What `Scorer.score` returns for one row: log-probs `[k, c]` and the arg-max token at each position `[k]`."""

    logprobs: np.ndarray
    greedy: np.ndarray


class Scorer:
    """A model placed on a mesh for batched scoring (see the module doc); build once, call `score` many times."""

    def __init__(self, model: nnx.Module, *, batch_size: int = 8, mesh: jax.sharding.Mesh | None = None,
                 pad_id: int = 0, share_prefix: bool = True, min_shared: int = 64):
        self.config = model.config
        self.mesh = mesh if mesh is not None else make_mesh(MeshConfig())
        shards = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        self.batch_size = -(-max(1, batch_size) // shards) * shards  # every device gets whole rows
        graphdef, state = nnx.split(model)
        self.state = jax.device_put(state, state_shardings(state, self.mesh))
        self._batch = batch_sharding(self.mesh)
        self._fn = jax.jit(functools.partial(_score_batch, graphdef))
        self.pad_id = pad_id
        # the shared-prefix path runs the generation layout on one device (a mesh shards the plain path instead)
        self.min_shared = min_shared
        self._decode = None
        if share_prefix and self.mesh.devices.size == 1:
            self._decode = decode_weights(model, unstack=False)  # scanned layers: one small compile per shape

    @property
    def shares_prefix(self) -> bool:
        """Whether rows with a common prefix of at least `min_shared` tokens run it once (one-device meshes)."""
        return self._decode is not None

    def score(self, rows: Sequence[Sequence[int]], positions: Sequence[Sequence[int]],
              targets: Sequence[np.ndarray], *, progress=None) -> list[Scored]:
        """Score every row (see the module doc); `progress(n)` is called after each batch with its row count."""
        if not len(rows) == len(positions) == len(targets):
            raise ValueError(f"rows, positions and targets differ in number: {len(rows)}, {len(positions)}, "
                             f"{len(targets)}")
        out: list[Scored | None] = [None] * len(rows)
        grouped: set[int] = set()
        for n, members in (shared_groups(rows, positions, self.min_shared) if self.shares_prefix else []):
            self._run_group(rows, positions, targets, n, members, out, progress)
            grouped.update(members)
        order = sorted((i for i in range(len(rows)) if i not in grouped), key=lambda i: -len(rows[i]))
        for start in range(0, len(order), self.batch_size):
            chunk = order[start: start + self.batch_size]
            for i, scored in zip(chunk, self._run([rows[i] for i in chunk], [positions[i] for i in chunk],
                                                  [np.asarray(targets[i]) for i in chunk]), strict=True):
                out[i] = scored
            if progress is not None:
                progress(len(chunk))
        return out  # type: ignore[return-value]

    def _run_group(self, rows, positions, targets, n: int, members: list[int], out: list, progress) -> None:
        """Score the rows `members`, which share their first `n` tokens, against one cache of those tokens."""
        width = length_bucket(n)
        prefix = np.full((1, width), self.pad_id, np.int32)
        prefix[0, :n] = rows[members[0]][:n]
        cache = _prefix_cache(self._decode, jnp.asarray(prefix), config=self.config)
        order = sorted(members, key=lambda i: -len(rows[i]))
        for start in range(0, len(order), self.batch_size):
            chunk = order[start: start + self.batch_size]
            tails = [rows[i][n:] for i in chunk]
            ids, pos, tgt = self._pack(tails, [[p - n for p in positions[i]] for i in chunk],
                                       [np.asarray(targets[i]) for i in chunk], smallest=16)
            logp, greedy = _score_tails(self._decode, cache, jnp.int32(n), jnp.asarray(ids), jnp.asarray(pos),
                                        jnp.asarray(tgt), config=self.config)
            logp, greedy = np.asarray(logp), np.asarray(greedy)
            for j, i in enumerate(chunk):
                t = np.asarray(targets[i])
                out[i] = Scored(logp[j, : len(positions[i]), : t.shape[1]], greedy[j, : len(positions[i])])
            if progress is not None:
                progress(len(chunk))

    def _pack(self, rows, positions, targets, smallest: int = 32):
        """Rows right-padded to a length bucket, in a batch of `batch_size`; read positions and targets padded."""
        b = self.batch_size
        width = length_bucket(max(len(r) for r in rows), smallest)
        k = _next_pow2(max(len(p) for p in positions))
        c = _next_pow2(max(t.shape[1] for t in targets))
        ids = np.full((b, width), self.pad_id, np.int32)
        pos = np.zeros((b, k), np.int32)
        tgt = np.zeros((b, k, c), np.int32)
        for i, (row, p, t) in enumerate(zip(rows, positions, targets, strict=True)):
            if not len(row):
                raise ValueError("cannot score an empty row")
            if max(p) >= len(row) or min(p) < 0:
                raise ValueError(f"positions {list(p)} outside a row of {len(row)} tokens")
            ids[i, : len(row)] = row
            pos[i, : len(p)] = p
            tgt[i, : t.shape[0], : t.shape[1]] = t
        return ids, pos, tgt

    def _run(self, rows, positions, targets) -> list[Scored]:
        ids, pos, tgt = self._pack(rows, positions, targets)
        logp, greedy = self._fn(self.state, jax.device_put(ids, self._batch), jax.device_put(pos, self._batch),
                                jax.device_put(tgt, self._batch))
        logp, greedy = np.asarray(logp), np.asarray(greedy)
        return [Scored(logp[i, : len(p), : t.shape[1]], greedy[i, : len(p)])
                for i, (p, t) in enumerate(zip(positions, targets, strict=True))]
