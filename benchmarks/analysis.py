"""The paper's two analyses on the convergence benchmark's final checkpoints: alignment and diversity.

    python benchmarks/analysis.py --runs DIR/runs --data PACK --out OUT [--images 1000] [--per-class 100]

For every run folder `ARM-seedS` under `--runs` (what `benchmarks/convergence.py` writes:
none / repa / irepa / pixelrepa x training seeds), on EMA 1 of its last checkpoint:
- `pixelrepa probe align`: CKNNA (k = 10), linear CKA and mutual kNN between each block's
  mean-pooled tokens and the alignment encoder's features of the clean images, at t = 0.25, 0.5,
  0.75, 1 (every arm against the same encoder, the one the aligned arms were trained on), on
  `--images` images of the pack -> OUT/align-ARM-seedS/;
- `pixelrepa probe diversity`: `--per-class` samples per class drawn with the run's sampler,
  against as many real images per class, in encoder and Inception space -> OUT/diversity-ARM-seedS/.
Then OUT/analysis.md: one table per analysis, all arms side by side. Each step is skipped when its
output folder already holds its JSON, so an interrupted run continues; runs measured earlier whose
folders are gone (another machine) stay in the tables from their JSON in OUT.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from common import cpu_model  # benchmarks/ is on sys.path when run as a script

ARMS = ("none", "repa", "irepa", "pixelrepa")
ENCODER = "efficientnet-lite0"


def run_folders(runs: Path, out: Path) -> list[tuple[str, int, Path | None]]:
    """(arm, seed, folder) for every ARM-seedS folder under `runs`, and (arm, seed, None) for each
    run measured before whose align-ARM-seedS/alignment.json is in `out`; by arm then seed."""
    found: dict[tuple[str, int], Path | None] = {}
    for folder in sorted(out.glob("align-*-seed*")):
        arm, _, seed = folder.name.removeprefix("align-").rpartition("-seed")
        if arm in ARMS and seed.isdigit() and (folder / "alignment.json").is_file():
            found[(arm, int(seed))] = None
    for folder in sorted(runs.iterdir()) if runs.is_dir() else []:
        arm, _, seed = folder.name.rpartition("-seed")
        if arm in ARMS and seed.isdigit() and (folder / "checkpoints").is_dir():
            found[(arm, int(seed))] = folder
    if not found:
        raise SystemExit(f"no ARM-seedS run folders with checkpoints under {runs}, and no results in {out}")
    return sorted(((arm, seed, folder) for (arm, seed), folder in found.items()),
                  key=lambda item: (ARMS.index(item[0]), item[1]))


def pixelrepa(*args: str) -> None:
    command = [sys.executable, "-m", "pixelrepa", *args]
    print("$", " ".join(command[2:]), flush=True)
    subprocess.run(command, check=True)


def align_table(out: Path, found: list[tuple[str, int, Path]]) -> list[str]:
    """Markdown: CKNNA and CKA per block at t = 1 and t = 0.5, one column pair per run."""
    records = {(arm, seed): json.loads((out / f"align-{arm}-seed{seed}" / "alignment.json").read_text())
               for arm, seed, _ in found}
    lines = []
    for metric, title in (("cknna", "CKNNA"), ("cka", "linear CKA")):
        for t in (1.0, 0.5):
            header = ["block"] + [f"{arm} s{seed}" for arm, seed, _ in found]
            lines += [f"**{title}, t = {t:g}** (block 0: the patch embedding; the aligned arms' tap is block "
                      f"{records[found[-1][:2]]['tap_block']})", "",
                      "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            blocks = sorted({row["block"] for row in records[found[0][:2]]["results"]})
            for b in blocks:
                cells = []
                for arm, seed, _ in found:
                    row = next(r for r in records[(arm, seed)]["results"] if r["block"] == b and r["t"] == t)
                    cells.append("-" if row[metric] is None else f"{row[metric]:.3f}")
                lines.append(f"| {b} | " + " | ".join(cells) + " |")
            lines.append("")
    heads = [(arm, seed) for arm, seed, _ in found if "mean_cosine" in records[(arm, seed)].get("head", {})]
    if heads:
        ts = list(records[heads[0]]["head"]["mean_cosine"])
        lines += ["**Mean cosine after the alignment head** (its prediction from the tap block against the "
                  "encoder's features, per token; PixelREPA's adapter with its training mask)", "",
                  "| run | " + " | ".join(f"t = {t}" for t in ts) + " |", "|" + "---|" * (len(ts) + 1)]
        for key in heads:
            values = records[key]["head"]["mean_cosine"]
            lines.append(f"| {key[0]} s{key[1]} | " + " | ".join(_fmt(values.get(t)) for t in ts) + " |")
        lines.append("")
    return lines


def diversity_table(out: Path, found: list[tuple[str, int, Path]]) -> list[str]:
    """Markdown: the summary of each run's diversity report, per feature space."""
    header = ["run", "space", "diversity gen/real", "precision", "recall",
              "corr(tightness, ratio) Pearson / Spearman", "most collapsed classes"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for arm, seed, _ in found:
        summary = json.loads((out / f"diversity-{arm}-seed{seed}" / "diversity.json").read_text())["summary"]
        for space, value in summary["mean_ratio"].items():
            corr = summary["correlation"][space]
            collapsed = ", ".join(str(c["class"]) for c in summary["most_collapsed"]) \
                if space == summary["collapse_space"] else ""
            lines.append("| " + " | ".join([
                f"{arm} s{seed}", space, _fmt(value), _fmt(summary["mean_precision"][space]),
                _fmt(summary["mean_recall"][space]), f"{_fmt(corr['pearson'])} / {_fmt(corr['spearman'])}",
                collapsed]) + " |")
    return lines + [""]


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, required=True, help="the benchmark's runs/ folder")
    parser.add_argument("--data", type=Path, required=True, help="the pack the arms were trained on")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--images", type=int, default=1000, help="images for the alignment probe")
    parser.add_argument("--per-class", type=int, default=100, help="samples (and real images) per class")
    parser.add_argument("--skip-diversity", action="store_true")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    found = run_folders(args.runs, args.out)
    for arm, seed, folder in found:
        if folder is None:
            continue
        target = args.out / f"align-{arm}-seed{seed}"
        if not (target / "alignment.json").is_file():
            pixelrepa("probe", "align", str(folder), "--data", str(args.data), "--encoder", ENCODER,
                      "--images", str(args.images), "--blocks", *map(str, range(0, 5)), "--out", str(target))
        target = args.out / f"diversity-{arm}-seed{seed}"
        if not args.skip_diversity and not (target / "diversity.json").is_file():
            pixelrepa("probe", "diversity", str(folder), "--data", str(args.data), "--spaces", "encoder", "inception",
                      "--encoder", ENCODER, "--per-class", str(args.per_class),
                      "--real-per-class", str(args.per_class), "--out", str(target))
    report = ["# Alignment and diversity of the convergence benchmark's final checkpoints", "",
              f"Machine: {cpu_model()}. Encoder: {ENCODER} (ImageNet weights), for every arm.", ""]
    report += align_table(args.out, found)
    if not args.skip_diversity:
        report += diversity_table(args.out, found)
    (args.out / "analysis.md").write_text("\n".join(report) + "\n")
    print("\n".join(report))


if __name__ == "__main__":
    main()
