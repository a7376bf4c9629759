"""The paper's claims with their verdicts computed from the records, so that no claim outlives its
evidence: the claims table (appendix of main.tex, ``claims.md`` for readers of the repository) and
the check that what the text states agrees with it.

Each ``Claim`` is a sentence of the abstract, introduction, takeaways, discussion or conclusion, where
it is stated, the figure or table that backs it, and a rule of ``verdicts`` that decides it from the
``Evidence``. main.tex states a claim as ``\\claim{id}{verdict}`` (macros.tex prints its number, and a
red mismatch where the generated verdict differs); README as "(claim `id`: verdict)".
``mismatches`` lists every stated verdict the records do not give: tests/test_claims.py fails on any.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import NamedTuple

import pandas as pd

from . import verdicts as v
from . import verdicts_bench as vb
from .latex import index_numbers, tex_escape
from .verdicts import VERDICTS, Evidence

CLAIM_ID = r"[a-z0-9]+(?:-[a-z0-9]+)+"  # hyphenated words: \\claim{id}{verdict} in prose is not a claim
STATED = re.compile(rf"\\claim\{{({CLAIM_ID})\}}\{{(\w+)\}}|\(claim `({CLAIM_ID})`: (\w+)\)")
# Evidence keys -> (LaTeX reference, where a reader of the repository finds it); {exp}: the experiment.
EVIDENCE = {
    "results": ("Table~\\TabExpA", "results table (`paper/tables/{exp}.csv`)"),
    "ranking": ("Table~\\TabRank", "ranking table (`paper/tables/{exp}_ranking.csv`)"),
    "isoflop": ("Table~\\TabIso", "iso-FLOP table (`paper/tables/{exp}_isoflop.csv`)"),
    "variants": ("Table~\\TabVar", "variants table (`paper/tables/{exp}_variants.csv`)"),
    "curve": ("Fig.~\\ref{fig:curve}", "`figures/training_curve`"),
    "cfppl": ("Fig.~\\ref{fig:cfppl}", "`figures/cf_vs_ppl`"),
    "routing": ("Fig.~\\ref{fig:stats}", "`figures/routing_stats`"),
    "capdrop": ("Table~\\ref{tab:capdrop}", "`figures/capacity_drop`, `paper/tables/experiment_b.csv`"),
    "capthr": ("Fig.~\\ref{fig:capthr}", "`figures/capacity_throughput`"),
    "layer": ("Table~\\ref{tab:layer}", "layer bench (`paper/numbers_bench.tex`, `Compiled*Ratio`)"),
    "train": ("Table~\\ref{tab:train}", "train bench (`paper/numbers_bench.tex`, `TrainB*GraphSpeedup`)"),
    "profile": ("Table~\\ref{tab:profile}", "kernel profile (`paper/numbers_bench.tex`, `Profile*`)"),
}


class Claim(NamedTuple):
    id: str
    text: str  # the claim as the paper makes it, in plain words
    where: str  # where it is stated
    evidence: tuple[str, ...]  # EVIDENCE keys
    needs: tuple[str, ...]  # the Evidence fields it is decided on
    decide: object  # verdicts.<rule>: Evidence -> (verdict, the deciding numbers)


A, CAP, SPEED, PROFILE = ("runs", "analysis"), ("capacity",), ("speed",), ("profile",)
SHORTEST, MIDDLE, LONGEST, PAST_SHORTEST = slice(0, 1), slice(1, 2), slice(-1, None), slice(1, None)  # budgets
CLAIMS = (
    # -- Experiment A: the budgets ---------------------------------------------------------------------
    Claim("hypothesis-capacity", "Capacity overflow, not the gating function, sets the quality of the MoE model "
          "(the hypothesis tested): at every budget a change of capacity factor moves a router at least as far as "
          "the routers lie apart.", "introduction", ("results", "cfppl"), A,
          lambda ev: _flipped(v.router_spread_beats_capacity(ev))),
    Claim("short-still-improving", "At the shortest budget (400 steps) every run is still improving when its "
          "schedule ends: its best validation loss is at its last evaluation.", "abstract, takeaway 6, results, "
          "conclusion", ("results", "curve"), A, v.at_budgets(v.still_improving, SHORTEST)),
    Claim("long-minimum-reached", "At the longest budget (4,800 steps) every run reaches its validation minimum "
          "before its schedule ends and ends above it: past the minimum the model fits its small training split.",
          "abstract, takeaway 6, results, limitations, conclusion", ("results", "curve"), A,
          v.at_budgets(v.minimum_reached, LONGEST)),
    Claim("pairs-differ-short", "At the shortest budget some router pairs differ after the Holm correction.",
          "abstract, takeaway 7, results, discussion", ("ranking",), A,
          lambda ev: _flipped(v.at_budgets(v.no_pair_differs, SHORTEST)(ev))),
    Claim("router-spread-short", "At the shortest budget, at a fixed capacity factor, the routers lie further apart "
          "in mean best perplexity than raising the capacity factor from 1 to 1.25 moves any one of them.",
          "introduction, takeaway 7, results", ("results", "cfppl"), A,
          v.at_budgets(v.router_spread_beats_capacity, SHORTEST)),
    Claim("no-pair-differs-mid", "At the middle budget (1,600 steps) no pair of the five routers differs in best "
          "perplexity after the Holm correction, at either capacity factor.", "abstract, takeaway 7, results, "
          "discussion, conclusion", ("ranking",), A, v.at_budgets(v.no_pair_differs, MIDDLE)),
    Claim("prior-ranking", "The prior ranking expert choice > soft top-k > hash > hard top-k > top-1 holds, at every "
          "budget.", "abstract, takeaway 7, results, conclusion", ("ranking",), A, v.prior_ranking),
    Claim("hash-below-softk", "Hash routing, which learns nothing, is lower in best perplexity than soft top-k at "
          "capacity factor 1, at every budget.", "takeaway 7, results", ("ranking",), A,
          v.pair_claim("hash", "softk", ("1.0",))),
    Claim("capacity-lowers-ppl", "A capacity factor of 1.25 lowers the best perplexity of every learned token-choice "
          "router (top-1, hard and soft top-k) against 1, at every budget.", "takeaway 8, results",
          ("results", "cfppl"), A, v.capacity_lowers_ppl),
    Claim("drops-do-not-order", "Drops alone do not order the routers: at capacity factor 1 the router that drops "
          "the most is lower in perplexity than a router that drops less, at every budget.", "results",
          ("results", "ranking"), A, v.drops_do_not_order),
    Claim("dense-not-beaten", "Past the shortest budget no MoE configuration reaches a lower best perplexity than "
          "the dense FFN of hidden 2F (the active FLOPs of k = 2).", "abstract, takeaway 9, results, discussion, "
          "conclusion", ("results",), A, v.at_budgets(v.dense_not_beaten, PAST_SHORTEST)),
    Claim("dense-lowest-final", "At the longest budget the dense baseline ends its schedule with the lowest mean "
          "validation loss: it overfits least.", "abstract, takeaway 9, results, discussion", ("results", "curve"),
          A, v.at_budgets(v.dense_lowest_final, LONGEST)),
    Claim("moe-below-dense-iso", "At equal training compute (ends of schedules) MoE configurations end below the "
          "dense baseline.", "takeaway 9, results", ("isoflop",), A, v.moe_below_dense_at_equal_compute),
    # -- Experiment A: the controls --------------------------------------------------------------------
    Claim("wide-top1-lower", "Top-1 with experts of hidden 2F (the active FLOPs of k = 2) is lower in best "
          "perplexity than top-1 at hidden F at equal tokens.", "takeaway 10, results", ("variants",), A,
          v.variant_lower("hidden=2048")),
    Claim("freq-hash-lower", "A hash table balanced on token frequencies is lower in best perplexity than one "
          "balanced on token ids.", "takeaway 10, results", ("variants",), A,
          v.variant_lower("hash_balance=frequency")),
    Claim("leak-lowers-ppl", "Validating on paragraphs drawn at random (stories straddling the split) reads a lower "
          "best perplexity than validating on a held-out block of stories.", "takeaway 10, results",
          ("variants",), A, v.variant_lower("split_method=hash")),
    Claim("ec-batch-groups-lower", "Expert choice routing over the micro-batch is lower in best perplexity than "
          "expert choice over groups of one sequence.", "takeaway 11, results", ("variants",), A,
          v.variant_lower("ec_group=sequence", lower="main")),
    Claim("ec-noncausal-lower", "Expert choice evaluated non-causally, reading future tokens, has a lower perplexity "
          "than evaluated causally: only the causal number is a language-model result.", "takeaway 11, results",
          ("results",), ("runs",), v.expert_choice_noncausal_lower),
    Claim("routers-confident", "Learned routers do not stay near-uniform: past the shortest budget every learned "
          "router (top-1, hard and soft top-k, expert choice) ends its schedule with a mean top-1 routing "
          "probability above twice the uniform 1/E, so hash's parity with them is not that of near-uniform "
          "routers.", "results", ("results", "routing"), A, v.at_budgets(v.routers_confident, PAST_SHORTEST)),
    # -- speed, capacity bench and profile -------------------------------------------------------------
    Claim("hypothesis-dispatch", "Dispatch is the largest part of the MoE layer's GPU time (the hypothesis tested; "
          "\"the cost of MoE is dominated by dispatch\").", "introduction", ("profile",), PROFILE,
          vb.dispatch_dominates),
    Claim("moe-slower", "The MoE layer, compiled as in training, takes longer than a dense FFN of equal active "
          "FLOPs.", "abstract, takeaway 2, conclusion", ("layer",), SPEED, vb.moe_slower_than_dense),
    Claim("dispatch-minor", "At E = 8, k = 2 the expert GEMMs and GELU take most of the layer's GPU time; gathers, "
          "scatters and combine take less than the router and its small kernels.",
          "abstract, takeaway 2, conclusion", ("profile",), PROFILE, vb.dispatch_minor),
    Claim("data-movement-gap", "At E = 64, k = 8 data movement is the largest part of the MoE layer's time above "
          "dense.", "takeaway 2, discussion", ("profile",), PROFILE, vb.data_movement_leads_gap),
    Claim("launch-bound", "Small-model training is launch-bound: CUDA graphs more than halve the eager step.",
          "takeaway 3", ("train",), SPEED, vb.launch_bound),
    Claim("skew-drops-persist", "Under synthetic Zipf skew no capacity factor up to 2 removes the drops (k = 2).",
          "abstract, takeaway 4, conclusion", ("capdrop",), CAP, vb.skew_drops_persist),
    Claim("trained-cf-removes-drops", "For trained routers a capacity factor of 1.25 removes the drops of "
          "capacity factor 1, in the bench and in training.", "abstract, takeaway 4, Experiment B, conclusion",
          ("capdrop", "results"), ("analysis", "capacity"), vb.trained_capacity_removes_drops),
    Claim("dropless-slow-skew", "Dropless is not free under skew: the dropless layer is slower than at capacity "
          "factor 1.", "takeaway 5", ("capthr",), CAP, vb.dropless_slower_under_skew),
)
COLUMNS = ("no", "id", "claim", "stated in", "evidence", "verdict", "deciding numbers")


def _flipped(decided: tuple[str, str]) -> tuple[str, str]:
    return v.FLIP[decided[0]], decided[1]


def evaluate(evidence: Evidence, claims: tuple[Claim, ...] = CLAIMS) -> pd.DataFrame:
    """One row per claim (COLUMNS, evidence as EVIDENCE keys): its verdict and deciding numbers; a
    claim whose records are absent is unresolved, "no records"."""
    rows = []
    for i, claim in enumerate(claims, 1):
        missing = [n for n in claim.needs if getattr(evidence, n) is None]
        verdict, numbers = ("unresolved", f"no records ({', '.join(missing)})") if missing else claim.decide(evidence)
        assert verdict in VERDICTS, f"{claim.id}: verdict {verdict!r}"
        rows.append([f"C{i}", claim.id, claim.text, claim.where, ", ".join(claim.evidence), verdict, numbers])
    return pd.DataFrame(rows, columns=list(COLUMNS))


CLAIMS_PER_PAGE = 11  # rows of the claims table per float: a float larger than a page is not printed


def claims_tex(frame: pd.DataFrame) -> str:
    """The appendix table (table* floats of CLAIMS_PER_PAGE rows, the first labelled tab:claims), cells
    escaped, evidence as references."""
    rows = [" & ".join([r["no"], tex_escape(r["claim"]), tex_escape(r["stated in"]),
                        ", ".join(EVIDENCE[k][0] for k in r["evidence"].split(", ")),
                        f"\\textbf{{{r['verdict']}}}", tex_escape(r["deciding numbers"])]) + " \\\\"
            for r in frame.to_dict("records")]
    caption = [
        "\\caption{The claims of the abstract, introduction, takeaways, discussion and conclusion, each with the "
        "table or figure that backs it and its verdict computed from the records by "
        "\\texttt{moe\\_core.analysis.claims} (holds, unresolved or reversed; Experiment~A comparisons paired over "
        "seeds and Holm-corrected, a verdict per token budget; the rules are in the module). The text cites a claim "
        "by its number; \\texttt{tests/test\\_claims.py} fails when a verdict stated in the text differs from this "
        "table. The correctness claims are held by the test suite itself (Table~\\ref{tab:checks}).}",
        "\\label{tab:claims}"]
    floats = []
    for start in range(0, len(rows), CLAIMS_PER_PAGE):
        head = caption if start == 0 else ["Table~\\ref{tab:claims}, continued.\\par\\smallskip"]
        floats += [
            "\\begin{table*}[p]", "\\centering\\scriptsize", *head,
            "\\setlength{\\tabcolsep}{3pt}\\renewcommand{\\arraystretch}{1.15}",
            "\\begin{tabular}{@{}l p{0.28\\textwidth} p{0.1\\textwidth} p{0.1\\textwidth} l p{0.34\\textwidth}@{}}",
            "\\toprule", "& Claim & Stated in & Evidence & Verdict & Deciding numbers \\\\", "\\midrule",
            *rows[start:start + CLAIMS_PER_PAGE], "\\bottomrule", "\\end{tabular}", "\\end{table*}"]
    return "\n".join(
        ["% Generated by moe_core.analysis.claims (python -m moe_core.analysis.paper). Do not edit by hand.",
         *floats, ""])


def claims_markdown(frame: pd.DataFrame, experiment: str) -> str:
    rows = [f"| {r['no']} | {r['claim']} (`{r['id']}`) | {r['stated in']} | "
            f"{'; '.join(EVIDENCE[k][1].format(exp=experiment) for k in r['evidence'].split(', '))} | "
            f"**{r['verdict']}** | {r['deciding numbers']} |" for r in frame.to_dict("records")]
    return "\n".join([
        "<!-- Generated by moe_core.analysis.claims (python -m moe_core.analysis.paper). Do not edit by hand. -->",
        f"# Claims and their verdicts ({experiment})", "",
        "Every claim of the paper's abstract, introduction, takeaways, discussion and conclusion, with the evidence "
        "that backs it and its verdict computed from the records by `moe_core.analysis.claims` (rules in "
        "`moe_core/analysis/verdicts.py` and `verdicts_bench.py`). `tests/test_claims.py` fails when main.tex or "
        "README states another.", "",
        "| | claim | stated in | evidence | verdict | deciding numbers |", "|---|---|---|---|---|---|", *rows, ""])


def write_claims(frame: pd.DataFrame, experiment: str, tables_dir: str | Path, numbers_dir: str | Path) -> list[Path]:
    """``claims.tex``, ``claims.md`` and ``claims.csv`` in tables_dir; ``numbers_claims.tex`` (each
    claim's number and verdict, read by \\claim) in numbers_dir, indexed by its numbers.tex."""
    tables_dir, numbers_dir = Path(tables_dir), Path(numbers_dir)
    tables_dir.mkdir(parents=True, exist_ok=True)
    numbers_dir.mkdir(parents=True, exist_ok=True)
    paths = [tables_dir / "claims.tex", tables_dir / "claims.md", tables_dir / "claims.csv",
             numbers_dir / "numbers_claims.tex"]
    paths[0].write_text(claims_tex(frame))
    paths[1].write_text(claims_markdown(frame, experiment))
    frame.assign(experiment=experiment).to_csv(paths[2], index=False)
    paths[3].write_text("\n".join(
        [f"% Generated by moe_core.analysis.claims ({experiment}): claim numbers and verdicts for \\claim{{id}}{{verdict}}.",
         *(f"\\expandafter\\def\\csname moeclaim@{r['id']}\\endcsname{{{r['no']}}}"
           f"\\expandafter\\def\\csname moeverdict@{r['id']}\\endcsname{{{r['verdict']}}}"
           for r in frame.to_dict("records"))]) + "\n")
    index_numbers(numbers_dir)
    return paths


def stated(text: str) -> list[tuple[str, str]]:
    """Every (claim id, stated verdict) in a text: ``\\claim{id}{verdict}`` or "(claim `id`: verdict)"."""
    return [(m[0] or m[2], m[1] or m[3]) for m in STATED.findall(text)]


def mismatches(texts: dict[str, str], computed: pd.DataFrame) -> list[str]:
    """One line per stated verdict that is not the computed one, or names no claim, in each named text."""
    verdict = dict(zip(computed["id"], computed["verdict"]))
    return [f"{name}: claim {cid} stated {said}, the records say {verdict.get(cid, 'nothing: no such claim')}"
            for name, text in texts.items() for cid, said in stated(text) if verdict.get(cid) != said]
