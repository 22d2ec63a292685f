"""The alignment probe: how similar a JiT's block tokens are to a frozen encoder's features, per
block and signal level t.

`align_probe(net, encoder, batches, blocks, ts)` noises every image x (uint8, mapped to [-1, 1])
to z_t = t x + (1 - t) e (SPEC 4: t = 1 clean, t = 0 pure noise), e = noise_scale * N(0, I) drawn
for image i from `rng.image_generator(seed, i)` (as sampling draws image i's noise), the same e at every t, so the levels differ only in t. The backbone runs with the
images' labels, or the null class for batches without labels.

Block b is the image tokens after b blocks, what `net(z, t, y, tap=b)` returns and what
`align.tap_block` counts (b = 0: the patch embedding plus the position table; in-context class
tokens are dropped); one pass through the blocks reads every requested block. The default is
every block, 1 .. depth.

Pooling: each image is one vector, the **mean of its image tokens** (D), and the encoder's
feature of the clean image is the mean of its patch tokens on the backbone's grid (C), so the
metrics compare images, not tokens. Both matrices are L2-normalised per row, as Huh et al.
(2024) normalise before every metric, and each (block, t) gets CKNNA, linear CKA and mutual kNN
(`pixelrepa.evaluation.alignment`) of the n x D backbone matrix against the n x C encoder one.

With a head (REPA's and iREPA's projectors, PixelREPA's adapter) `probe_features` also measures what the
alignment loss sees: per image, the mean per-token cosine between the head's prediction from the
tap block's tokens and the encoder's features, per t, in the same pass.

Under torchrun each rank runs `probe_features` on its contiguous slice of the
images (`start` keeps image i's noise that of a single process) and rank 0 gathers the slices
(`features.gather_in_order`) and computes the metrics: the numbers of one process.

`write_outputs` writes alignment.csv, alignment.json and alignment.png (one heatmap of
blocks x t per metric). `run_align(ProbeAlignSettings(checkpoint, data, ...), world)` does all of it
for a trained run and a pack; `pixelrepa probe align` is its command line.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from pixelrepa.align.heads import MaskedTransformerAdapter, build_align_head, draw_keep_mask, normalize_targets
from pixelrepa.config import EncoderConfig, RunConfig, get_encoder_preset
from pixelrepa.data.transforms import to_model_range
from pixelrepa.distributed import World
from pixelrepa.evaluation.alignment import cknna, linear_cka, mutual_knn
from pixelrepa.evaluation.plots import HeatmapPanel, heatmap
from pixelrepa.evaluation.results import write_result_set
from pixelrepa.files import created
from pixelrepa.loading import Ema, load_head, load_model
from pixelrepa.models.jit import JiT
from pixelrepa.objective import head_prediction
from pixelrepa.device import autocast_for, pick_device
from pixelrepa.rng import image_generator

PROBE_FORMAT = "pixelrepa-probe-align/1"
METRICS = ("cknna", "cka", "mutual_knn")
METRIC_TITLES = {"cknna": "CKNNA", "cka": "linear CKA", "mutual_knn": "mutual kNN"}
DEFAULT_T = (0.25, 0.5, 0.75, 1.0)
DEFAULT_K = 10
POOLING = "mean of image tokens per image (backbone), mean of patch tokens per image (encoder); rows L2-normalised"
COLUMNS = ("block", "t", *METRICS)

Table = dict[tuple[int, float], dict[str, float]]
Batch = Tensor | tuple[Tensor, Tensor]


# ---------------------------------------------------------------------------
# The probe
# ---------------------------------------------------------------------------

def check_blocks(blocks: Sequence[int] | None, depth: int) -> list[int]:
    """`blocks` sorted without repeats, each in [0, depth]; None: every block, 1 .. depth."""
    if blocks is None:
        return list(range(1, depth + 1))
    chosen = sorted(set(int(b) for b in blocks))
    bad = [b for b in chosen if not 0 <= b <= depth]
    if not chosen or bad:
        raise ValueError(f"blocks count the blocks run before the tap, 0 .. depth = {depth}; got {list(blocks)}")
    return chosen


def check_ts(ts: Sequence[float]) -> list[float]:
    """`ts` sorted without repeats, each in [0, 1] (1 = clean)."""
    chosen = sorted(set(float(t) for t in ts))
    if not chosen or any(not 0.0 <= t <= 1.0 for t in chosen):
        raise ValueError(f"signal levels t must lie in [0, 1] (1 = clean, 0 = noise), got {list(ts)}")
    return chosen


def tapped_tokens(net: JiT, z: Tensor, t: Tensor, y: Tensor, blocks: Sequence[int]) -> dict[int, Tensor]:
    """{b: image tokens (N, T, D) after b blocks} for sorted `blocks`, from one pass through the first
    max(blocks) blocks: the pieces of `JiT.forward`, so each equals `net(z, t, y, tap=b)[1]`."""
    x, c, y_emb = net.embed(z, t, y)
    tokens, done = {}, 0
    for b in blocks:
        x = net.run_blocks(x, c, y_emb, done, b)
        tokens[b], done = net.image_tokens(x, b), b
    return tokens


def probe_draws(shape: Sequence[int], start: int, count: int, seed: int, noise_scale: float,
                num_tokens: int | None = None, mask_ratio: float = 0.0) -> tuple[Tensor, Tensor | None]:
    """(noise_scale * N(0, I) of shape (count, *shape), keep mask (count, num_tokens) or None) on the
    CPU. Image i draws from `rng.image_generator(seed, i)`: its noise, then (with
    `num_tokens`) its keep mask (`draw_keep_mask`), so the noise does not depend on the mask."""
    noises, keeps = [], []
    for i in range(start, start + count):
        generator = image_generator(seed, i)
        noises.append(torch.randn(tuple(shape), generator=generator))
        if num_tokens is not None:
            keeps.append(draw_keep_mask(1, num_tokens, mask_ratio, generator)[0])
    return torch.stack(noises) * noise_scale, torch.stack(keeps) if keeps else None


@dataclass
class ProbeFeatures:
    """What the probe reads from a set of images, on the CPU, image-ordered."""

    pooled: dict[tuple[int, float], Tensor]
    """{(block, t): float32 (n, D)} mean-pooled image tokens after `block` blocks at signal level t."""
    targets: Tensor
    """float32 (n, C) mean-pooled encoder features of the clean images."""
    head_cosines: dict[float, Tensor] | None = None
    """{t: float64 (n,)} per image, the mean over its tokens of cos(head prediction, encoder feature)."""


@torch.no_grad()
def probe_features(net: JiT, encoder: Callable[[Tensor, tuple[int, int]], Tensor], batches: Iterable[Batch],
                   blocks: Sequence[int], ts: Sequence[float], seed: int = 0, noise_scale: float = 1.0,
                   start: int = 0, head: nn.Module | None = None, tap_block: int | None = None,
                   mask_ratio: float = 0.0, progress: Callable[[int], object] | None = None,
                   head_target: Callable[[Tensor], Tensor] | None = None) -> ProbeFeatures:
    """The block tokens, encoder features and (with `head`) head cosines of the images of `batches`,
    the first being image `start` of the probe (its noise and mask: `probe_draws`).

    `batches` yields uint8 images (B, 3, H, W), or (images, labels (B,)) pairs; images without labels
    get the null class. `encoder(x, grid)` maps images in [-1, 1] to (B, tokens, C) features, as a
    `TargetEncoder` does. With `head`, the head predicts the encoder's features from the tokens after
    `tap_block` blocks, read in the same pass: the adapter (PixelREPA) sees each image's tokens masked
    with `mask_ratio`, as in training; the projector (REPA) sees them all; the per-token cosines'
    mean is 1 minus the alignment loss (SPEC 5) at a fixed t, without label dropping; `head_target`
    maps the encoder's features to what that loss compares (iREPA's spatial z-score:
    `normalize_targets`), None compares them as they are. Runs on `net`'s
    device (bf16 autocast on a GPU, as in training); `progress(B)` after each batch."""
    modules = [m for m in (net, head) if m is not None]
    was_training = [m.training for m in modules]
    for m in modules:
        m.eval()
    cfg = net.config
    device = next(net.parameters()).device
    grid = (cfg.grid_size, cfg.grid_size)
    masked = isinstance(head, MaskedTransformerAdapter)
    passes = sorted(set(blocks) | ({tap_block} if head is not None else set()))
    pooled: dict[tuple[int, float], list[Tensor]] = {(b, t): [] for b in blocks for t in ts}
    cosines: dict[float, list[Tensor]] = {t: [] for t in ts}
    targets: list[Tensor] = []
    count = start
    try:
        for batch in batches:
            images, labels = batch if isinstance(batch, (tuple, list)) else (batch, None)
            x = to_model_range(images.to(device))
            n = len(x)
            if n == 0:
                continue
            y = torch.full((n,), cfg.num_classes, device=device) if labels is None else labels.to(device).long()
            noise, keep = probe_draws(x.shape[1:], count, n, seed, noise_scale,
                                      cfg.num_patches if masked else None, mask_ratio)
            noise, keep = noise.to(device), None if keep is None else keep.to(device)
            with autocast_for(device):
                target = encoder(x, grid).float()
                targets.append(target.mean(dim=1).cpu())
                for t in ts:
                    level = torch.full((n,), t, device=device)
                    tokens = tapped_tokens(net, t * x + (1 - t) * noise, level, y, passes)
                    for b in blocks:
                        pooled[(b, t)].append(tokens[b].float().mean(dim=1).cpu())
                    if head is not None:
                        pred = head_prediction(net, head, tokens[tap_block], keep, level, y).float()
                        cos = F.cosine_similarity(pred, target if head_target is None else head_target(target), dim=-1)
                        cosines[t].append(cos.mean(dim=1).double().cpu())
            count += n
            if progress is not None:
                progress(n)
    finally:
        for m, mode in zip(modules, was_training):
            m.train(mode)
    return ProbeFeatures(
        {key: torch.cat(parts) if parts else torch.zeros(0, cfg.hidden_size) for key, parts in pooled.items()},
        torch.cat(targets) if targets else torch.zeros(0, 0),
        None if head is None else {t: torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)
                                   for t, parts in cosines.items()})


def join(parts: Sequence[ProbeFeatures]) -> ProbeFeatures:
    """Consecutive slices' features as one (torchrun: the ranks' slices in order)."""
    parts = [p for p in parts if len(p.targets)]
    if not parts:
        raise ValueError("the probe got no images")
    first = parts[0]
    return ProbeFeatures({key: torch.cat([p.pooled[key] for p in parts]) for key in first.pooled},
                         torch.cat([p.targets for p in parts]),
                         None if first.head_cosines is None else
                         {t: torch.cat([p.head_cosines[t] for p in parts]) for t in first.head_cosines})


def alignment_table(features: ProbeFeatures, k: int = DEFAULT_K) -> Table:
    """{(block, t): {"cknna", "cka", "mutual_knn"}} of the pooled features (rows L2-normalised).
    Needs more than k images."""
    if len(features.targets) <= k:
        raise ValueError(f"{len(features.targets)} image(s): k = {k} nearest neighbours needs more than {k}")
    reference = F.normalize(features.targets.double(), dim=1)
    table: Table = {}
    for key, values in features.pooled.items():
        pooled = F.normalize(values.double(), dim=1)
        table[key] = {"cknna": cknna(pooled, reference, k), "cka": linear_cka(pooled, reference),
                      "mutual_knn": mutual_knn(pooled, reference, k)}
    return table


def mean_head_cosine(features: ProbeFeatures) -> dict[float, float]:
    """{t: mean over images of the per-image head cosine}."""
    if features.head_cosines is None:
        raise ValueError("these features were read without an alignment head")
    return {t: float(values.mean()) for t, values in features.head_cosines.items()}


def align_probe(net: JiT, encoder: Callable[[Tensor, tuple[int, int]], Tensor], batches: Iterable[Batch],
                blocks: Sequence[int] | None = None, ts: Sequence[float] = DEFAULT_T, k: int = DEFAULT_K,
                seed: int = 0, noise_scale: float = 1.0,
                progress: Callable[[int], object] | None = None) -> Table:
    """{(block, t): {"cknna", "cka", "mutual_knn"}} of `net`'s mean-pooled block tokens on the noised
    images against `encoder`'s mean-pooled features of the clean images (see the module docstring and
    `probe_features`), in one process."""
    blocks, ts = check_blocks(blocks, net.config.depth), check_ts(ts)
    return alignment_table(probe_features(net, encoder, batches, blocks, ts, seed, noise_scale,
                                          progress=progress), k)


# ---------------------------------------------------------------------------
# Cost and inputs
# ---------------------------------------------------------------------------

def probe_cost(config: RunConfig, encoder: EncoderConfig, blocks: Sequence[int], ts: Sequence[float],
               images: int, with_head: bool) -> dict:
    """The work of `probe_features`: passes and forward FLOPs (counted on the meta device, so free).
    Per image and t one backbone pass through the deepest block read (and one head pass with
    `with_head`); per image one encoder pass."""
    from torch.utils.flop_counter import FlopCounterMode

    from pixelrepa.align.encoders import build_encoder

    m = config.model
    deepest = max([*blocks, config.tap_block] if with_head else blocks)
    with torch.device("meta"):
        net = JiT(m)
        enc = build_encoder(encoder, random_init=True)
        head = build_align_head(m, config.align) if with_head else None
        z = torch.zeros(1, 3, m.input_size, m.input_size)
        t, y = torch.ones(1), torch.zeros(1, dtype=torch.long)
        tokens = torch.zeros(1, m.num_patches, m.hidden_size)
        keep = torch.ones(1, m.num_patches, dtype=torch.bool)

    def count(fn) -> int:
        with FlopCounterMode(display=False) as counter:
            fn()
        return counter.get_total_flops()

    backbone = count(lambda: tapped_tokens(net, z, t, y, [deepest]))
    head_flops = count(lambda: head_prediction(net, head, tokens, keep, t, y)) if with_head else 0
    encoder_flops = count(lambda: enc(z, (m.grid_size, m.grid_size)))
    passes = images * len(ts)
    return {"images": images, "levels": len(ts), "backbone_passes": passes, "blocks_run": deepest,
            "depth": m.depth, "head_passes": passes if with_head else 0, "encoder_passes": images,
            "flops": passes * (backbone + head_flops) + images * encoder_flops}


def format_cost(cost: dict, encoder_name: str) -> str:
    head = " and the alignment head" if cost["head_passes"] else ""
    return (f"probe cost: {cost['images']} images x {cost['levels']} t = {cost['backbone_passes']} passes through "
            f"{cost['blocks_run']} of {cost['depth']} blocks{head}, {cost['encoder_passes']} encoder passes "
            f"({encoder_name}): {cost['flops'] / 1e12:.3g} TFLOP forward")


def probe_indices(total: int, count: int | None, seed: int) -> np.ndarray:
    """Sorted indices of `count` images drawn without replacement from `total` (seeded; all when
    `count` is None or at least `total`): a pack may be ordered by class, so its first images are not
    a sample of it."""
    if count is not None and count < 1:
        raise ValueError(f"the image count must be positive, got {count}")
    if count is None or count >= total:
        return np.arange(total)
    return np.sort(np.random.default_rng(seed).choice(total, size=count, replace=False))


def pack_batches(pack, indices: np.ndarray, batch_size: int, labels: bool = True) -> Iterator[Batch]:
    """uint8 (B, 3, H, W) images of a `PackedDataset` at `indices`, with their labels when `labels`."""
    for start in range(0, len(indices), batch_size):
        part = indices[start:start + batch_size]
        images = torch.from_numpy(np.asarray(pack.images[part])).permute(0, 3, 1, 2).contiguous()
        yield (images, torch.from_numpy(pack.labels[part].copy())) if labels else images


# ---------------------------------------------------------------------------
# Results: rows, tables, plot
# ---------------------------------------------------------------------------

def table_rows(table: Table) -> list[dict]:
    """One {"block", "t", "cknna", "cka", "mutual_knn"} per (block, t), by block then t."""
    return [{"block": b, "t": t, **values} for (b, t), values in sorted(table.items())]


def format_grids(table: Table) -> str:
    """Each metric as a text grid: one row per block, one column per t."""
    blocks = sorted({b for b, _ in table})
    ts = sorted({t for _, t in table})
    lines = []
    for metric in METRICS:
        lines += [f"{METRIC_TITLES[metric]} (rows: block, columns: t)",
                  "block " + "".join(f"{f't={t:g}':>9}" for t in ts)]
        lines += [f"{b:>5} " + "".join(f"{table[(b, t)][metric]:>9.4f}" for t in ts) for b in blocks]
        lines.append("")
    return "\n".join(lines)


def format_head(head: dict) -> str:
    """The head record of `probe align` as text: its mean cosine per t, or why there is none."""
    if "why_not" in head:
        return f"mean cosine after the alignment head: none ({head['why_not']})"
    masked = f", {head['mask_ratio']:g} of the tokens masked" if head["kind"] == "pixelrepa" else ""
    values = "  ".join(f"t={t}: {v:.4f}" for t, v in head["mean_cosine"].items())
    return f"mean cosine after the alignment head ({head['kind']}, tap block {head['tap_block']}{masked}): {values}"


def plot(table: Table, path: Path) -> None:
    """One heatmap per metric: blocks (rows) x t (columns), colours on [0, 1]."""
    blocks = sorted({b for b, _ in table})
    ts = sorted({t for _, t in table})
    heatmap([HeatmapPanel(METRIC_TITLES[m], "t", "block", [f"{t:g}" for t in ts], [str(b) for b in blocks],
                          [[table[(b, t)][m] for t in ts] for b in blocks]) for m in METRICS], path)


def write_outputs(out: Path, record: dict, table: Table) -> None:
    """alignment.csv, alignment.json (`record` with the rows as `results`, NaN as null) and alignment.png
    in `out`."""
    rows = table_rows(table)
    write_result_set(out, "alignment", rows, COLUMNS, {**record, "results": rows}, plot=lambda path: plot(table, path))

# ---------------------------------------------------------------------------
# A trained run against a pack
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class ProbeAlignSettings:
    """One probe: the trained model, the images, what is measured, the output folder."""

    checkpoint: Path
    """A training run or checkpoint folder, or a model file."""
    data: Path
    """A pack folder."""
    out: Path = Path("probe-align")
    """Folder for alignment.csv, alignment.json and alignment.png."""
    ema: Ema = None
    """A training run's weights: EMA 1 (None), 2, ..., or "raw" (the trained parameters)."""
    blocks: tuple[int, ...] | None = None
    """Tokens after b blocks, 0 .. depth; None: every block, 1 .. depth."""
    t: tuple[float, ...] = DEFAULT_T
    """Signal levels, 1 = clean."""
    images: int = 1000
    """Images drawn from the pack (a seeded subset)."""
    k: int = DEFAULT_K
    """Nearest neighbours."""
    encoder: str | None = None
    """A registered encoder preset instead of the run's align.encoder."""
    encoder_weights: Path | None = None
    """A local weights file for the encoder."""
    labels: Literal["data", "null"] = "data"
    """Class labels given to the backbone: the pack's or the null class."""
    batch_size: int = 64
    seed: int = 0
    """The image subset and the noise."""


@dataclass(frozen=True)
class AlignResult:
    table: Table
    record: dict
    """alignment.json without its `results` (the table's rows)."""


def run_align(settings: ProbeAlignSettings, world: World, device: torch.device | None = None) -> AlignResult | None:
    """Probe `settings.checkpoint` and write the outputs. Every process of `world` reads its slice of the
    images on `device` (None: the world's, a single process `pick_device()`); rank 0 computes, writes and
    gets the result, the others None. The cost and notes go to stderr, the progress bar too."""
    from pixelrepa.align.encoders import build_encoder
    from pixelrepa.data.packed import PackedDataset
    from pixelrepa.evaluation.features import gather_in_order, rank_slice
    from pixelrepa.models.layers import set_attention_impl

    if settings.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {settings.batch_size}")
    if settings.images < 1:
        raise ValueError(f"--images must be >= 1, got {settings.images}")
    if device is None:
        device = world.device if world.world_size > 1 else pick_device()
    rank, world_size = world.rank, world.world_size
    config, net, source = load_model(settings.checkpoint, settings.ema, device)
    blocks, ts = check_blocks(settings.blocks, config.model.depth), check_ts(settings.t)
    head, head_source = load_head(settings.checkpoint, config)

    encoder_cfg = config.align.encoder if settings.encoder is None else get_encoder_preset(settings.encoder)
    if settings.encoder_weights is not None:
        if not settings.encoder_weights.is_file():
            raise FileNotFoundError(f"encoder weights file not found: {settings.encoder_weights}")
        encoder_cfg = dataclasses.replace(encoder_cfg, weights=str(settings.encoder_weights.resolve()))
    if head is not None and encoder_cfg.name != config.align.encoder.name:
        head, head_source = None, (f"the head predicts the run's align.encoder '{config.align.encoder.name}', "
                                   f"not the probed '{encoder_cfg.name}'")
    if config.align.mode == "none" and settings.encoder is None and rank == 0:
        print(f"note: this run trained without alignment (align.mode none); probing against its config's "
              f"align.encoder '{encoder_cfg.name}': --encoder PRESET picks another", file=sys.stderr)

    pack = PackedDataset(settings.data, expected_size=config.model.input_size,
                         num_classes=config.model.num_classes if settings.labels == "data" else None)
    indices = probe_indices(len(pack), settings.images, settings.seed)
    k = settings.k
    if len(indices) <= k:
        raise ValueError(f"{len(indices)} image(s) for k = {k} nearest neighbours: more than {k} are needed")
    if rank == 0:
        cost = probe_cost(config, encoder_cfg, blocks, ts, len(indices), head is not None)
        print(format_cost(cost, encoder_cfg.name) + (f" on {world_size} processes" if world_size > 1 else ""),
              file=sys.stderr, flush=True)

    set_attention_impl(net, config.kernels.attention)
    if head is not None:
        head = head.to(device).eval()
        set_attention_impl(head, config.kernels.attention)
    try:
        encoder = build_encoder(encoder_cfg).to(device)
    except RuntimeError as err:  # weights not reachable (offline): a usage error, reported as such
        raise ValueError(f"encoder '{encoder_cfg.name}': {err}") from err

    start, stop = rank_slice(len(indices), rank, world_size)
    part, error = None, None
    try:
        with tqdm(total=stop - start, desc="probe", unit="img", dynamic_ncols=True,
                  disable=None if rank == 0 else True) as bar:
            batches = pack_batches(pack, indices[start:stop], settings.batch_size, settings.labels == "data")
            part = probe_features(net, encoder, batches, blocks, ts, settings.seed, config.objective.noise_scale,
                                  start, head, config.tap_block, config.align.mask_ratio, bar.update,
                                  partial(normalize_targets, align=config.align))
    except Exception as err:
        if world_size == 1:
            raise
        error = f"rank {rank}: {err}"  # raised on every rank by the gather, so no rank waits forever
    parts = gather_in_order(part, start, error, world_size, rank, RuntimeError)
    if parts is None:
        return None
    features = join(parts)
    table = alignment_table(features, k)
    if head is None:
        head_record = {"why_not": head_source}
    else:
        head_record = {"source": head_source, "kind": config.align.mode, "tap_block": config.tap_block,
                       "mask_ratio": config.align.mask_ratio if config.align.mode == "pixelrepa" else 0.0,
                       "mean_cosine": {f"{t:g}": v for t, v in mean_head_cosine(features).items()}}
    record = {
        "format": PROBE_FORMAT,
        "model": source,
        "align_mode": config.align.mode,
        "tap_block": config.tap_block,
        "encoder": dataclasses.asdict(encoder_cfg) | {"from": "run config" if settings.encoder is None
                                                       else "--encoder"},
        "data": {"path": str(settings.data.resolve()), "available": len(pack), "used": len(indices)},
        "settings": {"blocks": blocks, "t": ts, "k": k, "seed": settings.seed, "labels": settings.labels,
                     "noise_scale": config.objective.noise_scale, "pooling": POOLING,
                     "metrics": list(METRICS), "batch_size": settings.batch_size, "device": str(device),
                     "world_size": world_size},
        "head": head_record,
        "created": created(),
    }
    write_outputs(settings.out, record, table)
    return AlignResult(table, record)
