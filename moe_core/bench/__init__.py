"""Benchmarks: Experiment B (capacity factor vs drops and speed) and the MoE-layer-vs-dense benchmark.

Why: the capacity factor trades dropped tokens against padded compute and memory traffic. The
capacity bench measures both sides on one (T, E, k) routing problem at a time, from three routing
sources (i.i.d. random logits, Zipf-skewed logits, a trained model's router logits on validation
text); the layer bench says what a whole MoE layer costs next to a dense FFN of equal active FLOPs.

Method, shared by both: every timed call is warmed up, then timed ``repeats`` times with CUDA events
(perf_counter + synchronize on CPU), inputs rotated among ``sets`` independent sets so caches do
not flatter; the median is reported. Memory traffic is counted (each input read once, each output
written once) and divided by the bandwidth of a device-to-device copy measured in the same run.

    python -m moe_core.bench {capacity,layer,all} [--small] [--device cuda|cpu] [--out DIR]
                             [--checkpoint PATH] [--set key=value ...]

Configs live in params/experiment_b.yaml (sections capacity, layer and their *_small CPU versions).

Legend: T tokens in the routing group, D model dim, F expert hidden, E experts, K top-k, C capacity,
A assignments, R rows of the dispatch buffer, L MoE layers, N logit sets.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from statistics import median
from typing import Callable, NamedTuple, Sequence

import torch
import yaml

from .. import records as rr
from ..config import MoEConfig, ModelConfig, cf_label, parse_overrides
from ..dispatch import BACKEND_FNS, buffer_capacity
from ..flops import ffn_forward_flops_per_token, peak_flops
from ..model import DenseFeedForward, TinyMoEModel
from ..moe import MoEFeedForward
from ..routing import Router, Routing, capacity_for, routing_metrics

PARAMS = Path(__file__).resolve().parents[2] / "params" / "experiment_b.yaml"
DEFAULT_OUT = "runs/experiment_b"
SOURCE_KINDS = ("random", "skewed[:S]", "checkpoint[:PATH]")
LOGIT_ROUTERS = ("top1", "topk_hard", "softk")  # token-choice routers that read logits
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
COPY_BYTES = {"cuda": 1 << 28, "cpu": 1 << 25}  # per buffer of the copy-bandwidth reference


def _require(ok: bool, owner: str, name: str, msg: str) -> None:
    if not ok:
        raise ValueError(f"{owner}.{name}: {msg}")


# -- routing sources --------------------------------------------------------------------------------
@dataclass(frozen=True)
class RoutingSource:
    """A parsed routing-source spec: ``random``, ``skewed[:S]`` (Zipf exponent S, default 1.0) or
    ``checkpoint[:PATH]`` (a bare ``checkpoint`` takes the path from the bench config)."""

    kind: str
    zipf_s: float = 1.0
    path: str | None = None

    @classmethod
    def parse(cls, spec: str) -> RoutingSource:
        kind, sep, arg = str(spec).partition(":")
        if kind == "random" and not sep:
            return cls("random")
        if kind == "skewed":
            try:
                s = float(arg) if sep else 1.0
            except ValueError:
                s = -1.0
            if not (math.isfinite(s) and s >= 0):
                raise ValueError(f"routing source {spec!r}: Zipf exponent must be a number >= 0")
            return cls("skewed", zipf_s=s)
        if kind == "checkpoint":
            return cls("checkpoint", path=arg or None)
        raise ValueError(f"unknown routing source {spec!r}; valid: {', '.join(SOURCE_KINDS)}")

    @property
    def name(self) -> str:
        return {"random": "random", "skewed": f"skewed:{self.zipf_s:g}", "checkpoint": "checkpoint"}[self.kind]


def synthetic_logits(source: RoutingSource, num_sets: int, num_tokens: int, num_experts: int,
                     seed: int) -> torch.Tensor:
    """[N, T, E] float32 CPU logits: i.i.d. N(0, 1), plus log Zipf popularity for ``skewed``
    (expert e has popularity proportional to (e + 1)^-s, so expert 0 is the most popular)."""
    gen = torch.Generator().manual_seed(seed)
    logits_NTE = torch.randn(num_sets, num_tokens, num_experts, generator=gen)
    if source.kind == "skewed":
        logits_NTE += -source.zipf_s * torch.log(torch.arange(1, num_experts + 1, dtype=torch.float32))
    return logits_NTE


# TrainConfig field -> DataConfig field (TrainConfig.seed is the training seed, not the data's).
_DATA_KEYS = {"corpus": "corpus", "tokenizer": "tokenizer", "bpe_vocab_size": "vocab_size", "seq_len": "seq_len",
              "cache_dir": "cache_dir", "max_stories": "max_stories", "data_seed": "seed",
              "synthetic_chars": "synthetic_chars", "val_fraction": "val_fraction"}


def _known_fields(cls, values: dict) -> dict:
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in values.items() if k in names}


@torch.no_grad()
def router_logits_from_checkpoint(path: str | Path, num_tokens: int, *, device: str | torch.device = "cpu",
                                  batch_size: int = 16) -> torch.Tensor:
    """[L, T, E] float32 CPU router logits of every MoE layer of a trained TinyMoEModel on the first
    ``num_tokens`` tokens of its validation windows (moe_core.data, the run's own corpus/tokenizer).

    The checkpoint is ``{"model": state_dict, "config": flat TrainConfig dict}`` as moe_core.train
    writes it. Shapes (vocab, dim, seq_len, experts, hidden, layers) come from the weights; the
    rest from the config keys that exist, so older or partial configs still load. Logits are the
    router's (before any aux-free bias, which changes selection only).
    """
    from ..data import DataConfig, load_data  # imported here: the bench needs data only for this source

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    state = torch.load(path, map_location="cpu", weights_only=False)
    config = state.get("config") or {}
    config = config.get("config", config)  # tolerate a config.json-shaped record
    weights = {k.removeprefix("_orig_mod.").removeprefix("module."): v for k, v in state["model"].items()}
    router_keys = sorted(k for k in weights if k.endswith("router.weight_ED"))
    if not router_keys:
        raise ValueError(f"{path}: no MoE layer with a learned router (hash or dense model?)")
    num_experts, dim = weights[router_keys[0]].shape
    w1_key = router_keys[0].replace("router.weight_ED", "experts.w1_EDF")
    vocab_size = weights["tok_emb.weight"].shape[0]
    moe = MoEConfig(**{**_known_fields(MoEConfig, config), "dim": dim, "num_experts": num_experts,
                       "hidden": weights[w1_key].shape[-1]})
    model_cfg = ModelConfig(**{**_known_fields(ModelConfig, config), "moe": moe, "dim": dim,
                               "vocab_size": vocab_size, "seq_len": weights["pos_emb.weight"].shape[0],
                               "layers": len({k.split(".")[1] for k in weights if k.startswith("blocks.")})})
    model = TinyMoEModel(model_cfg)
    model.load_state_dict(weights)
    model.to(device).eval()

    seq_len = model_cfg.seq_len
    data_values = {_DATA_KEYS[k]: v for k, v in config.items() if k in _DATA_KEYS}
    data = load_data(DataConfig(**{**data_values, "seq_len": seq_len, "eval_windows": math.ceil(num_tokens / seq_len)}))
    if data.vocab_size > vocab_size:
        raise ValueError(f"{path}: data vocabulary {data.vocab_size} exceeds the model's {vocab_size}")
    captured: list[list[torch.Tensor]] = [[] for _ in model.moe_layers()]
    hooks = [layer.router.register_forward_hook(lambda mod, args, out, i=i: captured[i].append(out[1].float().cpu()))
             for i, layer in enumerate(model.moe_layers())]
    try:
        seen = 0
        for x_BS, _ in data.eval_batches(batch_size):
            if seen >= num_tokens:
                break
            model(x_BS.to(device))
            seen += x_BS.numel()
    finally:
        for hook in hooks:
            hook.remove()
    if seen < num_tokens:
        raise ValueError(f"{path}: validation text gives {seen} tokens in windows of {seq_len}, "
                         f"fewer than the {num_tokens} asked for")
    return torch.stack([torch.cat(chunks)[:num_tokens] for chunks in captured])


# -- routing given logits ---------------------------------------------------------------------------
class LogitsRouter(Router):
    """A Router whose logits are given (``logits_TE``) instead of computed as x W^T, so a whole
    MoEFeedForward can be timed under a chosen routing source (random, skewed, trained)."""

    def __init__(self, cfg: MoEConfig, logits_TE: torch.Tensor | None = None):
        if cfg.router not in LOGIT_ROUTERS:
            raise ValueError(f"router: the bench routes given logits with {', '.join(LOGIT_ROUTERS)}, "
                             f"not {cfg.router!r}")
        super().__init__(cfg)
        self.logits_TE = logits_TE

    def logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        if self.logits_TE is None or self.logits_TE.shape[0] != x_TD.shape[0]:
            raise ValueError(f"logits_TE: need logits for {x_TD.shape[0]} tokens")
        return self.logits_TE


def route_logits(logits_TE: torch.Tensor, cfg: MoEConfig) -> tuple[Routing, torch.Tensor]:
    """(Routing, probs_TE) that MoEFeedForward with ``cfg`` would produce for these router logits."""
    if cfg.router not in LOGIT_ROUTERS:
        raise ValueError(f"router: the bench routes given logits with {', '.join(LOGIT_ROUTERS)}, not {cfg.router!r}")
    routing, _, probs_TE = Router(cfg).route(logits_TE)
    return routing, probs_TE


def capacity_metrics(logits_TE: torch.Tensor, cfg: MoEConfig) -> dict[str, float]:
    """drop_rate, token_drop_rate, load_cv, max_vio (moe_core.routing.routing_metrics) as floats."""
    return _metrics(*route_logits(logits_TE, cfg))


def _metrics(routing: Routing, probs_TE: torch.Tensor) -> dict[str, float]:
    stats = routing_metrics(routing, probs_TE)
    return {k: float(stats[k]) for k in ("drop_rate", "token_drop_rate", "load_cv", "max_vio")}


# -- timing and traffic -----------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_median_ms(fn: Callable, inputs: Sequence, device: torch.device, *, warmup: int, repeats: int) -> float:
    """Median milliseconds of fn(inputs[i % len(inputs)]) over ``repeats`` calls after ``warmup``
    calls; CUDA events on GPU (the device's own timeline), perf_counter + synchronize elsewhere."""
    for i in range(warmup):
        fn(inputs[i % len(inputs)])
    _sync(device)
    times = []
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
        for i, (start, end) in enumerate(events):
            start.record()
            fn(inputs[i % len(inputs)])
            end.record()
        _sync(device)
        times = [start.elapsed_time(end) for start, end in events]
    else:
        for i in range(repeats):
            t0 = time.perf_counter()
            fn(inputs[i % len(inputs)])
            _sync(device)
            times.append((time.perf_counter() - t0) * 1e3)
    return median(times)


def copy_bandwidth(device: torch.device, dtype: torch.dtype, *, warmup: int, repeats: int, sets: int) -> float:
    """Bytes/s of ``torch.empty_like(x).copy_(x)`` on large buffers (bytes read + written): the
    device-to-device reference that achieved bandwidths are a fraction of."""
    numel = COPY_BYTES[device.type] // dtype.itemsize
    buffers = [torch.ones(numel, dtype=dtype, device=device) for _ in range(sets)]
    ms = time_median_ms(lambda x: torch.empty_like(x).copy_(x), buffers, device, warmup=warmup, repeats=repeats)
    return 2 * buffers[0].nbytes / (ms / 1e3)


def buffer_rows(routing: Routing, backend: str) -> int:
    """R: rows a backend moves into its expert buffer (padded/einsum [E, C, D], grouped: every
    assignment sorted by expert, loop: the kept assignments)."""
    if backend in ("padded", "einsum"):
        return routing.num_experts * buffer_capacity(routing)
    if backend == "grouped":
        return routing.expert_A.numel()
    return int(routing.keep_A.sum())


def routing_bytes(routing: Routing) -> int:
    """Bytes of the routing tensors that dispatch and combine read (token, expert, slot, keep, weight)."""
    return sum(t.nbytes for t in (routing.token_A, routing.expert_A, routing.slot_A, routing.keep_A,
                                  routing.weight_A))


def dispatch_combine_bytes(num_tokens: int, dim: int, rows: int, elem_bytes: int, index_bytes: int) -> int:
    """Ideal traffic of dispatch + combine, each input read once and each output written once:
    dispatch reads x [T, D] and writes the buffer [R, D]; combine reads the buffer and writes
    y [T, D]; both read the routing tensors (``index_bytes``) once in all."""
    return 2 * (num_tokens + rows) * dim * elem_bytes + index_bytes


class IdentityExperts:
    """Stands in for Experts, so a backend's time is its dispatch + combine alone."""

    def one(self, x_ND: torch.Tensor, e: int) -> torch.Tensor:
        return x_ND

    def batched(self, x_ECD: torch.Tensor) -> torch.Tensor:
        return x_ECD

    def grouped(self, x_ND: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
        return x_ND


def compiled(module: torch.nn.Module, mode: str) -> Callable:
    """``module`` itself for mode "none", else a fresh torch.compile of it (dynamo reset first, so a
    module whose backend changed is traced again). The layer bench and tools/profile_layer.py share it."""
    if mode == "none":
        return module
    torch._dynamo.reset()
    return torch.compile(module, mode=mode)


def fwd_bwd(module: torch.nn.Module) -> Callable:
    """A timed step on inputs (x, dy, *more): forward on x, then the gradients of y . dy with
    respect to x, ``more`` and every parameter (autograd.grad, so nothing accumulates between
    calls). The same call serves the MoE layer and the dense FFN."""
    params = list(module.parameters())

    def step(inputs):
        x_TD, dy_TD = inputs[:2]
        out = module(x_TD)
        y_TD = out[0] if isinstance(out, tuple) else out
        torch.autograd.grad(y_TD, [x_TD, *inputs[2:], *params], dy_TD, allow_unused=True)
    return step


# -- configs ----------------------------------------------------------------------------------------
@dataclass
class BenchConfig:
    """Device, precision and timing method shared by the benchmarks."""

    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto (bf16 on CUDA, float32 elsewhere) | float32 | bfloat16 | float16
    warmup: int = 3
    repeats: int = 20  # timed calls; the median is reported
    sets: int = 3  # independent input sets, rotated so that caches do not flatter
    seed: int = 0

    SECTION = ""  # its section in params/experiment_b.yaml

    def __post_init__(self) -> None:
        owner = type(self).__name__
        for name, low in (("warmup", 1), ("repeats", 20), ("sets", 3), ("seed", 0)):
            value = getattr(self, name)
            _require(isinstance(value, int) and value >= low, owner, name, f"must be an integer >= {low}, got {value!r}")
        _require(self.dtype == "auto" or self.dtype in DTYPES, owner, "dtype",
                 f"unknown {self.dtype!r}; valid: auto, {', '.join(DTYPES)}")
        _require(self.device in ("auto", "cpu", "cuda") or str(self.device).startswith("cuda:"), owner, "device",
                 f"unknown {self.device!r}; valid: auto, cpu, cuda, cuda:N")
        _require(not str(self.device).startswith("cuda") or torch.cuda.is_available(), owner, "device",
                 f"{self.device} asked for, but torch.cuda.is_available() is False")

    @property
    def torch_device(self) -> torch.device:
        return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if self.device == "auto" else self.device)

    @property
    def torch_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if self.torch_device.type == "cuda" else torch.float32
        return DTYPES[self.dtype]

    @classmethod
    def from_dict(cls, values: dict) -> BenchConfig:
        """Unknown keys are an error naming the valid ones (a typo must not silently do nothing)."""
        unknown = sorted(set(values) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown {cls.__name__} key(s) {unknown}; valid: {', '.join(f.name for f in fields(cls))}")
        return cls(**values)


@dataclass
class CapacityBenchConfig(BenchConfig):
    """Experiment B: for each routing source x E x k x capacity factor (None = dropless), the drop
    statistics, dispatch + combine time and traffic (identity experts), and the MoE layer's
    forward + backward time. Defaults are CPU-sized (tests, notebook); the grid is in params/."""

    tokens: int = 512
    dim: int = 64
    hidden: int = 64
    experts: list[int] = field(default_factory=lambda: [4, 8])
    top_k: list[int] = field(default_factory=lambda: [1, 2])
    capacity_factors: list[float | None] = field(default_factory=lambda: [1.0, 1.25, None])
    sources: list[str] = field(default_factory=lambda: ["random", "skewed:1.0"])
    checkpoint: str | None = None  # path for a bare "checkpoint" source
    router: str = "softk"
    backend: str = "padded"

    SECTION = "capacity"

    def __post_init__(self) -> None:
        super().__post_init__()
        owner = type(self).__name__
        for name in ("tokens", "dim", "hidden"):
            value = getattr(self, name)
            _require(isinstance(value, int) and value >= 1, owner, name, f"must be an integer >= 1, got {value!r}")
        for name in ("experts", "top_k", "capacity_factors", "sources"):
            _require(isinstance(getattr(self, name), list) and getattr(self, name), owner, name, "must be a non-empty list")
        _require(self.router in LOGIT_ROUTERS, owner, "router", f"must be one of {', '.join(LOGIT_ROUTERS)}")
        _require(self.backend in BACKEND_FNS, owner, "backend", f"unknown {self.backend!r}; valid: {', '.join(BACKEND_FNS)}")
        try:
            self.parsed_sources()
            self.moe_configs(self.experts)  # the core names a bad k, E or CF itself
        except ValueError as err:
            raise ValueError(f"{owner}.{err}") from None
        for src in self.parsed_sources():
            if src.kind == "checkpoint" and not Path(src.path).is_file():
                raise ValueError(f"{owner}.sources: checkpoint not found: {src.path}")

    def parsed_sources(self) -> list[RoutingSource]:
        out = []
        for spec in self.sources:
            src = RoutingSource.parse(spec)
            if src.kind == "checkpoint" and src.path is None:
                if self.checkpoint is None:
                    raise ValueError("sources: 'checkpoint' needs a path: set checkpoint (--checkpoint PATH) "
                                     "or write checkpoint:PATH")
                src = dataclasses.replace(src, path=self.checkpoint)
            out.append(src)
        return out

    def moe_configs(self, experts: Sequence[int]) -> list[MoEConfig]:
        return [MoEConfig(dim=self.dim, hidden=self.hidden, num_experts=e, top_k=k, router=self.router,
                          capacity_factor=cf, backend=self.backend)
                for e in experts for k in self.top_k for cf in self.capacity_factors]


@dataclass
class LayerBenchConfig(BenchConfig):
    """The MoE layer's forward + backward against a dense FFN of hidden K*F (equal active FLOPs),
    per dispatch backend and problem shape. Defaults are CPU-sized; the GPU shapes are in params/."""

    shapes: list[dict] = field(default_factory=lambda: [
        {"tokens": 1024, "dim": 64, "hidden": 256, "experts": 8, "top_k": 2},
        {"tokens": 1024, "dim": 64, "hidden": 64, "experts": 16, "top_k": 4}])
    capacity_factor: float | None = 1.25
    router: str = "softk"
    backends: list[str] = field(default_factory=lambda: list(BACKEND_FNS))
    # none (eager) | a torch.compile mode; the MoE layer and its dense baseline get the same mode,
    # since training runs compiled and Inductor fuses the pointwise dispatch/combine work
    compile_modes: list[str] = field(default_factory=lambda: ["none"])

    SECTION = "layer"
    SHAPE_KEYS = ("tokens", "dim", "hidden", "experts", "top_k")

    def __post_init__(self) -> None:
        super().__post_init__()
        owner = type(self).__name__
        _require(isinstance(self.shapes, list) and self.shapes, owner, "shapes", "must be a non-empty list")
        for shape in self.shapes:
            _require(isinstance(shape, dict) and set(shape) == set(self.SHAPE_KEYS)
                     and all(isinstance(v, int) and v >= 1 for v in shape.values()), owner, "shapes",
                     f"each shape maps exactly {', '.join(self.SHAPE_KEYS)} to integers >= 1, got {shape!r}")
        unknown = sorted(set(self.backends) - set(BACKEND_FNS))
        _require(bool(self.backends) and not unknown, owner, "backends", f"unknown {unknown}; valid: {', '.join(BACKEND_FNS)}")
        from ..train import COMPILE_MODES

        bad_modes = sorted(set(self.compile_modes) - {"none", *COMPILE_MODES})
        _require(bool(self.compile_modes) and not bad_modes, owner, "compile_modes",
                 f"unknown {bad_modes}; valid: none, {', '.join(COMPILE_MODES)}")
        try:
            self.moe_configs()
        except ValueError as err:
            raise ValueError(f"{owner}.{err}") from None

    def moe_configs(self) -> list[MoEConfig]:
        return [MoEConfig(dim=s["dim"], hidden=s["hidden"], num_experts=s["experts"], top_k=s["top_k"],
                          router=self.router, capacity_factor=self.capacity_factor) for s in self.shapes]


# -- the benchmarks ---------------------------------------------------------------------------------
def _inputs(cfg: BenchConfig, num_tokens: int, dim: int, offset: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``sets`` pairs (x_TD requiring grad, dy_TD) on the device, seeded."""
    gen = torch.Generator().manual_seed(cfg.seed + 1000 + offset)
    dev, dtype = cfg.torch_device, cfg.torch_dtype
    return [tuple(torch.randn(num_tokens, dim, generator=gen).to(dev, dtype).requires_grad_(i == 0) for i in range(2))
            for _ in range(cfg.sets)]


def _guarded(measure: Callable[[], dict]) -> dict:
    """Run one measurement; an out-of-memory leaves a row with status 'oom' instead of ending the run."""
    try:
        return {"status": "ok", **measure()}
    except torch.OutOfMemoryError:
        pass
    torch.cuda.empty_cache()  # out here, once the traceback no longer holds the failed call's tensors
    return {"status": "oom"}


def _capacity_cell(cfg: CapacityBenchConfig, moe: MoEConfig, logits_NTE: torch.Tensor,
                   xs: list[tuple[torch.Tensor, torch.Tensor]], copy_bps: float) -> dict:
    dev, timing = cfg.torch_device, {"warmup": cfg.warmup, "repeats": cfg.repeats}
    logits = [logits_NTE[i].to(dev).requires_grad_() for i in range(logits_NTE.shape[0])]
    # each timed input: (x, dy, logits) so the layer's backward also runs through the gate
    inputs = [(*xs[i % len(xs)], logits[i % len(logits)]) for i in range(max(len(xs), len(logits)))]
    routed = [route_logits(lg.detach(), moe) for lg in logits]
    metrics = [_metrics(*r) for r in routed]
    row = {k: sum(m[k] for m in metrics) / len(metrics) for k in metrics[0]}

    def measure() -> dict:
        routings = [routing for routing, _ in routed]
        pairs = [(x.detach(), routings[i % len(routings)]) for i, (x, _, _) in enumerate(inputs)]
        backend, experts = BACKEND_FNS[moe.backend], IdentityExperts()
        with torch.no_grad():
            dispatch_ms = time_median_ms(lambda p: backend(p[0], p[1], experts), pairs, dev, **timing)
        traffic = [dispatch_combine_bytes(cfg.tokens, cfg.dim, buffer_rows(r, moe.backend), x.element_size(),
                                          routing_bytes(r)) for x, r in pairs]
        with dev:  # initialised on the device: a CPU randn of E*D*F weights per cell would dominate
            layer = MoEFeedForward(moe).to(cfg.torch_dtype)
            layer.router = LogitsRouter(moe)
        step = fwd_bwd(layer)

        def layer_step(inp):
            layer.router.logits_TE = inp[2]
            step(inp)
        layer_ms = time_median_ms(layer_step, inputs, dev, **timing)
        bytes_moved = sum(traffic) / len(traffic)
        return {"dispatch_ms": dispatch_ms, "dispatch_bytes": bytes_moved,
                "dispatch_gbps": bytes_moved / dispatch_ms / 1e6,
                "dispatch_bw_frac": bytes_moved / (dispatch_ms / 1e3) / copy_bps,
                "dispatch_tokens_per_s": cfg.tokens / (dispatch_ms / 1e3),
                "layer_ms": layer_ms, "layer_tokens_per_s": cfg.tokens / (layer_ms / 1e3)}

    return {**row, **_guarded(measure)}


def run_capacity(cfg: CapacityBenchConfig, out_dir: str | Path | None = None) -> "pd.DataFrame":
    """Experiment B over cfg's grid; one tidy row per (source, E, k, CF). Appends to
    ``out_dir``/capacity.jsonl and rewrites capacity.csv when ``out_dir`` is given."""
    import pandas as pd

    dev, timing = cfg.torch_device, {"warmup": cfg.warmup, "repeats": cfg.repeats}
    problems = []  # (source, E, logits_NTE): every source resolved and checked before any timing
    for src in cfg.parsed_sources():
        if src.kind == "checkpoint":
            logits_NTE = router_logits_from_checkpoint(src.path, cfg.tokens, device=dev)
            try:
                cfg.moe_configs([logits_NTE.shape[-1]])
            except ValueError as err:
                raise ValueError(f"checkpoint {src.path} (E={logits_NTE.shape[-1]}): {err}") from None
            problems.append((src, logits_NTE.shape[-1], logits_NTE))
        else:
            problems += [(src, e, synthetic_logits(src, cfg.sets, cfg.tokens, e, cfg.seed)) for e in cfg.experts]
    copy_bps = copy_bandwidth(dev, cfg.torch_dtype, sets=cfg.sets, **timing)
    xs = _inputs(cfg, cfg.tokens, cfg.dim)
    rows = []
    for src, num_experts, logits_NTE in problems:
        for moe in cfg.moe_configs([num_experts]):
            rows.append({"bench": "capacity", "source": src.name, "num_experts": num_experts, "top_k": moe.top_k,
                         "capacity_factor": moe.capacity_factor, "cf_label": cf_label(moe.capacity_factor),
                         "capacity": capacity_for(moe.capacity_factor, cfg.tokens, moe.top_k, num_experts),
                         "tokens": cfg.tokens, "dim": cfg.dim, "hidden": cfg.hidden, "router": cfg.router,
                         "backend": cfg.backend, "logit_sets": logits_NTE.shape[0],
                         **_capacity_cell(cfg, moe, logits_NTE, xs, copy_bps), "copy_gbps": copy_bps / 1e9})
    return _record(cfg, rows, out_dir, {"copy_bytes_per_s": copy_bps})


def run_layer(cfg: LayerBenchConfig, out_dir: str | Path | None = None) -> "pd.DataFrame":
    """MoE layer forward + backward / dense FFN (hidden K*F) forward + backward, per shape and
    backend, with MFU against the measured bf16 matmul peak on CUDA. Appends to
    ``out_dir``/layer.jsonl and writes layer_<run>.json when ``out_dir`` is given."""
    dev, dtype, timing = cfg.torch_device, cfg.torch_dtype, {"warmup": cfg.warmup, "repeats": cfg.repeats}
    peak, peak_source = None, "cpu: no peak, MFU not reported"
    if dev.type == "cuda":
        peak, peak_source = peak_flops(dev)
    rows = []
    for i, (shape, moe) in enumerate(zip(cfg.shapes, cfg.moe_configs())):
        torch.manual_seed(cfg.seed)
        inputs = _inputs(cfg, shape["tokens"], shape["dim"], offset=i)
        flops = 3.0 * shape["tokens"] * ffn_forward_flops_per_token(moe)
        with dev:
            dense = DenseFeedForward(moe.dim, moe.top_k * moe.hidden, moe.activation).to(dtype)
            layer = MoEFeedForward(moe).to(dtype)
        dense_flops = 3.0 * shape["tokens"] * ffn_forward_flops_per_token(moe, router=False)
        for mode in cfg.compile_modes:
            dense_ms = _guarded(lambda: {"ms": time_median_ms(fwd_bwd(compiled(dense, mode)), inputs, dev, **timing)}
                                ).get("ms", math.nan)
            for backend in cfg.backends:
                layer.backend = backend
                result = _guarded(lambda: {"moe_ms": time_median_ms(fwd_bwd(compiled(layer, mode)), inputs, dev,
                                                                    **timing)})
                moe_ms = result.get("moe_ms", math.nan)
                rows.append({"bench": "layer", "tokens": shape["tokens"], "dim": moe.dim, "hidden": moe.hidden,
                             "num_experts": moe.num_experts, "top_k": moe.top_k, "capacity_factor": moe.capacity_factor,
                             "router": cfg.router, "backend": backend, "compile_mode": mode, "status": result["status"],
                             "moe_ms": moe_ms, "dense_ms": dense_ms, "moe_over_dense": moe_ms / dense_ms,
                             "moe_tokens_per_s": shape["tokens"] / (moe_ms / 1e3),
                             "dense_tokens_per_s": shape["tokens"] / (dense_ms / 1e3),
                             "moe_train_flops": flops, "dense_train_flops": dense_flops,
                             "moe_mfu": flops / (moe_ms / 1e3) / peak if peak else None,
                             "dense_mfu": dense_flops / (dense_ms / 1e3) / peak if peak else None})
        del dense, layer
    return _record(cfg, rows, out_dir, {"peak_flops": peak, "peak_flops_source": peak_source})


# -- records ----------------------------------------------------------------------------------------
def _record(cfg: BenchConfig, rows: list[dict], out_dir: str | Path | None, extra: dict) -> "pd.DataFrame":
    """Stamp rows with the run's identity; with ``out_dir``, append them to <section>.jsonl, rewrite
    <section>.csv (every row so far, tidy) and write <section>_<run_id>.json (this run in full)."""
    import pandas as pd

    dev = cfg.torch_device
    env, git = rr.environment(dev), rr.git_commit()
    run_id = f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"
    stamp = {"run_id": run_id, "device_name": env["device"], "dtype": str(cfg.torch_dtype).removeprefix("torch."),
             "torch": env["torch"], "cuda": env["cuda"], "commit": git["commit"], "seed": cfg.seed,
             "repeats": cfg.repeats, "sets": cfg.sets}
    rows = [rr.jsonable({**row, **stamp}) for row in rows]
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        name = cfg.SECTION
        with open(out / f"{name}.jsonl", "a") as f:
            f.writelines(json.dumps(row, allow_nan=False) + "\n" for row in rows)
        pd.DataFrame(rr.read_metrics(out / f"{name}.jsonl")).to_csv(out / f"{name}.csv", index=False)
        rr.write_json(out / f"{name}_{run_id}.json", {"run_id": run_id, "config": asdict(cfg), "git": git,
                                                     "env": env, **extra, "rows": rows})
    return pd.DataFrame(rows)


@dataclass
class TrainBenchConfig(BenchConfig):
    """Training tokens/s of the real trainer (moe_core.train: AdamW, bf16 autocast on CUDA, grad
    clipping, routing stats) per router x batch size x dispatch backend x compile mode, on the
    synthetic char corpus. tokens/s is the trainer's own: timed training steps only, median over
    intervals. ``routers`` empty: the model's router only; top1 runs with top_k=1."""

    routers: list[str] = field(default_factory=list)
    batch_sizes: list[int] = field(default_factory=lambda: [8])
    backends: list[str] = field(default_factory=lambda: ["padded", "grouped"])
    compile_modes: list[str] = field(default_factory=lambda: ["none"])  # none | a torch.compile mode
    model: dict = field(default_factory=lambda: {"dim": 32, "layers": 2, "heads": 2, "hidden": 64,
                                                 "num_experts": 4, "top_k": 2, "router": "softk", "seq_len": 32})
    steps: int = 12
    intervals: int = 3  # tokens/s is the median over these; the first holds warm-up and compilation

    SECTION = "train"

    def train_configs(self, out_dir: str) -> list:
        from ..train import TrainConfig

        routers = self.routers or [self.model.get("router", "softk")]
        model = {k: v for k, v in self.model.items() if k != "router"}
        return [TrainConfig(**{**model, "router": r, **({"top_k": 1} if r == "top1" else {})}, batch_size=b,
                            backend=backend, compile=mode != "none", compile_mode="default" if mode == "none" else mode,
                            steps=self.steps, warmup=min(10, self.steps),
                            eval_interval=max(1, self.steps // self.intervals), eval_windows=4,
                            synthetic_chars=200_000, progress=False, seed=self.seed, device=str(self.torch_device),
                            experiment="bench_train", out_dir=out_dir, run=f"{r}_b{b}_{backend}_{mode}")
                for r in routers for b in self.batch_sizes for backend in self.backends for mode in self.compile_modes]

    def __post_init__(self) -> None:
        super().__post_init__()
        try:
            self.train_configs("unused")
        except ValueError as err:
            raise ValueError(f"{type(self).__name__}.{err}") from None


def run_train(cfg: TrainBenchConfig, out_dir: str | Path | None = None) -> "pd.DataFrame":
    import tempfile

    from ..train import train

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
    return _record(cfg, rows, out_dir, {"peak_flops": peak, "peak_flops_source": source})


# -- joining with Experiment A ----------------------------------------------------------------------
JOIN_COLUMNS = ["run", "status", "router", "num_experts", "top_k", "capacity_factor", "cf_label", "best_val_ppl",
                "train_tokens_per_s", "source", "drop_rate", "token_drop_rate", "dispatch_tokens_per_s",
                "layer_tokens_per_s"]
_BENCH_JOIN = ["drop_rate", "token_drop_rate", "dispatch_tokens_per_s", "layer_tokens_per_s"]


def training_runs(runs_dir: str | Path, experiment: str = "experiment_a") -> "pd.DataFrame":
    """One row per finished (status ok) training run of runs_dir/experiment, read by
    moe_core.results: router ('dense' for the dense baseline), E, k, CF, best validation
    perplexity, median tokens/s."""
    import pandas as pd

    from ..analysis.results import load_experiment  # results imports this module (cf_label)

    runs = load_experiment(runs_dir, experiment).runs
    if runs.empty or "best_val_ppl" not in runs:
        return pd.DataFrame(columns=JOIN_COLUMNS[:9])
    runs = runs[(runs["status"] == "ok") & runs["best_val_ppl"].notna()]
    runs = runs.drop(columns="router").rename(columns={"label": "router", "median_tokens_per_s": "train_tokens_per_s"})
    return runs[JOIN_COLUMNS[:9]]


def join_with_training(bench_df: "pd.DataFrame", runs_dir: str | Path, experiment: str = "experiment_a") -> "pd.DataFrame":
    """Capacity factor vs perplexity and tokens/s: each Experiment A run (training_runs) with the
    capacity bench's drop rates and speeds at its (E, k, CF), one row per routing source (bench
    rows of repeated runs averaged). Columns JOIN_COLUMNS; empty, with them, when there are no runs."""
    train = training_runs(runs_dir, experiment)
    keys = ["num_experts", "top_k", "cf_label"]
    if bench_df.empty or train.empty:
        return train.reindex(columns=JOIN_COLUMNS)
    bench = (bench_df.assign(cf_label=bench_df["capacity_factor"].map(cf_label))
             .groupby(["source", *keys], as_index=False)[_BENCH_JOIN].mean())
    joined = train.astype({"num_experts": "Int64", "top_k": "Int64"}).merge(
        bench.astype({"num_experts": "Int64", "top_k": "Int64"}), on=keys, how="left")
    return joined[JOIN_COLUMNS]


# -- tables and charts ------------------------------------------------------------------------------
TABLES = {
    "capacity": ["source", "num_experts", "top_k", "cf_label", "capacity", "drop_rate", "token_drop_rate",
                 "load_cv", "max_vio", "dispatch_ms", "dispatch_bw_frac", "layer_ms", "layer_tokens_per_s", "status"],
    "layer": ["tokens", "dim", "hidden", "num_experts", "top_k", "backend", "compile_mode", "moe_ms", "dense_ms", "moe_over_dense",
              "moe_mfu", "dense_mfu", "status"],
    "train": ["router", "capacity_factor", "batch_size", "backend", "compile_mode", "tokens_per_s", "ms_per_step", "mfu",
              "status"],
}


def table(df: "pd.DataFrame", section: str) -> str:
    """The printed summary of a bench frame."""
    return df[[c for c in TABLES[section] if c in df]].to_string(index=False, float_format=lambda v: f"{v:.4g}")


def capacity_chart(df: "pd.DataFrame"):
    """Drop rate, token drop rate and layer tokens/s against the capacity factor (altair), one
    column per E, a line per (source, k)."""
    import altair as alt

    order = sorted(df["cf_label"].unique(), key=lambda s: math.inf if s == "dropless" else float(s))
    long = df.assign(series=df["source"] + " k=" + df["top_k"].astype(str)).melt(
        id_vars=["series", "num_experts", "cf_label"], value_vars=["drop_rate", "token_drop_rate", "layer_tokens_per_s"],
        var_name="metric")
    return alt.Chart(long).mark_line(point=True).encode(
        x=alt.X("cf_label:O", sort=order, title="capacity factor"), y=alt.Y("value:Q", title=None),
        color="series:N", tooltip=["series", "num_experts", "cf_label", "metric", "value"],
    ).properties(width=160, height=120).facet(row="metric:N", column="num_experts:O").resolve_scale(y="independent")


# -- command line -----------------------------------------------------------------------------------
class Bench(NamedTuple):
    config: type[BenchConfig]
    run: Callable  # run(cfg, out_dir) -> DataFrame


BENCHES = {"capacity": Bench(CapacityBenchConfig, run_capacity), "layer": Bench(LayerBenchConfig, run_layer),
           "train": Bench(TrainBenchConfig, run_train)}
"""Subcommands; ``all`` runs each. A new benchmark is a config class with a SECTION, a runner and
an entry here."""


def load_config(name: str, *, small: bool, device: str, overrides: dict, params: Path = PARAMS) -> BenchConfig:
    """The config of bench ``name`` from params (section ``name`` or ``name``_small), with the
    device and ``overrides`` (only the keys this config has) applied."""
    cls = BENCHES[name].config
    section = f"{cls.SECTION}_small" if small else cls.SECTION
    values = (yaml.safe_load(params.read_text()) or {}).get(section)
    if not isinstance(values, dict):
        raise ValueError(f"{params}: no mapping {section!r}")
    own = {f.name for f in fields(cls)}
    return cls.from_dict({**values, **{k: v for k, v in overrides.items() if k in own}, "device": device})


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moe_core.bench", description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=[*BENCHES, "all"])
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT})")
    parser.add_argument("--device", choices=["cuda", "cpu"], help="default: cuda if available")
    parser.add_argument("--small", action="store_true", help="the CPU-sized *_small sections (the default on CPU)")
    parser.add_argument("--params", type=Path, default=PARAMS, help="YAML with the bench sections")
    parser.add_argument("--checkpoint", help="checkpoint.pt for the 'checkpoint' routing source")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field (value parsed as YAML); repeatable")
    args = parser.parse_args(argv)
    names = list(BENCHES) if args.command == "all" else [args.command]
    try:  # every argument is checked before any work
        overrides = parse_overrides(args.overrides)
        if args.checkpoint is not None:
            overrides["checkpoint"] = args.checkpoint
        known = {f.name for n in names for f in fields(BENCHES[n].config)}
        if set(overrides) - known:
            raise ValueError(f"--set: unknown key(s) {sorted(set(overrides) - known)}; valid: {', '.join(sorted(known))}")
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        configs = {n: load_config(n, small=args.small or device == "cpu", device=device, overrides=overrides,
                                  params=args.params) for n in names}
    except (ValueError, OSError, yaml.YAMLError) as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 2
    for name, cfg in configs.items():
        df = BENCHES[name].run(cfg, args.out)
        print(f"\n== {name} ({len(df)} rows, appended to {Path(args.out) / name}.jsonl) ==")
        print(table(df, name))
    return 0

