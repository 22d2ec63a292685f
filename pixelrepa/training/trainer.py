"""The training run: data -> encoder targets -> loss -> optimiser -> EMA -> logs and checkpoints.

The same function runs on a CPU (float32), one GPU (bf16 autocast) and under torchrun or
SLURM (DDP, or FSDP2 with `train.parallel=fsdp2`). Everything random in a step is drawn
from generators seeded by (seed, rank, step, micro-step) and the data order is a function
of (seed, epoch), so re-running the same command resumes exactly where the last
checkpoint left off: on CPU the losses after a resume are bit-identical to an
uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
from tqdm import tqdm

from pixelrepa.config import KernelConfig, RunConfig
from pixelrepa.data.transforms import to_model_range
from pixelrepa.data.loader import make_loader
from pixelrepa.images import save_labelled_grid
from pixelrepa.interop.init_from import load_released_weights, released_optimizer_state
from pixelrepa.interop.released import ReleasedCheckpoint, read_released_checkpoint
from pixelrepa.models.jit import JiT
from pixelrepa.models.layers import set_attention_impl
from pixelrepa.objective import draw_randomness
from pixelrepa import checkpoint as ckpt
from pixelrepa.training.data import build_dataset
from pixelrepa.device import autocast_for, kernels_for_run, prepare_encoder
from pixelrepa.training.ema import BackboneEMA
from pixelrepa.rng import MAX_SLOTS, preserved_rng, reseed_global, restore_rng_state, step_generator
from pixelrepa.training.module import TrainingModule
from pixelrepa.training.optim import learning_rate, make_optimizer
from pixelrepa.training.runlock import Preempted, RunFolderBusy, StopSignals, run_folder_lock
from pixelrepa.training.targets import PackWithTargets, with_target_cache
from pixelrepa.distributed import World, broadcast_object, init_distributed, reduce_mean, shutdown_distributed
from pixelrepa.training.parallel import (
    build_training_module,
    fsdp_mixed_precision,
    load_full_optimizer_state_dict,
    load_full_state_dict,
    load_sharded_state,
    no_sync_context,
    sharded_state,
    unwrap,
    wrap_for_training,
)

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

    def plot(self, log_path: Path) -> None:
        """Redraw the evaluation curves from the run's log (rank 0, after each record is logged)."""


ValidatorFactory = Callable[[World], Validator]
"""Builds the validator once the process group is up (it needs this process's rank and device)."""


def train(config: RunConfig, resume: str | Path | None = None, progress: bool = True,
          init_from: str | Path | None = None, restart: bool = False,
          validator: ValidatorFactory | None = None) -> RunSummary:
    """Train `config` (resuming from `resume`, or from the run folder's newest intact checkpoint).

    A damaged newest checkpoint is set aside (`step-N.damaged`, with a warning) for the one
    before it; a run folder whose checkpoints are all damaged is refused, unless `restart`,
    which moves its checkpoints, log and TensorBoard files aside (`NAME.aside-TIME`) and
    starts at step 0. `init_from`: a released checkpoint-last.pth to start a new run from, at
    step 0, in a run folder without checkpoints (SPEC 8; `pixelrepa.interop.init_from`).
    `validator`: what `eval.every` runs (`pixelrepa.evaluation.live.live_validator(config)`)."""
    if config.eval.every and validator is None:
        raise ValueError(f"eval.every={config.eval.every} needs a validator: call "
                         "train(config, validator=pixelrepa.evaluation.live.live_validator(config)) (the command "
                         "line does), or unset eval.every")
    dist = init_distributed()
    try:
        # Sample grids are written by a thread (the device does not wait on the disk); leaving
        # the block waits for the last one.
        with (_run_folder_lock(Path(config.train.out_dir), dist), StopSignals(config.train.stop_signals) as stop,
              ThreadPoolExecutor(1, thread_name_prefix="sample-png") as png_writer):
            summary = _train(config, dist, resume, progress, init_from, restart, validator, stop, png_writer)
    except BaseException:
        shutdown_distributed(barrier=False)
        raise
    shutdown_distributed()
    return summary


@contextmanager
def _run_folder_lock(out_dir: Path, dist: World):
    """Rank 0 holds the run folder's lock; every rank stops if it cannot (runlock.py)."""
    with ExitStack() as stack:
        refused = None
        if dist.is_main:
            try:
                stack.enter_context(run_folder_lock(out_dir))
            except RunFolderBusy as err:
                refused = err
        if dist.world_size > 1:
            message = [str(refused) if refused else None]
            torch.distributed.broadcast_object_list(message, src=0)
            if message[0] is not None and refused is None:
                refused = RunFolderBusy(message[0])
        if refused is not None:
            raise refused
        yield


def _train(config: RunConfig, dist: World, resume: str | Path | None, progress: bool,
           init_from: str | Path | None, restart: bool, validator: ValidatorFactory | None, stop: StopSignals,
           png_writer: ThreadPoolExecutor) -> RunSummary:
    out_dir = Path(config.train.out_dir)
    device = dist.device
    accum = accumulation_steps(config, dist.world_size)

    candidates = _resume_candidates(out_dir, resume, restart, dist)
    resume_path = candidates[0] if candidates else None
    released = _released_start_point(init_from, resume, resume_path, out_dir) if init_from is not None else None
    if resume_path is not None:
        loaded = ckpt.load_checkpoint(resume_path, rank=dist.rank)
        _check_same_run(config, loaded.config, resume_path)

    dataset = build_dataset(config, out_dir, dist)
    if config.align.target_cache is not None and config.align.mode != "none":
        eager = dataclasses.replace(config.kernels, compile="none")  # one pass: not worth compiling
        dataset = with_target_cache(config, dataset, _build_encoder(config, eager, dist), dist, progress)
    loader = make_loader(dataset, config.train.per_device_batch, num_workers=config.data.num_workers,
                         seed=config.train.seed, rank=dist.rank, world_size=dist.world_size)
    steps_per_epoch = len(loader) // accum
    if steps_per_epoch == 0:
        raise ValueError(f"{len(dataset)} images give no full step of {config.optim.global_batch} images")
    total_steps = config.train.steps or config.optim.epochs * steps_per_epoch

    torch.manual_seed(config.train.seed)
    # Under FSDP2 the other ranks build on the meta device; a released start loads into real weights.
    module = build_training_module(config, dist) if released is None else TrainingModule(config)
    start = load_released_weights(released, module) if released is not None else None
    kernels = kernels_for_run(config.kernels, device, total_steps)
    encoder = None if isinstance(dataset, PackWithTargets) else _build_encoder(config, kernels, dist)
    if dist.is_main and device.type == "cpu" and kernels.compile == "model":
        compiled = "the model" if encoder is None else "the model and the target encoder"
        logger.warning("compiling %s for the CPU (%d steps, kernels.compile=%s): about a minute before the first "
                       "step; kernels.compile=none skips it", compiled, total_steps, config.kernels.compile)
    model = wrap_for_training(module, config.train.parallel, dist, config.train.activation_checkpointing, kernels,
                              fsdp_mixed_precision(config, device))
    optimizer = make_optimizer(model, config)
    ema = BackboneEMA(unwrap(model).net, config.ema)
    start_step, skipped_steps = 0, 0
    if resume_path is not None:
        loaded = _resume_first_loadable(candidates, loaded, model, optimizer, ema, config, dist,
                                        explicit=resume is not None)
        resume_path = loaded.path
        start_step = loaded.train_state["step"]
        skipped_steps = loaded.train_state.get("skipped_steps", 0)
    elif start is not None:
        for k, state in enumerate(start.ema):
            ema.load_state_dict(k, state)
        optimizer_state, line = released_optimizer_state(released, unwrap(model), optimizer)
        if optimizer_state is not None:
            load_full_optimizer_state_dict(model, optimizer, optimizer_state if dist.is_main else None)
        if dist.is_main:
            _report_start(out_dir, released, [*start.report, line])

    evaluator = _validator(config, validator, dist)
    eval_net = _sampler_backbone(config, device) if evaluator is not None else None
    writer = _Logger(out_dir, dist, start_step, config) if dist.is_main else None
    if writer is not None and evaluator is not None:
        for note in evaluator.notes:
            logger.warning("eval.every: %s", note)
    bar = tqdm(total=total_steps, initial=start_step, disable=not (progress and dist.is_main), unit="step",
               dynamic_ncols=True)
    last_checkpoint = resume_path
    window: list[dict[str, torch.Tensor]] = []
    last_metrics: dict[str, float] = {}
    timer = time.perf_counter()
    data_iter, data_epoch = None, -1
    step = start_step
    # Skipping a non-finite step exactly needs the answer before the update (a host sync per
    # step); otherwise the first non-finite step is recorded on the device and checked later.
    exact_skips = config.train.max_nonfinite_skips > 0
    first_bad = torch.tensor(-1, device=device)
    grad_norm = None
    pending_grid = None
    postfix: dict[str, str] = {}
    eval_postfix: dict[str, str] = {}  # the last evaluation's numbers, kept on the progress line
    while step < total_steps:
        epoch, position = divmod(step, steps_per_epoch)
        if epoch != data_epoch:
            loader.set_epoch(epoch, start_batch=position * accum)
            data_iter, data_epoch = iter(loader), epoch
        lr = learning_rate(step, config.optim, steps_per_epoch, total_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        try:
            losses = _accumulate(model, encoder, data_iter, config, dist, step, accum)
        except torch.OutOfMemoryError as err:
            raise RuntimeError(
                f"out of memory at step {step} with per_device_batch {config.train.per_device_batch}: lower it "
                f"(accumulation keeps the global batch {config.optim.global_batch}) or set "
                "train.activation_checkpointing=true") from err
        logs_next = (step + 1) % config.train.log_every == 0 or step + 1 == total_steps
        if not exact_skips or _all_finite(losses["total"], dist):
            if config.optim.grad_clip is not None or logs_next:  # a collective under FSDP2: only when needed
                grad_norm = _clip(model, config.optim.grad_clip)
            optimizer.step()
            ema.update(unwrap(model).net)
            window.append(losses)
            if not exact_skips:  # checked at the next logging or checkpoint step, without a host sync here
                first_bad = torch.where((first_bad < 0) & ~torch.isfinite(losses["total"]), step, first_bad)
        else:
            skipped_steps += 1
            values = ", ".join(f"{k}={v.item():.4g}" for k, v in losses.items())
            if skipped_steps > config.train.max_nonfinite_skips:
                raise NonFiniteLossError(
                    f"non-finite loss at step {step} ({values}); the last good checkpoint is "
                    f"{last_checkpoint or 'none (no checkpoint written yet)'}; "
                    f"{skipped_steps - 1} earlier steps were skipped (train.max_nonfinite_skips="
                    f"{config.train.max_nonfinite_skips})")
            logger.warning("skipping step %d: non-finite loss (%s)", step, values)
        optimizer.zero_grad(set_to_none=True)
        step += 1
        bar.update(1)

        signal_name = stop.requested()  # a stop signal: this step is logged and checkpointed, then the run ends
        logs = window and (step % config.train.log_every == 0 or step == total_steps or signal_name)
        saves = step % config.train.ckpt_every == 0 or step == total_steps or signal_name
        if (logs or saves) and not exact_skips:
            _raise_if_nonfinite(first_bad, step, last_checkpoint, dist)
        if logs:
            elapsed = time.perf_counter() - timer
            metrics = reduce_mean({k: torch.stack([w[k] for w in window]).mean() for k in window[0]}, dist)
            metrics.update(lr=lr, img_per_s=len(window) * config.optim.global_batch / elapsed,
                           skipped_steps=skipped_steps)
            if grad_norm is not None:
                metrics["grad_norm"] = float(grad_norm)  # of the logging step
            if device.type == "cuda":
                metrics["gpu_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            if writer is not None:
                writer.log(step, epoch, metrics)
            postfix = ({k: f"{metrics[k]:.4f}" for k in ("total", "denoise", "align") if k in metrics}
                       | {"img/s": f"{metrics['img_per_s']:.0f}"})
            bar.set_postfix(postfix | eval_postfix)
            window, timer, last_metrics = [], time.perf_counter(), metrics
        if saves:
            last_checkpoint = _save(out_dir, step, config, model, optimizer, ema, dist, skipped_steps, steps_per_epoch)
        if config.train.sample_every and (step % config.train.sample_every == 0 or step == total_steps):
            if pending_grid is not None:
                pending_grid.result()  # raises what writing the previous grid raised
            pending_grid = _sample_grid(out_dir / "samples" / f"step-{step:08d}.png", config, ema,
                                        unwrap(model).net, dist, png_writer)
        if evaluator is not None and step % config.eval.every == 0 and not signal_name:
            record = evaluator(_load_ema1(eval_net, ema), step)  # collective: every rank samples its share
            if writer is not None:
                writer.log_eval(step, record)
                evaluator.plot(writer.path)
                line = _eval_line(record)
                logger.info(line)
                if not bar.disable:
                    bar.write(line)
                eval_postfix = {k: f"{record[k]:.4g}" for k in ("fid", "kid_mean", "fd_encoder") if k in record}
                bar.set_postfix(postfix | eval_postfix)
        if signal_name:
            bar.close()
            if writer is not None:
                writer.close()
            logger.warning("%s: stopping after step %d with checkpoint %s", signal_name, step, last_checkpoint)
            raise Preempted(signal_name, step, last_checkpoint)
    bar.close()
    if writer is not None:
        writer.close()
    if pending_grid is not None:
        pending_grid.result()
    return RunSummary(out_dir, step, resume_path, last_checkpoint, last_metrics, dist.rank)


def _accumulate(model, encoder, data_iter, config: RunConfig, dist: World, step: int,
                accum: int) -> dict[str, torch.Tensor]:
    """Forward/backward over `accum` micro-batches; returns the mean of each loss term."""
    totals: dict[str, torch.Tensor] = {}
    grid = (config.model.grid_size, config.model.grid_size)
    for micro in range(accum):
        images, labels, *cached = next(data_iter)
        x = to_model_range(images.to(dist.device, non_blocking=True))
        y = labels.to(dist.device, non_blocking=True)
        if cached:
            target = cached[0].to(dist.device, non_blocking=True)
        else:
            with autocast_for(dist.device):
                target = encoder(x, grid) if encoder is not None else None
        generator = step_generator(config.train.seed, step, micro * dist.world_size + dist.rank, dist.device)
        draws = draw_randomness(x, y, config.model.num_classes, config.model.num_patches, config.objective,
                                config.align, generator)
        with no_sync_context(model, enabled=micro < accum - 1):
            with autocast_for(dist.device):
                losses = model(x, draws, target)
            (losses["total"] / accum).backward()  # outside autocast, as released (SPEC 7b)
        for k, v in losses.items():
            totals[k] = totals.get(k, 0) + v.detach().float() / accum
    return totals


def _raise_if_nonfinite(first_bad: torch.Tensor, step: int, last_checkpoint: Path | None, dist: World) -> None:
    """NonFiniteLossError if any rank saw a non-finite loss since the run (re)started: before a
    log line or a checkpoint is written, so no checkpoint holds weights updated by one."""
    earliest = torch.where(first_bad < 0, torch.iinfo(torch.int64).max, first_bad).to(torch.int64)
    if dist.world_size > 1:
        torch.distributed.all_reduce(earliest, op=torch.distributed.ReduceOp.MIN)
    bad = earliest.item()
    if bad != torch.iinfo(torch.int64).max:
        raise NonFiniteLossError(
            f"non-finite loss at step {bad} (found at step {step}, when logging or checkpointing; steps {bad}-"
            f"{step - 1} are not saved); the last good checkpoint is "
            f"{last_checkpoint or 'none (no checkpoint written yet)'}; train.max_nonfinite_skips=N skips up to "
            "N such steps instead (checking every step)")


def _all_finite(total: torch.Tensor, dist: World) -> bool:
    flag = torch.isfinite(total).float()
    if dist.world_size > 1:
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
    return bool(flag.item())


def _clip(model: torch.nn.Module, max_norm: float | None) -> torch.Tensor:
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm is not None else float("inf"))
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def _build_encoder(config: RunConfig, kernels: KernelConfig, dist: World):
    """The frozen target encoder; under torchrun rank 0 builds it first (a hub download lands
    in the shared cache once) while the other ranks wait, then they load the cached weights."""
    if config.align.mode == "none":
        return None
    from pixelrepa.align.encoders import build_encoder

    if dist.world_size > 1 and not dist.is_main:
        torch.distributed.barrier()
    encoder = prepare_encoder(build_encoder(config.align.encoder).to(dist.device), kernels, dist.device)
    if dist.world_size > 1 and dist.is_main:
        torch.distributed.barrier()
    return encoder


def _resume_candidates(out_dir: Path, resume: str | Path | None, restart: bool, dist: World) -> list[Path]:
    """The checkpoints to resume from, best first; the first has passed `ckpt.check_checkpoint`
    (the others are checked if it fails to load). Rank 0 decides; every rank gets its answer."""
    answer: tuple[list[Path], BaseException | None] = ([], None)
    if dist.is_main:
        try:
            answer = (_choose_checkpoints(out_dir, resume, restart), None)
        except (FileNotFoundError, ValueError) as err:
            answer = ([], err)
    candidates, error = broadcast_object(answer, dist)
    if error is not None:
        raise error
    return candidates


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
    """--restart: the run folder's checkpoints, log, TensorBoard files and sample grids become
    `NAME.aside-TIME`, nothing is deleted."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for name in (ckpt.CHECKPOINTS, "log.jsonl", "tensorboard", "samples"):
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


def _resume_first_loadable(candidates: list[Path], loaded: ckpt.LoadedCheckpoint, model, optimizer,
                           ema: BackboneEMA, config: RunConfig, dist: World,
                           explicit: bool) -> ckpt.LoadedCheckpoint:
    """`_resume` from `loaded` (candidates[0]); where its state fails to load, from the next
    candidate that passes rank 0's checks (not for an explicit --resume)."""
    for k, path in enumerate(candidates):
        if k > 0:
            problem = None
            if dist.is_main:
                try:
                    ckpt.check_checkpoint(path)
                except (FileNotFoundError, ValueError) as err:
                    problem = str(err)
            problem = broadcast_object(problem, dist)
            if problem is not None:
                if dist.is_main:
                    _set_damaged_aside(path, problem, "an earlier checkpoint")
                continue
            loaded = ckpt.load_checkpoint(path, rank=dist.rank)
            _check_same_run(config, loaded.config, path)
        try:
            _resume(loaded, model, optimizer, ema, config, dist)
            return loaded
        except ValueError as err:
            if explicit or k == len(candidates) - 1:
                raise
            if dist.is_main:
                _set_damaged_aside(path, str(err), "an earlier checkpoint")
    raise ValueError(f"no checkpoint among {', '.join(p.name for p in candidates)} loads")


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


def _report_start(out_dir: Path, released: ReleasedCheckpoint, report: list[str]) -> None:
    """Log what a run started from a released checkpoint took, and keep it as OUT/init-from.json."""
    for line in report:
        logger.warning("init-from: %s", line)
    record = {"source": str(released.path), "epoch": released.epoch, "report": report}
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


def _ema_groups(ema: BackboneEMA) -> dict[str, dict[str, torch.Tensor]]:
    """Full (unsharded) EMA parameters; a collective under FSDP2, so every rank calls it."""
    return {f"ema{k + 1}": {n: (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().cpu()
                            for n, t in ema.state_dict(k).items()}
            for k in range(len(ema.shadows))}


def _training_state(model, optimizer, ema: BackboneEMA) -> dict[str, Any]:
    """What a checkpoint's `state/` holds, as this rank has it (sharded under FSDP2)."""
    return {**sharded_state(model, optimizer),
            **{f"ema{k + 1}": ema.state_dict(k) for k in range(len(ema.shadows))}}


def _save(out_dir: Path, step: int, config: RunConfig, model, optimizer, ema: BackboneEMA, dist: World,
          skipped_steps: int, steps_per_epoch: int) -> Path:
    epoch, position = divmod(step, steps_per_epoch)
    train_state = {"step": step, "epoch": epoch, "data_position": {"epoch": epoch, "step_in_epoch": position},
                   "ema_step": ema.step, "skipped_steps": skipped_steps}
    return ckpt.save_checkpoint(out_dir, step, config=config, state=_training_state(model, optimizer, ema),
                                train_state=train_state, keep_last=config.train.keep_last,
                                keep_every=config.train.keep_every)


def _resume(loaded: ckpt.LoadedCheckpoint, model, optimizer, ema: BackboneEMA, config: RunConfig,
            dist: World) -> None:
    """Model, optimizer, EMAs and RNG from a checkpoint saved by any number of processes."""
    if loaded.legacy:  # format 1: rank 0 reads the full state and broadcasts it (sharded under FSDP2)
        groups, optimizer_state = ckpt.read_legacy(loaded.path) if dist.is_main else ({}, None)
        load_full_state_dict(model, _join_groups(groups) if dist.is_main else None)
        load_full_optimizer_state_dict(model, optimizer, optimizer_state)
        for k in range(len(config.ema.decays)):
            ema.load_state_dict(k, broadcast_object(groups.get(f"ema{k + 1}"), dist))
    else:
        state = _training_state(model, optimizer, ema)
        ckpt.load_state(loaded.path, state)  # the EMA shadows are filled in place
        load_sharded_state(model, optimizer, state)
    ema.step = loaded.train_state["ema_step"]
    if loaded.world_size == dist.world_size:
        restore_rng_state(loaded.rng_state)
    else:
        # Step draws depend on (seed, step, slot) only; the global RNG (dropout) is re-seeded.
        reseed_global(config.train.seed, loaded.step, dist.rank)
        if dist.is_main:
            logger.warning("resuming %s, saved by %d processes, on %d: the data order and the noise draws continue "
                           "as saved; the global RNG (dropout) is re-seeded", loaded.path, loaded.world_size,
                           dist.world_size)


def _sample_grid(path: Path, config: RunConfig, ema: BackboneEMA, net: JiT, dist: World,
                 png_writer: ThreadPoolExecutor) -> Future | None:
    """A grid from EMA 1 with fixed noise and labels (rank 0, on a full copy of the backbone);
    the PNG is written by `png_writer`'s thread while training goes on (its future is returned)."""
    from pixelrepa.sampling import sample_classes

    weights = _ema_groups(ema)["ema1"]
    if not dist.is_main:
        return None
    sampler_net = _load_weights(_sampler_backbone(config, dist.device), weights)
    classes = list(range(min(10, config.model.num_classes)))
    images = sample_classes(sampler_net, config, classes, 4, config.train.seed, dist.device)
    return png_writer.submit(save_labelled_grid, images.cpu(), [str(c) for c in classes], path)


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


def _load_ema1(net: JiT, ema: BackboneEMA) -> JiT:
    """`net` holding EMA 1 (a collective under FSDP2: every rank calls it)."""
    return _load_weights(net, _ema_groups(ema)["ema1"])


def _validator(config: RunConfig, factory: ValidatorFactory, dist: World) -> Validator | None:
    """The validator for `eval.every` (None when it is unset), its set-up logged."""
    if not config.eval.every:
        return None
    evaluator = factory(dist)
    if dist.is_main:
        logger.info("eval.every=%d: %s", config.eval.every, json.dumps(evaluator.describe()))
    return evaluator


def _eval_line(record: dict) -> str:
    """One line for the console: the numbers and what the evaluation cost."""
    names = {"fid": "FID", "kid_mean": "KID", "fd_encoder": "FD_encoder"}
    values = [f"{names[k]} {record[k]:.4g}" + (f" +- {record['kid_std']:.2g}" if k == "kid_mean" else "")
              for k in names if k in record]
    values += [f"{k[len('align_'):]} {v:.3f}" for k, v in record.items()
               if k.startswith("align_") and k != "align_seconds"]
    return (f"eval step {record['step']}: {', '.join(values) or 'no metrics'} ({record['images']} images, "
            f"{record['seconds']:.1f} s)")


class _Logger:
    """Rank 0's JSON-lines log and TensorBoard scalars; entries past the resume step are dropped."""

    def __init__(self, out_dir: Path, dist: World, start_step: int, config: RunConfig):
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
        self.path = out_dir / "log.jsonl"
        if self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= start_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        self.file = self.path.open("a")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(str(out_dir / "tensorboard"), purge_step=start_step + 1)
        except ImportError:
            logger.warning("tensorboard is not installed: logging to %s only", self.path)
            self.tensorboard = None

    def log(self, step: int, epoch: int, metrics: dict[str, float]) -> None:
        self.file.write(json.dumps({"step": step, "epoch": epoch, **metrics}) + "\n")
        self.file.flush()
        if self.tensorboard is not None:
            for key, value in metrics.items():
                group = "loss" if key in ("total", "denoise", "align") else "train"
                self.tensorboard.add_scalar(f"{group}/{key}", value, step)

    def log_eval(self, step: int, record: dict[str, float]) -> None:
        """An evaluation (`eval.every`): {"step", "eval": {...}} in the log, eval/* scalars."""
        values = {k: v for k, v in record.items() if k != "step"}
        self.file.write(json.dumps({"step": step, "eval": values}) + "\n")
        self.file.flush()
        if self.tensorboard is not None:
            for key, value in values.items():
                self.tensorboard.add_scalar(f"eval/{key}", value, step)

    def close(self) -> None:
        self.file.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
