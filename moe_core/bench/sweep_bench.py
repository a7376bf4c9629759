"""The sweep bench: Experiment-A-shaped runs through the real sweep (moe_core.sweep), timed end to
end. Per cell (GPU set x runs per GPU x kernel mode, SweepBenchConfig) one row: the sweep's wall
time, runs/hour, the training share of the worker time and every phase's share (the runs' ``time_s``
summed, measure.sweep_breakdown), the training tokens per second of wall time over all runs, and
the runs' own median tokens/s. Each cell is recorded as it finishes, so a bench cut short keeps the
cells it finished.

Runs and executed notebooks go to a temporary directory; the cache dir is the one the runs name
(tokens, the matmul peak, Inductor's kernels), so only the first cell of a new machine finds it cold
(``cache_warm`` says whether Inductor's cache existed when the cell began; ``cache_hits`` and
``cache_misses``, summed over the runs, whether it held this cell's graphs)."""
from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

import pandas as pd
import yaml

from .. import records as rr
from ..sweep import DEFAULT_NOTEBOOK, inductor_cache, run_sweep
from ..train import TrainConfig
from ..train.measure import format_breakdown
from .configs import SweepBenchConfig, repo_path
from .report import record


def _throughput(runs: list, runs_dir: Path, wall_s: float) -> dict:
    """Training tokens per second of sweep wall time (all runs), and the runs' median of their own tokens/s."""
    tokens, own = 0, []
    for run in runs:
        summary = rr.read_json(runs_dir / run.params["experiment"] / run.name / rr.SUMMARY_FILE) or {}
        cfg = TrainConfig.from_dict(run.params)
        tokens += (summary.get("steps_done") or 0) * cfg.batch_size * cfg.seq_len
        own += [summary["median_tokens_per_s"]] if summary.get("median_tokens_per_s") else []
    return {"tokens_per_s_aggregate": tokens / max(wall_s, 1e-9),
            "run_tokens_per_s_median": statistics.median(own) if own else None}


def run_sweep_bench(cfg: SweepBenchConfig, out_dir: str | Path | None = None) -> pd.DataFrame:
    """One row per cell; appended to ``out_dir``/sweep.jsonl as each cell finishes when given."""
    runs = cfg.sweep_runs()
    notebook = repo_path(yaml.safe_load(repo_path(cfg.experiment_params).read_text()).get("notebook", DEFAULT_NOTEBOOK))
    inductor = inductor_cache(TrainConfig.from_dict(runs[0].params).cache_dir)
    frames = []
    for gpus in cfg.gpu_sets():
        for per_gpu in cfg.runs_per_gpu:
            for kernel in cfg.kernels:
                label = ",".join(map(str, gpus)) or "default"
                cache_warm = inductor.is_dir() and any(inductor.iterdir())
                with tempfile.TemporaryDirectory() as tmp:
                    runs_dir = Path(tmp, "runs")
                    results, breakdown = run_sweep(runs, notebook, runs_dir, Path(tmp, "executed"),
                                                   [str(g) for g in gpus], per_gpu, kernel == "fresh",
                                                   desc=f"sweep bench: gpus {label}, {per_gpu}/gpu, {kernel}")
                    speed = _throughput(runs, runs_dir, breakdown["wall_s"])
                print(format_breakdown(breakdown))
                row = {"gpus": label, "n_gpus": max(1, len(gpus)), "runs_per_gpu": per_gpu, "kernel": kernel,
                       "runs": len(runs), "ok_runs": sum(r["status"] == "ok" for r in results),
                       "cache_warm": cache_warm, "wall_s": breakdown["wall_s"], "workers": breakdown["workers"],
                       "runs_per_hour": breakdown["runs_per_hour"], "train_share": breakdown["train_share"],
                       "cache_hits": breakdown["compile_cache"]["hits"],
                       "cache_misses": breakdown["compile_cache"]["misses"],
                       **{f"{name.replace(' ', '_')}_share": v for name, v in breakdown["shares"].items()}, **speed}
                frames.append(record(cfg, [row], out_dir, {"breakdown": breakdown, "results": results,
                                                            "runs": [r.name for r in runs]}))
    return pd.concat(frames, ignore_index=True)
