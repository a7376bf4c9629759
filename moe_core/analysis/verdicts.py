"""The rules that decide the paper's claims (moe_core.analysis.claims) from the records: each a
function of the ``Evidence`` (Experiment A's runs and their statistics, the capacity bench cells, the
H100 speed numbers, the kernel profile) returning a verdict, ``holds``, ``unresolved`` or
``reversed``, and the numbers that decide it.

Fixed before looking at any one result:
- Experiment A comparisons are the paired, Holm-corrected verdicts of ``stats.compare`` (the prior
  ranking's family, or a family of their own), per token budget. A claim holds (or is reversed) only
  when it does at every budget; otherwise it is unresolved and each budget's verdict is listed.
  Claims read from means say so in their numbers.
- Bench timings of one run have no interval: a ratio counts only beyond ``TIMING_MARGIN`` of its
  threshold. Capacity bench cells carry a 95% CI over bench runs; two speeds differ only when their
  intervals do not overlap. A drop rate below ``NEGLIGIBLE_DROP`` counts as no drops.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

import pandas as pd

from .frontier import Analysis
from .stats import ALPHA, compare, holm, paired_difference

VERDICTS = ("holds", "unresolved", "reversed")
FLIP = {"holds": "reversed", "reversed": "holds", "unresolved": "unresolved"}
LEARNED_TOKEN_CHOICE = ("top1", "topk_hard", "softk")  # routers with a trained gate and a capacity
TOKEN_CHOICE = (*LEARNED_TOKEN_CHOICE, "hash")
NEGLIGIBLE_DROP = 0.01  # fraction of assignments: below it, "no drops"
TIMING_MARGIN = 0.05  # relative: a single bench run's ratio counts only beyond this distance from its threshold
STUDY_K = 2  # Experiment A's top-k: the capacity bench cells the drop claims read


class Evidence(NamedTuple):
    """What the claims are decided on; a part is None when its records are absent."""
    runs: pd.DataFrame | None = None  # Experiment A's run frame (load.load_experiment)
    analysis: Analysis | None = None  # frontier.analyse of those runs
    capacity: pd.DataFrame | None = None  # capacity bench cells (stats.bench_table)
    speed: dict | None = None  # H100 speed numbers by key (paper.bench_numbers, compiled_layer_numbers)
    profile: dict | None = None  # kernel profile: {"E=8, k=2": {"moe"|"dense": {part: GPU ms}}} (paper.profile_parts)


# -- helpers ----------------------------------------------------------------------------------------
def _all(verdicts: list[str]) -> str:
    """One verdict for several parts: theirs when they agree, else unresolved."""
    return verdicts[0] if verdicts and len(set(verdicts)) == 1 else "unresolved"


def _tokens(budget) -> str:
    return f"{float(budget) / 1e6:.3g}M tok"


def _per_budget(frame: pd.DataFrame, decide: Callable[[pd.DataFrame], tuple[str, str]]) -> tuple[str, str]:
    """decide(rows of one budget) for each budget; the verdicts combined by _all."""
    parts = [(budget, *decide(group)) for budget, group in frame.groupby("budget_tokens", sort=True)]
    if not parts:
        return "unresolved", "no comparison in the records"
    if len(parts) == 1:
        return parts[0][1], parts[0][2]
    return _all([v for _, v, _ in parts]), "; ".join(f"{_tokens(b)}: {v} ({n})" for b, v, n in parts)


def _oriented(row, lower: str) -> str:
    """A ranking row's verdict for the claim "``lower`` is lower" (rows state "better is lower")."""
    return row["verdict"] if row["better"] == lower else FLIP[row["verdict"]]


def _pair_rows(ranking: pd.DataFrame, lower: str, higher: str) -> pd.DataFrame:
    return ranking[ranking["better"].isin([lower, higher]) & ranking["worse"].isin([lower, higher])]


def _main(table: pd.DataFrame) -> pd.DataFrame:
    """The main configuration of every MoE router (no variant, no dense)."""
    variant = table["variant"].fillna("") if "variant" in table else ""
    return table[(variant == "") & (table["label"] != "dense")]


# -- Experiment A -----------------------------------------------------------------------------------
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
            return _all(verdicts), ", ".join(
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
    main = _main(ev.analysis.table)
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
        return _all(list(part["verdict"])), "best PPL from CF 1.0 to 1.25: " + ", ".join(
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
    return _per_budget(_main(ev.analysis.table), decide)


def drops_do_not_order(ev: Evidence) -> tuple[str, str]:
    """At the lowest CF all token-choice routers ran: the router that drops the most is not the
    worst; holds when a router that drops less is found higher after the Holm correction."""
    ranking, main = ev.analysis.ranking, _main(ev.analysis.table)

    def decide(part):
        budget = part["budget_tokens"].iloc[0]
        cf = min(part["cf_label"], key=float)
        rows = main[(main["budget_tokens"] == budget) & (main["cf_label"] == cf) & main["label"].isin(TOKEN_CHOICE)]
        drops = dict(zip(rows["label"], rows["final_drop_rate_mean"]))
        most = max(drops, key=drops.get)
        verdicts = {r: _all([_oriented(row, most) for row in _pair_rows(part[part["cf_label"] == cf], most, r)
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
        return _all(list(part["verdict"])), ", ".join(
            f"{n}: causal - non-causal {_signed(d)} (p Holm {p:.2g})"
            for n, d, p in zip(part["name"], part["difference"], part["p_holm"]))
    return _per_budget(frame, decide)


# -- Experiment B: the capacity bench ---------------------------------------------------------------
def _cells(ev: Evidence, source: str) -> pd.DataFrame:
    cap = ev.capacity
    return cap[cap["source"].str.startswith(source) & (cap["top_k"] == STUDY_K)]


def _finite_cfs(cells: pd.DataFrame) -> list[str]:
    return sorted((cf for cf in cells["cf_label"].unique() if cf != "dropless"), key=float)


def skew_drops_persist(ev: Evidence) -> tuple[str, str]:
    """Zipf-skewed logits at k = STUDY_K: drops at the largest finite CF, per E."""
    cells = _cells(ev, "skewed")
    if cells.empty:
        return "unresolved", "no skewed cells"
    top = _finite_cfs(cells)[-1]
    at_top = cells[cells["cf_label"] == top].set_index("num_experts")["drop_rate_mean"].sort_index()
    persist = at_top >= NEGLIGIBLE_DROP
    verdict = "holds" if persist.all() else "reversed" if not persist.any() else "unresolved"
    return verdict, f"k={STUDY_K}, CF {top}: " + ", ".join(f"E={e} {100 * d:.3g}%" for e, d in at_top.items())


def trained_capacity_removes_drops(ev: Evidence) -> tuple[str, str]:
    """A trained router's logits in the bench, and Experiment A's learned token-choice routers in
    training: drops at CF 1.0, none (below NEGLIGIBLE_DROP) at 1.25."""
    drops = {}
    bench = _cells(ev, "checkpoint") if ev.capacity is not None else pd.DataFrame()
    for e, group in bench.groupby("num_experts"):
        drops[f"bench E={e}"] = dict(zip(group["cf_label"], group["drop_rate_mean"]))
    if ev.analysis is not None:
        main = _main(ev.analysis.table)
        main = main[main["budget_tokens"] == main["budget_tokens"].max()]
        for r in LEARNED_TOKEN_CHOICE:
            rows = main[main["label"] == r]
            drops[r] = dict(zip(rows["cf_label"], rows["final_drop_rate_mean"]))
    parts = {k: (d["1.0"], d["1.25"]) for k, d in drops.items() if "1.0" in d and "1.25" in d}
    if not parts:
        return "unresolved", "no trained routing at CF 1.0 and 1.25"
    removes = [lo < NEGLIGIBLE_DROP <= hi for hi, lo in parts.values()]
    verdict = "holds" if all(removes) else "reversed" if not any(removes) else "unresolved"
    return verdict, ", ".join(f"{k} {100 * hi:.3g}% -> {100 * lo:.3g}%" for k, (hi, lo) in parts.items())


def dropless_slower_under_skew(ev: Evidence) -> tuple[str, str]:
    """Skewed logits at k = STUDY_K, per E: dropless against CF 1.0 layer tokens/s, 95% CIs apart."""
    cells = _cells(ev, "skewed").set_index(["num_experts", "cf_label"])
    out = []
    for e in sorted(cells.index.get_level_values(0).unique()):
        if (e, "dropless") not in cells.index or (e, "1.0") not in cells.index:
            continue
        d, c = cells.loc[(e, "dropless")], cells.loc[(e, "1.0")]
        gap = c["layer_tokens_per_s_mean"] - d["layer_tokens_per_s_mean"]
        apart = abs(gap) > (c["layer_tokens_per_s_ci95"] + d["layer_tokens_per_s_ci95"])
        out.append((e, ("holds" if gap > 0 else "reversed") if apart else "unresolved",
                    d["layer_tokens_per_s_mean"] / c["layer_tokens_per_s_mean"]))
    if not out:
        return "unresolved", "no skewed dropless cells"
    return _all([v for _, v, _ in out]), f"k={STUDY_K}, dropless / CF 1.0 tokens/s: " + \
        ", ".join(f"E={e} {r:.2f}" for e, _, r in out)


# -- H100 speed: timed benches and the kernel profile -----------------------------------------------
def _beyond(value: float, threshold: float) -> str:
    """holds above threshold (by more than TIMING_MARGIN), reversed below, else unresolved."""
    if not math.isfinite(value):
        return "unresolved"
    return "holds" if value > threshold * (1 + TIMING_MARGIN) else \
        "reversed" if value < threshold * (1 - TIMING_MARGIN) else "unresolved"


def moe_slower_than_dense(ev: Evidence) -> tuple[str, str]:
    keys = [k for k in ev.speed if k.startswith("compiled layer") and k.endswith("grouped ratio")]
    ratios = {k.split()[2] + " " + k.split()[3]: ev.speed[k] for k in keys if isinstance(ev.speed[k], float)}
    if not ratios:
        return "unresolved", "no compiled layer bench"
    return _all([_beyond(r, 1.0) for r in ratios.values()]), "compiled grouped / dense time: " + \
        ", ".join(f"{s} {r:.2f}x" for s, r in ratios.items())


def launch_bound(ev: Evidence) -> tuple[str, str]:
    """CUDA graphs shorten the eager step more than twofold: launch overhead was most of it."""
    speedups = {k.split()[1]: v for k, v in ev.speed.items() if k.startswith("train b") and k.endswith("graph speedup")
                and k.split()[2] == "grouped"}
    if not speedups:
        return "unresolved", "no eager and CUDA-graph train bench"
    smallest = min(speedups, key=lambda b: int(b.removeprefix("b")))
    return _beyond(speedups[smallest], 2.0), f"grouped, batch {smallest.removeprefix('b')}: eager / graphs " \
                                             f"{speedups[smallest]:.2f}x (launch overhead > half the step if > 2)"


DISPATCH_PARTS = ("gather", "combine")  # the data movement of dispatch and combine (paper.PROFILE_PARTS)
COMPUTE_PARTS = ("gemm", "gelu")
ROUTER_PARTS = ("router", "other")  # the router's fp32 GEMMs, its top-k, sort, softmax and the other small kernels


def _sum(parts: dict, names) -> float:
    return sum(parts.get(n, 0.0) for n in names)


def _shape(ev: Evidence, largest: bool) -> tuple[str, dict, dict]:
    """(label, MoE parts, dense parts) of the profile's smallest or largest expert count."""
    label = sorted(ev.profile, key=lambda s: int(s.split("E=")[1].split(",")[0]))[-1 if largest else 0]
    return label, ev.profile[label]["moe"], ev.profile[label]["dense"]


def dispatch_minor(ev: Evidence) -> tuple[str, str]:
    """Smallest E profiled: GEMMs + GELU hold most of the layer; dispatch less than the router's kernels."""
    label, parts, _ = _shape(ev, largest=False)
    total = sum(parts.values())
    compute, dispatch, router = _sum(parts, COMPUTE_PARTS), _sum(parts, DISPATCH_PARTS), _sum(parts, ROUTER_PARTS)
    verdict = "holds" if compute > total / 2 and dispatch < router else \
        "reversed" if dispatch > compute else "unresolved"
    return verdict, f"{label}: GEMM+GELU {100 * compute / total:.0f}%, gather/scatter/combine " \
                    f"{100 * dispatch / total:.0f}%, router and small kernels {100 * router / total:.0f}%"


def dispatch_dominates(ev: Evidence) -> tuple[str, str]:
    """Dispatch is the largest part of the layer's GPU time, at every shape profiled (the hypothesis)."""
    out = []
    for label, shape in ev.profile.items():
        parts = shape["moe"]
        dispatch = _sum(parts, DISPATCH_PARTS)
        largest_other = max(_sum(parts, COMPUTE_PARTS), _sum(parts, ROUTER_PARTS))
        out.append((label, "holds" if dispatch > largest_other else "reversed", 100 * dispatch / sum(parts.values())))
    return _all([v for _, v, _ in out]), "dispatch share of the layer: " + \
        ", ".join(f"{label} {share:.0f}%" for label, _, share in out)


def data_movement_leads_gap(ev: Evidence) -> tuple[str, str]:
    """Largest E profiled: of the MoE layer's time above dense, dispatch is the largest part."""
    label, parts, dense = _shape(ev, largest=True)
    gap = {"gather/scatter/combine": _sum(parts, DISPATCH_PARTS),
           "GEMM+GELU excess": _sum(parts, COMPUTE_PARTS) - _sum(dense, COMPUTE_PARTS),
           "router and small kernels": _sum(parts, ROUTER_PARTS) - _sum(dense, ROUTER_PARTS)}
    largest = max(gap, key=gap.get)
    verdict = "holds" if largest == "gather/scatter/combine" else "reversed"
    return verdict, f"{label}, ms above dense: " + ", ".join(f"{k} {v:.2f}" for k, v in gap.items())
