"""Statistics -> the paper's tables and number macros: Experiment A (routers x capacity factor, and
the check of the prior ranking) and Experiment B (the capacity bench), each with its caption, and
the writers the analysis notebooks call, so the notebooks hold no LaTeX.

The committed paper inputs (figures/, paper/tables/, paper/numbers_*.tex) come from Experiment A
alone: check_destinations refuses any other experiment (the smoke study) there, so a draft run
cannot overwrite them.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable

import pandas as pd

from ..config import require
from .latex import format_mean_ci, format_number, format_value, tex_escape, to_csv, write_numbers, write_table

ROOT = Path(__file__).resolve().parents[2]
PAPER_EXPERIMENT = "experiment_a"  # the only experiment that writes the committed paper inputs
PAPER_INPUTS = (ROOT / "figures", ROOT / "paper" / "tables", ROOT / "paper")  # figure, table, numbers dirs

EXPERIMENT_A_CAPTION = (
    "Routers and capacity factors at an equal token budget: best validation perplexity (mean $\\pm$ 95\\% "
    "Student-$t$ CI over seeds; expert choice evaluated causally, non-causal beside it), validation loss "
    "at the largest training compute every config reached, median training throughput, dropped "
    "assignments in the last eval interval, and the throughput/perplexity Pareto front.")
RANKING_CAPTION = (
    "The prior ranking, pair by pair: each router at its best capacity factor among those all "
    "routers ran; best validation perplexity (mean $\\pm$ 95\\% CI over seeds) and the Welch 95\\% CI "
    "of the difference. Verdict: holds (CI above 0), reversed (below 0) or unresolved.")
EXPERIMENT_B_CAPTION = (
    "Capacity factor vs.\\ dropped assignments, tokens left with no expert, MoE layer forward+backward "
    "throughput (mean $\\pm$ 95\\% Student-$t$ CI over bench runs) and the dispatch's fraction of the "
    "measured copy bandwidth, for random and Zipf-skewed router logits.")


def check_destinations(experiment: str, figures_dir: str | Path, tables_dir: str | Path,
                       numbers_path: str | Path) -> None:
    """Refuse, before any work, to write another experiment's outputs into the committed paper inputs."""
    dests = (Path(figures_dir), Path(tables_dir), Path(numbers_path).parent)
    for dest, committed in zip(dests, PAPER_INPUTS):
        require(experiment == PAPER_EXPERIMENT or dest.resolve() != committed, "experiment",
                f"only {PAPER_EXPERIMENT} writes the committed paper inputs in {dest}; "
                f"write {experiment} to figures/{experiment} and paper/tables/{experiment}")


# -- Experiment A -----------------------------------------------------------------------------------
def experiment_a_table(table: pd.DataFrame, iso: pd.DataFrame, budget: float) -> pd.DataFrame:
    """The paper's Experiment A table (LaTeX cells) from stats.run_table and stats.loss_at_flops."""
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
    """Every number the paper's text quotes about Experiment A (macro names: see latex.macro_name)."""
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
    """The paper's table of stats.ranking_check: one row per claimed adjacent pair (LaTeX cells)."""
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


def write_experiment_a(runs: pd.DataFrame, table: pd.DataFrame, iso: pd.DataFrame, budget: float,
                       check: pd.DataFrame, experiment: str, tables_dir: str | Path,
                       numbers_path: str | Path) -> tuple[list[Path], dict]:
    """Experiment A's outputs: ``<experiment>.tex`` (the results table), ``.csv`` (per config),
    ``_runs.csv`` (per run, failed ones included), the ranking table and CSV when the check has
    pairs, and the number macros at ``numbers_path``. Returns (paths written, numbers)."""
    tables_dir = Path(tables_dir)
    paths = [write_table(experiment_a_table(table, iso, budget), tables_dir / f"{experiment}.tex",
                         caption=EXPERIMENT_A_CAPTION, label=f"tab:{experiment}"),
             to_csv(table, tables_dir / f"{experiment}.csv"), to_csv(runs, tables_dir / f"{experiment}_runs.csv")]
    if not check.empty:
        paths += [write_table(ranking_table(check), tables_dir / f"{experiment}_ranking.tex",
                              caption=RANKING_CAPTION, label=f"tab:{experiment}_ranking"),
                  to_csv(check, tables_dir / f"{experiment}_ranking.csv")]
    numbers = experiment_a_numbers(runs, table, iso, budget) | ranking_numbers(check)
    return [*paths, write_numbers(numbers, numbers_path)], numbers


# -- Experiment B -----------------------------------------------------------------------------------
_BENCH_SETUP = {"tokens": "$T$", "dim": "$D$", "hidden": "$F$", "backend": "Backend", "device_name": "Device",
                "dtype": "dtype"}  # shown (and put in macro names) only where they vary


def _varying(frame: pd.DataFrame, cols: Iterable[str]) -> list[str]:
    return [c for c in cols if c in frame and frame[c].nunique(dropna=False) > 1]


def experiment_b_table(bench: pd.DataFrame) -> pd.DataFrame:
    """The paper's Experiment B table (LaTeX cells) from stats.bench_table."""
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
    """Numbers for the paper's text, per bench cell (stats.bench_table):
    ``Cap<source>[<setup>]E<E>K<k>Cf<cf>`` followed by ``DropPct``, ``TokenDropPct`` or
    ``LayerTokS``; setup fields such as T appear only where they vary. E.g.
    \\CapRandomEEightKTwoCfOnePtZeroDropPct (CF 1.0)."""
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
    """Per router of Experiment A (stats.run_table), the capacity factor with the lowest mean best
    perplexity: ``<Router>BestCf``, e.g. \\SoftkBestCf."""
    moe = table[(table["label"] != "dense") & table["best_val_ppl_mean"].notna()]
    return {f"{label} best cf": group.loc[group["best_val_ppl_mean"].idxmin(), "cf_label"]
            for label, group in moe.groupby("label", sort=False)}


def write_experiment_b(tables_dir: str | Path, numbers_path: str | Path, cells: pd.DataFrame | None = None,
                       table: pd.DataFrame | None = None, joined: pd.DataFrame | None = None) -> tuple[list[Path], dict]:
    """Experiment B's outputs from the parts whose records exist (None: skipped): from the bench
    ``cells`` (stats.bench_table) experiment_b.tex and .csv and their macros; from Experiment A's
    run ``table`` each router's best CF; ``joined`` (bench.join_with_training) as
    experiment_b_joined.csv. The number macros are written when there are any. Returns (paths, numbers)."""
    tables_dir, paths, numbers = Path(tables_dir), [], {}
    if cells is not None:
        paths += [write_table(experiment_b_table(cells), tables_dir / "experiment_b.tex",
                              caption=EXPERIMENT_B_CAPTION, label="tab:experiment_b"),
                  to_csv(cells, tables_dir / "experiment_b.csv")]
        numbers |= experiment_b_numbers(cells)
    if table is not None:
        numbers |= best_cf_numbers(table)
    if joined is not None:
        paths.append(to_csv(joined, tables_dir / "experiment_b_joined.csv"))
    if numbers:
        paths.append(write_numbers(numbers, numbers_path))
    return paths, numbers
