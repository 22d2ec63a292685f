"""Line plots, heatmaps and scatter plots for result tables (sweeps, convergence, probes):
matplotlib when installed, else PIL.

A line figure is a row of `Panel`s; each panel holds named series of (x, y) points. A heatmap
figure is a row of `HeatmapPanel`s; each panel holds a grid of values, drawn as coloured cells
with the value written in each. A scatter figure is a row of `ScatterPanel`s of labelled (x, y)
points, with an optional dashed reference line. The PNG is written through a temporary file, so
an interrupted run never leaves a broken plot.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from pixelrepa.files import atomic_write

Series = tuple[str, list[tuple[float, float]]]


@dataclass
class Panel:
    title: str
    xlabel: str
    ylabel: str
    series: list[Series]


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


COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
          (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def line_plot(panels: list[Panel], path: Path) -> None:
    """Write the panels side by side as one PNG; panels without points are left out."""
    panels = [p for p in panels if any(points for _, points in p.series)]
    if not panels:
        return
    try:
        import matplotlib
    except ImportError:
        _plot_pil(panels, path)
    else:
        matplotlib.use("Agg")
        _plot_matplotlib(panels, path)


def _plot_matplotlib(panels: list[Panel], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        for label, points in panel.series:
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, marker="o", label=label)
        ax.set_xlabel(panel.xlabel)
        ax.set_ylabel(panel.ylabel)
        ax.set_title(panel.title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round tick values covering [low, high] (the 1-2-5 rule)."""
    if not high > low:
        pad = abs(low) * 0.1 or 1.0
        low, high = low - pad, high + pad
    raw = (high - low) / max(1, count - 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    first = math.floor(low / step) * step
    ticks, value = [], first
    while value < high + step * 0.999:
        ticks.append(round(value, 12))
        value += step
    return ticks


def _format_tick(value: float) -> str:
    return f"{value:.4g}"


PIL_MARGINS = (70, 20, 46, 56)  # left, right, top, bottom of a panel's plot box, in pixels


def _pil_axes(draw, font, panel, xticks: list[float], yticks: list[float], ox: int, width: int, height: int):
    """Grid, ticks, box, axis labels and title of one panel whose left edge is at `ox`; returns
    (data -> pixel mapping, plot box (px0, px1, py0, py1))."""
    left, right, top, bottom = PIL_MARGINS
    x0, x1, y0, y1 = xticks[0], xticks[-1], yticks[0], yticks[-1]
    px0, px1, py0, py1 = ox + left, ox + width - right, height - bottom, top

    def to_px(x: float, y: float) -> tuple[float, float]:
        return (px0 + (x - x0) / (x1 - x0) * (px1 - px0), py0 + (y - y0) / (y1 - y0) * (py1 - py0))

    for t in xticks:
        x, _ = to_px(t, y0)
        draw.line([(x, py1), (x, py0)], fill=(230, 230, 230))
        draw.line([(x, py0), (x, py0 + 4)], fill="black")
        text = _format_tick(t)
        draw.text((x - draw.textlength(text, font=font) / 2, py0 + 6), text, fill="black", font=font)
    for t in yticks:
        _, y = to_px(x0, t)
        draw.line([(px0, y), (px1, y)], fill=(230, 230, 230))
        draw.line([(px0 - 4, y), (px0, y)], fill="black")
        text = _format_tick(t)
        draw.text((px0 - 6 - draw.textlength(text, font=font), y - 5), text, fill="black", font=font)
    draw.rectangle([px0, py1, px1, py0], outline="black")
    draw.text(((px0 + px1 - draw.textlength(panel.xlabel, font=font)) / 2, height - 22), panel.xlabel,
              fill="black", font=font)
    draw.text((ox + 8, top - 22), panel.ylabel, fill="black", font=font)
    draw.text(((px0 + px1 - draw.textlength(panel.title, font=font)) / 2, 8), panel.title, fill="black",
              font=font)
    return to_px, (px0, px1, py0, py1)


def _plot_pil(panels: list[Panel], path: Path) -> None:
    from PIL import Image, ImageDraw, ImageFont

    width, height = 520, 400
    image = Image.new("RGB", (width * len(panels), height), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=12)  # the default size 10 loses the spaces between words
    for p, panel in enumerate(panels):
        series = [(name, points) for name, points in panel.series if points]
        xs = [x for _, pts in series for x, _ in pts]
        ys = [y for _, pts in series for _, y in pts]
        headroom = 0.08 * (14 * len(series) + 20) / 14 * ((max(ys) - min(ys)) or abs(max(ys)) * 0.1 or 1.0)
        xticks, yticks = nice_ticks(min(xs), max(xs)), nice_ticks(min(ys), max(ys) + headroom)  # room for the legend
        to_px, (px0, px1, py0, py1) = _pil_axes(draw, font, panel, xticks, yticks, p * width, width, height)
        for i, (name, points) in enumerate(series):
            color = COLORS[i % len(COLORS)]
            pixels = [to_px(x, y) for x, y in points]
            if len(pixels) > 1:
                draw.line(pixels, fill=color, width=2)
            for x, y in pixels:
                draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=color)
        # Legend, top right inside the plot box.
        entries = [name for name, _ in series]
        box_w = 34 + max(draw.textlength(e, font=font) for e in entries)
        bx, by = px1 - box_w - 6, py1 + 6
        draw.rectangle([bx, by, bx + box_w, by + 14 * len(entries) + 6], fill="white", outline=(160, 160, 160))
        for i, name in enumerate(entries):
            color = COLORS[i % len(COLORS)]
            ly = by + 10 + 14 * i
            draw.line([(bx + 6, ly), (bx + 24, ly)], fill=color, width=2)
            draw.text((bx + 30, ly - 6), name, fill="black", font=font)
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


# Viridis at 0, 1/4, 1/2, 3/4 and 1 (matplotlib's colour map), interpolated linearly between.
VIRIDIS = [(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)]
MISSING = (200, 200, 200)


def heatmap(panels: list[HeatmapPanel], path: Path) -> None:
    """Write the heatmaps side by side as one PNG."""
    if not panels:
        return
    try:
        import matplotlib
    except ImportError:
        _heatmap_pil(panels, path)
    else:
        matplotlib.use("Agg")
        _heatmap_matplotlib(panels, path)


def _heatmap_matplotlib(panels: list[HeatmapPanel], path: Path) -> None:
    import matplotlib.pyplot as plt

    columns, rows = max(len(p.columns) for p in panels), max(len(p.rows) for p in panels)
    fig, axes = plt.subplots(1, len(panels), figsize=((2.5 + 0.8 * columns) * len(panels), 1.5 + 0.35 * rows),
                             squeeze=False)
    for ax, panel in zip(axes[0], panels):
        image = ax.imshow(panel.values, cmap="viridis", vmin=panel.vmin, vmax=panel.vmax, aspect="auto")
        ax.set_xticks(range(len(panel.columns)), panel.columns)
        ax.set_yticks(range(len(panel.rows)), panel.rows)
        for r, line in enumerate(panel.values):
            for c, value in enumerate(line):
                if math.isfinite(value):
                    ax.text(c, r, f"{value:.2f}", ha="center", va="center", fontsize=8,
                            color="white" if _position(value, panel) < 0.5 else "black")
        ax.set_xlabel(panel.xlabel)
        ax.set_ylabel(panel.ylabel)
        ax.set_title(panel.title)
        fig.colorbar(image, ax=ax, fraction=0.05)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)


def _position(value: float, panel: HeatmapPanel) -> float:
    """`value` on the panel's colour scale, clipped to [0, 1]."""
    span = panel.vmax - panel.vmin
    return min(1.0, max(0.0, (value - panel.vmin) / span)) if span > 0 else 0.5


def viridis(position: float) -> tuple[int, int, int]:
    """The colour at `position` in [0, 1] of the `VIRIDIS` anchors."""
    scaled = position * (len(VIRIDIS) - 1)
    i = min(int(scaled), len(VIRIDIS) - 2)
    frac = scaled - i
    return tuple(round(a + (b - a) * frac) for a, b in zip(VIRIDIS[i], VIRIDIS[i + 1]))


def _heatmap_pil(panels: list[HeatmapPanel], path: Path) -> None:
    from PIL import Image, ImageDraw, ImageFont

    cell_w, cell_h, left, right, top, bottom = 56, 24, 64, 16, 40, 44
    rows = max(len(p.rows) for p in panels)
    widths = [left + cell_w * len(p.columns) + right for p in panels]
    height = top + cell_h * rows + bottom
    image = Image.new("RGB", (sum(widths), height), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=12)
    ox = 0
    for panel, width in zip(panels, widths):
        x0, y0 = ox + left, top
        for r, line in enumerate(panel.values):
            for c, value in enumerate(line):
                box = [x0 + c * cell_w, y0 + r * cell_h, x0 + (c + 1) * cell_w - 1, y0 + (r + 1) * cell_h - 1]
                finite = math.isfinite(value)
                draw.rectangle(box, fill=viridis(_position(value, panel)) if finite else MISSING)
                text = f"{value:.2f}" if finite else "nan"
                color = "white" if finite and _position(value, panel) < 0.5 else "black"
                draw.text((box[0] + (cell_w - draw.textlength(text, font=font)) / 2, box[1] + 5), text,
                          fill=color, font=font)
        for c, label in enumerate(panel.columns):
            x = x0 + c * cell_w + (cell_w - draw.textlength(label, font=font)) / 2
            draw.text((x, y0 + cell_h * len(panel.rows) + 4), label, fill="black", font=font)
        for r, label in enumerate(panel.rows):
            draw.text((x0 - 6 - draw.textlength(label, font=font), y0 + r * cell_h + 5), label, fill="black",
                      font=font)
        draw.text((x0 + (cell_w * len(panel.columns) - draw.textlength(panel.xlabel, font=font)) / 2,
                   y0 + cell_h * len(panel.rows) + 22), panel.xlabel, fill="black", font=font)
        draw.text((ox + 6, top - 18), panel.ylabel, fill="black", font=font)
        draw.text((x0 + (cell_w * len(panel.columns) - draw.textlength(panel.title, font=font)) / 2, 10),
                  panel.title, fill="black", font=font)
        ox += width
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


@dataclass
class ScatterPanel:
    title: str
    xlabel: str
    ylabel: str
    points: list[tuple[float, float, str]]
    """(x, y, label) per point; the label is written beside it."""
    hline: float | None = None
    """A dashed reference line at this y (e.g. 1 for a ratio)."""


def scatter_plot(panels: list[ScatterPanel], path: Path) -> None:
    """Write the scatter panels side by side as one PNG; panels without points are left out."""
    panels = [p for p in panels if p.points]
    if not panels:
        return
    try:
        import matplotlib
    except ImportError:
        _scatter_pil(panels, path)
    else:
        matplotlib.use("Agg")
        _scatter_matplotlib(panels, path)


def _scatter_matplotlib(panels: list[ScatterPanel], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.5), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        xs, ys, labels = zip(*panel.points)
        ax.scatter(xs, ys, s=18, color=[c / 255 for c in COLORS[0]])
        for x, y, label in panel.points:
            ax.annotate(label, (x, y), xytext=(3, 3), textcoords="offset points", fontsize=7)
        if panel.hline is not None:
            ax.axhline(panel.hline, color="grey", linestyle="--", linewidth=1)
        ax.set_xlabel(panel.xlabel)
        ax.set_ylabel(panel.ylabel)
        ax.set_title(panel.title)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)


def _scatter_pil(panels: list[ScatterPanel], path: Path) -> None:
    from PIL import Image, ImageDraw, ImageFont

    width, height = 520, 420
    image = Image.new("RGB", (width * len(panels), height), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=12)
    small = ImageFont.load_default(size=10)
    for p, panel in enumerate(panels):
        xs = [x for x, _, _ in panel.points]
        ys = [y for _, y, _ in panel.points] + ([panel.hline] if panel.hline is not None else [])
        xticks, yticks = nice_ticks(min(xs), max(xs)), nice_ticks(min(ys), max(ys))
        to_px, (px0, px1, py0, py1) = _pil_axes(draw, font, panel, xticks, yticks, p * width, width, height)
        if panel.hline is not None:
            _, y = to_px(xticks[0], panel.hline)
            for start in range(int(px0), int(px1), 10):
                draw.line([(start, y), (min(start + 5, px1), y)], fill=(128, 128, 128))
        for x, y, label in panel.points:
            px, py = to_px(x, y)
            draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=COLORS[0])
            draw.text((px + 4, py - 12), label, fill=(60, 60, 60), font=small)
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))
