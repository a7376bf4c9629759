"""The fused backend: gather -> expert GEMM -> activation -> expert GEMM -> weighted combine as one
autograd function over a plan of expert-sorted kept rows, with an explicit backward.

Legend: T tokens, D model dim, F expert hidden, E experts, A assignments, N rows (see ``plan``).

Forward: h (and g) = x[token] W1 (W3) with the gather fused into the GEMM's loads, a = act(h) in its
epilogue; o = a W2 per row; y[t] = sum of weight * o over token t's kept rows, in a fixed order.
Backward: da = weight * dy[token] W2^T through the activation's derivative (dh, dg); dW2 = a^T
(weight * dy[token]); dW1 = x[token]^T dh (dW3 likewise); dx[t] = sum over t's rows of dh W1^T
(+ dg W3^T); dweight[a] = <dy[token], o[row]>. No atomics: bitwise reproducible.

Which ops run it: the Triton kernels, compiled on CUDA (bf16, fp16, float32) or under Triton's
interpreter on a machine without CUDA (float32, float64: slow, the CPU proof); otherwise
``ops_torch``, the same steps in PyTorch. Dropped assignments get no row: capacity saves compute.
"""
from __future__ import annotations

import importlib.util

import torch

from . import ops_torch
from .plan import make_plan

HAS_TRITON = importlib.util.find_spec("triton") is not None
if HAS_TRITON:
    from . import ops_triton


def kernel_ops(device: torch.device, dtype: torch.dtype):
    """``ops_triton`` where its kernels run for this device and dtype, else ``ops_torch``."""
    if HAS_TRITON:
        if ops_triton.INTERPRETED:
            usable = device.type == "cpu" and dtype in (torch.float32, torch.float64)
        else:
            usable = device.type == "cuda" and dtype in (torch.bfloat16, torch.float16, torch.float32)
        if usable:
            return ops_triton
    return ops_torch


class FusedExperts(torch.autograd.Function):
    """y = the weighted sum over each token's kept assignments of expert_e(x_t); see the module doc."""

    @staticmethod
    def forward(ctx, x_TD, weight_A, w1_EDF, w3_EDF, w2_EFD, plan, ops):
        h_NF, g_NF, a_NF = ops.up(x_TD, plan, w1_EDF, w3_EDF)
        o_ND = ops.rows(a_NF, w2_EFD, plan)
        ctx.save_for_backward(x_TD, weight_A, w1_EDF, w3_EDF, w2_EFD, h_NF, g_NF, a_NF, o_ND)
        ctx.plan, ctx.ops = plan, ops
        return ops.combine(o_ND, plan, weight_A)

    @staticmethod
    def backward(ctx, dy_TD):
        x_TD, weight_A, w1_EDF, w3_EDF, w2_EFD, h_NF, g_NF, a_NF, o_ND = ctx.saved_tensors
        plan, ops, need = ctx.plan, ctx.ops, ctx.needs_input_grad
        dy_TD = dy_TD.contiguous()
        weight_N = weight_A[plan.assign_N]
        dh_NF, dg_NF = ops.act_grad(dy_TD, plan, weight_N, w2_EFD.transpose(1, 2), h_NF, g_NF)
        dx_TD = dweight_A = dw1 = dw3 = dw2 = None
        if need[0]:
            w3t = w3_EDF.transpose(1, 2) if w3_EDF is not None else None
            dx_TD = ops.combine(ops.rows(dh_NF, w1_EDF.transpose(1, 2), plan, dg_NF, w3t), plan)
        if need[1]:
            dweight_A = ops.row_dot(dy_TD, o_ND, plan, weight_A.dtype)
        if need[2]:
            dw1 = ops.tn(x_TD, plan.token_N, dh_NF, None, None, plan)
        if need[3]:
            dw3 = ops.tn(x_TD, plan.token_N, dg_NF, None, None, plan)
        if need[4]:
            dw2 = ops.tn(a_NF, None, dy_TD, plan.token_N, weight_N, plan)
        return dx_TD, dweight_A, dw1, dw3, dw2, None, None


@torch.compiler.disable
def _apply(*args):
    """Opaque to torch.compile (a graph break): the kernels are launched as they are."""
    return FusedExperts.apply(*args)


def compute_dtype(x_TD: torch.Tensor) -> torch.dtype:
    """The dtype the experts compute in: autocast's where it is on, else the input's."""
    device = x_TD.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x_TD.dtype


def run_fused(x_TD: torch.Tensor, routing, experts, ops=None) -> torch.Tensor:
    """The ``fused`` dispatch backend (``ops`` forces an executor: ``ops_torch`` or ``ops_triton``)."""
    dtype = compute_dtype(x_TD)
    ops = ops or kernel_ops(x_TD.device, dtype)
    plan = make_plan(routing, ops.BLOCK_ROWS)
    w3_EDF = experts.w3_EDF.to(dtype) if experts.w3_EDF is not None else None
    return _apply(x_TD.to(dtype).contiguous(), routing.weight_A, experts.w1_EDF.to(dtype), w3_EDF,
                  experts.w2_EFD.to(dtype), plan, ops)
