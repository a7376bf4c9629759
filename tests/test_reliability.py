"""Reliability: one writer per run directory, resume only into the same config, checkpoints that
cannot run code, records validated on read (named in one line, restored from the checkpoint or
retrained, never reported finished), settled runs the sweep leaves alone, inputs rejected before
work, and the MoE layer's API edges (dtypes, a NaN token, bad hash ids, 0-d input)."""
import json
import math
import os
import pickle
import platform
import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from moe_core import MoEConfig, MoEFeedForward, bench, sweep
from moe_core import records as rr
from moe_core import train as train_mod
from moe_core.config import BACKENDS, ModelConfig
from moe_core.train import TrainConfig, loop, train

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(dim=32, layers=2, heads=2, hidden=32, seq_len=32, batch_size=4, eval_windows=4, steps=8, warmup=2,
            eval_interval=4, log_interval=2, progress=False, synthetic_chars=60_000, experiment="rel", run="r")
HOLD = ("import pathlib, sys, time\nfrom moe_core import records as rr\n"
        "with rr.claim_run(pathlib.Path(sys.argv[1])):\n    print('held', flush=True)\n    time.sleep(120)\n")


@pytest.fixture
def tiny(tmp_path, cache_dir):
    def make(**overrides) -> TrainConfig:
        return TrainConfig(**{**TINY, "out_dir": str(tmp_path / "runs"), "cache_dir": cache_dir, **overrides})
    return make


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, cache_dir):
    """A finished run's directory (records and checkpoint), trained once; tests damage copies of it."""
    out = tmp_path_factory.mktemp("finished")
    result = train(TrainConfig(**{**TINY, "out_dir": str(out), "cache_dir": cache_dir}))
    assert result.status == "ok"
    return result.run_dir


@pytest.fixture
def finished(finished_run, tiny):
    run_dir = tiny().run_dir
    shutil.copytree(finished_run, run_dir)
    return run_dir


def one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    return lines[0]


def cli_args(cfg: TrainConfig) -> list[str]:
    """--set key=value for every field (str fields take their text as it is)."""
    return [arg for key, value in asdict(cfg).items()
            for arg in ("--set", f"{key}={value if isinstance(value, str) else json.dumps(value)}")]


# -- one writer per run ------------------------------------------------------------------------------
def test_second_writer_fails_naming_the_holder_and_a_dead_holders_lock_is_taken_over(tiny, capsys):
    cfg = tiny()
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(cfg.run_dir)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(rr.RunLocked) as err:
            train(cfg)
        message = one_line(str(err.value))
        assert f"pid {holder.pid} on host {platform.node()}, since 20" in message and str(cfg.run_dir) in message
        with pytest.raises(SystemExit) as exit_info:
            train_mod.main(cli_args(cfg))
        assert exit_info.value.code == 2 and f"pid {holder.pid}" in one_line(capsys.readouterr().err)
        assert sorted(p.name for p in cfg.run_dir.iterdir()) == [rr.LOCK_FILE]  # nothing written
    finally:
        holder.kill()
        holder.wait()
    assert (cfg.run_dir / rr.LOCK_FILE).exists()  # left by the killed holder; its flock died with it
    assert train(cfg).status == "ok"
    assert not (cfg.run_dir / rr.LOCK_FILE).exists()


def test_a_claim_is_shared_with_a_child_that_holds_its_token(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    with rr.claim_run(run_dir) as token:
        monkeypatch.setenv(rr.CLAIM_ENV, token)
        with rr.claim_run(run_dir) as shared:
            assert shared == token
        monkeypatch.setenv(rr.CLAIM_ENV, "someone else's")
        with pytest.raises(rr.RunLocked, match=f"pid {os.getpid()}"):
            with rr.claim_run(run_dir):
                pass
    with rr.claim_run(run_dir):  # released
        pass


def test_leftover_temporary_files_of_killed_writers_are_removed_on_claim(tiny):
    cfg = tiny(steps=4)
    cfg.run_dir.mkdir(parents=True)
    (cfg.run_dir / ".checkpoint.pt.tmp4242").write_bytes(b"half a checkpoint")
    assert train(cfg).status == "ok"
    assert not [p for p in cfg.run_dir.iterdir() if ".tmp" in p.name]


def _sweep_params(tmp_path, runs, experiment="rel") -> Path:
    params = tmp_path / "params.yaml"
    defaults = {k: v for k, v in TINY.items() if k not in ("experiment", "run")}
    params.write_text(yaml.safe_dump({"experiment": experiment, "notebook": str(ROOT / "notebooks/train.ipynb"),
                                      "defaults": defaults, "runs": runs}))
    return params


def _run_sweep(tmp_path, params, *extra) -> int:
    return sweep.main([str(params), "--runs-dir", str(tmp_path / "runs"), "--executed-dir",
                       str(tmp_path / "executed"), *extra])


def test_sweep_reports_a_run_another_process_holds_as_locked_and_leaves_it(tmp_path, capsys):
    params = _sweep_params(tmp_path, [{"name": "r"}])
    with rr.claim_run(tmp_path / "runs/rel/r"):
        assert _run_sweep(tmp_path, params) == 1
    out = capsys.readouterr().out
    assert "locked" in out and f"pid {os.getpid()}" in out
    assert not (tmp_path / "executed").exists()


# -- resume --------------------------------------------------------------------------------------------
def test_resume_refuses_a_checkpoint_of_another_config_and_restores_a_lost_config_json(tiny):
    part = train(tiny(stop_after=4))
    (part.run_dir / rr.CONFIG_FILE).unlink()
    with pytest.raises(ValueError) as err:
        train(tiny(lr=0.01, seed=1))
    message = one_line(str(err.value))
    assert message.startswith(f"{part.run_dir / rr.CHECKPOINT_FILE} holds a run with a different config")
    assert "(lr: 0.003 -> 0.01; seed: 0 -> 1)" in message
    assert rr.read_json(part.run_dir / rr.SUMMARY_FILE)["status"] == "stopped"  # nothing overwritten
    assert not (part.run_dir / rr.CONFIG_FILE).exists()
    done = train(tiny())
    assert done.status == "ok" and done.summary["steps_done"] == 8
    assert rr.read_json(done.run_dir / rr.CONFIG_FILE)["config"] == asdict(tiny())


# -- checkpoints: weights only -------------------------------------------------------------------------
class Payload:
    """Unpickling this calls os.mkdir(marker): what a hostile checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_a_training_checkpoint_loads_with_plain_weights_only(tiny):
    path = train(tiny(stop_after=4)).run_dir / rr.CHECKPOINT_FILE
    state = torch.load(path, map_location="cpu", weights_only=True)  # no allow-list
    assert state["step"] == 4 and isinstance(state["rng"]["numpy"][1], list)


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_a_pickle_payload_is_refused_by_every_loader_without_running(tiny, tmp_path, writer, capsys):
    marker = tmp_path / "payload_ran"
    cfg = tiny(router="softk", top_k=2)
    state = {"model": {}, "config": cfg.identity(), "step": 1, "payload": Payload(marker)}
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        torch.save(state, f) if writer == "torch.save" else pickle.dump(state, f)
    for load in (rr.load_checkpoint, bench.read_checkpoint):
        with pytest.raises(ValueError) as err:
            load(path)
        assert one_line(str(err.value)).startswith(f"{path}: ")
    capsys.readouterr()
    assert bench.main(["capacity", "--small", "--device", "cpu", "--out", str(tmp_path / "bench"), "--checkpoint",
                       str(path), "--set", "sources=[checkpoint]"]) == 2  # the capacity bench's checkpoint source
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"error: {path}: " in err
    cfg.run_dir.mkdir(parents=True)
    shutil.copy(path, cfg.run_dir / rr.CHECKPOINT_FILE)
    if writer == "torch.save":  # a whole archive holding a refused object: the run refuses it
        with pytest.raises(rr.UnsafeCheckpoint, match="which is refused; remove it to train the run from step 0"):
            train(cfg)
    else:  # not a torch archive at all: removed as corrupt, trained from step 0
        assert train(cfg).status == "ok"
    assert not marker.exists()


def test_an_old_checkpoint_with_a_numpy_rng_array_is_refused_in_one_line(tiny):
    path = train(tiny(stop_after=4)).run_dir / rr.CHECKPOINT_FILE
    state = torch.load(path, weights_only=True)
    state["rng"]["numpy"] = np.random.get_state()
    torch.save(state, path)
    with pytest.raises(rr.UnsafeCheckpoint) as err:
        train(tiny())
    assert one_line(str(err.value)).startswith(f"{path}: not loadable with torch.load(weights_only=True): it holds")
    assert "numpy" in str(err.value) and path.exists()


# -- records validated on read -------------------------------------------------------------------------
@pytest.mark.parametrize("name, content, message", [
    ("summary.json", '{"status": "o', "not valid JSON (Unterminated string"),
    ("summary.json", "[1]", "expected a JSON object"),
    ("config.json", b"\xff\xfe{}", "not UTF-8 text (byte 0)"),
    ("metrics.jsonl", '{"step": 4}\n{"step": 8, "val_lo', "line 2 is not valid JSON"),
])
def test_an_unreadable_record_is_named_in_one_line(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    read = rr.read_metrics if name.endswith(".jsonl") else rr.read_json
    with pytest.raises(rr.RecordError) as err:
        read(path)
    assert one_line(str(err.value)).startswith(f"{path}: ") and message in str(err.value)


def _cut(path: Path, keep: float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


@pytest.mark.parametrize("damage", [
    lambda d: (d / rr.METRICS_FILE).unlink(),
    lambda d: _cut(d / rr.METRICS_FILE, 0.6),  # mid-row
    lambda d: (d / rr.METRICS_FILE).write_text((d / rr.METRICS_FILE).read_text().splitlines(True)[0]),  # whole rows
], ids=["deleted", "cut-mid-row", "last-row-lost"])
def test_a_finished_runs_bad_metrics_are_restored_from_its_checkpoint(finished, damage, tiny, capsys):
    whole = (finished / rr.METRICS_FILE).read_bytes()
    damage(finished)
    run = sweep.Run("r", {**asdict(tiny()), "experiment": "rel"})
    row = sweep.settled(run, finished.parents[1])
    assert row["status"] == "ok (skipped)" and "metrics.jsonl" in row["error"] and "rewritten from" in row["error"]
    assert (finished / rr.METRICS_FILE).read_bytes() == whole
    damage(finished)
    assert train(tiny()).metrics == [json.loads(line) for line in whole.decode().splitlines()]
    assert "rewritten from" in capsys.readouterr().err
    assert (finished / rr.METRICS_FILE).read_bytes() == whole


@pytest.mark.parametrize("damage, named", [
    (lambda d: (_cut(d / rr.METRICS_FILE, 0.6), (d / rr.CHECKPOINT_FILE).unlink()), rr.METRICS_FILE),
    (lambda d: _cut(d / rr.CHECKPOINT_FILE, 0.5), rr.CHECKPOINT_FILE),
    (lambda d: _cut(d / rr.SUMMARY_FILE, 0.5), rr.SUMMARY_FILE),
    (lambda d: _cut(d / rr.CONFIG_FILE, 0.5), rr.CONFIG_FILE),
    (lambda d: (d / rr.CONFIG_FILE).unlink(), rr.CONFIG_FILE),
    (lambda d: (d / rr.SUMMARY_FILE).write_text(json.dumps({**rr.read_json(d / rr.SUMMARY_FILE), "steps_done": 4})),
     rr.SUMMARY_FILE),
], ids=["metrics-without-checkpoint", "checkpoint-cut", "summary-cut", "config-cut", "config-deleted",
        "summary-of-a-shorter-run"])
def test_a_finished_run_with_a_bad_record_is_never_skipped_but_trained_again(finished, damage, named, tiny, capsys):
    damage(finished)
    status, note = rr.check_run(finished)
    assert status is None and one_line(note).startswith(str(finished / named))
    assert sweep.settled(sweep.Run("r", {**asdict(tiny()), "experiment": "rel"}), finished.parents[1]) is None
    result = train(tiny())
    assert result.status == "ok" and [r["step"] for r in result.metrics] == [4, 8]
    assert str(finished / named) in capsys.readouterr().err
    assert rr.check_run(finished, repair=False) == ("ok", None)
    assert rr.load_checkpoint(finished / rr.CHECKPOINT_FILE)["step"] == 8


def test_a_finished_run_whose_records_but_checkpoint_were_lost_gets_them_back_from_the_checkpoint(finished, tiny):
    whole = (finished / rr.METRICS_FILE).read_bytes()
    for name in (rr.METRICS_FILE, rr.SUMMARY_FILE, rr.CONFIG_FILE):
        (finished / name).unlink()
    result = train(tiny())  # resumes at the last step: no training, the records rewritten
    assert result.status == "ok" and (finished / rr.METRICS_FILE).read_bytes() == whole
    assert rr.check_run(finished, repair=False) == ("ok", None)


def test_a_truncated_checkpoint_of_an_unfinished_run_starts_it_over(tiny, capsys):
    part = train(tiny(stop_after=4))
    _cut(part.run_dir / rr.CHECKPOINT_FILE, 0.5)
    result = train(tiny())
    assert "removed, training from step 0" in capsys.readouterr().err
    assert result.status == "ok" and [r["step"] for r in result.metrics] == [4, 8]


def test_every_committed_run_record_validates():
    summaries = sorted(ROOT.glob("runs/*/*/summary.json"))
    assert summaries
    for path in summaries:
        assert rr.check_run(path.parent, repair=False) == (rr.read_json(path)["status"], None), path


# -- diverged runs in a sweep --------------------------------------------------------------------------
def test_sweep_skips_a_diverged_run_keeps_its_notebook_and_shows_the_error(tmp_path, cache_dir, monkeypatch, capsys):
    params = _sweep_params(tmp_path, [{"name": "r", "cache_dir": cache_dir}])
    _, (run,) = sweep.expand(yaml.safe_load(params.read_text()))
    real_loss, calls = loop.training_loss, []

    def nan_from_step_6(out):
        calls.append(1)
        return real_loss(out) * (math.nan if len(calls) >= 6 else 1.0)

    monkeypatch.setattr(loop, "training_loss", nan_from_step_6)
    diverged = train(TrainConfig.from_dict({**run.params, "out_dir": str(tmp_path / "runs")}))
    assert diverged.status == "diverged"
    notebook = tmp_path / "executed/rel/r.ipynb"
    notebook.parent.mkdir(parents=True)
    notebook.write_text("the executed notebook that showed the divergence")
    assert _run_sweep(tmp_path, params) == 1
    out = capsys.readouterr().out
    assert "diverged (skipped)" in out and "non-finite training loss at step 6" in out
    assert notebook.read_text() == "the executed notebook that showed the divergence"
    assert sweep._run_result(run, diverged.run_dir)["error"].startswith("non-finite training loss at step 6")


# -- inputs rejected before work -----------------------------------------------------------------------
@pytest.mark.parametrize("overrides, field", [
    ({"capacity_factor": math.inf}, "capacity_factor"), ({"capacity_factor": math.nan}, "capacity_factor"),
    ({"seed": -1}, "seed"), ({"hash_seed": -1}, "hash_seed"), ({"lr": math.inf}, "lr"),
    ({"moe_every": 3, "layers": 2}, "moe_every"), ({"aux_loss_coef": math.inf}, "aux_loss_coef"),
])
def test_more_bad_values_name_their_field(overrides, field):
    with pytest.raises(ValueError, match=rf"^TrainConfig\.{field}: "):
        TrainConfig(**overrides)


def test_moe_every_beyond_the_layers_is_fine_for_the_dense_model():
    assert not any(ModelConfig(dim=32, heads=2, layers=2, moe_every=3, ffn="dense", moe=MoEConfig(dim=32))
                   .is_moe_layer(i) for i in range(2))


def test_a_name_field_takes_an_int_as_its_text():
    """papermill's ``-p run 001`` passes the int 1 (its CLI reads numbers as numbers)."""
    cfg = TrainConfig.from_namespace({"run": 1, "experiment": 7}, ())
    assert (cfg.run, cfg.experiment) == ("1", "7") and cfg.run_dir.parts[-2:] == ("7", "1")
    with pytest.raises(ValueError, match="TrainConfig.run: expected str"):
        TrainConfig(run=True)


def test_a_name_template_naming_no_key_is_one_line():
    spec = {"experiment": "x", "grid": {"name": "{routr}_s{seed}", "router": ["softk"], "seed": [0]}}
    with pytest.raises(ValueError) as err:
        sweep.expand(spec, source="p.yaml")
    assert one_line(str(err.value)) == ("p.yaml: name template '{routr}_s{seed}': {routr} is not a key of its "
                                        "run (keys: router, seed)")


def test_only_matching_no_run_is_an_error(tmp_path, capsys):
    params = _sweep_params(tmp_path, [{"name": "r"}])
    with pytest.raises(SystemExit) as exit_info:
        _run_sweep(tmp_path, params, "--only", "nothing*")
    assert exit_info.value.code == 2
    assert "--only 'nothing*': matches none of the 1 runs" in one_line(capsys.readouterr().err)


@pytest.mark.parametrize("content, message", [
    (None, "no such config file"), ("steps: [1\n", "not valid YAML"), (b"lr: 0.1 \xe9\n", "not UTF-8 text (byte 8)"),
    ("- 1\n", "expected a flat mapping"),
])
def test_train_config_file_errors_name_the_file(tmp_path, capsys, content, message):
    path = tmp_path / "tiny.yaml"
    if content is not None:
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(SystemExit) as exit_info:
        train_mod.main(["--config", str(path)])
    assert exit_info.value.code == 2
    line = one_line(capsys.readouterr().err)
    assert f"{path}: " in line and message in line


@pytest.mark.parametrize("content, message", [
    ("experiment: [x\n", "not valid YAML"), (b"experiment: caf\xe9\n", "not UTF-8 text (byte 15)"),
])
def test_sweep_params_file_errors_name_the_file(tmp_path, capsys, content, message):
    path = tmp_path / "params.yaml"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(SystemExit) as exit_info:
        _run_sweep(tmp_path, path)
    assert exit_info.value.code == 2
    line = one_line(capsys.readouterr().err)
    assert f"{path}: " in line and message in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_asked_for_without_cuda_is_one_line(tiny, capsys):
    cfg = tiny(device="cuda")
    with pytest.raises(SystemExit) as exit_info:
        train_mod.main(cli_args(cfg))
    assert exit_info.value.code == 2
    assert "TrainConfig.device: 'cuda' asked for, but this torch" in one_line(capsys.readouterr().err)


# -- the MoE layer's API edges -------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype, tol", [(torch.float16, 3e-2), (torch.bfloat16, 1e-1), (torch.float64, 1e-5)])
def test_a_float32_layer_outside_autocast_computes_in_the_input_dtype(backend, dtype, tol):
    torch.manual_seed(0)
    layer = MoEFeedForward(MoEConfig(dim=16, hidden=32, num_experts=4, top_k=2, backend=backend))
    x = torch.randn(3, 5, 16).to(dtype)
    y, stats = layer(x)
    reference, _ = layer(x.float())
    assert y.dtype == dtype and y.shape == x.shape and torch.isfinite(stats.aux_loss)
    assert torch.allclose(y.float(), reference, atol=tol, rtol=tol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("capacity_factor", [None, 0.5])
def test_one_nan_token_stays_its_own(backend, capacity_factor):
    torch.manual_seed(0)
    layer = MoEFeedForward(MoEConfig(dim=16, hidden=16, num_experts=4, top_k=2, backend=backend,
                                     capacity_factor=capacity_factor))
    x = torch.randn(12, 16)
    clean, _ = layer(x)
    x[3] = math.nan
    y, _ = layer(x)
    others = [t for t in range(12) if t != 3]
    assert torch.isfinite(y[others]).all()
    if capacity_factor is None:  # dropless: token 3 is computed, and the others' routing does not depend on it
        assert torch.isnan(y[3]).all() and torch.allclose(y[others], clean[others], atol=1e-6)


@pytest.mark.parametrize("bad_id", [-1, 10])
def test_hash_token_ids_outside_the_vocabulary_are_one_line(bad_id):
    layer = MoEFeedForward(MoEConfig(dim=8, hidden=8, num_experts=4, top_k=1, router="hash", hash_vocab_size=10))
    with pytest.raises(ValueError) as err:
        layer(torch.randn(3, 8), token_ids=torch.tensor([0, 9, bad_id]))
    assert one_line(str(err.value)) == f"token_ids: must be in [0, 10) (hash_vocab_size), got ids in " \
                                      f"[{min(0, bad_id)}, {max(9, bad_id)}]"


def test_a_0d_input_is_one_line():
    with pytest.raises(ValueError, match=r"^x: expected a tensor \[\.\.\., 8\], got a 0-d tensor$"):
        MoEFeedForward(MoEConfig(dim=8, hidden=8, num_experts=2, top_k=1))(torch.tensor(1.0))


# -- CPU threads -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("env, cores, expected", [({}, 4, 3), ({}, 2, 1), ({"LOCAL_WORLD_SIZE": "2"}, 4, 1),
                                                  ({"OMP_NUM_THREADS": "2"}, 8, None)])
def test_a_cpu_run_leaves_a_core_to_the_rest_and_restores_the_threads(tiny, monkeypatch, env, cores, expected):
    """Two intra-op threads on a busy 2-core box (a notebook kernel beside it) trained 4-5x slower
    than one; an OMP_NUM_THREADS the user set stands."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)))
    before, seen, real_loss = torch.get_num_threads(), [], loop.training_loss
    monkeypatch.setattr(loop, "training_loss", lambda out: seen.append(torch.get_num_threads()) or real_loss(out))
    assert train(tiny(steps=2, eval_interval=2)).status == "ok"
    assert set(seen) == {expected or before} and torch.get_num_threads() == before
