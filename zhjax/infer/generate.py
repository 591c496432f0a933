"""Text generation with a KV cache: prefill, then a jitted decode loop that compiles once.

How a call runs:

1. Prompts are tokenized and **left-padded** to a power-of-two bucket (`prompt_bucket`), so rows end together and
   every new token of every row goes to the same cache slot. Each row's RoPE positions count from its first real
   token (as `transformers` does for left-padded batches in `generate`), and a per-row `kv_valid` mask over cache
   slots hides the padding.
2. `_prefill` (jitted) runs the whole prompt through `zhjax.model.decode.decode` into a cache preallocated to
   `prompt bucket + max_new_tokens` slots (rounded to `CACHE_BUCKET`), and chooses the first token.
3. `_decode` (jitted, the state donated so the cache is updated in place) is a `lax.while_loop` over one-token
   steps: write the token's keys/values at the current slot, attend over the cache, choose the next token
   (`zhjax.infer.sampling`), stop a row at EOS, and leave the loop early when every row has stopped. The slot,
   step and positions are traced integers and every shape is fixed, so one compiled loop serves every token;
   the loop runs until a traced `limit`, which lets the host take the tokens in chunks (one at a time when
   streaming, a few when it must look for stop strings) from the same compiled function.
4. The host decodes text, cuts it at stop strings (a row that hits one is marked done on the device), and
   streams what is final. Text that could still grow into a stop string is held back.

`Decoder` prepares a model once: its weights in the decoding layout (LoRA folded in, q|k|v and gate|up fused, on
CPU per-layer views; see `zhjax.model.decode`); `generate` and `generate_ids` accept either a model or a `Decoder`. The
compiled functions are keyed on the model config and the shapes (batch, prompt bucket, cache length), so a
chat that stays within a bucket never recompiles. NTK-aware RoPE scaling for long inputs (`apply_ntk`) rewrites
`rope_theta` in the model's config with the seed's formula.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from zhjax.config import ModelConfig
from zhjax.infer.sampling import Knobs, Sampler, choose_tokens, make_knobs
from zhjax.model.decode import DecodeLayer, KVCache, decode, decode_logits, decode_weights, init_kv_cache
from zhjax.tokenizer.utf8 import NUM_STATES, Utf8Constraint

PROMPT_BUCKET = 32
CACHE_BUCKET = 128
STOP_CHECK_CHUNK = 16  # tokens generated between two looks for stop strings when not streaming


class DecodeState(NamedTuple):
    """Everything the decode loop carries; `tokens[:, :step]` are the generated ids (pad after a row's end)."""

    cache: KVCache
    kv_valid: jax.Array  # [batch, max_len] bool: slots holding real tokens
    tokens: jax.Array  # [batch, max_new_tokens] int32
    last: jax.Array  # [batch] int32: the newest token, fed at the next step
    position: jax.Array  # [batch] int32: its RoPE position
    slot: jax.Array  # [] int32: its cache slot
    step: jax.Array  # [] int32: tokens generated so far
    done: jax.Array  # [batch] bool
    seen: jax.Array  # [batch, vocab] bool: tokens in the row so far (repetition penalty)
    key: jax.Array  # PRNG key; step s samples with fold_in(key, s)
    utf8: jax.Array  # [batch] int32: where UTF-8 stands after the row (zhjax.tokenizer.utf8 states)
    utf8_allowed: jax.Array  # [NUM_STATES, vocab] bool: tokens that keep the text valid UTF-8 (`zhjax.tokenizer.utf8`)
    utf8_next: jax.Array  # [NUM_STATES, vocab] int32: the state after each token


class Decoder:
    """A model prepared for decoding: its weights in the decoding layout (`zhjax.model.decode.decode_weights`),
    unstacked per layer by default on CPU.

    Build it once and pass it to `generate` many times (chat does); a plain model passed to `generate` is
    prepared on each call. The decoder does not follow later changes to the model's weights.
    """

    def __init__(self, model: nnx.Module, *, unstack: bool | None = None):
        if unstack is None:
            unstack = jax.default_backend() == "cpu"
        self.config: ModelConfig = model.config
        self.weights = decode_weights(model, unstack=unstack)


def _utf8_choose(logits, state, allowed, next_state, seen, key, sampler, knobs):
    """The next tokens with those that would leave bytes no later token can complete masked out, and the new
    UTF-8 states (an all-True table, as when the constraint is off, changes nothing)."""
    rows = jnp.arange(logits.shape[0])
    ok = allowed[state]
    logits = jnp.where(ok, logits, jnp.finfo(logits.dtype).min)
    tok = choose_tokens(logits, seen, key, sampler, knobs)
    return tok, next_state[state, tok].astype(jnp.int32) * ok[rows, tok]


def _is_eos(tokens: jax.Array, sampler: Sampler) -> jax.Array:
    if not sampler.eos_ids:
        return jnp.zeros(tokens.shape, bool)
    return jnp.isin(tokens, jnp.asarray(sampler.eos_ids, jnp.int32))


@functools.partial(jax.jit, static_argnames=("config", "sampler", "max_len", "max_new_tokens"))
def _prefill(weights, input_ids, attention_mask, key, knobs: Knobs, utf8, utf8_allowed, utf8_next, *,
             config: ModelConfig, sampler: Sampler, max_len: int, max_new_tokens: int) -> DecodeState:
    b, p = input_ids.shape
    mask = attention_mask.astype(bool)
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0).astype(jnp.int32)
    cache = init_kv_cache(config, b, max_len, stacked=isinstance(weights.layers, DecodeLayer))
    kv_valid = jnp.zeros((b, max_len), bool).at[:, :p].set(mask)
    hidden, cache = decode(config, weights, input_ids, cache, positions=positions, cache_index=0, kv_valid=kv_valid)
    logits = decode_logits(config, weights, hidden[:, -1:])[:, 0]
    rows = jnp.arange(b)
    seen = jnp.zeros(logits.shape, jnp.int32).at[rows[:, None], input_ids].add(mask.astype(jnp.int32)) > 0
    tok, utf8 = _utf8_choose(logits, utf8, utf8_allowed, utf8_next, seen, jax.random.fold_in(key, 0), sampler, knobs)
    tokens = jnp.full((b, max_new_tokens), sampler.pad_id, jnp.int32).at[:, 0].set(tok)
    return DecodeState(
        cache, kv_valid, tokens, tok, positions[:, -1] + 1, jnp.int32(p), jnp.int32(1), _is_eos(tok, sampler),
        seen.at[rows, tok].set(True), key, utf8, utf8_allowed, utf8_next,
    )


@functools.partial(jax.jit, static_argnames=("config", "sampler"), donate_argnames=("state",))
def _decode(weights, state: DecodeState, limit, knobs: Knobs, *, config: ModelConfig, sampler: Sampler) -> DecodeState:
    rows = jnp.arange(state.tokens.shape[0])
    slots = jnp.arange(state.kv_valid.shape[1])
    limit = jnp.minimum(limit, state.tokens.shape[1])

    def cond(s: DecodeState):
        return (s.step < limit) & ~jnp.all(s.done)

    def body(s: DecodeState) -> DecodeState:
        kv_valid = s.kv_valid | (slots == s.slot)[None, :]
        hidden, cache = decode(
            config, weights, s.last[:, None], s.cache, positions=s.position[:, None], cache_index=s.slot,
            kv_valid=kv_valid,
        )
        logits = decode_logits(config, weights, hidden)[:, 0]
        tok, utf8 = _utf8_choose(logits, s.utf8, s.utf8_allowed, s.utf8_next, s.seen,
                                 jax.random.fold_in(s.key, s.step), sampler, knobs)
        tok = jnp.where(s.done, sampler.pad_id, tok)
        return DecodeState(
            cache, kv_valid, jax.lax.dynamic_update_slice(s.tokens, tok[:, None], (0, s.step)), tok, s.position + 1,
            s.slot + 1, s.step + 1, s.done | _is_eos(tok, sampler), s.seen.at[rows, tok].set(True), s.key, utf8,
            s.utf8_allowed, s.utf8_next,
        )

    return jax.lax.while_loop(cond, body, state)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def prompt_bucket(n: int) -> int:
    """Padded prompt width: the next power of two from `PROMPT_BUCKET` up, so that a growing chat history
    compiles a handful of shapes (at most twice the prompt work in exchange)."""
    width = PROMPT_BUCKET
    while width < n:
        width *= 2
    return width


class _Run:
    """One batch being generated: the device state and the host's view of it."""

    def __init__(self, decoder: Decoder, prompt_ids: Sequence[Sequence[int]], *, max_new_tokens: int,
                 sampler: Sampler, knobs: Knobs, seed: int, utf8: Utf8Constraint | None = None):
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        lengths = [len(row) for row in prompt_ids]
        if not lengths or min(lengths) == 0:
            raise ValueError("every prompt needs at least one token (is the prompt empty?)")
        width = prompt_bucket(max(lengths))
        ids = np.full((len(lengths), width), sampler.pad_id, np.int32)
        mask = np.zeros((len(lengths), width), np.int32)
        for i, row in enumerate(prompt_ids):
            ids[i, width - len(row):] = row
            mask[i, width - len(row):] = 1
        self.decoder, self.sampler, self.knobs = decoder, sampler, knobs
        self.max_new_tokens = max_new_tokens
        vocab = decoder.config.vocab_size
        if utf8 is None:  # no constraint: one state in which every token is allowed
            start = np.zeros(len(lengths), np.int32)
            allowed, nxt = np.ones((NUM_STATES, vocab), bool), np.zeros((NUM_STATES, vocab), np.int32)
        else:
            start = np.array([utf8.state_after(row) for row in prompt_ids], np.int32)
            allowed = np.zeros((NUM_STATES, vocab), bool)
            nxt = np.zeros((NUM_STATES, vocab), np.int32)
            cols = min(vocab, utf8.allowed.shape[1])
            allowed[:, :cols], nxt[:, :cols] = utf8.allowed[:, :cols], utf8.next_state[:, :cols]
        self.state = _prefill(
            decoder.weights, jnp.asarray(ids), jnp.asarray(mask), jax.random.key(seed), knobs, jnp.asarray(start),
            jnp.asarray(allowed), jnp.asarray(nxt), config=decoder.config, sampler=sampler,
            max_len=_round_up(width + max_new_tokens, CACHE_BUCKET), max_new_tokens=max_new_tokens,
        )
        self.step = 1

    def advance(self, n: int) -> None:
        """Generate up to `n` more tokens per row (fewer if every row stops)."""
        self.state = _decode(self.decoder.weights, self.state, self.step + n, self.knobs, config=self.decoder.config,
                             sampler=self.sampler)
        self.step = int(self.state.step)

    def read(self) -> tuple[np.ndarray, np.ndarray]:
        """`(tokens [batch, step], done [batch])` on the host."""
        tokens, done = jax.device_get((self.state.tokens, self.state.done))
        return tokens[:, : self.step], done

    def stop_rows(self, rows: Sequence[int]) -> None:
        """Mark rows finished (they hit a stop string): the loop stops generating for them."""
        mask = np.zeros(self.state.done.shape, bool)
        mask[list(rows)] = True
        self.state = self.state._replace(done=self.state.done | jnp.asarray(mask))

    @property
    def finished(self) -> bool:
        return self.step >= self.max_new_tokens or bool(np.all(jax.device_get(self.state.done)))


def _as_ids(value) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, (int, np.integer)):
        return (int(value),)
    return tuple(int(v) for v in value)


def eos_token_ids(config: ModelConfig, tokenizer=None) -> tuple[int, ...]:
    """The ids that end a row: the model config's EOS id(s) and the tokenizer's EOS, deduplicated in order."""
    ids = _as_ids(config.eos_token_id) + _as_ids(getattr(tokenizer, "eos_token_id", None))
    return tuple(dict.fromkeys(ids))


def _make_sampler(config: ModelConfig, *, greedy: bool, temperature: float, top_k: int, top_p: float,
                  repetition_penalty: float, eos_ids: tuple[int, ...], pad_id: int | None) -> tuple[Sampler, Knobs]:
    if not greedy and not temperature > 0:
        raise ValueError(f"temperature must be positive when sampling, got {temperature} (use greedy=True)")
    if top_k < 0 or not 0 < top_p <= 1 or not repetition_penalty > 0:
        raise ValueError(f"need top_k >= 0, 0 < top_p <= 1, repetition_penalty > 0; got {top_k}, {top_p}, "
                         f"{repetition_penalty}")
    pad = pad_id if pad_id is not None else (eos_ids[0] if eos_ids else 0)
    sampler = Sampler(greedy=bool(greedy), top_k=0 if greedy else int(top_k), use_top_p=not greedy and top_p < 1.0,
                      use_penalty=repetition_penalty != 1.0, eos_ids=eos_ids, pad_id=int(pad))
    return sampler, make_knobs(temperature, top_p, repetition_penalty)


def _cut_at_eos(row: np.ndarray, eos_ids: tuple[int, ...], *, keep_eos: bool) -> list[int]:
    out = []
    for t in row.tolist():
        if t in eos_ids:
            if keep_eos:
                out.append(t)
            break
        out.append(t)
    return out


def generate_ids(
    model: nnx.Module | Decoder,
    prompt_ids: Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 400,
    greedy: bool = False,
    temperature: float = 0.2,
    top_k: int = 40,
    top_p: float = 0.9,
    repetition_penalty: float = 1.1,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    seed: int = 0,
) -> list[list[int]]:
    """Token-level generation: the new ids of each prompt, up to and including the first EOS.

    `eos_token_id` defaults to the model config's; pass `()` to never stop early (benchmarks).
    """
    decoder = model if isinstance(model, Decoder) else Decoder(model)
    eos = eos_token_ids(decoder.config) if eos_token_id is None else _as_ids(eos_token_id)
    sampler, knobs = _make_sampler(decoder.config, greedy=greedy, temperature=temperature, top_k=top_k, top_p=top_p,
                                   repetition_penalty=repetition_penalty, eos_ids=eos, pad_id=pad_token_id)
    run = _Run(decoder, prompt_ids, max_new_tokens=max_new_tokens, sampler=sampler, knobs=knobs, seed=seed)
    if not run.finished:
        run.advance(max_new_tokens)
    tokens, _ = run.read()
    return [_cut_at_eos(row, eos, keep_eos=True) for row in tokens]


@dataclass
class _RowText:
    text: str = ""
    emitted: str = ""
    final: bool = False


_UTF8_TABLES: dict[int, tuple[object, Utf8Constraint]] = {}


def _utf8_table(tokenizer) -> Utf8Constraint:
    """The tokenizer's UTF-8 tables, built once per tokenizer object (a chat session reuses them)."""
    held = _UTF8_TABLES.get(id(tokenizer))
    if held is None or held[0] is not tokenizer:
        held = _UTF8_TABLES[id(tokenizer)] = (tokenizer, Utf8Constraint.from_tokenizer(tokenizer))
    return held[1]


def _first_stop(text: str, stops: Sequence[str]) -> int | None:
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


def generate(
    model: nnx.Module | Decoder,
    tokenizer,
    prompts: str | Sequence[str] | Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 400,
    greedy: bool = False,
    temperature: float = 0.2,
    top_k: int = 40,
    top_p: float = 0.9,
    repetition_penalty: float = 1.1,
    stop: str | Sequence[str] | None = None,
    seed: int = 0,
    stream: Callable[[int, str], None] | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    add_special_tokens: bool = True,
    complete_characters: bool = True,
) -> list[str]:
    """Generate a continuation of each prompt; returns the new text of each (EOS and stop strings cut off).

    The defaults are the seed's (`inference_hf.py`): sampling with temperature 0.2, top-k 40, top-p 0.9,
    repetition penalty 1.1, up to 400 new tokens. `greedy=True` takes the arg-max (after the repetition penalty,
    as `transformers` does; pass `repetition_penalty=1.0` for plain greedy decoding). `prompts` are strings
    (tokenized with `add_special_tokens`) or lists of token ids. A row ends at EOS (the model config's and the
    tokenizer's, or `eos_token_id`), at the first of the `stop` strings, or after `max_new_tokens`.
    `stream(row, text)` is called with each row's new text as soon as it is final. With `complete_characters`
    (the default) no token may leave bytes that cannot complete a UTF-8 character (`zhjax.tokenizer.utf8`), so
    the text holds no U+FFFD; a row cut by `max_new_tokens` inside a character drops that character's bytes.
    """
    decoder = model if isinstance(model, Decoder) else Decoder(model)
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    prompt_ids = [
        tokenizer(p, add_special_tokens=add_special_tokens)["input_ids"] if isinstance(p, str) else list(p)
        for p in prompts
    ]
    stops = [stop] if isinstance(stop, str) else [s for s in (stop or ()) if s]
    eos = eos_token_ids(decoder.config, tokenizer) if eos_token_id is None else _as_ids(eos_token_id)
    sampler, knobs = _make_sampler(decoder.config, greedy=greedy, temperature=temperature, top_k=top_k, top_p=top_p,
                                   repetition_penalty=repetition_penalty, eos_ids=eos,
                                   pad_id=getattr(tokenizer, "pad_token_id", None))
    utf8 = _utf8_table(tokenizer) if complete_characters else None
    run = _Run(decoder, prompt_ids, max_new_tokens=max_new_tokens, sampler=sampler, knobs=knobs, seed=seed, utf8=utf8)
    rows = [_RowText() for _ in prompt_ids]
    holdback = max((len(s) for s in stops), default=1) - 1
    chunk = 1 if stream else (STOP_CHECK_CHUNK if stops else max_new_tokens)
    while True:
        tokens, done = run.read()
        stopped = []
        for i, row in enumerate(rows):
            if row.final:
                continue
            text = tokenizer.decode(_cut_at_eos(tokens[i], eos, keep_eos=False), skip_special_tokens=True)
            if utf8 is not None:  # the bytes of a character still being written are not text yet
                text = text.rstrip("\ufffd")
            cut = _first_stop(text, stops)
            if cut is not None:
                text = text[:cut]
                stopped.append(i)
            row.text = text
            row.final = cut is not None or bool(done[i]) or run.step >= max_new_tokens
            if stream:
                _emit(stream, i, row, holdback)
        if stopped:
            run.stop_rows(stopped)
        if all(row.final for row in rows):
            return [row.text for row in rows]
        run.advance(chunk)


def _emit(stream: Callable[[int, str], None], i: int, row: _RowText, holdback: int) -> None:
    """Stream the part of the row's text that can no longer change (not a possible stop-string start, not a
    partial UTF-8 character)."""
    text = row.text
    if not row.final:
        text = text[: len(text) - holdback] if holdback else text
        text = text.rstrip("\ufffd")
    if len(text) > len(row.emitted) and text.startswith(row.emitted):
        stream(i, text[len(row.emitted):])
        row.emitted = text


# --------------------------------------------------------------------------------------------- long context


def ntk_rope_theta(config: ModelConfig, ntk: str | float, needed_len: int) -> float:
    """RoPE base for NTK-aware scaling, the seed's formula: base' = base * a ** (d / (d - 2)), d = head_dim.

    `ntk` is the factor `a`, or "auto": `a = (2 * needed_len / max_position_embeddings - 1) * 1.1` when the
    needed length exceeds the model's context, else no change (the seed's `(seq_len / 1024 - 1) * 1.1` for
    LLaMA's 2048-token context, written in units of the model's own context).
    """
    d = config.head_dim
    if isinstance(ntk, str) and ntk.strip().lower() == "auto":
        if needed_len <= config.max_position_embeddings:
            return float(config.rope_theta)
        alpha = (2 * needed_len / config.max_position_embeddings - 1) * 1.1
    else:
        alpha = float(ntk)
        if not alpha > 0:
            raise ValueError(f"the NTK factor must be positive, got {ntk!r}")
    return float(config.rope_theta * alpha ** (d / (d - 2)))


def apply_ntk(model: nnx.Module, ntk: str | float, needed_len: int) -> ModelConfig:
    """Replace the model's `rope_theta` by its NTK-scaled value (see `ntk_rope_theta`); returns the new config.

    Build the `Decoder` after this: it snapshots the config.
    """
    model.config = model.config.replace(rope_theta=ntk_rope_theta(model.config, ntk, needed_len))
    return model.config
