"""The claims table: every verdict that main.tex, its macros, the slides and README state equals the one
computed from the committed records; the committed claims table is what the code computes (regenerated,
not edited); a planted wrong verdict is caught; and the budget-aware rules decide per token budget, so
one budget and several read alike, and a claim restricted to some budgets reads only those."""
import re
from pathlib import Path

import pandas as pd
import pytest

from moe_core.analysis import claims, paper, verdicts, verdicts_bench
from moe_core.analysis.frontier import Analysis

ROOT = Path(__file__).resolve().parents[1]
STATING = ("paper/main.tex", "paper/macros.tex", "paper/slides.tex", "README.md")
BENCH = ROOT / "runs" / "benchmarks"


def committed_dir(macro: str) -> Path:
    found = re.search(rf"\\newcommand\{{\\{macro}\}}\{{(.*)\}}", (ROOT / "paper/numbers_bench.tex").read_text())
    assert found, f"paper/numbers_bench.tex has no \\{macro}"
    return BENCH / found.group(1).replace("\\_", "_")


@pytest.fixture(scope="module")
def computed() -> pd.DataFrame:
    """The claims decided from the records the committed paper inputs name (same inputs as make paper-inputs)."""
    experiment = pd.read_csv(ROOT / "paper/tables/claims.csv")["experiment"].iloc[0]
    speed = paper.bench_numbers(committed_dir("BenchDir"), committed_dir("LatestDir"), committed_dir("CapDir")) \
        | paper.compiled_layer_numbers(committed_dir("CompiledDir"))
    evidence = paper.claim_evidence(ROOT / "runs", experiment, committed_dir("CapDir"), speed,
                                    committed_dir("ProfileDir") / "profile_compiled.txt")
    return claims.evaluate(evidence)


def texts() -> dict[str, str]:
    return {name: (ROOT / name).read_text() for name in STATING}


def test_stated_verdicts_are_the_computed_ones(computed):
    assert claims.mismatches(texts(), computed) == []


def test_every_claim_is_stated_in_the_paper(computed):
    stated = {cid for name in ("paper/main.tex", "paper/macros.tex") for cid, _ in claims.stated(texts()[name])}
    assert set(computed["id"]) <= stated, f"claims the paper never states: {set(computed['id']) - stated}"


def test_committed_claims_table_is_regenerated_not_edited(computed):
    committed = pd.read_csv(ROOT / "paper/tables/claims.csv").drop(columns="experiment")
    pd.testing.assert_frame_equal(committed, computed, check_dtype=False)
    assert (ROOT / "paper/tables/claims.tex").read_text() == claims.claims_tex(computed)


def test_a_planted_wrong_verdict_is_caught(computed):
    main = texts()["paper/main.tex"]
    planted = main.replace(r"\claim{dispatch-minor}{holds}", r"\claim{dispatch-minor}{reversed}", 1)
    assert planted != main
    found = claims.mismatches({"main.tex": planted}, computed)
    assert found == ["main.tex: claim dispatch-minor stated reversed, the records say holds"]
    assert claims.mismatches({"README.md": "(claim `no-such-claim`: holds)"}, computed) == \
        ["README.md: claim no-such-claim stated holds, the records say nothing: no such claim"]


def ranking(rows: list[tuple]) -> pd.DataFrame:
    """A stats.ranking_check frame: (budget, cf, better, worse, difference, verdict) per row."""
    frame = pd.DataFrame(rows, columns=["budget_tokens", "cf_label", "better", "worse", "difference", "verdict"])
    return frame.assign(p_holm=0.01)


def test_budget_aware_verdicts():
    """One budget: its verdict. Several: a verdict only where every budget agrees, each budget listed."""
    one = verdicts.Evidence(analysis=Analysis(None, 0.0, ranking([(1e6, "1.0", "softk", "hash", -0.2, "reversed")]),
                                              None, None))
    assert verdicts.pair_claim("hash", "softk")(one)[0] == "holds"
    assert verdicts.prior_ranking(one) == ("reversed", "1 pairs: 0 hold, 1 reversed, 0 unresolved")
    three = ranking([(1e6, "1.0", "softk", "hash", -0.2, "reversed"), (4e6, "1.0", "softk", "hash", -0.3, "reversed"),
                     (12e6, "1.0", "softk", "hash", 0.01, "unresolved")])
    verdict, numbers = verdicts.pair_claim("hash", "softk")(verdicts.Evidence(analysis=Analysis(None, 0.0, three,
                                                                                                 None, None)))
    assert verdict == "unresolved"
    assert [part.split(":")[0] for part in numbers.split("; ")] == ["1M tok", "4M tok", "12M tok"]


def test_budget_restricted_verdicts():
    """at_budgets keeps only the chosen budgets of every frame: a pair that differs at the shortest budget
    alone makes no_pair_differs reversed there and holds past it; still_improving reads the runs' steps."""
    rows = ranking([(1e6, "1.0", "softk", "hash", -0.2, "reversed"), (4e6, "1.0", "softk", "hash", 0.01, "unresolved")])
    rows["verdict"] = ["reversed", "unresolved"]
    runs = pd.DataFrame({"status": "ok", "budget_tokens": [1e6, 1e6, 4e6], "steps_done": [10, 10, 40],
                         "best_val_step": [10, 10, 20]})
    ev = verdicts.Evidence(runs=runs, analysis=Analysis(pd.DataFrame({"budget_tokens": [1e6, 4e6]}), 0.0, rows,
                                                        rows.iloc[:0], pd.DataFrame()))
    shortest, rest = slice(0, 1), slice(1, None)
    assert verdicts.at_budgets(verdicts.no_pair_differs, shortest)(ev) == \
        ("reversed", "1 of 1 pairs differ: CF 1.0: hash below softk by 0.2")
    assert verdicts.at_budgets(verdicts.no_pair_differs, rest)(ev)[0] == "holds"
    assert verdicts.at_budgets(verdicts.still_improving, shortest)(ev)[0] == "holds"
    assert verdicts.at_budgets(verdicts.still_improving, rest)(ev)[0] == "reversed"
    assert verdicts.still_improving(ev)[0] == "unresolved"


def test_profile_parts_sum_to_the_profiled_total(tmp_path):
    text = ("moe grouped E=8 k=2 F=64 compile=default: GPU ms/call 2.000\n"
            "  1.000 ms    2x  cutlass_GroupProblemShape_gemm\n  0.300 ms    1x  triton_poi_fused_gelu_0\n"
            "  0.200 ms    1x  triton_poi_fused_index_put_1\n  0.100 ms    1x  triton_red_fused_mul_sum_2\n"
            "dense: GPU ms/call 1.200\n  1.000 ms    2x  nvjet_sm90_gemm\n  0.100 ms    1x  triton_poi_fused_gelu_0\n")
    (tmp_path / "profile.txt").write_text(text)
    parts = paper.profile_parts(tmp_path / "profile.txt")
    moe, dense = parts["E=8, k=2"]["moe"], parts["E=8, k=2"]["dense"]
    assert moe == pytest.approx({"gemm": 1.0, "gelu": 0.3, "router": 0.0, "gather": 0.2, "combine": 0.1, "other": 0.4})
    assert sum(dense.values()) == pytest.approx(1.2) and dense["gemm"] == 1.0
    verdict, _ = verdicts_bench.dispatch_minor(verdicts.Evidence(profile=parts))
    assert verdict == "holds"  # GEMM + GELU 65% of the layer; dispatch 0.3 ms below router + other 0.4 ms
