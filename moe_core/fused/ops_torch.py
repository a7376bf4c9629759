"""The fused backend's steps in PyTorch, one function per kernel of ``ops_triton`` with the same
arguments and results: where the kernels cannot run (no Triton; bf16/fp16 on a CPU, float64 on a
GPU) the backend computes the same decomposition, forward and backward, with these. A loop over the
experts' row segments (one host synchronisation per call, which a CPU does not notice).

Legend: T tokens, D model dim, F expert hidden, E experts, A assignments, N rows (see ``plan``).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .plan import FusedPlan, make_plan

BLOCK_ROWS = 16  # rows per tile of the plan (the loops here do not tile)


def build_plan(routing) -> FusedPlan:
    return make_plan(routing, BLOCK_ROWS)


def _segments(plan: FusedPlan):
    """(e, start, end) of each expert that holds rows."""
    start = 0
    for e, end in enumerate(plan.ends_E.tolist()):
        if end > start:
            yield e, start, end
        start = end


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _rows(src, token_N, s: int, t: int):
    """Rows s..t of the plan read from ``src``: src[token_N[n]], or src[n] when token_N is None."""
    return src[token_N[s:t]] if token_N is not None else src[s:t]


def gather(src_TD, plan: FusedPlan, scale_N=None):
    """out[n] = src[token[n]] (times scale[n]) for the kept rows; the rest stay zero."""
    out_ND = src_TD.new_zeros(plan.assign_N.numel(), src_TD.shape[1])
    kept = int(plan.ends_E[-1])
    value = src_TD[plan.token_N[:kept]]
    if scale_N is not None:
        value = value.to(_acc(src_TD.dtype)) * scale_N[:kept, None].to(_acc(src_TD.dtype))
    out_ND[:kept] = value
    return out_ND


def _act(h, g):
    """a = gelu(h) (erf), or silu(g) * h when g is given."""
    return F.gelu(h) if g is None else F.silu(g) * h


def _act_grads(da, h, g):
    """(dh, dg or None) from da = dL/da, in da's dtype."""
    if g is None:
        return da * (0.5 * (1.0 + torch.erf(h / math.sqrt(2.0))) + h * torch.exp(-0.5 * h * h) / math.sqrt(2 * math.pi)), None
    sig = torch.sigmoid(g)
    return da * g * sig, da * h * sig * (1.0 + g * (1.0 - sig))


def up(x, token_N, plan: FusedPlan, w1_EDF, w3_EDF, epilogue: bool = True):
    """(h, g or None, a or None) of every kept row: h = x W1, g = x W3; with the epilogue a = act(h, g)."""
    N, Fh = plan.assign_N.numel(), w1_EDF.shape[-1]
    h_NF = x.new_zeros(N, Fh)
    g_NF = x.new_zeros(N, Fh) if w3_EDF is not None else None
    for e, s, t in _segments(plan):
        x_RD = _rows(x, token_N, s, t)
        h_NF[s:t] = x_RD @ w1_EDF[e]
        if g_NF is not None:
            g_NF[s:t] = x_RD @ w3_EDF[e]
    return h_NF, g_NF, act(h_NF, g_NF, plan) if epilogue else None


def act(h_NF, g_NF, plan: FusedPlan):
    """a = act(h, g) of the kept rows (the rest stay zero)."""
    a_NF, kept = torch.zeros_like(h_NF), int(plan.ends_E[-1])
    a_NF[:kept] = _act(h_NF[:kept], g_NF[:kept] if g_NF is not None else None)
    return a_NF


def rows(a1_NK, b1_EKJ, plan: FusedPlan, a2_NK=None, b2_EKJ=None):
    """out[n] = a1[n] B1[e] (+ a2[n] B2[e]) for the rows n of expert e."""
    out_NJ = a1_NK.new_zeros(plan.assign_N.numel(), b1_EKJ.shape[-1])
    for e, s, t in _segments(plan):
        out_NJ[s:t] = a1_NK[s:t] @ b1_EKJ[e]
        if a2_NK is not None:
            out_NJ[s:t] += a2_NK[s:t] @ b2_EKJ[e]
    return out_NJ


def act_grad(dy, token_N, weight_N, plan: FusedPlan, w2t_EDF, h_NF, g_NF, epilogue: bool = True):
    """(dh, dg or None): da = weight * dy[token] W2^T through the activation's derivative (da = dy W2^T
    when token_N and weight_N are None: dy's rows are gathered and weighted already). Without the
    epilogue, (da, None)."""
    dh_NF = torch.zeros_like(h_NF)
    dg_NF = torch.zeros_like(g_NF) if g_NF is not None and epilogue else None
    acc = _acc(h_NF.dtype)
    for e, s, t in _segments(plan):
        da = (_rows(dy, token_N, s, t) @ w2t_EDF[e]).to(acc)
        if weight_N is not None:
            da = da * weight_N[s:t, None].to(acc)
        if not epilogue:
            dh_NF[s:t] = da
            continue
        dh, dg = _act_grads(da, h_NF[s:t].to(acc), g_NF[s:t].to(acc) if g_NF is not None else None)
        dh_NF[s:t] = dh
        if dg is not None:
            dg_NF[s:t] = dg
    return dh_NF, dg_NF


def act_backward(da_NF, h_NF, g_NF, plan: FusedPlan):
    """(dh, dg or None) of the kept rows from da (the rest stay zero)."""
    kept, acc = int(plan.ends_E[-1]), _acc(h_NF.dtype)
    dh_NF, dg_NF = torch.zeros_like(h_NF), torch.zeros_like(g_NF) if g_NF is not None else None
    dh, dg = _act_grads(da_NF[:kept].to(acc), h_NF[:kept].to(acc), g_NF[:kept].to(acc) if g_NF is not None else None)
    dh_NF[:kept] = dh
    if dg is not None:
        dg_NF[:kept] = dg
    return dh_NF, dg_NF


def tn(left, left_idx_N, right, right_idx_N, scale_N, plan: FusedPlan):
    """out[e] = sum over expert e's rows n of left[l(n)]^T (scale[n] * right[r(n)]): weight gradients."""
    out_EIJ = left.new_zeros(plan.num_experts, left.shape[-1], right.shape[-1])
    for e, s, t in _segments(plan):
        left_RI, right_RJ = _rows(left, left_idx_N, s, t), _rows(right, right_idx_N, s, t)
        if scale_N is not None:
            right_RJ = (right_RJ * scale_N[s:t, None]).to(right.dtype)
        out_EIJ[e] = left_RI.t() @ right_RJ
    return out_EIJ


def combine(rows_ND, plan: FusedPlan, weight_A=None):
    """out[t] = sum over token t's kept assignments a of weight[a] * rows[row_A[a]] (weight 1 when None)."""
    N, acc = rows_ND.shape[0], _acc(rows_ND.dtype)
    kept_A = plan.row_A < N
    value_AD = rows_ND[plan.row_A.clamp(max=N - 1)].to(acc)
    if weight_A is not None:
        value_AD = value_AD * weight_A.to(acc).unsqueeze(-1)
    value_AD = torch.where(kept_A.unsqueeze(-1), value_AD, 0)  # a dropped slot may read another token's row
    out_TD = value_AD.new_zeros(plan.num_tokens, rows_ND.shape[1]).index_add_(0, plan.token_A, value_AD)
    return out_TD.to(rows_ND.dtype)


def row_dot(dy_TD, o_ND, plan: FusedPlan, out_dtype: torch.dtype):
    """<dy[token[a]], o[row_A[a]]> per assignment: its gate weight's gradient (0 when dropped)."""
    N, acc = o_ND.shape[0], _acc(o_ND.dtype)
    dot_A = (dy_TD[plan.token_A].to(acc) * o_ND[plan.row_A.clamp(max=N - 1)].to(acc)).sum(-1)
    return torch.where(plan.row_A < N, dot_A, 0).to(out_dtype)
