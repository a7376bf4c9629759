"""Statistics -> the paper's tables and number macros: Experiment A (routers x capacity factor per
token budget; the paired, Holm-corrected check of the prior ranking, the variants and the iso-FLOP
comparisons) and Experiment B (the capacity bench), each with its caption, and the writers the
analysis notebooks call, so the notebooks hold no LaTeX. write_experiment_a also writes the
README's results section (markdown.results_markdown).

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
from .frontier import Analysis, analyse
from .latex import format_mean_ci, format_number, format_p, format_value, tex_escape, to_csv, write_numbers, write_table
from .load import same_validation
from .markdown import results_markdown
from .stats import ALPHA, at_budget

ROOT = Path(__file__).resolve().parents[2]
PAPER_EXPERIMENT = "experiment_a_v2"  # the only experiment that writes the committed paper inputs
PAPER_INPUTS = (ROOT / "figures", ROOT / "paper" / "tables", ROOT / "paper")  # figure, table, numbers dirs

EXPERIMENT_A_CAPTION = (
    "Routers and capacity factors at each token budget, each its own complete schedule: best validation "
    "perplexity (the minimum over evaluations; mean $\\pm$ 95\\% Student-$t$ CI over seeds; expert choice "
    "evaluated causally, non-causal beside it) and the median step where it fell (in brackets: seeds whose best "
    "was their last evaluation, still improving); validation loss and training FLOPs at the end of the schedule "
    "(rows of equal FLOPs compare at equal compute); training tokens until the validation loss first reaches "
    "the target (interpolated between evaluations; k/n: only k of n seeds reached it); training throughput; "
    "dropped assignments in the last eval interval; and the share of bootstrap resamples of seeds in which the "
    "config is on its budget's throughput/perplexity Pareto front (yes: on it by the means).")
RANKING_CAPTION = (
    "The prior ranking, every pair of its routers at each capacity factor all of them ran (fixed per comparison, "
    "not chosen by the results), each router at its main configuration: best validation perplexity, claimed "
    "worse minus claimed better, paired over seeds (mean $\\pm$ 95\\% Student-$t$ CI), the two-sided paired "
    "$t$-test's $p$ and its Holm adjustment over all pairs and capacity factors of the budget. Verdict after the "
    "correction ($\\alpha$ = 0.05): holds, reversed or unresolved.")
VARIANTS_CAPTION = (
    "Each variant against the main configuration of its router and capacity factor at the same token budget: "
    "best validation perplexity, variant minus main, paired over seeds (mean $\\pm$ 95\\% CI), $p$ and its Holm "
    "adjustment over the variants of the budget; lower: the config found lower after the correction.")
ISO_FLOP_CAPTION = (
    "Compute-matched comparisons at the ends of schedules: configurations whose whole runs cost the same "
    "training FLOPs (within 5\\%) by different means (k, expert width, dense or MoE, token budget); final "
    "validation loss, second minus first, paired over seeds (mean $\\pm$ 95\\% CI), $p$ and its Holm adjustment "
    "over every pair; lower: the config found lower after the correction.")
EC_CAPTION = (
    "Expert choice's causal $-$ non-causal validation-loss gap in two parts, at each run's best causal evaluation "
    "(one set of weights evaluated three ways): reading future tokens (causal-prefix $-$ non-causal: the training "
    "rule, only the future hidden) and the change of routing rule (causal $-$ causal-prefix); nats, paired over "
    "seeds (mean $\\pm$ 95\\% CI), $p$ and its Holm adjustment over every row.")
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
def _several_budgets(frame: pd.DataFrame) -> bool:
    return "budget_tokens" in frame and frame["budget_tokens"].nunique() > 1


def _budget_cells(budgets) -> list[str]:
    return [format_number(float(b), 3) for b in budgets]


def _tokens_to_target(row) -> str:
    if not row.get("n_reached"):
        return "--"
    text = format_mean_ci(row["tokens_to_target_mean"], row["tokens_to_target_ci95"])
    return text if row["n_reached"] == row["n_runs"] else f"{format_number(row['tokens_to_target_mean'])} " \
        f"({row['n_reached']}/{row['n_runs']})"


def experiment_a_table(table: pd.DataFrame, target: float = math.nan) -> pd.DataFrame:
    """The paper's Experiment A table (LaTeX cells) from frontier.budget_table; a Budget column
    (planned tokens) at the end when there are several budgets."""
    rows = table.to_dict("records")
    cells = {
        "Router": [tex_escape(r["label"]) + (f" ({tex_escape(r['variant'])})" if r.get("variant") else "")
                   for r in rows],
        "$k$": [format_number(int(r["top_k"])) for r in rows],
        "CF": [tex_escape(r["cf_label"]) if isinstance(r["cf_label"], str) else "--" for r in rows],
        "Seeds": [format_number(int(r["n_runs"])) for r in rows],
        "Val.\\ PPL": [format_mean_ci(r["best_val_ppl_mean"], r["best_val_ppl_ci95"]) for r in rows],
        "Best @ step": [f"{format_number(int(r['best_val_step_median']))} ({int(r['n_best_at_end'])})"
                        if math.isfinite(r.get("best_val_step_median", math.nan)) else "--" for r in rows],
        "PPL non-causal": [format_mean_ci(r["best_val_ppl_noncausal_mean"], r["best_val_ppl_noncausal_ci95"])
                           if math.isfinite(r["best_val_ppl_noncausal_mean"]) else "--" for r in rows],
        "Final loss": [format_number(r["final_val_loss_mean"]) for r in rows],
        "Train FLOPs": [format_number(r["train_flops_mean"], 2) for r in rows],
        f"Tokens to {format_number(target)}": [_tokens_to_target(r) for r in rows] if math.isfinite(target) else None,
        "Tokens/s": [format_mean_ci(r["tokens_per_s"], r["tokens_per_s_ci95"])
                     + ("" if r["tokens_per_s_comparable"] else "$^\\ast$") for r in rows],
        "Drop (\\%)": [format_number(100 * r["final_drop_rate_mean"]) if math.isfinite(r["final_drop_rate_mean"])
                       else "--" for r in rows],
        "Pareto": [("yes, " if r["pareto"] else "") + format_number(r["pareto_prob"], 2) for r in rows],
        "Budget": _budget_cells(table["budget_tokens"]) if _several_budgets(table) else None,
    }
    return pd.DataFrame({k: v for k, v in cells.items() if v is not None})


def experiment_a_caption(table: pd.DataFrame) -> str:
    """EXPERIMENT_A_CAPTION and where the throughput column comes from."""
    sources = set(table["tokens_per_s_source"].dropna())
    speed = ("Tokens/s from a solo timing pass (one run on the GPU; CI over its repeats)" if "solo bench" in sources
             else "Tokens/s: mean over seeds of each run's median")
    shared = "" if table["tokens_per_s_comparable"].all() else \
        "; $^\\ast$: measured while runs shared the GPU, not comparable"
    budget = "; Budget: planned training tokens" if _several_budgets(table) else ""
    return f"{EXPERIMENT_A_CAPTION} {speed}{shared}{budget}."


def _budget_prefixes(table: pd.DataFrame) -> dict:
    """budget -> the prefix of its macro keys (``steps 800 ``); with one budget, just ''. The largest
    budget's numbers are also written without a prefix: the headline numbers."""
    if not _several_budgets(table):
        return dict.fromkeys(table["budget_tokens"].unique(), "") if "budget_tokens" in table else {}
    steps = table.groupby("budget_tokens")["steps"].first()
    return {budget: f"steps {int(s)} " for budget, s in steps.items()}


def _per_budget(frame: pd.DataFrame, prefixes: dict, numbers_of) -> dict:
    """numbers_of(rows of one budget) for every budget under its prefix, and for the largest unprefixed."""
    numbers = {}
    if frame.empty:
        return numbers
    for budget, prefix in prefixes.items():
        part = frame[frame["budget_tokens"] == budget]
        if not part.empty:
            numbers |= {f"{prefix}{k}": v for k, v in numbers_of(part).items()}
    largest = frame[frame["budget_tokens"] == frame["budget_tokens"].max()]
    return numbers | numbers_of(largest)


def _config_numbers(table: pd.DataFrame) -> dict:
    """The per-config numbers of one budget, and its best MoE config and Pareto set."""
    numbers = {"ParetoConfigs": ", ".join(table.loc[table["pareto"].fillna(False).astype(bool), "name"])}
    moe = table[(table["label"] != "dense") & table["best_val_ppl_mean"].notna()]
    if not moe.empty:
        best = moe.loc[moe["best_val_ppl_mean"].idxmin()]
        numbers |= {"BestRouter": best["label"], "BestRouterCf": best["cf_label"], "BestConfig": best["name"],
                    "BestRouterPpl": best["best_val_ppl_mean"]}
    for r in table.to_dict("records"):
        n = r["name"]
        numbers |= {f"{n} ppl": r["best_val_ppl_mean"], f"{n} ppl ci": r["best_val_ppl_ci95"],
                    f"{n} seeds": r["n_runs"], f"{n} tok s": r["tokens_per_s"],
                    f"{n} best step": r["best_val_step_median"], f"{n} final loss": r["final_val_loss_mean"],
                    f"{n} pareto prob": r["pareto_prob"]}
        if math.isfinite(r["best_val_ppl_noncausal_mean"]):
            numbers[f"{n} ppl noncausal"] = r["best_val_ppl_noncausal_mean"]
        if math.isfinite(r["final_drop_rate_mean"]):
            numbers[f"{n} drop pct"] = 100 * r["final_drop_rate_mean"]
        if math.isfinite(r.get("tokens_to_target_mean", math.nan)) and r["n_reached"] == r["n_runs"]:
            numbers[f"{n} tokens to target"] = r["tokens_to_target_mean"]
    return numbers


def experiment_a_numbers(runs: pd.DataFrame, analysis: Analysis) -> dict:
    """Every number the paper's text quotes about Experiment A (macro names: see latex.macro_name).
    Per-config, ranking and iso-FLOP numbers are the largest budget's; with several budgets each
    is also written per budget, prefixed ``Steps<N>`` (e.g. \\StepsEightZeroZeroSoftkCfOnePtTwoFivePpl)."""
    table = analysis.table
    ok = runs[runs["status"] == "ok"]
    numbers = {"NumRuns": len(runs), "NumOkRuns": len(ok), "NumFailedRuns": int((runs["status"] == "failed").sum()),
               "NumDivergedRuns": int((runs["status"] == "diverged").sum()),
               "NumConfigs": int(table["name"].nunique()), "NumBudgets": int(table["budget_tokens"].nunique()),
               "Alpha": f"{ALPHA:g}"}
    if not ok.empty:
        numbers |= {"MaxSeeds": int(table["n_runs"].max()), "TrainTokens": int(ok["tokens"].max()),
                    "TrainSteps": int(ok["steps_done"].max()),
                    "BudgetSteps": ", ".join(str(int(s)) for s in sorted(ok["steps"].unique()))}
        corpus = same_validation(ok)[["train_corpus_n_tokens", "train_corpus_n_stories", "validation_corpus_n_tokens",
                     "validation_corpus_n_stories"]].dropna().drop_duplicates()
        if len(corpus) == 1:  # one corpus for every compared run: its size, and the epochs each budget makes
            sizes = {k: int(v) for k, v in corpus.iloc[0].items()}
            numbers |= {"CorpusTrainTokens": sizes["train_corpus_n_tokens"],
                        "CorpusTrainStories": sizes["train_corpus_n_stories"],
                        "CorpusValTokens": sizes["validation_corpus_n_tokens"],
                        "CorpusValStories": sizes["validation_corpus_n_stories"],
                        "TrainEpochs": float(ok["tokens"].max() / sizes["train_corpus_n_tokens"])}
    if math.isfinite(analysis.target):
        numbers["TargetLoss"] = analysis.target
    prefixes = _budget_prefixes(table)
    return numbers | _per_budget(table, prefixes, _config_numbers) | ranking_numbers(analysis.ranking, prefixes) \
        | iso_flop_numbers(analysis.iso) | ec_numbers(analysis.ec)


def _comparison_cells(check: pd.DataFrame) -> dict:
    return {"Seeds": check["n"].map(lambda n: format_number(int(n))),
            "Difference": [format_mean_ci(d, c) for d, c in zip(check["difference"], check["difference_ci95"])],
            "$p$": check["p"].map(format_p), "$p$ Holm": check["p_holm"].map(format_p)}


def ranking_table(check: pd.DataFrame) -> pd.DataFrame:
    """The paper's table of stats.ranking_check: one row per budget, CF and claimed pair (LaTeX cells);
    the Budget column (planned tokens) leads when there are several budgets."""
    cells = {"Budget": _budget_cells(check["budget_tokens"]) if _several_budgets(check) else None,
             "CF": check["cf_label"].map(tex_escape), "Claimed better": check["better"].map(tex_escape),
             "Claimed worse": check["worse"].map(tex_escape), **_comparison_cells(check),
             "Verdict": check["verdict"]}
    return pd.DataFrame({k: v for k, v in cells.items() if v is not None}).rename(
        columns={"Difference": "Worse $-$ better"})


def comparison_table(check: pd.DataFrame) -> pd.DataFrame:
    """The LaTeX table of a stats.compare family (variants, iso-FLOP): first and second config with
    their budgets (planned tokens) where they differ, the paired difference second minus first."""
    budgets = pd.concat([check["a_budget_tokens"], check["b_budget_tokens"]]).nunique() > 1

    def side(names, budget_col):
        return [tex_escape(n) + (f" @ {c}" if budgets else "")
                for n, c in zip(names, _budget_cells(check[budget_col]))]
    cells = {"FLOPs": check["iso_flops"].map(lambda f: format_number(f, 2)) if "iso_flops" in check else None,
             "First": side(check["a"], "a_budget_tokens"), "Second": side(check["b"], "b_budget_tokens"),
             **_comparison_cells(check), "Lower": check["lower"].map(lambda n: tex_escape(n) if n else "unresolved")}
    return pd.DataFrame({k: v for k, v in cells.items() if v is not None}).rename(
        columns={"Difference": "Second $-$ first"})


def ec_table(ec: pd.DataFrame) -> pd.DataFrame:
    """The LaTeX table of stats.ec_decomposition: config, budget, part, the paired difference."""
    return pd.DataFrame({"Config": ec["name"].map(tex_escape), "Budget": _budget_cells(ec["budget_tokens"]),
                         "Part": ec["effect"], **_comparison_cells(ec)}).rename(columns={"Difference": "Nats"})


def ranking_numbers(check: pd.DataFrame, prefixes: dict | None = None) -> dict:
    """The macros of the ranking check, per budget (see experiment_a_numbers for the prefixes): pair
    counts by verdict after Holm's correction, an overall verdict (``holds`` only if every pair holds;
    ``is contradicted`` if any pair is reversed; else ``is not resolved``), the claimed order and the
    measured one per capacity factor (mean over seeds of each router's main config)."""
    if check.empty:
        return {}
    prefixes = prefixes if prefixes is not None else dict.fromkeys(check["budget_tokens"].unique(), "")

    def numbers_of(part: pd.DataFrame) -> dict:
        counts = part["verdict"].value_counts()
        verdict = ("holds" if counts.get("holds", 0) == len(part)
                   else "is contradicted" if counts.get("reversed", 0) else "is not resolved")
        claimed = list(dict.fromkeys([*part["better"], *part["worse"]]))
        orders = []
        for cf, rows in part.groupby("cf_label", sort=False):
            mean = dict(zip(rows["better"], rows["a_mean"])) | dict(zip(rows["worse"], rows["b_mean"]))
            orders.append(f"cf{cf}: " + ", ".join(f"{r} {format_number(mean[r])}" for r in sorted(mean, key=mean.get)))
        return {"PriorClaimOrder": " > ".join(claimed), "PriorClaimPairs": len(part),
                "PriorClaimHold": int(counts.get("holds", 0)), "PriorClaimReversed": int(counts.get("reversed", 0)),
                "PriorClaimUnresolved": int(counts.get("unresolved", 0)), "PriorClaimVerdict": verdict,
                "MeasuredOrder": "; ".join(orders)}
    return _per_budget(check, prefixes, numbers_of)


def iso_flop_numbers(iso: pd.DataFrame) -> dict:
    """The compute-matched macros: pair counts, in the largest-compute iso-FLOP group that has pairs
    its FLOPs and the config with the lowest mean final loss there, and in the smallest and the
    largest group the pairs with the dense baseline: how many, and in how many each side is lower."""
    if iso.empty:
        return {}
    group = iso[iso["iso_flops"] == iso["iso_flops"].max()]
    means = dict(zip(group["a"], group["a_mean"])) | dict(zip(group["b"], group["b_mean"]))
    best = min(means, key=means.get)
    numbers = {"IsoFlopPairs": len(iso), "IsoFlopResolved": int((iso["verdict"] != "unresolved").sum()),
               "IsoFlopBudget": float(group["iso_flops"].iloc[0]), "IsoFlopBestConfig": best,
               "IsoFlopBestLoss": means[best]}
    for name, flops in (("Smallest", iso["iso_flops"].min()), ("Largest", iso["iso_flops"].max())):
        dense = iso[(iso["iso_flops"] == flops) & ((iso["a"] == "dense") | (iso["b"] == "dense"))]
        lower = dense["lower"].dropna()
        lower = lower[lower != ""]  # resolved pairs only
        numbers |= {f"IsoFlop{name}DensePairs": len(dense), f"IsoFlop{name}DenseLower": int((lower == "dense").sum()),
                    f"IsoFlop{name}MoeLower": int((lower != "dense").sum())}
    return numbers


def ec_numbers(ec: pd.DataFrame | None) -> dict:
    """The expert-choice decomposition's macros: parts tested, parts resolved after Holm, and per
    part the largest mean difference over configs and budgets (nats)."""
    if ec is None or ec.empty:
        return {}
    largest = ec.assign(size=ec["difference"].abs()).groupby("effect")["size"].max()
    return {"EcParts": len(ec), "EcResolved": int(ec["significant"].sum()),
            "EcFutureMax": float(largest.get("reading future tokens", math.nan)),
            "EcRuleMax": float(largest.get("change of routing rule", math.nan))}


def write_experiment_a(runs: pd.DataFrame, evals: pd.DataFrame | None, experiment: str, tables_dir: str | Path,
                       numbers_path: str | Path, bench: pd.DataFrame | None = None) -> tuple[list[Path], dict]:
    """Experiment A's outputs from its run and eval frames (and an optional solo timing ``bench``, see
    frontier.throughput): ``<experiment>.tex`` (the results table), ``.csv`` (per config and budget),
    ``_runs.csv`` (per run, failed ones included), the ranking, variant and iso-FLOP tables and CSVs
    when they have pairs, ``_results.md`` (markdown.results_markdown, for the README) and the number
    macros at ``numbers_path``. Returns (paths written, numbers)."""
    tables_dir = Path(tables_dir)
    analysis = analyse(runs, evals, bench)
    paths = [write_table(experiment_a_table(analysis.table, analysis.target), tables_dir / f"{experiment}.tex",
                         caption=experiment_a_caption(analysis.table), label=f"tab:{experiment}"),
             to_csv(analysis.table, tables_dir / f"{experiment}.csv"),
             to_csv(runs, tables_dir / f"{experiment}_runs.csv")]
    for part, frame, make, caption in (("ranking", analysis.ranking, ranking_table, RANKING_CAPTION),
                                       ("variants", analysis.variants, comparison_table, VARIANTS_CAPTION),
                                       ("isoflop", analysis.iso, comparison_table, ISO_FLOP_CAPTION),
                                       ("ec", analysis.ec, ec_table, EC_CAPTION)):
        if frame is not None and not frame.empty:
            paths += [write_table(make(frame), tables_dir / f"{experiment}_{part}.tex", caption=caption,
                                  label=f"tab:{experiment}_{part}"),
                      to_csv(frame, tables_dir / f"{experiment}_{part}.csv")]
    markdown = tables_dir / f"{experiment}_results.md"
    markdown.write_text(results_markdown(runs, analysis=analysis))
    numbers = experiment_a_numbers(runs, analysis)
    return [*paths, markdown, write_numbers(numbers, numbers_path)], numbers


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
    perplexity at the largest budget: ``<Router>BestCf``, e.g. \\SoftkBestCf. Descriptive: the
    ranking's tests fix the CF per comparison instead."""
    table = at_budget(table)
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
