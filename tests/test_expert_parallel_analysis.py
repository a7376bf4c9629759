"""moe_core.analysis.expert_parallel on the committed 2 x H200 records: the table and the number
macros state what the records state, and the committed paper inputs are what the module writes
from them; repeated bench runs average into one cell and a second world size gets its own column,
panels and macros; the committed paper inputs take committed records only, and the notebook stops
before reading a record when a draft is aimed at them."""
import json
import shutil
from pathlib import Path

import papermill
import pytest

from moe_core.analysis import expert_parallel as ep
from moe_core.analysis import latex

ROOT = Path(__file__).resolve().parents[1]
H200 = ROOT / "runs" / "benchmarks" / "h200x2_20261128_3135d0a"


def records(bench_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (bench_dir / "expert_parallel.jsonl").read_text().splitlines()]


def relabelled(src: Path, dest: Path, **changes) -> Path:
    """A copy of a bench directory with ``changes`` applied to every row (jsonl and run JSON)."""
    shutil.copytree(src, dest)
    rows = [{**row, **changes} for row in records(src)]
    (dest / "expert_parallel.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (dest / "expert_parallel.csv").unlink()
    for path in dest.glob("expert_parallel_*.json"):
        run = json.loads(path.read_text())
        path.write_text(json.dumps({**run, **({"run_id": changes["run_id"]} if "run_id" in changes else {}),
                                    "rows": [{**r, **changes} for r in run["rows"]]}))
    return dest


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = tmp_path_factory.mktemp("ep")
    cells = ep.cells(ep.load_records([H200]))
    paths, numbers = ep.write_ep(cells, ep.run_records([H200]), out / "tables", out / "paper" / "numbers_ep.tex")
    return out, cells, numbers


def table_rows(path: Path) -> list[list[str]]:
    """Body rows of a booktabs table, a cell left blank (a repeat of the row above) filled in."""
    body = path.read_text().split("\\midrule\n")[1].split("\\bottomrule")[0]
    rows, last = [], []
    for line in body.strip().splitlines():
        row = [cell.strip() for cell in line.removesuffix("\\\\").split("&")]
        row = [cell or (last[i] if i < 2 else cell) for i, cell in enumerate(row)]
        rows.append(row)
        last = row
    return rows


def test_table_and_macros_state_the_records(written):
    out, cells, numbers = written
    cells_by_key = {(r["source"], str(r["num_experts"]), str(r["top_k"]), r["cf_label"]): r
                    for r in records(H200)}
    rows = table_rows(out / "tables" / "expert_parallel.tex")
    assert len(rows) == len(cells) == len(cells_by_key) == 40
    for row in rows:
        rec = cells_by_key[tuple(row[:4])]
        assert row[5] == latex.format_number(rec["a2a_bytes"] / 1e6)
        cv = latex.format_number(100 * rec["fwd_a2a_ms_cv"], 2)
        assert row[6] == f"{latex.format_number(rec['fwd_a2a_ms'])} ({cv})"
        assert row[7] == latex.format_number(100 * rec["fwd_a2a_share"])
        assert row[10:] == [latex.format_number(rec[k]) for k in ("a2a_busbw_gbps", "ref_busbw_gbps", "a2a_over_ref")]
    macros = (out / "paper" / "numbers_ep.tex").read_text()
    rec = cells_by_key["random", "8", "2", "1.0"]
    assert (f"\\newcommand{{\\EpWTwoRandomEEightKTwoCfOnePtZeroFwdSharePct}}"
            f"{{{latex.format_number(100 * rec['fwd_a2a_share'])}}}") in macros
    for line in ("\\newcommand{\\EpWTwoGpus}{2}", "\\newcommand{\\EpWTwoDevice}{NVIDIA H200}",
                 "\\newcommand{\\EpWTwoDate}{2026-11-28}", "\\newcommand{\\EpWTwoCheckpointRun}{softk\\_cf1.25\\_s0}"):
        assert line in macros
    assert numbers["ep w2 busbw max"] == max(r["a2a_busbw_gbps"] for r in records(H200))
    assert "\\InputIfFileExists{numbers_ep.tex}" in (out / "paper" / "numbers.tex").read_text()


def test_committed_paper_inputs_are_regenerated_not_edited(written):
    out = written[0]
    assert (out / "paper" / "numbers_ep.tex").read_text() == (ROOT / "paper" / "numbers_ep.tex").read_text()
    for name in ("expert_parallel.tex", "expert_parallel.csv"):
        assert (out / "tables" / name).read_text() == (ROOT / "paper" / "tables" / name).read_text(), name


def test_repeated_runs_average_and_world_sizes_stay_apart(tmp_path):
    again = relabelled(H200, tmp_path / "again", run_id="20261129T000000-aaaaaa", fwd_a2a_ms=1.0)
    four = relabelled(H200, tmp_path / "four", world_size=4, run_id="20261130T000000-bbbbbb")
    cells = ep.cells(ep.load_records([H200, again, four]))
    two = cells[cells["world_size"] == 2]
    assert len(two) == len(cells[cells["world_size"] == 4]) == 40 and set(two["n_runs"]) == {2}
    first = records(H200)[0]
    assert two["fwd_a2a_ms"].iloc[0] == pytest.approx((first["fwd_a2a_ms"] + 1.0) / 2)
    table = ep.ep_table(cells)
    assert "$W$" in table and "Runs" in table
    numbers = ep.ep_numbers(cells, ep.run_records([H200, again, four]))
    latex.latex_macros(numbers)  # raises if two keys make one macro name
    assert numbers["ep w4 gpus"] == 4 and numbers["ep w2 date"] == "2026-11-28, 2026-11-29"
    assert "-{}-nproc-per-node 4" in numbers["ep w4 command"]
    panels = {v["panel"] for v in next(iter(ep.ep_chart(cells).to_dict()["datasets"].values()))}
    assert panels == {"E = 8, 2 GPUs", "E = 64, 2 GPUs", "E = 8, 4 GPUs", "E = 64, 4 GPUs"}


def test_one_world_size_one_device(tmp_path):
    other = relabelled(H200, tmp_path / "other", device_name="NVIDIA H100 80GB HBM3")
    with pytest.raises(ValueError, match="bench_dirs: world size.* more than one device"):
        ep.load_records([H200, other])


def test_committed_inputs_take_committed_records_only(tmp_path):
    draft = relabelled(H200, tmp_path / "draft")
    committed = (ROOT / "figures", ROOT / "paper" / "tables", ROOT / "paper" / "numbers_ep.tex")
    ep.check_destinations([H200], *committed)
    ep.check_destinations([draft], tmp_path / "figures", tmp_path / "tables", tmp_path / "numbers_ep.tex")
    with pytest.raises(ValueError, match="bench_dirs: .* is not under runs/benchmarks/"):
        ep.check_destinations([H200, draft], tmp_path / "figures", committed[1], tmp_path / "numbers_ep.tex")
    with pytest.raises(ValueError, match="bench_dirs: no directory"):
        ep.check_destinations([], *committed)
    before = {p: p.stat().st_mtime_ns for p in (ROOT / "figures").iterdir()}
    with pytest.raises(papermill.PapermillExecutionError, match="is not under runs/benchmarks/"):
        papermill.execute_notebook(
            str(ROOT / "notebooks" / "expert_parallel.ipynb"), str(tmp_path / "out.ipynb"), kernel_name="python3",
            parameters=dict(bench_dirs=[str(draft)], figures_dir="figures", tables_dir=str(tmp_path / "tables"),
                            numbers_path=str(tmp_path / "numbers_ep.tex")), cwd=str(ROOT), progress_bar=False)
    assert {p: p.stat().st_mtime_ns for p in (ROOT / "figures").iterdir()} == before
