"""moe_core.bench: its drop statistics are moe_core's own, its traffic count is right on a hand case,
its routing sources behave (skew drops more, dropless drops nothing, a checkpoint's router logits
are the model's, rebuilt from its stored config; a bad checkpoint fails in one line naming the file),
the CLI and the profiles refuse bad arguments before any work and writes its records, and the
join with Experiment A parses run records. CPU, float32; timings are run but never asserted."""
import json
import math

import pandas as pd
import pytest
import torch

from moe_core import MoEConfig, MoEFeedForward, TinyMoEModel, bench
from moe_core.bench import profile
from moe_core.data import DataConfig, load_data
from moe_core.train import TrainConfig, train

CKPT_E = 4  # experts of the self-built checkpoint; the CLI test asks for E=8 elsewhere to see the override


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A checkpoint.pt shaped like moe_core.train's ({"model", "config"}): the model built from its
    TrainConfig with the vocabulary of that config's data, untrained, so the test does not depend on training."""
    root = tmp_path_factory.mktemp("ckpt")
    config = {"dim": 32, "layers": 2, "heads": 4, "hidden": 48, "num_experts": CKPT_E, "top_k": 2,
              "router": "softk", "capacity_factor": 1.25, "corpus": "synthetic", "tokenizer": "char",
              "seq_len": 32, "cache_dir": str(root / "cache"), "data_seed": 0, "seed": 7}
    train_cfg = TrainConfig.from_dict(config)
    torch.manual_seed(0)
    model = TinyMoEModel(train_cfg.model_config(load_data(train_cfg.data_config()).vocab_size))
    path = root / "checkpoint.pt"
    torch.save({"model": model.state_dict(), "config": config, "step": 0}, path)
    return path, model, config


@pytest.mark.parametrize("router", ["softk", "topk_hard", "top1"])
@pytest.mark.parametrize("cf", [0.5, 1.0, None])
def test_capacity_metrics_equal_layer_stats(router, cf):
    torch.manual_seed(0)
    k = 1 if router == "top1" else 2
    cfg = MoEConfig(dim=16, hidden=24, num_experts=6, top_k=k, router=router, capacity_factor=cf,
                    router_init_std=1.0)  # large logits: unbalanced, so CF < 1.25 drops
    layer = MoEFeedForward(cfg)
    x_TD = torch.randn(96, 16)
    _, stats = layer(x_TD)
    got = bench.capacity_metrics(layer.router.logits(x_TD), cfg)
    for name in ("drop_rate", "token_drop_rate", "load_cv", "max_vio"):
        assert got[name] == pytest.approx(float(getattr(stats, name)), abs=1e-7), name
    routing, _ = bench.route_logits(layer.router.logits(x_TD), cfg)
    assert torch.equal(routing.keep_A, layer.router(x_TD, None)[0].keep_A)
    if cf == 0.5:
        assert got["drop_rate"] > 0


def test_dropless_drops_nothing_where_cf1_drops():
    logits_TE = bench.synthetic_logits(bench.RoutingSource.parse("skewed:2"), 1, 512, 8, seed=0)[0]
    dropless = bench.capacity_metrics(logits_TE, MoEConfig(dim=4, num_experts=8, top_k=2, capacity_factor=None))
    capped = bench.capacity_metrics(logits_TE, MoEConfig(dim=4, num_experts=8, top_k=2, capacity_factor=1.0))
    assert dropless["drop_rate"] == 0 and dropless["token_drop_rate"] == 0
    assert capped["drop_rate"] > 0.3


@pytest.mark.parametrize("k", [1, 2])
def test_skewed_drops_more_than_random_at_cf1(k):
    cfg = MoEConfig(dim=4, num_experts=8, top_k=k, capacity_factor=1.0)

    def mean_drop(spec):
        logits_NTE = bench.synthetic_logits(bench.RoutingSource.parse(spec), 3, 2048, 8, seed=0)
        return sum(bench.capacity_metrics(lg, cfg)["drop_rate"] for lg in logits_NTE) / 3

    random, skewed = mean_drop("random"), mean_drop("skewed:1.0")
    assert 0 < random < 0.1  # i.i.d. logits: only sampling noise overflows
    assert skewed > random + 0.2


def test_routing_source_specs():
    assert bench.RoutingSource.parse("skewed") == bench.RoutingSource("skewed", zipf_s=1.0)
    assert bench.RoutingSource.parse("skewed:0.5").name == "skewed:0.5"
    assert bench.RoutingSource.parse("checkpoint:a/b.pt").path == "a/b.pt"
    for bad in ("zipf", "skewed:x", "skewed:-1", "random:3"):
        with pytest.raises(ValueError, match="routing source"):
            bench.RoutingSource.parse(bad)


def test_dispatch_bytes_hand_case():
    """T=4 tokens, D=8, E=2, k=1, CF=1 -> C=2: tokens 0-2 pick expert 0 (token 2 dropped), token 3
    expert 1. Padded moves an [E*C=4, D] buffer: 2*(T + R)*D*4 bytes of activations = 512, plus
    the routing tensors read once: token, expert, slot (3 x 4 x int64 = 96), keep (4 x bool = 4),
    weight (4 x float32 = 16) = 116."""
    logits_TE = torch.tensor([[5.0, 0.0], [5.0, 0.0], [5.0, 0.0], [0.0, 5.0]])
    routing, _ = bench.route_logits(logits_TE, MoEConfig(dim=8, num_experts=2, top_k=1, capacity_factor=1.0))
    assert routing.keep_A.tolist() == [True, True, False, True]
    assert bench.routing_bytes(routing) == 116
    assert [bench.buffer_rows(routing, b) for b in ("padded", "einsum", "grouped", "loop")] == [4, 4, 4, 3]
    assert bench.dispatch_combine_bytes(4, 8, rows=4, elem_bytes=4, index_bytes=116) == 628


def test_timer_rotates_inputs_and_counts_calls():
    seen = []
    ms = bench.time_median_ms(seen.append, ["a", "b", "c"], torch.device("cpu"), warmup=2, repeats=20)
    assert ms >= 0 and len(seen) == 22
    assert seen[:5] == ["a", "b", "a", "b", "c"]  # warm-up, then the timed calls restart the rotation


def test_checkpoint_logits_are_the_models(checkpoint):
    path, model, config = checkpoint
    logits_LTE = bench.router_logits_from_checkpoint(path, 100)
    assert logits_LTE.shape == (2, 100, CKPT_E)
    # independent recomputation of layer 0 on the first validation window (which starts at token 0)
    data = load_data(DataConfig(corpus="synthetic", tokenizer="char", seq_len=32, cache_dir=config["cache_dir"]))
    idx_1S = torch.as_tensor(data.val_T[:32].astype("int64"))[None]
    with torch.no_grad():
        x = model.tok_emb(idx_1S) + model.pos_emb(torch.arange(32))
        block = model.blocks[0]
        h = x + block.attn(block.ln1(x))
        expected_SE = block.ffn.router.logits(block.ln2(h)[0])
    torch.testing.assert_close(logits_LTE[0, :32], expected_SE)
    with pytest.raises(ValueError, match="fewer than"):
        bench.router_logits_from_checkpoint(path, 10**7)


def test_checkpoint_written_by_train_loads_with_its_stored_config(tmp_path, monkeypatch):
    """A real training checkpoint (RNG states and all) loads with plain weights_only, its model and data
    rebuilt from the stored config (whose data cache is the default, relative to the working directory)."""
    monkeypatch.chdir(tmp_path)
    cfg = TrainConfig(dim=16, hidden=16, heads=2, layers=2, num_experts=4, top_k=2, router="softk", seq_len=16,
                      batch_size=2, steps=2, stop_after=1, eval_interval=1, eval_windows=2, synthetic_chars=20_000,
                      progress=False, out_dir="runs", experiment="x", run="r")
    path = train(cfg).run_dir / "checkpoint.pt"
    stored, _ = bench.read_checkpoint(path)
    assert stored.identity() == cfg.identity()
    logits_LTE = bench.router_logits_from_checkpoint(path, 40)
    assert logits_LTE.shape == (2, 40, 4) and torch.isfinite(logits_LTE).all()


@pytest.mark.parametrize("change, message", [
    (lambda state: state.pop("config"), "has no stored 'config'"),
    (lambda state: state["config"].update(experts_typo=3), "not a valid TrainConfig: unknown TrainConfig key"),
    (lambda state: state["config"].update(hidden=64), "weights do not fit the model of its stored config"),
    (lambda state: state["config"].update(router="hash"), "no MoE layer with a learned router"),
    (lambda state: state.update(hook=print), "it holds print, which is refused"),
])
def test_checkpoint_loader_refuses_in_one_line_naming_the_file(checkpoint, change, message, tmp_path):
    path, model, config = checkpoint
    state = {"model": model.state_dict(), "config": dict(config)}
    change(state)
    bad = tmp_path / "bad.pt"
    torch.save(state, bad)
    with pytest.raises(ValueError) as err:
        bench.router_logits_from_checkpoint(bad, 32)
    assert str(err.value).startswith(f"{bad}: ") and message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("args, message", [(["layer", "grouped", "8", "16"], "top_k=16 exceeds num_experts=8"),
                                           (["dispatch", "fused", "8", "2", "0"], "capacity_factor")])
def test_profile_refuses_a_bad_shape_before_any_work(args, message, capsys):
    assert profile.main(args) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and message in err


@pytest.mark.parametrize("args, message", [
    (["capacity", "--set", "sources=[random,bogus]"], "unknown routing source 'bogus'"),
    (["capacity", "--set", "capacity_factors=[1.0,0]"], "capacity_factor"),
    (["capacity", "--set", "top_k=[16]"], "top_k=16 exceeds num_experts"),
    (["capacity", "--set", "sources=[checkpoint]", "--checkpoint", "missing/checkpoint.pt"], "checkpoint not found"),
    (["capacity", "--set", "sources=[checkpoint]"], "needs a path"),
    (["all", "--set", "experts_typo=[8]"], "unknown key"),
    (["layer", "--set", "backends=[fast]"], "backends"),
    (["layer", "--set", "compile_modes=[fastest]"], "compile_modes"),
    (["layer", "--set", "dense_repeats=0"], "dense_repeats: must be an integer >= 1, got 0"),
])
def test_cli_bad_arguments_fail_in_one_line_before_any_work(args, message, tmp_path, capsys):
    out = tmp_path / "out"
    assert bench.main([*args, "--device", "cpu", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and message in err
    assert not out.exists()


def test_layer_bench_dense_is_the_median_of_fresh_dense_modules(tmp_path):
    shape = {"tokens": 64, "dim": 16, "hidden": 16, "experts": 4, "top_k": 2}
    cfg = bench.LayerBenchConfig(device="cpu", shapes=[shape], backends=["grouped"], warmup=1, dense_repeats=3)
    (row,) = bench.run_layer(cfg, tmp_path).to_dict("records")
    assert len(row["dense_ms_repeats"]) == 3 and row["dense_ms"] == sorted(row["dense_ms_repeats"])[1]
    assert row["moe_over_dense"] == row["moe_ms"] / row["dense_ms"]


def test_cli_small_writes_records(checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    shape = "{tokens: 128, dim: 16, hidden: 32, experts: 4, top_k: 2}"
    rc = bench.main(["all", "--small", "--device", "cpu", "--out", str(out), "--checkpoint", str(checkpoint[0]),
                     "--set", "sources=[random,checkpoint]", "--set", "experts=[8]", "--set", "top_k=[2]",
                     "--set", "capacity_factors=[1.0,null]", "--set", f"shapes=[{shape}]",
                     "--set", "backends=[padded,grouped]"])
    assert rc == 0
    stdout = capsys.readouterr().out
    assert "== capacity" in stdout and "== layer" in stdout
    rows = [json.loads(line) for line in (out / "capacity.jsonl").read_text().splitlines()]
    assert [(r["source"], r["num_experts"], r["cf_label"]) for r in rows] == [
        ("random", 8, "1.0"), ("random", 8, "dropless"), ("checkpoint", CKPT_E, "1.0"), ("checkpoint", CKPT_E, "dropless")]
    assert all(r["status"] == "ok" and r["dispatch_ms"] > 0 and r["layer_tokens_per_s"] > 0 for r in rows)
    assert rows[2]["logit_sets"] == 2  # one per MoE layer of the checkpoint
    assert all(r["drop_rate"] == 0 for r in rows if r["cf_label"] == "dropless")
    assert len(pd.read_csv(out / "capacity.csv")) == 4
    (layer_json,) = out.glob("layer_*.json")
    record = json.loads(layer_json.read_text())
    assert record["peak_flops"] is None and [r["backend"] for r in record["rows"]] == ["padded", "grouped"]
    assert [r["compile_mode"] for r in record["rows"]] == ["none", "none"]
    assert all(r["moe_over_dense"] > 0 and r["moe_train_flops"] > r["dense_train_flops"] for r in record["rows"])


def test_params_yaml_loads_and_small_sections_are_the_defaults(checkpoint):
    for name in bench.BENCHES:
        small = bench.load_config(name, small=True, device="cpu", overrides={})
        assert small == bench.BENCHES[name].config(device="cpu")
    grid = bench.load_config("capacity", small=False, device="cpu", overrides={"checkpoint": str(checkpoint[0])})
    assert (grid.tokens, grid.experts, grid.top_k) == (32768, [8, 64, 128], [1, 2, 4])
    assert grid.capacity_factors == [1.0, 1.1, 1.25, 1.5, 2.0, None]
    assert [s.name for s in grid.parsed_sources()] == ["random", "skewed:1", "checkpoint"]


@pytest.fixture
def fake_experiment_a_runs(tmp_path):
    """A tiny runs/experiment_a tree in the shape moe_core.train writes: a fixture of the join's
    parsing, not study results. Two ok runs, a dense baseline, a diverged run (left out of the join)
    and two broken run directories."""
    def run(name, config, summary):
        d = tmp_path / "experiment_a" / name
        d.mkdir(parents=True)
        if config is not None:
            (d / "config.json").write_text(json.dumps({"config": config, "seed": 0}))
        if summary is not None:
            (d / "summary.json").write_text(json.dumps(summary))
            (d / "metrics.jsonl").write_text(json.dumps({"step": 10, "tokens": 100,
                                                         "val_loss": summary["best_val_loss"]}) + "\n")

    base = {"num_experts": 8, "top_k": 2, "router": "softk", "ffn": "moe"}
    run("softk_cf1.0", {**base, "capacity_factor": 1.0},
        {"status": "ok", "best_val_loss": 1.0, "median_tokens_per_s": 1000.0})
    run("softk_dropless", {**base, "capacity_factor": None},
        {"status": "ok", "best_val_loss": 2.0, "median_tokens_per_s": 800.0})
    run("dense", {**base, "ffn": "dense", "capacity_factor": 1.25},
        {"status": "ok", "best_val_loss": 1.5, "median_tokens_per_s": 1200.0})
    run("diverged", {**base, "capacity_factor": 1.25},
        {"status": "diverged", "best_val_loss": 0.5, "median_tokens_per_s": 900.0})
    run("no_summary", {**base, "capacity_factor": 1.0}, None)
    (tmp_path / "experiment_a" / "unreadable").mkdir()
    (tmp_path / "experiment_a" / "unreadable" / "summary.json").write_text("{not json")
    (tmp_path / "experiment_a" / "unreadable" / "config.json").write_text("{}")
    return tmp_path


def test_join_with_training_parses_runs(fake_experiment_a_runs):
    bench_df = pd.DataFrame([
        {"source": "random", "num_experts": 8, "top_k": 2, "capacity_factor": 1.0, "drop_rate": 0.04,
         "token_drop_rate": 0.01, "dispatch_tokens_per_s": 1e6, "layer_tokens_per_s": 1e5},
        {"source": "random", "num_experts": 8, "top_k": 2, "capacity_factor": 1.0, "drop_rate": 0.06,
         "token_drop_rate": 0.03, "dispatch_tokens_per_s": 3e6, "layer_tokens_per_s": 3e5},
        {"source": "random", "num_experts": 8, "top_k": 2, "capacity_factor": float("nan"), "drop_rate": 0.0,
         "token_drop_rate": 0.0, "dispatch_tokens_per_s": 5e5, "layer_tokens_per_s": 5e4},
        {"source": "random", "num_experts": 64, "top_k": 2, "capacity_factor": 1.0, "drop_rate": 0.5,
         "token_drop_rate": 0.2, "dispatch_tokens_per_s": 1.0, "layer_tokens_per_s": 1.0},
    ])
    joined = bench.join_with_training(bench_df, fake_experiment_a_runs).set_index("run")
    assert list(joined.reset_index().columns) == bench.JOIN_COLUMNS
    assert sorted(joined.index) == ["dense", "softk_cf1.0", "softk_dropless"]
    cf1 = joined.loc["softk_cf1.0"]
    assert cf1.best_val_ppl == pytest.approx(math.e) and cf1.train_tokens_per_s == 1000.0
    assert cf1.drop_rate == pytest.approx(0.05) and cf1.layer_tokens_per_s == pytest.approx(2e5)  # repeats averaged
    dropless = joined.loc["softk_dropless"]
    assert dropless.cf_label == "dropless" and dropless.drop_rate == 0.0 and dropless.best_val_ppl == pytest.approx(math.e ** 2)
    assert joined.loc["dense"].router == "dense" and math.isnan(joined.loc["dense"].drop_rate)


def test_join_with_training_without_runs_is_empty_with_columns(tmp_path):
    empty = bench.join_with_training(pd.DataFrame(), tmp_path)
    assert empty.empty and list(empty.columns) == bench.JOIN_COLUMNS


def test_train_bench_runs_the_trainer_and_records_its_tokens_per_s(tmp_path):
    cfg = bench.load_config("train", small=True, device="cpu", overrides={"steps": 6})
    df = bench.run_train(cfg, tmp_path)
    assert list(df["backend"]) == ["padded", "grouped"] and (df["status"] == "ok").all()
    assert (df["tokens_per_s"] > 0).all()
    assert df["ms_per_step"].tolist() == pytest.approx((8 * 32 / df["tokens_per_s"] * 1e3).tolist())
    assert len((tmp_path / "train.jsonl").read_text().splitlines()) == 2
    routers = bench.load_config("train", small=True, device="cpu",
                                overrides={"routers": ["top1", "hash"], "backends": ["grouped"], "steps": 3})
    assert [(c.router, c.top_k) for c in routers.train_configs("x")] == [("top1", 1), ("hash", 2)]
    with pytest.raises(ValueError, match="TrainBenchConfig.*router"):
        bench.TrainBenchConfig(model={"router": "nope"})


def test_spread_is_the_cv_of_a_cell_over_bench_runs(tmp_path, capsys):
    from moe_core.analysis import spread

    cells = [("random", 8, 1, "1"), ("random", 8, 2, "1"), ("skewed:1", 8, 2, "1.25"), ("random", 64, 2, "1")]
    times = {"r1": [1.0, 2.0, 4.0, 8.0], "r2": [1.0, 2.2, 4.0, 12.0]}
    rows = pd.DataFrame([{"source": s, "num_experts": e, "top_k": k, "cf_label": cf, "status": "ok", "run_id": run,
                          "dispatch_ms": ms, "layer_ms": 2 * ms}
                         for run, per in times.items() for (s, e, k, cf), ms in zip(cells, per)])
    cv = spread.spread(rows, "capacity").set_index(["column", "num_experts", "top_k", "source"])["cv"]
    assert cv[("layer_ms", 8, 1, "random")] == 0
    assert cv[("dispatch_ms", 8, 2, "random")] == pytest.approx(pd.Series([2.0, 2.2]).std() / 2.1)
    assert cv[("dispatch_ms", 64, 2, "random")] == pytest.approx(pd.Series([8.0, 12.0]).std() / 10)
    table = spread.summary(spread.spread(rows, "capacity")).set_index(["column", "cells"])
    assert table.loc[("dispatch_ms", "all"), "cv_le_3pct"] == 2 and table.loc[("dispatch_ms", "q4"), "mean_min"] == 10
    assert table["over_host_median"].isna().all()  # no host time recorded
    rows["layer_host_ms"] = rows["layer_ms"] / 2  # every call took twice the host's issue time
    rows.loc[rows["num_experts"] == 64, "layer_host_ms"] = rows["layer_ms"]  # but the longest, at the host's pace
    table = spread.summary(spread.spread(rows, "capacity")).set_index(["column", "cells"])
    assert table.loc[("layer_ms", "q1"), "over_host_median"] == 2 and table.loc[("layer_ms", "q4"), "over_host_median"] == 1
    assert pd.isna(table.loc[("dispatch_ms", "all"), "over_host_median"])
    rows[rows["run_id"] == "r1"].to_csv(tmp_path / "capacity.csv", index=False)
    with pytest.raises(SystemExit, match="2"):
        spread.main([str(tmp_path)])
    (tmp_path / "other").mkdir()  # a second directory's run is pooled with the first's
    rows[rows["run_id"] == "r2"].to_csv(tmp_path / "other" / "capacity.csv", index=False)
    capsys.readouterr()
    assert spread.main([str(tmp_path), str(tmp_path / "other"), "--top", "0"]) == 0
    first = capsys.readouterr().out.splitlines()[1].split()  # dispatch_ms over all cells, as computed above
    assert first[:3] == ["dispatch_ms", "all", "4"] and first[7] == "2"  # n, ..., cv_le_3pct
    with pytest.raises(SystemExit, match="2"):
        spread.main([str(tmp_path), str(tmp_path / "none")])


def test_host_enqueue_time_is_the_hosts_time_per_call_from_an_idle_device(monkeypatch):
    import time

    from moe_core.bench import timing

    synced = []
    monkeypatch.setattr(timing, "sync", lambda device: synced.append(device))  # stands in for cuda.synchronize
    calls = []
    ms = timing.host_enqueue_ms(lambda x: calls.append(x) or time.sleep(0.004), [1, 2], torch.device("cuda"))
    assert 4 <= ms < 50 and calls == [1, 2, 1, 2, 1][:timing.HOST_PROBES]
    assert len(synced) == timing.HOST_PROBES + 1  # idle before every call, and at the end
    assert timing.host_enqueue_ms(lambda x: None, [1], torch.device("cpu")) is None
