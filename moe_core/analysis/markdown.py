"""Statistics -> the README's results section in markdown: per token budget, the configs' results
and which routers differ and by how much (paired, Holm-corrected), then the compute-matched
comparisons. Written by tables.write_experiment_a beside the LaTeX tables; nothing typed by hand.
"""
from __future__ import annotations

import math

import pandas as pd

from .frontier import Analysis, analyse
from .stats import ALPHA

SCALES = ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k"), (1.0, ""))


def number(value, digits: int = 3, scale: tuple[float, str] | None = None) -> str:
    """Plain-text number to ``digits`` significant digits, never in e-notation: in units of k, M, G
    or T from a thousand up (or of the given ``scale``), n/a when missing."""
    if value is None or not math.isfinite(value):
        return "n/a"
    unit, suffix = scale or next(((u, s) for u, s in SCALES if abs(value) >= u), SCALES[-1])
    rounded = float(f"{value / unit:.{digits}g}")
    decimals = max(0, digits - 1 - math.floor(math.log10(abs(rounded)))) if rounded else 0
    return f"{rounded:.{decimals}f}{suffix}"


def _mean_ci(mean, ci, signed: bool = False) -> str:
    """``mean ± ci``, the CI in the mean's unit (3 and 2 significant digits)."""
    if mean is None or not math.isfinite(mean):
        return "n/a"
    scale = next(((u, s) for u, s in SCALES if abs(mean) >= u), SCALES[-1])
    text = ("+" if signed and mean > 0 else "") + number(mean, scale=scale)
    return text if ci is None or not math.isfinite(ci) else f"{text} ± {number(ci, 2, scale)}"


def _p(p) -> str:
    return "n/a" if not math.isfinite(p) else "<0.001" if p < 1e-3 else number(p, 2)


def _markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return [f"| {' | '.join(header)} |", f"|{'---|' * len(header)}", *(f"| {' | '.join(r)} |" for r in rows), ""]


def _budget_title(table: pd.DataFrame, budget) -> str:
    steps = sorted(table.loc[table["budget_tokens"] == budget, "steps"].unique())
    return f"{number(budget)} tokens ({', '.join(str(int(s)) for s in steps)} steps)"


def _config_rows(table: pd.DataFrame, target: float) -> list[str]:
    header = ["config", "seeds", "best val. PPL", "best at step (seeds at last eval)", "final val. loss",
              f"tokens to loss {number(target)}", "tokens/s", "Pareto (P)"]
    rows = []
    for r in table.to_dict("records"):
        reach = "n/a" if not math.isfinite(target) else "not reached" if not r["n_reached"] else \
            _mean_ci(r["tokens_to_target_mean"], r["tokens_to_target_ci95"]) + \
            ("" if r["n_reached"] == r["n_runs"] else f" ({r['n_reached']}/{r['n_runs']} seeds)")
        step = r.get("best_val_step_median", math.nan)
        rows.append([r["name"], str(r["n_runs"]), _mean_ci(r["best_val_ppl_mean"], r["best_val_ppl_ci95"]),
                     "n/a" if not math.isfinite(step) else f"{int(step)} ({int(r['n_best_at_end'])}/{r['n_runs']})",
                     number(r["final_val_loss_mean"]), reach,
                     _mean_ci(r["tokens_per_s"], r["tokens_per_s_ci95"]) + f" ({r['tokens_per_s_source']})",
                     ("yes, " if r["pareto"] else "") + number(r["pareto_prob"], 2)])
    return _markdown_table(header, rows)


def _verdict(row) -> str:
    return row["verdict"] + (f" ({row['lower']} lower)" if row["lower"] else "")


def _ranking_rows(check: pd.DataFrame) -> list[str]:
    counts = check["verdict"].value_counts()
    claimed = " > ".join(dict.fromkeys([*check["better"], *check["worse"]]))
    cfs = ", ".join(dict.fromkeys(check["cf_label"]))
    lines = [f"Prior claim {claimed}: every pair of these routers at capacity factor {cfs} (fixed per comparison), "
             f"{len(check)} tests in one Holm family: {counts.get('holds', 0)} hold, {counts.get('reversed', 0)} "
             f"reversed, {counts.get('unresolved', 0)} unresolved. Difference: best val. PPL, claimed worse minus "
             "claimed better.", ""]
    rows = [[r["cf_label"], f"{r['better']} vs {r['worse']}", str(r["n"]),
             _mean_ci(r["difference"], r["difference_ci95"], signed=True), _p(r["p"]), _p(r["p_holm"]), _verdict(r)]
            for r in check.to_dict("records")]
    return lines + _markdown_table(["CF", "pair", "seeds", "difference", "p", "p Holm", "verdict"], rows)


def _comparison_rows(check: pd.DataFrame, metric: str, with_flops: bool = False) -> list[str]:
    rows = [([number(r["iso_flops"])] if with_flops else []) +
            [f"{r['a']} @ {number(r['a_budget_tokens'])}", f"{r['b']} @ {number(r['b_budget_tokens'])}", str(r["n"]),
             _mean_ci(r["difference"], r["difference_ci95"], signed=True), _p(r["p"]), _p(r["p_holm"]),
             r["lower"] or "unresolved"] for r in check.to_dict("records")]
    header = ["first (tokens)", "second (tokens)", "seeds", f"second − first ({metric})", "p", "p Holm", "lower"]
    return _markdown_table((["FLOPs"] if with_flops else []) + header, rows)


def _ec_rows(ec: pd.DataFrame, table: pd.DataFrame) -> list[str]:
    lines = ["### Expert choice: reading future tokens vs the change of routing rule", "",
             "The causal − non-causal gap of each expert-choice config (validation loss, nats, at each run's best "
             "causal evaluation: one set of weights evaluated three ways) in two parts: prefix − non-causal (the "
             "training rule over causal prefixes of each sequence: only the future is hidden) and causal − prefix "
             "(token-choice top-k instead of expert choice, both causal). Paired per seed; one Holm family.", ""]
    rows = [[r["name"], _budget_title(table, r["budget_tokens"]), r["effect"], str(r["n"]),
             _mean_ci(r["difference"], r["difference_ci95"], signed=True), _p(r["p"]), _p(r["p_holm"]),
             "yes" if r["significant"] else "no"] for r in ec.to_dict("records")]
    return lines + _markdown_table(["config", "budget", "part", "seeds", "nats", "p", "p Holm", "after Holm"],
                                   rows) + [""]


def _confidence_rows(table: pd.DataFrame) -> list[str]:
    routed = table[(table["variant"] == "") & (table["label"] != "dense")] if "variant" in table else table.iloc[:0]
    stats = ("final_p1_mean", "final_p1_over_half", "final_token_expert_mi", "final_gate_entropy")
    if routed.empty or f"{stats[0]}_mean" not in routed or routed[f"{stats[0]}_mean"].isna().all():
        return []
    lines = ["### Router confidence at the end of training", "",
             "Mean top-1 routing probability, share of tokens whose top-1 probability exceeds 0.5, the mutual "
             "information between token id and chosen expert (nats; ln E = 2.08 is the ceiling at E = 8) and the "
             "gate entropy, over the last evaluation interval (mean ± 95% CI over seeds; hash routes by table).", ""]
    rows = [[r["name"], _budget_title(table, r["budget_tokens"]),
             *(_mean_ci(r[f"{k}_mean"], r[f"{k}_ci95"]) for k in stats)] for r in routed.to_dict("records")]
    return lines + _markdown_table(["config", "budget", "mean p₁", "share p₁ > 0.5", "token–expert MI", "gate entropy"],
                                   rows) + [""]


def results_markdown(runs: pd.DataFrame, evals: pd.DataFrame | None = None, bench: pd.DataFrame | None = None,
                     analysis: Analysis | None = None) -> str:
    """The results section (markdown) from the run and eval frames of load.load_experiment and an
    optional solo timing pass (frontier.throughput), or from an ``analysis`` already made of them."""
    analysis = analysis or analyse(runs, evals, bench)
    table, target = analysis.table, analysis.target
    failed = runs[runs["status"] != "ok"]
    lines = ["Each token budget is its own complete schedule; best val. PPL is the minimum over evaluations "
             "(mean ± 95% Student-t CI over seeds). Comparisons are paired by seed (seed s starts from the same "
             "initialisation stream and draws the same batches in every config): mean difference ± its 95% CI, "
             f"two-sided paired t-test p, Holm-corrected within each family at α = {ALPHA}; a verdict counts only "
             "after the correction. Tokens to target: the first evaluation at or below the target validation loss, "
             "interpolated linearly in tokens from the evaluation before.", ""]
    if len(failed):
        lines += [f"{len(failed)} runs are not ok and are left out: "
                  + ", ".join(f"{r} ({s})" for r, s in zip(failed["run"], failed["status"])) + ".", ""]
    for budget in sorted(table["budget_tokens"].dropna().unique()):
        lines += [f"### {_budget_title(table, budget)}", ""]
        lines += _config_rows(table[table["budget_tokens"] == budget], target)
        ranking = analysis.ranking[analysis.ranking["budget_tokens"] == budget]
        if not ranking.empty:
            lines += _ranking_rows(ranking)
        variants = analysis.variants[analysis.variants["budget_tokens"] == budget]
        if not variants.empty:
            lines += ["Variants against the main config of their router and CF (one Holm family):", ""]
            lines += _comparison_rows(variants, "best val. PPL")
    if not analysis.iso.empty:
        lines += ["### Compute-matched (iso-FLOP) at the ends of schedules", "",
                  "Configs whose whole runs cost the same training FLOPs by different means (k, expert width, dense "
                  "or MoE, token budget); final validation loss; one Holm family.", ""]
        lines += _comparison_rows(analysis.iso, "final val. loss", with_flops=True) + [""]
    if analysis.ec is not None and not analysis.ec.empty:
        lines += _ec_rows(analysis.ec, table)
    lines += _confidence_rows(table)
    return "\n".join(lines)
