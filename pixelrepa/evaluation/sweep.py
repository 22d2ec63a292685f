"""Sampler sweeps: FID / KID (and the Inception Score) of a model over EMA x steps x method x schedule x guide
x CFG scale, in one process.

`run(SweepSettings(model, out, num_images, ref=..., cfg=..., ...), device)`; `pixelrepa eval sweep`
is its command line. The model is a training run (or checkpoint) folder, whose EMAs `emas` picks, or
a model file (or a folder holding `model.safetensors`), which has only its own weights. For every
setting the same N images are drawn (image k from the noise of index k and `seed`, labels
class-major with `per_class` per class: see `pixelrepa.evaluation.sample_folder`), so settings differ
only in the setting. Images are made and turned into Inception features batch by batch; only
features stay in memory. The backbone and the feature network are built once, and each EMA's
weights are loaded once for all its settings.

Every row records `nfe`, the network evaluations per image that sampling it actually ran: the images
passed through the model's forward (and the guide model's, for autoguidance), counted by a wrapper
around each forward and divided by the images made; a batched guided pass counts two per image. A
guide (`guides`, `--guide-model none PATH ...`; None / `none` is classifier-free guidance) is loaded
once through `load_model` and checked against the model (`check_guide`).

`out` gets sweep.csv, sweep.md (one row per setting), sweep.json (settings, results, the best
setting: lowest FID, else lowest KID, else highest IS; and which weights produced each metric) and
sweep.png (FID, KID and IS, those computed, against the network evaluations per image, one line per
EMA, method, schedule, guide and CFG scale; and, with several CFG scales, against the CFG scale).
They are rewritten after every setting, so an interrupted sweep keeps what it finished.

Reproduction bands: with several sampling seeds (`seeds`, `--seeds 0 1 2`) every setting is sampled
once per seed (image k from the noise of index k and that seed), and each row of sweep.csv, sweep.md
and sweep.json becomes the band of the setting over the seeds: `seeds` (those finished), `n_seeds`,
`fid_mean` / `fid_std`, `kid_mean` / `kid_std`, `is_mean` / `is_std`, where every `_std` is the sample
standard deviation over the seeds (ddof 1; empty for one seed), of the per-seed FID, KID (its mean
over the subsets) and IS (its mean over the splits). The per-seed values sit in each row's `runs`
(sweep.json), in sweep_seeds.csv (one row per setting and seed, the single-seed columns plus `seed`)
and in a second table of sweep.md. The best setting is the lowest mean FID (else mean KID, else the
highest mean IS) among the settings that have every seed; sweep.png plots the mean (no error bars:
`line_plot` draws none; the std is in the tables). The outputs are rewritten after every seed of
every setting, so an interrupted sweep keeps the seeds it finished. With one seed the outputs are
those of a single-seed sweep.

The Inception Score (metric `is`, 10 splits, torch-fidelity's split shuffle seed 2020) needs
torch-fidelity's classifier weights (`inception_weights`, or its download cache: see
`pixelrepa.evaluation.inception`); the sweep refuses to start without them. The classifier runs on
the same sampled batches as the feature network, so the images are sampled once. IS needs no
reference: a sweep of IS alone may leave out `ref`.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pixelrepa.config import RunConfig, apply_overrides
from pixelrepa.evaluation import features as feature_networks
from pixelrepa.evaluation import inception
from pixelrepa.evaluation.features import check_count, features_of, is_image_npz
from pixelrepa.sampling import class_layout, generate
from pixelrepa.loading import is_model_file, load_model, locate_model, resolve_model_path
from pixelrepa.evaluation.plots import Panel, line_plot
from pixelrepa.evaluation.sample_folder import load_guide
from pixelrepa.evaluation.results import cell, format_csv, write_result_set
from pixelrepa.files import created, write_text_atomic
from pixelrepa.evaluation.metrics import (
    DEFAULTS,
    FID_EPS,
    ImageSource,
    Reference,
    ScoreSettings,
    extract_features,
    feature_statistics,
    load_reference,
    scalars,
    score,
)

SWEEP_FORMAT = "pixelrepa-sweep/1"
SWEEP_METRICS = ("fid", "kid", "is")
SETTING_COLUMNS = ("ema", "steps", "method", "schedule", "cfg", "interval", "guide", "num_images")
"""What makes a setting: the columns every kind of row starts with."""
COLUMNS = SETTING_COLUMNS + ("nfe", "fid", "kid_mean", "kid_std", "is_mean", "is_std", "seconds")
SEED_COLUMNS = SETTING_COLUMNS + ("seed",) + COLUMNS[len(SETTING_COLUMNS):]
"""sweep_seeds.csv of a sweep over several seeds: one row per (setting, seed)."""
BAND_COLUMNS = SETTING_COLUMNS + ("seeds", "n_seeds", "nfe", "fid_mean", "fid_std", "kid_mean", "kid_std", "is_mean",
                                  "is_std", "seconds")
"""sweep.csv of a sweep over several seeds: one row per setting, each `_std` over the seeds (ddof 1)."""
BANDED = (("fid_mean", "fid_std", "fid"), ("kid_mean", "kid_std", "kid_mean"), ("is_mean", "is_std", "is_mean"))
"""(band mean column, band std column, per-seed column) of a band row."""
BAND_DDOF = 1
"""Bands report the sample standard deviation (numpy's ddof=1) over the seeds."""


@dataclass(frozen=True)
class SweepSettings:
    """One sweep: the model, the sampler settings it runs through, the metrics, the output folder."""

    model: Path
    """A model file (or a folder holding model.safetensors), or a training run or checkpoint folder."""
    out: Path
    """Folder for sweep.csv, sweep.md, sweep.json and sweep.png."""
    num_images: int
    """Images sampled per setting: at least 2 (the covariance), and at least `is_splits` for IS."""
    ref: Path | None = None
    """Reference statistics (.npz from `eval ref-stats`) or reference images; FID and KID need it."""
    metrics: tuple[str, ...] = ("fid",)
    """Of SWEEP_METRICS, each once."""
    emas: tuple[int, ...] = (1,)
    """EMAs (1-based, each once) of a training run folder; a model file has only its own weights: (1,)."""
    steps: tuple[int, ...] | None = None
    """Sampler step counts (each once); None: the model's."""
    cfg: tuple[float, ...] | None = None
    """CFG scales (each once); None: the model's."""
    methods: tuple[str, ...] | None = None
    """Solvers (`sampler.method`: heun, euler, dpm2m, dpm3m; each once); None: the model's."""
    schedules: tuple[str, ...] | None = None
    """Time grids (`sampler.schedule`: uniform, shifted, edm; each once); None: the model's."""
    guides: tuple[Path | None, ...] = (None,)
    """Guidance by: None (classifier-free, the unconditional pass) or a weaker model of the same data
    (autoguidance; model file, run or checkpoint folder, its EMA 1); each once."""
    interval: tuple[float, float] | None = None
    """Guidance interval (min, max); None: the model's."""
    per_class: int | None = None
    """Consecutive images per class; None: `num_images` spread over every class."""
    batch_size: int = 50
    seed: int = 0
    """Sampling seed: image k is drawn from the noise of index k and this seed."""
    seeds: tuple[int, ...] | None = None
    """Sampling seeds (each once) for reproduction bands, each setting sampled once per seed; None: (seed,)."""
    kid_subsets: int = DEFAULTS.kid_subsets
    kid_subset_size: int = DEFAULTS.kid_subset_size
    is_splits: int = DEFAULTS.is_splits
    inception_weights: str | None = None
    """torch-fidelity's classifier weights for the Inception Score; None: its download cache."""

    @property
    def scores(self) -> ScoreSettings:
        """The KID and IS settings; their seeds are the defaults (`seed` is the sampling seed here)."""
        return dataclasses.replace(DEFAULTS, kid_subsets=self.kid_subsets, kid_subset_size=self.kid_subset_size,
                                   is_splits=self.is_splits)


# ---------------------------------------------------------------------------
# The sweep
# ---------------------------------------------------------------------------

class CountingNetwork:
    """net(z, t, y) that counts the images it evaluates (z's batch size, summed over its calls)."""

    def __init__(self, net):
        self.net, self.images = net, 0

    def __call__(self, z: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.images += z.shape[0]
        return self.net(z, t, y)


class GeneratedImages:
    """An `ImageBatches` that samples the images on the fly (`batch_size` images per sampler pass);
    `nfe` is the network evaluations per image made so far, counted."""

    def __init__(self, net, config: RunConfig, num_images: int, layout, batch_size: int, device, seed: int,
                 guide=None):
        self.net, self.config, self.num_images, self.layout = CountingNetwork(net), config, num_images, layout
        self.guide = None if guide is None else CountingNetwork(guide)
        self.batch_size, self.device, self.seed, self.made = batch_size, device, seed, 0

    def __len__(self) -> int:
        return self.num_images

    @property
    def nfe(self) -> float | None:
        evaluated = self.net.images + (0 if self.guide is None else self.guide.images)
        return evaluated / self.made if self.made else None

    def batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        for _, images in generate(self.net, self.config, range(self.num_images), self.layout, self.batch_size,
                                  self.device, self.seed, self.guide):
            self.made += len(images)
            yield images


def run(settings: SweepSettings, device: torch.device) -> dict:
    """Sample and score every (EMA, steps, CFG) setting, rewriting the outputs after each; returns the
    record of sweep.json. The model, the reference and the classifier weights are checked before any
    network is built."""
    from pixelrepa.models.layers import set_attention_impl

    model, metrics = locate_model(settings.model), list(settings.metrics)
    if not model.exists():
        raise FileNotFoundError(f"no model file or training run at {model}")
    model_file = is_model_file(model)
    if model_file and list(settings.emas) != [1]:
        raise ValueError(f"{model} is a model file with one set of weights: --ema {' '.join(map(str, settings.emas))} "
                         "picks EMAs of a training run folder; pass the run folder, or leave --ema out")
    found = feature_networks.resolve_classifier(metrics, settings.inception_weights)
    if "is" in metrics and found is None:
        raise ValueError(f"the Inception Score is {inception.classifier_missing_reason()}")
    reference, ref_info = None, None
    if settings.ref is not None and {"fid", "kid"} & set(metrics):
        reference, ref_info = _reference(settings.ref, "kid" in metrics, settings.batch_size, device)
        if reference.features is not None and "kid" in metrics and len(reference.features) < 2:
            raise ValueError(f"{settings.ref} holds {len(reference.features)} feature row(s); KID needs at least 2")

    paths = {e: resolve_model_path(model, e) for e in settings.emas} if not model_file else \
        {None: resolve_model_path(model, 1)}
    for guide in settings.guides:
        if guide is not None and not Path(guide).exists():
            raise FileNotFoundError(f"no guide model at {guide}")
    extractor, network = inception.load_extractor(device), inception.describe()
    classifier = None
    if found is not None:  # one pass per batch through both networks: the images are sampled once
        classifier_net, classifier = feature_networks.build_classifier(found, device)
        extractor = feature_networks.WithClassifier(feature_networks.InceptionFeatures(extractor), classifier_net)
    seeds = list(dict.fromkeys(settings.seeds)) if settings.seeds else [settings.seed]
    banded = len(seeds) > 1
    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    record = {"format": SWEEP_FORMAT, "model": str(model.resolve()),
              "model_files": {("model" if e is None else str(e)): str(p.resolve()) for e, p in paths.items()},
              "guide_files": {str(g): str(resolve_model_path(Path(g)).resolve()) for g in settings.guides if g},
              "reference": ref_info, "feature_network": network, "classifier": classifier,
              "weights": feature_networks.weights_by_metric(metrics, {"id": "inception", **network}, classifier),
              "settings": None, "results": [], "best": None, "warnings": [], "created": created()}
    if classifier is not None and not classifier["matches_published"]:
        record["warnings"].append(feature_networks.unpublished_note(classifier))
        print(f"warning: {record['warnings'][-1]}", file=sys.stderr)
    guide_nets: dict = {}
    for ema, path in paths.items():
        config, net, _ = load_model(path, device=device)
        set_attention_impl(net, config.kernels.attention)
        for guide in settings.guides:
            if guide is not None and guide not in guide_nets:
                guide_nets[guide] = load_guide(Path(guide), config, device)
        if record["settings"] is None:
            per_class = settings.per_class or max(1, math.ceil(settings.num_images / config.model.num_classes))
            layout = class_layout(config.model.num_classes, None, per_class)
            record["settings"] = {
                "emas": list(paths), "steps": list(settings.steps or [config.sampler.steps]),
                "cfg": list(settings.cfg or [config.sampler.cfg_scale]),
                "methods": list(settings.methods or [config.sampler.method]),
                "schedules": list(settings.schedules or [config.sampler.schedule]),
                "guides": [None if g is None else str(g) for g in settings.guides],
                "interval": list(settings.interval or [config.sampler.interval_min, config.sampler.interval_max]),
                "num_images": settings.num_images, "per_class": layout.per_class,
                "seed": None if banded else seeds[0], "seeds": seeds,
                "metrics": metrics, "batch_size": settings.batch_size, "device": str(device), "fid_eps": FID_EPS,
                "kid_subsets": settings.kid_subsets, "kid_subset_size": settings.kid_subset_size,
                "kid_seed": DEFAULTS.kid_seed, "is_splits": settings.is_splits, "is_seed": DEFAULTS.is_seed,
                "inception_weights": settings.inception_weights}
            if banded:
                record["settings"]["band_std"] = f"sample standard deviation over the seeds (ddof={BAND_DDOF})"
        s = record["settings"]
        axes = itertools.product(s["steps"], s["methods"], s["schedules"], settings.guides, s["cfg"])
        for steps, method, schedule, guide, cfg in axes:
            setting = apply_overrides(config, {"sampler.steps": steps, "sampler.cfg_scale": cfg,
                                               "sampler.method": method, "sampler.schedule": schedule,
                                               "sampler.interval_min": s["interval"][0],
                                               "sampler.interval_max": s["interval"][1]})
            runs = []
            for seed in seeds:
                row = evaluate_setting(net, setting, layout, settings, reference, extractor, device, record, seed,
                                       guide_nets.get(guide))
                row["ema"], row["seed"], row["guide"] = ema, seed, None if guide is None else str(guide)
                result = {k: row[k] for k in (SEED_COLUMNS if banded else COLUMNS)} | {"kid": row.get("kid"),
                                                                                       "is": row.get("is")}
                if banded:  # the setting's row is its band over the seeds finished so far
                    runs.append(result)
                    if len(runs) > 1:
                        record["results"].pop()
                    result = band_row(runs)
                record["results"].append(result)
                record["best"] = best_setting([r for r in record["results"]
                                               if not banded or r["n_seeds"] == len(seeds)])
                write_outputs(out, record)
    return record


def evaluate_setting(net, config: RunConfig, layout, settings: SweepSettings, reference: Reference | None,
                     extractor, device, record: dict, seed: int | None = None, guide=None) -> dict:
    """Sample the images of one setting with `seed` (default: `settings.seed`), their features (and
    classifier logits, when `extractor` is a `WithClassifier`) batch by batch, and the metrics."""
    s = config.sampler
    seed = settings.seed if seed is None else seed
    start = time.perf_counter()
    source = GeneratedImages(net, config, settings.num_images, layout, settings.batch_size, device, seed, guide)
    label = f"{s.method} {s.steps} steps {s.schedule}, {'guide' if guide is not None else 'CFG'} {s.cfg_scale:g}" + (
        f", seed {seed}" if settings.seeds else "")
    with tqdm(total=settings.num_images, desc=label, unit="img", dynamic_ncols=True, disable=None) as bar:
        features = extract_features(source, extractor, settings.batch_size, device, bar.update)
    logits = None
    if isinstance(extractor, feature_networks.WithClassifier):
        features, logits = extractor.split(features)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        values = score(features, reference, settings.metrics, settings.scores, logits)
    for w in caught:
        if str(w.message) not in record["warnings"]:
            record["warnings"].append(str(w.message))
            print(f"warning: {w.message}", file=sys.stderr)
    row = {"steps": s.steps, "method": s.method, "schedule": _schedule_name(s), "cfg": s.cfg_scale,
           "interval": f"{s.interval_min:g}-{s.interval_max:g}", "guide": None, "num_images": len(features),
           "nfe": source.nfe,
           "fid": None, "kid_mean": None, "kid_std": None, "is_mean": None, "is_std": None,
           **scalars(values), "kid": values.get("kid"), "is": values.get("is")}
    row["seconds"] = round(time.perf_counter() - start, 3)
    return row


def _schedule_name(sampler) -> str:
    """The schedule with its parameter: uniform, shifted-3, edm-7."""
    return {"uniform": "uniform", "shifted": f"shifted-{sampler.shift:g}", "edm": f"edm-{sampler.rho:g}"}[sampler.schedule]


def _reference(path: Path, needs_features: bool, batch_size: int, device) -> tuple[Reference, dict]:
    """Reference statistics from a stats .npz (checked for features when KID needs them) or an image source."""
    if path.is_file() and path.suffix == ".npz" and not is_image_npz(path):
        reference = load_reference(path, inception.FEATURE_DIM)
        made_with = ((reference.meta or {}).get("feature_network") or {}).get("id")
        if made_with not in (None, "inception"):
            raise ValueError(f"{path} holds statistics of the {made_with} features; a sweep needs Inception ones")
        batch = feature_networks.reference_batch(path, reference) if needs_features else None
        if batch is not None:  # ADM's reference batch: its features, with this sweep's network
            reference.features, _ = features_of(batch, inception.load_extractor(device), batch_size, device,
                                                "reference batch")
        return reference, {"path": str(path.resolve()), "kind": "statistics",
                           "count": None if reference.features is None else len(reference.features),
                           "reference_batch": batch is not None, "made_by": reference.meta}
    source = ImageSource(path)
    check_count(len(source), "REF")
    features, _ = features_of(source, inception.load_extractor(device), batch_size, device, "reference")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mu, sigma = feature_statistics(features)
    return Reference(mu, sigma, features), source.describe()


# ---------------------------------------------------------------------------
# Results: best setting, tables, plot
# ---------------------------------------------------------------------------

def _finite(value) -> bool:
    return value is not None and math.isfinite(value)


def band(values) -> dict | None:
    """The band of per-seed values: mean, sample standard deviation (ddof 1, as numpy's
    `np.std(values, ddof=1)`; None for one value) and n, over the finite values; None when there are none."""
    finite = [float(v) for v in values if _finite(v)]
    if not finite:
        return None
    std = float(np.std(finite, ddof=BAND_DDOF)) if len(finite) > BAND_DDOF else None
    return {"mean": float(np.mean(finite)), "std": std, "n": len(finite), "ddof": BAND_DDOF}


def band_row(runs: list[dict]) -> dict:
    """The row of one setting over its seeds: the setting, the bands (BAND_COLUMNS) and the per-seed rows."""
    first = runs[0]
    row = {k: first[k] for k in SETTING_COLUMNS} | {"seeds": [r["seed"] for r in runs], "n_seeds": len(runs)}
    counted = [r["nfe"] for r in runs if r["nfe"] is not None]
    row["nfe"] = float(np.mean(counted)) if counted else None
    for mean_key, std_key, key in BANDED:
        values = band(r[key] for r in runs)
        row[mean_key], row[std_key] = (values["mean"], values["std"]) if values else (None, None)
    return row | {"seconds": round(sum(r["seconds"] for r in runs), 3), "runs": runs}


def _is_band(rows: list[dict]) -> bool:
    return bool(rows) and "runs" in rows[0]


RANKING = (("fid", min, "FID lowest"), ("kid_mean", min, "KID lowest"), ("is_mean", max, "IS highest"))
BAND_RANKING = (("fid_mean", min, "mean FID lowest"), ("kid_mean", min, "mean KID lowest"),
                ("is_mean", max, "mean IS highest"))


def _ranking(rows: list[dict]) -> tuple[str, object, str]:
    """The first of FID, KID, IS (their means over the seeds for band rows) that some row has:
    (key, min or max, its description)."""
    table = BAND_RANKING if _is_band(rows) else RANKING
    return next((entry for entry in table if any(_finite(r.get(entry[0])) for r in rows)), table[0])


def best_criterion(rows: list[dict]) -> str:
    return _ranking(rows)[2]


def best_setting(rows: list[dict]) -> dict | None:
    """The row with the lowest FID, else the lowest KID mean, else the highest Inception Score (for band
    rows: the lowest mean FID over the seeds, and so on)."""
    key, pick, _ = _ranking(rows)
    candidates = [r for r in rows if _finite(r.get(key))]
    return pick(candidates, key=lambda r: r[key]) if candidates else None


def _plus_minus(name: str, mean: float | None, std: float | None) -> str:
    if mean is None:
        return ""
    return f"{name} {mean:.4g}" + ("" if std is None else f" ± {std:.2g}")


def describe_row(row: dict | None) -> str:
    if row is None:
        return "none"
    setting = _describe_setting(row)
    if "runs" in row:
        values = [_plus_minus(name, row[m], row[s]) for name, (m, s, _) in zip(("FID", "KID", "IS"), BANDED)]
        return setting + ", ".join(v for v in values if v) + f" ({row['n_seeds']} seeds, sample std)"
    values = [f"FID {row['fid']:.4g}" if row["fid"] is not None else "",
              f"KID {row['kid_mean']:.4g}" if row["kid_mean"] is not None else "",
              f"IS {row['is_mean']:.4g}" if row.get("is_mean") is not None else ""]
    return setting + ", ".join(v for v in values if v)


def _describe_setting(row: dict) -> str:
    """'EMA 1, heun 50 steps (uniform), CFG 3.1, 99 evaluations per image: '."""
    ema = "model" if row["ema"] is None else f"EMA {row['ema']}"
    guidance = f"CFG {row['cfg']:g}" if row.get("guide") is None else f"guide {row['guide']} weight {row['cfg']:g}"
    nfe = "" if row.get("nfe") is None else f", {row['nfe']:g} evaluations per image"
    return f"{ema}, {row['method']} {row['steps']} steps ({row.get('schedule')}), {guidance}{nfe}: "


def _columns(rows: list[dict]) -> tuple[str, ...]:
    """COLUMNS for single-seed rows, SEED_COLUMNS for per-seed rows, BAND_COLUMNS for band rows."""
    if _is_band(rows):
        return BAND_COLUMNS
    return SEED_COLUMNS if rows and "seed" in rows[0] else COLUMNS


MARKDOWN_BAND_COLUMNS = SETTING_COLUMNS + ("seeds", "nfe", "fid", "kid", "is", "seconds")
"""sweep.md's band table: each metric as `mean ± std` over the seeds."""


def _markdown_cells(row: dict, columns: tuple[str, ...]) -> list[str]:
    if "runs" not in row:
        return [cell(row[c]) or "-" for c in columns]
    bands = {key: (m, s) for key, (m, s, _) in zip(("fid", "kid", "is"), BANDED)}
    cells = []
    for c in columns:
        if c in bands:
            mean, std = (row[k] for k in bands[c])
            cells.append("-" if mean is None else cell(mean) + ("" if std is None else f" ± {std:.2g}"))
        else:
            cells.append(cell(row[c]) or "-")
    return cells


def format_markdown(rows: list[dict], best: dict | None = None) -> str:
    """One row per setting (per setting and seed for per-seed rows); band rows show `mean ± std` cells."""
    columns = MARKDOWN_BAND_COLUMNS if _is_band(rows) else _columns(rows)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = _markdown_cells(row, columns)
        if best is not None and row is best:
            cells = [f"**{c}**" for c in cells]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_outputs(out: Path, record: dict) -> None:
    """sweep.csv, sweep.md, sweep.json and sweep.png (and sweep_seeds.csv for band rows)."""
    rows, best = record["results"], record["best"]
    markdown = "# Sampler sweep\n\n"
    if not _is_band(rows):
        markdown += format_markdown(rows, best) + f"\nBest: {describe_row(best)}\n"
    else:
        runs = [run for row in rows for run in row["runs"]]
        write_text_atomic(out / "sweep_seeds.csv", format_csv(runs, _columns(runs)))
        markdown += (f"Mean ± sample standard deviation (ddof={BAND_DDOF}) over the sampling seeds.\n\n"
                     + format_markdown(rows, best) + f"\nBest: {describe_row(best)}\n\n## Per seed\n\n"
                     + format_markdown(runs))
    write_result_set(out, "sweep", rows, _columns(rows), record, markdown, lambda path: plot(rows, path))


def _series(rows: list[dict], key: str, x: str) -> list[tuple[str, list[tuple[float, float]]]]:
    """One (label, sorted (x, value) points) per setting but `x` (and the steps, with x the evaluations),
    over the rows with values of `key`."""
    fixed = {"nfe": ("ema", "method", "schedule", "guide", "cfg"), "cfg": ("ema", "method", "schedule", "guide", "steps")}[x]
    groups: dict[tuple, list] = {}
    for r in rows:
        if _finite(r.get(key)) and _finite(r.get(x)):
            groups.setdefault(tuple(r.get(c) for c in fixed), []).append((float(r[x]), float(r[key])))
    return [(", ".join(_label(c, v) for c, v in zip(fixed, group) if len({r.get(c) for r in rows}) > 1) or "all",
             sorted(points)) for group, points in groups.items()]


def _label(column: str, value) -> str:
    if column == "ema":
        return "model" if value is None else f"EMA {value}"
    if column == "guide":
        return "CFG" if value is None else f"guide {Path(value).name}"
    if column == "steps":
        return f"{value} steps"
    return f"w {value:g}" if column == "cfg" else str(value)


def plot(rows: list[dict], path: Path) -> None:
    """FID, KID and IS (those computed) against the counted network evaluations per image, one line per
    other setting; with several CFG scales also against the CFG scale. For band rows their means over
    the seeds (without error bars: the std is in the tables)."""
    keys = (("fid_mean", "FID"), ("kid_mean", "KID"), ("is_mean", "IS")) if _is_band(rows) else \
        (("fid", "FID"), ("kid_mean", "KID"), ("is_mean", "IS"))
    mean = "mean " if _is_band(rows) else ""
    panels = [Panel(f"{mean}{title} against evaluations", "network evaluations per image", f"{mean}{title}",
                    _series(rows, key, "nfe")) for key, title in keys]
    if len({r["cfg"] for r in rows}) > 1:
        panels += [Panel(f"{mean}{title} against CFG scale", "CFG scale", f"{mean}{title}", _series(rows, key, "cfg"))
                   for key, title in keys]
    line_plot(panels, path)
