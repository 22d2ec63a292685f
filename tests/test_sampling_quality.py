"""benchmarks/sampling_quality.py at toy scale: trains, measures every part, resumes, reads."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from sampling_quality import QualityConfig, bands, cheapest_match, main, schedule_overrides, solver_grid  # noqa: E402


def test_schedule_specs():
    assert schedule_overrides("uniform") == {"sampler.schedule": "uniform"}
    assert schedule_overrides("shifted:0.5") == {"sampler.schedule": "shifted", "sampler.shift": 0.5}
    assert schedule_overrides("edm:7") == {"sampler.schedule": "edm", "sampler.rho": 7.0}
    with pytest.raises(ValueError, match="unknown schedule 'edm'"):
        schedule_overrides("edm")


def test_solver_grid_specs():
    assert solver_grid(QualityConfig(solver_steps=("dpm2m:6,10", "heun:5"))) == [("dpm2m", (6, 10)), ("heun", (5,))]
    for bad in ("rk4:5", "dpm2m", "dpm2m:6,x", "euler:0"):
        with pytest.raises(ValueError, match=f"solver_steps '{bad}'"):
            solver_grid(QualityConfig(solver_steps=(bad,)))


def _row(method, steps, nfe, kid, seed, schedule="uniform"):
    return {"part": "solvers", "method": method, "schedule": schedule, "steps": steps, "guide": None, "cfg": 3.0,
            "seed": seed, "nfe": nfe, "kid_mean": kid, "fid": kid * 1e4}


def test_cheapest_match_is_within_the_reference_band():
    q = QualityConfig(reference_steps=50)
    rows = [_row("heun", 50, 180, 2.0e-3, 0), _row("heun", 50, 180, 3.0e-3, 1),  # band 2.5e-3 + 0.71e-3
            _row("heun", 5, 17, 9e-3, 0), _row("heun", 5, 17, 8e-3, 1),
            _row("dpm2m", 16, 30, 3.1e-3, 0), _row("dpm2m", 16, 30, 3.0e-3, 1),
            _row("dpm2m", 8, 15, 3.5e-3, 0), _row("dpm2m", 8, 15, 3.4e-3, 1)]
    assert len(bands(rows)) == 4
    match = cheapest_match(q, bands(rows))
    assert (match["method"], match["steps"], match["nfe"]) == ("dpm2m", 16, 30)


@pytest.mark.slow
def test_benchmark_runs_at_toy_scale_and_resumes(tmp_path, capsys):
    pytest.importorskip("timm")
    from pixelrepa.align.encoders import lite0_weights
    from pixelrepa.data.idx import find_idx_dir
    try:
        find_idx_dir("mnist")
        lite0_weights()
    except FileNotFoundError as err:
        pytest.skip(str(err))
    out = tmp_path / "out"
    args = ["--out", str(out), "--cache", str(tmp_path / "cache"), "--no-progress", "--dataset", "mnist",
            "--backbone", "Micro/8", "--features", "encoder:efficientnet-lite0", "--train-images", "64",
            "--steps", "2", "--guide-step", "1", "--reference-images", "20", "--samples", "6", "--seeds", "0", "1",
            "--reference-steps", "2", "--solver-steps", "euler:2,3", "dpm2m:2,3",
            "--other-schedules", "edm:7", "shifted:2", "--probe-steps", "2", "--probe-samples", "4",
            "--guidance-method", "heun", "--guidance-steps", "2",
            "--cfg-scales", "3.0", "--guide-weights", "2.0", "--small-overrides", "model.hidden_size=32",
            "model.num_heads=2", "--time-images", "4", "--sample-batch", "8", "--feature-batch", "8"]
    assert main(args) == 0
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    parts = [r["part"] for r in rows]
    assert parts.count("probe") == 2 and parts.count("timing") >= 1
    assert {r["num_images"] for r in rows if r["part"] == "probe"} == {4}
    assert parts.count("solvers") == 2 * (1 + 2 * (2 + 2))  # seeds x (reference + schedules x (euler 2 + dpm2m 2))
    assert parts.count("guidance") == 2 * 3  # CFG, the step-1 guide, the small guide; two seeds each
    order = [(r["part"], r["method"], r["schedule"]) for r in rows]
    assert order[:2] == [("solvers", "heun", "uniform")] * 2  # the reference first
    reference_cfg = next(r for r in rows if r["part"] == "solvers" and r["method"] == "heun")
    copied = next(r for r in rows if r["part"] == "guidance" and r["guide"] is None and r["cfg"] == reference_cfg["cfg"]
                  and r["seed"] == reference_cfg["seed"])
    assert copied["kid_mean"] == reference_cfg["kid_mean"]  # the same setting is not sampled twice
    assert {r["guide"] for r in rows if r["part"] == "guidance"} == {None, "step1", "small"}
    heun = next(r for r in rows if r["method"] == "heun" and r["part"] == "solvers")
    assert heun["nfe"] == 5  # 1 + 2 + 2: the counted evaluations of Heun 2 steps with CFG on (0.1, 1)
    with open(out / "sampling-quality.csv") as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    text = (out / "sampling-quality.md").read_text()
    assert "reference: heun 2 steps uniform" in text and "autoguidance (small)" in text
    assert (out / "sampling-quality.png").stat().st_size > 1000
    before = (out / "results.jsonl").read_text()
    capsys.readouterr()
    assert main(args) == 0  # all measured: nothing sampled again
    assert "seed 0: nfe" not in capsys.readouterr().out
    assert (out / "results.jsonl").read_text() == before
    assert main(args[:args.index("--seeds")] + ["--seeds", "0", "1", "2"] + args[args.index("--seeds") + 3:]) == 0
    grown = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert grown[:len(rows)] == rows and {r["seed"] for r in grown[len(rows):]} == {2}  # the grid grew by a seed
    with pytest.raises(ValueError, match="other samples"):
        main(args[:args.index("--samples")] + ["--samples", "7"] + args[args.index("--samples") + 2:])
