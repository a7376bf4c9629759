"""The fused backend's plan: a Routing's kept assignments as rows sorted by expert, plus the index
maps the kernels read. Built from device tensors with no host synchronisation: every size is a
static upper bound (A rows, cdiv(A, BM) + E row tiles) and the unused tail is never read.
``make_plan`` states it in PyTorch (about 40 small kernels on a GPU); ``ops_triton.build_plan``
builds the same tensors in three Triton kernels, tested equal to it.

Legend: T tokens, E experts, A assignments, N rows (= A; the first ``ends_E[-1]`` hold the kept
assignments, expert by expert), M row tiles, BM rows per tile.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..routing import Routing


@dataclass
class FusedPlan:
    """Where each assignment's row is, what each row reads, and how rows group into tiles and tokens."""

    row_A: torch.Tensor  # long, the row of assignment a, or N when it was dropped
    assign_N: torch.Tensor  # long, the assignment of row n (0 past the kept rows)
    token_N: torch.Tensor  # long, the token row n reads
    token_A: torch.Tensor  # long, the token of assignment a (Routing.token_A)
    ends_E: torch.Tensor  # long, rows [ends_E[e-1], ends_E[e]) belong to expert e (kept only)
    tile_expert_M: torch.Tensor  # long, the expert of row tile m; E marks an empty tile
    tile_row_M: torch.Tensor  # long, the first row of tile m
    tiles_used_1: torch.Tensor  # long [1], how many row tiles are not empty (the first ones)
    token_offs_T1: torch.Tensor  # long, token t's assignments are token_assign_A[offs[t]:offs[t+1]]
    token_assign_A: torch.Tensor  # long, the assignments in token order (the combine's fixed order)
    num_tokens: int
    num_experts: int
    block_rows: int  # BM


def make_plan(routing: Routing, block_rows: int) -> FusedPlan:
    """Kept assignments keep the router's order inside an expert (``Routing.sorted_A``: token order,
    or priority order under the score drop policy), so row n of expert e is its n-th kept slot."""
    E, num_assign = routing.num_experts, routing.expert_A.numel()
    dev = routing.expert_A.device
    keep_sorted = routing.keep_A[routing.sorted_A]
    kept_through = torch.cumsum(keep_sorted, 0)  # kept assignments up to each sorted position
    ends_E = F.pad(kept_through, (1, 0))[torch.cumsum(routing.counts_E, 0)]
    row_sorted = torch.where(keep_sorted, kept_through - 1, num_assign)
    row_A = torch.empty_like(row_sorted).scatter_(0, routing.sorted_A, row_sorted)
    arange_A = torch.arange(num_assign, device=dev)
    # dropped assignments all land on the extra last row, which is cut off
    assign_N = torch.zeros(num_assign + 1, dtype=torch.long, device=dev).scatter_(0, row_A, arange_A)[:-1]
    starts_E = F.pad(ends_E, (1, 0))[:-1]
    tiles_E = torch.div(ends_E - starts_E + block_rows - 1, block_rows, rounding_mode="floor")
    tile_ends_E = torch.cumsum(tiles_E, 0)
    tile_M = torch.arange(num_tiles(routing, block_rows), device=dev)
    tile_expert_M = torch.searchsorted(tile_ends_E, tile_M, right=True)
    e_M = tile_expert_M.clamp(max=E - 1)
    tile_row_M = starts_E[e_M] + (tile_M - (tile_ends_E - tiles_E)[e_M]) * block_rows
    token_offs_T1, token_assign_A = token_order(routing)
    return FusedPlan(row_A=row_A, assign_N=assign_N, token_N=routing.token_A[assign_N], token_A=routing.token_A,
                     ends_E=ends_E, tile_expert_M=tile_expert_M, tile_row_M=tile_row_M,
                     tiles_used_1=tile_ends_E[-1:], token_offs_T1=token_offs_T1,
                     token_assign_A=token_assign_A, num_tokens=routing.num_tokens, num_experts=E,
                     block_rows=block_rows)


def num_tiles(routing: Routing, block_rows: int) -> int:
    """M: the row tiles' static upper bound, cdiv(A, BM) + E (each expert's last tile may be partial)."""
    return -(-routing.expert_A.numel() // block_rows) + routing.num_experts


def token_order(routing: Routing) -> tuple[torch.Tensor, torch.Tensor]:
    """(token_offs_T1, token_assign_A): the combine's fixed order, each token's assignments in turn."""
    T, dev = routing.num_tokens, routing.expert_A.device
    if routing.layout == "token":  # assignment t*K + j: token t's are K consecutive ones
        return torch.arange(T + 1, device=dev) * routing.top_k, torch.arange(routing.expert_A.numel(), device=dev)
    token_assign_A = torch.sort(routing.token_A, stable=True).indices
    return torch.searchsorted(routing.token_A[token_assign_A], torch.arange(T + 1, device=dev)), token_assign_A
