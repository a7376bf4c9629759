"""How much a bench cell's timing moves between bench runs: the coefficient of variation (std / mean over
runs) of every timed column, per cell, from a directory that holds several runs of one bench. A figure's
intervals are only as narrow as this spread, so it is reported beside them; the split by the cell's
time says whether the spread sits in the short calls (launch-bound, host jitter) or everywhere.

    python -m moe_core.analysis.spread DIR [DIR ...] [--section capacity|layer] [--top N]

Several directories pool their runs (say, one per GPU of a host: the spread across GPUs).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

CELLS = {"capacity": ["source", "num_experts", "top_k", "cf_label"],
         "layer": ["tokens", "dim", "hidden", "num_experts", "top_k", "capacity_factor", "activation", "backend",
                   "compile_mode"]}
TIMED = {"capacity": ["dispatch_ms", "layer_ms"], "layer": ["moe_ms", "dense_ms", "moe_over_dense"]}
# a timed column, and the host's time to issue the same call
HOST = {"layer_ms": "layer_host_ms", "dispatch_ms": "dispatch_host_ms"}
QUANTILES = 4  # cells split by their mean time into this many equal-count bins


def spread(rows: pd.DataFrame, section: str) -> pd.DataFrame:
    """One row per (cell, timed column) measured in >= 2 runs: mean, CV over runs, runs, and the run
    that was slowest."""
    ok = rows[rows["status"] == "ok"]
    cell = [c for c in CELLS[section] if c in ok]
    out = []
    for column in (c for c in TIMED[section] if c in ok):
        per_run = ok.groupby(cell + ["run_id"], dropna=False)[column].mean().unstack("run_id")
        per_run = per_run[per_run.notna().sum(axis=1) >= 2]
        if per_run.empty:
            continue
        frame = pd.DataFrame({"column": column, "mean": per_run.mean(axis=1), "runs": per_run.notna().sum(axis=1),
                              "cv": per_run.std(axis=1) / per_run.mean(axis=1), "slowest_run": per_run.idxmax(axis=1)})
        if HOST.get(column) in ok:  # near 1: the call was timed at the pace of the host issuing it
            over = (ok[column] / ok[HOST[column]]).groupby([ok[c] for c in cell], dropna=False).mean()
            frame["over_host"] = over.reindex(frame.index)
        out.append(frame.reset_index())
    return pd.concat(out, ignore_index=True) if out else pd.DataFrame()


def summary(cells: pd.DataFrame) -> pd.DataFrame:
    """Per timed column, all its cells and then each quarter of them ordered by mean time (shortest
    first): the time range, cells, median and largest CV, cells at or under 3%, and the share of cells
    whose slowest run is the run most often slowest (near 1: one run was slow throughout, a shift of
    the whole run rather than noise within cells); and, where the host's issue time was recorded, the
    median of time / host time (near 1: launch-bound calls timed at the host's pace)."""
    rows = []
    for column, group in cells.groupby("column", sort=False):
        quarter = pd.qcut(group["mean"].rank(method="first"), min(QUANTILES, len(group)), labels=False) + 1
        for part, sub in [("all", group), *((f"q{q}", group[quarter == q]) for q in sorted(quarter.unique()))]:
            rows.append({"column": column, "cells": part, "n": len(sub), "mean_min": sub["mean"].min(),
                         "mean_max": sub["mean"].max(), "cv_median": sub["cv"].median(), "cv_max": sub["cv"].max(),
                         "cv_le_3pct": int((sub["cv"] <= 0.03).sum()),
                         "same_slowest_run": sub["slowest_run"].value_counts(normalize=True).iloc[0],
                         "over_host_median": sub["over_host"].median() if "over_host" in sub else float("nan")})
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moe_core.analysis.spread", description=__doc__.split("\n")[0])
    parser.add_argument("dirs", type=Path, nargs="+", metavar="DIR",
                        help="bench output directories whose runs are pooled (two or more runs in all)")
    parser.add_argument("--section", choices=sorted(CELLS), default="capacity")
    parser.add_argument("--top", type=int, default=10, help="also list the N cells that spread most")
    args = parser.parse_args(argv)
    paths = [d / f"{args.section}.csv" for d in args.dirs]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        parser.exit(2, f"{parser.prog}: error: {', '.join(missing)}: no such file\n")
    rows = pd.concat([pd.read_csv(p) for p in paths], ignore_index=True)
    where = ", ".join(str(p) for p in paths)
    if rows["run_id"].nunique() < 2:
        parser.exit(2, f"{parser.prog}: error: {where}: one bench run only; a spread needs two or more\n")
    cells = spread(rows, args.section)
    if cells.empty:
        parser.exit(2, f"{parser.prog}: error: {where}: no cell was timed in two runs\n")
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(summary(cells).to_string(index=False, float_format=lambda v: f"{v:.4g}"))
        print(cells.sort_values("cv", ascending=False).head(args.top).to_string(index=False,
                                                                                  float_format=lambda v: f"{v:.4g}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
