"""Run records on disk: runs/<experiment>/<run>/{config.json, metrics.jsonl, summary.json, checkpoint.pt}.

Every file is written to a temporary name and moved into place with os.replace, so a crash (or a
second reader) never sees half a file. metrics.jsonl is rewritten whole from the rows the
checkpoint carries, so a resumed run can never hold duplicate rows.
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
CHECKPOINT_FILE = "checkpoint.pt"


def atomic_write(path: Path, write) -> None:
    """Write through `write(tmp_path)` and rename over `path` (atomic on POSIX): readers never see a
    half-written file, even with several writers; the temporary file is removed if writing fails."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def jsonable(value: Any) -> Any:
    """Plain-JSON copy of `value`: non-finite floats become null (strict JSON has no NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def write_json(path: Path, obj: dict) -> None:
    text = json.dumps(jsonable(obj), indent=2, allow_nan=False) + "\n"
    atomic_write(path, lambda tmp: tmp.write_text(text))


def read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def write_metrics(path: Path, rows: list[dict]) -> None:
    text = "".join(json.dumps(jsonable(row), allow_nan=False) + "\n" for row in rows)
    atomic_write(path, lambda tmp: tmp.write_text(text))


def read_metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def save_checkpoint(path: Path, state: dict) -> None:
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: Path) -> dict | None:
    # weights_only=False: the checkpoint holds RNG states and plain metric rows, written by us.
    return torch.load(path, map_location="cpu", weights_only=False) if path.exists() else None


def git_commit(cwd: Path | None = None) -> dict:
    """Commit hash and whether the tree had uncommitted changes (None outside a git checkout).

    ``MOE_CORE_COMMIT``, when set, wins over git: a copied tree (the lent GPU machines) may carry a
    stale .git whose HEAD is not the code that runs, and the person who copied it knows the commit."""
    if os.environ.get("MOE_CORE_COMMIT"):
        return {"commit": os.environ["MOE_CORE_COMMIT"], "dirty": None, "source": "MOE_CORE_COMMIT"}
    cwd = cwd or Path(__file__).resolve().parent

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def environment(device: torch.device) -> dict:
    """Software versions and the device name every run record carries."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    cuda = device.type == "cuda"
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "device": torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu",
        "device_type": device.type,
        "hostname": platform.node(),
        "argv": sys.argv,
    }

