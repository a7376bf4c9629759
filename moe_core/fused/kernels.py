"""Triton kernels of the fused MoE backend: grouped GEMMs over expert-sorted rows (reading rows gathered
once by ``gather_kernel``, or with the token gather fused into their loads: ``GATHER``), the activation
and its gradient in passes of their own (or in the GEMMs' epilogues: ``EPILOGUE``), the weighted
combine as a per-token sum in a fixed order (no atomics anywhere, so every result is bitwise
reproducible). The plan's kernels are in ``plan_kernels``.

Legend: T tokens, D model dim, F expert hidden, E experts, A assignments, N rows (A of them; the
kept assignments first, sorted by expert; rows past the kept ones are never read). ``BM``/``BN``/``BK``
tile rows, output columns and the reduction; ``ACC`` the accumulator dtype (float32, float64 for
float64 inputs); ``PREC`` tl.dot's input precision for float32 (``ieee`` unless torch allows TF32).

Row tiles come from the plan (``moe_core.fused.plan``): program p of a grouped GEMM computes column
tile p % n of rows [tile_row[m], tile_row[m] + BM) of expert tile_expert[m], m = p // n (n column
tiles), clipped to that expert's rows; a tile whose expert is E is empty (the grid is an upper bound,
so no host synchronisation sizes it). Column tiles vary fastest, so the programs running at once share
their row tile and the expert's weights (the tile bench timed the same tiles faster in this order than
with row tiles fastest; see BENCHMARKS.md).

On a machine without CUDA, importing ``moe_core.fused`` turns Triton's interpreter on
(TRITON_INTERPRET=1 unless set) before triton is first imported: the kernels then run on CPU tensors
(float32, float64; its tl.dot mishandles bf16), program by program in NumPy: their CPU proof.
"""
from __future__ import annotations

import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

# True when triton was imported with its interpreter on (its own library built for it): the kernels
# then run on CPU tensors. Imported earlier without it, on a machine with no GPU they cannot run.
INTERPRETED = isinstance(tl.standard.zeros, InterpretedFunction)
SQRT_HALF = tl.constexpr(0.7071067811865476)
INV_SQRT_2PI = tl.constexpr(0.3989422804014327)


@triton.jit
def _act(h, g, SWIGLU: tl.constexpr):
    """a = gelu(h) = h * Phi(h) (erf, not tanh), or silu(g) * h."""
    if SWIGLU:
        a = g * tl.sigmoid(g) * h
    else:
        a = 0.5 * h * (1.0 + tl.erf(h * SQRT_HALF))
    return a


@triton.jit
def _act_grads(da, h, g, SWIGLU: tl.constexpr):
    """(dh, dg) from da = dL/da; dg is da itself (unused) for GELU, whose d/dh is Phi(h) + h * phi(h)."""
    if SWIGLU:
        s = tl.sigmoid(g)
        dh, dg = da * g * s, da * h * s * (1.0 + g * (1.0 - s))
    else:
        dh, dg = da * (0.5 * (1.0 + tl.erf(h * SQRT_HALF)) + h * INV_SQRT_2PI * tl.exp(-0.5 * h * h)), da
    return dh, dg


@triton.jit
def _tile(p, tile_expert_ptr, tile_row_ptr, ends_ptr, E, N, BM: tl.constexpr, BN: tl.constexpr):
    """Program (or persistent iteration) p's expert e, its first row and column, its rows and which of
    them are e's (a tile's tail may not be), its output columns and which exist. Column tiles fastest.
    Never an empty tile: the per-tile kernels return before, the persistent loop stops at the last used."""
    column_tiles = tl.cdiv(N, BN)
    m = p // column_tiles
    e = tl.load(tile_expert_ptr + m)
    row0 = tl.load(tile_row_ptr + m)
    col0 = (p % column_tiles) * BN
    rows, cols = row0 + tl.arange(0, BM), col0 + tl.arange(0, BN)
    row_ok = rows < tl.load(ends_ptr + tl.minimum(e, E - 1))
    return e, row0, col0, rows, row_ok, cols, cols < N


@triton.jit
def _tiles_used(tiles_used_ptr, N, BN: tl.constexpr):
    """The persistent loop's bound: tiles in use times column tiles."""
    return tl.load(tiles_used_ptr).to(tl.int32) * tl.cdiv(N, BN)


@triton.jit
def _empty(tile_expert_ptr, E, N, BN: tl.constexpr):
    """Whether this program's tile (one program per tile) is past every expert's."""
    return tl.load(tile_expert_ptr + tl.program_id(0) // tl.cdiv(N, BN)) >= E


@triton.jit
def _b_tile(b, e, k0, ks, k_ok, col0, cols, col_ok, K, J, sb_e, sb_k, sb_n, TMA: tl.constexpr, B_T: tl.constexpr):
    """B[e][k0:k0+BK, col0:col0+BN]: by pointers, or through a tensor descriptor of the experts' B stacked
    as [E*K, J] (B_T: of their B^T as [E*J, K], loaded and transposed)."""
    if TMA:
        if B_T:
            w = b.load([e * J + col0, k0]).T
        else:
            w = b.load([e * K + k0, col0])
    else:
        w = tl.load(b + e * sb_e + ks[:, None] * sb_k + cols[None, :] * sb_n, mask=k_ok[:, None] & col_ok[None, :],
                    other=0.0)
    return w


@triton.jit
def _dot_tiles(a, b, b2, a_rows, row0, row_ok, e, col0, cols, col_ok, K, J, sb_e, sb_k, sb_n, ACC: tl.constexpr,
               TWO_B: tl.constexpr, TMA: tl.constexpr, B_T: tl.constexpr, PREC: tl.constexpr, BM: tl.constexpr,
               BN: tl.constexpr, BK: tl.constexpr):
    """(A[a_rows] @ B[e], A[a_rows] @ B2[e]) over this tile's columns, the second with TWO_B only: A read
    once per reduction step, by pointers (rows ``a_rows``, gathered or not) or, with TMA, through tensor
    descriptors (rows from ``row0``; rows of other experts or past the end are computed, never stored)."""
    acc = tl.zeros((BM, BN), dtype=ACC)
    acc2 = tl.zeros((BM, BN), dtype=ACC)
    e32 = e.to(tl.int32)
    for k0 in range(0, K, BK):
        ks = k0 + tl.arange(0, BK)
        k_ok = ks < K
        if TMA:
            x = a.load([row0.to(tl.int32), k0])
        else:
            x = tl.load(a + a_rows[:, None] * K + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        acc = tl.dot(x, _b_tile(b, e32, k0, ks, k_ok, col0, cols, col_ok, K, J, sb_e, sb_k, sb_n, TMA, B_T), acc,
                     input_precision=PREC)
        if TWO_B:
            acc2 = tl.dot(x, _b_tile(b2, e32, k0, ks, k_ok, col0, cols, col_ok, K, J, sb_e, sb_k, sb_n, TMA, B_T),
                          acc2, input_precision=PREC)
    return acc, acc2


@triton.jit
def _up_tile(p, x, token_ptr, w1, w3, h_ptr, g_ptr, a_ptr, tile_expert_ptr, tile_row_ptr, ends_ptr, E, D, F, sw_e,
             sw_k, sw_n, GATHER: tl.constexpr, SWIGLU: tl.constexpr, EPILOGUE: tl.constexpr, TMA: tl.constexpr,
             B_T: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
             BK: tl.constexpr):
    e, row0, col0, rows, row_ok, cols, col_ok = _tile(p, tile_expert_ptr, tile_row_ptr, ends_ptr, E, F, BM, BN)
    token = rows
    if GATHER:
        token = tl.load(token_ptr + rows, mask=row_ok, other=0)
    acc_h, acc_g = _dot_tiles(x, w1, w3, token, row0, row_ok, e, col0, cols, col_ok, D, F, sw_e, sw_k, sw_n, ACC,
                              SWIGLU, TMA, B_T, PREC, BM, BN, BK)
    out = rows[:, None] * F + cols[None, :]
    ok = row_ok[:, None] & col_ok[None, :]
    tl.store(h_ptr + out, acc_h.to(h_ptr.dtype.element_ty), mask=ok)
    if SWIGLU:
        tl.store(g_ptr + out, acc_g.to(g_ptr.dtype.element_ty), mask=ok)
    if EPILOGUE:
        tl.store(a_ptr + out, _act(acc_h, acc_g, SWIGLU).to(a_ptr.dtype.element_ty), mask=ok)


@triton.jit
def up_kernel(x, token_ptr, w1, w3, h_ptr, g_ptr, a_ptr, tile_expert_ptr, tile_row_ptr, ends_ptr, tiles_used_ptr,
              E, D, F, sw_e, sw_k, sw_n,
              GATHER: tl.constexpr, SWIGLU: tl.constexpr, EPILOGUE: tl.constexpr, PERSISTENT: tl.constexpr,
              B_T: tl.constexpr, PROGRAMS: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr, BM: tl.constexpr,
              BN: tl.constexpr, BK: tl.constexpr):
    """h = x[token] @ W1[e] (and g = x[token] @ W3[e]); with EPILOGUE a = act(h, g) as well (else
    ``act_kernel`` computes it in a pass of its own). Without GATHER, x holds the rows already gathered
    (x[n] for row n). PERSISTENT: a program per SM loops over the tiles in use, x and the weights are
    tensor descriptors (never with GATHER); else one program per tile."""
    if PERSISTENT:
        for p in tl.range(tl.program_id(0), _tiles_used(tiles_used_ptr, F, BN), PROGRAMS, flatten=True):
            _up_tile(p, x, token_ptr, w1, w3, h_ptr, g_ptr, a_ptr, tile_expert_ptr, tile_row_ptr, ends_ptr, E, D, F,
                     sw_e, sw_k, sw_n, GATHER, SWIGLU, EPILOGUE, True, B_T, ACC, PREC, BM, BN, BK)
    else:
        if _empty(tile_expert_ptr, E, F, BN):
            return
        _up_tile(tl.program_id(0), x, token_ptr, w1, w3, h_ptr, g_ptr, a_ptr, tile_expert_ptr, tile_row_ptr, ends_ptr,
                 E, D, F, sw_e, sw_k, sw_n, GATHER, SWIGLU, EPILOGUE, False, B_T, ACC, PREC, BM, BN, BK)


@triton.jit
def _rows_tile(p, a1, b1, a2, b2, out_ptr, tile_expert_ptr, tile_row_ptr, ends_ptr, E, K, N, sb_e, sb_k, sb_n,
               TWO: tl.constexpr, TMA: tl.constexpr, B_T: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
               BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    e, row0, col0, rows, row_ok, cols, col_ok = _tile(p, tile_expert_ptr, tile_row_ptr, ends_ptr, E, N, BM, BN)
    acc, _ = _dot_tiles(a1, b1, b1, rows, row0, row_ok, e, col0, cols, col_ok, K, N, sb_e, sb_k, sb_n, ACC, False,
                        TMA, B_T, PREC, BM, BN, BK)
    if TWO:
        acc2, _ = _dot_tiles(a2, b2, b2, rows, row0, row_ok, e, col0, cols, col_ok, K, N, sb_e, sb_k, sb_n, ACC, False,
                             TMA, B_T, PREC, BM, BN, BK)
        acc += acc2
    tl.store(out_ptr + rows[:, None] * N + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def rows_kernel(a1, b1, a2, b2, out_ptr, tile_expert_ptr, tile_row_ptr, ends_ptr, tiles_used_ptr,
                E, K, N, sb_e, sb_k, sb_n,
                TWO: tl.constexpr, PERSISTENT: tl.constexpr, B_T: tl.constexpr, PROGRAMS: tl.constexpr,
                ACC: tl.constexpr, PREC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """out[n] = a1[n] @ B1[e] (+ a2[n] @ B2[e]) for the rows n of expert e; B1, B2 share strides."""
    if PERSISTENT:
        for p in tl.range(tl.program_id(0), _tiles_used(tiles_used_ptr, N, BN), PROGRAMS, flatten=True):
            _rows_tile(p, a1, b1, a2, b2, out_ptr, tile_expert_ptr, tile_row_ptr, ends_ptr, E, K, N, sb_e, sb_k, sb_n,
                       TWO, True, B_T, ACC, PREC, BM, BN, BK)
    else:
        if _empty(tile_expert_ptr, E, N, BN):
            return
        _rows_tile(tl.program_id(0), a1, b1, a2, b2, out_ptr, tile_expert_ptr, tile_row_ptr, ends_ptr, E, K, N, sb_e,
                   sb_k, sb_n, TWO, False, B_T, ACC, PREC, BM, BN, BK)


@triton.jit
def _act_grad_tile(p, dy, token_ptr, weight_ptr, w2, h_ptr, g_ptr, dh_ptr, dg_ptr, tile_expert_ptr, tile_row_ptr,
                   ends_ptr, E, D, F, sw_e, sw_k, sw_n, GATHER: tl.constexpr, SWIGLU: tl.constexpr,
                   EPILOGUE: tl.constexpr, TMA: tl.constexpr, B_T: tl.constexpr, ACC: tl.constexpr,
                   PREC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    e, row0, col0, rows, row_ok, cols, col_ok = _tile(p, tile_expert_ptr, tile_row_ptr, ends_ptr, E, F, BM, BN)
    token = rows
    if GATHER:
        token = tl.load(token_ptr + rows, mask=row_ok, other=0)
    da, _ = _dot_tiles(dy, w2, w2, token, row0, row_ok, e, col0, cols, col_ok, D, F, sw_e, sw_k, sw_n, ACC, False,
                       TMA, B_T, PREC, BM, BN, BK)
    if GATHER:
        da = da * tl.load(weight_ptr + rows, mask=row_ok, other=0.0).to(ACC)[:, None]
    out = rows[:, None] * F + cols[None, :]
    ok = row_ok[:, None] & col_ok[None, :]
    if EPILOGUE:
        _store_act_grads(da, h_ptr, g_ptr, dh_ptr, dg_ptr, out, ok, SWIGLU, ACC)
    else:
        tl.store(dh_ptr + out, da.to(dh_ptr.dtype.element_ty), mask=ok)


@triton.jit
def act_grad_kernel(dy, token_ptr, weight_ptr, w2, h_ptr, g_ptr, dh_ptr, dg_ptr,
                    tile_expert_ptr, tile_row_ptr, ends_ptr, tiles_used_ptr, E, D, F, sw_e, sw_k, sw_n,
                    GATHER: tl.constexpr, SWIGLU: tl.constexpr, EPILOGUE: tl.constexpr, PERSISTENT: tl.constexpr,
                    B_T: tl.constexpr, PROGRAMS: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
                    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """da = weight[n] * dy[token[n]] @ W2[e]^T (the gather fused into the loads, the gate weight into
    the epilogue), then with EPILOGUE the activation's backward from the stored h (and g): dh (and dg);
    without it da is stored in dh for ``act_backward_kernel``. Without GATHER, dy holds the rows already
    gathered and weighted (weight[n] * dy[token[n]] for row n)."""
    if PERSISTENT:
        for p in tl.range(tl.program_id(0), _tiles_used(tiles_used_ptr, F, BN), PROGRAMS, flatten=True):
            _act_grad_tile(p, dy, token_ptr, weight_ptr, w2, h_ptr, g_ptr, dh_ptr, dg_ptr, tile_expert_ptr,
                           tile_row_ptr, ends_ptr, E, D, F, sw_e, sw_k, sw_n, GATHER, SWIGLU, EPILOGUE, True, B_T, ACC,
                           PREC, BM, BN, BK)
    else:
        if _empty(tile_expert_ptr, E, F, BN):
            return
        _act_grad_tile(tl.program_id(0), dy, token_ptr, weight_ptr, w2, h_ptr, g_ptr, dh_ptr, dg_ptr, tile_expert_ptr,
                       tile_row_ptr, ends_ptr, E, D, F, sw_e, sw_k, sw_n, GATHER, SWIGLU, EPILOGUE, False, B_T, ACC,
                       PREC, BM, BN, BK)


@triton.jit
def _load_hg(h_ptr, g_ptr, at, ok, SWIGLU: tl.constexpr, ACC: tl.constexpr):
    """The stored h and g at offsets ``at`` (g is h for GELU, which has none)."""
    h = tl.load(h_ptr + at, mask=ok, other=0.0).to(ACC)
    g = h
    if SWIGLU:
        g = tl.load(g_ptr + at, mask=ok, other=0.0).to(ACC)
    return h, g


@triton.jit
def _store_act_grads(da, h_ptr, g_ptr, dh_ptr, dg_ptr, at, ok, SWIGLU: tl.constexpr, ACC: tl.constexpr):
    """dh (and dg) at offsets ``at`` from da and the stored h (and g)."""
    h, g = _load_hg(h_ptr, g_ptr, at, ok, SWIGLU, ACC)
    dh, dg = _act_grads(da, h, g, SWIGLU)
    tl.store(dh_ptr + at, dh.to(dh_ptr.dtype.element_ty), mask=ok)
    if SWIGLU:
        tl.store(dg_ptr + at, dg.to(dg_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _kept_elements(ends_ptr, E, F, BLOCK: tl.constexpr):
    """This program's BLOCK offsets into an N x F array and which of them lie in the kept rows."""
    at = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    return at, at < tl.load(ends_ptr + E - 1).to(tl.int64) * F


@triton.jit
def act_kernel(h_ptr, g_ptr, a_ptr, ends_ptr, E, F, SWIGLU: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """a = act(h, g) over the kept rows, as a pass of its own (``up_kernel`` without EPILOGUE)."""
    at, ok = _kept_elements(ends_ptr, E, F, BLOCK)
    h, g = _load_hg(h_ptr, g_ptr, at, ok, SWIGLU, ACC)
    tl.store(a_ptr + at, _act(h, g, SWIGLU).to(a_ptr.dtype.element_ty), mask=ok)


@triton.jit
def act_backward_kernel(da_ptr, h_ptr, g_ptr, dg_ptr, ends_ptr, E, F, SWIGLU: tl.constexpr, ACC: tl.constexpr,
                        BLOCK: tl.constexpr):
    """dh (over da, in place) and dg from da and the stored h (and g) over the kept rows, as a pass of
    its own (``act_grad_kernel`` without EPILOGUE)."""
    at, ok = _kept_elements(ends_ptr, E, F, BLOCK)
    da = tl.load(da_ptr + at, mask=ok, other=0.0).to(ACC)
    _store_act_grads(da, h_ptr, g_ptr, da_ptr, dg_ptr, at, ok, SWIGLU, ACC)


@triton.jit
def tn_kernel(left_ptr, left_idx_ptr, right_ptr, right_idx_ptr, scale_ptr, out_ptr, ends_ptr, I, J,
              GATHER_LEFT: tl.constexpr, GATHER_RIGHT: tl.constexpr, SCALE: tl.constexpr,
              ACC: tl.constexpr, PREC: tl.constexpr, BI: tl.constexpr, BJ: tl.constexpr, BR: tl.constexpr):
    """out[e] = sum over the rows n of expert e of left[l(n)]^T (scale[n] * right[r(n)]), l and r the
    optional row gathers: the weight gradients. One program per (output tile, expert) reduces its
    rows in order (no split-K, no atomics); output tiles vary fastest, so the programs running at once
    read the same expert's rows."""
    e = tl.program_id(1).to(tl.int64)
    tiles_j = tl.cdiv(J, BJ)
    i_s = (tl.program_id(0) // tiles_j) * BI + tl.arange(0, BI)
    j_s = (tl.program_id(0) % tiles_j) * BJ + tl.arange(0, BJ)
    i_ok, j_ok = i_s < I, j_s < J
    start = tl.where(e > 0, tl.load(ends_ptr + tl.maximum(e - 1, 0)), 0)
    end = tl.load(ends_ptr + e)
    acc = tl.zeros((BI, BJ), dtype=ACC)
    for r0 in range(start, end, BR):
        rows = r0 + tl.arange(0, BR)
        row_ok = rows < end
        left_rows = rows
        if GATHER_LEFT:
            left_rows = tl.load(left_idx_ptr + rows, mask=row_ok, other=0)
        right_rows = rows
        if GATHER_RIGHT:
            right_rows = tl.load(right_idx_ptr + rows, mask=row_ok, other=0)
        left = tl.load(left_ptr + left_rows[:, None] * I + i_s[None, :], mask=row_ok[:, None] & i_ok[None, :],
                       other=0.0)
        right = tl.load(right_ptr + right_rows[:, None] * J + j_s[None, :], mask=row_ok[:, None] & j_ok[None, :],
                        other=0.0)
        if SCALE:
            scale = tl.load(scale_ptr + rows, mask=row_ok, other=0.0)
            right = (right * scale[:, None]).to(right_ptr.dtype.element_ty)
        acc = tl.dot(tl.trans(left), right, acc, input_precision=PREC)
    tl.store(out_ptr + e * I * J + i_s[:, None] * J + j_s[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=i_ok[:, None] & j_ok[None, :])


@triton.jit
def gather_kernel(src_ptr, token_ptr, scale_ptr, out_ptr, ends_ptr, E, D,
                  SCALE: tl.constexpr, ACC: tl.constexpr, BR: tl.constexpr, BD: tl.constexpr):
    """out[n] = src[token[n]] (times scale[n]) for the kept rows n < ends[E - 1]: one pass that lets the
    GEMMs read plain rows. Scaled in ACC and rounded once."""
    rows = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    row_ok = rows < tl.load(ends_ptr + E - 1)
    token = tl.load(token_ptr + rows, mask=row_ok, other=0)
    ds = tl.program_id(1) * BD + tl.arange(0, BD)
    ok = row_ok[:, None] & (ds < D)[None, :]
    value = tl.load(src_ptr + token[:, None] * D + ds[None, :], mask=ok, other=0.0)
    if SCALE:
        value = value.to(ACC) * tl.load(scale_ptr + rows, mask=row_ok, other=0.0).to(ACC)[:, None]
    tl.store(out_ptr + rows[:, None] * D + ds[None, :], value.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def combine_kernel(rows_ptr, row_of_ptr, weight_ptr, offs_ptr, assign_ptr, out_ptr, D, NUM_ROWS,
                   WEIGHTED: tl.constexpr, ACC: tl.constexpr, BD: tl.constexpr):
    """out[t] = sum over token t's assignments a, in their fixed order, of weight[a] * rows[row_of[a]]
    (weight 1 when not WEIGHTED); a dropped assignment (row_of[a] == NUM_ROWS) is skipped."""
    t = tl.program_id(0).to(tl.int64)
    ds = tl.program_id(1) * BD + tl.arange(0, BD)
    d_ok = ds < D
    acc = tl.zeros((BD,), dtype=ACC)
    for i in range(tl.load(offs_ptr + t), tl.load(offs_ptr + t + 1)):
        a = tl.load(assign_ptr + i)
        row = tl.load(row_of_ptr + a) + 0 * ds  # a block: the interpreter cannot mask with a scalar
        value = tl.load(rows_ptr + row * D + ds, mask=d_ok & (row < NUM_ROWS), other=0.0).to(ACC)
        if WEIGHTED:
            value = value * tl.load(weight_ptr + a).to(ACC)
        acc += value
    tl.store(out_ptr + t * D + ds, acc.to(out_ptr.dtype.element_ty), mask=d_ok)


@triton.jit
def row_dot_kernel(dy_ptr, o_ptr, row_of_ptr, token_ptr, out_ptr, A, D, NUM_ROWS,
                   ACC: tl.constexpr, BA: tl.constexpr, BD: tl.constexpr):
    """out[a] = <dy[token[a]], o[row_of[a]]>: the gradient of assignment a's gate weight (0 when dropped)."""
    assign = tl.program_id(0) * BA + tl.arange(0, BA)
    a_ok = assign < A
    row = tl.load(row_of_ptr + assign, mask=a_ok, other=NUM_ROWS)
    token = tl.load(token_ptr + assign, mask=a_ok, other=0)
    kept = a_ok & (row < NUM_ROWS)
    acc = tl.zeros((BA,), dtype=ACC)
    for d0 in range(0, D, BD):
        ds = d0 + tl.arange(0, BD)
        ok = kept[:, None] & (ds < D)[None, :]
        o = tl.load(o_ptr + row[:, None] * D + ds[None, :], mask=ok, other=0.0).to(ACC)
        dy = tl.load(dy_ptr + token[:, None] * D + ds[None, :], mask=ok, other=0.0).to(ACC)
        acc += tl.sum(o * dy, axis=1)
    tl.store(out_ptr + assign, acc.to(out_ptr.dtype.element_ty), mask=a_ok)
