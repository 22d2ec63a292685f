"""The four-arm convergence benchmark: plain JiT vs REPA vs iREPA vs PixelREPA, trained identically and scored.

    python benchmarks/convergence.py --out DIR [--scale cpu|gpu] [--arms none repa irepa pixelrepa]
                                     [--train-seeds 0 1 2] [--final-only-seeds 1 2] [--report]

The paper's figure 1 in miniature, at a scale one CPU can run. One backbone preset is trained
four times, with alignment `none`, `repa`, `irepa` and `pixelrepa` (the presets' recipe: tap block
= in-context start, REPA's MLP with weight 0.5, iREPA's 3x3 conv projector and spatially z-scored
targets with weight 0.5, the adapter with mask ratio 0.2 and weight 0.1),
and nothing else differs: the same seed builds the same initial backbone (the heads are built
after it), the data order is a function of (seed, epoch) only, and a step's draws of t, noise and
label drop come first from the same generator (the PixelREPA keep-mask is drawn last), so the
four runs see the same batches and the same noisy inputs. Each arm is trained by
`pixelrepa.training.trainer.train` (the trainer a user runs: horizontal flips as the presets
ask, warm-up, gradient norm, CPU kernels) to each evaluation step in turn; resuming from its
checkpoint makes that one uninterrupted run. The training images are a fixed random subset
packed once, and the alignment targets, the offline ImageNet EfficientNet-Lite0's features of
both orientations of every image, are cached beside the pack (`align.target_cache`).

At each step of `eval_steps` the EMA backbone samples a class-balanced set from fixed noise
(image k of sampling seed s always starts from the same noise) and is scored against Inception
features of real training images, computed once: KID (unbiased at small counts) and FID (biased
upward at small counts; comparable only at equal counts). At the last step every seed of
`sample_seeds` gets `final_samples` images, and the pooled set gives the final FID. Training
seeds in `final_only_seeds` are scored at the last step only.

Results are appended to `results.jsonl` as they are measured and the tables (`convergence.csv`,
`convergence.md`), the plot (`convergence.png`) and `convergence.json` are rewritten after each
one: an interrupted run keeps what it measured, and re-running the same command continues
from the last checkpoint of the arm it was training (DIR/runs/). Caches (the pack with its
encoder targets, reference features) live in `--cache`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from common import cpu_model  # benchmarks/ is on sys.path when run as a script
from pixelrepa.config import RunConfig, get_preset
from pixelrepa.data.idx import idx_subset_order, load_idx_dataset, pack_idx_subset
from pixelrepa.evaluation.diversity import ImageSet
from pixelrepa.evaluation.features import build_feature_extractor
from pixelrepa.sampling import class_layout
from pixelrepa.evaluation.metrics import (
    Reference,
    extract_features,
    feature_statistics,
    load_reference,
    save_reference,
    scalars,
    score,
)
from pixelrepa.evaluation.plots import Panel, line_plot
from pixelrepa.evaluation.results import write_result_set
from pixelrepa.evaluation.sweep import GeneratedImages
from pixelrepa.files import cache_dir, write_text_atomic
from pixelrepa.models.layers import set_attention_impl
from pixelrepa.checkpoint import export_sampling_checkpoint, find_checkpoint
from pixelrepa.device import pick_device
from pixelrepa.evaluation.live import live_validator
from pixelrepa.training.trainer import train
from pixelrepa.loading import load_model

ARMS = ("none", "repa", "irepa", "pixelrepa")
ARM_PRESET_PREFIX = {"none": "JiT", "repa": "REPA", "irepa": "iREPA", "pixelrepa": "PixelREPA"}
FORMAT = "pixelrepa-convergence/1"


@dataclass(frozen=True)
class ConvergenceConfig:
    """Every setting of a benchmark run; all of it is recorded with the results."""

    dataset: Literal["fashion-mnist", "mnist"] = "fashion-mnist"
    backbone: str = "Tiny/4"
    """A 32-px preset family: JiT-, REPA-, iREPA- and PixelREPA-<backbone> must exist."""
    train_images: int = 20_000
    """A fixed random subset of the train split (its encoder targets are cached)."""
    steps: int = 3000
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 50
    eval_steps: tuple[int, ...] = (500, 1000, 2000, 3000)
    """Where the EMA backbone is scored; the last one must be `steps`."""
    eval_samples: int = 1000
    """Samples at the intermediate evaluations (KID and a small-count FID)."""
    final_samples: int = 2500
    """Samples per sampling seed at the last step."""
    sample_seeds: tuple[int, ...] = (0, 1)
    train_seeds: tuple[int, ...] = (0, 1, 2)
    final_only_seeds: tuple[int, ...] = (1, 2)
    """Training seeds scored at the last step only (the others at every step of eval_steps)."""
    reference_images: int = 5000
    """Real train-split images whose Inception features are the reference."""
    sampler_method: Literal["heun", "euler"] = "heun"
    sampler_steps: int = 10
    cfg_scale: float = 3.0
    ema: int = 1
    """Which EMA is scored (1-based; both decays with warm-up, as the demo)."""
    features: str = "inception"
    """Feature network of the metrics (see `pixelrepa.evaluation.features`)."""
    sample_batch: int = 250
    feature_batch: int = 50
    data_seed: int = 0
    """Seed of the training-subset and reference-subset draws."""
    compile: Literal["none", "model"] = "none"
    """kernels.compile of every training segment (explicit, so that all segments run one code)."""
    ckpt_every: int = 250
    """Checkpoint interval of the arms' runs: what an interruption can cost."""

    def __post_init__(self) -> None:
        if not set(self.final_only_seeds) <= set(self.train_seeds):
            raise ValueError(f"final_only_seeds {self.final_only_seeds} must be among train_seeds {self.train_seeds}")
        for arm in ARMS:
            get_preset(f"{ARM_PRESET_PREFIX[arm]}-{self.backbone}")  # raises naming the missing preset
        if self.dataset not in ("fashion-mnist", "mnist"):
            raise ValueError(f"unknown data set '{self.dataset}' (fashion-mnist | mnist)")
        if not self.eval_steps or list(self.eval_steps) != sorted(set(self.eval_steps)):
            raise ValueError(f"eval_steps must be increasing and non-empty, got {self.eval_steps}")
        if self.eval_steps[-1] != self.steps:
            raise ValueError(f"the last of eval_steps {self.eval_steps} must be steps = {self.steps}")
        if self.eval_steps[0] < 1:
            raise ValueError("eval_steps must be >= 1")
        if self.train_images < self.batch_size:
            raise ValueError(f"train_images {self.train_images} is smaller than one batch of {self.batch_size}")
        for name in ("eval_samples", "final_samples", "reference_images"):
            if getattr(self, name) < 2:
                raise ValueError(f"{name} must be >= 2 (KID and the covariance need two samples)")
        if not self.sample_seeds or not self.train_seeds:
            raise ValueError("at least one sampling seed and one training seed are needed")


SCALES: dict[str, ConvergenceConfig] = {
    # Training seed 0 scored at every evaluation step, seeds 1 and 2 at the last one (docs/results
    # has the measured wall time).
    "cpu": ConvergenceConfig(),
    # The larger setting for one GPU: a 32-M backbone, longer, more samples, two training seeds.
    "gpu": ConvergenceConfig(backbone="S/4", train_images=60_000, steps=20_000, batch_size=256, lr=5e-4,
                             warmup_steps=500, eval_steps=(2500, 5000, 10_000, 15_000, 20_000),
                             eval_samples=5000, final_samples=10_000, train_seeds=(0, 1), final_only_seeds=(),
                             compile="model", reference_images=10_000, sampler_steps=25, sample_batch=1000, feature_batch=200),
}


def arm_config(settings: ConvergenceConfig, arm: str, train_seed: int = 0, pack: Path | None = None,
               out: Path | None = None) -> RunConfig:
    """The trainer's config of one arm: its preset with the shared settings; nothing else differs."""
    changes = {
        "ema.warmup": True,  # short runs: warm the averages up
        "optim.global_batch": settings.batch_size, "optim.lr": settings.lr,
        "optim.warmup_epochs": 0, "optim.warmup_steps": settings.warmup_steps,
        "train.per_device_batch": settings.batch_size, "train.seed": train_seed,
        "train.log_every": 50, "train.ckpt_every": settings.ckpt_every, "train.sample_every": None,
        "train.keep_every": 2 * settings.ckpt_every,  # earlier checkpoints stay, e.g. as autoguidance guides
        "sampler.method": settings.sampler_method, "sampler.steps": settings.sampler_steps,
        "sampler.cfg_scale": settings.cfg_scale,
        "align.target_cache": "auto", "kernels.compile": settings.compile,
    }
    if pack is not None:
        changes["data.source"] = str(pack)
    if out is not None:
        changes["train.out_dir"] = str(out)
    return get_preset(f"{ARM_PRESET_PREFIX[arm]}-{settings.backbone}").replace(**changes)


# ---------------------------------------------------------------------------
# Data, reference features, scoring
# ---------------------------------------------------------------------------

def training_pack(settings: ConvergenceConfig, cache: Path) -> Path:
    """A fixed random subset of the train split (drawn from data_seed), packed once in `cache`."""
    return pack_idx_subset(settings.dataset, settings.train_images, settings.data_seed,
                           cache / "packs" / f"{settings.dataset}-{settings.train_images}-seed{settings.data_seed}")


def reference_features(settings: ConvergenceConfig, extractor, record: dict, cache: Path,
                       device: torch.device) -> Reference:
    """Features and their statistics of `reference_images` train images (drawn from the seed
    after the training subset's draw: a fixed set), cached as a statistics file with features."""
    key = settings.features.replace(":", "-").replace("/", "-")
    path = cache / f"reference-{settings.dataset}-{settings.reference_images}-seed{settings.data_seed}-{key}.npz"
    if path.is_file():
        reference = load_reference(path)
        if reference.features is not None and len(reference.features) == settings.reference_images:
            return reference
    images, labels, _ = load_idx_dataset(settings.dataset, "train", 32)
    pick = idx_subset_order(len(images), settings.reference_images, settings.data_seed + 1, settings.dataset)
    started = time.perf_counter()
    features = extract_features(ImageSet.from_tensor(images[pick], labels[pick]), extractor, settings.feature_batch,
                                device)
    print(f"reference     {len(features)} {settings.dataset} train images: {features.shape[1]}-d features "
          f"in {time.perf_counter() - started:.0f} s (cached in {path})", flush=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mu, sigma = feature_statistics(features)
    cache.mkdir(parents=True, exist_ok=True)
    reference = Reference(mu, sigma, features, {"feature_network": record})
    save_reference(path, reference)
    return reference


def sample_features(net, config: RunConfig, settings: ConvergenceConfig, count: int, seed: int, extractor,
                    device: torch.device) -> np.ndarray:
    """Features of `count` class-balanced samples (class-major) from the noise of `seed`."""
    num_classes = config.model.num_classes
    layout = class_layout(num_classes, None, math.ceil(count / num_classes))
    source = GeneratedImages(net, config, count, layout, settings.sample_batch, device, seed)
    with torch.no_grad():
        return extract_features(source, extractor, settings.feature_batch, device)


def score_row(features: np.ndarray, reference: Reference) -> dict:
    """KID (the library's defaults) and FID of the features, with their count."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # small counts: FID is biased, and reported as such
        values = scalars(score(features, reference, ("kid", "fid")))
    return {"kid_mean": values["kid_mean"], "kid_std": values["kid_std"], "fid": values["fid"],
            "num_images": len(features)}


# ---------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------

def report(out: Path) -> dict:
    """Rewrite the tables, plot and JSON of `out` from its settings and results, running nothing."""
    if not (out / "settings.json").is_file():
        raise FileNotFoundError(f"{out} holds no convergence results (no settings.json)")
    data = json.loads((out / "settings.json").read_text())
    settings = ConvergenceConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})
    saved = json.loads((out / "convergence.json").read_text()) if (out / "convergence.json").is_file() else {}
    return write_outputs(out, settings, _read_rows(out / "results.jsonl"), saved.get("scale", "custom"),
                         saved.get("feature_network", {}))


def only_adds_training_seeds(saved: dict, new: dict) -> bool:
    """True when `new` differs from `saved` only by training seeds added, each earlier seed keeping
    its role (scored along the way or at the end only): the measured rows stay valid."""
    if {k: v for k, v in saved.items() if k not in ("train_seeds", "final_only_seeds")} != \
            {k: v for k, v in new.items() if k not in ("train_seeds", "final_only_seeds")}:
        return False
    old_seeds = set(saved["train_seeds"])
    return old_seeds <= set(new["train_seeds"]) and \
        set(saved["final_only_seeds"]) == set(new["final_only_seeds"]) & old_seeds


def pending_evaluations(settings: ConvergenceConfig, rows: list[dict], arms: tuple[str, ...]) -> list[tuple]:
    """(train seed, arm, step) still to score, in run order."""
    done = {(r["train_seed"], r["arm"], r["step"]) for r in rows
            if r["sample_seed"] == "pooled" or r["step"] != settings.steps}
    return [(seed, arm, step) for seed in settings.train_seeds for arm in arms
            for step in (settings.eval_steps[-1:] if seed in settings.final_only_seeds else settings.eval_steps)
            if (seed, arm, step) not in done]


def run(settings: ConvergenceConfig, out: Path, cache: Path, device: torch.device, scale: str = "custom",
        progress: bool = True, arms: tuple[str, ...] = ARMS) -> dict:
    """Train and score every (training seed, arm of `arms`, step) not yet in `out`; returns the
    summary record of everything `out` holds."""
    unknown = [arm for arm in arms if arm not in ARMS]
    if unknown or not arms:
        raise ValueError(f"unknown arm(s) {', '.join(unknown) or '(none given)'}: choose from {', '.join(ARMS)}")
    out.mkdir(parents=True, exist_ok=True)
    settings_path, results_path = out / "settings.json", out / "results.jsonl"
    settings_dict = json.loads(json.dumps(dataclasses.asdict(settings)))
    if settings_path.is_file():
        saved = json.loads(settings_path.read_text())
        changed = sorted(k for k in settings_dict if saved.get(k) != settings_dict[k])
        if changed and not only_adds_training_seeds(saved, settings_dict):
            raise ValueError(f"{out} holds results of other settings ({', '.join(changed)} differ): "
                             "use another --out, or delete the folder to start over")
    if settings_dict != (json.loads(settings_path.read_text()) if settings_path.is_file() else None):
        write_text_atomic(settings_path, json.dumps(settings_dict, indent=2) + "\n")
    rows = _read_rows(results_path)
    pending = pending_evaluations(settings, rows, arms)
    if not pending:
        print(f"done          the runs asked for are finished in {out}; tables and plot rewritten")
        saved = json.loads((out / "convergence.json").read_text())
        return write_outputs(out, settings, rows, saved["scale"], saved["feature_network"])

    started = time.perf_counter()
    extractor, network = build_feature_extractor(settings.features, device)
    reference = reference_features(settings, extractor, network, cache, device)
    pack = training_pack(settings, cache)
    for train_seed, arm, step in pending:
        run_dir = out / "runs" / f"{arm}-seed{train_seed}"
        config = arm_config(settings, arm, train_seed, pack, run_dir).replace(**{"train.steps": step})
        tic = time.perf_counter()
        summary = train(config, progress=progress, validator=live_validator(config))
        seconds = _add_train_seconds(run_dir, step, time.perf_counter() - tic)
        new = _evaluate(run_dir, config, settings, train_seed, arm, step, seconds,
                        summary.last_metrics.get("denoise"), extractor, reference, device)
        rows = [r for r in rows if not (r["train_seed"] == train_seed and r["arm"] == arm and r["step"] == step)]
        rows.extend(new)
        write_text_atomic(results_path, "".join(json.dumps(r) + "\n" for r in rows))
        write_outputs(out, settings, rows, scale, network)
        for r in new:
            print(f"  step {step:>6}  {arm:<9} seed {train_seed}, samples {r['sample_seed']}: KID x1e3 "
                  f"{r['kid_mean'] * 1e3:.3f} ± {r['kid_std'] * 1e3:.3f}, FID {r['fid']:.2f} "
                  f"({r['num_images']} samples, {r['eval_seconds']:.0f} s)", flush=True)
    record = write_outputs(out, settings, rows, scale, network)
    print(f"wall time     {time.perf_counter() - started:.0f} s (this invocation)")
    return record


def _add_train_seconds(run_dir: Path, step: int, seconds: float) -> float:
    """Training wall time of an arm up to `step`, summed over the invocations that trained it."""
    path = run_dir / "train_seconds.json"
    spent = json.loads(path.read_text()) if path.is_file() else {}
    total = sum(v for k, v in spent.items() if int(k) < step) + seconds
    spent[str(step)] = spent.get(str(step), 0.0) + seconds
    write_text_atomic(path, json.dumps(spent))
    return total


def _evaluate(run_dir: Path, config: RunConfig, settings: ConvergenceConfig, train_seed: int, arm: str,
              step: int, train_seconds: float, loss: float | None, extractor, reference: Reference,
              device: torch.device) -> list[dict]:
    """Score the exported EMA `settings.ema` of `run_dir`'s checkpoint at `step`."""
    model_path = run_dir / "exports" / f"ema{settings.ema}-step{step:08d}.safetensors"
    export_sampling_checkpoint(find_checkpoint(run_dir), model_path, ema=settings.ema)
    saved, net, _ = load_model(model_path, device=device)
    set_attention_impl(net, config.kernels.attention)
    base = {"train_seed": train_seed, "arm": arm, "step": step, "train_seconds": round(train_seconds, 1),
            "loss": loss}
    final = step == settings.steps
    rows, pooled = [], []
    for seed in (settings.sample_seeds if final else settings.sample_seeds[:1]):
        tic = time.perf_counter()
        count = settings.final_samples if final else settings.eval_samples
        features = sample_features(net, saved, settings, count, seed, extractor, device)
        pooled.append(features)
        rows.append({**base, "sample_seed": seed, **score_row(features, reference),
                     "eval_seconds": round(time.perf_counter() - tic, 1)})
    if final:
        tic = time.perf_counter()
        rows.append({**base, "sample_seed": "pooled", **score_row(np.concatenate(pooled), reference),
                     "eval_seconds": round(time.perf_counter() - tic, 1)})
    return rows


def _read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by an interruption: that measurement is redone
                continue
    return rows


# ---------------------------------------------------------------------------
# Tables, plot, reading
# ---------------------------------------------------------------------------

CSV_COLUMNS = ("train_seed", "arm", "step", "sample_seed", "num_images", "kid_mean", "kid_std", "fid", "loss",
               "train_seconds", "eval_seconds")


def curve_rows(rows: list[dict]) -> list[dict]:
    """One row per (train seed, arm, step): the first sampling seed before the end, the pooled set at it."""
    picked: dict[tuple, dict] = {}
    for r in rows:
        key = (r["train_seed"], r["arm"], r["step"])
        if r["sample_seed"] == "pooled" or key not in picked:
            picked[key] = r
    return sorted(picked.values(), key=lambda r: (r["train_seed"], ARMS.index(r["arm"]), r["step"]))


def reading(rows: list[dict], settings: ConvergenceConfig) -> list[str]:
    """Plain statements computed from the curves: the lowest arm per step, when each arm reaches
    plain JiT's final KID, whether REPA's KID rises after its best point, and which paired
    comparisons of the last step the training seeds resolve."""
    lines = []
    curves = curve_rows(rows)
    for seed in settings.train_seeds:
        mine = [r for r in curves if r["train_seed"] == seed]
        measured = [arm for arm in ARMS if any(r["arm"] == arm for r in mine)]
        missing = [arm for arm in ARMS if arm not in measured]
        if missing:
            lines.append(f"train seed {seed}: no results yet for {', '.join(missing)}")
        for step in sorted({r["step"] for r in mine}):
            at = [r for r in mine if r["step"] == step]
            if len(at) >= 2:
                best = min(at, key=lambda r: r["kid_mean"])
                values = ", ".join(f"{r['arm']} {r['kid_mean'] * 1e3:.3f} ± {r['kid_std'] * 1e3:.3f}" for r in at)
                lines.append(f"train seed {seed}, step {step}: lowest KID {best['arm']} ({values}; x1e3)")
        none_final = [r for r in mine if r["arm"] == "none" and r["step"] == settings.steps]
        if none_final:
            goal = none_final[0]["kid_mean"]
            for arm in (a for a in ARMS[1:] if a in measured):
                hits = [r["step"] for r in mine if r["arm"] == arm and r["kid_mean"] <= goal]
                finished = any(r["arm"] == arm and r["step"] == settings.steps for r in mine)
                lines.append(f"train seed {seed}: {arm} reaches plain JiT's final KID ({goal * 1e3:.3f}e-3) "
                             + (f"at step {min(hits)} of {settings.steps}" if hits
                                else "at no evaluated step" + ("" if finished else " so far (run unfinished)")))
        repa = sorted((r for r in mine if r["arm"] == "repa"), key=lambda r: r["step"])
        if len(repa) >= 2 and repa[-1]["step"] == settings.steps:
            best = min(repa, key=lambda r: r["kid_mean"])
            last = repa[-1]
            rises = best["step"] != last["step"] and last["kid_mean"] - best["kid_mean"] > last["kid_std"]
            lines.append(f"train seed {seed}: REPA's KID {'rises' if rises else 'does not rise (beyond one std)'} "
                         f"after its best point (best {best['kid_mean'] * 1e3:.3f}e-3 at step {best['step']}, "
                         f"final {last['kid_mean'] * 1e3:.3f}e-3 ± {last['kid_std'] * 1e3:.3f}e-3)")
    for c in paired_comparisons(rows, settings):
        if len(c["seeds"]) < 2:
            continue
        lower = sum(d < 0 for d in c["differences"])
        verdict = ("resolved at 5 % by the paired t-test" if c["p_t"] is not None and c["p_t"] < 0.05
                   else "not resolved at 5 % by the paired t-test")
        lines.append(f"{c['a']} vs {c['b']}, {c['metric']}: {c['a']} lower in {lower} of {len(c['seeds'])} "
                     f"training seeds, mean difference {c['mean']:+.3f}; {verdict} (p = "
                     f"{'n/a' if c['p_t'] is None else format(c['p_t'], '.3f')}; sign flip p = {c['p_sign_flip']:.3f})")
    return lines


# Each aligned arm against plain JiT, and PixelREPA against the other two aligned arms.
PAIRS = (("repa", "none"), ("irepa", "none"), ("pixelrepa", "none"), ("pixelrepa", "repa"), ("pixelrepa", "irepa"))
METRICS = (("kid_mean", "KID x 1e3", 1e3), ("fid", "FID", 1.0))


def final_rows(rows: list[dict], settings: ConvergenceConfig) -> dict[tuple[int, str], dict]:
    """{(train seed, arm): the pooled row of the last step}."""
    return {(r["train_seed"], r["arm"]): r for r in rows
            if r["step"] == settings.steps and r["sample_seed"] == "pooled"}


def arm_summary(rows: list[dict], settings: ConvergenceConfig) -> list[dict]:
    """Per arm, the last step's pooled KID and FID over the training seeds: mean, sample std, n."""
    finals, out = final_rows(rows, settings), []
    for arm in ARMS:
        mine = [finals[(seed, arm)] for seed in settings.train_seeds if (seed, arm) in finals]
        entry = {"arm": arm, "seeds": [r["train_seed"] for r in mine]}
        for key, _, _ in METRICS:
            values = np.array([r[key] for r in mine], dtype=np.float64)
            entry[key] = {"mean": float(values.mean()) if len(values) else None,
                          "std": float(values.std(ddof=1)) if len(values) > 1 else None}
        out.append(entry)
    return out


def paired_comparisons(rows: list[dict], settings: ConvergenceConfig) -> list[dict]:
    """For each pair of `PAIRS` and metric, the per-seed differences (a - b) of the last step's
    pooled values over the training seeds both arms finished, and two tests of 'no difference':

    - the paired t-test (the mean difference over its standard error, n - 1 degrees of freedom):
      pairing by seed removes what the arms share (data order, initial weights, draws), and it
      assumes normal differences, which three seeds cannot check;
    - the exact sign-flip test (every assignment of signs to the differences equally likely under
      no difference, p = the share of assignments whose |mean| reaches the observed one): it
      assumes only symmetry, but with n seeds its smallest p is 2 / 2^n (0.25 at n = 3), so it
      cannot reject at 5 % with fewer than 6 seeds.
    """
    from scipy import stats

    finals, out = final_rows(rows, settings), []
    for a, b in PAIRS:
        seeds = [seed for seed in settings.train_seeds if (seed, a) in finals and (seed, b) in finals]
        for key, label, scale in METRICS:
            diffs = np.array([(finals[(seed, a)][key] - finals[(seed, b)][key]) * scale for seed in seeds])
            entry = {"a": a, "b": b, "metric": label, "seeds": seeds, "differences": diffs.tolist(),
                     "mean": float(diffs.mean()) if len(diffs) else None, "t": None, "p_t": None, "p_sign_flip": None}
            if len(diffs) >= 2:
                sd = diffs.std(ddof=1)
                if sd > 0:
                    entry["t"] = float(diffs.mean() / (sd / math.sqrt(len(diffs))))
                    entry["p_t"] = float(2 * stats.t.sf(abs(entry["t"]), len(diffs) - 1))
                signs = np.array(np.meshgrid(*[[-1.0, 1.0]] * len(diffs))).reshape(len(diffs), -1).T
                flipped = np.abs((signs * diffs).mean(axis=1))
                entry["p_sign_flip"] = float((flipped >= abs(diffs.mean()) - 1e-12).mean())
            out.append(entry)
    return out


def format_comparisons(rows: list[dict], settings: ConvergenceConfig) -> list[str]:
    """The per-arm summary and the paired comparisons as Markdown lines (lower is better for both)."""
    summary = arm_summary(rows, settings)
    lines = [f"Last step ({settings.steps}), pooled samples, over training seeds (mean ± sample std):", "",
             "| arm | seeds | KID x 1e3 | FID |", "|---|---|---|---|"]
    for entry in summary:
        cells = []
        for key, _, scale in METRICS:
            m, sd = entry[key]["mean"], entry[key]["std"]
            cells.append("" if m is None else f"{m * scale:.3f}" + ("" if sd is None else f" ± {sd * scale:.3f}"))
        lines.append(f"| {entry['arm']} | {', '.join(map(str, entry['seeds'])) or '-'} | " + " | ".join(cells) + " |")
    lines += ["", "Paired by training seed (same data order, initial backbone and draws): differences a - b of "
              "the last step's pooled values (negative: a is better), the paired t-test and the exact "
              "sign-flip test of no difference (two-sided; see `paired_comparisons` for what each assumes).", "",
              "| a - b | metric | per seed | mean | t | p (t-test) | p (sign flip) |", "|---|---|---|---|---|---|---|"]
    for c in paired_comparisons(rows, settings):
        per_seed = ", ".join(f"{d:+.3f} (seed {s})" for s, d in zip(c["seeds"], c["differences"])) or "-"
        fmt = lambda v, spec: "" if v is None else format(v, spec)  # noqa: E731
        lines.append(f"| {c['a']} - {c['b']} | {c['metric']} | {per_seed} | {fmt(c['mean'], '+.3f')} | "
                     f"{fmt(c['t'], '.2f')} | {fmt(c['p_t'], '.3f')} | {fmt(c['p_sign_flip'], '.3f')} |")
    return lines


def format_markdown(rows: list[dict], settings: ConvergenceConfig) -> str:
    curves = curve_rows(rows)
    lines = ["KID x 1e3 (mean ± std over 100 subsets) and FID of the EMA backbone against "
             f"{settings.reference_images:,} real train images. Intermediate steps: {settings.eval_samples:,} "
             f"samples (sampling seed {settings.sample_seeds[0]}); last step: the pooled "
             f"{settings.final_samples * len(settings.sample_seeds):,} samples of all sampling seeds.", "",
             "| train seed | step | " + " | ".join(f"{a} KID" for a in ARMS) + " | "
             + " | ".join(f"{a} FID" for a in ARMS) + " |",
             "|---|---|" + "---|" * (2 * len(ARMS))]
    for seed in settings.train_seeds:
        for step in settings.eval_steps:
            at = {r["arm"]: r for r in curves if r["train_seed"] == seed and r["step"] == step}
            if not at:
                continue
            kid = [f"{at[a]['kid_mean'] * 1e3:.3f} ± {at[a]['kid_std'] * 1e3:.3f}" if a in at else "" for a in ARMS]
            fid = [f"{at[a]['fid']:.2f}" if a in at else "" for a in ARMS]
            lines.append(f"| {seed} | {step} | " + " | ".join(kid) + " | " + " | ".join(fid) + " |")
    finals = [r for r in rows if r["step"] == settings.steps]
    if finals:
        lines += ["", f"Last step ({settings.steps}), per sampling seed ({settings.final_samples:,} samples each) "
                  "and pooled:", "",
                  "| train seed | arm | sampling seed | samples | KID x 1e3 | FID | train s |", "|---|---|---|---|---|---|---|"]
        for r in sorted(finals, key=lambda r: (r["train_seed"], ARMS.index(r["arm"]), str(r["sample_seed"]))):
            lines.append(f"| {r['train_seed']} | {r['arm']} | {r['sample_seed']} | {r['num_images']:,} | "
                         f"{r['kid_mean'] * 1e3:.3f} ± {r['kid_std'] * 1e3:.3f} | {r['fid']:.2f} | "
                         f"{r['train_seconds']:.0f} |")
    if finals:
        lines += [""] + format_comparisons(rows, settings)
    lines += ["", "Reading (computed from the table):", ""] + [f"- {line}" for line in reading(rows, settings)]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], settings: ConvergenceConfig, path: Path) -> None:
    """KID and FID against the training step: one curve per arm (and training seed)."""
    curves = curve_rows(rows)

    def series(key: str, scale: float = 1.0):
        out = []
        for seed in settings.train_seeds:
            for arm in ARMS:
                points = [(r["step"], r[key] * scale) for r in curves if r["train_seed"] == seed and r["arm"] == arm]
                label = arm if len(settings.train_seeds) == 1 else f"{arm}, seed {seed}"
                out.append((label, points))
        return out

    line_plot([Panel(f"KID against training step ({settings.dataset})", "training step", "KID x 1e3",
                     series("kid_mean", 1e3)),
               Panel(f"FID against training step ({settings.dataset})", "training step",
                     f"FID ({settings.eval_samples:,} samples; last step "
                     f"{settings.final_samples * len(settings.sample_seeds):,})", series("fid"))],
              path)


def write_outputs(out: Path, settings: ConvergenceConfig, rows: list[dict], scale: str, network: dict) -> dict:
    record = {
        "format": FORMAT,
        "scale": scale,
        "settings": dataclasses.asdict(settings),
        "arms": {arm: {"preset": f"{ARM_PRESET_PREFIX[arm]}-{settings.backbone}",
                       "align": dataclasses.asdict(arm_config(settings, arm).align)} for arm in ARMS},
        "feature_network": {k: v for k, v in network.items() if k in ("id", "network", "features", "weights_sha1")},
        "machine": f"{cpu_model()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "written": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "reading": reading(rows, settings),
        "summary": arm_summary(rows, settings),
        "paired": paired_comparisons(rows, settings),
        "rows": rows,
    }
    ordered = sorted(rows, key=lambda r: (r["train_seed"], ARMS.index(r["arm"]), r["step"], str(r["sample_seed"])))
    write_result_set(out, "convergence", ordered, CSV_COLUMNS, record, format_markdown(rows, settings),
                     lambda path: plot(rows, settings, path))
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", choices=sorted(SCALES), default="cpu",
                        help="preset sizes: cpu (default; see docs/results for its wall time) or gpu")
    parser.add_argument("--out", type=Path, required=True, help="results folder (tables, plot, JSON, the arms' runs)")
    parser.add_argument("--cache", type=Path, help="the training pack with its encoder targets, reference features "
                        "(default $PIXELREPA_CACHE/convergence or ~/.cache/pixelrepa/convergence)")
    parser.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--report", action="store_true",
                        help="only rewrite DIR's tables, plot and JSON from its results (no training)")
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS),
                        help="which arms to run now, in this order (default: none repa pixelrepa); "
                             "the tables hold every finished measurement of DIR")
    overrides = parser.add_argument_group("overrides of the scale's settings")
    for field in dataclasses.fields(ConvergenceConfig):
        flag = "--" + field.name.replace("_", "-")
        default = getattr(SCALES["cpu"], field.name)
        if isinstance(default, tuple):
            overrides.add_argument(flag, type=int, nargs="*", metavar="N")
        else:
            overrides.add_argument(flag, type=type(default), metavar=type(default).__name__.upper())
    args = parser.parse_args(argv)
    if args.report:
        report(args.out)
    else:
        changes = {f.name: tuple(v) if isinstance(v, list) else v
                   for f in dataclasses.fields(ConvergenceConfig) if (v := getattr(args, f.name)) is not None}
        settings = dataclasses.replace(SCALES[args.scale], **changes)
        device = torch.device(args.device) if args.device else pick_device()
        run(settings, args.out, args.cache or cache_dir() / "convergence", device, scale=args.scale,
            progress=not args.no_progress, arms=tuple(args.arms))
    print(f"results       {args.out}/convergence.md, .csv, .json, .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
