"""One training run: TrainConfig -> data + TinyMoEModel -> AdamW loop with periodic evaluation -> run records.

The same entry point serves a laptop CPU (float32), one GPU (bf16 autocast, fused AdamW, optional
torch.compile) and ``torchrun`` DDP. Under DDP ``batch_size`` is the global batch: rank r trains on
rows [r*B:(r+1)*B] of the batch a single process would draw, so the data seen does not depend on the
number of ranks, while each rank's micro-batch is its own routing group (capacity is per rank).

Records live in ``<out_dir>/<experiment>/<run>/`` (see moe_core.records). A run started again
with the same config resumes from its checkpoint; one whose summary says ok (or diverged) is not
retrained; a different config in the same directory is an error.

Legend: B batch (per rank), S sequence length, L MoE layers, E experts, N routing statistics.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import random
import resource
import sys
import time
import traceback
import types
import typing
from dataclasses import asdict, dataclass, fields
from functools import cache
from pathlib import Path
from statistics import median

import numpy as np
import torch
import torch.distributed as dist
import yaml
from tqdm import tqdm

from .. import records as rr
from ..config import MoEConfig, ModelConfig, canonical_router, parse_overrides
from ..data import DataConfig, load_data
from ..flops import peak_flops, train_flops_per_token
from ..model import TinyMoEModel

STAT_FIELDS = ("aux_loss", "z_loss", "drop_rate", "token_drop_rate", "load_cv", "max_vio", "gate_entropy")
# May differ between a stopped run and its resumption: they steer the process, not the result.
RUN_CONTROL_FIELDS = ("stop_after", "progress", "cache_dir", "out_dir", "experiment", "run")
FINAL_STATUSES = ("ok", "diverged")  # a run with this summary status is not trained again
DEVICES = ("auto", "cpu", "cuda")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass
class TrainConfig:
    """Every knob of one run, flat so that a YAML mapping, ``--set key=value`` or a papermill
    parameter can set it. Defaults are CPU-sized: the synthetic corpus trains in seconds on 2 cores.
    The model's vocabulary comes from the data; model, MoE and data fields keep the names of
    ModelConfig, MoEConfig and DataConfig, whose own validation names them.
    """

    # model
    dim: int = 64
    layers: int = 2
    heads: int = 4
    hidden: int = 128  # expert hidden size F (a dense FFN gets top_k * hidden)
    dropout: float = 0.0
    ffn: str = "moe"  # "moe" | "dense" (iso-FLOP dense baseline)
    moe_every: int = 1
    # MoE
    num_experts: int = 4
    top_k: int = 1
    router: str = "top1"
    capacity_factor: float | None = 1.25  # None: dropless
    drop_policy: str = "order"
    renormalize: bool = False
    backend: str = "padded"
    activation: str = "gelu"
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 1e-3
    aux_free_bias: bool = False
    bias_update_rate: float = 1e-3
    hash_seed: int = 0
    # data
    corpus: str = "synthetic"  # synthetic | tinystories | text:PATH[,PATH]
    tokenizer: str = "char"  # char | bpe
    bpe_vocab_size: int = 512
    seq_len: int = 64
    eval_windows: int = 32
    max_stories: int | None = None
    synthetic_chars: int = 2_000_000  # size of the synthetic corpus
    data_seed: int = 0  # corpus generation and split; separate from `seed` so seeds share data
    cache_dir: str = ".cache/moe_core"
    # optimisation
    steps: int = 60
    batch_size: int = 16  # global: split over DDP ranks
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup: int = 10
    weight_decay: float = 0.1
    grad_clip: float = 1.0  # 0 disables
    beta1: float = 0.9
    beta2: float = 0.95
    # evaluation, logging, run control
    eval_interval: int = 10
    log_interval: int = 10  # steps between host syncs (progress bar, non-finite check)
    stop_after: int | None = None  # stop (resumably) once this many steps are done
    compile: bool = False
    compile_mode: str = "default"  # torch.compile mode; reduce-overhead adds CUDA graphs (GPU)
    device: str = "auto"  # auto | cpu | cuda
    progress: bool = True
    seed: int = 0
    experiment: str = "scratch"
    run: str = ""  # empty: <router>-<hash of the config>
    out_dir: str = "runs"

    def __post_init__(self) -> None:
        self._check_types()
        for name in ("steps", "batch_size", "eval_interval", "log_interval", "bpe_vocab_size", "eval_windows"):
            _require(getattr(self, name) >= 1, name, "must be >= 1")
        _require(self.lr > 0, "lr", "must be > 0")
        _require(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", "must be in [0, 1]")
        for name in ("warmup", "weight_decay", "grad_clip"):
            _require(getattr(self, name) >= 0, name, "must be >= 0")
        for name in ("beta1", "beta2"):
            _require(0 <= getattr(self, name) < 1, name, "must be in [0, 1)")
        _require(self.stop_after is None or self.stop_after >= 1, "stop_after", "must be >= 1 or None")
        _require(self.compile_mode in COMPILE_MODES, "compile_mode", f"must be one of {', '.join(COMPILE_MODES)}")
        _require(self.device in DEVICES or self.device.startswith("cuda:"), "device",
                 f"must be one of {', '.join(DEVICES)} or cuda:N")
        for name in ("experiment", "run"):
            value = getattr(self, name)
            _require("/" not in value and value not in (".", ".."), name, "must be a plain directory name")
        _require(bool(self.experiment), "experiment", "must not be empty")
        try:  # the component configs validate (and name) their own fields
            self.router = canonical_router(self.router)
            self.model_config(vocab_size=1)
            self.data_config()
        except ValueError as err:
            raise ValueError(f"TrainConfig.{err}") from err

    def _check_types(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in fields(self):
            value, allowed = getattr(self, f.name), _allowed_types(hints[f.name])
            if float in allowed and int not in allowed and (type(value) is int or _is_float_text(value)):
                value = float(value)  # lr 1 is fine; YAML 1.1 reads 1e-3 as the string '1e-3'
                setattr(self, f.name, value)
            if isinstance(value, bool) != (bool in allowed) or not isinstance(value, allowed):
                names = " | ".join("None" if t is type(None) else t.__name__ for t in allowed)
                raise ValueError(f"TrainConfig.{f.name}: expected {names}, got {value!r}")

    # -- construction from mappings -------------------------------------------------------------
    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        """Unknown keys are an error listing the valid ones (a typo must not silently do nothing)."""
        unknown = sorted(set(values) - set(cls.field_names()))
        if unknown:
            raise ValueError(f"unknown TrainConfig key(s) {unknown}; valid keys: {', '.join(cls.field_names())}")
        return cls(**values)

    @classmethod
    def load(cls, path: str | Path | None = None, overrides: typing.Iterable[str] = ()) -> TrainConfig:
        """A flat YAML mapping of fields, then ``key=value`` overrides (values parsed as YAML)."""
        values = {}
        if path is not None:
            values = yaml.safe_load(Path(path).read_text()) or {}
            if not isinstance(values, dict):
                raise ValueError(f"{path}: expected a flat mapping of TrainConfig fields")
        return cls.from_dict({**values, **cls.parse_overrides(overrides)})

    @classmethod
    def parse_overrides(cls, items: typing.Iterable[str]) -> dict:
        """``key=value`` strings parsed as YAML, except str fields (run=001 is a name, not a number)."""
        hints = typing.get_type_hints(cls)
        return parse_overrides(items, text_fields={k for k, t in hints.items() if t is str})

    @classmethod
    def from_namespace(cls, namespace: dict, before: typing.Iterable[str]) -> TrainConfig:
        """Config from a notebook's globals: every name defined since `before` (the parameter cell
        and papermill's injected cell) must be a field, so a misspelt ``-p`` parameter fails."""
        new = {k: v for k, v in namespace.items() if k not in set(before) and not k.startswith("_")}
        return cls.from_dict(new)

    # -- derived configs and names --------------------------------------------------------------
    def moe_config(self) -> MoEConfig:
        return MoEConfig(dim=self.dim, hidden=self.hidden, num_experts=self.num_experts, top_k=self.top_k,
                         router=self.router, capacity_factor=self.capacity_factor, drop_policy=self.drop_policy,
                         renormalize=self.renormalize, backend=self.backend, activation=self.activation,
                         aux_loss_coef=self.aux_loss_coef, z_loss_coef=self.z_loss_coef,
                         aux_free_bias=self.aux_free_bias, bias_update_rate=self.bias_update_rate,
                         hash_seed=self.hash_seed)

    def model_config(self, vocab_size: int) -> ModelConfig:
        return ModelConfig(vocab_size=vocab_size, seq_len=self.seq_len, dim=self.dim, layers=self.layers,
                           heads=self.heads, moe=self.moe_config(), ffn=self.ffn, moe_every=self.moe_every,
                           dropout=self.dropout)

    def data_config(self) -> DataConfig:
        return DataConfig(corpus=self.corpus, tokenizer=self.tokenizer, vocab_size=self.bpe_vocab_size,
                          seq_len=self.seq_len, cache_dir=self.cache_dir, max_stories=self.max_stories,
                          synthetic_chars=self.synthetic_chars,
                          eval_windows=self.eval_windows, seed=self.data_seed)

    def identity(self) -> dict:
        """The fields that define the run's result (what must match for a resume)."""
        return {k: v for k, v in asdict(self).items() if k not in RUN_CONTROL_FIELDS}

    @property
    def run_name(self) -> str:
        digest = hashlib.sha256(json.dumps(self.identity(), sort_keys=True).encode()).hexdigest()[:8]
        return self.run or f"{self.router}-{digest}"

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / self.experiment / self.run_name


def _require(ok: bool, name: str, msg: str) -> None:
    if not ok:
        raise ValueError(f"TrainConfig.{name}: {msg}")


def _is_float_text(value) -> bool:
    try:
        return isinstance(value, str) and math.isfinite(float(value))
    except ValueError:
        return False


def _allowed_types(hint) -> tuple[type, ...]:
    return typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)


@dataclass
class RunResult:
    run_dir: Path
    status: str  # ok | stopped (stop_after) | diverged | failed
    summary: dict
    metrics: list[dict]  # one row per evaluation, as in metrics.jsonl

    def frame(self):
        """The metric rows as a pandas DataFrame."""
        import pandas as pd

        return pd.DataFrame(self.metrics)


def training_loss(out) -> torch.Tensor:
    """CE + Switch aux + router z-loss (their coefficients are applied inside the MoE layers)."""
    return out.loss + out.aux_loss + out.z_loss


class Diverged(Exception):
    """Training loss became NaN/inf."""


# -- distributed and device set-up ------------------------------------------------------------------
@dataclass
class _Dist:
    rank: int
    world: int
    device: torch.device
    owns_group: bool  # we initialised the process group, so we tear it down

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_reduce(self, t: torch.Tensor, op=None) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
        return t

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def _setup_dist(cfg: TrainConfig) -> _Dist:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; NCCL on GPUs, gloo on CPU."""
    cuda = cfg.device.startswith("cuda") or (cfg.device == "auto" and torch.cuda.is_available())
    world = int(os.environ.get("WORLD_SIZE", "1"))
    owns = world > 1 and not dist.is_initialized()
    if owns:
        dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank() if world > 1 else 0
    if not cuda:
        device = torch.device("cpu")
    elif world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    else:  # set_device needs an index
        device = torch.device(cfg.device if ":" in cfg.device else f"cuda:{torch.cuda.current_device()}")
    if cuda:
        torch.cuda.set_device(device)
    return _Dist(rank, world, device, owns)


def peak_memory_bytes(device: torch.device) -> tuple[int, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "cuda_max_memory_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "cpu_max_rss"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # all CUDA devices too


def _rng_state(device: torch.device) -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def _set_rng_state(state: dict, device: torch.device) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warmup over `warmup` steps, then cosine decay to lr * min_lr_ratio at `steps`."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def _optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only (not on norms)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=device.type == "cuda")


# -- on-device accumulation -------------------------------------------------------------------------
class _Interval:
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

    def reduce(self, ctx: _Dist) -> dict:
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


class _StepTimer:
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
@torch.no_grad()
def evaluate(model: TinyMoEModel, data, batch_size: int, ctx: _Dist, autocast) -> dict:
    """Validation loss (nats/token), perplexity and bits per byte over the fixed eval windows,
    sharded over ranks. expert_choice is evaluated causally (headline) and non-causally (suffix)."""
    modes = ("causal", "noncausal") if model.cfg.moe.router == "expert_choice" else ("causal",)
    model.eval()
    row = {}
    for mode in modes:
        model.set_expert_choice_eval(mode)
        loss_sum, tokens = torch.zeros((), device=ctx.device), 0
        for i, (x_BS, y_BS) in enumerate(data.eval_batches(batch_size)):
            if i % ctx.world != ctx.rank:
                continue
            with autocast():
                out = model(x_BS.to(ctx.device), y_BS.to(ctx.device))
            loss_sum += out.loss.float() * y_BS.numel()
            tokens += y_BS.numel()
        sums_2 = ctx.all_reduce(torch.stack([loss_sum, torch.tensor(float(tokens), device=ctx.device)]))
        loss = (sums_2[0] / sums_2[1]).item()
        suffix = "" if mode == "causal" else "_noncausal"
        row |= {f"val_loss{suffix}": loss, f"val_ppl{suffix}": math.exp(min(loss, 700)),
                f"val_bpb{suffix}": loss / math.log(2) / data.val_bytes_per_token}
    model.set_expert_choice_eval("causal")
    model.train()
    return row


# -- the run ----------------------------------------------------------------------------------------
def _existing_run(cfg: TrainConfig) -> RunResult | None:
    """The finished result if this run is already done; raises if the directory holds another config."""
    run_dir = cfg.run_dir
    stored = rr.read_json(run_dir / rr.CONFIG_FILE)
    if stored is None:
        return None
    old = {k: v for k, v in stored["config"].items() if k not in RUN_CONTROL_FIELDS}
    new = cfg.identity()
    diff = sorted(k for k in old.keys() | new.keys() if old.get(k, "<missing>") != new.get(k, "<missing>"))
    if diff:
        changes = "; ".join(f"{k}: {old.get(k, '<missing>')!r} -> {new.get(k, '<missing>')!r}" for k in diff)
        raise ValueError(f"{run_dir} holds a run with a different config ({changes}); use another "
                         f"experiment/run name or remove the directory. Nothing was overwritten.")
    summary = rr.read_json(run_dir / rr.SUMMARY_FILE)
    if summary is not None and summary["status"] in FINAL_STATUSES:
        return RunResult(run_dir, summary["status"], summary, rr.read_metrics(run_dir / rr.METRICS_FILE))
    return None


def train(cfg: TrainConfig) -> RunResult:
    """Train (or resume, or return the finished record of) the run `cfg` describes."""
    ctx = _setup_dist(cfg)
    try:
        done = _existing_run(cfg)
        if done is not None:
            if ctx.main:
                print(f"{done.run_dir}: already {done.status}, not retrained", file=sys.stderr)
            return done
        ctx.barrier()  # every rank has checked the directory before rank 0 writes to it
        return _Trainer(cfg, ctx).run()
    finally:
        if ctx.owns_group:
            dist.destroy_process_group()


class _Trainer:
    def __init__(self, cfg: TrainConfig, ctx: _Dist):
        self.cfg, self.ctx = cfg, ctx
        self.run_dir = cfg.run_dir
        _require(cfg.batch_size % ctx.world == 0, "batch_size",
                 f"global batch {cfg.batch_size} is not divisible by {ctx.world} ranks")
        self.local_batch = cfg.batch_size // ctx.world
        self.t_start = time.perf_counter()
        self.rows: list[dict] = []
        self.step = 0  # optimizer steps done
        self.wall_before = 0.0  # wall time of earlier sessions of this run
        self.n_params = self.flops_per_token = None  # known once the model is built
        self.peak, self.peak_source = peak_flops(ctx.device) if ctx.main else (None, "rank 0 only")

    # records -------------------------------------------------------------------------------------
    def _write_config(self) -> None:
        record = {"config": asdict(self.cfg), "run": self.cfg.run_name, "seed": self.cfg.seed,
                  "git": rr.git_commit(), "env": rr.environment(self.ctx.device), "world_size": self.ctx.world,
                  "data": self.data.meta, "model": {"params": self.n_params, "vocab_size": self.data.vocab_size,
                                                    "train_flops_per_token": self.flops_per_token}}
        rr.write_json(self.run_dir / rr.CONFIG_FILE, record)

    def _summary(self, status: str, error: str | None = None, trace: str | None = None) -> dict:
        evals = [r for r in self.rows if r.get("val_loss") is not None]
        best = min(evals, key=lambda r: r["val_loss"], default={})
        final = evals[-1] if evals else {}
        speeds = [r["tokens_per_s"] for r in self.rows if r.get("tokens_per_s")]
        tokens_per_s = median(speeds) if speeds else None
        mem, mem_kind = peak_memory_bytes(self.ctx.device)
        return {
            "status": status, "error": error, "traceback": trace, "steps_done": self.step, "steps": self.cfg.steps,
            "best_val_loss": best.get("val_loss"), "best_val_step": best.get("step"),
            "final": {k: v for k, v in final.items() if k.startswith(("val_", "train_loss"))},
            "median_tokens_per_s": tokens_per_s, "mfu": self._mfu(tokens_per_s),
            "peak_flops": self.peak, "peak_flops_source": self.peak_source,
            "train_flops_per_token": self.flops_per_token, "params": self.n_params,
            "peak_mem_bytes": mem, "peak_mem_kind": mem_kind, "world_size": self.ctx.world,
            "device": rr.environment(self.ctx.device)["device"],
            "wall_time_s": self.wall_before + time.perf_counter() - self.t_start,
        }

    def _mfu(self, tokens_per_s: float | None) -> float | None:
        """Achieved FLOP/s (train FLOPs per token x tokens/s over all ranks) / (peak x ranks)."""
        if tokens_per_s is None or self.peak is None:
            return None
        return self.flops_per_token * tokens_per_s / (self.peak * self.ctx.world)

    def _finish(self, status: str, error: str | None = None, trace: str | None = None) -> RunResult:
        summary = self._summary(status, error, trace)
        if self.ctx.main:
            rr.write_json(self.run_dir / rr.SUMMARY_FILE, summary)
        return RunResult(self.run_dir, status, summary, self.rows)

    def _checkpoint(self) -> None:
        if not self.ctx.main:
            return
        rr.save_checkpoint(self.run_dir / rr.CHECKPOINT_FILE, {
            "step": self.step, "config": self.cfg.identity(),
            "model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
            "schedule": {"step": self.step, "lr": lr_at(self.cfg, max(0, self.step - 1))},
            "rng": _rng_state(self.ctx.device),
            "data": {"meta": self.data.meta, "seed": self.cfg.seed, "next_step": self.step},
            "interval": self.interval.state_dict(), "metrics": self.rows,
            "wall_time_s": self.wall_before + time.perf_counter() - self.t_start,
        })

    def _resume(self) -> None:
        state = rr.load_checkpoint(self.run_dir / rr.CHECKPOINT_FILE)
        if state is None:
            return
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.interval.load_state_dict(state["interval"])
        self.step, self.rows, self.wall_before = state["step"], state["metrics"], state["wall_time_s"]
        _set_rng_state(state["rng"], self.ctx.device)
        if self.ctx.main:
            tqdm.write(f"{self.run_dir}: resuming at step {self.step}", file=sys.stderr)

    # set-up --------------------------------------------------------------------------------------
    def _build(self) -> None:
        cfg, ctx = self.cfg, self.ctx
        if ctx.main:  # rank 0 fills the data cache; the others then read it
            self.data = load_data(cfg.data_config())
        ctx.barrier()
        if not ctx.main:
            self.data = load_data(cfg.data_config())
        seed_everything(cfg.seed)
        model_cfg = cfg.model_config(self.data.vocab_size)
        self.model = TinyMoEModel(model_cfg).to(ctx.device)
        self.n_params = sum(p.numel() for p in self.model.parameters())
        self.flops_per_token = train_flops_per_token(model_cfg)
        self.opt = _optimizer(self.model, cfg, ctx.device)
        self.interval = _Interval(len(self.model.moe_layers()), cfg.num_experts, ctx.device)
        self.train_model = self.model
        if ctx.world > 1:
            self.train_model = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
        if cfg.compile:
            self.train_model = torch.compile(self.train_model, mode=cfg.compile_mode)
        if ctx.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(ctx.device)

    def autocast(self):
        if self.ctx.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # the loop ------------------------------------------------------------------------------------
    def run(self) -> RunResult:
        try:
            self._build()
            self._resume()
            if self.ctx.main and self.step == 0:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                self._write_config()
            return self._loop()
        except Diverged as err:
            if self.ctx.main:
                tqdm.write(f"{self.run_dir}: DIVERGED: {err}; records kept, stopping", file=sys.stderr)
            return self._finish("diverged", str(err))
        except Exception as err:
            if self.ctx.main:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                self._finish("failed", f"{type(err).__name__}: {err}", traceback.format_exc())
            raise

    def _loop(self) -> RunResult:
        cfg, ctx = self.cfg, self.ctx
        stop = min(cfg.steps, cfg.stop_after or cfg.steps)
        timer = _StepTimer(ctx.device)
        first_step = self.step
        tokens_per_step = self.local_batch * cfg.seq_len * ctx.world
        first_bad = torch.full((), cfg.steps + 1, device=ctx.device)  # 1 + first step with non-finite loss
        log_loss = torch.zeros((), device=ctx.device)
        t_log, log_steps = time.perf_counter(), 0
        with tqdm(total=cfg.steps, initial=self.step, disable=not (ctx.main and cfg.progress),
                  desc=cfg.run_name, dynamic_ncols=True) as bar:
            while self.step < stop:
                step = self.step
                if step > first_step:  # a session's first step warms up (allocation, compilation)
                    timer.before_step()
                for group in self.opt.param_groups:
                    group["lr"] = lr_at(cfg, step)
                x_BS, y_BS = self.data.train_batch(step, self.local_batch, cfg.seed, ctx.rank, ctx.world)
                if cfg.compile:  # CUDA-graph trees (reduce-overhead) need the step boundary marked
                    torch.compiler.cudagraph_mark_step_begin()
                with self.autocast():
                    out = self.train_model(x_BS.to(ctx.device, non_blocking=True),
                                           y_BS.to(ctx.device, non_blocking=True))
                    loss = training_loss(out)
                loss.backward()
                if cfg.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
                self.opt.step()
                self.opt.zero_grad(set_to_none=True)
                self.interval.add(out)
                first_bad = torch.where(torch.isfinite(loss.detach()) | (first_bad <= step), first_bad, step + 1)
                log_loss += out.loss.detach().float()
                self.step += 1
                log_steps += 1
                bar.update(1)
                eval_now = self.step % cfg.eval_interval == 0 or self.step == cfg.steps
                sync_now = eval_now or self.step % cfg.log_interval == 0 or self.step == stop
                if not sync_now:
                    continue
                bad = int(ctx.all_reduce(first_bad, dist.ReduceOp.MIN).item())
                if bad <= cfg.steps:
                    raise Diverged(f"non-finite training loss at step {bad} (lr={lr_at(cfg, bad - 1):.3g})")
                rate = tokens_per_step * log_steps / (time.perf_counter() - t_log)
                bar.set_postfix(loss=f"{log_loss.item() / log_steps:.4f}", tok_s=f"{rate:,.0f}")
                log_loss.zero_()
                if eval_now:
                    self._evaluate(timer, tokens_per_step)
                if eval_now or self.step == stop:
                    self._checkpoint()
                t_log, log_steps = time.perf_counter(), 0
        return self._finish("ok" if self.step >= cfg.steps else "stopped")

    def _evaluate(self, timer: _StepTimer, tokens_per_step: int) -> None:
        timed_steps, seconds = timer.stop()
        tokens_per_s = tokens_per_step * timed_steps / seconds if timed_steps else None
        row = {"step": self.step, "tokens": self.step * tokens_per_step, "lr": lr_at(self.cfg, self.step - 1)}
        row |= self.interval.reduce(self.ctx)
        row |= evaluate(self.model, self.data, self.local_batch, self.ctx, self.autocast)
        mem, _ = peak_memory_bytes(self.ctx.device)
        row |= {"tokens_per_s": tokens_per_s, "timed_steps": timed_steps, "mfu": self._mfu(tokens_per_s),
                "peak_mem_bytes": mem, "wall_time_s": self.wall_before + time.perf_counter() - self.t_start}
        self.rows.append(rr.jsonable(row))
        if self.ctx.main:
            rr.write_metrics(self.run_dir / rr.METRICS_FILE, self.rows)


# -- notebook helpers -------------------------------------------------------------------------------
def plot_run(result: RunResult):
    """Loss curves, interval-mean routing statistics and the final per-layer expert load (altair)."""
    import altair as alt
    import pandas as pd

    df = result.frame()
    if df.empty:  # e.g. diverged before the first evaluation
        return alt.Chart(pd.DataFrame({"note": [f"{result.status}: no evaluations recorded"]})).mark_text().encode(
            text="note:N")

    def lines(columns: tuple[str, ...], series: str, value: str, title: str):
        # null (e.g. hash's gate entropy) dropped: NaN is not valid Vega-Lite JSON
        long = df.melt("step", [c for c in columns if c in df], series, value).dropna()
        return alt.Chart(long).mark_line(point=True).encode(
            x="step:Q", y=alt.Y(f"{value}:Q", scale=alt.Scale(zero=False)), color=f"{series}:N",
        ).properties(title=title, width=260, height=180)

    charts = [lines(("train_loss", "val_loss", "val_loss_noncausal"), "series", "nats/token", "loss")]
    if "expert_load" in df:
        charts.append(lines(("drop_rate", "token_drop_rate", "load_cv", "max_vio", "gate_entropy"), "stat", "value",
                            "routing (interval means)"))
        load = pd.DataFrame([{"layer": layer, "expert": e, "share": share}
                             for layer, shares in enumerate(df["expert_load"].iloc[-1])
                             for e, share in enumerate(shares)])
        charts.append(alt.Chart(load).mark_rect().encode(
            x="expert:O", y="layer:O", color=alt.Color("share:Q", scale=alt.Scale(scheme="viridis", domainMin=0)),
            tooltip=["layer", "expert", "share"],
        ).properties(title="expert load, last interval", width=160, height=180))
    return alt.hconcat(*charts)


def chart_png(chart, scale: float = 2.0) -> bytes:
    """Render an altair chart to PNG offline (vl-convert), for IPython.display.Image."""
    import vl_convert

    return vl_convert.vegalite_to_png(chart.to_json(), scale=scale)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moe_core.train", description=__doc__.split("\n")[0])
    parser.add_argument("--config", type=Path, help="YAML file: a flat mapping of TrainConfig fields")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one field (value parsed as YAML); repeatable")
    args = parser.parse_args(argv)
    try:
        cfg = TrainConfig.load(args.config, args.overrides)
    except ValueError as err:
        parser.error(str(err))
    result = train(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(result.summary, indent=2))
    return 0 if result.status in ("ok", "stopped") else 1

