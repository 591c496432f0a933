"""The LM head and cross-entropy fused and chunked over tokens: no `[tokens, vocab]` float32 logits, ever.

`chunked_head_loss(h, w, targets, weights, chunk)` equals `sum(weights * (logsumexp(h @ w) - (h @ w)[targets]))`
with float32 logits, and its gradients equal the plain ones, but it runs `chunk` token rows at a time (an
unrolled loop): each chunk's logits `[chunk, vocab]` are made, turned into that chunk's loss *and* its gradients
`softmax - onehot` (the loss is the end of the graph, so its cotangent is a scalar that only scales them), and
dropped. The step holds `[chunk, vocab]` logits instead of `[tokens, vocab]` logits plus their gradient (the 7B
plan's largest activation, see README), and it does exactly the plain head's three products: logits, the hidden
states' gradient `g @ w.T` and the head's gradient `h.T @ g`, the last one summed into a float32 `[hidden, vocab]`
carry. Evaluation (no gradient) runs the same scan without the gradient products.

The products go through `zhjax.model.matmul`'s row-major transposes on CPU with bfloat16 operands, so they take
the bf16 matmul path; elsewhere they are plain `dot_general`s.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from zhjax.model.matmul import transpose as _t


def _dot(a: jax.Array, b: jax.Array) -> jax.Array:
    return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _chunks(h, targets, weights, chunk):
    n = h.shape[0]
    pad = -n % chunk
    if pad:
        h = jnp.pad(h, ((0, pad), (0, 0)))
        targets = jnp.pad(targets, (0, pad))
        weights = jnp.pad(weights, (0, pad))
    k = (n + pad) // chunk
    return h.reshape(k, chunk, -1), targets.reshape(k, chunk), weights.reshape(k, chunk)


def _chunk_loss(hc, w, tc, wc):
    logits = _dot(hc, w)  # [chunk, vocab] float32
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, tc[:, None], axis=-1)[:, 0]
    return logits, lse, jnp.sum((lse - picked) * wc)


def _loss_only(h, w, targets, weights, chunk):
    return sum(_chunk_loss(hc, w, tc, wc)[2] for hc, tc, wc in zip(*_chunks(h, targets, weights, chunk), strict=True))


@partial(jax.custom_vjp, nondiff_argnums=(4,))
def _head_loss(h, w, targets, weights, chunk):
    return _loss_only(h, w, targets, weights, chunk)


def _head_loss_fwd(h, w, targets, weights, chunk):
    n = h.shape[0]
    wt = _t(w)  # [vocab, hidden], written out once per step on the bf16 CPU path
    hs, ts, ws = _chunks(h, targets, weights, chunk)
    # a Python loop, not lax.scan: XLA:CPU runs the products of a while-loop body far slower (measured 4-7x)
    dw, losses, dh = jnp.zeros(w.shape, jnp.float32), [], []
    for hc, tc, wc in zip(hs, ts, ws, strict=True):
        logits, lse, loss = _chunk_loss(hc, w, tc, wc)
        onehot = tc[:, None] == jax.lax.broadcasted_iota(jnp.int32, logits.shape, 1)
        g = ((jnp.exp(logits - lse[:, None]) - onehot) * wc[:, None]).astype(h.dtype)
        dw = dw + _dot(_t(hc), g)
        losses.append(loss)
        dh.append(_dot(g, wt))
    dh = jnp.concatenate(dh)[:n].astype(h.dtype)
    return sum(losses), (dh, dw.astype(w.dtype))


def _head_loss_bwd(chunk, res, ct):
    dh, dw = res
    scale = lambda x: (x.astype(jnp.float32) * ct).astype(x.dtype)
    return scale(dh), scale(dw), None, None


_head_loss.defvjp(_head_loss_fwd, _head_loss_bwd)


def chunked_head_loss(h: jax.Array, w: jax.Array, targets: jax.Array, weights: jax.Array, chunk: int) -> jax.Array:
    """Sum over rows of `weights * cross_entropy(h @ w, targets)` in float32, `chunk` rows at a time.

    `h` `[tokens, hidden]` and `w` `[hidden, vocab]` in the compute dtype (products accumulate in float32),
    `targets` int `[tokens]` (any value where the weight is 0), `weights` float32 `[tokens]`.
    """
    targets = jnp.where(weights > 0, targets, 0).astype(jnp.int32)
    return _head_loss(h, w, targets, weights.astype(jnp.float32), chunk)
