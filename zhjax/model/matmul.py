"""Matrix products whose forward *and* backward run on XLA:CPU's matmul library in the operands' dtype.

XLA:CPU multiplies bfloat16 matrices with float32 accumulation at about twice its float32 rate (AVX-512 BF16),
but only for products its library takes: `[M, K] @ [K, N]`, and `[M, N] @ [K, N]^T` (the input gradient `g @ w.T`,
read by the library as stored), with row-major operands. The weight gradient `x.T @ g` is neither: XLA gives the
transpose a column-major layout instead of copying it, and the product then runs 1.5-2x slower (measured 9.4 ms
against 4.7 ms for `[576, 1024] @ [1024, 1536]` in bf16). `matmul` is `x @ w` with a custom backward that
multiplies a row-major copy of `x.T` (`row_major_t`: a transpose that XLA must write out) for the weight gradient
and `g` against `w` as stored for the input gradient, so all three products of a training step's linear layer take
the fast path. In float32 the same backward avoids a different cost: left to itself XLA fuses the transpose into
the elementwise op that makes the output gradient (the MLP's `silu(gate) * up` backward, for one), which then
writes in transposed order from all its inputs; the demo's fp32 step took 1.25x as long. On other backends it is
plain `jnp.matmul`: accelerators transpose for free inside the product.

Products accumulate in float32 (`preferred_element_type`) and are rounded to the operands' dtype afterwards,
so bf16 results equal `jnp.matmul`'s on bf16 inputs up to that one rounding.

`batched_matmul` is the same for stacks of matrices `[..., M, K] @ [..., K, N]` (attention on CPU,
`zhjax.model.llama.grouped_attention`), with the output dtype chosen by the caller (attention logits stay float32).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp


def _use_row_major_path(x: jax.Array, w: jax.Array) -> bool:
    return x.dtype == w.dtype and x.dtype in (jnp.bfloat16, jnp.float32) and jax.default_backend() == "cpu"


def materialize(x: jax.Array) -> jax.Array:
    """`x` written out in its own row-major layout (after a transpose, XLA would otherwise change the layout instead).

    Padding the leading axis by one then slicing it off is the cheapest op found that forces XLA:CPU to materialise
    the copy; it is an exact identity.
    """
    return jnp.pad(x, ((0, 1),) + ((0, 0),) * (x.ndim - 1))[:-1]


def row_major_t(x: jax.Array) -> jax.Array:
    """`x.T` of a 2-D array, written out row-major (`materialize`)."""
    return materialize(x.T)


def transpose(x: jax.Array) -> jax.Array:
    """`x.T` of a 2-D array, row-major (`row_major_t`) where a bf16 CPU product will read it, a plain `.T` elsewhere."""
    return row_major_t(x) if x.dtype == jnp.bfloat16 and jax.default_backend() == "cpu" else x.T


def _dot(a: jax.Array, b: jax.Array) -> jax.Array:
    return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


@jax.custom_vjp
def _matmul_2d(x: jax.Array, w: jax.Array) -> jax.Array:
    return _dot(x, w).astype(x.dtype)


def _fwd(x, w):
    return _matmul_2d(x, w), (x, w)


def _bwd(res, g):
    x, w = res
    g = g.astype(x.dtype)
    dx = jax.lax.dot_general(g, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32).astype(x.dtype)
    dw = _dot(row_major_t(x), g).astype(w.dtype)
    return dx, dw


_matmul_2d.defvjp(_fwd, _bwd)


@partial(jax.named_call, name="matmul")
def matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """`x @ w` for `x` `[..., K]` and `w` `[K, N]`; on CPU, canonical row-major products forward and backward (in
    bf16 for bf16 operands)."""
    if not _use_row_major_path(x, w):
        return x @ w
    lead = x.shape[:-1]
    y = _matmul_2d(x.reshape(-1, x.shape[-1]), w)
    return y.reshape(*lead, w.shape[-1])


def _batch_dot(a: jax.Array, b: jax.Array, b_contract: int) -> jax.Array:
    """`a @ b` (`b_contract` -2) or `a @ b^T` (-1) over the leading batch axes, accumulated in float32."""
    batch = tuple(range(a.ndim - 2))
    dims = (((a.ndim - 1,), (b.ndim + b_contract,)), (batch, batch))
    return jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def batched_matmul(x: jax.Array, w: jax.Array, out_dtype) -> jax.Array:
    """`x @ w` for `[..., M, K]` and `[..., K, N]` stacks, accumulated in float32 and returned in `out_dtype`; the
    backward takes `_matmul_2d`'s row-major path (`g @ w^T` against `w` as stored, `x^T` written out)."""
    return _batch_dot(x, w, -2).astype(out_dtype)


def _batched_fwd(x, w, out_dtype):
    return batched_matmul(x, w, out_dtype), (x, w)


def _batched_bwd(out_dtype, res, g):
    x, w = res
    g = g.astype(x.dtype)
    dx = _batch_dot(g, w, -1).astype(x.dtype)
    dw = _batch_dot(materialize(jnp.swapaxes(x, -1, -2)), g, -2).astype(w.dtype)
    return dx, dw


batched_matmul.defvjp(_batched_fwd, _batched_bwd)
