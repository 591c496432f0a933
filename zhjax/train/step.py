"""The train and eval steps: pure functions of (trainable, frozen, batch), jitted by the trainer.

A batch is a dict of `[accum, batch, seq]` int32 arrays (`input_ids`, `labels`, optional `segment_ids` and
`positions`), one slice per gradient-accumulation micro-batch. Labels are aligned with the inputs (HF
convention) and shifted here: position t predicts label t+1; -100 is ignored, and so is a target in a
different segment than its predictor (packed rows). The loss is float32 cross-entropy summed over target
tokens and divided by the number of target tokens of the whole step (token-weighted across micro-batches).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from zhjax.train.loss import chunked_head_loss
from zhjax.train.optim import accumulate_gradients, global_norm

IGNORE_INDEX = -100


def next_token_targets(batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """Targets `[b, t-1]` of positions 0..t-2 (the labels shifted) and their boolean weight."""
    labels = batch["labels"][:, 1:]
    weight = labels != IGNORE_INDEX
    seg = batch.get("segment_ids")
    if seg is not None:
        weight &= seg[:, 1:] == seg[:, :-1]
    return labels, weight


def token_losses(logits: jax.Array, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """Per-position float32 cross-entropy `[b, t-1]` of next-token prediction and its 0/1 weight."""
    labels, weight = next_token_targets(batch)
    logits = logits[:, :-1].astype(jnp.float32)
    safe = jnp.where(weight, labels, 0)
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, safe[..., None], axis=-1)[..., 0]
    return (lse - picked) * weight, weight.astype(jnp.float32)


def loss_sum_fn(graphdef, trainable, frozen, batch, dropout_rng, loss_chunk: int = 0) -> tuple[jax.Array, jax.Array]:
    """`(sum of token losses, number of target tokens)` of one micro-batch.

    `loss_chunk > 0` runs the LM head and cross-entropy fused, that many token rows at a time
    (`zhjax.train.loss`): the same loss and gradients without `[tokens, vocab]` logits.
    """
    model = nnx.merge(graphdef, trainable, frozen)
    kw = dict(positions=batch.get("positions"), segment_ids=batch.get("segment_ids"), dropout_rng=dropout_rng)
    if not loss_chunk:
        losses, weight = token_losses(model(batch["input_ids"], **kw), batch)
        return losses.sum(), weight.sum()
    h = model.hidden_states(batch["input_ids"], **kw)[:, :-1]
    targets, weight = next_token_targets(batch)
    weight = weight.astype(jnp.float32)
    loss = chunked_head_loss(
        h.reshape(-1, h.shape[-1]), model.lm_head_weight(), targets.reshape(-1), weight.reshape(-1), loss_chunk
    )
    return loss, weight.sum()


def make_train_step(
    graphdef, optimizer: optax.GradientTransformation, *, use_dropout: bool, skip_nonfinite: bool = False,
    loss_chunk: int = 0,
) -> Callable:
    """`step(trainable, opt_state, frozen, batch, rng, step) -> (trainable, opt_state, metrics)`, unjitted.

    Gradients exist only for `trainable`; the frozen state is an input that is never updated. With
    `skip_nonfinite` a step whose loss or gradient norm is not finite leaves the state unchanged. `loss_chunk`:
    see `loss_sum_fn`.
    """

    def step(trainable, opt_state, frozen, batch, rng, step):
        def grad_fn(params, micro):
            micro_batch, micro_rng = micro
            loss = lambda p: loss_sum_fn(graphdef, p, frozen, micro_batch, micro_rng if use_dropout else None, loss_chunk)
            return jax.value_and_grad(loss, has_aux=True)(params)

        accum = batch["input_ids"].shape[0]
        rngs = jax.random.split(jax.random.fold_in(rng, step), accum)
        loss, grads, tokens = accumulate_gradients(grad_fn, trainable, (batch, rngs))
        grad_norm = global_norm(grads)
        updates, new_opt_state = optimizer.update(grads, opt_state, trainable)
        new_trainable = optax.apply_updates(trainable, updates)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        if skip_nonfinite:
            keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
            new_trainable, new_opt_state = keep(new_trainable, trainable), keep(new_opt_state, opt_state)
        metrics = {"loss": loss, "grad_norm": grad_norm, "tokens": tokens, "finite": finite}
        return new_trainable, new_opt_state, metrics

    return step


def make_eval_step(graphdef, loss_chunk: int = 0) -> Callable:
    """`eval_step(trainable, frozen, batch) -> (loss_sum, tokens)` for one `[b, t]` batch, no dropout."""

    def eval_step(trainable, frozen, batch):
        return loss_sum_fn(graphdef, trainable, frozen, batch, None, loss_chunk)

    return eval_step
