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

import math
from dataclasses import replace
from functools import cache

import torch

from .config import ModelConfig, MoEConfig


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


@cache
def peak_flops(device: torch.device) -> tuple[float | None, str]:
    """The FLOP/s that MFU divides by: an 8192^3 bf16 matmul measured once on this GPU (the
    achievable dense peak, below the datasheet's); None on CPU, where MFU is not reported."""
    if device.type != "cuda":
        return None, "cpu: no peak, MFU not reported"
    n, iters, repeats = 8192, 10, 5
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(10):  # clocks up, cuBLAS heuristics chosen
        a @ b
    best_ms = math.inf
    for _ in range(repeats):  # the best of several timings: stable across runs
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            a @ b
        end.record()
        end.synchronize()
        best_ms = min(best_ms, start.elapsed_time(end))
    flops = 2 * n**3 * iters / (best_ms / 1e3)
    return flops, (f"measured: {n}^3 bf16 torch.matmul, best of {repeats} x {iters} "
                   f"on {torch.cuda.get_device_name(device)}")
