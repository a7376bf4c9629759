"""Expert weights and the dispatch backends that execute a :class:`~moe_core.routing.Routing`.

Legend: T tokens, D model dim, F expert hidden, E experts, C capacity, A assignments,
N rows handed to the experts (sorted assignments).

One math, several speeds; tests prove them equal on the same routing:

- ``loop``: per-expert Python loop, the readable oracle.
- ``einsum``: GShard-style one-hot dispatch/combine tensors [T, E, C] and einsums.
- ``padded``: an [E, C, D] buffer + batched matmul (Switch/GShard baseline without the one-hot).
- ``grouped``: sort by expert + grouped GEMM with offsets (``torch._grouped_mm``).
- ``fused``: Triton kernels with the gather fused into the first expert GEMM and the weighted
  combine after the second, forward and backward (``moe_core.fused``; its PyTorch statement where
  the kernels cannot run).

Dropless (capacity None) ``einsum`` and ``padded`` size C to the fullest expert, which needs one
host synchronisation; ``grouped`` and ``fused`` need none on CUDA.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .config import MoEConfig
from .fused import run_fused
from .routing import Routing


class Experts(torch.nn.Module):
    """E independent FFNs stored as [E, D, F] / [E, F, D] (GELU MLP, or SwiGLU with a gate w3).

    Per-expert fan-in initialisation: w1 ~ N(0, 1/D), w2 ~ N(0, 1/F), so an expert's output scale
    does not depend on E. The experts compute in the input's dtype (weights cast to it; a no-op when
    they match), so a float32 layer takes fp16, bf16 or fp64 input outside autocast.
    """

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        E, D, Fh = cfg.num_experts, cfg.dim, cfg.hidden
        self.activation = cfg.activation
        self.w1_EDF = torch.nn.Parameter(torch.randn(E, D, Fh) / math.sqrt(D))
        self.w2_EFD = torch.nn.Parameter(torch.randn(E, Fh, D) / math.sqrt(Fh))
        self.w3_EDF = torch.nn.Parameter(torch.randn(E, D, Fh) / math.sqrt(D)) if cfg.activation == "swiglu" else None

    def _act(self, up, gate):
        return F.silu(gate) * up if self.activation == "swiglu" else F.gelu(up)

    def one(self, x_ND: torch.Tensor, e: int) -> torch.Tensor:
        w1_DF, w2_FD = self.w1_EDF[e].to(x_ND.dtype), self.w2_EFD[e].to(x_ND.dtype)
        gate = x_ND @ self.w3_EDF[e].to(x_ND.dtype) if self.w3_EDF is not None else None
        return self._act(x_ND @ w1_DF, gate) @ w2_FD

    def batched(self, x_ECD: torch.Tensor) -> torch.Tensor:
        w1_EDF, w2_EFD = self.w1_EDF.to(x_ECD.dtype), self.w2_EFD.to(x_ECD.dtype)
        gate = torch.bmm(x_ECD, self.w3_EDF.to(x_ECD.dtype)) if self.w3_EDF is not None else None
        return torch.bmm(self._act(torch.bmm(x_ECD, w1_EDF), gate), w2_EFD)

    def grouped(self, x_ND: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
        """Rows [offs[e-1], offs[e]) go to expert e; rows past offs[-1] are left undefined."""
        gate = _grouped_mm(x_ND, self.w3_EDF, offs_E) if self.w3_EDF is not None else None
        return _grouped_mm(self._act(_grouped_mm(x_ND, self.w1_EDF, offs_E), gate), self.w2_EFD, offs_E)


def grouped_mm_supported(x_ND: torch.Tensor, w_EDF: torch.Tensor) -> bool:
    """``torch._grouped_mm`` needs bf16 on CUDA (float32, bf16 or fp16 on CPU: not float64) and
    16-byte aligned row strides."""
    row_bytes = (x_ND.shape[-1] * x_ND.element_size(), w_EDF.shape[-1] * x_ND.element_size())
    cpu_dtypes = (torch.float32, torch.bfloat16, torch.float16)
    dtype_ok = x_ND.dtype == torch.bfloat16 or (x_ND.device.type == "cpu" and x_ND.dtype in cpu_dtypes)
    return dtype_ok and all(b % 16 == 0 for b in row_bytes)


def _grouped_mm(x_ND: torch.Tensor, w_EDF: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
    """``torch._grouped_mm`` where supported, else a loop over the segments (one host sync).

    Autocast does not cover ``_grouped_mm``, so under CUDA autocast the operands are cast here.
    """
    if x_ND.is_cuda and torch.is_autocast_enabled("cuda"):
        x_ND = x_ND.to(torch.get_autocast_dtype("cuda"))
    if grouped_mm_supported(x_ND, w_EDF):
        return torch._grouped_mm(x_ND, w_EDF.to(x_ND.dtype), offs=offs_E)
    ends = offs_E.tolist()
    out_NF = x_ND.new_zeros(x_ND.shape[0], w_EDF.shape[-1])
    start = 0
    for e, end in enumerate(ends):
        out_NF[start:end] = x_ND[start:end] @ w_EDF[e].to(x_ND.dtype)
        start = end
    return out_NF


def _combine(out_AD: torch.Tensor, routing: Routing) -> torch.Tensor:
    """y_t = sum of w_a * out_a over token t's assignments, without atomics (bitwise deterministic).

    Dropped assignments have weight 0 but read some real row, possibly another token's (``padded``
    spreads them over the buffer), so they are masked with where: 0 * NaN would carry one token's
    NaN into another. A weighted sum over K for token-major layouts (elementwise, so torch.compile
    fuses it; a [T, 1, K] x [T, K, D] bmm was 3x slower on an H100, its backward an outer product);
    for expert choice, one block per expert (all kept, its tokens distinct: no collisions).
    """
    T, D = routing.num_tokens, out_AD.shape[-1]
    weight_A = routing.weight_A.to(out_AD.dtype)
    if routing.layout == "token":
        K = routing.top_k
        return torch.where(routing.keep_A.view(T, K, 1), out_AD.view(T, K, D) * weight_A.view(T, K, 1), 0).sum(1)
    y_TD = out_AD.new_zeros(T, D)
    C = routing.capacity
    for block_CD, w_C, tokens_C in zip(out_AD.split(C), weight_A.split(C), routing.token_A.split(C)):
        y_TD = y_TD.index_add(0, tokens_C, block_CD * w_C.unsqueeze(-1))
    return y_TD


def _assignment_inputs(x_TD: torch.Tensor, routing: Routing) -> torch.Tensor:
    """x of each assignment, [A, D]. Token-major layout is a broadcast, whose backward is a sum over
    K instead of an accumulating scatter."""
    if routing.layout == "token":
        K = routing.top_k
        return x_TD.unsqueeze(1).expand(-1, K, -1).reshape(-1, x_TD.shape[-1])
    return x_TD[routing.token_A]


def buffer_capacity(routing: Routing) -> int:
    """Rows per expert of the [E, C, D] buffer: C, or the fullest expert when dropless (host sync)."""
    return routing.capacity if routing.capacity is not None else max(1, int(routing.counts_E.max()))


def run_loop(x_TD: torch.Tensor, routing: Routing, experts: Experts) -> torch.Tensor:
    y_TD = torch.zeros_like(x_TD)
    for e in range(routing.num_experts):
        sel = torch.nonzero((routing.expert_A == e) & routing.keep_A).squeeze(-1)
        tokens = routing.token_A[sel]
        out = experts.one(x_TD[tokens], e) * routing.weight_A[sel].to(x_TD.dtype).unsqueeze(-1)
        y_TD = y_TD.index_add(0, tokens, out)
    return y_TD


def run_einsum(x_TD: torch.Tensor, routing: Routing, experts: Experts) -> torch.Tensor:
    """GShard one-hot dispatch and combine. A contraction multiplies every row by the 0s of the slots
    it does not fill, and 0 * NaN is NaN, so non-finite rows are zeroed before each einsum and put
    back (with where) into the slots, then the tokens, they belong to: one bad token stays its own."""
    T, E, C = routing.num_tokens, routing.num_experts, buffer_capacity(routing)
    flat_A = torch.where(routing.keep_A, (routing.token_A * E + routing.expert_A) * C + routing.slot_A, T * E * C)
    dispatch_TEC = x_TD.new_zeros(T * E * C + 1).index_put((flat_A,), routing.keep_A.to(x_TD.dtype))
    combine_TEC = x_TD.new_zeros(T * E * C + 1).index_put((flat_A,), routing.weight_A.to(x_TD.dtype))
    dispatch_TEC = dispatch_TEC[:-1].view(T, E, C)
    combine_TEC = combine_TEC[:-1].view(T, E, C)
    bad_T = ~torch.isfinite(x_TD).all(-1)
    x_ECD = torch.einsum("tec,td->ecd", dispatch_TEC, x_TD.masked_fill(bad_T.unsqueeze(-1), 0))
    bad_EC = torch.einsum("tec,t->ec", dispatch_TEC, bad_T.to(x_TD.dtype)) > 0
    out_ECD = experts.batched(x_ECD.masked_fill(bad_EC.unsqueeze(-1), math.nan))
    bad_EC = ~torch.isfinite(out_ECD).all(-1)
    y_TD = torch.einsum("tec,ecd->td", combine_TEC, out_ECD.masked_fill(bad_EC.unsqueeze(-1), 0))
    bad_T = torch.einsum("tec,ec->t", dispatch_TEC, bad_EC.to(x_TD.dtype)) > 0
    return y_TD.masked_fill(bad_T.unsqueeze(-1), math.nan)


def run_padded(x_TD: torch.Tensor, routing: Routing, experts: Experts) -> torch.Tensor:
    E, C, D = routing.num_experts, buffer_capacity(routing), x_TD.shape[-1]
    row_A = torch.where(routing.keep_A, routing.expert_A * C + routing.slot_A, E * C)  # E*C: trash row
    buf_RD = x_TD.new_zeros(E * C + 1, D).index_put((row_A,), _assignment_inputs(x_TD, routing))
    out_ECD = experts.batched(buf_RD[:-1].view(E, C, D))
    # Dropped assignments read some real row (their weight is 0) rather than one shared trash row:
    # the backward of this gather accumulates per row, and thousands of duplicates of one row
    # serialise it (87% of GPU time at CF=1 under skewed routing, found by the capacity bench).
    spread_A = torch.arange(row_A.numel(), device=row_A.device) % (E * C)
    out_AD = out_ECD.reshape(E * C, D)[torch.where(routing.keep_A, row_A, spread_A)]
    return _combine(out_AD, routing)


def run_grouped(x_TD: torch.Tensor, routing: Routing, experts: Experts) -> torch.Tensor:
    """Every assignment, dropped ones included, goes through its expert in expert-sorted order (the
    router's own sort): no host sync, no undefined rows, and a dropped assignment's output is
    multiplied by its weight 0. Capacity therefore saves no compute here (it does in ``padded``)."""
    order_N = routing.sorted_A
    offs_E = torch.cumsum(routing.counts_E, 0).to(torch.int32)
    out_ND = experts.grouped(x_TD[routing.token_A[order_N]], offs_E)
    out_AD = torch.empty_like(out_ND).index_copy(0, order_N, out_ND)
    return _combine(out_AD, routing)


BACKEND_FNS = {"loop": run_loop, "einsum": run_einsum, "padded": run_padded, "grouped": run_grouped,
               "fused": run_fused}
