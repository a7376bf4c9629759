"""Expert parallelism: the E experts of an MoE layer sharded contiguously over the W ranks of a
process group, each token sent to its experts' rank and back with all-to-all.

Each rank routes its own T tokens as one routing group with a replicated Router, exactly as
MoEFeedForward would on those tokens (same capacity, drops, balance losses and metrics); rank r
holds experts [r*E_r, (r+1)*E_r). Dispatch and combine are the package's own backends, with
the expert computation replaced by an exchange (:class:`ExpertShard`):

- capacity (C set): ``run_padded`` fills the [E, C, D] buffer, which is sent as W equal blocks
  [E_r, C, D]; rank r runs its experts on [E_r, W*C, D] (``Experts.batched``) and sends the
  blocks back. Every rank must route the same number of tokens (equal buffers).
- dropless (C None): ``run_grouped`` sorts the assignments by expert; the per-expert counts are
  exchanged first, then the rows with a variable-size all-to-all; rank r regroups what it
  received by local expert, runs ``Experts.grouped`` and returns every row to its sender.

Gradients flow through both exchanges (the backward of an all-to-all is the reverse all-to-all).
An expert's gradient is the sum over every rank's tokens; the router's is its own rank's.
:func:`data_parallel` turns that into DDP training on the concatenated batch.

Legend: T tokens per rank, D model dim, F expert hidden, E experts, E_r = E / W experts per rank,
W world size, C capacity, N rows this rank sends, M rows it receives.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Callable, Sequence

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from .config import MoEConfig, require
from .dispatch import Experts, run_grouped, run_padded
from .moe import MoEFeedForward, MoEStats
from .routing import Router, balance_losses, routing_metrics

Sizes = Sequence[int] | None  # rows per rank of an all-to-all; None: W equal blocks


def exchange_rows(x_ND: torch.Tensor, out_sizes: Sizes, in_sizes: Sizes, group=None) -> torch.Tensor:
    """The bare collective: ``in_sizes[w]`` rows of x go to rank w, ``out_sizes[w]`` rows come from it."""
    rows = x_ND.shape[0] if out_sizes is None else sum(out_sizes)
    out_MD = x_ND.new_empty(rows, *x_ND.shape[1:])
    dist.all_to_all_single(out_MD, x_ND.contiguous(), out_sizes, in_sizes, group=group)
    return out_MD


class _AllToAll(torch.autograd.Function):
    """An all-to-all whose backward is the reverse all-to-all (split sizes swapped). Written here
    because torch.distributed's own collectives are not differentiable, and its autograd-aware
    torch.distributed.nn variant is deprecated."""

    @staticmethod
    def forward(ctx, x_ND, out_sizes: Sizes, in_sizes: Sizes, exchange: Callable):
        ctx.out_sizes, ctx.in_sizes, ctx.exchange = out_sizes, in_sizes, exchange
        return exchange(x_ND, out_sizes, in_sizes)

    @staticmethod
    def backward(ctx, grad_MD):
        return _AllToAll.apply(grad_MD, ctx.in_sizes, ctx.out_sizes, ctx.exchange), None, None, None


class ExpertShard(torch.nn.Module):
    """This rank's E_r experts (``self.local``, an Experts module), presented to the dispatch
    backends as all E experts: ``batched`` and ``grouped`` exchange the rows, run the local
    experts and exchange the results back, so run_padded and run_grouped execute unchanged."""

    def __init__(self, cfg: MoEConfig, group=None):
        super().__init__()
        self.group = group
        self.world, self.rank = dist.get_world_size(group), dist.get_rank(group)
        require(cfg.num_experts % self.world == 0, "num_experts",
                f"{cfg.num_experts} experts do not split evenly over {self.world} ranks")
        self.num_local = cfg.num_experts // self.world
        # Experts reads dim, hidden, activation and num_experts; top_k is clamped for MoEConfig's check only
        self.local = Experts(replace(cfg, num_experts=self.num_local, top_k=min(cfg.top_k, self.num_local)))

    @property
    def first_expert(self) -> int:
        return self.rank * self.num_local

    def exchange(self, x_ND: torch.Tensor, out_sizes: Sizes = None, in_sizes: Sizes = None) -> torch.Tensor:
        """Every all-to-all of this shard, forward and backward, goes through here (the benchmark
        times them by setting a timed wrapper of exchange_rows as the instance's ``exchange``)."""
        return exchange_rows(x_ND, out_sizes, in_sizes, self.group)

    def _all_to_all(self, x_ND: torch.Tensor, out_sizes: Sizes = None, in_sizes: Sizes = None) -> torch.Tensor:
        return _AllToAll.apply(x_ND, out_sizes, in_sizes, self.exchange)

    def batched(self, x_ECD: torch.Tensor) -> torch.Tensor:
        """[E, C, D] -> [E, C, D]; block w of the buffer (experts of rank w) goes to rank w."""
        E, C, D = x_ECD.shape
        W, E_r = self.world, self.num_local
        recv_WECD = self._all_to_all(x_ECD.reshape(E * C, D)).view(W, E_r, C, D)
        out_ECD = self.local.batched(recv_WECD.transpose(0, 1).reshape(E_r, W * C, D))
        back_WECD = out_ECD.view(E_r, W, C, D).transpose(0, 1)
        return self._all_to_all(back_WECD.reshape(E * C, D)).view(E, C, D)

    def grouped(self, x_ND: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
        """Rows sorted by expert, [offs[e-1], offs[e]) for expert e -> their outputs, same order."""
        W, E_r = self.world, self.num_local
        counts_WE = torch.diff(offs_E.long(), prepend=offs_E.new_zeros(1, dtype=torch.long)).view(W, E_r)
        recv_counts_WE = self.exchange(counts_WE.reshape(-1)).view(W, E_r)  # [source rank, local expert]
        in_sizes, out_sizes = torch.stack([counts_WE.sum(1), recv_counts_WE.sum(1)]).tolist()  # one host sync
        recv_MD = self._all_to_all(x_ND, out_sizes, in_sizes)
        # received: by source rank, then by expert; the local experts want them by expert
        expert_M = torch.arange(E_r, device=x_ND.device).repeat(W).repeat_interleave(
            recv_counts_WE.reshape(-1), output_size=recv_MD.shape[0])
        order_M = torch.sort(expert_M, stable=True).indices
        offs_local = torch.cumsum(recv_counts_WE.sum(0), 0).to(torch.int32)
        out_sorted_MD = self.local.grouped(recv_MD[order_M], offs_local)
        out_MD = torch.empty_like(out_sorted_MD).index_copy(0, order_M, out_sorted_MD)
        return self._all_to_all(out_MD, in_sizes, out_sizes)


class ExpertParallelMoE(torch.nn.Module):
    """MoEFeedForward with its experts sharded over ``group``: same call, ``(y, MoEStats)``, same
    routing and statistics of this rank's tokens. Capacity routings run the fixed-size exchange,
    dropless ones (also expert choice's causal eval) the variable-size one. The router is
    replicated: build every rank's with the same seed, or let DDP broadcast it."""

    def __init__(self, cfg: MoEConfig, group=None):
        super().__init__()
        self.cfg = cfg
        self.router = Router(cfg)
        self.experts = ExpertShard(cfg, group)

    @classmethod
    def from_layer(cls, layer: MoEFeedForward, group=None) -> ExpertParallelMoE:
        """This rank's part of a single-process layer: its router (copied) and its E_r experts."""
        w1_EDF = layer.experts.w1_EDF
        ep = cls(layer.cfg, group).to(w1_EDF.device, w1_EDF.dtype).train(layer.training)
        ep.router.load_state_dict(layer.router.state_dict())
        first, count = ep.experts.first_expert, ep.experts.num_local
        ep.experts.local.load_state_dict({k: v[first:first + count] for k, v in layer.experts.state_dict().items()})
        return ep

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, MoEStats]:
        require(x.shape[-1] == self.cfg.dim, "x", f"last dim {x.shape[-1]} differs from MoEConfig.dim={self.cfg.dim}")
        x_TD = x.reshape(-1, self.cfg.dim)
        seq_len = x.shape[-2] if x.dim() > 2 else x_TD.shape[0]  # as MoEFeedForward: expert choice's groups
        routing, logits_TE, probs_TE = self.router(x_TD, None if token_ids is None else token_ids.reshape(-1), seq_len)
        run = run_padded if routing.capacity is not None else run_grouped
        y_TD = run(x_TD, routing, self.experts)
        aux, z = balance_losses(routing, logits_TE, probs_TE, self.cfg)
        stats = MoEStats(aux_loss=aux, z_loss=z, tokens_per_expert=routing.tokens_per_expert_E,
                         **routing_metrics(routing, probs_TE))
        return y_TD.view_as(x), stats


def data_parallel(model: torch.nn.Module, **ddp_kwargs) -> DistributedDataParallel:
    """DDP over the replicated parameters (gradients averaged over ranks), the experts left out.

    An expert's gradient arrives summed over every rank's tokens (the reverse all-to-all), so a
    hook divides it by W: each step is then the single-process step on the concatenated batch
    with the mean loss (every rank's batch the same size). Call once per model.
    """
    shards = [m for m in model.modules() if isinstance(m, ExpertShard)]
    shard_params = {id(p) for m in shards for p in m.parameters()}
    for m in shards:
        for p in m.parameters():
            p.register_hook(lambda g, w=m.world: g / w)
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
        model, [name for name, p in model.named_parameters() if id(p) in shard_params])
    return DistributedDataParallel(model, **ddp_kwargs)
