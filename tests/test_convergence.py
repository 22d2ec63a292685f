"""The three-way convergence benchmark: identical arms, end to end, resume, reading of the results."""

from __future__ import annotations

import csv
import json

import pytest
import torch

import pixelrepa.training.loop as loop
from pixelrepa.cli.main import main
from pixelrepa.evaluation import convergence
from pixelrepa.evaluation.convergence import ARMS, ConvergenceConfig, arm_config, build_arm, reading
from pixelrepa.training.loop import LoopSettings, train

LITE0 = "encoder:efficientnet-lite0"


def test_arm_configs_differ_only_in_alignment():
    settings = ConvergenceConfig()
    configs = {arm: arm_config(settings, arm).to_dict() for arm in ARMS}
    for arm in ARMS:
        assert configs[arm]["align"]["mode"] == arm
        others = {k: v for k, v in configs[arm].items() if k != "align"}
        assert others == {k: v for k, v in configs["none"].items() if k != "align"}
    assert configs["pixelrepa"]["align"]["mask_ratio"] == 0.2 and configs["pixelrepa"]["align"]["weight"] == 0.1
    assert configs["repa"]["align"]["weight"] == 0.5
    assert configs["repa"]["align"]["encoder"] == configs["pixelrepa"]["align"]["encoder"]


def test_arms_start_equal_and_see_the_same_batches_and_draws(monkeypatch):
    settings = ConvergenceConfig(backbone="Micro/8", batch_size=8, lr=1e-3)
    seen: dict[str, list] = {arm: [] for arm in ARMS}
    current = {}
    real_draw = loop.draw_randomness

    def spy(x, y, *args, **kwargs):
        draws = real_draw(x, y, *args, **kwargs)
        seen[current["arm"]].append((x.clone(), y.clone(), draws.t.clone(), draws.noise.clone(),
                                     draws.labels.clone()))
        return draws

    monkeypatch.setattr(loop, "draw_randomness", spy)
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 10, (40,), generator=generator)
    targets = torch.randn(40, 16, 112, generator=generator)
    initial = {}
    for arm in ARMS:
        current["arm"] = arm
        config, state = build_arm(settings, arm, train_seed=3, device=torch.device("cpu"))
        initial[arm] = {k: v.clone() for k, v in state.net.state_dict().items()}
        train(config, state, images, labels, None if arm == "none" else targets,
              LoopSettings(steps=7, batch_size=8, lr=1e-3, seed=3, progress=False))
    for arm in ARMS[1:]:
        assert initial[arm].keys() == initial["none"].keys()
        assert all(torch.equal(initial[arm][k], initial["none"][k]) for k in initial["none"])
        assert len(seen[arm]) == len(seen["none"]) == 7  # crosses an epoch boundary (5 batches per epoch)
        for mine, plain in zip(seen[arm], seen["none"]):
            assert all(torch.equal(a, b) for a, b in zip(mine, plain))
    # A different training seed gives a different backbone and order: the equality above is not vacuous.
    _, other = build_arm(settings, "none", train_seed=4, device=torch.device("cpu"))
    assert any(not torch.equal(v, initial["none"][k]) for k, v in other.net.state_dict().items())


def test_benchmark_runs_end_to_end_and_resumes(tmp_path, capsys):
    out, cache = tmp_path / "out", tmp_path / "cache"
    args = ["bench", "convergence", "--dataset", "mnist", "--backbone", "Micro/8", "--out", str(out),
            "--cache", str(cache), "--features", LITE0, "--train-images", "64", "--steps", "4", "--eval-steps", "2",
            "4", "--eval-samples", "12", "--final-samples", "10", "--reference-images", "30", "--sampler-steps",
            "2", "--batch-size", "16", "--sample-batch", "20", "--feature-batch", "16", "--no-progress"]
    assert main(args) == 0
    rows = list(csv.DictReader((out / "convergence.csv").open()))
    # per arm: step 2 (seed 0), step 4 (seeds 0, 1 and pooled)
    assert len(rows) == 3 * 4
    assert {r["arm"] for r in rows} == set(ARMS)
    pooled = [r for r in rows if r["sample_seed"] == "pooled"]
    assert len(pooled) == 3 and all(int(r["num_images"]) == 20 and r["step"] == "4" for r in pooled)
    assert all(float(r["fid"]) > 0 for r in rows)
    record = json.loads((out / "convergence.json").read_text())
    assert record["settings"]["features"] == LITE0 and record["arms"]["repa"]["align"]["weight"] == 0.5
    assert record["reading"] and "reaches plain JiT's final KID" in " ".join(record["reading"])
    assert (out / "convergence.png").stat().st_size > 1000
    assert "| train seed | step |" in (out / "convergence.md").read_text()

    before = (out / "results.jsonl").read_text()
    capsys.readouterr()
    assert main(args) == 0  # everything finished: nothing is trained or sampled again
    assert "arm " not in capsys.readouterr().out
    assert (out / "results.jsonl").read_text() == before

    # Cut the file as if the run stopped during pixelrepa's last evaluation, mid-line: only that
    # arm is trained again, and no row is duplicated.
    lines = before.splitlines()
    kept = [x for x in lines if not (json.loads(x)["arm"] == "pixelrepa" and json.loads(x)["step"] == 4)]
    (out / "results.jsonl").write_text("\n".join(kept) + '\n{"train_seed": 0, "ar')
    assert main(args) == 0
    assert "arm           pixelrepa" in capsys.readouterr().out
    again = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert sorted((r["arm"], r["step"], str(r["sample_seed"])) for r in again) == \
        sorted((json.loads(x)["arm"], json.loads(x)["step"], str(json.loads(x)["sample_seed"])) for x in lines)
    before = (out / "results.jsonl").read_text()

    (out / "convergence.md").unlink()
    assert main(["bench", "convergence", "--report", "--out", str(out)]) == 0  # tables from results alone
    assert "| train seed | step |" in (out / "convergence.md").read_text()

    changed = list(args)
    changed[changed.index("--reference-images") + 1] = "31"
    assert main(changed) == 2
    assert "reference_images" in capsys.readouterr().err
    assert (out / "results.jsonl").read_text() == before


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="must be steps"):
        ConvergenceConfig(steps=100, eval_steps=(50, 90))
    with pytest.raises(ValueError, match="increasing"):
        ConvergenceConfig(steps=100, eval_steps=(60, 50, 100))
    with pytest.raises(KeyError, match="unknown preset"):
        ConvergenceConfig(backbone="Huge/99")


def _row(arm, step, kid, seed=None, std=0.1e-3):
    """A result row; at the last step (3) the pooled set unless a sampling seed is given."""
    sample_seed = seed if seed is not None else ("pooled" if step == 3 else 0)
    return {"train_seed": 0, "arm": arm, "step": step, "sample_seed": sample_seed,
            "kid_mean": kid, "kid_std": std, "fid": kid * 1e4, "num_images": 10}


def test_reading_names_the_lowest_arm_the_steps_to_reach_plain_jit_and_repa_degradation():
    settings = ConvergenceConfig(steps=3, eval_steps=(1, 2, 3))
    rows = [_row("none", 1, 9e-3), _row("repa", 1, 5e-3), _row("pixelrepa", 1, 6e-3),
            _row("none", 2, 6e-3), _row("repa", 2, 3e-3), _row("pixelrepa", 2, 2e-3),
            _row("none", 3, 4e-3), _row("repa", 3, 4.5e-3), _row("pixelrepa", 3, 1e-3)]
    text = "\n".join(reading(rows, settings))
    assert "step 1: lowest KID repa" in text and "step 2: lowest KID pixelrepa" in text
    assert "repa reaches plain JiT's final KID (4.000e-3) at step 2" in text
    assert "pixelrepa reaches plain JiT's final KID (4.000e-3) at step 2" in text
    assert "REPA's KID rises after its best point (best 3.000e-3 at step 2" in text
    steady = [r if r["arm"] != "repa" or r["step"] != 3 else _row("repa", 3, 3.05e-3) for r in rows]
    assert "does not rise" in "\n".join(reading(steady, settings))
    unfinished = "\n".join(reading([r if r["arm"] != "pixelrepa" else {**r, "kid_mean": 9.5e-3} for r in rows
                                     if r["arm"] != "repa" and (r["arm"], r["step"]) != ("pixelrepa", 3)], settings))
    assert "no results yet for repa" in unfinished and "step 1: lowest KID none" in unfinished
    assert "pixelrepa reaches plain JiT's final KID (4.000e-3) at no evaluated step so far" in unfinished
    assert "at no evaluated step" in "\n".join(reading(
        [r if r["arm"] != "pixelrepa" else {**r, "kid_mean": 9e-3} for r in rows], settings))


def test_curve_uses_the_pooled_set_at_the_last_step():
    rows = [_row("none", 3, 2e-3, seed=0), _row("none", 3, 4e-3, seed=1), _row("none", 3, 3e-3)]
    (picked,) = convergence.curve_rows(rows)
    assert picked["sample_seed"] == "pooled" and picked["kid_mean"] == 3e-3

