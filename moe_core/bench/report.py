"""Bench records and what is read from them: every run's rows stamped with its identity and
appended to ``<section>.jsonl`` (+ a tidy ``<section>.csv`` and ``<section>_<run_id>.json`` with the
config and environment); the join of capacity rows with Experiment A's training runs; the printed
tables and the capacity chart."""
from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import asdict
from pathlib import Path

import pandas as pd

from .. import records as rr
from ..analysis.results import load_experiment
from ..config import cf_label
from .configs import BenchConfig

JOIN_COLUMNS = ["run", "status", "router", "num_experts", "top_k", "capacity_factor", "cf_label", "best_val_ppl",
                "train_tokens_per_s", "source", "drop_rate", "token_drop_rate", "dispatch_tokens_per_s",
                "layer_tokens_per_s"]
_BENCH_JOIN = ["drop_rate", "token_drop_rate", "dispatch_tokens_per_s", "layer_tokens_per_s"]
TABLES = {
    "capacity": ["source", "num_experts", "top_k", "cf_label", "capacity", "drop_rate", "token_drop_rate",
                 "load_cv", "max_vio", "dispatch_ms", "dispatch_bw_frac", "layer_ms", "layer_host_ms",
                 "layer_tokens_per_s", "status"],
    "layer": ["tokens", "dim", "hidden", "num_experts", "top_k", "backend", "compile_mode", "moe_ms", "dense_ms",
              "moe_over_dense", "moe_mfu", "dense_mfu", "status"],
    "train": ["router", "capacity_factor", "batch_size", "backend", "compile_mode", "tokens_per_s", "tokens_per_s_cv",
              "ms_per_step", "mfu", "status"],
    "sweep": ["gpus", "runs_per_gpu", "kernel", "runs", "ok_runs", "cache_warm", "cache_misses", "wall_s",
              "runs_per_hour", "train_share", "start_share", "compile_share", "eval_share", "outside_runs_share",
              "tokens_per_s_aggregate"],
}


def record(cfg: BenchConfig, rows: list[dict], out_dir: str | Path | None, extra: dict) -> pd.DataFrame:
    """Stamp rows with the run's identity; with ``out_dir``, append them to <section>.jsonl, rewrite
    <section>.csv (every row so far, tidy) and write <section>_<run_id>.json (this run in full, with
    ``extra``)."""
    env, git = rr.environment(cfg.torch_device), rr.git_commit()
    run_id = f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"
    stamp = {"run_id": run_id, "device_name": env["device"], "dtype": str(cfg.torch_dtype).removeprefix("torch."),
             "torch": env["torch"], "cuda": env["cuda"], "commit": git["commit"], "seed": cfg.seed,
             "repeats": cfg.repeats, "sets": cfg.sets}
    rows = [rr.jsonable({**row, **stamp}) for row in rows]
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        name = cfg.SECTION
        with open(out / f"{name}.jsonl", "a") as f:
            f.writelines(json.dumps(row, allow_nan=False) + "\n" for row in rows)
        pd.DataFrame(rr.read_metrics(out / f"{name}.jsonl")).to_csv(out / f"{name}.csv", index=False)
        rr.write_json(out / f"{name}_{run_id}.json", {"run_id": run_id, "config": asdict(cfg), "git": git,
                                                     "env": env, **extra, "rows": rows})
    return pd.DataFrame(rows)


# -- joining with Experiment A ----------------------------------------------------------------------
def training_runs(runs_dir: str | Path, experiment: str = "experiment_a") -> pd.DataFrame:
    """One row per finished (status ok) training run of runs_dir/experiment, read by
    moe_core.analysis.results: router ('dense' for the dense baseline), E, k, CF, best validation
    perplexity, median tokens/s."""
    runs = load_experiment(runs_dir, experiment).runs
    if runs.empty or "best_val_ppl" not in runs:
        return pd.DataFrame(columns=JOIN_COLUMNS[:9])
    runs = runs[(runs["status"] == "ok") & runs["best_val_ppl"].notna()]
    runs = runs.drop(columns="router").rename(columns={"label": "router", "median_tokens_per_s": "train_tokens_per_s"})
    return runs[JOIN_COLUMNS[:9]]


def join_with_training(bench_df: pd.DataFrame, runs_dir: str | Path, experiment: str = "experiment_a") -> pd.DataFrame:
    """Capacity factor vs perplexity and tokens/s: each Experiment A run (training_runs) with the
    capacity bench's drop rates and speeds at its (E, k, CF), one row per routing source (bench
    rows of repeated runs averaged). Columns JOIN_COLUMNS; empty, with them, when there are no runs."""
    train = training_runs(runs_dir, experiment)
    keys = ["num_experts", "top_k", "cf_label"]
    if bench_df.empty or train.empty:
        return train.reindex(columns=JOIN_COLUMNS)
    bench = (bench_df.assign(cf_label=bench_df["capacity_factor"].map(cf_label))
             .groupby(["source", *keys], as_index=False)[_BENCH_JOIN].mean())
    joined = train.astype({"num_experts": "Int64", "top_k": "Int64"}).merge(
        bench.astype({"num_experts": "Int64", "top_k": "Int64"}), on=keys, how="left")
    return joined[JOIN_COLUMNS]


# -- tables and charts ------------------------------------------------------------------------------
def table(df: pd.DataFrame, section: str) -> str:
    """The printed summary of a bench frame."""
    return df[[c for c in TABLES[section] if c in df]].to_string(index=False, float_format=lambda v: f"{v:.4g}")


def capacity_chart(df: pd.DataFrame):
    """Drop rate, token drop rate and layer tokens/s against the capacity factor (altair), one
    column per E, a line per (source, k)."""
    import altair as alt  # imported on use: GPU hosts run the benches without the plotting stack

    order = sorted(df["cf_label"].unique(), key=lambda s: math.inf if s == "dropless" else float(s))
    long = df.assign(series=df["source"] + " k=" + df["top_k"].astype(str)).melt(
        id_vars=["series", "num_experts", "cf_label"], value_vars=["drop_rate", "token_drop_rate", "layer_tokens_per_s"],
        var_name="metric")
    return alt.Chart(long).mark_line(point=True).encode(
        x=alt.X("cf_label:O", sort=order, title="capacity factor"), y=alt.Y("value:Q", title=None),
        color="series:N", tooltip=["series", "num_experts", "cf_label", "metric", "value"],
    ).properties(width=160, height=120).facet(row="metric:N", column="num_experts:O").resolve_scale(y="independent")
