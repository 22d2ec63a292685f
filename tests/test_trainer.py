"""The training run end to end on a tiny model: exact resume, kill -9, failure policy."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pixelrepa.config import get_preset
from pixelrepa.data.packed import pack_arrays
from pixelrepa import checkpoint as ckpt
from pixelrepa.training.trainer import NonFiniteLossError, train

from helpers import write_legacy_checkpoint

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pack(tmp_path_factory) -> Path:
    """96 random 32-px images in 10 classes, packed."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(96, 3, 32, 32), dtype=np.uint8)
    labels = rng.integers(0, 10, size=96)
    path = tmp_path_factory.mktemp("data") / "pack"
    pack_arrays(images, labels, path, [str(c) for c in range(10)], source="random")
    return path


def tiny_config(pack: Path, out: Path, mode: str = "pixelrepa", **overrides):
    preset = {"pixelrepa": "PixelREPA-Micro/8", "repa": "REPA-Micro/8", "none": "JiT-Micro/8"}[mode]
    changes = {
        "data.source": str(pack), "data.num_workers": 0, "data.hflip": True,
        "train.out_dir": str(out), "train.steps": 8, "train.per_device_batch": 8, "train.log_every": 1,
        "train.ckpt_every": 4, "train.sample_every": None, "optim.global_batch": 16, "optim.lr": 1e-3,
        "optim.warmup_epochs": 0.5, "ema.warmup": True,
        # Lite0 at 64 px gives a 4 x 4 grid of 112 channels: the Micro/8 token grid.
        "align.encoder.img_size": 64,
    }
    changes.update(overrides)
    return get_preset(preset).replace(**changes)


def losses(out: Path) -> list[tuple[int, float]]:
    lines = (out / "log.jsonl").read_text().splitlines()
    return [(r["step"], r["total"]) for r in map(json.loads, lines)]


@pytest.mark.parametrize("mode", ["pixelrepa", "repa", "none"])
def test_runs_and_writes_everything(pack, tmp_path, mode):
    config = tiny_config(pack, tmp_path / "run", mode, **{"train.sample_every": 8})
    summary = train(config, progress=False)
    assert summary.steps == 8
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 9))
    assert all(np.isfinite(r["total"]) for r in log) and ("align" in log[0]) == (mode != "none")
    loaded = ckpt.load_checkpoint(ckpt.find_checkpoint(tmp_path / "run"))
    state = ckpt.read_state(loaded.path)
    assert loaded.train_state["step"] == 8 and set(state) == {"model", "optimizer", "ema1", "ema2"}
    assert any(k.startswith("net.") for k in state["model"])
    assert any(k.startswith("head.") for k in state["model"]) == (mode != "none")
    assert (tmp_path / "run" / "samples" / "step-00000008.png").is_file()
    assert json.loads((tmp_path / "run" / "classes.json").read_text()) == [str(c) for c in range(10)]


def test_resume_is_bit_identical(pack, tmp_path):
    full = tiny_config(pack, tmp_path / "full")
    train(full, progress=False)
    first = tiny_config(pack, tmp_path / "split", **{"train.steps": 4})
    train(first, progress=False)
    with (tmp_path / "split" / "log.jsonl").open("a") as log:
        log.write('{"step": 5, "denoise": 0.1')  # a writer killed mid-line, past the checkpoint
    second = tiny_config(pack, tmp_path / "split")
    summary = train(second, progress=False)
    assert summary.resumed_from is not None and summary.resumed_from.name == "step-00000004"
    assert losses(tmp_path / "split") == losses(tmp_path / "full")


@pytest.mark.skipif(not os.environ.get("PIXELREPA_COMPILE_TESTS"),
                    reason="compiles three times (about a minute cold); set PIXELREPA_COMPILE_TESTS=1")
def test_a_format_1_checkpoint_resumes_bit_identical(pack, tmp_path):
    """A run checkpointed before DCP (model.safetensors + optimizer.pt) continues exactly."""
    train(tiny_config(pack, tmp_path / "reference"), progress=False)
    train(tiny_config(pack, tmp_path / "new", **{"train.steps": 4}), progress=False)
    old = tmp_path / "old"
    write_legacy_checkpoint(ckpt.find_checkpoint(tmp_path / "new"), old)
    (old / "log.jsonl").write_bytes((tmp_path / "new" / "log.jsonl").read_bytes())
    train(tiny_config(pack, old), progress=False)
    assert losses(old) == losses(tmp_path / "reference")


@pytest.mark.slow
def test_compiled_cpu_run_resumes_bit_identical(pack, tmp_path, caplog):
    """compile='auto' compiles a long CPU run (here: from 0 steps on); resuming recompiles the
    same code, so the losses still match the uninterrupted run exactly."""
    compiled = {"kernels.cpu_compile_min_steps": 0}
    with caplog.at_level("WARNING", logger="pixelrepa.train"):
        train(tiny_config(pack, tmp_path / "full", **compiled), progress=False)
    assert "compiling the model and the target encoder for the CPU" in caplog.text
    train(tiny_config(pack, tmp_path / "split", **compiled, **{"train.steps": 4}), progress=False)
    train(tiny_config(pack, tmp_path / "split", **compiled), progress=False)
    assert losses(tmp_path / "split") == losses(tmp_path / "full")


def test_resume_accepts_another_attention_kernel(pack, tmp_path):
    """How attention is executed is not part of the run's identity (same function)."""
    train(tiny_config(pack, tmp_path / "run", **{"train.steps": 4, "kernels.attention": "sdpa"}), progress=False)
    summary = train(tiny_config(pack, tmp_path / "run", **{"train.steps": 6}), progress=False)
    assert summary.resumed_from is not None and summary.steps == 6


@pytest.mark.slow
def test_sample_grids_are_written_off_the_training_thread(pack, tmp_path, monkeypatch):
    import threading

    from pixelrepa.training import trainer

    writers = []
    real = trainer.save_labelled_grid

    def recording(*args, **kwargs):
        writers.append(threading.current_thread().name)
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer, "save_labelled_grid", recording)
    train(tiny_config(pack, tmp_path / "run", "none", **{"train.steps": 4, "train.sample_every": 2}), progress=False)
    assert len(writers) == 2 and all(name.startswith("sample-png") for name in writers)
    assert sorted(p.name for p in (tmp_path / "run" / "samples").iterdir()) == ["step-00000002.png",
                                                                               "step-00000004.png"]


def test_resume_refuses_a_different_model(pack, tmp_path):
    train(tiny_config(pack, tmp_path / "run", **{"train.steps": 4}), progress=False)
    with pytest.raises(ValueError, match="'align' differs"):
        train(tiny_config(pack, tmp_path / "run", **{"align.mask_ratio": 0.5}), progress=False)


def _train_command(config_path: Path) -> list[str]:
    return [sys.executable, "-m", "pixelrepa.cli.main", "train", "--config", str(config_path), "--no-progress"]


def _write_config(config, path: Path) -> Path:
    path.write_text(json.dumps(config.to_dict()))
    return path


def _child_env() -> dict[str, str]:
    """The child computes with this process's thread count: CPU results are bit-identical only
    for the same build and thread count."""
    return {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), "PYTHONPATH": str(REPO)}


@pytest.mark.slow
def test_kill_9_at_a_random_step_then_resume(pack, tmp_path):
    steps = 12
    reference = tiny_config(pack, tmp_path / "reference", **{"train.steps": steps, "train.ckpt_every": 3})
    train(reference, progress=False)
    killed = tiny_config(pack, tmp_path / "killed", **{"train.steps": steps, "train.ckpt_every": 3})
    config_path = _write_config(killed, tmp_path / "killed.json")
    kill_after = int(np.random.default_rng().integers(4, 10))
    process = subprocess.Popen(_train_command(config_path), env=_child_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    log = tmp_path / "killed" / "log.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and process.poll() is None:
        if log.exists() and len(log.read_text().splitlines()) >= kill_after:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert len(log.read_text().splitlines()) < steps, "the run was killed before it finished"
    resumed = subprocess.run(_train_command(config_path), env=_child_env(), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert losses(tmp_path / "killed") == losses(tmp_path / "reference")


_CRASH_IN_SAVE = """
import os, signal, sys
from torch.distributed.checkpoint import FileSystemWriter
from pixelrepa import checkpoint
from pixelrepa.cli.main import main
moment = sys.argv.pop(1)
saves = []
def crash_on_second_save():
    saves.append(1)
    if len(saves) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
if moment == "shards":  # the second save's shard files are written, DCP's metadata is not
    real_finish = FileSystemWriter.finish
    def finish(self, *args, **kwargs):
        crash_on_second_save()
        return real_finish(self, *args, **kwargs)
    FileSystemWriter.finish = finish
else:  # every file of the second save is written, the folder is not renamed yet
    real_replace = os.replace
    def replace(src, dst):
        if str(src).endswith(".tmp") and "step-" in str(src) and os.path.isdir(src):
            crash_on_second_save()
        return real_replace(src, dst)
    checkpoint.os.replace = replace
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
@pytest.mark.parametrize("moment", ["shards", "rename"])
def test_kill_9_while_writing_a_checkpoint_keeps_the_previous_one(pack, tmp_path, moment):
    reference = tiny_config(pack, tmp_path / "reference")
    train(reference, progress=False)
    config = tiny_config(pack, tmp_path / "run")
    config_path = _write_config(config, tmp_path / "run.json")
    crashed = subprocess.run([sys.executable, "-c", _CRASH_IN_SAVE, moment, "train", "--config", str(config_path),
                              "--no-progress"], env=_child_env(), capture_output=True, text=True)
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr
    assert (tmp_path / "run" / "checkpoints" / ".step-00000008.tmp").is_dir()  # the interrupted save
    survivor = ckpt.find_checkpoint(tmp_path / "run")
    assert survivor.name == "step-00000004"
    assert ckpt.load_checkpoint(survivor).train_state["step"] == 4
    resumed = subprocess.run(_train_command(config_path), env=_child_env(), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert losses(tmp_path / "run") == losses(tmp_path / "reference")


def _poison_step(monkeypatch, bad_steps: set[int]) -> None:
    """Make the loss NaN at the given (0-based) steps."""
    from pixelrepa.training import trainer

    real = trainer._accumulate

    def accumulate(model, encoder, data_iter, config, world, step, accum):
        out = real(model, encoder, data_iter, config, world, step, accum)
        if step in bad_steps:
            out["total"] = out["total"] * float("nan")
        return out

    monkeypatch.setattr(trainer, "_accumulate", accumulate)


def test_non_finite_loss_stops_and_names_the_last_checkpoint(pack, tmp_path, monkeypatch):
    _poison_step(monkeypatch, {5})
    config = tiny_config(pack, tmp_path / "run")
    with pytest.raises(NonFiniteLossError) as info:
        train(config, progress=False)
    message = str(info.value)
    assert "step 5" in message and "step-00000004" in message
    loaded = ckpt.load_checkpoint(ckpt.find_checkpoint(tmp_path / "run"))
    assert loaded.train_state["step"] == 4
    assert all(torch.isfinite(v).all() for v in ckpt.read_state(loaded.path)["model"].values())


def test_non_finite_loss_may_be_skipped(pack, tmp_path, monkeypatch):
    _poison_step(monkeypatch, {2})
    config = tiny_config(pack, tmp_path / "run", **{"train.max_nonfinite_skips": 1})
    summary = train(config, progress=False)
    assert summary.steps == 8
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert log[-1]["skipped_steps"] == 1 and 3 not in [r["step"] for r in log]
    assert all(torch.isfinite(v).all() for v in ckpt.read_state(tmp_path / "run")["model"].values())


def test_batch_split_must_divide(pack, tmp_path):
    config = tiny_config(pack, tmp_path / "run", **{"train.per_device_batch": 5})
    with pytest.raises(ValueError, match="not a multiple"):
        train(config, progress=False)


def test_class_count_mismatch_stops_before_training(pack, tmp_path):
    config = tiny_config(pack, tmp_path / "run", **{"model.num_classes": 7})
    with pytest.raises(ValueError, match=r"10 classes but the model has num_classes=7: train on it with --set model.num_classes=10"):
        train(config, progress=False)
    assert not (tmp_path / "run" / "log.jsonl").exists()


def test_cli_dry_run_prints_config(capsys, pack, tmp_path):
    from pixelrepa.cli.main import main

    config_file = tmp_path / "changes.yaml"
    config_file.write_text("model:\n  depth: 2\ntrain:\n  steps: 3\n")
    assert main(["train", "--preset", "PixelREPA-Micro/8", "--config", str(config_file), "--data", str(pack),
                 "--set", "align.mask_ratio=0.3", "--dry-run"]) == 0
    resolved = json.loads(capsys.readouterr().out)
    assert resolved["model"]["depth"] == 2 and resolved["train"]["steps"] == 3
    assert resolved["align"]["mask_ratio"] == 0.3 and resolved["data"]["source"] == str(pack)


def test_export_then_sample(pack, tmp_path):
    from pixelrepa.cli.main import main
    from pixelrepa.weights import load_model_file

    train(tiny_config(pack, tmp_path / "run", **{"train.steps": 4}), progress=False)
    model = tmp_path / "model.safetensors"
    assert main(["export", str(tmp_path / "run"), str(model), "--ema", "2"]) == 0
    config, groups, metadata = load_model_file(model)
    assert set(groups) == {"net"} and config.align.mode == "pixelrepa"
    assert main(["export", str(tmp_path / "run"), str(model)]) == 2, "no silent overwrite"
    assert main(["sample", str(model), str(tmp_path / "samples"), "--num-images", "4", "--steps", "2",
                 "--format", "npz"]) == 0
    # A run folder directly: its latest checkpoint's EMA 2, the same weights as the export.
    assert main(["sample", str(tmp_path / "run"), str(tmp_path / "from-run"), "--ema", "2", "--num-images", "4",
                 "--steps", "2", "--format", "npz"]) == 0
    with np.load(tmp_path / "samples" / "samples.npz") as a, np.load(tmp_path / "from-run" / "samples.npz") as b:
        assert np.array_equal(a["arr_0"], b["arr_0"])


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("parallel", ["ddp", "fsdp2"])
def test_torchrun_two_processes(pack, tmp_path, parallel):
    """Two gloo processes train, checkpoint and resume; rank 0 alone writes logs."""
    config = tiny_config(pack, tmp_path / "run", **{"train.parallel": parallel, "train.steps": 4,
                                                    "train.ckpt_every": 2, "train.per_device_batch": 4})
    config_path = _write_config(config, tmp_path / "run.json")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "pixelrepa.cli.main", "train", "--config", str(config_path), "--no-progress"]
    result = subprocess.run(command, env=_child_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = ckpt.load_checkpoint(ckpt.find_checkpoint(tmp_path / "run"), rank=1)
    assert loaded.train_state["step"] == 4 and loaded.world_size == 2 and loaded.rng_state is not None
    assert sorted(p.name for p in (loaded.path / "state").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert [step for step, _ in losses(tmp_path / "run")] == [1, 2, 3, 4]
    longer = _write_config(config.replace(**{"train.steps": 6}), tmp_path / "longer.json")
    command[command.index(str(config_path))] = str(longer)
    result = subprocess.run(command, env=_child_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [step for step, _ in losses(tmp_path / "run")] == [1, 2, 3, 4, 5, 6]


def test_no_host_sync_between_logging_steps(pack, tmp_path, monkeypatch):
    """`.item()`, `.tolist()`, `bool()`, `float()` of a tensor from pixelrepa's own code outside the
    CPU-side data pipeline (on a GPU each waits for the device), counted per step: none in a step
    that neither logs nor checkpoints."""
    import sys

    from pixelrepa.training import trainer

    events: list[str] = []
    package, data_pipeline = str(REPO / "pixelrepa"), str(REPO / "pixelrepa" / "data")
    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        real = getattr(torch.Tensor, name)

        def counting(self, *args, _real=real, _name=name, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if caller.startswith(package) and not caller.startswith(data_pipeline):
                events.append(_name)
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counting)
    real_accumulate = trainer._accumulate

    def marking(*args, **kwargs):
        events.append("step")
        return real_accumulate(*args, **kwargs)

    monkeypatch.setattr(trainer, "_accumulate", marking)
    config = tiny_config(pack, tmp_path / "run", **{"train.steps": 8, "train.log_every": 4, "train.ckpt_every": 8})
    train(config, progress=False)
    per_step, count = [], None
    for event in events:
        if event == "step":
            if count is not None:
                per_step.append(count)
            count = 0
        elif count is not None:
            count += 1
    per_step.append(count)
    assert len(per_step) == 8
    assert per_step[:3] == [0, 0, 0] and per_step[4:7] == [0, 0, 0], per_step  # steps 1-3 and 5-7
    assert per_step[3] > 0 and per_step[7] > 0  # the logging steps 4 and 8 do read values
