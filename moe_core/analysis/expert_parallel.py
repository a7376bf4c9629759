"""Expert-parallel bench records -> the paper's table, figure and number macros: what the capacity
factor costs in all-to-all once the experts live on different GPUs.

Reads ``<dir>/expert_parallel.jsonl`` (moe_core.bench.expert_parallel: one row per routing source x
E x k x CF and bench run) and the run JSONs beside it (command, commit, torch), from any number of
directories: one per GPU host and world size W. A *cell* is (W, source, E, k, CF); the bench runs
of one cell are averaged (``n_runs``: medians and CVs alike). One W must come from one device.

What a row's exchange time is (see the bench): CUDA events on the rank's compute stream just before
and after every ``all_to_all_single`` of the layer, summed over the call, the slowest rank per call,
the median over calls. The region holds the transfer and also any wait for the peer ranks to reach
the collective and any host time to issue it (dropless: with the split sizes' exchange, read on the
host before the rows go). The bare reference times the same collective alone, back to back.

Units: MB = 1e6 bytes a rank sends per forward call; GB/s = 1e9 bytes/s (bus bandwidth, the
nccl-tests convention algbw*(W-1)/W); shares are % of the layer's median time; CV = std/mean over
timed calls.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

import altair as alt
import pandas as pd

from .. import records as rr
from ..config import require
from .latex import TeX, format_number, tex_escape, to_csv, write_numbers, write_table
from .load import cf_order_value, load_bench
from .plots import SMALL_HEIGHT, SMALL_WIDTH, _cf_domain, _source_color
from .tables import PAPER_INPUTS, ROOT

SECTION = "expert_parallel"
BENCH_ROOT = ROOT / "runs" / "benchmarks"  # where committed bench records live
CELL = ("world_size", "source", "num_experts", "top_k", "cf_label")
MEANS = ("capacity", "drop_rate", "token_drop_rate", "load_cv", "a2a_bytes", "a2a_bytes_max", "fwd_ms", "fwd_ms_cv",
         "fwd_a2a_ms", "fwd_a2a_ms_cv", "fwd_a2a_share", "fwd_bwd_ms", "fwd_bwd_ms_cv", "fwd_bwd_a2a_ms",
         "fwd_bwd_a2a_ms_cv", "fwd_bwd_a2a_share", "a2a_algbw_gbps", "a2a_busbw_gbps", "ref_bytes", "ref_ms",
         "ref_ms_cv", "ref_busbw_gbps", "a2a_over_ref")
SETUP = ("device_name", "tokens", "dim", "hidden", "router", "dtype", "warmup", "repeats", "sets")
SOURCE_ORDER = ("random", "skewed", "checkpoint")  # display order: by the prefix before ':'
CAPTION = (
    "Expert-parallel MoE layer on {devices} (NCCL, bench run {dates}; $T$\\,=\\,{tokens} tokens per rank, "
    "$D$\\,=\\,{dim}, $F$\\,=\\,{hidden}, {dtype}, {router}) per routing source, $E$, $k$ and capacity factor: "
    "dropped assignments, MB a rank sends per forward call, the time of the layer's all-to-all exchanges in the "
    "forward and in forward+backward (ms, median over calls of the slowest rank; CV over calls in \\%) and their "
    "share of the layer's time, their bus bandwidth, that of a bare all-to-all of the same bytes timed alone, and "
    "the exchanges' forward time over the bare one's.")


# -- records ----------------------------------------------------------------------------------------
def record_dirs(bench_dirs: str | Path | Iterable | None = None) -> list[Path]:
    """``bench_dirs`` as paths (one or several), or with None every directory under
    runs/benchmarks/ that holds expert-parallel records."""
    if bench_dirs is None:
        return sorted(d for d in BENCH_ROOT.iterdir() if (d / f"{SECTION}.jsonl").exists())
    return [Path(d) for d in ([bench_dirs] if isinstance(bench_dirs, (str, Path)) else bench_dirs)]


def check_destinations(bench_dirs: list[Path], figures_dir: str | Path, tables_dir: str | Path,
                       numbers_path: str | Path) -> None:
    """Before any record is read: the committed paper inputs (figures/, paper/tables/, paper/) are
    written only from committed bench records (directories under runs/benchmarks/), so a draft
    (a CPU bench in runs/expert_parallel, say) cannot overwrite them."""
    require(len(bench_dirs) > 0, "bench_dirs", f"no directory with {SECTION} records")
    dests = (Path(figures_dir), Path(tables_dir), Path(numbers_path).parent)
    if any(dest.resolve() == committed for dest, committed in zip(dests, PAPER_INPUTS)):
        for d in bench_dirs:
            require(Path(d).resolve().parent == BENCH_ROOT, "bench_dirs",
                    f"{d} is not under runs/benchmarks/: only committed bench records write the paper inputs "
                    f"in figures/, paper/tables/ and paper/; write drafts to figures/smoke and paper/tables/smoke")


def load_records(bench_dirs: list[Path]) -> pd.DataFrame:
    """Every bench row of every directory, with its directory's name as ``bench_dir``."""
    frames = []
    for d in bench_dirs:
        rows = load_bench(d, SECTION)
        require(len(rows) > 0, "bench_dirs", f"no {SECTION}.jsonl or {SECTION}.csv in {d}")
        frames.append(rows.assign(bench_dir=Path(d).name))
    rows = pd.concat(frames, ignore_index=True)
    devices = rows.groupby("world_size")["device_name"].unique()
    mixed = {int(w): list(d) for w, d in devices.items() if len(d) > 1}
    require(not mixed, "bench_dirs", f"world size(s) measured on more than one device {mixed}: analyse them apart")
    return rows


def run_records(bench_dirs: list[Path]) -> pd.DataFrame:
    """One row per bench run (its ``expert_parallel_<run_id>.json``): W, run id, date, directory,
    the bench command as launched (torchrun + the recorded arguments), commit, torch, checkpoint."""
    out = []
    for d in bench_dirs:
        for path in sorted(Path(d).glob(f"{SECTION}_*.json")):
            record = rr.read_json(path) or {}
            rows, env = record.get("rows") or [{}], record.get("env", {})
            world = rows[0].get("world_size")
            args = " ".join(env.get("argv", [])[1:])
            checkpoint = record.get("config", {}).get("checkpoint")
            out.append({"world_size": world, "run_id": record.get("run_id", ""), "bench_dir": Path(d).name,
                        "date": _date(record.get("run_id", "")), "commit": record.get("git", {}).get("commit"),
                        "torch": env.get("torch"), "checkpoint": checkpoint,
                        "command": f"torchrun --nproc-per-node {world} -m moe_core.bench.{SECTION} {args}".strip()})
    return pd.DataFrame(out, columns=["world_size", "run_id", "bench_dir", "date", "commit", "torch", "checkpoint",
                                      "command"])


def _date(run_id: str) -> str:
    return f"{run_id[:4]}-{run_id[4:6]}-{run_id[6:8]}" if len(run_id) >= 8 else "n/a"


def _source_rank(source: str) -> int:
    kind = source.split(":")[0]
    return SOURCE_ORDER.index(kind) if kind in SOURCE_ORDER else len(SOURCE_ORDER)


def cells(rows: pd.DataFrame) -> pd.DataFrame:
    """One row per cell: MEANS averaged over bench runs, the setup, ``n_runs`` and the directories;
    in display order (W, source, E, k, CF with dropless last)."""
    agg = {m: (m, "mean") for m in MEANS if m in rows}
    agg |= {s: (s, "first") for s in SETUP if s in rows}
    agg |= {"n_runs": ("run_id", "nunique"), "bench_dir": ("bench_dir", lambda s: ", ".join(sorted(set(s))))}
    frame = rows.groupby(list(CELL), sort=False).agg(**agg).reset_index()
    order = frame.assign(_s=frame["source"].map(_source_rank), _c=frame["cf_label"].map(cf_order_value))
    return frame.loc[order.sort_values(["world_size", "_s", "source", "num_experts", "top_k", "_c"]).index] \
        .reset_index(drop=True)


# -- table ------------------------------------------------------------------------------------------
def _time_cv(ms: float, cv: float) -> str:
    return f"{format_number(ms)} ({format_number(100 * cv, 2)})"


def _blank_repeats(frame: pd.DataFrame, cols: list[str]) -> pd.DataFrame:
    """A column's cell left empty where it and every column before it repeat the row above."""
    out = frame.copy()
    same = pd.Series(True, index=frame.index)
    for col in cols:
        same &= frame[col].eq(frame[col].shift())
        out.loc[same, col] = ""
    return out


def _pct(fraction: float) -> str:
    return format_number(100 * fraction)


def ep_table(cells: pd.DataFrame) -> pd.DataFrame:
    """The paper's table (LaTeX cells), one row per cell; W and runs shown where they vary."""
    columns = {"Source": cells["source"].map(tex_escape)}
    if cells["world_size"].nunique() > 1:
        columns["$W$"] = cells["world_size"].map(lambda w: format_number(int(w)))
    columns |= {
        "$E$": cells["num_experts"].map(lambda e: format_number(int(e))),
        "$k$": cells["top_k"].map(lambda k: format_number(int(k))),
        "CF": cells["cf_label"].map(tex_escape),
        "Drop (\\%)": cells["drop_rate"].map(_pct),
        "MB": (cells["a2a_bytes"] / 1e6).map(format_number),
        "A2A fwd ms (CV)": [_time_cv(m, c) for m, c in zip(cells["fwd_a2a_ms"], cells["fwd_a2a_ms_cv"])],
        "of fwd (\\%)": cells["fwd_a2a_share"].map(_pct),
        "A2A fwd+bwd ms (CV)": [_time_cv(m, c) for m, c in zip(cells["fwd_bwd_a2a_ms"], cells["fwd_bwd_a2a_ms_cv"])],
        "of fwd+bwd (\\%)": cells["fwd_bwd_a2a_share"].map(_pct),
        "busbw GB/s": cells["a2a_busbw_gbps"].map(format_number),
        "bare GB/s": cells["ref_busbw_gbps"].map(format_number),
        "$\\times$ bare": cells["a2a_over_ref"].map(format_number),
    }
    if (cells["n_runs"] > 1).any():
        columns["Runs"] = cells["n_runs"].map(format_number)
    table = pd.DataFrame(columns)
    return _blank_repeats(table, [c for c in ("Source", "$W$", "$E$") if c in table])


def caption(cells: pd.DataFrame, runs: pd.DataFrame) -> str:
    first = cells.iloc[0]
    devices = ", ".join(f"{int(w)} $\\times$ {tex_escape(d)}" for w, d in
                        cells[["world_size", "device_name"]].drop_duplicates().itertuples(index=False))
    return CAPTION.format(devices=devices, dates=", ".join(sorted(set(runs["date"]))) or "n/a",
                          tokens=format_number(int(first["tokens"])), dim=format_number(int(first["dim"])),
                          hidden=format_number(int(first["hidden"])), dtype=tex_escape(first["dtype"]),
                          router=f"\\texttt{{{tex_escape(first['router'])}}}")


# -- numbers ----------------------------------------------------------------------------------------
CELL_NUMBERS = {"mb": ("a2a_bytes", 1e-6), "mb max": ("a2a_bytes_max", 1e-6), "drop pct": ("drop_rate", 100),
                "fwd ms": ("fwd_ms", 1), "fwd bwd ms": ("fwd_bwd_ms", 1), "fwd a2a ms": ("fwd_a2a_ms", 1),
                "fwd share pct": ("fwd_a2a_share", 100), "fwd bwd share pct": ("fwd_bwd_a2a_share", 100),
                "busbw": ("a2a_busbw_gbps", 1), "ref busbw": ("ref_busbw_gbps", 1), "over ref": ("a2a_over_ref", 1)}
RANGES = {"mb": ("a2a_bytes", 1e-6), "fwd ms": ("fwd_ms", 1), "fwd bwd ms": ("fwd_bwd_ms", 1),
          "fwd share pct": ("fwd_a2a_share", 100), "fwd bwd share pct": ("fwd_bwd_a2a_share", 100),
          "busbw": ("a2a_busbw_gbps", 1), "ref busbw": ("ref_busbw_gbps", 1), "over ref": ("a2a_over_ref", 1),
          "a2a cv pct": ("fwd_a2a_ms_cv", 100), "ref cv pct": ("ref_ms_cv", 100)}


def _ranges(frame: pd.DataFrame, prefix: str, names: Iterable[str]) -> dict:
    """``<prefix> <name> min|median|max`` of RANGES over the rows of ``frame``."""
    numbers = {}
    for name in names:
        col, scale = RANGES[name]
        values = frame[col] * scale
        numbers |= {f"{prefix} {name} min": values.min(), f"{prefix} {name} median": values.median(),
                    f"{prefix} {name} max": values.max()}
    return numbers


def _verbatim(text: str) -> TeX:
    """Escaped, with ``--`` kept as two hyphens (T1 fonts make it an en dash, also in \\texttt)."""
    return TeX(tex_escape(text).replace("--", "-{}-"))


def _shorter_than_base(group: pd.DataFrame, prefix: str) -> dict:
    """Per capacity setting: in how many (source, E, k) of ``<prefix> groups`` its exchanges took less
    time than at the smallest capacity factor (``<prefix> base cf``), forward and forward+backward."""
    times = group.pivot_table(index=["source", "num_experts", "top_k"], columns="cf_label",
                              values=["fwd_a2a_ms", "fwd_bwd_a2a_ms"])
    finite = [cf for cf in _cf_domain(group["cf_label"]) if cf != "dropless"]
    if not finite:
        return {}
    base, numbers = finite[0], {f"{prefix} groups": len(times), f"{prefix} base cf": finite[0]}
    for cf in _cf_domain(group["cf_label"]):
        if cf != base:
            for mode, col in (("fwd", "fwd_a2a_ms"), ("fwd bwd", "fwd_bwd_a2a_ms")):
                numbers[f"{prefix} cf {cf} a2a shorter {mode}"] = int((times[col][cf] < times[col][base]).sum())
    return numbers


def ep_numbers(cells: pd.DataFrame, runs: pd.DataFrame) -> dict:
    """Macros per world size W (prefix ``Ep W<W>``, e.g. \\EpWTwoDevice): the run's identity (device,
    GPUs, date, directory, commit, torch, command, trained source), the setup and grid; min/median/max
    over cells; per CF and per CF x k the same over sources and E; per CF, in how many (source, E, k)
    its exchanges were shorter than at the smallest CF; and per cell
    ``<source> E<E> K<k> Cf<cf>`` followed by a CELL_NUMBERS name, e.g.
    \\EpWTwoRandomEEightKTwoCfOnePtZeroFwdSharePct."""
    numbers = {}
    for world, group in cells.groupby("world_size", sort=True):
        w = f"ep w{int(world)}"
        mine = runs[runs["world_size"] == world]
        first = group.iloc[0]
        checkpoints = sorted({c for c in mine["checkpoint"] if c})
        numbers |= {f"{w} gpus": int(world), f"{w} device": first["device_name"],
                    f"{w} date": ", ".join(sorted(set(mine["date"]))) or "n/a",
                    f"{w} dir": ", ".join(sorted({d for dirs in group["bench_dir"] for d in dirs.split(", ")})),
                    f"{w} commit": ", ".join(sorted({c for c in mine["commit"] if c})) or "n/a",
                    f"{w} torch": ", ".join(sorted({t for t in mine["torch"] if t})) or "n/a",
                    f"{w} command": _verbatim(mine["command"].iloc[-1]) if len(mine) else "n/a",
                    f"{w} runs": int(group["n_runs"].max()), f"{w} cells": len(group),
                    f"{w} sources": ", ".join(group["source"].unique()),
                    f"{w} experts": ", ".join(str(int(e)) for e in sorted(group["num_experts"].unique())),
                    f"{w} top ks": ", ".join(str(int(k)) for k in sorted(group["top_k"].unique())),
                    f"{w} cfs": ", ".join(_cf_domain(group["cf_label"]))}
        if checkpoints:
            numbers |= {f"{w} checkpoint run": ", ".join(Path(c).parent.name for c in checkpoints),
                        f"{w} checkpoint dir": ", ".join(str(Path(c).parent.parent) for c in checkpoints)}
        numbers |= {f"{w} {k}": first[k] for k in ("tokens", "dim", "hidden", "dtype", "router", "warmup", "repeats",
                                                   "sets") if k in first}
        numbers |= _ranges(group, w, RANGES)
        for cf, per_cf in group.groupby("cf_label", sort=False):
            numbers |= _ranges(per_cf, f"{w} cf {cf}", ("fwd share pct", "fwd bwd share pct", "busbw", "over ref"))
            for k, per_k in per_cf.groupby("top_k"):
                numbers |= _ranges(per_k, f"{w} cf {cf} k{int(k)}", ("fwd share pct", "busbw", "over ref"))
        numbers |= _shorter_than_base(group, w)
        for row in group.to_dict("records"):
            key = f"{w} {row['source']} e{int(row['num_experts'])} k{int(row['top_k'])} cf {row['cf_label']}"
            numbers |= {f"{key} {name}": row[col] * scale for name, (col, scale) in CELL_NUMBERS.items()}
    return numbers


def write_ep(cells: pd.DataFrame, runs: pd.DataFrame, tables_dir: str | Path,
             numbers_path: str | Path) -> tuple[list[Path], dict]:
    """``expert_parallel.tex`` (booktabs table*, footnotesize), ``expert_parallel.csv`` (every cell
    column) and the number macros at ``numbers_path``. Returns (paths written, numbers)."""
    tables_dir = Path(tables_dir)
    tex = write_table(ep_table(cells), tables_dir / f"{SECTION}.tex", caption=caption(cells, runs),
                      label=f"tab:{SECTION}")
    # 40+ rows of 13 columns: footnotesize and narrow gaps, set inside the float (LaTeX resets its font size)
    small = "\\centering\n\\footnotesize\\setlength{\\tabcolsep}{2.5pt}\n"
    tex.write_text(tex.read_text().replace("\\centering\n", small, 1))
    numbers = ep_numbers(cells, runs)
    return [tex, to_csv(cells, tables_dir / f"{SECTION}.csv"), write_numbers(numbers, numbers_path)], numbers


# -- figure -----------------------------------------------------------------------------------------
def ep_chart(cells: pd.DataFrame) -> alt.VConcatChart:
    """The exchanges' share of the layer's forward time and their bus bandwidth against the capacity
    factor: a column per E (and W where several), colour = routing source, dash and shape = k; grey
    ticks in the bandwidth row: a bare all-to-all of the same bytes."""
    several = cells["world_size"].nunique() > 1
    df = cells.assign(
        k=cells["top_k"].map(lambda k: f"k={int(k)}"), share_pct=100 * cells["fwd_a2a_share"],
        panel=[f"E = {int(e)}" + (f", {int(w)} GPUs" if several else " experts")
               for e, w in zip(cells["num_experts"], cells["world_size"])])
    panels = list(dict.fromkeys(df.sort_values(["world_size", "num_experts"])["panel"]))
    color = _source_color(df)
    color.legend = alt.Legend(columns=3)

    def row(y: alt.Y, top: bool, bare: str | None = None) -> alt.FacetChart:
        x = alt.X("cf_label:O", title=None if top else "capacity factor", sort=_cf_domain(df["cf_label"]),
                  axis=alt.Axis(labelAngle=0))
        layers = [alt.Chart().mark_line(point=alt.OverlayMarkDef(size=18)).encode(
            x=x, y=y, color=color, strokeDash=alt.StrokeDash("k:N", title="top-k", legend=alt.Legend(columns=2)),
            shape=alt.Shape("k:N", legend=None),
            tooltip=["source", "panel", "k", "cf_label", "share_pct", "a2a_busbw_gbps", "ref_busbw_gbps"])]
        if bare:
            layers.insert(0, alt.Chart().mark_tick(color="#9a9a9a", thickness=1.5, size=9).encode(x=x, y=f"{bare}:Q"))
        return alt.layer(*layers, data=df).properties(width=SMALL_WIDTH, height=SMALL_HEIGHT).facet(
            column=alt.Column("panel:N", title=None, sort=panels, header=alt.Header(labels=top)))

    share = alt.Y("share_pct:Q", title="all-to-all, % of fwd", scale=alt.Scale(domain=[0, 100]))
    busbw = alt.Y("a2a_busbw_gbps:Q", title="bus bandwidth (GB/s)", scale=alt.Scale(zero=True))
    devices = ", ".join(f"{int(w)}× {d}" for w, d in cells[["world_size", "device_name"]].drop_duplicates()
                        .itertuples(index=False))
    subtitle = f"{devices}, NCCL; median over calls; grey: a bare all-to-all of the same bytes"
    return alt.vconcat(row(share, True), row(busbw, False, bare="ref_busbw_gbps")).properties(
        title=alt.Title("Capacity factor vs. all-to-all", subtitle=subtitle))
