"""`pixelrepa train --init-from`: a new run from a released checkpoint (SPEC 6, 8), on the
parity fixtures' released files and a tiny synthetic pack."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import FIXTURES, load_released

from pixelrepa.cli.common import config_from_file
from pixelrepa.cli.main import main
from pixelrepa.data.transforms import to_model_range
from pixelrepa.data.loader import make_loader
from pixelrepa.data.packed import pack_arrays
from pixelrepa.rng import step_generator
from pixelrepa.interop.init_from import released_optimizer_state
from pixelrepa.interop.released import MASK_TOKEN_SEED, convert_state_dict, import_released, released_key_to_ours
from pixelrepa.objective import draw_randomness, training_loss
from pixelrepa import checkpoint as ckpt
from pixelrepa.training import trainer
from pixelrepa.training.data import build_dataset
from pixelrepa.distributed import World

RELEASED = FIXTURES / "released"
PIXELREPA_FILE = RELEASED / "pixelrepa_checkpoint-last.pth"
JIT_FILE = RELEASED / "jit_checkpoint-last.pth"
pytestmark = pytest.mark.skipif(not RELEASED.is_dir(), reason="parity fixtures not present")
RUN = {"data.num_workers": 0, "data.hflip": False, "train.steps": 1, "train.per_device_batch": 4,
       "optim.global_batch": 4, "train.log_every": 1, "train.ckpt_every": 1, "train.sample_every": None,
       "optim.warmup_epochs": 0, "optim.lr": 1e-3,
       "kernels.cpu_linear": "aten"}  # the direct computations below use torch's linear: the same GEMMs on any CPU


class StandInEncoder(torch.nn.Module):
    """Deterministic features of the adapter's width on the token grid (no encoder of the
    fixture's width 48 exists offline): pooled pixels times a fixed random matrix."""

    def __init__(self, width: int):
        super().__init__()
        self.register_buffer("proj", torch.randn(3, width, generator=torch.Generator().manual_seed(0)))

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        return F.adaptive_avg_pool2d(x, grid).flatten(2).transpose(1, 2) @ self.proj  # (N, gh*gw, C)


@pytest.fixture(autouse=True)
def stand_in_encoder(monkeypatch):
    def build(config, kernels, device):
        return None if config.align.mode == "none" else StandInEncoder(config.align.encoder.feature_dim)

    monkeypatch.setattr(trainer, "_build_encoder", build)


@pytest.fixture(scope="module")
def pack(tmp_path_factory) -> Path:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(8, 3, 32, 32), dtype=np.uint8)
    path = tmp_path_factory.mktemp("data") / "pack"
    pack_arrays(images, rng.integers(0, 10, size=8), path, [str(c) for c in range(10)], source="random")
    return path


def train_args(pack: Path, out: Path, source: Path, config_file: Path = FIXTURES / "config.json",
               **overrides) -> list[str]:
    sets = {**RUN, "data.source": str(pack), "train.out_dir": str(out), **overrides}
    return ["train", "--config", str(config_file), "--init-from", str(source), "--no-progress",
            *(item for key, value in sets.items() for item in ("--set", f"{key}={value}"))]


def run_config(pack: Path, out: Path, config_file: Path = FIXTURES / "config.json", **overrides):
    return config_from_file(config_file).replace(**{**RUN, "data.source": str(pack), "train.out_dir": str(out),
                                                    **overrides})


def released_names(model: dict) -> list[str]:
    """Our names of the released optimizer's parameters, in its numbering (fixture README:
    the trainable parameters in named_parameters order, backbone then adapter)."""
    names = [k for k in model if (k.startswith("net.") and k != "net.pos_embed")]
    names += [k for k in model if k.startswith("masked_transformer_adapter.")]
    return [("net." if k.startswith("net.") else "head.") + released_key_to_ours(k.split(".", 1)[1]) for k in names]


def first_step_losses(config, out: Path, source: Path):
    """The first step's losses and gradients computed directly with the imported modules on
    the trainer's first batch and draws."""
    _, net, adapter = import_released(source, config, weights="raw")
    dataset = build_dataset(config, out, World(0, 1, 0, torch.device("cpu")))
    loader = make_loader(dataset, config.train.per_device_batch, num_workers=0, seed=config.train.seed)
    loader.set_epoch(0)
    images, labels = next(iter(loader))
    x = to_model_range(images)
    grid = (config.model.grid_size, config.model.grid_size)
    target = StandInEncoder(config.align.encoder.feature_dim)(x, grid)
    draws = draw_randomness(x, labels, config.model.num_classes, config.model.num_patches, config.objective,
                            config.align, step_generator(config.train.seed, 0, 0, torch.device("cpu")))
    losses = training_loss(net, adapter, x, draws, config.objective, config.align, config.tap_block, target)
    losses["total"].backward()
    grads = {f"net.{k}": p.grad for k, p in net.named_parameters() if p.grad is not None}
    if adapter is not None:
        grads |= {f"head.{k}": p.grad for k, p in adapter.named_parameters() if p.grad is not None}
    return losses, grads


def jit_authors_checkpoint() -> dict:
    """The fixture's JiT file as the JiT authors' code writes it: no mask token, and so one
    parameter fewer in the optimizer (index 1, after in_context_posemb)."""
    released = load_released(JIT_FILE)
    for part in ("model", "model_ema1", "model_ema2"):
        del released[part]["net.mask_token"]
    optimizer = released["optimizer"]
    kept = [state for index, state in sorted(optimizer["state"].items()) if index != 1]
    optimizer["state"] = dict(enumerate(kept))
    optimizer["param_groups"][0]["params"] = list(range(len(kept)))
    return released


def logged(out: Path) -> dict:
    return json.loads((out / "log.jsonl").read_text().splitlines()[0])


def test_pixelrepa_run_starts_from_the_released_state(pack, tmp_path, caplog):
    out = tmp_path / "run"
    with caplog.at_level("WARNING", logger="pixelrepa.train"):
        assert main(train_args(pack, out, PIXELREPA_FILE)) == 0
    assert "released AdamW state (step 1) for 111 parameters" in caplog.text

    config = run_config(pack, out)
    losses, grads = first_step_losses(config, tmp_path / "direct", PIXELREPA_FILE)
    first = logged(out)
    assert first["step"] == 1
    for key, name in (("denoise", "denoise"), ("align", "align"), ("total", "total")):
        assert abs(first[key] - losses[name].item()) <= 1e-5 * abs(losses[name].item()), key

    released = load_released(PIXELREPA_FILE)
    assert ckpt.load_checkpoint(out).train_state["step"] == 1
    saved = ckpt.read_state(out)
    raw = {k[4:]: v for k, v in saved["model"].items() if k.startswith("net.")}
    for k, decay in enumerate(config.ema.decays):
        before = convert_state_dict(released[f"model_ema{k + 1}"])
        for name, value in saved[f"ema{k + 1}"].items():
            torch.testing.assert_close(value, torch.lerp(before[name], raw[name], 1 - decay), rtol=1e-6, atol=1e-8)

    # One AdamW step on the released moments: step 2, exp_avg = beta1 * released + (1 - beta1) * grad.
    beta1 = config.optim.betas[0]
    state = saved["optimizer"]["state"]
    for index, name in enumerate(released_names(released["model"])):
        before = released["optimizer"]["state"][index]
        assert state[name]["step"].item() == before["step"].item() + 1, name
        torch.testing.assert_close(state[name]["exp_avg"], beta1 * before["exp_avg"] + (1 - beta1) * grads[name],
                                   rtol=1e-4, atol=1e-9)
    record = json.loads((out / "init-from.json").read_text())
    assert record["epoch"] == 599 and any("adapter: from the checkpoint" in line for line in record["report"])


def test_jit_run_maps_the_optimizer_by_name_into_two_groups(pack, tmp_path, caplog):
    """A JiT run (alignment none, so the mask token is frozen) with weight decay: our optimizer
    has two groups, the released one one; the state still maps by name, and the mask
    token's released state is dropped."""
    fixture = json.loads((FIXTURES / "config.json").read_text())
    config_file = tmp_path / "jit.json"
    config_file.write_text(json.dumps({"net": fixture["net"]}))
    out = tmp_path / "run"
    with caplog.at_level("WARNING", logger="pixelrepa.train"):
        assert main(train_args(pack, out, JIT_FILE, config_file, **{"optim.weight_decay": 0.05})) == 0
    assert "for 70 parameters, mapped by name" in caplog.text and "('net.mask_token', ...)" in caplog.text
    config = run_config(pack, out, config_file, **{"optim.weight_decay": 0.05})
    losses, _ = first_step_losses(config, tmp_path / "direct", JIT_FILE)
    assert abs(logged(out)["total"] - losses["total"].item()) <= 1e-5 * losses["total"].item()
    state = ckpt.read_state(out)["optimizer"]
    assert [g["weight_decay"] for g in state["param_groups"]] == [0.0, 0.05]
    assert "net.mask_token" not in state["state"] and all(s["step"].item() == 2 for s in state["state"].values())


def test_jit_authors_file_in_a_pixelrepa_run_gets_a_fresh_optimizer(pack, tmp_path, caplog):
    """No mask token and no adapter: the token is drawn as on import, the adapter starts from
    its initialisation, and the optimizer starts fresh, saying why."""
    source = tmp_path / "jit-authors.pth"
    torch.save(jit_authors_checkpoint(), source)
    out = tmp_path / "run"
    with caplog.at_level("WARNING", logger="pixelrepa.train"):
        assert main(train_args(pack, out, source)) == 0
    assert "no mask_token" in caplog.text and "starts from its initialisation" in caplog.text
    assert "fresh AdamW state, the released one has no state for 'net.mask_token'" in caplog.text
    saved = ckpt.read_state(out)
    assert all(s["step"].item() == 1 for s in saved["optimizer"]["state"].values())
    token = torch.randn(1, 1, 64, generator=torch.Generator().manual_seed(MASK_TOKEN_SEED)) * 0.02
    for k, decay in enumerate(run_config(pack, out).ema.decays):  # EMAs start from the same drawn token
        torch.testing.assert_close(saved[f"ema{k + 1}"]["mask_token"],
                                   torch.lerp(token, saved["model"]["net.mask_token"], 1 - decay))


def test_refusals_name_the_problem_and_touch_nothing(pack, tmp_path, capsys, caplog):
    out = tmp_path / "run"
    assert main(train_args(pack, out, PIXELREPA_FILE)) == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert main(train_args(pack, out, JIT_FILE)) == 2
    assert "already has checkpoints" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    # Re-running the command that started the run resumes it (after a crash, a preemption).
    with caplog.at_level("WARNING", logger="pixelrepa.train"):
        assert main(train_args(pack, out, PIXELREPA_FILE)) == 0
    assert "has checkpoints; resuming from" in caplog.text
    assert ckpt.load_checkpoint(out).train_state["step"] == 1

    assert main([*train_args(pack, tmp_path / "new", PIXELREPA_FILE), "--resume", str(out)]) == 2
    assert "pass only one of them" in capsys.readouterr().err
    assert main(train_args(pack, tmp_path / "deeper", PIXELREPA_FILE, **{"model.depth": 3})) == 2
    assert "checkpoint has 'blocks.3." in capsys.readouterr().err
    assert main(train_args(pack, tmp_path / "three", PIXELREPA_FILE, **{"ema.decays": "0.9,0.99,0.999"})) == 2
    assert "holds 2 EMA(s)" in capsys.readouterr().err


def test_optimizer_state_that_does_not_fit_is_not_loaded():
    """Fresh AdamW state, with the reason, when the released numbering cannot be proven."""
    from pixelrepa.interop.released import read_released_checkpoint
    from pixelrepa.training.module import TrainingModule
    from pixelrepa.training.optim import make_optimizer

    released = read_released_checkpoint(PIXELREPA_FILE)
    module = TrainingModule(config_from_file(FIXTURES / "config.json"))
    optimizer = make_optimizer(module, module.config)
    state, line = released_optimizer_state(released, module, optimizer)
    assert state is not None and "for 111 parameters" in line

    groups = released.optimizer["param_groups"]
    released.optimizer["param_groups"] = [{**groups[0], "params": groups[0]["params"][:10]},
                                          {**groups[0], "params": groups[0]["params"][10:]}]
    state, line = released_optimizer_state(released, module, optimizer)
    assert state is None and "its groups hold [10, 101] parameters" in line
    released.optimizer["param_groups"] = groups
    released.optimizer["state"][0] = {**released.optimizer["state"][0], "exp_avg": torch.zeros(3)}
    state, line = released_optimizer_state(released, module, optimizer)
    assert state is None and "'exp_avg' of parameter 0 ('net.in_context_posemb') has shape (3,)" in line
    released.optimizer = None
    assert released_optimizer_state(released, module, optimizer)[0] is None


# -- --continue: the released run continued where it stopped -------------------------------------

def released_lr(args, epoch: float, batch: int) -> float:
    """The released schedule (util/lr_sched.adjust_learning_rate, constant after warm-up) at the fractional
    epoch, with the released absolute lr blr * batch / 256."""
    lr = args.blr * batch / 256
    return lr * epoch / args.warmup_epochs if epoch < args.warmup_epochs else lr


def stopped_at_epoch(tmp_path: Path, epoch: int) -> Path:
    """The fixture's PixelREPA file as a released run stopped after `epoch` would have saved it."""
    released = load_released(PIXELREPA_FILE)
    released["epoch"] = epoch
    path = tmp_path / f"epoch{epoch}-checkpoint-last.pth"
    torch.save(released, path)
    return path


CONTINUE = {"optim.warmup_epochs": 5, "optim.lr": None, "optim.base_lr": 5e-5}
"""The released schedule's settings (the fixture's args): 5 warm-up epochs, lr = blr * batch / 256."""


def test_continue_starts_at_the_next_epoch_with_the_released_schedule(pack, tmp_path, caplog):
    """The fixture's file stopped inside the warm-up (epoch 3 of 5 next), where the learning rate tells
    the epoch the run continues at; `test_continue_loads_the_released_moments` takes the file as it is."""
    epoch = 2
    source = stopped_at_epoch(tmp_path, epoch)
    args = load_released(PIXELREPA_FILE)["args"]
    steps_per_epoch = 2  # 8 images, batch 4
    start = (epoch + 1) * steps_per_epoch
    out = tmp_path / "run"
    with caplog.at_level("WARNING", logger="pixelrepa.train"):
        assert main([*train_args(pack, out, source, **CONTINUE, **{"train.steps": start + 1}), "--continue"]) == 0
    first = logged(out)
    assert first["step"] == start + 1 and first["epoch"] == epoch + 1
    assert first["lr"] == pytest.approx(released_lr(args, epoch + 1, batch=4), rel=1e-12)
    assert json.loads((out / "init-from.json").read_text())["continued_at_step"] == start
    assert f"starts at epoch {epoch + 1}, step {start}" in caplog.text
    state = ckpt.read_state(out)["optimizer"]["state"]
    assert all(s["step"].item() == 2 for s in state.values())  # the released AdamW step count (1), plus this one


def test_continue_loads_the_released_moments(pack, tmp_path):
    from pixelrepa.training.checkpointing import CheckpointManager
    from pixelrepa.training.ema import BackboneEMA
    from pixelrepa.training.module import TrainingModule
    from pixelrepa.training.optim import make_optimizer

    out = tmp_path / "run"
    out.mkdir()
    config = run_config(pack, out, **CONTINUE)
    manager = CheckpointManager(config, World(0, 1, 0, torch.device("cpu")))
    manager.choose_start(None, False, PIXELREPA_FILE, continue_released=True)
    module = TrainingModule(config)
    manager.load_released_weights(module)
    optimizer = make_optimizer(module, config)
    ema = BackboneEMA(module.net, config.ema)
    assert manager.restore(module, optimizer, ema, steps_per_epoch=3, total_steps=10_000) == (1800, 0)
    assert ema.step == 1800
    released = load_released(PIXELREPA_FILE)
    params = dict(module.named_parameters())
    for index, name in enumerate(released_names(released["model"])):
        stored, loaded = released["optimizer"]["state"][index], optimizer.state[params[name]]
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(loaded[key], stored[key]), (name, key)


def test_continue_refusals_name_the_problem(pack, tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*train_args(pack, out, PIXELREPA_FILE, **CONTINUE), "--continue"]) == 2  # train.steps 1
    assert "continues at step 1200" in capsys.readouterr().err and not (out / "checkpoints").exists()
    released = load_released(PIXELREPA_FILE)
    del released["epoch"]
    source = tmp_path / "no-epoch.pth"
    torch.save(released, source)
    assert main([*train_args(pack, tmp_path / "other", source, **CONTINUE), "--continue"]) == 2
    assert "stores no 'epoch'" in capsys.readouterr().err
    sets = [item for key, value in {**RUN, "data.source": str(pack), "train.out_dir": str(tmp_path / "third")}.items()
            for item in ("--set", f"{key}={value}")]
    assert main(["train", "--config", str(FIXTURES / "config.json"), "--continue", "--no-progress", *sets]) == 2
    assert "pass its checkpoint-last.pth with --init-from" in capsys.readouterr().err
