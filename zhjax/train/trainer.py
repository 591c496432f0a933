"""The training loop of `zhjax pretrain` and `zhjax sft`: init or restore, step, log, evaluate, save.

Reads top to bottom: `train` is `set_up`, `restore`, `loop`; `save` writes a checkpoint and the adapter.

1. `set_up`: `build_model` loads the base (HF dir, zhjax base checkpoint, or random init from `model`) with every
   parameter created directly in its shard, adds LoRA, optionally loads earlier adapters (`adapters_from`);
   `split_model` separates trainable (float32) from frozen state; the optimizer is built for the trainable state
   only; `zhjax.train.step.build_train_step` jits the step (the one `zhjax plan` compiles) with explicit in/out
   shardings and a donated `TrainState` (step, trainable, optimizer state, key).
2. `restore`: if `output_dir` holds checkpoints (and `overwrite_output_dir` is off) the newest one that restores
   and matches its checksums is restored, data position and all, so the run continues at the next sample.
3. `loop`: step (metrics stay on the device), read them and check the loss is finite at logging, evaluation and
   save steps only, log every `logging_steps`, evaluate every `eval_steps`, `save` every `save_steps` (orbax,
   async) together with a PEFT adapter export. A run with a time budget (`max_train_seconds`) compiles its step
   first, times step 0 alone and sets its length to the steps the budget buys at that rate (at most `max_steps`),
   then corrects it from the mean time of steps 5-12 and the seconds left, and once more halfway through the rest
   (`_correct_length`): one step's time is off by 10% either way on a CPU, the first few after a fresh compile run
   slower, and a shared machine drifts. The learning-rate schedule's length lives in the optimizer state for this;
   the warmup keeps step 0's length.

`output_dir` may be a URL (`gs://bucket/run`): checkpoints go there directly, process 0's files are staged
locally and uploaded at each save (`zhjax.train.storage`).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from zhjax.config import ModelConfig
from zhjax.model.llama import LlamaForCausalLM
from zhjax.model.params import count_params, split_model, trainable_filter, variable_value
from zhjax.parallel.mesh import make_mesh
from zhjax.parallel.rules import state_shardings
from zhjax.precision import resolve_dtype
from zhjax.train.checkpoint import RunCheckpointer
from zhjax.train.config import JobConfig
from zhjax.train.data_setup import TrainData, build_data
from zhjax.train.metrics import MetricsLogger, flops_per_token, peak_flops
from zhjax.train.optim import build_optimizer, learning_rate_schedule, num_warmup_steps, set_schedule_length
from zhjax.train.state import TrainState, init_train_state
from zhjax.train.step import TrainStep, build_eval_step, build_train_step
from zhjax.train.storage import OutputDir
from zhjax.train.validate import check_job, clear_run_outputs, jsonable, rewind_metrics, write_run_record


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/inf loss or gradient; the message names the step and the last good checkpoint."""


# ----------------------------------------------------------------------------------------------- model


def build_model(cfg: JobConfig, mesh: jax.sharding.Mesh) -> LlamaForCausalLM:
    """The model of the job, each parameter created or loaded straight into its shard."""
    from zhjax.convert.base import load_base_checkpoint
    from zhjax.convert.hf import load_params, read_config

    lora = None if cfg.full_finetuning else cfg.lora
    dtype = resolve_dtype(cfg.dtype, mesh.devices.flat[0].platform)
    numerics = dict(dtype=dtype, param_dtype=dtype, remat=cfg.remat, remat_names=cfg.remat_names,
                    attention=cfg.attention)
    if cfg.init_from and (Path(cfg.init_from) / "zhjax.json").exists():
        base = load_base_checkpoint(cfg.init_from)
        model_cfg = base.config.replace(**numerics)
        model = _place(_with_lora(base, model_cfg, lora, cfg.seed), mesh)
    elif cfg.init_from:
        model_cfg, _ = read_config(cfg.init_from)
        model_cfg = model_cfg.replace(**numerics)
        abstract = nnx.eval_shape(lambda: LlamaForCausalLM(model_cfg, lora, rngs=nnx.Rngs(cfg.seed)))
        shardings = {
            tuple(str(k) for k in p): variable_value(v) for p, v in nnx.to_flat_state(state_shardings(nnx.state(abstract), mesh))
        }
        model = load_params(
            cfg.init_from, model_cfg, lora, shardings=lambda path, _: shardings[path], seed=cfg.seed
        )
        model = _place(model, mesh)
    elif cfg.model is not None:
        model_cfg = cfg.model.replace(**numerics)
        abstract = nnx.eval_shape(lambda: LlamaForCausalLM(model_cfg, lora, rngs=nnx.Rngs(cfg.seed)))
        graphdef, abs_state = nnx.split(abstract)
        out = state_shardings(abs_state, mesh)
        state = jax.jit(
            lambda: nnx.split(LlamaForCausalLM(model_cfg, lora, rngs=nnx.Rngs(cfg.seed)))[1], out_shardings=out
        )()
        model = nnx.merge(graphdef, state)
    else:
        raise ValueError("the job needs `init_from` (an HF dir or zhjax checkpoint) or a `model` section")
    if cfg.adapters_from:
        from zhjax.convert.peft import load_peft_adapter

        adapter = Path(cfg.adapters_from)
        adapter = adapter / "adapter" if (adapter / "adapter" / "adapter_config.json").exists() else adapter
        load_peft_adapter(model, adapter)
    return model


def _with_lora(base: LlamaForCausalLM, config, lora, seed) -> LlamaForCausalLM:
    """`base`'s weights in a model built with `config` and fresh LoRA adapters."""
    abstract = nnx.eval_shape(lambda: LlamaForCausalLM(config, lora, rngs=nnx.Rngs(seed)))
    graphdef, lora_abs, rest_abs = nnx.split(abstract, nnx.LoRAParam, ...)
    lora_state = (
        jax.jit(lambda: nnx.split(LlamaForCausalLM(config, lora, rngs=nnx.Rngs(seed)), nnx.LoRAParam, ...)[1])()
        if lora
        else lora_abs
    )
    rest = jax.tree.map(lambda a, b: b.astype(a.dtype), rest_abs, nnx.state(base))
    return nnx.merge(graphdef, lora_state, rest)


def _place(model, mesh):
    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, jax.device_put(state, state_shardings(state, mesh)))



# ----------------------------------------------------------------------------------------------- set-up


@dataclasses.dataclass
class Run:
    """One job, set up: where it writes, its mesh and data, the frozen base, the state and the jitted steps."""

    cfg: JobConfig
    kind: str
    out: OutputDir
    is_main: bool
    mesh: jax.sharding.Mesh
    data: TrainData
    model_cfg: ModelConfig
    graphdef: nnx.GraphDef
    frozen: nnx.State
    state: TrainState
    train_step: TrainStep
    eval_step: Callable
    ckpt: RunCheckpointer
    total_steps: int  # with a time budget: an upper bound until step 0 has been timed (`length_fixed`), then
    # step 0's estimate until the corrections (`budget`) are made
    length_fixed: bool = True
    budget: _Budget | None = None  # a time budget whose length is still to be corrected
    warmup_steps: int | None = None  # None: HF's for `total_steps` (a time budget may keep an earlier length's)
    logger: MetricsLogger | None = None
    last_saved: int | None = None


def train(cfg: JobConfig, kind: str = "pretrain") -> dict:
    """Run one training job; returns a summary (final step, last losses, output paths)."""
    run = set_up(cfg, kind)
    start_step = restore(run)
    losses = loop(run, start_step)
    run.ckpt.close()
    run.logger.close()
    if run.is_main:
        run.out.close()
    return {"step": run.total_steps, "losses": losses, "output_dir": str(run.out), "last_checkpoint": run.last_saved}


def set_up(cfg: JobConfig, kind: str) -> Run:
    """Check the job, prepare `output_dir`, build the mesh, model, data, initial state and the jitted steps."""
    out, export_random_base = _prepare_output(cfg, kind)
    is_main = jax.process_index() == 0
    mesh = make_mesh(cfg.mesh)
    data_parallel = mesh.shape["data"] * mesh.shape["fsdp"]
    global_batch = cfg.per_device_train_batch_size * len(mesh.devices.flat)
    if global_batch % data_parallel:
        raise ValueError(f"global batch {global_batch} is not divisible by the data-parallel size {data_parallel}")

    model = build_model(cfg, mesh)
    if export_random_base:
        export_base(model, cfg, out, is_main)
    data = build_data(cfg, kind, model.config, mesh, global_batch * cfg.optim.gradient_accumulation_steps)
    model_cfg, lora = model.config, model.lora
    graphdef, trainable, frozen = split_model(model, trainable_filter(lora, cfg.full_finetuning))
    del model
    trainable = jax.tree.map(lambda x: x.astype(jnp.float32), trainable)  # master weights in float32

    steps_per_epoch = data.steps_per_epoch
    total_steps = cfg.max_steps if cfg.max_steps > 0 else max(1, math.ceil(cfg.num_train_epochs * steps_per_epoch))
    budgeted = cfg.max_train_seconds > 0
    tx = build_optimizer(cfg.optim, trainable, total_steps, schedule_length_in_state=budgeted)
    train_step = build_train_step(graphdef, tx, trainable, frozen, mesh, lora=lora,
                                  skip_nonfinite=cfg.skip_nonfinite, loss_chunk=cfg.loss_chunk_size,
                                  lazy_vocab=cfg.optim.lazy_vocab_rows)
    state = init_train_state(tx, trainable, cfg.seed, train_step.state_shardings)
    ckpt = RunCheckpointer(out.location("checkpoints"), max_to_keep=cfg.save_total_limit,
                           async_save=cfg.async_checkpointing)
    return Run(cfg, kind, out, is_main, mesh, data, model_cfg, graphdef, frozen, state, train_step,
               build_eval_step(graphdef, train_step, cfg.loss_chunk_size), ckpt, total_steps,
               length_fixed=not budgeted, budget=_Budget(cfg.max_train_seconds, total_steps) if budgeted else None)


def _prepare_output(cfg: JobConfig, kind: str) -> tuple[OutputDir, bool]:
    """Check the job, clear or create `output_dir`, write the run record; also: must a random base be exported?"""
    out = OutputDir(cfg.output_dir)  # a URL whose filesystem package is missing fails here, before any work
    is_main = jax.process_index() == 0
    check_job(cfg, kind, len(jax.devices()))  # every problem at once, before anything is written or built
    if cfg.overwrite_output_dir and is_main and out.exists():
        clear_run_outputs(out)  # only what a run writes, and only now that every check has passed
    _sync("zhjax-output-dir-cleared")
    out.prepare(is_main)
    if is_main:
        write_run_record(out.local, cfg, kind, len(jax.devices()))
    export_random_base = cfg.init_from is None and not out.exists("base/config.json")
    _sync("zhjax-output-dir-checked")  # every process decided before process 0 writes base/
    return out, export_random_base


def restore(run: Run) -> int:
    """Continue from the newest good checkpoint in `output_dir`, data position and all; returns the start step."""
    report = print if run.is_main else lambda _: None
    restored = run.ckpt.restore_latest_good(run.state, report=report)
    if restored is None:
        return 0
    run.last_saved, run.state, meta = restored
    run.data.load_state_dict(meta["data"])
    if not run.length_fixed and "total_steps" in meta:  # the length its time budget fixed (in the state too)
        run.total_steps, run.warmup_steps = meta["total_steps"], meta.get("warmup_steps")
        run.length_fixed, run.budget = True, None
    if run.is_main:
        print(f"resumed from {run.ckpt.directory / str(run.last_saved)} at step {meta['step']}")
    return meta["step"]


# ----------------------------------------------------------------------------------------------- loop


def loop(run: Run, start_step: int) -> list[float]:
    """Train from `start_step` to the end: step, log, evaluate and save on schedule; returns the step losses.

    The metrics stay on the device between reads; they are read (and the loss checked) only at logging,
    evaluation and save steps.
    """
    cfg, data = run.cfg, run.data
    meter = _Meter(run, start_step)
    losses: list[float] = []
    if cfg.eval_steps > 0 and start_step == 0 and data.has_eval:  # where training starts, for learning curves
        run.logger.log({"step": 0, **evaluate(run.eval_step, run.state.trainable, run.frozen, data,
                                              cfg.max_eval_batches)})
        meter.restart()
    pending = []  # (step, metrics) still on the device
    for step in run.logger.progress(_steps(run, start_step), initial=start_step, total=run.total_steps):
        length_moved = not run.length_fixed
        if run.length_fixed:
            run.state, metrics = run.train_step(run.state, run.frozen, data.next_train_batch())
        else:
            run.state, metrics = _timed_first_step(run, data.next_train_batch())
        if run.budget is not None and step + 1 == run.budget.window_from:
            jax.block_until_ready(metrics)
            run.budget.window_start = time.perf_counter()
        elif run.budget is not None and step + 1 == run.budget.fix_at:
            _correct_length(run, metrics)
            length_moved = True
        if length_moved:
            meter.schedule = learning_rate_schedule(cfg.optim, run.total_steps, run.warmup_steps)
            run.logger.set_total(run.total_steps)
        total = run.total_steps
        pending.append((step, metrics))
        meter.tokens += data.global_batch * data.seq_len  # tokens processed, padding included
        done = step + 1
        log_now = done % cfg.logging_steps == 0 or done == total
        eval_now = cfg.eval_steps > 0 and (done % cfg.eval_steps == 0 or done == total) and data.has_eval
        save_now = (cfg.save_steps > 0 and done % cfg.save_steps == 0) or done == total
        if not (log_now or eval_now or save_now):
            continue
        metrics = _read_pending(pending, losses, cfg, run.logger, run.ckpt, run.out, run.is_main)
        pending = []
        if log_now:
            run.logger.log(meter.record(done, losses, metrics))
        pause_start = time.perf_counter()
        if eval_now:
            run.logger.log({"step": done, **evaluate(run.eval_step, run.state.trainable, run.frozen, data,
                                                     cfg.max_eval_batches)})
            meter.window_start += time.perf_counter() - pause_start  # evaluation is not training time
        if save_now:
            run.logger.flush()  # the records so far are uploaded with this save
            save(run.ckpt, done, run.state, run)
            run.last_saved = done
        if run.budget is not None:  # nor are evaluation and saves time the budget pays for
            paused = time.perf_counter() - pause_start
            run.budget.since += paused
            run.budget.window_start += paused
    return losses


def _steps(run: Run, start_step: int):
    """The run's step indices from `start_step`; the end is read at every step (a time budget moves it once)."""
    step = start_step
    while step < run.total_steps:
        yield step
        step += 1


# A time-budgeted run's length is corrected from the mean time of the BUDGET_TIMED_STEPS steps that follow the
# BUDGET_SETTLE_STEPS after step 0 (steps 5-12): in the demo, steps 1-4 after a fresh compile ran 8-16% slower than
# the rest. With a longer warmup, its last steps are the timed ones. It is corrected once more halfway through the
# steps left then (when that is at least BUDGET_TIMED_STEPS steps), from the steps since.
BUDGET_SETTLE_STEPS = 4
BUDGET_TIMED_STEPS = 8


@dataclasses.dataclass
class _Budget:
    """A time-budgeted run's clock: the length step 0 buys, corrected (twice at most) from the steps after it."""

    seconds: float  # `max_train_seconds`
    upper: int  # `max_steps` or the epochs'
    first: float = 0.0  # step 0's seconds
    fix_at: int = 0  # steps done when the length is corrected
    window_from: int = 0  # steps done when the timed steps start
    since: float = 0.0  # the clock after step 0, moved on by the evaluations and saves since
    window_start: float = 0.0  # the clock when the timed steps started, moved on likewise
    corrected: int = 0  # corrections made


def _timed_first_step(run: Run, batch) -> tuple[TrainState, dict]:
    """Step 0 of a time-budgeted run: compiled first, run and timed alone; then the run's length is set.

    `max_train_seconds / (step 0's seconds)` steps, at least 1 and at most the upper bound `run.total_steps`
    (`max_steps` or the epochs'); the schedule's length in the optimizer state is set to it before step 1. (Step
    0's learning rate is the same for any length: 0 in warmup, the peak without.) When that length goes past step
    12 (or past the warmup, when longer), it is corrected after it (`_correct_length`). Every process takes process
    0's timings, so all agree on the length.
    """
    run.train_step.lower(run.state, run.frozen, batch).compile()  # jit reuses it: the timed call only runs
    start = time.perf_counter()
    state, metrics = run.train_step(run.state, run.frozen, batch)
    jax.block_until_ready(metrics)
    budget = run.budget
    budget.first = seconds = _process_0s(time.perf_counter() - start)
    steps = budgeted_steps(budget.seconds, seconds, budget.upper)
    state = state._replace(opt_state=set_schedule_length(state.opt_state, run.cfg.optim, steps))
    run.total_steps, run.warmup_steps = steps, num_warmup_steps(run.cfg.optim, steps)
    run.length_fixed = True
    head = f"time budget {budget.seconds:g} s at {seconds:.3g} s a step (step 0, timed alone)"
    fix_at = max(1 + BUDGET_SETTLE_STEPS + BUDGET_TIMED_STEPS, run.warmup_steps)
    if fix_at < steps:
        budget.fix_at, budget.window_from, budget.since = fix_at, fix_at - BUDGET_TIMED_STEPS, time.perf_counter()
        run.logger.text(f"{head}: about {steps} steps, corrected after step {fix_at - 1} from steps "
                        f"{budget.window_from}-{fix_at - 1}")
    else:
        run.budget = None
        run.logger.text(f"{head}: {steps} steps (at most {budget.upper})")
    return state, metrics


def _correct_length(run: Run, metrics) -> None:
    """The run's length from the mean time of the timed steps (`window_from` .. `fix_at - 1`): the steps done,
    and as many more as the budget's remaining seconds (after step 0 and every step since) buy at that rate. After
    the first correction a second is set halfway through the steps left, timed from here.

    The warmup keeps the length step 0 set (its updates are applied); from the next update on the schedule runs
    over the corrected length, so it still ends at 0 on the last step.
    """
    jax.block_until_ready(metrics)
    budget, done, now = run.budget, run.budget.fix_at, time.perf_counter()
    window, spent = _process_0s(now - budget.window_start, budget.first + now - budget.since)
    per_step = window / (done - budget.window_from)
    left = budget.seconds - spent
    steps = budget.upper if per_step <= 0 else min(budget.upper, done + max(0, math.floor(left / per_step)))
    opt_state = set_schedule_length(run.state.opt_state, run.cfg.optim, steps, keep_warmup=True)
    run.state, run.total_steps = run.state._replace(opt_state=opt_state), steps
    run.logger.text(f"time budget {budget.seconds:g} s at {per_step:.3g} s a step (steps {budget.window_from}-"
                    f"{done - 1}; {spent:.3g} s spent): {steps} steps (at most {budget.upper})")
    budget.corrected += 1
    half = (steps - done) // 2
    if budget.corrected == 1 and half >= BUDGET_TIMED_STEPS:
        budget.window_from, budget.fix_at, budget.window_start = done, done + half, time.perf_counter()
    else:
        run.budget = None


def _process_0s(*seconds: float) -> float | tuple[float, ...]:
    """Process 0's readings of times, on every process (the same on one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        seconds = tuple(float(x) for x in multihost_utils.broadcast_one_to_all(np.asarray(seconds, np.float64)))
    return seconds[0] if len(seconds) == 1 else seconds


def budgeted_steps(budget_seconds: float, step_seconds: float, upper: int) -> int:
    """How many steps of `step_seconds` fit in `budget_seconds`: at least 1 (the step already taken), at most
    `upper`."""
    if step_seconds <= 0:
        return upper
    return max(1, min(upper, math.floor(budget_seconds / step_seconds)))


class _Meter:
    """Throughput and MFU of the logging window; opens the run's metrics log (rewound to the start step)."""

    def __init__(self, run: Run, start_step: int):
        cfg, mesh, d = run.cfg, run.mesh, run.data
        trainable = run.state.trainable
        n_train, n_frozen = count_params(trainable), count_params(run.frozen)
        embed_trainable = any(str(p[0]) == "embed_tokens" for p, _ in nnx.to_flat_state(trainable))
        self.fpt = flops_per_token(run.model_cfg, n_train, n_frozen, d.seq_len, embed_trainable=embed_trainable)
        self.peak = (cfg.peak_tflops_per_device * 1e12) if cfg.peak_tflops_per_device else peak_flops(jax.devices()[0])
        self.devices = len(mesh.devices.flat)
        self.schedule = learning_rate_schedule(cfg.optim, run.total_steps, run.warmup_steps)
        self.logging_steps, self.data = cfg.logging_steps, d
        if run.is_main:
            rewind_metrics(run.out.local, start_step)  # records past the restored step are logged again
        run.logger = MetricsLogger(run.out.local, enabled=run.is_main)
        length = (f"{run.total_steps} steps" if run.length_fixed else
                  f"at most {run.total_steps} steps (as many as fit in {cfg.max_train_seconds:g} s)")
        run.logger.text(
            f"{run.kind}: {length}, global batch {d.global_batch // d.accum} x {d.accum} accum x "
            f"{d.seq_len} tokens, mesh {dict(mesh.shape)}, trainable {n_train:,} / frozen {n_frozen:,} params, "
            f"dtype {run.model_cfg.dtype}{' (auto)' if cfg.dtype == 'auto' else ''}, attention {cfg.attention}, "
            f"remat {cfg.remat}"
        )
        if run.is_main:
            run.out.sync()  # a remote run shows its config (and random base) before the first save
        self.restart()

    def restart(self) -> None:
        self.tokens, self.window_start = 0.0, time.perf_counter()

    def record(self, done: int, losses: list[float], metrics: dict) -> dict:
        """The logging record of the window ending at step `done`; starts the next window."""
        tps = self.tokens / (time.perf_counter() - self.window_start)
        record = {
            "step": done,
            "loss": float(np.mean(losses[-self.logging_steps :])),
            "lr": float(self.schedule(done - 1)),
            "grad_norm": float(metrics["grad_norm"]),
            "tokens_per_second": tps,
            "epoch": self.data.epoch_progress(),
        }
        if self.peak:
            record["mfu"] = tps * self.fpt / (self.peak * self.devices)
        self.restart()
        return record


def _read_pending(pending, losses, cfg, logger, ckpt, out, is_main) -> dict:
    """Read the metrics of the steps since the last read in one host transfer; returns the newest step's.

    Their losses are appended to `losses`. A non-finite step is reported with its own step number: skipped (its
    update was never applied, `skip_nonfinite`) or the run stops here, before anything after it is saved.
    """
    read = jax.device_get([m for _, m in pending])
    for (step, _), m in zip(pending, read, strict=True):
        if not m["finite"]:
            msg = f"non-finite loss or gradient at step {step + 1}"
            if cfg.skip_nonfinite:
                logger.text(msg + ": update skipped")
            else:
                ckpt.wait()
                good = ckpt.latest_step()
                where = f"{ckpt.directory / str(good)}" if good is not None else "none saved yet"
                if is_main:
                    logger.flush()
                    out.sync()
                raise NonFiniteLossError(f"{msg} (loss {float(m['loss'])}); last good checkpoint: {where}")
        losses.append(float(m["loss"]))
    return read[-1]


def evaluate(eval_fn, trainable, frozen, data, max_batches: int | None) -> dict:
    """Mean token loss and perplexity over the validation set."""
    total, tokens = 0.0, 0.0
    for i, batch in enumerate(data.eval_batches()):
        if max_batches is not None and i >= max_batches:
            break
        s, n = eval_fn(trainable, frozen, batch)
        total, tokens = total + float(s), tokens + float(n)
    loss = total / max(tokens, 1.0)
    return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0)), "eval_tokens": tokens}


# ----------------------------------------------------------------------------------------------- export


def save(ckpt: RunCheckpointer, step: int, state: TrainState, run: Run) -> None:
    """An orbax checkpoint of `state` (all processes) plus a PEFT adapter beside it (process 0).

    A remote output dir gets process 0's staged files (adapter, metrics so far) before this returns, so a job
    preempted once the checkpoint is complete has them uploaded too.
    """
    cfg, out = run.cfg, run.out
    ckpt.save(step, state, {"data": run.data.state_dict(), "seed": cfg.seed, "config": jsonable(cfg),
                            "total_steps": run.total_steps, "warmup_steps": run.warmup_steps})
    if not cfg.full_finetuning:
        # the adapter export reads every shard of the trainable state: replicate it (all processes take part)
        model = nnx.merge(run.graphdef, _gathered_on_host(state.trainable), run.frozen)
        if run.is_main and model.lora is not None:
            from zhjax.convert.peft import save_peft_adapter

            base = cfg.init_from or str(out.location("base"))
            # the run's own adapter/ (checked for strangers' files by `check_job` before the run started)
            save_peft_adapter(model, out.local / "adapter", base_model_name_or_path=base,
                              tokenizer_dir=cfg.tokenizer or cfg.init_from, overwrite=True)
    if run.is_main:
        out.sync()


def export_base(model: LlamaForCausalLM, cfg: JobConfig, out: OutputDir, is_main: bool) -> None:
    """A randomly initialised base written to `output_dir/base`, so the adapters saved later have a base to load onto."""
    from zhjax.convert.hf import save_hf

    host_model = _gathered_on_host(model)  # every process takes part; process 0 writes
    if is_main:
        save_hf(host_model, out.local / "base", tokenizer_dir=cfg.tokenizer, overwrite=True)  # checked by check_job


def _sync(name: str) -> None:
    """A barrier across processes (a no-op in a single-process run)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _gathered_on_host(tree):
    """`tree` (arrays or an NNX module) with every array whole on every process's host, so any process can read it.

    Single-process runs read sharded arrays directly; this is for multi-process runs, where a process holds only
    its own shards: `multihost_utils.process_allgather` gathers each global array. Collective: every process must
    call it.
    """
    if jax.process_count() == 1:
        return tree
    from jax.experimental import multihost_utils

    graphdef, state = nnx.split(tree) if isinstance(tree, nnx.Module) else (None, tree)
    state = multihost_utils.process_allgather(state, tiled=True)
    return state if graphdef is None else nnx.merge(graphdef, state)


