"""moe_core.train: config validation, resume == uninterrupted, records, divergence, failure, CLI,
DDP on gloo (2 CPU processes) and the papermill-parameterized notebook."""
import ast
import json
import math
import os
import subprocess
import sys
from dataclasses import asdict, fields
from pathlib import Path

import nbformat
import numpy as np
import pytest
import torch
import yaml

from moe_core import ModelConfig, MoEConfig, TinyMoEModel, sweep
from moe_core import records as rr
from moe_core import train as train_mod
from moe_core.data import DataConfig, load_data
from moe_core.routing import hash_table
from moe_core.train import TrainConfig, loop, train
from moe_core.train.config import COMPONENTS, flat_name
from moe_core.train.notebook import main as notebook_main
from moe_core.train.notebook import parameter_cell, parameter_cell_of

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks/train.ipynb"
TINY = dict(dim=32, layers=2, heads=2, hidden=32, seq_len=32, batch_size=8, eval_windows=8, steps=20,
            warmup=4, eval_interval=4, log_interval=2, progress=False, run="r")
TIMING_KEYS = ("tokens_per_s", "timed_steps", "mfu", "peak_mem_bytes", "wall_time_s")


@pytest.fixture
def tiny(tmp_path, cache_dir):
    def make(**overrides) -> TrainConfig:
        return TrainConfig(**{**TINY, "out_dir": str(tmp_path / "runs"), "cache_dir": cache_dir, **overrides})
    return make


def without_timing(rows):
    return [{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in rows]


def snapshot(run_dir: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(run_dir.iterdir())}


# -- config -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides,field", [
    ({"lr": -1.0}, "lr"), ({"top_k": "2"}, "top_k"), ({"steps": True}, "steps"), ({"router": "nope"}, "router"),
    ({"dim": 30, "heads": 4}, "heads"), ({"top_k": 2}, "top_k"),  # top1 routes to one expert
    ({"capacity_factor": 0.0}, "capacity_factor"), ({"warmup": -1}, "warmup"), ({"beta2": 1.0}, "beta2"),
    ({"tokenizer": "nope"}, "tokenizer"), ({"run": "a/b"}, "run"), ({"device": "tpu"}, "device"),
    # DataConfig validates these under its own names (vocab_size, seed)
    ({"tokenizer": "bpe", "bpe_vocab_size": 100}, "bpe_vocab_size"), ({"data_seed": -1}, "data_seed"),
    ({"eval_windows": 0}, "eval_windows"), ({"stop_after": 0}, "stop_after"),
])
def test_bad_value_names_the_field(overrides, field):
    with pytest.raises(ValueError, match=rf"\b{field}\b"):
        TrainConfig(**overrides)


def test_config_coercion_aliases_and_unknown_keys(tmp_path):
    cfg = TrainConfig(capacity_factor=1, lr=1, router="expert-choice", top_k=2)
    assert cfg.capacity_factor == 1.0 and isinstance(cfg.lr, float) and cfg.router == "expert_choice"
    with pytest.raises(ValueError, match=r"unknown TrainConfig key\(s\) \['lrr'\]; valid keys: .*\blr\b"):
        TrainConfig.from_dict({"lrr": 1e-3})
    params = tmp_path / "x.yaml"
    params.write_text(yaml.safe_dump({"router": "softk", "top_k": 2, "steps": 7}))
    cfg = TrainConfig.load(params, ["capacity_factor=null", "run=007", "lr=1e-3"])
    assert (cfg.router, cfg.steps, cfg.capacity_factor, cfg.run, cfg.lr) == ("softk", 7, None, "007", 1e-3)
    # a notebook's globals: every name defined after the snapshot must be a field
    before = {"json"}
    assert TrainConfig.from_namespace({"json": 0, "_x": 1, "steps": 5}, before).steps == 5
    with pytest.raises(ValueError, match=r"\['stepz'\]; valid keys"):
        TrainConfig.from_namespace({"steps": 5, "stepz": 5}, before)


# Fields of the component configs that a run does not expose, and why: a new component field fails
# this test until it is either exposed (train/config.py COMPONENT_FIELDS) or listed here.
NOT_EXPOSED = {
    ModelConfig: {"vocab_size": "the data's", "moe": "built from the MoE fields", "init_std": "kept at its default"},
    MoEConfig: {"hash_vocab_size": "set by TinyMoEModel", "ec_eval": "evaluation runs every mode",
                "router_init_std": "kept at its default"},
    DataConfig: {},
}


def test_component_fields_are_exposed_or_deliberately_not():
    flat = TrainConfig.field_names()
    assert len(flat) == len(set(flat))
    for cls in COMPONENTS:
        hidden = {f.name for f in fields(cls) if flat_name(cls, f.name) not in flat}
        assert hidden == set(NOT_EXPOSED[cls]), cls.__name__
    # every flat field is a component field or a training-only one, never both
    component = {flat_name(cls, f.name) for cls in COMPONENTS for f in fields(cls)} & set(flat)
    training = [f.name for cls in (train_mod.OptimConfig, train_mod.RunConfig) for f in fields(cls)]
    assert not component & set(training) and sorted([*component, *training]) == sorted(flat)
    # the component configs receive the run's values, renamed back where the names differ
    cfg = TrainConfig(bpe_vocab_size=300, data_seed=3, seq_len=48, dim=32, hidden=40, router="softk", top_k=2)
    data, model = cfg.data_config(), cfg.model_config(vocab_size=7)
    assert (data.vocab_size, data.seed, data.seq_len, data.eval_windows) == (300, 3, 48, cfg.eval_windows)
    assert (model.seq_len, model.dim, model.moe.dim, model.moe.hidden, model.moe.router) == (48, 32, 32, 40, "softk")


def test_committed_records_load_and_match_their_sweep():
    """The flat "config" of every committed Experiment A record is a TrainConfig as it is (same
    values; fields added since take their defaults) and the config its params file builds for that
    run (on the fields the record has)."""
    _, runs = sweep.expand(yaml.safe_load((ROOT / "params/experiment_a.yaml").read_text()))
    records = {path.parent.name: path for path in (ROOT / "runs/experiment_a").glob("*/" + rr.CONFIG_FILE)}
    assert sorted(records) == sorted(run.name for run in runs) and len(runs) == 60
    defaults = asdict(TrainConfig())
    for run in runs:
        path = records[run.name]
        stored = json.loads(path.read_text())["config"]
        loaded = asdict(TrainConfig.from_dict(stored))
        assert {k: loaded[k] for k in stored} == stored, path
        assert all(loaded[k] == defaults[k] for k in loaded.keys() - stored.keys()), path
        built, kept = TrainConfig.from_dict(run.params).identity(), TrainConfig.from_dict(stored).identity()
        assert {k: built[k] for k in stored if k in kept} == {k: kept[k] for k in stored if k in kept}, run.name


def test_cli_unknown_key_lists_valid_keys(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_mod.main(["--set", "capacity_factr=1.0"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "capacity_factr" in err and "valid keys" in err and "capacity_factor" in err


def test_lr_schedule_warmup_then_cosine():
    cfg = TrainConfig(steps=100, warmup=10, lr=1.0, min_lr_ratio=0.1)
    assert train_mod.lr_at(cfg, 0) == pytest.approx(0.1) and train_mod.lr_at(cfg, 9) == pytest.approx(1.0)
    assert train_mod.lr_at(cfg, 10) == pytest.approx(1.0) and train_mod.lr_at(cfg, 100) == pytest.approx(0.1)
    assert train_mod.lr_at(cfg, 55) == pytest.approx(0.55)


# -- records and resume -------------------------------------------------------------------------------
def test_resume_matches_uninterrupted_run(tiny):
    full = train(tiny(experiment="full"))
    assert full.status == "ok" and [r["step"] for r in full.metrics] == [4, 8, 12, 16, 20]
    part = train(tiny(experiment="split", stop_after=10))  # mid-interval: the interval sums are checkpointed
    assert part.status == "stopped" and part.summary["steps_done"] == 10
    assert rr.load_checkpoint(part.run_dir / rr.CHECKPOINT_FILE)["step"] == 10
    resumed = train(tiny(experiment="split"))
    assert resumed.status == "ok" and resumed.summary["steps_done"] == 20
    assert without_timing(resumed.metrics) == without_timing(full.metrics)
    on_disk = rr.read_metrics(resumed.run_dir / rr.METRICS_FILE)
    assert [r["step"] for r in on_disk] == [4, 8, 12, 16, 20]  # no duplicate rows
    assert without_timing(on_disk) == without_timing(full.metrics)

    row = on_disk[-1]
    assert all(math.isfinite(row[k]) for k in ("train_loss", "val_loss", "val_ppl", "val_bpb", "tokens_per_s",
                                               "drop_rate", "load_cv", "gate_entropy"))
    assert len(row["layer_stats"]["drop_rate"]) == 2 and len(row["expert_load"][0]) == 4
    assert sum(row["expert_load"][0]) == pytest.approx(1.0)
    summary = json.loads((resumed.run_dir / rr.SUMMARY_FILE).read_text())
    assert summary["best_val_loss"] == min(r["val_loss"] for r in on_disk)
    assert summary["mfu"] is None and summary["median_tokens_per_s"] > 0  # CPU: no peak to divide by
    config = json.loads((resumed.run_dir / rr.CONFIG_FILE).read_text())
    assert {"config", "seed", "git", "env", "data"} <= set(config) and config["env"]["torch"]
    assert not [p for p in resumed.run_dir.iterdir() if ".tmp" in p.name]

    before = snapshot(resumed.run_dir)  # finished: not retrained, nothing rewritten
    assert train(tiny(experiment="split")).summary == resumed.summary
    assert snapshot(resumed.run_dir) == before
    with pytest.raises(ValueError, match=r"different config \(lr: 0.003 -> 0.001\)"):
        train(tiny(experiment="split", lr=1e-3))
    assert snapshot(resumed.run_dir) == before


def test_expert_choice_reports_every_eval_rule(tiny):
    result = train(tiny(router="expert_choice", top_k=2, steps=4, eval_interval=4, ec_group="sequence"))
    row = result.metrics[-1]
    losses = [row[f"val_loss{suffix}"] for suffix in ("", "_noncausal", "_prefix")]
    assert all(map(math.isfinite, losses)) and len(set(losses)) == 3
    assert "val_bpb_noncausal" in result.summary["final"] and "val_bpb_prefix" in result.summary["final"]
    assert 0 <= row["token_expert_mi"] <= math.log(4 / 2) + 1e-9  # E=4 experts, k=2


def test_routing_metrics_and_hash_controls_reach_the_record(tiny):
    """Confidence per layer over training, token-expert MI per layer at evaluation; the hash table
    follows the run's seed and, balanced by frequency, the training split's token counts."""
    learned = train(tiny(steps=4, eval_interval=4)).metrics[-1]
    assert 0.25 <= learned["p1_mean"] <= 1 and len(learned["layer_stats"]["p1_over_half"]) == 2
    assert len(learned["eval_layer_stats"]["token_expert_mi"]) == 2 and learned["token_expert_mi"] >= 0
    result = train(tiny(router="hash", hash_balance="frequency", seed=3, steps=4, eval_interval=4, run="h"))
    assert result.metrics[-1]["p1_mean"] is None  # no router probabilities: NaN, stored as null
    record = json.loads((result.run_dir / rr.CONFIG_FILE).read_text())
    assert record["config"]["hash_seed"] is None and record["model"]["hash_seed"] == 3
    assert TrainConfig(router="hash", seed=3, hash_seed=7).moe_config().hash_seed == 7
    data = load_data(tiny().data_config())
    counts = tuple(np.bincount(np.asarray(data.train_T), minlength=data.vocab_size).tolist())
    model = TinyMoEModel(TrainConfig(**{**TINY, "router": "hash", "hash_balance": "frequency", "seed": 3})
                         .model_config(data.vocab_size), data.train_token_counts())
    table = hash_table(data.vocab_size, 4, 1, 3, counts)
    assert torch.equal(model.moe_layers()[0].router.hash_table_VK, torch.as_tensor(table))


@pytest.mark.parametrize("overrides", [{"router": "hash"}, {"ffn": "dense"}, {"stop_after": 1}])
def test_charts_render_to_png(tiny, overrides):
    # hash has no gate entropy (null); dense no routing at all; stopped at step 1, no evaluation yet
    result = train(tiny(steps=4, **overrides))
    assert train_mod.chart_png(train_mod.plot_run(result), scale=1).startswith(b"\x89PNG")


def test_divergence_stops_and_keeps_records(tiny, monkeypatch):
    real_loss, calls = loop.training_loss, []

    def nan_from_step_6(out):
        calls.append(1)
        return real_loss(out) * (float("nan") if len(calls) >= 6 else 1.0)

    monkeypatch.setattr(loop, "training_loss", nan_from_step_6)
    result = train(tiny(checkpoint_interval_s=0))  # a checkpoint at every evaluation
    assert result.status == "diverged" and "non-finite training loss at step 6" in result.summary["error"]
    assert [r["step"] for r in rr.read_metrics(result.run_dir / rr.METRICS_FILE)] == [4]
    assert rr.load_checkpoint(result.run_dir / rr.CHECKPOINT_FILE)["step"] == 4  # the last good state
    assert json.loads((result.run_dir / rr.SUMMARY_FILE).read_text())["status"] == "diverged"
    assert train(tiny()).status == "diverged" and len(calls) == 6  # final: not trained again


@pytest.mark.parametrize("interval_s, stop_after, written", [(300.0, None, [12]), (300.0, 5, [5]),
                                                             (0.0, None, [4, 8, 12]), (0.0, 6, [4, 6])])
def test_checkpoints_are_written_when_due_and_when_the_run_stops(tiny, monkeypatch, interval_s, stop_after, written):
    steps = []
    monkeypatch.setattr(rr, "save_checkpoint", lambda path, state: steps.append(state["step"]))
    train(tiny(steps=12, eval_interval=4, checkpoint_interval_s=interval_s, stop_after=stop_after))
    assert steps == written


def test_failure_is_recorded_reraised_then_retried(tiny, monkeypatch):
    def boom(out):
        raise RuntimeError("boom in the loss")

    monkeypatch.setattr(loop, "training_loss", boom)
    with pytest.raises(RuntimeError, match="boom"):
        train(tiny(steps=4))
    summary = json.loads((tiny().run_dir / rr.SUMMARY_FILE).read_text())
    assert summary["status"] == "failed" and "RuntimeError: boom in the loss" in summary["error"]
    assert "Traceback" in summary["traceback"]
    monkeypatch.undo()
    assert train(tiny(steps=4)).status == "ok"  # a failed run is not final


# -- DDP ----------------------------------------------------------------------------------------------
def test_ddp_two_gloo_ranks_write_records_once(tmp_path, cache_dir):
    sets = {**TINY, "steps": 8, "eval_interval": 4, "out_dir": str(tmp_path), "cache_dir": cache_dir,
            "experiment": "ddp", "device": "cpu", "capacity_factor": None}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "moe_core.train"]
    for key, value in sets.items():
        cmd += ["--set", f"{key}={value if isinstance(value, str) else json.dumps(value)}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "ddp" / "r"
    summary = json.loads((run_dir / rr.SUMMARY_FILE).read_text())
    assert summary["status"] == "ok" and summary["world_size"] == 2
    assert math.isfinite(summary["final"]["val_loss"]) and summary["median_tokens_per_s"] > 0
    rows = rr.read_metrics(run_dir / rr.METRICS_FILE)
    assert [r["step"] for r in rows] == [4, 8] and all(math.isfinite(r["load_cv"]) for r in rows)
    assert proc.stdout.count('"status": "ok"') == 1  # rank 0 alone prints and writes
    assert sorted(p.name for p in run_dir.iterdir()) == sorted(
        [rr.CHECKPOINT_FILE, rr.CONFIG_FILE, rr.METRICS_FILE, rr.SUMMARY_FILE])
    # rank r trains on its slice of the global batch: dropless, only the per-rank aux loss differs
    single = train(TrainConfig(**{**sets, "experiment": "single"}))
    assert summary["final"]["val_loss"] == pytest.approx(single.summary["final"]["val_loss"], rel=1e-3)


# -- notebook -----------------------------------------------------------------------------------------
def test_notebook_parameter_cell_is_the_config():
    """The cell's names and values are TrainConfig's fields and defaults, in order, with their types;
    ``make notebook-params`` writes it (so the text is the generated one too)."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    cell = parameter_cell_of(nb)
    assigned = [(node.targets[0].id, ast.literal_eval(node.value)) for node in ast.parse(cell.source).body]
    defaults = [(f.name, f.default) for f in fields(TrainConfig)]
    assert [(name, type(value), value) for name, value in assigned] == [(n, type(v), v) for n, v in defaults]
    assert TrainConfig(**dict(assigned)) == TrainConfig()
    assert cell.source == parameter_cell(), "run `make notebook-params`"
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code")  # committed cleared


def test_notebook_helper_rewrites_only_the_parameter_cell(tmp_path):
    path = tmp_path / "train.ipynb"
    nb = nbformat.read(NOTEBOOK, as_version=4)
    parameter_cell_of(nb).source = "lr = 1.0"
    nbformat.write(nb, path)
    assert notebook_main([str(path)]) == 0
    assert path.read_bytes() == NOTEBOOK.read_bytes()


def test_papermill_runs_the_notebook_with_overrides(tmp_path, cache_dir):
    papermill = pytest.importorskip("papermill")
    params = {"router": "softk", "top_k": 2, "capacity_factor": 1.0, "steps": 4, "eval_interval": 2, "dim": 32,
              "hidden": 32, "seq_len": 32, "batch_size": 8, "eval_windows": 8, "warmup": 1, "progress": False,
              "experiment": "nb", "run": "softk_cf1", "out_dir": str(tmp_path / "runs"), "cache_dir": cache_dir}
    out = tmp_path / "executed.ipynb"
    papermill.execute_notebook(str(NOTEBOOK), str(out), parameters=params, kernel_name="python3",
                               cwd=str(ROOT), progress_bar=False)
    summary = json.loads((tmp_path / "runs/nb/softk_cf1" / rr.SUMMARY_FILE).read_text())
    assert summary["status"] == "ok" and summary["steps_done"] == 4
    outputs = [o for c in nbformat.read(out, as_version=4).cells for o in c.get("outputs", [])]
    assert any("image/png" in o.get("data", {}) for o in outputs)


def test_git_commit_prefers_the_stated_commit(monkeypatch, tmp_path):
    """A copied tree may carry a stale .git: MOE_CORE_COMMIT, when set, is what the records say."""
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "stale"], check=True)
    stale = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    monkeypatch.delenv("MOE_CORE_COMMIT", raising=False)
    assert rr.git_commit(tmp_path) == {"commit": stale, "dirty": False}
    monkeypatch.setenv("MOE_CORE_COMMIT", "abc1234")
    assert rr.git_commit(tmp_path) == {"commit": "abc1234", "dirty": None, "source": "MOE_CORE_COMMIT"}
