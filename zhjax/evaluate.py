"""Evaluation of an exported HF model with `transformers`: bits per character, task scores, sample answers.

Bits per character is the tokenizer-independent measure of the seed's comparison: the summed negative
log-likelihood of a text's tokens (every token predicted, the first from a BOS/EOS context token) divided by
the text's characters and ln 2. A tokenizer that spends fewer tokens on Chinese is neither rewarded nor
punished by it; only how well the model predicts the text counts.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass
class BitsPerChar:
    bits_per_char: float
    tokens_per_char: float
    characters: int
    tokens: int


def load_hf(model_dir: str):
    """`(model, tokenizer)` from an HF dir, float32, eval mode (offline)."""
    import torch
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return model, tok


def bits_per_character(model, tokenizer, lines: Sequence[str], *, batch_size: int = 8, max_tokens: int = 512) -> BitsPerChar:
    """Bits per character of `lines` under `model` (lines longer than `max_tokens` tokens are cut, and so is
    the character count, proportionally to the kept tokens' text)."""
    import torch

    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    total_nll, total_chars, total_tokens = 0.0, 0, 0
    for i in range(0, len(lines), batch_size):
        chunk = [line for line in lines[i : i + batch_size] if line]
        encoded = [tokenizer(line, add_special_tokens=False)["input_ids"][:max_tokens] for line in chunk]
        chars = [len(tokenizer.decode(ids)) for ids in encoded]
        width = max(len(e) for e in encoded) + 1
        ids = torch.full((len(encoded), width), start, dtype=torch.long)
        mask = torch.zeros((len(encoded), width), dtype=torch.long)
        for r, e in enumerate(encoded):
            ids[r, 1 : len(e) + 1] = torch.tensor(e)
            mask[r, : len(e) + 1] = 1
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1)
        target = ids[:, 1:]
        nll = -logp.gather(-1, target[..., None])[..., 0] * mask[:, 1:]
        total_nll += float(nll.sum())
        total_chars += sum(chars)
        total_tokens += sum(len(e) for e in encoded)
    return BitsPerChar(total_nll / max(total_chars, 1) / math.log(2), total_tokens / max(total_chars, 1),
                       total_chars, total_tokens)


def generate_answers(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int = 64, batch_size: int = 8) -> list[str]:
    """Greedy answers (transformers `generate`, left padding), stopping at EOS."""
    import torch

    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    out = []
    for i in range(0, len(prompts), batch_size):
        batch = tokenizer(list(prompts[i : i + batch_size]), return_tensors="pt", padding=True)
        with torch.no_grad():
            gen = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
        for row in gen[:, batch["input_ids"].shape[1] :]:
            out.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    return out


def score_examples(answers: Sequence[str], golds: Sequence[str], scorer: Callable[[str, str], dict]) -> dict:
    """Mean of each score `scorer(pred, gold)` returns, over the examples."""
    totals: dict[str, float] = {}
    for pred, gold in zip(answers, golds, strict=True):
        for k, v in scorer(pred, gold).items():
            totals[k] = totals.get(k, 0.0) + float(v)
    return {k: v / max(len(golds), 1) for k, v in totals.items()}
