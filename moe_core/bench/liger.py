"""liger-kernel's fused Triton MoE as a layer-bench column (``backends: [..., liger]``): the best
MoE layer installable on this stack, to compare the ``fused`` backend with in the same run.

Like for like with ``MoEFeedForward(router="softk", activation="swiglu", capacity_factor=None)``:
the same router (float32 logits, the softmax over the top-k logits), the same expert weights stored
in liger's layout (gate and up projections stacked: [E, 2F, D]; down: [E, D, F]), dropless. liger
computes no balance loss or routing statistics. Elsewhere (no CUDA, another activation, router or
a capacity, or liger-kernel not importable) the column is a one-line note.

Legend: T tokens, D model dim, F expert hidden, E experts, K top-k.
"""
from __future__ import annotations

import torch

from ..config import MoEConfig
from ..moe import MoEFeedForward


def liger_function():
    """(liger's autograd function, None), or (None, why it is not available)."""
    try:
        from liger_kernel.ops.fused_moe import LigerFusedMoEFunction
    except Exception as err:  # not installed, or built for another torch/triton: the column is a note
        return None, f"liger-kernel does not import ({type(err).__name__}: {str(err).splitlines()[0]})"
    return LigerFusedMoEFunction, None


def liger_unavailable(moe: MoEConfig, device: torch.device) -> str | None:
    """Why liger's fused MoE cannot stand beside this MoE config, or None."""
    if device.type != "cuda":
        return "liger-kernel's fused MoE needs CUDA"
    if moe.activation != "swiglu" or moe.router != "softk" or moe.capacity_factor is not None:
        return "liger-kernel's fused MoE is SwiGLU, softk and dropless only"
    return liger_function()[1]


class LigerMoE(torch.nn.Module):
    """The MoE layer's router and a copy of its expert weights, run by liger's fused MoE."""

    def __init__(self, layer: MoEFeedForward):
        super().__init__()
        self.router, self.top_k = layer.router, layer.cfg.top_k
        experts = layer.experts
        gate_up_EDF2 = torch.cat([experts.w3_EDF.detach(), experts.w1_EDF.detach()], dim=2)  # liger: gate first
        self.gate_up_E2FD = torch.nn.Parameter(gate_up_EDF2.transpose(1, 2).contiguous())
        self.down_EDF = torch.nn.Parameter(experts.w2_EFD.detach().transpose(1, 2).contiguous())
        self.fn = liger_function()[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_TD = x.reshape(-1, x.shape[-1])
        top = torch.topk(self.router.logits(x_TD), self.top_k, dim=-1)
        weight_TK = torch.softmax(top.values, dim=-1).to(x.dtype)
        y_TD = self.fn.apply(x_TD, self.gate_up_E2FD, self.down_EDF, top.indices.to(torch.int32), weight_TK)
        return y_TD.view_as(x)
