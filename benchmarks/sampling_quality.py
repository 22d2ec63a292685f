"""Image quality against network evaluations: solvers x schedules, and CFG against autoguidance.

    python benchmarks/sampling_quality.py --out DIR [--run RUN] [--small-run RUN] [--samples 2000]
                                          [--seeds 0 1 2] [--report]

On a Fashion-MNIST PixelREPA-Tiny/4 run of 3,000 steps (the convergence benchmark's recipe: `--run`
takes one of its run folders, e.g. `DIR/runs/pixelrepa-seed0`; without it the run is trained here
with the trainer, to step `guide_step` first and then to `steps`), the EMA backbone samples
`samples` class-balanced images for every sampling seed at every setting, scored by KID x 1e3 and
FID against the convergence benchmark's reference features (its `reference_features`, `score_row`):

1. solvers, in this order: the reference, Heun `reference_steps` (50) on the uniform grid (the
   released protocol); then each solver of `solver_steps` (METHOD:STEPS,...) on the uniform grid; a
   probe that picks the best of `other_schedules` (dpm2m at `probe_steps`, the first seed,
   `probe_samples` images: the lowest KID); then each solver on that schedule.
2. guidance at one budget (`guidance_method` at `guidance_steps`): classifier-free guidance over
   `cfg_scales` against autoguidance over `guide_weights` with two guides: the same run's EMA at
   step `guide_step`, and a smaller model (`small_overrides` of the plain-JiT preset, trained with
   the same recipe, or `--small-run`).
3. timing: the wall-clock of sampling `time_images` images at the cheapest setting whose mean KID is
   within Heun-50's band (mean + one std over the seeds), and at Heun-50, on this machine.

`nfe` is counted: every image through the backbone's forward (and the guide's) per image made
(`pixelrepa.evaluation.sweep.GeneratedImages`), so a guided evaluation counts 2. Each measured row is
appended to `results.jsonl` and the table (`sampling-quality.md`, `.csv`), the plot (KID and FID
against nfe, one line per solver and schedule, shaded one std over the seeds) and the JSON are
rewritten after it: re-running the same command skips the rows measured, and the grid (`GRID`)
may grow or shrink between invocations. On the project's 2-core AMD EPYC the Inception features
alone run at 9.5 images/s, about 11 minutes for one setting's 6,000 images (three seeds), so the
default grid takes hours and spans sessions.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
import typing
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from common import cpu_model  # benchmarks/ is on sys.path when run as a script
from convergence import SCALES, arm_config, reference_features, score_row, training_pack
from pixelrepa.checkpoint import export_sampling_checkpoint, find_checkpoint
from pixelrepa.config import RunConfig, SamplerMethod, apply_overrides
from pixelrepa.device import apply_kernels, pick_device
from pixelrepa.evaluation.features import build_feature_extractor
from pixelrepa.evaluation.metrics import extract_features
from pixelrepa.evaluation.plots import Panel, line_plot
from pixelrepa.evaluation.results import write_result_set
from pixelrepa.evaluation.sample_folder import load_guide
from pixelrepa.evaluation.sweep import GeneratedImages
from pixelrepa.files import cache_dir, write_text_atomic
from pixelrepa.loading import load_model, resolve_model_path
from pixelrepa.sampling import class_layout
from pixelrepa.training.trainer import train

FORMAT = "pixelrepa-sampling-quality/1"
CSV_COLUMNS = ("part", "method", "schedule", "steps", "guide", "cfg", "seed", "nfe", "num_images", "kid_mean",
               "kid_std", "fid", "seconds")


@dataclass(frozen=True)
class QualityConfig:
    """Every setting of a measurement; all of it is recorded with the results. The fields of `GRID`
    only choose which settings are measured: they may change between invocations (rows measured
    stay valid); every other field defines what a row means and may not."""

    backbone: str = "Tiny/4"
    """The convergence recipe's backbone family (PixelREPA-<backbone> is the model trained here)."""
    dataset: str = "fashion-mnist"
    steps: int = 3000
    """Training steps of the model (and of the small guide)."""
    guide_step: int = 1000
    """The earlier checkpoint used as a guide."""
    train_images: int = 20_000
    reference_images: int = 5000
    features: str = "inception"
    samples: int = 2000
    """Images per sampling seed and setting."""
    small_overrides: tuple[str, ...] = ("model.hidden_size=64", "model.num_heads=2")
    """The smaller guide: plain JiT-<backbone> with these changes."""
    seeds: tuple[int, ...] = (0, 1, 2)
    reference_steps: int = 50
    """Heun steps of the reference on the uniform grid: the released protocol (Heun-50)."""
    solver_steps: tuple[str, ...] = ("dpm2m:6,10,16", "heun:5,9", "euler:10,20")
    """METHOD:STEPS,...: each solver's step counts, measured on the uniform grid and on the best other
    schedule, in this order."""
    other_schedules: tuple[str, ...] = ("shifted:0.5", "shifted:2", "edm:7")
    """Candidates for the second schedule: shifted:SHIFT or edm:RHO."""
    probe_steps: int = 10
    """dpm2m steps of the probe that picks the second schedule (the first seed, `probe_samples` images)."""
    probe_samples: int = 1000
    guidance_method: str = "dpm2m"
    guidance_steps: int = 16
    cfg_scales: tuple[float, ...] = (2.0, 3.0)
    guide_weights: tuple[float, ...] = (2.0, 3.0)
    time_images: int = 1000
    sample_batch: int = 250
    feature_batch: int = 50


GRID = ("seeds", "reference_steps", "solver_steps", "other_schedules", "probe_steps", "probe_samples",
        "guidance_method", "guidance_steps", "cfg_scales", "guide_weights", "time_images", "sample_batch",
        "feature_batch")


def solver_grid(q: QualityConfig) -> list[tuple[str, tuple[int, ...]]]:
    """`solver_steps` parsed: [(method, step counts), ...]."""
    grid = []
    for spec in q.solver_steps:
        method, _, counts = spec.partition(":")
        try:
            steps = tuple(int(c) for c in counts.split(","))
        except ValueError:
            steps = ()
        if method not in typing.get_args(SamplerMethod) or not steps or min(steps) < 1:
            raise ValueError(f"solver_steps '{spec}': expected METHOD:STEPS,... with METHOD one of "
                             f"{', '.join(typing.get_args(SamplerMethod))} and positive step counts, e.g. dpm2m:6,10,16")
        grid.append((method, steps))
    return grid


def schedule_overrides(spec: str) -> dict:
    """'uniform', 'shifted:2' or 'edm:7' as sampler overrides."""
    name, _, value = spec.partition(":")
    if name == "uniform":
        return {"sampler.schedule": "uniform"}
    if name in ("shifted", "edm") and value:
        return {"sampler.schedule": name, ("sampler.shift" if name == "shifted" else "sampler.rho"): float(value)}
    raise ValueError(f"unknown schedule '{spec}': uniform, shifted:SHIFT or edm:RHO")


def training_settings(q: QualityConfig):
    """The convergence benchmark's settings for the runs trained here."""
    return dataclasses.replace(SCALES["cpu"], dataset=q.dataset, backbone=q.backbone, steps=q.steps,
                               eval_steps=(q.guide_step, q.steps), train_images=q.train_images,
                               reference_images=q.reference_images, features=q.features,
                               sample_batch=q.sample_batch, feature_batch=q.feature_batch)


def exported(run: Path, step: int) -> Path | None:
    """The run's EMA-1 model file at `step` (the convergence benchmark's exports/, else its checkpoint)."""
    path = run / "exports" / f"ema1-step{step:08d}.safetensors"
    if path.is_file():
        return path
    checkpoint = run / "checkpoints" / f"step-{step:08d}"
    if not checkpoint.is_dir():
        return None
    export_sampling_checkpoint(find_checkpoint(checkpoint), path, ema=1)
    return path


def train_main(q: QualityConfig, out: Path, cache: Path, progress: bool) -> Path:
    """The PixelREPA run, trained in out/runs/main as the convergence benchmark trains (to `guide_step`
    first, then to `steps`); an earlier invocation's run is continued or reused."""
    settings = training_settings(q)
    pack = training_pack(settings, cache)
    main_run = out / "runs" / "main"
    for step in (q.guide_step, q.steps):
        if exported(main_run, step) is None:
            train(arm_config(settings, "pixelrepa", 0, pack, main_run).replace(**{"train.steps": step}),
                  progress=progress)
            exported(main_run, step)
    return main_run


def train_small(q: QualityConfig, out: Path, cache: Path, progress: bool) -> Path:
    """The smaller guide (plain JiT with `small_overrides`), trained in out/runs/small with the recipe."""
    settings = training_settings(q)
    small_run = out / "runs" / "small"
    if exported(small_run, q.steps) is None:
        small = arm_config(settings, "none", 0, training_pack(settings, cache), small_run)
        small = apply_overrides(small, dict(item.split("=", 1) for item in q.small_overrides))
        train(small.replace(**{"train.steps": q.steps}), progress=progress)
    return small_run


def _read_rows(path: Path) -> list[dict]:
    rows = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # cut by an interruption: measured again
            continue
    return rows


def _key(row: dict) -> tuple:
    return tuple(row.get(k) for k in ("part", "method", "schedule", "steps", "guide", "cfg", "seed"))


def _setting_key(row: dict) -> tuple:
    """What was sampled and how many images: a guidance row at the default weight is a solver row too."""
    return _key(row)[1:] + (row.get("num_images"),)


class Measurement:
    """The networks, the reference and the results file of one output folder."""

    def __init__(self, q: QualityConfig, out: Path, model: Path, guides: dict[str, Path], reference, extractor,
                 device: torch.device):
        self.q, self.out, self.reference, self.extractor, self.device = q, out, reference, extractor, device
        self.config, self.net, _ = load_model(model, device=device)
        apply_kernels(self.net, self.net.blocks, self.config.kernels, device, sampling=True)
        self.guides = {name: load_guide(path, self.config, device) for name, path in guides.items()}
        self.rows = _read_rows(out / "results.jsonl")

    def setting(self, method: str, schedule: str, steps: int, cfg: float | None = None) -> RunConfig:
        changes = {"sampler.method": method, "sampler.steps": steps, **schedule_overrides(schedule)}
        return apply_overrides(self.config, changes | ({} if cfg is None else {"sampler.cfg_scale": cfg}))

    def measure(self, part: str, method: str, schedule: str, steps: int, seed: int, guide: str | None = None,
                cfg: float | None = None, samples: int | None = None) -> dict:
        """The row of one setting and seed: measured now unless results.jsonl holds it (a row of
        another part with the same setting and image count is copied)."""
        config = self.setting(method, schedule, steps, cfg)
        samples = samples or self.q.samples
        row = {"part": part, "method": method, "schedule": schedule, "steps": steps, "guide": guide,
               "cfg": config.sampler.cfg_scale, "seed": seed}
        done = [r for r in self.rows if _key(r) == _key(row)]
        if done:
            return done[-1]
        same = [r for r in self.rows if _setting_key(r) == _setting_key(row | {"num_images": samples})]
        if same:
            self.rows.append(same[-1] | {"part": part})
            write_text_atomic(self.out / "results.jsonl", "".join(json.dumps(r) + "\n" for r in self.rows))
            return self.rows[-1]
        layout = class_layout(config.model.num_classes, None, math.ceil(samples / config.model.num_classes))
        tic = time.perf_counter()
        source = GeneratedImages(self.net, config, samples, layout, self.q.sample_batch, self.device, seed,
                                 self.guides.get(guide))
        with torch.no_grad():
            features = extract_features(source, self.extractor, self.q.feature_batch, self.device)
        row |= {"nfe": source.nfe, **score_row(features, self.reference),
                "seconds": round(time.perf_counter() - tic, 1)}
        self.rows.append(row)
        write_text_atomic(self.out / "results.jsonl", "".join(json.dumps(r) + "\n" for r in self.rows))
        print(f"  {part:<9} {method:<6} {schedule:<12} {steps:>3} steps {guide or 'CFG':<9} w {row['cfg']:<4g} "
              f"seed {seed}: nfe {row['nfe']:.1f}, KID x1e3 {row['kid_mean'] * 1e3:.3f}, FID {row['fid']:.2f} "
              f"({row['seconds']:.0f} s)", flush=True)
        return row

    def time_sampling(self, method: str, schedule: str, steps: int) -> dict:
        """Wall-clock of sampling `time_images` images (no scoring) at one setting."""
        row = {"part": "timing", "method": method, "schedule": schedule, "steps": steps, "guide": None,
               "cfg": self.config.sampler.cfg_scale, "seed": 0}
        done = [r for r in self.rows if _key(r) == _key(row)]
        if done:
            return done[-1]
        config = self.setting(method, schedule, steps)
        layout = class_layout(config.model.num_classes, None, math.ceil(self.q.time_images / config.model.num_classes))
        source = GeneratedImages(self.net, config, self.q.time_images, layout, self.q.sample_batch, self.device, 0)
        tic = time.perf_counter()
        for _ in source.batches(self.q.sample_batch):
            pass
        row |= {"nfe": source.nfe, "num_images": self.q.time_images, "seconds": round(time.perf_counter() - tic, 1)}
        self.rows.append(row)
        write_text_atomic(self.out / "results.jsonl", "".join(json.dumps(r) + "\n" for r in self.rows))
        return row


def bands(rows: list[dict]) -> list[dict]:
    """One row per setting: nfe, and KID and FID as mean and sample std (ddof 1) over its seeds."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["part"] != "timing":
            groups.setdefault(_key(r)[:-1], []).append(r)
    out = []
    for runs in groups.values():
        band = {k: runs[0][k] for k in ("part", "method", "schedule", "steps", "guide", "cfg")}
        for metric in ("kid_mean", "fid", "nfe"):
            values = [r[metric] for r in runs]
            band[metric] = float(np.mean(values))
            band[metric + "_sd"] = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
        out.append(band | {"n_seeds": len(runs)})
    return out


def reference_band(q: QualityConfig, banded: list[dict]) -> dict | None:
    """Heun at `reference_steps` on the uniform grid (the released protocol)."""
    return next((b for b in banded if b["part"] == "solvers" and b["method"] == "heun" and b["schedule"] == "uniform"
                 and b["steps"] == q.reference_steps), None)


def cheapest_match(q: QualityConfig, banded: list[dict]) -> dict | None:
    """The solver setting with the fewest counted evaluations whose mean KID is within the reference's
    band (its mean + one std over the seeds)."""
    ref = reference_band(q, banded)
    if ref is None:
        return None
    matches = [b for b in banded if b["part"] == "solvers" and b["kid_mean"] <= ref["kid_mean"] + ref["kid_mean_sd"]]
    return min(matches, key=lambda b: b["nfe"]) if matches else None


def reading(q: QualityConfig, rows: list[dict]) -> list[str]:
    banded = bands(rows)
    ref = reference_band(q, banded)
    if ref is None:
        return [f"the reference (Heun {q.reference_steps} steps, uniform grid) is not measured yet"]
    lines = [f"reference: heun {ref['steps']} steps uniform, {ref['nfe']:.1f} evaluations per image, KID x1e3 "
             f"{ref['kid_mean'] * 1e3:.3f} ± {ref['kid_mean_sd'] * 1e3:.3f}, FID {ref['fid']:.2f} ± {ref['fid_sd']:.2f} "
             f"({ref['n_seeds']} seeds)"]
    for method in dict.fromkeys(method for method, _ in solver_grid(q)):
        for schedule in sorted({b["schedule"] for b in banded if b["part"] == "solvers"}):
            mine = [b for b in banded if b["part"] == "solvers" and b["method"] == method and b["schedule"] == schedule
                    and b["kid_mean"] <= ref["kid_mean"] + ref["kid_mean_sd"]]
            if mine:
                best = min(mine, key=lambda b: b["nfe"])
                lines.append(f"{method} {schedule}: within the reference's band from {best['steps']} steps, "
                             f"{best['nfe']:.1f} evaluations per image ({best['nfe'] / ref['nfe']:.2f} of the reference)")
    match = cheapest_match(q, banded)
    if match is not None:
        goal = "reached" if match["nfe"] <= ref["nfe"] / 3 else "not reached"
        lines.append(f"fewest evaluations within the band: {match['method']} {match['steps']} steps {match['schedule']}, "
                     f"{match['nfe']:.1f} per image ({match['nfe'] / ref['nfe']:.2f} of the reference; the one-third "
                     f"goal is {goal})")
    guided = [b for b in banded if b["part"] == "guidance"]
    for guide in dict.fromkeys(b["guide"] for b in guided):
        best = min((b for b in guided if b["guide"] == guide), key=lambda b: b["kid_mean"])
        lines.append(f"{'CFG' if guide is None else 'autoguidance (' + guide + ')'}: best KID x1e3 "
                     f"{best['kid_mean'] * 1e3:.3f} ± {best['kid_mean_sd'] * 1e3:.3f} at weight {best['cfg']:g} "
                     f"({q.guidance_method} {q.guidance_steps} steps, {best['nfe']:.1f} evaluations per image)")
    timed = {(r["method"], r["schedule"], r["steps"]): r for r in rows if r["part"] == "timing"}
    for (method, schedule, steps), r in timed.items():
        lines.append(f"sampling {r['num_images']} images with {method} {steps} steps {schedule}: {r['seconds']:.0f} s "
                     f"({cpu_model()}, {torch.get_num_threads()} threads)")
    return lines


def format_markdown(q: QualityConfig, rows: list[dict]) -> str:
    banded = sorted(bands(rows), key=lambda b: (b["part"], b["method"], b["schedule"], str(b["guide"]), b["cfg"],
                                                b["nfe"]))
    lines = [f"KID x 1e3 and FID of {q.samples:,} samples per seed against {q.reference_images:,} real "
             f"{q.dataset} train images; mean ± sample std over the seeds; nfe: network evaluations per image, counted.",
             "", "| part | method | schedule | steps | guidance | weight | nfe | KID x 1e3 | FID | seeds |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for b in banded:
        lines.append(f"| {b['part']} | {b['method']} | {b['schedule']} | {b['steps']} | {b['guide'] or 'CFG'} | "
                     f"{b['cfg']:g} | {b['nfe']:.1f} | {b['kid_mean'] * 1e3:.3f} ± {b['kid_mean_sd'] * 1e3:.3f} | "
                     f"{b['fid']:.2f} ± {b['fid_sd']:.2f} | {b['n_seeds']} |")
    lines += ["", "Reading (computed from the table):", ""] + [f"- {line}" for line in reading(q, rows)]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    """KID and FID against counted evaluations, one line per solver and schedule, one std shaded."""
    banded = [b for b in bands(rows) if b["part"] == "solvers"]
    curves = {}
    for b in sorted(banded, key=lambda b: b["nfe"]):
        curves.setdefault(f"{b['method']}, {b['schedule']}", []).append(b)
    panels = []
    for key, title, scale in (("kid_mean", "KID x 1e3", 1e3), ("fid", "FID", 1.0)):
        series = [(label, [(b["nfe"], b[key] * scale) for b in points]) for label, points in curves.items()]
        spread = [[b[key + "_sd"] * scale for b in points] for points in curves.values()]
        panels.append(Panel(f"{title} against network evaluations", "network evaluations per image (counted)",
                            title, series, spread))
    line_plot(panels, path)


def write_outputs(q: QualityConfig, out: Path, rows: list[dict], models: dict) -> dict:
    record = {"format": FORMAT, "settings": dataclasses.asdict(q), "models": models,
              "machine": f"{cpu_model()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
              "written": datetime.now(timezone.utc).isoformat(timespec="seconds"), "reading": reading(q, rows),
              "rows": rows}
    ordered = sorted(rows, key=lambda r: tuple(str(v) for v in _key(r)))
    write_result_set(out, "sampling-quality", ordered, CSV_COLUMNS, record, format_markdown(q, rows),
                     lambda path: plot(rows, path))
    return record


def run(q: QualityConfig, out: Path, cache: Path, device: torch.device, run_dir: Path | None = None,
        small_run: Path | None = None, progress: bool = True) -> dict:
    """Measure every row not yet in `out` (training the runs first when none is given)."""
    solvers = solver_grid(q)
    out.mkdir(parents=True, exist_ok=True)
    settings_path = out / "settings.json"
    settings = json.loads(json.dumps(dataclasses.asdict(q)))
    if settings_path.is_file():
        saved = json.loads(settings_path.read_text())
        changed = sorted(k for k in settings if k not in GRID and saved.get(k) != settings[k])
        if changed:
            raise ValueError(f"{out} holds results measured with other {', '.join(changed)}: use another --out, or "
                             "delete it to start over (the grid settings may change: " + ", ".join(GRID) + ")")
    write_text_atomic(settings_path, json.dumps(settings, indent=2) + "\n")
    model = resolve_model_path(run_dir or train_main(q, out, cache, progress))
    earlier = exported(run_dir or out / "runs" / "main", q.guide_step)
    guides = {f"step{q.guide_step}": earlier} if earlier else {}
    models = {"model": str(model), **{f"guide {k}": str(v) for k, v in guides.items()}}
    print(f"machine       {cpu_model()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"model         {model}; earlier checkpoint as a guide: {earlier or 'none found'}")
    extractor, network = build_feature_extractor(q.features, device)
    reference = reference_features(training_settings(q), extractor, network, cache, device)
    m = Measurement(q, out, model, guides, reference, extractor, device)

    def finished_row(*args, **kwargs):
        m.measure(*args, **kwargs)
        write_outputs(q, out, m.rows, models)

    for seed in q.seeds:  # the reference first: every other row is read against it
        finished_row("solvers", "heun", "uniform", q.reference_steps, seed)
    for method, counts in solvers:
        for steps in counts:
            for seed in q.seeds:
                finished_row("solvers", method, "uniform", steps, seed)
    for schedule in q.other_schedules:  # the probe: which second schedule
        finished_row("probe", "dpm2m", schedule, q.probe_steps, q.seeds[0], samples=q.probe_samples)
    probes = [r for r in m.rows if r["part"] == "probe" and r["schedule"] in q.other_schedules]
    other = min(probes, key=lambda r: r["kid_mean"])["schedule"]
    print(f"schedule      {other} (lowest KID of the probe)")
    for method, counts in solvers:
        for steps in counts:
            for seed in q.seeds:
                finished_row("solvers", method, other, steps, seed)
    small = resolve_model_path(small_run or train_small(q, out, cache, progress))  # needed from here on only
    m.guides["small"] = load_guide(small, m.config, device)
    guides["small"] = models["guide small"] = str(small)
    for guide, weights in [(None, q.cfg_scales)] + [(name, q.guide_weights) for name in guides]:
        for weight in weights:
            for seed in q.seeds:
                finished_row("guidance", q.guidance_method, "uniform", q.guidance_steps, seed, guide, weight)
    match = cheapest_match(q, bands(m.rows))
    for method, schedule, steps in ([(match["method"], match["schedule"], match["steps"])] if match else []) + \
            [("heun", "uniform", q.reference_steps)]:
        m.time_sampling(method, schedule, steps)
    return write_outputs(q, out, m.rows, models)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="results folder")
    parser.add_argument("--run", type=Path, help="a trained run folder (e.g. the convergence benchmark's "
                        "runs/pixelrepa-seed0); default: train one into OUT/runs/main")
    parser.add_argument("--small-run", type=Path, help="the smaller guide's run or model file (default: trained into "
                        "OUT/runs/small before the guidance part)")
    parser.add_argument("--cache", type=Path, help="pack and reference features (default: the convergence benchmark's)")
    parser.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--report", action="store_true", help="only rewrite the tables and plot from results.jsonl")
    group = parser.add_argument_group("settings")
    for field in dataclasses.fields(QualityConfig):
        default = getattr(QualityConfig(), field.name)
        flag = "--" + field.name.replace("_", "-")
        if isinstance(default, tuple):
            kind = type(default[0]) if default else str
            group.add_argument(flag, type=kind, nargs="+", metavar=kind.__name__.upper())
        else:
            group.add_argument(flag, type=type(default), metavar=type(default).__name__.upper())
    args = parser.parse_args(argv)
    if args.report:
        q = QualityConfig(**{k: tuple(v) if isinstance(v, list) else v
                             for k, v in json.loads((args.out / "settings.json").read_text()).items()})
        saved = json.loads((args.out / "sampling-quality.json").read_text())
        write_outputs(q, args.out, _read_rows(args.out / "results.jsonl"), saved["models"])
    else:
        changes = {f.name: tuple(v) if isinstance(v, list) else v
                   for f in dataclasses.fields(QualityConfig) if (v := getattr(args, f.name)) is not None}
        device = torch.device(args.device) if args.device else pick_device()
        run(QualityConfig(**changes), args.out, args.cache or cache_dir() / "convergence", device, args.run,
            args.small_run, progress=not args.no_progress)
    print(f"results       {args.out}/sampling-quality.md, .csv, .json, .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
