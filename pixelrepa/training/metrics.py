"""What a training run reports: the JSON-lines log, TensorBoard and wandb, and the progress bar.

Losses are kept on the device between logging steps (no host sync per step) and averaged
over the steps since the last log line and over the ranks when one is written.

`train.loggers` picks the sinks besides OUT/log.jsonl: TensorBoard (OUT/tensorboard/, cut back to
the resumed step) and wandb (the `pixelrepa[wandb]` extra). The same scalars go to each, under the
same names (loss/*, train/*, eval/*). wandb also gets the run's resolved configuration as its
config, and the sample grids and OUT/eval.png as images; its run id is kept in OUT/wandb-run-id,
written before the run starts, so a resumed run continues the same wandb run (wandb keeps the
first value logged at a step: the steps a resume repeats keep the values logged before it).
wandb writes under $WANDB_DIR, else the run folder; WANDB_PROJECT, WANDB_ENTITY and WANDB_MODE
(offline: `wandb sync` later) are wandb's own.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import time
from pathlib import Path

import torch
from tqdm import tqdm

from pixelrepa.config import RunConfig
from pixelrepa.distributed import World, reduce_mean
from pixelrepa.extras import optional_import
from pixelrepa.files import read_jsonl
from pixelrepa.files import write_text_atomic

logger = logging.getLogger("pixelrepa.train")

WANDB_RUN_ID = "wandb-run-id"
"""The run folder's file with the wandb run id, which a resumed run continues."""

_EVAL_NAMES = {"fid": "FID", "kid_mean": "KID", "fd_encoder": "FD_encoder"}


def check_loggers(config: RunConfig) -> None:
    """Refuse, before anything is built, a logger whose package is not installed."""
    if "wandb" in config.train.loggers:
        optional_import("wandb", "wandb", "train.loggers=wandb")


class MetricsLogger:
    """Rank 0 writes OUT/log.jsonl (entries past `start_step` are dropped), the `train.loggers`
    sinks and OUT/config.json, and draws the progress bar; every rank averages (a collective in `log`)."""

    def __init__(self, config: RunConfig, world: World, start_step: int, total_steps: int, progress: bool):
        self.world, self.global_batch = world, config.optim.global_batch
        out_dir = Path(config.train.out_dir)
        self.log_path = out_dir / "log.jsonl"
        self.last: dict[str, float] = {}
        """The last logged (rank-averaged) metrics."""
        self._window: list[dict[str, torch.Tensor]] = []
        self._timer = time.perf_counter()
        self._file, self._tensorboard, self._wandb = (_open_log(out_dir, self.log_path, start_step, config)
                                                      if world.is_main else (None, None, None))
        self._bar = tqdm(total=total_steps, initial=start_step, disable=not (progress and world.is_main),
                         unit="step", dynamic_ncols=True)
        self._postfix: dict[str, str] = {}
        self._eval_postfix: dict[str, str] = {}  # the last evaluation's numbers, kept on the progress line

    @property
    def pending(self) -> bool:
        """Whether steps were added since the last log line."""
        return bool(self._window)

    def add(self, losses: dict[str, torch.Tensor]) -> None:
        """An applied step's loss terms (device tensors)."""
        self._window.append(losses)

    def advance(self) -> None:
        """A step is done (applied or skipped)."""
        self._bar.update(1)

    def log(self, step: int, epoch: int, lr: float, skipped_steps: int,
            grad_norm: torch.Tensor | None) -> None:
        """Average the steps since the last line over them and the ranks, and write the line."""
        elapsed = time.perf_counter() - self._timer
        window = self._window
        metrics = reduce_mean({k: torch.stack([w[k] for w in window]).mean() for k in window[0]}, self.world)
        metrics.update(lr=lr, img_per_s=len(window) * self.global_batch / elapsed, skipped_steps=skipped_steps)
        if grad_norm is not None:
            metrics["grad_norm"] = float(grad_norm)  # of the logging step
        device = self.world.device
        if device.type == "cuda":
            metrics["gpu_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        if self._file is not None:
            self._write({"step": step, "epoch": epoch, **metrics},
                        {f"{'loss' if k in ('total', 'denoise', 'align') else 'train'}/{k}": v
                         for k, v in metrics.items()}, step)
        self._postfix = ({k: f"{metrics[k]:.4f}" for k in ("total", "denoise", "align") if k in metrics}
                         | {"img/s": f"{metrics['img_per_s']:.0f}"})
        self._bar.set_postfix(self._postfix | self._eval_postfix)
        self._window, self._timer, self.last = [], time.perf_counter(), metrics

    def log_eval(self, step: int, record: dict[str, float]) -> None:
        """An evaluation (`eval.every`, rank 0): {"step", "eval": {...}} in the log, eval/* scalars,
        one line on the console and its numbers on the progress line."""
        values = {k: v for k, v in record.items() if k != "step"}
        self._write({"step": step, "eval": values}, {f"eval/{k}": v for k, v in values.items()}, step)
        line = _eval_line(record)
        logger.info(line)
        if not self._bar.disable:
            self._bar.write(line)
        self._eval_postfix = {k: f"{record[k]:.4g}" for k in _EVAL_NAMES if k in record}
        self._bar.set_postfix(self._postfix | self._eval_postfix)

    @property
    def logs_images(self) -> bool:
        """Whether `log_image` goes anywhere (wandb is on, on rank 0)."""
        return self._wandb is not None

    def log_image(self, tag: str, image, step: int) -> None:
        """An image (a PIL image or a file) for wandb at `step`; nothing without it."""
        if self._wandb is not None:
            import wandb

            self._wandb.log({tag: wandb.Image(str(image) if isinstance(image, Path) else image)}, step=step)

    def close(self) -> None:
        self._bar.close()
        if self._file is not None:
            self._file.close()
        if self._tensorboard is not None:
            self._tensorboard.close()
        if self._wandb is not None:
            self._wandb.finish()

    def _write(self, entry: dict, scalars: dict[str, float], step: int) -> None:
        self._file.write(json.dumps(entry) + "\n")
        self._file.flush()
        if self._tensorboard is not None:
            for tag, value in scalars.items():
                self._tensorboard.add_scalar(tag, value, step)
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)


def _open_log(out_dir: Path, path: Path, start_step: int, config: RunConfig):
    """(The log opened for appending, a TensorBoard writer or None, a wandb run or None), cut back
    to `start_step`; OUT/config.json written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
    if path.exists():
        kept = [entry for entry in read_jsonl(path) if entry["step"] <= start_step]
        path.write_text("".join(json.dumps(entry) + "\n" for entry in kept))
    file = path.open("a")
    tensorboard = None
    if "tensorboard" in config.train.loggers:
        try:
            from torch.utils.tensorboard import SummaryWriter

            tensorboard = SummaryWriter(str(out_dir / "tensorboard"), purge_step=start_step + 1)
        except ImportError:
            logger.warning("tensorboard is not installed: logging to %s only", path)
    run = _open_wandb(out_dir, config) if "wandb" in config.train.loggers else None
    return file, tensorboard, run


def _open_wandb(out_dir: Path, config: RunConfig):
    """The run's wandb run: the id in OUT/wandb-run-id (a new one written there first), resumed."""
    wandb = optional_import("wandb", "wandb", "train.loggers=wandb")
    id_path = out_dir / WANDB_RUN_ID
    if id_path.is_file():
        run_id = id_path.read_text().strip()
    else:
        run_id = secrets.token_hex(6)  # wandb run ids: letters and digits
        write_text_atomic(id_path, run_id + "\n", durable=True)
    run = wandb.init(id=run_id, resume="allow", name=out_dir.name,
                     dir=os.environ.get("WANDB_DIR", str(out_dir)))
    run.config.update(config.to_dict(), allow_val_change=True)  # a resumed run may change e.g. train.steps
    return run


def _eval_line(record: dict) -> str:
    """One line for the console: the numbers and what the evaluation cost."""
    values = [f"{_EVAL_NAMES[k]} {record[k]:.4g}" + (f" +- {record['kid_std']:.2g}" if k == "kid_mean" else "")
              for k in _EVAL_NAMES if k in record]
    values += [f"{k[len('align_'):]} {v:.3f}" for k, v in record.items()
               if k.startswith("align_") and k != "align_seconds"]
    return (f"eval step {record['step']}: {', '.join(values) or 'no metrics'} ({record['images']} images, "
            f"{record['seconds']:.1f} s)")

