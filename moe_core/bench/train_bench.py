"""The train bench: tokens/s, ms/step and MFU of the real trainer (moe_core.train) per cell of
TrainBenchConfig's grid, each a short run in a temporary directory (only the bench rows are kept)."""
from __future__ import annotations

import tempfile
from pathlib import Path

import pandas as pd

from ..flops import peak_flops
from ..train import train
from .configs import TrainBenchConfig
from .report import record


def run_train(cfg: TrainBenchConfig, out_dir: str | Path | None = None) -> pd.DataFrame:
    """One row per trained cell. Appends to ``out_dir``/train.jsonl when ``out_dir`` is given."""
    rows = []
    with tempfile.TemporaryDirectory() as runs_dir:
        for tcfg in cfg.train_configs(runs_dir):
            summary = train(tcfg).summary
            tok_s = summary["median_tokens_per_s"]
            rows.append({"router": tcfg.router, "top_k": tcfg.top_k, "capacity_factor": tcfg.capacity_factor,
                         "batch_size": tcfg.batch_size, "seq_len": tcfg.seq_len, "backend": tcfg.backend,
                         "compile_mode": tcfg.compile_mode if tcfg.compile else "none", "status": summary["status"],
                         "tokens_per_s": tok_s, "ms_per_step": tcfg.batch_size * tcfg.seq_len / tok_s * 1e3,
                         "mfu": summary["mfu"], "train_flops_per_token": summary["train_flops_per_token"]})
    peak, source = peak_flops(cfg.torch_device)
    return record(cfg, rows, out_dir, {"peak_flops": peak, "peak_flops_source": source})
