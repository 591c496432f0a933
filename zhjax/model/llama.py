"""A LLaMA-family decoder in Flax NNX, numerically matching `transformers.LlamaForCausalLM`.

Covers LLaMA-1/2/3, Mistral without sliding window and SmolLM: RMSNorm, rotate-half RoPE (HF's q/k layout, so
checkpoints load without permutation) with `linear`, `dynamic` (NTK) and `llama3` frequency scaling, grouped-query
attention with an explicit `head_dim`, SwiGLU MLP, tied or untied embeddings, optional biases.

Layers are *stacked*: every layer weight has a leading `[num_hidden_layers]` axis and the forward pass runs one
compiled layer body under `jax.lax.scan`, so compile time does not grow with depth. The body can be rematerialised
(`remat`: none | full | dots | dots_with_no_batch_dims | save_only_these_names; the last keeps the activations
named in `config.remat_names`, which the layers tag with `checkpoint_name`). Attention goes through `jax.nn.dot_product_attention` (cuDNN flash attention on
GPUs with `attention="cudnn"`), with a causal mask, an optional padding mask and optional segment ids for packed
sequences; `attention="splash"` runs the Pallas splash kernel on TPU instead (`zhjax.model.splash`), and on CPU
`grouped_attention` takes its place (the same values, in the layout XLA:CPU multiplies fastest). Norms, RoPE tables, softmax and logits are float32; matmuls run in `config.dtype`.

Generation reads the weights in another layout (LoRA folded in, fused q|k|v and gate|up) through
`zhjax.model.decode`, which shares this module's norm and RoPE functions.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from zhjax.config import LoraConfig, ModelConfig
from zhjax.model.lora import Linear
from zhjax.model.matmul import batched_matmul, materialize, transpose
from zhjax.model.splash import splash_attention, splash_segment_ids

LAYER_AXIS = "layers"


class RMSNorm(nnx.Module):
    """Root-mean-square norm computed in float32, scaled after casting back (as HF does)."""

    def __init__(self, dim: int, eps: float, *, stack: tuple[int, ...] = (), param_dtype=jnp.float32):
        self.eps = eps
        stack_axes = (LAYER_AXIS,) * len(stack)
        self.scale = nnx.Param(jnp.ones((*stack, dim), param_dtype), logical_axes=(*stack_axes, "embed"))

    def __call__(self, x: jax.Array) -> jax.Array:
        return rms_norm(x, self.scale[...], self.eps)


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """RMSNorm of `x` over its last axis in float32, cast back to `x.dtype`, then scaled (HF's order)."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return scale.astype(x.dtype) * y.astype(x.dtype)


def rope_inv_freq(config: ModelConfig, positions: jax.Array) -> jax.Array:
    """Inverse RoPE frequencies `[head_dim // 2]` for this config; `dynamic` depends on the longest position."""
    dim = config.head_dim
    base = config.rope_theta
    rs = config.rope_scaling
    exponents = jnp.arange(0, dim, 2, dtype=jnp.float32) / dim
    if rs.rope_type == "dynamic":
        seq_len = jnp.maximum(jnp.max(positions) + 1, config.max_position_embeddings).astype(jnp.float32)
        scaled = base * ((rs.factor * seq_len / config.max_position_embeddings) - (rs.factor - 1)) ** (dim / (dim - 2))
        return 1.0 / (scaled ** exponents)
    inv_freq = 1.0 / (jnp.float32(base) ** exponents)
    if rs.rope_type == "linear":
        return inv_freq / rs.factor
    if rs.rope_type == "llama3":
        old_len = rs.original_max_position_embeddings
        low_wavelen = old_len / rs.low_freq_factor
        high_wavelen = old_len / rs.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = jnp.where(wavelen > low_wavelen, inv_freq / rs.factor, inv_freq)
        smooth = (old_len / wavelen - rs.low_freq_factor) / (rs.high_freq_factor - rs.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
        is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return jnp.where(is_medium, smoothed, scaled)
    return inv_freq


def rope_tables(config: ModelConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos and sin `[batch, seq, head_dim]` in float32 for integer `positions` `[batch, seq]`."""
    freqs = positions.astype(jnp.float32)[..., None] * rope_inv_freq(config, positions)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate-half RoPE on `x` `[batch, seq, heads, head_dim]`."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos = cos[:, :, None, :].astype(x.dtype)
    sin = sin[:, :, None, :].astype(x.dtype)
    return x * cos + rotated * sin


def build_attention_mask(
    attention_mask: jax.Array | None, segment_ids: jax.Array | None
) -> jax.Array | None:
    """Boolean `[batch, 1, q, k]` mask from a padding mask and/or segment ids (causality is added separately)."""
    mask = None
    if attention_mask is not None:
        mask = attention_mask.astype(bool)[:, None, None, :]
    if segment_ids is not None:
        same = segment_ids[:, None, :, None] == segment_ids[:, None, None, :]
        same = same & (segment_ids > 0)[:, None, None, :]
        mask = same if mask is None else mask & same
    return mask


def grouped_attention(q, k, v, mask, scale: float) -> jax.Array:
    """Causal grouped-query attention laid out for XLA:CPU's matmul library; the context `[batch, seq, heads *
    head_dim]`.

    Each KV head's query heads are stacked along the query axis (`[batch, kv_heads, group * seq, head_dim]`), so
    each product is one `[group * seq, head_dim] @ [head_dim, seq]` per KV head, in the operands' dtype (bf16 at the
    bf16 rate) with float32 logits and softmax, and every operand is a row-major copy (`materialize`); the
    backward takes `batched_matmul`'s row-major path. `jax.nn.dot_product_attention` on CPU ran these products in
    float32 behind layout copies fused with RoPE: the demo's bf16 step is about 5% faster this way. The same
    values: logits and softmax as that function computes them (probabilities rounded to the operands' dtype before
    the second product); `mask` is `build_attention_mask`'s `[batch, 1, 1 or seq, seq]` or None. Self-attention:
    `q` and `k` cover the same positions (the causal mask is position i attends to j <= i).
    """
    b, t, n, h = q.shape
    s, kv = k.shape[1], k.shape[2]
    g = n // kv
    qg = materialize(q.reshape(b, t, kv, g, h).transpose(0, 2, 3, 1, 4)).reshape(b, kv, g * t, h)
    kt = materialize(k.transpose(0, 2, 3, 1))  # [b, kv, h, s]
    vs = materialize(v.transpose(0, 2, 1, 3))  # [b, kv, s, h]
    logits = batched_matmul(qg, kt, jnp.float32).reshape(b, kv, g, t, s) * scale
    keep = jnp.arange(t)[:, None] >= jnp.arange(s)[None, :]
    if mask is not None:
        keep = keep & mask[:, :, None]
    logits = jnp.where(keep, logits, -0.7 * jnp.finfo(jnp.float32).max)
    probs = jax.nn.softmax(logits, axis=-1).astype(q.dtype).reshape(b, kv, g * t, s)
    out = batched_matmul(probs, vs, q.dtype)
    return out.reshape(b, kv, g, t, h).transpose(0, 3, 1, 2, 4).reshape(b, t, n * h)


class Attention(nnx.Module):
    def __init__(self, config: ModelConfig, lora: LoraConfig | None, *, stack, rngs: nnx.Rngs):
        c = config
        kw = dict(
            rngs=rngs,
            stack=stack,
            stack_axes=(LAYER_AXIS,) * len(stack),
            use_bias=c.attention_bias,
            init_std=c.initializer_range,
            dtype=jnp.dtype(c.dtype),
            param_dtype=jnp.dtype(c.param_dtype),
        )

        def lora_for(name):
            return lora if lora is not None and name in lora.target_modules else None

        self.q_proj = Linear(c.hidden_size, c.num_attention_heads * c.head_dim, axes=("embed", "heads"), lora=lora_for("q_proj"), **kw)
        self.k_proj = Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, axes=("embed", "kv_heads"), lora=lora_for("k_proj"), **kw)
        self.v_proj = Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, axes=("embed", "kv_heads"), lora=lora_for("v_proj"), **kw)
        self.o_proj = Linear(c.num_attention_heads * c.head_dim, c.hidden_size, axes=("heads", "embed"), lora=lora_for("o_proj"), **kw)
        self.num_heads = c.num_attention_heads
        self.num_kv_heads = c.num_key_value_heads
        self.head_dim = c.head_dim
        self.implementation = None if c.attention == "xla" else c.attention
        self.scale = 1.0 / math.sqrt(c.head_dim)

    def __call__(self, x, cos, sin, mask, rngs: tuple | None):
        """Causal self-attention over `x` `[batch, seq, hidden]`; `mask` is the padding/segment mask (or, for
        splash, the kernel's segment ids)."""
        b, t, _ = x.shape
        r = rngs or (None,) * 4
        q = checkpoint_name(self.q_proj(x, r[0]), "query_proj").reshape(b, t, self.num_heads, self.head_dim)
        k = checkpoint_name(self.k_proj(x, r[1]), "key_proj").reshape(b, t, self.num_kv_heads, self.head_dim)
        v = checkpoint_name(self.v_proj(x, r[2]), "value_proj").reshape(b, t, self.num_kv_heads, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.implementation is None and jax.default_backend() == "cpu":
            out = grouped_attention(q, k, v, mask, self.scale)
        else:
            if self.implementation == "splash":
                out = splash_attention(q, k, v, mask, scale=self.scale)
            else:
                out = jax.nn.dot_product_attention(
                    q, k, v, mask=mask, is_causal=True, scale=self.scale, implementation=self.implementation
                )
            out = out.reshape(b, t, self.num_heads * self.head_dim)
        out = checkpoint_name(out, "context")
        return checkpoint_name(self.o_proj(out, r[3]), "out_proj")


class MLP(nnx.Module):
    def __init__(self, config: ModelConfig, lora: LoraConfig | None, *, stack, rngs: nnx.Rngs):
        c = config
        kw = dict(
            rngs=rngs,
            stack=stack,
            stack_axes=(LAYER_AXIS,) * len(stack),
            use_bias=c.mlp_bias,
            init_std=c.initializer_range,
            dtype=jnp.dtype(c.dtype),
            param_dtype=jnp.dtype(c.param_dtype),
        )

        def lora_for(name):
            return lora if lora is not None and name in lora.target_modules else None

        self.gate_proj = Linear(c.hidden_size, c.intermediate_size, axes=("embed", "mlp"), lora=lora_for("gate_proj"), **kw)
        self.up_proj = Linear(c.hidden_size, c.intermediate_size, axes=("embed", "mlp"), lora=lora_for("up_proj"), **kw)
        self.down_proj = Linear(c.intermediate_size, c.hidden_size, axes=("mlp", "embed"), lora=lora_for("down_proj"), **kw)

    def __call__(self, x, rngs: tuple | None):
        r = rngs or (None,) * 3
        gate = checkpoint_name(self.gate_proj(x, r[0]), "mlp_gate")
        up = checkpoint_name(self.up_proj(x, r[1]), "mlp_up")
        return checkpoint_name(self.down_proj(jax.nn.silu(gate) * up, r[2]), "mlp_out")


class DecoderLayer(nnx.Module):
    """One pre-norm decoder layer; built with `stack=(num_layers,)` it holds all layers' weights at once."""

    def __init__(self, config: ModelConfig, lora: LoraConfig | None, *, stack=(), rngs: nnx.Rngs):
        pd = jnp.dtype(config.param_dtype)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, stack=stack, param_dtype=pd)
        self.self_attn = Attention(config, lora, stack=stack, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, stack=stack, param_dtype=pd)
        self.mlp = MLP(config, lora, stack=stack, rngs=rngs)

    def __call__(self, h, cos, sin, mask, dropout_rng: jax.Array | None):
        rngs = None if dropout_rng is None else tuple(jax.random.split(dropout_rng, 7))
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, mask, rngs and rngs[:4])
        return h + self.mlp(self.post_attention_layernorm(h), rngs and rngs[4:])


def remat_policy(config: ModelConfig):
    """The `jax.checkpoint` policy of `config.remat` (not called for "none")."""
    policies = jax.checkpoint_policies
    if config.remat == "save_only_these_names":
        return policies.save_only_these_names(*config.remat_names)
    return {
        "full": policies.nothing_saveable,
        "dots": policies.checkpoint_dots,
        "dots_with_no_batch_dims": policies.dots_with_no_batch_dims_saveable,
    }[config.remat]


class Embed(nnx.Module):
    def __init__(self, vocab_size: int, dim: int, *, init_std: float, rngs: nnx.Rngs, param_dtype=jnp.float32):
        w = init_std * jax.random.normal(rngs.params(), (vocab_size, dim), jnp.float32)
        self.embedding = nnx.Param(w.astype(param_dtype), logical_axes=("vocab", "embed"))

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...], ids, axis=0)


class LlamaForCausalLM(nnx.Module):
    """The causal LM: `model(input_ids, attention_mask=None) -> float32 logits [batch, seq, vocab]`."""

    def __init__(self, config: ModelConfig, lora: LoraConfig | None = None, *, rngs: nnx.Rngs | None = None):
        rngs = rngs or nnx.Rngs(0)
        self.config = config
        self.lora = lora
        pd = jnp.dtype(config.param_dtype)
        self.embed_tokens = Embed(
            config.vocab_size, config.hidden_size, init_std=config.initializer_range, rngs=rngs, param_dtype=pd
        )
        self.layers = DecoderLayer(config, lora, stack=(config.num_hidden_layers,), rngs=rngs)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, param_dtype=pd)
        if config.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = Linear(
                config.hidden_size,
                config.vocab_size,
                axes=("embed", "vocab"),
                rngs=rngs,
                init_std=config.initializer_range,
                dtype=jnp.dtype(config.dtype),
                param_dtype=pd,
            )

    def hidden_states(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        *,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        dropout_rng: jax.Array | None = None,
    ) -> jax.Array:
        """Final-norm hidden states `[batch, seq, hidden]` (the input of the LM head)."""
        b, t = input_ids.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        cos, sin = rope_tables(self.config, positions)
        if self.config.attention == "splash":
            mask = splash_segment_ids(attention_mask, segment_ids, (b, t))
        else:
            mask = build_attention_mask(attention_mask, segment_ids)
        h = self.embed_tokens(input_ids).astype(jnp.dtype(self.config.dtype))
        return self.norm(self.run_layers(h, cos, sin, mask, dropout_rng=dropout_rng))

    def run_layers(self, h, cos, sin, mask, *, dropout_rng: jax.Array | None = None) -> jax.Array:
        """The decoder layers (scanned, rematerialised as configured) over input vectors `h` `[batch, seq,
        hidden]`; returns the residual stream before the final norm. `hidden_states` is `norm(run_layers(embed))`;
        the vocabulary transfer calls it on embeddings it is fitting."""
        graphdef, layer_state = nnx.split(self.layers)
        use_dropout = dropout_rng is not None

        def body(h, xs):
            layer_params, idx = xs
            layer = nnx.merge(graphdef, layer_params)
            rng = jax.random.fold_in(dropout_rng, idx) if use_dropout else None
            return layer(h, cos, sin, mask, rng), None

        if self.config.remat != "none":
            body = jax.checkpoint(body, policy=remat_policy(self.config), prevent_cse=False)
        idx = jnp.arange(self.config.num_hidden_layers)
        h, _ = jax.lax.scan(body, h, (layer_state, idx))
        return h

    def lm_head_weight(self) -> jax.Array:
        """The LM head as a `[hidden, vocab]` matrix in the compute dtype (the tied embedding, transposed)."""
        dt = jnp.dtype(self.config.dtype)
        if self.lm_head is None:
            return transpose(self.embed_tokens.embedding[...].astype(dt))
        return self.lm_head.kernel[...].astype(dt)

    def logits_from_hidden(self, h: jax.Array) -> jax.Array:
        """Apply the LM head (the tied embedding when `tie_word_embeddings`); float32 logits."""
        if self.lm_head is None:
            w = self.embed_tokens.embedding[...].astype(h.dtype)
            return jnp.einsum("btd,vd->btv", h, w, preferred_element_type=jnp.float32).astype(jnp.float32)
        return self.lm_head(h).astype(jnp.float32)

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        *,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        dropout_rng: jax.Array | None = None,
    ) -> jax.Array:
        """Float32 logits `[batch, seq, vocab]`.

        `attention_mask` `[batch, seq]` is HF's padding mask (1 = token); `segment_ids` (0 = padding) keep
        attention inside each packed document; `positions` default to 0..seq-1; `dropout_rng` enables LoRA dropout.
        """
        h = self.hidden_states(
            input_ids, attention_mask, positions=positions, segment_ids=segment_ids, dropout_rng=dropout_rng
        )
        return self.logits_from_hidden(h)
