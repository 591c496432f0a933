"""Vocabulary transfer: new rows fitted to the frozen base model on training text (`resize_init: distill`).

After a byte-level BPE extension every new token is a run of base tokens (its merges fire after all base merges,
so the extended segmentation of any text is a coarsening of the base one; `align_chunks` pairs every extended
position with the base position that ends at the same byte). Mean-of-pieces rows (`subword`) start the grown
model above the base's loss on Chinese it did not train on (SmolLM2 + 6000 tokens: +7% held-out bits per
character), and a short pre-training cannot teach thousands of rows. `transfer_rows` fits the new rows on a
sample of the training text, the body frozen:

- **Untied.** A new token's input row (what its pieces mean together) and output row (how likely the whole
  string is next) want different vectors, so a tied base gets its own `lm_head` when it grows; the embedding's
  old rows are kept bit for bit, and the head's too except those refitted below (`output_rows: seen`).
- **Input rows** start as a mean of the pieces' rows weighted towards the last piece (weights 1..k: the base's
  state after a word is mostly shaped by its last piece); measured on held-out text this beats the plain mean
  and the last piece alone. Optionally (`input_steps > 0`) they are distilled: the base under its own
  tokenization is the teacher, and at every aligned position the grown model's next-token distribution over the
  old vocabulary (old head) is pulled to the teacher's with a KL divergence, only the new rows getting
  gradients. At the CPU budget of the demo (30 steps) this did not lower held-out loss, so it is off by default.
- **Output rows** are fitted on the grown model's *own* final states over the sample (with the new input rows in
  place), starting from the pieces' mean: cross-entropy of the next extended token (`output_target: data`), or the
  squared gap between the grown model's log-probability of the next token and the base's log-probability of its
  pieces in sequence (`base`, needs the teacher pass). With `output_rows: seen` (the default) the old head rows of
  the tokens the sample predicts are fitted too: after a new token the grown model's states are not the base's, and
  a new token takes probability from the pieces it absorbs, so an old token's row fitted for the base is off in
  the grown model (on the demo's split, held-out bits/char right after the resize +7.7% vs the base with the new
  rows alone, +3.0% with the seen old rows too; the embedding's old rows never change). The log-sum-exp of the
  rows not fitted is computed once, so a step costs one `[positions, fitted rows]` product. Every fifth window is
  held out and the rows with the lowest held-out loss are kept (the fit overfits a 20 k-character sample within a
  few steps; with 40 k the held-out loss still falls at the 15th). Rows fitted on the teacher's states instead
  were measured worse, and so were starts from the first piece's row (+7.1%) or from it offset by the base's
  log-probability of the other pieces (the base, weak on Chinese, finds Chinese words far less likely than the
  sample does). The sample's size is the lever: on the
  demo's split 10 k characters start the grown model 3.3% above the base's held-out bits per character, 40 k
  (the default, about 110 s on 2 cores with bf16 products) 2.1% *below* it, before any training.
- **Shared before per-row** (`shared_steps`). A 20 k-character sample predicts most of 30 000 new tokens a few
  times or never, so a row fitted alone overfits within a few steps and the rows barely leave their start (the
  pieces' mean, which for a one-character token is the mean of its bytes' rows). First, every fitted row of one
  kind (a new token of 1, 2, 3 or 4+ characters, part of a character, or a seen old row) moves together:
  `start * (1 + a) + u + use * v`, with `use` how often the whole training text uses the token (standardized log
  count) and a scale `a` and vectors `u`, `v` per kind, a few thousand numbers fitted on 4096 sample positions.
  On the demo's split (30 000 tokens) this took the grown model from 2.4% to 11% below the base's held-out
  bits per character before training (README "Where training starts"). The per-row fit then starts from there.

What the init did not change: after 10 steps of the demo's pre-training (learning rate 1e-3) the three inits
measured (new rows alone, the seen old rows refitted too, input rows distilled) reached the same held-out loss
within 0.02 bits per character; the 40 k sample's start (0.46 bits per character lower than 10 k's) is 0.015
lower after the demo's 30 steps. The init decides where training starts, not yet where this short run ends.
That was with the embedding and head trained at LoRA's 1e-3, which undoes the fitted rows: with them at 1e-4
(`optim.embedding_learning_rate`, the demo's since the eighteenth session) the shared fit's start, 0.35 bits per
character lower at step 0, is still 0.16 lower after 230 s of the demo's pre-training (README "The demo, measured").

`zhjax.convert.resize_model.resize_hf_checkpoint(..., init="distill", sample_files=...)` writes the rows
into an untied HF checkpoint; the recipe's resize stage and `tools/resize_model.py` call it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from zhjax.precision import resolve_dtype

__all__ = ["TransferConfig", "TransferResult", "align_chunks", "transfer_rows"]


@dataclass(frozen=True)
class TransferConfig:
    """Sizes and steps of the transfer fit. The defaults are what measured best on SmolLM2 + People's Daily at a
    CPU budget of about 2 minutes (README: "Where training starts"): weighted input rows without distillation
    steps, output rows fitted by data cross-entropy on the grown model's own states over 40 k characters."""

    sample_characters: int = 40_000  # training text the fit sees
    chunk_tokens: int = 64  # extended tokens per window (base tokens per window: up to 3x this)
    batch_size: int = 8
    input_start: str = "weighted"  # input rows before distillation: "mean" | "last" | "weighted" (towards the last)
    input_steps: int = 0  # distillation steps of the input rows (0: the start rows as they are)
    input_learning_rate: float = 1e-2
    output_steps: int = 15  # fit steps of the output rows; the best on the held-out windows is kept
    output_patience: int = 3  # stop after this many steps in a row without a lower held-out loss (0: never)
    output_learning_rate: float = 1e-3
    output_l2: float = 1e-3
    output_target: str = "data"  # "data": the sample's next token; "base": the base's log-probability of its pieces
    output_rows: str = "seen"  # "seen": the new head rows and the old rows of the tokens the sample predicts | "new"
    # the output fit's `[positions, rows]` products: "bfloat16" (fp32 accumulation; 1.35x faster on 2 cores with
    # AVX-512 BF16, the same held-out start: README "Where training starts"), "float32", or "auto": bf16 where the
    # device multiplies it natively, else float32 (zhjax.precision; on an AVX2-only CPU bf16 is the slower one)
    output_dtype: str = "auto"
    position_chunk: int = 4096  # sample positions per logits block of the output fit (memory, not results)
    # before the per-row fit: steps of a fit shared by every row of a kind (see `_fit_shared`); 0: none
    shared_steps: int = 40
    shared_learning_rate: float = 1e-3
    shared_positions: int = 4096  # sample positions the shared fit sees (whole blocks of `position_chunk`)
    seed: int = 0

    def __post_init__(self):
        checks = {"input_start": ("mean", "last", "weighted"), "output_target": ("data", "base"),
                  "output_rows": ("seen", "new"), "output_dtype": ("auto", "float32", "bfloat16")}
        for name, allowed in checks.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"transfer.{name}={getattr(self, name)!r}: expected one of {allowed}")
        for name in ("sample_characters", "chunk_tokens", "batch_size", "position_chunk", "shared_positions",
                     "shared_learning_rate"):
            if not getattr(self, name) > 0:
                raise ValueError(f"transfer.{name}={getattr(self, name)}: expected a positive number")
        for name in ("input_steps", "output_steps", "output_patience", "shared_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"transfer.{name}={getattr(self, name)}: expected a number >= 0")


@dataclass
class TransferResult:
    """New rows `[n_new, D]` for `embed_tokens` and `lm_head` (HF layout) and what the fit measured."""

    embed_rows: np.ndarray = field(repr=False)
    head_rows: np.ndarray = field(repr=False)
    chunks: int
    positions: int
    input_kl: tuple[float, float]  # mean KL (nats) to the teacher on a probe batch, before/after (nan: no teacher)
    output_nll: tuple[float, float]  # the sample's next-token loss (nats) on the grown model's states, before/after
    seconds: float
    # `output_rows="seen"`: the old head rows refitted (their ids and new values); empty otherwise
    head_old_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64), repr=False)
    head_old_rows: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32), repr=False)
    # the shared fit's loss on its held-out positions (nats per token), before/after (nan: `shared_steps=0`)
    shared_nll: tuple[float, float] = (float("nan"), float("nan"))


@dataclass
class Chunks:
    """Aligned sample chunks, padded: `ext_ids [n, Te]`, `base_ids [n, Tb]`, `align [n, Te]` (the base position
    that ends where each extended position ends), `ext_mask`, `base_mask`."""

    ext_ids: np.ndarray
    base_ids: np.ndarray
    align: np.ndarray
    ext_mask: np.ndarray
    base_mask: np.ndarray


def _byte_lengths(tokenizer: Any, ids: Sequence[int]) -> list[int]:
    """Bytes each token of a byte-level BPE stands for: one character of its token string per byte, or, for a word
    added as plain text (`zhjax.tokenizer.bpe`, form "words"), its UTF-8 length."""
    from zhjax.tokenizer.bpe import byte_level_decoder_table, byte_level_token

    alphabet = byte_level_decoder_table()
    return [len(byte_level_token(t, alphabet)) for t in tokenizer.convert_ids_to_tokens(list(ids))]


def align_chunks(base_tok: Any, new_tok: Any, lines: Sequence[str], chunk_tokens: int) -> Chunks:
    """Cut the text of `lines` (joined by newlines) into windows of `chunk_tokens` extended tokens and at most
    `3 * chunk_tokens` base tokens, each starting with the start token, with the alignment of every extended
    position to the base position that ends at the same byte. A line whose extended segmentation is not a
    coarsening of its base one (a tokenizer that does not extend the base) is left out."""
    start = base_tok.bos_token_id if base_tok.bos_token_id is not None else base_tok.eos_token_id
    max_base = 3 * chunk_tokens
    ext, base, last = [], [], []  # the stream: ids and, per extended token, the index of its last base piece
    for line in lines:
        e = new_tok.encode(line + "\n", add_special_tokens=False)
        b = base_tok.encode(line + "\n", add_special_tokens=False)
        e_ends, b_ends = np.cumsum(_byte_lengths(new_tok, e)), np.cumsum(_byte_lengths(base_tok, b))
        where = {int(x): i for i, x in enumerate(b_ends)}
        if not len(e) or any(int(x) not in where for x in e_ends):
            continue
        last += [len(base) + where[int(x)] for x in e_ends]
        ext += e
        base += b
    rows: list[tuple[list[int], list[int], list[int]]] = []
    i = 0
    while i < len(ext):
        first_base = last[i - 1] + 1 if i else 0
        j = i
        while j < len(ext) and j - i < chunk_tokens - 1 and last[j] - first_base < max_base - 1:
            j += 1
        if j == i:  # one extended token longer than the base window: skip it
            i += 1
            continue
        rows.append(([start, *ext[i:j]], [start, *base[first_base : last[j - 1] + 1]],
                     [0, *[last[k] - first_base + 1 for k in range(i, j)]]))
        i = j
    if not rows:
        raise ValueError("the sample text gives no window whose extended tokens align with base tokens")
    n = len(rows)
    out = Chunks(
        np.zeros((n, chunk_tokens), np.int32), np.zeros((n, max_base), np.int32),
        np.zeros((n, chunk_tokens), np.int32), np.zeros((n, chunk_tokens), np.float32),
        np.zeros((n, max_base), np.float32),
    )
    for r, (e, b, a) in enumerate(rows):
        out.ext_ids[r, : len(e)], out.ext_mask[r, : len(e)], out.align[r, : len(a)] = e, 1.0, a
        out.base_ids[r, : len(b)], out.base_mask[r, : len(b)] = b, 1.0
    return out


def _body(model, embeds: jax.Array, mask: jax.Array) -> jax.Array:
    """Final-norm hidden states of the frozen `model` for input vectors `embeds` (right-padded rows)."""
    from zhjax.model.llama import build_attention_mask, rope_tables

    b, t, _ = embeds.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    cos, sin = rope_tables(model.config, positions)
    h = model.run_layers(embeds, cos, sin, build_attention_mask(mask, None))
    return model.norm(h)


def transfer_rows(
    base_model: nnx.Module,
    base_tok: Any,
    new_tok: Any,
    sources: Sequence[Sequence[int]],
    lines: Sequence[str],
    config: TransferConfig = TransferConfig(),
    *,
    progress: bool = True,
) -> TransferResult:
    """Fit the new rows of `embed_tokens` and `lm_head` (see the module docstring).

    `base_model` is the zhjax base (float32), `sources[i]` the base ids of new token `V_old + i` (its pieces,
    `zhjax.tokenizer.resize.subword_source_ids`), `lines` the sample text. Deterministic for a `config.seed`.
    """
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    cfg = base_model.config
    old_vocab, n_new = cfg.vocab_size, len(sources)
    graphdef, state = nnx.split(base_model)
    embed_old = jnp.asarray(base_model.embed_tokens.embedding[...], jnp.float32)
    head_old = embed_old if base_model.lm_head is None else jnp.asarray(base_model.lm_head.kernel[...]).T
    start_embed = _start_rows(np.asarray(embed_old), sources, config.input_start)
    start_head = _mean_rows(np.asarray(head_old), sources)

    chosen, total = [], 0
    rng = np.random.default_rng(config.seed)
    for i in rng.permutation(len(lines)):
        if total >= config.sample_characters:
            break
        chosen.append(lines[i])
        total += len(lines[i])
    if not chosen or total == 0:
        raise ValueError("the transfer init needs sample text: the sample files hold no non-empty line")
    chunks = align_chunks(base_tok, new_tok, chosen, config.chunk_tokens)
    n = chunks.ext_ids.shape[0]
    bs = config.batch_size
    pad = (-n) % bs
    if pad:  # whole batches: windows of zeros with zero masks (a sample of fewer windows than a batch too)
        def grow(a):
            return np.concatenate([a, np.zeros((pad, *a.shape[1:]), a.dtype)])
        chunks = Chunks(*(grow(x) for x in (chunks.ext_ids, chunks.base_ids, chunks.align, chunks.ext_mask,
                                             chunks.base_mask)))
    batches = chunks.ext_ids.shape[0] // bs

    # teacher pass: hidden states at aligned positions + the log-probability of each base token
    hs, base_logp = [], []

    @jax.jit
    def teacher_pass(state, base_ids, base_mask, align):
        model = nnx.merge(graphdef, state)
        h = model.hidden_states(base_ids, base_mask.astype(jnp.int32))
        logp = jax.nn.log_softmax(h @ head_old.T, axis=-1)
        nxt = jnp.concatenate([base_ids[:, 1:], jnp.zeros_like(base_ids[:, :1])], axis=1)
        token_logp = jnp.take_along_axis(logp, nxt[..., None], axis=-1)[..., 0]  # log p(base token t+1 | <= t)
        return jnp.take_along_axis(h, align[..., None], axis=1), token_logp

    # the teacher (the base under its own tokenization) is needed to distil input rows or to fit the output rows
    # to the base's probabilities; the data fit of the output rows needs only the grown model's own states
    need_teacher = config.input_steps > 0 or config.output_target == "base"
    bar = tqdm(total=batches * (1 + need_teacher) + config.input_steps + config.shared_steps
               + config.output_steps, desc="transfer init", disable=not progress, unit="step")
    for k in range(batches if need_teacher else 0):
        sl = slice(k * bs, (k + 1) * bs)
        h, lp = teacher_pass(state, chunks.base_ids[sl], chunks.base_mask[sl], chunks.align[sl])
        hs.append(np.asarray(h))
        base_logp.append(np.asarray(lp))
        bar.update()
    teacher_h = np.concatenate(hs) if hs else None  # [n, Te, D]
    base_logp = np.concatenate(base_logp) if base_logp else np.zeros(chunks.base_ids.shape, np.float32)  # [n, Tb]

    # ---------------------------------------------------------------- input rows: distillation, body frozen
    def student_kl(new_rows, ids, mask, th):
        table = jnp.concatenate([embed_old, new_rows])
        model = nnx.merge(graphdef, state)
        hs_ = _body(model, jnp.take(table, ids, axis=0), mask.astype(jnp.int32))
        t_logp = jax.nn.log_softmax(th @ head_old.T, axis=-1)
        s_logp = jax.nn.log_softmax(hs_ @ head_old.T, axis=-1)
        kl = (jnp.exp(t_logp) * (t_logp - s_logp)).sum(-1)
        return (kl * mask).sum() / mask.sum()

    opt = optax.adam(config.input_learning_rate)

    @jax.jit
    def input_step(rows, opt_state, ids, mask, th):
        loss, g = jax.value_and_grad(student_kl)(rows, ids, mask, th)
        upd, opt_state = opt.update(g, opt_state, rows)
        return optax.apply_updates(rows, upd), opt_state, loss

    eval_kl = jax.jit(student_kl)
    rows = jnp.asarray(start_embed)
    opt_state = opt.init(rows)
    probe = slice(0, bs)
    kl_before = (float(eval_kl(rows, chunks.ext_ids[probe], chunks.ext_mask[probe], teacher_h[probe]))
                 if need_teacher else float("nan"))
    order = np.random.default_rng(config.seed + 1).permutation(batches)
    for s in range(config.input_steps):
        k = order[s % batches]
        sl = slice(k * bs, (k + 1) * bs)
        rows, opt_state, loss = input_step(rows, opt_state, chunks.ext_ids[sl], chunks.ext_mask[sl], teacher_h[sl])
        bar.update()
        bar.set_postfix(kl=f"{float(loss):.3f}")
    kl_after = (float(eval_kl(rows, chunks.ext_ids[probe], chunks.ext_mask[probe], teacher_h[probe]))
                if need_teacher else float("nan"))
    embed_rows = np.asarray(rows)

    # ---------------------------------------------------------------- output rows: fitted on the grown model's states
    # The states the output rows will see are the grown model's own (with the new input rows), not the teacher's:
    # rows fitted to the teacher's states were measured worse on held-out text than the pieces' mean.
    @jax.jit
    def student_pass(new_rows, ids, mask):
        table = jnp.concatenate([embed_old, new_rows])
        return _body(nnx.merge(graphdef, state), jnp.take(table, ids, axis=0), mask.astype(jnp.int32))

    student_h = []
    for k in range(batches):
        student_h.append(np.asarray(student_pass(rows, chunks.ext_ids[k * bs:(k + 1) * bs],
                                                 chunks.ext_mask[k * bs:(k + 1) * bs])))
        bar.update()
    student_h = np.concatenate(student_h)
    # At extended position j the next extended token e covers base positions align[j]+1 .. align[j+1]; the base
    # model's probability of its string is the product of those pieces' probabilities (teacher-forced).
    cum = np.concatenate([np.zeros_like(base_logp[:, :1]), np.cumsum(base_logp, axis=1)], axis=1)
    nxt_align = np.concatenate([chunks.align[:, 1:], chunks.align[:, -1:]], axis=1)
    string_logp = np.take_along_axis(cum, nxt_align, 1) - np.take_along_axis(cum, chunks.align, 1)
    ext_next = np.concatenate([chunks.ext_ids[:, 1:], np.zeros_like(chunks.ext_ids[:, :1])], axis=1)
    next_mask = np.concatenate([chunks.ext_mask[:, 1:], np.zeros_like(chunks.ext_mask[:, :1])], axis=1)
    window = np.broadcast_to(np.arange(next_mask.shape[0])[:, None], next_mask.shape).reshape(-1)
    held_out = (window % 5 == 4)[next_mask.reshape(-1) > 0]  # every fifth window checks the fit (early stop)
    keep = next_mask.reshape(-1) > 0
    h = jnp.asarray(student_h.reshape(-1, student_h.shape[-1])[keep])
    tgt_np = ext_next.reshape(-1)[keep]
    string_logp = jnp.asarray(string_logp.reshape(-1)[keep], jnp.float32)  # log p_base(the next token's pieces)
    # the rows fitted: the new ones, and with output_rows="seen" the old rows of the tokens the sample predicts
    # (their probability after a new token, and the mass the new tokens take from their pieces, move with them);
    # the log-sum-exp of every other old row is computed once
    seen_old = np.unique(tgt_np[tgt_np < old_vocab]) if config.output_rows == "seen" else np.zeros(0, np.int64)
    fitted_ids = np.concatenate([seen_old, np.arange(old_vocab, old_vocab + n_new)])
    tgt = jnp.asarray(np.searchsorted(fitted_ids, tgt_np))  # each target's index among the fitted rows
    rest = np.setdiff1d(np.arange(old_vocab), seen_old)
    # positions in chunks of `position_chunk`: the `[positions, fitted rows]` logits of a large sample never exist
    # whole (200 k characters against 45 k fitted rows would be 28 GB); padding positions carry weight 0
    n_pos, chunk = h.shape[0], min(config.position_chunk, h.shape[0])
    pad = -n_pos % chunk

    def chunked(x):
        x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))
        return x.reshape(-1, chunk, *x.shape[1:])

    fit_dt = jnp.dtype(resolve_dtype(config.output_dtype, jax.default_backend()))

    def product(a, b):  # [positions, D] x [rows, D] -> fp32 logits, the inputs in the fit's dtype
        return jnp.einsum("pd,rd->pr", a.astype(fit_dt), b.astype(fit_dt), preferred_element_type=jnp.float32)

    rest_lse = jax.jit(lambda h, w: jax.nn.logsumexp(product(h, w), axis=-1))
    rest_w = head_old[rest]
    lse_rest = jnp.concatenate([rest_lse(hc, rest_w) for hc in chunked(h)])[:n_pos]
    h, tgt, string_logp, lse_rest = map(chunked, (h, tgt, string_logp, lse_rest))
    start_h = jnp.concatenate([head_old[seen_old], jnp.asarray(start_head)])
    shared_nll = (float("nan"), float("nan"))

    def output_loss(rows, part=None, blocks=None):
        """`(objective, (fit term, mean next-token loss))`: with `output_target="base"` the squared gap between the grown
        model's log-probability of each next token and the base's log-probability of its pieces; with "data"
        the cross-entropy of the sample's next tokens. Both with the L2 pull to the start rows. `blocks`: only the
        first that many blocks of `position_chunk` positions."""
        weight = chunked(train_w if part is None else part)[:blocks]

        @jax.checkpoint  # the backward recomputes a chunk's logits instead of keeping every chunk's
        def sums(carry, xs):
            hc, tc, sc, lc, wc = xs
            logits = product(hc, rows)
            lse = jnp.logaddexp(lc, jax.nn.logsumexp(logits, axis=-1))
            logp = jnp.take_along_axis(logits, tc[:, None], 1)[:, 0] - lse
            term = ((logp - sc) ** 2) if config.output_target == "base" else -logp
            return (carry[0] + term @ wc, carry[1] - logp @ wc), None

        zero = jnp.zeros((), jnp.float32)
        xs = tuple(x[:blocks] for x in (h, tgt, string_logp, lse_rest)) + (weight,)
        (fit, nll), _ = jax.lax.scan(sums, (zero, zero), xs)
        total = weight.sum()
        return fit / total + config.output_l2 * ((rows - start_h) ** 2).sum() / n_new, (fit / total, nll / total)

    train_w = jnp.asarray(~held_out, jnp.float32)
    held_w = jnp.asarray(held_out, jnp.float32)
    held_loss = jax.jit(lambda rows: output_loss(rows, held_w)[1][0])  # the objective on the held-out windows

    opt2 = optax.adam(config.output_learning_rate)

    @jax.jit
    def output_step(rows, opt_state):
        (_, (_, nll)), g = jax.value_and_grad(output_loss, has_aux=True)(rows)
        upd, opt_state = opt2.update(g, opt_state, rows)
        return optax.apply_updates(rows, upd), opt_state, nll

    if config.shared_steps:
        kind, use = _row_kinds(new_tok, lines, seen_old, old_vocab, n_new)
        blocks = -(-config.shared_positions // chunk)  # the shared fit's few numbers need fewer positions
        start_h, shared_nll = _fit_shared(lambda rows, part: output_loss(rows, part, blocks), start_h, kind, use,
                                          train_w, held_w, config, bar)
    hrows = start_h
    opt_state = opt2.init(hrows)
    nll_before = float(output_loss(hrows)[1][1])
    best, best_rows = float(held_loss(hrows)), hrows
    since_best = 0
    for _ in range(config.output_steps):
        hrows, opt_state, nll = output_step(hrows, opt_state)
        held = float(held_loss(hrows))
        best, best_rows, since_best = (held, hrows, 0) if held < best else (best, best_rows, since_best + 1)
        bar.update()
        bar.set_postfix(nll=f"{float(nll):.3f}", held_out=f"{held:.3f}")
        if since_best == config.output_patience:  # overfitting: no lower held-out loss for that many steps
            break
    bar.total = bar.n  # an early stop ends the bar at 100%, not at the steps it skipped
    bar.close()
    hrows = best_rows
    nll_after = float(output_loss(hrows)[1][1])
    hrows = np.asarray(hrows)
    return TransferResult(embed_rows, hrows[len(seen_old):], n, int(keep.sum()), (kl_before, kl_after),
                          (nll_before, nll_after), time.perf_counter() - t0, seen_old, hrows[:len(seen_old)],
                          shared_nll)


def _row_kinds(new_tok: Any, lines: Sequence[str], seen_old: np.ndarray, old_vocab: int, n_new: int
               ) -> tuple[np.ndarray, np.ndarray]:
    """Each fitted row's kind (a new token's length in characters: 1, 2, 3, 4 and more, or part of a character;
    the seen old rows are a kind of their own) and how often the whole text of `lines` uses it (log counts,
    standardized over the fitted rows)."""
    texts = new_tok.batch_decode([[old_vocab + i] for i in range(n_new)])
    kind_new = np.array([0 if "\ufffd" in t else min(len(t), 4) for t in texts])
    kind = np.concatenate([np.full(len(seen_old), 5), kind_new]).astype(np.int32)
    counts = np.zeros(old_vocab + n_new, np.float64)
    for start in range(0, len(lines), 1024):
        for ids in new_tok(list(lines[start:start + 1024]), add_special_tokens=False)["input_ids"]:
            np.add.at(counts, np.asarray(ids, np.int64), 1)
    use = np.log1p(np.concatenate([counts[seen_old], counts[old_vocab:]]))
    return kind, ((use - use.mean()) / (use.std() + 1e-6)).astype(np.float32)


def _fit_shared(loss, start: jax.Array, kind: np.ndarray, use: np.ndarray, train_w, held_w, config, bar
                ) -> tuple[jax.Array, tuple[float, float]]:
    """Rows `start * (1 + a[kind]) + u[kind] + use * v[kind]`: a scale and two vectors per kind, fitted by the
    output objective (`loss(rows, weights)`), the best on the held-out windows kept. A row the sample predicts
    once cannot be fitted on its own, but its kind can: this moves every row of a kind (their probability as a
    whole, and with `use` their share by how often the training text uses them) by what the sample shows."""
    kinds, dim = 6, start.shape[1]
    kind_j, use_j = jnp.asarray(kind), jnp.asarray(use)[:, None]
    params = {"a": jnp.zeros((kinds,)), "u": jnp.zeros((kinds, dim)), "v": jnp.zeros((kinds, dim))}

    def rows_of(p):
        return start * (1 + p["a"][kind_j])[:, None] + p["u"][kind_j] + use_j * p["v"][kind_j]

    opt = optax.adam(config.shared_learning_rate)

    @jax.jit
    def step(p, state):
        (_, (_, nll)), g = jax.value_and_grad(lambda q: loss(rows_of(q), train_w), has_aux=True)(p)
        upd, state = opt.update(g, state, p)
        return optax.apply_updates(p, upd), state, nll

    held = jax.jit(lambda p: loss(rows_of(p), held_w)[1][0])
    state = opt.init(params)
    before = best = float(held(params))
    best_p = params
    for _ in range(config.shared_steps):
        params, state, nll = step(params, state)
        h = float(held(params))
        if h < best:
            best, best_p = h, params
        bar.update()
        bar.set_postfix(shared_nll=f"{float(nll):.3f}", held_out=f"{h:.3f}")
    return rows_of(best_p), (before, best)


def _start_rows(old: np.ndarray, sources: Sequence[Sequence[int]], how: str) -> np.ndarray:
    """Input rows before distillation: the pieces' mean, the last piece's row, or a mean weighted towards the last
    piece (weights 1, 2, ..., k)."""
    if how == "mean":
        return _mean_rows(old, sources)
    out = np.empty((len(sources), old.shape[1]), np.float32)
    overall = old.mean(axis=0)
    for i, ids in enumerate(sources):
        if not len(ids):
            out[i] = overall
        elif how == "last":
            out[i] = old[ids[-1]]
        else:
            w = np.arange(1, len(ids) + 1, dtype=np.float32)
            out[i] = (w[:, None] * old[np.asarray(ids)]).sum(0) / w.sum()
    return out


def _mean_rows(old: np.ndarray, sources: Sequence[Sequence[int]]) -> np.ndarray:
    """Mean of each new token's pieces' rows (all old rows for a token without pieces)."""
    out = np.empty((len(sources), old.shape[1]), np.float32)
    overall = old.mean(axis=0)
    for i, ids in enumerate(sources):
        out[i] = old[np.asarray(ids)].mean(axis=0) if len(ids) else overall
    return out

