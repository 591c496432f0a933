"""The optimizer of a zhjax run: global-norm clipping, AdamW and a warmup schedule, over the trainable state only.

The seed trains with Hugging Face `Trainer`: `clip_grad_norm_(max_grad_norm)`, then `torch.optim.AdamW` with two
parameter groups (weight decay on most weights, none on biases and norms), then `lr_scheduler.step()`. This module
reproduces that update step for step with optax, so that a zhjax run and the seed's PyTorch run agree to float
rounding:

- `learning_rate_schedule` is HF's `get_{cosine,linear,constant}_schedule_with_warmup` as an `optax.Schedule`.
  HF steps its scheduler *after* the optimizer, so the update with index k (from 0) uses `schedule(k)`, which is
  exactly how optax counts. The warmup length follows `TrainingArguments.get_warmup_steps`:
  `ceil(num_training_steps * warmup_ratio)` unless `warmup_steps > 0`.
- `decay_mask` decides weight decay by a leaf's path with the name patterns of `Trainer.get_decay_parameter_names`
  (anything named like a bias or a norm is not decayed); zhjax's norms are all named `*_layernorm` or `norm`.
- `clip_by_global_norm` scales gradients by `min(1, max_norm / (norm + 1e-6))`, torch's formula (optax's own clip
  divides by the norm without the epsilon and leaves norms under the limit alone); `global_norm` gives the
  pre-clip norm for the logs (inside the same jitted step XLA can share the two reductions).
- `build_optimizer` chains clipping with AdamW as optax builds it (Adam scaling, masked `add_decayed_weights`,
  `scale_by_learning_rate`: decoupled decay `p -= lr * wd * p`, as torch's `AdamW`), except that the Adam scaling
  is `scale_by_adam` here: optax computes the bias correction `1 - b2**t` in float32, where `b2 = 0.999` rounds to
  0.99900001 and `1 - b2**t` comes out 1e-5 relative off torch's float64 value early in training; computing it
  as `-expm1(t * log(b2))` with `log(b2)` taken in float64 keeps it to float32 precision.

The optimizer is built for, initialised on and applied to the *trainable* state only (LoRA adapters plus
`modules_to_save`, or every parameter when fine-tuning in full). Frozen weights never reach it, so they have no
gradients, no Adam moments and cannot move. (`optax.masked` would be the wrong tool for freezing: it passes a
masked-out leaf's raw gradient through as its update.)

Gradient accumulation happens in the train step, not in the optimizer. `accumulate_gradients` runs the
micro-batches of one optimizer step through `lax.scan` inside a single jitted call and divides the summed
gradients by the number of target tokens of the whole step, so the loss is token-weighted across micro-batches
(transformers' `num_items_in_batch` semantics). An `optax.MultiSteps` wrapper would instead average per-micro-batch
mean losses (wrong when micro-batches hold different numbers of tokens), keep a gradient-sized accumulator in the
optimizer state (to shard and checkpoint) and need one jitted call per micro-batch; with in-step
accumulation every optimizer update is one call, the schedule counts optimizer steps, and clipping sees the full
accumulated gradient, as in HF. `OptimConfig.gradient_accumulation_steps` therefore tells the trainer how many
micro-batches to stack; the optimizer itself does not read it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

LR_SCHEDULER_TYPES = ("cosine", "linear", "constant_with_warmup")

# Lower-cased leaf names matching any of these get no weight decay. They are the patterns of transformers 5.24
# `Trainer.get_decay_parameter_names`; HF also skips `nn.LayerNorm` modules by type, which zhjax's RMSNorms, named
# `input_layernorm`, `post_attention_layernorm` and `norm`, already match by name.
NO_DECAY_PATTERNS = (r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)")
_NO_DECAY = tuple(re.compile(p) for p in NO_DECAY_PATTERNS)

# torch.nn.utils.clip_grad_norm_ adds this to the norm before dividing.
_CLIP_EPS = 1e-6

PyTree = Any


@dataclass(frozen=True)
class OptimConfig:
    """AdamW, clipping, schedule and accumulation settings, with the seed's pre-training defaults.

    `max_grad_norm` of 0 or None disables clipping. `warmup_steps > 0` overrides `warmup_ratio`, as in HF.
    `gradient_accumulation_steps` is the number of micro-batches per optimizer step (see the module docstring).
    """

    learning_rate: float = 2e-4
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float | None = 1.0
    warmup_ratio: float = 0.05
    warmup_steps: int = 0
    lr_scheduler_type: str = "cosine"
    gradient_accumulation_steps: int = 1
    # peak learning rate of the fully trained `embed_tokens`/`lm_head` (None: `learning_rate`), as a second torch
    # parameter group would have it (the same schedule shape). The demo trains them at a tenth of LoRA's 1e-3, so
    # that the rows fitted at the resize (`zhjax.tokenizer.transfer`) keep their start (README: "The demo, measured").
    embedding_learning_rate: float | None = None
    # move a row of `embed_tokens`/`lm_head` only in the steps whose batch reads (embedding) or predicts (head) its
    # token, as torch's SparseAdam does for sparse embeddings (`zhjax.train.step.lazy_vocab_rows`)
    lazy_vocab_rows: bool = False

    def __post_init__(self) -> None:
        if self.lr_scheduler_type not in LR_SCHEDULER_TYPES:
            raise ValueError(
                f"optim.lr_scheduler_type {self.lr_scheduler_type!r} is not supported; expected one of "
                f"{LR_SCHEDULER_TYPES}"
            )
        if not self.learning_rate >= 0:
            raise ValueError(f"optim.learning_rate must be >= 0, got {self.learning_rate}")
        if self.embedding_learning_rate is not None and not self.embedding_learning_rate >= 0:
            raise ValueError(
                f"optim.embedding_learning_rate must be >= 0 (or null: learning_rate), got {self.embedding_learning_rate}"
            )
        if self.embedding_learning_rate and not self.learning_rate:
            raise ValueError("optim.embedding_learning_rate needs learning_rate > 0 (it is applied as a ratio to it)")
        if not isinstance(self.lazy_vocab_rows, bool):
            raise ValueError(f"optim.lazy_vocab_rows must be true or false, got {self.lazy_vocab_rows!r}")
        if not self.weight_decay >= 0:
            raise ValueError(f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"optim.{name} must be in [0, 1), got {getattr(self, name)}")
        if not self.adam_epsilon >= 0:
            raise ValueError(f"optim.adam_epsilon must be >= 0, got {self.adam_epsilon}")
        if self.max_grad_norm is not None and not self.max_grad_norm >= 0:
            raise ValueError(
                f"optim.max_grad_norm must be >= 0 (0 or None disables clipping), got {self.max_grad_norm}"
            )
        if not 0.0 <= self.warmup_ratio <= 1.0:
            raise ValueError(f"optim.warmup_ratio must be in [0, 1], got {self.warmup_ratio}")
        if (
            isinstance(self.warmup_steps, bool)
            or not isinstance(self.warmup_steps, int)
            or self.warmup_steps < 0
        ):
            raise ValueError(f"optim.warmup_steps must be a non-negative integer, got {self.warmup_steps!r}")
        if (
            isinstance(self.gradient_accumulation_steps, bool)
            or not isinstance(self.gradient_accumulation_steps, int)
            or self.gradient_accumulation_steps < 1
        ):
            raise ValueError(
                f"optim.gradient_accumulation_steps must be a positive integer, got {self.gradient_accumulation_steps!r}"
            )


def num_warmup_steps(cfg: OptimConfig, num_training_steps: int) -> int:
    """Warmup length as HF computes it: `warmup_steps` if positive, else `ceil(num_training_steps * warmup_ratio)`.

    (transformers 5 keeps one float `warmup_steps` whose values below 1 are the ratio; the count is the same.)
    """
    if cfg.warmup_steps > 0:
        return cfg.warmup_steps
    return math.ceil(num_training_steps * cfg.warmup_ratio)


def learning_rate_schedule(cfg: OptimConfig, num_training_steps: int, warmup: int | None = None) -> optax.Schedule:
    """The learning rate of optimizer update k (k = 0, 1, ...), equal to HF's scheduler for the same settings.

    Linear warmup from 0 over `num_warmup_steps` (or `warmup` steps, as a time-budgeted run may keep), then cosine
    to 0 at `num_training_steps` (`"cosine"`, HF's default half cycle), a straight line to 0 (`"linear"`), or the
    peak (`"constant_with_warmup"`). Works on scalars and arrays of steps; returns float32.
    """
    if num_training_steps < 1:
        raise ValueError(f"num_training_steps must be >= 1, got {num_training_steps}")
    if warmup is None:
        warmup = num_warmup_steps(cfg, num_training_steps)
    return lambda count: _schedule_value(cfg, count, num_training_steps, warmup)


def _schedule_value(cfg: OptimConfig, count, num_training_steps, warmup) -> jax.Array:
    """`learning_rate_schedule`'s value at `count`; the step counts may be Python ints or int32 arrays (traced)."""
    count = jnp.asarray(count, jnp.int32)
    warm = count.astype(jnp.float32) / jnp.maximum(1, warmup).astype(jnp.float32)
    decay_steps = jnp.maximum(1, num_training_steps - warmup).astype(jnp.float32)
    # fraction of the decay phase still ahead; integer subtraction first keeps it exact
    remaining = (num_training_steps - count).astype(jnp.float32) / decay_steps
    if cfg.lr_scheduler_type == "cosine":
        # HF's 0.5 * (1 + cos(pi * progress)) equals sin(pi/2 * (1 - progress))**2 for every progress; the sine
        # form keeps full float32 relative precision near the end of the schedule, where 1 + cos cancels.
        decay = jnp.square(jnp.sin(0.5 * math.pi * remaining))
    elif cfg.lr_scheduler_type == "linear":
        decay = jnp.maximum(0.0, remaining)
    else:
        decay = jnp.ones_like(remaining)
    return cfg.learning_rate * jnp.where(count < warmup, warm, decay)


class ScheduleLengthState(NamedTuple):
    """The update count and the length of the schedule it is read against (`scale_by_schedule_of_length`)."""

    count: jax.Array  # int32: updates applied so far
    num_training_steps: jax.Array  # int32
    num_warmup_steps: jax.Array  # int32


def scale_by_schedule_of_length(cfg: OptimConfig, num_training_steps: int) -> optax.GradientTransformation:
    """`optax.scale_by_learning_rate(learning_rate_schedule(cfg, n))` with `n` and its warmup in the state.

    A run with a time budget learns its number of steps only after it has timed one (`zhjax.train.trainer`); with
    the length in the state, `set_schedule_length` changes it between two updates without recompiling the step.
    Until then the schedule runs over `num_training_steps` (an upper bound). The rate of update k equals
    `learning_rate_schedule(cfg, n)(k)` for the length `n` in force at that update.
    """

    def init_fn(params: PyTree) -> ScheduleLengthState:
        del params
        return ScheduleLengthState(count=jnp.zeros((), jnp.int32),
                                   num_training_steps=jnp.asarray(num_training_steps, jnp.int32),
                                   num_warmup_steps=jnp.asarray(num_warmup_steps(cfg, num_training_steps), jnp.int32))

    def update_fn(updates: PyTree, state: ScheduleLengthState, params: PyTree | None = None):
        del params
        rate = _schedule_value(cfg, state.count, state.num_training_steps, state.num_warmup_steps)
        updates = jax.tree.map(lambda u: (-rate * u).astype(u.dtype), updates)
        return updates, state._replace(count=optax.safe_increment(state.count))

    return optax.GradientTransformation(init_fn, update_fn)


def set_schedule_length(opt_state: PyTree, cfg: OptimConfig, num_training_steps: int,
                        keep_warmup: bool = False) -> PyTree:
    """`opt_state` (of an optimizer built with `schedule_length_in_state`) with its schedule over
    `num_training_steps` from the next update on, its warmup recomputed as HF computes it for that length (or the
    warmup it has, `keep_warmup`: for a length corrected after some warmup updates were applied); the new scalars
    keep the placement of the ones they replace."""
    if num_training_steps < 1:
        raise ValueError(f"num_training_steps must be >= 1, got {num_training_steps}")
    from zhjax.train.state import step_array

    old = optax.tree.get(opt_state, "ScheduleLengthState")
    warmup = old.num_warmup_steps if keep_warmup else step_array(num_warmup_steps(cfg, num_training_steps),
                                                                  old.num_warmup_steps.sharding)
    return optax.tree.set(
        opt_state,
        num_training_steps=step_array(num_training_steps, old.num_training_steps.sharding),
        num_warmup_steps=warmup,
    )


def _key_name(key: Any) -> str:
    if isinstance(key, jax.tree_util.DictKey):
        k = key.key
        return ".".join(map(str, k)) if isinstance(k, tuple) else str(k)
    if isinstance(key, jax.tree_util.SequenceKey):
        return str(key.idx)
    if isinstance(key, jax.tree_util.GetAttrKey):
        return key.name
    if isinstance(key, jax.tree_util.FlattenedIndexKey):
        return str(key.key)
    return str(key)


def parameter_name(path: tuple[Any, ...]) -> str:
    """Dotted name of a leaf from its pytree path, e.g. `layers.self_attn.q_proj.bias`.

    A trailing `.value` (how an `nnx.Variable` in an `nnx.State` holds its array) is dropped, and `/` in keys
    (flattened states) becomes `.`.
    """
    if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name == "value":
        path = path[:-1]
    return ".".join(_key_name(k) for k in path).replace("/", ".")


def decays(name: str) -> bool:
    """Whether HF Trainer would apply weight decay to a parameter of this (dotted) name."""
    lowered = name.lower()
    return not any(p.search(lowered) for p in _NO_DECAY)


def decay_mask(params: PyTree) -> PyTree:
    """A pytree like `params` with True on the leaves that get weight decay, False on biases and norms.

    Works on nested dicts and on `nnx.State` (whose mask keeps the `Variable` wrappers around the booleans).
    """
    return jax.tree_util.tree_map_with_path(lambda path, _: decays(parameter_name(path)), params)


EMBEDDING_PATTERN = re.compile(r"(?:^|\.)(?:embed_tokens|lm_head)(?:$|\.)")


def embedding_mask(params: PyTree) -> PyTree:
    """True on the `embed_tokens` and `lm_head` leaves (the vocabulary rows), False elsewhere (LoRA, norms)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: bool(EMBEDDING_PATTERN.search(parameter_name(path))), params
    )


def scale_where(factor: float, mask: PyTree) -> optax.GradientTransformation:
    """Multiply the updates of the leaves where `mask` is True by `factor` (the others pass unchanged)."""

    def update_fn(updates: PyTree, state: optax.EmptyState, params: PyTree | None = None):
        del params
        return jax.tree.map(lambda u, m: (u * factor).astype(u.dtype) if m else u, updates, mask), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def global_norm(tree: PyTree) -> jax.Array:
    """L2 norm over all leaves of a pytree, accumulated in float32 (the pre-clip gradient norm the trainer logs)."""
    leaves = jax.tree.leaves(tree)
    if not leaves:
        return jnp.zeros((), jnp.float32)
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves))


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
    """Scale all gradients by `min(1, max_norm / (global_norm + 1e-6))`, as `torch.nn.utils.clip_grad_norm_`."""

    def init_fn(params: PyTree) -> optax.EmptyState:
        del params
        return optax.EmptyState()

    def update_fn(updates: PyTree, state: optax.EmptyState, params: PyTree | None = None):
        del params
        scale = jnp.minimum(1.0, max_norm / (global_norm(updates) + _CLIP_EPS))
        return jax.tree.map(lambda g: (g * scale).astype(g.dtype), updates), state

    return optax.GradientTransformation(init_fn, update_fn)


def _bias_correction(decay: float, count: jax.Array) -> jax.Array:
    """`1 - decay**count` to float32 precision (`log(decay)` is taken in float64, no cancellation)."""
    return -jnp.expm1(count.astype(jnp.float32) * math.log(decay))


def scale_by_adam(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> optax.GradientTransformation:
    """Adam's `m_hat / (sqrt(v_hat) + eps)` with torch's bias correction; state is an `optax.ScaleByAdamState`.

    Same moments and update as `optax.scale_by_adam`, but `1 - b**t` is computed without float32 cancellation
    (see the module docstring), so that it agrees with `torch.optim.AdamW` to float32 rounding.
    """

    def init_fn(params: PyTree) -> optax.ScaleByAdamState:
        return optax.ScaleByAdamState(
            count=jnp.zeros((), jnp.int32), mu=optax.tree.zeros_like(params), nu=optax.tree.zeros_like(params)
        )

    def update_fn(updates: PyTree, state: optax.ScaleByAdamState, params: PyTree | None = None):
        del params
        mu = optax.tree.update_moment(updates, state.mu, b1, 1)
        nu = optax.tree.update_moment_per_elem_norm(updates, state.nu, b2, 2)
        count = optax.safe_increment(state.count)
        bc1 = _bias_correction(b1, count)
        bc2_sqrt = jnp.sqrt(_bias_correction(b2, count))
        # torch's order: (m / bc1) / (sqrt(v) / sqrt(bc2) + eps)
        updates = jax.tree.map(lambda m, v: (m / bc1) / (jnp.sqrt(v) / bc2_sqrt + eps), mu, nu)
        return updates, optax.ScaleByAdamState(count=count, mu=mu, nu=nu)

    return optax.GradientTransformation(init_fn, update_fn)


def build_optimizer(
    cfg: OptimConfig, trainable: PyTree, num_training_steps: int, *, schedule_length_in_state: bool = False
) -> optax.GradientTransformation:
    """Clipping (unless `max_grad_norm` is 0/None) then AdamW on `learning_rate_schedule`, for `trainable`.

    `trainable` is the trainable state only (arrays or `jax.ShapeDtypeStruct`s; only its paths are read, to
    build the weight-decay mask). Initialise the result with the same state and feed it gradients of the same
    structure. `schedule_length_in_state`: the schedule's length lives in the optimizer state, where
    `set_schedule_length` can change it during the run (`scale_by_schedule_of_length`; time-budgeted runs).
    """
    parts = [clip_by_global_norm(cfg.max_grad_norm)] if cfg.max_grad_norm else []
    parts += [
        scale_by_adam(cfg.adam_beta1, cfg.adam_beta2, cfg.adam_epsilon),
        optax.add_decayed_weights(cfg.weight_decay, mask=decay_mask(trainable)),
        scale_by_schedule_of_length(cfg, num_training_steps) if schedule_length_in_state
        else optax.scale_by_learning_rate(learning_rate_schedule(cfg, num_training_steps)),
    ]
    if cfg.embedding_learning_rate is not None and cfg.embedding_learning_rate != cfg.learning_rate:
        # same schedule shape, another peak: the decoupled decay is scaled too, as in a torch parameter group
        ratio = cfg.embedding_learning_rate / cfg.learning_rate if cfg.learning_rate else 0.0  # 0 / 0: nothing moves
        parts.append(scale_where(ratio, embedding_mask(trainable)))
    return optax.chain(*parts)


GradFn = Callable[[PyTree, PyTree], tuple[tuple[jax.Array, jax.Array], PyTree]]


def accumulate_gradients(
    grad_fn: GradFn, params: PyTree, microbatches: PyTree
) -> tuple[jax.Array, PyTree, jax.Array]:
    """Token-weighted loss and gradients over stacked micro-batches, summed with `lax.scan`.

    `grad_fn(params, microbatch) -> ((loss_sum, num_tokens), grads)` returns the *sum* of the token losses of
    one micro-batch, its number of target tokens and the gradients of that sum; `jax.value_and_grad(f,
    has_aux=True)` of an `f` returning `(loss_sum, num_tokens)` has this form. Every leaf of `microbatches` has a
    leading micro-batch axis (per-micro-batch RNG keys may ride along as a leaf). Returns `(loss, grads,
    num_tokens)` with loss and gradients divided by the tokens of the whole step, i.e. the mean over all its
    tokens, whatever their split into micro-batches. Sums are kept in float32.
    """

    def body(carry, microbatch):
        loss_sum, tokens, grad_sum = carry
        (loss, n), grads = grad_fn(params, microbatch)
        grad_sum = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), grad_sum, grads)
        return (
            loss_sum + jnp.asarray(loss, jnp.float32),
            tokens + jnp.asarray(n, jnp.float32),
            grad_sum,
        ), None

    if jax.tree.leaves(microbatches)[0].shape[0] == 1:
        # one micro-batch: its gradients as they are, without a float32 accumulator of every trainable weight to
        # zero and add into (on the demo's CPU step, 63 M weights: about 1% of the step)
        (loss_sum, tokens), grad_sum = grad_fn(params, jax.tree.map(lambda x: x[0], microbatches))
        loss_sum, tokens = jnp.asarray(loss_sum, jnp.float32), jnp.asarray(tokens, jnp.float32)
    else:
        # zeros_like keeps each parameter's sharding (needed for a scan carry under explicit mesh axes)
        zeros = jax.tree.map(lambda p: jnp.zeros_like(p, dtype=jnp.float32), params)
        init = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), zeros)
        (loss_sum, tokens, grad_sum), _ = jax.lax.scan(body, init, microbatches)
    denom = jnp.maximum(tokens, 1.0)
    grads = jax.tree.map(lambda g, p: (g.astype(jnp.float32) / denom).astype(p.dtype), grad_sum, params)
    return loss_sum / denom, grads, tokens
