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

from .config import ModelConfig


def forward_flops_per_token(cfg: ModelConfig) -> float:
    """Forward FLOPs per token of a TinyMoEModel (see the module docstring for the formula)."""
    moe = cfg.moe
    D, S, L = cfg.dim, cfg.seq_len, cfg.layers
    mats = 3 if moe.activation == "swiglu" else 2
    attention = L * (8 * D * D + 4 * S * D)
    n_moe = sum(cfg.is_moe_layer(i) for i in range(L))
    active = moe.capacity_factor * moe.top_k if moe.router == "expert_choice" else moe.top_k
    router = 0 if moe.router == "hash" else 2 * D * moe.num_experts
    moe_ffn = n_moe * (router + active * 2 * D * moe.hidden * mats)
    dense_ffn = (L - n_moe) * 2 * D * moe.top_k * moe.hidden * mats
    return float(attention + moe_ffn + dense_ffn + 2 * D * cfg.vocab_size)


def train_flops_per_token(cfg: ModelConfig) -> float:
    """Forward + backward FLOPs per training token: 3 x forward."""
    return 3.0 * forward_flops_per_token(cfg)
