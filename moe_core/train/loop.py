"""The training loop: resume or start, AdamW steps under the warmup-cosine schedule, evaluation every
`eval_interval` steps, a checkpoint at most every `checkpoint_interval_s` and when the run stops, and
the run's records (moe_core.records formats).

Legend: B batch (per rank), S sequence length.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
import traceback
import warnings
from dataclasses import asdict
from statistics import median

import torch
import torch.distributed as dist
from tqdm import tqdm

from .. import records as rr
from ..config import require
from ..data import load_data
from ..flops import peak_flops, train_flops_per_token
from ..model import TinyMoEModel
from .config import TrainConfig
from .distributed import Dist, cpu_threads, peak_memory_bytes, rng_state, seed_everything, set_rng_state, setup_dist
from .existing import RunResult, existing_run, finished_result, readable, require_same_config
from .measure import (
    CONCURRENCY_ENV,
    Interval,
    PhaseClock,
    StepTimer,
    compile_cache_counts,
    device_eval_batches,
    evaluate,
    start_seconds,
)

FINAL_STATUSES = rr.FINAL_STATUSES  # a run whose valid record says this is not trained again
# Inductor warnings a user cannot act on (each names a file of the torch install): TF32 stays off on
# purpose, as the router's logits are IEEE float32 (routing.py), and online softmax is inductor's choice.
INDUCTOR_NOISE = ("TensorFloat32 tensor cores", "\\s*Online softmax is disabled")


@contextlib.contextmanager
def quiet_inductor():
    """Training with INDUCTOR_NOISE ignored; every other warning still shows."""
    with warnings.catch_warnings():
        for message in INDUCTOR_NOISE:
            warnings.filterwarnings("ignore", message=message, category=UserWarning)
        yield


# A compiled session's first steps compile (Inductor) and, with CUDA graphs, record the graphs; they
# are timed as the compile phase, not as training steps. An eager session's first step warms up.
COMPILE_STEPS = 2
# Recompilations dynamo keeps per function before it falls back to eager: a process that trains
# several configs in turn (a sweep's kept kernel) compiles each once, training and evaluation. Every
# shape gets its own static graph (no automatic dynamic shapes): a smaller last evaluation batch, or
# an earlier configuration in the same process, then cannot turn later graphs dynamic, so a run
# compiles the same graphs in a kept kernel as in a fresh one.
RECOMPILE_LIMIT = 64


def training_loss(out) -> torch.Tensor:
    """CE + Switch aux + router z-loss (their coefficients are applied inside the MoE layers)."""
    return out.loss + out.aux_loss + out.z_loss


class Diverged(Exception):
    """Training loss became NaN/inf."""


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


def _on_rank0(ctx: Dist, fn) -> bool:
    """fn() on rank 0 alone; every rank learns whether it returned True. An error there stops every
    rank: rank 0 raises it, the others a RuntimeError pointing to it."""
    result, error = False, None
    if ctx.main:
        try:
            result = bool(fn())
        except Exception as err:  # noqa: BLE001 - re-raised below, after the other ranks heard of it
            error = err
    flags = ctx.all_reduce(torch.tensor([float(result), float(error is not None)], device=ctx.device))
    if error is not None:
        raise error
    if flags[1]:
        raise RuntimeError("rank 0 stopped the run before training (its error says why)")
    return bool(flags[0])


def train(cfg: TrainConfig) -> RunResult:
    """Train (or resume, or return the finished record of) the run `cfg` describes. Rank 0 claims
    the run directory for the whole session (rr.claim_run): a second writer gets rr.RunLocked. On
    CPU the intra-op threads are distributed.cpu_threads() for the session."""
    clock = PhaseClock(*start_seconds())
    ctx = setup_dist(cfg.device)
    threads, cpu_session_threads = torch.get_num_threads(), cpu_threads() if ctx.device.type == "cpu" else None
    if cpu_session_threads:
        torch.set_num_threads(cpu_session_threads)
    try:
        with contextlib.ExitStack() as claim:
            def claim_and_check() -> bool:
                claim.enter_context(rr.claim_run(cfg.run_dir))
                return existing_run(cfg) is not None

            if _on_rank0(ctx, claim_and_check):
                done = finished_result(cfg.run_dir)
                if ctx.main:
                    print(f"{done.run_dir}: already {done.status}, not retrained")  # news, not a warning
                return done
            return _Trainer(cfg, ctx, clock).run()
    finally:
        torch.set_num_threads(threads)
        if ctx.owns_group:
            dist.destroy_process_group()


class _Trainer:
    """One session of one run on this rank: build, resume, loop; rank 0 writes the records."""

    def __init__(self, cfg: TrainConfig, ctx: Dist, clock: PhaseClock):
        self.cfg, self.ctx, self.clock = cfg, ctx, clock
        self.run_dir = cfg.run_dir
        require(cfg.batch_size % ctx.world == 0, "TrainConfig.batch_size",
                f"global batch {cfg.batch_size} is not divisible by {ctx.world} ranks")
        self.local_batch = cfg.batch_size // ctx.world
        self.rows: list[dict] = []
        self.step = 0  # optimizer steps done
        self.n_params = self.flops_per_token = None  # known once the model is built
        self.peak, self.peak_source = None, "not measured (the run stopped before its model was built)"
        self.cache_at_start = compile_cache_counts()  # a kept process carries earlier runs' counts

    # records -------------------------------------------------------------------------------------
    def _write_config(self) -> None:
        moe = self.model.cfg.moe  # the hash table's effective seed (layer i draws seed + i), None without one
        hash_seed = moe.hash_seed if moe.router == "hash" and self.model.moe_layers() else None
        record = {"config": asdict(self.cfg), "run": self.cfg.run_name, "seed": self.cfg.seed,
                  "git": rr.git_commit(), "env": rr.environment(self.ctx.device), "world_size": self.ctx.world,
                  "data": self.data.meta, "model": {"params": self.n_params, "vocab_size": self.data.vocab_size,
                                                    "train_flops_per_token": self.flops_per_token,
                                                    "hash_seed": hash_seed}}
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
            # runs sharing this GPU (the sweep's --runs-per-gpu): above 1, tokens/s do not compare
            "concurrency": int(os.environ.get(CONCURRENCY_ENV, "1")),
            "compile_cache": {k: n - self.cache_at_start[k] for k, n in compile_cache_counts().items()},
            **self._times(),
        }

    def _times(self) -> dict:
        """Wall time so far (all sessions) and its split by phase: they sum to each other."""
        seconds = self.clock.seconds()
        return {"wall_time_s": sum(seconds.values()), "time_s": seconds, "time_start_source": self.clock.start_source}

    def _mfu(self, tokens_per_s: float | None) -> float | None:
        """Achieved FLOP/s (train FLOPs per token x tokens/s over all ranks) / (peak x ranks)."""
        if tokens_per_s is None or self.peak is None:
            return None
        return self.flops_per_token * tokens_per_s / (self.peak * self.ctx.world)

    def _finish(self, status: str, error: str | None = None, trace: str | None = None) -> RunResult:
        with self.clock.phase("records"):
            summary = self._summary(status, error, trace)
            if self.ctx.main:
                if self.rows:  # also a run resumed at its last step whose records were lost: from the checkpoint
                    rr.write_metrics(self.run_dir / rr.METRICS_FILE, self.rows)
                rr.write_json(self.run_dir / rr.SUMMARY_FILE, summary)
        return RunResult(self.run_dir, status, summary, self.rows)

    def _checkpoint(self) -> None:
        if not self.ctx.main:
            return
        rr.save_checkpoint(self.run_dir / rr.CHECKPOINT_FILE, {
            "step": self.step, "config": self.cfg.identity(),
            "model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
            "schedule": {"step": self.step, "lr": lr_at(self.cfg, max(0, self.step - 1))},
            "rng": rng_state(self.ctx.device),
            "data": {"meta": self.data.meta, "seed": self.cfg.seed, "next_step": self.step},
            "interval": self.interval.state_dict(), "metrics": self.rows, **self._times(),
        })

    def _checkpoint_state(self) -> dict | None:
        """The checkpoint to resume from, checked against this config; a truncated one is removed
        (the run starts over), a refused one or one of another config is an error."""
        path = self.run_dir / rr.CHECKPOINT_FILE
        try:
            state = rr.load_checkpoint(path)
            if state is not None:
                missing = sorted({"step", "config", "model", "optimizer", "rng", "interval", "metrics",
                                  "wall_time_s"} - set(state))
                if missing:
                    raise rr.RecordError(f"{path}: not a training checkpoint (no {', '.join(missing)})")
        except rr.UnsafeCheckpoint as err:
            raise rr.UnsafeCheckpoint(f"{err}; remove it to train the run from step 0") from None
        except rr.RecordError as err:
            if self.ctx.main:
                tqdm.write(f"{err}; removed, training from step 0", file=sys.stderr)
                path.unlink(missing_ok=True)
            return None
        if state is not None:
            require_same_config(state["config"], self.cfg, path)
        return state

    def _resume(self, state: dict | None) -> None:
        if state is None:
            return
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.interval.load_state_dict(state["interval"])
        self.step, self.rows = state["step"], state["metrics"]
        self.clock.add(state.get("time_s") or {"other": state["wall_time_s"]})  # older checkpoints: no split
        set_rng_state(state["rng"], self.ctx.device)
        if self.ctx.main:
            tqdm.write(f"{self.run_dir}: resuming at step {self.step}", file=sys.stderr)

    # set-up --------------------------------------------------------------------------------------
    def _load_data(self) -> None:
        cfg, ctx = self.cfg, self.ctx
        if ctx.main:  # rank 0 fills the data cache; the others then read it
            self.data = load_data(cfg.data_config())
        ctx.barrier()
        if not ctx.main:
            self.data = load_data(cfg.data_config())
        self.eval_batches = device_eval_batches(self.data, self.local_batch, ctx)

    def _build(self) -> None:
        cfg, ctx = self.cfg, self.ctx
        if ctx.main:
            self.peak, self.peak_source = peak_flops(ctx.device, cfg.cache_dir)
        seed_everything(cfg.seed)
        model_cfg = cfg.model_config(self.data.vocab_size)
        counts = self.data.train_token_counts() if model_cfg.moe.hash_balance == "frequency" else None
        self.model = TinyMoEModel(model_cfg, counts).to(ctx.device)
        self.n_params = sum(p.numel() for p in self.model.parameters())
        self.flops_per_token = train_flops_per_token(model_cfg)
        self.opt = _optimizer(self.model, cfg, ctx.device)
        self.interval = Interval(len(self.model.moe_layers()), cfg.num_experts, ctx.device)
        self.train_model = self.model
        if ctx.world > 1:
            self.train_model = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
        if cfg.compile:
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
            torch._dynamo.config.automatic_dynamic_shapes = False
            self.train_model = torch.compile(self.train_model, mode=cfg.compile_mode)
        # evaluation runs the compiled model too (not through DDP: ranks evaluate unequal numbers of batches)
        self.eval_model = self.train_model if ctx.world == 1 else self.model
        self.eval_compiled = False  # whether this session's first (compiling) evaluation is done
        if ctx.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(ctx.device)

    def autocast(self):
        if self.ctx.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # the loop ------------------------------------------------------------------------------------
    def run(self) -> RunResult:
        state = self._checkpoint_state()  # before the try: a refused checkpoint leaves the record as it is
        try:
            with self.clock.phase("data"):
                self._load_data()
            with self.clock.phase("build"):
                self._build()
            with self.clock.phase("checkpoint"):
                self._resume(state)
            if self.ctx.main and (self.step == 0 or not readable(self.run_dir / rr.CONFIG_FILE)):
                self.run_dir.mkdir(parents=True, exist_ok=True)
                with self.clock.phase("records"):
                    self._write_config()  # a resumed run whose config.json was lost: the checkpoint's config
            with quiet_inductor(), self.clock.phase("compile" if self.cfg.compile else "train"):
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
        timer = StepTimer(ctx.device)
        first_step = self.step
        warm_steps = COMPILE_STEPS if cfg.compile else 1  # untimed: compilation, graph capture, allocation
        tokens_per_step = self.local_batch * cfg.seq_len * ctx.world
        first_bad = torch.full((), cfg.steps + 1, device=ctx.device)  # 1 + first step with non-finite loss
        log_loss = torch.zeros((), device=ctx.device)
        t_log, log_steps = time.perf_counter(), 0
        last_checkpoint = t_log
        with tqdm(total=cfg.steps, initial=self.step, disable=not (ctx.main and cfg.progress),
                  desc=cfg.run_name, dynamic_ncols=True, file=sys.stdout) as bar:  # progress, not a warning
            while self.step < stop:
                step = self.step
                if step == first_step + warm_steps and cfg.compile:  # compiled: from here on, training
                    if ctx.device.type == "cuda":
                        torch.cuda.synchronize(ctx.device)
                    self.clock.switch("train")
                if step >= first_step + warm_steps:
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
                due = eval_now and time.perf_counter() - last_checkpoint >= cfg.checkpoint_interval_s
                if due or self.step == stop:
                    with self.clock.phase("checkpoint"):
                        self._checkpoint()
                    last_checkpoint = time.perf_counter()
                t_log, log_steps = time.perf_counter(), 0
        return self._finish("ok" if self.step >= cfg.steps else "stopped")

    def _evaluate(self, timer: StepTimer, tokens_per_step: int) -> None:
        timed_steps, seconds = timer.stop()
        tokens_per_s = tokens_per_step * timed_steps / seconds if timed_steps else None
        row = {"step": self.step, "tokens": self.step * tokens_per_step, "lr": lr_at(self.cfg, self.step - 1)}
        row |= self.interval.reduce(self.ctx)
        with self.clock.phase("eval" if self.eval_compiled or not self.cfg.compile else "compile"):
            row |= evaluate(self.model, self.data, self.local_batch, self.ctx, self.autocast, forward=self.eval_model,
                            batches=self.eval_batches)
        self.eval_compiled = True
        mem, _ = peak_memory_bytes(self.ctx.device)
        row |= {"tokens_per_s": tokens_per_s, "timed_steps": timed_steps, "mfu": self._mfu(tokens_per_s),
                "peak_mem_bytes": mem, "wall_time_s": self.clock.total()}
        self.rows.append(rr.jsonable(row))
        if self.ctx.main:
            with self.clock.phase("records"):
                rr.write_metrics(self.run_dir / rr.METRICS_FILE, self.rows)
