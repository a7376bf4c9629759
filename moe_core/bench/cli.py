"""Benchmarks: Experiment B (capacity factor vs drops and speed), the MoE layer vs dense FFN, the trainer's and
a whole sweep's speed.

    python -m moe_core.bench {capacity,layer,train,sweep,all} [--small] [--device cuda|cpu] [--out DIR]
                             [--params YAML] [--checkpoint PATH] [--set key=value ...]
                             [--gpus 0,1] [--runs N] [--runs-per-gpu M[,M2...]]       (sweep only)

Configs live in params/experiment_b.yaml (a section per bench and its *_small CPU version, the
default on CPU). Every argument is checked before any bench runs. ``all`` runs every bench but the
sweep, which times whole sweeps (minutes each).
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import torch
import yaml

from .. import records as rr
from ..config import parse_overrides
from .capacity import run_capacity
from .configs import BenchConfig, CapacityBenchConfig, LayerBenchConfig, SweepBenchConfig, TrainBenchConfig
from .layer import run_layer
from .report import table
from .sweep_bench import run_sweep_bench
from .train_bench import run_train

PARAMS = Path(__file__).resolve().parents[2] / "params" / "experiment_b.yaml"
DEFAULT_OUT = "runs/experiment_b"


class Bench(NamedTuple):
    config: type[BenchConfig]
    run: Callable  # run(cfg, out_dir) -> DataFrame


BENCHES = {"capacity": Bench(CapacityBenchConfig, run_capacity), "layer": Bench(LayerBenchConfig, run_layer),
           "train": Bench(TrainBenchConfig, run_train), "sweep": Bench(SweepBenchConfig, run_sweep_bench)}
"""Subcommands; ``all`` runs those of ALL. A new benchmark is a config class with a SECTION, a runner
and an entry here."""
ALL = ("capacity", "layer", "train")
SWEEP_FLAGS = ("gpus", "runs", "runs_per_gpu")  # --gpus, --runs, --runs-per-gpu: the sweep bench's own


def _int_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


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
    parser.add_argument("--gpus", type=_int_list, help="sweep: GPU ids; the first alone, then all")
    parser.add_argument("--runs", type=int, help="sweep: runs per timed sweep")
    parser.add_argument("--runs-per-gpu", type=_int_list, help="sweep: workers per GPU, one sweep per value")
    args = parser.parse_args(argv)
    names = list(ALL) if args.command == "all" else [args.command]
    try:  # every argument is checked before any work
        overrides = parse_overrides(args.overrides)
        flags = {k: getattr(args, k) for k in SWEEP_FLAGS if getattr(args, k) is not None}
        if flags and args.command != "sweep":
            raise ValueError(f"--{', --'.join(k.replace('_', '-') for k in flags)}: only for the sweep bench")
        overrides |= flags
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
        try:
            df = BENCHES[name].run(cfg, args.out)
        except rr.RecordError as err:  # e.g. a checkpoint that is not weights-only: refused, never unpickled
            print(f"{parser.prog}: error: {err}", file=sys.stderr)
            return 2
        print(f"\n== {name} ({len(df)} rows, appended to {Path(args.out) / name}.jsonl) ==")
        print(table(df, name))
    return 0
