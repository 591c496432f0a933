"""Choosing the next token: transformers' logits processors, in JAX, and the sampler the decode loop runs.

The processors compute what `transformers`' `RepetitionPenaltyLogitsProcessor`, `TemperatureLogitsWarper`,
`TopKLogitsWarper` and `TopPLogitsWarper` compute, on float32 `[batch, vocab]` logits, and `transformers` applies
them in that order when sampling (the penalty alone when decoding greedily):

- repetition penalty: a token already in the row (its prompt's real tokens, left padding excluded, and what was
  generated) has its logit divided by the penalty when positive, multiplied when negative;
- temperature: logits / temperature;
- top-k: logits below the k-th largest become -inf (ties with the k-th are kept);
- top-p: sort ascending, softmax, cumulative sum; tokens whose cumulative probability is <= 1 - top_p become
  -inf, the most probable one always stays.

`choose_tokens` is what the jitted loop calls. With top-k on, it works on the k candidates `lax.top_k` returns
instead of sorting the whole vocabulary for top-p (a sort of 49k floats per row per step costs more than the
model on CPU): temperature is monotone, so the candidates are the same, and top-p over k candidates whose other
logits are -inf is top-p over the vocabulary. The one difference: a tie with the k-th logit keeps exactly k.
Sampling draws from the processed distribution with `jax.random.categorical` keyed by (seed, step), so a run is
reproducible whether its tokens are streamed one by one or produced in one call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp

NEG_INF = -jnp.inf


def _divide(x: jax.Array, divisor) -> jax.Array:
    """`x / divisor`, correctly rounded as torch computes it. XLA rewrites a division by a broadcast scalar into a
    multiplication by its reciprocal (1 ulp off for about a quarter of the values); a full-size divisor hidden
    behind an optimisation barrier keeps it a true division."""
    full = jnp.broadcast_to(jnp.asarray(divisor, x.dtype), x.shape)
    return x / jax.lax.optimization_barrier(full)


def apply_repetition_penalty(logits: jax.Array, seen: jax.Array, penalty: float | jax.Array) -> jax.Array:
    """Penalise the tokens marked in `seen` `[batch, vocab]` (bool): positive logits / penalty, negative * penalty."""
    penalized = jnp.where(logits < 0, logits * jnp.asarray(penalty, logits.dtype), _divide(logits, penalty))
    return jnp.where(seen, penalized, logits)


def apply_temperature(logits: jax.Array, temperature: float | jax.Array) -> jax.Array:
    """Logits divided by the temperature."""
    return _divide(logits, temperature)


def apply_top_k(logits: jax.Array, top_k: int) -> jax.Array:
    """-inf below the `top_k`-th largest logit of each row (ties with it stay)."""
    k = min(int(top_k), logits.shape[-1])
    kth = jax.lax.top_k(logits, k)[0][..., -1:]
    return jnp.where(logits < kth, NEG_INF, logits)


def _top_p_remove_sorted(sorted_ascending: jax.Array, top_p: float | jax.Array, min_tokens_to_keep: int) -> jax.Array:
    cumulative = jnp.cumsum(jax.nn.softmax(sorted_ascending, axis=-1), axis=-1)
    remove = cumulative <= 1 - top_p
    return remove.at[..., -min_tokens_to_keep:].set(False)


def apply_top_p(logits: jax.Array, top_p: float | jax.Array, min_tokens_to_keep: int = 1) -> jax.Array:
    """Nucleus filtering over the whole vocabulary, as `TopPLogitsWarper` computes it (an ascending sort)."""
    order = jnp.argsort(logits, axis=-1)
    remove_sorted = _top_p_remove_sorted(jnp.take_along_axis(logits, order, axis=-1), top_p, min_tokens_to_keep)
    remove = jnp.take_along_axis(remove_sorted, jnp.argsort(order, axis=-1), axis=-1)
    return jnp.where(remove, NEG_INF, logits)


@dataclass(frozen=True)
class Sampler:
    """The compile-time shape of the token choice (the float settings are traced `Knobs`).

    `top_k == 0` turns top-k off; `use_top_p` / `use_penalty` switch the processors on (transformers skips
    top_p >= 1 and a penalty of 1). `eos_ids` end a row; finished rows emit `pad_id`.
    """

    greedy: bool
    top_k: int
    use_top_p: bool
    use_penalty: bool
    eos_ids: tuple[int, ...]
    pad_id: int


class Knobs(NamedTuple):
    """Sampling settings that may change between calls without recompiling."""

    temperature: jax.Array
    top_p: jax.Array
    repetition_penalty: jax.Array


def make_knobs(temperature: float, top_p: float, repetition_penalty: float) -> Knobs:
    """`Knobs` as float32 scalars."""
    return Knobs(*(jnp.float32(x) for x in (temperature, top_p, repetition_penalty)))


def candidate_logits(
    logits: jax.Array, seen: jax.Array, sampler: Sampler, knobs: Knobs
) -> tuple[jax.Array, jax.Array | None]:
    """The processed logits a token is sampled from: `(values, indices)` of the top-k candidates (descending,
    temperature and top-p applied), or `(logits over the vocabulary, None)` when top-k is off."""
    if sampler.use_penalty:
        logits = apply_repetition_penalty(logits, seen, knobs.repetition_penalty)
    logits = apply_temperature(logits, knobs.temperature)
    if sampler.top_k > 0:
        values, indices = jax.lax.top_k(logits, min(sampler.top_k, logits.shape[-1]))
        if sampler.use_top_p:
            remove = _top_p_remove_sorted(values[..., ::-1], knobs.top_p, 1)[..., ::-1]
            values = jnp.where(remove, NEG_INF, values)
        return values, indices
    if sampler.use_top_p:
        logits = apply_top_p(logits, knobs.top_p)
    return logits, None


def argmax(logits: jax.Array) -> jax.Array:
    """`jnp.argmax` over the last axis (the first maximal index), as two plain reductions: XLA:CPU's fused
    (value, index) reduction is several times slower on a vocabulary-wide row."""
    best = jnp.max(logits, axis=-1, keepdims=True)
    iota = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
    return jnp.min(jnp.where(logits == best, iota, logits.shape[-1]), axis=-1)


def choose_tokens(logits: jax.Array, seen: jax.Array, key: jax.Array, sampler: Sampler, knobs: Knobs) -> jax.Array:
    """The next token of each row `[batch]` from float32 `logits` `[batch, vocab]`."""
    if sampler.greedy:
        if sampler.use_penalty:
            logits = apply_repetition_penalty(logits, seen, knobs.repetition_penalty)
        return argmax(logits)
    values, indices = candidate_logits(logits, seen, sampler, knobs)
    choice = jax.random.categorical(key, values, axis=-1).astype(jnp.int32)
    if indices is None:
        return choice
    return jnp.take_along_axis(indices, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
