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

Workers: one per GPU of ``--gpus`` (or one on the default device) times ``--runs-per-gpu``; each
runs its share of the runs one after another in a Jupyter kernel it keeps (moe_core.workers), all
sharing the runs' cache dir: tokens, the measured matmul peak, Inductor's compiled kernels
(``<cache_dir>/inductor``). Each run records how many runs shared its GPU (summary ``concurrency``);
at the end the sweep prints where its worker time went (the runs' ``time_s`` phases) and runs/hour.
"""
from __future__ import annotations

import argparse
import fnmatch
import itertools
import json
import os
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from . import records as rr
from .config import cf_label, read_yaml
from .train import TrainConfig
from .train.measure import CONCURRENCY_ENV, format_breakdown, sweep_breakdown
from .workers import WorkerKernel

SWEEP_KEYS = ("experiment", "notebook", "defaults", "grid", "runs")
ABBREV = {"capacity_factor": "cf", "seed": "s", "top_k": "k", "num_experts": "e"}
DEFAULT_NOTEBOOK = "notebooks/train.ipynb"


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


def execute(run: Run, notebook: Path, executed_dir: Path, runs_dir: Path, kernel: WorkerKernel) -> dict:
    """Claim the run and, unless it is settled meanwhile, run its notebook with papermill in the
    worker's kernel, which shares the claim; a failure is recorded, never raised."""
    run_dir = runs_dir / run.params["experiment"] / run.name
    try:
        with rr.claim_run(run_dir) as token:
            done = _finished_row(run, run_dir, report=True)
            if done is not None:
                return done
            return _execute_notebook(run, notebook, executed_dir, runs_dir, run_dir, kernel, token)
    except rr.RunLocked as err:
        return {"run": run.name, "status": "locked", "error": f"by {err.holder}"}


def _execute_notebook(run: Run, notebook: Path, executed_dir: Path, runs_dir: Path, run_dir: Path,
                      kernel: WorkerKernel, token: str) -> dict:
    import papermill

    out_nb = executed_dir / run.params["experiment"] / f"{run.name}.ipynb"
    out_nb.parent.mkdir(parents=True, exist_ok=True)
    params = {**run.params, "out_dir": str(runs_dir)}
    try:
        papermill.execute_notebook(str(notebook), str(out_nb), parameters=params, progress_bar=False,
                                   km=kernel.ready(time.time(), {rr.CLAIM_ENV: token}))
    except Exception as err:  # noqa: BLE001 - any failure of one run is recorded and the sweep goes on
        message = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        if _run_result(run, run_dir)["status"] not in ("failed", *rr.FINAL_STATUSES):  # not recorded by the run
            rr.write_json(run_dir / rr.SUMMARY_FILE, {
                "status": "failed", "error": message, "executed_notebook": str(out_nb),
                "traceback": traceback.format_exc(limit=3)})
        return _run_result(run, run_dir, message)
    return _run_result(run, run_dir)


def inductor_cache(cache_dir: str) -> Path:
    """Inductor's on-disk caches every worker shares: ``<cache_dir>/inductor`` (TORCHINDUCTOR_CACHE_DIR wins)."""
    return Path(os.environ.get("TORCHINDUCTOR_CACHE_DIR") or Path(cache_dir, "inductor").resolve())


def worker_envs(gpus: list[str], runs_per_gpu: int, cache_dir: str) -> list[dict[str, str]]:
    """Each worker's environment: its GPU (none given: the default device), how many runs share it,
    and the Inductor cache they all share; GPUs alternate, so the first n workers spread over them."""
    shared = {CONCURRENCY_ENV: str(runs_per_gpu), "TORCHINDUCTOR_CACHE_DIR": str(inductor_cache(cache_dir))}
    return [{**shared, **({"CUDA_VISIBLE_DEVICES": gpu} if gpu is not None else {})}
            for _ in range(runs_per_gpu) for gpu in (gpus or [None])]


def measure_peaks(envs: list[dict[str, str]], cache_dir: str) -> None:
    """Each GPU's matmul peak measured into the cache while the GPU is still idle (moe_core.flops),
    before runs share it: a run sharing its GPU would measure a fraction of it."""
    gpus = {env.get("CUDA_VISIBLE_DEVICES") for env in envs}
    procs = [subprocess.Popen([sys.executable, "-m", "moe_core.flops", "--cache-dir", cache_dir],
                              env={**os.environ, **({"CUDA_VISIBLE_DEVICES": g} if g is not None else {})})
             for g in gpus]
    for proc in procs:
        proc.wait()


def config_key(run: Run) -> str:
    """A run's configuration but for its seed: runs with equal keys train the same model shapes."""
    identity = TrainConfig.from_dict(run.params).identity()
    return json.dumps({k: v for k, v in identity.items() if k != "seed"}, sort_keys=True)


class Jobs:
    """The runs left, handed out so that a worker gets its last configuration again while one is left
    (a kept kernel then reuses that configuration's compiled code), else a configuration no other
    worker is on, else the next run. The longest runs (most steps) come first: a sweep cut short by a
    time limit then loses short runs, and the last runs to finish are short ones (a shorter tail)."""

    def __init__(self, runs: list[Run]):
        by_steps = sorted(runs, key=lambda r: -TrainConfig.from_dict(r.params).steps)  # stable: params order
        self.pending = [(config_key(r), r) for r in by_steps]
        self.active: list[str] = []  # the configuration each busy worker is on
        self.lock = threading.Lock()

    def take(self, last: str | None) -> tuple[str, Run] | None:
        with self.lock:
            if last is not None:
                self.active.remove(last)
            same = [job for job in self.pending if job[0] == last]
            new = [job for job in self.pending if job[0] not in self.active]
            job = (same or new or self.pending or [None])[0]
            if job is not None:
                self.pending.remove(job)
                self.active.append(job[0])
            return job


def _work(kernel: WorkerKernel, jobs: Jobs, run_job, on_result) -> None:
    """A worker: runs jobs in its kernel until none are left, then shuts the kernel down."""
    last = None
    try:
        while (job := jobs.take(last)) is not None:
            last, run = job
            result = run_job(run, kernel)
            kernel.done(raised=bool(result["error"]))
            on_result({**result, "gpu": kernel.env.get("CUDA_VISIBLE_DEVICES")})
    finally:
        kernel.shutdown()


def run_sweep(runs: list[Run], notebook: Path, runs_dir: Path, executed_dir: Path, gpus: list[str] | None = None,
              runs_per_gpu: int = 1, fresh_kernel: bool = False, desc: str = "sweep") -> tuple[list[dict], dict]:
    """Execute the runs that are not ok yet on ``len(gpus or [1]) * runs_per_gpu`` workers. Returns a
    result per run (``run``, ``status``, ``error``; skipped runs ``ok (skipped)``) and the breakdown
    of the sweep's worker time (measure.sweep_breakdown) over the runs it executed."""
    settled_rows = {r.name: settled(r, runs_dir) for r in runs}
    todo = [r for r in runs if settled_rows[r.name] is None]
    results = [row for row in settled_rows.values() if row is not None]
    cache_dir = TrainConfig.from_dict(runs[0].params).cache_dir if runs else TrainConfig().cache_dir
    envs = worker_envs(gpus or [], runs_per_gpu, cache_dir)[:max(1, len(todo))]  # no idle workers
    if todo and runs_per_gpu > 1 and TrainConfig.from_dict(todo[0].params).device != "cpu":
        measure_peaks(envs, cache_dir)
    jobs = Jobs(todo)
    lock, bar = threading.Lock(), tqdm(total=len(todo), desc=desc, unit="run")

    def on_result(result: dict) -> None:
        with lock:
            results.append(result)
            bar.set_postfix_str(result["run"])
            bar.update()

    def run_job(run: Run, kernel: WorkerKernel) -> dict:
        return execute(run, notebook, executed_dir, runs_dir, kernel)

    kernels = [WorkerKernel(env, str(Path.cwd()), fresh_kernel) for env in envs]
    start = time.perf_counter()
    if len(kernels) == 1:
        _work(kernels[0], jobs, run_job, on_result)
    else:  # threads suffice: each worker's work happens in its kernel's process
        threads = [threading.Thread(target=_work, args=(k, jobs, run_job, on_result), daemon=True) for k in kernels]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    wall_s = time.perf_counter() - start
    bar.close()
    summaries = [rr.read_json(runs_dir / r.params["experiment"] / r.name / rr.SUMMARY_FILE) or {} for r in todo]
    return results, sweep_breakdown(summaries, wall_s, len(kernels))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moe_core.sweep", description=__doc__.split("\n")[0])
    parser.add_argument("params", type=Path, help="params/X.yaml")
    parser.add_argument("--gpus", help="comma-separated GPU ids: workers per GPU (default: the default device)")
    parser.add_argument("--runs-per-gpu", type=int, default=1, metavar="N",
                        help="workers per GPU, i.e. runs sharing one (default 1; their tokens/s do not compare)")
    parser.add_argument("--fresh-kernel", action="store_true",
                        help="a new Jupyter kernel for every run (default: each worker keeps one)")
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
        if args.runs_per_gpu < 1:
            raise ValueError(f"--runs-per-gpu: must be >= 1, got {args.runs_per_gpu}")
    except ValueError as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    if args.dry_run:
        for run in runs:
            print(run.name, json.dumps({k: v for k, v in run.params.items() if k not in ("experiment", "run")}))
        print(f"{len(runs)} run(s) in {experiment}")
        return 0
    results, breakdown = run_sweep(runs, notebook, args.runs_dir, args.executed_dir, gpus, args.runs_per_gpu,
                                   args.fresh_kernel, desc=experiment)
    width = max([len(r["run"]) for r in results] + [3])
    print(f"\n{'run':<{width}}  status              error")
    for r in sorted(results, key=lambda r: r["run"]):
        print(f"{r['run']:<{width}}  {r['status']:<18}  {r['error'][:100]}")
    failed = [r for r in results if not r["status"].startswith("ok")]
    print(f"{len(results) - len(failed)}/{len(results)} ok; executed notebooks in {args.executed_dir / experiment}")
    if breakdown["runs"]:
        print(format_breakdown(breakdown))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
