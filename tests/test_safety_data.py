"""Data errors name the file and line in one message; BOM accepted; encoding settable; compression in keys.

Issue 17, item 7.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = REPO / "configs" / "tiny" / "tokenizer"
GOOD = {"instruction": "写一句话", "input": "", "output": "今天天气很好。"}


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TOKENIZER)


def examples_file(path: Path, records: list, *, bom: bool = False) -> Path:
    text = json.dumps(records, ensure_ascii=False, indent=2)
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8"))
    return path


def line_of_record(path: Path, index: int) -> int:
    """The 1-based line on which record `index` of an indent=2 JSON list opens."""
    lines = path.read_text(encoding="utf-8-sig").splitlines()
    opens = [n for n, line in enumerate(lines, 1) if line == "  {"]
    return opens[index]


def test_sft_record_error_names_file_and_line_not_a_record_index(tmp_path, tokenizer):
    from zhjax.data.files import DataError
    from zhjax.data.sft import build_sft_dataset

    f = examples_file(tmp_path / "sft.json", [GOOD, GOOD, {**GOOD, "output": 5}])
    with pytest.raises(DataError) as err:
        build_sft_dataset([f], tokenizer, "alpaca", 128)
    assert str(err.value) == f"{f}:{line_of_record(f, 2)}: field 'output' must be a string (a int)"


def test_cli_reports_a_data_error_as_one_line_with_exit_code_2(tmp_path):
    f = examples_file(tmp_path / "sft.json", [GOOD] * 3 + [{**GOOD, "output": None}])
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "zhjax.cli", "sft", "--config", "configs/sft/tiny.yaml",
                           f"output_dir={tmp_path / 'run'}", f"data.train_files=[{f}]", "max_steps=2",
                           f"data.data_cache_dir={tmp_path / 'cache'}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"zhjax sft: {f}:{line_of_record(f, 3)}: field 'output' must be a string (a NoneType)")


def test_a_utf8_bom_is_accepted_in_sft_and_pretraining_files(tmp_path, tokenizer):
    from zhjax.data.pretrain import build_blocks
    from zhjax.data.sft import iter_records

    f = examples_file(tmp_path / "bom.json", [GOOD, GOOD], bom=True)
    assert [r for _, _, r in iter_records([f])] == [GOOD, GOOD]
    jl = tmp_path / "bom.jsonl"
    jl.write_bytes(b"\xef\xbb\xbf" + "\n".join(json.dumps(GOOD, ensure_ascii=False) for _ in range(2)).encode())
    assert [r for _, _, r in iter_records([jl])] == [GOOD, GOOD]
    text = "今天天气很好。我们去公园散步吧。\n" * 40
    (tmp_path / "plain.txt").write_bytes(text.encode())
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbf" + text.encode())
    plain = build_blocks([tmp_path / "plain.txt"], tokenizer, 16, cache_dir=tmp_path / "c1")
    bom = build_blocks([tmp_path / "bom.txt"], tokenizer, 16, cache_dir=tmp_path / "c2")
    assert plain["input_ids"] == bom["input_ids"]


def test_gbk_text_trains_with_data_encoding_from_the_config(tmp_path, tokenizer):
    from zhjax.data.files import DataError
    from zhjax.data.pretrain import build_blocks
    from zhjax.train.config import load_job_config

    text = "今天天气很好。我们去公园散步吧。\n" * 40
    (tmp_path / "utf8.txt").write_bytes(text.encode())
    (tmp_path / "gbk.txt").write_bytes(text.encode("gbk"))
    with pytest.raises(DataError, match=r"gbk.txt:1: byte 0x[0-9a-f]{2} is not valid utf-8; set data.encoding"):
        build_blocks([tmp_path / "gbk.txt"], tokenizer, 16, cache_dir=tmp_path / "c")
    cfg = load_job_config("pretrain", "configs/pretrain/tiny.yaml", ["data.encoding=gbk"])
    assert cfg.data.encoding == "gbk"
    gbk = build_blocks([tmp_path / "gbk.txt"], tokenizer, 16, cache_dir=tmp_path / "c", encoding=cfg.data.encoding)
    utf8 = build_blocks([tmp_path / "utf8.txt"], tokenizer, 16, cache_dir=tmp_path / "c")
    assert gbk["input_ids"] == utf8["input_ids"]


def test_a_corrupt_gz_is_named_in_its_error(tmp_path, tokenizer):
    from zhjax.data.files import DataError
    from zhjax.data.pretrain import build_blocks
    from zhjax.data.sft import iter_records

    blob = gzip.compress(("今天天气很好。\n" * 200).encode())
    bad = tmp_path / "corpus.txt.gz"
    bad.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DataError, match=f"{bad}: cannot decompress"):
        build_blocks([bad], tokenizer, 16, cache_dir=tmp_path / "c")
    bad_sft = tmp_path / "sft.jsonl.gz"
    bad_sft.write_bytes(b"\x1f\x8b\x08\x00garbage")
    with pytest.raises(DataError, match=f"{bad_sft}: cannot decompress"):
        list(iter_records([bad_sft]))


def test_a_plain_file_named_gz_is_not_served_from_a_warm_cache(tmp_path, tokenizer):
    from zhjax.data.files import DataError
    from zhjax.data.pretrain import build_blocks

    text = ("今天天气很好。我们去公园散步吧。\n" * 40).encode()
    (tmp_path / "a.txt").write_bytes(text)
    build_blocks([tmp_path / "a.txt"], tokenizer, 16, cache_dir=tmp_path / "c")  # warms the cache for these bytes
    (tmp_path / "b.txt.gz").write_bytes(text)  # the same bytes, but not gzip
    with pytest.raises(DataError, match="b.txt.gz: cannot decompress"):
        build_blocks([tmp_path / "b.txt.gz"], tokenizer, 16, cache_dir=tmp_path / "c")


def test_an_empty_examples_file_beside_a_good_one_is_named_in_a_warning(tmp_path, tokenizer, capsys):
    from zhjax.data.sft import build_sft_dataset

    good = examples_file(tmp_path / "good.json", [GOOD] * 4)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    build_sft_dataset([good, empty], tokenizer, "alpaca", 128)
    said = capsys.readouterr()
    assert f"{empty}: holds no records (skipped)" in said.out + said.err


@pytest.mark.parametrize("kind", ["pretrain", "sft"])
def test_a_data_error_in_a_map_worker_reaches_the_user_as_one_line_with_exit_code_2(tmp_path, kind):
    """With `preprocessing_num_workers=2` the bad record is met inside a `datasets.map` worker process."""
    if kind == "pretrain":
        good, bad = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
        good.write_text("".join(json.dumps({"text": "今天天气很好。" * 8}) + "\n" for _ in range(50)))
        bad.write_text(json.dumps({"text": "你好"}) + "\n" + json.dumps({"text": "世界"}) + "\n{not json\n")
        expected = f"zhjax pretrain: {bad}:3: malformed JSON: Expecting property name enclosed in double quotes (column 2)"
    else:
        bad = examples_file(tmp_path / "sft.json", [GOOD] * 7 + [{**GOOD, "output": None}])
        expected = f"zhjax sft: {bad}:{line_of_record(bad, 7)}: field 'output' must be a string (a NoneType)"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    files = f"[{tmp_path / 'a.jsonl'},{bad}]" if kind == "pretrain" else f"[{bad}]"
    proc = subprocess.run([sys.executable, "-m", "zhjax.cli", kind, "--config", f"configs/{kind}/tiny.yaml",
                           f"output_dir={tmp_path / 'run'}", f"data.train_files={files}", "max_steps=2",
                           "data.preprocessing_num_workers=2", f"data.data_cache_dir={tmp_path / 'cache'}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "RemoteTraceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == expected
