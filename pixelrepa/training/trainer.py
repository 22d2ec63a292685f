"""The training run: data -> encoder targets -> loss -> optimiser -> EMA -> logs and checkpoints.

The same function runs on a CPU (float32), one GPU (bf16 autocast) and under torchrun or
SLURM (DDP, or FSDP2 with `train.parallel=fsdp2`). Everything random in a step is drawn
from generators seeded by (seed, rank, step, micro-step) and the data order is a function
of (seed, epoch), so re-running the same command resumes exactly where the last
checkpoint left off: on CPU the losses after a resume are bit-identical to an
uninterrupted run. The loop owns the step; a `CheckpointManager` (checkpointing.py) chooses
the start, restores and saves, a `MetricsLogger` (metrics.py) writes the logs, and the
caller's `Validator` evaluates.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import torch

from pixelrepa.config import KernelConfig, RunConfig
from pixelrepa.data.loader import make_loader
from pixelrepa.data.transforms import to_model_range
from pixelrepa.device import autocast_for, kernels_for_run, prepare_encoder
from pixelrepa.distributed import World, init_distributed, shutdown_distributed
from pixelrepa.images import labelled_grid, save_labelled_grid
from pixelrepa.models.jit import JiT
from pixelrepa.models.layers import set_attention_impl
from pixelrepa.objective import draw_randomness
from pixelrepa.rng import MAX_SLOTS, preserved_rng, step_generator
from pixelrepa.training.checkpointing import CheckpointManager
from pixelrepa.training.data import build_dataset
from pixelrepa.training.ema import BackboneEMA
from pixelrepa.training.metrics import MetricsLogger, check_loggers
from pixelrepa.training.module import TrainingModule
from pixelrepa.training.optim import learning_rate, make_optimizer
from pixelrepa.training.parallel import (
    build_training_module,
    fsdp_mixed_precision,
    no_sync_context,
    unwrap,
    wrap_for_training,
)
from pixelrepa.training.runlock import Preempted, RunFolderBusy, StopSignals, run_folder_lock
from pixelrepa.training.targets import PackWithTargets, with_target_cache

logger = logging.getLogger("pixelrepa.train")


class NonFiniteLossError(RuntimeError):
    """Raised when a step's loss is NaN or infinite and no more skips are allowed."""


@dataclass
class RunSummary:
    out_dir: Path
    steps: int
    resumed_from: Path | None
    last_checkpoint: Path | None
    last_metrics: dict[str, float]
    """The last logged (rank-averaged) metrics."""
    rank: int = 0


def accumulation_steps(config: RunConfig, world_size: int) -> int:
    per_step = config.train.per_device_batch * world_size
    if config.optim.global_batch % per_step:
        raise ValueError(f"global_batch {config.optim.global_batch} is not a multiple of per_device_batch "
                         f"{config.train.per_device_batch} x {world_size} processes")
    accum = config.optim.global_batch // per_step
    if accum * world_size > MAX_SLOTS:
        raise ValueError(f"{accum * world_size} micro-batches per step (global_batch {config.optim.global_batch} / "
                         f"per_device_batch {config.train.per_device_batch}) exceed {MAX_SLOTS}: raise "
                         "train.per_device_batch")
    return accum


class Validator(Protocol):
    """Evaluation during training (`eval.every`), built by the caller for this process
    (`pixelrepa.evaluation.live.LiveEvaluator` is one): the trainer never imports evaluation."""

    notes: list[str]
    """Warnings about the set-up, logged once before training."""

    def describe(self) -> dict: ...

    def __call__(self, net: torch.nn.Module, step: int) -> dict | None:
        """Score `net` (EMA 1, eval mode) on every rank; rank 0 gets the record, the others None."""

    def plot(self, log_path: Path) -> Path | None:
        """Redraw the evaluation curves from the run's log (rank 0, after each record is logged);
        the image written, or None."""


ValidatorFactory = Callable[[World], Validator]
"""Builds the validator once the process group is up (it needs this process's rank and device)."""


def train(config: RunConfig, resume: str | Path | None = None, progress: bool = True,
          init_from: str | Path | None = None, restart: bool = False,
          validator: ValidatorFactory | None = None, continue_released: bool = False) -> RunSummary:
    """Train `config` (resuming from `resume`, or from the run folder's newest intact checkpoint).

    A damaged newest checkpoint is set aside (`step-N.damaged`, with a warning) for the one
    before it; a run folder whose checkpoints are all damaged is refused, unless `restart`,
    which moves its checkpoints, log and TensorBoard files aside (`NAME.aside-TIME`) and
    starts at step 0. `init_from`: a released checkpoint-last.pth to start a new run from, at
    step 0, in a run folder without checkpoints (SPEC 8; `pixelrepa.interop.init_from`); with
    `continue_released`, continuing that run where it stopped: at the step after its stored epoch, with its
    optimizer state and the schedule there (`CheckpointManager.restore`).
    `validator`: what `eval.every` runs (`pixelrepa.evaluation.live.live_validator(config)`)."""
    if config.eval.every and validator is None:
        raise ValueError(f"eval.every={config.eval.every} needs a validator: call "
                         "train(config, validator=pixelrepa.evaluation.live.live_validator(config)) (the command "
                         "line does), or unset eval.every")
    check_loggers(config)
    world = init_distributed()
    try:
        # Sample grids are written by a thread (the device does not wait on the disk); leaving
        # the block waits for the last one.
        with (_run_folder_lock(Path(config.train.out_dir), world), StopSignals(config.train.stop_signals) as stop,
              ThreadPoolExecutor(1, thread_name_prefix="sample-png") as png_writer):
            summary = _train(config, world, resume, progress, init_from, restart, validator, stop, png_writer,
                             continue_released)
    except BaseException:
        shutdown_distributed(barrier=False)
        raise
    shutdown_distributed()
    return summary


@contextmanager
def _run_folder_lock(out_dir: Path, world: World):
    """Rank 0 holds the run folder's lock; every rank stops if it cannot (runlock.py)."""
    with ExitStack() as stack:
        refused = None
        if world.is_main:
            try:
                stack.enter_context(run_folder_lock(out_dir))
            except RunFolderBusy as err:
                refused = err
        if world.world_size > 1:
            message = [str(refused) if refused else None]
            torch.distributed.broadcast_object_list(message, src=0)
            if message[0] is not None and refused is None:
                refused = RunFolderBusy(message[0])
        if refused is not None:
            raise refused
        yield


def _train(config: RunConfig, world: World, resume: str | Path | None, progress: bool,
           init_from: str | Path | None, restart: bool, validator: ValidatorFactory | None, stop: StopSignals,
           png_writer: ThreadPoolExecutor, continue_released: bool = False) -> RunSummary:
    """Choose the start, build, restore, then step until `total_steps` or a stop signal."""
    accum = accumulation_steps(config, world.world_size)
    checkpoints = CheckpointManager(config, world)
    checkpoints.choose_start(resume, restart, init_from, continue_released)

    dataset = _dataset(config, world, progress, stop)
    loader = make_loader(dataset, config.train.per_device_batch, num_workers=config.data.num_workers,
                         seed=config.train.seed, rank=world.rank, world_size=world.world_size)
    steps_per_epoch = len(loader) // accum
    if steps_per_epoch == 0:
        raise ValueError(f"{len(dataset)} images give no full step of {config.optim.global_batch} images")
    total_steps = config.train.steps or config.optim.epochs * steps_per_epoch

    model, encoder = _build_model(config, world, checkpoints, dataset, total_steps)
    optimizer = make_optimizer(model, config)
    ema = BackboneEMA(unwrap(model).net, config.ema)
    step, skipped_steps = checkpoints.restore(model, optimizer, ema, steps_per_epoch, total_steps)

    evaluator = _validator(config, validator, world)
    eval_net = _sampler_backbone(config, world.device) if evaluator is not None else None
    metrics = MetricsLogger(config, world, step, total_steps, progress)
    guard = _NonFiniteGuard(config, world, skipped_steps)
    grids = _SampleGrids(config, world, png_writer, metrics)
    batches = _micro_batches(loader, step, steps_per_epoch, accum)
    grad_norm = None
    while step < total_steps:
        epoch = step // steps_per_epoch
        lr = learning_rate(step, config.optim, steps_per_epoch, total_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        losses = _accumulate(model, encoder, batches, config, world, step, accum)
        if guard.allows(losses):
            if config.optim.grad_clip is not None or _due(step + 1, config.train.log_every, total_steps):
                grad_norm = _clip(model, config.optim.grad_clip)  # a collective under FSDP2: only when needed
            optimizer.step()
            ema.update(unwrap(model).net)
            metrics.add(losses)
            guard.watch(step, losses)
        else:
            guard.skip(step, losses, checkpoints.last)
        optimizer.zero_grad(set_to_none=True)
        step += 1
        metrics.advance()

        signal_name = stop.requested()  # a stop signal: this step is logged and checkpointed, then the run ends
        logs = metrics.pending and (_due(step, config.train.log_every, total_steps) or signal_name)
        saves = _due(step, config.train.ckpt_every, total_steps) or signal_name
        if logs or saves:
            guard.check(step, checkpoints.last)
        if logs:
            metrics.log(step, epoch, lr, guard.skipped, grad_norm)
        if saves:
            checkpoints.save(step, model, optimizer, ema, guard.skipped, steps_per_epoch)
        if _due(step, config.train.sample_every, total_steps):
            grids.draw(step, ema)
        if evaluator is not None and step % config.eval.every == 0 and not signal_name:
            _evaluate(evaluator, eval_net, ema, step, metrics, world)
        if signal_name:
            metrics.close()
            logger.warning("%s: stopping after step %d with checkpoint %s", signal_name, step, checkpoints.last)
            raise Preempted(signal_name, step, checkpoints.last)
    metrics.close()
    grids.wait()
    return RunSummary(Path(config.train.out_dir), step, checkpoints.resumed_from, checkpoints.last, metrics.last,
                      world.rank)


def _due(step: int, every: int | None, total_steps: int) -> bool:
    """Whether something done every `every` steps (and after the last; never where unset) is due at `step`."""
    return bool(every) and (step % every == 0 or step == total_steps)


def _dataset(config: RunConfig, world: World, progress: bool, stop: StopSignals):
    """The training data, with the encoder's targets where `align.target_cache` is set (a stop
    signal ends the targets' build after its chunk at hand)."""
    dataset = build_dataset(config, Path(config.train.out_dir), world)
    if config.align.target_cache is not None and config.align.mode != "none":
        eager = dataclasses.replace(config.kernels, compile="none")  # one pass: not worth compiling
        dataset = with_target_cache(config, dataset, _build_encoder(config, eager, world), world, progress, stop)
    return dataset


def _micro_batches(loader, start_step: int, steps_per_epoch: int, accum: int):
    """The loader's micro-batches from `start_step` on, epoch after epoch (`accum` per step)."""
    epoch, position = divmod(start_step, steps_per_epoch)
    while True:
        loader.set_epoch(epoch, start_batch=position * accum)
        batches = iter(loader)
        for _ in range((steps_per_epoch - position) * accum):
            yield next(batches)
        epoch, position = epoch + 1, 0


def _build_model(config: RunConfig, world: World, checkpoints: CheckpointManager, dataset,
                 total_steps: int) -> tuple[torch.nn.Module, torch.nn.Module | None]:
    """The wrapped model to train (seeded by `train.seed`) and the target encoder (None where the
    data holds the targets or nothing is aligned)."""
    torch.manual_seed(config.train.seed)
    # Under FSDP2 the other ranks build on the meta device; a released start loads into real weights.
    if checkpoints.released is None:
        module = build_training_module(config, world)
    else:
        module = TrainingModule(config)
        checkpoints.load_released_weights(module)
    kernels = kernels_for_run(config.kernels, world.device, total_steps)
    encoder = None if isinstance(dataset, PackWithTargets) else _build_encoder(config, kernels, world)
    if world.is_main and world.device.type == "cpu" and kernels.compile == "model":
        compiled = "the model" if encoder is None else "the model and the target encoder"
        logger.warning("compiling %s for the CPU (%d steps, kernels.compile=%s): about a minute before the first "
                       "step; kernels.compile=none skips it", compiled, total_steps, config.kernels.compile)
    model = wrap_for_training(module, config.train.parallel, world, config.train.activation_checkpointing, kernels,
                              fsdp_mixed_precision(config, world.device))
    return model, encoder


def _accumulate(model, encoder, data_iter, config: RunConfig, world: World, step: int,
                accum: int) -> dict[str, torch.Tensor]:
    """Forward/backward over `accum` micro-batches; returns the mean of each loss term."""
    totals: dict[str, torch.Tensor] = {}
    grid = (config.model.grid_size, config.model.grid_size)
    try:
        for micro in range(accum):
            images, labels, *cached = next(data_iter)
            x = to_model_range(images.to(world.device, non_blocking=True))
            y = labels.to(world.device, non_blocking=True)
            if cached:
                target = cached[0].to(world.device, non_blocking=True)
            else:
                with autocast_for(world.device):
                    target = encoder(x, grid) if encoder is not None else None
            generator = step_generator(config.train.seed, step, micro * world.world_size + world.rank, world.device)
            draws = draw_randomness(x, y, config.model.num_classes, config.model.num_patches, config.objective,
                                    config.align, generator)
            with no_sync_context(model, enabled=micro < accum - 1):
                with autocast_for(world.device):
                    losses = model(x, draws, target)
                (losses["total"] / accum).backward()  # outside autocast, as released (SPEC 7b)
            for k, v in losses.items():
                totals[k] = totals.get(k, 0) + v.detach().float() / accum
    except torch.OutOfMemoryError as err:
        raise RuntimeError(
            f"out of memory at step {step} with per_device_batch {config.train.per_device_batch}: lower it "
            f"(accumulation keeps the global batch {config.optim.global_batch}) or set "
            "train.activation_checkpointing=true") from err
    return totals


class _NonFiniteGuard:
    """Steps with a non-finite loss. With `train.max_nonfinite_skips` > 0 every step is checked
    before its update (a host sync per step) and up to that many are skipped; otherwise the first
    one is recorded on the device and raised before the next log line or checkpoint, so no
    checkpoint holds weights updated by one."""

    def __init__(self, config: RunConfig, world: World, skipped: int):
        self.world, self.max_skips, self.skipped = world, config.train.max_nonfinite_skips, skipped
        self.exact = self.max_skips > 0
        self._first_bad = torch.tensor(-1, device=world.device)

    def allows(self, losses: dict[str, torch.Tensor]) -> bool:
        """Whether the step is applied: without exact skips always, else where every rank's loss is finite."""
        if not self.exact:
            return True
        flag = torch.isfinite(losses["total"]).float()
        if self.world.world_size > 1:
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
        return bool(flag.item())

    def watch(self, step: int, losses: dict[str, torch.Tensor]) -> None:
        """Without exact skips: remember `step` on the device if it is the first non-finite one."""
        if not self.exact:
            self._first_bad = torch.where((self._first_bad < 0) & ~torch.isfinite(losses["total"]), step,
                                          self._first_bad)

    def skip(self, step: int, losses: dict[str, torch.Tensor], last_checkpoint: Path | None) -> None:
        """A step not applied: a warning, or NonFiniteLossError past `train.max_nonfinite_skips`."""
        self.skipped += 1
        values = ", ".join(f"{k}={v.item():.4g}" for k, v in losses.items())
        if self.skipped > self.max_skips:
            raise NonFiniteLossError(
                f"non-finite loss at step {step} ({values}); the last good checkpoint is "
                f"{last_checkpoint or 'none (no checkpoint written yet)'}; "
                f"{self.skipped - 1} earlier steps were skipped (train.max_nonfinite_skips={self.max_skips})")
        logger.warning("skipping step %d: non-finite loss (%s)", step, values)

    def check(self, step: int, last_checkpoint: Path | None) -> None:
        """Without exact skips: NonFiniteLossError if any rank saw a non-finite loss since the run (re)started."""
        if self.exact:
            return
        earliest = torch.where(self._first_bad < 0, torch.iinfo(torch.int64).max, self._first_bad).to(torch.int64)
        if self.world.world_size > 1:
            torch.distributed.all_reduce(earliest, op=torch.distributed.ReduceOp.MIN)
        bad = earliest.item()
        if bad != torch.iinfo(torch.int64).max:
            raise NonFiniteLossError(
                f"non-finite loss at step {bad} (found at step {step}, when logging or checkpointing; steps {bad}-"
                f"{step - 1} are not saved); the last good checkpoint is "
                f"{last_checkpoint or 'none (no checkpoint written yet)'}; train.max_nonfinite_skips=N skips up to "
                "N such steps instead (checking every step)")


def _clip(model: torch.nn.Module, max_norm: float | None) -> torch.Tensor:
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm is not None else float("inf"))
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def _build_encoder(config: RunConfig, kernels: KernelConfig, world: World):
    """The frozen target encoder; under torchrun rank 0 builds it first (a hub download lands
    in the shared cache once) while the other ranks wait, then they load the cached weights."""
    if config.align.mode == "none":
        return None
    from pixelrepa.align.encoders import build_encoder

    if world.world_size > 1 and not world.is_main:
        torch.distributed.barrier()
    encoder = prepare_encoder(build_encoder(config.align.encoder).to(world.device), kernels, world.device)
    if world.world_size > 1 and world.is_main:
        torch.distributed.barrier()
    return encoder


class _SampleGrids:
    """Grids from EMA 1 with fixed noise and labels, OUT/samples/step-N.png (rank 0, on a full
    copy of the backbone); each PNG is written by `png_writer`'s thread while training goes on,
    and the grid goes to the image loggers (`MetricsLogger.log_image`)."""

    def __init__(self, config: RunConfig, world: World, png_writer: ThreadPoolExecutor, metrics: MetricsLogger):
        self.config, self.world, self.png_writer, self.metrics = config, world, png_writer, metrics
        self._pending: Future | None = None

    def draw(self, step: int, ema: BackboneEMA) -> None:
        """The grid of `step` (a collective under FSDP2: every rank calls it)."""
        from pixelrepa.sampling import sample_classes

        self.wait()  # raises what writing the previous grid raised
        weights = _ema_groups(ema)["ema1"]
        if not self.world.is_main:
            return
        config, device = self.config, self.world.device
        net = _load_weights(_sampler_backbone(config, device), weights)
        classes = list(range(min(10, config.model.num_classes)))
        images = sample_classes(net, config, classes, 4, config.train.seed, device)
        path = Path(config.train.out_dir) / "samples" / f"step-{step:08d}.png"
        labels = [str(c) for c in classes]
        self._pending = self.png_writer.submit(save_labelled_grid, images.cpu(), labels, path)
        if self.metrics.logs_images:
            self.metrics.log_image("samples", labelled_grid(images.cpu(), labels), step)

    def wait(self) -> None:
        """Until the last grid is written."""
        if self._pending is not None:
            self._pending.result()


def _ema_groups(ema: BackboneEMA) -> dict[str, dict[str, torch.Tensor]]:
    """Full (unsharded) EMA parameters; a collective under FSDP2, so every rank calls it."""
    return {f"ema{k + 1}": {n: (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().cpu()
                            for n, t in ema.state_dict(k).items()}
            for k in range(len(ema.shadows))}


def _sampler_backbone(config: RunConfig, device: torch.device) -> JiT:
    """A plain (unwrapped, eval-mode) backbone on `device` for sampling; built without drawing from
    the global RNG, whose stream training (dropout) and its checkpoints continue."""
    with preserved_rng(device):
        net = JiT(config.model)
    set_attention_impl(net, config.kernels.attention)
    return net.to(device).eval()


def _load_weights(net: JiT, weights: dict[str, torch.Tensor]) -> JiT:
    """`net` with its parameters replaced by `weights` (full tensors; the fixed buffers stay)."""
    buffers = {k: v for k, v in net.state_dict().items() if k not in weights}
    net.load_state_dict(weights | buffers)
    return net


def _validator(config: RunConfig, factory: ValidatorFactory, world: World) -> Validator | None:
    """The validator for `eval.every` (None when it is unset), its set-up and warnings logged."""
    if not config.eval.every:
        return None
    evaluator = factory(world)
    if world.is_main:
        logger.info("eval.every=%d: %s", config.eval.every, json.dumps(evaluator.describe()))
        for note in evaluator.notes:
            logger.warning("eval.every: %s", note)
    return evaluator


def _evaluate(evaluator: Validator, net: JiT, ema: BackboneEMA, step: int, metrics: MetricsLogger,
              world: World) -> None:
    """Score EMA 1 (a collective: every rank samples its share); rank 0 logs the record and
    redraws the evaluation curves."""
    record = evaluator(_load_weights(net, _ema_groups(ema)["ema1"]), step)
    if world.is_main:
        metrics.log_eval(step, record)
        curves = evaluator.plot(metrics.log_path)
        if curves is not None:
            metrics.log_image("eval/curves", curves, step)
