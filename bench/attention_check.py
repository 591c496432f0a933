"""cuDNN flash attention against XLA's attention in zhjax's model, on the GPU at hand: logits and gradients.

    python bench/attention_check.py        # on a machine with a CUDA GPU (needs jax's CUDA plugin)

The same random bf16 LLaMA (SmolLM2's shape, LoRA r=8 on all seven projections) runs with `attention: xla` and
`attention: cudnn` on plain causal rows, on rows with left padding and on packed rows (segment ids); the table
gives the largest absolute difference of the float32 logits and the relative difference of the LoRA gradients
against the xla path's. Both are bf16 computations, so they agree to bf16 rounding, not bit for bit.
"""

from __future__ import annotations

import argparse
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from zhjax.config import LoraConfig, ModelConfig
from zhjax.model.llama import LlamaForCausalLM
from zhjax.model.params import split_model, trainable_filter

SHAPE = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=9,
             num_key_value_heads=3)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--against", default="cudnn", help="the implementation compared with xla (xla: a CPU smoke test)")
    args = parser.parse_args(argv)
    device = jax.devices()[0]
    print(f"device: {device.device_kind} ({device.platform})")
    base = ModelConfig(**SHAPE, dtype="bfloat16", param_dtype="bfloat16", attention="xla")
    lora = LoraConfig(r=8, lora_alpha=32, lora_dropout=0.0)
    model = LlamaForCausalLM(base, lora, rngs=nnx.Rngs(0))
    # LoRA B starts at zero; give it values so that the adapter gradients are not trivially equal
    for path, var in nnx.iter_graph(model):
        if isinstance(var, nnx.Param) and path and path[-1] == "lora_b":
            var[...] = 0.02 * jax.random.normal(jax.random.key(len(path)), var[...].shape, var[...].dtype)
    graphdef, trainable, frozen = split_model(model, trainable_filter(lora))
    graph_cudnn, *_ = split_model(
        LlamaForCausalLM(dataclasses.replace(base, attention=args.against), lora, rngs=nnx.Rngs(0)), trainable_filter(lora)
    )
    rng = np.random.default_rng(0)
    b, t = 4, 512
    ids = jnp.asarray(rng.integers(0, SHAPE["vocab_size"], (b, t)), jnp.int32)
    segments = jnp.asarray(np.repeat(np.arange(1, 5), t // 4)[None].repeat(b, 0), jnp.int32)
    positions = jnp.asarray(np.tile(np.arange(t // 4), 4)[None].repeat(b, 0), jnp.int32)
    cases = {"causal": {}, "packed (4 segments)": dict(segment_ids=segments, positions=positions)}

    def run(gd, kw):
        def loss(tr):
            logits = nnx.merge(gd, tr, frozen)(ids, **kw)
            return jnp.mean(jax.nn.log_softmax(logits.astype(jnp.float32))[..., 0]), logits

        (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(trainable)
        return np.asarray(logits, np.float32), grads

    print(f"{'rows':22s} {'max |logit diff|':>17s} {'logit scale':>12s} {'grad rel diff':>14s}")
    for name, kw in cases.items():
        ref_logits, ref_grads = run(graphdef, kw)
        logits, grads = run(graph_cudnn, kw)
        diff = np.abs(logits - ref_logits).max()
        num = sum(float(jnp.sum((a.astype(jnp.float32) - c.astype(jnp.float32)) ** 2))
                  for a, c in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True))
        den = sum(float(jnp.sum(c.astype(jnp.float32) ** 2)) for c in jax.tree.leaves(ref_grads))
        print(f"{name:22s} {diff:17.4f} {np.abs(ref_logits).max():12.2f} {np.sqrt(num / den):14.2e}")


if __name__ == "__main__":
    main()
