"""The optimiser as released (SPEC 6): per-iteration warm-up from lr 0 and the no-decay group."""

from __future__ import annotations

import json
import math

import pytest
import torch

from pixelrepa.config import OptimConfig, get_preset
from pixelrepa.training.module import TrainingModule
from pixelrepa.training.optim import learning_rate, make_optimizer, parameter_groups


def released_lr(step: int, spe: int, optim: OptimConfig, total_steps: int) -> float:
    """The released schedule written out: adjust_learning_rate(epoch = i / len + epoch)."""
    epoch, i = divmod(step, spe)
    e = i / spe + epoch
    if e < optim.warmup_epochs:
        return optim.peak_lr * e / optim.warmup_epochs
    if optim.schedule == "constant":
        return optim.peak_lr
    epochs = total_steps / spe
    return optim.min_lr + (optim.peak_lr - optim.min_lr) * 0.5 * (
        1.0 + math.cos(math.pi * (e - optim.warmup_epochs) / (epochs - optim.warmup_epochs)))


def test_first_step_runs_at_lr_zero_and_warmup_is_per_iteration():
    optim = OptimConfig(global_batch=1024, warmup_epochs=5)
    spe = 1251  # ImageNet: 1,281,167 images at batch 1024
    assert learning_rate(0, optim, spe, 600 * spe) == 0.0
    assert learning_rate(1, optim, spe, 600 * spe) == pytest.approx(2e-4 / (5 * spe))
    # Mid-epoch steps rise linearly, not once per epoch.
    assert learning_rate(spe + spe // 2, optim, spe, 600 * spe) == pytest.approx(2e-4 * 1.5 / 5, rel=1e-3)
    assert learning_rate(5 * spe, optim, spe, 600 * spe) == 2e-4
    assert learning_rate(5 * spe - 1, optim, spe, 600 * spe) < 2e-4


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
@pytest.mark.parametrize("warmup", [0.0, 0.5, 5.0])
def test_schedule_equals_released_formula(schedule, warmup):
    optim = OptimConfig(global_batch=256, warmup_epochs=warmup, schedule=schedule, min_lr=1e-6)
    spe, total = 37, 37 * 12
    for step in range(total):
        assert learning_rate(step, optim, spe, total) == released_lr(step, spe, optim, total), step


def test_no_weight_decay_one_group_of_every_trainable_parameter():
    module = TrainingModule(get_preset("PixelREPA-Micro/8"))
    groups = parameter_groups(module, 0.0)
    trainable = [p for p in module.parameters() if p.requires_grad]
    assert len(groups) == 1 and groups[0]["weight_decay"] == 0.0
    assert [id(p) for p in groups[0]["params"]] == [id(p) for p in trainable]


def test_weight_decay_spares_one_dimensional_parameters_and_biases():
    config = get_preset("PixelREPA-Micro/8").replace(**{"optim.weight_decay": 0.05})
    module = TrainingModule(config)
    optimizer = make_optimizer(module, config)
    exempt, decayed = optimizer.param_groups
    assert (exempt["weight_decay"], decayed["weight_decay"]) == (0.0, 0.05)
    names = {id(p): n for n, p in module.named_parameters()}
    exempt_names = {names[id(p)] for p in exempt["params"]}
    decayed_names = {names[id(p)] for p in decayed["params"]}
    assert "net.blocks.0.attn.qkv.bias" in exempt_names and "net.blocks.0.norm1.weight" in exempt_names
    assert "head.head.norm.weight" in exempt_names and "net.blocks.0.attn.q_norm.weight" in exempt_names
    assert "net.blocks.0.attn.qkv.weight" in decayed_names and "net.mask_token" in decayed_names
    assert "net.in_context.pos" in decayed_names and "net.patch_embed.proj1.weight" in decayed_names
    for p in exempt["params"]:
        assert p.ndim == 1 or names[id(p)].endswith(".bias")
    for p in decayed["params"]:
        assert p.ndim > 1 and not names[id(p)].endswith(".bias")
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert exempt_names | decayed_names == trainable and not exempt_names & decayed_names


def test_decay_shrinks_weights_but_not_biases_at_zero_gradient():
    config = get_preset("JiT-Micro/8").replace(**{"optim.weight_decay": 0.5, "optim.lr": 0.1})
    module = TrainingModule(config)
    optimizer = make_optimizer(module, config)
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    for p in module.parameters():
        p.grad = torch.zeros_like(p) if p.requires_grad else None
    optimizer.step()
    after = dict(module.named_parameters())
    weight, bias = "net.blocks.0.attn.qkv.weight", "net.blocks.0.attn.qkv.bias"
    assert torch.allclose(after[weight], before[weight] * (1 - 0.1 * 0.5))
    assert torch.equal(after[bias], before[bias])


def test_trainer_logs_lr_zero_at_the_first_step(tmp_path):
    import numpy as np

    from pixelrepa.data.packed import pack_arrays
    from pixelrepa.training.trainer import train

    rng = np.random.default_rng(0)
    pack = tmp_path / "pack"
    pack_arrays(rng.integers(0, 256, size=(32, 3, 32, 32), dtype=np.uint8), rng.integers(0, 10, size=32),
                pack, [str(c) for c in range(10)], source="random")
    config = get_preset("JiT-Micro/8").replace(**{
        "data.source": str(pack), "data.num_workers": 0, "train.out_dir": str(tmp_path / "run"),
        "train.steps": 3, "train.per_device_batch": 8, "train.log_every": 1, "train.sample_every": None,
        "optim.global_batch": 8, "optim.lr": 1e-3, "optim.warmup_epochs": 1.0})
    train(config, progress=False)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in log] == pytest.approx([0.0, 1e-3 / 4, 2e-3 / 4])


def test_warmup_in_steps():
    optim = OptimConfig(global_batch=256, lr=1e-3, warmup_steps=10, warmup_epochs=0)
    assert [learning_rate(s, optim, 7, 100) for s in (0, 5, 10, 50)] == pytest.approx([0.0, 5e-4, 1e-3, 1e-3])
    cosine = OptimConfig(global_batch=256, lr=1e-3, warmup_steps=10, schedule="cosine")
    assert learning_rate(10, cosine, 7, 110) == pytest.approx(1e-3)
    assert learning_rate(60, cosine, 7, 110) == pytest.approx(5e-4)


@pytest.mark.parametrize("fields,needle", [
    ({"warmup_steps": 10, "warmup_epochs": 2.0}, "both set"),
    ({"warmup_steps": -1}, "negative"),
    ({"warmup_epochs": -0.5}, "negative"),
])
def test_invalid_warmup_refused(fields, needle):
    with pytest.raises(ValueError, match=needle):
        OptimConfig(**fields)
