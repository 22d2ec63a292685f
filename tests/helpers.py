"""Shared test utilities (tests/ is on sys.path under pytest's default import mode)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

FIXTURES = Path(os.environ.get("PIXELREPA_PARITY_FIXTURES",
                               Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "official-small"))
"""The parity fixtures (SPEC 9); `released/` holds checkpoints in the released layout."""


def load_released(path: Path) -> dict:
    """A released checkpoint-last.pth as a plain dict (weights-only, Namespace allowed)."""
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location="cpu", weights_only=True)


def randomize_(module: torch.nn.Module, seed: int = 0, std: float = 0.1) -> torch.nn.Module:
    """Non-zero random weights everywhere (the init zeroes adaLN and output layers)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return module


def write_legacy_checkpoint(source: Path, run_dir: Path) -> Path:
    """Rewrite checkpoint `source` (format 2) as format 1 (model.safetensors + optimizer.pt,
    before DCP) under `run_dir/checkpoints/`, with the same step, state and RNG files."""
    import json
    import shutil

    from pixelrepa import checkpoint as ckpt
    from pixelrepa.weights import save_model_file

    state = ckpt.read_state(source)
    info = json.loads((source / ckpt.STATE).read_text())
    folder = run_dir / ckpt.CHECKPOINTS / source.name
    folder.mkdir(parents=True)
    groups = {g: {k[len(g) + 1:]: v for k, v in state["model"].items() if k.startswith(f"{g}.")} for g in ("net", "head")}
    groups = {g: v for g, v in groups.items() if v} | {k: v for k, v in state.items() if k.startswith("ema")}
    save_model_file(folder / ckpt.LEGACY_MODEL, ckpt.RunConfig.from_dict(info["config"]), groups, {})
    torch.save(state["optimizer"], folder / ckpt.LEGACY_OPTIMIZER)
    for rng in source.glob("rng-rank*.pt"):
        shutil.copy(rng, folder / rng.name)
    (folder / ckpt.STATE).write_text(json.dumps({**info, "format": ckpt.LEGACY_FORMAT}))
    (run_dir / ckpt.CHECKPOINTS / ckpt.LATEST).write_text(f"{source.name}\n")
    return folder


STEP = 12
"""The step of `save_run`'s checkpoint."""


def save_run(out: Path, preset: str, optimizer_steps: int = 0) -> Path:
    """A run folder with one checkpoint (step 12, 3 epochs done) whose raw weights and both EMAs differ;
    with `optimizer_steps`, the run's own AdamW has taken that many steps on random gradients."""
    from pixelrepa import checkpoint as ckpt
    from pixelrepa.config import get_preset
    from pixelrepa.training.ema import BackboneEMA
    from pixelrepa.training.module import TrainingModule
    from pixelrepa.training.parallel import sharded_state

    config = get_preset(preset).replace(**{"data.source": "mnist", "train.out_dir": str(out)})
    module = randomize_(TrainingModule(config), seed=0)
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-3)
    if optimizer_steps:
        from pixelrepa.training.optim import make_optimizer

        optimizer = make_optimizer(module, config)
        generator = torch.Generator().manual_seed(2)
        for _ in range(optimizer_steps):
            for p in module.parameters():
                if p.requires_grad:
                    p.grad = torch.randn(p.shape, generator=generator)
            optimizer.step()
    ema = BackboneEMA(module.net, config.ema)
    randomize_(module, seed=1)
    ema.update(module.net)
    state = {**sharded_state(module, optimizer), **{f"ema{k + 1}": ema.state_dict(k) for k in range(2)}}
    train_state = {"step": STEP, "epoch": 3, "data_position": {"epoch": 3, "step_in_epoch": 0}, "ema_step": 1,
                   "skipped_steps": 0}
    ckpt.save_checkpoint(out, STEP, config=config, state=state, train_state=train_state, keep_last=1, keep_every=None)
    return out
