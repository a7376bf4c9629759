"""Launchers of the fused backend's Triton kernels (``kernels``), one per step, with the same
arguments and results as ``ops_torch``. Compiled on CUDA, the GEMM kernels are autotuned over their
column and reduction tiles (the row tile BM is fixed: the plan's tiles depend on it); under Triton's
interpreter (CPU tensors) they run with small fixed tiles.

Legend: T tokens, D model dim, F expert hidden, E experts, A assignments, N rows (see ``plan``).
"""
from __future__ import annotations

import contextlib
import functools

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from . import kernels, plan_kernels
from .kernels import INTERPRETED
from .plan import FusedPlan, num_tiles, token_order

BLOCK_ROWS = 16 if INTERPRETED else 128  # BM
_SMALL = {"BN": 32, "BK": 32}  # the interpreter's tiles (tl.dot wants >= 16)
# The fastest tiles of each GEMM at the layer bench's shapes on an H200 (python -m moe_core.bench.fused_tiles,
# runs/benchmarks/fused_20261128_h200_ae4f4a2): 256-column tiles for most, 128 for the SwiGLU up-projection
# and the activation gradient; 128 x 128 output tiles over 64 rows for the weight gradients.
_A_OPERANDS, _B_OPERANDS = ("x", "a1", "a2", "dy"), ("w1", "w3", "b1", "b2", "w2")  # the GEMM kernels' names


def _set_blocks(nargs: dict) -> None:
    """A GEMM configuration's pre-hook: the block shapes of the operands passed as tensor descriptors."""
    for name in _A_OPERANDS + _B_OPERANDS:
        if isinstance(nargs.get(name), TensorDescriptor):
            a, b_t = name in _A_OPERANDS, nargs["B_T"]
            nargs[name].block_shape = [nargs["BM"] if a else nargs["BN"] if b_t else nargs["BK"],
                                       nargs["BK"] if a or b_t else nargs["BN"]]


def gemm_config(bn: int, bk: int, warps: int, stages: int) -> triton.Config:
    """A grouped GEMM's tiles (the row tile BM is the plan's), with the descriptors' block shapes set to them."""
    return triton.Config({"BN": bn, "BK": bk}, num_warps=warps, num_stages=stages, pre_hook=_set_blocks)


_GEMM_CONFIGS = [gemm_config(bn, bk, w, s) for bn, bk, w, s in [(256, 64, 8, 4), (256, 64, 8, 3), (256, 32, 8, 4),
                                                                (128, 64, 8, 4), (128, 64, 8, 3)]]
_TN_CONFIGS = [triton.Config({"BI": bi, "BJ": bj, "BR": br}, num_warps=w, num_stages=s)
               for bi, bj, br, w, s in [(128, 128, 64, 8, 4), (128, 128, 64, 8, 3), (128, 128, 64, 4, 3)]]


# 4-byte operands (the float32 correctness path) take one small tile: the 16-bit tiles do not fit them in
# shared memory, and compiling those tiles to IEEE FMA loops takes minutes per configuration.
_FOUR_BYTE = {"gemm": gemm_config(64, 32, 4, 3),
              "tn": triton.Config({"BI": 64, "BJ": 64, "BR": 32}, num_warps=4, num_stages=3)}


def prune_tiles(configs: list, named_args: dict, **kwargs) -> list:
    """Autotune's early prune: the configurations worth compiling for these arguments. Column tiles
    wider than the (power-of-two rounded) columns are dropped, so a small problem compiles few."""
    args = {**named_args, **kwargs}
    kind = "tn" if "BI" in configs[0].kwargs else "gemm"
    if next(v for v in args.values() if isinstance(v, torch.Tensor) and v.is_floating_point()).element_size() > 2:
        return [_FOUR_BYTE[kind]]
    columns = {"BI": args.get("I"), "BJ": args.get("J"), "BN": args.get("F", args.get("N"))}
    fits = [c for c in configs if all(c.kwargs[t] <= max(64, triton.next_power_of_2(columns[t]))
                                      for t in c.kwargs if t in columns)]
    return fits or configs[-1:]


def _tuned(kernel, configs, key):
    return kernel if INTERPRETED else triton.autotune(configs, key=key,
                                                      prune_configs_by={"early_config_prune": prune_tiles})(kernel)


_LAUNCHERS = {  # the autotune keys: sizes, and the variant (an epilogue of two tiles wants narrower ones)
    "_UP": (kernels.up_kernel, ["D", "F", "GATHER", "SWIGLU", "EPILOGUE", "PERSISTENT", "B_T"]),
    "_ROWS": (kernels.rows_kernel, ["K", "N", "TWO", "PERSISTENT", "B_T"]),
    "_ACT_GRAD": (kernels.act_grad_kernel, ["D", "F", "GATHER", "SWIGLU", "EPILOGUE", "PERSISTENT", "B_T"]),
    "_TN": (kernels.tn_kernel, ["I", "J", "GATHER_LEFT", "GATHER_RIGHT", "SCALE"])}
_UP, _ROWS, _ACT_GRAD, _TN = (_tuned(kernel, _TN_CONFIGS if name == "_TN" else _GEMM_CONFIGS, key)
                              for name, (kernel, key) in _LAUNCHERS.items())


@contextlib.contextmanager
def fixed_tiles(gemm: triton.Config, tn: triton.Config):
    """Inside the block every GEMM launches with ``gemm``'s tiles and the weight gradients with ``tn``'s,
    no autotuning: how the tile bench (``moe_core.bench.fused_tiles``) times one configuration."""
    saved = {name: globals()[name] for name in _LAUNCHERS}
    gemm = gemm_config(gemm.kwargs["BN"], gemm.kwargs["BK"], gemm.num_warps, gemm.num_stages)
    for name, (kernel, key) in _LAUNCHERS.items():
        globals()[name] = triton.autotune([tn if name == "_TN" else gemm], key=key)(kernel)
    try:
        yield
    finally:
        globals().update(saved)


def _types(dtype: torch.dtype) -> dict:
    """The accumulator dtype and tl.dot's input precision: for float32, IEEE unless torch allows TF32;
    other dtypes keep Triton's default (the precision applies to float32 only)."""
    precision = None
    if dtype == torch.float32:
        precision = "tf32" if torch.backends.cuda.matmul.allow_tf32 and not INTERPRETED else "ieee"
    return {"ACC": tl.float64 if dtype == torch.float64 else tl.float32, "PREC": precision}


# The GEMMs that read plain rows run persistent where their operands allow (``operands``): a program per SM
# loops over the tiles in use, reading both operands through tensor descriptors (TMA). A probe measured its
# row GEMM at 1.00-1.12x cuBLAS's time against 1.14-1.22x one program per tile (BENCHMARKS.md).
PERSISTENT = True


@functools.cache
def _programs(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def operands(as_NK: list, bs_EKJ: list, gathered: bool = False) -> tuple[list, list, dict]:
    """A grouped GEMM's A and B operands as its kernel takes them, and the matching launch flags: tensor
    descriptors and PERSISTENT where ``PERSISTENT`` is on and they allow it (rows not ``gathered`` in the
    loads; 16-bit on a GPU, any dtype under the interpreter; contiguous rows; K a multiple of the widest
    reduction tile, so a descriptor over the stacked experts never reads the next expert's B; each B
    stored as [E, K, J] or each as its transpose, B_T), else the tensors. The block shapes are the
    interpreter's tiles, on a GPU set per configuration (``_set_blocks``)."""
    E, K, J = bs_EKJ[0].shape
    b_t = not bs_EKJ[0].is_contiguous()
    usable = (PERSISTENT and not gathered and (INTERPRETED or as_NK[0].element_size() == 2)
              and all(a.is_contiguous() for a in as_NK) and K % (_SMALL["BK"] if INTERPRETED else 64) == 0
              and J % 8 == 0
              and all((b.transpose(1, 2) if b_t else b).is_contiguous() for b in bs_EKJ))
    if not usable:
        return as_NK, bs_EKJ, {"PERSISTENT": False, "B_T": False, "PROGRAMS": 1}
    bm, bn, bk = BLOCK_ROWS, _SMALL["BN"], _SMALL["BK"]
    descs_a = [TensorDescriptor.from_tensor(a, [bm, bk]) for a in as_NK]
    descs_b = [TensorDescriptor.from_tensor(b.transpose(1, 2).reshape(E * J, K), [bn, bk]) if b_t
               else TensorDescriptor.from_tensor(b.reshape(E * K, J), [bk, bn]) for b in bs_EKJ]
    programs = 3 if INTERPRETED else _programs(as_NK[0].device.index or 0)
    return descs_a, descs_b, {"PERSISTENT": True, "B_T": b_t, "PROGRAMS": programs}


def _grouped(kernel, plan: FusedPlan, columns: int, *args, **meta) -> None:
    """Launch a row-tiled grouped GEMM: one program per (row tile, column tile), columns fastest, or with
    PERSISTENT one per SM, each looping over the tiles in use."""
    tiles = plan.tile_expert_M.numel()
    if INTERPRETED:
        grid = (meta["PROGRAMS"],) if meta["PERSISTENT"] else (tiles * triton.cdiv(columns, _SMALL["BN"]),)
        kernel[grid](*args, **meta, BM=plan.block_rows, **_SMALL)
    elif meta["PERSISTENT"]:
        kernel[(meta["PROGRAMS"],)](*args, **meta, BM=plan.block_rows)
    else:
        kernel[lambda m: (tiles * triton.cdiv(columns, m["BN"]),)](*args, **meta, BM=plan.block_rows)


@torch.library.custom_op("moe_core::fused_plan", mutates_args=())
def _plan_rows(sorted_A: torch.Tensor, keep_A: torch.Tensor, token_A: torch.Tensor, counts_E: torch.Tensor,
               tiles: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                        torch.Tensor, torch.Tensor]:
    """(row_A, assign_N, token_N, ends_E, tile_expert_M, tile_row_M, tiles_used_1): count each chunk's kept
    assignments, give rows, tile. A custom op, so torch.compile keeps it in its graph as one opaque call."""
    A, E, dev = sorted_A.numel(), counts_E.numel(), sorted_A.device
    block = 64 if INTERPRETED else 1024
    chunks = triton.cdiv(A, block)
    keep_A = keep_A.view(torch.uint8)
    count_C = torch.empty(chunks, dtype=torch.int32, device=dev)
    plan_kernels.plan_counts_kernel[(chunks,)](sorted_A, keep_A, count_C, A, BLOCK=block)
    row_A, assign_N, token_N, through_A = (torch.empty(A, dtype=torch.long, device=dev) for _ in range(4))
    plan_kernels.plan_rows_kernel[(chunks,)](sorted_A, keep_A, token_A, count_C, row_A, assign_N, token_N, through_A, A,
                                        chunks, BLOCK=block, BC=triton.next_power_of_2(chunks))
    ends_E = torch.empty(E, dtype=torch.long, device=dev)
    tile_expert_M, tile_row_M = (torch.empty(tiles, dtype=torch.long, device=dev) for _ in range(2))
    tiles_used_1 = torch.empty(1, dtype=torch.long, device=dev)
    plan_kernels.plan_tiles_kernel[(E,)](counts_E, through_A, ends_E, tile_expert_M, tile_row_M, tiles_used_1, E, tiles,
                                    BM=BLOCK_ROWS, BE=triton.next_power_of_2(E), BT=16 if INTERPRETED else 128)
    return row_A, assign_N, token_N, ends_E, tile_expert_M, tile_row_M, tiles_used_1


@_plan_rows.register_fake
def _(sorted_A, keep_A, token_A, counts_E, tiles):
    A, E, M = sorted_A.numel(), counts_E.numel(), tiles
    return tuple(sorted_A.new_empty(n) for n in (A, A, A, E, M, M, 1))


def build_plan(routing) -> FusedPlan:
    """``plan.make_plan(routing, BLOCK_ROWS)``'s tensors: from three kernels (and the token order's two or
    three PyTorch ones) in place of about forty."""
    row_A, assign_N, token_N, ends_E, tile_expert_M, tile_row_M, tiles_used_1 = _plan_rows(
        routing.sorted_A, routing.keep_A, routing.token_A, routing.counts_E, num_tiles(routing, BLOCK_ROWS))
    token_offs_T1, token_assign_A = token_order(routing)
    return FusedPlan(row_A=row_A, assign_N=assign_N, token_N=token_N, token_A=routing.token_A, ends_E=ends_E,
                     tile_expert_M=tile_expert_M, tile_row_M=tile_row_M, tiles_used_1=tiles_used_1,
                     token_offs_T1=token_offs_T1,
                     token_assign_A=token_assign_A, num_tokens=routing.num_tokens, num_experts=routing.num_experts,
                     block_rows=BLOCK_ROWS)


def _tile_args(plan: FusedPlan) -> tuple:
    return plan.tile_expert_M, plan.tile_row_M, plan.ends_E, plan.tiles_used_1


def gather(src_TD, plan: FusedPlan, scale_N=None):
    N, D = plan.assign_N.numel(), src_TD.shape[1]
    out_ND = src_TD.new_empty(N, D)
    block_r, block_d = 16, _block(D, 512)
    kernels.gather_kernel[(triton.cdiv(N, block_r), triton.cdiv(D, block_d))](
        src_TD, plan.token_N, scale_N if scale_N is not None else src_TD, out_ND, plan.ends_E, plan.num_experts, D,
        SCALE=scale_N is not None, ACC=_types(src_TD.dtype)["ACC"], BR=block_r, BD=block_d)
    return out_ND


def up(x, token_N, plan: FusedPlan, w1_EDF, w3_EDF, epilogue: bool = True):
    N, (E, D, Fh) = plan.assign_N.numel(), w1_EDF.shape
    h_NF = x.new_empty(N, Fh)
    a_NF = x.new_empty(N, Fh) if epilogue else None
    g_NF = x.new_empty(N, Fh) if w3_EDF is not None else None
    swiglu = w3_EDF is not None
    assert not swiglu or w3_EDF.stride() == w1_EDF.stride(), "w1 and w3 must share strides"
    ws = [w1_EDF, w3_EDF] if swiglu else [w1_EDF]
    (xa,), wa, flags = operands([x], ws, gathered=token_N is not None)
    _grouped(_UP, plan, Fh, xa, token_N if token_N is not None else plan.token_N, wa[0], wa[-1], h_NF,
             g_NF if swiglu else h_NF, a_NF if epilogue else h_NF, *_tile_args(plan), E, D, Fh, *w1_EDF.stride(),
             GATHER=token_N is not None, SWIGLU=swiglu, EPILOGUE=epilogue, **flags, **_types(x.dtype))
    return h_NF, g_NF, a_NF


def _elementwise(kernel, plan: FusedPlan, like_NF, *args, **meta) -> None:
    """Launch a pass over the kept rows' elements of N x F arrays (``act_kernel``, ``act_backward_kernel``)."""
    block = 1024
    kernel[(triton.cdiv(like_NF.numel(), block),)](*args, plan.ends_E, plan.num_experts, like_NF.shape[1], **meta,
                                                    ACC=_types(like_NF.dtype)["ACC"], BLOCK=block)


def act(h_NF, g_NF, plan: FusedPlan):
    a_NF = torch.empty_like(h_NF)
    _elementwise(kernels.act_kernel, plan, h_NF, h_NF, g_NF if g_NF is not None else h_NF, a_NF,
                 SWIGLU=g_NF is not None)
    return a_NF


def rows(a1_NK, b1_EKJ, plan: FusedPlan, a2_NK=None, b2_EKJ=None):
    (E, K, J), two = b1_EKJ.shape, a2_NK is not None
    assert not two or b2_EKJ.stride() == b1_EKJ.stride(), "B1 and B2 must share strides"
    out_NJ = a1_NK.new_empty(plan.assign_N.numel(), J)
    aa, ba, flags = operands([a1_NK, a2_NK] if two else [a1_NK], [b1_EKJ, b2_EKJ] if two else [b1_EKJ])
    _grouped(_ROWS, plan, J, aa[0], ba[0], aa[-1], ba[-1], out_NJ, *_tile_args(plan), E, K, J, *b1_EKJ.stride(),
             TWO=two, **flags, **_types(a1_NK.dtype))
    return out_NJ


def act_grad(dy, token_N, weight_N, plan: FusedPlan, w2t_EDF, h_NF, g_NF, epilogue: bool = True):
    E, D, Fh = w2t_EDF.shape
    swiglu, gathered = g_NF is not None, token_N is not None
    dh_NF = torch.empty_like(h_NF)
    dg_NF = torch.empty_like(g_NF) if swiglu and epilogue else None
    (dya,), (w2a,), flags = operands([dy], [w2t_EDF], gathered)
    _grouped(_ACT_GRAD, plan, Fh, dya, token_N if gathered else plan.token_N, weight_N if gathered else h_NF, w2a,
             h_NF, g_NF if swiglu else h_NF, dh_NF, dg_NF if dg_NF is not None else dh_NF, *_tile_args(plan),
             E, D, Fh, *w2t_EDF.stride(), GATHER=gathered, SWIGLU=swiglu, EPILOGUE=epilogue, **flags,
             **_types(h_NF.dtype))
    return dh_NF, dg_NF


def act_backward(da_NF, h_NF, g_NF, plan: FusedPlan):
    """(dh, dg or None); dh is written over da."""
    dg_NF = torch.empty_like(g_NF) if g_NF is not None else None
    _elementwise(kernels.act_backward_kernel, plan, h_NF, da_NF, h_NF, g_NF if g_NF is not None else h_NF,
                 dg_NF if dg_NF is not None else da_NF, SWIGLU=g_NF is not None)
    return da_NF, dg_NF


def tn(left, left_idx_N, right, right_idx_N, scale_N, plan: FusedPlan):
    E, I, J = plan.num_experts, left.shape[-1], right.shape[-1]
    out_EIJ = left.new_empty(E, I, J)
    args = (left, left_idx_N if left_idx_N is not None else plan.token_N, right,
            right_idx_N if right_idx_N is not None else plan.token_N, scale_N if scale_N is not None else right,
            out_EIJ, plan.ends_E, I, J)
    meta = dict(GATHER_LEFT=left_idx_N is not None, GATHER_RIGHT=right_idx_N is not None, SCALE=scale_N is not None,
                **_types(left.dtype))
    if INTERPRETED:
        _TN[(triton.cdiv(I, 32) * triton.cdiv(J, 32), E)](*args, **meta, BI=32, BJ=32, BR=16)
    else:
        _TN[lambda m: (triton.cdiv(I, m["BI"]) * triton.cdiv(J, m["BJ"]), E)](*args, **meta)
    return out_EIJ


def _block(n: int, cap: int) -> int:
    return min(cap, triton.next_power_of_2(n))


def combine(rows_ND, plan: FusedPlan, weight_A=None):
    N, D = rows_ND.shape
    out_TD = rows_ND.new_empty(plan.num_tokens, D)
    block = _block(D, 1024)
    kernels.combine_kernel[(plan.num_tokens, triton.cdiv(D, block))](
        rows_ND, plan.row_A, weight_A if weight_A is not None else rows_ND, plan.token_offs_T1, plan.token_assign_A,
        out_TD, D, N, WEIGHTED=weight_A is not None, BD=block, ACC=_types(rows_ND.dtype)["ACC"])
    return out_TD


def row_dot(dy_TD, o_ND, plan: FusedPlan, out_dtype: torch.dtype):
    (N, D), A = o_ND.shape, plan.row_A.numel()
    out_A = torch.empty(A, dtype=out_dtype, device=o_ND.device)
    block_a = 16
    kernels.row_dot_kernel[(triton.cdiv(A, block_a),)](dy_TD, o_ND, plan.row_A, plan.token_A, out_A, A, D, N,
                                                       ACC=_types(o_ND.dtype)["ACC"], BA=block_a,
                                                       BD=_block(D, 256))
    return out_A
