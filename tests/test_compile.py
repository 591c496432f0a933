"""A 7B-shaped model compiles its forward from abstract parameters, and compile time does not grow with depth."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
from flax import nnx

from zhjax.config import LoraConfig, ModelConfig
from zhjax.model.llama import LlamaForCausalLM

LLAMA_7B = ModelConfig(
    vocab_size=49953,
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    max_position_embeddings=2048,
    dtype="bfloat16",
    param_dtype="bfloat16",
    remat="full",
)


def compile_seconds(config: ModelConfig) -> tuple[float, jax.ShapeDtypeStruct]:
    """Lower and compile the forward of `config` with ShapeDtypeStruct params: nothing is allocated."""
    abstract = nnx.eval_shape(lambda: LlamaForCausalLM(config, LoraConfig(r=8), rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    ids = jax.ShapeDtypeStruct((1, 128), jnp.int32)

    def forward(state, ids):
        return nnx.merge(graphdef, state)(ids)

    start = time.perf_counter()
    compiled = jax.jit(forward).lower(state, ids).compile()
    return time.perf_counter() - start, compiled.out_info


def test_7b_forward_compiles_abstractly_and_compile_time_is_flat_in_depth():
    t4, _ = compile_seconds(LLAMA_7B.replace(num_hidden_layers=4))
    t32, out = compile_seconds(LLAMA_7B)
    print(f"\nforward compile seconds, 7B shape: 4 layers {t4:.2f}, 32 layers {t32:.2f}")
    assert out.shape == (1, 128, 49953) and out.dtype == jnp.float32
    # an unrolled model would take ~8x longer at 32 layers; the scanned one compiles one layer body
    assert t32 < 2.0 * t4 + 1.0
