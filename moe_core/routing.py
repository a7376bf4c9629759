"""Routers, capacity and routing metrics: the decisions every dispatch backend then executes.

Legend: T tokens in the routing group, D model dim, E experts, K top-k, C capacity per expert,
A assignments (T*K for token choice, E*C for expert choice), V vocabulary.

A router turns float32 logits into a :class:`Routing`: a flat list of (token, expert, weight)
assignments, with the capacity decision (``keep_A``) and each kept assignment's slot in its
expert's buffer. Backends only read a ``Routing``, so they can be proven equal on the same one.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from .config import MoEConfig


@dataclass
class Routing:
    """Assignments of one routing group, in a layout that makes the combine deterministic.

    ``layout="token"``: A = T*K in token-major order (assignment a = t*K + j), so the combine is a
    reshape to [T, K, D] and a sum. ``layout="expert"``: A = E*C in expert-major order, and the
    tokens inside one expert's block are distinct, so the combine adds one block at a time.
    """

    token_A: torch.Tensor  # long, token index of each assignment
    expert_A: torch.Tensor  # long, expert index
    weight_A: torch.Tensor  # float32 gate weight (0 contribution when dropped), differentiable
    keep_A: torch.Tensor  # bool, survived capacity
    slot_A: torch.Tensor  # long, position in its expert's buffer (meaningful where keep_A)
    tokens_per_expert_E: torch.Tensor  # float32 assignments per expert before capacity
    counts_E: torch.Tensor  # long, the same counts (group sizes of sorted_A)
    sorted_A: torch.Tensor  # long, assignment indices sorted by expert (stable: token order within one)
    capacity: int | None  # C; None when dropless
    num_tokens: int
    num_experts: int
    layout: str  # "token" or "expert"
    top_k: int | None  # K assignments per token for layout "token"; None for "expert" (its blocks hold C)


def capacity_for(capacity_factor: float | None, num_tokens: int, top_k: int, num_experts: int) -> int | None:
    """C = ceil(capacity_factor * T * k / E), or None when dropless."""
    if capacity_factor is None:
        return None
    return max(1, math.ceil(capacity_factor * num_tokens * top_k / num_experts))


def assign_slots(expert_A: torch.Tensor, priority_A: torch.Tensor | None, num_experts: int,
                 capacity: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each assignment's position among those of its expert, and whether it fits in capacity.

    Assignments compete in index order (earlier wins) or, with ``priority_A``, larger priority first
    with ties in index order. Stable sorts on device: no host synchronisation.
    Returns (slot_A, keep_A, counts_E, sorted_A): counts before capacity, and the assignment
    indices in expert order (the grouped backend reuses this sort).
    """
    num_assign = expert_A.numel()
    order_A = torch.arange(num_assign, device=expert_A.device)
    if priority_A is not None:
        order_A = torch.sort(priority_A.detach(), descending=True, stable=True).indices
    by_expert = torch.sort(expert_A[order_A], stable=True)
    sorted_A = order_A[by_expert.indices]
    # Counts from the sorted experts: bincount syncs the host on CUDA, and index_add_ of thousands
    # of duplicates into E bins is serialised when compiled (1 ms per layer on an H100).
    bounds = torch.arange(num_experts + 1, device=expert_A.device, dtype=by_expert.values.dtype)
    edges_E1 = torch.searchsorted(by_expert.values, bounds)
    starts_E, counts_E = edges_E1[:-1], edges_E1[1:] - edges_E1[:-1]
    rank_sorted = torch.arange(num_assign, device=expert_A.device) - starts_E[by_expert.values]
    slot_A = torch.empty_like(rank_sorted).scatter_(0, sorted_A, rank_sorted)
    keep_A = torch.ones_like(expert_A, dtype=torch.bool) if capacity is None else slot_A < capacity
    return slot_A, keep_A, counts_E, sorted_A


@lru_cache(maxsize=32)
def hash_table(vocab_size: int, num_experts: int, top_k: int, seed: int) -> np.ndarray:
    """[V, K] experts per token id: k distinct experts each, per-expert totals differ by at most one.

    Token ids are visited in a seeded random order and each takes the k least-loaded experts
    (ties broken by a seeded random priority), so the table is balanced over the vocabulary and not
    a function of id order.
    """
    rng = np.random.default_rng(seed)
    load_E = np.zeros(num_experts, dtype=np.int64)
    table_VK = np.empty((vocab_size, top_k), dtype=np.int64)
    for v in rng.permutation(vocab_size):
        tiebreak_E = rng.random(num_experts)
        chosen = np.lexsort((tiebreak_E, load_E))[:top_k]
        table_VK[v] = chosen
        load_E[chosen] += 1
    return table_VK


class Router(torch.nn.Module):
    """Router weights plus the routing rules (``moe_core.reference`` states them per token).

    p = softmax(logits) over all E experts, logits = x W^T in float32 (also under autocast).

    - ``top1`` (Switch): expert = argmax p; weight = p_e, so the router learns through p_e.
    - ``topk_hard``: the k largest p; weight = 1/k + p_e - stopgrad(p_e) (exactly 1/k forward,
      straight-through gradient to the router).
    - ``softk`` (Mixtral): the k largest logits; weights = softmax over those k logits.
    - ``hash`` (Roller et al.): experts = table[token_id], k distinct, balanced over the vocabulary;
      weights 1/k; no trainable router.
    - ``expert_choice`` (Zhou et al.): expert e takes its top-C tokens by p_e within the group; a
      token may get 0..E experts; weight = p. Non-causal: in eval mode with ``ec_eval="causal"`` it
      routes by token-choice top-k on the same p (weights p, dropless) instead.

    Token-choice selection uses p + bias when ``aux_free_bias`` (DeepSeek-V3): the bias changes which
    experts are chosen, never the weights, and is updated by u * sign(mean load - load).
    """

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.ec_eval = cfg.ec_eval
        if cfg.router == "hash":
            self.weight_ED = None
            if cfg.hash_vocab_size is None:
                raise ValueError("hash_vocab_size: the hash router needs the vocabulary size")
            table = hash_table(cfg.hash_vocab_size, cfg.num_experts, cfg.top_k, cfg.hash_seed)
            self.register_buffer("hash_table_VK", torch.from_numpy(table), persistent=False)
        else:
            self.weight_ED = torch.nn.Parameter(torch.randn(cfg.num_experts, cfg.dim) * cfg.router_init_std)
        self.register_buffer("bias_E", torch.zeros(cfg.num_experts), persistent=cfg.aux_free_bias)

    def logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            return F.linear(x_TD.float(), self.weight_ED.float())

    def forward(self, x_TD: torch.Tensor, token_ids_T: torch.Tensor | None) -> tuple[Routing, torch.Tensor | None,
                                                                                     torch.Tensor | None]:
        """Returns (routing, logits_TE or None, probs_TE or None)."""
        cfg = self.cfg
        if cfg.router == "hash":
            if token_ids_T is None:
                raise ValueError("token_ids: the hash router needs the token ids of x")
            if token_ids_T.numel() != x_TD.shape[0]:
                raise ValueError(f"token_ids: {token_ids_T.numel()} ids for {x_TD.shape[0]} tokens")
            _check_token_ids(token_ids_T, self.hash_table_VK.shape[0])
            expert_TK = self.hash_table_VK[token_ids_T.reshape(-1)]
            weight_TK = torch.full(expert_TK.shape, 1.0 / cfg.top_k, device=x_TD.device)
            return self._token_choice(expert_TK, weight_TK, cfg.capacity_factor), None, None
        return self.route(self.logits(x_TD))

    def route(self, logits_TE: torch.Tensor) -> tuple[Routing, torch.Tensor, torch.Tensor]:
        """Route given float32 router logits (every router but hash): (routing, logits_TE, probs_TE)."""
        cfg = self.cfg
        probs_TE = torch.softmax(logits_TE, dim=-1)
        if cfg.router == "expert_choice":
            if self.training or self.ec_eval == "noncausal":
                return self._expert_choice(probs_TE), logits_TE, probs_TE
            top = torch.topk(probs_TE, cfg.top_k, dim=-1)
            return self._token_choice(top.indices, top.values, None), logits_TE, probs_TE
        scores_TE = probs_TE + self.bias_E if cfg.aux_free_bias else probs_TE
        expert_TK = torch.topk(scores_TE, cfg.top_k, dim=-1).indices
        chosen_TK = probs_TE.gather(1, expert_TK)
        if cfg.router == "top1":
            weight_TK = chosen_TK
        elif cfg.router == "topk_hard":
            # p - stopgrad(p) first: exactly 0, so the weight is exactly 1/k (1/k + p - p rounds)
            weight_TK = chosen_TK - chosen_TK.detach() + 1.0 / cfg.top_k
        else:  # softk: softmax over the k chosen logits == p renormalised over the chosen set
            weight_TK = torch.softmax(logits_TE.gather(1, expert_TK), dim=-1)
        routing = self._token_choice(expert_TK, weight_TK, cfg.capacity_factor)
        if cfg.aux_free_bias and self.training:
            self._update_bias(routing.tokens_per_expert_E)
        return routing, logits_TE, probs_TE

    def _token_choice(self, expert_TK: torch.Tensor, weight_TK: torch.Tensor,
                      capacity_factor: float | None) -> Routing:
        cfg = self.cfg
        num_tokens, top_k = expert_TK.shape
        capacity = capacity_for(capacity_factor, num_tokens, top_k, cfg.num_experts)
        expert_A = expert_TK.reshape(-1)
        weight_A = weight_TK.reshape(-1).float()
        priority = weight_A if cfg.drop_policy == "score" else None
        slot_A, keep_A, counts_E, sorted_A = assign_slots(expert_A, priority, cfg.num_experts, capacity)
        weight_A = weight_A * keep_A
        if cfg.renormalize and capacity is not None:
            kept_TK = weight_A.view(num_tokens, top_k)
            total_T = weight_TK.float().sum(-1, keepdim=True)
            weight_A = (kept_TK * total_T / kept_TK.sum(-1, keepdim=True).clamp_min(1e-9)).reshape(-1)
        token_A = torch.arange(num_tokens, device=expert_A.device).repeat_interleave(top_k)
        return Routing(token_A=token_A, expert_A=expert_A, weight_A=weight_A, keep_A=keep_A, slot_A=slot_A,
                       tokens_per_expert_E=counts_E.float(), counts_E=counts_E, sorted_A=sorted_A, capacity=capacity,
                       num_tokens=num_tokens, num_experts=cfg.num_experts, layout="token", top_k=top_k)

    def _expert_choice(self, probs_TE: torch.Tensor) -> Routing:
        cfg = self.cfg
        num_tokens, num_experts = probs_TE.shape
        capacity = min(num_tokens, capacity_for(cfg.capacity_factor, num_tokens, cfg.top_k, num_experts))
        top = torch.topk(probs_TE.t(), capacity, dim=-1)  # [E, C]
        token_A = top.indices.reshape(-1)
        expert_A = torch.arange(num_experts, device=probs_TE.device).repeat_interleave(capacity)
        slot_A = torch.arange(capacity, device=probs_TE.device).repeat(num_experts)
        counts_E = torch.full((num_experts,), capacity, dtype=torch.long, device=probs_TE.device)
        return Routing(token_A=token_A, expert_A=expert_A, weight_A=top.values.reshape(-1),
                       keep_A=torch.ones_like(token_A, dtype=torch.bool), slot_A=slot_A,
                       tokens_per_expert_E=counts_E.float(), counts_E=counts_E,
                       sorted_A=torch.arange(token_A.numel(), device=token_A.device), capacity=capacity,
                       num_tokens=num_tokens, num_experts=num_experts, layout="expert", top_k=None)

    @torch.no_grad()
    def _update_bias(self, tokens_per_expert_E: torch.Tensor) -> None:
        self.bias_E += self.cfg.bias_update_rate * torch.sign(tokens_per_expert_E.mean() - tokens_per_expert_E)


def _check_token_ids(token_ids_T: torch.Tensor, vocab_size: int) -> None:
    """Ids must index the hash table: a negative one would silently count from its end. Checked on
    the host for CPU tensors; on a GPU without a host sync, as a device-side assert."""
    if token_ids_T.dtype.is_floating_point or token_ids_T.dtype == torch.bool:
        raise ValueError(f"token_ids: expected integer ids, got {token_ids_T.dtype}")
    if token_ids_T.numel() == 0:
        return
    in_range = (token_ids_T.min() >= 0) & (token_ids_T.max() < vocab_size)
    if token_ids_T.device.type == "cpu":
        if not in_range:
            raise ValueError(f"token_ids: must be in [0, {vocab_size}) (hash_vocab_size), got ids in "
                             f"[{int(token_ids_T.min())}, {int(token_ids_T.max())}]")
    else:
        torch._assert_async(in_range, f"token_ids: must be in [0, {vocab_size}) (hash_vocab_size)")


def balance_losses(routing: Routing, logits_TE: torch.Tensor | None, probs_TE: torch.Tensor | None,
                   cfg: MoEConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Switch aux loss alpha*E*sum_e f_e*P_e and z-loss beta*mean(logsumexp(logits)^2); 0 without a router."""
    if probs_TE is None:
        zero = torch.zeros((), device=routing.expert_A.device)
        return zero, zero
    frac_E = routing.tokens_per_expert_E / routing.expert_A.numel()
    aux = cfg.aux_loss_coef * cfg.num_experts * (frac_E * probs_TE.mean(0)).sum()
    z = cfg.z_loss_coef * torch.logsumexp(logits_TE, dim=-1).square().mean()
    return aux, z


@torch.no_grad()
def routing_metrics(routing: Routing, probs_TE: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """drop_rate, token_drop_rate, load_cv, max_vio, gate_entropy as 0-dim tensors (no host sync).

    drop_rate = dropped assignments / assignments; token_drop_rate = tokens left with no kept
    assignment / tokens; load_cv = std/mean and max_vio = (max - mean)/mean of assignments per expert
    before capacity; gate_entropy = mean token entropy of p in nats (NaN without a router).
    """
    counts_E = routing.tokens_per_expert_E
    mean = counts_E.mean()
    if routing.layout == "token":
        kept_T = routing.keep_A.view(routing.num_tokens, routing.top_k).sum(-1)
    else:
        kept_T = torch.zeros(routing.num_tokens, device=counts_E.device).index_add_(
            0, routing.token_A, routing.keep_A.float())
    if probs_TE is None:
        entropy = torch.full((), float("nan"), device=counts_E.device)
    else:
        entropy = -(probs_TE * torch.log(probs_TE.clamp_min(1e-30))).sum(-1).mean()
    return {
        "drop_rate": (~routing.keep_A).float().mean(),  # not 1 - mean(keep): compiled, that rounds below 0
        "token_drop_rate": (kept_T == 0).float().mean(),
        "load_cv": counts_E.std(unbiased=False) / mean,
        "max_vio": (counts_E.max() - mean) / mean,
        "gate_entropy": entropy,
    }
