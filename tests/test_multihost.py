"""Multi-host training as 2 local processes x 2 CPU devices (gloo): same losses as one process, resume, dead peers."""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]

# One training process. Until `zhjax pretrain` takes the --coordinator flags it calls `initialize` itself.
TRAIN = textwrap.dedent(
    """
    import json, os, signal, sys, time
    import jax
    jax.config.update("jax_num_cpu_devices", int(os.environ["CPU_DEVICES"]))
    from zhjax.parallel.mesh import initialize
    if os.environ.get("COORDINATOR"):
        initialize(os.environ["COORDINATOR"], int(os.environ["NUM_PROCESSES"]), int(os.environ["PROCESS_ID"]),
                   heartbeat_timeout=10, initialization_timeout=120)
    import zhjax.train.trainer as trainer
    from zhjax.train.config import load_job_config

    stop_after, die_at = int(os.environ.get("STOP_AFTER", 0)), int(os.environ.get("DIE_AT", 0))
    original_save, original_log = trainer.save, trainer.MetricsLogger.log

    def save(ckpt, step, *args, **kwargs):
        original_save(ckpt, step, *args, **kwargs)
        if step == stop_after:  # the whole job is preempted once this checkpoint is complete
            ckpt.wait()
            jax.distributed.shutdown()
            os._exit(0)

    def log(self, record):  # every process passes here after each logged step (process 0 alone writes)
        original_log(self, record)
        if record.get("step") == die_at and jax.process_index() == 1:  # one host dies
            print(f"DYING {time.time()}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)

    trainer.save, trainer.MetricsLogger.log = save, log
    if os.environ.get("STEP_SECONDS"):  # this process's clock, moved by its train steps: "first:rest,first:rest"
        from zhjax.train import step as step_module

        class StepClock:
            now, calls = 0.0, 0
            first, rest = map(float, os.environ["STEP_SECONDS"].split(",")[jax.process_index()].split(":"))

            def perf_counter(self):
                return self.now

        clock, original_call = StepClock(), step_module.TrainStep.__call__

        def timed_call(train_step, *args):
            clock.now += clock.first if clock.calls == 0 else clock.rest
            clock.calls += 1
            return original_call(train_step, *args)

        step_module.TrainStep.__call__, trainer.time = timed_call, clock
    summary = trainer.train(load_job_config("pretrain", "configs/pretrain/tiny.yaml", sys.argv[1:]), "pretrain")
    print("RESULT" + json.dumps(summary["losses"]), flush=True)
    """
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args: list[str], env: dict) -> subprocess.Popen:
    full = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1", **env}
    return subprocess.Popen([sys.executable, "-c", TRAIN, *args], cwd=REPO, env=full, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def run_processes(args: list[str], n: int, devices: int, timeout: float = 240, **env) -> list[tuple[int, str]]:
    """Start `n` processes of `devices` CPU devices each (one coordinator) and wait for all of them."""
    common = {"CPU_DEVICES": str(devices), **{k: str(v) for k, v in env.items()}}
    if n > 1:
        common |= {"COORDINATOR": f"127.0.0.1:{free_port()}", "NUM_PROCESSES": str(n)}
    procs = [start(args, {**common, "PROCESS_ID": str(i)}) for i in range(n)]
    results = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        results.append((p.returncode, out))
    return results


def logged_losses(out: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    assert len(steps) == len(set(steps)), "metrics.jsonl has duplicate steps: more than one process wrote it"
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def job_args(tmp_path: Path, name: str, *extra: str) -> list[str]:
    return [f"output_dir={tmp_path / name}", "max_steps=4", "save_steps=2", "logging_steps=1", "eval_steps=0",
            "lora.lora_dropout=0.0", "per_device_train_batch_size=4", f"data.data_cache_dir={tmp_path / 'cache'}",
            *extra]


def test_two_processes_train_like_one_and_resume_from_their_checkpoint(tmp_path):
    # 2 processes x 2 devices, preempted after the step-2 checkpoint ...
    multi = tmp_path / "multi"
    results = run_processes(job_args(tmp_path, "multi"), n=2, devices=2, STOP_AFTER=2)
    assert all(rc == 0 for rc, _ in results), "\n".join(o[-4000:] for _, o in results)
    assert sorted(logged_losses(multi)) == [1, 2]
    # ... the same job in one process with 4 devices ...
    [(rc, out)] = run_processes(job_args(tmp_path, "single"), n=1, devices=4)
    assert rc == 0, out[-4000:]
    single = logged_losses(tmp_path / "single")
    # ... and the 2 processes restarted: both resume from their checkpoint and finish the job
    results = run_processes(job_args(tmp_path, "multi"), n=2, devices=2)
    assert all(rc == 0 for rc, _ in results), "\n".join(o[-4000:] for _, o in results)
    assert "resumed from" in results[0][1] and "/checkpoints/2" in results[0][1]
    resumed = [json.loads(line[len("RESULT"):]) for _, o in results for line in o.splitlines() if line.startswith("RESULT")]
    assert len(resumed) == 2 and resumed[0] == resumed[1]  # every process computed the same global losses

    losses = logged_losses(multi)
    assert sorted(losses) == [1, 2, 3, 4]
    np.testing.assert_allclose([losses[s] for s in range(1, 5)], [single[s] for s in range(1, 5)], atol=1e-5, rtol=0)
    # process 0 alone wrote the logs and the adapter; orbax wrote the checkpoints from both
    assert (multi / "adapter" / "adapter_model.safetensors").stat().st_size > 10_000
    # the adapter gathered from both processes' shards is the one process's adapter
    from safetensors.numpy import load_file

    gathered, alone = (load_file(d / "adapter" / "adapter_model.safetensors") for d in (multi, tmp_path / "single"))
    assert gathered.keys() == alone.keys()
    for name, value in gathered.items():
        np.testing.assert_allclose(value, alone[name], atol=1e-5, rtol=0, err_msg=name)
    assert sorted(p.name for p in (multi / "checkpoints").iterdir() if p.name.isdigit()) == ["2", "4"]
    assert "step=1 " not in results[1][1] and "step=3 " in results[0][1]


def test_a_time_budget_gives_every_process_the_same_length(tmp_path):
    # process 0's step 0 takes 2 s and its later steps 1 s: a 30 s budget buys 15 steps, corrected after step 12 (14
    # s spent) to 29 and again after step 20 (22 s spent) to 29; process 1's steps take 0.25 s, which alone would
    # buy the bound (40) each time, and the collectives of the longer run would wait forever: both take process 0's
    # timings
    args = job_args(tmp_path, "budget", "max_train_seconds=30", "max_steps=40", "save_steps=0")
    results = run_processes(args, n=2, devices=2, STEP_SECONDS="2:1,0.25:0.25")
    assert all(rc == 0 for rc, _ in results), "\n".join(o[-4000:] for _, o in results)
    losses = [json.loads(line[len("RESULT"):]) for _, o in results for line in o.splitlines() if line.startswith("RESULT")]
    assert len(losses) == 2 and losses[0] == losses[1] and len(losses[0]) == 29
    assert sorted(logged_losses(tmp_path / "budget")) == list(range(1, 30))


def test_a_dead_process_makes_the_other_exit_with_an_error_in_bounded_time(tmp_path):
    import zhjax
    from zhjax.model.llama import LlamaForCausalLM
    from zhjax.train.config import load_job_config

    # an HF base to start from, so that nothing is exported before the death (process 0 exports a random base)
    model_cfg = load_job_config("pretrain", str(REPO / "configs/pretrain/tiny.yaml"), []).model
    zhjax.save_pretrained(LlamaForCausalLM(model_cfg), tmp_path / "base", tokenizer=str(REPO / "configs/tiny/tokenizer"))
    args = job_args(tmp_path, "dead", "save_steps=0", f"init_from={tmp_path / 'base'}")
    results = run_processes(args, n=2, devices=2, DIE_AT=1, timeout=180)
    (rc0, out0), (rc1, out1) = results
    assert rc1 == -signal.SIGKILL
    died = float(next(line.split()[1] for line in out1.splitlines() if line.startswith("DYING")))
    assert rc0 != 0, out0[-3000:]
    assert any(s in out0 for s in ("another task died", "stopped sending heartbeats", "heartbeat timeout",
                                   "a collective with the other processes failed")), out0[-3000:]
    # the survivor's last word comes within the heartbeat timeout (10 s) plus slack, not after the 300 s default
    assert time.time() - died < 120


FROZEN = textwrap.dedent(
    """
    import os, signal, sys, time
    import jax
    jax.config.update("jax_num_cpu_devices", 1)
    from zhjax.parallel.mesh import initialize
    initialize(sys.argv[1], 2, int(sys.argv[2]), heartbeat_timeout=5)
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("up")
    if jax.process_index() == 1:
        print("FREEZING", flush=True)
        os.kill(os.getpid(), signal.SIGSTOP)  # alive but silent: no heartbeats, no collectives
    t = time.time()
    multihost_utils.sync_global_devices("never")  # waits for the frozen peer
    print("UNEXPECTED", time.time() - t, flush=True)
    """
)


def test_a_frozen_process_is_detected_by_heartbeat_and_the_other_exits(tmp_path):
    coordinator = f"127.0.0.1:{free_port()}"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    procs = [subprocess.Popen([sys.executable, "-c", FROZEN, coordinator, str(i)], cwd=REPO, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for i in range(2)]
    try:
        start_wait = time.time()
        out0, _ = procs[0].communicate(timeout=90)
        waited = time.time() - start_wait
    finally:
        procs[1].kill()  # SIGKILL ends a stopped process too
        procs[1].wait()
    assert procs[0].returncode != 0 and "UNEXPECTED" not in out0
    assert "stopped sending heartbeats" in out0 or "heartbeat timeout" in out0, out0[-3000:]
    assert waited < 60


def test_initialize_is_a_no_op_for_one_process_and_checks_explicit_flags(monkeypatch):
    from zhjax.parallel import mesh

    for var in ("SLURM_JOB_ID", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES",
                "MEGASCALE_COORDINATOR_ADDRESS", "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(var, raising=False)
    assert mesh.cluster_environment() is None
    assert mesh.initialize() is False
    with pytest.raises(ValueError, match="--num-processes, --process-id missing"):
        mesh.initialize("127.0.0.1:1234")
    with pytest.raises(ValueError, match="process id 2 is not in"):
        mesh.initialize("127.0.0.1:1234", 2, 2)
    assert mesh.cluster_environment({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}) == "slurm"
    assert mesh.cluster_environment({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}) is None
    assert mesh.cluster_environment({"OMPI_COMM_WORLD_SIZE": "2"}) == "ompi"
    assert mesh.cluster_environment({"TPU_WORKER_HOSTNAMES": "10.0.0.2,10.0.0.3"}) == "tpu"
    # one SLURM task per node sees all the node's GPUs (JAX alone would give it GPU 0 only)
    slurm = {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "2", "SLURM_STEP_NUM_NODES": "2", "SLURM_GPUS_ON_NODE": "8"}
    assert mesh.slurm_node_devices(slurm) == list(range(8))
    assert mesh.slurm_node_devices({**slurm, "SLURM_NTASKS": "16"}) is None  # one task per GPU: JAX's default
    assert mesh.slurm_node_devices({**slurm, "JAX_LOCAL_DEVICE_IDS": "0,1"}) is None

    parser = argparse.ArgumentParser()
    mesh.add_distributed_args(parser)
    monkeypatch.setenv("JAX_NUM_PROCESSES", "4")
    args = parser.parse_args(["--coordinator", "10.0.0.2:8476", "--process-id", "3"])
    assert (args.coordinator, args.num_processes, args.process_id, args.distributed) == ("10.0.0.2:8476", None, 3, False)
    parser = argparse.ArgumentParser()
    mesh.add_distributed_args(parser)
    args = parser.parse_args(["--coordinator", "10.0.0.2:8476", "--process-id", "3"])
    assert args.num_processes == 4  # from JAX_NUM_PROCESSES


def test_initialize_leaves_the_process_excepthook_alone(monkeypatch):
    import jax

    from zhjax.parallel import mesh

    started = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kwargs: started.append(kwargs))
    monkeypatch.setattr(jax.config, "update", lambda *args: None)  # keep this process's collectives setting
    before = sys.excepthook
    assert mesh.initialize("127.0.0.1:1234", 2, 1) is True
    assert started and started[0]["process_id"] == 1
    assert sys.excepthook is before


def test_explain_peer_failures_notes_a_failed_collective_and_reraises(monkeypatch, capsys):
    import jax

    from zhjax.parallel import mesh

    failure = RuntimeError("Gloo: Connection reset by peer")
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    with pytest.raises(RuntimeError) as raised, mesh.explain_peer_failures():
        raise failure
    assert raised.value is failure and capsys.readouterr().err == ""  # a single process: nothing to explain

    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: True)
    with pytest.raises(ValueError, match="bad config"), mesh.explain_peer_failures():
        raise ValueError("bad config")
    assert capsys.readouterr().err == ""  # not a collective failure
    with pytest.raises(RuntimeError) as raised, mesh.explain_peer_failures():
        raise failure
    assert raised.value is failure
    err = capsys.readouterr().err
    assert "a collective with the other processes failed, most likely because one of them died" in err
    assert len(err.strip().splitlines()) == 1
