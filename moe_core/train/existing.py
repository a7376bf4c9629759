"""What a run directory already holds: a finished run's result, or a record to refuse or repair
before a session trains into it (moe_core.records formats and checks)."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from .. import records as rr
from .config import RUN_CONTROL_FIELDS, TrainConfig


@dataclass
class RunResult:
    """What train() returns: the run's directory, status, summary.json and metric rows."""

    run_dir: Path
    status: str  # ok | stopped (stop_after) | diverged | failed
    summary: dict
    metrics: list[dict]  # one row per evaluation, as in metrics.jsonl


def require_same_config(stored: dict, cfg: TrainConfig, source: Path) -> None:
    """Refuse a record (config.json, checkpoint) of another config, naming the fields that differ."""
    old = {k: v for k, v in stored.items() if k not in RUN_CONTROL_FIELDS}
    new = cfg.identity()
    diff = sorted(k for k in old.keys() | new.keys() if old.get(k, "<missing>") != new.get(k, "<missing>"))
    if diff:
        changes = "; ".join(f"{k}: {old.get(k, '<missing>')!r} -> {new.get(k, '<missing>')!r}" for k in diff)
        raise ValueError(f"{source} holds a run with a different config ({changes}); use another "
                         f"experiment/run name or remove the directory. Nothing was overwritten.")


def existing_run(cfg: TrainConfig) -> RunResult | None:
    """The finished result if this run is done and its record valid (rr.check_run, which restores a
    bad metrics.jsonl from the checkpoint); raises if the directory holds another config. An invalid
    record is named in one line and the run trained again (from its checkpoint where it has one)."""
    run_dir = cfg.run_dir
    try:
        stored, unreadable = rr.read_json(run_dir / rr.CONFIG_FILE), None
    except rr.RecordError as err:
        stored, unreadable = None, str(err)
        print(f"{err}; it will be rewritten", file=sys.stderr)
    if stored is not None:
        require_same_config(stored.get("config") or {}, cfg, run_dir / rr.CONFIG_FILE)
    status, note = rr.check_run(run_dir)
    if note and note != unreadable:
        print(note if status else f"{note}; training the run again", file=sys.stderr)
    return finished_result(run_dir) if status else None


def finished_result(run_dir: Path) -> RunResult:
    summary = rr.read_json(run_dir / rr.SUMMARY_FILE)
    return RunResult(run_dir, summary["status"], summary, rr.read_metrics(run_dir / rr.METRICS_FILE))


def readable(path: Path) -> bool:
    try:
        return rr.read_json(path) is not None
    except rr.RecordError:
        return False
