"""Instruction data: templates, label masks, EOS ids, truncation that keeps the response, files, packing."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from tests.test_data_helpers import make_tokenizer
from zhjax.data import TEMPLATES, DataError, encode_example
from zhjax.data.sft import build_sft_dataset
from zhjax.data.templates import DEFAULT_SYSTEM_PROMPT

CHATML = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
          "{% if add_generation_prompt %}<s>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def tok():
    t = make_tokenizer()
    t.chat_template = CHATML
    return t


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def prompt_of(out):
    """The prompt ids after BOS (the labelled -100 part)."""
    return out["input_ids"][1:out["labels"].count(-100)]


def test_templates_are_the_seeds_verbatim():
    assert TEMPLATES["alpaca"] == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\n{instruction}\n\n### Response: ")
    assert TEMPLATES["alpaca2"] == "[INST] <<SYS>>\n{system_prompt}\n<</SYS>>\n\n{instruction} [/INST]"
    assert DEFAULT_SYSTEM_PROMPT == "You are a helpful assistant. 你是一个乐于助人的助手。"


def test_alpaca_prompt_is_masked_and_eos_is_appended_as_an_id(tok):
    record = {"instruction": "写一首诗", "input": "关于春天", "output": "春天来了。"}
    out = encode_example(record, tok, "alpaca")
    prompt = [tok.bos_token_id] + ids(tok, TEMPLATES["alpaca"].format(instruction="写一首诗\n关于春天"))
    response = ids(tok, "春天来了。") + [tok.eos_token_id]
    assert out["input_ids"] == prompt + response
    assert out["labels"] == [-100] * len(prompt) + response


def test_train_on_inputs_labels_the_prompt_with_its_own_tokens(tok, tmp_path):
    record = {"instruction": "写一首诗", "input": "关于春天", "output": "春天来了。"}
    masked, full = encode_example(record, tok, "alpaca"), encode_example(record, tok, "alpaca", train_on_inputs=True)
    assert full["input_ids"] == masked["input_ids"]
    assert full["labels"] == full["input_ids"]  # every position, the prompt's too, is a target
    write_json(tmp_path / "a.json", [record])
    (row,), summary = build_sft_dataset(tmp_path / "a.json", tok, max_seq_length=512, train_on_inputs=True)
    n = len(full["input_ids"])
    assert row["labels"][:n] == full["input_ids"] and set(row["labels"][n:]) == {-100}
    assert summary.trained_tokens == n


def test_eos_is_never_tokenized_from_its_string():
    tok = make_tokenizer()
    tok.eos_token = "<|end|>"  # not in the vocabulary as one piece: the string would split into bytes
    tok.add_special_tokens({"eos_token": "<|end|>"})
    out = encode_example({"instruction": "a", "output": "b"}, tok)
    assert out["input_ids"][-1] == tok.eos_token_id == tok.convert_tokens_to_ids("<|end|>")
    assert out["input_ids"][-2:-1] == ids(tok, "b")


def test_alpaca_without_input_and_alpaca2_with_default_and_own_system_prompt(tok):
    out = encode_example({"instruction": "你好", "input": "", "output": "好"}, tok)
    assert prompt_of(out) == ids(tok, TEMPLATES["alpaca"].format(instruction="你好"))
    out = encode_example({"instruction": "你好", "output": "好"}, tok, "alpaca2")
    prompt = "[INST] <<SYS>>\nYou are a helpful assistant. 你是一个乐于助人的助手。\n<</SYS>>\n\n你好 [/INST]"
    assert prompt_of(out) == ids(tok, prompt)
    own = encode_example({"instruction": "你好", "output": "好", "system": "S"}, tok, "alpaca2", system_prompt="X")
    assert prompt_of(own) == ids(tok, "[INST] <<SYS>>\nS\n<</SYS>>\n\n你好 [/INST]")


def test_chat_template_trains_only_assistant_turns(tok):
    record = {"conversations": [{"from": "human", "value": "你好"}, {"from": "gpt", "value": "您好！"},
                                {"from": "human", "value": "fox"}, {"from": "gpt", "value": "dog"}]}
    out = encode_example(record, tok, "chat", max_seq_length=1024)
    trained = [t for t, lab in zip(out["input_ids"], out["labels"], strict=True) if lab != -100]
    assert trained == ids(tok, "您好！") + [tok.eos_token_id] + ids(tok, "dog") + [tok.eos_token_id]
    assert tok.decode(out["input_ids"]) == "<s>user\n你好</s>\n<s>assistant\n您好！</s>\n<s>user\nfox</s>\n<s>assistant\ndog</s>"
    echo = encode_example({"instruction": "dog", "output": "dog"}, tok, "chat")  # the response is found by position
    assert [t for t, lab in zip(echo["input_ids"], echo["labels"], strict=True) if lab != -100] == \
        ids(tok, "dog") + [tok.eos_token_id]
    assert tok.decode([t for t, lab in zip(echo["input_ids"], echo["labels"], strict=True) if lab == -100]) == \
        "<s>user\ndog</s>\n<s>assistant\n"


def test_multi_turn_alpaca2_and_role_content_records(tok):
    record = {"conversations": [{"role": "system", "content": "S"}, {"role": "user", "content": "q1"},
                                {"role": "assistant", "content": "a1"}, {"role": "user", "content": "q2"},
                                {"role": "assistant", "content": "a2"}]}
    out = encode_example(record, tok, "alpaca2")
    first = [tok.bos_token_id] + ids(tok, "[INST] <<SYS>>\nS\n<</SYS>>\n\nq1 [/INST]")
    second = [tok.bos_token_id] + ids(tok, "[INST] q2 [/INST]")
    a1, a2 = ids(tok, "a1") + [tok.eos_token_id], ids(tok, "a2") + [tok.eos_token_id]
    assert out["input_ids"] == first + a1 + second + a2
    assert out["labels"] == [-100] * len(first) + a1 + [-100] * len(second) + a2


def test_max_prompt_length_shortens_the_instruction_and_keeps_the_response(tok):
    record = {"instruction": "总结", "input": "新年讲话" * 200, "output": "讲话很好。"}
    stats = Counter()
    out = encode_example(record, tok, max_seq_length=128, max_prompt_length=96, stats=stats)
    n_prompt = out["labels"].count(-100)
    response = ids(tok, "讲话很好。") + [tok.eos_token_id]
    assert n_prompt <= 96 and out["input_ids"][n_prompt:] == response == out["labels"][n_prompt:]
    assert tok.decode(out["input_ids"][:n_prompt]).endswith("\n\n### Response: ")  # the template's end survives
    assert tok.decode(out["input_ids"][:n_prompt]).startswith("<s>Below is an instruction")
    assert stats == {"truncated_prompt": 1, "kept": 1}


def test_a_long_response_is_cut_without_eos_and_an_empty_one_is_dropped_and_counted(tok):
    stats = Counter()
    out = encode_example({"instruction": "说", "output": "很长的回答" * 100}, tok, max_seq_length=64, stats=stats)
    assert len(out["input_ids"]) == 64 and out["labels"][-1] != tok.eos_token_id and out["labels"][-1] != -100
    long_prompt = {"instruction": "新年讲话" * 100, "output": "好"}
    assert encode_example(long_prompt, tok, max_seq_length=64, stats=stats) is None  # the seed: all labels -100
    assert encode_example({"instruction": "说", "output": "  "}, tok, stats=stats) is None
    assert stats == {"kept": 1, "truncated_response": 1, "dropped_no_room_for_response": 1,
                     "dropped_empty_response": 1}


@pytest.mark.parametrize(("record", "message"), [
    ({"instruction": "a"}, "field 'output' must be a string \\(missing\\)"),
    ({"instruction": "a", "output": 3}, "field 'output' must be a string \\(a int\\)"),
    ({"instruction": "a", "input": ["x"], "output": "b"}, "field 'input' must be a string"),
    ({"conversations": [{"from": "human", "value": "a"}, {"from": "bot", "value": "b"}]}, "conversations\\[1\\].from"),
    ({"conversations": [{"from": "human", "value": "a"}, {"from": "gpt"}]}, "conversations\\[1\\]: field 'value'"),
])
def test_bad_records_name_the_field(tok, record, message):
    with pytest.raises(ValueError, match=message):
        encode_example(record, tok)


def write_json(path, records, jsonl=False):
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records) if jsonl
                    else json.dumps(records, ensure_ascii=False))
    return path


def test_files_errors_name_file_line_record_and_field(tmp_path, tok):
    (tmp_path / "a.json").write_text('[{"instruction": "a", "output": "b"},\n {"instruction": }]')
    with pytest.raises(DataError, match=r"a\.json:2: malformed JSON"):
        build_sft_dataset(tmp_path / "a.json", tok)
    (tmp_path / "b.jsonl").write_text('{"instruction": "a", "output": "b"}\n\n{"instruction": "a"\n')
    with pytest.raises(DataError, match=r"b\.jsonl:3: malformed JSON"):
        build_sft_dataset(tmp_path / "b.jsonl", tok)
    good = {"instruction": "a", "output": "b"}
    write_json(tmp_path / "c.json", [good, good, good, {"instruction": "a", "output": None}])
    with pytest.raises(DataError, match=r"c\.json:1: field 'output' must be a string"):
        build_sft_dataset(tmp_path / "c.json", tok)
    write_json(tmp_path / "d.json", [{"instruction": "a", "output": ""}] * 3)
    with pytest.raises(DataError, match=r"d\.json: none of its records gave a usable example"):
        build_sft_dataset(tmp_path / "d.json", tok)
    (tmp_path / "e.json").write_text('{"instruction": "a"}')
    with pytest.raises(DataError, match="must hold a list"):
        build_sft_dataset(tmp_path / "e.json", tok)


def random_records(n, seed=0):
    rng = np.random.default_rng(seed)
    words = ["春天", "新年", "fox", "dog", "讲话", "希望", "，", "。"]
    return [{"instruction": "".join(rng.choice(words, rng.integers(1, 20))) + f" #{i}",
             "input": "".join(rng.choice(words, rng.integers(0, 10))),
             "output": "".join(rng.choice(words, rng.integers(1, 30)))} for i in range(n)]


def segments(row):
    """(input_ids, labels, positions) of each example packed in ``row``."""
    seg = np.asarray(row["segment_ids"])
    return [tuple(np.asarray(row[k])[seg == s].tolist() for k in ("input_ids", "labels", "positions"))
            for s in range(1, seg.max() + 1)]


def test_packing_keeps_every_example_once_with_segments_and_restarting_positions(tmp_path, tok):
    records = random_records(300)
    write_json(tmp_path / "a.jsonl", records[:150], jsonl=True)
    # the dropped record sits before others: packing must follow the kept examples, not the records' positions
    write_json(tmp_path / "b.json", records[150:160] + [{"instruction": "x", "output": ""}] + records[160:])
    rows, summary = build_sft_dataset(tmp_path, tok, max_seq_length=256, num_proc=2)
    unpacked, _ = build_sft_dataset(tmp_path, tok, max_seq_length=256, pack=False)
    assert summary.records == 301 and summary.examples == 300 == len(unpacked)
    assert summary.counts == {"kept": 300, "dropped_empty_response": 1}
    packed = [s for row in rows for s in segments(row)]
    expected = [(x, y, list(range(len(x)))) for x, y in zip(unpacked["input_ids"], unpacked["labels"], strict=True)]
    assert sorted(packed) == sorted(expected)
    assert all(len(row["input_ids"]) == 256 for row in rows)
    pad = np.asarray(rows["segment_ids"]) == 0
    assert (np.asarray(rows["labels"])[pad] == -100).all() and (np.asarray(rows["input_ids"])[pad] == tok.pad_token_id).all()
    used = np.sort((np.asarray(rows["segment_ids"]) > 0).sum(axis=1))
    assert summary.rows == len(rows) and used[0] + used[1] > 256  # best fit: no two rows would fit in one
    assert "dropped empty response" in str(summary)


def toy_model_token_losses(params, batch):
    """Per-token loss of a one-layer causal attention LM with absolute positions and a segment mask."""
    import jax
    import jax.numpy as jnp

    x = params["embed"][batch["input_ids"]] + params["pos"][batch["positions"]]
    q, k, v = (x @ params[n] for n in ("wq", "wk", "wv"))
    seg = batch["segment_ids"]
    n = x.shape[1]
    mask = jnp.tril(jnp.ones((n, n), bool))[None] & (seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] > 0)
    att = jnp.where(mask, q @ k.transpose(0, 2, 1) / np.sqrt(x.shape[-1]), -1e30)
    h = x + jax.nn.softmax(att, axis=-1) @ v
    logp = jax.nn.log_softmax(h @ params["out"], axis=-1)[:, :-1]
    labels = batch["labels"][:, 1:]
    loss = -jnp.take_along_axis(logp, jnp.maximum(labels, 0)[..., None], axis=-1)[..., 0]
    return jnp.where(labels != -100, loss, 0.0), seg[:, 1:]


def test_packed_rows_give_the_same_per_example_loss_as_separate_rows(tmp_path, tok):
    import jax

    write_json(tmp_path / "a.json", random_records(40, seed=1))
    packed, _ = build_sft_dataset(tmp_path / "a.json", tok, max_seq_length=192)
    single, _ = build_sft_dataset(tmp_path / "a.json", tok, max_seq_length=192, pack=False)
    keys = jax.random.split(jax.random.key(0), 6)
    d, vocab = 32, len(tok)
    params = {"embed": jax.random.normal(keys[0], (vocab, d)), "pos": jax.random.normal(keys[1], (192, d)),
              **{n: jax.random.normal(k, (d, d)) / np.sqrt(d) for n, k in zip(("wq", "wk", "wv"), keys[2:5], strict=True)},
              "out": jax.random.normal(keys[5], (d, vocab)) / np.sqrt(d)}
    as_batch = lambda ds: {k: np.asarray(ds[k], np.int32) for k in ("input_ids", "labels", "segment_ids", "positions")}
    loss, seg = toy_model_token_losses(params, as_batch(packed))
    loss, seg = np.asarray(loss), np.asarray(seg)
    per_packed = {}
    for r, row in enumerate(packed):
        for s, (x, _, _) in enumerate(segments(row), 1):
            per_packed[tuple(x)] = float(loss[r][seg[r] == s].sum())
    pad = lambda x, v: x + [v] * (192 - len(x))
    rows = {"input_ids": np.asarray([pad(x, 0) for x in single["input_ids"]]),
            "labels": np.asarray([pad(y, -100) for y in single["labels"]]),
            "segment_ids": np.asarray([pad([1] * len(x), 0) for x in single["input_ids"]]),
            "positions": np.tile(np.arange(192), (len(single), 1))}
    alone, _ = toy_model_token_losses(params, rows)
    for x, loss_alone in zip(single["input_ids"], np.asarray(alone).sum(axis=1), strict=True):
        np.testing.assert_allclose(per_packed[tuple(x)], loss_alone, rtol=2e-5)
    assert len(per_packed) == len(single)
    # the equivalence needs both the segment mask and the restarting positions
    no_restart = as_batch(packed) | {"positions": np.tile(np.arange(192, dtype=np.int32), (len(packed), 1))}
    assert not np.allclose(toy_model_token_losses(params, no_restart)[0], loss)
