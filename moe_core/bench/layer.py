"""The layer bench: what a whole MoE layer (forward + backward) costs next to a dense FFN of equal
active FLOPs (hidden K*F), per problem shape, dispatch backend and compile mode, with MFU against
the measured bf16 matmul peak on CUDA. The ``liger`` column times liger-kernel's fused MoE on the
same router and weights where it can run; elsewhere its row says why (status "unavailable")."""
from __future__ import annotations

import math
import statistics
from pathlib import Path

import pandas as pd
import torch

from ..config import MoEConfig
from ..flops import ffn_forward_flops_per_token, peak_flops
from ..fused import epilogues, persistent
from ..model import DenseFeedForward
from ..moe import MoEFeedForward
from .configs import LIGER, LayerBenchConfig
from .liger import LigerMoE, liger_unavailable
from .report import record
from .timing import compiled, fwd_bwd, grad_inputs, guarded, time_median_ms


def run_layer(cfg: LayerBenchConfig, out_dir: str | Path | None = None) -> pd.DataFrame:
    """One row per (shape, compile mode, backend): MoE and dense ms, their ratio, tokens/s and MFU.
    Appends to ``out_dir``/layer.jsonl and writes layer_<run>.json when ``out_dir`` is given."""
    peak, peak_source = None, "cpu: no peak, MFU not reported"
    if cfg.torch_device.type == "cuda":
        peak, peak_source = peak_flops(cfg.torch_device)
    rows = [row for i, (shape, moe) in enumerate(zip(cfg.shapes, cfg.moe_configs()))
            for row in _shape_rows(cfg, moe, shape["tokens"], peak, seed=cfg.seed + 1000 + i)]
    return record(cfg, rows, out_dir, {"peak_flops": peak, "peak_flops_source": peak_source})


def _shape_rows(cfg: LayerBenchConfig, moe: MoEConfig, tokens: int, peak: float | None, seed: int) -> list[dict]:
    """The rows of one shape; its modules are freed on return, before the next shape allocates."""
    dev, dtype = cfg.torch_device, cfg.torch_dtype
    torch.manual_seed(cfg.seed)
    inputs = grad_inputs(tokens, moe.dim, sets=cfg.sets, seed=seed, device=dev, dtype=dtype)
    flops = 3.0 * tokens * ffn_forward_flops_per_token(moe)  # forward + backward = 3 forwards
    dense_flops = 3.0 * tokens * ffn_forward_flops_per_token(moe, router=False)
    with dev:
        layer = MoEFeedForward(moe).to(dtype)
    rows = []
    for mode in cfg.compile_modes:
        dense_all = [_time_dense(cfg, moe, mode, inputs) for _ in range(cfg.dense_repeats)]
        dense_ms = statistics.median(dense_all)
        for backend in cfg.backends:
            result = _time_backend(cfg, layer, backend, mode, inputs)
            moe_ms = result.get("moe_ms", math.nan)
            rows.append({"bench": "layer", "tokens": tokens, "dim": moe.dim, "hidden": moe.hidden,
                         "num_experts": moe.num_experts, "top_k": moe.top_k, "capacity_factor": moe.capacity_factor,
                         "activation": moe.activation, "router": cfg.router, "backend": backend, "compile_mode": mode,
                         "status": result["status"], "note": result.get("note"),
                         "moe_ms": moe_ms, "dense_ms": dense_ms, "dense_ms_repeats": dense_all,
                         "moe_over_dense": moe_ms / dense_ms,
                         "moe_tokens_per_s": tokens / (moe_ms / 1e3), "dense_tokens_per_s": tokens / (dense_ms / 1e3),
                         "moe_train_flops": flops, "dense_train_flops": dense_flops,
                         "moe_mfu": flops / (moe_ms / 1e3) / peak if peak else None,
                         "dense_mfu": dense_flops / (dense_ms / 1e3) / peak if peak else None})
    return rows


def _time_dense(cfg: LayerBenchConfig, moe: MoEConfig, mode: str, inputs: list) -> float:
    """Milliseconds of a freshly built dense FFN of hidden K*F (NaN where it fails)."""
    with cfg.torch_device:
        dense = DenseFeedForward(moe.dim, moe.top_k * moe.hidden, moe.activation).to(cfg.torch_dtype)
    return guarded(lambda: {"ms": time_median_ms(fwd_bwd(compiled(dense, mode)), inputs, cfg.torch_device,
                                                 **cfg.timing)}).get("ms", math.nan)


def _time_backend(cfg: LayerBenchConfig, layer: MoEFeedForward, backend: str, mode: str, inputs: list) -> dict:
    """{status, moe_ms} of one backend of the MoE layer, or of the liger column ({status, note} where it
    cannot run or fails: a third-party kernel, so its failure is a note, not the end of the bench)."""
    dev = cfg.torch_device
    if backend != LIGER:
        layer.backend = backend
        with epilogues(cfg.fused_epilogue), persistent(cfg.fused_persistent):  # read by the fused backend only
            return guarded(lambda: {"moe_ms": time_median_ms(fwd_bwd(compiled(layer, mode)), inputs, dev,
                                                             **cfg.timing)})
    note = liger_unavailable(layer.cfg, dev)
    if note is None:
        liger = LigerMoE(layer)
        try:
            return guarded(lambda: {"moe_ms": time_median_ms(fwd_bwd(compiled(liger, mode)), inputs, dev,
                                                             **cfg.timing)})
        except Exception as err:
            note = f"liger-kernel failed: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    print(f"layer bench: no liger column at E={layer.cfg.num_experts} k={layer.cfg.top_k} ({mode}): {note}")
    return {"status": "unavailable", "note": note}
