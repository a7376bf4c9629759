"""The statistics that make Experiment A's comparisons valid, on synthetic run records written here
(config.json, summary.json, metrics.jsonl; no training): the Student-t tail, paired differences,
Holm's correction, the router ranking per token budget with a CF fixed per comparison, variants
against their main config, names and budgets, where the best loss fell, tokens to a target loss,
iso-FLOP comparisons at the ends of schedules, solo and shared-GPU throughput, the Pareto front's
bootstrap probability, and the tables, macros and markdown made of them."""
import json
import math

import numpy as np
import pandas as pd
import pytest

from moe_core.analysis import frontier, latex, load, markdown, stats, tables

BATCH, SEQ, EVAL_EVERY = 4, 8, 2
BUDGET_STEPS = (8, 16)
SEEDS = range(5)
SEED_EFFECT = 0.2  # a shift shared by every config at one seed: what pairing removes
# run prefix: (config overrides, final loss offset, train FLOPs per token, tokens/s)
CONFIGS = {
    "expert_choice_cf1.0": (dict(router="expert_choice", capacity_factor=1.0), 0.00, 768, 2.0e6),
    "expert_choice_cf1.25": (dict(router="expert_choice", capacity_factor=1.25), 0.00, 768, 1.9e6),
    "softk_cf1.0": (dict(router="softk", capacity_factor=1.0), 0.10, 768, 3.0e6),
    "softk_cf1.25": (dict(router="softk", capacity_factor=1.25), 0.10, 768, 2.9e6),
    "softk_dropless": (dict(router="softk", capacity_factor=None), 0.05, 768, 2.5e6),
    "hash_cf1.0": (dict(router="hash", capacity_factor=1.0), 0.10, 768, 3.5e6),  # = softk: unresolved
    "hash_cf1.25": (dict(router="hash", capacity_factor=1.25), 0.05, 768, 3.4e6),  # beats softk: reversed
    "top1_cf1.0": (dict(router="top1", top_k=1, capacity_factor=1.0), 0.45, 384, 4.0e6),
    "top1_cf1.25": (dict(router="top1", top_k=1, capacity_factor=1.25), 0.45, 384, 3.9e6),
    "top1_wide_cf1.0": (dict(router="top1", top_k=1, capacity_factor=1.0, hidden=128), 0.15, 768, 3.2e6),
    "dense": (dict(ffn="dense", hidden=128), 0.20, 768, 5.0e6),
}
OVERFIT = "softk_dropless"  # at the larger budget its validation loss turns up before the end


def final_loss(prefix: str, steps: int, seed: int) -> float:
    noise = np.random.default_rng([list(CONFIGS).index(prefix), seed, steps]).normal(0, 0.002)
    return 2.0 + CONFIGS[prefix][1] + SEED_EFFECT * seed - 0.3 * (steps == BUDGET_STEPS[1]) + noise


def write_run(root, prefix: str, steps: int, seed: int) -> None:
    overrides, _, flops, tok_s = CONFIGS[prefix]
    config = dict(dim=32, hidden=64, ffn="moe", num_experts=4, top_k=2, router="softk", capacity_factor=1.25,
                  steps=steps, warmup=steps // 4, eval_interval=EVAL_EVERY, batch_size=BATCH, seq_len=SEQ,
                  seed=seed) | overrides
    rows = []
    for step in range(EVAL_EVERY, steps + 1, EVAL_EVERY):
        loss = final_loss(prefix, steps, seed) + 1.5 * (1 - step / steps) ** 2
        if prefix == OVERFIT and steps == BUDGET_STEPS[1]:
            loss += 0.3 * max(0.0, step / steps - 0.75)
        rows.append({"step": step, "tokens": step * BATCH * SEQ, "val_loss": loss})
    best = min(rows, key=lambda r: r["val_loss"])
    run = root / "exp" / f"{prefix}_n{steps}_s{seed}"
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"config": config, "run": run.name, "seed": seed,
                                                 "model": {"train_flops_per_token": flops}}))
    shared = {"concurrency": 2} if prefix.startswith("hash") and steps == BUDGET_STEPS[1] else {}
    (run / "summary.json").write_text(json.dumps({
        "status": "ok", "steps_done": steps, "best_val_loss": best["val_loss"], "best_val_step": best["step"],
        "median_tokens_per_s": tok_s * (1 + 0.01 * seed), "train_flops_per_token": flops, **shared}))
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    for prefix in CONFIGS:
        for steps in BUDGET_STEPS:
            for seed in SEEDS:
                write_run(root, prefix, steps, seed)
    return load.load_experiment(root, "exp")


BUDGETS = tuple(s * BATCH * SEQ for s in BUDGET_STEPS)


# -- the Student-t distribution, paired differences, Holm --------------------------------------------
@pytest.mark.parametrize("x", [0.0, 0.3, 2.0, 12.0, -1.5])
def test_t_tail_matches_closed_forms(x):
    assert stats.t_sf(x, 1) == pytest.approx(0.5 - math.atan(x) / math.pi, abs=1e-12)  # Cauchy
    assert stats.t_sf(x, 2) == pytest.approx(0.5 - x / (2 * math.sqrt(2 + x * x)), abs=1e-10)


def test_t_quantile_inverts_the_tail():
    for df in (1, 3, 4, 9):
        assert stats.t_sf(stats.t_quantile(0.975, df), df) == pytest.approx(0.025, abs=1e-9)
    with pytest.raises(ValueError, match="df >= 1"):
        stats.t_sf(1.0, 0.5)


def test_paired_difference_by_hand():
    a = pd.Series([1.0, 2.0, 3.0, 9.0], index=[0, 1, 2, 3])
    b = pd.Series([1.5, 2.7, 3.6, 7.0], index=[0, 1, 2, 4])  # seed 3 and 4 unpaired: left out
    d = stats.paired_difference(a, b)
    t = 0.6 / (0.1 / math.sqrt(3))
    assert (d["n"], d["a_mean"], d["b_mean"]) == (3, pytest.approx(2.0), pytest.approx(2.6))
    assert d["difference"] == pytest.approx(0.6) and d["difference_std"] == pytest.approx(0.1)
    assert d["t"] == pytest.approx(t) and d["p"] == pytest.approx(1 - t / math.sqrt(2 + t * t))  # 2 x tail, df 2
    assert d["difference_ci95"] == pytest.approx(4.302653 * 0.1 / math.sqrt(3), rel=1e-5)
    assert stats.paired_difference(a, a + 0.5)["p"] == 0.0 and math.isnan(stats.paired_difference(a[:1], b)["p"])
    with pytest.raises(ValueError, match="^seed: two ok runs of one config share a seed"):
        stats.paired_difference(pd.Series([1.0, 2.0], index=[0, 0]), b)


def test_holm_by_hand():
    adjusted = stats.holm([0.01, 0.04, 0.03, math.nan, 0.5])  # m = 4: x4, x3, x2 (raised to 0.09: monotone), x1
    assert list(adjusted[[0, 1, 2, 4]]) == pytest.approx([0.04, 0.09, 0.09, 0.5]) and math.isnan(adjusted[3])
    assert list(stats.holm([0.6, 0.7])) == [1.0, 1.0] and len(stats.holm([])) == 0


# -- names, budgets, the run table ------------------------------------------------------------------------
def test_names_hold_across_budgets_and_variants_are_marked(records):
    runs = records.runs
    cells = runs.drop_duplicates(["name", "budget_tokens"])
    assert sorted(cells["budget_tokens"].unique()) == list(BUDGETS)
    assert cells.groupby("name").size().eq(2).all()  # one name per config, at both budgets
    wide = runs[runs["run"].str.startswith("top1_wide")]
    assert set(wide["name"]) == {"top1 cf1.0 hidden=128"} and set(wide["variant"]) == {"hidden=128"}
    assert set(runs.loc[runs["run"].str.startswith("top1_cf1.0"), "variant"]) == {""}


def test_run_table_per_budget_with_where_the_best_fell(records):
    table = stats.run_table(records.runs).set_index(stats.CELL)
    assert len(table) == 2 * len(CONFIGS) and (table["n_runs"] == 5).all()
    late = table.loc[("softk dropless", BUDGETS[1])]
    assert late["best_val_step_median"] == 14 and late["n_best_at_end"] == 0  # turned up before the end
    assert table.loc[("softk dropless", BUDGETS[0]), "n_best_at_end"] == 5
    for budget in BUDGETS:  # one front per budget: the fastest config of each is on its own front
        part = table.xs(budget, level="budget_tokens")
        assert part.loc[part["median_tokens_per_s_mean"].idxmax(), "pareto"]


# -- the ranking and the variants --------------------------------------------------------------------------
def test_ranking_is_paired_per_budget_with_every_pair_at_each_shared_cf(records):
    check = stats.ranking_check(records.runs)
    routers = len(stats.PRIOR_CLAIM) - 1  # topk_hard did not run here
    assert len(check) == 2 * 2 * routers * (routers - 1) // 2  # 2 budgets x 2 shared CFs x all pairs
    assert set(check["cf_label"]) == {"1.0", "1.25"}  # dropless is softk's alone; the top1 variant is not main
    for _, family in check.groupby("budget_tokens"):
        assert family["p_holm"].to_numpy() == pytest.approx(stats.holm(family["p"]))
    row = check.set_index(["budget_tokens", "cf_label", "better", "worse"])
    ec = row.loc[(BUDGETS[0], "1.0", "expert_choice", "softk")]
    by_hand = [math.exp(final_loss("softk_cf1.0", BUDGET_STEPS[0], s)) - math.exp(final_loss("expert_choice_cf1.0",
                                                                                          BUDGET_STEPS[0], s))
               for s in SEEDS]  # their best is their last evaluation at this budget
    assert ec["verdict"] == "holds" and ec["difference"] == pytest.approx(np.mean(by_hand))
    # the seed effect spreads each config's perplexity far wider than the difference: only pairing resolves it
    softk = records.runs.query("name == 'softk cf1.0' and budget_tokens == @BUDGETS[0]")
    spread = stats.summarize(softk["best_val_ppl"])
    assert spread["ci95"] > 3 * abs(ec["difference"])
    assert row.loc[(BUDGETS[0], "1.25", "softk", "hash"), "verdict"] == "reversed"
    assert row.loc[(BUDGETS[0], "1.25", "softk", "hash"), "lower"] == "hash cf1.25"
    assert row.loc[(BUDGETS[0], "1.0", "softk", "hash"), "verdict"] == "unresolved"
    only = stats.ranking_check(records.runs, cfs=["1.25"], order=["softk", "hash"])
    assert len(only) == 2 and set(only["cf_label"]) == {"1.25"}  # the family shrinks to what was fixed


def test_variants_against_their_main_config(records):
    check = stats.variant_check(records.runs)
    assert list(check["b"]) == ["top1 cf1.0 hidden=128"] * 2 and set(check["a"]) == {"top1 cf1.0"}
    assert (check["verdict"] == "reversed").all() and (check["lower"] == "top1 cf1.0 hidden=128").all()


# -- tokens to target, iso-FLOP, throughput, the Pareto bootstrap ---------------------------------------
def test_tokens_to_target_interpolates_between_evaluations():
    evals = pd.DataFrame({"status": "ok", "name": "x", "budget_tokens": 128, "label": "softk", "cf_label": "1.0",
                          "run": ["r0"] * 4 + ["r1"] * 4, "step": [1, 2, 3, 4] * 2,
                          "tokens": [32, 64, 96, 128] * 2, "val_loss": [3.0, 2.0, 1.5, 1.2, 3.0, 2.5, 2.0, 1.9]})
    target, reach = frontier.tokens_to_target(evals, target=1.8)
    row = reach.iloc[0]
    assert target == 1.8 and (row["n_runs"], row["n_reached"]) == (2, 1)
    assert row["tokens_to_target_mean"] == pytest.approx(64 + 0.2 / 0.5 * 32)
    assert frontier.tokens_to_target(evals, 1.8, interpolate=False)[1].iloc[0]["tokens_to_target_mean"] == 96
    assert frontier.tokens_to_target(evals, 3.5)[1].iloc[0]["tokens_to_target_mean"] == 32
    default, _ = frontier.tokens_to_target(evals)  # the worst config's mean best loss: (1.2 + 1.9) / 2
    assert default == pytest.approx(1.55)


def test_iso_flop_compares_ends_of_schedules_at_equal_compute(records):
    groups = frontier.iso_flop_groups(records.runs).set_index(stats.CELL)["iso_group"]
    matched = groups[("softk cf1.0", BUDGETS[0])]
    assert groups[("top1 cf1.0 hidden=128", BUDGETS[0])] == groups[("top1 cf1.0", BUDGETS[1])] == matched
    assert groups[("top1 cf1.0", BUDGETS[0])] != matched
    iso = frontier.iso_flop_check(records.runs)
    assert iso["p_holm"].to_numpy() == pytest.approx(stats.holm(iso["p"]))
    same_means = iso[(iso["a_budget_tokens"] == iso["b_budget_tokens"]) & (iso["a"].str.startswith("softk"))
                     & (iso["b"].str.startswith("hash"))]
    assert same_means.empty  # two k=2 routers at one budget are the ranking's, not a compute trade
    pair = iso[(iso["a"] == "top1 cf1.0") & (iso["b"] == "softk cf1.0")].iloc[0]  # 2x tokens at k=1 vs k=2
    assert (pair["a_budget_tokens"], pair["b_budget_tokens"]) == (BUDGETS[1], BUDGETS[0])
    by_hand = [final_loss("softk_cf1.0", BUDGET_STEPS[0], s) - final_loss("top1_cf1.0", BUDGET_STEPS[1], s)
               for s in SEEDS]
    assert pair["difference"] == pytest.approx(np.mean(by_hand)) and pair["verdict"] == "reversed"


def test_throughput_solo_bench_or_runs_marked_when_shared(records):
    speed = frontier.throughput(records.runs).set_index(stats.CELL)
    softk = speed.loc[("softk cf1.0", BUDGETS[0])]
    assert softk["tokens_per_s"] == pytest.approx(3.0e6 * 1.02) and softk["tokens_per_s_comparable"]
    hashed = speed.loc[("hash cf1.0", BUDGETS[1])]
    assert hashed["tokens_per_s_source"] == "runs (shared GPU)" and not hashed["tokens_per_s_comparable"]
    bench = pd.DataFrame({"router": ["softk", "hash"], "top_k": [2, 2], "capacity_factor": [1.0, 1.0],
                          "tokens_per_s": [3.1e6, 3.6e6], "tokens_per_s_cv": [0.02, 0.01], "repeats": [5, 1]})
    solo = frontier.throughput(records.runs, bench).set_index(stats.CELL)
    row = solo.loc[("softk cf1.0", BUDGETS[1])]
    assert row["tokens_per_s"] == 3.1e6 and row["tokens_per_s_source"] == "solo bench"
    assert row["tokens_per_s_ci95"] == pytest.approx(stats.t_quantile(0.975, 4) * 0.02 * 3.1e6 / math.sqrt(5))
    assert math.isnan(solo.loc[("hash cf1.0", BUDGETS[0]), "tokens_per_s_ci95"])  # one repeat: no interval
    untimed = solo.loc[("dense", BUDGETS[0])]  # never filled in from the shared runs
    assert math.isnan(untimed["tokens_per_s"]) and not untimed["tokens_per_s_comparable"]
    by_name = frontier.throughput(records.runs, bench.assign(name=["softk cf1.0", "dense"])).set_index(stats.CELL)
    assert by_name.loc[("dense", BUDGETS[1]), "tokens_per_s"] == 3.6e6  # a bench that names its configs
    twice = frontier.throughput(records.runs, pd.concat([bench, bench.assign(tokens_per_s=[3.3e6, 3.6e6],
                                                                            tokens_per_s_cv=[0.04, 0.01])]))
    pooled = twice.set_index(stats.CELL).loc[("softk cf1.0", BUDGETS[1])]  # one step timed twice: pooled
    assert pooled["tokens_per_s"] == pytest.approx(3.2e6)
    assert pooled["tokens_per_s_ci95"] == pytest.approx(stats.t_quantile(0.975, 4) * 0.04 * 3.2e6 / math.sqrt(5))
    with pytest.raises(ValueError, match="^bench: a solo timing frame needs"):
        frontier.throughput(records.runs, bench.drop(columns="tokens_per_s_cv"))


def test_pareto_probability_by_bootstrap_over_seeds():
    rows = [{"status": "ok", "name": n, "budget_tokens": 1, "seed": s, "best_val_ppl": q + 0.01 * s,
             "median_tokens_per_s": x} for n, q, x in (("fast", 5.0, 3.0), ("good", 4.0, 1.0),
                                                      ("dominated", 6.0, 0.5), ("close", 4.0, 0.99))
            for s in range(5)]
    runs = pd.DataFrame(rows)
    speed = frontier.throughput(runs.assign(concurrency=None))
    front = frontier.pareto_probability(runs, speed, resamples=200).set_index("name")
    assert front.loc["fast", "pareto_prob"] == 1.0 and front.loc["dominated", "pareto_prob"] == 0.0
    assert front.loc["good", "pareto"] and not front.loc["close", "pareto"]
    assert 0 < front.loc["close", "pareto_prob"] < front.loc["good", "pareto_prob"] <= 1.0
    shared = frontier.throughput(runs.assign(concurrency=[2 if n == "fast" else 1 for n in runs["name"]]))
    front = frontier.pareto_probability(runs, shared, resamples=200).set_index("name")
    assert math.isnan(front.loc["fast", "pareto_prob"]) and not front.loc["fast", "pareto"]  # not comparable: out
    assert front.loc["good", "pareto_prob"] == 1.0  # nothing comparable is faster and better


# -- tables, macros, markdown --------------------------------------------------------------------------
def test_experiment_a_outputs_per_budget(tmp_path, records):
    paths, numbers = tables.write_experiment_a(records.runs, records.evals, "exp", tmp_path / "tables",
                                               tmp_path / "numbers_a.tex")
    names = {p.name for p in paths}
    assert {"exp.tex", "exp_ranking.tex", "exp_variants.tex", "exp_isoflop.tex", "exp_results.md"} <= names
    body = (tmp_path / "tables" / "exp.tex").read_text()
    assert body.count("\\\\\n") == 2 * len(CONFIGS) + 1 and "Budget" in body
    assert numbers["NumBudgets"] == 2 and numbers["BudgetSteps"] == "8, 16"
    late = numbers["steps 16 softk cf1.0 ppl"]
    assert numbers["softk cf1.0 ppl"] == late != numbers["steps 8 softk cf1.0 ppl"]  # headline: the largest budget
    assert numbers["steps 8 PriorClaimVerdict"] == "is contradicted"  # hash beats softk at CF 1.25
    macros = (tmp_path / "numbers_a.tex").read_text()
    value = latex.format_number(numbers["steps 8 softk cf1.0 ppl"])
    assert f"\\newcommand{{\\StepsEightSoftkCfOnePtZeroPpl}}{{{value}}}" in macros
    text = (tmp_path / "tables" / "exp_results.md").read_text()
    assert text == markdown.results_markdown(records.runs, records.evals)
    assert "### 256 tokens (8 steps)" in text and "### 512 tokens (16 steps)" in text
    assert "| 1.25 | softk vs hash | 5 |" in text and "reversed (hash cf1.25 lower)" in text
    assert "runs (shared GPU)" in text and "Compute-matched (iso-FLOP)" in text


def test_markdown_numbers_never_use_e_notation():
    assert [markdown.number(v) for v in (970430.8, 6155586, 0.0123, 12.345, 0.0, math.nan)] == \
        ["970k", "6.16M", "0.0123", "12.3", "0", "n/a"]


def test_expert_choice_gap_splits_into_future_tokens_and_rule_change():
    rows = [{"status": "ok", "label": "expert_choice", "name": "expert_choice cf1.0", "budget_tokens": 1, "seed": s,
             "val_loss_noncausal_at_best": 1.0 + 0.01 * s, "val_loss_prefix_at_best": 1.2 + 0.01 * s + 0.001 * (s % 2),
             "val_loss_at_best": 1.21 + 0.01 * s + 0.003 * (s % 2)} for s in range(5)]
    rows.append({**rows[0], "label": "softk", "name": "softk cf1.0"})  # not expert choice: not in the table
    ec = stats.ec_decomposition(pd.DataFrame(rows)).set_index("effect")
    future, rule = ec.loc["reading future tokens"], ec.loc["change of routing rule"]
    assert future["n"] == rule["n"] == 5 and future["difference"] == pytest.approx(0.2004)
    assert rule["difference"] == pytest.approx(0.0108) and future["significant"] and future["p_holm"] >= future["p"]
    assert stats.ec_decomposition(pd.DataFrame(rows).drop(columns="val_loss_prefix_at_best")).empty
