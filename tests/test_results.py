"""moe_core.analysis (load, stats, latex, tables) on records of real tiny training runs: loading
(stored numbers read, computed only for records that lack them), seed statistics (mean, s.d.,
Student-t CI), the Pareto front, iso-FLOP FLOPs and interpolation, failed and diverged runs kept in
view, LaTeX number macros and tables, and the guard on the committed paper inputs."""
import json
import math
import shutil
import statistics

import pandas as pd
import pytest

from moe_core.analysis import frontier, latex, load, results, stats, tables
from moe_core.flops import train_flops_per_token
from moe_core.train import TrainConfig, train
from moe_core.train import loop as train_mod  # the loop looks training_loss up there

TINY = dict(dim=32, layers=2, heads=2, hidden=32, num_experts=4, seq_len=32, batch_size=8, eval_windows=8,
            steps=6, warmup=2, eval_interval=3, log_interval=3, progress=False)
# Two seeds of one config, a k=1 router, the dense baseline: what the analysis notebooks need.
SPECS = {"softk_cf1.25_s0": dict(router="softk", top_k=2, seed=0),
         "softk_cf1.25_s1": dict(router="softk", top_k=2, seed=1),
         "top1_cf1.0_s0": dict(router="top1", top_k=1, capacity_factor=1.0),
         "dense_s0": dict(ffn="dense", router="softk", top_k=2)}
T_975 = {1: 12.7062, 2: 4.3027, 4: 2.7764, 10: 2.2281, 30: 2.0423}  # Student t tables, two-sided 95%


def train_runs(tmp_path_factory, out_dir, experiment: str, specs: dict) -> None:
    """Train each tiny config of ``specs`` (run name -> overrides) into out_dir/experiment; the data
    cache is shared by the whole test session."""
    cache = tmp_path_factory.getbasetemp() / "data_cache"
    for name, overrides in specs.items():
        train(TrainConfig(**TINY, **overrides, experiment=experiment, run=name, out_dir=str(out_dir),
                          cache_dir=str(cache)))


def summary(runs_dir, run: str) -> dict:
    return json.loads((runs_dir / "exp" / run / "summary.json").read_text())


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    train_runs(tmp_path_factory, out, "exp",
               {**SPECS, "expert_choice_cf1.25_s0": dict(router="expert_choice", top_k=2)})
    real_loss, calls = train_mod.training_loss, []

    def boom(out):
        raise RuntimeError("boom")

    def nan_from_step_5(out):
        calls.append(1)
        return real_loss(out) * (math.nan if len(calls) >= 5 else 1.0)

    with pytest.MonkeyPatch.context() as mp:  # a run that fails, and one that diverges
        mp.setattr(train_mod, "training_loss", boom)
        with pytest.raises(RuntimeError, match="boom"):
            train_runs(tmp_path_factory, out, "exp", {"hash_cf1.25_s0": dict(router="hash", top_k=2)})
        mp.setattr(train_mod, "training_loss", nan_from_step_5)
        train_runs(tmp_path_factory, out, "exp", {"topk_hard_cf1.25_s0": dict(router="topk_hard", top_k=2)})
    return out


@pytest.fixture(scope="module")
def loaded(runs_dir):
    return load.load_experiment(runs_dir, "exp")


def test_runs_frame_flattens_config_and_summary(runs_dir, loaded):
    runs, evals = loaded
    row = runs.set_index("run").loc["softk_cf1.25_s0"]
    assert row["router"] == "softk" and row["capacity_factor"] == 1.25 and row["name"] == "softk cf1.25"
    assert row["best_val_ppl"] == pytest.approx(math.exp(summary(runs_dir, "softk_cf1.25_s0")["best_val_loss"]))
    assert runs.set_index("run").loc["dense_s0", "name"] == "dense"
    assert len(evals) == 2 * 5 + 1  # 5 ok runs with 2 evals each (steps 3, 6), the diverged one with 1
    assert {"step_lr", "lr", "val_loss", "train_flops"} <= set(evals.columns)  # the row's lr does not hide the config's


def test_seed_aggregate_mean_std_ci_from_records(runs_dir, loaded):
    ppl = [math.exp(summary(runs_dir, f"softk_cf1.25_s{s}")["best_val_loss"]) for s in (0, 1)]
    tok_s = [summary(runs_dir, f"softk_cf1.25_s{s}")["median_tokens_per_s"] for s in (0, 1)]
    row = stats.run_table(loaded.runs).set_index("name").loc["softk cf1.25"]
    assert row["n_runs"] == 2 and row["runs"] == "softk_cf1.25_s0, softk_cf1.25_s1"
    assert row["best_val_ppl_mean"] == pytest.approx(statistics.mean(ppl))
    assert row["best_val_ppl_std"] == pytest.approx(statistics.stdev(ppl))
    assert row["best_val_ppl_ci95"] == pytest.approx(T_975[1] * statistics.stdev(ppl) / math.sqrt(2), rel=1e-4)
    assert row["median_tokens_per_s_mean"] == pytest.approx(statistics.mean(tok_s))
    one = stats.run_table(loaded.runs).set_index("name").loc["top1 cf1.0"]
    assert one["n_runs"] == 1 and math.isnan(one["best_val_ppl_std"]) and math.isnan(one["best_val_ppl_ci95"])


@pytest.mark.parametrize("df", sorted(T_975))
def test_t_quantile_matches_tables(df):
    assert stats.t_quantile(0.975, df) == pytest.approx(T_975[df], abs=1e-4)


def test_failed_and_diverged_runs_are_listed_not_aggregated(loaded):
    runs = loaded.runs.set_index("run")
    assert runs.loc["hash_cf1.25_s0", "status"] == "failed" and "boom" in runs.loc["hash_cf1.25_s0", "error"]
    assert runs.loc["topk_hard_cf1.25_s0", "status"] == "diverged"
    listed = load.failed_runs(loaded.runs)
    assert set(listed["run"]) == {"hash_cf1.25_s0", "topk_hard_cf1.25_s0"}
    names = set(stats.run_table(loaded.runs)["name"])
    assert names == {"top1 cf1.0", "softk cf1.25", "expert_choice cf1.25", "dense"}
    assert "topk_hard cf1.25" not in set(stats.curves(loaded.evals)["name"])


def test_pareto_front_on_a_frame_from_the_records(loaded):
    table = stats.run_table(loaded.runs)[["name", *stats.FRONT]]
    fastest = table.loc[table[stats.FRONT[0]].idxmax(), "name"]
    best = table.loc[table[stats.FRONT[1]].idxmin()]
    worse = best.copy()  # slower and worse than the best-perplexity config: dominated
    worse["name"], worse[stats.FRONT[0]], worse[stats.FRONT[1]] = "worse", best[stats.FRONT[0]] / 2, \
        best[stats.FRONT[1]] + 1
    twin = best.copy()  # equal on both axes: neither dominates the other
    twin["name"] = "twin"
    missing = best.copy()
    missing["name"], missing[stats.FRONT[0]] = "missing", math.nan
    marked = stats.pareto_front(pd.concat([table, pd.DataFrame([worse, twin, missing])], ignore_index=True))
    front = dict(zip(marked["name"], marked["pareto"]))
    assert front[fastest] and front[best["name"]] and front["twin"]
    assert not front["worse"] and not front["missing"]
    for row in marked[marked["pareto"]].itertuples():  # nothing on the front is dominated
        x, y = getattr(row, stats.FRONT[0]), getattr(row, stats.FRONT[1])
        assert not ((marked[stats.FRONT[0]] > x) & (marked[stats.FRONT[1]] < y)).any()


def test_iso_flop_is_tokens_times_flops_per_token(runs_dir, loaded):
    evals = loaded.evals
    for run in ("top1_cf1.0_s0", "softk_cf1.25_s0"):
        record = json.loads((runs_dir / "exp" / run / "config.json").read_text())
        per_token = train_flops_per_token(TrainConfig(**record["config"]).model_config(record["data"]["vocab_size"]))
        rows = evals[evals["run"] == run]
        assert rows["train_flops"].tolist() == pytest.approx((rows["tokens"] * per_token).tolist())
    per_token = loaded.runs.set_index("run")["train_flops_per_token"]
    assert per_token["top1_cf1.0_s0"] < per_token["softk_cf1.25_s0"]  # k=1 buys fewer FLOPs per token

    curve = stats.curves(evals)
    budget, iso = stats.loss_at_flops(curve)
    top1 = curve[curve["name"] == "top1 cf1.0"]
    assert budget == pytest.approx(top1["train_flops"].max())  # the smallest final compute: top1's
    at = iso.set_index("name")["val_loss_mean_at_budget"]
    assert at["top1 cf1.0"] == pytest.approx(top1["val_loss_mean"].iloc[-1])
    softk = curve[curve["name"] == "softk cf1.25"]
    assert softk["val_loss_mean"].min() <= at["softk cf1.25"] <= softk["val_loss_mean"].max()
    assert stats.loss_at_flops(curve, budget=1.0)[1]["val_loss_mean_at_budget"].isna().all()  # not extrapolated


def test_expert_choice_headline_is_causal(runs_dir, loaded):
    metrics = (runs_dir / "exp/expert_choice_cf1.25_s0/metrics.jsonl").read_text()
    rows = [json.loads(line) for line in metrics.splitlines()]
    run = loaded.runs.set_index("run").loc["expert_choice_cf1.25_s0"]
    assert run["best_val_loss"] == pytest.approx(min(r["val_loss"] for r in rows))
    assert run["best_val_loss_noncausal"] == pytest.approx(min(r["val_loss_noncausal"] for r in rows))
    assert math.isnan(loaded.runs.set_index("run").loc["softk_cf1.25_s0", "best_val_loss_noncausal"])


def test_numbers_table_and_macros(tmp_path, runs_dir, loaded):
    analysis = frontier.analyse(loaded.runs, loaded.evals)
    table = analysis.table
    numbers = tables.experiment_a_numbers(loaded.runs, analysis)
    assert numbers["NumFailedRuns"] == 1 and numbers["NumDivergedRuns"] == 1 and numbers["MaxSeeds"] == 2
    softk = table.set_index("name").loc["softk cf1.25"]
    assert numbers["softk cf1.25 ppl"] == softk["best_val_ppl_mean"]
    steps = [summary(runs_dir, f"softk_cf1.25_s{s}")["best_val_step"] for s in (0, 1)]
    assert numbers["softk cf1.25 best step"] == statistics.median(steps)
    split = json.loads((runs_dir / "exp/softk_cf1.25_s0/config.json").read_text())["data"]["splits"]["train"]
    assert (numbers["CorpusTrainTokens"], numbers["CorpusTrainStories"]) == (split["n_tokens"], split["n_stories"])
    assert numbers["TrainEpochs"] == pytest.approx(numbers["TrainTokens"] / split["n_tokens"])
    assert numbers["NumBudgets"] == 1 and not any(k.startswith("steps ") for k in numbers)  # one budget: no prefixes
    path = latex.write_numbers(numbers, tmp_path / "numbers_a.tex")
    latex.write_numbers({"x": 1}, tmp_path / "numbers_b.tex")
    text = path.read_text()
    assert f"\\newcommand{{\\SoftkCfOnePtTwoFivePpl}}{{{latex.format_number(softk['best_val_ppl_mean'])}}}" in text
    assert "\\newcommand{\\BestRouter}{" in text and "\\newcommand{\\NumFailedRuns}{1}" in text
    assert (tmp_path / "numbers.tex").read_text().count("\\InputIfFileExists") == 2
    tex = latex.write_table(tables.experiment_a_table(table, analysis.target), tmp_path / "t.tex", "cap", "tab:t")
    body = tex.read_text()
    assert "\\toprule" in body and "\\bottomrule" in body and body.count("\\\\\n") == len(table) + 1
    assert "Budget" not in body  # one budget: no budget column


@pytest.mark.parametrize("key,name", [("softk cf1.25 ppl", "SoftkCfOnePtTwoFivePpl"), ("BestRouter", "BestRouter"),
                                      ("topk_hard dropless drop pct", "TopkHardDroplessDropPct"),
                                      ("cap skewed:1 e8 k2 cf 1.0", "CapSkewedOneEEightKTwoCfOnePtZero")])
def test_macro_names_are_letters_only(key, name):
    assert latex.macro_name(key) == name


def test_formatting_and_macro_clashes():
    assert [latex.format_number(v) for v in (3.2149, 41.77, 12345.6, 0.0512, 1.5e15, 7, None, math.nan)] == \
        ["3.21", "41.8", "12,300", "0.0512", "$1.5\\times10^{15}$", "7", "n/a", "n/a"]
    assert latex.format_mean_ci(3.214, 0.0512) == "3.21 $\\pm$ 0.051"
    assert latex.format_mean_ci(2.89e6, 1.4e-9) == "$(2.89 \\pm 0)\\times10^{6}$"  # float noise of equal values
    assert latex.latex_macros({"a": "expert_choice"}).endswith("\\newcommand{\\A}{expert\\_choice}\n")
    with pytest.raises(ValueError, match="both make"):
        latex.latex_macros({"a b": 1, "A_b": 2})


def test_missing_records_are_empty_not_errors(tmp_path):
    assert not load.has_runs(tmp_path, "nothing")
    runs, evals = load.load_experiment(tmp_path, "nothing")
    assert runs.empty and evals.empty
    assert load.load_bench(tmp_path / "no_bench").empty


def copy_run(runs_dir, tmp_path, experiment: str):
    """A copy of the softk seed-0 run under tmp_path/experiment: (run dir, its summary, its config record)."""
    run = tmp_path / experiment / "softk_cf1.25_s0"
    shutil.copytree(runs_dir / "exp" / run.name, run)
    return run, json.loads((run / "summary.json").read_text()), json.loads((run / "config.json").read_text())


def test_stored_numbers_are_read_and_computed_only_when_missing(tmp_path, runs_dir, loaded):
    """FLOPs per token and the best validation loss and step come from summary.json (else config.json's
    model); a record without them gets them computed from its config and metrics.jsonl."""
    fresh = loaded.runs.set_index("run").loc["softk_cf1.25_s0"]
    run, summary, record = copy_run(runs_dir, tmp_path, "stored")
    (run / "summary.json").write_text(json.dumps(summary | {"train_flops_per_token": 123.0, "best_val_loss": 0.5,
                                                            "best_val_step": 3}))
    row = load.load_experiment(tmp_path, "stored").runs.iloc[0]
    assert (row["train_flops_per_token"], row["best_val_loss"], row["best_val_step"]) == (123.0, 0.5, 3)
    assert row["train_flops"] == 123.0 * row["tokens"] and row["best_val_ppl"] == pytest.approx(math.exp(0.5))

    run, summary, record = copy_run(runs_dir, tmp_path, "older")
    for key in ("train_flops_per_token", "best_val_loss", "best_val_step"):
        del summary[key]
    (run / "summary.json").write_text(json.dumps(summary))
    (run / "config.json").write_text(json.dumps(record | {"model": record["model"] | {"train_flops_per_token": 456.0}}))
    row = load.load_experiment(tmp_path, "older").runs.iloc[0]
    assert row["train_flops_per_token"] == 456.0
    assert (row["best_val_loss"], row["best_val_step"]) == (fresh["best_val_loss"], fresh["best_val_step"])
    del record["model"]["train_flops_per_token"]
    (run / "config.json").write_text(json.dumps(record))
    assert load.load_experiment(tmp_path, "older").runs.iloc[0]["train_flops_per_token"] == \
        fresh["train_flops_per_token"]


def test_only_the_paper_experiment_writes_the_committed_inputs(tmp_path):
    figures, paper = tables.ROOT / "figures", tables.ROOT / "paper"
    committed = (figures, paper / "tables", paper / "numbers_a.tex")
    tables.check_destinations(tables.PAPER_EXPERIMENT, *committed)
    tables.check_destinations("smoke", figures / "smoke", paper / "tables" / "smoke",
                              paper / "tables" / "smoke" / "numbers_a.tex")
    for i in range(3):
        drafts = [tmp_path / "figures", tmp_path / "tables", tmp_path / "numbers_a.tex"]
        drafts[i] = committed[i]
        with pytest.raises(ValueError, match=rf"^experiment: only {tables.PAPER_EXPERIMENT} writes the committed paper"):
            tables.check_destinations("smoke", *drafts)


def test_results_namespace_is_the_pipeline():
    assert results.load_experiment is load.load_experiment and results.run_table is stats.run_table
    assert results.ranking_check is stats.ranking_check and results.iso_flop_check is frontier.iso_flop_check
    assert results.write_table is latex.write_table and results.experiment_a_table is tables.experiment_a_table
    assert {"load_experiment", "run_table", "TeX", "write_experiment_a"} <= set(dir(results))
    with pytest.raises(AttributeError, match="no_such_name"):
        results.no_such_name
