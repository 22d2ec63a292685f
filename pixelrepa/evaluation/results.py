"""One writer for result sets (sweeps, probes, benchmarks): NAME.csv, NAME.md, NAME.json and NAME.png
in one folder, each written atomically, so an interrupted run keeps whole files."""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path

from pixelrepa.files import write_text_atomic


def cell(value) -> str:
    """A table cell: '' for None, lists space-separated, floats to 6 significant digits."""
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return " ".join(map(str, value))
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def format_csv(rows: Sequence[dict], columns: Sequence[str]) -> str:
    """A header of `columns`, then one line of `cell`s per row."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([cell(row.get(c)) for c in columns])
    return buffer.getvalue()


def json_safe(value):
    """`value` with every non-finite float as None (NaN is not JSON), tuples as lists."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def write_result_set(out: str | Path, name: str, rows: Sequence[dict], columns: Sequence[str], record: dict,
                     markdown: str | None = None, plot: Callable[[Path], object] | None = None) -> None:
    """NAME.csv (`columns` of `rows`), NAME.md (`markdown`, when given), NAME.json (`record`, NaN as null) and
    NAME.png (`plot(path)`, when given) in `out`."""
    out = Path(out)
    write_text_atomic(out / f"{name}.csv", format_csv(rows, columns))
    if markdown is not None:
        write_text_atomic(out / f"{name}.md", markdown)
    write_text_atomic(out / f"{name}.json", json.dumps(json_safe(record), indent=2) + "\n")
    if plot is not None:
        plot(out / f"{name}.png")
