"""TinyMoEModel and the FLOP counter."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from moe_core import ModelConfig, MoEConfig, TinyMoEModel
from moe_core.dispatch import Experts
from moe_core.flops import train_flops_per_token
from moe_core.routing import hash_table, mutual_information

V, S, D = 41, 16, 32


def model_cfg(router="softk", ffn="moe", **moe_kw):
    moe = MoEConfig(dim=D, hidden=48, num_experts=4, top_k=1 if router == "top1" else 2, router=router,
                    capacity_factor=moe_kw.pop("capacity_factor", 1.25), **moe_kw)
    return ModelConfig(vocab_size=V, seq_len=S, dim=D, layers=2, heads=4, moe=moe, ffn=ffn)


@pytest.mark.parametrize("router", ["top1", "topk_hard", "softk", "hash", "expert_choice"])
def test_forward_backward_reaches_every_router(router):
    torch.manual_seed(0)
    model = TinyMoEModel(model_cfg(router))
    idx = torch.randint(0, V, (3, S))
    out = model(idx, idx.roll(-1, 1))
    assert out.logits.shape == (3, S, V) and len(out.stats) == 2
    assert out.loss.item() == pytest.approx(torch.log(torch.tensor(float(V))).item(), rel=0.25)
    (out.loss + out.aux_loss + out.z_loss).backward()
    for layer in model.moe_layers():
        if router == "hash":
            assert layer.router.weight_ED is None
        else:
            assert layer.router.weight_ED.grad.abs().sum() > 0
        assert layer.experts.w1_EDF.grad.abs().sum() > 0
    assert model.tok_emb.weight.grad.abs().sum() > 0


def test_model_is_causal_for_token_choice_and_causal_ec_eval():
    for router, mode in (("softk", None), ("expert_choice", "causal"), ("expert_choice", "prefix")):
        torch.manual_seed(0)
        model = TinyMoEModel(model_cfg(router)).eval()
        if mode:
            model.set_expert_choice_eval(mode)
        idx = torch.randint(0, V, (2, S))
        changed = idx.clone()
        changed[:, -1] = (changed[:, -1] + 1) % V
        torch.testing.assert_close(model(idx).logits[:, :-1], model(changed).logits[:, :-1], rtol=0, atol=0)


def test_hash_layers_get_distinct_tables_and_vocab():
    model = TinyMoEModel(model_cfg("hash"))
    tables = [layer.router.hash_table_VK for layer in model.moe_layers()]
    assert tables[0].shape == (V, 2) and not torch.equal(tables[0], tables[1])
    assert torch.equal(tables[1], torch.as_tensor(hash_table(V, 4, 2, 1)))  # no seed: layer i draws seed 0 + i
    seeded = TinyMoEModel(model_cfg("hash", hash_seed=5)).moe_layers()[1].router.hash_table_VK
    assert torch.equal(seeded, torch.as_tensor(hash_table(V, 4, 2, 6)))


def test_frequency_hash_tables_are_built_from_the_given_counts():
    counts = torch.arange(V) ** 2
    cfg = model_cfg("hash", hash_balance="frequency", hash_seed=2)
    with pytest.raises(ValueError, match="token_counts"):
        TinyMoEModel(cfg)
    model = TinyMoEModel(cfg, token_counts=counts)
    for i, layer in enumerate(model.moe_layers()):
        want = hash_table(V, 4, 2, 2 + i, tuple(counts.tolist()))
        assert torch.equal(layer.router.hash_table_VK, torch.as_tensor(want))


def test_counting_assignments_collects_token_expert_pairs_inside_the_block_only():
    model = TinyMoEModel(model_cfg("hash")).eval()
    idx = torch.randint(0, V, (3, S))
    with model.counting_assignments() as counts_LVE:
        model(idx)
    model(idx)  # outside the block: not counted
    assert counts_LVE.shape == (2, V, 4) and counts_LVE.sum((1, 2)).tolist() == [3 * S * 2] * 2
    table = model.moe_layers()[0].router.hash_table_VK
    seen = idx.unique()
    assert (counts_LVE[0, seen].gather(1, table[seen]) > 0).all() and counts_LVE[0].sum() == counts_LVE[0, seen].sum()
    assert 0 < mutual_information(counts_LVE[0]) <= torch.log(torch.tensor(2.0)) + 1e-6  # ln(E/k), E=4, k=2


def test_dense_baseline_has_k_times_hidden_and_moe_every():
    dense = TinyMoEModel(model_cfg(ffn="dense"))
    assert dense.moe_layers() == []
    assert dense.blocks[0].ffn.w1_DF.shape == (D, 2 * 48)
    cfg = model_cfg()
    cfg.moe_every = 2
    mixed = TinyMoEModel(cfg)
    assert [type(b.ffn).__name__ for b in mixed.blocks] == ["DenseFeedForward", "MoEFeedForward"]
    assert isinstance(mixed.blocks[1].ffn.experts, Experts)


@pytest.mark.parametrize("router,ffn", [("softk", "moe"), ("hash", "moe"), ("softk", "dense")])
def test_flop_formula_matches_torch_flop_counter(router, ffn):
    """torch's FlopCounterMode counts every matmul of forward+backward; on CPU it does not see SDPA,
    so the attention-score term 3 * L * 4*S*D per token is added back by hand."""
    cfg = model_cfg(router, ffn, capacity_factor=None, backend="loop")  # loop + dropless: exactly K rows
    model = TinyMoEModel(cfg)
    idx = torch.randint(0, V, (3, S))
    with FlopCounterMode(display=False) as counter:
        out = model(idx, idx)
        (out.loss + out.aux_loss + out.z_loss).backward()
    tokens = idx.numel()
    sdpa = 3 * cfg.layers * 4 * S * D * tokens
    assert counter.get_total_flops() + sdpa == pytest.approx(train_flops_per_token(cfg) * tokens, rel=1e-9)


def test_dense_and_moe_active_flops_match():
    moe, dense = model_cfg("softk"), model_cfg("softk", "dense")
    router_flops = 3 * 2 * (2 * D * 4)
    assert train_flops_per_token(moe) - train_flops_per_token(dense) == pytest.approx(router_flops)


@pytest.mark.parametrize("kwargs,field", [
    (dict(heads=5), "heads"),
    (dict(layers=0), "layers"),
    (dict(ffn="sparse"), "ffn"),
    (dict(dropout=1.5), "dropout"),
    (dict(dim=64), "moe.dim"),
])
def test_invalid_model_config_names_field(kwargs, field):
    base = dict(vocab_size=V, seq_len=S, dim=D, layers=2, heads=4, moe=MoEConfig(dim=D, hidden=48))
    with pytest.raises(ValueError, match=rf"^{field}:"):
        ModelConfig(**{**base, **kwargs})


def test_sequence_longer_than_seq_len_rejected():
    model = TinyMoEModel(model_cfg())
    with pytest.raises(ValueError, match="seq_len"):
        model(torch.randint(0, V, (1, S + 1)))


def test_hash_model_config_does_not_mutate_the_callers_moe_config():
    moe = MoEConfig(dim=D, hidden=48, router="hash")
    cfg = ModelConfig(vocab_size=V, seq_len=S, dim=D, layers=2, heads=4, moe=moe)
    assert moe.hash_vocab_size is None and cfg.moe.hash_vocab_size == V
    assert ModelConfig(vocab_size=V + 1, seq_len=S, dim=D, layers=2, heads=4, moe=moe).moe.hash_vocab_size == V + 1
