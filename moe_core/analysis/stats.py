"""Frames -> statistics: seed summaries (mean, s.d., Student-t CI), paired comparisons of configs
with Holm's correction (the router ranking per budget, each variant against its main config),
per-config aggregates, the Pareto front, curves and the capacity bench's aggregates.

Statistics use the rows whose status is ``ok``; every other run stays listed in the run frame with
its status and error (load.failed_runs).

Pairing: seed s starts from the same initialisation stream and draws the same batches in every
configuration, so two configs compare by the per-seed differences of a metric over the seeds both
have: the mean difference, its Student-t 95% CI, and the two-sided paired t-test's p-value. A
*family* of comparisons is corrected together by Holm's step-down method, and a verdict counts only
after the correction (adjusted p < ALPHA). The CI printed beside it is the marginal 95% interval.
"""
from __future__ import annotations

import math
from functools import cache
from itertools import combinations
from typing import Iterable

import numpy as np
import pandas as pd

from .load import BENCH_KEYS, BENCH_METRICS, DESCRIPTORS, ROUTING_STATS, cf_order_value, config_keys, sort_rows

RUN_METRICS = ("best_val_ppl", "best_val_loss", "best_val_ppl_noncausal", "best_val_loss_noncausal",
               "final_val_loss", "median_tokens_per_s", "mfu", "train_flops", *(f"final_{s}" for s in ROUTING_STATS))
EVAL_METRICS = ("val_loss", "val_ppl", "val_loss_noncausal", "train_loss", "tokens_per_s", *ROUTING_STATS)
CURVE_KEYS = ("step", "tokens", "train_flops")  # per evaluation, equal across the seeds of a config
CELL = ["name", "budget_tokens"]  # one configuration at one token budget
FRONT = ("median_tokens_per_s_mean", "best_val_ppl_mean")  # Pareto axes: maximise x, minimise y
PRIOR_CLAIM = ("expert_choice", "softk", "hash", "topk_hard", "top1")  # the prior ranking to test, best first
ALPHA = 0.05  # family-wise error rate of every Holm-corrected family
TRAINED_SOURCE = "trained (Exp. A)"  # Experiment B rows taken from training runs' routing
_SIMPSON_INTERVALS = 2000


@cache
def t_sf(x: float, df: float) -> float:
    """P(T > x) for Student's t with ``df`` degrees of freedom. scipy is not a dependency, so it is
    integrated here: with t = sqrt(df) tan(u) the density becomes c cos(u)^(df-1) on (-pi/2, pi/2),
    bounded and smooth, and Simpson's rule over (atan(x / sqrt(df)), pi/2) gives the tail to ~1e-10
    for integer df (far below what a CI or a p-value needs), without cancellation in the far tail."""
    if not (df >= 1 and math.isfinite(x)):
        raise ValueError(f"t_sf: need a finite x and df >= 1, got x={x}, df={df}")
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(math.pi)
    u = np.linspace(math.atan(abs(x) / math.sqrt(df)), math.pi / 2, _SIMPSON_INTERVALS + 1)
    weights = np.ones_like(u)
    weights[1:-1:2], weights[2:-1:2] = 4, 2
    tail = c * (u[1] - u[0]) / 3 * float(weights @ np.cos(u) ** (df - 1))
    return tail if x >= 0 else 1 - tail


@cache
def t_quantile(p: float, df: float) -> float:
    """Student-t quantile: bisection on t_sf."""
    if not (0.5 <= p < 1 and df >= 1):
        raise ValueError(f"t_quantile: need 0.5 <= p < 1 and df >= 1, got p={p}, df={df}")
    lo, hi = 0.0, 1.0
    while t_sf(hi, df) > 1 - p:
        lo, hi = hi, hi * 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_sf(mid, df) > 1 - p else (lo, mid)
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


def paired_difference(a: pd.Series, b: pd.Series) -> dict:
    """``b - a`` over the seeds (the index) both have a finite value for: ``n`` seeds, ``a_mean`` and
    ``b_mean`` over them, the mean difference, its s.d. and Student-t 95% CI half-width, the paired
    t statistic and its two-sided p-value (NaN below two seeds; 0 or 1 when every difference is equal)."""
    for side, values in (("a", a), ("b", b)):
        if not values.index.is_unique:
            raise ValueError(f"seed: two ok runs of one config share a seed in {side}: {sorted(values.index)}")
    both = pd.concat([a, b], axis=1, join="inner").astype(float).dropna()
    d = summarize(both.iloc[:, 1] - both.iloc[:, 0])
    n, mean, std = d["n"], d["mean"], d["std"]
    if n < 2:
        t = p = math.nan
    elif std == 0:
        t, p = (math.copysign(math.inf, mean), 0.0) if mean else (0.0, 1.0)
    else:
        t = mean / (std / math.sqrt(n))
        p = min(1.0, 2 * t_sf(abs(t), n - 1))
    return {"n": n, "a_mean": float(both.iloc[:, 0].mean()) if n else math.nan,
            "b_mean": float(both.iloc[:, 1].mean()) if n else math.nan,
            "difference": mean, "difference_std": std, "difference_ci95": d["ci95"], "t": t, "p": p}


def holm(p_values: Iterable[float]) -> np.ndarray:
    """Holm's step-down adjusted p-values: the i-th smallest of m times (m - i + 1), made monotone,
    capped at 1. NaN p-values (comparisons that could not be made) stay NaN and do not count in m."""
    p = np.asarray(list(p_values), dtype=float)
    adjusted = np.full_like(p, math.nan)
    finite = np.flatnonzero(np.isfinite(p))
    order = finite[np.argsort(p[finite], kind="stable")]
    m = len(order)
    adjusted[order] = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    return adjusted


COMPARISON_COLUMNS = ("a", "b", "a_budget_tokens", "b_budget_tokens", "n", "a_mean", "b_mean", "difference",
                      "difference_std", "difference_ci95", "t", "p", "p_holm", "verdict", "lower")


def compare(runs: pd.DataFrame, pairs: list[tuple[tuple, tuple]], metric: str, alpha: float = ALPHA) -> pd.DataFrame:
    """One family of paired comparisons: for each pair (a, b) of cells (name, budget_tokens), the
    per-seed ``b - a`` of ``metric`` over the ok runs (paired_difference), Holm-corrected over all
    ``pairs``. ``verdict``: ``holds`` (a lower than b after the correction), ``reversed`` (higher) or
    ``unresolved``; ``lower`` names the config found lower ('' when unresolved)."""
    ok = runs[runs["status"] == "ok"]
    cells = {cell: group.set_index("seed")[metric] for cell, group in ok.groupby(CELL, sort=False)}
    empty = pd.Series(dtype=float)
    rows = [{"a": a[0], "b": b[0], "a_budget_tokens": a[1], "b_budget_tokens": b[1],
             **paired_difference(cells.get(a, empty), cells.get(b, empty))} for a, b in pairs]
    frame = pd.DataFrame(rows, columns=[c for c in COMPARISON_COLUMNS if c not in ("p_holm", "verdict", "lower")])
    frame["p_holm"] = holm(frame["p"])
    significant = frame["p_holm"] < alpha
    frame["verdict"] = np.where(significant, np.where(frame["difference"] > 0, "holds", "reversed"), "unresolved")
    frame["lower"] = np.where(significant, np.where(frame["difference"] > 0, frame["a"], frame["b"]), "")
    return frame


RANKING_COLUMNS = ("budget_tokens", "cf_label", "better", "worse", *COMPARISON_COLUMNS)


def ranking_check(runs: pd.DataFrame, order: Iterable[str] = PRIOR_CLAIM, metric: str = "best_val_ppl",
                  cfs: Iterable[str] | None = None, alpha: float = ALPHA) -> pd.DataFrame:
    """Test a claimed router order (best first; ``metric`` lower is better) at each token budget.

    The family at a budget: every pair of the claimed routers (not only adjacent ones), at every
    capacity factor that all of them ran there (or the subset ``cfs``, fixed in advance), each
    router by its main config (no variant). The CF is thus fixed per comparison, never picked by the
    results, so there is no selection to correct for; the softk dropless reference is left out.
    Paired per seed (compare, with a = the claimed better, b = the claimed worse), Holm over the
    family. One row per budget, CF and pair; empty below two routers."""
    order = list(order)
    ok = runs[(runs["status"] == "ok") & (runs["variant"] == "")] if "variant" in runs else runs.iloc[:0]
    frames = []
    for budget, group in ok.groupby("budget_tokens", sort=True):
        present = [r for r in order if (group["label"] == r).any()]
        shared = set.intersection(*(set(group.loc[group["label"] == r, "cf_label"]) for r in present)) \
            if len(present) > 1 else set()
        info, pairs = [], []
        for cf in sorted(shared & set(cfs) if cfs is not None else shared, key=cf_order_value):
            names = {r: group.loc[(group["label"] == r) & (group["cf_label"] == cf), "name"].iloc[0] for r in present}
            for better, worse in combinations(present, 2):
                info.append({"budget_tokens": budget, "cf_label": cf, "better": better, "worse": worse})
                pairs.append(((names[better], budget), (names[worse], budget)))
        if pairs:
            frames.append(pd.concat([pd.DataFrame(info), compare(runs, pairs, metric, alpha)], axis=1))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=list(RANKING_COLUMNS))


def variant_check(runs: pd.DataFrame, metric: str = "best_val_ppl", alpha: float = ALPHA) -> pd.DataFrame:
    """Each variant (a config named with a suffix: wider top-1 experts, another hash table, ...)
    against the main config of its router and CF at the same budget (a = main, b = variant), paired
    per seed; one Holm family per budget. Variants without a main config are left out."""
    ok = runs[runs["status"] == "ok"] if "variant" in runs else runs.iloc[:0]
    frames = []
    for budget, group in ok.groupby("budget_tokens", sort=True):
        cells = group.drop_duplicates("name")
        mains = set(cells.loc[cells["variant"] == "", "name"])
        pairs = [((base, budget), (name, budget)) for name, variant in zip(cells["name"], cells["variant"])
                 if variant and (base := name.removesuffix(f" {variant}")) in mains]
        if pairs:
            frames.append(compare(runs, pairs, metric, alpha).assign(budget_tokens=budget))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=[*COMPARISON_COLUMNS,
                                                                                     "budget_tokens"])


# Expert choice's causal - non-causal gap in two parts, each (name, from, to): to - from in nats.
EC_EFFECTS = (("reading future tokens", "val_loss_noncausal_at_best", "val_loss_prefix_at_best"),
              ("change of routing rule", "val_loss_prefix_at_best", "val_loss_at_best"))
EC_COLUMNS = ("name", "budget_tokens", "effect", "n", "a_mean", "b_mean", "difference", "difference_ci95", "p",
              "p_holm", "significant")


def ec_decomposition(runs: pd.DataFrame, alpha: float = ALPHA) -> pd.DataFrame:
    """Expert choice's causal - non-causal validation loss gap split in two, at each run's best
    causal evaluation (one set of weights, three evaluations): reading future tokens (prefix -
    non-causal: the same rule over causal prefixes, only the future hidden) and the change of
    routing rule (causal - prefix: token-choice top-k instead of expert choice, both causal). Paired
    per seed; one Holm family over configs, budgets and both effects. Empty without such runs."""
    cols = {"val_loss_at_best", "val_loss_prefix_at_best", "val_loss_noncausal_at_best"}
    if not cols <= set(runs):
        return pd.DataFrame(columns=EC_COLUMNS)
    ok = runs[(runs["status"] == "ok") & (runs["label"] == "expert_choice")].dropna(subset=sorted(cols))
    rows = [{"name": name, "budget_tokens": budget, "effect": effect,
             **paired_difference(group.set_index("seed")[a], group.set_index("seed")[b])}
            for (name, budget), group in ok.groupby(CELL, sort=False) for effect, a, b in EC_EFFECTS]
    frame = pd.DataFrame(rows, columns=[c for c in EC_COLUMNS if c not in ("p_holm", "significant")])
    frame["p_holm"] = holm(frame["p"])
    frame["significant"] = frame["p_holm"] < alpha
    return frame


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


def pareto_front(frame: pd.DataFrame, x: str = FRONT[0], y: str = FRONT[1], by: str = "budget_tokens") -> pd.DataFrame:
    """``frame`` with a boolean ``pareto``: no other row of its ``by`` group (its budget; the whole
    frame without that column) has x >= and y <= with one strict (maximise x, e.g. tokens/s;
    minimise y, e.g. perplexity). Rows missing x or y are never on it."""
    groups = frame[by].to_numpy() if by in frame else np.zeros(len(frame))
    return frame.assign(pareto=front_mask(frame[[x, y]].to_numpy(dtype=float)[None], groups)[0]
                        if len(frame) else pd.Series(dtype=bool))


def front_mask(points: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """[R, C] Pareto membership of the points [R, C, 2] (R resamples of C configs; x maximised, y
    minimised), a config competing only with those of its group (``groups`` [C])."""
    x, y = points[..., 0], points[..., 1]
    finite = np.isfinite(points).all(axis=-1)
    rivals = (groups[:, None] == groups[None, :])[None] & finite[:, None, :]  # [R, C, C']: C' may dominate C
    x_ge, y_le = x[:, None, :] >= x[:, :, None], y[:, None, :] <= y[:, :, None]
    strict = (x[:, None, :] > x[:, :, None]) | (y[:, None, :] < y[:, :, None])
    return finite & ~(rivals & x_ge & y_le & strict).any(axis=-1)


def run_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Per config and budget: RUN_METRICS over seeds, where the best validation loss fell (median
    step ``best_val_step_median``, and ``n_best_at_end``: seeds whose best was their last
    evaluation, i.e. still improving), and the Pareto front of its budget: the results table's frame."""
    table = aggregate(runs, RUN_METRICS)
    ok = runs[runs["status"] == "ok"]
    if not table.empty and "best_val_step" in ok:
        steps = ok.assign(at_end=ok["best_val_step"] == ok["steps_done"]).groupby(CELL, sort=False).agg(
            best_val_step_median=("best_val_step", "median"), n_best_at_end=("at_end", "sum"))
        table = table.join(steps, on=CELL)
    return pareto_front(table)


def at_budget(frame: pd.DataFrame, budget: float | None = None) -> pd.DataFrame:
    """The rows of one token budget (default: the largest, the headline budget of the tables)."""
    if "budget_tokens" not in frame or frame.empty:
        return frame
    return frame[frame["budget_tokens"] == (frame["budget_tokens"].max() if budget is None else budget)]


def curves(evals: pd.DataFrame) -> pd.DataFrame:
    """Per config and evaluation step: EVAL_METRICS over seeds, with tokens and training FLOPs."""
    return aggregate(evals, EVAL_METRICS, extra_keys=CURVE_KEYS)


def loss_at_flops(curve: pd.DataFrame, budget: float | None = None,
                  metric: str = "val_loss_mean") -> tuple[float, pd.DataFrame]:
    """(budget, per config and token budget ``metric`` at ``budget`` training FLOPs), interpolated
    linearly in log FLOPs between evaluations. Default budget: the largest every curve reached (the
    smallest of their final FLOPs), so no value is extrapolated; a curve that did not reach it gets
    NaN. For figures only: a point inside a schedule is not a finished run (the learning rate is
    still high), so compute-matched claims compare ends of schedules (frontier.iso_flop_check)."""
    cols = ["name", "budget_tokens", "label", "cf_label", f"{metric}_at_budget"]
    curve = curve.dropna(subset=["train_flops", metric])
    if curve.empty:
        return math.nan, pd.DataFrame(columns=cols)
    by = curve.groupby([c for c in CELL if c in curve], sort=False, dropna=False)
    budget = float(by["train_flops"].max().min()) if budget is None else budget
    rows = []
    for _, group in by:
        group = group.sort_values("train_flops")
        flops = group["train_flops"].to_numpy(float)
        inside = flops[0] <= budget <= flops[-1]
        value = float(np.interp(np.log(budget), np.log(flops), group[metric])) if inside else math.nan
        rows.append([group[c].iloc[0] if c in group else None for c in cols[:-1]] + [value])
    return budget, pd.DataFrame(rows, columns=cols)


def bench_table(bench: pd.DataFrame) -> pd.DataFrame:
    """Capacity bench rows averaged over repeated bench runs (run_id), per source, E, k and CF."""
    keys = [k for k in BENCH_KEYS if k in bench]
    frame = bench.assign(capacity_factor=bench["capacity_factor"].astype(float)) if "capacity_factor" in bench \
        else bench
    return aggregate(frame, BENCH_METRICS, keys=keys, run_col="run_id" if "run_id" in bench else keys[0])


def trained_drop_rates(runs: pd.DataFrame) -> pd.DataFrame:
    """Experiment A's drop rates (last eval interval, mean over seeds, at the largest token budget)
    per router, E, k and CF, shaped like bench_table rows with source TRAINED_SOURCE: what trained
    routers drop, next to the random and skewed logits of the bench. Routing groups differ: the
    training micro-batch there."""
    runs = at_budget(runs)
    moe = runs[(runs["label"] != "dense") & runs["label"].notna()] if "label" in runs else runs.iloc[:0]
    keys = ["router", "num_experts", "top_k", "cf_label"]
    table = aggregate(moe.rename(columns={"final_drop_rate": "drop_rate", "final_token_drop_rate": "token_drop_rate"}),
                      ["drop_rate", "token_drop_rate"], keys=keys)
    return table.assign(source=table["router"].map(lambda r: f"{TRAINED_SOURCE}: {r}"))
