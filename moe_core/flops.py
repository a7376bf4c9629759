"""FLOP accounting, written once: MFU and iso-FLOP plots both use these functions.

Convention (nanoGPT / PaLM appendix B): a matmul of [m, n] x [n, p] costs 2*m*n*p FLOPs; training
costs 3x the forward (backward = 2x forward); attention scores count the full S x S product
(causal masking not subtracted), as in the 6N + 12*L*D*S formula. Norms, softmax, activations and
the router's top-k are not counted. Per token, forward:

    attention   L * (8*D^2 + 4*S*D)                  qkv + out projections, QK^T and AV
    MoE FFN     L_moe * (2*D*E + a * 2*D*F*m)          router (none for hash) + a active experts,
                                                       m = 2 (GELU) or 3 (SwiGLU)
    dense FFN   L_dense * 2*D*(K*F)*m                  hidden K*F (the iso-FLOP baseline)
    LM head     2*D*V

a = K for token-choice routers (drops not subtracted: nominal active compute) and
C*E/T ~= capacity_factor * K for expert choice.
"""
from __future__ import annotations

import argparse
import math
import re
import time
from dataclasses import replace
from functools import cache
from pathlib import Path

import torch

from .config import ModelConfig, MoEConfig
from .records import read_json, write_json


def ffn_forward_flops_per_token(moe: MoEConfig, *, router: bool = True) -> float:
    """One FFN layer's forward FLOPs per token: K*F active hidden (m = 2 GELU / 3 SwiGLU matrices),
    plus the router's 2*D*E when ``router``. A dense FFN of hidden K*F is ``router=False``."""
    mats = 3 if moe.activation == "swiglu" else 2
    active = moe.capacity_factor * moe.top_k if moe.router == "expert_choice" else moe.top_k
    return float(active * 2 * moe.dim * moe.hidden * mats + (2 * moe.dim * moe.num_experts if router else 0))


def forward_flops_per_token(cfg: ModelConfig) -> float:
    """Forward FLOPs per token of a TinyMoEModel (see the module docstring for the formula)."""
    moe = cfg.moe
    D, S, L = cfg.dim, cfg.seq_len, cfg.layers
    attention = L * (8 * D * D + 4 * S * D)
    n_moe = sum(cfg.is_moe_layer(i) for i in range(L))
    moe_ffn = n_moe * ffn_forward_flops_per_token(moe, router=moe.router != "hash")
    dense_ffn = (L - n_moe) * ffn_forward_flops_per_token(replace(moe, router="softk"), router=False)
    return float(attention + moe_ffn + dense_ffn + 2 * D * cfg.vocab_size)


def train_flops_per_token(cfg: ModelConfig) -> float:
    """Forward + backward FLOPs per training token: 3 x forward."""
    return 3.0 * forward_flops_per_token(cfg)


PEAK_CACHE = "peak_flops"  # the measured peaks' directory under a cache dir


def peak_flops(device: torch.device, cache_dir: str | Path | None = None) -> tuple[float | None, str]:
    """(FLOP/s that MFU divides by, where it comes from): an 8192^3 bf16 matmul measured on this GPU
    (the achievable dense peak, below the datasheet's); None on CPU, where MFU is not reported.

    Measured once per process and device; with ``cache_dir``, once per GPU model and torch version:
    stored under ``cache_dir``/peak_flops/ and read back by every later run (a sweep's runs would
    otherwise each spend a second on it, and a run sharing its GPU would measure a fraction)."""
    if device.type != "cuda":
        return None, "cpu: no peak, MFU not reported"
    return _cuda_peak(device, None if cache_dir is None else str(cache_dir))


@cache
def _cuda_peak(device: torch.device, cache_dir: str | None) -> tuple[float, str]:
    name = torch.cuda.get_device_name(device)
    key = re.sub(r"[^A-Za-z0-9.+-]+", "_", f"{name}_torch{torch.__version__}")
    path = Path(cache_dir, PEAK_CACHE, f"{key}.json") if cache_dir is not None else None
    stored = read_json(path) if path is not None and path.is_file() else None
    if stored is not None and stored.get("device") == name and stored.get("torch") == torch.__version__:
        return stored["flops"], f"{stored['source']}; cached in {path}"
    flops, source = _measure_peak(device), f"measured: 8192^3 bf16 torch.matmul, best of 5 x 10 on {name}"
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, {"device": name, "torch": torch.__version__, "flops": flops, "source": source,
                          "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S")})
    return flops, source


def _measure_peak(device: torch.device, n: int = 8192, iters: int = 10, repeats: int = 5) -> float:
    """FLOP/s of an n^3 bf16 matmul: the best of ``repeats`` timings of ``iters`` calls (stable across runs)."""
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(10):  # clocks up, cuBLAS heuristics chosen
        a @ b
    best_ms = math.inf
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            a @ b
        end.record()
        end.synchronize()
        best_ms = min(best_ms, start.elapsed_time(end))
    return 2 * n**3 * iters / (best_ms / 1e3)


def main(argv: list[str] | None = None) -> int:
    """``python -m moe_core.flops --cache-dir DIR``: measure this GPU's peak into the cache (the sweep
    does, before it starts several runs on one GPU) and print it."""
    parser = argparse.ArgumentParser(prog="python -m moe_core.flops", description=main.__doc__.split("\n")[0])
    parser.add_argument("--cache-dir", required=True)
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    flops, source = peak_flops(device, args.cache_dir)
    print(f"{device}: {'-' if flops is None else f'{flops / 1e12:.1f} TFLOP/s'} ({source})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
