"""zhjax as an lm-evaluation-harness model, registered as `zhjax` (the `lm-eval` extra).

    zhjax lm-eval --model zhjax --model_args pretrained=DIR,adapter=A1;A2,batch_size=16 --tasks ceval-valid
    zhjax lm-eval --model zhjax --model_args pretrained=DIR --tasks cloze --include_path TASKS_DIR

`zhjax lm-eval` is the harness's own command line (`lm_eval ...`, every flag of it) with this module imported, so
the registry knows `zhjax`; the harness has no entry-point discovery of outside models. From Python,
`import zhjax.eval.harness` does the same before `lm_eval.simple_evaluate(model="zhjax", ...)`.

`model_args`: `pretrained` (HF dir or zhjax checkpoint), `adapter` (PEFT dirs, `;`-separated, merged in order as
`zhjax generate` does), `tokenizer`, `dtype`, `batch_size`, `max_length` (default: the model's
`max_position_embeddings`, as the harness's `hf` model takes it), `max_gen_toks` (256), `add_bos_token`.

The three request types, each the `hf` model's semantics with zhjax's machinery:

- `loglikelihood`: context and continuation are tokenized as the harness does (`TemplateLM._encode_pair`: the whole
  text, split at the context's length), the row is `(context + continuation)[:-1]` cut to `max_length` from the
  left, and requests that share a row (a multiple-choice question's options with one-token answers) are scored
  together: one forward pass per question, through `zhjax.eval.scoring.Scorer` (batched, bucketed, on the mesh).
- `loglikelihood_rolling`: the harness's disjoint rolling windows of `max_length` tokens, each scored as above.
- `generate_until`: zhjax's KV-cached decoder (`zhjax.infer.generate`), greedy unless the task asks for sampling,
  stopping at EOS, the task's `until` strings or `max_gen_toks`.
"""

from __future__ import annotations

import sys
from collections import defaultdict

import numpy as np
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm import tqdm


def _bool(value) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    return str(value).strip().lower() in ("1", "true", "yes")


@register_model("zhjax")
class ZhjaxLM(TemplateLM):
    """The harness's view of a zhjax model (see the module doc)."""

    def __init__(self, pretrained: str, adapter: str | None = None, tokenizer: str | None = None,
                 dtype: str | None = None, batch_size: int | str = 8, max_length: int | None = None,
                 max_gen_toks: int = 256, add_bos_token: bool | str | None = None, max_batch_size: int | None = None,
                 device: str | None = None, **kwargs):
        super().__init__()
        from zhjax.eval.scoring import Scorer
        from zhjax.infer.cli import load_model, load_tokenizer_for
        from zhjax.tokenizer.guards import check_vocab_match

        adapters = [a for a in (adapter or "").split(";") if a]
        model = load_model(pretrained, adapters=adapters, dtype=dtype)
        self.tokenizer = load_tokenizer_for(pretrained, adapters, tokenizer)
        check_vocab_match(model.config.vocab_size, self.tokenizer, f"{pretrained} with its tokenizer", allow_padding=True)
        self.config = model.config
        self._model = model
        self._decoder = None
        self._batch_size = 8 if str(batch_size).startswith("auto") else int(batch_size)
        self._max_length = int(max_length) if max_length else model.config.max_position_embeddings
        self._max_gen_toks = int(max_gen_toks)
        self.add_bos_token = _bool(add_bos_token)
        pad = self.tokenizer.pad_token_id
        self.scorer = Scorer(model, batch_size=self._batch_size, pad_id=pad if pad is not None else self.eot_token_id)

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def batch_size(self) -> int:
        return self._batch_size

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs) -> list[int]:
        """Token ids as the `hf` model encodes them (special tokens as `add_bos_token` or the tokenizer says,
        none when the string already starts with the BOS text)."""
        flags = {}
        if add_special_tokens is not None:
            flags["add_special_tokens"] = add_special_tokens
        elif self.add_bos_token is not None:
            flags["add_special_tokens"] = self.add_bos_token
        if add_special_tokens is None and string.startswith(self.tokenizer.decode(self.prefix_token_id)):
            flags["add_special_tokens"] = False
        ids = self.tokenizer.encode(string, **flags)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(sum of the continuation's log-probs, whether greedy decoding gives it) per `(strings, context ids,
        continuation ids)` request; requests sharing a row are scored in one pass."""
        groups: dict[tuple, list[int]] = defaultdict(list)
        conts = []
        for i, (_, context, continuation) in enumerate(requests):
            if not continuation:
                raise ValueError(f"request {i}: an empty continuation has no log-likelihood")
            row = (list(context) + list(continuation))[-(self.max_length + 1):][:-1]
            cont = list(continuation)  # the harness keeps continuations within max_length; so is the row
            groups[(tuple(row), len(cont))].append(i)
            conts.append(cont)
        keys = list(groups)
        positions, targets = [], []
        for row, k in keys:
            positions.append(list(range(len(row) - k, len(row))))
            targets.append(np.stack([np.asarray(conts[i], np.int32) for i in groups[(row, k)]], axis=1))
        with tqdm(total=len(keys), desc="zhjax loglikelihood", disable=disable_tqdm) as bar:
            scored = self.scorer.score([list(r) for r, _ in keys], positions, targets, progress=bar.update)
        out: list[tuple[float, bool] | None] = [None] * len(requests)
        for key, sc in zip(keys, scored, strict=True):
            for m, i in enumerate(groups[key]):
                answer = (float(sc.logprobs[:, m].sum()), bool(np.array_equal(sc.greedy, conts[i])))
                out[i] = answer
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], answer)
        return out  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """The whole text's log-likelihood over the harness's disjoint rolling windows of `max_length` tokens."""
        from lm_eval import utils

        windows, owner = [], []
        for r, (string,) in enumerate(req.args for req in requests):
            for window in map(utils.make_disjoint_window, utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, *window))
                owner.append(r)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for r, (logprob, _) in zip(owner, scores, strict=True):
            totals[r] += logprob
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or, if the task asks, sampled) continuations with the KV-cached decoder, cut at the stop strings."""
        from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs

        from zhjax.infer.generate import Decoder, generate

        if self._decoder is None:
            self._decoder = Decoder(self._model)
        eos = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        by_kwargs: dict[str, list[int]] = defaultdict(list)
        for i, req in enumerate(requests):
            by_kwargs[repr(sorted(req.args[1].items()))].append(i)
        out: list[str] = [""] * len(requests)
        with tqdm(total=len(requests), desc="zhjax generate_until", disable=disable_tqdm) as bar:
            for members in by_kwargs.values():
                kwargs = normalize_gen_kwargs(dict(requests[members[0]].args[1]), self._max_gen_toks)
                until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
                max_new = int(kwargs.pop("max_gen_toks"))
                temperature = float(kwargs.get("temperature", 0.0) or 0.0)
                greedy = not kwargs.get("do_sample") or temperature == 0.0
                contexts = [self.tok_encode(requests[i].args[0], left_truncate_len=self.max_length - max_new)
                            for i in members]
                order = sorted(range(len(members)), key=lambda j: -len(contexts[j]))
                for start in range(0, len(order), self.batch_size):
                    chunk = order[start: start + self.batch_size]
                    texts = generate(self._decoder, self.tokenizer, [contexts[j] for j in chunk], max_new_tokens=max_new,
                                     greedy=greedy, temperature=temperature or 1.0, top_k=0,
                                     top_p=float(kwargs.get("top_p", 1.0) or 1.0), repetition_penalty=1.0,
                                     stop=[u for u in until if u], complete_characters=False)
                    for j, text in zip(chunk, texts, strict=True):
                        out[members[j]] = text
                        self.cache_hook.add_partial("generate_until", requests[members[j]].args, text)
                    bar.update(len(chunk))
        return out


def harness_main(argv: list[str]) -> int:
    """`zhjax lm-eval ARGS`: the harness's command line (`lm_eval ARGS`) with the `zhjax` model registered."""
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm_eval", *argv]
    cli_evaluate()
    return 0
