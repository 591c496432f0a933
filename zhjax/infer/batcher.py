"""Continuous batching: many requests share one jitted decode loop over fixed slots of a preallocated KV cache.

The server's engine. A `Batcher` owns a cache of `max_batch` rows ("slots") of `max_seq_len` positions, built
once (`zhjax.model.decode.init_kv_cache`). Unlike `zhjax.infer.generate`, whose rows are left-padded to end
together, each slot here holds its own sequence from cache position 0, and each row writes its next token at its
own position (`decode` with a `[batch]` cache index), so requests join and leave between steps without moving
anyone else:

1. A request waits in a queue until a slot is free. `_prefill` (jitted) runs its prompt, right-padded to a
   power-of-two bucket (`prompt_bucket`), as a batch of one, writes its keys and values into the slot's rows of
   the big cache, resets the slot's repetition-penalty set and sampling settings, and chooses the first token.
2. `_decode` (jitted, the state donated so the cache is updated in place) runs up to `limit` one-token steps
   over all slots: every slot attends to its own positions `<= position`, chooses its next token with its own
   settings, and stops at EOS or when its token budget is spent. Idle slots compute along (the shapes are
   fixed) and their results are thrown away.
3. The engine thread hands each request its new tokens (`Request.on_tokens`) between calls; a request that is
   cancelled (a stop string, a client that went away) is released at the next step boundary.

Every shape is fixed by `max_batch`, `max_seq_len` and the prompt bucket, and every per-request setting is a
traced array, so once the buckets in use have compiled, new requests never compile anything.

A row's result does not depend on its neighbours: its prefill runs alone, its decode rows are computed
independently, and its random draws are keyed by (its seed, its step, the token id): the token is the arg-max of
`logits + Gumbel noise` (the Gumbel-max form of sampling from the processed distribution), so greedy and seeded
answers are the same whether a request ran alone or beside others. The processors are those of
`zhjax.infer.sampling` (repetition penalty, temperature, top-k, top-p, transformers' order), per row: with top-k
between 1 and `TOP_K_CANDIDATES` they run on the top candidates, otherwise (top-k off or larger) over the whole
vocabulary for that step.
"""

from __future__ import annotations

import functools
import logging
import queue
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from zhjax.config import ModelConfig
from zhjax.infer.generate import Decoder, prompt_bucket
from zhjax.infer.sampling import (
    NEG_INF,
    _top_p_remove_sorted,
    apply_repetition_penalty,
    apply_temperature,
    argmax,
)
from zhjax.model.decode import DecodeLayer, KVCache, decode, decode_logits, init_kv_cache

log = logging.getLogger(__name__)

TOP_K_CANDIDATES = 64  # top-k up to this runs on that many candidates; larger (or off) sorts the vocabulary
DECODE_CHUNK = 4  # steps per decode call (fewer when a slot frees sooner and a request waits for it)


class RowSettings(NamedTuple):
    """Per-slot sampling settings, `[batch]` arrays (traced: changing them never recompiles)."""

    greedy: jax.Array  # bool
    temperature: jax.Array  # float32
    top_k: jax.Array  # int32, 0 = off
    top_p: jax.Array  # float32, 1 = off
    repetition_penalty: jax.Array  # float32, 1 = off


class SlotState(NamedTuple):
    """What the decode loop carries for every slot."""

    cache: KVCache
    last: jax.Array  # [batch] int32: newest token, written at `position` by the next step
    position: jax.Array  # [batch] int32
    seen: jax.Array  # [batch, vocab] bool: tokens of the row so far (repetition penalty)
    active: jax.Array  # [batch] bool
    remaining: jax.Array  # [batch] int32: tokens the row may still generate
    step: jax.Array  # [batch] int32: tokens generated so far (the random draw of step s uses s)
    key: jax.Array  # [batch, 2] uint32: each row's threefry key data
    settings: RowSettings


def _gumbel(step_key: jax.Array, token_ids: jax.Array) -> jax.Array:
    """Gumbel noise for `token_ids` under one row's step key: the same token gets the same noise whichever
    candidate set it is drawn from."""
    keys = jax.vmap(lambda t: jax.random.fold_in(step_key, t))(token_ids)
    u = jax.vmap(lambda k: jax.random.uniform(k, (), jnp.float32, minval=jnp.finfo(jnp.float32).tiny))(keys)
    return -jnp.log(-jnp.log(u))


def _row_keys(key_data: jax.Array, step: jax.Array) -> jax.Array:
    return jax.vmap(lambda k, s: jax.random.fold_in(jax.random.wrap_key_data(k), s))(key_data, step)


def _sample_candidates(scaled, keys, s: RowSettings):
    values, indices = jax.lax.top_k(scaled, TOP_K_CANDIDATES)
    rank = jnp.arange(TOP_K_CANDIDATES)[None, :]
    values = jnp.where(rank < s.top_k[:, None], values, NEG_INF)
    remove = _top_p_remove_sorted(values[..., ::-1], s.top_p[:, None], 1)[..., ::-1]
    values = jnp.where(remove, NEG_INF, values)
    noisy = values + jax.vmap(_gumbel)(keys, indices)
    return jnp.take_along_axis(indices, argmax(noisy)[:, None], axis=-1)[:, 0]


def _sample_vocabulary(scaled, keys, s: RowSettings):
    order = jnp.argsort(-scaled, axis=-1)  # descending
    ranked = jnp.take_along_axis(scaled, order, axis=-1)
    k = jnp.where(s.top_k > 0, s.top_k, scaled.shape[-1])
    kth = jnp.take_along_axis(ranked, (k - 1)[:, None], axis=-1)
    ranked = jnp.where(ranked < kth, NEG_INF, ranked)  # ties with the k-th stay, as apply_top_k
    remove = _top_p_remove_sorted(ranked[..., ::-1], s.top_p[:, None], 1)[..., ::-1]
    ranked = jnp.where(remove, NEG_INF, ranked)
    noisy = ranked + jax.vmap(_gumbel)(keys, order)
    return jnp.take_along_axis(order, argmax(noisy)[:, None], axis=-1)[:, 0]


def choose_rows(logits: jax.Array, seen: jax.Array, key_data: jax.Array, step: jax.Array, s: RowSettings) -> jax.Array:
    """The next token of each row `[batch]` from float32 `logits` `[batch, vocab]`, each row with its own settings
    (see the module docstring)."""
    logits = apply_repetition_penalty(logits, seen, s.repetition_penalty[:, None])
    greedy_tokens = argmax(logits)
    scaled = apply_temperature(logits, jnp.where(s.greedy, 1.0, s.temperature)[:, None])
    keys = _row_keys(key_data, step)
    few = s.greedy | ((s.top_k >= 1) & (s.top_k <= TOP_K_CANDIDATES))
    sampled = jax.lax.cond(jnp.all(few), _sample_candidates, _sample_vocabulary, scaled, keys, s)
    return jnp.where(s.greedy, greedy_tokens, sampled).astype(jnp.int32)


def _is_eos(tokens: jax.Array, eos_ids: tuple[int, ...]) -> jax.Array:
    if not eos_ids:
        return jnp.zeros(tokens.shape, bool)
    return jnp.isin(tokens, jnp.asarray(eos_ids, jnp.int32))


def _set_row(x: jax.Array, row, value) -> jax.Array:
    return x.at[row].set(jnp.asarray(value, x.dtype))


@functools.partial(jax.jit, static_argnames=("config", "eos_ids"), donate_argnames=("state",))
def _prefill(weights, state: SlotState, ids, length, row, max_tokens, key_data, settings: RowSettings, *,
             config: ModelConfig, eos_ids: tuple[int, ...]) -> tuple[SlotState, jax.Array]:
    """Run one right-padded prompt `ids` `[1, width]` (`length` real tokens) into slot `row`; its first token."""
    width = ids.shape[1]
    stacked = isinstance(weights.layers, DecodeLayer)
    small = init_kv_cache(config, 1, width, stacked=stacked)
    valid = jnp.arange(width)[None] < length
    hidden, small = decode(config, weights, ids, small, positions=jnp.arange(width)[None], cache_index=0,
                           kv_valid=valid)
    h = jax.lax.dynamic_slice_in_dim(hidden, length - 1, 1, axis=1)
    logits = decode_logits(config, weights, h)[:, 0]
    seen = jnp.zeros(logits.shape, jnp.int32).at[0, ids[0]].add(valid[0].astype(jnp.int32)) > 0
    one = jax.tree.map(lambda x: x[None], settings)
    tok = choose_rows(logits, seen, key_data[None], jnp.zeros((1,), jnp.int32), one)[0]

    def put(big, part):
        return jax.lax.dynamic_update_slice(big, part.astype(big.dtype), (row, 0, 0, 0))

    cache = KVCache(*(jax.tree.map(put, b, p) for b, p in zip(state.cache, small, strict=True)))
    ends = _is_eos(tok, eos_ids) | (max_tokens <= 1)
    new = SlotState(
        cache=cache,
        last=_set_row(state.last, row, tok),
        position=_set_row(state.position, row, length),
        seen=_set_row(state.seen, row, seen[0].at[tok].set(True)),
        active=_set_row(state.active, row, ~ends),
        remaining=_set_row(state.remaining, row, max_tokens - 1),
        step=_set_row(state.step, row, 1),
        key=_set_row(state.key, row, key_data),
        settings=RowSettings(*(_set_row(a, row, v) for a, v in zip(state.settings, settings, strict=True))),
    )
    return new, tok


@functools.partial(jax.jit, static_argnames=("config", "eos_ids", "chunk", "pad_id"), donate_argnames=("state",))
def _decode(weights, state: SlotState, limit, *, config: ModelConfig, eos_ids: tuple[int, ...], chunk: int,
            pad_id: int) -> tuple[SlotState, jax.Array, jax.Array]:
    """Up to `limit` (<= `chunk`) steps of every active slot: `(state, tokens [batch, chunk], steps run)`;
    `tokens` holds `pad_id` where a slot generated nothing."""
    batch, max_len = state.seen.shape[0], jax.tree.leaves(state.cache.k)[0].shape[-2]
    rows = jnp.arange(batch)
    slots = jnp.arange(max_len)

    def cond(carry):
        s, _, n = carry
        return (n < limit) & jnp.any(s.active)

    def body(carry):
        s, out, n = carry
        kv_valid = slots[None, :] <= s.position[:, None]
        hidden, cache = decode(config, weights, s.last[:, None], s.cache, positions=s.position[:, None],
                               cache_index=s.position, kv_valid=kv_valid)
        logits = decode_logits(config, weights, hidden)[:, 0]
        tok = choose_rows(logits, s.seen, s.key, s.step, s.settings)
        tok = jnp.where(s.active, tok, pad_id)
        position = jnp.where(s.active, s.position + 1, s.position)
        ends = _is_eos(tok, eos_ids) | (s.remaining <= 1) | (position >= max_len)
        s = s._replace(
            cache=cache, last=jnp.where(s.active, tok, s.last), position=position,
            seen=s.seen.at[rows, tok].max(s.active), active=s.active & ~ends,
            remaining=s.remaining - s.active, step=s.step + s.active,
        )
        return s, jax.lax.dynamic_update_slice(out, tok[:, None], (0, n)), n + 1

    out = jnp.full((batch, chunk), pad_id, jnp.int32)
    state, out, n = jax.lax.while_loop(cond, body, (state, out, jnp.int32(0)))
    return state, out, n


@jax.jit
def _release(state: SlotState, rows) -> SlotState:
    return state._replace(active=state.active & ~rows)


@dataclass(eq=False)
class Request:
    """One generation request. `on_tokens(ids, finish_reason)` is called from the engine thread with each batch of
    new ids; `finish_reason` is None while the row runs, then "stop" (EOS) or "length"; "error" with no ids when
    the engine failed. Call `Batcher.cancel` to end it early."""

    prompt_ids: list[int]
    max_tokens: int
    on_tokens: Callable[[list[int], str | None], None]
    greedy: bool = False
    temperature: float = 0.2
    top_k: int = 40
    top_p: float = 0.9
    repetition_penalty: float = 1.1
    seed: int = 0
    cancelled: threading.Event = field(default_factory=threading.Event)


class Batcher:
    """The engine: a thread that admits requests into free slots and runs the shared decode loop (module doc)."""

    def __init__(self, decoder: Decoder, *, max_batch: int = 8, max_seq_len: int = 2048,
                 eos_ids: Sequence[int] = (), pad_id: int = 0, chunk: int = DECODE_CHUNK):
        if max_batch < 1 or max_seq_len < 2:
            raise ValueError(f"need max_batch >= 1 and max_seq_len >= 2, got {max_batch}, {max_seq_len}")
        self.decoder, self.config = decoder, decoder.config
        self.max_batch, self.max_seq_len, self.chunk = max_batch, max_seq_len, chunk
        self.eos_ids, self.pad_id = tuple(int(i) for i in eos_ids), int(pad_id)
        b, v = max_batch, self.config.vocab_size
        stacked = isinstance(decoder.weights.layers, DecodeLayer)
        self.state = SlotState(
            cache=init_kv_cache(self.config, b, max_seq_len, stacked=stacked),
            last=jnp.full((b,), self.pad_id, jnp.int32), position=jnp.zeros((b,), jnp.int32),
            seen=jnp.zeros((b, v), bool), active=jnp.zeros((b,), bool), remaining=jnp.zeros((b,), jnp.int32),
            step=jnp.zeros((b,), jnp.int32), key=jnp.zeros((b, 2), jnp.uint32),
            settings=RowSettings(jnp.ones((b,), bool), jnp.ones((b,), jnp.float32), jnp.zeros((b,), jnp.int32),
                                 jnp.ones((b,), jnp.float32), jnp.ones((b,), jnp.float32)),
        )
        self.slots: list[Request | None] = [None] * b
        self._steps = np.zeros(b, np.int64)  # each slot's device step count when the host last read it
        self.waiting: queue.Queue[Request] = queue.Queue()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self.failed: BaseException | None = None
        self.released = 0  # requests cancelled while they held a slot

    # ------------------------------------------------------------------------------------------- public API

    def submit(self, request: Request) -> None:
        """Queue a request (any thread). Its prompt plus `max_tokens` must fit `max_seq_len`; raises RuntimeError
        when the engine has failed."""
        if self.failed is not None:
            raise RuntimeError(f"the decoding engine failed: {self.failed!r}")
        if not request.prompt_ids:
            raise ValueError("the prompt has no tokens")
        if len(request.prompt_ids) + request.max_tokens > self.max_seq_len or request.max_tokens < 1:
            raise ValueError(f"{len(request.prompt_ids)} prompt tokens + max_tokens {request.max_tokens} do not fit "
                             f"max_seq_len {self.max_seq_len}")
        self.waiting.put(request)
        self._wake.set()

    def cancel(self, request: Request) -> None:
        """End a request early (any thread); its slot is freed at the next step boundary."""
        request.cancelled.set()
        self._wake.set()

    @property
    def active(self) -> int:
        """Slots in use."""
        return sum(r is not None for r in self.slots)

    @property
    def queued(self) -> int:
        """Requests waiting for a slot."""
        return self.waiting.qsize()

    def start(self) -> Batcher:
        """Start the engine thread."""
        self._thread = threading.Thread(target=self._run, name="zhjax-batcher", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the engine thread (requests in flight get no more tokens)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=60)

    def warmup(self) -> None:
        """Compile the decode loop and the smallest prompt bucket before serving (call before `start`)."""
        done = threading.Event()
        self.waiting.put(Request([self.pad_id], 2, lambda ids, reason: reason and done.set(), greedy=True))
        while not done.is_set():
            self._iterate()

    # ------------------------------------------------------------------------------------------- engine

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                if not self._iterate():
                    self._wake.wait(0.05)
                    self._wake.clear()
        except BaseException as e:  # a device failure: tell every waiting client instead of hanging them
            log.exception("the batcher stopped")
            self.failed = e
            for r in [*self.slots, *self._drain()]:
                if r is not None:
                    r.on_tokens([], "error")
            self.slots = [None] * self.max_batch

    def _drain(self) -> list[Request]:
        out = []
        while not self.waiting.empty():
            out.append(self.waiting.get_nowait())
        return out

    def _iterate(self) -> bool:
        """Admit, release and decode once; False when there was nothing to do."""
        self._release_cancelled()
        admitted = self._admit()
        if not any(r is not None for r in self.slots):
            return admitted
        limit = self.chunk
        if not self.waiting.empty():  # stop when the first slot runs out of budget, to let a waiting request in
            left = [r.max_tokens - int(self._steps[i]) for i, r in enumerate(self.slots) if r is not None]
            limit = max(1, min(limit, *left))
        self.state, tokens, n = _decode(self.decoder.weights, self.state, jnp.int32(limit), config=self.config,
                                        eos_ids=self.eos_ids, chunk=self.chunk, pad_id=self.pad_id)
        tokens, steps, active = jax.device_get((tokens, self.state.step, self.state.active))
        for row, request in enumerate(self.slots):
            if request is None:
                continue
            ids = [int(t) for t in tokens[row, : steps[row] - self._steps[row]]]
            self._steps[row] = steps[row]
            if active[row]:
                request.on_tokens(ids, None)
                continue
            request.on_tokens(ids, "stop" if ids and ids[-1] in self.eos_ids else "length")
            self.slots[row] = None
        return True

    def _release_cancelled(self) -> None:
        rows = np.array([r is not None and r.cancelled.is_set() for r in self.slots])
        if rows.any():
            self.state = _release(self.state, jnp.asarray(rows))
            for row in np.flatnonzero(rows):
                self.slots[row] = None
            self.released += int(rows.sum())

    def _admit(self) -> bool:
        admitted = False
        while not self.waiting.empty() and None in self.slots:
            request = self.waiting.get_nowait()
            if request.cancelled.is_set():
                continue
            row = self.slots.index(None)
            n = len(request.prompt_ids)
            width = min(prompt_bucket(n), self.max_seq_len)
            ids = np.full((1, width), self.pad_id, np.int32)
            ids[0, :n] = request.prompt_ids
            settings = RowSettings(
                jnp.bool_(request.greedy), jnp.float32(request.temperature if not request.greedy else 1.0),
                jnp.int32(request.top_k), jnp.float32(request.top_p), jnp.float32(request.repetition_penalty),
            )
            key = jax.random.key_data(jax.random.key(request.seed))
            self.state, tok = _prefill(self.decoder.weights, self.state, jnp.asarray(ids), jnp.int32(n),
                                       jnp.int32(row), jnp.int32(request.max_tokens), key, settings,
                                       config=self.config, eos_ids=self.eos_ids)
            tok, active = jax.device_get((tok, self.state.active[row]))
            tok = int(tok)
            if active:
                self.slots[row] = request
                self._steps[row] = 1
                request.on_tokens([tok], None)
            else:
                request.on_tokens([tok], "stop" if tok in self.eos_ids else "length")
            admitted = True
        return admitted
