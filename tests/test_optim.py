"""The optimizer against the seed's PyTorch stack: HF schedules and warmup, HF Trainer's decay groups,
`clip_grad_norm_` + `torch.optim.AdamW`, and the trainable-only optimizer state."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tests.extras import needs_torch, optional
from zhjax.train.optim import (
    OptimConfig,
    accumulate_gradients,
    build_optimizer,
    decay_mask,
    global_norm,
    learning_rate_schedule,
    num_warmup_steps,
    parameter_name,
)

torch, transformers = optional("torch"), optional("transformers")

STEPS = 30
TINY = dict(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2)

# A small trainable state in zhjax's layout, with the HF name each leaf has in the seed's PyTorch model.
SHAPES = {
    "embed_tokens.embedding": ((16, 8), "model.embed_tokens.weight"),
    "layers.input_layernorm.scale": ((2, 8), "model.layers.0.input_layernorm.weight"),
    "layers.self_attn.q_proj.kernel": ((2, 8, 8), "model.layers.0.self_attn.q_proj.weight"),
    "layers.self_attn.q_proj.bias": ((2, 8), "model.layers.0.self_attn.q_proj.bias"),
    "layers.self_attn.q_proj.lora_a": ((2, 8, 2), "model.layers.0.self_attn.q_proj.lora_A.weight"),
    "layers.self_attn.q_proj.lora_b": ((2, 2, 8), "model.layers.0.self_attn.q_proj.lora_B.weight"),
    "norm.scale": ((8,), "model.norm.weight"),
    "lm_head.kernel": ((8, 16), "lm_head.weight"),
}


def nest(flat: dict[str, np.ndarray]) -> dict:
    """`{"a.b": x}` -> `{"a": {"b": x}}`."""
    tree: dict = {}
    for name, value in flat.items():
        *parents, leaf = name.split(".")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def flatten(tree) -> dict[str, np.ndarray]:
    return {parameter_name(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def torch_module(named: dict[str, np.ndarray]) -> torch.nn.Module:
    """A parameter-only `nn.Module` whose `named_parameters()` are exactly `named`."""
    root = torch.nn.Module()
    for name, value in named.items():
        *parents, leaf = name.split(".")
        module = root
        for p in parents:
            if not hasattr(module, p):
                module.add_module(p, torch.nn.Module())
            module = getattr(module, p)
        module.register_parameter(leaf, torch.nn.Parameter(torch.tensor(value)))
    return root


def hf_decay_names(model: torch.nn.Module) -> set[str]:
    # the method reads nothing from the trainer, so HF's own rule runs without building a Trainer
    return set(transformers.Trainer.get_decay_parameter_names(None, model))


def hf_args(cfg: OptimConfig) -> transformers.TrainingArguments:
    # transformers 5 folds the seed's warmup_ratio into warmup_steps: a value below 1 is a ratio
    return transformers.TrainingArguments(
        output_dir="unused", warmup_steps=cfg.warmup_steps or cfg.warmup_ratio, report_to="none"
    )


def hf_lrs(cfg: OptimConfig, num_training_steps: int, num_warmup_steps: int | None = None) -> list[float]:
    """The lr HF uses at each optimizer update: read before `optimizer.step()`, then `lr_scheduler.step()`; the
    warmup HF's TrainingArguments give `cfg`, or `num_warmup_steps`."""
    if num_warmup_steps is None:
        num_warmup_steps = hf_args(cfg).get_warmup_steps(num_training_steps)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.learning_rate)
    sched = transformers.get_scheduler(
        cfg.lr_scheduler_type, opt, num_warmup_steps=num_warmup_steps, num_training_steps=num_training_steps
    )
    lrs = []
    for _ in range(num_training_steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


def tiny_llama_states(lora, filt, **config):
    """`(graphdef, trainable, frozen)` of a tiny zhjax LLaMA, traced abstractly and filled from numpy (fast)."""
    from flax import nnx

    from zhjax.config import ModelConfig
    from zhjax.model.llama import LlamaForCausalLM
    from zhjax.model.params import split_model

    cfg = ModelConfig(**TINY, **config)
    graphdef, trainable, frozen = split_model(nnx.eval_shape(lambda: LlamaForCausalLM(cfg, lora)), filt)
    rng = np.random.default_rng(2)
    fill = lambda s: jnp.asarray(rng.standard_normal(s.shape).astype(s.dtype))
    return graphdef, jax.tree.map(fill, trainable), jax.tree.map(fill, frozen)


@needs_torch
@pytest.mark.parametrize(
    ("num_training_steps", "warmup_ratio", "warmup_steps"),
    [(30, 0.05, 0), (1000, 0.03, 0), (7, 0.5, 0), (100, 0.0, 0), (30, 0.05, 5)],
)
def test_warmup_steps_match_hf_training_arguments(num_training_steps, warmup_ratio, warmup_steps):
    cfg = OptimConfig(warmup_ratio=warmup_ratio, warmup_steps=warmup_steps)
    assert num_warmup_steps(cfg, num_training_steps) == hf_args(cfg).get_warmup_steps(num_training_steps)


def test_warmup_ratio_005_on_30_steps_is_hfs_ceil():
    # 30 * 0.05 = 1.5 warmup steps: HF rounds up to 2, so update 1 runs at half the peak lr
    cfg = OptimConfig(learning_rate=1.0)
    assert num_warmup_steps(cfg, STEPS) == 2
    np.testing.assert_allclose(learning_rate_schedule(cfg, STEPS)(jnp.arange(3)), [0.0, 0.5, 1.0], rtol=1e-7)


@needs_torch
@pytest.mark.parametrize("kind", ["cosine", "linear", "constant_with_warmup"])
@pytest.mark.parametrize(("num_training_steps", "warmup_ratio"), [(STEPS, 0.05), (1000, 0.03)])
def test_lr_schedule_equals_hf_scheduler_step_for_step(kind, num_training_steps, warmup_ratio):
    cfg = OptimConfig(learning_rate=2e-4, lr_scheduler_type=kind, warmup_ratio=warmup_ratio)
    ours = np.asarray(learning_rate_schedule(cfg, num_training_steps)(jnp.arange(num_training_steps)))
    # float32 against HF's float64: relative precision holds to the last step (the cosine tail is ~1e-5 of peak)
    np.testing.assert_allclose(ours, hf_lrs(cfg, num_training_steps), rtol=1e-6, atol=0)


@needs_torch
def test_decay_mask_matches_hf_trainer_groups():
    params = {name: np.zeros(shape, np.float32) for name, (shape, _) in SHAPES.items()}
    mask = flatten(decay_mask(nest(params)))
    decayed = hf_decay_names(torch_module({hf: params[z] for z, (_, hf) in SHAPES.items()}))
    assert {z: bool(mask[z]) for z in SHAPES} == {z: hf in decayed for z, (_, hf) in SHAPES.items()}
    assert not mask["norm.scale"] and not mask["layers.self_attn.q_proj.bias"] and mask["lm_head.kernel"]


@needs_torch
def test_decay_mask_on_zhjax_llama_state_matches_hf_trainer_on_peft_llama():
    peft = pytest.importorskip("peft")
    from flax import nnx

    from zhjax.config import LoraConfig
    from zhjax.convert.hf import hf_tensor_names

    _, state, _ = tiny_llama_states(LoraConfig(r=2), nnx.Param, attention_bias=True, mlp_bias=True)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY, attention_bias=True, mlp_bias=True))
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    hf = peft.get_peft_model(hf, peft.LoraConfig(r=2, target_modules=targets))
    # peft's wrapper names, unwrapped to the plain HF names zhjax's converter knows
    unwrap = lambda n: (
        n.replace("base_model.model.", "", 1).replace(".base_layer", "").replace(".default", "")
    )
    hf_decays = {unwrap(n): n in hf_decay_names(hf) for n, _ in hf.named_parameters()}

    def hf_names(path: tuple[str, ...]) -> list[str]:
        """The HF names of a zhjax leaf, one per layer for the stacked ones."""
        layers = TINY["num_hidden_layers"]
        if path[-1] in ("lora_a", "lora_b"):
            ab = ".lora_A.weight" if path[-1] == "lora_a" else ".lora_B.weight"
            return [n.replace(".weight", ab) for n in hf_tensor_names((*path[:-1], "kernel"), layers)]
        return hf_tensor_names(path, layers)

    ours = {
        hf: bool(m)
        for name, m in flatten(decay_mask(state)).items()
        for hf in hf_names(tuple(name.split(".")))
    }
    assert ours == hf_decays
    assert not all(ours.values()) and any(ours.values())


def run_torch(params0, grads, cfg: OptimConfig):
    """The seed's update: HF param groups, clip_grad_norm_, AdamW, scheduler stepped after the optimizer."""
    model = torch_module({hf: params0[z] for z, (_, hf) in SHAPES.items()})
    decayed = hf_decay_names(model)
    named = dict(model.named_parameters())
    groups = [
        {"params": [p for n, p in named.items() if n in decayed], "weight_decay": cfg.weight_decay},
        {"params": [p for n, p in named.items() if n not in decayed], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(
        groups, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon
    )
    sched = transformers.get_scheduler(
        cfg.lr_scheduler_type, opt, num_warmup_steps=num_warmup_steps(cfg, STEPS), num_training_steps=STEPS
    )
    history, norms = [], []
    for g in grads:
        for z, (_, hf) in SHAPES.items():
            named[hf].grad = torch.tensor(g[z])
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm or float("inf"))
        norms.append(float(norm))
        opt.step()
        sched.step()
        opt.zero_grad()
        history.append({z: named[hf].detach().numpy().copy() for z, (_, hf) in SHAPES.items()})
    return history, norms


def random_gradients(rng: np.random.Generator) -> list[dict[str, np.ndarray]]:
    # every third step is small (norm well under 1, no clipping), the others large enough to be clipped
    scales = [1e-2 if k % 3 == 0 else 3.0 for k in range(STEPS)]
    return [
        {z: (s * rng.standard_normal(shape)).astype(np.float32) for z, (shape, _) in SHAPES.items()}
        for s in scales
    ]


@needs_torch
@pytest.mark.parametrize("max_grad_norm", [1.0, None])
def test_clip_and_adamw_match_torch_for_30_steps(max_grad_norm):
    rng = np.random.default_rng(0)
    # weights at a LLaMA's init scale (norms near 1), and an lr that moves them by several times that scale in
    # 30 steps: an error in the update (bias correction, eps, decay, lr) then shows at 1e-5 of the weights
    params0 = {
        z: ((1.0 if z.endswith("scale") else 0.0) + 0.02 * rng.standard_normal(shape)).astype(np.float32)
        for z, (shape, _) in SHAPES.items()
    }
    grads = random_gradients(rng)
    cfg = OptimConfig(learning_rate=1e-2, max_grad_norm=max_grad_norm)
    expected, torch_norms = run_torch(params0, grads, cfg)

    params = jax.tree.map(jnp.asarray, nest(params0))
    tx = build_optimizer(cfg, params, STEPS)
    state = tx.init(params)

    @jax.jit
    def step(params, state, g):
        updates, state = tx.update(g, state, params)
        return optax.apply_updates(params, updates), state, global_norm(g)

    clipped = 0
    for k, g in enumerate(grads):
        params, state, norm = step(params, state, nest(g))
        np.testing.assert_allclose(float(norm), torch_norms[k], rtol=1e-6)
        clipped += torch_norms[k] > 1.0
        got = flatten(params)
        for z in SHAPES:
            # Relative to the tensor's largest weight: torch and XLA order the update's roundings differently,
            # so single weights drift apart by a float32 ulp now and then (~5e-7 after 30 steps); float32
            # Adam bias correction, eps 1e-7 instead of 1e-8 or wd 0.011 instead of 0.01 each give >= 7e-6.
            err = np.abs(got[z] - expected[k][z]).max() / np.abs(expected[k][z]).max()
            assert err < 1e-6, f"step {k}, {z}: relative error {err:.2e}"
    assert 0 < clipped < STEPS
    assert np.abs(expected[-1]["lm_head.kernel"] - params0["lm_head.kernel"]).max() > 0.05  # 2.5x init scale


def test_optimizer_state_holds_only_trainable_leaves_and_frozen_weights_cannot_move():
    from flax import nnx

    from zhjax.config import LoraConfig
    from zhjax.model.params import count_params, merge_model, split_model, trainable_filter

    # the final norm trained in full too, so the state holds a leaf without weight decay
    lora = LoraConfig(r=2, modules_to_save=("lm_head", "norm"))
    graphdef, trainable, frozen = tiny_llama_states(lora, trainable_filter(lora))
    frozen_before = jax.tree.map(np.asarray, frozen)
    before_lm_head = np.asarray(trainable["lm_head"]["kernel"][...])

    mask = flatten(decay_mask(trainable))
    assert not mask["norm.scale"] and mask["lm_head.kernel"] and mask["layers.mlp.up_proj.lora_b"]
    tx = build_optimizer(OptimConfig(), trainable, num_training_steps=10)
    state = tx.init(trainable)
    adam = [
        s
        for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
        if isinstance(s, optax.ScaleByAdamState)
    ]
    assert len(adam) == 1
    assert jax.tree.structure(adam[0].mu) == jax.tree.structure(trainable)
    assert jax.tree.structure(adam[0].nu) == jax.tree.structure(trainable)
    # two moments per trainable scalar plus scalar step counters: nothing sized like a frozen weight
    state_arrays = [x for x in jax.tree.leaves(state) if x.ndim]
    assert sum(x.size for x in state_arrays) == 2 * count_params(trainable)
    assert {"layers.self_attn.q_proj.lora_a", "lm_head.kernel", "norm.scale"} <= set(mask)
    assert [name for name in mask if name.endswith("kernel")] == ["lm_head.kernel"]

    @jax.jit
    def step(trainable, state):
        updates, state = tx.update(jax.tree.map(jnp.ones_like, trainable), state, trainable)
        return optax.apply_updates(trainable, updates), state

    for _ in range(3):
        trainable, state = step(trainable, state)
    assert not np.array_equal(np.asarray(trainable["lm_head"]["kernel"][...]), np.asarray(before_lm_head))
    model = merge_model(graphdef, trainable, frozen)
    _, _, frozen_after = split_model(model, trainable_filter(lora))
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, frozen_after), frozen_before)
    assert isinstance(trainable, nnx.State)


@pytest.mark.parametrize("micro", [4, 1, "one empty"])
def test_accumulate_gradients_weights_micro_batches_by_tokens(micro):
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((4, 6, 3)), jnp.float32)  # [micro, tokens, features]
    y = jnp.asarray(rng.standard_normal((4, 6)), jnp.float32)
    # 6, 1, 0 and 4 target tokens: very unequal micro-batches (one empty)
    mask = jnp.asarray([[1] * 6, [1, 0, 0, 0, 0, 0], [0] * 6, [0, 1, 1, 1, 1, 0]], jnp.float32)
    if micro != 4:  # one micro-batch (the path without an accumulator): the first, or the empty one
        x, y, mask = (a[:1] if micro == 1 else a[2:3] for a in (x, y, mask))
    params = {"w": jnp.asarray(rng.standard_normal(3), jnp.float32), "b": jnp.zeros((), jnp.float32)}

    def loss_sum(p, mb):
        err = mb["x"] @ p["w"] + p["b"] - mb["y"]
        return jnp.sum(mb["mask"] * err**2), jnp.sum(mb["mask"])

    grad_fn = jax.value_and_grad(loss_sum, has_aux=True)
    loss, grads, tokens = jax.jit(lambda p, mbs: accumulate_gradients(grad_fn, p, mbs))(
        params, {"x": x, "y": y, "mask": mask}
    )

    def full_batch_mean(p):
        s, n = loss_sum(p, {"x": x.reshape(-1, 3), "y": y.reshape(-1), "mask": mask.reshape(-1)})
        return s / n

    if micro == "one empty":  # no target tokens: zero loss and gradients, not 0/0
        assert float(tokens) == 0 and float(loss) == 0
        jax.tree.map(lambda g: np.testing.assert_array_equal(g, 0), grads)
        return
    want_loss, want = jax.value_and_grad(full_batch_mean)(params)
    assert float(tokens) == (11 if micro == 4 else 6)
    np.testing.assert_allclose(float(loss), float(want_loss), rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), grads, want)


def test_config_rejects_bad_values_up_front():
    with pytest.raises(ValueError, match="lr_scheduler_type"):
        OptimConfig(lr_scheduler_type="polynomial")
    with pytest.raises(ValueError, match="gradient_accumulation_steps"):
        OptimConfig(gradient_accumulation_steps=0)
    with pytest.raises(ValueError, match="warmup_ratio"):
        OptimConfig(warmup_ratio=1.5)
    assert dataclasses.replace(OptimConfig(), max_grad_norm=0).max_grad_norm == 0


@needs_torch
def test_embedding_learning_rate_is_a_second_parameter_group_as_in_torch():
    """`embedding_learning_rate` gives embed_tokens/lm_head their own peak rate: the same update as torch AdamW with two
    parameter groups (lr and weight decay per group), while the LoRA leaves move exactly as without it."""
    rng = np.random.default_rng(0)
    params = {"embed_tokens": {"embedding": rng.normal(size=(6, 4)).astype(np.float32)},
              "layers": {"q_proj": {"lora_a": rng.normal(size=(4, 2)).astype(np.float32)}}}
    grads = [jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32), params) for _ in range(3)]
    cfg = OptimConfig(learning_rate=1e-2, embedding_learning_rate=5e-2, weight_decay=0.1, warmup_ratio=0.0,
                      lr_scheduler_type="constant_with_warmup", max_grad_norm=None)
    tx = build_optimizer(cfg, params, 3)
    state, p = tx.init(params), params
    for g in grads:
        upd, state = tx.update(g, state, p)
        p = optax.apply_updates(p, upd)
    emb = torch.nn.Parameter(torch.tensor(params["embed_tokens"]["embedding"]))
    lora = torch.nn.Parameter(torch.tensor(params["layers"]["q_proj"]["lora_a"]))
    opt = torch.optim.AdamW([{"params": [lora], "lr": 1e-2}, {"params": [emb], "lr": 5e-2}], weight_decay=0.1)
    for g in grads:
        emb.grad = torch.tensor(g["embed_tokens"]["embedding"])
        lora.grad = torch.tensor(g["layers"]["q_proj"]["lora_a"])
        opt.step()
    np.testing.assert_allclose(p["embed_tokens"]["embedding"], emb.detach().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(p["layers"]["q_proj"]["lora_a"], lora.detach().numpy(), rtol=1e-5, atol=1e-6)


@needs_torch
@pytest.mark.parametrize("kind", ["cosine", "linear"])
def test_a_schedule_whose_length_is_set_after_update_0_is_hfs_schedule_of_that_length(kind):
    # a time-budgeted run starts on an upper bound (1000 steps) and learns its length from its first step's time
    from zhjax.train.optim import scale_by_schedule_of_length, set_schedule_length

    cfg = OptimConfig(learning_rate=2e-4, lr_scheduler_type=kind, warmup_ratio=0.05)
    tx = scale_by_schedule_of_length(cfg, 1000)
    state, rates = tx.init(jnp.ones(2)), []
    for k in range(STEPS):
        updates, state = tx.update(jnp.ones(2), state)
        rates.append(-float(updates[0]))
        if k == 0:
            state = set_schedule_length(state, cfg, STEPS)
    np.testing.assert_allclose(rates, hf_lrs(cfg, STEPS), rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="num_training_steps must be >= 1"):
        set_schedule_length(state, cfg, 0)


@needs_torch
@pytest.mark.parametrize("kind", ["cosine", "linear"])
def test_a_length_corrected_after_the_warmup_keeps_the_warmup_and_ends_on_hfs_schedule_of_the_new_length(kind):
    # a time-budgeted run sets 80 steps (warmup 4) after update 0 and corrects them to 25 (HF's warmup: 2)
    # after update 4
    from zhjax.train.optim import scale_by_schedule_of_length, set_schedule_length

    cfg = OptimConfig(learning_rate=2e-4, lr_scheduler_type=kind, warmup_ratio=0.05)
    tx = scale_by_schedule_of_length(cfg, 1000)
    state, rates = tx.init(jnp.ones(2)), []
    for k in range(25):
        updates, state = tx.update(jnp.ones(2), state)
        rates.append(-float(updates[0]))
        if k == 0:
            state = set_schedule_length(state, cfg, 80)
        if k == 4:
            state = set_schedule_length(state, cfg, 25, keep_warmup=True)
    hf = hf_lrs(cfg, 25, num_warmup_steps=4)  # 4 = 80 x 0.05
    np.testing.assert_allclose(rates[5:], hf[5:], rtol=1e-6, atol=0)  # from the correction on, and ...
    np.testing.assert_allclose(rates[:4], hf[:4], rtol=1e-6, atol=0)  # ... the warmup kept its 4 steps
    assert rates[-1] < 0.05 * cfg.learning_rate  # the schedule ends with the run, not 15 steps later
