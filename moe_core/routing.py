"""Routers, capacity and routing metrics: the decisions every dispatch backend then executes.

Legend: T tokens in the routing group, D model dim, E experts, K top-k, C capacity per expert,
A assignments (T*K for token choice, E*C for expert choice), V vocabulary, G expert-choice groups,
S tokens per sequence (an expert-choice group of ``ec_group="sequence"``, a prefix's sequence).

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
def hash_table(vocab_size: int, num_experts: int, top_k: int, seed: int,
               counts: tuple[int, ...] | None = None) -> np.ndarray:
    """[V, K] experts per token id, k distinct each, balancing the expected load greedily.

    Without ``counts`` every id weighs 1: ids are visited in a seeded random order and each takes
    the k least-loaded experts, so per-expert totals differ by at most one (balanced over the
    vocabulary, not over text, where token frequencies are skewed). With ``counts`` (the training
    split's count of each id) the heaviest ids go first, each to the k experts of least expected
    load (sum of the counts of their ids); ties by fewer ids, then a seeded random priority. A
    token heavier than the mean load per expert (k * total / E) cannot be balanced by any table.
    """
    rng = np.random.default_rng(seed)
    weight_V = np.ones(vocab_size) if counts is None else np.asarray(counts, dtype=np.float64)
    order_V = rng.permutation(vocab_size)
    order_V = order_V[np.argsort(-weight_V[order_V], kind="stable")]  # heaviest first, seeded among equals
    load_E = np.zeros(num_experts)
    ids_E = np.zeros(num_experts, dtype=np.int64)
    table_VK = np.empty((vocab_size, top_k), dtype=np.int64)
    for v in order_V:
        tiebreak_E = rng.random(num_experts)
        chosen = np.lexsort((tiebreak_E, ids_E, load_E))[:top_k]
        table_VK[v] = chosen
        load_E[chosen] += weight_V[v]
        ids_E[chosen] += 1
    return table_VK


class Router(torch.nn.Module):
    """Router weights plus the routing rules (``moe_core.reference`` states them per token).

    p = softmax(logits) over all E experts, logits = x W^T in float32 (also under autocast).

    - ``top1`` (Switch): expert = argmax p; weight = p_e, so the router learns through p_e.
    - ``topk_hard``: the k largest p; weight = 1/k + p_e - stopgrad(p_e) (exactly 1/k forward,
      straight-through gradient to the router).
    - ``softk`` (Mixtral): the k largest logits; weights = softmax over those k logits.
    - ``hash`` (Roller et al.): experts = table[token_id], k distinct, balanced over the vocabulary
      (``hash_balance="ids"``) or over the training split's token counts (``"frequency"``, which
      needs ``token_counts``); weights 1/k; no trainable router.
    - ``expert_choice`` (Zhou et al.): expert e takes its top-C tokens by p_e within the group (the
      micro-batch, or each sequence with ``ec_group="sequence"``); a token may get 0..E experts;
      weight = p. Non-causal, so in eval mode ``ec_eval`` picks the rule: ``"causal"`` token-choice
      top-k on the same p (weights p, dropless); ``"noncausal"`` the training rule; ``"prefix"``
      the training rule over causal prefix groups: token t of a sequence is taken by expert e when
      p_te ranks among the top C_t = min(t+1, ceil(cf*(t+1)*k/E)) of tokens 0..t of its sequence
      (ties to the earlier token), so the rule stays expert choice but reads no future token.

    Token-choice selection uses p + bias when ``aux_free_bias`` (DeepSeek-V3): the bias changes which
    experts are chosen, never the weights, and is updated by u * sign(mean load - load).
    """

    def __init__(self, cfg: MoEConfig, token_counts=None):
        super().__init__()
        self.cfg = cfg
        self.ec_eval = cfg.ec_eval
        self.token_counts = None  # what a frequency-balanced hash table balances
        if cfg.router == "hash":
            self.weight_ED = None
            if cfg.hash_vocab_size is None:
                raise ValueError("hash_vocab_size: the hash router needs the vocabulary size")
            self.token_counts = table_counts(cfg, token_counts)
            table = hash_table(cfg.hash_vocab_size, cfg.num_experts, cfg.top_k, table_seed(cfg), self.token_counts)
            self.register_buffer("hash_table_VK", torch.from_numpy(table), persistent=False)
        else:
            self.weight_ED = torch.nn.Parameter(torch.randn(cfg.num_experts, cfg.dim) * cfg.router_init_std)
        self.register_buffer("bias_E", torch.zeros(cfg.num_experts), persistent=cfg.aux_free_bias)

    def logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            return F.linear(x_TD.float(), self.weight_ED.float())

    def forward(self, x_TD: torch.Tensor, token_ids_T: torch.Tensor | None, seq_len: int | None = None
                ) -> tuple[Routing, torch.Tensor | None, torch.Tensor | None]:
        """Returns (routing, logits_TE or None, probs_TE or None). ``seq_len``: tokens per sequence
        of x_TD (consecutive rows), which expert choice needs for sequence and prefix groups."""
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
        return self.route(self.logits(x_TD), seq_len)

    def route(self, logits_TE: torch.Tensor, seq_len: int | None = None) -> tuple[Routing, torch.Tensor, torch.Tensor]:
        """Route given float32 router logits (every router but hash): (routing, logits_TE, probs_TE)."""
        cfg = self.cfg
        probs_TE = torch.softmax(logits_TE, dim=-1)
        if cfg.router == "expert_choice":
            mode = "noncausal" if self.training else self.ec_eval
            if mode == "causal":
                top = torch.topk(probs_TE, cfg.top_k, dim=-1)
                return self._token_choice(top.indices, top.values, None), logits_TE, probs_TE
            if mode == "prefix":
                return self._prefix_expert_choice(probs_TE, _sequence_len(probs_TE, seq_len)), logits_TE, probs_TE
            group = _sequence_len(probs_TE, seq_len) if cfg.ec_group == "sequence" else probs_TE.shape[0]
            return self._expert_choice(probs_TE, group), logits_TE, probs_TE
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

    def _expert_choice(self, probs_TE: torch.Tensor, group: int) -> Routing:
        """Each expert takes its top-C tokens of every group of ``group`` consecutive tokens; its
        block of the expert-major layout holds its G*C picks (distinct tokens), group by group."""
        num_tokens, num_experts = probs_TE.shape
        G, dev = num_tokens // group, probs_TE.device
        C = min(group, capacity_for(self.cfg.capacity_factor, group, self.cfg.top_k, num_experts))
        top = torch.topk(probs_TE.view(G, group, num_experts).transpose(1, 2), C, dim=-1)  # [G, E, C]
        token_GEC = top.indices + group * torch.arange(G, device=dev).view(G, 1, 1)
        return _expert_layout(token_GEC.transpose(0, 1).reshape(-1), top.values.transpose(0, 1).reshape(-1),
                              None, num_tokens, num_experts, G * C)

    def _prefix_expert_choice(self, probs_TE: torch.Tensor, seq_len: int) -> Routing:
        """Expert choice over causal prefix groups (see the class doc): every expert's block lists
        all T tokens, keep_A marks the ones it takes. Rank of t = tokens s < t of its sequence with
        p_se >= p_te; [G, S, S, E] comparisons, an eval-only rule."""
        cfg = self.cfg
        num_tokens, num_experts = probs_TE.shape
        p_GSE = probs_TE.view(num_tokens // seq_len, seq_len, num_experts)
        pos_S = torch.arange(seq_len, device=probs_TE.device)
        earlier_TS = pos_S.view(1, -1) < pos_S.view(-1, 1)  # [t, s]: s < t
        beats_GTSE = (p_GSE.unsqueeze(1) >= p_GSE.unsqueeze(2)) & earlier_TS.view(1, seq_len, seq_len, 1)
        quota_T = torch.tensor([min(t + 1, capacity_for(cfg.capacity_factor, t + 1, cfg.top_k, num_experts))
                                for t in range(seq_len)], device=probs_TE.device)
        keep_TE = (beats_GTSE.sum(2) < quota_T.view(1, -1, 1)).view(num_tokens, num_experts)
        token_A = torch.arange(num_tokens, device=probs_TE.device).repeat(num_experts)
        return _expert_layout(token_A, probs_TE.t().reshape(-1), keep_TE.t().reshape(-1), num_tokens, num_experts,
                              num_tokens)

    @torch.no_grad()
    def _update_bias(self, tokens_per_expert_E: torch.Tensor) -> None:
        self.bias_E += self.cfg.bias_update_rate * torch.sign(tokens_per_expert_E.mean() - tokens_per_expert_E)


def table_seed(cfg: MoEConfig) -> int:
    """The hash table's seed: hash_seed, or 0 where no run resolved it (a layer built alone)."""
    return 0 if cfg.hash_seed is None else cfg.hash_seed


def table_counts(cfg: MoEConfig, token_counts) -> tuple[int, ...] | None:
    """The token counts a hash table balances: the given ones for ``hash_balance="frequency"``."""
    if cfg.hash_balance == "ids":
        return None
    if token_counts is None:
        raise ValueError("token_counts: hash_balance='frequency' needs the training split's count of each token id")
    counts = tuple(int(c) for c in token_counts)
    if len(counts) != cfg.hash_vocab_size or min(counts) < 0:
        raise ValueError(f"token_counts: need {cfg.hash_vocab_size} counts >= 0, one per token id, got {len(counts)}")
    return counts


def _sequence_len(probs_TE: torch.Tensor, seq_len: int | None) -> int:
    if seq_len is None or seq_len < 1 or probs_TE.shape[0] % seq_len:
        raise ValueError(f"seq_len: expert choice over sequences needs the tokens per sequence of the "
                         f"{probs_TE.shape[0]} routed tokens, got {seq_len!r}")
    return seq_len


def _expert_layout(token_A: torch.Tensor, weight_A: torch.Tensor, keep_A: torch.Tensor | None, num_tokens: int,
                   num_experts: int, block: int) -> Routing:
    """An expert-major Routing: expert e's assignments are rows [e*block, (e+1)*block), its tokens
    distinct; keep_A None means all kept, else dropped rows get weight 0."""
    dev = token_A.device
    keep_A = torch.ones_like(token_A, dtype=torch.bool) if keep_A is None else keep_A
    counts_E = torch.full((num_experts,), block, dtype=torch.long, device=dev)
    return Routing(token_A=token_A, expert_A=torch.arange(num_experts, device=dev).repeat_interleave(block),
                   weight_A=weight_A * keep_A, keep_A=keep_A, slot_A=torch.arange(block, device=dev).repeat(num_experts),
                   tokens_per_expert_E=keep_A.view(num_experts, block).sum(1).float(), counts_E=counts_E,
                   sorted_A=torch.arange(token_A.numel(), device=dev), capacity=block, num_tokens=num_tokens,
                   num_experts=num_experts, layout="expert", top_k=None)


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
    """drop_rate, token_drop_rate, load_cv, max_vio, gate_entropy, p1_mean, p1_over_half as 0-dim
    tensors (no host sync).

    drop_rate = dropped assignments / assignments; token_drop_rate = tokens left with no kept
    assignment / tokens; load_cv = std/mean and max_vio = (max - mean)/mean of assignments per expert
    before capacity; gate_entropy = mean token entropy of p in nats; router confidence: p1_mean =
    mean over tokens of the largest p, p1_over_half = share of tokens whose largest p exceeds 0.5
    (the last three NaN without a router).
    """
    counts_E = routing.tokens_per_expert_E
    mean = counts_E.mean()
    if routing.layout == "token":
        kept_T = routing.keep_A.view(routing.num_tokens, routing.top_k).sum(-1)
    else:
        kept_T = torch.zeros(routing.num_tokens, device=counts_E.device).index_add_(
            0, routing.token_A, routing.keep_A.float())
    if probs_TE is None:
        entropy = p1_mean = p1_over_half = torch.full((), float("nan"), device=counts_E.device)
    else:
        entropy = -(probs_TE * torch.log(probs_TE.clamp_min(1e-30))).sum(-1).mean()
        p1_T = probs_TE.max(-1).values
        p1_mean, p1_over_half = p1_T.mean(), (p1_T > 0.5).float().mean()
    return {
        "drop_rate": (~routing.keep_A).float().mean(),  # not 1 - mean(keep): compiled, that rounds below 0
        "token_drop_rate": (kept_T == 0).float().mean(),
        "load_cv": counts_E.std(unbiased=False) / mean,
        "max_vio": (counts_E.max() - mean) / mean,
        "gate_entropy": entropy,
        "p1_mean": p1_mean,
        "p1_over_half": p1_over_half,
    }


@torch.no_grad()
def token_expert_counts(routing: Routing, token_ids_T: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[V, E] float counts of (token id, chosen expert) over the routing's assignments: a token-choice
    token's k choices before capacity, an expert-choice expert's picks. No host sync."""
    chosen_A = torch.ones_like(routing.keep_A) if routing.layout == "token" else routing.keep_A
    cell_A = token_ids_T.reshape(-1)[routing.token_A] * routing.num_experts + routing.expert_A
    counts = torch.zeros(vocab_size * routing.num_experts, device=routing.expert_A.device)
    return counts.index_add_(0, cell_A, chosen_A.float()).view(vocab_size, routing.num_experts)


def mutual_information(counts_VE: torch.Tensor) -> torch.Tensor:
    """Plug-in estimate, in nats, of I(token id; expert) under the empirical joint distribution of
    the counted assignments: sum p(v,e) log(p(v,e) / (p(v) p(e))). Token choice bounds it by
    ln(E/k) (k distinct experts per token; a balanced hash table reaches it); the plug-in estimate
    is biased up by about (V-1)(E-1)/(2N) for N assignments. NaN for no assignments."""
    total = counts_VE.sum()
    p_VE = counts_VE / total.clamp_min(1e-30)
    ratio_VE = p_VE / (p_VE.sum(1, keepdim=True) * p_VE.sum(0, keepdim=True)).clamp_min(1e-30)
    mi = torch.where(p_VE > 0, p_VE * torch.log(ratio_VE.clamp_min(1e-30)), torch.zeros_like(p_VE)).sum()
    return torch.where(total > 0, mi, torch.full_like(mi, float("nan")))
