"""Line plots for result tables (sweeps, convergence): matplotlib when installed, else PIL.

A figure is a row of `Panel`s; each panel holds named series of (x, y) points. The PNG is
written through a temporary file, so an interrupted run never leaves a broken plot.
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


def _plot_pil(panels: list[Panel], path: Path) -> None:
    from PIL import Image, ImageDraw, ImageFont

    width, height = 520, 400
    left, right, top, bottom = 70, 20, 46, 56
    image = Image.new("RGB", (width * len(panels), height), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=12)  # the default size 10 loses the spaces between words
    for p, panel in enumerate(panels):
        series = [(name, points) for name, points in panel.series if points]
        xs = [x for _, pts in series for x, _ in pts]
        ys = [y for _, pts in series for _, y in pts]
        headroom = 0.08 * (14 * len(series) + 20) / 14 * ((max(ys) - min(ys)) or abs(max(ys)) * 0.1 or 1.0)
        xticks, yticks = nice_ticks(min(xs), max(xs)), nice_ticks(min(ys), max(ys) + headroom)  # room for the legend
        x0, x1, y0, y1 = xticks[0], xticks[-1], yticks[0], yticks[-1]
        ox = p * width
        px0, px1, py0, py1 = ox + left, ox + width - right, height - bottom, top  # plot box in pixels

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
