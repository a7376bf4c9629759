"""The fused backend's plan (``plan.make_plan``'s tensors) in three Triton kernels: count each chunk's kept
assignments, give rows, build the row-tile map. Launched by ``ops_triton._plan_rows``.

Legend: A assignments, C chunks of BLOCK sorted positions, E experts, M row tiles, BM rows per tile.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _kept_chunk(sorted_ptr, keep_ptr, chunk, A, BLOCK: tl.constexpr):
    """Sorted positions of this chunk, which exist, their assignments and which of those are kept (0/1)."""
    i = chunk.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = i < A
    a = tl.load(sorted_ptr + i, mask=ok, other=0)
    return i, ok, a, tl.load(keep_ptr + a, mask=ok, other=0).to(tl.int32)


@triton.jit
def plan_counts_kernel(sorted_ptr, keep_ptr, count_ptr, A, BLOCK: tl.constexpr):
    """count[c]: the kept assignments among sorted positions [c * BLOCK, (c + 1) * BLOCK)."""
    _, _, _, keep = _kept_chunk(sorted_ptr, keep_ptr, tl.program_id(0), A, BLOCK)
    tl.store(count_ptr + tl.program_id(0), tl.sum(keep, 0))


@triton.jit
def plan_rows_kernel(sorted_ptr, keep_ptr, token_ptr, count_ptr, row_ptr, assign_ptr, token_n_ptr, through_ptr,
                     A, C, BLOCK: tl.constexpr, BC: tl.constexpr):
    """For one chunk of sorted positions: through[i] = kept assignments up to position i (the chunks
    before it counted by ``plan_counts_kernel``); a kept assignment a gets row through - 1 (row_A, and
    assign_N / token_N of that row), a dropped one row A; rows past the kept ones read assignment 0."""
    c = tl.program_id(0)
    cs = tl.arange(0, BC)
    counts = tl.load(count_ptr + cs, mask=cs < C, other=0)
    i, ok, a, keep = _kept_chunk(sorted_ptr, keep_ptr, c, A, BLOCK)
    through = tl.sum(tl.where(cs < c, counts, 0), 0) + tl.cumsum(keep, 0)
    tl.store(through_ptr + i, through, mask=ok)
    kept = ok & (keep != 0)
    tl.store(row_ptr + a, tl.where(kept, through - 1, A), mask=ok)
    tl.store(assign_ptr + through - 1, a, mask=kept)
    tl.store(token_n_ptr + through - 1, tl.load(token_ptr + a, mask=kept, other=0), mask=kept)
    tail = ok & (i >= tl.sum(counts, 0))
    tl.store(assign_ptr + i, 0 * i, mask=tail)
    tl.store(token_n_ptr + i, tl.load(token_ptr + 0 * i, mask=tail, other=0), mask=tail)


@triton.jit
def plan_tiles_kernel(counts_ptr, through_ptr, ends_ptr, tile_expert_ptr, tile_row_ptr, tiles_used_ptr, E, M,
                      BM: tl.constexpr, BE: tl.constexpr, BT: tl.constexpr):
    """Program e writes expert e's row tiles (expert, first row), as ``make_plan`` computes them: its
    starts and tile counts from ``through`` at each expert's last sorted position. The last program
    also writes the tail, tiles past every expert's (expert E: empty); program 0 writes ends_E and
    the count of tiles in use."""
    e = tl.program_id(0)
    es = tl.arange(0, BE)
    e_ok = es < E
    counts = tl.load(counts_ptr + es, mask=e_ok, other=0)
    last = tl.cumsum(counts, 0)  # one past expert e's last sorted position
    ends = tl.load(through_ptr + last - 1, mask=e_ok & (last > 0), other=0)
    starts = tl.load(through_ptr + last - counts - 1, mask=e_ok & (last - counts > 0), other=0)
    if e == 0:
        tl.store(ends_ptr + es, ends, mask=e_ok)
    tiles = tl.where(e_ok, (ends - starts + BM - 1) // BM, 0)
    tile_ends = tl.cumsum(tiles, 0)
    mine = es == e
    first_tile = tl.sum(tl.where(mine, tile_ends - tiles, 0), 0)
    first_row = tl.sum(tl.where(mine, starts, 0), 0)
    stop = tl.sum(tl.where(mine, tile_ends, 0), 0)
    stop = tl.where(e == E - 1, M, stop)  # the last program also writes the tail, tiles past every expert's
    used = tl.max(tile_ends, 0)  # tiles of all experts
    if e == 0:
        tl.store(tiles_used_ptr, used)
    for m0 in range(first_tile, stop, BT):
        ms = m0 + tl.arange(0, BT)
        tl.store(tile_expert_ptr + ms, tl.where(ms < used, e, E), mask=ms < stop)
        tl.store(tile_row_ptr + ms, first_row + (ms - first_tile) * BM, mask=ms < stop)
