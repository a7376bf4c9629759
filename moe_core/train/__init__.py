"""One training run: TrainConfig -> data + TinyMoEModel -> AdamW loop with periodic evaluation -> run records.

The same entry point serves a laptop CPU (float32), one GPU (bf16 autocast, fused AdamW, optional
torch.compile) and ``torchrun`` DDP. Under DDP ``batch_size`` is the global batch: rank r trains on
rows [r*B:(r+1)*B] of the batch a single process would draw, so the data seen does not depend on the
number of ranks, while each rank's micro-batch is its own routing group (capacity is per rank).

Records live in ``<out_dir>/<experiment>/<run>/`` (see moe_core.records). One process writes a run
at a time (a second one gets records.RunLocked). A run started again with the same config resumes
from its checkpoint; one whose valid record says ok (or diverged) is not retrained; a different
config in the same directory, or in its checkpoint, is an error.

Modules: config (TrainConfig, generated from ModelConfig, MoEConfig, DataConfig, OptimConfig and
RunConfig), distributed (process group, device, RNG), measure (interval statistics, step timing,
evaluation, the run's time breakdown), loop (the trainer and its records), report (charts of a run), cli (``python -m
moe_core.train``), notebook (the train notebook's parameter cell).
"""

from .cli import main
from .config import COMPILE_MODES, RUN_CONTROL_FIELDS, OptimConfig, RunConfig, TrainConfig
from .loop import FINAL_STATUSES, Diverged, RunResult, lr_at, train
from .measure import STAT_FIELDS, evaluate
from .report import chart_png, plot_run

__all__ = ["COMPILE_MODES", "FINAL_STATUSES", "RUN_CONTROL_FIELDS", "STAT_FIELDS", "Diverged", "OptimConfig",
           "RunConfig", "RunResult", "TrainConfig", "chart_png", "evaluate", "lr_at", "main", "plot_run", "train"]
