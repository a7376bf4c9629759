"""Benchmarks: Experiment B (capacity factor vs drops and speed), the MoE layer against a dense FFN
of equal active FLOPs, and the trainer's tokens/s.

Why: the capacity factor trades dropped tokens against padded compute and memory traffic. The
capacity bench measures both sides on one (T, E, k) routing problem at a time, from three routing
sources (i.i.d. random logits, Zipf-skewed logits, a trained model's router logits on validation
text); the layer bench says what a whole MoE layer costs next to a dense FFN; the train bench what
the real training loop achieves, alone on the device (the solo tokens/s the analysis compares);
the sweep bench how many runs per hour a whole sweep gets done, and where its time goes.

Layout, imports pointing down the list:
    cli          ``python -m moe_core.bench {capacity,layer,train,sweep,all}``: params -> configs -> runners
    capacity, layer, train_bench, sweep_bench   one runner each, returning a DataFrame of tidy rows
    report       records (<section>.jsonl/.csv/_<run_id>.json), join with training runs, tables, chart
    configs      one validated dataclass per bench (BenchConfig: device, dtype, timing method)
    sources      routing sources (random, skewed, a checkpoint's routers) and routing given logits
    timing       median-of-repeats timing, copy bandwidth, forward + backward step, compile helper
    profile      GPU kernel profiles of a layer and a training step (torch.profiler)
"""
from .capacity import IdentityExperts, buffer_rows, dispatch_combine_bytes, routing_bytes, run_capacity
from .cli import BENCHES, DEFAULT_OUT, PARAMS, load_config, main
from .configs import DTYPES, BenchConfig, CapacityBenchConfig, LayerBenchConfig, SweepBenchConfig, TrainBenchConfig
from .layer import run_layer
from .report import JOIN_COLUMNS, TABLES, capacity_chart, join_with_training, record, table, training_runs
from .sources import (
    LOGIT_ROUTERS,
    SOURCE_KINDS,
    LogitsRouter,
    RoutingSource,
    capacity_metrics,
    read_checkpoint,
    route_logits,
    router_logits_from_checkpoint,
    synthetic_logits,
)
from .sweep_bench import run_sweep_bench
from .timing import compiled, copy_bandwidth, fwd_bwd, time_median_ms
from .train_bench import run_train

__all__ = ["BENCHES", "DEFAULT_OUT", "DTYPES", "JOIN_COLUMNS", "LOGIT_ROUTERS", "PARAMS", "SOURCE_KINDS", "TABLES",
           "BenchConfig", "CapacityBenchConfig", "IdentityExperts", "LayerBenchConfig", "LogitsRouter",
           "RoutingSource", "SweepBenchConfig", "TrainBenchConfig", "buffer_rows", "capacity_chart",
           "capacity_metrics", "compiled", "copy_bandwidth", "dispatch_combine_bytes", "fwd_bwd",
           "join_with_training", "load_config", "main", "read_checkpoint", "record", "route_logits",
           "router_logits_from_checkpoint", "routing_bytes", "run_capacity", "run_layer", "run_sweep_bench",
           "run_train", "synthetic_logits", "table", "time_median_ms", "training_runs"]
