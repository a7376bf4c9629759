"""The sweep runner: grid expansion, fail-fast validation, selection, and real end-to-end sweeps."""
import json
import shutil
from pathlib import Path

import pytest
import yaml

from moe_core import sweep

ROOT = Path(__file__).resolve().parents[1]
TINY = ["steps=6", "warmup=1", "eval_interval=3", "eval_windows=4", "batch_size=4", "seq_len=32",
        "dim=32", "hidden=32", "synthetic_chars=60000"]


def test_expand_grid_names_and_defaults():
    spec = {"experiment": "x", "defaults": {"steps": 7, "warmup": 2},
            "grid": [{"router": ["softk", "hash"], "capacity_factor": [1.0, None], "seed": [0]}],
            "runs": [{"name": "dense_s0", "ffn": "dense"}]}
    experiment, runs = sweep.expand(spec)
    assert experiment == "x"
    assert [r.name for r in runs] == ["softk_cf1.0_s0", "softk_dropless_s0", "hash_cf1.0_s0", "hash_dropless_s0",
                                      "dense_s0"]
    assert all(r.params["steps"] == 7 and r.params["experiment"] == "x" for r in runs)
    assert runs[1].params["capacity_factor"] is None and runs[-1].params["ffn"] == "dense"


def test_name_template_and_duplicate_names():
    spec = {"experiment": "x", "grid": {"name": "{router}_cf{capacity_factor}", "router": "softk",
                                        "capacity_factor": [1.0, 1.25]}}
    assert [r.name for r in sweep.expand(spec)[1]] == ["softk_cf1.0", "softk_cf1.25"]
    spec["grid"]["name"] = "same"
    with pytest.raises(ValueError, match="two runs are named 'same'"):
        sweep.expand(spec)


@pytest.mark.parametrize("spec,match", [
    ({"experiment": "x", "grid": {"routr": ["softk"]}}, r"grid\[0\]: unknown key\(s\) \['routr'\]; valid keys: .*router"),
    ({"experiment": "x", "defaults": {"stepz": 1}, "runs": [{}]}, r"defaults: unknown key"),
    ({"experiment": "x", "runs": [{"top_k": 0}]}, r"run k0: .*top_k"),
    ({"experiment": "x", "gird": {}}, r"unknown top-level key"),
    ({"grid": {"router": "softk"}}, r"'experiment'"),
    ({"experiment": "x"}, r"no runs"),
])
def test_bad_specs_fail_fast(spec, match):
    with pytest.raises(ValueError, match=match):
        sweep.expand(spec)


def test_params_files_expand():
    _, smoke = sweep.expand(yaml.safe_load((ROOT / "params/smoke.yaml").read_text()))
    assert {"top1_cf1.0_s0", "expert_choice_cf1.0_s0", "dense_s0", "softk_dropless_s0"} <= {r.name for r in smoke}
    _, runs_a = sweep.expand(yaml.safe_load((ROOT / "params/experiment_a.yaml").read_text()))
    names = {r.name for r in runs_a}
    seeds = 5  # 5 routers x 2 capacity factors x seeds, plus dropless softk and dense per seed
    assert len(runs_a) == 5 * 2 * seeds + seeds + seeds
    assert "softk_cf1.25_s0" in names and "top1_cf1.0_s4" in names and "dense_s4" in names
    assert all(r.params["top_k"] == 1 for r in runs_a if r.params["router"] == "top1")


def test_experiment_a_v2_design():
    """Every configuration at 3 budgets (complete schedules) x 5 seeds on the story-disjoint split,
    evaluated on all validation windows; the first slice's glob keeps 3 seeds of every configuration."""
    _, runs = sweep.expand(yaml.safe_load((ROOT / "params/experiment_a_v2.yaml").read_text()))
    configs = {}
    for r in runs:
        budget, rest = r.name.split("_", 1)
        config, seed = rest.rsplit("_s", 1)
        assert budget == f"b{r.params['steps']}" and int(seed) == r.params["seed"]
        configs.setdefault(config, set()).add((r.params["steps"], r.params["seed"]))
    assert len(runs) == 285 and len(configs) == 19
    assert all(pairs == {(b, s) for b in (400, 1600, 4800) for s in range(5)} for pairs in configs.values())
    assert {"hash_ids_cf1.0", "hash_frequency_cf1.0", "expert_choice_seq_cf1.25", "top1_h2048_cf1.0", "dense",
            "softk_dropless", "softk_cf1.25_parasplit"} <= set(configs)
    assert all(r.params["val_fraction"] == 0.1 and r.params["eval_windows"] >= 400 and "hash_seed" not in r.params
               for r in runs)
    assert {r.params["split_method"] for r in runs} == {"block", "hash"}  # hash: the leak probe only
    first = sweep.select(runs, "*_s[012]", None)
    assert len(first) == 19 * 3 * 3 and {r.params["seed"] for r in first} == {0, 1, 2}


def test_select_only_and_shards_partition():
    runs = [sweep.Run(f"r{i}", {}) for i in range(7)]
    assert [r.name for r in sweep.select(runs, "r[12]", None)] == ["r1", "r2"]
    shards = [sweep.select(runs, None, f"{i}/3") for i in range(3)]
    assert sorted(r.name for s in shards for r in s) == sorted(r.name for r in runs)
    with pytest.raises(ValueError, match="--shard"):
        sweep.select(runs, None, "3/3")


def test_cli_typo_fails_before_running(tmp_path, capsys):
    params = tmp_path / "bad.yaml"
    params.write_text("experiment: bad\ngrid:\n  capacity_factr: [1.0]\n")
    with pytest.raises(SystemExit) as exit_info:
        sweep.main([str(params), "--runs-dir", str(tmp_path / "runs")])
    assert exit_info.value.code == 2
    assert "capacity_factr" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def _sweep(tmp_path, params, *extra):
    args = [str(params), "--runs-dir", str(tmp_path / "runs"), "--executed-dir", str(tmp_path / "executed"),
            "--set", f"cache_dir={tmp_path / 'cache'}"]
    for item in TINY:
        args += ["--set", item]
    return sweep.main(args + list(extra))


def test_smoke_sweep_end_to_end_then_skips(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    assert _sweep(tmp_path, ROOT / "params/smoke.yaml") == 0
    _, runs = sweep.expand(yaml.safe_load((ROOT / "params/smoke.yaml").read_text()))
    for run in runs:
        summary = json.loads((tmp_path / "runs/smoke" / run.name / "summary.json").read_text())
        assert summary["status"] == "ok", run.name
        assert (tmp_path / "executed/smoke" / f"{run.name}.ipynb").is_file()
    capsys.readouterr()
    assert _sweep(tmp_path, ROOT / "params/smoke.yaml") == 0
    assert capsys.readouterr().out.count("ok (skipped)") == len(runs)


def test_failing_run_is_recorded_and_others_go_on(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    params = tmp_path / "mixed.yaml"
    params.write_text(yaml.safe_dump({"experiment": "mixed", "runs": [
        {"name": "broken", "corpus": f"text:{tmp_path / 'missing.txt'}"},
        {"name": "fine", "router": "softk"}]}))
    assert _sweep(tmp_path, params) == 1
    broken = json.loads((tmp_path / "runs/mixed/broken/summary.json").read_text())
    assert broken["status"] == "failed" and "missing.txt" in broken["error"]
    assert (tmp_path / "executed/mixed/broken.ipynb").is_file()
    assert json.loads((tmp_path / "runs/mixed/fine/summary.json").read_text())["status"] == "ok"
    shutil.rmtree(tmp_path / "cache", ignore_errors=True)


def test_gpu_worker_pool_path_runs_every_run(tmp_path, monkeypatch):
    """--gpus with two ids takes the worker-pool path (one process per GPU id); on a CPU machine the
    runs still train, on the CPU, so the pool's bookkeeping is tested here."""
    monkeypatch.chdir(ROOT)
    params = tmp_path / "pool.yaml"
    params.write_text(yaml.safe_dump({"experiment": "pool", "grid": {"router": ["softk", "hash"], "top_k": 2}}))
    assert _sweep(tmp_path, params, "--gpus", "0,1") == 0
    for name in ("softk_k2", "hash_k2"):
        assert json.loads((tmp_path / "runs/pool" / name / "summary.json").read_text())["status"] == "ok"
