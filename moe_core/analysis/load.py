"""Run records -> pandas frames: the first step of the analysis (records -> frames -> statistics ->
tables, figures, macros).

Conventions
- A *config* is a run's TrainConfig minus the replicate fields (``seed`` and the run-control
  fields), so the seeds of one config aggregate together. Its display ``name`` is the router (or
  ``dense``) and capacity factor, e.g. ``softk cf1.25``; where two configs would share one, the
  one that deviates from the experiment's usual value of a field gets it appended, e.g.
  ``top1 cf1.0 hidden=2048`` beside ``top1 cf1.0``. That suffix is the config's ``variant``
  (empty for the main config of a router and CF).
- A *budget* is the planned token count ``budget_tokens`` = steps x batch_size x seq_len; each
  budget is its own complete schedule. The schedule fields (SCHEDULE_FIELDS) never enter a name,
  so one configuration keeps its name across budgets and (name, budget_tokens) is one cell.
- A run's status is the one its summary.json states; a run without one is ``incomplete`` (config
  written, training not finished) or ``missing``; a record that does not parse is ``unreadable``.
- For expert_choice the headline validation metric is the causal eval (``val_loss``); the
  non-causal one is kept as ``*_noncausal``.
- Training FLOPs = tokens x the train FLOPs per token that the run stored, so k=1 and k=2 runs
  compare at equal compute.

Training tokens/s compare across configs only when measured alone on a device: a run whose
summary says it shared its GPU (``concurrency`` > 1) gets no ``median_tokens_per_s`` of its own
(its ``run_tokens_per_s`` is kept, marked not comparable); given the train bench's solo timings
(``bench_dir``), each run takes its configuration's bench median instead (solo_throughput).

Stored numbers are read, not recomputed: FLOPs per token from summary.json (else config.json's
``model``), the best validation loss and its step from summary.json. Only a record that lacks a
field (an older one, or a run without a summary) gets it computed: FLOPs per token from the stored
TrainConfig through moe_core.flops, the best loss from metrics.jsonl. The best non-causal loss is
not stored, so it always comes from metrics.jsonl.
"""
from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import NamedTuple

import pandas as pd

from .. import records as rr
from ..config import ROUTERS, cf_label
from ..flops import train_flops_per_token
from ..train import RUN_CONTROL_FIELDS, TrainConfig
from ..train.measure import THROUGHPUT_FIELDS, throughput_key

REPLICATE_FIELDS = ("seed", *RUN_CONTROL_FIELDS)  # vary between replicates of one config
SCHEDULE_FIELDS = ("steps", "warmup", "eval_interval", "log_interval")  # set by the budget, not in names
NAMED_FIELDS = ("router", "ffn", "capacity_factor")  # already spelled by the name's router and CF
LABELS = (*ROUTERS, "dense")  # display order of routers in tables and legends
ROUTING_STATS = ("drop_rate", "token_drop_rate", "load_cv", "max_vio", "gate_entropy",
                 "p1_mean", "p1_over_half", "token_expert_mi")  # the last three: router confidence, token-expert MI
# Evaluations of one set of weights, read at the run's best (causal) evaluation: expert choice's causal,
# causal-prefix and non-causal validation losses (the others have val_loss only).
AT_BEST = ("val_loss", "val_loss_prefix", "val_loss_noncausal")
DESCRIPTORS = ("name", "label", "cf_label", "variant", "budget_tokens", "own_validation")  # kept by aggregation
# The fields that choose the validation tokens: a config that deviates from the experiment's usual value
# of one (a split probe) is evaluated on other text, so its losses never rank against the others.
VALIDATION_FIELDS = ("corpus", "tokenizer", "bpe_vocab_size", "seq_len", "val_fraction", "split_method",
                     "eval_windows", "max_stories", "synthetic_chars", "data_seed")
BENCH_KEYS = ("source", "num_experts", "top_k", "capacity_factor", "cf_label", "tokens", "dim", "hidden",
              "router", "backend", "device_name", "dtype")
BENCH_METRICS = ("drop_rate", "token_drop_rate", "load_cv", "max_vio", "dispatch_ms", "dispatch_bw_frac",
                 "dispatch_tokens_per_s", "layer_ms", "layer_tokens_per_s")


class Records(NamedTuple):
    runs: pd.DataFrame  # one row per run directory
    evals: pd.DataFrame  # one row per evaluation (metrics.jsonl row + the run's config)


def has_runs(runs_dir: str | Path, experiment: str) -> bool:
    """Whether runs_dir/experiment holds at least one run directory with a record."""
    root = Path(runs_dir, experiment)
    return root.is_dir() and any(_is_run_dir(d) for d in root.iterdir())


def _is_run_dir(path: Path) -> bool:
    return path.is_dir() and any((path / f).exists() for f in (rr.CONFIG_FILE, rr.SUMMARY_FILE, rr.METRICS_FILE))


def load_experiment(runs_dir: str | Path, experiment: str, bench_dir: str | Path | None = None) -> Records:
    """Every run of runs_dir/experiment (see the module docstring for the columns' conventions).

    runs: the stored TrainConfig fields flattened, ``status``, ``error``, ``name``/``label``/
    ``cf_label``/``variant``, ``budget_tokens``, best (with its step) and final eval metrics,
    ``median_tokens_per_s`` (see solo_throughput; the train bench's records in ``bench_dir`` when
    given) and the ``concurrency`` it was measured under (runs sharing the GPU; None when the record
    does not say), ``tokens`` trained, ``train_flops_per_token`` and
    ``train_flops``. evals: each metrics.jsonl row with the run's config, ``train_flops`` at that
    row, and the row's own learning rate as ``step_lr``.
    """
    root = Path(runs_dir, experiment)
    read = [_read_run(d) for d in sorted(root.iterdir()) if _is_run_dir(d)] if root.is_dir() else []
    if not read:
        empty = pd.DataFrame(columns=["run", "status", "error", *DESCRIPTORS])
        return Records(empty, empty.copy())
    bench = load_bench(bench_dir, "train") if bench_dir is not None else pd.DataFrame()
    runs = solo_throughput(_name_configs(pd.DataFrame([run for run, _ in read])), bench)
    named = ("name", "variant", "own_validation")
    names = {run: dict(zip(named, values)) for run, *values in zip(runs["run"], *(runs[k] for k in named))}
    evals = pd.DataFrame([{**row, **names[row["run"]]} for _, rows in read for row in rows])
    return Records(sort_rows(runs), sort_rows(evals))


def _read_run(run_dir: Path) -> tuple[dict, list[dict]]:
    head = {"experiment": run_dir.parent.name, "run": run_dir.name}
    try:
        record = rr.read_json(run_dir / rr.CONFIG_FILE) or {}
        summary = rr.read_json(run_dir / rr.SUMMARY_FILE) or {}
        metrics = rr.read_metrics(run_dir / rr.METRICS_FILE)
    except (OSError, ValueError) as err:  # json.JSONDecodeError is a ValueError
        return {**head, "status": "unreadable", "error": f"{type(err).__name__}: {err}"}, []
    config = record.get("config", {})
    vocab = (record.get("data") or {}).get("vocab_size") or (record.get("model") or {}).get("vocab_size")
    flops = _stored_flops_per_token(record, summary)
    if flops is None:
        flops = _flops_per_token(config, vocab)
    common = {**config, **head, "run": record.get("run", run_dir.name),
              "status": summary.get("status") or ("incomplete" if record else "missing"),
              **_describe(config), "budget_tokens": _budget_tokens(config), "vocab_size": vocab,
              "train_flops_per_token": flops}
    best_loss, best_step = _best_val(summary, metrics)
    noncausal = min((r["val_loss_noncausal"] for r in metrics if r.get("val_loss_noncausal") is not None),
                    default=None)
    last = metrics[-1] if metrics else {}
    at_best = next((r for r in metrics if r.get("step") == best_step), {})
    splits = (record.get("data") or {}).get("splits") or {}
    run = {**common, "error": summary.get("error"), "steps_done": summary.get("steps_done", last.get("step")),
           "tokens": last.get("tokens"), "train_flops": _times(last.get("tokens"), flops),
           "best_val_loss": best_loss, "best_val_ppl": _exp(best_loss),
           "best_val_step": best_step, "best_val_loss_noncausal": noncausal,
           "best_val_ppl_noncausal": _exp(noncausal), "final_val_loss": last.get("val_loss"),
           **{f"final_{s}": last.get(s) for s in ROUTING_STATS}, **{f"{k}_at_best": at_best.get(k) for k in AT_BEST},
           **{k: summary.get(k) for k in ("median_tokens_per_s", "mfu", "params", "peak_mem_bytes", "wall_time_s")},
           "concurrency": summary.get("concurrency", record.get("concurrency")),
           "device_name": summary.get("device"), "git_commit": (record.get("git") or {}).get("commit"),
           **{f"{split}_corpus_{k}": (splits.get(split) or {}).get(k)
              for split in ("train", "validation") for k in ("n_tokens", "n_stories")}}
    # a metric key named like a config field (lr: the step's scheduled rate) becomes step_<key>, not a shadow
    evals = [{**common, **{f"step_{k}" if k in config else k: v for k, v in row.items()},
              "train_flops": _times(row.get("tokens"), flops)} for row in metrics]
    return run, evals


def _key_text(key: dict) -> str:
    """A throughput key as comparable text: numbers as floats (1 and 1.0 alike), None and NaN alike."""
    def norm(v):
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return None
        return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v
    return repr(tuple(norm(key.get(k)) for k in THROUGHPUT_FIELDS))


def solo_throughput(runs: pd.DataFrame, bench: pd.DataFrame) -> pd.DataFrame:
    """``runs`` with tokens/s that compare across configs in ``median_tokens_per_s``: the train
    bench's solo median for the run's configuration on its device, where ``bench`` (load_bench of
    the "train" section) has one; else the run's own median if it trained alone (``concurrency``
    1); else NaN, since runs that shared a GPU slowed each other. ``run_tokens_per_s`` keeps the
    run's own, ``tokens_per_s_source`` says which was taken (solo bench, run, not comparable)."""
    if runs.empty or "median_tokens_per_s" not in runs:
        return runs
    solo = {}
    if not bench.empty and {"device_name", "tokens_per_s", *THROUGHPUT_FIELDS} <= set(bench):
        ok = bench[bench["status"] == "ok"] if "status" in bench else bench
        keys = [(_key_text(row), row["device_name"]) for row in ok.to_dict("records")]
        solo = ok.assign(_key=keys).groupby("_key")["tokens_per_s"].median().to_dict()
    bench_speed = [solo.get((_key_text(throughput_key(run)), run["device_name"])) for run in runs.to_dict("records")]
    alone = runs["concurrency"].fillna(1).astype(int) <= 1
    source = ["solo bench" if b is not None else "run" if a else "not comparable: shared GPU"
              for b, a in zip(bench_speed, alone)]
    speed = [b if b is not None else r if a else math.nan
             for b, r, a in zip(bench_speed, runs["median_tokens_per_s"], alone)]
    return runs.assign(run_tokens_per_s=runs["median_tokens_per_s"], median_tokens_per_s=speed,
                       tokens_per_s_source=source)


def _stored_flops_per_token(record: dict, summary: dict) -> float | None:
    """Train FLOPs per token as the trainer stored it: summary.json, else config.json's model."""
    stored = summary.get("train_flops_per_token")
    return stored if stored is not None else (record.get("model") or {}).get("train_flops_per_token")


def _flops_per_token(config: dict, vocab_size: int | None) -> float | None:
    """Fallback for a record without stored FLOPs: the stored config rebuilt through TrainConfig
    (None if it cannot be)."""
    if not config or not vocab_size:
        return None
    known = set(TrainConfig.field_names())
    try:
        cfg = TrainConfig(**{k: v for k, v in config.items() if k in known})
        return train_flops_per_token(cfg.model_config(vocab_size))
    except (TypeError, ValueError):
        return None


def _best_val(summary: dict, metrics: list[dict]) -> tuple[float | None, int | None]:
    """(best validation loss, its step) from summary.json; from metrics.jsonl when it lacks them."""
    if "best_val_loss" in summary:
        return summary["best_val_loss"], summary.get("best_val_step")
    best = min((r for r in metrics if r.get("val_loss") is not None), key=lambda r: r["val_loss"], default={})
    return best.get("val_loss"), best.get("step")


def _describe(config: dict) -> dict:
    if not config:
        return {"label": None, "cf_label": None}
    dense = config.get("ffn") == "dense"
    return {"label": "dense" if dense else config.get("router"),
            "cf_label": None if dense else cf_label(config.get("capacity_factor"))}


def _budget_tokens(config: dict) -> int | None:
    """The planned tokens of the run's whole schedule: steps x global batch x sequence length."""
    sizes = [config.get(k) for k in ("steps", "batch_size", "seq_len")]
    return None if None in sizes else math.prod(sizes)


def _times(a, b):
    return None if a is None or b is None else a * b


def _exp(loss):
    return None if loss is None else math.exp(min(loss, 700))


def config_keys(frame: pd.DataFrame) -> list[str]:
    """The TrainConfig columns of ``frame`` that identify a config (all but the replicate fields)."""
    return [c for c in TrainConfig.field_names() if c in frame and c not in REPLICATE_FIELDS]


def _name_configs(runs: pd.DataFrame) -> pd.DataFrame:
    """Add ``name`` and ``variant``: the name is router (or dense) and CF, ``softk cf1.25`` or
    ``softk dropless``. Where configs would share a name, each gets appended the fields on which it
    deviates from the experiment's usual value (the most common one over its configs), ``top1 cf1.0
    hidden=2048``; that suffix is its ``variant``. Schedule fields are left out, so a config keeps
    its name at every budget; they are appended only where they alone tell two configs of one
    budget apart. A run without a config keeps its directory name."""
    keys = [k for k in config_keys(runs) if k not in NAMED_FIELDS]
    base = pd.Series([run if not isinstance(label, str) else label if label == "dense" else
                      f"{label} dropless" if cf == "dropless" else f"{label} cf{cf}"
                      for run, label, cf in zip(runs["run"], runs["label"], runs["cf_label"])], index=runs.index)
    variant = _deviations(runs, pd.Series("", index=runs.index), [k for k in keys if k not in SCHEDULE_FIELDS],
                          by=[base])
    variant = _deviations(runs, variant, [k for k in keys if k in SCHEDULE_FIELDS],
                          by=[base + variant, runs["budget_tokens"]])
    fields = [k for k in VALIDATION_FIELDS if k in runs]
    usual = _usual_values(runs, fields)
    own = pd.Series(False, index=runs.index)
    for field in fields:
        own |= runs[field].map(repr) != usual[field]
    return runs.assign(name=(base + " " + variant).str.strip(), variant=variant, own_validation=own)


def same_validation(frame: pd.DataFrame) -> pd.DataFrame:
    """The rows evaluated on the experiment's usual validation text (no split probe: ``own_validation``)."""
    if "own_validation" not in frame:
        return frame
    return frame[~frame["own_validation"].fillna(False).astype(bool)]


def _deviations(runs: pd.DataFrame, variant: pd.Series, fields: list[str], by: list) -> pd.Series:
    """``variant`` extended, in each group of ``by`` whose configs differ in ``fields``, by
    ``field=value`` for each such field where the config deviates from the usual value."""
    usual = _usual_values(runs, fields)
    out = variant.copy()
    for _, idx in runs.groupby(by, dropna=False).groups.items():
        group = runs.loc[idx]
        if fields and _identities(group, fields).nunique() > 1:
            varying = {k: group[k].map(repr) for k in fields if group[k].nunique(dropna=False) > 1}
            out[idx] = [" ".join([variant[i], *(f"{k}={group.at[i, k]}" for k, text in varying.items()
                                                if text[i] != usual[k])]).strip() for i in idx]
    return out


def _identities(frame: pd.DataFrame, fields: list[str]) -> pd.Series:
    return pd.Series([repr(row) for row in frame[fields].itertuples(index=False)], index=frame.index)


def _usual_values(runs: pd.DataFrame, fields: list[str]) -> dict[str, str]:
    """Per field, repr of its most common value over the distinct configs (first in row order on a tie)."""
    configs = runs.loc[~_identities(runs, config_keys(runs)).duplicated()]
    usual = {}
    for k in fields:
        counts = Counter(configs[k].map(repr))
        usual[k] = max(counts, key=counts.__getitem__)  # Counter keeps first-seen order; max keeps the first
    return usual


def sort_rows(frame: pd.DataFrame) -> pd.DataFrame:
    """Rows in display order: budget, router order of LABELS, then k, CF (dropless last), name, seed, step."""
    if frame.empty:
        return frame
    key = {"label": lambda s: s.map({lab: i for i, lab in enumerate(LABELS)}).fillna(len(LABELS)),
           "cf_label": lambda s: s.map(cf_order_value)}
    cols = [c for c in ("budget_tokens", "label", "top_k", "cf_label", "name", "seed", "step") if c in frame]
    return frame.sort_values(cols, key=lambda s: key.get(s.name, lambda v: v)(s), na_position="last",
                             kind="stable").reset_index(drop=True)


def cf_order_value(label) -> float:
    """Sort value of a cf_label: the factor, dropless after every finite one, none (dense) last."""
    if not isinstance(label, str):
        return math.inf
    return 1e9 if label == "dropless" else float(label)


def failed_runs(runs: pd.DataFrame) -> pd.DataFrame:
    """The runs that are not ok, with why (listed in the notebooks, excluded from statistics)."""
    cols = [c for c in ("run", "name", "status", "steps_done", "error") if c in runs]
    return runs.loc[runs["status"] != "ok", cols].reset_index(drop=True)


def load_bench(bench_dir: str | Path, section: str = "capacity") -> pd.DataFrame:
    """The bench's tidy rows (``<section>.jsonl``, else ``<section>.csv``) of moe_core.bench, one
    row per measurement and bench run (``run_id``); an empty frame when there are none yet."""
    base = Path(bench_dir, section)
    jsonl, csv = base.with_suffix(".jsonl"), base.with_suffix(".csv")
    if jsonl.exists():
        frame = pd.DataFrame(rr.read_metrics(jsonl))
    elif csv.exists():
        frame = pd.read_csv(csv)
    else:
        return pd.DataFrame(columns=[*BENCH_KEYS, *BENCH_METRICS, "status", "run_id"])
    if "capacity_factor" in frame:  # the join key, spelled as training runs spell it (a CSV reads "1" as 1.0)
        frame["cf_label"] = frame["capacity_factor"].map(cf_label)
    return frame
