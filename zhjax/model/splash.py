"""`attention: splash` — the Pallas splash-attention kernel (block-sparse flash attention for TPU).

The kernel takes a causal mask plus segment ids, so the model hands it segment ids instead of a boolean mask:
packed documents keep their ids and padding becomes segment 0 (`splash_segment_ids`). Padded positions then
attend among themselves, which keeps every softmax row non-empty; their outputs are never used (labels are
-100 there), and real tokens see exactly what the XLA path lets them see. Grouped-query attention is native
(`num_heads` a multiple of `num_kv_heads`); the softmax scale is folded into the queries.

The kernel runs per device, so under a mesh (the trainer and `zhjax plan` set one with `jax.set_mesh`) it is
wrapped in `shard_map`: batch over `data` x `fsdp`, heads over `tensor`. Sequences are padded to a multiple of
128 (the kernel's lane width). It compiles for the mesh's devices (TPU, also from a CPU host in `zhjax plan`);
on CPU devices it runs in Pallas interpret mode (slow: for tests); GPUs are refused (use `cudnn`).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from zhjax.config import AXIS_RULES

LANES = 128


def splash_segment_ids(attention_mask: jax.Array | None, segment_ids: jax.Array | None, shape) -> jax.Array:
    """`[batch, seq]` int32 segment ids for the kernel: packed-document ids, 0 on padding."""
    seg = jnp.ones(shape, jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
    if attention_mask is not None:
        seg = jnp.where(attention_mask.astype(bool), seg, 0)
    return seg


def _block(seq: int) -> int:
    return next(b for b in (512, 256, LANES) if seq % b == 0)


@functools.lru_cache(maxsize=32)
def _kernel(num_heads: int, seq: int, interpret: bool):
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    b = _block(seq)
    sizes = sa.BlockSizes(
        block_q=b, block_kv=b, block_kv_compute=b,
        block_q_dkv=b, block_kv_dkv=b, block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b,
    )
    mask = sa.MultiHeadMask([sa.CausalMask((seq, seq))] * num_heads)
    return sa.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)


def _local(q, k, v, seg, interpret: bool):
    """One device's share: q `[b, h, t, d]`, k/v `[b, kv_heads, t, d]`, seg `[b, t]`."""
    from jax.experimental.pallas.ops.tpu.splash_attention import SegmentIds

    kernel = _kernel(q.shape[1], q.shape[2], interpret)
    return jax.vmap(lambda q, k, v, s: kernel(q, k, v, SegmentIds(s, s)))(q, k, v, seg)


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, seg: jax.Array, *, scale: float) -> jax.Array:
    """Causal attention within segments. q `[b, t, h, d]`, k/v `[b, t, kv_heads, d]`, seg `[b, t]` -> `[b, t, h, d]`."""
    b, t, h, d = q.shape
    kvh = k.shape[2]
    pad = -t % LANES
    if pad:  # padded tail: its own segment (-1), attending only to itself
        widen = ((0, 0), (0, pad), (0, 0), (0, 0))
        q, k, v = jnp.pad(q, widen), jnp.pad(k, widen), jnp.pad(v, widen)
        seg = jnp.pad(seg, ((0, 0), (0, pad)), constant_values=-1)
    q = (q * jnp.asarray(scale, q.dtype)).transpose(0, 2, 1, 3)
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    mesh = jax.sharding.get_abstract_mesh()  # set by `jax.set_mesh`; empty outside one
    mesh = None if mesh.empty else mesh
    # the devices compiled for, not the host's backend: `zhjax plan` compiles for TPU slices on a CPU host
    device = getattr(mesh, "abstract_device", None)
    platform = device.platform if device is not None else jax.default_backend()
    if platform in ("gpu", "cuda", "rocm"):
        raise ValueError("attention 'splash' is the TPU Pallas kernel; on GPUs use attention 'cudnn'")
    run = functools.partial(_local, interpret=platform != "tpu")

    if mesh is not None and math.prod(mesh.axis_sizes) > 1:
        names = dict(zip(mesh.axis_names, mesh.axis_sizes, strict=True))
        batch_axes = tuple(a for a in AXIS_RULES["batch"] if names.get(a, 1) > 1)
        batch = batch_axes if batch_axes and b % math.prod(names[a] for a in batch_axes) == 0 else None
        tp = names.get("tensor", 1)
        heads = "tensor" if tp > 1 and h % tp == 0 and kvh % tp == 0 else None
        qkv = P(batch, heads, None, None)
        run = jax.shard_map(run, mesh=mesh, in_specs=(qkv, qkv, qkv, P(batch, None)), out_specs=qkv, check_vma=False)
    out = run(q, k, v, seg)
    return out.transpose(0, 2, 1, 3)[:, :t]
