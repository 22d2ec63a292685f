"""Where a training run starts, restoring it and saving it: the trainer's checkpoint policy.

The file format is `pixelrepa.checkpoint`'s; this module chooses the checkpoint a run
resumes from (the newest intact one, setting damaged ones aside; `--restart` moves the run
aside), starts a new run from a released checkpoint (`--init-from`, SPEC 8) or continues the
released run (`--init-from ... --continue`), restores the model, optimizer, EMAs and RNG, and saves.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from pixelrepa import checkpoint as ckpt
from pixelrepa.config import RunConfig
from pixelrepa.distributed import World, broadcast_object
from pixelrepa.interop.init_from import ReleasedStart, load_released_weights, released_optimizer_state
from pixelrepa.interop.released import ReleasedCheckpoint, read_released_checkpoint
from pixelrepa.rng import reseed_global, restore_rng_state
from pixelrepa.training.ema import BackboneEMA
from pixelrepa.training.metrics import WANDB_RUN_ID
from pixelrepa.training.module import TrainingModule
from pixelrepa.training.parallel import (
    load_full_optimizer_state_dict,
    load_full_state_dict,
    load_sharded_state,
    sharded_state,
    unwrap,
)

logger = logging.getLogger("pixelrepa.train")


class CheckpointManager:
    """The checkpoints of one run, as this process (`world`) sees them: `choose_start` before
    building, `restore` once the model, optimizer and EMA exist, `save` at checkpoint steps.

    `released` is the released checkpoint a new run starts from (None otherwise), `resumed_from`
    the checkpoint the run resumed from, `last` the newest checkpoint it has."""

    def __init__(self, config: RunConfig, world: World):
        self.config, self.world = config, world
        self.out_dir = Path(config.train.out_dir)
        self.released: ReleasedCheckpoint | None = None
        self.resumed_from: Path | None = None
        self.last: Path | None = None
        self._candidates: list[Path] = []
        self._loaded: ckpt.LoadedCheckpoint | None = None
        self._explicit = False
        self._released_start: ReleasedStart | None = None
        self.continue_released = False
        """Whether a released start continues the released run (its epoch, optimizer and schedule)."""

    def choose_start(self, resume: str | Path | None, restart: bool, init_from: str | Path | None,
                     continue_released: bool = False) -> None:
        """Resume from `resume`, or from the run folder's newest intact checkpoint (damaged newer
        ones are set aside), or start over (`restart`), or start from the released `init_from`
        (`continue_released`: continue the released run)."""
        if continue_released and init_from is None:
            raise ValueError("--continue continues a released run: pass its checkpoint-last.pth with --init-from")
        self._candidates = self._resume_candidates(resume, restart)
        self._explicit = resume is not None
        first = self._candidates[0] if self._candidates else None
        if init_from is not None:
            self.released = _released_start_point(init_from, resume, first, self.out_dir)
            self.continue_released = continue_released and self.released is not None
            if self.continue_released and self.released.epoch is None:
                raise ValueError(f"--continue: {init_from} stores no 'epoch', so where the released run stopped is "
                                 "unknown; start a new run from it without --continue")
        if first is not None:
            self._loaded = ckpt.load_checkpoint(first, rank=self.world.rank)
            _check_same_run(self.config, self._loaded.config, first)

    def load_released_weights(self, module: TrainingModule) -> None:
        """The released backbone (and adapter) into `module`, before it is wrapped."""
        self._released_start = load_released_weights(self.released, module)

    def restore(self, model, optimizer, ema: BackboneEMA, steps_per_epoch: int, total_steps: int) -> tuple[int, int]:
        """Load the chosen start into the wrapped model, optimizer and EMA; return the step the run
        continues from and the steps skipped so far (non-finite losses).

        A continued released run starts where the released `--resume` does, at epoch + 1 of the stored
        epoch (the last one it finished): step (epoch + 1) x `steps_per_epoch` of this data set and
        batch, so the learning rate is the schedule's there (no second warm-up)."""
        if self._loaded is not None:
            loaded = self._resume_first_loadable(model, optimizer, ema)
            self.resumed_from = self.last = loaded.path
            return loaded.train_state["step"], loaded.train_state.get("skipped_steps", 0)
        if self._released_start is None:
            return 0, 0
        start = (self.released.epoch + 1) * steps_per_epoch if self.continue_released else 0
        if start >= total_steps:
            raise ValueError(f"--continue: the released run finished epoch {self.released.epoch}, so it continues at "
                             f"step {start} ({steps_per_epoch} steps per epoch of this data set and batch), but this "
                             f"run ends at step {total_steps}: set train.steps above {start} (or optim.epochs above "
                             f"{self.released.epoch + 1})")
        self._finish_released_start(model, optimizer, ema, start, steps_per_epoch)
        ema.step = start
        return start, 0

    def save(self, step: int, model, optimizer, ema: BackboneEMA, skipped_steps: int, steps_per_epoch: int) -> Path:
        """A checkpoint of `step` (every rank writes its part); it becomes `last`."""
        epoch, position = divmod(step, steps_per_epoch)
        train_state = {"step": step, "epoch": epoch, "data_position": {"epoch": epoch, "step_in_epoch": position},
                       "ema_step": ema.step, "skipped_steps": skipped_steps}
        self.last = ckpt.save_checkpoint(self.out_dir, step, config=self.config,
                                         state=_training_state(model, optimizer, ema), train_state=train_state,
                                         keep_last=self.config.train.keep_last,
                                         keep_every=self.config.train.keep_every)
        return self.last

    def _resume_candidates(self, resume: str | Path | None, restart: bool) -> list[Path]:
        """The checkpoints to resume from, best first; the first has passed `ckpt.check_checkpoint`
        (the others are checked if it fails to load). Rank 0 decides; every rank gets its answer."""
        answer: tuple[list[Path], BaseException | None] = ([], None)
        if self.world.is_main:
            try:
                answer = (_choose_checkpoints(self.out_dir, resume, restart), None)
            except (FileNotFoundError, ValueError) as err:
                answer = ([], err)
        candidates, error = broadcast_object(answer, self.world)
        if error is not None:
            raise error
        return candidates

    def _resume_first_loadable(self, model, optimizer, ema: BackboneEMA) -> ckpt.LoadedCheckpoint:
        """`_resume` from the first candidate; where its state fails to load, from the next one that
        passes rank 0's checks (not for an explicit --resume)."""
        loaded = self._loaded
        for k, path in enumerate(self._candidates):
            if k > 0:
                problem = None
                if self.world.is_main:
                    try:
                        ckpt.check_checkpoint(path)
                    except (FileNotFoundError, ValueError) as err:
                        problem = str(err)
                problem = broadcast_object(problem, self.world)
                if problem is not None:
                    if self.world.is_main:
                        _set_damaged_aside(path, problem, "an earlier checkpoint")
                    continue
                loaded = ckpt.load_checkpoint(path, rank=self.world.rank)
                _check_same_run(self.config, loaded.config, path)
            try:
                self._resume(loaded, model, optimizer, ema)
                return loaded
            except ValueError as err:
                if self._explicit or k == len(self._candidates) - 1:
                    raise
                if self.world.is_main:
                    _set_damaged_aside(path, str(err), "an earlier checkpoint")
        raise ValueError(f"no checkpoint among {', '.join(p.name for p in self._candidates)} loads")

    def _resume(self, loaded: ckpt.LoadedCheckpoint, model, optimizer, ema: BackboneEMA) -> None:
        """Model, optimizer, EMAs and RNG from a checkpoint saved by any number of processes."""
        world = self.world
        if loaded.legacy:  # format 1: rank 0 reads the full state and broadcasts it (sharded under FSDP2)
            groups, optimizer_state = ckpt.read_legacy(loaded.path) if world.is_main else ({}, None)
            load_full_state_dict(model, _join_groups(groups) if world.is_main else None)
            load_full_optimizer_state_dict(model, optimizer, optimizer_state)
            for k in range(len(self.config.ema.decays)):
                ema.load_state_dict(k, broadcast_object(groups.get(f"ema{k + 1}"), world))
        else:
            state = _training_state(model, optimizer, ema)
            ckpt.load_state(loaded.path, state)  # the EMA shadows are filled in place
            load_sharded_state(model, optimizer, state)
        ema.step = loaded.train_state["ema_step"]
        if loaded.world_size == world.world_size:
            restore_rng_state(loaded.rng_state)
        else:
            # Step draws depend on (seed, step, slot) only; the global RNG (dropout) is re-seeded.
            reseed_global(self.config.train.seed, loaded.step, world.rank)
            if world.is_main:
                logger.warning("resuming %s, saved by %d processes, on %d: the data order and the noise draws "
                               "continue as saved; the global RNG (dropout) is re-seeded", loaded.path,
                               loaded.world_size, world.world_size)

    def _finish_released_start(self, model, optimizer, ema: BackboneEMA, start: int, steps_per_epoch: int) -> None:
        """The released EMAs and (where it maps onto this run; required to continue it) optimizer
        state; the start is logged and recorded as OUT/init-from.json."""
        optimizer_state, line = released_optimizer_state(self.released, unwrap(model), optimizer)
        if optimizer_state is None and self.continue_released:
            raise ValueError(f"--continue needs the released optimizer state, and it does not fit this run ({line}); "
                             "start a new run from the checkpoint without --continue")
        for k, state in enumerate(self._released_start.ema):
            ema.load_state_dict(k, state)
        if optimizer_state is not None:
            load_full_optimizer_state_dict(model, optimizer, optimizer_state if self.world.is_main else None)
        report = [*self._released_start.report, line]
        if self.continue_released:
            report.append(f"continue: the released run finished epoch {self.released.epoch}; this run starts at "
                          f"epoch {self.released.epoch + 1}, step {start} ({steps_per_epoch} steps per epoch), with the "
                          "learning-rate schedule there (no second warm-up)")
        if self.world.is_main:
            _report_start(self.out_dir, self.released, report, start if self.continue_released else None)


def _choose_checkpoints(out_dir: Path, resume: str | Path | None, restart: bool) -> list[Path]:
    if resume is not None:
        if restart:
            raise ValueError("--restart starts the run over and --resume continues it: pass only one of them")
        return [ckpt.check_checkpoint(resume)]
    if restart:
        _move_run_aside(out_dir)
        return []
    folders = ckpt.resume_order(out_dir / ckpt.CHECKPOINTS)
    damaged: list[tuple[Path, str]] = []
    for k, folder in enumerate(folders):
        try:
            ckpt.check_checkpoint(folder)
        except (FileNotFoundError, ValueError) as err:
            damaged.append((folder, str(err)))
            continue
        for bad, reason in damaged:
            _set_damaged_aside(bad, reason, folder.name)
        return folders[k:]
    if damaged:
        lines = "".join(f"\n  {folder.name}: {reason}" for folder, reason in damaged)
        raise ValueError(f"{out_dir} has checkpoints but none can be resumed from:{lines}\nrerun with --restart to "
                         "start the run over at step 0 (checkpoints/, log.jsonl and tensorboard/ are moved aside, "
                         "not deleted), or choose another out_dir")
    return []


def _move_run_aside(out_dir: Path) -> None:
    """--restart: the run folder's checkpoints, log, TensorBoard files, sample grids and wandb run
    id (the restarted run is a new wandb run) become `NAME.aside-TIME`, nothing is deleted."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for name in (ckpt.CHECKPOINTS, "log.jsonl", "tensorboard", "samples", WANDB_RUN_ID):
        if (out_dir / name).exists():
            aside = out_dir / f"{name}.aside-{stamp}"
            (out_dir / name).rename(aside)
            logger.warning("--restart: moved %s aside to %s", out_dir / name, aside)


def _set_damaged_aside(folder: Path, reason: str, instead: str) -> None:
    """A damaged checkpoint is renamed `step-N.damaged` (kept for inspection, out of the way of
    pruning and of the run's later saves)."""
    aside = folder.with_name(f"{folder.name}.damaged")
    if aside.exists():
        aside = folder.with_name(f"{folder.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
    folder.rename(aside)
    logger.warning("checkpoint %s is damaged (%s): moved to %s; resuming from %s", folder, reason, aside.name,
                   instead)


def _released_start_point(init_from: str | Path, resume: str | Path | None, resume_path: Path | None,
                          out_dir: Path) -> ReleasedCheckpoint | None:
    """The released checkpoint a new run starts from, or None where the run folder already has
    checkpoints of a run started from that same file (re-running the command resumes it); a
    folder with checkpoints of another run is refused, untouched."""
    if resume is not None:
        raise ValueError("--init-from starts a new run and --resume continues one: pass only one of them")
    if resume_path is None:
        return read_released_checkpoint(init_from)
    record = out_dir / "init-from.json"
    started_from = json.loads(record.read_text())["source"] if record.is_file() else None
    if started_from is not None and Path(started_from).resolve() == Path(init_from).resolve():
        logger.warning("init-from: the run started from %s has checkpoints; resuming from %s", init_from,
                       resume_path)
        return None
    raise ValueError(f"the run folder already has checkpoints ({resume_path}) of a run not started from {init_from}; "
                     "--init-from only starts new runs: choose a new out_dir (--out), or re-run without --init-from "
                     "to continue that run")


def _report_start(out_dir: Path, released: ReleasedCheckpoint, report: list[str], continued_at: int | None) -> None:
    """Log what a run started from a released checkpoint took, and keep it as OUT/init-from.json
    (`continued_at`: the step a continued released run started at)."""
    for line in report:
        logger.warning("init-from: %s", line)
    record = {"source": str(released.path), "epoch": released.epoch, "continued_at_step": continued_at,
              "report": report}
    (out_dir / "init-from.json").write_text(json.dumps(record, indent=1))


def _check_same_run(config: RunConfig, saved: RunConfig, path: Path) -> None:
    """Resuming with another model or objective would silently mix two runs (the kernels, how
    many loader workers read the data and whether encoder targets come from a cache may change)."""
    config = config.replace(**{"data.num_workers": saved.data.num_workers,
                               "align.target_cache": saved.align.target_cache,
                               "align.target_cache_dtype": saved.align.target_cache_dtype})
    for part in ("model", "align", "objective", "ema", "optim", "data"):
        if getattr(config, part) != getattr(saved, part):
            raise ValueError(f"the configuration's '{part}' differs from the checkpoint's at {path}; "
                             "resume with the saved configuration or start a new out_dir")


def _join_groups(groups: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {f"{g}.{k}": v for g in ("net", "head") if g in groups for k, v in groups[g].items()}


def _training_state(model, optimizer, ema: BackboneEMA) -> dict[str, Any]:
    """What a checkpoint's `state/` holds, as this rank has it (sharded under FSDP2)."""
    return {**sharded_state(model, optimizer),
            **{f"ema{k + 1}": ema.state_dict(k) for k in range(len(ema.shadows))}}
