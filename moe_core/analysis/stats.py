"""Frames -> statistics: seed summaries (mean, s.d., Student-t CI), Welch differences, the check of a
claimed router ranking, per-config aggregates, the Pareto front, iso-FLOP views and the capacity
bench's aggregates.

Statistics use the rows whose status is ``ok``; every other run stays listed in the run frame with
its status and error (load.failed_runs).
"""
from __future__ import annotations

import math
from functools import cache
from typing import Iterable

import numpy as np
import pandas as pd

from .load import BENCH_KEYS, BENCH_METRICS, DESCRIPTORS, ROUTING_STATS, cf_order_value, config_keys, sort_rows

RUN_METRICS = ("best_val_ppl", "best_val_loss", "best_val_ppl_noncausal", "best_val_loss_noncausal",
               "final_val_loss", "median_tokens_per_s", "mfu", *(f"final_{s}" for s in ROUTING_STATS))
EVAL_METRICS = ("val_loss", "val_ppl", "val_loss_noncausal", "train_loss", "tokens_per_s", *ROUTING_STATS)
CURVE_KEYS = ("step", "tokens", "train_flops")  # per evaluation, equal across the seeds of a config
FRONT = ("median_tokens_per_s_mean", "best_val_ppl_mean")  # Pareto axes: maximise x, minimise y
PRIOR_CLAIM = ("expert_choice", "softk", "hash", "topk_hard", "top1")  # the prior ranking to test, best first
TRAINED_SOURCE = "trained (Exp. A)"  # Experiment B rows taken from training runs' routing


@cache
def t_quantile(p: float, df: int) -> float:
    """Student-t quantile, without scipy: bisection on the CDF, whose density is integrated with
    Simpson's rule (error far below the 4 digits a CI needs)."""
    if not (0.5 <= p < 1 and df >= 1):
        raise ValueError(f"t_quantile: need 0.5 <= p < 1 and df >= 1, got p={p}, df={df}")
    norm = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)

    def cdf(x: float) -> float:
        t = np.linspace(0.0, x, 4001)
        pdf = norm * (1 + t * t / df) ** (-(df + 1) / 2)
        weights = np.ones_like(t)
        weights[1:-1:2], weights[2:-1:2] = 4, 2
        return 0.5 + (x / 4000 / 3) * float(weights @ pdf)

    lo, hi = 0.0, 1.0
    while cdf(hi) < p:
        lo, hi = hi, hi * 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < p else (lo, mid)
    return (lo + hi) / 2


def summarize(values: Iterable[float]) -> dict:
    """mean, sample std (ddof 1), n and the half-width of the 95% Student-t CI of the finite values
    (std and CI are NaN below two values)."""
    x = np.asarray([v for v in values if v is not None], dtype=float)
    x = x[np.isfinite(x)]
    n = len(x)
    mean = float(x.mean()) if n else math.nan
    std = float(x.std(ddof=1)) if n > 1 else math.nan
    ci = t_quantile(0.975, n - 1) * std / math.sqrt(n) if n > 1 else math.nan
    return {"mean": mean, "std": std, "n": n, "ci95": ci}


def welch_difference(a: dict, b: dict, p: float = 0.975) -> tuple[float, float]:
    """Difference of means ``a - b`` of two summarize() results and the half-width of its Welch CI
    (unequal variances, Welch-Satterthwaite degrees of freedom): seeds of different routers need not
    share a spread. The half-width is NaN unless both sides have two or more values."""
    diff = a["mean"] - b["mean"]
    if min(a["n"], b["n"]) < 2:
        return diff, math.nan
    va, vb = a["std"] ** 2 / a["n"], b["std"] ** 2 / b["n"]
    if va + vb == 0:
        return diff, 0.0
    df = (va + vb) ** 2 / (va ** 2 / (a["n"] - 1) + vb ** 2 / (b["n"] - 1))
    return diff, t_quantile(p, max(df, 1.0)) * math.sqrt(va + vb)


RANKING_COLUMNS = ("better", "worse", "better_cf", "worse_cf", "better_mean", "better_ci95", "better_n",
                   "worse_mean", "worse_ci95", "worse_n", "difference", "difference_ci95", "verdict")


def ranking_check(runs: pd.DataFrame, order: Iterable[str] = PRIOR_CLAIM, metric: str = "best_val_ppl") -> pd.DataFrame:
    """Test a claimed router order (best first; ``metric`` lower is better) pair by pair.

    Each router stands at its best capacity factor among those every router of ``order`` ran, so no
    router gains from a setting the others lack (softk's dropless reference is left out). For each
    adjacent pair (better, worse) of the claim: both configs' seed statistics, the Welch 95% CI of
    ``worse - better``, and a verdict: ``holds`` (CI above 0), ``reversed`` (CI below 0) or
    ``unresolved``. Routers without ok runs are skipped; the result is empty below two routers."""
    ok = runs[runs["status"] == "ok"]
    present = [r for r in order if (ok["label"] == r).any()]
    shared = set.intersection(*(set(ok.loc[ok["label"] == r, "cf_label"]) for r in present)) if present else set()
    best = {}
    for router in present:
        cells = {cf: summarize(ok.loc[(ok["label"] == router) & (ok["cf_label"] == cf), metric])
                 for cf in sorted(shared, key=cf_order_value)}  # ties go to the lower capacity factor
        cells = {cf: s for cf, s in cells.items() if s["n"]}
        if cells:
            cf = min(cells, key=lambda c: cells[c]["mean"])
            best[router] = (cf, cells[cf])
    routers = [r for r in present if r in best]
    rows = []
    for better, worse in zip(routers, routers[1:]):
        (cf_b, b), (cf_w, w) = best[better], best[worse]
        diff, ci = welch_difference(w, b)
        verdict = "unresolved" if not math.isfinite(ci) or abs(diff) <= ci else ("holds" if diff > 0 else "reversed")
        rows.append({"better": better, "worse": worse, "better_cf": cf_b, "worse_cf": cf_w,
                     "better_mean": b["mean"], "better_ci95": b["ci95"], "better_n": b["n"],
                     "worse_mean": w["mean"], "worse_ci95": w["ci95"], "worse_n": w["n"],
                     "difference": diff, "difference_ci95": ci, "verdict": verdict})
    return pd.DataFrame(rows, columns=list(RANKING_COLUMNS))


def aggregate(frame: pd.DataFrame, metrics: Iterable[str], keys: Iterable[str] | None = None,
              extra_keys: Iterable[str] = (), run_col: str = "run") -> pd.DataFrame:
    """One row per config (``keys``, default load.config_keys(frame), plus ``extra_keys`` such as
    the eval step) over the ok rows: ``n_runs``, the ``runs`` aggregated, and for each metric
    ``<m>_mean``, ``_std``, ``_n``, ``_ci95`` (see summarize)."""
    ok = frame[frame["status"] == "ok"] if "status" in frame else frame
    keys = [*(config_keys(ok) if keys is None else keys), *extra_keys]
    keys += [d for d in DESCRIPTORS if d in ok and d not in keys]
    metrics = [m for m in metrics if m in ok]
    rows = []
    if not ok.empty:
        for key, group in ok.groupby(keys, dropna=False, sort=False):
            row = {**dict(zip(keys, key)), "n_runs": len(group), "runs": ", ".join(map(str, group[run_col]))}
            for m in metrics:
                row |= {f"{m}_{stat}": v for stat, v in summarize(group[m]).items()}
            rows.append(row)
    columns = None if rows else [*keys, "n_runs", "runs",
                                 *(f"{m}_{s}" for m in metrics for s in ("mean", "std", "n", "ci95"))]
    return sort_rows(pd.DataFrame(rows, columns=columns))


def pareto_front(frame: pd.DataFrame, x: str = FRONT[0], y: str = FRONT[1]) -> pd.DataFrame:
    """``frame`` with a boolean ``pareto``: no other row has x >= and y <= with one strict
    (maximise x, e.g. tokens/s; minimise y, e.g. perplexity). Rows missing x or y are never on it."""
    pts = frame[[x, y]].to_numpy(dtype=float)
    finite = np.isfinite(pts).all(axis=1)
    dominated = np.array([(finite & (pts[:, 0] >= px) & (pts[:, 1] <= py)
                           & ((pts[:, 0] > px) | (pts[:, 1] < py))).any() for px, py in pts], dtype=bool)
    return frame.assign(pareto=finite & ~dominated if len(frame) else pd.Series(dtype=bool))


def run_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Per-config aggregate of RUN_METRICS with the Pareto front marked: the results table's frame."""
    return pareto_front(aggregate(runs, RUN_METRICS))


def curves(evals: pd.DataFrame) -> pd.DataFrame:
    """Per config and evaluation step: EVAL_METRICS over seeds, with tokens and training FLOPs."""
    return aggregate(evals, EVAL_METRICS, extra_keys=CURVE_KEYS)


def loss_at_flops(curve: pd.DataFrame, budget: float | None = None,
                  metric: str = "val_loss_mean") -> tuple[float, pd.DataFrame]:
    """(budget, per-config ``metric`` at ``budget`` training FLOPs), interpolated linearly in
    log FLOPs between evaluations. Default budget: the largest every config reached (the smallest
    of their final FLOPs), so no value is extrapolated; a config that did not reach it gets NaN."""
    cols = ["name", "label", "cf_label", f"{metric}_at_budget"]
    curve = curve.dropna(subset=["train_flops", metric])
    if curve.empty:
        return math.nan, pd.DataFrame(columns=cols)
    by = curve.groupby("name", sort=False)
    budget = float(by["train_flops"].max().min()) if budget is None else budget
    rows = []
    for name, group in by:
        group = group.sort_values("train_flops")
        flops = group["train_flops"].to_numpy(float)
        inside = flops[0] <= budget <= flops[-1]
        value = float(np.interp(np.log(budget), np.log(flops), group[metric])) if inside else math.nan
        rows.append([name, group["label"].iloc[0], group["cf_label"].iloc[0], value])
    return budget, pd.DataFrame(rows, columns=cols)


def bench_table(bench: pd.DataFrame) -> pd.DataFrame:
    """Capacity bench rows averaged over repeated bench runs (run_id), per source, E, k and CF."""
    keys = [k for k in BENCH_KEYS if k in bench]
    frame = bench.assign(capacity_factor=bench["capacity_factor"].astype(float)) if "capacity_factor" in bench \
        else bench
    return aggregate(frame, BENCH_METRICS, keys=keys, run_col="run_id" if "run_id" in bench else keys[0])


def trained_drop_rates(runs: pd.DataFrame) -> pd.DataFrame:
    """Experiment A's drop rates (last eval interval, mean over seeds) per router, E, k and CF, shaped
    like bench_table rows with source TRAINED_SOURCE: what trained routers drop, next to the
    random and skewed logits of the bench. Routing groups differ: the training micro-batch there."""
    moe = runs[(runs["label"] != "dense") & runs["label"].notna()] if "label" in runs else runs.iloc[:0]
    keys = ["router", "num_experts", "top_k", "cf_label"]
    table = aggregate(moe.rename(columns={"final_drop_rate": "drop_rate", "final_token_drop_rate": "token_drop_rate"}),
                      ["drop_rate", "token_drop_rate"], keys=keys)
    return table.assign(source=table["router"].map(lambda r: f"{TRAINED_SOURCE}: {r}"))
