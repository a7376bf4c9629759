"""The rules that decide the paper's bench claims (moe_core.analysis.claims): the capacity bench
cells, the H100 speed numbers and the kernel profile, each a function of the ``Evidence`` returning
a verdict and its deciding numbers (see ``verdicts`` for the Experiment A rules and the conventions).

Bench timings of one run have no interval: a ratio counts only beyond ``TIMING_MARGIN`` of its
threshold. Capacity bench cells carry a 95% CI over bench runs; two speeds differ only when their
intervals do not overlap. A drop rate below ``NEGLIGIBLE_DROP`` counts as no drops.
"""
from __future__ import annotations

import math

import pandas as pd

from .verdicts import LEARNED_TOKEN_CHOICE, Evidence, agree, main_configs

STUDY_K = 2  # Experiment A's top-k: the capacity bench cells the drop claims read
TIMING_MARGIN = 0.05  # relative: a single bench run's ratio counts only beyond this distance from its threshold
NEGLIGIBLE_DROP = 0.01  # fraction of assignments: below it, "no drops"
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
        main = main_configs(ev.analysis.table)
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
    return agree([v for _, v, _ in out]), f"k={STUDY_K}, dropless / CF 1.0 tokens/s: " + \
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
    return agree([_beyond(r, 1.0) for r in ratios.values()]), "compiled grouped / dense time: " + \
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
    return agree([v for _, v, _ in out]), "dispatch share of the layer: " + \
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
