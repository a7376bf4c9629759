"""The paper's number macros that do not come from the analysis notebooks, so that none is typed by hand.

    python -m moe_core.analysis.paper [--bench-dir runs/benchmarks/<full>] [--capacity-dir runs/benchmarks/<cap>]
                                  [--compiled-layer-dir runs/benchmarks/<dir>] [--latest-dir runs/benchmarks/<newest>]

Writes two files beside the notebooks' numbers_a.tex / numbers_b.tex (and rewrites numbers.tex, which
inputs them all, through moe_core.analysis.latex.write_numbers):

- ``numbers_bench.tex``: speed results (each names its GPU). From the full-grid bench directory (default: the newest
  with train, layer and capacity records): train.csv (the real trainer's tokens/s, ms/step, MFU per
  batch x backend x compile mode), layer.csv (MoE layer vs. a dense FFN of equal active FLOPs, every
  backend), the run JSON's device, torch version and measured matmul peak. From the capacity
  directory (default: the newest with capacity records): dispatch's fraction of copy bandwidth
  (mean per cell over its bench runs), the cell and run counts and the checkpoint of its trained
  routing source. From the latest directory
  (default: the newest with train and layer records, by run id), the same train and layer cells as
  ``Latest*`` macros with its commit. From the compiled-layer directory (default: the newest layer
  run with compiled rows): the layer cells under torch.compile as ``Compiled*`` macros.
- ``numbers_setup.tex``: the experiments' setup as the params files state it (params/smoke.yaml,
  params/experiment_a_v2.yaml expanded by moe_core.sweep; params/experiment_b.yaml), with the training
  defaults every run inherits from TrainConfig.

Macro names come from moe_core.analysis.latex.macro_name: ``train b128 padded reduce-overhead mtok s`` becomes
\\TrainBOneTwoEightPaddedReduceOverheadMtokS.
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pandas as pd
import yaml

from .. import sweep
from ..config import cf_label
from ..train import TrainConfig
from . import claims
from .frontier import analyse
from .latex import TeX, format_number, write_numbers
from .load import has_runs, load_bench, load_experiment
from .spread import spread
from .stats import bench_table
from .verdicts import Evidence

ROOT = Path(__file__).resolve().parents[2]
SETUP_FIELDS = ("dim", "layers", "heads", "hidden", "num_experts", "top_k", "seq_len", "batch_size", "steps",
                "warmup", "lr", "min_lr_ratio", "weight_decay", "beta1", "beta2", "grad_clip", "eval_interval",
                "eval_windows", "aux_loss_coef", "z_loss_coef", "bias_update_rate")


def plain(value) -> TeX:
    """A setup value as written in a params file, unrounded: 256, 0.001, 1e-05; 32,768 (ints from 10,000)."""
    if isinstance(value, float):
        return TeX(f"{value:g}")
    return TeX(format_number(value) if isinstance(value, int) and value >= 10_000 else str(value))


def listing(values) -> TeX:
    """[1.0, 1.25, None] -> '1, 1.25, dropless' (capacity-factor spelling of the figures)."""
    return TeX(", ".join(cf_label(v) if v is None or isinstance(v, float) else str(v) for v in values))


def setup_numbers(params_dir: Path) -> dict:
    """Per sweep (smoke, experiment A): the model/optimiser fields shared by its runs, the token budget
    (where there is one), run/seed counts and the capacity factors; Experiment B's bench grid."""
    numbers = {}
    for key, name in (("smoke", "smoke.yaml"), ("exp a", "experiment_a_v2.yaml")):
        experiment, runs = sweep.expand(yaml.safe_load((params_dir / name).read_text()), source=name)
        configs = [TrainConfig.from_dict(run.params) for run in runs]
        first = configs[0]
        for field in SETUP_FIELDS:
            values = {getattr(c, field) for c in configs if c.ffn == "moe" and c.router != "top1"}
            if len(values) == 1:
                numbers[f"setup {key} {field}"] = plain(values.pop())
        numbers |= {
            f"setup {key} experiment": experiment,
            f"setup {key} corpus": first.corpus,
            f"setup {key} tokenizer": first.tokenizer,
            f"setup {key} runs": len(runs),
            f"setup {key} seeds": len({c.seed for c in configs}),
            f"setup {key} cfs": listing(sorted({c.capacity_factor for c in configs if c.ffn == "moe"},
                                               key=lambda v: float("inf") if v is None else v)),
        }
        numbers |= {f"setup {key} dense hidden": c.top_k * c.hidden for c in configs if c.ffn == "dense"}
        tokens = {c.steps * c.batch_size * c.seq_len for c in configs}
        if len(tokens) == 1:  # one budget; several budgets are the results tables' rows
            numbers[f"setup {key} tokens per run"] = tokens.pop()
    bench = yaml.safe_load((params_dir / "experiment_b.yaml").read_text())
    cap, layer = bench["capacity"], bench["layer"]
    numbers |= {f"setup cap {k}": plain(cap[k]) for k in ("tokens", "dim", "hidden", "repeats", "warmup", "sets")}
    numbers |= {"setup cap experts": listing(cap["experts"]), "setup cap top k": listing(cap["top_k"]),
                "setup cap cfs": listing(cap["capacity_factors"]), "setup layer cf": plain(layer["capacity_factor"]), "setup layer tokens": plain(layer["shapes"][0]["tokens"]),
                "setup layer dim": plain(layer["shapes"][0]["dim"])}
    return numbers


def _run_json(bench_dir: Path, section: str) -> dict:
    paths = sorted(bench_dir.glob(f"{section}_*.json"))
    return json.loads(paths[-1].read_text()) if paths else {}


def _run_id(bench_dir: Path, section: str) -> str:
    """The newest run_id of a section's CSV ('' if absent): run ids start with a UTC timestamp."""
    path = bench_dir / f"{section}.csv"
    return str(pd.read_csv(path)["run_id"].max()) if path.exists() else ""


def _date(run_id: str) -> str:
    return f"{run_id[:4]}-{run_id[4:6]}-{run_id[6:8]}"


def _train_cells(train: pd.DataFrame, prefix: str) -> dict:
    """Per batch x backend x compile mode: M tokens/s, ms/step, MFU %; per batch the best of them."""
    numbers = {}
    ok = train[train["status"] == "ok"]
    for row in ok.itertuples():
        key = f"{prefix}train b{row.batch_size} {row.backend} {row.compile_mode}"
        numbers |= {f"{key} mtok s": row.tokens_per_s / 1e6, f"{key} ms": row.ms_per_step, f"{key} mfu pct": 100 * row.mfu}
    for batch, group in ok.groupby("batch_size"):
        best = group.loc[group["tokens_per_s"].idxmax()]
        key = f"{prefix}train b{batch} best"
        numbers |= {f"{key} mtok s": best["tokens_per_s"] / 1e6, f"{key} backend": best["backend"],
                    f"{key} mode": best["compile_mode"], f"{key} mfu pct": 100 * best["mfu"]}
    return numbers


def _layer_cells(layer: pd.DataFrame, prefix: str) -> dict:
    """Per layer shape (E, k): F, dense MFU %, and per backend the MoE/dense time ratio and MFU %."""
    numbers = {}
    for (experts, top_k), group in layer.groupby(["num_experts", "top_k"], sort=False):
        shape = f"{prefix}layer e{experts} k{top_k}"
        numbers |= {f"{shape} hidden": int(group["hidden"].iloc[0]), f"{shape} dense mfu pct": 100 * group["dense_mfu"].iloc[0]}
        for row in group.itertuples():
            if row.status == "ok":
                numbers |= {f"{shape} {row.backend} ratio": row.moe_over_dense, f"{shape} {row.backend} mfu pct": 100 * row.moe_mfu}
            else:
                numbers[f"{shape} {row.backend} ratio"] = "out of memory" if row.status == "oom" else row.status
    return numbers


def compiled_layer_numbers(compiled_dir: Path, mode: str = "default") -> dict:
    """The layer bench under torch.compile ``mode`` (MoE layer and dense FFN compiled alike, as
    training runs them) as ``Compiled*`` macros, with the directory and date."""
    layer = pd.read_csv(compiled_dir / "layer.csv")
    return {"compiled dir": compiled_dir.name, "compiled date": _date(_run_id(compiled_dir, "layer")),
            **_layer_cells(layer[layer["compile_mode"] == mode], "compiled ")}


def newest_compiled(bench_root: Path, device: str) -> Path | None:
    """The bench directory with the newest layer run that has compiled rows on ``device``: the paper's
    speed tables name one GPU, so a newer run on another GPU does not replace its numbers."""
    def compiled_on_device(layer: pd.DataFrame) -> bool:
        return {"compile_mode", "device_name"} <= set(layer) and (
            (layer["compile_mode"] != "none") & (layer["device_name"] == device)).any()
    dirs = [d for d in bench_root.glob("*/")
            if (d / "layer.csv").exists() and compiled_on_device(pd.read_csv(d / "layer.csv"))]
    return max(dirs, key=lambda d: _run_id(d, "layer"), default=None)


def bench_numbers(bench_dir: Path, latest_dir: Path, capacity_dir: Path) -> dict:
    """Speed macros: the full grid of ``bench_dir`` (train with every compile mode, every layer
    backend) as ``Bench*``/``TrainB*``/``LayerE*``, the capacity bench of ``capacity_dir`` as ``Cap*``,
    and the newest train and layer records of ``latest_dir`` as ``Latest*`` (each ratio comes from
    one run)."""
    train = pd.read_csv(bench_dir / "train.csv")
    capacity = pd.read_csv(capacity_dir / "capacity.csv")
    cap_record = _run_json(capacity_dir, "capacity")
    record = _run_json(bench_dir, "train")
    env = record.get("env", {})
    numbers = {"bench device": str(train["device_name"].iloc[0]), "bench torch": env.get("torch", str(train["torch"].iloc[0])),
               "bench date": _date(_run_id(bench_dir, "train")), "bench dir": bench_dir.name,
               "bench dtype": str(train["dtype"].iloc[0])}
    if record.get("peak_flops"):
        numbers["bench peak tflops"] = record["peak_flops"] / 1e12
    model = record.get("config", {}).get("model", {})
    numbers |= {f"bench train {k}": plain(v) for k, v in model.items() if k != "router"}
    numbers |= {"bench train steps": plain(record.get("config", {}).get("steps", "n/a"))}
    numbers |= _train_cells(train, "") | _layer_cells(pd.read_csv(bench_dir / "layer.csv"), "")
    for batch, group in train[train["status"] == "ok"].groupby("batch_size"):
        for backend, per in group.groupby("backend"):
            modes = per.set_index("compile_mode")["ms_per_step"]
            if {"none", "reduce-overhead"} <= set(modes.index):
                numbers[f"train b{batch} {backend} graph speedup"] = modes["none"] / modes["reduce-overhead"]
    cell = ["source", "num_experts", "top_k", "cf_label"]  # one cell per bench run; runs are averaged
    bounded = capacity[(capacity["status"] == "ok") & capacity["capacity_factor"].notna()]
    bw_frac = bounded.groupby(cell)["dispatch_bw_frac"].mean()
    numbers |= {"cap bw pct min": 100 * bw_frac.min(), "cap bw pct max": 100 * bw_frac.max(),
                "cap copy gbps": float(capacity["copy_gbps"].median()),
                "cap cells": len(capacity.drop_duplicates(cell)), "cap runs": capacity["run_id"].nunique(),
                "cap sources": ", ".join(capacity["source"].unique()), "cap dir": capacity_dir.name,
                "cap date": _date(_run_id(capacity_dir, "capacity")),
                "cap device": str(capacity["device_name"].iloc[0]),
                "cap timing": "host-ahead" if cap_record.get("config", {}).get("host_ahead") else "plain"}
    if capacity["run_id"].nunique() > 1:  # how far a cell moves between the bench runs the figure averages
        cells = spread(capacity, "capacity")
        for column, name in (("dispatch_ms", "dispatch"), ("layer_ms", "layer")):
            per = cells[cells["column"] == column]
            over = per[per["cv"] > 0.03]
            numbers |= {f"cap {name} cv pct": 100 * per["cv"].median(), f"cap {name} cv max pct": 100 * per["cv"].max(),
                        f"cap {name} cv le3 cells": int((per["cv"] <= 0.03).sum()), f"cap {name} cv cells": len(per),
                        f"cap {name} cv over3 cells": len(over),
                        f"cap {name} cv over3 dropless": int(over["cf_label"].eq("dropless").sum())}
    if cap_record.get("config", {}).get("checkpoint"):  # the training run whose router gave the logits
        numbers["cap checkpoint run"] = Path(cap_record["config"]["checkpoint"]).parent.name
    latest_train = pd.read_csv(latest_dir / "train.csv")
    commit = _run_json(latest_dir, "train").get("git", {}).get("commit") or "n/a"
    numbers |= {"latest dir": latest_dir.name, "latest commit": commit, "latest date": _date(_run_id(latest_dir, "train"))}
    numbers |= _train_cells(latest_train, "latest ") | _layer_cells(pd.read_csv(latest_dir / "layer.csv"), "latest ")
    return numbers


def mfu_numbers(bench_root: Path, min_dim: int = 768) -> dict:
    """The newest train-bench record of a model with D >= ``min_dim`` (wide enough for the matmuls to
    dominate, as the paper's MFU figure needs): its shape, the best MFU (shared FLOP counter / measured matmul peak), and that MFU with the causal
    half of the attention scores, 3 * L * 2*S*D FLOPs per token, left out of the count."""
    records = [json.loads(p.read_text()) for p in sorted(bench_root.glob("*/train_*.json"))]
    records = [r for r in records if r.get("config", {}).get("model", {}).get("dim", 0) >= min_dim]
    if not records:
        return {}
    record = max(records, key=lambda r: r["run_id"])
    model = record["config"]["model"]
    best = max((row for row in record["rows"] if row["status"] == "ok"), key=lambda row: row["mfu"])
    causal_half = 3 * model["layers"] * 2 * model["seq_len"] * model["dim"]
    flops = best["train_flops_per_token"]
    return {"mfu dim": model["dim"], "mfu layers": model["layers"], "mfu experts": model["num_experts"],
            "mfu seq len": model["seq_len"], "mfu batch": best["batch_size"], "mfu backend": best["backend"],
            "mfu pct": 100 * best["mfu"], "mfu causal pct": 100 * best["mfu"] * (flops - causal_half) / flops,
            "mfu peak tflops": record["peak_flops"] / 1e12, "mfu date": _date(record["run_id"])}


def newest(bench_root: Path, *sections: str) -> Path | None:
    """The bench directory with every section's CSV whose train/first section has the newest run id."""
    dirs = [d for d in bench_root.iterdir() if all((d / f"{s}.csv").exists() for s in sections)] if bench_root.is_dir() else []
    return max(dirs, key=lambda d: _run_id(d, sections[0]), default=None)


# Kernel profile (python -m moe_core.bench.profile layer): each kernel to the first part whose name
# fragment it contains; anything else, and the kernels below the printed top ones, to "other".
PROFILE_PARTS = (("gemm", ("GroupProblemShape", "nvjet")), ("gelu", ("gelu",)), ("router", ("f32f32", "sgemm")),
                 ("gather", ("index", "scatter_gather")), ("combine", ("mul_sum",)))
_SECTION = re.compile(r"^(?:moe \S+ E=(\d+) k=(\d+)|dense).*GPU ms/call ([\d.]+)")
_KERNEL = re.compile(r"^\s+([\d.]+) ms\s+\d+x\s+(.*)$")


def profile_parts(path: Path) -> dict:
    """{"E=8, k=2": {"moe": {part: GPU ms}, "dense": {...}}} from a profile_compiled.txt: each MoE
    layer's kernel times by PROFILE_PARTS, and those of the dense FFN printed after it."""
    shapes, current, shape = {}, None, None
    for line in path.read_text().splitlines():
        if section := _SECTION.match(line):
            if section.group(1):
                shape = f"E={section.group(1)}, k={section.group(2)}"
            current = shapes.setdefault(shape, {}).setdefault("moe" if section.group(1) else "dense",
                                                              {p: 0.0 for p, _ in PROFILE_PARTS} | {"other": 0.0})
            current["other"] += float(section.group(3))  # the kernels not listed stay in "other"
        elif (kernel := _KERNEL.match(line)) and current is not None:
            part = next((p for p, keys in PROFILE_PARTS if any(k in kernel.group(2) for k in keys)), "other")
            current[part] += float(kernel.group(1))
            current["other"] -= float(kernel.group(1))
    return shapes


def profile_numbers(path: Path) -> dict:
    """``Profile*`` macros: per shape, GPU ms of each part for the MoE layer and the dense FFN, totals."""
    numbers = {"profile dir": path.parent.name}
    for shape, sides in profile_parts(path).items():
        key = "profile " + shape.replace("=", "").replace(",", "").lower()
        for side, parts in sides.items():
            prefix = f"{key} dense" if side == "dense" else key
            numbers |= {f"{prefix} {part} ms": ms for part, ms in parts.items()}
            numbers[f"{prefix} total ms"] = sum(parts.values())
        moe = sides["moe"]
        for name, parts in (("compute", ("gemm", "gelu")), ("dispatch", ("gather", "combine")),
                            ("router", ("router", "other"))):  # the shares the text quotes
            numbers[f"{key} {name} pct"] = 100 * sum(moe[p] for p in parts) / sum(moe.values())
    return numbers


def newest_profile(bench_root: Path) -> Path | None:
    return max(bench_root.glob("*/profile_compiled.txt"), key=lambda p: p.parent.name, default=None)


GENERATED = {"numbers_bench.tex": "bench records", "numbers_setup.tex": "params files"}


def claim_evidence(runs_dir: Path, experiment: str, capacity_dir: Path | None, speed: dict | None,
                   profile: Path | None) -> Evidence:
    """What the claims are decided on, from the records (a part is None where they are absent)."""
    runs = load_experiment(runs_dir, experiment).runs if has_runs(runs_dir, experiment) else None
    capacity = bench_table(load_bench(capacity_dir)) if capacity_dir is not None else None
    return Evidence(runs=runs, analysis=analyse(runs) if runs is not None else None, capacity=capacity,
                    speed=speed, profile=profile_parts(profile) if profile is not None else None)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    root = ROOT / "runs" / "benchmarks"
    parser.add_argument("--bench-dir", type=Path, default=newest(root, "train", "layer", "capacity"),
                        help="full grid: train, layer and capacity (default: the newest with all three)")
    parser.add_argument("--capacity-dir", type=Path, default=newest(root, "capacity"),
                        help="the capacity bench (default: the newest with capacity records)")
    parser.add_argument("--compiled-layer-dir", type=Path,
                        help="layer bench with compiled rows (default: the newest on the GPU of --bench-dir)")
    parser.add_argument("--latest-dir", type=Path, default=newest(root, "train", "layer"),
                        help="newest train and layer records (default: the newest with both)")
    parser.add_argument("--profile", type=Path, default=newest_profile(root),
                        help="kernel profile of the compiled layer (default: the newest profile_compiled.txt)")
    parser.add_argument("--params-dir", type=Path, default=ROOT / "params")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "paper")
    parser.add_argument("--runs-dir", type=Path, default=ROOT / "runs", help="run records: <runs-dir>/<experiment>/")
    parser.add_argument("--experiment", default="experiment_a_v2", help="the Experiment A records the claims read")
    parser.add_argument("--tables-dir", type=Path, default=None,
                        help="where the claims table goes (default: <out-dir>/tables)")
    args = parser.parse_args(argv)
    if args.compiled_layer_dir is None and args.bench_dir is not None:
        device = str(pd.read_csv(args.bench_dir / "train.csv")["device_name"].iloc[0])
        args.compiled_layer_dir = newest_compiled(root, device)
    if None in (args.bench_dir, args.latest_dir, args.capacity_dir, args.compiled_layer_dir, args.profile):
        parser.error("bench records not found under runs/benchmarks/: give --bench-dir, --capacity-dir, "
                     "--compiled-layer-dir, --latest-dir and --profile")
    bench = (bench_numbers(args.bench_dir, args.latest_dir, args.capacity_dir)
             | compiled_layer_numbers(args.compiled_layer_dir) | mfu_numbers(root) | profile_numbers(args.profile))
    for name, numbers in (("numbers_bench.tex", bench),
                          ("numbers_setup.tex", setup_numbers(args.params_dir))):
        path = write_numbers(numbers, args.out_dir / name)
        path.write_text(f"% Written by python -m moe_core.analysis.paper ({GENERATED[name]}).\n" + path.read_text())
        print(path, f"({len(numbers)} macros)")
    evidence = claim_evidence(args.runs_dir, args.experiment, args.capacity_dir, bench, args.profile)
    verdicts = claims.evaluate(evidence)
    paths = claims.write_claims(verdicts, args.experiment, args.tables_dir or args.out_dir / "tables", args.out_dir)
    print(*paths[:2], f"({len(verdicts)} claims: {verdicts['verdict'].value_counts().to_dict()})")


if __name__ == "__main__":
    main()
