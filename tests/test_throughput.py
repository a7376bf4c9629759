"""Sweep throughput: the time breakdown of a run, kept kernels that change no record, the matmul peak
cached per GPU model, the sweep bench, the train bench's spread and the analysis's solo tokens/s.
The CUDA tests at the end run on a GPU machine only (compiled evaluation, compiled runs in one process)."""
import json
import math
import os
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from moe_core import bench, flops, sweep, workers
from moe_core import records as rr
from moe_core.analysis import load
from moe_core.train import TrainConfig, train
from moe_core.train import measure as ms

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(dim=32, layers=2, heads=2, hidden=32, seq_len=32, batch_size=8, eval_windows=8, steps=8, warmup=2,
            eval_interval=4, progress=False, run="r")
# What may differ between two trainings of one config: how long things took, and memory
TIMING = ("tokens_per_s", "median_tokens_per_s", "mfu", "peak_mem_bytes", "wall_time_s", "time_s", "time_start_source")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


def untimed(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in TIMING}


# -- the time breakdown -----------------------------------------------------------------------------
def test_phases_sum_to_the_wall_time_from_the_sweeps_start(tmp_path, cache_dir, monkeypatch):
    monkeypatch.setenv(ms.RUN_T0_ENV, repr(time.time() - 0.5))  # the sweep began this run 0.5 s ago
    t0 = time.time()
    result = train(TrainConfig(**TINY, out_dir=str(tmp_path), cache_dir=cache_dir))
    outside = time.time() - t0 + 0.5
    summary = json.loads((result.run_dir / rr.SUMMARY_FILE).read_text())
    parts = summary["time_s"]
    assert set(parts) == set(ms.PHASES) and all(v >= 0 for v in parts.values())
    assert sum(parts.values()) == pytest.approx(summary["wall_time_s"], rel=0.01)
    assert summary["wall_time_s"] == pytest.approx(outside, rel=0.05)  # the clock agrees with one outside
    assert parts["start"] >= 0.5 and summary["time_start_source"].startswith(ms.RUN_T0_ENV)
    assert all(parts[p] > 0 for p in ("data", "build", "train", "eval", "checkpoint", "records"))
    assert parts["compile"] == 0 and summary["compile_cache"] == {"hits": 0, "misses": 0}  # eager
    assert summary["concurrency"] == 1
    assert ms.RUN_T0_ENV not in os.environ  # consumed: a later run cannot reuse it
    later = train(TrainConfig(**{**TINY, "run": "later"}, out_dir=str(tmp_path), cache_dir=cache_dir)).summary
    assert later["time_s"]["start"] == 0 and later["time_start_source"].startswith("0: not the first run")


def test_a_resumed_run_adds_up_its_sessions(tmp_path, cache_dir):
    cfg = dict(TINY, out_dir=str(tmp_path), cache_dir=cache_dir)
    first = train(TrainConfig(**cfg, stop_after=4)).summary
    final = train(TrainConfig(**cfg)).summary
    assert final["status"] == "ok"
    assert sum(final["time_s"].values()) == pytest.approx(final["wall_time_s"], rel=1e-6)
    assert final["wall_time_s"] > first["wall_time_s"]
    assert final["time_s"]["train"] > first["time_s"]["train"] and final["time_s"]["data"] > first["time_s"]["data"]


def test_process_age_is_the_time_since_the_process_started():
    psutil = pytest.importorskip("psutil")  # an independent reading, from the boot time in whole seconds
    assert ms.process_age_s() == pytest.approx(time.time() - psutil.Process().create_time(), abs=1.1)


def test_phase_clock_charges_each_second_to_one_phase(monkeypatch):
    now = iter([0.0, 1.0, 3.0, 6.0, 10.0, 15.0])  # perf_counter at each switch
    monkeypatch.setattr(ms, "_now", lambda: next(now))
    clock = ms.PhaseClock(2.0, "given")
    with clock.phase("train"):  # 1.0
        with clock.phase("eval"):  # 3.0 ... 6.0: eval pauses train
            pass
    seconds = clock.seconds()  # train 1 -> 3 and 6 -> 10, other 0 -> 1 and 10 -> 15
    assert seconds == {**dict.fromkeys(ms.PHASES, 0.0), "start": 2.0, "train": 6.0, "eval": 3.0, "other": 1.0 + 5.0}


def test_sweep_breakdown_shares_of_worker_time():
    summaries = [{"time_s": {"start": 1.0, "train": 4.0}, "compile_cache": {"hits": 2, "misses": 1}},
                 {"time_s": {"start": 1.0, "train": 2.0, "eval": 1.0}, "compile_cache": {"hits": 3, "misses": 0}},
                 {}]  # a run that left no summary counts in neither
    b = ms.sweep_breakdown(summaries, wall_s=5.0, workers=2)
    assert b["seconds"]["outside runs"] == pytest.approx(1.0) and b["train_share"] == pytest.approx(0.6)
    assert sum(b["shares"].values()) == pytest.approx(1.0) and b["runs_per_hour"] == pytest.approx(2 / 5 * 3600)
    assert b["compile_cache"] == {"hits": 5, "misses": 1}
    assert "runs/hour" in ms.format_breakdown(b) and "5 hit(s), 1 miss(es)" in ms.format_breakdown(b)


# -- the matmul peak, once per GPU model and torch version -------------------------------------------
def test_peak_is_measured_once_per_gpu_model_and_then_read_from_the_cache(tmp_path, monkeypatch):
    measured = []
    monkeypatch.setattr(flops, "_measure_peak", lambda device: measured.append(device) or 1e15)
    name = {"gpu": "NVIDIA H100 80GB HBM3"}
    monkeypatch.setattr(flops.torch.cuda, "get_device_name", lambda device: name["gpu"])
    cuda = torch.device("cuda", 0)
    flops._cuda_peak.cache_clear()
    assert flops.peak_flops(cuda, tmp_path)[0] == 1e15 and len(measured) == 1
    flops._cuda_peak.cache_clear()  # a new process: the file answers
    peak, source = flops.peak_flops(cuda, tmp_path)
    assert peak == 1e15 and len(measured) == 1 and "cached in" in source
    (stored,) = (tmp_path / flops.PEAK_CACHE).iterdir()
    assert f"torch{torch.__version__}" in stored.name and json.loads(stored.read_text())["flops"] == 1e15
    name["gpu"] = "NVIDIA H200"  # another GPU model measures its own
    flops._cuda_peak.cache_clear()
    flops.peak_flops(cuda, tmp_path)
    assert len(measured) == 2 and len(list((tmp_path / flops.PEAK_CACHE).iterdir())) == 2
    flops._cuda_peak.cache_clear()
    assert flops.peak_flops(torch.device("cpu"), tmp_path)[0] is None


def test_compile_cache_counts_tell_a_cold_cache_from_a_warm_one(tmp_path, monkeypatch):
    """The counts a run records: a graph compiled into an empty cache is a miss, the same graph
    compiled again (dynamo reset, as in a new process) from that cache a hit."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    before = ms.compile_cache_counts()

    def fn(x):
        return x * 3 + 1

    for _ in range(2):
        torch._dynamo.reset()
        torch.compile(fn)(torch.ones(4))
    after = ms.compile_cache_counts()
    assert {k: after[k] - before[k] for k in after} == {"hits": 1, "misses": 1}


# -- kept kernels ---------------------------------------------------------------------------------------
def test_jobs_keep_a_worker_on_its_configuration():
    runs = [sweep.Run(f"{r}_s{s}", {"router": r, "seed": s}) for r in ("softk", "hash") for s in (0, 1)]
    jobs = sweep.Jobs(runs)
    key_a, first = jobs.take(None)
    key_b, second = jobs.take(None)  # another worker: a configuration nobody is on
    assert (first.name, second.name) == ("softk_s0", "hash_s0")
    assert jobs.take(key_a)[1].name == "softk_s1" and jobs.take(key_b)[1].name == "hash_s1"
    assert jobs.take(key_a) is None


def test_jobs_hand_out_the_longest_runs_first():
    runs = [sweep.Run(f"b{n}_s{s}", {"steps": n, "seed": s}) for n in (400, 4800, 1600) for s in (0, 1)]
    jobs = sweep.Jobs(runs)
    order = [jobs.take(None)[1].name for _ in runs]
    assert order == ["b4800_s0", "b1600_s0", "b400_s0", "b4800_s1", "b1600_s1", "b400_s1"]


def test_kept_kernel_reset_freezes_what_survives_and_still_collects_a_runs_cycles(tmp_path):
    """A run's garbage in reference cycles is collected at the next reset, although what survived the
    reset before it was frozen out of the collector's scans."""
    kernel = workers.WorkerKernel({}, str(ROOT))
    try:
        kernel.ready(time.time())
        kernel.ready(time.time())  # a reset: the survivors so far are frozen
        run = ("import gc, sys, weakref\nclass Node: pass\na, b = Node(), Node()\na.other, b.other = b, a\n"
               "sys.modules['gc'].probe = weakref.ref(a)\nfrozen = gc.get_freeze_count()\n"
               f"open({str(tmp_path / 'frozen')!r}, 'w').write(str(frozen))\n")
        kernel._execute(run)
        kernel.ready(time.time())  # the run's names go; its cycle is garbage
        kernel._execute(f"import gc\nopen({str(tmp_path / 'alive')!r}, 'w').write(str(gc.probe() is not None))\n")
    finally:
        kernel.shutdown()
    assert int((tmp_path / "frozen").read_text()) > 1000 and (tmp_path / "alive").read_text() == "False"


def test_kept_kernel_gives_the_records_of_a_fresh_kernel_and_leaks_nothing(tmp_path, cache_dir, monkeypatch):
    """Two runs in one kept kernel; the second again in a kernel of its own. The second sets no lr,
    router or seed, so any parameter left over from the first would show in its records."""
    monkeypatch.chdir(ROOT)
    spec = {"experiment": "keep", "defaults": {**{k: v for k, v in TINY.items() if k != "run"}, "cache_dir": cache_dir},
            "runs": [{"name": "a", "router": "softk", "top_k": 2, "lr": 0.002, "seed": 1}, {"name": "b"}]}
    _, runs = sweep.expand(spec)
    kernels = []
    ready = workers.WorkerKernel.ready
    monkeypatch.setattr(workers.WorkerKernel, "ready", lambda self, *args: kernels.append(ready(self, *args)) or kernels[-1])
    notebook = ROOT / sweep.DEFAULT_NOTEBOOK
    kept, _ = sweep.run_sweep(runs, notebook, tmp_path / "kept", tmp_path / "ex_kept")
    assert kernels[0] is kernels[1]  # one kernel ran both
    fresh, breakdown = sweep.run_sweep(runs[1:], notebook, tmp_path / "fresh", tmp_path / "ex_fresh",
                                       fresh_kernel=True)
    assert [r["status"] for r in kept + fresh] == ["ok"] * 3 and breakdown["runs"] == 1
    dirs = [tmp_path / mode / "keep" / "b" for mode in ("kept", "fresh")]
    rows = [[untimed(r) for r in rr.read_metrics(d / rr.METRICS_FILE)] for d in dirs]
    summaries = [untimed(rr.read_json(d / rr.SUMMARY_FILE)) for d in dirs]
    configs = [TrainConfig(**rr.read_json(d / rr.CONFIG_FILE)["config"]).identity() for d in dirs]
    assert rows[0] == rows[1] and summaries[0] == summaries[1] and configs[0] == configs[1]
    assert (configs[0]["lr"], configs[0]["router"], configs[0]["seed"]) == (TrainConfig().lr, TrainConfig().router, 0)


# -- the sweep bench -----------------------------------------------------------------------------------------
def test_sweep_bench_small_times_a_sweep(tmp_path, cache_dir, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    small = bench.load_config("sweep", small=True, device="cpu", overrides={})
    overrides = json.dumps({**small.train_overrides, "cache_dir": cache_dir})
    rc = bench.main(["sweep", "--small", "--device", "cpu", "--out", str(tmp_path), "--runs", "2",
                     "--set", f"train_overrides={overrides}"])
    assert rc == 0 and "runs/hour" in capsys.readouterr().out
    (row,) = rr.read_metrics(tmp_path / "sweep.jsonl")
    assert [row[k] for k in ("runs", "ok_runs", "runs_per_gpu", "kernel", "gpus")] == [2, 2, 1, "reuse", "default"]
    assert row["wall_s"] > 0 and row["runs_per_hour"] == pytest.approx(2 / row["wall_s"] * 3600)
    shares = [v for k, v in row.items() if k.endswith("_share")]  # train_share is the train phase's
    assert 0 < row["train_share"] < 1 and sum(shares) == pytest.approx(1.0)
    assert row["tokens_per_s_aggregate"] > 0 and row["run_tokens_per_s_median"] > 0


@pytest.mark.parametrize("args, message", [
    (["train", "--gpus", "0"], "--gpus: only for the sweep bench"),
    (["sweep", "--runs-per-gpu", "0"], "runs_per_gpu"),
    (["sweep", "--runs", "61"], "not 61"),
    (["sweep", "--set", "kernels=[warm]"], "kernels"),
])
def test_sweep_bench_bad_arguments_fail_in_one_line(args, message, tmp_path, capsys):
    assert bench.main([*args, "--device", "cpu", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and message in err and not (tmp_path / "out").exists()


# -- the train bench: solo timings with their spread ------------------------------------------------------------
def test_train_bench_reports_the_spread_over_solo_repeats(cache_dir):
    cfg = bench.TrainBenchConfig(device="cpu", backends=["padded"])
    (row,) = bench.run_train(cfg).to_dict("records")
    assert row["status"] == "ok" and len(row["tokens_per_s_repeats"]) == cfg.solo_repeats == 3
    assert row["tokens_per_s"] == pytest.approx(pd.Series(row["tokens_per_s_repeats"]).median())
    assert row["tokens_per_s_cv"] >= 0 and row["compile_mode"] == "none" and row["dim"] == 32
    with pytest.raises(ValueError, match="solo_repeats"):
        bench.TrainBenchConfig(device="cpu", solo_repeats=2)


def test_train_bench_times_each_configuration_of_an_experiment(tmp_path):
    params = tmp_path / "exp.yaml"
    params.write_text(yaml.safe_dump({"experiment": "e", "defaults": {"steps": 400, "dim": 32, "hidden": 32},
                                      "grid": {"router": ["softk", "hash"], "top_k": 2, "seed": [0, 1, 2]}}))
    cfg = bench.TrainBenchConfig(device="cpu", experiment_params=str(params), steps=9)
    configs = cfg.train_configs("out")
    assert [(c.router, c.seed, c.steps, c.dim) for c in configs] == [("softk", 0, 9, 32), ("hash", 0, 9, 32)]
    shards = [bench.TrainBenchConfig(device="cpu", experiment_params=str(params), steps=9, shard=f"{i}/2")
              for i in range(2)]
    assert [[c.router for c in shard.train_configs("out")] for shard in shards] == [["softk"], ["hash"]]
    with pytest.raises(ValueError, match="shard: must be 'i/n'"):
        bench.TrainBenchConfig(device="cpu", shard="2/2")


# -- the analysis: tokens/s that compare -------------------------------------------------------------------------
def test_analysis_takes_solo_bench_tokens_per_s_and_drops_shared_gpu_ones():
    base = {**TrainConfig(compile=True, compile_mode="reduce-overhead").__dict__, "device_name": "H100"}
    runs = pd.DataFrame([{**base, "router": "softk", "median_tokens_per_s": 3.0e6, "concurrency": 4},
                         {**base, "router": "hash", "median_tokens_per_s": 2.0e6, "concurrency": 4},
                         {**base, "router": "top1", "top_k": 1, "median_tokens_per_s": 2.5e6, "concurrency": 1}])
    solo = ms.throughput_key({**base, "router": "softk"})
    bench_rows = pd.DataFrame([{**solo, "device_name": "H100", "status": "ok", "tokens_per_s": v}
                               for v in (3.2e6, 3.4e6, 3.3e6)]
                              + [{**solo, "device_name": "A100", "status": "ok", "tokens_per_s": 1e6}])
    out = load.solo_throughput(runs, bench_rows)
    assert out["median_tokens_per_s"].tolist()[0] == 3.3e6 and math.isnan(out["median_tokens_per_s"][1])
    assert out["median_tokens_per_s"][2] == 2.5e6 and out["run_tokens_per_s"].tolist() == [3.0e6, 2.0e6, 2.5e6]
    assert out["tokens_per_s_source"].tolist() == ["solo bench", "not comparable: shared GPU", "run"]


# -- on a GPU --------------------------------------------------------------------------------------------------
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
GPU = dict(router="softk", dim=256, layers=4, heads=4, hidden=1024, num_experts=8, top_k=2, seq_len=256, batch_size=64, steps=40,
           warmup=4, eval_interval=20, eval_windows=128, backend="grouped", compile=True,
           compile_mode="reduce-overhead", progress=False)


@cuda
def test_compiled_runs_in_one_process_repeat(tmp_path, cache_dir):
    """A, then B, then A again in one process (a kept kernel's life): A's repeat lands within seed noise
    of A (the GPU's kernels are not bitwise deterministic, so "the same" is measured against what a change
    of seed does: seeds 1 and 2 of A, trained in the same process), and it reuses the compiled code."""
    plan = [("a1", "softk", 0), ("b", "hash", 0), ("a2", "softk", 0), ("s1", "softk", 1), ("s2", "softk", 2)]
    runs = [train(TrainConfig(**{**GPU, "router": r, "seed": seed}, out_dir=str(tmp_path), cache_dir=cache_dir,
                              run=name)) for name, r, seed in plan]
    assert [r.status for r in runs] == ["ok"] * len(plan)
    final = [r.metrics[-1]["val_loss"] for r in runs]
    seed_noise = max(abs(final[3] - final[0]), abs(final[4] - final[0]))
    assert abs(final[2] - final[0]) <= seed_noise, f"repeat {final[2]:.4f} vs {final[0]:.4f}, seeds {final[3:]}"
    compile_s = [r.summary["time_s"]["compile"] for r in runs[:3]]
    assert compile_s[0] > 0 and compile_s[2] < compile_s[0]
    assert runs[0].summary["peak_flops"] > 0 and any((Path(cache_dir) / flops.PEAK_CACHE).iterdir())


@cuda
def test_compiled_evaluation_matches_eager(cache_dir):
    from moe_core.data import load_data
    from moe_core.model import TinyMoEModel
    from moe_core.train.distributed import setup_dist

    cfg = TrainConfig(**GPU, cache_dir=cache_dir)
    data, ctx = load_data(cfg.data_config()), setup_dist("cuda")
    torch.manual_seed(0)
    model = TinyMoEModel(cfg.model_config(data.vocab_size)).cuda()
    autocast = lambda: torch.autocast("cuda", dtype=torch.bfloat16)  # noqa: E731 - as the trainer's
    eager = ms.evaluate(model, data, cfg.batch_size, ctx, autocast)
    compiled = ms.evaluate(model, data, cfg.batch_size, ctx, autocast,
                           forward=torch.compile(model, mode="reduce-overhead"))
    assert compiled["val_loss"] == pytest.approx(eager["val_loss"], rel=1e-2)
