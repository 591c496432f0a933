"""`zhjax pretrain` / `zhjax sft` end to end on the tiny presets: loss, logs, adapters, limits, resume, meshes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
ZHJAX = [sys.executable, "-m", "zhjax.cli"]


def run(args: list[str], *, env: dict | None = None, check: bool = True, timeout: int = 300) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run(args, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def train_losses(out: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in metrics(out) if "loss" in m}


@pytest.mark.parametrize("kind", ["pretrain", "sft"])
def test_cli_trains_tiny_preset_and_writes_a_peft_adapter(tmp_path, kind):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "run"
    run([*ZHJAX, kind, "--config", f"configs/{kind}/tiny.yaml", f"output_dir={out}", "max_steps=30",
         "save_steps=10", "save_total_limit=2", "logging_steps=5", f"data.data_cache_dir={tmp_path / 'cache'}"])
    records = [m for m in metrics(out) if "loss" in m]
    assert [m["step"] for m in records] == [5, 10, 15, 20, 25, 30]
    for m in records:
        assert {"step", "loss", "lr", "grad_norm", "tokens_per_second"} <= set(m)
    assert records[-1]["loss"] < 0.8 * records[0]["loss"]
    assert any("eval_loss" in m for m in metrics(out))
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.isdigit()) == ["20", "30"]
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))

    # the adapter is real (not the seed's empty file) and peft puts it on the exported base with zhjax's logits
    assert (out / "adapter" / "adapter_model.safetensors").stat().st_size > 100_000
    base = transformers.AutoModelForCausalLM.from_pretrained(out / "base", dtype=torch.float32)
    peft_model = peft.PeftModel.from_pretrained(base, out / "adapter").eval()
    ids = np.arange(3, 40)[None]
    with torch.no_grad():
        ref = peft_model(torch.tensor(ids)).logits.numpy()
    import zhjax
    from zhjax.convert.peft import load_peft_adapter

    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    model = zhjax.load_pretrained(
        out / "base", lora=zhjax.LoraConfig(r=cfg["r"], lora_alpha=cfg["lora_alpha"], lora_dropout=0.0)
    )
    load_peft_adapter(model, out / "adapter")
    np.testing.assert_allclose(np.asarray(model(ids)), ref, atol=1e-4, rtol=0)
    plain = np.asarray(zhjax.load_pretrained(out / "base")(ids))
    assert np.abs(plain - ref).max() > 1e-3  # training changed the model, so the comparison is not vacuous


MESH_RUN = textwrap.dedent(
    """
    import json, sys
    import jax
    import zhjax.train.trainer as trainer
    from zhjax.train.config import load_job_config
    from zhjax.parallel.mesh import make_mesh

    cfg = load_job_config("pretrain", "configs/pretrain/tiny.yaml", sys.argv[1:])
    shard_shapes = {}
    if len(jax.devices()) > 1:
        model = trainer.build_model(cfg, make_mesh(cfg.mesh))
        for name, arr in [("q_kernel", model.layers.self_attn.q_proj.kernel[...]),
                          ("embed", model.embed_tokens.embedding[...]),
                          ("lora_a", model.layers.mlp.up_proj.lora_a[...])]:
            shard_shapes[name] = [list(arr.shape), list(arr.addressable_shards[0].data.shape)]
    summary = trainer.train(cfg, "pretrain")
    print("RESULT" + json.dumps({"losses": summary["losses"], "shards": shard_shapes}))
    """
)


def mesh_run(tmp_path, name, devices, overrides):
    env = {"XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu"}
    args = [f"output_dir={tmp_path / name}", "max_steps=10", "logging_steps=1", "eval_steps=0", "save_steps=0",
            "lora.lora_dropout=0.0", f"data.data_cache_dir={tmp_path / 'cache'}", *overrides]
    proc = run([sys.executable, "-c", MESH_RUN, *args], env=env)
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT"))
    return json.loads(line[len("RESULT"):])


def test_fsdp_data_and_tensor_meshes_give_single_device_losses_with_real_sharding(tmp_path):
    single = mesh_run(tmp_path, "single", 1, ["per_device_train_batch_size=8", "mesh.fsdp=1"])
    cases = {
        "fsdp8": ["mesh.data=1", "mesh.fsdp=8", "mesh.tensor=1"],
        "data2_fsdp4": ["mesh.data=2", "mesh.fsdp=4", "mesh.tensor=1"],
        "fsdp4_tensor2": ["mesh.data=1", "mesh.fsdp=4", "mesh.tensor=2"],
    }
    for name, mesh in cases.items():
        res = mesh_run(tmp_path, name, 8, ["per_device_train_batch_size=1", *mesh])
        np.testing.assert_allclose(res["losses"], single["losses"], atol=1e-5, rtol=0, err_msg=name)
        (q_full, q_shard), (e_full, e_shard) = res["shards"]["q_kernel"], res["shards"]["embed"]
        fsdp = {"fsdp8": 8, "data2_fsdp4": 4, "fsdp4_tensor2": 4}[name]
        tensor = 2 if name == "fsdp4_tensor2" else 1
        assert q_shard == [q_full[0], q_full[1] // fsdp, q_full[2] // tensor], name  # [layers, embed, heads]
        assert e_shard == [e_full[0] // tensor, e_full[1] // fsdp], name  # [vocab, embed]
        a_full, a_shard = res["shards"]["lora_a"]
        assert a_shard == [a_full[0], a_full[1] // fsdp, a_full[2]], name


def test_splash_attention_under_a_sharded_mesh_gives_the_xla_losses(tmp_path):
    # the Pallas kernel (interpret mode on CPU) runs per device inside shard_map: batch over fsdp, heads over tensor
    xla = mesh_run(tmp_path, "xla", 1, ["per_device_train_batch_size=8", "mesh.fsdp=1", "max_steps=4"])
    splash = mesh_run(tmp_path, "splash", 8, ["per_device_train_batch_size=1", "mesh.fsdp=4", "mesh.tensor=2",
                                               "max_steps=4", "attention=splash"])
    np.testing.assert_allclose(splash["losses"], xla["losses"], atol=1e-5, rtol=0)
    assert json.loads((tmp_path / "splash" / "job_config.json").read_text())["attention"] == "splash"


def test_resume_on_a_different_mesh_continues_the_same_run(tmp_path):
    # 10 steps on fsdp=8 with checkpoints at 5 and 10; drop the step-10 checkpoint, then resume from step 5 on
    # data=2 x fsdp=4: orbax reshards the saved state onto the new mesh and steps 6-10 repeat the losses
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    out = tmp_path / "run"
    common = [f"output_dir={out}", "max_steps=10", "save_steps=5", "save_total_limit=3", "logging_steps=1",
              "eval_steps=0", "lora.lora_dropout=0.0", "per_device_train_batch_size=1",
              f"data.data_cache_dir={tmp_path / 'cache'}"]
    run([*ZHJAX, "pretrain", "--config", "configs/pretrain/tiny.yaml", *common, "mesh.fsdp=8"], env=env)
    first = train_losses(out)
    import shutil

    shutil.rmtree(out / "checkpoints" / "10")
    (out / "metrics.jsonl").unlink()
    proc = run([*ZHJAX, "pretrain", "--config", "configs/pretrain/tiny.yaml", *common, "mesh.data=2", "mesh.fsdp=4"],
               env=env)
    assert "resumed from" in proc.stdout + proc.stderr
    second = train_losses(out)
    assert sorted(second) == [6, 7, 8, 9, 10]
    np.testing.assert_allclose([second[s] for s in range(6, 11)], [first[s] for s in range(6, 11)], atol=1e-5, rtol=0)


def test_nan_loss_stops_the_run_naming_the_step_and_last_checkpoint(tmp_path):
    out = tmp_path / "nan"
    proc = run([*ZHJAX, "pretrain", "--config", "configs/pretrain/tiny.yaml", f"output_dir={out}", "max_steps=30",
                "save_steps=2", "eval_steps=0", "optim.learning_rate=1e30", "optim.max_grad_norm=0",
                "optim.warmup_ratio=0", f"data.data_cache_dir={tmp_path / 'cache'}"], check=False)
    assert proc.returncode != 0
    assert "NonFiniteLossError: non-finite loss or gradient at step" in proc.stderr
    assert "last good checkpoint:" in proc.stderr


def test_bad_config_is_refused_before_any_work(tmp_path):
    proc = run([*ZHJAX, "pretrain", "--config", "configs/pretrain/tiny.yaml", "optim.lr_scheduler_type=cosine_typo"],
               check=False)
    assert proc.returncode == 2
    assert "lr_scheduler_type 'cosine_typo' is not supported" in proc.stderr
    proc = run([*ZHJAX, "pretrain", "--config", "configs/pretrain/tiny.yaml", "mesh.fsdp=3"], check=False)
    assert proc.returncode != 0 and "mesh:" in proc.stderr


def test_adapters_from_continues_an_earlier_lora(tmp_path):
    """The Plus recipe: SFT starts from the pre-training run's adapter and trained embed/head."""
    out = tmp_path / "pt"
    run([*ZHJAX, "pretrain", "--config", "configs/pretrain/tiny.yaml", f"output_dir={out}", "max_steps=5",
         "eval_steps=0", f"data.data_cache_dir={tmp_path / 'cache'}"])
    from safetensors.numpy import load_file

    from zhjax.convert.peft import lora_state_dict
    from zhjax.parallel.mesh import make_mesh
    from zhjax.train.config import load_job_config
    from zhjax.train.trainer import build_model

    cfg = load_job_config("sft", "configs/sft/tiny.yaml", [f"adapters_from={out}", f"init_from={out / 'base'}"])
    model = build_model(cfg, make_mesh(cfg.mesh))
    saved = load_file(out / "adapter" / "adapter_model.safetensors")
    ours = lora_state_dict(model)
    assert set(ours) <= set(saved)
    for k, v in ours.items():
        np.testing.assert_array_equal(v, saved[k])
    np.testing.assert_array_equal(
        np.asarray(model.embed_tokens.embedding[...]), saved["base_model.model.model.embed_tokens.weight"]
    )
