"""Proof that the routers, capacity rules and dispatch backends compute the layer's stated math.

Oracle: moe_core.reference, the per-token statement of the math (no code shared with routing.py or
dispatch.py). Every backend (loop, GShard einsum, padded, grouped, fused) must match it in float64 on CPU,
outputs and gradients w.r.t. x, the expert weights and the router weight. Hand cases pin the
capacity, drop and metric rules; the rest of the suite runs in float32.
"""
import math

import pytest
import torch

from moe_core import ROUTERS, MoEConfig, MoEFeedForward
from moe_core.dispatch import BACKEND_FNS
from moe_core.model import DenseFeedForward
from moe_core.reference import reference_forward
from moe_core.routing import hash_table, mutual_information, routing_metrics, token_expert_counts

VOCAB = 37
BACKENDS = list(BACKEND_FNS)


def make_layer(router, *, E=4, k=2, cf=1.0, D=12, F_=20, seed=0, **kw):
    torch.manual_seed(seed)
    k = 1 if router == "top1" else k
    cfg = MoEConfig(dim=D, hidden=F_, num_experts=E, top_k=k, router=router, capacity_factor=cf,
                    hash_vocab_size=VOCAB, **kw)
    return MoEFeedForward(cfg)


def outputs_and_grads(layer, x, forward):
    """y and the gradients of a fixed linear loss w.r.t. x and every parameter."""
    layer.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    y = forward(x)
    (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype, device=y.device).view_as(y)).sum().backward()
    return {"y": y.detach(), "x": x.grad, **{n: p.grad for n, p in layer.named_parameters()}}


def backend_forward(layer, backend, ids):
    def forward(x):
        layer.backend = backend
        return layer(x, ids)[0]
    return forward


def assert_backends_match_reference(layer, x, ids):
    """Every backend equals the reference in float64, outputs and all gradients, to the float32
    rounding of the router (gates are float32 by contract); on one routing, the backends agree with
    each other to float64 rounding."""
    want = outputs_and_grads(layer, x, lambda v: reference_forward(layer, v, ids))
    assert all(g is not None for g in want.values())
    first = None
    for backend in BACKENDS:
        got = outputs_and_grads(layer, x, backend_forward(layer, backend, ids))
        first = got if first is None else first
        assert got.keys() == want.keys()
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=f"{backend} {name}")
            torch.testing.assert_close(got[name], first[name], rtol=1e-12, atol=1e-12, msg=f"{backend} {name}")


CASES = {  # (T, D, E, k) and MoEConfig fields; router_init_std=1 makes p far from uniform
    "dropless": dict(T=12, D=8, E=4, k=2, capacity_factor=None),
    "order": dict(T=13, D=6, E=3, k=2, capacity_factor=1.0),
    "score": dict(T=16, D=8, E=4, k=2, capacity_factor=0.75, drop_policy="score"),
    "order_renorm": dict(T=11, D=10, E=5, k=3, capacity_factor=1.0, renormalize=True),
    "score_renorm_swiglu": dict(T=14, D=6, E=4, k=2, capacity_factor=0.5, drop_policy="score",
                                renormalize=True, activation="swiglu"),
    "aux_free_bias": dict(T=12, D=8, E=4, k=2, capacity_factor=1.25, aux_free_bias=True, bias_update_rate=0.0),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("router", ROUTERS)
def test_backends_match_reference_float64(router, case):
    spec = dict(CASES[case])
    T, D, E, k, cf = (spec.pop(n) for n in ("T", "D", "E", "k", "capacity_factor"))
    if router == "expert_choice" and (cf is None or spec.get("aux_free_bias")):
        pytest.skip("expert choice always has a capacity and no selection bias")
    if router == "hash" and spec.get("aux_free_bias"):
        pytest.skip("the hash router has no selection scores to bias")
    layer = make_layer(router, E=E, k=k, cf=cf, D=D, F_=2 * D + 3, seed=T, router_init_std=1.0, **spec).double()
    x = torch.randn(T, D, dtype=torch.float64)
    ids = torch.randint(0, VOCAB, (T,))
    if spec.get("aux_free_bias"):  # a bias large enough to change some token's choice
        layer.router.bias_E.copy_(torch.randn(E, dtype=torch.float64) * 0.3)
        routing, _, probs_TE = layer.router(x, ids)
        k = layer.cfg.top_k
        assert not torch.equal(routing.expert_A.view(T, k), torch.topk(probs_TE, k).indices)
    if cf is not None and router != "expert_choice":
        assert layer(x, ids)[1].drop_rate > 0, "the case must drop something"
    assert_backends_match_reference(layer, x, ids)


@pytest.mark.parametrize("group,mode,ec_eval", [
    ("batch", "train", "causal"), ("batch", "eval", "causal"), ("batch", "eval", "noncausal"),
    ("batch", "eval", "prefix"), ("sequence", "train", "causal"), ("sequence", "eval", "noncausal"),
    ("sequence", "eval", "prefix"),
])
def test_expert_choice_modes_match_reference_float64(group, mode, ec_eval):
    layer = make_layer("expert_choice", E=4, k=2, cf=0.75, D=8, F_=19, router_init_std=1.0, ec_eval=ec_eval,
                       ec_group=group)
    layer.double().train(mode == "train")
    assert_backends_match_reference(layer, torch.randn(3, 5, 8, dtype=torch.float64), None)  # 3 sequences of 5


def test_frequency_hash_matches_reference_float64():
    counts = torch.randint(0, 1000, (VOCAB,)) ** 2
    cfg = MoEConfig(dim=8, hidden=19, num_experts=4, top_k=2, router="hash", capacity_factor=1.0,
                    hash_vocab_size=VOCAB, hash_balance="frequency", hash_seed=4)
    layer = MoEFeedForward(cfg, token_counts=counts).double()
    assert torch.equal(layer.router.hash_table_VK, torch.as_tensor(hash_table(VOCAB, 4, 2, 4, tuple(counts.tolist()))))
    assert_backends_match_reference(layer, torch.randn(16, 8, dtype=torch.float64), torch.randint(0, VOCAB, (16,)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_capacity_hand_case_order_and_score(backend):
    """E=2, k=1, T=4, CF=1 -> C=2. All four tokens pick expert 0: tokens 2, 3 drop (order policy);
    with the score policy the two highest-probability tokens survive."""
    for policy, survivors in (("order", {0, 1}), ("score", {1, 3})):
        layer = make_layer("top1", E=2, k=1, cf=1.0, D=2, F_=4, drop_policy=policy)
        layer.backend = backend
        with torch.no_grad():
            layer.router.weight_ED.copy_(torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
        x = torch.tensor([[1.0, 0.5], [3.0, 0.1], [0.5, 0.2], [2.0, -0.3]])  # logit_0 = x[:, 0] > 0
        y, stats = layer(x)
        dropped = {t for t in range(4) if t not in survivors}
        for t in dropped:
            assert torch.equal(y[t], torch.zeros(2)), f"dropped token {t} must leave the layer as exactly 0"
        for t in survivors:
            assert y[t].abs().sum() > 0
        assert stats.drop_rate.item() == pytest.approx(0.5)
        assert stats.token_drop_rate.item() == pytest.approx(0.5)
        assert stats.tokens_per_expert.tolist() == [4.0, 0.0]
        assert stats.load_cv.item() == pytest.approx(1.0)
        assert stats.max_vio.item() == pytest.approx(1.0)


def test_capacity_k2_partial_drop_is_not_a_token_drop():
    """k=2, E=2: every token uses both experts, C = ceil(0.5*4*2/2) = 2 -> tokens 2, 3 lose both."""
    layer = make_layer("softk", E=2, k=2, cf=0.5, D=4, F_=6)
    y, stats = layer(torch.randn(4, 4))
    assert stats.drop_rate.item() == pytest.approx(0.5)
    assert stats.token_drop_rate.item() == pytest.approx(0.5)
    assert torch.equal(y[2:], torch.zeros(2, 4))
    layer = make_layer("softk", E=4, k=2, cf=0.5, D=4, F_=6)  # C = 1 per expert
    with torch.no_grad():  # token 0 -> experts {0,1}, token 1 -> {1,2}: token 1 keeps expert 2 only
        layer.router.weight_ED.copy_(torch.tensor([[4.0, 0, 0, 0], [3.0, 3.0, 0, 0], [0, 4.0, 0, 0], [-9.0, -9, 0, 0]]))
    y, stats = layer(torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0]]))
    assert stats.drop_rate.item() == pytest.approx(0.25)
    assert stats.token_drop_rate.item() == 0.0
    assert y[1].abs().sum() > 0


@pytest.mark.parametrize("router", ["top1", "topk_hard", "softk"])
def test_dropless_drops_nothing(router):
    layer = make_layer(router, E=4, cf=None)
    with torch.no_grad():
        layer.router.weight_ED.zero_()
        layer.router.weight_ED[0, 0] = 50.0  # everything wants expert 0
    x = torch.randn(40, 12).abs()
    y, stats = layer(x)
    assert stats.drop_rate.item() == 0.0 and stats.token_drop_rate.item() == 0.0
    assert stats.tokens_per_expert[0].item() == 40
    assert stats.max_vio.item() > 0


def test_renormalize_restores_gate_mass_of_survivors():
    layer = make_layer("softk", E=4, k=2, cf=0.5, D=4, F_=6, renormalize=True)
    with torch.no_grad():
        layer.router.weight_ED.copy_(torch.tensor([[4.0, 0, 0, 0], [3.0, 3.0, 0, 0], [0, 4.0, 0, 0], [-9.0, -9, 0, 0]]))
    x = torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0]])
    routing, _, _ = layer.router(x, None)
    w = routing.weight_A.view(2, 2)
    assert routing.keep_A.tolist() == [True, True, True, False]  # token 1: expert 2 kept, expert 1 full
    torch.testing.assert_close(w.sum(-1), torch.ones(2))  # softk weights sum to 1 after renormalising
    assert w[1, 1].item() == 0.0 and w[1, 0].item() == pytest.approx(1.0)


@pytest.mark.parametrize("router", ["top1", "topk_hard", "softk", "expert_choice"])
def test_gradient_reaches_router(router):
    layer = make_layer(router, E=4, cf=1.25)
    layer.train()
    y, stats = layer(torch.randn(24, 12))
    y.pow(2).sum().backward()
    assert layer.router.weight_ED.grad is not None
    assert layer.router.weight_ED.grad.abs().sum() > 0


@pytest.mark.parametrize("router", ["top1", "topk_hard", "softk"])
def test_aux_and_z_loss_are_differentiable(router):
    layer = make_layer(router, E=4, cf=1.0)
    _, stats = layer(torch.randn(24, 12))
    assert stats.aux_loss.item() > 0 and stats.z_loss.item() > 0
    (g_aux,) = torch.autograd.grad(stats.aux_loss, layer.router.weight_ED, retain_graph=True)
    (g_z,) = torch.autograd.grad(stats.z_loss, layer.router.weight_ED)
    assert g_aux.abs().sum() > 0 and g_z.abs().sum() > 0


def test_aux_loss_formula_and_uniform_value():
    """aux = alpha * E * sum f_e P_e; with uniform routing f_e = P_e = 1/E it equals alpha."""
    layer = make_layer("softk", E=4, k=2, cf=None)
    with torch.no_grad():
        layer.router.weight_ED.zero_()
    _, stats = layer(torch.randn(32, 12))
    counts = stats.tokens_per_expert
    f = counts / counts.sum()
    assert stats.aux_loss.item() == pytest.approx(0.01 * 4 * (f * 0.25).sum().item(), rel=1e-5)
    assert stats.z_loss.item() == pytest.approx(1e-3 * math.log(4) ** 2, rel=1e-5)
    assert stats.gate_entropy.item() == pytest.approx(math.log(4), rel=1e-5)


def test_hash_router_balanced_distinct_untrainable():
    for E, V in ((4, 37), (7, 100)):
        counts = torch.bincount(torch.as_tensor(hash_table(V, E, 1, 3)).view(-1), minlength=E)
        assert counts.max() - counts.min() <= 1
    table = torch.as_tensor(hash_table(100, 8, 3, 5))
    assert all(len(set(row.tolist())) == 3 for row in table)
    counts = torch.bincount(table.view(-1), minlength=8)
    assert counts.max() - counts.min() <= 1
    assert not torch.equal(table, torch.as_tensor(hash_table(100, 8, 3, 6)))  # the seed matters
    layer = make_layer("hash", E=4, k=2, cf=None)
    assert list(layer.router.parameters()) == []
    _, stats = layer(torch.randn(10, 12), torch.randint(0, VOCAB, (10,)))
    assert torch.isnan(stats.gate_entropy) and stats.aux_loss.item() == 0.0
    with pytest.raises(ValueError, match="token_ids"):
        layer(torch.randn(10, 12))


@pytest.mark.parametrize("router", ["top1", "topk_hard", "softk", "hash"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_single_expert_equals_dense_ffn(router, backend):
    cfg = MoEConfig(dim=12, hidden=20, num_experts=1, top_k=1, router=router, capacity_factor=None,
                    backend=backend, hash_vocab_size=VOCAB)
    layer = MoEFeedForward(cfg)
    dense = DenseFeedForward(12, 20, "gelu")
    with torch.no_grad():
        dense.w1_DF.copy_(layer.experts.w1_EDF[0])
        dense.w2_FD.copy_(layer.experts.w2_EFD[0])
    x = torch.randn(3, 5, 12)
    y, _ = layer(x, torch.randint(0, VOCAB, (3, 5)))
    torch.testing.assert_close(y, dense(x), rtol=1e-5, atol=1e-6)


def test_swiglu_experts_match_dense():
    cfg = MoEConfig(dim=8, hidden=16, num_experts=1, top_k=1, router="softk", capacity_factor=None,
                    activation="swiglu")
    layer, dense = MoEFeedForward(cfg), DenseFeedForward(8, 16, "swiglu")
    with torch.no_grad():
        dense.w1_DF.copy_(layer.experts.w1_EDF[0])
        dense.w2_FD.copy_(layer.experts.w2_EFD[0])
        dense.w3_DF.copy_(layer.experts.w3_EDF[0])
    x = torch.randn(10, 8)
    torch.testing.assert_close(layer(x)[0], dense(x), rtol=1e-5, atol=1e-6)


def test_expert_choice_noncausal_in_training_causal_in_eval():
    layer = make_layer("expert_choice", E=4, k=2, cf=1.0)
    x = torch.randn(16, 12)
    x_future = x.clone()
    x_future[-1] = 10 * torch.randn(12)  # a very different last (future) token
    layer.train()
    y_a, _ = layer(x)
    y_b, _ = layer(x_future)
    assert not torch.allclose(y_a[:-1], y_b[:-1]), "expert choice reads future tokens in training mode"
    layer.eval()
    y_a, stats = layer(x)
    y_b, _ = layer(x_future)
    torch.testing.assert_close(y_a[:-1], y_b[:-1], rtol=0, atol=0)
    assert stats.drop_rate.item() == 0.0


def test_prefix_and_sequence_groups_confine_what_expert_choice_reads():
    """Prefix eval reads no later token of the sequence; in training, sequence groups read their own
    sequence's future but no other sequence, batch groups (the default) read other sequences too."""
    x = 0.1 * torch.randn(2, 8, 12, generator=torch.Generator().manual_seed(0))
    x[0, -1, 1] = 20.0  # sequence 0's last token wants expert 1 (logit_e = x_e below)
    x[1, :, 0] -= 1.0  # sequence 1 is the weakest for expert 0
    changed = x.clone()
    changed[0, -1, :2] = torch.tensor([20.0, 0.0])  # ... and now expert 0, displacing someone
    for group in ("batch", "sequence"):
        layer = make_layer("expert_choice", E=4, k=2, cf=1.0, ec_group=group, ec_eval="prefix")
        with torch.no_grad():
            layer.router.weight_ED.copy_(torch.eye(4, 12))
        layer.eval()
        torch.testing.assert_close(layer(x)[0][:, :-1], layer(changed)[0][:, :-1], rtol=0, atol=0)
        layer.train()
        y, y_changed = layer(x)[0], layer(changed)[0]
        assert torch.equal(y[1], y_changed[1]) == (group == "sequence")  # the other sequence
        assert group == "batch" or not torch.equal(y[0, :-1], y_changed[0, :-1])  # its own future
    routing, _, _ = layer.router(x.view(-1, 12), None, 8)
    assert routing.capacity == 2 * 4 and routing.token_A.view(4, 2, 4).div(8, rounding_mode="floor").tolist() == \
        [[[0] * 4, [1] * 4]] * 4  # each expert takes C = 4 tokens of each sequence
    with pytest.raises(ValueError, match="seq_len"):
        layer.router(x.view(-1, 12), None, 5)


def test_frequency_hash_table_balances_skewed_load():
    """On Zipf-like counts the greedy frequency table spreads the expected load far better than the
    id-balanced one; with equal counts it is the id-balanced table."""
    V, E = 300, 8
    ranks = torch.randperm(V, generator=torch.Generator().manual_seed(0)).tolist()
    counts = tuple(int(1e6 / (r + 5) ** 1.1) for r in ranks)  # heaviest id: 46% of the mean load at k=1
    for k in (1, 2):
        vio = {}
        for name, table_counts in (("ids", None), ("frequency", counts)):
            table = torch.as_tensor(hash_table(V, E, k, 0, table_counts))
            weight_A = torch.tensor(counts, dtype=torch.float64).repeat_interleave(k)
            load_E = torch.zeros(E, dtype=torch.float64).index_add_(0, table.reshape(-1), weight_A)
            vio[name] = (load_E.max() / load_E.mean() - 1).item()  # max_vio of the expected load
        assert vio["frequency"] < 0.01 and vio["ids"] > 0.3, (k, vio)
        assert all(len(set(row)) == k for row in hash_table(V, E, k, 0, counts).tolist())
    assert (hash_table(V, E, 2, 3, (5,) * V) == hash_table(V, E, 2, 3)).all()
    with pytest.raises(ValueError, match="token_counts"):
        make_layer("hash", hash_balance="frequency")


def test_router_confidence_and_token_expert_information():
    layer = make_layer("top1", E=4, cf=None)
    logits_TE = torch.tensor([[4.0, 0, 0, 0], [0, 0, 0, 0], [0, 3.0, 0, 0], [0, 0, 0, 2.0]])
    routing, _, probs_TE = layer.router.route(logits_TE)
    stats = routing_metrics(routing, probs_TE)
    p1 = probs_TE.max(-1).values
    assert stats["p1_mean"].item() == pytest.approx(p1.mean().item())
    assert stats["p1_over_half"].item() == 0.75 and p1[1].item() == 0.25
    ids = torch.tensor([5, 6, 5, 7])  # id 5 goes to experts 0 and 1: MI = H(E) - H(E|V) = ln 4 - ln(2)/2
    counts_VE = token_expert_counts(routing, ids, 9)
    assert counts_VE.sum().item() == 4 and counts_VE[5].tolist() == [1.0, 1.0, 0.0, 0.0]
    assert mutual_information(counts_VE).item() == pytest.approx(math.log(4) - math.log(2) / 2)
    assert mutual_information(torch.ones(5, 4)).item() == pytest.approx(0.0, abs=1e-7)  # independent
    assert torch.isnan(mutual_information(torch.zeros(5, 4)))
    hashed = make_layer("hash", E=8, k=2, cf=None)  # every id once: MI = H(E) - H(E|V) = H(E) - ln 2
    ids = torch.arange(VOCAB)
    routing, _, _ = hashed.router(torch.randn(VOCAB, 12), ids)
    p_E = torch.bincount(hashed.router.hash_table_VK.view(-1), minlength=8) / (2 * VOCAB)
    entropy = -(p_E * p_E.log()).sum().item()
    assert mutual_information(token_expert_counts(routing, ids, VOCAB)).item() == pytest.approx(entropy - math.log(2))
    assert torch.isnan(routing_metrics(routing, None)["p1_mean"])


def test_expert_choice_capacity_and_token_drop():
    layer = make_layer("expert_choice", E=4, k=1, cf=0.5)  # C = ceil(0.5*16*1/4) = 2 -> <= 8 tokens served
    layer.train()
    routing, _, _ = layer.router(torch.randn(16, 12), None)
    assert routing.capacity == 2 and routing.token_A.numel() == 8
    _, stats = layer(torch.randn(16, 12))
    assert stats.token_drop_rate.item() >= 0.5
    assert stats.load_cv.item() == 0.0


def test_aux_free_bias_moves_toward_balance():
    layer = make_layer("softk", E=4, k=1, cf=None, aux_free_bias=True, bias_update_rate=0.01)
    with torch.no_grad():
        layer.router.weight_ED.zero_()
        layer.router.weight_ED[0, 0] = 5.0
    layer.train()
    x = torch.randn(64, 12).abs()
    first = layer(x)[1].max_vio.item()
    for _ in range(60):
        last = layer(x)[1].max_vio.item()
    assert layer.router.bias_E[0] < 0 < layer.router.bias_E[1:].max()
    assert last < first
    layer.eval()
    before = layer.router.bias_E.clone()
    layer(x)
    assert torch.equal(before, layer.router.bias_E), "the bias only updates in training"


@pytest.mark.parametrize("router", ROUTERS)
def test_deterministic_bitwise(router):
    def run():
        layer = make_layer(router, E=5, k=2, cf=1.25, seed=7)
        torch.manual_seed(1)
        x = torch.randn(33, 12, requires_grad=True)
        y, _ = layer(x, torch.arange(33) % VOCAB)
        y.sum().backward()
        return y, x.grad, [p.grad for p in layer.parameters()]

    (y1, g1, p1), (y2, g2, p2) = run(), run()
    assert torch.equal(y1, y2) and torch.equal(g1, g2)
    assert all(torch.equal(a, b) for a, b in zip(p1, p2))


def test_router_logits_float32_under_autocast():
    layer = make_layer("softk", E=4)
    x = torch.randn(8, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = layer.router.logits(x)
        y, _ = layer(x)
    assert logits.dtype == torch.float32
    assert torch.isfinite(y.float()).all()


@pytest.mark.parametrize("kwargs,field", [
    (dict(router="nope"), "router"),
    (dict(top_k=0), "top_k"),
    (dict(top_k=9, num_experts=8), "top_k"),
    (dict(router="top1", top_k=2), "top_k"),
    (dict(capacity_factor=0.0), "capacity_factor"),
    (dict(capacity_factor=-1.0), "capacity_factor"),
    (dict(router="expert_choice", capacity_factor=None), "capacity_factor"),
    (dict(num_experts=0), "num_experts"),
    (dict(dim=0), "dim"),
    (dict(backend="cuda_magic"), "backend"),
    (dict(drop_policy="random"), "drop_policy"),
    (dict(activation="relu6"), "activation"),
    (dict(aux_loss_coef=-0.1), "aux_loss_coef"),
    (dict(router="hash", aux_free_bias=True), "aux_free_bias"),
    (dict(ec_eval="sometimes"), "ec_eval"),
    (dict(router="expert_choice", capacity_factor=1.0, ec_group="token"), "ec_group"),
    (dict(router="hash", hash_balance="bytes"), "hash_balance"),
    (dict(router="hash", hash_seed=-1), "hash_seed"),
])
def test_invalid_moe_config_names_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"^{field}:"):
        MoEConfig(**kwargs)


def test_router_aliases():
    assert MoEConfig(router="expert-choice", capacity_factor=1.0).router == "expert_choice"
    assert MoEConfig(router="TopK-Hard").router == "topk_hard"
    assert set(ROUTERS) >= {"top1", "topk_hard", "softk", "hash", "expert_choice"}


def test_grouped_backend_uses_grouped_gemm_when_aligned(monkeypatch):
    calls = []
    real = torch._grouped_mm

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "_grouped_mm", counting)
    layer = make_layer("softk", E=4, k=2, cf=1.0, D=8, F_=20)  # 32- and 80-byte rows: aligned
    x = torch.randn(16, 8)
    layer.backend = "grouped"
    y = layer(x)[0]
    assert len(calls) == 2  # up- and down-projection (float64, as in the reference tests, loops instead)
    layer.backend = "loop"
    torch.testing.assert_close(y, layer(x)[0], rtol=1e-5, atol=1e-6)
