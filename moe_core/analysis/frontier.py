"""Statistics -> what a configuration buys with its tokens and compute: tokens to a target loss,
compute-matched (iso-FLOP) comparisons at the ends of schedules, training throughput with its
interval, and the throughput/perplexity Pareto front with a bootstrap probability of membership.

- Tokens to target: per run, the training tokens at which the validation loss first reaches the
  target, interpolated linearly in tokens between the evaluation before and the one that reaches
  it (the first evaluation's tokens when it already does); seeds aggregated per config and budget.
- Iso-FLOP: a run's compute is its whole schedule's (tokens x train FLOPs per token); configs whose
  ends of schedule lie within ISO_FLOP_TOLERANCE of each other form one iso-FLOP group, and only
  their final losses are compared (a point inside a schedule still has a high learning rate).
- Throughput: from a solo timing pass when one is given (no other run on the GPU), else each run's
  median tokens/s, marked not comparable where the record says runs shared the GPU.
"""
from __future__ import annotations

import math
from itertools import combinations
from typing import NamedTuple

import numpy as np
import pandas as pd

from ..config import cf_label, require
from .load import SCHEDULE_FIELDS, config_keys, same_validation
from .stats import (
    ALPHA,
    CELL,
    COMPARISON_COLUMNS,
    compare,
    ec_decomposition,
    front_mask,
    ranking_check,
    run_table,
    summarize,
    t_quantile,
    variant_check,
)

ISO_FLOP_TOLERANCE = 0.05  # relative spread of end-of-schedule FLOPs inside one iso-FLOP group
COMPUTE_FIELDS = ("ffn", "top_k", "hidden", "num_experts", "budget_tokens")  # traded against each other at equal FLOPs
SPEED_COLUMNS = ("tokens_per_s", "tokens_per_s_ci95", "tokens_per_s_source", "tokens_per_s_comparable")


def tokens_to_target(evals: pd.DataFrame, target: float | None = None, metric: str = "val_loss",
                     interpolate: bool = True) -> tuple[float, pd.DataFrame]:
    """(target, per config and budget: ``n_runs``, ``n_reached`` and the seed statistics
    ``tokens_to_target_{mean,std,n,ci95}`` over the runs that reached it). Default target: the
    highest mean best loss of any config at the largest budget, so that every config reaches it
    there on average. See the module docstring for the interpolation."""
    ok = evals[evals["status"] == "ok"].dropna(subset=[metric, "tokens"]) if not evals.empty else evals
    cols = [*CELL, "label", "cf_label", "n_runs", "n_reached",
            *(f"tokens_to_target_{s}" for s in ("mean", "std", "n", "ci95"))]
    if ok.empty:
        return math.nan, pd.DataFrame(columns=cols)
    if target is None:
        best = ok[ok["budget_tokens"] == ok["budget_tokens"].max()].groupby([*CELL, "run"])[metric].min()
        target = float(best.groupby(level=CELL).mean().max())
    rows = []
    for (name, budget), group in ok.groupby(CELL, sort=False):
        reached = [_first_reach(run.sort_values("step"), metric, target, interpolate)
                   for _, run in group.groupby("run", sort=False)]
        rows.append([name, budget, group["label"].iloc[0], group["cf_label"].iloc[0], len(reached),
                     int(np.isfinite(reached).sum()), *summarize(reached).values()])
    return target, pd.DataFrame(rows, columns=cols)


def _first_reach(run: pd.DataFrame, metric: str, target: float, interpolate: bool) -> float:
    tokens, values = run["tokens"].to_numpy(float), run[metric].to_numpy(float)
    hit = np.flatnonzero(values <= target)
    if not len(hit):
        return math.nan
    i = hit[0]
    if i == 0 or not interpolate:
        return tokens[i]
    return tokens[i - 1] + (values[i - 1] - target) / (values[i - 1] - values[i]) * (tokens[i] - tokens[i - 1])


def comparable(runs: pd.DataFrame) -> pd.DataFrame:
    """The ok runs whose validation losses compare: evaluated on the experiment's usual validation text."""
    return same_validation(runs[runs["status"] == "ok"])


def iso_flop_groups(runs: pd.DataFrame, tolerance: float = ISO_FLOP_TOLERANCE) -> pd.DataFrame:
    """One row per config and budget with ok runs: its end-of-schedule ``train_flops`` (mean over
    seeds), COMPUTE_FIELDS, and ``iso_group``: sorted by FLOPs, a new group starts where a cell lies
    more than ``tolerance`` above the group's first; ``iso_flops`` is the group's median FLOPs. Configs
    evaluated on other text (``own_validation``: a split probe) take no part."""
    ok = comparable(runs)
    fields = [f for f in COMPUTE_FIELDS if f in ok]
    cells = ok.groupby(CELL, sort=False).agg(train_flops=("train_flops", "mean"),
                                             **{f: (f, "first") for f in fields if f not in CELL})
    cells = cells.reset_index().dropna(subset=["train_flops"]).sort_values("train_flops", kind="stable")
    groups, start = [], math.nan
    for flops in cells["train_flops"]:
        if not flops <= start * (1 + tolerance):
            start = flops
            groups.append(len(set(groups)))
        else:
            groups.append(groups[-1])
    cells["iso_group"] = groups
    cells["iso_flops"] = cells.groupby("iso_group")["train_flops"].transform("median")
    return cells.reset_index(drop=True)


def iso_flop_check(runs: pd.DataFrame, metric: str = "final_val_loss", tolerance: float = ISO_FLOP_TOLERANCE,
                   alpha: float = ALPHA) -> pd.DataFrame:
    """Compute-matched comparisons at the ends of schedules: inside each iso-FLOP group, every pair
    of cells that reach that compute by different means (a COMPUTE_FIELDS value differs: k, expert
    width, dense vs MoE, or the token budget), paired per seed on ``metric`` (default the final
    validation loss). One Holm family over all groups; a = the cell with more tokens (fewer FLOPs
    per token)."""
    cells = iso_flop_groups(runs, tolerance)
    fields = [f for f in COMPUTE_FIELDS if f in cells]
    pairs, groups = [], []
    for group, members in cells.groupby("iso_group", sort=True):
        members = members.sort_values(["budget_tokens", "train_flops"], ascending=[False, True], kind="stable")
        for a, b in combinations(members.itertuples(index=False), 2):
            if any(getattr(a, f) != getattr(b, f) for f in fields):
                pairs.append(((a.name, a.budget_tokens), (b.name, b.budget_tokens)))
                groups.append((group, members["iso_flops"].iloc[0]))
    if not pairs:
        return pd.DataFrame(columns=["iso_group", "iso_flops", *COMPARISON_COLUMNS])
    check = compare(runs, pairs, metric, alpha)
    return pd.concat([pd.DataFrame(groups, columns=["iso_group", "iso_flops"]), check], axis=1)


def throughput(runs: pd.DataFrame, bench: pd.DataFrame | None = None) -> pd.DataFrame:
    """Per config and budget, training tokens/s with its 95% CI and where it comes from (SPEED_COLUMNS).

    With ``bench`` (a solo timing pass: one row per configuration with its median ``tokens_per_s``,
    ``tokens_per_s_cv`` over repeats and, optionally, ``repeats``), the bench row of each config,
    matched on ``name`` when the bench has it, else on the config columns both frames have (a bench
    without ``ffn`` times MoE layers only); CI = t * cv * median / sqrt(repeats), NaN without
    repeats. A config the bench lacks gets NaN: solo and shared timings are never mixed. Without a
    bench: the mean over seeds of each run's median tokens/s with its Student-t CI, comparable only
    if no run of the config shared its GPU (``concurrency`` > 1)."""
    ok = runs[runs["status"] == "ok"]
    if bench is None:
        rows = []
        for (name, budget), group in ok.groupby(CELL, sort=False):
            speed = summarize(group["median_tokens_per_s"])
            shared = "concurrency" in group and bool((pd.to_numeric(group["concurrency"], errors="coerce") > 1).any())
            rows.append([name, budget, speed["mean"], speed["ci95"], "runs (shared GPU)" if shared else "runs",
                         not shared])
        return pd.DataFrame(rows, columns=[*CELL, *SPEED_COLUMNS])
    require("tokens_per_s" in bench and "tokens_per_s_cv" in bench, "bench",
            f"a solo timing frame needs tokens_per_s and tokens_per_s_cv columns, got {sorted(bench.columns)}")
    keys, frame = _bench_keys(ok, bench)
    # Rows that time one training step twice (configs that differ only in what the step does not see,
    # e.g. the data split) are pooled: their median, the larger spread and the fewer repeats.
    pooled = {"tokens_per_s": "median", "tokens_per_s_cv": "max", **({"repeats": "min"} if "repeats" in frame else {})}
    frame = frame.groupby(keys, dropna=False, sort=False).agg(pooled).reset_index()
    repeats = frame["repeats"] if "repeats" in frame else pd.Series(math.nan, index=frame.index)
    frame = frame.assign(tokens_per_s_ci95=[
        t_quantile(0.975, n - 1) * cv * tok / math.sqrt(n) if n > 1 else math.nan
        for tok, cv, n in zip(frame["tokens_per_s"], frame["tokens_per_s_cv"], repeats.fillna(0))])
    matched = ok.drop_duplicates(CELL)[list(dict.fromkeys([*CELL, *keys]))].astype({k: object for k in keys}).merge(
        frame[[*keys, "tokens_per_s", "tokens_per_s_ci95"]].astype({k: object for k in keys}), on=keys, how="left")
    timed = matched["tokens_per_s"].notna()
    return matched[CELL].assign(tokens_per_s=matched["tokens_per_s"], tokens_per_s_ci95=matched["tokens_per_s_ci95"],
                                tokens_per_s_source=np.where(timed, "solo bench", "no solo timing"),
                                tokens_per_s_comparable=timed.to_numpy(bool))


def _bench_keys(runs: pd.DataFrame, bench: pd.DataFrame) -> tuple[list[str], pd.DataFrame]:
    """(join columns, bench with cf_label and ffn filled in) for matching bench rows to run configs:
    the config name where the bench uses the analysis's names, else the config columns (a bench over
    a params file names its rows by their first run)."""
    if "name" in bench and bench["name"].isin(runs["name"]).any():
        return ["name"], bench
    frame = bench.assign(ffn=bench["ffn"] if "ffn" in bench else "moe")
    if "capacity_factor" in frame:  # a dense FFN has no capacity factor (its runs' cf_label is empty)
        frame = frame.assign(cf_label=frame["capacity_factor"].map(cf_label).where(frame["ffn"] != "dense"))
    keys = [k for k in config_keys(runs) if k in frame and k not in (*SCHEDULE_FIELDS, "capacity_factor")]
    return keys + ["cf_label"] * ("cf_label" in frame), frame


def pareto_probability(runs: pd.DataFrame, speed: pd.DataFrame, metric: str = "best_val_ppl",
                       resamples: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Per config and budget: ``pareto`` (on the front of its budget by the seed means: max tokens/s
    of ``speed`` (throughput), min ``metric``) and ``pareto_prob``, the share of bootstrap resamples
    in which it is on the front: each config's seeds resampled with replacement, its tokens/s
    resampled with them when it comes from the runs, fixed when it comes from a solo bench. A config
    whose tokens/s is not comparable, or that is evaluated on other text (``own_validation``), takes no
    part: never on the front, probability NaN."""
    ok = comparable(runs)
    cells = speed.dropna(subset=CELL).reset_index(drop=True)
    ranked = cells[CELL].merge(ok.drop_duplicates(CELL)[CELL].assign(ranked=True), on=CELL, how="left")
    usable = cells["tokens_per_s_comparable"].to_numpy(bool) & ranked["ranked"].fillna(False).to_numpy(bool)
    rng = np.random.default_rng(seed)
    draws = np.full((resamples, len(cells), 2), math.nan)
    means = np.full((len(cells), 2), math.nan)
    for i, cell in enumerate(cells.itertuples(index=False)):
        group = ok[(ok["name"] == cell.name) & (ok["budget_tokens"] == cell.budget_tokens)]
        if not (len(group) and usable[i]):
            continue
        quality = group[metric].to_numpy(float)
        per_run = cell.tokens_per_s_source.startswith("runs")
        speed_i = group["median_tokens_per_s"].to_numpy(float) if per_run else np.full(len(group), cell.tokens_per_s)
        idx = rng.integers(0, len(group), size=(resamples, len(group)))
        draws[:, i] = np.stack([speed_i[idx].mean(axis=1), quality[idx].mean(axis=1)], axis=-1)
        means[i] = speed_i.mean(), quality.mean()
    budgets = cells["budget_tokens"].to_numpy()
    return cells[CELL].assign(pareto=front_mask(means[None], budgets)[0],
                              pareto_prob=np.where(usable, front_mask(draws, budgets).mean(axis=0), math.nan))


def budget_table(runs: pd.DataFrame, evals: pd.DataFrame | None = None, bench: pd.DataFrame | None = None,
                 target: float | None = None, resamples: int = 1000) -> tuple[float, pd.DataFrame]:
    """(tokens-to-target target, the results frame): stats.run_table per config and budget, with
    throughput (SPEED_COLUMNS), the Pareto front on those tokens/s and its bootstrap probability,
    and, given the evals, tokens to the target loss (NaN target without them)."""
    table = run_table(runs)
    if table.empty:
        return math.nan, table
    speed = throughput(runs, bench)
    front = pareto_probability(runs, speed, resamples=resamples)
    table = table.drop(columns="pareto").merge(speed, on=CELL, how="left").merge(front, on=CELL, how="left")
    if evals is None or evals.empty:
        return math.nan, table
    target, reach = tokens_to_target(evals, target)
    return target, table.merge(reach.drop(columns=["label", "cf_label", "n_runs"]), on=CELL, how="left")


class Analysis(NamedTuple):
    """Every statistic of an experiment's results, computed once for its tables, macros and markdown."""
    table: pd.DataFrame  # budget_table: one row per config and budget
    target: float  # the tokens-to-target loss (NaN without evals)
    ranking: pd.DataFrame  # stats.ranking_check: the prior claim, every router pair x CF, Holm per budget
    variants: pd.DataFrame  # stats.variant_check: each variant vs its main config, Holm per budget
    iso: pd.DataFrame  # iso_flop_check: compute-matched pairs at the ends of schedules, one Holm family
    ec: pd.DataFrame | None = None  # stats.ec_decomposition: expert choice's causal gap in two parts


def analyse(runs: pd.DataFrame, evals: pd.DataFrame | None = None, bench: pd.DataFrame | None = None,
            target: float | None = None) -> Analysis:
    """The results of one experiment from its run (and eval) frames and an optional solo timing pass."""
    target, table = budget_table(runs, evals, bench, target)
    return Analysis(table, target, ranking_check(runs), variant_check(runs), iso_flop_check(runs),
                    ec_decomposition(runs))
