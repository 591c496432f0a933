"""Pre-training blocks: grouping, segment ids, BOS/EOS, formats, cache keys, bad input, splits, hosts."""

from __future__ import annotations

import gzip
import threading

import fsspec
import numpy as np
import pytest

from tests.test_data_helpers import make_tokenizer, write_text
from zhjax.data import pretrain
from zhjax.data.pretrain import (
    DataError,
    build_blocks,
    build_blocks_with_summary,
    encode_texts,
    iter_lines,
    prepare_pretrain_data,
)

WORDS = ["迈向", "充满", "希望", "的", "新世纪", "fox", "jumps", "over", "the", "lazy", "dog", "一九九八年", "，", "。"]


def corpus(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return ["".join(rng.choice(WORDS, size=rng.integers(1, 12))) for _ in range(n)]


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def reference_docs(tok, lines, bos=True, eos=True):
    """The documents the seed's tokenization would give, computed with the tokenizer's own __call__."""
    ids = [tok(x, add_special_tokens=False)["input_ids"] for x in lines if x.strip()]
    return [[tok.bos_token_id] * bos + x + [tok.eos_token_id] * eos for x in ids]


def blocks_of(ds) -> tuple[np.ndarray, np.ndarray]:
    return np.asarray(ds["input_ids"]), np.asarray(ds["segment_ids"])


def test_blocks_continue_across_lines_and_files_with_only_the_final_tail_dropped(tmp_path, tok):
    lines_a, lines_b = corpus(2500, 1), corpus(700, 2)  # > 1000 lines, where the seed lost every remainder
    write_text(tmp_path / "a.txt", lines_a)
    write_text(tmp_path / "b.txt", lines_b)
    ds, summary = build_blocks_with_summary(tmp_path, tok, 64, cache_dir=tmp_path / "cache")
    stream = np.concatenate([np.array(d) for d in reference_docs(tok, lines_a + lines_b)])
    ids, _ = blocks_of(ds)
    assert ids.shape == (len(stream) // 64, 64)
    np.testing.assert_array_equal(ids.reshape(-1), stream[: ids.size])
    assert summary.dropped_tail_tokens == len(stream) % 64 < 64
    assert (summary.documents, summary.tokens, summary.blocks) == (3200, len(stream), len(ids))


def test_segment_ids_number_the_documents_of_each_block_from_one(tmp_path, tok):
    lines = corpus(300, 3)
    write_text(tmp_path / "a.txt", lines)
    ds = build_blocks(tmp_path / "a.txt", tok, 32, cache_dir=tmp_path / "c")
    ids, segs = blocks_of(ds)
    doc_of_token = np.concatenate([np.full(len(d), i) for i, d in enumerate(reference_docs(tok, lines))])
    docs = doc_of_token[: ids.size].reshape(ids.shape)
    np.testing.assert_array_equal(segs, docs - docs[:, :1] + 1)
    assert (segs[:, 0] == 1).all()
    assert {ds.features[k].feature.dtype for k in ("input_ids", "segment_ids")} == {"int32"}


@pytest.mark.parametrize(("add_bos", "add_eos"), [(True, True), (True, False), (False, True)])
def test_bos_and_eos_are_added_per_document_as_flagged(tmp_path, tok, add_bos, add_eos):
    lines = corpus(200, 4)
    write_text(tmp_path / "a.txt", lines)
    ds, s = build_blocks_with_summary(tmp_path / "a.txt", tok, 16, tmp_path / "c", add_eos, add_bos=add_bos)
    stream = np.concatenate([np.array(d) for d in reference_docs(tok, lines, add_bos, add_eos)])
    np.testing.assert_array_equal(blocks_of(ds)[0].reshape(-1), stream[: len(ds) * 16])
    assert s.tokens == len(stream)


def test_fast_encoding_matches_the_tokenizers_call(tok):
    lines = corpus(50, 5) + ["<s> literal specials </s>", " leading space", "tab\tand  spaces"]
    assert encode_texts(tok, lines) == tok(lines, add_special_tokens=False)["input_ids"]


def test_txt_jsonl_gzip_and_fsspec_urls_give_the_same_blocks(tmp_path, tok):
    lines = corpus(400, 6)
    write_text(tmp_path / "plain" / "a.txt", lines)
    write_text(tmp_path / "gz" / "a.txt.gz", lines, gz=True)
    write_text(tmp_path / "js" / "a.jsonl.gz", lines, gz=True, jsonl=True)
    with fsspec.open("memory://zhjax-test/corpus/a.jsonl", "wb") as f:
        f.write(gzip.decompress((tmp_path / "js" / "a.jsonl.gz").read_bytes()))
    results = [blocks_of(build_blocks(p, tok, 32, cache_dir=tmp_path / "cache"))[0]
               for p in (tmp_path / "plain", tmp_path / "gz", tmp_path / "js", "memory://zhjax-test/corpus")]
    for other in results[1:]:
        np.testing.assert_array_equal(results[0], other)
    remote = dict(cache_dir="memory://zhjax-test/cache", local_cache_dir=tmp_path / "mirror")
    first, s1 = build_blocks_with_summary(tmp_path / "plain", tok, 32, **remote)
    again, s2 = build_blocks_with_summary(tmp_path / "plain", tok, 32, **remote)
    assert (s1.tokenized_files, s2.tokenized_files) == (1, 0) and fsspec.filesystem("memory").ls("/zhjax-test/cache")
    np.testing.assert_array_equal(blocks_of(again)[0], results[0])


def test_byte_ranges_and_worker_processes_give_the_same_blocks(tmp_path, tok, monkeypatch):
    lines = corpus(3000, 7)
    write_text(tmp_path / "a.txt", lines)
    write_text(tmp_path / "b.txt", lines[:500])
    whole = blocks_of(build_blocks(tmp_path, tok, 64, cache_dir=tmp_path / "c1"))
    monkeypatch.setattr(pretrain, "_MIN_CHUNK_BYTES", 4096)  # split a.txt into many newline-aligned ranges
    monkeypatch.setattr(pretrain, "_MAX_CHUNK_BYTES", 4096)
    split = blocks_of(build_blocks(tmp_path, tok, 64, cache_dir=tmp_path / "c2", num_proc=2))
    for x, y in zip(whole, split, strict=True):
        np.testing.assert_array_equal(x, y)


def test_byte_ranges_tile_a_file_line_by_line(tmp_path):
    path = write_text(tmp_path / "a.txt", [f"line {i} " + "x" * (i % 17) for i in range(500)])
    size = path.stat().st_size
    for chunk in (1, 7, 64, 1000, size):
        got = [raw for s in range(0, size, chunk) for _, raw in iter_lines(str(path), None, s, s + chunk)]
        assert got == path.read_bytes().splitlines(keepends=True)


def test_second_run_loads_from_cache_and_keys_track_tokenizer_block_size_eos_and_content(tmp_path, tok):
    write_text(tmp_path / "d" / "a.txt", corpus(300, 8))
    write_text(tmp_path / "d" / "b.txt", corpus(300, 9))
    cache = tmp_path / "cache"
    first, s1 = build_blocks_with_summary(tmp_path / "d", tok, 32, cache)
    again, s2 = build_blocks_with_summary(tmp_path / "d", tok, 32, cache)
    assert (s1.tokenized_files, s2.tokenized_files, s2.cached_files) == (2, 0, 2)
    np.testing.assert_array_equal(blocks_of(first)[0], blocks_of(again)[0])
    assert again.cache_files and all(f["filename"].startswith(str(cache)) for f in again.cache_files)  # memory-mapped

    other_size, s3 = build_blocks_with_summary(tmp_path / "d", tok, 48, cache)
    assert s3.tokenized_files == 0 and len(other_size[0]["input_ids"]) == 48
    _, s4 = build_blocks_with_summary(tmp_path / "d", tok, 32, cache, add_eos=False)
    assert s4.tokenized_files == 2 and s4.tokens == s1.tokens - s1.documents
    other_tok = make_tokenizer(vocab_size=300)
    ds5, s5 = build_blocks_with_summary(tmp_path / "d", other_tok, 32, cache)
    assert s5.tokenized_files == 2 and s5.tokens != s1.tokens
    write_text(tmp_path / "d" / "b.txt", corpus(300, 10))
    _, s6 = build_blocks_with_summary(tmp_path / "d", tok, 32, cache)
    assert (s6.tokenized_files, s6.cached_files) == (1, 1)


def test_non_utf8_bytes_name_file_offset_and_line_unless_replaced(tmp_path, tok):
    path = tmp_path / "bad.txt"
    path.write_bytes("好的\n第二行\n".encode() + b"abc\xff\xfedef\n" + "最后\n".encode())
    with pytest.raises(DataError, match=r"bad\.txt:3: byte 0xff is not valid utf-8"):
        build_blocks(path, tok, 4)
    _, summary = build_blocks_with_summary(path, tok, 4, errors="replace")
    assert summary.documents == 4


def test_blank_lines_and_empty_files_are_skipped_and_counted(tmp_path, tok):
    write_text(tmp_path / "a.txt", ["一", "", "   ", "二", "\t"])
    (tmp_path / "empty.txt").write_bytes(b"")
    write_text(tmp_path / "c.jsonl", ["三", ""], jsonl=True)
    _, s = build_blocks_with_summary(tmp_path, tok, 2)
    assert (s.documents, s.empty_lines, s.empty_files, s.files) == (3, 4, 1, 3)
    assert s.empty_file_paths == [str(tmp_path / "empty.txt")]
    assert "empty lines (skipped)" in str(s) and "tail tokens dropped" in str(s)


@pytest.mark.parametrize(("body", "message"), [
    ('{"text": "ok"}\n{"text": "broken\n', r"b\.jsonl:2: malformed JSON"),
    ('{"text": "ok"}\n\n{"body": "no text"}\n', r"b\.jsonl:3: record field 'text' must be a string \(missing\)"),
    ('{"text": 7}\n', r"b\.jsonl:1: record field 'text' must be a string \(int\)"),
    ('["text"]\n', r"b\.jsonl:1: record field 'text' must be a string \(missing\)"),
])
def test_malformed_jsonl_names_file_line_and_field(tmp_path, tok, body, message):
    (tmp_path / "b.jsonl").write_text(body)
    with pytest.raises(DataError, match=message):
        build_blocks(tmp_path / "b.jsonl", tok, 2)


def test_corpus_smaller_than_one_block_and_missing_files_are_clear_errors(tmp_path, tok):
    write_text(tmp_path / "a.txt", ["一"])
    with pytest.raises(DataError, match=r"has \d+ tokens, fewer than one block of block_size=4096"):
        build_blocks(tmp_path / "a.txt", tok, 4096)
    with pytest.raises(DataError, match="no such file"):
        build_blocks(tmp_path / "nope.txt", tok, 8)
    (tmp_path / "x.csv").write_text("a")
    with pytest.raises(DataError, match="unsupported file type"):
        build_blocks(tmp_path / "x.csv", tok, 8)
    (tmp_path / "sub").mkdir()
    with pytest.raises(DataError, match="no .txt/.jsonl files"):
        build_blocks(tmp_path / "sub", tok, 8)


def test_validation_split_is_a_seeded_fraction_of_disjoint_blocks(tmp_path, tok):
    write_text(tmp_path / "a.txt", corpus(1000, 11))
    data = prepare_pretrain_data(tmp_path / "a.txt", tok, 16, validation_split_percentage=0.1, seed=3,
                                 cache_dir=tmp_path / "c")
    n = data.summary.blocks
    assert len(data.validation) == round(n * 0.1) and len(data.train) + len(data.validation) == n
    all_rows = {tuple(r) for r in blocks_of(data.train)[0]} | {tuple(r) for r in blocks_of(data.validation)[0]}
    assert len(all_rows) == len({tuple(r) for r in blocks_of(build_blocks(tmp_path / "a.txt", tok, 16))[0]})
    same = prepare_pretrain_data(tmp_path / "a.txt", tok, 16, validation_split_percentage=0.1, seed=3,
                                 cache_dir=tmp_path / "c")
    other = prepare_pretrain_data(tmp_path / "a.txt", tok, 16, validation_split_percentage=0.1, seed=4,
                                  cache_dir=tmp_path / "c")
    assert same.validation["input_ids"] == data.validation["input_ids"]
    assert other.validation["input_ids"] != data.validation["input_ids"]
    with pytest.raises(ValueError, match="fraction"):
        prepare_pretrain_data(tmp_path / "a.txt", tok, 16, validation_split_percentage=5)


def test_explicit_validation_file(tmp_path, tok):
    write_text(tmp_path / "train.txt", corpus(300, 12))
    write_text(tmp_path / "val.txt", corpus(100, 13))
    data = prepare_pretrain_data(tmp_path / "train.txt", tok, 16, validation_paths=tmp_path / "val.txt")
    assert len(data.train) == data.summary.blocks
    np.testing.assert_array_equal(blocks_of(data.validation)[0], blocks_of(build_blocks(tmp_path / "val.txt", tok, 16))[0])


def test_two_hosts_each_tokenize_their_own_files_into_a_shared_cache(tmp_path, tok):
    for i in range(5):
        write_text(tmp_path / "d" / f"{i}.txt", corpus(100 + 50 * i, 20 + i))
    expected = blocks_of(build_blocks(tmp_path / "d", tok, 32, cache_dir=tmp_path / "single"))
    gate = threading.Barrier(2)
    results: dict[int, tuple] = {}

    def host(index: int) -> None:
        results[index] = build_blocks_with_summary(tmp_path / "d", tok, 32, tmp_path / "shared", process_index=index,
                                                   process_count=2, barrier=lambda name: gate.wait(timeout=60))

    threads = [threading.Thread(target=host, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set(results) == {0, 1}
    assert results[0][1].tokenized_files + results[1][1].tokenized_files == 5
    assert min(results[0][1].tokenized_files, results[1][1].tokenized_files) >= 2  # balanced by size
    for ds, _ in results.values():
        for x, y in zip(expected, blocks_of(ds), strict=True):
            np.testing.assert_array_equal(x, y)
    with pytest.raises(ValueError, match="explicit barrier"):
        build_blocks(tmp_path / "d", tok, 32, tmp_path / "shared", process_index=0, process_count=2)


def test_peoples_daily_with_smollm2_keeps_every_token(assets, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(assets.smollm2_dir)
    lines = assets.corpus_text.read_text(encoding="utf-8").splitlines()[:4000]  # a fifth keeps the test quick
    path = write_text(tmp_path / "peoples_daily.txt", lines)
    ds, s = build_blocks_with_summary(path, tok, 1024, cache_dir=tmp_path / "cache")
    ids = tok([x for x in lines if x.strip()], add_special_tokens=False)["input_ids"]
    assert s.documents == len(ids) and s.empty_lines == len(lines) - len(ids)
    assert s.tokens == sum(map(len, ids)) + 2 * len(ids) and s.blocks == s.tokens // 1024
    stream = np.concatenate([[tok.bos_token_id, *x, tok.eos_token_id] for x in ids])
    np.testing.assert_array_equal(np.asarray(ds["input_ids"]).reshape(-1), stream[: s.blocks * 1024])
