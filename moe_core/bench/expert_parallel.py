"""Expert-parallel benchmark: what the all-to-all exchanges cost inside an expert-parallel MoE layer
(moe_core.parallel), per routing source x E x k x capacity factor.

    torchrun --nproc-per-node 2 -m moe_core.bench.expert_parallel [--out DIR] [--small]
             [--device cuda|cpu] [--checkpoint PATH] [--set key=value ...]

Every rank routes its own T tokens with the source's router logits (random, Zipf-skewed, or a
trained checkpoint's on validation text: moe_core.bench's routing sources) and runs the layer:
capacity factors send fixed [E, C, D] buffers, dropless sends the split sizes first and then
variable-size rows. Per cell: bytes a rank sends per layer call, the time of the layer's
exchanges (CUDA events around every all-to-all; dropless includes its split-size exchange), the
layer's forward and forward+backward time, the exchanges' share of it, their bus bandwidth, a bare
all_to_all_single of the same bytes timed alone as the reference, and the drop rate.

Method: ``warmup`` calls, then ``repeats`` timed calls with inputs rotated among ``sets``; a call's
time is the slowest rank's (a collective ends when its last rank arrives); the median and the
coefficient of variation (std/mean) over calls are reported. Bandwidth follows nccl-tests for
all-to-all: algbw = bytes a rank sends / time, busbw = algbw * (W-1)/W. Rank 0 appends the rows
to DIR/expert_parallel.jsonl, rewrites DIR/expert_parallel.csv and writes
DIR/expert_parallel_<run_id>.json (config, environment, git commit).

Legend: T tokens per rank, D model dim, E experts, K top-k, C capacity, W world size, N logit sets.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field, fields
from functools import partial
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.distributed as dist

from .. import records as rr
from ..config import MoEConfig, cf_label, parse_overrides, require
from ..parallel import ExpertParallelMoE, exchange_rows
from ..routing import capacity_for
from . import CapacityBenchConfig, LogitsRouter, fwd_bwd, router_logits_from_checkpoint, synthetic_logits

SECTION = "expert_parallel"
DEFAULT_OUT = "runs/expert_parallel"
SOURCES = ["random", "skewed:1.0"]
SMALL = {"tokens": 256, "dim": 32, "hidden": 64, "warmup": 2, "repeats": 20}  # --small: CPU-sized
TABLE = ["source", "num_experts", "top_k", "cf_label", "drop_rate", "a2a_bytes", "fwd_ms", "fwd_a2a_share",
         "fwd_bwd_ms", "fwd_bwd_a2a_share", "a2a_busbw_gbps", "a2a_over_ref", "fwd_bwd_ms_cv"]


@dataclass
class ExpertParallelBenchConfig(CapacityBenchConfig):
    """The capacity bench's grid (sources, experts, top_k, capacity_factors, router), GPU-sized by
    default; ``tokens`` is per rank. ``backend`` is not used: capacity runs the padded exchange,
    dropless the grouped one."""

    tokens: int = 16384
    dim: int = 1024
    hidden: int = 2048
    experts: list[int] = field(default_factory=lambda: [8, 64])
    top_k: list[int] = field(default_factory=lambda: [1, 2])
    capacity_factors: list[float | None] = field(default_factory=lambda: [1.0, 1.25, 2.0, None])
    sources: list[str] = field(default_factory=lambda: list(SOURCES))
    warmup: int = 5
    repeats: int = 50

    @property
    def torch_device(self) -> torch.device:
        """Each rank its own GPU (torchrun's LOCAL_RANK)."""
        dev = super().torch_device
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if dev.type == "cuda" else dev


# -- timing -----------------------------------------------------------------------------------------
def _mark(dev: torch.device):
    if dev.type != "cuda":
        return time.perf_counter()  # CPU ops and gloo collectives have finished when they return
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return event


def _elapsed_ms(start, end) -> float:
    return (end - start) * 1e3 if isinstance(start, float) else start.elapsed_time(end)


class ExchangeTimer:
    """Stands in for ExpertShard.exchange (or any exchange): marks around every all-to-all, forward
    and backward, and the bytes this rank sends."""

    def __init__(self, exchange: Callable, dev: torch.device):
        self.exchange, self.dev, self.calls = exchange, dev, []

    def __call__(self, x_ND: torch.Tensor, out_sizes=None, in_sizes=None) -> torch.Tensor:
        start = _mark(self.dev)
        out_MD = self.exchange(x_ND, out_sizes, in_sizes)
        self.calls.append((start, _mark(self.dev), x_ND.nbytes))
        return out_MD

    def take(self) -> list:
        calls, self.calls = self.calls, []
        return calls


def time_calls(fn: Callable, inputs: Sequence, timer: ExchangeTimer, cfg: ExpertParallelBenchConfig) -> dict:
    """This rank's per-call whole time, exchange time (ms) and bytes sent over ``repeats`` calls."""
    dev = cfg.torch_device
    for i in range(cfg.warmup):
        fn(inputs[i % len(inputs)])
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    timer.take()
    marks, exchanges = [], []
    for i in range(cfg.repeats):
        start = _mark(dev)
        fn(inputs[i % len(inputs)])
        marks.append((start, _mark(dev)))
        exchanges.append(timer.take())
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return {"ms": [_elapsed_ms(*m) for m in marks],
            "a2a_ms": [sum(_elapsed_ms(s, e) for s, e, _ in calls) for calls in exchanges],
            "bytes": [sum(b for _, _, b in calls) for calls in exchanges]}


def _slowest(per_rank: list[dict], key: str) -> tuple[float, float]:
    """Median and CV over calls of the slowest rank's time per call."""
    worst = [max(calls) for calls in zip(*(r[key] for r in per_rank))]
    mean = statistics.fmean(worst)
    return statistics.median(worst), statistics.pstdev(worst) / mean if mean > 0 else float("nan")


def _gather(obj):
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


# -- one cell ---------------------------------------------------------------------------------------
def _cell(cfg: ExpertParallelBenchConfig, moe: MoEConfig, logits_NTE: torch.Tensor) -> dict:
    """Every rank measures; the returned row is complete on every rank (all gathered)."""
    dev, dtype, world = cfg.torch_device, cfg.torch_dtype, dist.get_world_size()
    gen = torch.Generator().manual_seed(cfg.seed + 1000 + dist.get_rank())
    inputs = [(torch.randn(cfg.tokens, cfg.dim, generator=gen).to(dev, dtype).requires_grad_(),
               torch.randn(cfg.tokens, cfg.dim, generator=gen).to(dev, dtype),
               logits_NTE[i % logits_NTE.shape[0]].to(dev).requires_grad_()) for i in range(cfg.sets)]
    with dev:  # initialised on the device: a CPU randn of the experts per cell would dominate
        layer = ExpertParallelMoE(moe).to(dtype)
        layer.router = LogitsRouter(moe)
    # the shard's own exchange, timed (a wrapper of the bare collective: no reference cycle keeps the layer alive)
    timer = layer.experts.exchange = ExchangeTimer(partial(exchange_rows, group=layer.experts.group), dev)

    def forward(inp):
        layer.router.logits_TE = inp[2]
        with torch.no_grad():
            return layer(inp[0])[1]

    step = fwd_bwd(layer)

    def forward_backward(inp):
        layer.router.logits_TE = inp[2]
        step(inp)

    stats = [forward(inp) for inp in inputs]
    routing = {k: statistics.fmean(float(getattr(s, k)) for s in stats)
               for k in ("drop_rate", "token_drop_rate", "load_cv")}
    timer.take()
    fwd, fwd_bwd_ = time_calls(forward, inputs, timer, cfg), time_calls(forward_backward, inputs, timer, cfg)
    # the reference: one bare all-to-all (equal splits) of a forward row exchange's bytes, mean over ranks
    sent = statistics.fmean(_gather(statistics.fmean(fwd["bytes"])))
    ref_rows = max(1, round(sent / 2 / (dtype.itemsize * cfg.dim * world))) * world
    ref_timer = ExchangeTimer(partial(exchange_rows, group=None), dev)
    bufs = [torch.randn(ref_rows, cfg.dim, generator=gen).to(dev, dtype) for _ in range(cfg.sets)]
    ref = time_calls(ref_timer, bufs, ref_timer, cfg)
    per_rank = _gather({"fwd": fwd, "fwd_bwd": fwd_bwd_, "ref": ref, "routing": routing})
    return _row(cfg, per_rank, world)


def _row(cfg: ExpertParallelBenchConfig, per_rank: list[dict], world: int) -> dict:
    row = {k: statistics.fmean(r["routing"][k] for r in per_rank) for k in per_rank[0]["routing"]}
    for mode in ("fwd", "fwd_bwd"):
        runs = [r[mode] for r in per_rank]
        (ms, cv), (a2a_ms, a2a_cv) = _slowest(runs, "ms"), _slowest(runs, "a2a_ms")
        row |= {f"{mode}_ms": ms, f"{mode}_ms_cv": cv, f"{mode}_a2a_ms": a2a_ms, f"{mode}_a2a_ms_cv": a2a_cv,
                f"{mode}_a2a_share": a2a_ms / ms}
    sent = [statistics.fmean(r["fwd"]["bytes"]) for r in per_rank]  # per rank, one forward call
    ref_runs = [r["ref"] for r in per_rank]
    ref_ms, ref_cv = _slowest(ref_runs, "a2a_ms")
    ref_bytes = statistics.fmean(statistics.fmean(r["bytes"]) for r in ref_runs)
    busbw = (world - 1) / world / 1e6  # bytes/ms -> GB/s, times the all-to-all bus factor
    return {**row, "a2a_bytes": statistics.fmean(sent), "a2a_bytes_max": max(sent),
            "a2a_algbw_gbps": statistics.fmean(sent) / row["fwd_a2a_ms"] / 1e6,
            "a2a_busbw_gbps": statistics.fmean(sent) / row["fwd_a2a_ms"] * busbw,
            "ref_bytes": ref_bytes, "ref_ms": ref_ms, "ref_ms_cv": ref_cv, "ref_busbw_gbps": ref_bytes / ref_ms * busbw,
            "a2a_over_ref": row["fwd_a2a_ms"] / (2 * ref_ms)}  # the forward makes two row exchanges


# -- the grid and its records -----------------------------------------------------------------------
def _problems(cfg: ExpertParallelBenchConfig) -> list[tuple[str, int, torch.Tensor]]:
    """(source name, E, this rank's logits [N, T, E]) per source and E; the W ranks take
    consecutive slices of one set of W*T tokens."""
    world, rank, T = dist.get_world_size(), dist.get_rank(), cfg.tokens
    problems = []
    for src in cfg.parsed_sources():
        if src.kind == "checkpoint":
            logits_NTE = router_logits_from_checkpoint(src.path, world * T, device=cfg.torch_device)
            try:
                cfg.moe_configs([logits_NTE.shape[-1]])
            except ValueError as err:
                raise ValueError(f"checkpoint {src.path} (E={logits_NTE.shape[-1]}): {err}") from None
            problems.append((src.name, logits_NTE.shape[-1], logits_NTE))
        else:
            problems += [(src.name, e, synthetic_logits(src, cfg.sets, world * T, e, cfg.seed)) for e in cfg.experts]
    return [(name, e, logits_NTE[:, rank * T:(rank + 1) * T]) for name, e, logits_NTE in problems]


def run_expert_parallel(cfg: ExpertParallelBenchConfig, out_dir: str | Path | None = None) -> list[dict]:
    """Every rank calls this inside one process group; every rank returns the rows, rank 0 writes them."""
    world, problems = dist.get_world_size(), _problems(cfg)
    uneven = sorted({e for _, e, _ in problems if e % world})
    require(not uneven, "experts", f"E={uneven} do not split evenly over {world} ranks")
    rows = []
    for source, num_experts, logits_NTE in problems:
        for moe in cfg.moe_configs([num_experts]):
            rows.append({"bench": SECTION, "source": source, "num_experts": num_experts, "top_k": moe.top_k,
                         "capacity_factor": moe.capacity_factor, "cf_label": cf_label(moe.capacity_factor),
                         "capacity": capacity_for(moe.capacity_factor, cfg.tokens, moe.top_k, num_experts),
                         "tokens": cfg.tokens, "dim": cfg.dim, "hidden": cfg.hidden, "router": cfg.router,
                         "world_size": world, "experts_per_rank": num_experts // world,
                         **_cell(cfg, moe, logits_NTE)})
    return _record(cfg, rows, out_dir)


def _record(cfg: ExpertParallelBenchConfig, rows: list[dict], out_dir: str | Path | None) -> list[dict]:
    """Stamp the rows with the run's identity; rank 0 appends them to <out>/expert_parallel.jsonl,
    rewrites expert_parallel.csv (every row so far) and writes expert_parallel_<run_id>.json."""
    import pandas as pd

    env, git = rr.environment(cfg.torch_device), rr.git_commit()
    devices = _gather(env["device"])
    run_id = _gather(f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}")[0]
    stamp = {"run_id": run_id, "device_name": devices[0], "device_names": "; ".join(devices),
             "backend": dist.get_backend(), "dtype": str(cfg.torch_dtype).removeprefix("torch."),
             "torch": env["torch"], "cuda": env["cuda"], "commit": git["commit"], "seed": cfg.seed,
             "warmup": cfg.warmup, "repeats": cfg.repeats, "sets": cfg.sets}
    rows = [rr.jsonable({**row, **stamp}) for row in rows]
    if out_dir is not None and dist.get_rank() == 0:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        with open(out / f"{SECTION}.jsonl", "a") as f:
            f.writelines(json.dumps(row, allow_nan=False) + "\n" for row in rows)
        pd.DataFrame(rr.read_metrics(out / f"{SECTION}.jsonl")).to_csv(out / f"{SECTION}.csv", index=False)
        rr.write_json(out / f"{SECTION}_{run_id}.json", {"run_id": run_id, "config": asdict(cfg), "git": git,
                                                        "env": env, "device_names": devices, "rows": rows})
    return rows


# -- command line -----------------------------------------------------------------------------------
def load_config(*, small: bool, device: str, overrides: dict) -> ExpertParallelBenchConfig:
    """The GPU grid, or with ``small`` its CPU-sized version; ``overrides`` win."""
    own = {f.name for f in fields(ExpertParallelBenchConfig)}
    unknown = sorted(set(overrides) - own)
    require(not unknown, "--set", f"unknown key(s) {unknown}; valid: {', '.join(sorted(own))}")
    return ExpertParallelBenchConfig(**{**(SMALL if small else {}), **overrides, "device": device})


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="torchrun --nproc-per-node W -m moe_core.bench.expert_parallel",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT})")
    parser.add_argument("--device", choices=["cuda", "cpu"], help="default: cuda if available (NCCL), else cpu (gloo)")
    parser.add_argument("--small", action="store_true", help="CPU-sized problems (the default on CPU)")
    parser.add_argument("--checkpoint", help="checkpoint.pt: adds the trained router's logits as a routing source")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field (value parsed as YAML); repeatable")
    args = parser.parse_args(argv)
    try:  # every argument is checked before any work
        require("WORLD_SIZE" in os.environ, "world", "run under torchrun (it sets WORLD_SIZE, RANK, LOCAL_RANK)")
        overrides = parse_overrides(args.overrides)
        if args.checkpoint is not None:
            overrides |= {"checkpoint": args.checkpoint, "sources": [*overrides.get("sources", SOURCES), "checkpoint"]}
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        cfg = load_config(small=args.small or device == "cpu", device=device, overrides=overrides)
    except (ValueError, TypeError) as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 2
    if cfg.torch_device.type == "cuda":
        torch.cuda.set_device(cfg.torch_device)
    dist.init_process_group("nccl" if cfg.torch_device.type == "cuda" else "gloo")
    try:
        rows = run_expert_parallel(cfg, args.out)
    finally:
        dist.destroy_process_group()
    if int(os.environ.get("RANK", "0")) == 0:
        import pandas as pd

        print(f"== {SECTION} ({len(rows)} rows, appended to {Path(args.out) / SECTION}.jsonl) ==")
        print(pd.DataFrame(rows)[TABLE].to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
