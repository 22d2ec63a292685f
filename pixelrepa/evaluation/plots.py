"""Line plots, heatmaps and scatter plots for result tables (sweeps, convergence, probes), drawn
with matplotlib.

A line figure is a row of `Panel`s; each panel holds named series of (x, y) points. A heatmap
figure is a row of `HeatmapPanel`s; each panel holds a grid of values, drawn as coloured cells
with the value written in each. A scatter figure is a row of `ScatterPanel`s of labelled (x, y)
points, with an optional dashed reference line. Figures are drawn on matplotlib's Agg canvas
without pyplot, so the process's backend and pyplot's figures are left alone. The PNG is written
through a temporary file, so an interrupted run never leaves a broken plot.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from pixelrepa.files import atomic_write

Series = tuple[str, list[tuple[float, float]]]

DPI = 100
MISSING = "#c8c8c8"
"""The colour of a NaN heatmap cell."""


@dataclass
class Panel:
    title: str
    xlabel: str
    ylabel: str
    series: list[Series]
    bands: list[list[float]] | None = None
    """Per series, a half-width per point (e.g. the std over seeds), shaded around the line."""


@dataclass
class HeatmapPanel:
    title: str
    xlabel: str
    ylabel: str
    columns: list[str]
    """Labels of the columns, left to right."""
    rows: list[str]
    """Labels of the rows, top to bottom."""
    values: list[list[float]]
    """values[row][column]; NaN draws a grey cell."""
    vmin: float = 0.0
    vmax: float = 1.0
    """The colour scale (viridis); values outside it take the end colours."""


@dataclass
class ScatterPanel:
    title: str
    xlabel: str
    ylabel: str
    points: list[tuple[float, float, str]]
    """(x, y, label) per point; the label is written beside it."""
    hline: float | None = None
    """A dashed reference line at this y (e.g. 1 for a ratio)."""


def _figure(count: int, width: float, height: float):
    """A Figure of `count` axes side by side, each `width` x `height` inches, on an Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # imported here: matplotlib is slow to import
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * count, height), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig, fig.subplots(1, count, squeeze=False)[0]


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    atomic_write(Path(path), lambda tmp: fig.savefig(tmp, format="png"))


def _label(ax, panel) -> None:
    ax.set_title(panel.title)
    ax.set_xlabel(panel.xlabel)
    ax.set_ylabel(panel.ylabel)


def line_plot(panels: list[Panel], path: Path) -> None:
    """Write the panels side by side as one PNG; panels without points are left out, and nothing
    is written when none has any."""
    panels = [p for p in panels if any(points for _, points in p.series)]
    if not panels:
        return
    fig, axes = _figure(len(panels), 5.5, 4)
    for ax, panel in zip(axes, panels):
        for i, (label, points) in enumerate(panel.series):
            if points:
                xs, ys = zip(*points)
                line, = ax.plot(xs, ys, marker="o", markersize=4, label=label)
                if panel.bands is not None:
                    low = [y - w for y, w in zip(ys, panel.bands[i])]
                    high = [y + w for y, w in zip(ys, panel.bands[i])]
                    ax.fill_between(xs, low, high, color=line.get_color(), alpha=0.2)
        _label(ax, panel)
        ax.grid(alpha=0.3)
        ax.legend()
    _save(fig, path)


def heatmap(panels: list[HeatmapPanel], path: Path) -> None:
    """Write the heatmaps side by side as one PNG (nothing without panels), each with its colour bar."""
    if not panels:
        return
    from matplotlib import colormaps

    cmap = colormaps["viridis"].with_extremes(bad=MISSING)
    columns, rows = max(len(p.columns) for p in panels), max(len(p.rows) for p in panels)
    fig, axes = _figure(len(panels), 2.5 + 0.8 * columns, 1.8 + 0.35 * rows)
    for ax, panel in zip(axes, panels):
        image = ax.imshow(panel.values, cmap=cmap, vmin=panel.vmin, vmax=panel.vmax, aspect="auto")
        ax.set_xticks(range(len(panel.columns)), panel.columns)
        ax.set_yticks(range(len(panel.rows)), panel.rows)
        for r, line in enumerate(panel.values):
            for c, value in enumerate(line):
                finite = math.isfinite(value)
                dark = finite and image.norm(value) < 0.5
                ax.text(c, r, f"{value:.2f}" if finite else "nan", ha="center", va="center", fontsize=8,
                        color="white" if dark else "black")
        _label(ax, panel)
        fig.colorbar(image, ax=ax, fraction=0.05)
    _save(fig, path)


def scatter_plot(panels: list[ScatterPanel], path: Path) -> None:
    """Write the scatter panels side by side as one PNG; panels without points are left out, and
    nothing is written when none has any."""
    panels = [p for p in panels if p.points]
    if not panels:
        return
    fig, axes = _figure(len(panels), 5.5, 4.5)
    for ax, panel in zip(axes, panels):
        xs, ys, _ = zip(*panel.points)
        ax.scatter(xs, ys, s=18)
        for x, y, label in panel.points:
            ax.annotate(label, (x, y), xytext=(3, 3), textcoords="offset points", fontsize=7, color="#3c3c3c")
        if panel.hline is not None:
            ax.axhline(panel.hline, color="grey", linestyle="--", linewidth=1)
        _label(ax, panel)
        ax.grid(alpha=0.3)
    _save(fig, path)
