"""`optim.lazy_vocab_rows`: a row of embed_tokens / lm_head moves only in the steps whose batch holds its token."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from zhjax.config import LoraConfig, ModelConfig
from zhjax.model.llama import LlamaForCausalLM
from zhjax.model.params import split_model, trainable_filter
from zhjax.parallel.mesh import make_mesh
from zhjax.train.optim import OptimConfig, build_optimizer, parameter_name
from zhjax.train.state import init_train_state
from zhjax.train.step import build_train_step

V = 64


def build(tied: bool, lazy: bool, modules_to_save=("embed_tokens", "lm_head")):
    config = ModelConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, modules_to_save=modules_to_save)
    graphdef, trainable, frozen = split_model(LlamaForCausalLM(config, lora, rngs=nnx.Rngs(0)), trainable_filter(lora))
    trainable = jax.tree.map(lambda x: x.astype(jnp.float32), trainable)
    # weight decay on, so that a row the update skipped would show even a decay-only move
    tx = build_optimizer(OptimConfig(learning_rate=1e-2, weight_decay=0.1, warmup_ratio=0.0), trainable, 10)
    step = build_train_step(graphdef, tx, trainable, frozen, make_mesh(), lora=lora, lazy_vocab=lazy)
    return step, init_train_state(tx, trainable, 0, step.state_shardings), frozen


def vocab_leaves(state) -> dict[str, np.ndarray]:
    """{'embed': [V, d], 'head': [V, d] or absent} of the trainable state, rows indexed by token."""
    out = {}
    for path, x in jax.tree_util.tree_flatten_with_path(state.trainable)[0]:
        name = parameter_name(path)
        if name.endswith("embed_tokens.embedding"):
            out["embed"] = np.asarray(x)
        elif name.endswith("lm_head.kernel"):
            out["head"] = np.asarray(x).T
    return out


def batch_of(ids, labels=None):
    ids = jnp.asarray(ids, jnp.int32)[None]  # one micro-batch
    return {"input_ids": ids, "labels": ids if labels is None else jnp.asarray(labels, jnp.int32)[None]}


def moved(before: np.ndarray, after: np.ndarray) -> set[int]:
    return set(np.flatnonzero(np.any(before != after, axis=1)).tolist())


FIRST = np.array([[1, 2, 3, 4, 5, 6], [7, 8, 9, 1, 2, 3]])  # reads 1..9, predicts 2..9 and 1..3
SECOND = np.array([[20, 21, 22, 23, 24, 25], [26, 27, 28, 29, 20, 21]])


def test_untied_rows_move_only_with_their_tokens_and_keep_no_momentum():
    step, state, frozen = build(tied=False, lazy=True)
    v0 = vocab_leaves(state)
    state, metrics = step(state, frozen, batch_of(FIRST))
    assert bool(metrics["finite"])
    v1 = vocab_leaves(state)
    assert moved(v0["embed"], v1["embed"]) == set(range(1, 10))  # the tokens read
    assert moved(v0["head"], v1["head"]) == set(FIRST[:, 1:].ravel().tolist())  # the tokens predicted
    state, _ = step(state, frozen, batch_of(SECOND))
    v2 = vocab_leaves(state)
    # the first batch's rows stand still in the second step: no momentum, no weight decay
    assert moved(v1["embed"], v2["embed"]) == set(range(20, 30))
    assert moved(v1["head"], v2["head"]) == set(SECOND[:, 1:].ravel().tolist())


def test_without_the_option_every_head_row_moves():
    step, state, frozen = build(tied=False, lazy=False)
    v0 = vocab_leaves(state)
    state, _ = step(state, frozen, batch_of(FIRST))
    assert moved(v0["head"], vocab_leaves(state)["head"]) == set(range(V))


def test_ignored_labels_are_not_targets_and_a_tied_row_moves_for_either_use():
    step, state, frozen = build(tied=True, lazy=True)
    v0 = vocab_leaves(state)
    assert "head" not in v0
    labels = FIRST.copy()
    labels[1] = -100  # the second row predicts nothing
    ids = FIRST.copy()
    ids[1] = [40, 41, 42, 43, 44, 45]
    state, _ = step(state, frozen, batch_of(ids, labels))
    # read: 1..6 and 40..45; predicted: 2..6 (row one's labels); a tied row moves for either
    assert moved(v0["embed"], vocab_leaves(state)["embed"]) == set(range(1, 7)) | set(range(40, 46))


def test_with_a_frozen_untied_head_only_the_rows_read_move():
    step, state, frozen = build(tied=False, lazy=True, modules_to_save=("embed_tokens",))
    v0 = vocab_leaves(state)
    assert "head" not in v0  # the head is frozen, not tied
    ids = FIRST.copy()
    ids[1] = [40, 41, 42, 43, 44, 45]
    labels = FIRST.copy()  # row one predicts 8, 9, 1, 2, 3, which it does not read
    state, _ = step(state, frozen, batch_of(ids, labels))
    assert moved(v0["embed"], vocab_leaves(state)["embed"]) == set(range(1, 7)) | set(range(40, 46))


def test_refused_without_trained_vocabulary_rows():
    with pytest.raises(ValueError, match="lazy_vocab_rows needs embed_tokens or lm_head"):
        build(tied=False, lazy=True, modules_to_save=())


def test_the_config_field_is_checked():
    with pytest.raises(ValueError, match="optim.lazy_vocab_rows must be true or false"):
        OptimConfig(lazy_vocab_rows="yes")
