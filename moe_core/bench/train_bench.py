"""The train bench: tokens/s, ms/step and MFU of the real trainer (moe_core.train) per cell of
TrainBenchConfig's grid (or per configuration of a sweep's params file), each cell trained
``solo_repeats`` times in a temporary directory, alone on the device (only the bench rows are kept).

These are the solo timings the analysis prefers to a sweep's own tokens/s (runs that shared a GPU
do not compare): each row carries the configuration's THROUGHPUT_FIELDS to be matched by."""
from __future__ import annotations

import statistics
import tempfile
from dataclasses import asdict, replace
from pathlib import Path

import pandas as pd

from ..train import train
from ..train.measure import throughput_key
from .configs import TrainBenchConfig
from .report import record


def run_train(cfg: TrainBenchConfig, out_dir: str | Path | None = None) -> pd.DataFrame:
    """One row per cell: tokens/s the median over the repeats (each the trainer's median over its
    intervals), with their coefficient of variation. Appends to ``out_dir``/train.jsonl when given."""
    rows, peak = [], {"peak_flops": None, "peak_flops_source": None}
    with tempfile.TemporaryDirectory() as runs_dir:
        for tcfg in cfg.train_configs(runs_dir):
            summaries = [train(replace(tcfg, run=f"{tcfg.run}_r{i}")).summary for i in range(cfg.solo_repeats)]
            last = summaries[-1]
            speeds = [s["median_tokens_per_s"] for s in summaries if s["status"] == "ok"]
            tok_s = statistics.median(speeds) if speeds else None
            cv = statistics.pstdev(speeds) / statistics.mean(speeds) if len(speeds) > 1 else None
            peak = {k: last[k] for k in peak}
            rows.append({**throughput_key(asdict(tcfg)), "name": tcfg.run, "status": last["status"],
                         "tokens_per_s": tok_s, "tokens_per_s_cv": cv, "tokens_per_s_repeats": speeds,
                         "ms_per_step": tcfg.batch_size * tcfg.seq_len / tok_s * 1e3 if tok_s else None,
                         "mfu": tok_s * last["train_flops_per_token"] / peak["peak_flops"]
                         if tok_s and peak["peak_flops"] else None,
                         "train_flops_per_token": last["train_flops_per_token"]})
    return record(cfg, rows, out_dir, peak)
