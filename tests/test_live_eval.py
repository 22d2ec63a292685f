"""Evaluation during training (`eval.every`): the numbers of `pixelrepa eval`, undisturbed RNG streams."""

from __future__ import annotations

import json
import random
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from pixelrepa.cli.main import main
from pixelrepa.config import get_preset
from pixelrepa.data.packed import pack_arrays
from pixelrepa.evaluation.sample_folder import write_pngs
from pixelrepa.evaluation.live import LiveEvaluator, live_validator
from pixelrepa.models.jit import JiT
from pixelrepa.models.layers import set_attention_impl
from pixelrepa import checkpoint as ckpt
from pixelrepa.training.trainer import train

from helpers import randomize_

pytestmark = pytest.mark.slow  # end-to-end: `bash scripts/test-slow.sh`

LITE0 = "encoder:efficientnet-lite0"
TIMING = ("seconds", "sample_seconds", "align_seconds")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(pack of 32 random 32-px images in 10 classes, Inception reference with features, Lite0 reference)."""
    root = tmp_path_factory.mktemp("live")
    rng = np.random.default_rng(0)
    pack = root / "pack"
    pack_arrays(rng.integers(0, 256, (32, 3, 32, 32), dtype=np.uint8), rng.integers(0, 10, 32), pack,
                [str(c) for c in range(10)], source="random")
    inception_ref, encoder_ref = root / "inception.npz", root / "lite0.npz"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["eval", "ref-stats", str(pack), str(inception_ref), "--keep-features", "--device", "cpu"]) == 0
        assert main(["eval", "ref-stats", str(pack), str(encoder_ref), "--features", LITE0, "--device", "cpu"]) == 0
    return pack, inception_ref, encoder_ref


def config_for(setup, out, **overrides):
    pack, inception_ref, encoder_ref = setup
    changes = {
        "data.source": str(pack), "data.num_workers": 0, "train.out_dir": str(out), "train.steps": 8,
        "train.per_device_batch": 8, "train.log_every": 1, "train.ckpt_every": 4, "train.sample_every": None,
        "optim.global_batch": 16, "optim.lr": 1e-3, "optim.warmup_epochs": 0.5, "ema.warmup": True,
        "sampler.steps": 2, "eval.every": 4, "eval.images": 8, "eval.batch": 4,
        "eval.ref": str(inception_ref), "eval.encoder_ref": str(encoder_ref), "kernels.compile": "none",
    }
    changes.update(overrides)
    return get_preset("JiT-Micro/8").replace(**changes)


def train_live(config):
    """`train` with the live evaluator handed in, as the command line does."""
    return train(config, progress=False, validator=live_validator(config))


def records(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def losses(out):
    return [(r["step"], r["total"]) for r in records(out) if "eval" not in r]


def evals(out):
    return [(r["step"], {k: v for k, v in r["eval"].items() if k not in TIMING}) for r in records(out) if "eval" in r]


@pytest.fixture(scope="module")
def run_with_eval(setup, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "full"
    train_live(config_for(setup, out))
    return out


def test_live_numbers_equal_pixelrepa_eval_on_the_same_images(setup, run_with_eval, tmp_path, capsys):
    _, inception_ref, encoder_ref = setup
    live = dict(evals(run_with_eval))[8]
    # EMA 1 of the step-8 checkpoint, sampled as the evaluator does, written to a folder, scored offline
    config, state, step = ckpt.backbone_with_ema(ckpt.find_checkpoint(run_with_eval), 1)
    assert step == 8
    net = JiT(config.model).eval()
    set_attention_impl(net, config.kernels.attention)  # as the trainer's sampling copy
    net.load_state_dict(state | {k: v for k, v in net.state_dict().items() if k not in state})
    evaluator = LiveEvaluator(config, device="cpu")
    folder = tmp_path / "samples"
    for indices, images in evaluator.images(net):
        (folder / "images").mkdir(parents=True, exist_ok=True)
        write_pngs(folder, indices, images)
    assert len(list((folder / "images").glob("*.png"))) == 8
    capsys.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["eval", str(folder), "--ref", str(inception_ref), "--metrics", "fid", "kid", "--batch-size",
                     "4", "--device", "cpu", "--out", str(tmp_path / "inception.json")]) == 0
        assert main(["eval", str(folder), "--ref", str(encoder_ref), "--features", LITE0, "--batch-size", "4",
                     "--device", "cpu", "--out", str(tmp_path / "encoder.json")]) == 0
    offline = json.loads((tmp_path / "inception.json").read_text())["metrics"]
    encoder = json.loads((tmp_path / "encoder.json").read_text())["metrics"]
    assert live["fid"] == pytest.approx(offline["fid"], rel=1e-6, abs=1e-6)
    assert live["kid_mean"] == pytest.approx(offline["kid"]["mean"], rel=1e-6, abs=1e-9)
    assert live["kid_std"] == pytest.approx(offline["kid"]["std"], rel=1e-6, abs=1e-9)
    assert live["fd_encoder"] == pytest.approx(encoder["fid"], rel=1e-6, abs=1e-6)
    # and the evaluator called directly on those weights gives the logged record
    direct = evaluator(net, 8)
    assert {k: v for k, v in direct.items() if k not in TIMING and k != "step"} == live


def test_the_log_holds_the_evaluations_at_their_steps(run_with_eval):
    log = records(run_with_eval)
    assert [r["step"] for r in log if "eval" in r] == [4, 8]
    for step in (4, 8):  # after that step's training record
        at = [k for k, r in enumerate(log) if r["step"] == step]
        assert "total" in log[at[0]] and "eval" in log[at[1]]
    record = log[[k for k, r in enumerate(log) if "eval" in r][0]]["eval"]
    assert set(record) >= {"fid", "kid_mean", "kid_std", "fd_encoder", "seconds", "images"}
    assert record["images"] == 8 and record["seconds"] > 0
    assert all(np.isfinite(record[k]) for k in ("fid", "kid_mean", "kid_std", "fd_encoder"))


def test_the_run_folder_plots_the_evaluations(run_with_eval, tmp_path):
    from pixelrepa.evaluation.live import CURVE_NAME, eval_curves, plot_eval_curves

    curves = eval_curves(run_with_eval / "log.jsonl")
    assert set(curves) == {"fid", "kid_mean", "kid_std", "fd_encoder"}  # no timings, no image count
    assert curves["fid"] == [(float(step), values["fid"]) for step, values in evals(run_with_eval)]
    with Image.open(run_with_eval / CURVE_NAME) as image:  # written by the trainer after each evaluation
        assert image.size[0] > 2 * image.size[1] and len(image.convert("RGB").getcolors(1 << 16)) > 4
    plain = tmp_path / "log.jsonl"
    plain.write_text("".join(json.dumps(r) + "\n" for r in records(run_with_eval) if "eval" not in r))
    assert eval_curves(plain) == {} and not plot_eval_curves(plain, tmp_path / "none.png")
    assert not (tmp_path / "none.png").exists()


def test_resume_with_eval_is_bit_identical_and_eval_leaves_the_losses_alone(setup, run_with_eval, tmp_path):
    train_live(config_for(setup, tmp_path / "split", **{"train.steps": 4}))
    summary = train_live(config_for(setup, tmp_path / "split"))
    assert summary.resumed_from is not None and summary.resumed_from.name == "step-00000004"
    assert losses(tmp_path / "split") == losses(run_with_eval)
    assert evals(tmp_path / "split") == evals(run_with_eval)
    train_live(config_for(setup, tmp_path / "off", **{"eval.every": None}))
    assert losses(tmp_path / "off") == losses(run_with_eval)
    assert evals(tmp_path / "off") == []
    # the RNG saved with the checkpoints is the same with evaluation on and off
    for step in (4, 8):
        with_eval = ckpt.load_checkpoint(run_with_eval / "checkpoints" / f"step-{step:08d}").rng_state
        without = ckpt.load_checkpoint(tmp_path / "off" / "checkpoints" / f"step-{step:08d}").rng_state
        assert torch.equal(with_eval["torch"], without["torch"])


def test_the_evaluator_draws_nothing_from_the_global_rngs(setup, tmp_path):
    config = config_for(setup, tmp_path / "run", **{"eval.align": True, "eval.align_images": 12})
    torch.manual_seed(123)
    np.random.seed(5)
    random.seed(7)
    before = torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()
    evaluator = LiveEvaluator(config, device="cpu")
    record = evaluator(randomize_(JiT(config.model)), 3)
    # JiT(...) above draws; compare against the same draws without the evaluator
    after = torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()
    torch.manual_seed(123)
    np.random.seed(5)
    random.seed(7)
    randomize_(JiT(config.model))
    assert torch.equal(after[0], torch.get_rng_state())
    assert np.array_equal(after[1], np.random.get_state()[1]) and after[2] == random.getstate()
    assert not torch.equal(before[0], after[0])  # the backbone itself did draw
    assert record["step"] == 3 and {"fid", "kid_mean", "fd_encoder"} <= set(record)
    tap = [k for k in record if k.startswith("align_cknna_t")]
    assert len(tap) == 4 and all(np.isfinite(record[k]) for k in tap)


def test_eval_every_without_a_validator_is_refused_before_training(setup, tmp_path):
    out = tmp_path / "no-validator"
    with pytest.raises(ValueError, match="needs a validator"):
        train(config_for(setup, out), progress=False)
    assert not (out / "checkpoints").exists()


def test_bad_evaluation_settings_are_refused_before_training(setup, tmp_path):
    _, inception_ref, encoder_ref = setup
    with pytest.raises(ValueError, match=r"^eval\.every needs something to score against"):
        config_for(setup, tmp_path / "a", **{"eval.ref": None, "eval.encoder_ref": None})
    with pytest.raises(ValueError, match=r"^eval\.images must be >= 2"):
        config_for(setup, tmp_path / "a", **{"eval.images": 1})
    with pytest.raises(ValueError, match=r"^eval\.every must be >= 1"):
        config_for(setup, tmp_path / "a", **{"eval.every": 0})
    with pytest.raises(ValueError, match=r"^eval\.ref: no reference statistics file at .*missing.npz"):
        train_live(config_for(setup, tmp_path / "b", **{"eval.ref": str(tmp_path / "missing.npz")}))
    assert not (tmp_path / "b" / "checkpoints").exists()
    with pytest.raises(ValueError, match=rf"^eval\.ref: .*made with feature network '{LITE0}'"):
        train_live(config_for(setup, tmp_path / "c", **{"eval.ref": str(encoder_ref)}))
    with pytest.raises(ValueError, match=r"^eval\.encoder_ref: .*'inception', not an encoder"):
        train_live(config_for(setup, tmp_path / "d", **{"eval.encoder_ref": str(inception_ref)}))
    with pytest.raises(ValueError, match=r"^eval\.align probes on training images from a pack folder"):
        LiveEvaluator(config_for(setup, tmp_path / "e", **{"eval.align": True, "data.source": str(tmp_path)}))
