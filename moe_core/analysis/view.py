"""What the analysis notebooks put on screen: figures at one reading scale and tables a reader scans.

Why a module: the notebooks are thin callers, and a figure shown at a fixed width shrinks a page-wide
one until its text is unreadable. Here every figure is shown at SCREEN_SCALE pixels per point, so 8 pt
labels read at the same size in every figure (JupyterLab still narrows an image wider than the cell);
tables lose all-empty columns, put the verdict first and round each column to a few significant digits.
Files are written by ``plots.save`` and ``tables``; nothing here writes anything.
"""
from __future__ import annotations

import math
import struct
from pathlib import Path

import pandas as pd
from IPython.display import Image

from . import plots

SCREEN_SCALE = 2  # screen pixels per point: 8 pt labels at 16 px; a page-wide figure ~950 px wide
SIGNIFICANT = 3  # digits kept in a float column (set by its largest magnitude)
FIRST_COLUMNS = ("verdict", "name")  # what a row is about, before its numbers
MAX_ROWS = 30  # a longer table shows its first rows and says how many there are
MISSING = "–"
NO_WRAP = [{"selector": "td", "props": "white-space: nowrap;"}]  # a row reads on one line


def figure(chart, name: str, figures_dir: str | Path) -> Image:
    """Write figures_dir/name.{png,svg,pdf} (``plots.save``) and return a PNG rendered at
    SCREEN_SCALE to show: the print-resolution file would make an executed notebook several times
    larger for no gain on screen."""
    plots.save(chart, name, figures_dir)
    png = plots.render(chart, "png", scale=SCREEN_SCALE)
    return Image(data=png, width=struct.unpack(">I", png[16:20])[0])  # IHDR width: one pixel per pixel


def _decimals(column: pd.Series) -> int:
    """Decimals that keep SIGNIFICANT digits of the column's largest magnitude (none from 100 up)."""
    largest = column.abs().max()
    if not largest or not math.isfinite(largest):
        return 0
    return max(0, min(6, SIGNIFICANT - 1 - math.floor(math.log10(largest))))


def table(frame: pd.DataFrame, first: tuple[str, ...] = FIRST_COLUMNS, max_rows: int = MAX_ROWS):
    """``frame`` styled for reading: all-missing columns dropped, ``first`` columns leading, numbers
    rounded per column with thousands separators, missing cells as a dash, headers that wrap, no index,
    at most ``max_rows`` rows (the caption says how many there are)."""
    if len(frame):  # an empty frame keeps its columns: they say what would be listed
        frame = frame.dropna(axis=1, how="all")
    lead = [c for c in first if c in frame.columns]
    frame = frame[lead + [c for c in frame.columns if c not in lead]].reset_index(drop=True)
    rows = len(frame)
    frame = frame.head(max_rows)
    formats = {}
    for col in frame.columns:
        if pd.api.types.is_bool_dtype(frame[col]):
            continue
        if pd.api.types.is_integer_dtype(frame[col]):
            formats[col] = "{:,}"
        elif pd.api.types.is_float_dtype(frame[col]):
            formats[col] = f"{{:,.{_decimals(frame[col])}f}}"
    styled = (frame.style.format(formats, na_rep=MISSING).hide(axis="index")
              .format_index(lambda name: str(name).replace("_", " "), axis=1)  # headers wrap at the spaces
              .set_table_styles(NO_WRAP))
    return styled.set_caption(f"first {max_rows} of {rows} rows") if rows > max_rows else styled
