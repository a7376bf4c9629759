"""TrainConfig: every knob of one run, flat, so that a YAML mapping, ``--set key=value``, a sweep's grid
or a papermill ``-p`` parameter sets it by name, and a run record stores it as one flat mapping.

One source of truth per value. The model, MoE and data fields, with their types and defaults, are
those of ModelConfig, MoEConfig and DataConfig, which also validate them; the training-only fields
are OptimConfig's and RunConfig's. TrainConfig is generated from them. What this module adds is the
training context's view, in three small tables: COMPONENT_FIELDS (which component fields a run
exposes, in TrainConfig order), RENAMED (flat names that differ from the component's) and
CPU_DEFAULTS (defaults that differ: a CPU-sized run).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import types
import typing
from dataclasses import asdict, dataclass, field, fields, make_dataclass
from pathlib import Path

from ..config import ModelConfig, MoEConfig, canonical_router, parse_overrides, read_yaml, require
from ..data import DataConfig

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
DEVICES = ("auto", "cpu", "cuda")
# May differ between a stopped run and its resumption: they steer the process, not the result.
RUN_CONTROL_FIELDS = ("stop_after", "checkpoint_interval_s", "progress", "cache_dir", "out_dir", "experiment", "run")
# Directory names that also take an int, named by its decimal text: papermill's ``-p run 001`` passes
# the int 1 (the run is then "1"; ``-r run 001`` passes the text "001").
NAME_FIELDS = ("experiment", "run")


@dataclass
class OptimConfig:
    """AdamW over `steps` steps of a global batch: linear warmup, then cosine decay."""

    steps: int = 60
    batch_size: int = 16  # global: split over DDP ranks
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup: int = 10
    weight_decay: float = 0.1  # matrices only, not norms
    grad_clip: float = 1.0  # 0 disables
    beta1: float = 0.9
    beta2: float = 0.95

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size"):
            require(getattr(self, name) >= 1, name, "must be >= 1")
        require(math.isfinite(self.lr) and self.lr > 0, "lr", "must be > 0 and finite")
        require(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", "must be in [0, 1]")
        for name in ("warmup", "weight_decay", "grad_clip"):
            require(getattr(self, name) >= 0, name, "must be >= 0")
        for name in ("beta1", "beta2"):
            require(0 <= getattr(self, name) < 1, name, "must be in [0, 1)")


@dataclass
class RunConfig:
    """Evaluation cadence, logging, compilation, device, training seed and where the records go."""

    eval_interval: int = 10
    log_interval: int = 10  # steps between host syncs (progress bar, non-finite check)
    stop_after: int | None = None  # stop (resumably) once this many steps are done
    # A checkpoint (weights, optimizer: ~12 bytes/parameter) at the first evaluation this many seconds
    # after the last one, and always when the run stops; 0: at every evaluation. Writing one at every
    # evaluation took a fifth of a short sweep's time; a crash loses at most this much training.
    checkpoint_interval_s: float = 300.0
    compile: bool = False
    compile_mode: str = "default"  # torch.compile mode; reduce-overhead adds CUDA graphs (GPU)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    progress: bool = True
    seed: int = 0  # model init and batch order; the corpus and its split follow data_seed
    experiment: str = "scratch"
    run: str = ""  # empty: <router>-<hash of the config>
    out_dir: str = "runs"

    def __post_init__(self) -> None:
        for name in ("eval_interval", "log_interval"):
            require(getattr(self, name) >= 1, name, "must be >= 1")
        require(self.stop_after is None or self.stop_after >= 1, "stop_after", "must be >= 1 or None")
        require(math.isfinite(self.checkpoint_interval_s) and self.checkpoint_interval_s >= 0, "checkpoint_interval_s",
                f"must be >= 0 seconds, got {self.checkpoint_interval_s}")
        require(self.seed >= 0, "seed", f"must be >= 0, got {self.seed}")
        require(self.compile_mode in COMPILE_MODES, "compile_mode", f"must be one of {', '.join(COMPILE_MODES)}")
        require(self.device in DEVICES or self.device.startswith("cuda:"), "device",
                f"must be one of {', '.join(DEVICES)} or cuda:N")
        for name in ("experiment", "run"):
            value = getattr(self, name)
            require("/" not in value and value not in (".", ".."), name, "must be a plain directory name")
        require(bool(self.experiment), "experiment", "must not be empty")


# -- the training context's view of the component configs -------------------------------------------
COMPONENTS = (ModelConfig, MoEConfig, DataConfig)
# The component fields a run exposes, by section, in TrainConfig order (the notebook's parameter cell
# follows it). A name shared by two components (dim: model and MoE; seq_len: model and data) sets both.
# Any other component field is set by the trainer or keeps its default; tests/test_train.py lists
# those, so that leaving a new component field out is a decision, not an accident.
COMPONENT_FIELDS = {
    "model (ModelConfig; hidden: MoEConfig)": ("dim", "layers", "heads", "hidden", "dropout", "ffn", "moe_every"),
    "MoE (MoEConfig)": ("num_experts", "top_k", "router", "capacity_factor", "drop_policy", "renormalize",
                        "backend", "activation", "aux_loss_coef", "z_loss_coef", "aux_free_bias", "bias_update_rate",
                        "hash_seed", "hash_balance", "ec_group"),
    "data (DataConfig)": ("corpus", "tokenizer", "bpe_vocab_size", "seq_len", "val_fraction", "split_method",
                          "eval_windows", "max_stories", "synthetic_chars", "data_seed", "cache_dir"),
}
# Component field -> flat name, where they differ: the model's vocabulary comes from the data, so the
# flat vocabulary size is the BPE tokenizer's; the data's seed is not the training seed.
RENAMED = {DataConfig: {"vocab_size": "bpe_vocab_size", "seed": "data_seed"}}
# Defaults that differ from the components': a CPU-sized run (the synthetic corpus trains in seconds
# on 2 cores); the hidden size F is the expert's (a dense FFN gets top_k * hidden).
CPU_DEFAULTS = {"dim": 64, "layers": 2, "hidden": 128, "seq_len": 64, "num_experts": 4, "top_k": 1, "router": "top1",
                "eval_windows": 32}
SECTIONS = {**COMPONENT_FIELDS, "optimisation (OptimConfig)": tuple(f.name for f in fields(OptimConfig)),
            "evaluation, logging, run control (RunConfig)": tuple(f.name for f in fields(RunConfig))}
_EXPOSED = {name for names in COMPONENT_FIELDS.values() for name in names}


def flat_name(cls: type, name: str) -> str:
    """The TrainConfig name of field `name` of component `cls`."""
    return RENAMED.get(cls, {}).get(name, name)


def _sources(flat: str) -> list[tuple[type, str]]:
    """The (component, field) pairs a flat component field sets."""
    return [(cls, f.name) for cls in COMPONENTS for f in fields(cls) if flat_name(cls, f.name) == flat]


def _flat_fields() -> list[tuple[str, type, typing.Any]]:
    """(name, type, field) of every TrainConfig field: the first source's type and default, unless
    CPU_DEFAULTS has one; then OptimConfig's and RunConfig's fields as they are."""
    specs = []
    for name in (n for names in COMPONENT_FIELDS.values() for n in names):
        cls, source = _sources(name)[0]
        default = CPU_DEFAULTS.get(name, next(f.default for f in fields(cls) if f.name == source))
        specs.append((name, typing.get_type_hints(cls)[source], field(default=default)))
    for cls in (OptimConfig, RunConfig):
        hints = typing.get_type_hints(cls)
        specs += [(f.name, hints[f.name], field(default=f.default)) for f in fields(cls)]
    return specs


# The generated fields; TrainConfig adds validation, construction from mappings and the component configs.
_TrainFields = make_dataclass("TrainFields", _flat_fields())


@dataclass
class TrainConfig(_TrainFields):
    """Every knob of one run, flat (fields generated from the component configs, see the module doc).
    Defaults are CPU-sized: the synthetic corpus trains in seconds on 2 cores. Validation is the
    components': a bad value fails at construction with ``TrainConfig.<field>: ...``."""

    def __post_init__(self) -> None:
        self._check_types()
        checks = ((OptimConfig, self.optim_config), (RunConfig, self.run_config), (ModelConfig, self._check_model),
                  (DataConfig, self.data_config))
        for cls, build in checks:
            try:
                build()
            except ValueError as err:
                raise ValueError(f"TrainConfig.{_flat_message(cls, str(err))}") from err

    def _check_model(self) -> None:
        self.router = canonical_router(self.router)  # stored as ROUTERS spells it: expert-choice -> expert_choice
        self.model_config(vocab_size=1)  # with its MoEConfig

    def _check_types(self) -> None:
        for f in fields(self):
            value, allowed = getattr(self, f.name), _allowed_types(f.type)
            if f.name in NAME_FIELDS and type(value) is int:
                value = str(value)
                setattr(self, f.name, value)
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
            values = read_yaml(path, "config file") or {}
            if not isinstance(values, dict):
                raise ValueError(f"{path}: expected a flat mapping of TrainConfig fields")
        return cls.from_dict({**values, **cls.parse_overrides(overrides)})

    @classmethod
    def parse_overrides(cls, items: typing.Iterable[str]) -> dict:
        """``key=value`` strings parsed as YAML, except str fields (run=001 is a name, not a number)."""
        return parse_overrides(items, text_fields={f.name for f in fields(cls) if f.type is str})

    @classmethod
    def from_namespace(cls, namespace: dict, before: typing.Iterable[str]) -> TrainConfig:
        """Config from a notebook's globals: every name defined since `before` (the parameter cell
        and papermill's injected cell) must be a field, so a misspelt ``-p`` parameter fails."""
        new = {k: v for k, v in namespace.items() if k not in set(before) and not k.startswith("_")}
        return cls.from_dict(new)

    # -- the component configs, names ---------------------------------------------------------------
    def _values(self, cls: type) -> dict:
        """This run's values of the component fields it exposes, under the component's names."""
        names = {f.name: flat_name(cls, f.name) for f in fields(cls)}
        return {name: getattr(self, flat) for name, flat in names.items() if flat in _EXPOSED}

    def moe_config(self) -> MoEConfig:
        """The MoE layer's config; hash_seed None (the default) becomes the run's seed, so that the
        hash table is drawn anew with each replicate."""
        values = self._values(MoEConfig)
        values["hash_seed"] = self.seed if values["hash_seed"] is None else values["hash_seed"]
        return MoEConfig(**values)

    def model_config(self, vocab_size: int) -> ModelConfig:
        return ModelConfig(**self._values(ModelConfig), vocab_size=vocab_size, moe=self.moe_config())

    def data_config(self) -> DataConfig:
        return DataConfig(**self._values(DataConfig))

    def optim_config(self) -> OptimConfig:
        return OptimConfig(**{f.name: getattr(self, f.name) for f in fields(OptimConfig)})

    def run_config(self) -> RunConfig:
        return RunConfig(**{f.name: getattr(self, f.name) for f in fields(RunConfig)})

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


def _flat_message(cls: type, message: str) -> str:
    """A component's validation message with the flat field name (``DataConfig.vocab_size must be``
    or ``vocab_size: must be`` -> ``bpe_vocab_size ...``)."""
    message = message.removeprefix(f"{cls.__name__}.")
    for name, flat in RENAMED.get(cls, {}).items():
        message = re.sub(rf"^{name}\b", flat, message)
    return message


def _is_float_text(value) -> bool:
    try:
        return isinstance(value, str) and math.isfinite(float(value))
    except ValueError:
        return False


def _allowed_types(hint) -> tuple[type, ...]:
    return typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
