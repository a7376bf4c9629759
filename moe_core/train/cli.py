"""One training run from the shell: python -m moe_core.train --config X.yaml --set key=value
(torchrun-able: ``torchrun --nproc_per_node N -m moe_core.train ...``)."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from .. import records as rr
from .config import TrainConfig
from .loop import train


def main(argv: list[str] | None = None) -> int:
    """Exit status 0 for an ok or stopped run, 1 for a diverged one, 2 with one line for a bad input
    or a run another process holds (a failure in training raises); rank 0 prints the summary."""
    parser = argparse.ArgumentParser(prog="python -m moe_core.train",
                                     description="Train (or resume) one TinyMoE run and write its records.")
    parser.add_argument("--config", type=Path, help="YAML file: a flat mapping of TrainConfig fields")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one field (value parsed as YAML); repeatable")
    args = parser.parse_args(argv)
    try:
        result = train(TrainConfig.load(args.config, args.overrides))
    except (ValueError, rr.RunLocked) as err:  # a bad value, file or device; another writer
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(result.summary, indent=2))
    return 0 if result.status in ("ok", "stopped") else 1
