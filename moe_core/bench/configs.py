"""One config dataclass per benchmark, validated at construction (every bad field is a one-line
ValueError naming ``<Config>.<field>`` before any work). BenchConfig holds what all share: device,
precision and the timing method. Each subclass's SECTION is its section in params/experiment_b.yaml
(``<section>_small`` is the CPU-sized version, equal to the defaults)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Sequence

import torch
import yaml

from ..config import MoEConfig, require
from ..dispatch import BACKEND_FNS
from ..sweep import Run, expand
from ..train import COMPILE_MODES, TrainConfig
from .sources import LOGIT_ROUTERS, RoutingSource

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ROOT = Path(__file__).resolve().parents[2]


def repo_path(path: str) -> Path:
    """``path`` as given when it exists, else relative to the repository (the bench runs from anywhere)."""
    return Path(path) if Path(path).exists() or Path(path).is_absolute() else ROOT / path


def experiment_runs(params: str, sets: dict | None = None) -> list[Run]:
    """The runs of a sweep params file (moe_core.sweep.expand), ``sets`` applied to each, validated."""
    return expand(yaml.safe_load(repo_path(params).read_text()), sets, source=params)[1]


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
        for name, low in (("warmup", 1), ("repeats", 20), ("sets", 3), ("seed", 0)):
            value = getattr(self, name)
            self._require(isinstance(value, int) and value >= low, name, f"must be an integer >= {low}, got {value!r}")
        self._require(self.dtype == "auto" or self.dtype in DTYPES, "dtype",
                      f"unknown {self.dtype!r}; valid: auto, {', '.join(DTYPES)}")
        self._require(self.device in ("auto", "cpu", "cuda") or str(self.device).startswith("cuda:"), "device",
                      f"unknown {self.device!r}; valid: auto, cpu, cuda, cuda:N")
        self._require(not str(self.device).startswith("cuda") or torch.cuda.is_available(), "device",
                      f"{self.device} asked for, but torch.cuda.is_available() is False")

    def _require(self, ok: bool, name: str, msg: str) -> None:
        require(ok, f"{type(self).__name__}.{name}", msg)

    def _named(self, err: ValueError) -> ValueError:
        """A component config's error (it names its own field), prefixed with this config's name."""
        return ValueError(f"{type(self).__name__}.{err}")

    @property
    def torch_device(self) -> torch.device:
        return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if self.device == "auto" else self.device)

    @property
    def torch_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if self.torch_device.type == "cuda" else torch.float32
        return DTYPES[self.dtype]

    @property
    def timing(self) -> dict:
        """The keyword arguments of time_median_ms and copy_bandwidth."""
        return {"warmup": self.warmup, "repeats": self.repeats}

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
    host_ahead: bool = True  # time the layer and the dispatch on the device's own clock (timing.time_median_ms)

    SECTION = "capacity"

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("tokens", "dim", "hidden"):
            value = getattr(self, name)
            self._require(isinstance(value, int) and value >= 1, name, f"must be an integer >= 1, got {value!r}")
        for name in ("experts", "top_k", "capacity_factors", "sources"):
            self._require(isinstance(getattr(self, name), list) and getattr(self, name), name, "must be a non-empty list")
        self._require(self.router in LOGIT_ROUTERS, "router", f"must be one of {', '.join(LOGIT_ROUTERS)}")
        self._require(self.backend in BACKEND_FNS, "backend", f"unknown {self.backend!r}; valid: {', '.join(BACKEND_FNS)}")
        self._require(isinstance(self.host_ahead, bool), "host_ahead", f"must be true or false, got {self.host_ahead!r}")
        try:
            sources = self.parsed_sources()
            self.moe_configs(self.experts)  # the core names a bad k, E or CF itself
        except ValueError as err:
            raise self._named(err) from None
        for src in sources:
            if src.kind == "checkpoint":
                self._require(Path(src.path).is_file(), "sources", f"checkpoint not found: {src.path}")

    def parsed_sources(self) -> list[RoutingSource]:
        out = []
        for spec in self.sources:
            src = RoutingSource.parse(spec)
            if src.kind == "checkpoint" and src.path is None:
                require(self.checkpoint is not None, "sources", "'checkpoint' needs a path: set checkpoint "
                        "(--checkpoint PATH) or write checkpoint:PATH")
                src = replace(src, path=self.checkpoint)
            out.append(src)
        return out

    def moe_configs(self, experts: Sequence[int]) -> list[MoEConfig]:
        return [MoEConfig(dim=self.dim, hidden=self.hidden, num_experts=e, top_k=k, router=self.router,
                          capacity_factor=cf, backend=self.backend)
                for e in experts for k in self.top_k for cf in self.capacity_factors]


LIGER = "liger"  # a layer-bench column: liger-kernel's fused MoE (SwiGLU, dropless, softk), where it imports


@dataclass
class LayerBenchConfig(BenchConfig):
    """The MoE layer's forward + backward against a dense FFN of hidden K*F (equal active FLOPs),
    per dispatch backend and problem shape. Defaults are CPU-sized; the GPU shapes are in params/.
    A shape may set its own ``activation`` (default gelu) and ``capacity_factor`` (default: the
    config's). Backends: the dispatch backends and ``liger``. The CPU default leaves ``fused`` out:
    on a CPU its kernels run interpreted, a proof and not a speed."""

    shapes: list[dict] = field(default_factory=lambda: [
        {"tokens": 1024, "dim": 64, "hidden": 256, "experts": 8, "top_k": 2},
        {"tokens": 1024, "dim": 64, "hidden": 64, "experts": 16, "top_k": 4}])
    capacity_factor: float | None = 1.25
    router: str = "softk"
    backends: list[str] = field(default_factory=lambda: ["loop", "einsum", "padded", "grouped"])
    # none (eager) | a torch.compile mode; the MoE layer and its dense baseline get the same mode,
    # since training runs compiled and Inductor fuses the pointwise dispatch/combine work
    compile_modes: list[str] = field(default_factory=lambda: ["none"])
    # the dense FFN is timed this many times, each a freshly built module, and dense_ms is the median:
    # its time moved more between timings than the MoE layer's did (BENCHMARKS.md)
    dense_repeats: int = 1
    # the fused backend with the activation in its GEMMs' epilogues instead of passes (its other way)
    fused_epilogue: bool = False
    # the fused backend's GEMMs one program per tile instead of persistent with TMA loads (its other way)
    fused_persistent: bool = True

    SECTION = "layer"
    SHAPE_KEYS = ("tokens", "dim", "hidden", "experts", "top_k")
    SHAPE_OPTIONAL = ("activation", "capacity_factor")

    def __post_init__(self) -> None:
        super().__post_init__()
        self._require(isinstance(self.shapes, list) and self.shapes, "shapes", "must be a non-empty list")
        for shape in self.shapes:
            self._require(isinstance(shape, dict) and set(self.SHAPE_KEYS) <= set(shape)
                          <= {*self.SHAPE_KEYS, *self.SHAPE_OPTIONAL}
                          and all(isinstance(shape[k], int) and shape[k] >= 1 for k in self.SHAPE_KEYS), "shapes",
                          f"each shape maps {', '.join(self.SHAPE_KEYS)} to integers >= 1 (and may set "
                          f"{', '.join(self.SHAPE_OPTIONAL)}), got {shape!r}")
        valid = [*BACKEND_FNS, LIGER]
        unknown = sorted(set(self.backends) - set(valid))
        self._require(bool(self.backends) and not unknown, "backends", f"unknown {unknown}; valid: {', '.join(valid)}")
        self._require(isinstance(self.dense_repeats, int) and self.dense_repeats >= 1, "dense_repeats",
                      f"must be an integer >= 1, got {self.dense_repeats!r}")
        for name in ("fused_epilogue", "fused_persistent"):
            value = getattr(self, name)
            self._require(isinstance(value, bool), name, f"must be true or false, got {value!r}")
        bad_modes = sorted(set(self.compile_modes) - {"none", *COMPILE_MODES})
        self._require(bool(self.compile_modes) and not bad_modes, "compile_modes",
                      f"unknown {bad_modes}; valid: none, {', '.join(COMPILE_MODES)}")
        try:
            self.moe_configs()
        except ValueError as err:
            raise self._named(err) from None

    def moe_configs(self) -> list[MoEConfig]:
        return [MoEConfig(dim=s["dim"], hidden=s["hidden"], num_experts=s["experts"], top_k=s["top_k"],
                          router=self.router, capacity_factor=s.get("capacity_factor", self.capacity_factor),
                          activation=s.get("activation", "gelu")) for s in self.shapes]


@dataclass
class TrainBenchConfig(BenchConfig):
    """Training tokens/s of the real trainer (moe_core.train: AdamW, bf16 autocast on CUDA, grad
    clipping, routing stats) per router x batch size x dispatch backend x compile mode, on the
    synthetic char corpus; or, with ``experiment_params``, per configuration of a sweep's params file
    (its seeds collapsed: the solo timing pass of an experiment). tokens/s is the trainer's own: timed
    training steps only, median over intervals; each cell trains ``solo_repeats`` times and reports
    the median and the coefficient of variation. ``routers`` empty: the model's router only; top1
    runs with top_k=1."""

    routers: list[str] = field(default_factory=list)
    batch_sizes: list[int] = field(default_factory=lambda: [8])
    backends: list[str] = field(default_factory=lambda: ["padded", "grouped"])
    compile_modes: list[str] = field(default_factory=lambda: ["none"])  # none | a torch.compile mode
    model: dict = field(default_factory=lambda: {"dim": 32, "layers": 2, "heads": 2, "hidden": 64,
                                                 "num_experts": 4, "top_k": 2, "router": "softk", "seq_len": 32})
    steps: int = 12
    intervals: int = 3  # tokens/s is the median over these; the first holds warm-up and compilation
    solo_repeats: int = 3  # trainings per cell, one after another: the spread of tokens/s over them
    experiment_params: str | None = None  # a sweep params file: time its configurations instead of the grid
    shard: str = "0/1"  # "i/n": cells i, i+n, i+2n, ...: one pass split over n processes, one per GPU

    SECTION = "train"

    def __post_init__(self) -> None:
        super().__post_init__()
        self._require(isinstance(self.solo_repeats, int) and self.solo_repeats >= 3, "solo_repeats",
                      f"must be an integer >= 3 (a spread needs repeats), got {self.solo_repeats!r}")
        self._require(self.experiment_params is None or repo_path(self.experiment_params).is_file(),
                      "experiment_params", f"{self.experiment_params}: no such file")
        index, _, count = str(self.shard).partition("/")
        self._require(index.isdigit() and count.isdigit() and int(index) < int(count), "shard",
                      f"must be 'i/n' with 0 <= i < n, got {self.shard!r}")
        try:
            self.train_configs("unused")
        except ValueError as err:
            raise self._named(err) from None

    def _timing(self) -> dict:
        """The fields every bench training sets: a short run, evaluated ``intervals`` times, alone."""
        timing = {"steps": self.steps, "warmup": min(10, self.steps), "eval_windows": 4, "progress": False}
        return {**timing, "eval_interval": max(1, self.steps // self.intervals), "seed": self.seed,
                "device": str(self.torch_device), "experiment": "bench_train", "stop_after": None}

    def train_configs(self, out_dir: str) -> list[TrainConfig]:
        """One TrainConfig per cell of this shard of the grid (or of the configurations of
        ``experiment_params``), records under ``out_dir``."""
        index, count = (int(n) for n in self.shard.split("/"))
        return self._all_configs(out_dir)[index::count]

    def _all_configs(self, out_dir: str) -> list[TrainConfig]:
        if self.experiment_params is not None:
            return self._experiment_configs(out_dir)
        routers = self.routers or [self.model.get("router", "softk")]
        model = {k: v for k, v in self.model.items() if k != "router"}
        return [TrainConfig(**{**model, "router": r, **({"top_k": 1} if r == "top1" else {})}, batch_size=b,
                            backend=backend, compile=mode != "none", compile_mode="default" if mode == "none" else mode,
                            synthetic_chars=200_000, **self._timing(), out_dir=out_dir,
                            run=f"{r}_b{b}_{backend}_{mode}")
                for r in routers for b in self.batch_sizes for backend in self.backends for mode in self.compile_modes]

    def _experiment_configs(self, out_dir: str) -> list[TrainConfig]:
        """Each distinct configuration of the params file (the first run of it names it), as it trains
        in the sweep but for the bench's timing fields."""
        configs = {}
        for run in experiment_runs(self.experiment_params):
            cfg = TrainConfig.from_dict({**run.params, **self._timing(), "out_dir": out_dir, "run": run.name})
            configs.setdefault(json.dumps(cfg.identity(), sort_keys=True), cfg)
        return list(configs.values())


SWEEP_KERNELS = ("reuse", "fresh")  # each worker keeps its Jupyter kernel | a new kernel per run


@dataclass
class SweepBenchConfig(BenchConfig):
    """Whole sweeps timed end to end (moe_core.sweep: workers, kept kernels, shared caches): the first
    ``runs`` runs of ``experiment_params`` in seed-major order (every configuration of seed 0, then of seed 1,
    ...) with ``train_overrides`` on each, once per GPU set (the first of ``gpus`` alone unless not
    ``first_gpu_alone``, then all of them; empty: the default device) x runs per GPU x kernel mode
    (SWEEP_KERNELS). Defaults are
    CPU-sized (two tiny runs); the GPU section, Experiment A's runs as they are, is in params/."""

    experiment_params: str = "params/experiment_a.yaml"
    runs: int = 2
    gpus: list[int] = field(default_factory=list)
    first_gpu_alone: bool = True  # with several gpus, also time the first one alone (before all of them)
    runs_per_gpu: list[int] = field(default_factory=lambda: [1])
    kernels: list[str] = field(default_factory=lambda: ["reuse"])
    train_overrides: dict = field(default_factory=lambda: {
        "corpus": "synthetic", "synthetic_chars": 60000, "dim": 32, "hidden": 32, "layers": 2, "heads": 2,
        "num_experts": 4, "seq_len": 32, "batch_size": 4, "steps": 6, "warmup": 1, "eval_interval": 3,
        "eval_windows": 4, "backend": "padded", "compile": False})

    SECTION = "sweep"

    def __post_init__(self) -> None:
        super().__post_init__()
        self._require(repo_path(self.experiment_params).is_file(), "experiment_params",
                      f"{self.experiment_params}: no such file")
        self._require(isinstance(self.runs, int) and self.runs >= 1, "runs",
                      f"must be an integer >= 1, got {self.runs!r}")
        for name in ("gpus", "runs_per_gpu"):
            values, low = getattr(self, name), 0 if name == "gpus" else 1
            self._require(isinstance(values, list) and all(isinstance(v, int) and v >= low for v in values)
                          and (name == "gpus" or values), name, f"must be a list of integers >= {low}, got {values!r}")
        self._require(isinstance(self.first_gpu_alone, bool), "first_gpu_alone", "must be true or false")
        self._require(bool(self.kernels) and set(self.kernels) <= set(SWEEP_KERNELS), "kernels",
                      f"must be a non-empty list of {', '.join(SWEEP_KERNELS)}, got {self.kernels!r}")
        self._require(isinstance(self.train_overrides, dict), "train_overrides",
                      "must be a mapping of TrainConfig fields")
        try:
            self.sweep_runs()
        except ValueError as err:
            raise self._named(err) from None

    def gpu_sets(self) -> list[list[int]]:
        """The GPUs of each timed sweep: the first alone, then all (one set when there is one GPU or none)."""
        return [self.gpus[:1], self.gpus] if len(self.gpus) > 1 and self.first_gpu_alone else [self.gpus]

    def sweep_runs(self) -> list[Run]:
        """The runs each timed sweep executes, every one validated."""
        device = {"device": "cpu"} if self.torch_device.type == "cpu" else {}
        runs = experiment_runs(self.experiment_params, {**self.train_overrides, **device})
        order = sorted(range(len(runs)), key=lambda i: (runs[i].params.get("seed", 0), i))
        require(self.runs <= len(runs), "runs", f"{self.experiment_params} has {len(runs)} runs, not {self.runs}")
        return [runs[i] for i in order[:self.runs]]
