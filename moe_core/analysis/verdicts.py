"""The rules that decide the paper's claims (moe_core.analysis.claims) from the records: each a
function of the ``Evidence`` (Experiment A's runs and their statistics, the capacity bench cells, the
H100 speed numbers, the kernel profile) returning a verdict, ``holds``, ``unresolved`` or
``reversed``, and the numbers that decide it.

Fixed before looking at any one result:
- Experiment A comparisons are the paired, Holm-corrected verdicts of ``stats.compare`` (the prior
  ranking's family, or a family of their own), per token budget. A claim holds (or is reversed) only
  when it does at every budget; otherwise it is unresolved and each budget's verdict is listed.
  Claims read from means say so in their numbers.
- The bench rules (capacity bench, H100 speed, kernel profile) are in ``verdicts_bench``.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import pandas as pd

from .frontier import Analysis
from .load import same_validation
from .stats import ALPHA, compare, holm, paired_difference

VERDICTS = ("holds", "unresolved", "reversed")
FLIP = {"holds": "reversed", "reversed": "holds", "unresolved": "unresolved"}
LEARNED_TOKEN_CHOICE = ("top1", "topk_hard", "softk")  # routers with a trained gate and a capacity
TOKEN_CHOICE = (*LEARNED_TOKEN_CHOICE, "hash")


class Evidence(NamedTuple):
    """What the claims are decided on; a part is None when its records are absent."""
    runs: pd.DataFrame | None = None  # Experiment A's run frame (load.load_experiment)
    analysis: Analysis | None = None  # frontier.analyse of those runs
    capacity: pd.DataFrame | None = None  # capacity bench cells (stats.bench_table)
    speed: dict | None = None  # H100 speed numbers by key (paper.bench_numbers, compiled_layer_numbers)
    profile: dict | None = None  # kernel profile: {"E=8, k=2": {"moe"|"dense": {part: GPU ms}}} (paper.profile_parts)


LEARNED_ROUTERS = ("top1", "topk_hard", "softk", "expert_choice")  # routers with a learned gate (not hash)


# -- helpers ----------------------------------------------------------------------------------------
def agree(verdicts: list[str]) -> str:
    """One verdict for several parts: theirs when they agree, else unresolved."""
    return verdicts[0] if verdicts and len(set(verdicts)) == 1 else "unresolved"


def _tokens(budget) -> str:
    return f"{float(budget) / 1e6:.3g}M tok"


def _per_budget(frame: pd.DataFrame, decide: Callable[[pd.DataFrame], tuple[str, str]]) -> tuple[str, str]:
    """decide(rows of one budget) for each budget; the verdicts combined by agree."""
    parts = [(budget, *decide(group)) for budget, group in frame.groupby("budget_tokens", sort=True)]
    if not parts:
        return "unresolved", "no comparison in the records"
    if len(parts) == 1:
        return parts[0][1], parts[0][2]
    return agree([v for _, v, _ in parts]), "; ".join(f"{_tokens(b)}: {v} ({n})" for b, v, n in parts)


def _oriented(row, lower: str) -> str:
    """A ranking row's verdict for the claim "``lower`` is lower" (rows state "better is lower")."""
    return row["verdict"] if row["better"] == lower else FLIP[row["verdict"]]


def _pair_rows(ranking: pd.DataFrame, lower: str, higher: str) -> pd.DataFrame:
    return ranking[ranking["better"].isin([lower, higher]) & ranking["worse"].isin([lower, higher])]


def main_configs(table: pd.DataFrame) -> pd.DataFrame:
    """The main configuration of every MoE router (no variant, no dense)."""
    variant = table["variant"].fillna("") if "variant" in table else ""
    return table[(variant == "") & (table["label"] != "dense")]


def at_budgets(rule: Callable[[Evidence], tuple[str, str]], which: slice):
    """``rule`` decided on the token budgets at positions ``which`` of the sorted budgets of the
    records (``slice(0, 1)``: the shortest; ``slice(1, None)``: all but the shortest)."""
    def restricted(ev: Evidence) -> tuple[str, str]:
        budgets = sorted(ev.analysis.table["budget_tokens"].unique())[which]
        if not budgets:
            return "unresolved", "no such budget in the records"

        def keep(frame: pd.DataFrame) -> pd.DataFrame:
            cols = [c for c in ("budget_tokens", "a_budget_tokens", "b_budget_tokens") if c in frame]
            return frame[frame[cols].isin(budgets).all(axis=1)] if cols else frame
        a = ev.analysis
        return rule(ev._replace(runs=keep(ev.runs), analysis=a._replace(
            table=keep(a.table), ranking=keep(a.ranking), variants=keep(a.variants), iso=keep(a.iso))))
    return restricted


def _ok(ev: Evidence) -> pd.DataFrame:
    return ev.runs[ev.runs["status"] == "ok"]


def _share(n: int, of: int) -> str:
    """holds when all ``of`` do, reversed when none does, else unresolved."""
    return "holds" if n == of > 0 else "reversed" if n == 0 else "unresolved"


# -- Experiment A -----------------------------------------------------------------------------------
def still_improving(ev: Evidence) -> tuple[str, str]:
    """Every run's best validation loss fell at its last evaluation (the schedule ended too early)."""
    def decide(part):
        at_end = int((part["best_val_step"] >= part["steps_done"]).sum())
        return _share(at_end, len(part)), f"best at the last evaluation in {at_end} of {len(part)} runs"
    return _per_budget(_ok(ev), decide)


def minimum_reached(ev: Evidence) -> tuple[str, str]:
    """Every run's best validation loss fell before the end of its schedule, and its final one is
    higher: the validation minimum is inside the budget and the model then fits its training split."""
    def decide(part):
        inside = (part["best_val_step"] < part["steps_done"]) & (part["final_val_loss"] > part["best_val_loss"])
        train = part["train_corpus_n_tokens"].mode().iloc[0]
        return _share(int(inside.sum()), len(part)), (
            f"best at step {part['best_val_step'].min():.0f}-{part['best_val_step'].max():.0f} of "
            f"{part['steps_done'].max():.0f}, final above best, in {int(inside.sum())} of {len(part)} runs; "
            f"train split {train:,.0f} characters, {part['tokens'].max() / train:.0f} passes")
    return _per_budget(_ok(ev), decide)


def no_pair_differs(ev: Evidence) -> tuple[str, str]:
    """No pair of the prior ranking's family (five routers, each CF) differs after the Holm correction."""
    def decide(part):
        found = part[part["verdict"] != "unresolved"]
        listed = ", ".join(f"CF {r['cf_label']}: {lo} below {hi} by {abs(r['difference']):.3g}" for r in
                           found.to_dict("records") for lo, hi in [(r["better"], r["worse"]) if r["verdict"] == "holds"
                                                                   else (r["worse"], r["better"])])
        return ("holds" if found.empty else "reversed"), \
            f"{len(found)} of {len(part)} pairs differ" + (f": {listed}" if listed else "")
    return _per_budget(ev.analysis.ranking, decide)


def dense_not_beaten(ev: Evidence) -> tuple[str, str]:
    """No MoE config has a lower best perplexity than the dense baseline: each against dense, paired
    over seeds, one Holm family per budget."""
    def decide(part):
        budget = part["budget_tokens"].iloc[0]
        moe = [n for n in same_validation(part)["name"] if n != "dense"]
        if "dense" not in set(part["name"]) or not moe:
            return "unresolved", "no dense baseline and MoE configs"
        found = compare(ev.runs, [(("dense", budget), (n, budget)) for n in moe], "best_val_ppl")
        lower = found[found["verdict"] == "reversed"]
        closest = found.loc[found["difference"].idxmin()]
        return ("holds" if lower.empty else "reversed"), \
            f"{len(lower)} of {len(found)} MoE configs lower than dense" + \
            (f" ({', '.join(lower['b'])})" if len(lower) else "") + \
            f"; closest {closest['b']} - dense = {_signed(closest['difference'])} (p Holm {closest['p_holm']:.2g})"
    return _per_budget(ev.analysis.table, decide)


def dense_lowest_final(ev: Evidence) -> tuple[str, str]:
    """From the means: the dense baseline ends its schedule with the lowest validation loss of all configs."""
    def decide(part):
        part = same_validation(part).set_index("name")["final_val_loss_mean"]
        if "dense" not in part:
            return "unresolved", "no dense baseline"
        moe = part.drop("dense")
        return ("holds" if part["dense"] < moe.min() else "reversed"), \
            f"means: final val. loss dense {part['dense']:.3g}, lowest MoE {moe.idxmin()} {moe.min():.3g}, " \
            f"highest {moe.idxmax()} {moe.max():.3g}"
    return _per_budget(ev.analysis.table, decide)


def variant_lower(variant: str, lower: str = "variant"):
    """"The ``variant`` config is lower in best perplexity than its main config" (``lower="main"``:
    the main config is lower), at every CF and budget it ran: the variants family of stats.variant_check."""
    def claim(ev: Evidence) -> tuple[str, str]:
        rows = ev.analysis.variants
        rows = rows[rows["b"].str.endswith(f" {variant}")]

        def decide(part):
            verdicts = [r["verdict"] if lower == "main" else FLIP[r["verdict"]] for r in part.to_dict("records")]
            return agree(verdicts), ", ".join(f"{r['a']}: variant - main = {_signed(r['difference'])} "
                                             f"(p Holm {r['p_holm']:.2g})" for r in part.to_dict("records"))
        return _per_budget(rows, decide)
    return claim


def prior_ranking(ev: Evidence) -> tuple[str, str]:
    def decide(part):
        counts = part["verdict"].value_counts()
        verdict = "holds" if counts.get("holds", 0) == len(part) else \
            "reversed" if counts.get("reversed", 0) else "unresolved"
        return verdict, f"{len(part)} pairs: {counts.get('holds', 0)} hold, {counts.get('reversed', 0)} reversed, " \
                        f"{counts.get('unresolved', 0)} unresolved"
    return _per_budget(ev.analysis.ranking, decide)


def pair_claim(lower: str, higher: str, cfs: tuple[str, ...] | None = None):
    """"``lower`` has a lower best perplexity than ``higher``" at the CFs (default: every CF tested)."""
    def claim(ev: Evidence) -> tuple[str, str]:
        rows = _pair_rows(ev.analysis.ranking, lower, higher)
        rows = rows[rows["cf_label"].isin(cfs)] if cfs else rows

        def decide(part):
            verdicts = [_oriented(r, lower) for r in part.to_dict("records")]
            return agree(verdicts), ", ".join(
                f"CF {r['cf_label']}: {higher} - {lower} = {_signed(_higher_minus_lower(r, lower))} (p Holm "
                f"{r['p_holm']:.2g})" for r in part.to_dict("records"))
        return _per_budget(rows, decide)
    return claim


def _higher_minus_lower(row, lower: str) -> float:
    return row["difference"] if row["better"] == lower else -row["difference"]


def _signed(value: float) -> str:
    return f"{value:+.3g}"


def capacity_lowers_ppl(ev: Evidence) -> tuple[str, str]:
    """CF 1.25 against CF 1.0 for every learned token-choice router, paired, one Holm family per budget."""
    main = main_configs(ev.analysis.table)
    frames = []
    for budget, group in main.groupby("budget_tokens", sort=True):
        names = {(r, cf): n for r, cf, n in zip(group["label"], group["cf_label"], group["name"])}
        pairs = [((names[r, "1.25"], budget), (names[r, "1.0"], budget)) for r in LEARNED_TOKEN_CHOICE
                 if (r, "1.25") in names and (r, "1.0") in names]
        if pairs:
            frames.append(compare(ev.runs, pairs, "best_val_ppl").assign(budget_tokens=budget))
    if not frames:
        return "unresolved", "no router ran both CF 1.0 and 1.25"

    def decide(part):
        return agree(list(part["verdict"])), "best PPL from CF 1.0 to 1.25: " + ", ".join(
            f"{a.split()[0]} {_signed(-d)} (p Holm {p:.2g})" for a, d, p in zip(part["a"], part["difference"],
                                                                                  part["p_holm"]))
    return _per_budget(pd.concat(frames, ignore_index=True), decide)


def router_spread_beats_capacity(ev: Evidence) -> tuple[str, str]:
    """From the means: at each CF all routers ran, the spread of the routers' mean best perplexity,
    against the largest change of one router's mean between those CFs."""
    def decide(part):
        cfs = set.intersection(*(set(g["cf_label"]) for _, g in part.groupby("label")))
        cfs = sorted(cf for cf in cfs if cf != "dropless")
        if len(cfs) < 2:
            return "unresolved", "fewer than two capacity factors shared by all routers"
        ppl = part.set_index(["label", "cf_label"])["best_val_ppl_mean"]
        spread = {cf: ppl.xs(cf, level="cf_label").max() - ppl.xs(cf, level="cf_label").min() for cf in cfs}
        moved = {r: ppl[r].loc[cfs].max() - ppl[r].loc[cfs].min() for r in part["label"].unique()}
        most = max(moved, key=moved.get)
        verdict = "holds" if min(spread.values()) > moved[most] else \
            "reversed" if max(spread.values()) < moved[most] else "unresolved"
        return verdict, "means: spread over routers " + ", ".join(f"CF {cf} {s:.2f}" for cf, s in spread.items()) \
            + f"; largest CF effect {moved[most]:.2f} ({most})"
    return _per_budget(main_configs(ev.analysis.table), decide)


def drops_do_not_order(ev: Evidence) -> tuple[str, str]:
    """At the lowest CF all token-choice routers ran: the router that drops the most is not the
    worst; holds when a router that drops less is found higher after the Holm correction."""
    ranking, main = ev.analysis.ranking, main_configs(ev.analysis.table)

    def decide(part):
        budget = part["budget_tokens"].iloc[0]
        cf = min(part["cf_label"], key=float)
        rows = main[(main["budget_tokens"] == budget) & (main["cf_label"] == cf) & main["label"].isin(TOKEN_CHOICE)]
        drops = dict(zip(rows["label"], rows["final_drop_rate_mean"]))
        most = max(drops, key=drops.get)
        verdicts = {r: agree([_oriented(row, most) for row in _pair_rows(part[part["cf_label"] == cf], most, r)
                             .to_dict("records")]) for r in drops if r != most}
        verdict = "holds" if "holds" in verdicts.values() else \
            "reversed" if set(verdicts.values()) == {"reversed"} else "unresolved"
        lower = [r for r, v in verdicts.items() if v == "holds"]
        return verdict, f"CF {cf}: {most} drops most ({100 * drops[most]:.3g}%), yet is lower than " \
                        f"{', '.join(lower) or 'none'} (paired, Holm)"
    return _per_budget(ranking, decide)


def moe_below_dense_at_equal_compute(ev: Evidence) -> tuple[str, str]:
    iso = ev.analysis.iso
    dense = iso[(iso["a"] == "dense") | (iso["b"] == "dense")]
    if dense.empty:
        return "unresolved", "no compute-matched pair with the dense baseline"
    moe_lower = [n for n in dense["lower"] if n and n != "dense"]
    verdict = "holds" if moe_lower else "reversed" if (dense["lower"] == "dense").all() else "unresolved"
    return verdict, f"{len(dense)} pairs with dense: MoE lower in {len(moe_lower)} ({', '.join(moe_lower) or '-'}), " \
                    f"dense lower in {int((dense['lower'] == 'dense').sum())}"


def expert_choice_noncausal_lower(ev: Evidence) -> tuple[str, str]:
    """Per expert-choice config and budget, best PPL causal minus non-causal over the same runs."""
    ok = ev.runs[(ev.runs["status"] == "ok") & (ev.runs["label"] == "expert_choice")]
    rows = []
    for (name, budget), group in ok.groupby(["name", "budget_tokens"], sort=True):
        diff = paired_difference(group.set_index("seed")["best_val_ppl_noncausal"], group.set_index("seed")["best_val_ppl"])
        rows.append({"name": name, "budget_tokens": budget, **diff})
    if not rows:
        return "unresolved", "no expert-choice runs"
    frame = pd.DataFrame(rows)
    frame["p_holm"] = holm(frame["p"])
    frame["verdict"] = [("holds" if d > 0 else "reversed") if p < ALPHA else "unresolved"
                        for d, p in zip(frame["difference"], frame["p_holm"])]

    def decide(part):
        return agree(list(part["verdict"])), ", ".join(
            f"{n}: causal - non-causal {_signed(d)} (p Holm {p:.2g})"
            for n, d, p in zip(part["name"], part["difference"], part["p_holm"]))
    return _per_budget(frame, decide)


def routers_confident(ev: Evidence) -> tuple[str, str]:
    """Every learned router's main configs end their schedules with a mean top-1 routing probability
    whose 95% CI over seeds lies above twice the uniform 1/E (holds), or every one below (reversed)."""
    def decide(part):
        part = main_configs(part)
        part = part[part["label"].isin(LEARNED_ROUTERS)].dropna(subset=["final_p1_mean_mean"])
        if part.empty:
            return "unresolved", "no router confidence in the records"
        bar = 2.0 / part["num_experts"]
        lo = part["final_p1_mean_mean"] - part["final_p1_mean_ci95"].fillna(0.0)
        hi = part["final_p1_mean_mean"] + part["final_p1_mean_ci95"].fillna(0.0)
        verdict = "holds" if (lo > bar).all() else "reversed" if (hi < bar).all() else "unresolved"
        return verdict, f"mean top-1 probability (bar 2/E = {bar.iloc[0]:.3g}): " + ", ".join(
            f"{n} {m:.3g} ± {c:.2g}" for n, m, c in zip(part["name"], part["final_p1_mean_mean"],
                                                       part["final_p1_mean_ci95"]))
    return _per_budget(ev.analysis.table, decide)

