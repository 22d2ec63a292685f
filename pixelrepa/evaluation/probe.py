"""The alignment probe: how similar a JiT's block tokens are to a frozen encoder's features, per
block and signal level t.

`align_probe(net, encoder, batches, blocks, ts)` noises every image x (uint8, mapped to [-1, 1])
to z_t = t x + (1 - t) e (SPEC 4: t = 1 clean, t = 0 pure noise), e = noise_scale * N(0, I) drawn
for image i from a CPU generator seeded with `seed * SEED_STRIDE + i` (as sampling draws image
i's noise), the same e at every t, so the levels differ only in t. The backbone runs with the
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

`load_backbone` reads the backbone of a training run (an EMA, or the raw weights) or of a model
file; `write_outputs` writes alignment.csv, alignment.json and alignment.png (one heatmap of
blocks x t per metric).
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from pixelrepa.config import RunConfig
from pixelrepa.data.transforms import to_model_range
from pixelrepa.evaluation.alignment import cknna, linear_cka, mutual_knn
from pixelrepa.evaluation.generate import MODEL_FILE_NAME, SEED_STRIDE
from pixelrepa.evaluation.plots import HeatmapPanel, heatmap
from pixelrepa.files import write_text_atomic
from pixelrepa.models.jit import JiT
from pixelrepa.training.device import autocast_for

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


def probe_noise(shape: Sequence[int], start: int, count: int, seed: int, noise_scale: float) -> Tensor:
    """noise_scale * N(0, I) of shape (count, *shape) on the CPU; image i from `seed * SEED_STRIDE + i`."""
    return torch.stack([torch.randn(tuple(shape), generator=torch.Generator().manual_seed(seed * SEED_STRIDE + i))
                        for i in range(start, start + count)]) * noise_scale


@torch.no_grad()
def align_probe(net: JiT, encoder: Callable[[Tensor, tuple[int, int]], Tensor], batches: Iterable[Batch],
                blocks: Sequence[int] | None = None, ts: Sequence[float] = DEFAULT_T, k: int = DEFAULT_K,
                seed: int = 0, noise_scale: float = 1.0,
                progress: Callable[[int], object] | None = None) -> Table:
    """{(block, t): {"cknna", "cka", "mutual_knn"}} of `net`'s mean-pooled block tokens on the noised
    images against `encoder`'s mean-pooled features of the clean images (see the module docstring).

    `batches` yields uint8 images (B, 3, H, W), or (images, labels (B,)) pairs; images without labels
    get the null class. `encoder(x, grid)` maps images in [-1, 1] to (B, tokens, C) features, as a
    `TargetEncoder` does. Runs on `net`'s device (bf16 autocast on a GPU, as in training); `progress(B)`
    after each batch. Needs more than k images."""
    was_training = net.training
    net.eval()
    cfg = net.config
    blocks, ts = check_blocks(blocks, cfg.depth), check_ts(ts)
    device = next(net.parameters()).device
    grid = (cfg.grid_size, cfg.grid_size)
    pooled: dict[tuple[int, float], list[Tensor]] = {(b, t): [] for b in blocks for t in ts}
    targets: list[Tensor] = []
    count = 0
    try:
        for batch in batches:
            images, labels = batch if isinstance(batch, (tuple, list)) else (batch, None)
            x = to_model_range(images.to(device))
            n = len(x)
            y = torch.full((n,), cfg.num_classes, device=device) if labels is None else labels.to(device).long()
            noise = probe_noise(x.shape[1:], count, n, seed, noise_scale).to(device)
            with autocast_for(device):
                targets.append(encoder(x, grid).float().mean(dim=1).cpu())
                for t in ts:
                    level = torch.full((n,), t, device=device)
                    z = t * x + (1 - t) * noise
                    for b, tokens in tapped_tokens(net, z, level, y, blocks).items():
                        pooled[(b, t)].append(tokens.float().mean(dim=1).cpu())
            count += n
            if progress is not None:
                progress(n)
    finally:
        net.train(was_training)
    if count <= k:
        raise ValueError(f"{count} image(s): k = {k} nearest neighbours needs more than {k}")
    reference = F.normalize(torch.cat(targets).double(), dim=1)
    table: Table = {}
    for key, parts in pooled.items():
        features = F.normalize(torch.cat(parts).double(), dim=1)
        table[key] = {"cknna": cknna(features, reference, k), "cka": linear_cka(features, reference),
                      "mutual_knn": mutual_knn(features, reference, k)}
    return table


# ---------------------------------------------------------------------------
# Inputs: the backbone and the images
# ---------------------------------------------------------------------------

def load_backbone(path: str | Path, ema: int | str | None = None) -> tuple[RunConfig, dict[str, Tensor], dict]:
    """(config, backbone state, a record of its source) of a model file (or a folder holding
    model.safetensors), or of a training run / checkpoint folder: EMA `ema` (1-based; None: 1)
    or its raw weights (`ema="raw"`). A model file has one set of weights, so takes no `ema`."""
    from pixelrepa.training import checkpoint as ckpt
    from pixelrepa.weights import load_model_file

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no model file or training run at {path}")
    if not path.is_dir() or (path / MODEL_FILE_NAME).is_file():
        file = path / MODEL_FILE_NAME if path.is_dir() else path
        if ema is not None:
            raise ValueError(f"{file} is a model file with one set of weights: --ema picks the weights of a "
                             "training run folder; pass the run folder, or leave --ema out")
        config, groups, metadata = load_model_file(file)
        if "net" not in groups:
            raise ValueError(f"{file} holds no backbone ('net' group), only: {', '.join(groups)}")
        provenance = {k[len("provenance."):]: v for k, v in metadata.items() if k.startswith("provenance.")}
        return config, groups["net"], {"kind": "model file", "path": str(file.resolve()), "provenance": provenance}
    folder = ckpt.find_checkpoint(path)
    if ema == "raw":
        loaded = ckpt.load_checkpoint(folder)
        model = ckpt.read_state(folder, ("model",))["model"]
        state = {key[len("net."):]: value for key, value in model.items() if key.startswith("net.")}
        config, step = loaded.config, loaded.step
    else:
        config, state, step = ckpt.backbone_with_ema(folder, 1 if ema is None else int(ema))
    weights = "raw" if ema == "raw" else f"ema{1 if ema is None else int(ema)}"
    return config, state, {"kind": "training checkpoint", "path": str(folder.resolve()), "weights": weights,
                           "step": step}


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


def format_csv(table: Table) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(COLUMNS)
    for row in table_rows(table):
        writer.writerow([row["block"], f"{row['t']:g}", *(f"{row[m]:.6g}" for m in METRICS)])
    return buffer.getvalue()


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


def plot(table: Table, path: Path) -> None:
    """One heatmap per metric: blocks (rows) x t (columns), colours on [0, 1]."""
    blocks = sorted({b for b, _ in table})
    ts = sorted({t for _, t in table})
    heatmap([HeatmapPanel(METRIC_TITLES[m], "t", "block", [f"{t:g}" for t in ts], [str(b) for b in blocks],
                          [[table[(b, t)][m] for t in ts] for b in blocks]) for m in METRICS], path)


def write_outputs(out: Path, record: dict, table: Table) -> None:
    """alignment.csv, alignment.json (`record` with the rows as `results`, NaN as null) and alignment.png
    in `out`."""
    out = Path(out)
    rows = [{key: None if isinstance(v, float) and not math.isfinite(v) else v for key, v in row.items()}
            for row in table_rows(table)]  # NaN (a constant feature set) is not JSON
    write_text_atomic(out / "alignment.csv", format_csv(table))
    write_text_atomic(out / "alignment.json", json.dumps({**record, "results": rows}, indent=2) + "\n")
    plot(table, out / "alignment.png")
