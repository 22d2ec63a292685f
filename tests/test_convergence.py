"""The four-arm convergence benchmark: identical arms, end to end, resume, reading of the results."""

from __future__ import annotations

import csv
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pixelrepa.data.packed import pack_arrays
from pixelrepa.training import parallel, trainer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import convergence  # noqa: E402
from convergence import ARMS, ConvergenceConfig, arm_config, main, only_adds_training_seeds, reading  # noqa: E402

LITE0 = "encoder:efficientnet-lite0"


def test_arm_configs_differ_only_in_alignment(tmp_path):
    settings = ConvergenceConfig()
    configs = {arm: arm_config(settings, arm, 0, tmp_path / "pack", tmp_path / arm).to_dict() for arm in ARMS}
    for arm in ARMS:
        assert configs[arm]["align"]["mode"] == arm and configs[arm]["align"]["target_cache"] == "auto"
        others = {k: v for k, v in configs[arm].items() if k not in ("align", "train")}
        assert others == {k: v for k, v in configs["none"].items() if k not in ("align", "train")}
        assert {**configs[arm]["train"], "out_dir": None} == {**configs["none"]["train"], "out_dir": None}
    assert configs["pixelrepa"]["align"]["mask_ratio"] == 0.2 and configs["pixelrepa"]["align"]["weight"] == 0.1
    assert configs["repa"]["align"]["weight"] == 0.5
    assert configs["repa"]["align"]["encoder"] == configs["pixelrepa"]["align"]["encoder"]
    assert configs["none"]["data"]["hflip"]  # the presets' flips, which the trainer applies


def test_arms_start_equal_and_see_the_same_batches_and_draws(tmp_path, monkeypatch):
    settings = ConvergenceConfig(backbone="Micro/8", batch_size=8, lr=1e-3, warmup_steps=2)
    rng = np.random.default_rng(0)
    pack = tmp_path / "pack"
    pack_arrays(rng.integers(0, 256, size=(40, 3, 32, 32), dtype=np.uint8), rng.integers(0, 10, size=40), pack,
                [str(c) for c in range(10)], source="random")
    seen: dict[str, list] = {arm: [] for arm in ARMS}
    initial: dict[str, dict] = {}
    current = {}
    real_draw, real_module = trainer.draw_randomness, parallel.TrainingModule

    def spy_draw(x, y, *args, **kwargs):
        draws = real_draw(x, y, *args, **kwargs)
        seen[current["arm"]].append((x.clone(), y.clone(), draws.t.clone(), draws.noise.clone(), draws.labels.clone()))
        return draws

    def spy_module(config):
        module = real_module(config)
        initial[current["arm"]] = {k: v.clone() for k, v in module.net.state_dict().items()}
        return module

    monkeypatch.setattr(trainer, "draw_randomness", spy_draw)
    monkeypatch.setattr(parallel, "TrainingModule", spy_module)  # what build_training_module builds
    for arm in ARMS:
        current["arm"] = arm
        config = arm_config(settings, arm, 3, pack, tmp_path / arm).replace(**{
            "train.steps": 7, "data.num_workers": 0, "align.encoder.img_size": 64})
        trainer.train(config, progress=False)
    for arm in ARMS[1:]:
        assert all(torch.equal(initial[arm][k], initial["none"][k]) for k in initial["none"])
        assert len(seen[arm]) == len(seen["none"]) == 7  # crosses an epoch boundary (5 batches per epoch)
        for mine, plain in zip(seen[arm], seen["none"]):
            assert all(torch.equal(a, b) for a, b in zip(mine, plain))
    # Flipped images are among them, and another training seed draws another backbone and order.
    current["arm"] = "other"
    seen["other"] = []
    trainer.train(arm_config(settings, "none", 4, pack, tmp_path / "other").replace(**{
        "train.steps": 1, "data.num_workers": 0}), progress=False)
    assert any(not torch.equal(v, initial["none"][k]) for k, v in initial["other"].items())
    assert not torch.equal(seen["other"][0][0], seen["none"][0][0])


@pytest.mark.slow
def test_benchmark_runs_end_to_end_and_resumes(tmp_path, capsys):
    out, cache = tmp_path / "out", tmp_path / "cache"
    args = ["--dataset", "mnist", "--backbone", "Micro/8", "--out", str(out), "--cache", str(cache),
            "--features", LITE0, "--train-images", "64", "--steps", "4", "--eval-steps", "2", "4",
            "--train-seeds", "0", "1", "--final-only-seeds", "1", "--eval-samples", "12", "--final-samples", "10",
            "--reference-images", "30", "--sampler-steps", "2", "--batch-size", "16", "--warmup-steps", "1",
            "--sample-batch", "20", "--feature-batch", "16", "--ckpt-every", "2", "--no-progress"]
    assert main(args) == 0
    rows = list(csv.DictReader((out / "convergence.csv").open()))
    # per arm: seed 0 at step 2 (one sampling seed) and 4 (two and pooled); seed 1 at step 4 only
    assert len(rows) == len(ARMS) * (1 + 3 + 3)
    assert {r["arm"] for r in rows} == set(ARMS)
    assert {(r["train_seed"], r["step"]) for r in rows} == {("0", "2"), ("0", "4"), ("1", "4")}
    pooled = [r for r in rows if r["sample_seed"] == "pooled"]
    assert len(pooled) == 2 * len(ARMS) and all(int(r["num_images"]) == 20 and r["step"] == "4" for r in pooled)
    assert all(float(r["fid"]) > 0 and float(r["train_seconds"]) > 0 for r in rows)
    record = json.loads((out / "convergence.json").read_text())
    assert record["settings"]["features"] == LITE0 and record["arms"]["repa"]["align"]["weight"] == 0.5
    assert record["reading"] and "reaches plain JiT's final KID" in " ".join(record["reading"])
    assert (out / "convergence.png").stat().st_size > 1000
    assert "| train seed | step |" in (out / "convergence.md").read_text()
    # Each arm is one trainer run, checkpointed at every evaluation step; one target cache serves all.
    assert sorted(p.name for p in (out / "runs" / "pixelrepa-seed0" / "checkpoints").glob("step-*")) == \
        ["step-00000002", "step-00000004"]
    assert len(list((cache / "packs").glob("*/targets/*/manifest.json"))) == 1

    before = (out / "results.jsonl").read_text()
    capsys.readouterr()
    assert main(args) == 0  # everything finished: nothing is trained or sampled again
    assert "step " not in capsys.readouterr().out
    assert (out / "results.jsonl").read_text() == before

    # Drop pixelrepa's last evaluation as if the run stopped during it: only that one is redone.
    lines = before.splitlines()
    kept = [x for x in lines if not (json.loads(x)["arm"] == "pixelrepa" and json.loads(x)["step"] == 4
                                     and json.loads(x)["train_seed"] == 0)]
    (out / "results.jsonl").write_text("\n".join(kept) + '\n{"train_seed": 0, "ar')
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "pixelrepa seed 0" in printed and "none " not in printed and " step      2" not in printed
    again = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    key = lambda r: (r["train_seed"], r["arm"], r["step"], str(r["sample_seed"]))  # noqa: E731
    assert sorted(map(key, again)) == sorted(key(json.loads(x)) for x in lines)
    before = (out / "results.jsonl").read_text()

    (out / "convergence.md").unlink()
    assert main(["--report", "--out", str(out)]) == 0  # tables from results alone
    assert "| train seed | step |" in (out / "convergence.md").read_text()

    changed = list(args)
    changed[changed.index("--reference-images") + 1] = "31"
    with pytest.raises(ValueError, match="reference_images"):
        main(changed)
    assert (out / "results.jsonl").read_text() == before


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="must be steps"):
        ConvergenceConfig(steps=100, eval_steps=(50, 90))
    with pytest.raises(ValueError, match="increasing"):
        ConvergenceConfig(steps=100, eval_steps=(60, 50, 100))
    with pytest.raises(KeyError, match="unknown preset"):
        ConvergenceConfig(backbone="Huge/99")
    with pytest.raises(ValueError, match="final_only_seeds"):
        ConvergenceConfig(train_seeds=(0,), final_only_seeds=(1,))


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



def test_adding_training_seeds_keeps_the_measured_rows():
    saved = dataclasses.asdict(ConvergenceConfig(train_seeds=(0, 1), final_only_seeds=(1,)))
    grown = dataclasses.asdict(ConvergenceConfig(train_seeds=(0, 1, 2), final_only_seeds=(1, 2)))
    assert only_adds_training_seeds(saved, grown)
    assert only_adds_training_seeds(saved, saved)
    # seed 1 changing role (now scored along the way) or a seed dropped invalidates rows
    assert not only_adds_training_seeds(saved, {**grown, "final_only_seeds": (2,)})
    assert not only_adds_training_seeds(saved, {**grown, "train_seeds": (0, 2), "final_only_seeds": (2,)})
    assert not only_adds_training_seeds(saved, {**grown, "steps": 4000})


def test_paired_comparisons_are_the_paired_t_test_and_the_exact_sign_flip_test():
    from scipy import stats

    settings = ConvergenceConfig(train_seeds=(0, 1, 2), final_only_seeds=(1, 2))
    fids = {"none": [60.0, 58.0, 59.0], "repa": [57.0, 56.5, 58.2], "irepa": [55.0, 57.0, 56.0],
            "pixelrepa": [54.0, 55.0, 53.5]}
    rows = [{"train_seed": seed, "arm": arm, "step": settings.steps, "sample_seed": "pooled",
             "kid_mean": fid / 1e3 / 2, "kid_std": 1e-3, "fid": fid}
            for arm, values in fids.items() for seed, fid in enumerate(values)]
    rows.append({**rows[0], "step": 500})  # other steps do not enter
    found = {(c["a"], c["b"], c["metric"]): c for c in convergence.paired_comparisons(rows, settings)}
    assert len(found) == len(convergence.PAIRS) * 2
    c = found[("pixelrepa", "none", "FID")]
    diffs = [a - b for a, b in zip(fids["pixelrepa"], fids["none"])]
    assert c["differences"] == pytest.approx(diffs) and c["seeds"] == [0, 1, 2]
    expected = stats.ttest_rel(fids["pixelrepa"], fids["none"])
    assert c["t"] == pytest.approx(expected.statistic) and c["p_t"] == pytest.approx(expected.pvalue)
    assert c["p_sign_flip"] == pytest.approx(0.25)  # all three lower: 2 of the 8 sign patterns reach it
    mixed = found[("irepa", "none", "FID")]  # -5, -1, -3: all lower as well
    assert mixed["p_sign_flip"] == pytest.approx(0.25)
    assert found[("pixelrepa", "irepa", "KID x 1e3")]["differences"] == pytest.approx(
        [(a - b) / 2 for a, b in zip(fids["pixelrepa"], fids["irepa"])])
    summary = {e["arm"]: e for e in convergence.arm_summary(rows, settings)}
    assert summary["repa"]["fid"]["mean"] == pytest.approx(np.mean(fids["repa"]))
    assert summary["repa"]["fid"]["std"] == pytest.approx(np.std(fids["repa"], ddof=1))
    # A seed one arm has not finished is left out of that arm's pairs.
    partial = [r for r in rows if not (r["arm"] == "irepa" and r["train_seed"] == 2)]
    assert {(c["a"], c["b"]): c["seeds"] for c in convergence.paired_comparisons(partial, settings)}[
        ("irepa", "none")] == [0, 1]
    lines = reading(rows, settings)
    assert any(line.startswith("pixelrepa vs none, FID: pixelrepa lower in 3 of 3") for line in lines)
