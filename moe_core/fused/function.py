"""The fused backend: gather -> expert GEMM -> activation -> expert GEMM -> weighted combine as one
custom operator over a plan of expert-sorted kept rows, with an explicit backward (a second one).

Legend: T tokens, D model dim, F expert hidden, E experts, A assignments, N rows (see ``plan``).

Forward: xs[n] = x[token[n]] gathered once (``pregather``; else the gather is fused into the GEMM's
loads); h (and g) = xs W1 (W3), a = act(h, g) in a pass of its own (``epilogue``: in the GEMM's
epilogue); o = a W2 per row; y[t] = sum of weight * o over token t's kept rows, in a fixed order.
Backward: dys[n] = weight[n] * dy[token[n]] gathered once (or in the loads, weighted in the epilogue);
da = dys W2^T, then through the activation's derivative in a pass (or the epilogue): dh, dg; dW2 =
a^T dys; dW1 = xs^T dh (dW3 likewise); dx[t] = sum over t's rows of dh W1^T (+ dg W3^T); dweight[a] =
<dy[token], o[row]>. No atomics: bitwise reproducible.

Pre-gathering costs one copy of N x D each way and turns four gathered GEMMs into plain ones, which
the tile bench (``moe_core.bench.fused_tiles``) times faster; ``pregather=False`` keeps the fused gather.
The activation apart costs a read and a write of the N x F arrays each way, and lets the two GEMMs
that had epilogues run as plain ones, which the tile bench also times faster (``EPILOGUE``).

The two steps are ``torch.library`` custom ops: torch.compile keeps them in its graph as opaque calls
(no graph break), so a compiled model stays one graph and CUDA graphs can capture it.

Which ops run them: the Triton kernels, compiled on CUDA (bf16, fp16, float32) or under Triton's
interpreter on a machine without CUDA (float32, float64: slow, the CPU proof); otherwise
``ops_torch``, the same steps in PyTorch. Dropped assignments get no row: capacity saves compute.
"""
from __future__ import annotations

import contextlib
import importlib.util
import sys
from dataclasses import fields

import torch
from torch import Tensor

from . import ops_torch
from .plan import FusedPlan

HAS_TRITON = importlib.util.find_spec("triton") is not None
OPS = {"ops_torch": ops_torch}
if HAS_TRITON:
    from . import ops_triton
    OPS["ops_triton"] = ops_triton

# Where the activation and its gradient are computed: in the up-projection's and activation gradient's
# epilogues (True), or in elementwise passes of their own after plain GEMMs (False, the default: the tile
# bench timed a forward + backward's steps 0.4-0.7 ms faster so at all four bench shapes; BENCHMARKS.md).
EPILOGUE = False
_PLAN_TENSORS = [f.name for f in fields(FusedPlan) if f.type in ("torch.Tensor", torch.Tensor)]


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


def _plan(plan_tensors: list[Tensor], num_tokens: int, num_experts: int, block_rows: int) -> FusedPlan:
    return FusedPlan(**dict(zip(_PLAN_TENSORS, plan_tensors)), num_tokens=num_tokens, num_experts=num_experts,
                     block_rows=block_rows)


def _or_empty(t: Tensor | None, like: Tensor) -> Tensor:
    """A custom op returns tensors only: an empty one stands for None."""
    return t if t is not None else like.new_empty(0)


@torch.library.custom_op("moe_core::fused_forward", mutates_args=())
def fused_forward(x_TD: Tensor, weight_A: Tensor, w1_EDF: Tensor, w3_EDF: Tensor | None, w2_EFD: Tensor,
                  plan_tensors: list[Tensor], block_rows: int, ops_name: str, pregather: bool,
                  epilogue: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(y, h, g, a, o, xs): the output and what the backward reads (g, xs empty where absent)."""
    ops, plan = OPS[ops_name], _plan(plan_tensors, x_TD.shape[0], w1_EDF.shape[0], block_rows)
    xs_ND = ops.gather(x_TD, plan) if pregather else None
    h_NF, g_NF, a_NF = ops.up(xs_ND if pregather else x_TD, None if pregather else plan.token_N, plan, w1_EDF, w3_EDF,
                              epilogue)
    if not epilogue:
        a_NF = ops.act(h_NF, g_NF, plan)
    o_ND = ops.rows(a_NF, w2_EFD, plan)
    y_TD = ops.combine(o_ND, plan, weight_A)
    return y_TD, h_NF, _or_empty(g_NF, h_NF), a_NF, o_ND, _or_empty(xs_ND, x_TD)


@fused_forward.register_fake
def _(x_TD, weight_A, w1_EDF, w3_EDF, w2_EFD, plan_tensors, block_rows, ops_name, pregather, epilogue):
    (N,), (T, D), Fh = plan_tensors[_PLAN_TENSORS.index("assign_N")].shape, x_TD.shape, w1_EDF.shape[-1]
    return (x_TD.new_empty(T, D), x_TD.new_empty(N, Fh), x_TD.new_empty((N, Fh) if w3_EDF is not None else 0),
            x_TD.new_empty(N, Fh), x_TD.new_empty(N, D), x_TD.new_empty((N, D) if pregather else 0))


@torch.library.custom_op("moe_core::fused_backward", mutates_args=())
def fused_backward(dy_TD: Tensor, x_src: Tensor, weight_A: Tensor, w1_EDF: Tensor, w3_EDF: Tensor | None,
                   w2_EFD: Tensor, h_NF: Tensor, g_NF: Tensor, a_NF: Tensor, o_ND: Tensor, plan_tensors: list[Tensor],
                   block_rows: int, ops_name: str, pregather: bool, epilogue: bool,
                   needs: list[bool]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, dweight, dW1, dW3, dW2), each empty unless ``needs`` asks for it. ``x_src`` is xs when
    pregathered, else x."""
    ops, plan = OPS[ops_name], _plan(plan_tensors, dy_TD.shape[0], w1_EDF.shape[0], block_rows)
    g_NF = g_NF if w3_EDF is not None else None
    weight_N = weight_A[plan.assign_N]
    x_idx = None if pregather else plan.token_N
    if pregather:  # dys = weight * dy[token], gathered once for the two GEMMs that read it
        dy_src, dy_idx, dy_scale = ops.gather(dy_TD, plan, weight_N), None, None
    else:
        dy_src, dy_idx, dy_scale = dy_TD, plan.token_N, weight_N
    dh_NF, dg_NF = ops.act_grad(dy_src, dy_idx, dy_scale, plan, w2_EFD.transpose(1, 2), h_NF, g_NF, epilogue)
    if not epilogue:
        dh_NF, dg_NF = ops.act_backward(dh_NF, h_NF, g_NF, plan)
    grads = [None] * 5
    if needs[0]:
        w3t = w3_EDF.transpose(1, 2) if w3_EDF is not None else None
        grads[0] = ops.combine(ops.rows(dh_NF, w1_EDF.transpose(1, 2), plan, dg_NF, w3t), plan)
    if needs[1]:
        grads[1] = ops.row_dot(dy_TD, o_ND, plan, weight_A.dtype)
    if needs[2]:
        grads[2] = ops.tn(x_src, x_idx, dh_NF, None, None, plan)
    if needs[3] and w3_EDF is not None:
        grads[3] = ops.tn(x_src, x_idx, dg_NF, None, None, plan)
    if needs[4]:
        grads[4] = ops.tn(a_NF, None, dy_src, dy_idx, dy_scale, plan)
    return tuple(_or_empty(g, dy_TD) for g in grads)


@fused_backward.register_fake
def _(dy_TD, x_src, weight_A, w1_EDF, w3_EDF, w2_EFD, h_NF, g_NF, a_NF, o_ND, plan_tensors, block_rows, ops_name,
      pregather, epilogue, needs):
    like = (dy_TD, weight_A, w1_EDF, w3_EDF, w2_EFD)
    return tuple(t.new_empty(t.shape) if need and t is not None else dy_TD.new_empty(0) for t, need in zip(like, needs))


def _setup_context(ctx, inputs, output):
    x_TD, weight_A, w1_EDF, w3_EDF, w2_EFD, plan_tensors, block_rows, ops_name, pregather, epilogue = inputs
    _, h_NF, g_NF, a_NF, o_ND, xs_ND = output
    ctx.save_for_backward(xs_ND if pregather else x_TD, weight_A, w1_EDF, w3_EDF, w2_EFD, h_NF, g_NF, a_NF, o_ND,
                          *plan_tensors)
    ctx.meta = (block_rows, ops_name, pregather, epilogue)
    ctx.set_materialize_grads(False)  # the outputs past y get no gradient: no zero tensors filled for them


def _backward(ctx, dy_TD, *_):
    """Only y's gradient matters (the caller sees y alone): the other outputs are the backward's inputs."""
    x_src, weight_A, w1_EDF, w3_EDF, w2_EFD, h_NF, g_NF, a_NF, o_ND, *plan_tensors = ctx.saved_tensors
    needs = list(ctx.needs_input_grad[:5])
    grads = fused_backward(dy_TD.contiguous(), x_src, weight_A, w1_EDF, w3_EDF, w2_EFD, h_NF, g_NF, a_NF, o_ND,
                           plan_tensors, *ctx.meta, needs)
    return (*(g if need else None for g, need in zip(grads, needs)), [None] * len(plan_tensors), None, None, None,
            None)


fused_forward.register_autograd(_backward, setup_context=_setup_context)


def compute_dtype(x_TD: torch.Tensor) -> torch.dtype:
    """The dtype the experts compute in: autocast's where it is on, else the input's."""
    device = x_TD.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x_TD.dtype


def dispatch_combine(x_TD: torch.Tensor, routing, experts=None) -> torch.Tensor:
    """The fused backend's data movement alone, as if every expert were the identity: the plan, the
    gather of the kept rows and the weighted combine (the capacity bench's dispatch cell)."""
    ops = kernel_ops(x_TD.device, x_TD.dtype)
    plan = ops.build_plan(routing)
    return ops.combine(ops.gather(x_TD.contiguous(), plan), plan, routing.weight_A)


@contextlib.contextmanager
def _setting(module, name: str, value):
    saved = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, saved)


def epilogues(on: bool = True):
    """Inside the block the fused backend computes the activation in its GEMMs' epilogues (``on``), or in
    passes: how the layer bench times the other way in one command (``fused_epilogue``)."""
    return _setting(sys.modules[__name__], "EPILOGUE", on)


def persistent(on: bool = True):
    """Inside the block the GEMMs that read plain rows run persistent, through tensor descriptors, where
    they can (``on``, the default), or one program per tile: the layer bench's ``fused_persistent``."""
    return _setting(ops_triton, "PERSISTENT", on) if HAS_TRITON else contextlib.nullcontext()


def op_args(x_TD: torch.Tensor, routing, experts, ops=None, pregather: bool = True,
            epilogue: bool | None = None) -> tuple:
    """``fused_forward``'s arguments for this layer call: the compute dtype's tensors and the plan
    (``epilogue`` None: ``EPILOGUE``)."""
    dtype = compute_dtype(x_TD)
    ops = ops or kernel_ops(x_TD.device, dtype)
    plan = ops.build_plan(routing)
    w3_EDF = experts.w3_EDF.to(dtype) if experts.w3_EDF is not None else None
    return (x_TD.to(dtype).contiguous(), routing.weight_A, experts.w1_EDF.to(dtype), w3_EDF, experts.w2_EFD.to(dtype),
            [getattr(plan, name) for name in _PLAN_TENSORS], ops.BLOCK_ROWS, ops.__name__.rsplit(".", 1)[-1],
            pregather, EPILOGUE if epilogue is None else epilogue)


def run_fused(x_TD: torch.Tensor, routing, experts, ops=None, pregather: bool = True,
              epilogue: bool | None = None) -> torch.Tensor:
    """The ``fused`` dispatch backend (``ops`` forces an executor: ``ops_torch`` or ``ops_triton``;
    ``pregather=False`` fuses the gathers into the GEMMs' loads instead; ``epilogue`` computes the
    activation and its gradient in the GEMMs' epilogues, else in passes of their own)."""
    return fused_forward(*op_args(x_TD, routing, experts, ops, pregather, epilogue))[0]
