"""Experiments as data: expand ``params/X.yaml`` into runs and execute each through papermill.

A params file::

    experiment: smoke                 # runs/<experiment>/<run>/, executed/<experiment>/<run>.ipynb
    notebook: notebooks/train.ipynb   # optional (this is the default)
    defaults: {steps: 30, ...}        # TrainConfig fields shared by every run, written once
    grid:                             # one mapping or a list of them; each is a cartesian product
      - name: "{router}_cf{capacity_factor}_s{seed}"   # optional run-name template
        router: [softk, hash]
        capacity_factor: [1.0, 1.25]
        seed: [0, 1]
    runs:                             # optional explicit runs, each a mapping of overrides (+ name)
      - {name: dense_s0, ffn: dense, seed: 0}

Every key is checked against TrainConfig and every run's config is built before anything starts,
so a typo fails in a second, not after an hour. Each run's directory is claimed while the sweep
checks and executes it (moe_core.records.claim_run; its kernel shares the claim), so two sweeps
over one runs directory share the work instead of doubling it: a run another process holds is
"locked", not executed. A run whose valid record says ok or diverged is skipped (a bad metrics.jsonl
is first restored from its checkpoint); any other record is trained again. A failed run is recorded
and the sweep goes on; the exit status is non-zero unless every run is ok.
"""
from __future__ import annotations

import argparse
import fnmatch
import itertools
import json
import multiprocessing as mp
import os
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from . import records as rr
from .config import cf_label, read_yaml
from .train import TrainConfig

SWEEP_KEYS = ("experiment", "notebook", "defaults", "grid", "runs")
ABBREV = {"capacity_factor": "cf", "seed": "s", "top_k": "k", "num_experts": "e"}
DEFAULT_NOTEBOOK = "notebooks/train.ipynb"
# The kernel's own log (e.g. its warning that local TCP is unencrypted) is nothing a user can act on;
# errors still show, and the notebook's outputs, warnings included, are in the executed notebook.
QUIET_KERNEL = ["--IPKernelApp.log_level=ERROR"]


@dataclass
class Run:
    name: str
    params: dict  # every TrainConfig field this run sets (defaults + overrides + experiment/run)


def _format_value(key: str, value) -> str:
    return cf_label(value) if key == "capacity_factor" else str(value)


def derive_name(overrides: dict) -> str:
    """``softk_cf1.25_s0`` from {router: softk, capacity_factor: 1.25, seed: 0}: router/ffn values
    bare, other keys abbreviated (or spelled out) before their value, in the overrides' order."""
    parts = []
    for key, value in overrides.items():
        if key in ("router", "ffn"):
            parts.append(str(value))
        elif key == "capacity_factor" and value is None:
            parts.append("dropless")
        else:
            parts.append(f"{ABBREV.get(key, key)}{_format_value(key, value)}")
    return "_".join(parts) or "default"


def _check_keys(keys, where: str) -> None:
    unknown = sorted(set(keys) - set(TrainConfig.field_names()))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; valid keys: {', '.join(TrainConfig.field_names())}")


def expand(spec: dict, sets: dict | None = None, source: str = "params") -> tuple[str, list[Run]]:
    """The experiment name and its runs, every config validated; raises ValueError naming the problem."""
    if not isinstance(spec, dict):
        raise ValueError(f"{source}: expected a mapping with keys {', '.join(SWEEP_KEYS)}")
    extra = sorted(set(spec) - set(SWEEP_KEYS))
    if extra:
        raise ValueError(f"{source}: unknown top-level key(s) {extra}; valid: {', '.join(SWEEP_KEYS)}")
    experiment = spec.get("experiment")
    if not experiment or not isinstance(experiment, str):
        raise ValueError(f"{source}: 'experiment' (a name) is required")
    defaults = dict(spec.get("defaults") or {})
    _check_keys(defaults, f"{source}: defaults")
    sets = dict(sets or {})
    _check_keys(sets, "--set")
    grids = spec.get("grid") or []
    grids = [grids] if isinstance(grids, dict) else list(grids)
    entries: list[tuple[str | None, dict]] = []
    for i, grid in enumerate(grids):
        grid = dict(grid)
        template = grid.pop("name", None)
        _check_keys(grid, f"{source}: grid[{i}]")
        axes = {k: v if isinstance(v, list) else [v] for k, v in grid.items()}
        for combo in itertools.product(*axes.values()):
            entries.append((template, dict(zip(axes, combo))))
    for i, run in enumerate(spec.get("runs") or []):
        run = dict(run)
        name = run.pop("name", None)
        _check_keys(run, f"{source}: runs[{i}]")
        entries.append((name, run))
    if not entries:
        raise ValueError(f"{source}: no runs (give 'grid' and/or 'runs')")
    runs, seen = [], {}
    for template, overrides in entries:
        name = _format_name(template, overrides, source) if template is not None else derive_name(overrides)
        if name in seen:
            raise ValueError(f"{source}: two runs are named {name!r} ({seen[name]} and {overrides})")
        seen[name] = overrides
        params = {**defaults, **overrides, **sets, "experiment": experiment, "run": name}
        try:
            TrainConfig.from_dict(params)
        except ValueError as err:
            raise ValueError(f"{source}: run {name}: {err}") from err
        runs.append(Run(name, params))
    return experiment, runs


def _format_name(template, overrides: dict, source: str) -> str:
    """A run name from its template: ``{key}`` is that key's value in the run (as derive_name spells it)."""
    values = {k: _format_value(k, v) for k, v in overrides.items()}
    try:
        if not isinstance(template, str):
            raise ValueError(f"expected text, got {template!r}")
        return template.format(**values)
    except KeyError as err:
        raise ValueError(f"{source}: name template {template!r}: {{{err.args[0]}}} is not a key of its run "
                         f"(keys: {', '.join(values) or 'none'})") from None
    except (IndexError, ValueError) as err:
        raise ValueError(f"{source}: name template {template!r}: {err}") from None


def select(runs: list[Run], only: str | None, shard: str | None) -> list[Run]:
    """Filter by glob, then keep every n-th run (sorted by name) for shard i/n (0 <= i < n)."""
    if only:
        matched = [r for r in runs if fnmatch.fnmatch(r.name, only)]
        if not matched:
            raise ValueError(f"--only {only!r}: matches none of the {len(runs)} runs")
        runs = matched
    if shard:
        try:
            i, n = (int(part) for part in shard.split("/"))
        except ValueError:
            raise ValueError(f"--shard: expected i/n with integers, got {shard!r}") from None
        if not (n >= 1 and 0 <= i < n):
            raise ValueError(f"--shard: need 0 <= i < n, got {shard!r}")
        runs = [r for j, r in enumerate(sorted(runs, key=lambda r: r.name)) if j % n == i]
    return runs


def settled(run: Run, runs_dir: Path) -> dict | None:
    """The result row of a run that is not to be executed, checked under its claim: finished ("ok
    (skipped)", "diverged (skipped)" with the divergence as its error) or held by another process
    ("locked"). None if it needs training (no record, an unfinished or an invalid one)."""
    run_dir = runs_dir / run.params["experiment"] / run.name
    if not run_dir.is_dir():
        return None
    try:
        with rr.claim_run(run_dir):
            return _finished_row(run, run_dir)
    except rr.RunLocked as err:
        return {"run": run.name, "status": "locked", "error": f"by {err.holder}"}


def _finished_row(run: Run, run_dir: Path, report: bool = False) -> dict | None:
    status, note = rr.check_run(run_dir)
    if status is None:
        if note and report:
            tqdm.write(f"{note}; training the run again", file=sys.stderr)
        return None
    error = note or (rr.read_json(run_dir / rr.SUMMARY_FILE) or {}).get("error") or ""
    return {"run": run.name, "status": f"{status} (skipped)", "error": error}


def _run_result(run: Run, run_dir: Path, error: str = "") -> dict:
    try:
        summary = rr.read_json(run_dir / rr.SUMMARY_FILE) or {}
    except rr.RecordError as err:
        summary = {"error": str(err)}
    status = summary.get("status") or ("failed" if error else "missing")
    return {"run": run.name, "status": status, "error": error or ("" if status == "ok" else summary.get("error") or "")}


def execute(run: Run, notebook: Path, executed_dir: Path, runs_dir: Path) -> dict:
    """Claim the run and, unless it is settled meanwhile, run its notebook in-process with papermill,
    the kernel sharing the claim; a failure is recorded, never raised."""
    run_dir = runs_dir / run.params["experiment"] / run.name
    try:
        with rr.claim_run(run_dir) as token:
            done = _finished_row(run, run_dir, report=True)
            if done is not None:
                return done
            os.environ[rr.CLAIM_ENV] = token  # the kernel inherits the claim
            try:
                return _execute_notebook(run, notebook, executed_dir, runs_dir, run_dir)
            finally:
                del os.environ[rr.CLAIM_ENV]
    except rr.RunLocked as err:
        return {"run": run.name, "status": "locked", "error": f"by {err.holder}"}


def _execute_notebook(run: Run, notebook: Path, executed_dir: Path, runs_dir: Path, run_dir: Path) -> dict:
    import papermill

    out_nb = executed_dir / run.params["experiment"] / f"{run.name}.ipynb"
    out_nb.parent.mkdir(parents=True, exist_ok=True)
    params = {**run.params, "out_dir": str(runs_dir)}
    try:
        papermill.execute_notebook(str(notebook), str(out_nb), parameters=params, progress_bar=False,
                                   kernel_name="python3", cwd=str(Path.cwd()), extra_arguments=QUIET_KERNEL)
    except Exception as err:  # noqa: BLE001 - any failure of one run is recorded and the sweep goes on
        message = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        if _run_result(run, run_dir)["status"] not in ("failed", *rr.FINAL_STATUSES):  # not recorded by the run
            rr.write_json(run_dir / rr.SUMMARY_FILE, {
                "status": "failed", "error": message, "executed_notebook": str(out_nb),
                "traceback": traceback.format_exc(limit=3)})
        return _run_result(run, run_dir, message)
    return _run_result(run, run_dir)


_GPU = None


def _init_worker(gpu_queue) -> None:
    """Pin this worker process (and the kernels it starts) to one GPU."""
    global _GPU
    _GPU = gpu_queue.get()
    os.environ["CUDA_VISIBLE_DEVICES"] = str(_GPU)


def _execute_on_gpu(args) -> dict:
    return {**execute(*args), "gpu": _GPU}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moe_core.sweep", description=__doc__.split("\n")[0])
    parser.add_argument("params", type=Path, help="params/X.yaml")
    parser.add_argument("--gpus", help="comma-separated GPU ids: one worker per GPU (default: sequential)")
    parser.add_argument("--only", help="run only names matching this glob")
    parser.add_argument("--shard", help="i/n: run the i-th of n interleaved slices (several hosts)")
    parser.add_argument("--dry-run", action="store_true", help="list the runs and their parameters only")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="override a TrainConfig field for every run (value parsed as YAML)")
    parser.add_argument("--runs-dir", type=Path, default=Path("runs"))
    parser.add_argument("--executed-dir", type=Path, default=Path("executed"))
    args = parser.parse_args(argv)
    try:
        if not args.params.is_file():
            raise ValueError(f"{args.params}: no such params file")
        sets = TrainConfig.parse_overrides(args.sets)
        spec = read_yaml(args.params, "params file")
        experiment, runs = expand(spec, sets, str(args.params))
        notebook = Path(spec.get("notebook", DEFAULT_NOTEBOOK))
        if not notebook.is_file():
            raise ValueError(f"{args.params}: notebook {notebook} not found")
        runs = select(runs, args.only, args.shard)
        gpus = [g.strip() for g in args.gpus.split(",")] if args.gpus else []
        if args.gpus is not None and not all(g.isdigit() for g in gpus):
            raise ValueError(f"--gpus: expected comma-separated integers, got {args.gpus!r}")
    except ValueError as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    if args.dry_run:
        for run in runs:
            print(run.name, json.dumps({k: v for k, v in run.params.items() if k not in ("experiment", "run")}))
        print(f"{len(runs)} run(s) in {experiment}")
        return 0
    settled_rows = {r.name: settled(r, args.runs_dir) for r in runs}
    todo = [r for r in runs if settled_rows[r.name] is None]
    results = [row for row in settled_rows.values() if row is not None]
    jobs = [(r, notebook, args.executed_dir, args.runs_dir) for r in todo]
    bar = tqdm(total=len(jobs), desc=experiment, unit="run")
    if len(gpus) > 1:
        queue = mp.get_context("spawn").Queue()
        for g in gpus:
            queue.put(g)
        with mp.get_context("spawn").Pool(len(gpus), _init_worker, (queue,)) as pool:
            for result in pool.imap_unordered(_execute_on_gpu, jobs):
                results.append(result)
                bar.update()
    else:
        if gpus:
            os.environ["CUDA_VISIBLE_DEVICES"] = gpus[0]
        for job in jobs:
            bar.set_postfix_str(job[0].name)
            results.append(execute(*job))
            bar.update()
    bar.close()
    width = max([len(r["run"]) for r in results] + [3])
    print(f"\n{'run':<{width}}  status              error")
    for r in sorted(results, key=lambda r: r["run"]):
        print(f"{r['run']:<{width}}  {r['status']:<18}  {r['error'][:100]}")
    failed = [r for r in results if not r["status"].startswith("ok")]
    print(f"{len(results) - len(failed)}/{len(results)} ok; executed notebooks in {args.executed_dir / experiment}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
