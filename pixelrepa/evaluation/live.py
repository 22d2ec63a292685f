"""Evaluation during training (`eval.every`): EMA 1 scored every N steps, in memory.

`LiveEvaluator(config, world)` is built once, when the run starts: it loads and checks the
references (`eval.ref`: Inception statistics for FID, with stored features or ADM's reference
batch `arr_0` (featurised once, here) also KID;
`eval.encoder_ref`: statistics of an encoder's mean-pooled patch tokens, made with
`pixelrepa eval ref-stats ... --features encoder:NAME`, for FD in that space: the encoder is the one
named in the file) and builds the feature networks, so a wrong file stops the run before its first
step. `evaluator(net, step)` then samples `eval.images` images from `net` with the run's
sampler settings, fixed noise (image k from `eval.seed` and k: `generate.image_noise`) and
fixed class-major labels (`generate.class_layout`, ceil(K / classes) per class, as `eval sweep`
lays them out), so the same images come from the same weights at every evaluation. Under
torchrun each rank samples and featurises its contiguous slice (`features.rank_slice`) and the
features are gathered to rank 0 in image order, which computes the numbers; the other ranks get
None.

The numbers are those of `pixelrepa eval` on the same images written to a folder (FID with eps
`metrics.FID_EPS`; KID with that command's defaults, `metrics.DEFAULTS`), both through `metrics.score`, so a
live curve and an offline evaluation agree to float rounding. With `eval.align` the
alignment probe (`probe.align_probe`) runs at the tap block on a fixed seeded subset of the
training pack, against the run's alignment encoder, at `probe.DEFAULT_T`.

Nothing here draws from the global RNGs (torch's CPU and device generators, numpy's, Python's):
networks are built and images sampled inside `preserved_rng`, which restores them, and every
draw of the evaluation comes from its own seeded generator; training with evaluation on gives
the losses of training with it off, and resumes bit-identically.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.linalg
import torch
from torch import nn

from pixelrepa.config import RunConfig
from pixelrepa.evaluation import features as feature_networks
from pixelrepa.sampling import class_layout, generate
from pixelrepa.evaluation.metrics import (DEFAULTS, ImageSource, Reference, SmallSampleWarning, extract_feature_sets,
                                         load_reference, scalars, score)
from pixelrepa.evaluation.plots import Panel, line_plot
from pixelrepa.files import read_jsonl
from pixelrepa.rng import preserved_rng


@dataclass
class FeatureSpace:
    """One feature network and the reference its features are scored against."""

    name: str
    """'inception' or 'encoder'."""
    path: Path
    reference: Reference
    extractor: nn.Module | None = None
    record: dict | None = None


def _load(path: str, field: str) -> Reference:
    try:
        return load_reference(path)
    except (OSError, ValueError) as err:
        raise ValueError(f"eval.{field}: {err}") from None


def _encoder_spec(path: str, reference: Reference) -> tuple[str, str | None]:
    """The `--features` spec (and weights file) that made an encoder reference, from its `meta`."""
    network = (reference.meta or {}).get("feature_network")
    made_with = feature_networks.network_id(reference.meta)
    if not made_with.startswith(feature_networks.ENCODER_PREFIX) or not isinstance(network, dict):
        raise ValueError(f"eval.encoder_ref: {path} was made with feature network '{made_with}', not an "
                         "encoder: make it with `pixelrepa eval ref-stats SRC OUT.npz --features encoder:NAME`")
    weights = (network.get("encoder") or {}).get("weights") if network.get("weights_sha256") else None
    if weights is not None and not Path(weights).is_file():
        raise ValueError(f"eval.encoder_ref: {path} was made with the encoder weights {weights}, "
                         "which are not there any more")
    return made_with.split("@")[0], weights


@dataclass
class _RankImages:
    """This rank's evaluation images, sampled by `net` (an `ImageBatches`)."""

    evaluator: "LiveEvaluator"
    net: nn.Module

    def __len__(self) -> int:
        return len(self.evaluator.indices())

    def batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        return (images for _, images in self.evaluator.images(self.net, batch_size))


class LiveEvaluator:
    """Scores a backbone against the run's references: `evaluator(net, step)` (see the module
    docstring). Collective under torchrun: every rank calls it with the same weights."""

    def __init__(self, config: RunConfig, world=None, device: torch.device | str | None = None):
        ev = config.eval
        self.config, self.world = config, world
        self.device = torch.device(device if device is not None else world.device if world else "cpu")
        self.rank, self.world_size = (world.rank, world.world_size) if world is not None else (0, 1)
        self.num_images, self.batch_size, self.seed = ev.images, ev.batch, ev.seed
        per_class = max(1, math.ceil(self.num_images / config.model.num_classes))
        self.layout = class_layout(config.model.num_classes, None, per_class)
        self.notes: list[str] = []
        # References first: a wrong file is refused before any network is built.
        self.spaces: list[FeatureSpace] = []
        if ev.ref is not None:
            reference = _load(ev.ref, "ref")
            identity, dim = feature_networks.identify(feature_networks.INCEPTION)
            _checked(feature_networks.check_reference, "ref", ev.ref, reference, identity, dim)
            self.spaces.append(FeatureSpace("inception", Path(ev.ref), reference))
        if ev.encoder_ref is not None:
            reference = _load(ev.encoder_ref, "encoder_ref")
            spec, weights = _encoder_spec(ev.encoder_ref, reference)
            identity, dim = feature_networks.identify(spec, weights)
            _checked(feature_networks.check_reference, "encoder_ref", ev.encoder_ref, reference, identity,
                     dim)
            self.spaces.append(FeatureSpace("encoder", Path(ev.encoder_ref), reference))
            self.encoder_spec, self.encoder_weights = spec, weights
        inception_space = self._space("inception")
        batch, reference_count = None, 0
        if inception_space is not None and inception_space.reference.features is not None:
            reference_count = len(inception_space.reference.features)
        elif inception_space is not None and inception_space.reference.batch_images is not None:
            batch = ImageSource(inception_space.path)  # ADM's reference batch `arr_0`: features computed below
            reference_count = len(batch)
            self.notes.append(f"KID against the {len(batch)} images of the reference batch in {inception_space.path}, "
                              "their features computed once when the run starts")
        self.kid = reference_count >= 2
        if inception_space is not None and not self.kid:
            self.notes.append(f"{inception_space.path} holds no reference features: KID is not computed (make the "
                              "file with `pixelrepa eval ref-stats SRC OUT.npz --keep-features`)")
        for space in self.spaces:
            dim = len(space.reference.mu)
            if self.num_images <= dim:
                self.notes.append(f"{self.num_images} evaluation images for {dim}-d {space.name} features: the "
                                  "covariance is singular and the Frechet distance strongly biased (a trend, not "
                                  "a comparable number)")
        self.probe = None
        if ev.align:
            self.probe = _probe_inputs(config)
        with preserved_rng(self.device):  # building networks initialises weights from the global RNG
            for space in self.spaces:
                spec = feature_networks.INCEPTION if space.name == "inception" else self.encoder_spec
                weights = None if space.name == "inception" else self.encoder_weights
                space.extractor, space.record = feature_networks.build_feature_extractor(spec, self.device, weights)
            if self.probe is not None:
                from pixelrepa.align.encoders import build_encoder

                self.probe["encoder"] = build_encoder(config.align.encoder).to(self.device).eval()
        if batch is not None:  # collective; rank 0 gets the features (and alone scores)
            inception_space.reference.features, _ = feature_networks.features_of(
                batch, inception_space.extractor, self.batch_size, self.device, "reference batch", world)

    def _space(self, name: str) -> FeatureSpace | None:
        return next((s for s in self.spaces if s.name == name), None)

    def indices(self) -> range:
        """This rank's images: a contiguous slice of 0 .. eval.images - 1."""
        return range(*feature_networks.rank_slice(self.num_images, self.rank, self.world_size))

    def images(self, net: nn.Module, batch_size: int | None = None) -> Iterator[tuple[list[int], torch.Tensor]]:
        """This rank's evaluation images in batches of `batch_size` (default `eval.batch`): (indices,
        uint8 (n, C, H, W) on the CPU). Image k is the same whatever the batching."""
        return generate(net, self.config, self.indices(), self.layout, batch_size or self.batch_size, self.device,
                        self.seed)

    @torch.no_grad()
    def __call__(self, net: nn.Module, step: int) -> dict | None:
        """Sample, featurise and score; on rank 0 {"step", "images", "fid", "kid_mean", "kid_std",
        "fd_encoder", "align_*", "seconds", ...} (the metrics whose references are set), None elsewhere."""
        start = time.perf_counter()
        was_training = net.training
        net.eval()
        with preserved_rng(self.device):
            try:
                features, error = self._features(net), None
            except Exception as err:  # raised on every rank below, so no rank waits in the gather
                features, error = None, f"rank {self.rank}: {err}"
            finally:
                net.train(was_training)
            features = self._gather(features, error)
            sample_seconds = time.perf_counter() - start
            if features is None:
                return None
            record = {"step": step, "images": self.num_images}
            record.update(self.score(features))
            if self.probe is not None:
                probe_start = time.perf_counter()
                record.update(self._align(net))
                record["align_seconds"] = round(time.perf_counter() - probe_start, 3)
        record["sample_seconds"] = round(sample_seconds, 3)
        record["seconds"] = round(time.perf_counter() - start, 3)
        return record

    def _features(self, net: nn.Module) -> dict[str, np.ndarray]:
        """{space: float32 (n, D)} of this rank's images, sampled once for every feature network."""
        if not self.spaces:  # the alignment probe alone: nothing to sample
            return {}
        return extract_feature_sets(_RankImages(self, net), {s.name: s.extractor for s in self.spaces},
                                    self.batch_size, self.device)

    def _gather(self, features: dict | None, error: str | None) -> dict[str, np.ndarray] | None:
        """Every rank's features on rank 0, in image order (None elsewhere); a failure anywhere is raised
        on every rank."""
        if error is not None:
            error = f"evaluation failed: {error}"
        gathered = feature_networks.gather_in_order(features, self.indices().start, error, self.world_size, self.rank,
                                                    RuntimeError)
        if gathered is None:
            return None
        return {s.name: np.concatenate([part[s.name] for part in gathered if len(part[s.name])]) for s in self.spaces}

    def score(self, features: dict[str, np.ndarray]) -> dict[str, float]:
        """The metrics of gathered features {space: (N, D)}: fid, kid_mean, kid_std, fd_encoder."""
        out: dict[str, float] = {}
        for space in self.spaces:
            rows = features[space.name]
            if len(rows) != self.num_images:
                raise RuntimeError(f"{len(rows)} {space.name} feature rows for {self.num_images} images")
            metrics = ("fid", "kid") if space.name == "inception" and self.kid else ("fid",)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", SmallSampleWarning)  # said once, in `notes`
                if len(rows) <= len(space.reference.mu):  # singular covariance: also said in `notes`
                    warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
                values = scalars(score(rows, space.reference, metrics))
            if space.name == "encoder":
                values = {"fd_encoder": values["fid"]}
            out.update(values)
        return out

    def _align(self, net: nn.Module) -> dict[str, float]:
        """The alignment probe at the tap block: {"align_{metric}_t{t}": value}."""
        from pixelrepa.evaluation import probe

        inputs = self.probe
        batches = probe.pack_batches(inputs["pack"], inputs["indices"], self.batch_size)
        k = min(probe.DEFAULT_K, len(inputs["indices"]) - 1)
        table = probe.align_probe(net, inputs["encoder"], batches, blocks=[self.config.tap_block],
                                  ts=probe.DEFAULT_T, k=k, seed=self.seed,
                                  noise_scale=self.config.objective.noise_scale)
        return {f"align_{metric}_t{t:g}": float(value) for (_, t), values in sorted(table.items())
                for metric, value in values.items()}

    def describe(self) -> dict:
        """What the evaluation does, for the log: references, networks, image layout, notes."""
        return {"images": self.num_images, "seed": self.seed, "per_class": self.layout.per_class,
                "world_size": self.world_size, "sampler": dataclasses.asdict(self.config.sampler),
                "references": {s.name: str(s.path.resolve()) for s in self.spaces},
                "feature_networks": {s.name: (s.record or {}).get("id") for s in self.spaces},
                "kid": self.kid and {"subsets": DEFAULTS.kid_subsets, "subset_size": DEFAULTS.kid_subset_size,
                                     "seed": DEFAULTS.kid_seed},
                "align": self.probe is not None, "notes": list(self.notes)}

    def plot(self, log_path: Path) -> Path | None:
        """The run folder's `eval.png` from every evaluation of the log so far (None: nothing to draw)."""
        path = Path(self.config.train.out_dir) / CURVE_NAME
        return path if plot_eval_curves(log_path, path) else None


CURVE_NAME = "eval.png"
"""The run folder's plot of every evaluation so far, rewritten after each."""


def eval_curves(log_path: str | Path) -> dict[str, list[tuple[float, float]]]:
    """{metric: [(step, value), ...]} of the evaluation records of a run's log.jsonl, by step; a
    metric missing from some evaluations has only the steps it was measured at."""
    curves: dict[str, list[tuple[float, float]]] = {}
    for entry in read_jsonl(log_path):
        for key, value in (entry.get("eval") or {}).items():
            if key not in ("images",) and not key.endswith("seconds") and isinstance(value, (int, float)):
                curves.setdefault(key, []).append((float(entry["step"]), float(value)))
    return {key: sorted(points) for key, points in curves.items()}


def live_validator(config: RunConfig):
    """What `train(config, validator=...)` takes for `eval.every`: a `LiveEvaluator` built
    for each process once its process group is up; None when the run does not evaluate."""
    return functools.partial(LiveEvaluator, config) if config.eval.every else None


def plot_eval_curves(log_path: str | Path, path: str | Path) -> bool:
    """Plot a run's evaluations (`eval_curves`) against the training step: FID and FD in the encoder's
    space, KID x 1e3, and the alignment probe's CKNNA / CKA per t. False when the log holds none."""
    curves = eval_curves(log_path)
    if not curves:
        return False
    distances = [(name, curves[key]) for key, name in (("fid", "FID (Inception)"), ("fd_encoder", "FD (encoder)"))
                 if key in curves]
    panels = [Panel("Frechet distances", "training step", "FD", distances),
              Panel("KID", "training step", "KID x 1e3",
                    [("KID (Inception)", [(x, 1e3 * y) for x, y in curves.get("kid_mean", [])])])]
    for metric, title in (("cknna", "CKNNA at the tap block"), ("cka", "linear CKA at the tap block")):
        prefix = f"align_{metric}_t"
        panels.append(Panel(title, "training step", metric,
                            [(f"t={key[len(prefix):]}", points) for key, points in curves.items()
                             if key.startswith(prefix)]))
    line_plot(panels, Path(path))
    return True


def _checked(check, field: str, *args) -> None:
    try:
        check(*args)
    except (OSError, ValueError) as err:
        raise ValueError(f"eval.{field}: {err}") from None


def _probe_inputs(config: RunConfig) -> dict:
    """The pack and the fixed image subset of the alignment probe."""
    from pixelrepa.data.packed import MANIFEST, PackedDataset
    from pixelrepa.evaluation import probe

    source = Path(config.data.source)
    if not (source / MANIFEST).is_file():
        raise ValueError(f"eval.align probes on training images from a pack folder (`pixelrepa data pack`); "
                         f"data.source {config.data.source!r} is not one")
    pack = PackedDataset(source)
    indices = probe.probe_indices(len(pack), config.eval.align_images, config.eval.seed)
    if len(indices) < 2:
        raise ValueError(f"eval.align: the pack has {len(pack)} image(s); the probe needs at least 2")
    return {"pack": pack, "indices": indices}

