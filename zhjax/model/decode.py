"""The model as generation reads it: weights laid out for decoding, a KV cache, and one forward step over it.

Training wants the weights as `zhjax.model.llama` holds them (stacked layers, LoRA factors apart, one kernel per
projection, so adapters and `modules_to_save` split cleanly). Decoding wants something else: a step of batch 1
reads every weight once and does little arithmetic, so its speed is the memory bandwidth minus the cost of each
separate kernel. `decode_weights` therefore prepares, once per model:

- LoRA folded into the kernels (`W + A B alpha/r` in float32, cast back), so a step runs no adapter matmuls;
- the q, k and v kernels side by side in one matrix and gate and up in one: four matmuls per layer instead of
  seven. On XLA:CPU every matmul is its own kernel call with a fixed cost, and the three (two) products of one
  input read better as one;
- every kernel stored `[out, in]` (PyTorch's layout) and applied as `W @ x^T`: for the few rows of a decode
  step, XLA:CPU's matmul library runs that orientation faster than `x @ W` with `W` `[in, out]` (measured on a
  2-core CPU: the batch-8 step's matmuls take about a fifth less time, batch 1 a few percent). On CPU, 2 to 32
  rows skip the matmul library altogether: `dense` multiplies each weight into all rows in one fused loop, which
  reads the weights once, where the library takes about 1.8x the time of one read at 8 rows (SmolLM2's batch-8
  step: 18-19 ms of weight products instead of 28);
- on CPU, the layers one by one as zero-copy views of stacked arrays (`unstack=True`): inside `lax.scan`,
  XLA:CPU copies each step's slice of the stacked weights before the matmuls, so a step that should read each
  weight once reads it three times. Elsewhere the layers stay stacked and are scanned.

`decode` runs input ids against a `KVCache` with the same numerics as `LlamaForCausalLM` (the norm, RoPE and
attention primitives are shared with it; `tests/test_generate.py` checks the logits against the model's forward
pass, with LoRA, biases and untied embeddings). The keys and values of the new tokens are written at
`cache_index` (the same slots for every row: left padding keeps rows aligned at their ends; or, a `[batch]`
vector, a slot per row, as the server's continuous batching needs), `positions` are
their RoPE positions (per row, counted from the row's first real token) and `kv_valid` `[batch, max_len]` marks
the slots that hold real tokens, including the ones written now; a query at slot `s` sees valid slots `<= s`.
A prompt is one call at index 0; each new token is a call with one token at a traced index, so one compiled
step serves every position. The loop around it is `zhjax.infer.generate`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from zhjax.config import ModelConfig
from zhjax.model.llama import LlamaForCausalLM, apply_rope, rms_norm, rope_tables


class KVCache(NamedTuple):
    """Keys and values of every layer for `max_len` cache slots: `[layers, batch, kv_heads, max_len, head_dim]`
    arrays (stacked) or tuples of per-layer `[batch, kv_heads, max_len, head_dim]` arrays (unstacked).

    The cache is kv-head-major so both attention matmuls read it in place (a `[.., max_len, kv_heads, ..]` cache
    is transposed whole at every step and layer, about a tenth of a batch-8 CPU step). Slot `j` of row `b` holds
    the token fed at slot `j`; which slots are real is the caller's `kv_valid` mask.
    """

    k: jax.Array | tuple[jax.Array, ...]
    v: jax.Array | tuple[jax.Array, ...]


class DecodeLayer(NamedTuple):
    """One layer's weights for decoding (or all layers', stacked on a leading axis), kernels `[out, in]`.
    Biases are None without them."""

    input_norm: jax.Array
    qkv: jax.Array  # [(heads + 2 * kv_heads) * head_dim, hidden]: q | k | v
    o: jax.Array
    post_norm: jax.Array
    gate_up: jax.Array  # [2 * intermediate, hidden]: gate | up
    down: jax.Array
    qkv_bias: jax.Array | None = None
    o_bias: jax.Array | None = None
    gate_up_bias: jax.Array | None = None
    down_bias: jax.Array | None = None


class DecodeWeights(NamedTuple):
    """Everything a decode step reads. `layers` is one stacked `DecodeLayer` or a tuple of per-layer ones;
    `lm_head` (`[vocab, hidden]`) is None when the head is tied to `embed` (`[vocab, hidden]` too)."""

    embed: jax.Array
    layers: DecodeLayer | tuple[DecodeLayer, ...]
    final_norm: jax.Array
    lm_head: jax.Array | None


def decode_weights(model: LlamaForCausalLM, *, unstack: bool) -> DecodeWeights:
    """The model's weights laid out for decoding (see the module docstring); the model itself is not changed.

    New memory: the kernels (transposed, fused) and an untied LM head (transposed); the embedding and the
    norms are shared with the model.
    """
    attn, mlp = model.layers.self_attn, model.layers.mlp

    def fused(*linears):  # [..., in, out] kernels, LoRA folded in, side by side, stored [..., out, in]
        kernels = [lin.merged_kernel() for lin in linears]
        return jnp.swapaxes(jnp.concatenate(kernels, axis=-1) if len(kernels) > 1 else kernels[0], -1, -2)

    def fused_bias(*linears):
        if linears[0].bias is None:
            return None
        biases = [lin.bias[...] for lin in linears]
        return biases[0] if len(biases) == 1 else jnp.concatenate(biases, axis=-1)

    stacked = DecodeLayer(
        input_norm=model.layers.input_layernorm.scale[...],
        qkv=fused(attn.q_proj, attn.k_proj, attn.v_proj),
        o=fused(attn.o_proj),
        post_norm=model.layers.post_attention_layernorm.scale[...],
        gate_up=fused(mlp.gate_proj, mlp.up_proj),
        down=fused(mlp.down_proj),
        qkv_bias=fused_bias(attn.q_proj, attn.k_proj, attn.v_proj),
        o_bias=fused_bias(attn.o_proj),
        gate_up_bias=fused_bias(mlp.gate_proj, mlp.up_proj),
        down_bias=fused_bias(mlp.down_proj),
    )
    layers = _unstack(stacked, model.config.num_hidden_layers) if unstack else stacked
    lm_head = None if model.lm_head is None else jnp.swapaxes(model.lm_head.kernel[...], 0, 1)
    return DecodeWeights(model.embed_tokens.embedding[...], layers, model.norm.scale[...], lm_head)


def _unstack(stacked: DecodeLayer, num_layers: int) -> tuple[DecodeLayer, ...]:
    """Per-layer views of stacked arrays: zero-copy on a single CPU device (`jax.device_put` of a NumPy view
    aliases host memory), slices (copies) elsewhere."""
    on_cpu = all(d.platform == "cpu" for d in jax.devices())

    def take(x, i):
        if on_cpu and isinstance(x, jax.Array) and x.is_fully_addressable and len(x.devices()) == 1:
            return jax.device_put(np.asarray(x)[i], next(iter(x.devices())))
        return x[i]

    return tuple(jax.tree.map(lambda x, i=i: take(x, i), stacked) for i in range(num_layers))


def init_kv_cache(config: ModelConfig, batch: int, max_len: int, dtype=None, *, stacked: bool = True) -> KVCache:
    """A zeroed cache for `batch` rows of `max_len` slots, in `config.dtype` unless `dtype` says otherwise;
    `stacked=False` gives the per-layer tuples that unstacked `DecodeWeights` take."""
    shape = (config.num_hidden_layers, batch, config.num_key_value_heads, max_len, config.head_dim)
    dtype = jnp.dtype(dtype or config.dtype)
    if stacked:
        return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))
    per_layer = lambda: tuple(jnp.zeros(shape[1:], dtype) for _ in range(shape[0]))
    return KVCache(per_layer(), per_layer())


def cached_attention(q, k, v, mask, kv: tuple[jax.Array, jax.Array], cache_index):
    """Write k/v `[batch, t, kv_heads, head_dim]` into one layer's cache at `cache_index` (a scalar, or a slot
    per row `[batch]`) and attend `q`
    `[batch, t, heads, head_dim]` over every slot allowed by `mask` `[batch, 1, t, max_len]`. Scores and softmax
    in float32. Returns `(out [batch, t, heads, head_dim], (k_cache, v_cache))`."""
    b, t, h, d = q.shape
    k_cache, v_cache = kv
    kvh = k_cache.shape[1]
    k_new, v_new = (x.transpose(0, 2, 1, 3).astype(k_cache.dtype) for x in (k, v))
    if jnp.ndim(cache_index) == 1:  # a slot per row (continuous batching: rows at different lengths)
        write = jax.vmap(lambda c, x, i: jax.lax.dynamic_update_slice(c, x, (0, i, 0)))
        k_cache, v_cache = write(k_cache, k_new, cache_index), write(v_cache, v_new, cache_index)
    else:
        start = (0, 0, cache_index, 0)
        k_cache = jax.lax.dynamic_update_slice(k_cache, k_new, start)
        v_cache = jax.lax.dynamic_update_slice(v_cache, v_new, start)
    qg = q.reshape(b, t, kvh, h // kvh, d).transpose(0, 2, 3, 1, 4)  # [b, kvh, group, t, d]
    scores = jnp.einsum("bkgtd,bksd->bkgts", qg, k_cache.astype(q.dtype), preferred_element_type=jnp.float32)
    scores = jnp.where(mask[:, :, None], scores / math.sqrt(d), jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_cache.dtype)
    out = jnp.einsum("bkgts,bksd->bkgtd", probs, v_cache, preferred_element_type=jnp.float32)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, d).astype(q.dtype), (k_cache, v_cache)


# On CPU, products with this many rows (2 to 32: a decode step of a small batch) run as a broadcast multiply and
# a sum over the input axis instead of a matmul (see `dense`).
CPU_BROADCAST_ROWS = (2, 32)


def _in_float32(a: jax.Array, dtype) -> jax.Array:
    """`a` rounded to `dtype`, held in float32. `reduce_precision`, not a round trip through `dtype`: XLA may
    drop a convert pair (excess precision is allowed by default), which would leave the values unrounded."""
    a = a.astype(jnp.float32)
    info = jnp.finfo(dtype)
    if info.bits >= 32:
        return a
    return jax.lax.reduce_precision(a, exponent_bits=info.nexp, mantissa_bits=info.nmant)


def dense(x: jax.Array, w: jax.Array, bias: jax.Array | None, dtype, *, preferred_element_type=None) -> jax.Array:
    """`x @ w.T (+ bias)` in `dtype` for a kernel `w` stored `[out, in]`, computed over the rows of `x` flattened.

    Usually as the matmul `(w @ x^T)^T` (the orientation that is faster for few rows; see the module docstring).
    On CPU with 2 to 32 rows, as `sum_k w[o, k] * x^T[k, :]`: one fused loop that reads each weight once and
    multiplies it into the rows side by side: the inputs rounded to `dtype`, their products and sum in float32
    (as a matmul accumulates).
    XLA:CPU's matmul library is far from one read of the weights for so few rows: on a 2-core CPU the weight
    products of SmolLM2's batch-8 decode step take 18-19 ms this way against 28 ms as matmuls (batch 2 to 32 all
    gain; 64 rows lose). One row stays a matmul (a matrix-vector product already reads the weights once; the
    fused loop is 40x slower there).
    """
    rows = x.reshape(-1, x.shape[-1]).astype(dtype)
    n = rows.shape[0]
    if CPU_BROADCAST_ROWS[0] <= n <= CPU_BROADCAST_ROWS[1] and jax.default_backend() == "cpu":
        products = _in_float32(w, dtype)[:, :, None] * _in_float32(rows.T, dtype)[None]  # fused: never in memory
        y = jnp.sum(products, axis=1).astype(preferred_element_type or dtype)
    else:
        y = jnp.matmul(w.astype(dtype), rows.T, preferred_element_type=preferred_element_type)
    y = y.T.reshape(*x.shape[:-1], w.shape[0])
    return y if bias is None else y + bias.astype(dtype)


def _layer(config: ModelConfig, p: DecodeLayer, h, cos, sin, mask, kv, cache_index):
    """One pre-norm decoder layer over the cache: `(h, (k_cache, v_cache))`."""
    b, t, _ = h.shape
    dtype = jnp.dtype(config.dtype)
    heads, kv_heads, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    qkv = dense(rms_norm(h, p.input_norm, config.rms_norm_eps), p.qkv, p.qkv_bias, dtype)
    q, k, v = jnp.split(qkv, [heads * d, (heads + kv_heads) * d], axis=-1)
    q = apply_rope(q.reshape(b, t, heads, d), cos, sin)
    k = apply_rope(k.reshape(b, t, kv_heads, d), cos, sin)
    out, kv = cached_attention(q, k, v.reshape(b, t, kv_heads, d), mask, kv, cache_index)
    h = h + dense(out.reshape(b, t, heads * d), p.o, p.o_bias, dtype)
    gate, up = jnp.split(
        dense(rms_norm(h, p.post_norm, config.rms_norm_eps), p.gate_up, p.gate_up_bias, dtype), 2, axis=-1
    )
    return h + dense(jax.nn.silu(gate) * up, p.down, p.down_bias, dtype), kv


def decode(
    config: ModelConfig,
    weights: DecodeWeights,
    input_ids: jax.Array,
    cache: KVCache,
    *,
    positions: jax.Array,
    cache_index: jax.Array | int,
    kv_valid: jax.Array,
) -> tuple[jax.Array, KVCache]:
    """Run `input_ids` `[batch, t]` against the cache: `(final-norm hidden [batch, t, hidden], new cache)`.

    A stacked cache goes with stacked `weights.layers` (scanned), a per-layer one with unstacked layers.
    """
    t = input_ids.shape[1]
    stacked = isinstance(weights.layers, DecodeLayer)
    if stacked != isinstance(cache.k, jax.Array):
        raise ValueError("stacked decode weights need a stacked KV cache and unstacked ones a per-layer cache "
                         "(init_kv_cache(stacked=...))")
    max_len = (cache.k if stacked else cache.k[0]).shape[-2]
    cos, sin = rope_tables(config, positions)
    query_slots = jnp.asarray(cache_index)[..., None] + jnp.arange(t)  # [t], or [batch, t] with a slot per row
    causal = jnp.arange(max_len) <= query_slots[..., None]
    causal = causal if causal.ndim == 3 else causal[None]
    mask = kv_valid.astype(bool)[:, None, None, :] & causal[:, None]
    h = jnp.take(weights.embed, input_ids, axis=0).astype(jnp.dtype(config.dtype))

    def body(h, xs):
        p, k, v = xs
        return _layer(config, p, h, cos, sin, mask, (k, v), cache_index)

    if stacked:
        h, (k, v) = jax.lax.scan(body, h, (weights.layers, cache.k, cache.v))
        return rms_norm(h, weights.final_norm, config.rms_norm_eps), KVCache(k, v)
    if len(weights.layers) != config.num_hidden_layers:
        raise ValueError(f"got {len(weights.layers)} layers of weights for a {config.num_hidden_layers}-layer model")
    ks, vs = [], []
    for p, k, v in zip(weights.layers, cache.k, cache.v, strict=True):
        h, (k, v) = body(h, (p, k, v))
        ks.append(k)
        vs.append(v)
    return rms_norm(h, weights.final_norm, config.rms_norm_eps), KVCache(tuple(ks), tuple(vs))


def decode_logits(config: ModelConfig, weights: DecodeWeights, h: jax.Array) -> jax.Array:
    """Float32 logits of final-norm hidden states `h` `[batch, t, hidden]` (as `logits_from_hidden`)."""
    if weights.lm_head is None:  # tied: accumulated in float32, as `logits_from_hidden` does
        return dense(h, weights.embed, None, h.dtype, preferred_element_type=jnp.float32)
    return dense(h, weights.lm_head, None, jnp.dtype(config.dtype)).astype(jnp.float32)
