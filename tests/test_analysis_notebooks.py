"""The analysis notebooks end to end under papermill, on real tiny records made here (training
runs, and a tiny capacity bench): every figure in three formats, the booktabs tables whose
numbers match the records, the number macros; without records, a one-line stop in the first cell;
and a draft aimed at the committed paper inputs stops before it reads anything."""
import json
import math
import statistics
from pathlib import Path

import papermill
import pytest
from test_results import SPECS, train_runs

from moe_core import bench
from moe_core.analysis import latex, stats

ROOT = Path(__file__).resolve().parents[1]
FIGURES_A = ("frontier", "training_curve", "routing_stats", "iso_flop")
FIGURES_B = ("capacity_drop", "capacity_throughput", "cf_vs_ppl")


def analyse(runs_dir: Path, experiment: str, bench_dir: Path, out: Path) -> None:
    """Both notebooks under papermill, every output under ``out`` (executed notebooks beside it)."""
    common = dict(runs_dir=str(runs_dir), experiment=experiment, figures_dir=str(out / "figures"),
                  tables_dir=str(out / "tables"))
    for part, extra in (("a", {}), ("b", {"bench_dir": str(bench_dir)})):
        name = f"analysis_{part}.ipynb"
        papermill.execute_notebook(
            str(ROOT / "notebooks" / name), str(out.parent / f"{out.name}_{name}"), kernel_name="python3",
            parameters={**common, **extra, "numbers_path": str(out / "paper" / f"numbers_{part}.tex")},
            cwd=str(ROOT), progress_bar=False)


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    """runs/exp from tiny training runs (softk with 2 seeds, top1, dense) and a tiny capacity bench."""
    root = tmp_path_factory.mktemp("records")
    train_runs(tmp_path_factory, root / "runs", "exp", SPECS)
    bench.run_capacity(bench.CapacityBenchConfig(tokens=128, dim=16, hidden=16, experts=[4], top_k=[1, 2],
                                                 capacity_factors=[1.0, 1.25, None], warmup=1, repeats=20, sets=3,
                                                 device="cpu"), root / "bench")
    return root


@pytest.fixture(scope="module")
def outputs(records):
    analyse(records / "runs", "exp", records / "bench", records / "analysis")
    return records / "analysis"


def table_rows(path: Path) -> list[list[str]]:
    body = path.read_text().split("\\midrule\n")[1].split("\\bottomrule")[0]
    return [[cell.strip() for cell in line.removesuffix("\\\\").split("&")] for line in body.strip().splitlines()]


def test_every_output_written(outputs):
    for name in (*FIGURES_A, *FIGURES_B):
        for fmt in ("png", "svg", "pdf"):
            assert (outputs / "figures" / f"{name}.{fmt}").stat().st_size > 1000, f"{name}.{fmt}"
    for path in ("tables/exp.tex", "tables/exp.csv", "tables/exp_runs.csv", "tables/experiment_b.tex",
                 "tables/experiment_b.csv", "tables/experiment_b_joined.csv", "paper/numbers_a.tex",
                 "paper/numbers_b.tex", "paper/numbers.tex"):
        assert (outputs / path).stat().st_size > 0, path
    assert "\\InputIfFileExists{numbers_b.tex}" in (outputs / "paper/numbers.tex").read_text()


def test_experiment_a_table_matches_records(records, outputs):
    runs = records / "runs/exp"

    def best_ppl(run: str) -> float:
        return math.exp(json.loads((runs / run / "summary.json").read_text())["best_val_loss"])

    rows = {(row[0], row[2]): row for row in table_rows(outputs / "tables/exp.tex")}
    assert set(rows) == {("top1", "1.0"), ("softk", "1.25"), ("dense", "--")}
    softk = [best_ppl(f"softk_cf1.25_s{s}") for s in (0, 1)]
    ci = stats.t_quantile(0.975, 1) * statistics.stdev(softk) / math.sqrt(2)
    assert rows["softk", "1.25"][3] == "2"  # seeds
    assert rows["softk", "1.25"][4] == f"{latex.format_number(statistics.mean(softk))} $\\pm$ " \
                                       f"{latex.format_number(ci, 2)}"
    assert rows["top1", "1.0"][4] == latex.format_number(best_ppl("top1_cf1.0_s0"))
    assert rows["dense", "--"][4] == latex.format_number(best_ppl("dense_s0"))
    macros = (outputs / "paper/numbers_a.tex").read_text()
    assert f"\\newcommand{{\\SoftkCfOnePtTwoFivePpl}}{{{latex.format_number(statistics.mean(softk))}}}" in macros
    assert "\\newcommand{\\DensePpl}{" in macros and "\\newcommand{\\NumRuns}{4}" in macros


def test_experiment_b_table_matches_records(records, outputs):
    cells = [json.loads(line) for line in (records / "bench/capacity.jsonl").read_text().splitlines()]
    rows = {(row[0], row[2], row[3]): row for row in table_rows(outputs / "tables/experiment_b.tex")}
    assert len(rows) == len(cells) == 12  # 2 sources x 2 k x 3 CF, one bench run
    for cell in cells:
        row = rows[cell["source"], str(cell["top_k"]), cell["cf_label"]]
        assert row[4] == latex.format_number(100 * cell["drop_rate"])
    macros = (outputs / "paper/numbers_b.tex").read_text()
    cell = next(c for c in cells if c["source"] == "random" and c["top_k"] == 2 and c["cf_label"] == "1.0")
    assert f"\\CapRandomEFourKTwoCfOnePtZeroDropPct}}{{{latex.format_number(100 * cell['drop_rate'])}}}" in macros
    assert "\\newcommand{\\SoftkBestCf}{1.25}" in macros


@pytest.mark.parametrize("part", ["a", "b"])
def test_without_records_a_notebook_stops_at_once_with_one_line(tmp_path, part):
    """No run records (or, for analysis_b, no bench records): the first cell after the parameters stops
    the notebook with one line naming the directory, and nothing is written."""
    with pytest.raises(papermill.PapermillExecutionError, match="bench_dir: no capacity bench records" if part == "b"
                       else "runs_dir: no run records in"):
        papermill.execute_notebook(
            str(ROOT / "notebooks" / f"analysis_{part}.ipynb"), str(tmp_path / "out.ipynb"), kernel_name="python3",
            parameters=dict(runs_dir=str(tmp_path / "runs"), experiment="smoke", bench_dir=str(tmp_path / "bench"),
                            figures_dir=str(tmp_path / "out"), tables_dir=str(tmp_path / "out"),
                            numbers_path=str(tmp_path / "out" / "numbers.tex")),
            cwd=str(ROOT), progress_bar=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("part", ["a", "b"])
def test_a_draft_cannot_overwrite_the_committed_paper_inputs(tmp_path, part):
    before = {p: p.stat().st_mtime_ns for p in (ROOT / "figures").iterdir()}
    with pytest.raises(papermill.PapermillExecutionError, match="experiment: only experiment_a_v2 writes"):
        papermill.execute_notebook(
            str(ROOT / "notebooks" / f"analysis_{part}.ipynb"), str(tmp_path / "out.ipynb"), kernel_name="python3",
            parameters=dict(runs_dir=str(tmp_path), experiment="smoke", figures_dir="figures",
                            tables_dir=str(tmp_path / "tables"), numbers_path=str(tmp_path / "numbers.tex")),
            cwd=str(ROOT), progress_bar=False)
    assert {p: p.stat().st_mtime_ns for p in (ROOT / "figures").iterdir()} == before
