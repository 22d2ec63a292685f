"""Train a JiT with alignment none, REPA or PixelREPA (CPU, one GPU, torchrun or SLURM).

Re-running the same command resumes from the run folder's newest intact checkpoint (a
damaged one is set aside with a warning); a run folder whose checkpoints are all damaged is
refused unless --restart, which moves them aside and starts at step 0. --init-from
starts a new run (step 0, a run folder without checkpoints) from a released
checkpoint-last.pth: its raw weights, both EMAs, the adapter and, where it provably fits,
the optimizer state; the configuration is still this command's and must fit the weights.
--init-from ... --continue continues the released run instead, as the released --resume does: at
epoch + 1 of the stored epoch (step (epoch + 1) x steps per epoch of this data set and batch), with
the released optimizer state and the learning-rate schedule at that step.
One process trains a run folder at a time (OUT/train.lock). On SIGTERM or SIGUSR1 the run
finishes its step, checkpoints and exits with status 75; --requeue then resubmits the SLURM job.
The first Ctrl-C does the same with status 130 (never requeued); a second one aborts at once."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from pixelrepa.cli.common import add_config_arguments, resolve_config


def add_parser(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--data", help="data.source: a pack folder, an image folder, mnist or fashion-mnist")
    parser.add_argument("--out", help="train.out_dir: the run folder")
    parser.add_argument("--steps", type=int, help="train.steps")
    parser.add_argument("--resume", type=Path, help="a checkpoint folder, or a run folder (its latest checkpoint)")
    parser.add_argument("--restart", action="store_true",
                        help="start the run over at step 0: the run folder's checkpoints/, log.jsonl, tensorboard/ and "
                             "samples/ are moved aside (NAME.aside-TIME), not deleted")
    parser.add_argument("--init-from", type=Path, metavar="CHECKPOINT",
                        help="start a new run from a released checkpoint-last.pth")
    parser.add_argument("--continue", dest="continue_released", action="store_true",
                        help="with --init-from: continue the released run where it stopped (the step after its "
                             "stored epoch, its optimizer state, the learning-rate schedule there)")
    parser.add_argument("--encoder-weights", metavar="PATH",
                        help="align.encoder.weights: a local encoder file, e.g. from `pixelrepa import --encoder-out`")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved configuration and stop")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--requeue", action="store_true",
                        help="on a stop signal (train.stop_signals), after the checkpoint, resubmit this SLURM job "
                             "with `scontrol requeue $SLURM_JOB_ID`")


def run(args: argparse.Namespace) -> int:
    for flag, field in (("data", "data.source"), ("out", "train.out_dir"), ("steps", "train.steps"),
                        ("encoder_weights", "align.encoder.weights")):
        if getattr(args, flag) is not None:
            args.overrides.append(f"{field}={getattr(args, flag)}")
    config = resolve_config(args)
    if args.dry_run:
        print(json.dumps(config.to_dict(), indent=2))
        return 0
    from pixelrepa.evaluation.live import live_validator
    from pixelrepa.training.runlock import Preempted
    from pixelrepa.training.trainer import train

    try:
        summary = train(config, resume=args.resume, progress=not args.no_progress, init_from=args.init_from,
                        validator=live_validator(config), restart=args.restart,
                        continue_released=args.continue_released)
    except Preempted as stopped:
        print(f"pixelrepa train: {stopped}", file=sys.stderr)
        if args.requeue and not stopped.interrupted and int(os.environ.get("RANK", "0")) == 0:
            requeue()
        return stopped.exit_code
    if summary.rank == 0:
        print(f"trained to step {summary.steps}; run folder {summary.out_dir}; "
              f"last checkpoint {summary.last_checkpoint}")
    return 0


def requeue() -> None:
    """Put this SLURM job back in the queue (it then resumes from the checkpoint just written)."""
    job = os.environ.get("SLURM_JOB_ID")
    if job is None or shutil.which("scontrol") is None:
        print("pixelrepa train: --requeue: not a SLURM job (no SLURM_JOB_ID / scontrol); not requeued",
              file=sys.stderr)
        return
    done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    print(f"pixelrepa train: scontrol requeue {job}: "
          + ("done" if done.returncode == 0 else f"failed ({done.stderr.strip()})"), file=sys.stderr)
