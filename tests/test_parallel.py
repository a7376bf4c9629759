"""Expert parallelism (moe_core.parallel) on CPU with gloo, 2 and 4 spawned ranks.

Every rank runs ExpertParallelMoE on its own tokens; the reference is the single-process
MoEFeedForward holding all E experts with the same weights (its loop backend, the oracle), run on
each rank's tokens. Outputs, statistics and gradients (x, router, every expert) must agree in
float64. A 2-rank DDP run must train like one process on the concatenated batch. One spawn per
world size runs every case; the tests then read its results.

Widths D=5, F=7 are odd on purpose: float64 rows are then not 16-byte aligned, so the grouped
dispatch takes its per-segment matmul (torch._grouped_mm has no float64 kernel on CPU).
"""
import copy
import json
import math
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from moe_core.bench import expert_parallel as bench_ep
from moe_core.config import MoEConfig
from moe_core.moe import MoEFeedForward
from moe_core.parallel import ExpertParallelMoE, data_parallel

D, FH, E, K, T, V = 5, 7, 8, 2, 12, 50  # dim, expert hidden, experts, top-k, tokens per rank, vocab
WORLDS = (2, 4)
CASES = {  # name -> MoEConfig overrides; capacity cases must drop, except in eval
    "top1_cf1": {"router": "top1", "top_k": 1, "capacity_factor": 1.0},
    "top1_dropless": {"router": "top1", "top_k": 1, "capacity_factor": None},
    "topk_hard_cf1": {"router": "topk_hard", "capacity_factor": 1.0},
    "topk_hard_dropless": {"router": "topk_hard", "capacity_factor": None},
    "softk_cf1": {"router": "softk", "capacity_factor": 1.0},
    "softk_dropless": {"router": "softk", "capacity_factor": None},
    "softk_cf1_score_renorm_swiglu": {"router": "softk", "capacity_factor": 1.0, "drop_policy": "score",
                                      "renormalize": True, "activation": "swiglu"},
    "hash_cf1": {"router": "hash", "capacity_factor": 1.0},
    "hash_dropless": {"router": "hash", "capacity_factor": None},
    "expert_choice_cf0.25": {"router": "expert_choice", "capacity_factor": 0.25},  # 8 slots, 12 tokens
    "expert_choice_causal_eval": {"router": "expert_choice", "capacity_factor": 1.0},  # dropless token choice
}
BENCH_SETS = [f"--set={kv}" for kv in ("tokens=64", "dim=16", "hidden=16", "experts=[4]", "top_k=[2]",
                                        "capacity_factors=[1.0, null]", "sources=[skewed:1.0]", "warmup=1")]
TOL = 1e-10  # relative, float64 (the router's float32 logits are computed identically on both sides)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def _inputs(world: int, seed: int) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(world, T, D, generator=gen, dtype=torch.float64),
            torch.randn(world, T, D, generator=gen, dtype=torch.float64), torch.randint(V, (world, T), generator=gen))


def _run(layer, x_TD, dy_TD, ids_T) -> dict:
    """Output, stats and the gradients of y . dy + balance losses for x, the router and the experts."""
    x_TD = x_TD.clone().requires_grad_()
    y_TD, stats = layer(x_TD, ids_T)
    router, experts = list(layer.router.parameters()), list(layer.experts.parameters())
    dx_TD, *grads = torch.autograd.grad((y_TD * dy_TD).sum() + stats.aux_loss + stats.z_loss,
                                        [x_TD, *router, *experts])
    return {"y": y_TD, "dx": dx_TD, "router": grads[:len(router)], "experts": grads[len(router):], "stats": stats}


def _layer_case(name: str, rank: int, world: int) -> dict:
    cfg = MoEConfig(**{"dim": D, "hidden": FH, "num_experts": E, "top_k": K, "hash_vocab_size": V,
                       "router_init_std": 1.0, **CASES[name]})
    torch.manual_seed(0)
    dense = MoEFeedForward(cfg).double()
    dense.backend = "loop"
    ep = ExpertParallelMoE.from_layer(dense)
    if name.endswith("eval"):
        dense.eval(), ep.eval()
    x_WTD, dy_WTD, ids_WT = _inputs(world, seed=1)
    got = _run(ep, x_WTD[rank], dy_WTD[rank], ids_WT[rank])
    # reference: the whole layer on each rank's tokens; an expert's gradient sums over the ranks
    refs = [_run(dense, x_WTD[r], dy_WTD[r], ids_WT[r]) for r in range(world)]
    want = refs[rank]
    first, count = ep.experts.first_expert, ep.experts.num_local
    expert_grads = [sum(grads)[first:first + count] for grads in zip(*(ref["experts"] for ref in refs))]
    stat_names = ("aux_loss", "z_loss", "drop_rate", "token_drop_rate", "load_cv", "max_vio", "tokens_per_expert")
    return {
        "y": _rel(got["y"], want["y"]), "dx": _rel(got["dx"], want["dx"]),
        "router": max([_rel(g, w) for g, w in zip(got["router"], want["router"], strict=True)], default=0.0),
        "router_grad_norm": sum(float(g.norm()) for g in want["router"]),
        "experts": max(_rel(g, w) for g, w in zip(got["experts"], expert_grads, strict=True)),
        "stats": max(_rel(getattr(got["stats"], k), getattr(want["stats"], k)) for k in stat_names),
        "n_experts_checked": len(expert_grads),
        "drops": float(got["stats"].drop_rate + got["stats"].token_drop_rate),
    }


class _Tiny(torch.nn.Module):
    """Linear -> MoE (residual) -> Linear -> MSE + balance losses: replicated parameters around the experts."""

    def __init__(self, moe: torch.nn.Module):
        super().__init__()
        self.inp, self.moe, self.out = torch.nn.Linear(D, D), moe, torch.nn.Linear(D, D)

    def forward(self, x_TD: torch.Tensor, target_TD: torch.Tensor) -> torch.Tensor:
        h_TD = self.inp(x_TD)
        y_TD, stats = self.moe(h_TD)
        return F.mse_loss(self.out(h_TD + y_TD), target_TD) + stats.aux_loss + stats.z_loss


def _ddp_case(rank: int, world: int, steps: int = 3) -> dict:
    """DDP + expert parallel vs one process on the concatenated batch with the mean loss, routed
    in per-rank groups (each rank's tokens are one routing group: that is the layer's capacity)."""
    cfg = MoEConfig(dim=D, hidden=FH, num_experts=E, top_k=K, router="softk", capacity_factor=1.0,
                    router_init_std=1.0)
    torch.manual_seed(0)
    ref = _Tiny(MoEFeedForward(cfg)).double()
    model = copy.deepcopy(ref)
    model.moe = ExpertParallelMoE.from_layer(ref.moe)
    ddp = data_parallel(model)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (model, ref)]
    x_WTD, target_WTD, _ = _inputs(world, seed=2)
    start = copy.deepcopy(ref)
    errors = {"loss": 0.0}
    for step in range(steps):
        loss = ddp(x_WTD[rank], target_WTD[rank])
        loss.backward()
        ref_loss = sum(ref(x_WTD[r], target_WTD[r]) for r in range(world)) / world
        ref_loss.backward()
        dist.all_reduce(mean_loss := loss.detach().clone())
        errors["loss"] = max(errors["loss"], _rel(mean_loss / world, ref_loss.detach()))
        if step == 0:
            errors["grads"] = _param_error(model, ref, lambda p: p.grad)
        for opt in opts:
            opt.step()
            opt.zero_grad()
    errors["params"] = _param_error(model, ref, lambda p: p.detach())
    errors["moved"] = min(_rel(p, p0) for p, p0 in zip(ref.parameters(), start.parameters()))  # training did train
    return errors


def _param_error(model: _Tiny, ref: _Tiny, value) -> float:
    """Largest relative difference of ``value(p)`` over the parameters; this rank's experts
    against their slice of the reference's."""
    first, count = model.moe.experts.first_expert, model.moe.experts.num_local
    ref_params = dict(ref.named_parameters())
    errors = []
    for name, p in model.named_parameters():
        ref_name = name.replace("experts.local.", "experts.")
        ref_value = value(ref_params[ref_name])
        if ref_name != name:
            ref_value = ref_value[first:first + count]
        errors.append(_rel(value(p), ref_value))
    return max(errors)


def _worker(rank: int, world: int, tmp: str, port: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/init{world}", rank=rank, world_size=world)
    try:
        results = {name: _layer_case(name, rank, world) for name in CASES}
        if world == 2:
            results["ddp"] = _ddp_case(rank, world)
        try:
            ExpertParallelMoE(MoEConfig(dim=D, hidden=FH, num_experts=3 * world + 1, top_k=1))
        except ValueError as err:
            results["bad_split"] = str(err)
        gathered = [None] * world
        dist.all_gather_object(gathered, results)
        if rank == 0:
            Path(tmp, f"w{world}.json").write_text(json.dumps(gathered))
    finally:
        dist.destroy_process_group()
    if world == 2:  # the benchmark's command line, in the environment torchrun gives it
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                          LOCAL_RANK=str(rank))
        assert bench_ep.main(["--device", "cpu", "--out", f"{tmp}/bench", *BENCH_SETS]) == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def spawned(tmp_path_factory) -> dict:
    """world size -> each rank's results; "bench" -> the benchmark's output directory."""
    tmp = tmp_path_factory.mktemp("parallel")
    results = {"bench": tmp / "bench"}
    for world in WORLDS:
        torch.multiprocessing.spawn(_worker, args=(world, str(tmp), _free_port()), nprocs=world)
        results[world] = json.loads((tmp / f"w{world}.json").read_text())
    return results


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("case", CASES)
def test_expert_parallel_layer_equals_single_process(spawned, world, case):
    ranks = [r[case] for r in spawned[world]]
    for rank, errors in enumerate(ranks):
        assert max(errors[k] for k in ("y", "dx", "router", "experts", "stats")) < TOL, (rank, errors)
        assert errors["n_experts_checked"] == (3 if "swiglu" in case else 2)
        assert (errors["router_grad_norm"] > 0) == (CASES[case]["router"] != "hash")
    if CASES[case]["capacity_factor"] is not None and not case.endswith("eval"):
        assert sum(r["drops"] for r in ranks) > 0, "this capacity should drop here"
    else:
        assert all(r["drops"] == 0 for r in ranks)


@pytest.mark.parametrize("world", WORLDS)
def test_experts_must_split_evenly(spawned, world):
    assert all(r["bad_split"] == f"num_experts: {3 * world + 1} experts do not split evenly over {world} ranks"
               for r in spawned[world])


def test_ddp_expert_parallel_trains_like_one_process(spawned):
    for rank, errors in enumerate(r["ddp"] for r in spawned[2]):
        assert errors["loss"] < 1e-9 and errors["grads"] < 1e-9 and errors["params"] < 1e-9, (rank, errors)
        assert errors["moved"] > 1e-3


def test_benchmark_runs_on_gloo_and_records(spawned):
    out = spawned["bench"]
    rows = [json.loads(line) for line in (out / "expert_parallel.jsonl").read_text().splitlines()]
    assert [r["cf_label"] for r in rows] == ["1.0", "dropless"] and len(list(out.glob("expert_parallel_*.json"))) == 1
    assert (out / "expert_parallel.csv").read_text().count("\n") == 3
    capped, dropless = rows
    # capacity: two exchanges of the [E, C, D] float32 buffer, C = ceil(1.0 * 64 * 2 / 4) = 32
    assert capped["capacity"] == 32 and capped["a2a_bytes"] == capped["a2a_bytes_max"] == 2 * 4 * 32 * 16 * 4
    assert capped["ref_bytes"] == capped["a2a_bytes"] / 2
    assert capped["drop_rate"] > 0 and dropless["drop_rate"] == 0  # skewed routing overflows C
    # dropless: every assignment (64 * 2 rows of 16 floats) out and back, plus the split sizes
    assert dropless["a2a_bytes"] == 2 * 64 * 2 * 16 * 4 + 4 * 8
    for row in rows:
        assert row["world_size"] == 2 and row["backend"] == "gloo" and row["device_names"] == "cpu; cpu"
        assert row["repeats"] == 20 and row["torch"] == torch.__version__ and row["commit"]
        for mode in ("fwd", "fwd_bwd"):
            assert 0 < row[f"{mode}_a2a_ms"] < row[f"{mode}_ms"] and 0 < row[f"{mode}_a2a_share"] < 1
            assert math.isfinite(row[f"{mode}_ms_cv"])
        assert row["a2a_busbw_gbps"] > 0 and row["ref_ms"] > 0 and row["a2a_over_ref"] > 0


def test_benchmark_rejects_bad_arguments_before_work(monkeypatch, capsys):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert bench_ep.main(["--device", "cpu"]) == 2
    assert "world: run under torchrun" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert bench_ep.main(["--device", "cpu", "--set", "experts=[8]", "--set", "bogus=1"]) == 2
    assert "--set: unknown key(s) ['bogus']" in capsys.readouterr().err
    assert bench_ep.main(["--device", "cpu", "--set", "capacity_factors=[0]"]) == 2
    assert "capacity_factor: must be > 0" in capsys.readouterr().err
