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


@dataclass
class Scored:
    """What `Scorer.score` returns for one row: log-probs `[k, c]` and the arg-max token at each position `[k]`."""

    logprobs: np.ndarray
    greedy: np.ndarray


class Scorer:
    """A model placed on a mesh for batched scoring (see the module doc); build once, call `score` many times."""

    def __init__(self, model: nnx.Module, *, batch_size: int = 8, mesh: jax.sharding.Mesh | None = None,
                 pad_id: int = 0):
        self.config = model.config
        self.mesh = mesh if mesh is not None else make_mesh(MeshConfig())
        shards = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        self.batch_size = -(-max(1, batch_size) // shards) * shards  # every device gets whole rows
        graphdef, state = nnx.split(model)
        self.state = jax.device_put(state, state_shardings(state, self.mesh))
        self._batch = batch_sharding(self.mesh)
        self._fn = jax.jit(functools.partial(_score_batch, graphdef))
        self.pad_id = pad_id

    def score(self, rows: Sequence[Sequence[int]], positions: Sequence[Sequence[int]],
              targets: Sequence[np.ndarray], *, progress=None) -> list[Scored]:
        """Score every row (see the module doc); `progress(n)` is called after each batch with its row count."""
        if not len(rows) == len(positions) == len(targets):
            raise ValueError(f"rows, positions and targets differ in number: {len(rows)}, {len(positions)}, "
                             f"{len(targets)}")
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
        out: list[Scored | None] = [None] * len(rows)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start: start + self.batch_size]
            for i, scored in zip(chunk, self._run([rows[i] for i in chunk], [positions[i] for i in chunk],
                                                  [np.asarray(targets[i]) for i in chunk]), strict=True):
                out[i] = scored
            if progress is not None:
                progress(len(chunk))
        return out  # type: ignore[return-value]

    def _run(self, rows, positions, targets) -> list[Scored]:
        b = self.batch_size
        width = length_bucket(max(len(r) for r in rows))
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
        logp, greedy = self._fn(self.state, jax.device_put(ids, self._batch), jax.device_put(pos, self._batch),
                                jax.device_put(tgt, self._batch))
        logp, greedy = np.asarray(logp), np.asarray(greedy)
        return [Scored(logp[i, : len(p), : t.shape[1]], greedy[i, : len(p)])
                for i, (p, t) in enumerate(zip(positions, targets, strict=True))]
