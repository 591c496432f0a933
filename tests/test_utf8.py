"""No answer holds U+FFFD: tokens that would leave bytes no later token can complete are masked
(`zhjax.tokenizer.utf8`), in zhjax's decoder and in the `transformers` processor the recipe's evaluation uses.

A tiny random model over SmolLM2's byte-level tokenizer picks byte tokens freely, so sampling without the mask
writes broken characters; the same sampling with the mask must not.
"""

from __future__ import annotations

import numpy as np
import pytest
import transformers
from flax import nnx

from tests.extras import needs_torch
from zhjax.config import ModelConfig
from zhjax.infer.generate import Decoder, generate
from zhjax.model.llama import LlamaForCausalLM
from zhjax.tokenizer.utf8 import Utf8Constraint, token_bytes

PROMPTS = ["中华人民共和国", "今天天气很好，我们", "The capital of China is", "请列出句子中的人名："]


@pytest.fixture(scope="module")
def tok(assets):
    return transformers.AutoTokenizer.from_pretrained(assets.smollm2_dir)


def test_tables_follow_utf8_on_real_text(tok):
    table = Utf8Constraint.from_tokenizer(tok)
    for text in [*PROMPTS, "混合 mixed 文字 ✓ 😀 end"]:
        state = 0
        for t in tok.encode(text, add_special_tokens=False):
            assert table.allowed[state, t], (text, t)
            state = int(table.next_state[state, t])
        assert state == 0
    pieces = token_bytes(tok)
    lead = tok.convert_tokens_to_ids("ä")  # the single byte 0xE4: starts a 3-byte character
    assert pieces[lead] == b"\xe4" and table.allowed[0, lead] and table.next_state[0, lead] == 2
    assert not table.allowed[2, lead]  # a new character may not start while one waits for 2 bytes
    assert not table.allowed[2, tok.eos_token_id] and table.allowed[0, tok.eos_token_id]


def test_zhjax_sampling_never_writes_broken_characters(tok):
    config = ModelConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    decoder = Decoder(LlamaForCausalLM(config, rngs=nnx.Rngs(0)))
    kw = dict(max_new_tokens=40, temperature=1.5, top_k=0, top_p=1.0, repetition_penalty=1.0, eos_token_id=())
    free = generate(decoder, tok, PROMPTS, seed=1, complete_characters=False, **kw)
    assert any("\ufffd" in text for text in free)  # the test can fail: unconstrained sampling breaks characters
    masked = generate(decoder, tok, PROMPTS, seed=1, **kw)
    assert all("\ufffd" not in text for text in masked)
    assert all(len(text) > 10 for text in masked)


@needs_torch
def test_transformers_processor_keeps_greedy_answers_valid(tok):
    import torch

    from zhjax.eval.hf import generate_answers

    config = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                      bos_token_id=1, eos_token_id=2, pad_token_id=2)
    torch.manual_seed(1)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # favour single bytes, as an untrained model with byte tokens does
        model.lm_head.weight[:256] += 0.5 * torch.randn(256, 32)
    free = generate_answers(model, tok, PROMPTS, max_new_tokens=24, batch_size=4, complete_characters=False)
    masked = generate_answers(model, tok, PROMPTS, max_new_tokens=24, batch_size=4)
    assert any("\ufffd" in a for a in free)
    assert all("\ufffd" not in a for a in masked)
    assert np.mean([len(a) for a in masked]) > 5
