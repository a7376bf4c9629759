"""The MoE layer's math stated token by token: the independent oracle the dispatch backends are tested against.

Legend: T tokens in the routing group, D model dim, F expert hidden, E experts, K top-k, C capacity.

Plain Python loops over tokens and experts, slow on purpose and written from the definitions below,
not from routing.py or dispatch.py: it reads only the layer's weights (router, bias buffer, experts)
and the hash router's table (``routing.hash_table`` of the router's seed and token counts, which
defines that router). For a group x_TD of sequences of S tokens (x[..., S, D]; a 2-D x is one):

1. p_t = softmax(logits_t), logits_t = W x_t in float32 (every router but hash).
2. Selection. Token choice picks the K experts of largest score_t = p_t (+ bias with ``aux_free_bias``:
   the bias moves the choice, never the weights), largest first. Weights: top1 p_e; topk_hard
   1/K + p_e - stopgrad(p_e); softk the softmax of the chosen logits; hash experts table[token id],
   weights 1/K. Expert choice (training, or ``ec_eval="noncausal"``): in each routing group of
   n tokens (all T, or each sequence with ``ec_group="sequence"``) expert e takes the
   C = min(n, ceil(cf*n*K/E)) tokens of largest p_te, weight p_te, and nothing is dropped; in eval
   with ``ec_eval="causal"`` each token takes its top-K experts by p, weights p, dropless; with
   ``ec_eval="prefix"`` token t (position i of its sequence) takes expert e when expert choice over
   the group of its sequence's tokens 0..i, with C = min(i+1, ceil(cf*(i+1)*K/E)), picks it.
3. Capacity (token choice with a capacity factor): C = ceil(cf*T*K/E) slots per expert. Assignments
   claim slots in token order (``drop_policy="order"``) or by decreasing gate weight, ties in token
   order (``"score"``); an assignment finding its expert full is dropped.
4. ``renormalize`` (with a capacity): a token's kept weights are scaled so that they sum to the
   total weight of all its K choices; a token with nothing kept stays at 0.
5. y_t = sum over the kept (e, w) of token t of w * expert_e(x_t), expert_e(v) = act(v W1_e) W2_e
   (GELU), or (silu(v W3_e) * v W1_e) W2_e (SwiGLU).
"""
from __future__ import annotations

import math

import torch

from .config import MoEConfig
from .routing import hash_table, table_seed

Choice = tuple[int, torch.Tensor]  # (expert, float32 gate weight, differentiable)


def router_probs(x_D: torch.Tensor, weight_ED: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits_E, p_E) of one token, in float32 whatever the dtype of x."""
    logits_E = weight_ED.float() @ x_D.float()
    exp_E = torch.exp(logits_E - logits_E.max().detach())
    return logits_E, exp_E / exp_E.sum()


def largest(values, n: int) -> list[int]:
    """Indices of the n largest values, largest first, ties to the lower index."""
    return sorted(range(len(values)), key=lambda i: -float(values[i].detach()))[:n]


def token_choices(cfg: MoEConfig, x_TD: torch.Tensor, weight_ED: torch.Tensor | None, bias_E: torch.Tensor,
                  token_ids_T: torch.Tensor | None, counts: tuple[int, ...] | None = None) -> list[list[Choice]]:
    """Each token's K (expert, weight) choices before capacity, largest score first."""
    k = cfg.top_k
    if cfg.router == "hash":
        table_VK = hash_table(cfg.hash_vocab_size, cfg.num_experts, k, table_seed(cfg), counts)
        one_over_k = torch.tensor(1.0 / k, device=x_TD.device)
        return [[(int(e), one_over_k) for e in table_VK[int(v)]] for v in token_ids_T.reshape(-1)]
    choices = []
    for t in range(x_TD.shape[0]):
        logits_E, p_E = router_probs(x_TD[t], weight_ED)
        score_E = p_E + bias_E if cfg.aux_free_bias else p_E
        chosen = largest(score_E, k)
        if cfg.router == "topk_hard":  # straight-through: forward 1/k, gradient of p_e
            weights = [p_E[e] - p_E[e].detach() + 1.0 / k for e in chosen]
        elif cfg.router == "softk":
            exp_k = [torch.exp(logits_E[e] - logits_E[chosen[0]].detach()) for e in chosen]
            total = sum(exp_k)
            weights = [v / total for v in exp_k]
        else:  # top1, and expert choice routed causally in eval
            weights = [p_E[e] for e in chosen]
        choices.append(list(zip(chosen, weights)))
    return choices


def apply_capacity(cfg: MoEConfig, choices: list[list[Choice]], capacity: int) -> list[list[Choice]]:
    """Drop the assignments that find their expert full; renormalise the survivors if asked."""
    order = [(t, j) for t in range(len(choices)) for j in range(len(choices[t]))]  # token order
    if cfg.drop_policy == "score":
        order.sort(key=lambda tj: -float(choices[tj[0]][tj[1]][1].detach()))  # stable: ties keep token order
    used_E = [0] * cfg.num_experts
    kept = set()
    for t, j in order:
        e = choices[t][j][0]
        if used_E[e] < capacity:
            used_E[e] += 1
            kept.add((t, j))
    result = []
    for t, chosen in enumerate(choices):
        survivors = [choice for j, choice in enumerate(chosen) if (t, j) in kept]
        if cfg.renormalize and survivors:
            total = sum(w for _, w in chosen)
            kept_total = sum(w for _, w in survivors)
            survivors = [(e, w * total / kept_total) for e, w in survivors]
        result.append(survivors)
    return result


def picked_by(cfg: MoEConfig, probs: list[torch.Tensor], e: int) -> list[int]:
    """Indices of the tokens expert e takes from a group with router probabilities ``probs``."""
    n = len(probs)
    return largest([p_E[e] for p_E in probs], min(n, math.ceil(cfg.capacity_factor * n * cfg.top_k / cfg.num_experts)))


def expert_choices(cfg: MoEConfig, x_TD: torch.Tensor, weight_ED: torch.Tensor, group: int) -> list[list[Choice]]:
    """In each group of ``group`` tokens, expert e serves the C tokens of largest p_te, weight p_te;
    a token gets 0..E experts."""
    T = x_TD.shape[0]
    probs_T = [router_probs(x_TD[t], weight_ED)[1] for t in range(T)]
    kept: list[list[Choice]] = [[] for _ in range(T)]
    for start in range(0, T, group):
        for e in range(cfg.num_experts):
            for j in picked_by(cfg, probs_T[start:start + group], e):
                kept[start + j].append((e, probs_T[start + j][e]))
    return kept


def prefix_expert_choices(cfg: MoEConfig, x_TD: torch.Tensor, weight_ED: torch.Tensor,
                          seq_len: int) -> list[list[Choice]]:
    """Token t's experts are those that pick t when expert choice runs over its sequence's prefix up to t."""
    probs_T = [router_probs(x_TD[t], weight_ED)[1] for t in range(x_TD.shape[0])]
    kept: list[list[Choice]] = []
    for t, p_E in enumerate(probs_T):
        prefix = probs_T[t - t % seq_len:t + 1]
        kept.append([(e, p_E[e]) for e in range(cfg.num_experts) if len(prefix) - 1 in picked_by(cfg, prefix, e)])
    return kept


def kept_choices(cfg: MoEConfig, x_TD: torch.Tensor, weight_ED: torch.Tensor | None, bias_E: torch.Tensor,
                 token_ids_T: torch.Tensor | None, training: bool, ec_eval: str, seq_len: int,
                 counts: tuple[int, ...] | None = None) -> list[list[Choice]]:
    """Per token, the (expert, weight) assignments that reach an expert."""
    if cfg.router == "expert_choice":
        mode = "noncausal" if training else ec_eval
        if mode == "prefix":
            return prefix_expert_choices(cfg, x_TD, weight_ED, seq_len)
        if mode == "noncausal":
            return expert_choices(cfg, x_TD, weight_ED, seq_len if cfg.ec_group == "sequence" else x_TD.shape[0])
        return token_choices(cfg, x_TD, weight_ED, bias_E, None)  # dropless
    choices = token_choices(cfg, x_TD, weight_ED, bias_E, token_ids_T, counts)
    if cfg.capacity_factor is None:
        return choices
    T, k, E = x_TD.shape[0], cfg.top_k, cfg.num_experts
    return apply_capacity(cfg, choices, math.ceil(cfg.capacity_factor * T * k / E))


def expert_ffn(experts: torch.nn.Module, activation: str, e: int, x_D: torch.Tensor) -> torch.Tensor:
    """expert_e(x) for one token, activations written out."""
    up_F = x_D @ experts.w1_EDF[e]
    if activation == "swiglu":
        gate_F = x_D @ experts.w3_EDF[e]
        hidden_F = gate_F * torch.sigmoid(gate_F) * up_F
    else:
        hidden_F = 0.5 * up_F * (1.0 + torch.erf(up_F / math.sqrt(2.0)))
    return hidden_F @ experts.w2_EFD[e]


def reference_forward(layer: torch.nn.Module, x: torch.Tensor, token_ids: torch.Tensor | None = None) -> torch.Tensor:
    """y of an ``MoEFeedForward`` for x[..., S, D] (one routing group of sequences of S tokens), from
    its weights, mode and (hash) table inputs only."""
    cfg, router = layer.cfg, layer.router
    x_TD = x.reshape(-1, cfg.dim)
    ids_T = None if token_ids is None else token_ids.reshape(-1)
    seq_len = x.shape[-2] if x.dim() > 2 else x_TD.shape[0]
    kept = kept_choices(cfg, x_TD, router.weight_ED, router.bias_E, ids_T, router.training, router.ec_eval, seq_len,
                        router.token_counts)
    rows = []
    for t, assignments in enumerate(kept):
        y_D = x_TD.new_zeros(cfg.dim)
        for e, w in assignments:
            y_D = y_D + w.to(x_TD.dtype) * expert_ffn(layer.experts, cfg.activation, e, x_TD[t])
        rows.append(y_D)
    return torch.stack(rows).view_as(x)
