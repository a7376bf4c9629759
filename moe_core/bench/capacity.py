"""Experiment B, the capacity bench: per routing source x E x k x capacity factor, the drop
statistics, the time and memory traffic of dispatch + combine alone (identity experts), and the
whole MoE layer's forward + backward under those router logits.

Traffic model: each input read once, each output written once, divided by the bandwidth of a
device-to-device copy measured in the same run (dispatch_bw_frac).

Legend: N logit sets, T tokens, D model dim, E experts, C capacity, A assignments, R rows of the
dispatch buffer.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch

from ..config import MoEConfig, cf_label
from ..dispatch import BACKEND_FNS, buffer_capacity
from ..fused import dispatch_combine
from ..moe import MoEFeedForward
from ..routing import Routing, capacity_for
from .configs import CapacityBenchConfig
from .report import record
from .sources import LogitsRouter, route_logits, routed_metrics, router_logits_from_checkpoint, synthetic_logits
from .timing import copy_bandwidth, fwd_bwd, grad_inputs, guarded, host_enqueue_ms, time_median_ms


# -- traffic model ----------------------------------------------------------------------------------
def buffer_rows(routing: Routing, backend: str) -> int:
    """R: rows a backend moves into its expert buffer (padded/einsum [E, C, D], grouped: every
    assignment sorted by expert, loop and fused: the kept assignments)."""
    if backend in ("padded", "einsum"):
        return routing.num_experts * buffer_capacity(routing)
    if backend == "grouped":
        return routing.expert_A.numel()
    return int(routing.keep_A.sum())


def routing_bytes(routing: Routing) -> int:
    """Bytes of the routing tensors that dispatch and combine read (token, expert, slot, keep, weight)."""
    return sum(t.nbytes for t in (routing.token_A, routing.expert_A, routing.slot_A, routing.keep_A,
                                  routing.weight_A))


def dispatch_combine_bytes(num_tokens: int, dim: int, rows: int, elem_bytes: int, index_bytes: int) -> int:
    """Ideal traffic of dispatch + combine, each input read once and each output written once:
    dispatch reads x [T, D] and writes the buffer [R, D]; combine reads the buffer and writes
    y [T, D]; both read the routing tensors (``index_bytes``) once in all."""
    return 2 * (num_tokens + rows) * dim * elem_bytes + index_bytes


class IdentityExperts:
    """Stands in for Experts, so a backend's time is its dispatch + combine alone."""

    def one(self, x_ND: torch.Tensor, e: int) -> torch.Tensor:
        return x_ND

    def batched(self, x_ECD: torch.Tensor) -> torch.Tensor:
        return x_ECD

    def grouped(self, x_ND: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
        return x_ND


# fused reads its expert weights inside its kernels: its dispatch cell is its gather and combine alone
DISPATCH_FNS = {"fused": dispatch_combine}


# -- the bench --------------------------------------------------------------------------------------
def _capacity_cell(cfg: CapacityBenchConfig, moe: MoEConfig, logits_NTE: torch.Tensor,
                   xs: list[tuple[torch.Tensor, torch.Tensor]], copy_bps: float) -> dict:
    """One (source, E, k, CF) cell: drop statistics averaged over the logit sets, then the timings."""
    dev = cfg.torch_device
    logits = [logits_NTE[i].to(dev).requires_grad_() for i in range(logits_NTE.shape[0])]
    # each timed input: (x, dy, logits) so the layer's backward also runs through the gate
    inputs = [(*xs[i % len(xs)], logits[i % len(logits)]) for i in range(max(len(xs), len(logits)))]
    routed = [route_logits(lg.detach(), moe) for lg in logits]
    metrics = [routed_metrics(*r) for r in routed]
    row = {k: sum(m[k] for m in metrics) / len(metrics) for k in metrics[0]}

    def measure() -> dict:
        routings = [routing for routing, _ in routed]
        pairs = [(x.detach(), routings[i % len(routings)]) for i, (x, _, _) in enumerate(inputs)]
        backend, experts = DISPATCH_FNS.get(moe.backend, BACKEND_FNS[moe.backend]), IdentityExperts()
        def dispatch(p):
            return backend(p[0], p[1], experts)
        with torch.no_grad():
            dispatch_ms = time_median_ms(dispatch, pairs, dev, **cfg.timing, host_ahead=cfg.host_ahead)
            dispatch_host_ms = host_enqueue_ms(dispatch, pairs, dev)
        traffic = [dispatch_combine_bytes(cfg.tokens, cfg.dim, buffer_rows(r, moe.backend), x.element_size(),
                                          routing_bytes(r)) for x, r in pairs]
        with dev:  # initialised on the device: a CPU randn of E*D*F weights per cell would dominate
            layer = MoEFeedForward(moe).to(cfg.torch_dtype)
            layer.router = LogitsRouter(moe)
        step = fwd_bwd(layer)

        def layer_step(inp):
            layer.router.logits_TE = inp[2]
            step(inp)
        layer_ms = time_median_ms(layer_step, inputs, dev, **cfg.timing, host_ahead=cfg.host_ahead)
        layer_host_ms = host_enqueue_ms(layer_step, inputs, dev)
        bytes_moved = sum(traffic) / len(traffic)
        return {"dispatch_ms": dispatch_ms, "dispatch_host_ms": dispatch_host_ms, "dispatch_bytes": bytes_moved,
                "dispatch_gbps": bytes_moved / dispatch_ms / 1e6,
                "dispatch_bw_frac": bytes_moved / (dispatch_ms / 1e3) / copy_bps,
                "dispatch_tokens_per_s": cfg.tokens / (dispatch_ms / 1e3),
                "layer_ms": layer_ms, "layer_host_ms": layer_host_ms,
                "layer_tokens_per_s": cfg.tokens / (layer_ms / 1e3)}

    return {**row, **guarded(measure)}


def _problems(cfg: CapacityBenchConfig) -> list[tuple]:
    """(source, E, logits_NTE) per routing problem: every source resolved and checked before any
    timing. A checkpoint brings its own E (and one logit set per MoE layer)."""
    problems = []
    for src in cfg.parsed_sources():
        if src.kind == "checkpoint":
            logits_NTE = router_logits_from_checkpoint(src.path, cfg.tokens, device=cfg.torch_device)
            try:
                cfg.moe_configs([logits_NTE.shape[-1]])
            except ValueError as err:
                raise ValueError(f"checkpoint {src.path} (E={logits_NTE.shape[-1]}): {err}") from None
            problems.append((src, logits_NTE.shape[-1], logits_NTE))
        else:
            problems += [(src, e, synthetic_logits(src, cfg.sets, cfg.tokens, e, cfg.seed)) for e in cfg.experts]
    return problems


def run_capacity(cfg: CapacityBenchConfig, out_dir: str | Path | None = None) -> pd.DataFrame:
    """Experiment B over cfg's grid; one tidy row per (source, E, k, CF). Appends to
    ``out_dir``/capacity.jsonl and rewrites capacity.csv when ``out_dir`` is given."""
    problems = _problems(cfg)
    dev = cfg.torch_device
    copy_bps = copy_bandwidth(dev, cfg.torch_dtype, sets=cfg.sets, **cfg.timing)
    xs = grad_inputs(cfg.tokens, cfg.dim, sets=cfg.sets, seed=cfg.seed + 1000, device=dev, dtype=cfg.torch_dtype)
    rows = []
    for src, num_experts, logits_NTE in problems:
        for moe in cfg.moe_configs([num_experts]):
            rows.append({"bench": "capacity", "source": src.name, "num_experts": num_experts, "top_k": moe.top_k,
                         "capacity_factor": moe.capacity_factor, "cf_label": cf_label(moe.capacity_factor),
                         "capacity": capacity_for(moe.capacity_factor, cfg.tokens, moe.top_k, num_experts),
                         "tokens": cfg.tokens, "dim": cfg.dim, "hidden": cfg.hidden, "router": cfg.router,
                         "backend": cfg.backend, "logit_sets": logits_NTE.shape[0],
                         **_capacity_cell(cfg, moe, logits_NTE, xs, copy_bps), "copy_gbps": copy_bps / 1e9})
    return record(cfg, rows, out_dir, {"copy_bytes_per_s": copy_bps})
