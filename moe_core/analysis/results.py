"""Run records -> pandas frames, seed aggregates, the Pareto front, iso-FLOP views, and the generated
LaTeX (booktabs tables, ``\\newcommand`` number macros) that the paper and slides quote.

Why one module: every number in a figure, a table cell and a sentence of the paper comes out of
these functions, computed from the records under runs/, so the three can never disagree and none
is typed by hand.

Conventions
- A *config* is a run's TrainConfig minus the replicate fields (``seed`` and the run-control
  fields), so the seeds of one config aggregate together. Its display ``name`` is the router (or
  ``dense``) and capacity factor, e.g. ``softk cf1.25``, widened with any other field that varies.
- Statistics use runs whose status is ``ok``; every other run (failed, diverged, stopped,
  incomplete, unreadable) stays listed in the run frame with its status and error.
- For expert_choice the headline validation metric is the causal eval (``val_loss``); the
  non-causal one is kept as ``*_noncausal``.
- Training FLOPs = tokens x moe_core.flops.train_flops_per_token(model config), the model config
  rebuilt from the stored TrainConfig with the vocabulary of the run's data, so k=1 and k=2 runs
  compare at equal compute.
"""
from __future__ import annotations

import math
import re
from functools import cache
from pathlib import Path
from typing import Iterable, NamedTuple

import numpy as np
import pandas as pd

from ..config import ROUTERS
from .. import records as rr
from ..config import cf_label
from ..flops import train_flops_per_token
from ..train import RUN_CONTROL_FIELDS, TrainConfig

REPLICATE_FIELDS = ("seed", *RUN_CONTROL_FIELDS)  # vary between replicates of one config
LABELS = (*ROUTERS, "dense")  # display order of routers in tables and legends
ROUTING_STATS = ("drop_rate", "token_drop_rate", "load_cv", "max_vio", "gate_entropy")
RUN_METRICS = ("best_val_ppl", "best_val_loss", "best_val_ppl_noncausal", "best_val_loss_noncausal",
               "final_val_loss", "median_tokens_per_s", "mfu", *(f"final_{s}" for s in ROUTING_STATS))
EVAL_METRICS = ("val_loss", "val_ppl", "val_loss_noncausal", "train_loss", "tokens_per_s", *ROUTING_STATS)
CURVE_KEYS = ("step", "tokens", "train_flops")  # per evaluation, equal across the seeds of a config
DESCRIPTORS = ("name", "label", "cf_label")  # functions of the config, carried through aggregation
FRONT = ("median_tokens_per_s_mean", "best_val_ppl_mean")  # Pareto axes: maximise x, minimise y
BENCH_KEYS = ("source", "num_experts", "top_k", "capacity_factor", "cf_label", "tokens", "dim", "hidden",
              "router", "backend", "device_name", "dtype")
BENCH_METRICS = ("drop_rate", "token_drop_rate", "load_cv", "max_vio", "dispatch_ms", "dispatch_bw_frac",
                 "dispatch_tokens_per_s", "layer_ms", "layer_tokens_per_s")
PRIOR_CLAIM = ("expert_choice", "softk", "hash", "topk_hard", "top1")  # issue 9's ranking to test, best first
TRAINED_SOURCE = "trained (Exp. A)"  # Experiment B rows taken from training runs' routing


# -- loading ----------------------------------------------------------------------------------------
class Records(NamedTuple):
    runs: pd.DataFrame  # one row per run directory
    evals: pd.DataFrame  # one row per evaluation (metrics.jsonl row + the run's config)


def has_runs(runs_dir: str | Path, experiment: str) -> bool:
    """Whether runs_dir/experiment holds at least one run directory with a record."""
    root = Path(runs_dir, experiment)
    return root.is_dir() and any(_is_run_dir(d) for d in root.iterdir())


def _is_run_dir(path: Path) -> bool:
    return path.is_dir() and any((path / f).exists() for f in (rr.CONFIG_FILE, rr.SUMMARY_FILE, rr.METRICS_FILE))


def load_experiment(runs_dir: str | Path, experiment: str) -> Records:
    """Every run of runs_dir/experiment (see the module docstring for the columns' conventions).

    runs: the stored TrainConfig fields flattened, ``status``, ``error``, ``name``/``label``/
    ``cf_label``, best and final eval metrics, ``median_tokens_per_s``, ``tokens`` trained,
    ``train_flops_per_token`` and ``train_flops``. evals: each metrics.jsonl row with the run's
    config, ``train_flops`` at that row, and the row's own learning rate as ``step_lr``.
    """
    root = Path(runs_dir, experiment)
    read = [_read_run(d) for d in sorted(root.iterdir()) if _is_run_dir(d)] if root.is_dir() else []
    if not read:
        empty = pd.DataFrame(columns=["run", "status", "error", *DESCRIPTORS])
        return Records(empty, empty.copy())
    runs = _name_configs(pd.DataFrame([run for run, _ in read]))
    names = dict(zip(runs["run"], runs["name"]))
    evals = pd.DataFrame([{**row, "name": names[row["run"]]} for _, rows in read for row in rows])
    return Records(_sorted(runs), _sorted(evals))


def _read_run(run_dir: Path) -> tuple[dict, list[dict]]:
    head = {"experiment": run_dir.parent.name, "run": run_dir.name}
    try:
        record = rr.read_json(run_dir / rr.CONFIG_FILE) or {}
        summary = rr.read_json(run_dir / rr.SUMMARY_FILE) or {}
        metrics = rr.read_metrics(run_dir / rr.METRICS_FILE)
    except (OSError, ValueError) as err:  # json.JSONDecodeError is a ValueError
        return {**head, "status": "unreadable", "error": f"{type(err).__name__}: {err}"}, []
    config = record.get("config", {})
    vocab = (record.get("data") or {}).get("vocab_size") or (record.get("model") or {}).get("vocab_size")
    flops = _flops_per_token(config, vocab)
    common = {**config, **head, "run": record.get("run", run_dir.name),
              "status": summary.get("status") or ("incomplete" if record else "missing"),
              **_describe(config), "vocab_size": vocab, "train_flops_per_token": flops}
    scored = [r for r in metrics if r.get("val_loss") is not None]
    best = min(scored, key=lambda r: r["val_loss"], default={})
    noncausal = min((r["val_loss_noncausal"] for r in metrics if r.get("val_loss_noncausal") is not None),
                    default=None)
    last = metrics[-1] if metrics else {}
    splits = (record.get("data") or {}).get("splits") or {}
    run = {**common, "error": summary.get("error"), "steps_done": summary.get("steps_done", last.get("step")),
           "tokens": last.get("tokens"), "train_flops": _times(last.get("tokens"), flops),
           "best_val_loss": best.get("val_loss"), "best_val_ppl": _exp(best.get("val_loss")),
           "best_val_step": best.get("step"), "best_val_loss_noncausal": noncausal,
           "best_val_ppl_noncausal": _exp(noncausal), "final_val_loss": last.get("val_loss"),
           **{f"final_{s}": last.get(s) for s in ROUTING_STATS},
           **{k: summary.get(k) for k in ("median_tokens_per_s", "mfu", "params", "peak_mem_bytes", "wall_time_s")},
           "device_name": summary.get("device"), "git_commit": (record.get("git") or {}).get("commit"),
           **{f"{split}_corpus_{k}": (splits.get(split) or {}).get(k)
              for split in ("train", "validation") for k in ("n_tokens", "n_stories")}}
    # a metric key named like a config field (lr: the step's scheduled rate) becomes step_<key>, not a shadow
    evals = [{**common, **{f"step_{k}" if k in config else k: v for k, v in row.items()},
              "train_flops": _times(row.get("tokens"), flops)} for row in metrics]
    return run, evals


def _flops_per_token(config: dict, vocab_size: int | None) -> float | None:
    """Train FLOPs per token of the stored config, rebuilt through TrainConfig (None if it cannot be)."""
    if not config or not vocab_size:
        return None
    known = set(TrainConfig.field_names())
    try:
        cfg = TrainConfig(**{k: v for k, v in config.items() if k in known})
        return train_flops_per_token(cfg.model_config(vocab_size))
    except (TypeError, ValueError):
        return None


def _describe(config: dict) -> dict:
    if not config:
        return {"label": None, "cf_label": None}
    dense = config.get("ffn") == "dense"
    return {"label": "dense" if dense else config.get("router"),
            "cf_label": None if dense else cf_label(config.get("capacity_factor"))}


def _times(a, b):
    return None if a is None or b is None else a * b


def _exp(loss):
    return None if loss is None else math.exp(min(loss, 700))


def config_keys(frame: pd.DataFrame) -> list[str]:
    """The TrainConfig columns of ``frame`` that identify a config (all but the replicate fields)."""
    return [c for c in TrainConfig.field_names() if c in frame and c not in REPLICATE_FIELDS]


def _name_configs(runs: pd.DataFrame) -> pd.DataFrame:
    """Add ``name``: router (or dense) and CF, ``softk cf1.25`` or ``softk dropless``; where two
    configs would share one, the other fields that tell them apart are appended (``softk cf1
    lr=0.001``). A run without a config keeps its directory name."""
    keys = config_keys(runs)
    identity = pd.Series([repr(row) for row in runs[keys].itertuples(index=False)], index=runs.index)
    base = [run if not isinstance(label, str) else label if label == "dense" else
            f"{label} dropless" if cf == "dropless" else f"{label} cf{cf}"
            for run, label, cf in zip(runs["run"], runs["label"], runs["cf_label"])]
    names = pd.Series(base, index=runs.index)
    for _, idx in names.groupby(names).groups.items():
        if identity[idx].nunique() > 1:
            group = runs.loc[idx]
            varying = [k for k in keys if k not in ("router", "ffn", "capacity_factor")
                       and group[k].nunique(dropna=False) > 1]
            names[idx] = [f"{names[i]} " + " ".join(f"{k}={group.at[i, k]}" for k in varying) for i in idx]
    return runs.assign(name=names)


def _sorted(frame: pd.DataFrame) -> pd.DataFrame:
    """Rows in display order: router order of LABELS, then k, CF (dropless last), name, seed, step."""
    if frame.empty:
        return frame
    key = {"label": lambda s: s.map({lab: i for i, lab in enumerate(LABELS)}).fillna(len(LABELS)),
           "cf_label": lambda s: s.map(cf_order_value)}
    cols = [c for c in ("label", "top_k", "cf_label", "name", "seed", "step") if c in frame]
    return frame.sort_values(cols, key=lambda s: key.get(s.name, lambda v: v)(s), na_position="last",
                             kind="stable").reset_index(drop=True)


def cf_order_value(label) -> float:
    """Sort value of a cf_label: the factor, dropless after every finite one, none (dense) last."""
    if not isinstance(label, str):
        return math.inf
    return 1e9 if label == "dropless" else float(label)


def failed_runs(runs: pd.DataFrame) -> pd.DataFrame:
    """The runs that are not ok, with why (listed in the notebooks, excluded from statistics)."""
    cols = [c for c in ("run", "name", "status", "steps_done", "error") if c in runs]
    return runs.loc[runs["status"] != "ok", cols].reset_index(drop=True)


# -- statistics -------------------------------------------------------------------------------------
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
    return pd.DataFrame(rows, columns=["better", "worse", "better_cf", "worse_cf", "better_mean", "better_ci95",
                                       "better_n", "worse_mean", "worse_ci95", "worse_n", "difference",
                                       "difference_ci95", "verdict"])


def aggregate(frame: pd.DataFrame, metrics: Iterable[str], keys: Iterable[str] | None = None,
              extra_keys: Iterable[str] = (), run_col: str = "run") -> pd.DataFrame:
    """One row per config (``keys``, default config_keys(frame), plus ``extra_keys`` such as the
    eval step) over the ok rows: ``n_runs``, the ``runs`` aggregated, and for each metric
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
    return _sorted(pd.DataFrame(rows, columns=columns))


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


# -- Experiment B -----------------------------------------------------------------------------------
def load_bench(bench_dir: str | Path, section: str = "capacity") -> pd.DataFrame:
    """The bench's tidy rows (``<section>.jsonl``, else ``<section>.csv``) of moe_core.bench, one
    row per measurement and bench run (``run_id``); an empty frame when there are none yet."""
    base = Path(bench_dir, section)
    jsonl, csv = base.with_suffix(".jsonl"), base.with_suffix(".csv")
    if jsonl.exists():
        frame = pd.DataFrame(rr.read_metrics(jsonl))
    elif csv.exists():
        frame = pd.read_csv(csv)
    else:
        return pd.DataFrame(columns=[*BENCH_KEYS, *BENCH_METRICS, "status", "run_id"])
    if "capacity_factor" in frame:  # the join key, spelled as training runs spell it (a CSV reads "1" as 1.0)
        frame["cf_label"] = frame["capacity_factor"].map(cf_label)
    return frame


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


# -- LaTeX ------------------------------------------------------------------------------------------
class TeX(str):
    """A string that is already LaTeX: written as is (plain str values are escaped)."""


_TEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}
_DIGIT_WORDS = ("Zero", "One", "Two", "Three", "Four", "Five", "Six", "Seven", "Eight", "Nine")


def tex_escape(text: str) -> str:
    return "".join(_TEX_SPECIAL.get(ch, ch) for ch in str(text))


def format_number(value, digits: int = 3) -> str:
    """``digits`` significant digits as LaTeX text: 3.21, 41.8, 12,300; 1.2e15 and 1e-5 in
    scientific notation ($1.2\\times10^{15}$); ints in full; None/NaN as n/a."""
    if value is None or isinstance(value, str):
        return "n/a" if value is None else tex_escape(value)
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return f"{value:,}"
    if not math.isfinite(value):
        return "n/a"
    if value == 0:
        return "0"
    rounded = float(f"{value:.{digits}g}")
    exponent = math.floor(math.log10(abs(rounded)))
    if exponent >= 6 or exponent < -3:
        mantissa = f"{rounded / 10 ** exponent:.{digits - 1}f}".rstrip("0").rstrip(".")
        return f"${mantissa}\\times10^{{{exponent}}}$"
    return f"{rounded:,.{max(0, digits - 1 - exponent)}f}"


def format_mean_ci(mean, ci) -> str:
    """``mean $\\pm$ ci``: mean to 3 significant digits, CI to 2 (just the mean if there is no CI)."""
    text = format_number(mean)
    return text if ci is None or not math.isfinite(ci) else f"{text} $\\pm$ {format_number(ci, 2)}"


def macro_name(key: str) -> str:
    """A LaTeX command name (letters only) for a number's key: words capitalised, digits spelled
    out, a decimal point as Pt: ``softk cf1.25 ppl`` -> ``SoftkCfOnePtTwoFivePpl``."""
    text = re.sub(r"(?<=\d)\.(?=\d)", " Pt ", str(key))
    text = re.sub(r"\d", lambda m: f" {_DIGIT_WORDS[int(m.group())]} ", text)
    name = "".join(w[0].upper() + w[1:] for w in re.split(r"[^A-Za-z]+", text) if w)
    if not name:
        raise ValueError(f"macro_name: {key!r} has no letters or digits")
    return name


def format_value(value) -> str:
    return value if isinstance(value, TeX) else format_number(value)


def latex_macros(numbers: dict) -> str:
    """One ``\\newcommand{\\Name}{value}`` per entry (names from macro_name; numbers with
    format_number; str escaped; TeX as is). Two keys that make one name are an error."""
    lines, seen = ["% Generated by moe_core.results from run records. Do not edit by hand."], {}
    for key, value in numbers.items():
        name = macro_name(key)
        if name in seen:
            raise ValueError(f"numbers {seen[name]!r} and {key!r} both make \\{name}")
        seen[name] = key
        lines.append(f"\\newcommand{{\\{name}}}{{{format_value(value)}}}")
    return "\n".join(lines) + "\n"


def write_numbers(numbers: dict, path: str | Path) -> Path:
    """Write ``path`` (e.g. paper/numbers_a.tex), then rewrite ``numbers.tex`` beside it so that it
    \\input's every numbers_*.tex there: the paper inputs numbers.tex alone."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(latex_macros(numbers))
    parts = sorted(p.name for p in path.parent.glob("numbers_*.tex"))
    index = ["% Generated by moe_core.results.write_numbers: the number macros of every analysis notebook.",
             *(f"\\InputIfFileExists{{{name}}}{{}}{{}}" for name in parts)]
    (path.parent / "numbers.tex").write_text("\n".join(index) + "\n")
    return path


def write_table(table: pd.DataFrame, path: str | Path, caption: str, label: str, wide: bool = True) -> Path:
    """A booktabs table (pandas Styler.to_latex) of a frame whose cells are already LaTeX text."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    align = "".join("l" if table[c].map(lambda v: not _numeric_text(v)).all() else "r" for c in table)
    tex = table.style.hide(axis="index").to_latex(
        hrules=True, column_format=align, caption=caption, label=label, position_float="centering",
        environment="table*" if wide else "table")
    path.write_text("% Generated by moe_core.results.write_table from run records. Do not edit by hand.\n" + tex)
    return path


def _numeric_text(value) -> bool:
    return bool(re.match(r"^\$?-?[\d,.]", str(value)))


def to_csv(frame: pd.DataFrame, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(path, index=False)
    return path


# -- Experiment A: table and numbers ----------------------------------------------------------------
def experiment_a_table(table: pd.DataFrame, iso: pd.DataFrame, budget: float) -> pd.DataFrame:
    """The paper's Experiment A table (LaTeX cells) from run_table and loss_at_flops."""
    iso_loss = dict(zip(iso["name"], iso["val_loss_mean_at_budget"]))
    return pd.DataFrame({
        "Router": [tex_escape(v) for v in table["label"]],
        "$k$": [format_number(int(k)) for k in table["top_k"]],
        "CF": [tex_escape(v) if isinstance(v, str) else "--" for v in table["cf_label"]],
        "Seeds": table["n_runs"].map(format_number),
        "Val.\\ PPL": [format_mean_ci(m, c) for m, c in zip(table["best_val_ppl_mean"], table["best_val_ppl_ci95"])],
        "PPL non-causal": [format_mean_ci(m, c) if math.isfinite(m) else "--" for m, c
                           in zip(table["best_val_ppl_noncausal_mean"], table["best_val_ppl_noncausal_ci95"])],
        f"Loss @ {format_number(budget, 2)} FLOPs": [format_number(iso_loss.get(n)) for n in table["name"]],
        "Tokens/s": [format_mean_ci(m, c) for m, c in zip(table["median_tokens_per_s_mean"],
                                                          table["median_tokens_per_s_ci95"])],
        "Drop (\\%)": [format_number(100 * v) if math.isfinite(v) else "--" for v in table["final_drop_rate_mean"]],
        "Pareto": table["pareto"].map(lambda p: "yes" if p else ""),
    })


def experiment_a_numbers(runs: pd.DataFrame, table: pd.DataFrame, iso: pd.DataFrame, budget: float) -> dict:
    """Every number the paper's text quotes about Experiment A (macro names: see macro_name)."""
    ok = runs[runs["status"] == "ok"]
    moe = table[table["label"] != "dense"]
    numbers = {"NumRuns": len(runs), "NumOkRuns": len(ok), "NumFailedRuns": int((runs["status"] == "failed").sum()),
               "NumDivergedRuns": int((runs["status"] == "diverged").sum()), "NumConfigs": len(table)}
    if not ok.empty:
        numbers |= {"MaxSeeds": int(table["n_runs"].max()), "TrainTokens": int(ok["tokens"].max()),
                    "TrainSteps": int(ok["steps_done"].max())}
        corpus = ok[["train_corpus_n_tokens", "train_corpus_n_stories", "validation_corpus_n_tokens",
                     "validation_corpus_n_stories"]].dropna().drop_duplicates()
        if len(corpus) == 1:  # one corpus for every run: its size, and the epochs each run's budget makes
            sizes = {k: int(v) for k, v in corpus.iloc[0].items()}
            numbers |= {"CorpusTrainTokens": sizes["train_corpus_n_tokens"],
                        "CorpusTrainStories": sizes["train_corpus_n_stories"],
                        "CorpusValTokens": sizes["validation_corpus_n_tokens"],
                        "CorpusValStories": sizes["validation_corpus_n_stories"],
                        "TrainEpochs": float(ok["tokens"].max() / sizes["train_corpus_n_tokens"])}
    if not moe.empty:
        best = moe.loc[moe["best_val_ppl_mean"].idxmin()]
        numbers |= {"BestRouter": best["label"], "BestRouterCf": best["cf_label"], "BestConfig": best["name"],
                    "BestRouterPpl": best["best_val_ppl_mean"]}
    numbers["ParetoConfigs"] = ", ".join(table.loc[table["pareto"], "name"])
    for row in table.itertuples():
        numbers |= {f"{row.name} ppl": row.best_val_ppl_mean, f"{row.name} ppl ci": row.best_val_ppl_ci95,
                    f"{row.name} seeds": row.n_runs, f"{row.name} tok s": row.median_tokens_per_s_mean}
        if math.isfinite(row.best_val_ppl_noncausal_mean):
            numbers[f"{row.name} ppl noncausal"] = row.best_val_ppl_noncausal_mean
        if math.isfinite(row.final_drop_rate_mean):
            numbers[f"{row.name} drop pct"] = 100 * row.final_drop_rate_mean
    valid = iso.dropna(subset=["val_loss_mean_at_budget"])
    if not valid.empty:
        iso_best = valid.loc[valid["val_loss_mean_at_budget"].idxmin()]
        numbers |= {"IsoFlopBudget": budget, "IsoFlopBestConfig": iso_best["name"],
                    "IsoFlopBestLoss": iso_best["val_loss_mean_at_budget"]}
    return numbers



def ranking_table(check: pd.DataFrame) -> pd.DataFrame:
    """The paper's table of ranking_check: one row per claimed adjacent pair (LaTeX cells)."""
    def side(router, cf, mean, ci):
        return f"{tex_escape(router)} cf{tex_escape(cf)}", format_mean_ci(mean, ci)
    better = [side(*v) for v in zip(check["better"], check["better_cf"], check["better_mean"], check["better_ci95"])]
    worse = [side(*v) for v in zip(check["worse"], check["worse_cf"], check["worse_mean"], check["worse_ci95"])]
    return pd.DataFrame({
        "Claimed better": [b[0] for b in better], "PPL better": [b[1] for b in better],
        "Claimed worse": [w[0] for w in worse], "PPL worse": [w[1] for w in worse],
        "Worse $-$ better": [format_mean_ci(d, c) for d, c in zip(check["difference"], check["difference_ci95"])],
        "Verdict": check["verdict"],
    })


def ranking_numbers(check: pd.DataFrame) -> dict:
    """The macros of the ranking check: pair counts by verdict, an overall verdict (``holds`` only if
    every pair holds; ``is contradicted`` if any pair is reversed; else ``is not resolved``), the
    claimed order and the measured one (mean at each router's chosen capacity factor)."""
    if check.empty:
        return {}
    counts = check["verdict"].value_counts()
    verdict = ("holds" if counts.get("holds", 0) == len(check)
               else "is contradicted" if counts.get("reversed", 0) else "is not resolved")
    best = dict(zip(check["better"], zip(check["better_cf"], check["better_mean"])))
    best |= dict(zip(check["worse"], zip(check["worse_cf"], check["worse_mean"])))
    claimed = [*check["better"], check["worse"].iloc[-1]]
    measured = sorted(claimed, key=lambda r: best[r][1])
    return {"PriorClaimOrder": " > ".join(claimed),
            "PriorClaimPairs": len(check), "PriorClaimHold": int(counts.get("holds", 0)),
            "PriorClaimReversed": int(counts.get("reversed", 0)),
            "PriorClaimUnresolved": int(counts.get("unresolved", 0)), "PriorClaimVerdict": verdict,
            "MeasuredOrder": ", ".join(f"{r} cf{best[r][0]} {format_number(best[r][1])}" for r in measured)}


# -- Experiment B: table and numbers ----------------------------------------------------------------
_BENCH_SETUP = {"tokens": "$T$", "dim": "$D$", "hidden": "$F$", "backend": "Backend", "device_name": "Device",
                "dtype": "dtype"}  # shown (and put in macro names) only where they vary


def _varying(frame: pd.DataFrame, cols: Iterable[str]) -> list[str]:
    return [c for c in cols if c in frame and frame[c].nunique(dropna=False) > 1]


def experiment_b_table(bench: pd.DataFrame) -> pd.DataFrame:
    """The paper's Experiment B table (LaTeX cells) from bench_table."""
    setup = {_BENCH_SETUP[c]: bench[c].map(format_value) for c in _varying(bench, _BENCH_SETUP)}
    return pd.DataFrame({
        "Source": bench["source"].map(tex_escape), **setup,
        "$E$": bench["num_experts"].map(lambda v: format_number(int(v))),
        "$k$": bench["top_k"].map(lambda v: format_number(int(v))), "CF": bench["cf_label"].map(tex_escape),
        "Drop (\\%)": [format_number(100 * v) for v in bench["drop_rate_mean"]],
        "Token drop (\\%)": [format_number(100 * v) for v in bench["token_drop_rate_mean"]],
        "Layer tokens/s": [format_mean_ci(m, c) for m, c in zip(bench["layer_tokens_per_s_mean"],
                                                                bench["layer_tokens_per_s_ci95"])],
        "Dispatch BW (\\%)": [format_number(100 * v) for v in bench["dispatch_bw_frac_mean"]],
        "Runs": bench["n_runs"].map(format_number),
    })


def experiment_b_numbers(bench: pd.DataFrame) -> dict:
    """Numbers for the paper's text, per bench cell (results.bench_table):
    ``Cap<source>[<setup>]E<E>K<k>Cf<cf>`` followed by ``DropPct``, ``TokenDropPct`` or
    ``LayerTokS``; setup fields such as T appear only where they vary. E.g. \\CapRandomEEightKTwoCfOneDropPct."""
    numbers = {}
    setup = _varying(bench, _BENCH_SETUP)
    for row in bench.to_dict("records"):
        extra = "".join(f" {c} {row[c]}" for c in setup)
        key = f"cap {row['source']}{extra} e{row['num_experts']} k{row['top_k']} cf {row['cf_label']}"
        numbers |= {f"{key} drop pct": 100 * row["drop_rate_mean"],
                    f"{key} token drop pct": 100 * row["token_drop_rate_mean"],
                    f"{key} layer tok s": row["layer_tokens_per_s_mean"]}
    return numbers


def best_cf_numbers(table: pd.DataFrame) -> dict:
    """Per router of Experiment A (results.run_table), the capacity factor with the lowest mean best
    perplexity: ``<Router>BestCf``, e.g. \\SoftkBestCf."""
    moe = table[(table["label"] != "dense") & table["best_val_ppl_mean"].notna()]
    return {f"{label} best cf": group.loc[group["best_val_ppl_mean"].idxmin(), "cf_label"]
            for label, group in moe.groupby("label", sort=False)}
