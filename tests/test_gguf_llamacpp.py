"""The GGUF files of tools/export_gguf.py in the real llama.cpp (llama-cpp-python, the `llamacpp` extra; CI has it).

Three models, as the seed's users deploy them:
(a) SmolLM2-135M after a vocabulary extension (byte-level BPE, 1000 Chinese tokens), tied and untied head;
(b) a tiny LLaMA with the seed's merged SentencePiece tokenizer (LLaMA's 32000 + the seed's Chinese pieces = 49953,
    plus the Alpaca [PAD]);
(c) SmolLM2 extended by words as added tokens (`form="words"`), which llama.cpp segments longest first (a test
    of its own) and runs like transformers.
For (a) and (b): llama.cpp's tokenizer gives the HF tokenizer's ids on 200 Chinese/English lines; 32 greedy tokens in
llama.cpp equal transformers' on the HF model (f32 and f16 files); and the file agrees, key by key and tensor by
tensor, with what llama.cpp's own `convert_hf_to_gguf.py` writes for the same HF directory (DIFFERENCES lists
what differs on purpose, and why). Quantized files load, keep their logits near f16's, and bad input is refused.
"""

from __future__ import annotations

import inspect
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

llama_cpp = pytest.importorskip(
    "llama_cpp", reason="llama-cpp-python is not installed (the `llamacpp` extra; `make test` builds it: README \"llama.cpp\")"
)
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

from zhjax.convert.gguf import write_gguf  # noqa: E402
from zhjax.convert.hf import ConversionError  # noqa: E402

from .llamacpp_ref import AMX_BUILD, built_with_amx, convert_hf_to_gguf, greedy, hf_greedy, load  # noqa: E402
from .test_tokenizer_bpe import MIXED as TOKENIZER_EDGE_CASES  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
STEPS = 32
# the tokenizer tests' edge cases (SmolLM2's chat markers left out: the SentencePiece model has none), and punctuation
MIXED = [line for line in TOKENIZER_EDGE_CASES if "<|im_start|>" not in line] + [
    "科学家 improves科学技术。 “引号” 《书名》 ——破折号…… ",
]
ENGLISH = [line for mod in (json, textwrap, inspect) for line in inspect.getdoc(mod).splitlines() if line.strip()]
PROMPTS = ["中国人民代表大会在北京召开，", "The capital of France is", "新年的钟声即将敲响，我们"]

# What differs on purpose from llama.cpp's converter (key -> why); every other key and tensor must be equal.
DIFFERENCES = {
    "general.*": "descriptive metadata: zhjax writes general.name only (the directory name or --name); the "
    "converter also guesses basename, size label, finetune, licence from the directory and a model card. "
    "general.architecture, general.file_type and general.quantization_version are compared.",
    "llama.attention.key_length / value_length": "written by zhjax only when head_dim differs from "
    "hidden_size / n_head (llama.cpp's default); the converter writes them whenever config.json has head_dim. "
    "Checked: where only one file has them, they equal that default.",
    "tokenizer.ggml.add_space_prefix": "zhjax writes SentencePiece's add_dummy_prefix; the converter leaves it to "
    "llama.cpp's default for SentencePiece vocabularies (true). Checked: where only zhjax has it, it is true.",
    "tokenizer.ggml.add_bos_token / add_eos_token": "zhjax always writes both (so llama.cpp's per-vocabulary "
    "defaults never decide); the converter only when the tokenizer files say. Checked: where only zhjax has them, "
    "they are what the HF tokenizer does (the tokenization tests).",
    "tokenizer.ggml.pre (extended byte-level BPE)": "the converter recognizes a pre-tokenizer by hashing the ids of "
    "one test string, which a vocabulary extension changes, so it refuses the extended SmolLM2; the tests run it "
    "with the pre-tokenizer name zhjax derives from tokenizer.json ('smollm'), the name it gives the base model.",
}
OPTIONAL_KEYS = {
    "llama.attention.key_length", "llama.attention.value_length", "tokenizer.ggml.add_space_prefix",
    "tokenizer.ggml.add_bos_token", "tokenizer.ggml.add_eos_token",
}
HEADER = {"GGUF.version", "GGUF.tensor_count", "GGUF.kv_count"}


# ------------------------------------------------------------------------------------------------ models


def text_lines(corpus: Path) -> list[str]:
    """200 lines: 150 held-out People's Daily paragraphs (cut to 200 characters), English and mixed lines."""
    paragraphs = [x.strip() for x in corpus.read_text(encoding="utf-8").splitlines() if x.strip()]
    chinese = [p[:200] for p in paragraphs[-150:]]
    other = (MIXED + ENGLISH)[:50]
    assert len(chinese) == 150 and len(other) == 50
    return chinese + other


@pytest.fixture(scope="module")
def lines(assets) -> list[str]:
    return text_lines(assets.corpus_text)


@pytest.fixture(scope="module")
def smollm2_zh(assets, tmp_path_factory) -> dict[str, Path]:
    """SmolLM2 extended by 1000 Chinese tokens: tied (subword rows) and untied (own, perturbed lm_head)."""
    from safetensors.numpy import load_file, save_file

    from zhjax.convert.resize_model import resize_hf_checkpoint
    from zhjax.tokenizer.bpe import extend_bpe_tokenizer

    root = tmp_path_factory.mktemp("smollm2_zh")
    paragraphs = [x for x in assets.corpus_text.read_text(encoding="utf-8").splitlines() if x.strip()]
    (root / "train.txt").write_text("\n".join(paragraphs[:3000]) + "\n", encoding="utf-8")
    extend_bpe_tokenizer(assets.smollm2_dir, [root / "train.txt"], 1000, root / "tokenizer")
    tied = resize_hf_checkpoint(assets.smollm2_dir, root / "tokenizer", root / "tied", "subword").out_dir
    untied = root / "untied"
    shutil.copytree(tied, untied)
    weights = load_file(untied / "model.safetensors")
    embed = weights["model.embed_tokens.weight"]
    weights["lm_head.weight"] = embed + np.random.default_rng(0).normal(0, 0.01, embed.shape).astype(embed.dtype)
    save_file(weights, untied / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((untied / "config.json").read_text())
    (untied / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": False}, indent=2))
    return {"tied": Path(tied), "untied": untied}


@pytest.fixture(scope="module")
def seed_llama(seed_dir, tmp_path_factory) -> Path:
    """A tiny random LLaMA (hidden 64, 2 layers, GQA) with the seed's merged tokenizer and the Alpaca [PAD]."""
    from zhjax.tokenizer.merge import merge_tokenizers

    out = tmp_path_factory.mktemp("seed_llama")
    merge_tokenizers(seed_dir / "llama_tokenizer_32000.model", seed_dir / "chinese_sp.model", out, pad_token="[PAD]")
    vocab = len(transformers.AutoTokenizer.from_pretrained(out))
    assert vocab == 49954
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
        pad_token_id=49953, tie_word_embeddings=False,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2 + (1.0 if p.ndim == 1 else 0.0))
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def smollm2_words(assets, tmp_path_factory) -> Path:
    """SmolLM2 extended by the words of 2+ characters of 1000 learned merges (`form="words"`: added tokens, which
    the GGUF file holds as user-defined tokens), tied, subword rows."""
    from zhjax.convert.resize_model import resize_hf_checkpoint
    from zhjax.tokenizer.bpe import extend_bpe_tokenizer

    root = tmp_path_factory.mktemp("smollm2_words")
    paragraphs = [x for x in assets.corpus_text.read_text(encoding="utf-8").splitlines() if x.strip()]
    (root / "train.txt").write_text("\n".join(paragraphs[:3000]) + "\n", encoding="utf-8")
    extend_bpe_tokenizer(assets.smollm2_dir, [root / "train.txt"], 1000, root / "tokenizer", form="words")
    return Path(resize_hf_checkpoint(assets.smollm2_dir, root / "tokenizer", root / "model", "subword").out_dir)


MODELS = ["smollm2_zh/tied", "smollm2_zh/untied", "seed_llama"]


@pytest.fixture(scope="module")
def hf_dirs(request) -> dict[str, Path]:
    """The model dirs by name, built on first use (the seed model skips where the seed's files are absent)."""
    return _Lazy(request)


class _Lazy(dict):
    def __init__(self, request):
        super().__init__()
        self.request = request

    def __missing__(self, name: str) -> Path:
        fixture, _, variant = name.partition("/")
        value = self.request.getfixturevalue(fixture)
        self[name] = value[variant] if variant else value
        return self[name]


@pytest.fixture(scope="module")
def exported(hf_dirs, tmp_path_factory):
    """`exported(name, dtype)`: the GGUF file tools/export_gguf.py's function writes, once per module."""
    cache: dict[tuple[str, str], Path] = {}
    root = tmp_path_factory.mktemp("gguf")

    def get(name: str, dtype: str) -> Path:
        if (name, dtype) not in cache:
            cache[name, dtype] = write_gguf(hf_dirs[name], root / f"{name.replace('/', '-')}-{dtype}.gguf", dtype=dtype)
        return cache[name, dtype]

    return get


# ------------------------------------------------------------------------------------------------ tests


@pytest.mark.parametrize("name", MODELS)
def test_llama_cpp_tokenizes_200_lines_like_the_hf_tokenizer(name, hf_dirs, exported, lines):
    hf = transformers.AutoTokenizer.from_pretrained(hf_dirs[name])
    llm = load(exported(name, "f32"))
    wrong = []
    for line in lines:
        expected = hf(line).input_ids
        got = llm.tokenize(line.encode("utf-8"), add_bos=True, special=False)
        if got != expected:
            wrong.append((line, expected, got))
        if not line.startswith(" "):  # llama.cpp's detokenizer gives the text back (after BOS, less the lead space)
            assert llm.detokenize(got).decode("utf-8") == line
    assert not wrong, f"{len(wrong)} of {len(lines)} lines differ, first: {wrong[0]}"
    new_ids = [i for line in lines for i in hf(line).input_ids if i >= 49152]
    if name.startswith("smollm2"):
        assert len(new_ids) > 1000  # the extension's tokens are exercised


def test_llama_cpp_segments_the_added_words_longest_first(assets, hf_dirs, exported, lines):
    """With the words form, llama.cpp matches user-defined tokens longest first (its `tokenizer_st_partition`), the
    HF tokenizer leftmost-longest: where two words overlap they can part differently (`上的|重要` / `上|的重要`).
    Every llama.cpp segmentation is still the text, in the dictionary's words where it finds them and the base's
    own BPE between them, with no word left inside the text between two words. (What the difference costs a
    trained model, README "Vocabulary extension: words": 0.003 bits per character.)"""
    hf = transformers.AutoTokenizer.from_pretrained(hf_dirs["smollm2_words"])
    base = transformers.AutoTokenizer.from_pretrained(assets.smollm2_dir)
    words = {hf.convert_ids_to_tokens(i): i for i in range(len(base), len(hf))}
    llm = load(exported("smollm2_words", "f32"))
    differ = used = 0
    for line in lines:
        got = llm.tokenize(line.encode("utf-8"), add_bos=False, special=False)
        assert llm.detokenize(got).decode("utf-8") == line
        differ += got != hf(line, add_special_tokens=False).input_ids
        stretch: list[int] = []
        for token in [*got, None]:
            if token is not None and token < len(base):
                stretch.append(token)
                continue
            text = base.decode(stretch)
            assert stretch == base(text, add_special_tokens=False).input_ids, text  # the base's BPE between words
            assert not any(w in text for w in words), text  # no word left unmatched
            stretch = []
            used += token is not None
    assert used > 300 and 0 < differ < len(lines) // 2, (used, differ)  # (409 words, 7 lines differ)


@pytest.mark.parametrize("dtype", ["f32", "f16"])
@pytest.mark.parametrize("name", [*MODELS, "smollm2_words"])
def test_greedy_32_tokens_equal_transformers(name, dtype, hf_dirs, exported):
    hf_tok = transformers.AutoTokenizer.from_pretrained(hf_dirs[name])
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dirs[name], dtype=torch.float32).eval()
    llm = load(exported(name, dtype))
    for prompt in PROMPTS:
        ids = hf_tok(prompt).input_ids
        expected, logits = hf_greedy(model, ids, STEPS)
        got = greedy(llm, ids, STEPS)
        if got == expected:
            continue
        # the only excuse: a near tie in transformers' own logits where the two first part (f16 rounding of
        # weights and, in ggml, of activations moves logits by ~1e-3 of their scale; f32 by ~1e-6)
        step = next(i for i, (a, b) in enumerate(zip(got, expected, strict=True)) if a != b)
        gap = logits[step][expected[step]] - logits[step][got[step]]
        tolerance = (1e-2 if dtype == "f16" else 1e-4) * np.abs(logits[step]).max()
        assert gap <= tolerance, (prompt, step, gap, hf_tok.decode(expected), hf_tok.decode(got))


def _fields(path: Path) -> tuple[dict, dict]:
    reader = gguf.GGUFReader(path)
    fields = {k: f.contents() for k, f in reader.fields.items() if k not in HEADER}
    tensors = {t.name: (tuple(int(n) for n in t.shape), t.tensor_type, np.array(t.data)) for t in reader.tensors}
    return fields, tensors


@pytest.mark.parametrize(
    "name,dtype", [("smollm2_zh/tied", "f32"), ("smollm2_zh/untied", "f32"), ("seed_llama", "f32"), ("seed_llama", "q8_0")]
)
def test_file_agrees_with_llama_cpps_converter_key_by_key(name, dtype, hf_dirs, exported, tmp_path):
    ours, ours_tensors = _fields(exported(name, dtype))
    pre = ours["tokenizer.ggml.pre"] if ours["tokenizer.ggml.model"] == "gpt2" else None
    theirs, their_tensors = _fields(convert_hf_to_gguf(hf_dirs[name], tmp_path / "ref.gguf", dtype, pre=pre))

    for key in ("general.architecture", "general.file_type", "general.quantization_version"):
        assert ours.get(key) == theirs.get(key), key
    ours = {k: v for k, v in ours.items() if not k.startswith("general.")}
    theirs = {k: v for k, v in theirs.items() if not k.startswith("general.")}
    config = json.loads((hf_dirs[name] / "config.json").read_text())
    defaults = {
        "llama.attention.key_length": config["hidden_size"] // config["num_attention_heads"],
        "llama.attention.value_length": config["hidden_size"] // config["num_attention_heads"],
        "tokenizer.ggml.add_space_prefix": True,
        "tokenizer.ggml.add_bos_token": ours["tokenizer.ggml.model"] == "llama",
        "tokenizer.ggml.add_eos_token": False,
    }
    for key in sorted(ours.keys() ^ theirs.keys()):
        assert key in OPTIONAL_KEYS, f"{key} only in {'zhjax' if key in ours else 'the converter'}'s file"
        assert {**ours, **theirs}[key] == defaults[key], key
    for key in sorted(ours.keys() & theirs.keys()):
        assert ours[key] == theirs[key], f"{key}: {str(ours[key])[:200]} != {str(theirs[key])[:200]}"

    assert ours_tensors.keys() == their_tensors.keys()
    for tensor, (shape, qtype, data) in ours_tensors.items():
        their_shape, their_qtype, their_data = their_tensors[tensor]
        assert (shape, qtype) == (their_shape, their_qtype), tensor
        np.testing.assert_array_equal(data, their_data, err_msg=tensor)


def test_the_library_is_built_without_ggmls_amx_kernels():
    """`make test`'s build leaves them out: on an Intel CPU with AMX the quantized files' first product in them
    segfaulted (2026-12-04), and with them the runs below end the whole test session instead of failing."""
    assert not built_with_amx(), AMX_BUILD


@pytest.mark.parametrize("dtype", ["q8_0", "q4_0", "q4_k_m"])
def test_quantized_files_run_in_llama_cpp_near_f16(dtype, hf_dirs, exported):
    """Each quantized file loads in llama.cpp, holds the type asked for, and its logits stay near the f16 file's.

    (The bounds are loose: a short prompt's logit error through 30 layers moves by a third between quantizers
    whose weights agree to 0.1%; the next test compares the weights themselves.)"""
    ids = transformers.AutoTokenizer.from_pretrained(hf_dirs["smollm2_zh/untied"])(PROMPTS[0] + PROMPTS[1]).input_ids

    def logits(path: Path) -> np.ndarray:
        llm = load(path)
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)])

    ref, got = logits(exported("smollm2_zh/untied", "f16")), logits(exported("smollm2_zh/untied", dtype))
    error = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    assert 0 < error < {"q8_0": 0.05, "q4_0": 0.5, "q4_k_m": 0.5}[dtype], error
    types = {t.tensor_type.name for t in gguf.GGUFReader(exported("smollm2_zh/untied", dtype)).tensors}
    assert dtype.split("_k")[0].upper() in {t.split("_K")[0] for t in types}, types


@pytest.mark.parametrize("dtype", ["q8_0", "q4_0"])
def test_gguf_package_quantization_is_as_good_as_llama_cpps_own(dtype, hf_dirs, exported, tmp_path):
    """A file the gguf package quantized has, tensor by tensor, the types llama.cpp's own quantizer gives the same
    f16 file and an error against the f16 weights no larger (within 1%) than that quantizer's."""
    from gguf.quants import dequantize

    from zhjax.convert.gguf_quant import llama_cpp_quantize

    f16 = exported("smollm2_zh/untied", "f16")
    llama_cpp_quantize(f16, tmp_path / "own.gguf", dtype)
    tensors = lambda path: {t.name: t for t in gguf.GGUFReader(path).tensors}
    ref, ours, own = tensors(f16), tensors(exported("smollm2_zh/untied", dtype)), tensors(tmp_path / "own.gguf")
    assert {n: t.tensor_type.name for n, t in ours.items()} == {n: t.tensor_type.name for n, t in own.items()}
    def error(q, r: np.ndarray) -> float:
        return float(np.linalg.norm(dequantize(q.data, q.tensor_type).reshape(-1) - r) / np.linalg.norm(r))

    for name, t in ref.items():
        r = np.asarray(t.data, np.float32).reshape(-1)
        mine, theirs = error(ours[name], r), error(own[name], r)
        assert mine <= 1.01 * theirs + 1e-6, (name, mine, theirs)


def test_bad_input_is_refused_before_anything_is_written(hf_dirs, tmp_path):
    run = [sys.executable, "tools/export_gguf.py", "--model"]
    source = hf_dirs["seed_llama"]

    def export(model_dir: Path, dtype: str) -> subprocess.CompletedProcess:
        return subprocess.run([*run, str(model_dir), "--out", str(tmp_path / "out.gguf"), "--dtype", dtype],
                              cwd=REPO, capture_output=True, text=True, timeout=600)

    no_tokenizer = tmp_path / "no_tokenizer"
    no_tokenizer.mkdir()
    for f in ("config.json", "model.safetensors"):
        (no_tokenizer / f).symlink_to(source / f)
    bad = export(no_tokenizer, "q8_0")
    assert bad.returncode == 1 and "no tokenizer.json or tokenizer.model" in bad.stderr, bad.stderr

    qwen = tmp_path / "qwen"
    shutil.copytree(source, qwen)
    config = json.loads((qwen / "config.json").read_text())
    (qwen / "config.json").write_text(json.dumps({**config, "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]}))
    bad = export(qwen, "f16")
    assert bad.returncode == 1 and "model_type 'qwen2' is not supported" in bad.stderr, bad.stderr

    odd = tmp_path / "odd"  # rows of 48 values: not a whole number of q4_0's 32-value blocks
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=49954, hidden_size=48, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4))
    model.save_pretrained(odd)
    for f in source.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, odd / f.name)
    bad = export(odd, "q4_0")
    assert bad.returncode == 1 and "rows of 48 values, not a multiple of" in bad.stderr, bad.stderr  # Q4_0 or the head's Q8_0
    bad = export(odd, "nonsense")
    assert bad.returncode == 2 and "invalid choice" in bad.stderr
    assert not (tmp_path / "out.gguf").exists() and not list(tmp_path.glob(".out.gguf*"))

    with pytest.raises(ConversionError, match="not a multiple"):
        write_gguf(odd, tmp_path / "x.gguf", dtype="q8_0")
    assert not list(tmp_path.glob("*x.gguf*"))
