"""The MoE feed-forward layer: router -> capacity -> dispatch backend -> combine, plus its stats.

Legend: T tokens (all leading dims of x flattened: one routing group), D model dim, E experts.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import MoEConfig
from .dispatch import BACKEND_FNS, Experts
from .routing import Router, balance_losses, routing_metrics


@dataclass
class MoEStats:
    """Per-layer routing statistics; every field is a tensor on the layer's device (no host sync)."""

    aux_loss: torch.Tensor  # differentiable Switch balance loss (0 for hash)
    z_loss: torch.Tensor  # differentiable router z-loss (0 for hash)
    drop_rate: torch.Tensor
    token_drop_rate: torch.Tensor
    load_cv: torch.Tensor
    max_vio: torch.Tensor
    gate_entropy: torch.Tensor  # NaN for hash
    p1_mean: torch.Tensor  # mean largest router probability (NaN for hash)
    p1_over_half: torch.Tensor  # share of tokens whose largest router probability exceeds 0.5 (NaN for hash)
    tokens_per_expert: torch.Tensor  # [E] assignments before capacity


class MoEFeedForward(torch.nn.Module):
    """Routes each token of ``x[..., D]`` to experts and returns ``(y, MoEStats)``, y shaped like x.

    The whole input is one routing group (capacity C = ceil(CF * T * k / E) with T = x.numel() / D).
    A token whose assignments were all dropped leaves as exactly 0: only the residual carries it.
    ``self.backend`` may be changed after construction; all backends compute the same function.
    x[..., S, D] holds sequences of S tokens (a 2-D x is one sequence), which expert choice's sequence
    and prefix groups follow. ``token_counts``: the training split's count of each token id, for a
    frequency-balanced hash table.
    """

    def __init__(self, cfg: MoEConfig, token_counts=None):
        super().__init__()
        self.cfg = cfg
        self.backend = cfg.backend
        self.router = Router(cfg, token_counts)
        self.experts = Experts(cfg)

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, MoEStats]:
        if x.dim() == 0:
            raise ValueError(f"x: expected a tensor [..., {self.cfg.dim}], got a 0-d tensor")
        if x.shape[-1] != self.cfg.dim:
            raise ValueError(f"x: last dim {x.shape[-1]} differs from MoEConfig.dim={self.cfg.dim}")
        x_TD = x.reshape(-1, self.cfg.dim)
        token_ids_T = token_ids.reshape(-1) if token_ids is not None else None
        routing, logits_TE, probs_TE = self.router(x_TD, token_ids_T, x.shape[-2] if x.dim() > 2 else x_TD.shape[0])
        y_TD = BACKEND_FNS[self.backend](x_TD, routing, self.experts)
        aux, z = balance_losses(routing, logits_TE, probs_TE, self.cfg)
        stats = MoEStats(aux_loss=aux, z_loss=z, tokens_per_expert=routing.tokens_per_expert_E,
                         **routing_metrics(routing, probs_TE))
        return y_TD.view_as(x), stats
