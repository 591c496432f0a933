"""`zhjax generate` and `zhjax chat`: argument parsing and model loading; the work is in `generate` and `chat`.

A `--model` is an HF directory (`zhjax.load_pretrained`) or a zhjax base checkpoint (a directory with
`zhjax.json`). Each `--adapter` is a PEFT LoRA directory, applied in order: the model is rebuilt with that
adapter's LoRA layout (its r and alpha, its vocabulary when it carries `embed_tokens`, an untied head when its
`lm_head` differs from its embedding), the adapter is loaded with `load_peft_adapter` and merged into the
weights (`merge_lora`) before the next one, so decoding runs on plain weights. The tokenizer is `--tokenizer`,
else the last adapter's, else the model's (or, for a checkpoint, its recorded source directory's).

With `--prompt`, stdout carries only the generated text (streamed as it comes, then a newline); everything
else goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from zhjax.data.files import jsonl_records
from zhjax.infer.chat import CHOICES, Conversation, build_prompt, run_chat
from zhjax.tokenizer.files import TOKENIZER_MODEL_FILES


def _default_dtype() -> str:
    import jax

    return "float32" if jax.default_backend() == "cpu" else "bfloat16"


def _add_model_args(parser: argparse.ArgumentParser, *, default_template: str | None) -> None:
    parser.add_argument("--model", required=True, help="HF model dir or zhjax base checkpoint dir")
    parser.add_argument("--adapter", action="append", default=[], help="PEFT LoRA dir, applied in order (repeatable)")
    parser.add_argument("--tokenizer", help="tokenizer dir (default: the last adapter's, else the model's)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="default: float32 on CPU, else bfloat16")
    parser.add_argument("--template", choices=CHOICES, default=default_template,
                        help="prompt template (chat = the tokenizer's chat template)")
    parser.add_argument("--system-prompt", help="system prompt for alpaca2 / chat")
    parser.add_argument("--max-new-tokens", type=int, default=400)
    parser.add_argument("--greedy", action="store_true", help="arg-max decoding instead of sampling")
    parser.add_argument("--temperature", type=float, default=0.2)
    parser.add_argument("--top-k", type=int, default=40)
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--repetition-penalty", type=float, default=1.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--ntk", help="NTK RoPE scaling: 'auto' or a factor (base * a^(d/(d-2)))")


def _has_tokenizer(directory: Path) -> bool:
    return any((directory / name).exists() for name in TOKENIZER_MODEL_FILES)


def _rebuild(model, config, lora):
    """A model of `config` / `lora` holding `model`'s weights where names and shapes agree (zeros elsewhere,
    the tied embedding as the head when the head is untied)."""
    import jax.numpy as jnp
    from flax import nnx

    from zhjax.model.llama import LlamaForCausalLM

    graphdef, state = nnx.split(nnx.eval_shape(lambda: LlamaForCausalLM(config, lora, rngs=nnx.Rngs(0))))
    old = {tuple(str(k) for k in p): var[...] for p, var in nnx.to_flat_state(nnx.state(model))}
    flat = []
    for p, var in nnx.to_flat_state(state):
        path = tuple(str(k) for k in p)
        value = old.get(path)
        if path == ("lm_head", "kernel") and value is None:
            value = old[("embed_tokens", "embedding")].T
        if value is None or tuple(value.shape) != tuple(var.shape):
            value = jnp.zeros(var.shape, var.dtype)
        flat.append((p, var.replace(jnp.asarray(value, var.dtype))))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def apply_adapter(model, adapter_dir: str | Path):
    """`model` with the PEFT adapter in `adapter_dir` applied and merged (a new model; see the module doc)."""
    import numpy as np

    from zhjax.config import LoraConfig
    from zhjax.convert.peft import load_peft_adapter, read_peft_adapter
    from zhjax.model.lora import merge_lora

    adapter = read_peft_adapter(adapter_dir)
    embed, head = adapter.module_weight("embed_tokens"), adapter.module_weight("lm_head")
    tie = model.config.tie_word_embeddings and not (
        head is not None and (embed is None or not np.array_equal(head, embed))
    )
    config = model.config.replace(vocab_size=adapter.vocab_size or model.config.vocab_size, tie_word_embeddings=tie)
    lora = None
    if adapter.lora:
        lora = LoraConfig(r=adapter.r, lora_alpha=adapter.scaling * adapter.r, lora_dropout=0.0,
                          target_modules=adapter.target_modules, modules_to_save=())
    model = _rebuild(model, config, lora)
    load_peft_adapter(model, adapter_dir)
    return merge_lora(model)


def load_model(path: str | Path, *, adapters=(), dtype: str | None = None):
    """The model at `path` (HF dir or zhjax base checkpoint) in `dtype`, with `adapters` merged in order."""
    from zhjax.convert.hf import load_pretrained

    path = Path(path)
    dtype = dtype or _default_dtype()
    if (path / "zhjax.json").exists():
        from zhjax.convert.base import load_base_checkpoint

        model = load_base_checkpoint(path)
        if model.config.param_dtype != dtype or model.config.dtype != dtype:
            model = _rebuild(model, model.config.replace(dtype=dtype, param_dtype=dtype), None)
    elif (path / "config.json").exists():
        model = load_pretrained(path, dtype=dtype)
    else:
        raise FileNotFoundError(f"{path}: neither an HF model dir (config.json) nor a zhjax checkpoint (zhjax.json)")
    for adapter in adapters:
        model = apply_adapter(model, adapter)
    return model


def load_tokenizer_for(model_path: str | Path, adapters=(), explicit: str | None = None):
    """The tokenizer: `explicit`, else the last adapter dir that has one, else the model's (or its source's)."""
    from zhjax.tokenizer.guards import load_tokenizer

    if explicit:
        return load_tokenizer(explicit)
    model_path = Path(model_path)
    candidates = [Path(a) for a in reversed(list(adapters))] + [model_path]
    meta = model_path / "zhjax.json"
    if meta.exists() and json.loads(meta.read_text()).get("source"):
        candidates.append(Path(json.loads(meta.read_text())["source"]))
    for directory in candidates:
        if directory.is_dir() and _has_tokenizer(directory):
            return load_tokenizer(directory)
    raise FileNotFoundError(
        f"no tokenizer found in {', '.join(map(str, candidates))}; pass --tokenizer DIR"
    )


def _load(args):
    from zhjax.tokenizer.guards import check_vocab_match

    model = load_model(args.model, adapters=args.adapter, dtype=args.dtype)
    tokenizer = load_tokenizer_for(args.model, args.adapter, args.tokenizer)
    check_vocab_match(model.config.vocab_size, tokenizer, f"{args.model} with its tokenizer", allow_padding=True)
    return model, tokenizer


def _sampling(args) -> dict:
    return dict(max_new_tokens=args.max_new_tokens, greedy=args.greedy, temperature=args.temperature,
                top_k=args.top_k, top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed,
                stop=args.stop or None)


def _apply_ntk(args, model, needed_len: int) -> None:
    from zhjax.infer.generate import apply_ntk

    if args.ntk:
        before = model.config.rope_theta
        after = apply_ntk(model, args.ntk, needed_len).rope_theta
        print(f"NTK scaling ({args.ntk}): rope_theta {before:g} -> {after:g}", file=sys.stderr)
    elif needed_len > model.config.max_position_embeddings and model.config.rope_scaling.rope_type == "default":
        print(f"warning: {needed_len} tokens exceed the model's context ({model.config.max_position_embeddings}); "
              "consider --ntk auto", file=sys.stderr)


def _read_records(path: str) -> list[dict]:
    records = []
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    for n, record in jsonl_records(text, path):
        if not isinstance(record, dict) or not ("instruction" in record or "prompt" in record):
            raise ValueError(f"{path}:{n}: expected an object with an 'instruction' (and optional 'input') or 'prompt'")
        records.append(record)
    return records


def generate_main(argv: list[str]) -> int:
    """`zhjax generate`: one prompt (streamed to stdout) or a JSONL file of instructions to a JSONL of outputs."""
    parser = argparse.ArgumentParser(prog="zhjax generate", description="Generate text with a KV-cached decoder.")
    _add_model_args(parser, default_template="none")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="one instruction (wrapped in --template)")
    source.add_argument("--input-file", help="JSONL: {'instruction', 'input'?} (templated) or {'prompt'} (verbatim)")
    parser.add_argument("--output-file", help="JSONL written with each record plus 'output' (with --input-file)")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts decoded together (with --input-file)")
    args = parser.parse_args(argv)
    if args.input_file and not args.output_file:
        parser.error("--input-file needs --output-file")
    if args.input_file:  # a bad prompts file is refused before a model is loaded
        try:
            records = _read_records(args.input_file)
        except (OSError, ValueError) as e:
            print(f"zhjax generate: {e}", file=sys.stderr)
            return 2

    from zhjax.data.templates import join_instruction
    from zhjax.infer.generate import Decoder, generate

    model, tokenizer = _load(args)
    if args.prompt is not None:
        ids = build_prompt(args.template, args.prompt, tokenizer, system_prompt=args.system_prompt)
        _apply_ntk(args, model, len(ids) + args.max_new_tokens)

        def stream(_row: int, text: str) -> None:
            sys.stdout.write(text)
            sys.stdout.flush()

        decoder = Decoder(model)
        del model  # the decoder holds its own copy of the kernels: do not keep two
        generate(decoder, tokenizer, [ids], stream=stream, **_sampling(args))
        sys.stdout.write("\n")
        sys.stdout.flush()
        return 0

    prompts = [
        build_prompt(args.template, join_instruction(r["instruction"], r.get("input")), tokenizer,
                     system_prompt=args.system_prompt) if "instruction" in r
        else tokenizer(r["prompt"], add_special_tokens=True)["input_ids"]
        for r in records
    ]
    _apply_ntk(args, model, max((len(p) for p in prompts), default=0) + args.max_new_tokens)
    decoder = Decoder(model)
    del model  # the decoder holds its own copy of the kernels: do not keep two
    Path(args.output_file).parent.mkdir(parents=True, exist_ok=True)
    with open(args.output_file, "w", encoding="utf-8") as f:
        for start in range(0, len(prompts), args.batch_size):
            outputs = generate(decoder, tokenizer, prompts[start : start + args.batch_size], **_sampling(args))
            for record, output in zip(records[start : start + args.batch_size], outputs, strict=True):
                f.write(json.dumps({**record, "output": output}, ensure_ascii=False) + "\n")
            f.flush()
            print(f"{min(start + args.batch_size, len(prompts))}/{len(prompts)} done", file=sys.stderr)
    return 0


def chat_main(argv: list[str]) -> int:
    """`zhjax chat`: an interactive multi-turn conversation on stdin/stdout, replies streamed."""
    parser = argparse.ArgumentParser(prog="zhjax chat", description="Chat with a model (/reset, /exit).")
    _add_model_args(parser, default_template=None)
    parser.add_argument("--max-context", type=int,
                        help="tokens of prompt + reply kept (default: the model's max_position_embeddings)")
    args = parser.parse_args(argv)

    from zhjax.infer.generate import Decoder, generate

    model, tokenizer = _load(args)
    template = args.template or ("chat" if getattr(tokenizer, "chat_template", None) else "alpaca2")
    max_context = args.max_context or model.config.max_position_embeddings
    budget = max_context - args.max_new_tokens
    if budget < 1:
        parser.error(f"--max-context {max_context} leaves no room for a prompt after {args.max_new_tokens} new tokens")
    _apply_ntk(args, model, max_context)
    decoder = Decoder(model)
    del model  # the decoder holds its own copy of the kernels: do not keep two
    sampling = _sampling(args)

    def reply(ids: list[int], stream) -> str:
        return generate(decoder, tokenizer, [ids], stream=stream, **sampling)[0]

    run_chat(reply, tokenizer, Conversation(template, args.system_prompt), max_prompt_tokens=budget)
    return 0
