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

import numpy as np

from zhjax.precision import resolve_dtype

SCORING_DTYPES = ("auto", "float32", "bfloat16")


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


def bits_per_character(model, tokenizer, lines: Sequence[str], *, batch_tokens: int = 2048,
                       max_tokens: int | None = 512, max_chars: int | None = None,
                       dtype: str = "float32") -> BitsPerChar:
    """Bits per character of `lines` under `model`.

    `max_chars` cuts each line to that many characters before it is tokenized: the same text for every
    tokenizer, which a comparison of tokenizers needs. `max_tokens` (None: no limit) then cuts a line's tokens,
    and the character count with them (the kept tokens' text); that cut depends on the tokenizer (512 tokens are
    275 Chinese characters under SmolLM2's own tokenizer, 730 under the demo's extended one), so a comparison
    passes `max_chars` and `max_tokens=None`.

    Lines are scored longest first in batches of about `batch_tokens` padded tokens, so a batch holds rows of
    similar length and little padding; the loss is `cross_entropy` over the real tokens only, in float32.
    `dtype="bfloat16"` runs the model under `torch.autocast` (bf16 products, the loss still float32): half the
    time on a CPU with AVX-512 BF16, 0.002-0.005 bits per character off float32 on the demo's models, but 6.3x the
    time on a CPU without it (AVX2 only); "auto" takes bf16 where the model's device multiplies it natively
    (`zhjax.precision`).
    """
    import contextlib

    import torch

    if dtype not in SCORING_DTYPES:
        raise ValueError(f"dtype {dtype!r}: expected one of {SCORING_DTYPES}")
    dtype = resolve_dtype(dtype, model.device.type)
    precision = (torch.autocast(model.device.type, dtype=torch.bfloat16) if dtype == "bfloat16"
                 else contextlib.nullcontext())

    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    lines = [line[:max_chars] for line in lines] if max_chars is not None else lines
    encoded = [tokenizer(line, add_special_tokens=False)["input_ids"][:max_tokens] for line in lines if line]
    encoded = [e for e in encoded if e]
    total_chars = sum(len(tokenizer.decode(e)) for e in encoded)
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    total_nll, i = 0.0, 0
    while i < len(order):
        width = len(encoded[order[i]]) + 1  # the longest row of this batch, after its start token
        rows = [encoded[j] for j in order[i : i + max(1, batch_tokens // width)]]
        i += len(rows)
        ids = torch.full((len(rows), width), start, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        for r, e in enumerate(rows):
            ids[r, 1 : len(e) + 1] = labels[r, 1 : len(e) + 1] = torch.tensor(e)
            mask[r, : len(e) + 1] = 1
        with torch.no_grad(), precision:
            logits = model(input_ids=ids, attention_mask=mask).logits
            nll = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                                    ignore_index=-100, reduction="sum")
        total_nll += float(nll)
    total_tokens = sum(len(e) for e in encoded)
    return BitsPerChar(total_nll / max(total_chars, 1) / math.log(2), total_tokens / max(total_chars, 1),
                       total_chars, total_tokens)


def utf8_logits_processor(tokenizer, vocab_size: int):
    """A `transformers` logits processor that masks tokens whose bytes could never complete a UTF-8 character
    (`zhjax.tokenizer.utf8`), so greedy answers hold no U+FFFD."""
    import torch
    from transformers import LogitsProcessor

    from zhjax.tokenizer.utf8 import Utf8Constraint

    table = Utf8Constraint.from_tokenizer(tokenizer, vocab_size)
    allowed = torch.from_numpy(table.allowed)
    next_state = torch.from_numpy(table.next_state.astype(np.int64))

    class Utf8Processor(LogitsProcessor):
        def __init__(self):
            self.state, self.seen = None, 0

        def __call__(self, input_ids, scores):
            if self.state is None or input_ids.shape[1] < self.seen:  # a new batch: states of the prompts
                self.state = torch.tensor([table.state_after(row.tolist()) for row in input_ids])
            else:
                last = input_ids[:, -1]
                self.state = next_state[self.state, last]
            self.seen = input_ids.shape[1]
            mask = allowed[self.state, : scores.shape[-1]]
            return scores.masked_fill(~mask, float("-inf"))

    return Utf8Processor()


def generate_answers(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int = 64, batch_size: int = 8,
                     complete_characters: bool = True) -> list[str]:
    """Greedy answers (transformers `generate`, left padding), stopping at EOS. With `complete_characters` no
    token may leave bytes that cannot complete a UTF-8 character (`utf8_logits_processor`), and an answer cut by
    `max_new_tokens` inside a character drops that character's first bytes."""
    import torch
    from transformers import LogitsProcessorList

    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    out = []
    for i in range(0, len(prompts), batch_size):
        batch = tokenizer(list(prompts[i : i + batch_size]), return_tensors="pt", padding=True)
        processors = LogitsProcessorList(
            [utf8_logits_processor(tokenizer, model.config.vocab_size)] if complete_characters else []
        )
        with torch.no_grad():
            gen = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, logits_processor=processors)
        for row in gen[:, batch["input_ids"].shape[1] :]:
            text = tokenizer.decode(row, skip_special_tokens=True)
            out.append((text.rstrip("\ufffd") if complete_characters else text).strip())
    return out


def score_examples(answers: Sequence[str], golds: Sequence[str], scorer: Callable[[str, str], dict]) -> dict:
    """Mean of each score `scorer(pred, gold)` returns, over the examples."""
    totals: dict[str, float] = {}
    for pred, gold in zip(answers, golds, strict=True):
        for k, v in scorer(pred, gold).items():
            totals[k] = totals.get(k, 0.0) + float(v)
    return {k: v / max(len(golds), 1) for k, v in totals.items()}
