"""Run records on disk: runs/<experiment>/<run>/{config.json, metrics.jsonl, summary.json, checkpoint.pt}.

Every file is written to a temporary name and moved into place with os.replace, so a crash (or a
second reader) never sees half a file. metrics.jsonl is rewritten whole from the rows the
checkpoint carries, so a resumed run can never hold duplicate rows. One writer at a time: a run
directory is claimed (``claim_run``) before it is read or written. Records are validated on read
(``check_run``); a file that cannot be used raises ``RecordError``, one line naming it.
Checkpoints hold tensors and plain data only and are read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import math
import os
import pickle
import platform
import re
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import torch

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
CHECKPOINT_FILE = "checkpoint.pt"
LOCK_FILE = ".lock"
# A claim handed to a child process (the sweep's papermill kernel): the lock's token, see claim_run.
CLAIM_ENV = "MOE_CORE_RUN_CLAIM"
FINAL_STATUSES = ("ok", "diverged")  # a run whose valid record says this is not trained again


class RecordError(ValueError):
    """A run-record file that cannot be used; the message is one line naming the file."""


class UnsafeCheckpoint(RecordError):
    """A checkpoint holding objects that torch.load(weights_only=True) refuses to rebuild."""


class RunLocked(RuntimeError):
    """Another process holds the run directory; the message names it (pid, host, start time)."""

    def __init__(self, run_dir: Path, holder: dict):
        self.holder = (f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, "
                       f"since {holder.get('started', '?')}")
        super().__init__(f"{run_dir}: locked by another writer ({self.holder}); wait for it or stop it")


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


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise RecordError(f"{path}: not UTF-8 text (byte {err.start})") from None


def read_json(path: Path) -> dict | None:
    """The JSON object in `path`, None if there is no file; RecordError naming it if it is not one."""
    if not path.exists():
        return None
    try:
        obj = json.loads(_read_text(path))
    except json.JSONDecodeError as err:
        raise RecordError(f"{path}: not valid JSON ({err.msg} at line {err.lineno} column {err.colno}); "
                          f"truncated or corrupt") from None
    if not isinstance(obj, dict):
        raise RecordError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


def write_metrics(path: Path, rows: list[dict]) -> None:
    text = "".join(json.dumps(jsonable(row), allow_nan=False) + "\n" for row in rows)
    atomic_write(path, lambda tmp: tmp.write_text(text))


def read_metrics(path: Path) -> list[dict]:
    """The rows of a JSONL file ([] if there is none); RecordError naming the file and line of a bad row."""
    if not path.exists():
        return []
    rows = []
    for i, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise RecordError(f"{path}: line {i} is not valid JSON ({err.msg}); truncated or corrupt") from None
        if not isinstance(row, dict):
            raise RecordError(f"{path}: line {i} is not a JSON object")
        rows.append(row)
    return rows


def save_checkpoint(path: Path, state: dict) -> None:
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def checkpoint_intact(path: Path) -> bool:
    """Whether `path` is a whole torch zip archive: truncation loses the zip's directory at the end of
    the file, which this reads without loading the tensors."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith("/data.pkl") or name == "data.pkl" for name in archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def load_checkpoint(path: Path) -> dict | None:
    """The checkpoint's state (None if there is no file), read with torch.load(weights_only=True):
    tensors and plain containers only, so no code in the file runs. A truncated file is a
    RecordError, one holding any other object an UnsafeCheckpoint, both one line naming the file."""
    if not path.exists():
        return None
    if not checkpoint_intact(path):
        raise RecordError(f"{path}: truncated or not a torch checkpoint (no complete zip archive)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        refused = re.search(r"GLOBAL (\S+)|but got <class '([^']+)'>", str(err))
        what = f"it holds {refused[1] or refused[2]}, which is refused" if refused else _first_line(err)
        raise UnsafeCheckpoint(f"{path}: not loadable with torch.load(weights_only=True): {what}") from None
    except (RuntimeError, EOFError, OSError) as err:
        raise RecordError(f"{path}: unreadable checkpoint: {_first_line(err)}") from None
    if not isinstance(state, dict):
        raise RecordError(f"{path}: expected a checkpoint dict, got {type(state).__name__}")
    return state


def _first_line(err: Exception) -> str:
    return next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)


# -- validation on read -----------------------------------------------------------------------------
def check_run(run_dir: Path, repair: bool = True) -> tuple[str | None, str | None]:
    """(status, note) of the record in `run_dir`. status is a FINAL_STATUSES entry only for a finished
    run whose config.json, summary.json and metrics.jsonl parse and agree (the steps done, one metrics
    row per evaluation, the best validation loss) and whose checkpoint, if any, is whole; otherwise
    None, and note names the first problem in one line (None too for a run never finished). With
    `repair`, a missing or bad metrics.jsonl is rewritten from the checkpoint, which holds every
    row, and note says so. Call it under the run's claim."""
    checkpoint = run_dir / CHECKPOINT_FILE
    try:
        summary = read_json(run_dir / SUMMARY_FILE)
        if summary is None or summary.get("status") not in FINAL_STATUSES:
            return None, None
        record = read_json(run_dir / CONFIG_FILE)
        if record is None or not isinstance(record.get("config"), dict):
            raise RecordError(f"{run_dir / CONFIG_FILE}: missing, or without the run's 'config'")
        expected = _evaluated_steps(record["config"], summary, run_dir / SUMMARY_FILE)
        if checkpoint.exists() and not checkpoint_intact(checkpoint):
            raise RecordError(f"{checkpoint}: truncated or not a torch checkpoint (no complete zip archive)")
    except RecordError as err:
        return None, str(err)
    metrics = run_dir / METRICS_FILE
    try:
        if not metrics.exists():
            raise RecordError(f"{metrics}: missing")
        _check_rows(read_metrics(metrics), expected, summary, metrics)
    except RecordError as err:
        rows = _checkpoint_rows(checkpoint, expected, summary) if repair else None
        if rows is None:
            return None, str(err)
        write_metrics(metrics, rows)
        return summary["status"], f"{err}; rewritten from {checkpoint}"
    return summary["status"], None


def _evaluated_steps(config: dict, summary: dict, where: Path) -> list[int]:
    """The steps that have a metrics row: every eval_interval and the last step, up to the steps done
    (a diverged run stops before evaluating the step where the loss became non-finite)."""
    steps, every, done = config.get("steps"), config.get("eval_interval"), summary.get("steps_done")
    if not all(isinstance(v, int) and v >= 0 for v in (steps, every, done)) or every == 0:
        raise RecordError(f"{where}: steps_done, or the config's steps and eval_interval, missing")
    if summary["status"] == "ok" and done != steps:
        raise RecordError(f"{where}: status ok after {done} of {steps} steps")
    evals = [*range(every, steps + 1, every), *([steps] if steps % every else [])]
    return [s for s in evals if s <= done] if summary["status"] == "ok" else [s for s in evals if s < done]


def _check_rows(rows: list[dict], expected: list[int], summary: dict, where: Path) -> None:
    steps = [row.get("step") if isinstance(row, dict) else None for row in rows]
    if steps != expected:
        raise RecordError(f"{where}: rows for steps {_span(steps)}, expected {_span(expected)}; truncated or "
                          f"from another run")
    losses = [row["val_loss"] for row in rows if row.get("val_loss") is not None]
    if losses and summary.get("best_val_loss") is not None and min(losses) != summary["best_val_loss"]:
        raise RecordError(f"{where}: best val_loss {min(losses)} differs from summary.json's "
                          f"{summary['best_val_loss']}; from another run")


def _span(steps: list) -> str:
    return f"[{steps[0]}..{steps[-1]}] ({len(steps)} rows)" if len(steps) > 3 else str(steps)


def _checkpoint_rows(checkpoint: Path, expected: list[int], summary: dict) -> list[dict] | None:
    """The checkpoint's metrics rows if it loads and they are the finished run's, else None."""
    try:
        rows = (load_checkpoint(checkpoint) or {}).get("metrics")
        _check_rows(rows if isinstance(rows, list) else [], expected, summary, checkpoint)
    except RecordError:
        return None
    return rows


# -- one writer per run -----------------------------------------------------------------------------
@contextlib.contextmanager
def claim_run(run_dir: Path):
    """Hold `run_dir` for the block: an exclusive flock on its lock file, which the kernel releases
    when the holder dies (a stale lock file is simply taken over). Another holder is a RunLocked
    naming it. A process whose CLAIM_ENV is the holder's token (a kernel the holder started) shares
    the claim. Taking a claim removes temporary files left by killed writers. Yields the token."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = _lock_holder(path)
            if holder.get("token") and holder["token"] == os.environ.get(CLAIM_ENV):
                yield holder["token"]  # our parent's claim: it keeps and releases the lock
                return
            raise RunLocked(run_dir, holder) from None
        try:  # the holder before us may have removed the file after we opened it: lock the current one
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    token = f"{platform.node()}:{os.getpid()}:{os.urandom(6).hex()}"
    started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({"pid": os.getpid(), "host": platform.node(), "started": started,
                             "token": token}).encode())
    for tmp in run_dir.glob(".*.tmp*"):  # atomic_write's leftovers from a killed writer
        tmp.unlink(missing_ok=True)
    try:
        yield token
    finally:
        path.unlink(missing_ok=True)
        os.close(fd)


def _lock_holder(path: Path) -> dict:
    try:
        holder = json.loads(path.read_text())
    except (OSError, ValueError):  # being written, or removed since
        return {}
    return holder if isinstance(holder, dict) else {}


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

