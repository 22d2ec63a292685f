"""Line plots, heatmaps and scatter plots: the PNGs matplotlib writes, read back with PIL."""

from __future__ import annotations

import math
import sys

import matplotlib
import numpy as np
import pytest
from PIL import Image

from pixelrepa.evaluation.plots import HeatmapPanel, Panel, ScatterPanel, heatmap, line_plot, scatter_plot

BLUE, ORANGE = (31, 119, 180), (255, 127, 14)  # matplotlib's first two line colours
GREY = (200, 200, 200)  # a NaN cell
DASH = (128, 128, 128)  # the reference line


def pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        assert image.format == "PNG"
        return np.asarray(image.convert("RGB"))


def count(image: np.ndarray, color, tolerance: int = 0) -> int:
    return int((np.abs(image.astype(int) - color) <= tolerance).all(axis=-1).sum())


def fid_panel(title="FID") -> Panel:
    return Panel(title, "cfg", "FID", [("50 steps", [(1.0, 30.0), (1.5, 20.0), (2.0, 25.0)]),
                                       ("100 steps", [(1.0, 28.0), (2.0, 22.0)])])


def cells(values, **kwargs) -> HeatmapPanel:
    return HeatmapPanel("CKA", "t", "block", [f"{t}" for t in range(len(values[0]))],
                        [f"{b}" for b in range(len(values))], values, **kwargs)


def test_line_plot_draws_each_panel_and_series(tmp_path):
    line_plot([fid_panel()], tmp_path / "one.png")
    line_plot([fid_panel(), fid_panel("KID")], tmp_path / "two.png")
    one, two = pixels(tmp_path / "one.png"), pixels(tmp_path / "two.png")
    assert one.shape[0] == two.shape[0] > 100 and two.shape[1] == 2 * one.shape[1] > one.shape[0]
    assert count(one, BLUE) > 100 and count(one, ORANGE) > 100 and count(two, BLUE) > 2 * 100
    assert len(np.unique(one.reshape(-1, 3), axis=0)) > 10
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.png", "two.png"]  # no temporary file left


def test_line_plot_leaves_out_empty_panels_and_series(tmp_path):
    empty = Panel("empty", "x", "y", [("none", [])])
    line_plot([empty, Panel("empty too", "x", "y", [])], tmp_path / "none.png")
    assert not (tmp_path / "none.png").exists()
    line_plot([fid_panel()], tmp_path / "one.png")
    line_plot([empty, Panel("FID", "cfg", "FID", [*fid_panel().series, ("none", [])])], tmp_path / "same.png")
    assert pixels(tmp_path / "same.png").shape == pixels(tmp_path / "one.png").shape


def test_line_plot_replaces_an_existing_file(tmp_path):
    path = tmp_path / "plot.png"
    path.write_bytes(b"old")
    line_plot([fid_panel()], path)
    assert pixels(path).shape[1] > 100


def test_heatmap_colours_cells_and_greys_nan(tmp_path):
    heatmap([cells([[0.1, 0.9], [0.5, 0.3]])], tmp_path / "finite.png")
    heatmap([cells([[0.1, 0.9], [math.nan, 1.5]])], tmp_path / "nan.png")
    finite, nan = pixels(tmp_path / "finite.png"), pixels(tmp_path / "nan.png")
    assert finite.shape == nan.shape and finite.shape[1] > finite.shape[0] > 100
    assert count(nan, GREY) > 1000 > count(finite, GREY)
    # 1.5 is past vmax: the cell takes viridis' top colour.
    assert count(nan, (253, 231, 36)) > 1000 > count(finite, (253, 231, 36))


def test_heatmap_panels_and_columns_widen_the_figure(tmp_path):
    heatmap([cells([[0.1, 0.9]])], tmp_path / "one.png")
    heatmap([cells([[0.1, 0.9]])] * 3, tmp_path / "three.png")
    heatmap([cells([[0.1, 0.9, 0.2, 0.4]])], tmp_path / "wide.png")
    heatmap([cells([[0.1, 0.9]] * 6)], tmp_path / "tall.png")
    one, three = pixels(tmp_path / "one.png"), pixels(tmp_path / "three.png")
    assert three.shape[1] == 3 * one.shape[1] and three.shape[0] == one.shape[0]
    assert pixels(tmp_path / "wide.png").shape[1] > one.shape[1]
    assert pixels(tmp_path / "tall.png").shape[0] > one.shape[0]
    heatmap([], tmp_path / "none.png")
    assert not (tmp_path / "none.png").exists()


def test_scatter_plot_points_labels_and_reference_line(tmp_path):
    points = [(0.1, 0.9, "cat"), (0.2, 1.2, "dog"), (0.3, 0.5, "car")]
    scatter_plot([ScatterPanel("ratio", "tightness", "ratio", points, hline=1.0)], tmp_path / "line.png")
    scatter_plot([ScatterPanel("ratio", "tightness", "ratio", points)], tmp_path / "plain.png")
    unlabelled = [(x, y, "") for x, y, _ in points]
    scatter_plot([ScatterPanel("ratio", "tightness", "ratio", unlabelled)], tmp_path / "unlabelled.png")
    line, plain, unlabelled = (pixels(tmp_path / f"{n}.png") for n in ("line", "plain", "unlabelled"))
    assert line.shape == plain.shape and plain.shape[1] > plain.shape[0] > 100
    assert count(line, DASH) > 100 > count(plain, DASH)
    assert count(plain, BLUE, tolerance=40) > 3 * 16  # three points
    assert (plain != unlabelled).any(axis=-1).sum() > 50  # the labels beside the points
    scatter_plot([ScatterPanel("a", "x", "y", []), ScatterPanel("b", "x", "y", points)], tmp_path / "two.png")
    assert pixels(tmp_path / "two.png").shape == plain.shape
    scatter_plot([ScatterPanel("a", "x", "y", [])], tmp_path / "none.png")
    assert not (tmp_path / "none.png").exists()


def test_plots_leave_pyplot_and_the_backend_alone(tmp_path, monkeypatch):
    """Drawing needs neither pyplot nor `matplotlib.use`: the caller's backend and figures stay as they are."""
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)  # importing it now fails

    def refuse(*args, **kwargs):
        raise AssertionError("plots switched matplotlib's backend")

    monkeypatch.setattr(matplotlib, "use", refuse)
    line_plot([fid_panel()], tmp_path / "line.png")
    heatmap([cells([[0.2]])], tmp_path / "heat.png")
    scatter_plot([ScatterPanel("r", "x", "y", [(0.0, 1.0, "a")])], tmp_path / "scatter.png")
    assert all(pixels(tmp_path / name).shape[0] > 100 for name in ("line.png", "heat.png", "scatter.png"))


@pytest.mark.parametrize("vmin, vmax", [(0.0, 1.0), (0.5, 0.5)])
def test_heatmap_scale_edges(tmp_path, vmin, vmax):
    """Values on, below and above the scale, and an empty scale, draw without error."""
    heatmap([cells([[vmin, vmax, vmin - 1, vmax + 1]], vmin=vmin, vmax=vmax)], tmp_path / "edges.png")
    assert pixels(tmp_path / "edges.png").shape[1] > 100
