"""What a run measures: interval means of the training losses and routing statistics, the time of
training steps alone, the validation loss over the fixed evaluation windows, and where the run's
wall time went (PhaseClock).

Legend: B batch (per rank), S sequence length, L MoE layers, E experts, N routing statistics, M eval modes.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import fields
from pathlib import Path

import numpy as np
import torch

from ..config import EC_EVAL_MODES, ModelConfig, MoEConfig
from ..model import TinyMoEModel
from ..routing import mutual_information
from .config import COMPONENT_FIELDS
from .distributed import Dist

STAT_FIELDS = ("aux_loss", "z_loss", "drop_rate", "token_drop_rate", "load_cv", "max_vio", "gate_entropy", "p1_mean",
               "p1_over_half")
# Where a run's wall time goes (summary.json ``time_s``): start (process or kernel start-up before
# train() is entered), data (load and tokenise), build (model, optimiser, the matmul peak), compile
# (a compiled session's first steps and first evaluation: tracing, Inductor, CUDA-graph capture),
# train (the other training steps), eval, checkpoint (save and load), records (config, metrics and
# summary files), other (the rest of train()).
PHASES = ("start", "data", "build", "compile", "train", "eval", "checkpoint", "records", "other")
RUN_T0_ENV = "MOE_CORE_RUN_T0"  # time.time() when the sweep began this run (before its kernel was ready)
CONCURRENCY_ENV = "MOE_CORE_CONCURRENCY"  # runs the sweep lets share this run's GPU
_process_runs = 0  # train() calls in this process: only the first one's start is the process's start
_now = time.perf_counter  # the phase clock's time source
# What a training step's speed depends on: the model and MoE fields, what sets the vocabulary (the
# LM head), the batch shape and compilation. A bench row and a run with equal values (and device)
# time the same computation; ``compile_mode`` is "none" when not compiling (throughput_key).
THROUGHPUT_FIELDS = (*(name for names in COMPONENT_FIELDS.values() for name in names
                       if name in {f.name for cls in (ModelConfig, MoEConfig) for f in fields(cls)}),
                     "corpus", "tokenizer", "bpe_vocab_size", "batch_size", "compile_mode")


def throughput_key(config: dict) -> dict:
    """THROUGHPUT_FIELDS of a flat TrainConfig mapping, ``compile_mode`` "none" for an eager run."""
    key = {k: config.get(k) for k in THROUGHPUT_FIELDS}
    key["compile_mode"] = key["compile_mode"] if config.get("compile") else "none"
    return key


# -- on-device accumulation -------------------------------------------------------------------------
class Interval:
    """Sums over the training steps since the last evaluation, kept on the device so that the loop
    syncs with the host once per interval; averaged over steps and ranks at evaluation."""

    def __init__(self, n_layers: int, n_experts: int, device: torch.device):
        self.loss_3 = torch.zeros(3, device=device)  # ce, aux, z
        self.stats_LN = torch.zeros(n_layers, len(STAT_FIELDS), device=device)
        self.load_LE = torch.zeros(n_layers, n_experts, device=device)
        self.steps = 0

    def add(self, out) -> None:
        self.loss_3 += torch.stack([out.loss, out.aux_loss, out.z_loss]).detach().float()
        if out.stats:
            self.stats_LN += torch.stack([torch.stack([getattr(s, f).detach().float() for f in STAT_FIELDS])
                                          for s in out.stats])
            self.load_LE += torch.stack([s.tokens_per_expert.detach().float() for s in out.stats])
        self.steps += 1

    def state_dict(self) -> dict:
        return {"loss_3": self.loss_3.cpu(), "stats_LN": self.stats_LN.cpu(), "load_LE": self.load_LE.cpu(),
                "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        for name in ("loss_3", "stats_LN", "load_LE"):
            getattr(self, name).copy_(state[name])
        self.steps = state["steps"]

    def reduce(self, ctx: Dist) -> dict:
        """Means over the interval (all ranks); resets the sums. Per-layer lists index MoE layers."""
        flat = ctx.all_reduce(torch.cat([self.loss_3, self.stats_LN.flatten(), self.load_LE.flatten()]))
        flat = (flat / (max(1, self.steps) * ctx.world)).tolist()
        n_stats = self.stats_LN.numel()
        stats_LN = np.array(flat[3:3 + n_stats]).reshape(self.stats_LN.shape)
        load_LE = np.array(flat[3 + n_stats:]).reshape(self.load_LE.shape)
        row = {"train_loss": flat[0], "train_aux_loss": flat[1], "train_z_loss": flat[2]}
        if len(stats_LN):
            # layer means; the losses are already in train_aux_loss / train_z_loss (layer sums)
            row |= {f: float(stats_LN[:, i].mean()) for i, f in enumerate(STAT_FIELDS) if "loss" not in f}
            row["layer_stats"] = {f: stats_LN[:, i].tolist() for i, f in enumerate(STAT_FIELDS)}
            row["expert_load"] = (load_LE / np.maximum(load_LE.sum(1, keepdims=True), 1e-12)).tolist()
        for t in (self.loss_3, self.stats_LN, self.load_LE):
            t.zero_()
        self.steps = 0
        return row


class StepTimer:
    """Time of training steps only: started before the first timed step of an interval, stopped
    after its last, so evaluation and checkpointing (between intervals) are excluded. CUDA events on
    GPU, perf_counter on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.start_mark = None
        self.steps = 0

    def _mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def before_step(self) -> None:
        if self.start_mark is None:
            self.start_mark = self._mark()
        self.steps += 1

    def stop(self) -> tuple[int, float]:
        """(timed steps, seconds) since the interval's first timed step; resets."""
        if self.start_mark is None:
            return 0, 0.0
        end = self._mark()
        if self.cuda:
            end.synchronize()
            seconds = self.start_mark.elapsed_time(end) / 1e3
        else:
            seconds = end - self.start_mark
        steps, self.start_mark, self.steps = self.steps, None, 0
        return steps, seconds


# -- evaluation -------------------------------------------------------------------------------------
def device_eval_batches(data, batch_size: int, ctx: Dist) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's share of the fixed validation windows, on the device: copied once per run, so an
    evaluation makes no host-to-device copies (a pageable copy waits for the queued steps)."""
    return [(x_BS.to(ctx.device), y_BS.to(ctx.device)) for i, (x_BS, y_BS) in enumerate(data.eval_batches(batch_size))
            if i % ctx.world == ctx.rank]


@torch.no_grad()
def evaluate(model: TinyMoEModel, data, batch_size: int, ctx: Dist, autocast, forward=None, batches=None) -> dict:
    """Validation loss (nats/token), perplexity and bits per byte over the fixed eval windows,
    sharded over ranks. expert_choice is evaluated under every eval rule: causal (headline),
    noncausal and prefix (suffixes). token_expert_mi: I(token id; chosen expert) per MoE layer
    (routing.mutual_information) from the counts of the causal evaluation, and its layer mean.

    A batch is one routing group, as in training (capacity is per group), so ``batch_size`` is part
    of what the loss means. ``forward``: the compiled model when training compiles (``model``
    otherwise); ``batches``: device_eval_batches, made once per run. The causal pass counts
    assignments through forward hooks, which a compiled graph would not run, so it uses ``model``.
    One host sync per evaluation."""
    modes = EC_EVAL_MODES if model.cfg.moe.router == "expert_choice" else ("causal",)
    batches = device_eval_batches(data, batch_size, ctx) if batches is None else batches
    compiled = forward is not None and forward is not model
    forward = model if forward is None else forward  # not `or`: a compiled module has no truth value
    model.eval()
    sums = []
    for mode in modes:
        model.set_expert_choice_eval(mode)
        loss_sum, tokens = torch.zeros((), device=ctx.device), 0
        counting = model.counting_assignments() if mode == "causal" else contextlib.nullcontext()
        with counting as counts_LVE:
            for x_BS, y_BS in batches:
                run = model if mode == "causal" else forward
                if compiled and run is forward:  # CUDA-graph trees: each call's outputs live until the next call
                    torch.compiler.cudagraph_mark_step_begin()
                with autocast():
                    out = run(x_BS, y_BS)
                loss_sum += out.loss.float() * y_BS.numel()
                tokens += y_BS.numel()
        if mode == "causal":
            mi_counts_LVE = counts_LVE
        sums.append(torch.stack([loss_sum, torch.tensor(float(tokens), device=ctx.device)]))
    sums_M2 = ctx.all_reduce(torch.stack(sums))
    losses = (sums_M2[:, 0] / sums_M2[:, 1]).tolist()
    row = {}
    for mode, loss in zip(modes, losses):
        suffix = "" if mode == "causal" else f"_{mode}"
        row |= {f"val_loss{suffix}": loss, f"val_ppl{suffix}": math.exp(min(loss, 700)),
                f"val_bpb{suffix}": loss / math.log(2) / data.val_bytes_per_token}
        if mode == "causal" and len(mi_counts_LVE):
            mi_L = [float(mutual_information(c)) for c in ctx.all_reduce(mi_counts_LVE)]
            row |= {"token_expert_mi": sum(mi_L) / len(mi_L), "eval_layer_stats": {"token_expert_mi": mi_L}}
    model.set_expert_choice_eval("causal")
    model.train()
    return row


# -- where the wall time goes -------------------------------------------------------------------------
def process_age_s() -> float | None:
    """Seconds since this process started (/proc/self/stat's start time against /proc/uptime,
    both since boot, 10 ms resolution); None without /proc."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])  # field 22
        uptime_s = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return max(0.0, uptime_s - start_ticks / os.sysconf("SC_CLK_TCK"))


def start_seconds() -> tuple[float, str]:
    """(seconds from this run's start to now, how they were measured), called as train() begins.

    The sweep's timestamp ``MOE_CORE_RUN_T0`` wins (it is consumed, so a later run in the same
    process cannot reuse it); else the first run of a process counts the process's age (interpreter
    start, imports); else 0."""
    global _process_runs
    _process_runs += 1
    stamp = os.environ.pop(RUN_T0_ENV, None)
    if stamp is not None:
        try:
            return max(0.0, time.time() - float(stamp)), f"{RUN_T0_ENV}: set by the sweep as it began the run"
        except ValueError:
            return 0.0, f"0: {RUN_T0_ENV}={stamp!r} is not a time"
    if _process_runs > 1:
        return 0.0, f"0: not the first run of this process, and no {RUN_T0_ENV}"
    age = process_age_s()
    if age is None:
        return 0.0, "0: the process start time is unknown (no /proc)"
    return age, "process start (/proc/self/stat)"


class PhaseClock:
    """A run's wall time by phase (PHASES), every second charged to exactly one: ``phase(name)``
    charges its block to ``name``, pausing the enclosing phase; ``switch`` moves the charge without
    a block; time outside both is ``other``. The total is the run's wall time by construction;
    a resumed run adds the earlier sessions' seconds (``add``)."""

    def __init__(self, start_s: float = 0.0, start_source: str = "0: not measured"):
        self.spent = dict.fromkeys(PHASES, 0.0)
        self.spent["start"], self.start_source = start_s, start_source
        self.current, self.mark = "other", _now()

    def switch(self, name: str) -> str:
        """Charge from now on to ``name``; returns the phase charged until now."""
        now = _now()
        self.spent[self.current] += now - self.mark
        previous, self.current, self.mark = self.current, name, now
        return previous

    @contextlib.contextmanager
    def phase(self, name: str):
        previous = self.switch(name)
        try:
            yield
        finally:
            self.switch(previous)

    def add(self, seconds: dict) -> None:
        """Add earlier sessions' seconds (a checkpoint's ``time_s``)."""
        for name, value in seconds.items():
            self.spent[name] += value

    def seconds(self) -> dict:
        """Seconds per phase so far, the running phase included."""
        now = dict(self.spent)
        now[self.current] += _now() - self.mark
        return now

    def total(self) -> float:
        return sum(self.seconds().values())


def compile_cache_counts() -> dict[str, int]:
    """This process's Inductor FX-graph cache hits and misses so far (a miss: a graph compiled from
    scratch). A run records the difference over its session: whether a "warm" cache held its graphs."""
    from torch._dynamo.utils import counters

    return {"hits": counters["inductor"]["fxgraph_cache_hit"], "misses": counters["inductor"]["fxgraph_cache_miss"]}


def sweep_breakdown(summaries: list[dict], wall_s: float, workers: int) -> dict:
    """Where a sweep's worker time (wall x workers) went: each phase summed over the runs' ``time_s``,
    and ``outside runs`` (notebook cells after train(), idle workers, the sweep's own work); and the
    runs' Inductor cache hits and misses summed (``compile_cache``)."""
    times = [s["time_s"] for s in summaries if s.get("time_s")]
    capacity = max(wall_s * workers, 1e-9)
    seconds = {p: sum(t.get(p, 0.0) for t in times) for p in PHASES}
    seconds["outside runs"] = max(0.0, capacity - sum(seconds.values()))
    cache = {k: sum((s.get("compile_cache") or {}).get(k, 0) for s in summaries) for k in ("hits", "misses")}
    return {"wall_s": wall_s, "workers": workers, "runs": len(times),
            "runs_per_hour": len(times) / max(wall_s, 1e-9) * 3600, "train_share": seconds["train"] / capacity,
            "seconds": seconds, "shares": {p: s / capacity for p, s in seconds.items()}, "compile_cache": cache}


def format_breakdown(breakdown: dict) -> str:
    """The table the sweep prints at its end."""
    lines = [f"{breakdown['runs']} run(s) in {breakdown['wall_s']:.1f} s on {breakdown['workers']} worker(s): "
             f"{breakdown['runs_per_hour']:.1f} runs/hour; share of worker time (wall x workers):"]
    lines += [f"  {name:<13} {s:9.1f} s  {breakdown['shares'][name]:6.1%}" for name, s in breakdown["seconds"].items()]
    cache = breakdown["compile_cache"]
    lines += [f"Inductor cache: {cache['hits']} hit(s), {cache['misses']} miss(es) (graphs compiled from scratch)"]
    return "\n".join(lines)
