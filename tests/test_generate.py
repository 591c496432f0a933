"""Generation: greedy decoding equals transformers' token for token, one compile per shape, sampling processors
equal transformers' LogitsProcessors, seeds reproduce, stop strings cut, and the CLI prints only the text."""

from __future__ import annotations

import contextlib
import json
import logging
import re
import subprocess
import sys

import numpy as np
import pytest

from tests.extras import needs_torch, optional

torch, transformers = optional("torch"), optional("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

import zhjax  # noqa: E402
from zhjax.config import LoraConfig, ModelConfig  # noqa: E402
from zhjax.infer.chat import Conversation, run_chat  # noqa: E402
from zhjax.infer.generate import Decoder, generate, generate_ids, ntk_rope_theta  # noqa: E402
from zhjax.infer.sampling import (  # noqa: E402
    Sampler,
    apply_repetition_penalty,
    apply_temperature,
    apply_top_k,
    apply_top_p,
    argmax,
    candidate_logits,
    make_knobs,
)
from zhjax.model.decode import decode, decode_logits, decode_weights, dense, init_kv_cache  # noqa: E402
from zhjax.model.llama import LlamaForCausalLM  # noqa: E402

MIXED_PROMPTS = [
    "人民日报一九九八年元旦献词：迈向充满希望的新世纪。In English, this headline says",
    "The Great Wall (长城) is",
    "SmolLM2 是一个小型语言模型，它的中文能力有限，所以我们需要扩充词表。Why? Because",
]
NEW_TOKENS = 64


@contextlib.contextmanager
def torch_threads(n: int):
    """One torch thread: with other jobs on the cores, OpenMP's spinning makes torch erratic (seconds per token)."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@pytest.fixture(scope="module")
def smollm2(assets):
    tok = transformers.AutoTokenizer.from_pretrained(assets.smollm2_dir)
    tok.padding_side = "left"
    ref = transformers.AutoModelForCausalLM.from_pretrained(assets.smollm2_dir, dtype=torch.float32).eval()
    model = zhjax.load_pretrained(assets.smollm2_dir, dtype="float32")
    return tok, ref, Decoder(model)


def hf_greedy(ref, tok, prompts, n, **kwargs) -> list[list[int]]:
    batch = tok(prompts, return_tensors="pt", padding=True)
    with torch_threads(1), torch.no_grad():
        out = ref.generate(**batch, max_new_tokens=n, do_sample=False, **kwargs)
    rows = []
    for row in out[:, batch["input_ids"].shape[1]:].tolist():
        rows.append(row[: row.index(tok.eos_token_id) + 1] if tok.eos_token_id in row else row)
    return rows


@needs_torch
def test_greedy_matches_transformers_single_prompt(smollm2):
    tok, ref, decoder = smollm2
    prompt = MIXED_PROMPTS[0]
    ours = generate_ids(decoder, [tok(prompt)["input_ids"]], max_new_tokens=NEW_TOKENS, greedy=True,
                        repetition_penalty=1.0)
    expected = hf_greedy(ref, tok, [prompt], NEW_TOKENS)
    assert len(expected[0]) == NEW_TOKENS  # no early EOS: all 64 tokens are compared
    assert ours == expected


@needs_torch
def test_greedy_matches_transformers_left_padded_batch(smollm2):
    tok, ref, decoder = smollm2
    ids = [tok(p)["input_ids"] for p in MIXED_PROMPTS]
    assert len({len(i) for i in ids}) == 3  # three lengths: two rows are left-padded
    ours = generate_ids(decoder, ids, max_new_tokens=NEW_TOKENS, greedy=True, repetition_penalty=1.0)
    assert ours == hf_greedy(ref, tok, MIXED_PROMPTS, NEW_TOKENS)


@needs_torch
def test_greedy_with_repetition_penalty_matches_transformers_ignoring_padding(smollm2):
    tok, ref, decoder = smollm2
    ids = [tok(p)["input_ids"] for p in MIXED_PROMPTS]
    ours = generate_ids(decoder, ids, max_new_tokens=24, greedy=True, repetition_penalty=1.3)
    assert ours == hf_greedy(ref, tok, MIXED_PROMPTS, 24, repetition_penalty=1.3)


class CompileLog(logging.Handler):
    def __init__(self):
        super().__init__()
        self.compiled: list[str] = []

    def emit(self, record):
        message = record.getMessage()
        if message.startswith("Compiling "):
            self.compiled.append(message.split(" with ")[0])


@contextlib.contextmanager
def count_compiles():
    handler = CompileLog()
    logger = logging.getLogger("jax")
    logger.addHandler(handler)
    try:
        with jax.log_compiles(True):
            yield handler.compiled
    finally:
        logger.removeHandler(handler)


@needs_torch
def test_decode_loop_compiles_once_not_per_token(smollm2):
    tok, _, decoder = smollm2
    pieces = []
    with count_compiles() as compiled:  # 37 new tokens: a new shape, so one compile of each function
        generate(decoder, tok, ["Hello, my name is"], max_new_tokens=37, greedy=True, eos_token_id=(),
                 stream=lambda i, s: pieces.append(s))
    assert compiled.count("Compiling jit(_decode)") == 1
    assert compiled.count("Compiling jit(_prefill)") == 1
    assert len(pieces) > 10  # it was streamed: one call of the compiled loop per token
    with count_compiles() as compiled:  # another prompt length in the same bucket: nothing compiles at all
        generate(decoder, tok, ["Bonjour, je m'appelle Pierre et"], max_new_tokens=37, greedy=True, eos_token_id=(),
                 stream=lambda i, s: None)
    assert compiled == []


@pytest.fixture(scope="module")
def tiny(assets):
    """A tiny random model over SmolLM2's tokenizer: real text handling, fast compiles."""
    tok = transformers.AutoTokenizer.from_pretrained(assets.smollm2_dir)
    return tok, Decoder(LlamaForCausalLM(tiny_config(), rngs=nnx.Rngs(0)))


@needs_torch
def test_sampling_is_reproducible_and_top_k_1_is_greedy(tiny):
    tok, decoder = tiny
    prompts = MIXED_PROMPTS
    kw = dict(max_new_tokens=24, temperature=1.5, top_k=0, top_p=1.0, repetition_penalty=1.0, eos_token_id=())
    first = generate(decoder, tok, prompts, seed=3, **kw)
    assert generate(decoder, tok, prompts, seed=3, **kw) == first
    streamed = [""] * len(prompts)

    def stream(i, s):
        streamed[i] += s

    assert generate(decoder, tok, prompts, seed=3, stream=stream, **kw) == first == streamed
    assert generate(decoder, tok, prompts, seed=4, **kw) != first
    greedy = generate(decoder, tok, prompts, max_new_tokens=24, greedy=True)
    assert generate(decoder, tok, prompts, max_new_tokens=24, top_k=1, seed=5) == greedy


@needs_torch
def test_stop_strings_cut_the_output(tiny):
    tok, decoder = tiny
    kw = dict(max_new_tokens=40, greedy=True, repetition_penalty=1.3, eos_token_id=())
    full = generate(decoder, tok, MIXED_PROMPTS[:2], **kw)
    stops = [full[0][len(full[0]) // 2 : len(full[0]) // 2 + 3], "NEVER-IN-TEXT"]
    streamed = ["", ""]

    def stream(i, s):
        streamed[i] += s

    cut = generate(decoder, tok, MIXED_PROMPTS[:2], stop=stops, stream=stream, **kw)
    assert cut[0] == full[0][: full[0].index(stops[0])]
    assert cut[1] == (full[1][: full[1].index(stops[0])] if stops[0] in full[1] else full[1])
    assert streamed == cut
    assert generate(decoder, tok, MIXED_PROMPTS[:2], stop=stops, **kw) == cut  # chunked, not streamed


# ------------------------------------------------------------------------------- processors vs transformers


@needs_torch
def test_processors_equal_transformers_logits_processors():
    lp = transformers.generation.logits_process
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (4, 1000)).astype(np.float32)
    input_ids = rng.integers(0, 1000, (4, 12))
    padding = np.array([0, 3, 0, 5])  # left padding, ignored by the penalty as transformers' generate does
    scores = torch.tensor(logits)
    seen = np.zeros((4, 1000), bool)
    for r in range(4):
        seen[r, input_ids[r, padding[r]:]] = True

    expected = lp.RepetitionPenaltyLogitsProcessor(1.3, prompt_ignore_length=torch.tensor(padding))(
        torch.tensor(input_ids), scores.clone())
    np.testing.assert_array_equal(apply_repetition_penalty(jnp.asarray(logits), jnp.asarray(seen), 1.3), expected)
    np.testing.assert_array_equal(apply_temperature(jnp.asarray(logits), 0.7),
                                  lp.TemperatureLogitsWarper(0.7)(None, scores.clone()))
    for k in (1, 40, 999):
        np.testing.assert_array_equal(apply_top_k(jnp.asarray(logits), k), lp.TopKLogitsWarper(k)(None, scores.clone()))
    for p in (0.1, 0.5, 0.9, 0.99):
        np.testing.assert_array_equal(apply_top_p(jnp.asarray(logits), p), lp.TopPLogitsWarper(p)(None, scores.clone()))
    ties = np.round(logits).astype(np.float32)  # many ties: the first maximal index wins, as in torch.argmax
    np.testing.assert_array_equal(argmax(jnp.asarray(ties)), torch.tensor(ties).argmax(-1))


@needs_torch
@pytest.mark.parametrize("top_k,top_p", [(40, 0.9), (5, 0.3), (0, 0.9), (50, 1.0)])
def test_sampled_distribution_equals_transformers_pipeline(top_k, top_p):
    lp = transformers.generation.logits_process
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 2, (3, 500)).astype(np.float32)
    input_ids = torch.tensor(rng.integers(0, 500, (3, 20)))
    procs = [lp.RepetitionPenaltyLogitsProcessor(1.1), lp.TemperatureLogitsWarper(0.2)]
    procs += [lp.TopKLogitsWarper(top_k)] if top_k else []
    procs += [lp.TopPLogitsWarper(top_p)] if top_p < 1 else []
    expected = lp.LogitsProcessorList(procs)(input_ids, torch.tensor(logits)).numpy()
    seen = np.zeros((3, 500), bool)
    np.put_along_axis(seen, input_ids.numpy(), True, axis=1)
    sampler = Sampler(greedy=False, top_k=top_k, use_top_p=top_p < 1, use_penalty=True, eos_ids=(2,), pad_id=2)
    values, indices = candidate_logits(jnp.asarray(logits), jnp.asarray(seen), sampler, make_knobs(0.2, top_p, 1.1))
    ours = np.asarray(values)
    if indices is not None:  # top-k candidates: scatter back over the vocabulary
        ours = np.full_like(logits, -np.inf)
        np.put_along_axis(ours, np.asarray(indices), np.asarray(values), axis=1)
    np.testing.assert_allclose(ours, expected, rtol=1e-6)


# ------------------------------------------------------------------------------- tiny models: paths, CLI, chat


def tiny_config(**kw) -> ModelConfig:
    base = dict(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True, bos_token_id=1,
                eos_token_id=2)
    return ModelConfig(**{**base, **kw})


def test_scanned_and_unstacked_layers_generate_the_same_tokens():
    model = LlamaForCausalLM(tiny_config(vocab_size=300), rngs=nnx.Rngs(3))
    prompts = [[5, 6, 7], list(range(10, 50))]
    kw = dict(max_new_tokens=20, greedy=True, eos_token_id=())
    assert generate_ids(Decoder(model, unstack=False), prompts, **kw) == generate_ids(Decoder(model, unstack=True), prompts, **kw)


@pytest.mark.parametrize("unstack", [False, True], ids=["stacked", "unstacked"])
def test_decode_layout_and_cache_give_the_forward_pass_logits(unstack):
    """The decoding layout (LoRA folded in, q|k|v and gate|up fused, biases, untied head, GQA) fed a left-padded
    prompt and then one token at a time gives the logits of the model's own forward pass over the whole sequence."""
    config = tiny_config(vocab_size=300, tie_word_embeddings=False, attention_bias=True, mlp_bias=True)
    lora = LoraConfig(r=4, lora_alpha=8, modules_to_save=())
    model = LlamaForCausalLM(config, lora, rngs=nnx.Rngs(0))
    for i, (path, var) in enumerate(nnx.to_flat_state(nnx.state(model))):
        if isinstance(var, nnx.LoRAParam) or path[-1] == "bias":  # adapters and biases start at zero: make them count
            var[...] = 0.1 * jax.random.normal(jax.random.key(i), var.shape)
    prompt, new = 8, 4
    ids = jax.random.randint(jax.random.key(7), (2, prompt + new), 3, 300)
    mask = jnp.ones((2, prompt + new), jnp.int32).at[0, :3].set(0)  # row 0 left-padded by 3
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
    expected = model(ids, attention_mask=mask, positions=positions)

    weights = decode_weights(model, unstack=unstack)
    cache = init_kv_cache(config, 2, 16, stacked=not unstack)
    kv_valid = jnp.zeros((2, 16), bool).at[:, :prompt].set(mask[:, :prompt].astype(bool))
    h, cache = decode(config, weights, ids[:, :prompt], cache, positions=positions[:, :prompt], cache_index=0,
                      kv_valid=kv_valid)
    got = [decode_logits(config, weights, h)]
    for s in range(prompt, prompt + new):
        kv_valid = kv_valid.at[:, s].set(True)
        h, cache = decode(config, weights, ids[:, s:s + 1], cache, positions=positions[:, s:s + 1], cache_index=s,
                          kv_valid=kv_valid)
        got.append(decode_logits(config, weights, h))
    got = np.asarray(jnp.concatenate(got, axis=1))
    real = np.asarray(mask, bool)
    np.testing.assert_allclose(got[real], np.asarray(expected)[real], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [1, 2, 8, 32, 33])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_dense_is_x_times_w_transposed_at_every_row_count(rows, dtype):
    """`dense` takes a broadcast multiply-sum for 2-32 rows on CPU and a matmul otherwise: both give x @ w.T + b
    of the inputs rounded to `dtype`, with a wide enough sum that 1024 products of 1.0 come to 1024 in bfloat16
    (a running sum kept in bfloat16 would stop at 256)."""
    rng = np.random.default_rng(rows)
    x = rng.standard_normal((1, rows, 1024)).astype(np.float32)
    w = rng.standard_normal((48, 1024)).astype(np.float32)
    b = rng.standard_normal(48).astype(np.float32)
    fn = jax.jit(dense, static_argnums=3)
    got = np.asarray(fn(jnp.asarray(x), jnp.asarray(w), jnp.asarray(b), dtype).astype(jnp.float32))

    rounded = lambda a: np.asarray(jnp.asarray(a).astype(dtype).astype(jnp.float32), np.float64)
    expected = rounded(x) @ rounded(w).T + rounded(b)
    tol = 1e-4 if dtype == "float32" else 1e-2
    assert got.shape == (1, rows, 48)
    np.testing.assert_allclose(got, expected, rtol=tol, atol=tol * 30)
    # float32 out (as the tied LM head asks): the exact products of the rounded inputs, summed in float32
    wide = jax.jit(lambda x, w, b: dense(x, w, b, dtype, preferred_element_type=jnp.float32))
    got = np.asarray(wide(jnp.asarray(x), jnp.asarray(w), jnp.asarray(b)))
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)
    ones = fn(jnp.ones((rows, 1024)), jnp.ones((4, 1024)), None, dtype)
    assert np.all(np.asarray(ones.astype(jnp.float32)) == 1024.0)

    jaxpr = str(jax.make_jaxpr(dense, static_argnums=3)(jnp.asarray(x), jnp.asarray(w), None, dtype))
    broadcast = 2 <= rows <= 32 and jax.default_backend() == "cpu"
    assert ("dot_general" in jaxpr) != broadcast and ("reduce_sum" in jaxpr) == broadcast


def test_adapter_applied_by_the_cli_equals_the_unmerged_lora_model(tmp_path):
    from zhjax.convert.peft import save_peft_adapter
    from zhjax.infer.cli import apply_adapter

    config = tiny_config(vocab_size=300, tie_word_embeddings=False)
    base = LlamaForCausalLM(config, rngs=nnx.Rngs(0))
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=("q_proj", "v_proj", "down_proj"), modules_to_save=())
    with_lora = LlamaForCausalLM(config, lora, rngs=nnx.Rngs(1))
    nnx.update(with_lora, nnx.state(base))  # the same base weights
    for _, var in nnx.to_flat_state(nnx.state(with_lora, nnx.LoRAParam)):
        var[...] = 0.1 * jax.random.normal(jax.random.key(1), var.shape)
    save_peft_adapter(with_lora, tmp_path / "adapter")
    merged = apply_adapter(base, tmp_path / "adapter")
    ids = jnp.asarray([[1, 5, 9, 200, 17]])
    np.testing.assert_allclose(merged(ids), with_lora(ids), atol=1e-5)


def save_tiny_hf(out_dir, tokenizer_dir):
    config = transformers.LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(out_dir)
    tok = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.save_pretrained(out_dir)
    return model, tok


@needs_torch
def test_cli_prompt_prints_only_the_generated_text(tmp_path, assets):
    ref, tok = save_tiny_hf(tmp_path / "tiny", assets.smollm2_dir)
    prompt = "你好, world"
    expected_ids = hf_greedy(ref, tok, [prompt], 12)[0]
    expected = tok.decode([t for t in expected_ids if t != tok.eos_token_id], skip_special_tokens=True)
    code = "import sys; from zhjax.infer.cli import generate_main; sys.exit(generate_main(sys.argv[1:]))"
    result = subprocess.run(
        [sys.executable, "-c", code, "--model", str(tmp_path / "tiny"), "--prompt", prompt, "--greedy",
         "--repetition-penalty", "1.0", "--max-new-tokens", "12"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected + "\n"


@needs_torch
def test_cli_input_file_writes_one_output_per_record(tmp_path, assets):
    from zhjax.infer.cli import generate_main

    save_tiny_hf(tmp_path / "tiny", assets.smollm2_dir)
    records = [{"instruction": "写一首诗", "input": "关于春天"}, {"prompt": "Once upon a time"}, {"instruction": "Hi"}]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    argv = ["--model", str(tmp_path / "tiny"), "--input-file", str(tmp_path / "in.jsonl"), "--output-file",
            str(tmp_path / "out.jsonl"), "--template", "alpaca", "--max-new-tokens", "5", "--batch-size", "2"]
    assert generate_main(argv) == 0
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [{k: v for k, v in o.items() if k != "output"} for o in out] == records
    assert all(isinstance(o["output"], str) for o in out)


@pytest.mark.parametrize("text, expected", [
    ('{"instruction": "a"}\n\n{"instruction": "b",}\n', r"in\.jsonl:3: malformed JSON: Expecting property name enclosed in double quotes \(column 21\)"),
    ('{"instruction": "a"}\n["b"]\n', r"in\.jsonl:2: expected an object with an 'instruction'"),
    ('{"instruction": "\u4f60"}\n'.encode("gbk"), r"in\.jsonl: not UTF-8 text \(invalid continuation byte at byte 17\)"),
    ("", None),  # no file at all
])
def test_cli_input_file_refuses_a_bad_line_before_loading_a_model(tmp_path, capsys, text, expected):
    from zhjax.infer.cli import generate_main

    if isinstance(text, bytes):
        (tmp_path / "in.jsonl").write_bytes(text)
    elif expected is not None:
        (tmp_path / "in.jsonl").write_text(text)
    else:
        expected = r"No such file or directory: '.*in\.jsonl'"
    argv = ["--model", str(tmp_path / "no-model-here"), "--input-file", str(tmp_path / "in.jsonl"),
            "--output-file", str(tmp_path / "out.jsonl")]
    assert generate_main(argv) == 2  # the missing model is never reached
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("zhjax generate: ")
    assert re.search(expected, err), err
    assert not (tmp_path / "out.jsonl").exists()


@needs_torch
def test_chat_drops_the_oldest_turns_to_fit_and_keeps_the_system_prompt(assets):
    tok = transformers.AutoTokenizer.from_pretrained(assets.smollm2_dir)
    conv = Conversation("alpaca2", system_prompt="SYS")
    conv.turns = [(f"question {i} " * 5, f"answer {i} " * 5) for i in range(4)]
    full, dropped = conv.prompt_ids(tok, "last question")
    assert dropped == 0
    ids, dropped = conv.prompt_ids(tok, "last question", max_prompt_tokens=len(full) - 10)
    assert dropped == 1 and len(ids) <= len(full) - 10
    assert [u for u, _ in conv.turns] == [f"question {i} " * 5 for i in (1, 2, 3)]
    text = tok.decode(ids)
    assert text.startswith("[INST] <<SYS>>\nSYS\n<</SYS>>\n\nquestion 1") and text.count("<<SYS>>") == 1
    assert text.endswith("[INST] last question [/INST]")


def test_chat_loop_resets_and_exits():
    import io

    class Tok:
        eos_token_id = 0

        def __call__(self, text, add_special_tokens=True):
            return {"input_ids": [ord(c) for c in text]}

    lines = iter(["hello", "again", "/reset", "third", "/exit", "never read"])
    seen_prompts = []

    def reply(ids, stream):
        seen_prompts.append("".join(chr(i) if i else "|" for i in ids))
        stream(0, "ok")
        return "ok"

    out = io.StringIO()
    conv = Conversation("none")
    assert run_chat(reply, Tok(), conv, max_prompt_tokens=100, read_line=lambda _: next(lines), out=out,
                    err=io.StringIO()) == 3
    assert seen_prompts == ["hello", "hellook|again", "third"]
    assert out.getvalue().count("Assistant: ok") == 3


def test_ntk_formula_is_the_seeds():
    config = tiny_config(head_dim=128, num_attention_heads=1, num_key_value_heads=1, hidden_size=128,
                         rope_theta=10000.0, max_position_embeddings=2048)
    assert ntk_rope_theta(config, "4", 100) == pytest.approx(10000 * 4 ** (128 / 126))
    assert ntk_rope_theta(config, "auto", 2048) == 10000.0
    assert ntk_rope_theta(config, "auto", 4096) == pytest.approx(10000 * ((4096 / 1024 - 1) * 1.1) ** (128 / 126))
