"""The train and eval steps: pure functions of (state, frozen, batch), and the one builder that jits them.

`build_train_step` is the only place a train step is jitted: the trainer runs what it returns, `zhjax plan`
compiles the same thing from abstract shapes, and the benchmarks time it, so the planned, the benchmarked and the
trained program are one program.

A batch is a dict of `[accum, batch, seq]` int32 arrays (`input_ids`, `labels`, optional `segment_ids` and
`positions`), one slice per gradient-accumulation micro-batch. Labels are aligned with the inputs (HF
convention) and shifted here: position t predicts label t+1; -100 is ignored, and so is a target in a
different segment than its predictor (packed rows). The loss is float32 cross-entropy summed over target
tokens and divided by the number of target tokens of the whole step (token-weighted across micro-batches).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from zhjax.config import LoraConfig
from zhjax.data.loader import IGNORE_INDEX
from zhjax.parallel.rules import batch_sharding, microbatch_sharding, state_shardings
from zhjax.train.loss import chunked_head_loss
from zhjax.train.optim import accumulate_gradients, global_norm, parameter_name
from zhjax.train.state import TrainState, train_state_shardings


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


def vocab_row_masks(batch: dict[str, jax.Array], vocab_size: int) -> tuple[jax.Array, jax.Array]:
    """`(inputs, targets)`: boolean `[vocab]` masks of the tokens a step's batch reads and the tokens it predicts."""
    targets, weight = next_token_targets(jax.tree.map(lambda x: x.reshape(-1, x.shape[-1]), batch))
    none = jnp.zeros((vocab_size,), bool)
    inputs = none.at[batch["input_ids"].reshape(-1)].set(True, mode="drop")
    # an ignored target points past the end and is dropped
    outputs = none.at[jnp.where(weight, targets, vocab_size).reshape(-1)].set(True, mode="drop")
    return inputs, outputs


def lazy_vocab_rows(tree, inputs: jax.Array, outputs: jax.Array, *, tied: bool):
    """`tree` (gradients or updates of the trainable state) with the rows of absent tokens set to zero.

    `embed_tokens` keeps the rows of the tokens the batch reads, `lm_head` (a `[hidden, vocab]` kernel) the
    columns of the tokens it predicts; a `tied` embedding (the model has no `lm_head`) keeps both. Every other leaf
    is unchanged.
    """

    def keep(path, x):
        name = parameter_name(path)
        if name.endswith("embed_tokens.embedding"):
            rows = (inputs | outputs) if tied else inputs
            return jnp.where(rows[:, None], x, jnp.zeros((), x.dtype))
        if name.endswith("lm_head.kernel"):
            return jnp.where(outputs[None, :], x, jnp.zeros((), x.dtype))
        return x

    return jax.tree_util.tree_map_with_path(keep, tree)


def make_train_step(
    graphdef, optimizer: optax.GradientTransformation, *, use_dropout: bool, skip_nonfinite: bool = False,
    loss_chunk: int = 0, lazy_vocab: bool = False,
) -> Callable:
    """`step(state, frozen, batch) -> (state, metrics)` over a `TrainState`, unjitted (`build_train_step` jits it).

    Gradients exist only for `state.trainable`; the frozen state is an input that is never updated. Update k's
    dropout keys come from `fold_in(state.rng, k)`. With `skip_nonfinite` a step whose loss or gradient norm is not
    finite leaves the weights and optimizer state unchanged (the step still counts). `loss_chunk`: see
    `loss_sum_fn`. `lazy_vocab` (`optim.lazy_vocab_rows`): a vocabulary row moves only in the steps whose batch
    holds its token (`lazy_vocab_rows`): its gradient and its update are zero in the others, momentum and weight
    decay included.
    """

    def step(state: TrainState, frozen, batch):
        trainable, opt_state = state.trainable, state.opt_state

        def grad_fn(params, micro):
            micro_batch, micro_rng = micro
            loss = lambda p: loss_sum_fn(graphdef, p, frozen, micro_batch, micro_rng if use_dropout else None, loss_chunk)
            return jax.value_and_grad(loss, has_aux=True)(params)

        accum = batch["input_ids"].shape[0]
        rngs = jax.random.split(jax.random.fold_in(state.rng, state.step), accum)
        loss, grads, tokens = accumulate_gradients(grad_fn, trainable, (batch, rngs))
        if lazy_vocab:
            masks = vocab_row_masks(batch, trained_vocab_size(trainable))
            tied = not any(parameter_name(p).endswith("lm_head.kernel")
                           for tree in (trainable, frozen) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0])
            grads = lazy_vocab_rows(grads, *masks, tied=tied)
        grad_norm = global_norm(grads)
        updates, new_opt_state = optimizer.update(grads, opt_state, trainable)
        if lazy_vocab:
            updates = lazy_vocab_rows(updates, *masks, tied=tied)
        new_trainable = optax.apply_updates(trainable, updates)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        if skip_nonfinite:
            keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
            new_trainable, new_opt_state = keep(new_trainable, trainable), keep(new_opt_state, opt_state)
        metrics = {"loss": loss, "grad_norm": grad_norm, "tokens": tokens, "finite": finite}
        return TrainState(state.step + 1, new_trainable, new_opt_state, state.rng), metrics

    return step


def trained_vocab_size(trainable) -> int:
    """The vocabulary size read off the trainable `embed_tokens`/`lm_head` leaves (ValueError if neither trains)."""
    for path, x in jax.tree_util.tree_flatten_with_path(trainable)[0]:
        name = parameter_name(path)
        if name.endswith("embed_tokens.embedding"):
            return x.shape[0]
        if name.endswith("lm_head.kernel"):
            return x.shape[1]
    raise ValueError("optim.lazy_vocab_rows needs embed_tokens or lm_head among the trained modules")


@dataclasses.dataclass(frozen=True)
class TrainStep:
    """A job's jitted train step with the shardings of its inputs; calls and lowerings run under its mesh.

    `step(state, frozen, batch) -> (state, metrics)`; the state is donated (its buffers are reused for the new
    state), the frozen weights are not.
    """

    jitted: Any
    mesh: jax.sharding.Mesh
    state_shardings: TrainState
    frozen_shardings: Any
    batch_sharding: jax.sharding.NamedSharding  # the `[accum, batch, seq]` arrays

    def __call__(self, state: TrainState, frozen, batch):
        with jax.set_mesh(self.mesh):  # per-device kernels (splash attention) shard_map over the context mesh
            return self.jitted(state, frozen, batch)

    def lower(self, state: TrainState, frozen, batch):
        """The step lowered for these (abstract or concrete) arguments; `.compile()` it, or read `.as_text()`."""
        with jax.set_mesh(self.mesh):
            return self.jitted.lower(state, frozen, batch)


def compiler_options(mesh: jax.sharding.Mesh) -> dict[str, str] | None:
    """XLA options for a step compiled for `mesh`: on CPU, no while-loop-invariant code motion.

    XLA:CPU computes the non-dot ops of bfloat16 in float32 (its float normalization wraps each one in converts),
    including the `dynamic-slice` that takes one layer's weights out of the scanned stack. Invariant code motion
    then hoists the stack's convert out of the layer loop: every step wrote a float32 copy of all frozen weights
    (twice their bytes) and each layer read its slice back from it. Without the pass each layer converts only its
    own slice; the demo's bf16 step is about 5% faster, and nothing else in it depended on the hoisting. On
    accelerators the pass stays on (it hoists, e.g., loop-invariant collectives).
    """
    if mesh.devices.flat[0].platform == "cpu":
        return {"xla_disable_hlo_passes": "while-loop-invariant-code-motion"}
    return None


def build_train_step(
    graphdef, tx: optax.GradientTransformation, trainable, frozen, mesh: jax.sharding.Mesh, *,
    lora: LoraConfig | None, skip_nonfinite: bool = False, loss_chunk: int = 0, lazy_vocab: bool = False,
) -> TrainStep:
    """The one jitted train step of zhjax: the trainer runs it, the planner compiles it, the benchmarks time it.

    `trainable` and `frozen` may be arrays or abstract shapes (only their shapes and logical axes are read).
    Dropout is on exactly when the model has LoRA adapters with `lora_dropout > 0`.
    """
    state_sh = train_state_shardings(tx, trainable, mesh)
    frozen_sh = state_shardings(frozen, mesh)
    micro_sh = microbatch_sharding(mesh)
    use_dropout = lora is not None and lora.lora_dropout > 0
    if lazy_vocab:
        trained_vocab_size(trainable)  # the error before any compilation
    fn = make_train_step(graphdef, tx, use_dropout=use_dropout, skip_nonfinite=skip_nonfinite, loss_chunk=loss_chunk,
                         lazy_vocab=lazy_vocab)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    jitted = jax.jit(fn, in_shardings=(state_sh, frozen_sh, micro_sh), out_shardings=(state_sh, replicated),
                     donate_argnums=0, compiler_options=compiler_options(mesh))
    return TrainStep(jitted, mesh, state_sh, frozen_sh, micro_sh)


def make_eval_step(graphdef, loss_chunk: int = 0) -> Callable:
    """`eval_step(trainable, frozen, batch) -> (loss_sum, tokens)` for one `[b, t]` batch, no dropout."""

    def eval_step(trainable, frozen, batch):
        return loss_sum_fn(graphdef, trainable, frozen, batch, None, loss_chunk)

    return eval_step


def build_eval_step(graphdef, train_step: TrainStep, loss_chunk: int = 0) -> Callable:
    """`make_eval_step` jitted with the train step's shardings, run under its mesh."""
    jitted = jax.jit(make_eval_step(graphdef, loss_chunk),
                     in_shardings=(train_step.state_shardings.trainable, train_step.frozen_shardings,
                                   batch_sharding(train_step.mesh)),
                     compiler_options=compiler_options(train_step.mesh))

    def eval_step(trainable, frozen, batch):
        with jax.set_mesh(train_step.mesh):
            return jitted(trainable, frozen, batch)

    return eval_step
