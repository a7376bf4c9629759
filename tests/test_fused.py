"""The fused backend: its Triton kernels (under Triton's interpreter on CPU, compiled on a GPU) and its
PyTorch statement compute the layer's math, outputs and gradients (x, expert weights, router), for
every router, with and without capacity, GELU and SwiGLU.

On CPU the kernels run interpreted in float32 and float64 at shapes that span several row, column
and reduction tiles (so the masks and tile seams are exercised); tests/test_moe_core.py holds every
backend, this one included, to the per-token reference over all its routing cases. The tests marked
for CUDA (bf16 tolerance, real sizes, speed-relevant shapes) run on the GPU: `pytest -k fused`.
"""
import json

import pytest
import torch
from test_moe_core import VOCAB, outputs_and_grads

from moe_core import ROUTERS, MoEConfig, MoEFeedForward, bench
from moe_core.dispatch import BACKEND_FNS
from moe_core.fused import HAS_TRITON, kernel_ops, make_plan, ops_torch, run_fused
from moe_core.reference import reference_forward

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
needs_interpreter = pytest.mark.skipif(
    CUDA or not HAS_TRITON or kernel_ops(torch.device("cpu"), torch.float32) is ops_torch,
    reason="the kernels run on CPU only under Triton's interpreter (triton missing, or imported before "
           "moe_core without TRITON_INTERPRET=1)")
CASES = [(router, cf, act) for router in ROUTERS for cf in (1.0, None) for act in ("gelu", "swiglu")
         if not (router == "expert_choice" and cf is None)]


def fused_layer(router, cf, activation, *, T=40, D=40, F=36, E=4, k=2, dtype=torch.float32, device="cpu", seed=0,
                **kw):
    torch.manual_seed(seed)
    cfg = MoEConfig(dim=D, hidden=F, num_experts=E, top_k=1 if router == "top1" else k, router=router,
                    capacity_factor=cf, activation=activation, hash_vocab_size=VOCAB, router_init_std=1.0, **kw)
    layer = MoEFeedForward(cfg).to(device=device, dtype=dtype)
    x = torch.randn(T, D, dtype=dtype, device=device)
    ids = torch.randint(0, VOCAB, (T,), device=device)
    return layer, x, ids


def with_backend(layer, ids, fn):
    """forward(x) through the layer's router and ``fn`` as its dispatch backend."""
    def forward(x):
        routing, _, _ = layer.router(x.reshape(-1, layer.cfg.dim), ids)
        return fn(x, routing, layer.experts)
    return forward


# How the backend can run: (pregather, epilogue): the gathers once before the GEMMs or in their loads;
# the activation (and its gradient) in the GEMMs' epilogues or in passes of their own.
WAYS = [(True, True), (True, False), (False, True), (False, False)]


def fused_with(ops, pregather=True, epilogue=True):
    return lambda x, routing, experts: run_fused(x, routing, experts, ops, pregather, epilogue)


def assert_all_close(got, want, rtol, atol, label):
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=rtol, atol=atol, msg=f"{label} {name}")


@pytest.mark.skipif(CUDA or not HAS_TRITON, reason="triton is not installed (or there is a GPU)")
def test_cpu_runs_the_triton_kernels_interpreted():
    """Where triton is installed and there is no GPU, the backend runs the kernels, not its PyTorch statement
    (so the interpreted tests below cannot skip unnoticed)."""
    assert kernel_ops(torch.device("cpu"), torch.float64) is not ops_torch
    assert kernel_ops(torch.device("cpu"), torch.bfloat16) is ops_torch  # the interpreter's tl.dot mishandles bf16


@needs_interpreter
@pytest.mark.parametrize("router,cf,activation", CASES)
def test_kernels_match_reference_float64(router, cf, activation):
    """The interpreted kernels, the PyTorch statement and the loop backend equal the per-token
    reference in float64 (outputs and every gradient), and each other to float64 rounding; with the
    gathers done once before the GEMMs (the default) or inside their loads, the activation in the GEMMs'
    epilogues or apart."""
    layer, x, ids = fused_layer(router, cf, activation, dtype=torch.float64)
    if cf is not None and router != "expert_choice":
        assert layer(x, ids)[1].drop_rate > 0, "the case must drop something"
    want = outputs_and_grads(layer, x, lambda v: reference_forward(layer, v, ids))
    loop = outputs_and_grads(layer, x, with_backend(layer, ids, BACKEND_FNS["loop"]))
    for label, ops in (("kernels", kernel_ops(x.device, x.dtype)), ("torch", ops_torch)):
        for way in WAYS:
            got = outputs_and_grads(layer, x, with_backend(layer, ids, fused_with(ops, *way)))
            assert_all_close(got, want, 1e-5, 1e-5, f"{label} (pregather, epilogue)={way}")  # float32 gates
            assert_all_close(got, loop, 1e-12, 1e-12, f"{label} (pregather, epilogue)={way}")


@needs_interpreter
@pytest.mark.parametrize("router,cf,activation", [("softk", 1.0, "gelu"), ("topk_hard", None, "swiglu")])
def test_persistent_gemms_match_reference_float64(router, cf, activation, monkeypatch):
    """Where K is a multiple of the reduction tile (D = 64, F = 96 here) the GEMMs that read plain rows run
    persistent (three programs looping over the tiles) and read their operands through tensor descriptors,
    the weights stacked as [E*K, J] or, transposed, as [E*J, K]: equal to the per-token reference in
    float64 and to the one-program-per-tile kernels, with the activation apart or in the epilogues."""
    from moe_core.fused import ops_triton
    layer, x, ids = fused_layer(router, cf, activation, T=40, D=64, F=96, dtype=torch.float64)
    ex = layer.experts
    flags = [ops_triton.operands([x], [w])[2] for w in (ex.w1_EDF, ex.w2_EFD.transpose(1, 2))]
    assert [(f["PERSISTENT"], f["B_T"]) for f in flags] == [(True, False), (True, True)]
    want = outputs_and_grads(layer, x, lambda v: reference_forward(layer, v, ids))
    for epilogue in (False, True):
        got = outputs_and_grads(layer, x, with_backend(layer, ids, fused_with(ops_triton, True, epilogue)))
        assert_all_close(got, want, 1e-5, 1e-5, f"persistent, epilogue={epilogue}")  # float32 gates
        with monkeypatch.context() as patch:
            patch.setattr(ops_triton, "PERSISTENT", False)
            tiled = outputs_and_grads(layer, x, with_backend(layer, ids, fused_with(ops_triton, True, epilogue)))
        assert_all_close(got, tiled, 1e-12, 1e-12, f"persistent vs per tile, epilogue={epilogue}")


@needs_interpreter
@pytest.mark.parametrize("router,cf,activation", [c for c in CASES if c[0] in ("softk", "expert_choice", "hash")])
def test_kernels_match_loop_and_grouped_float32(router, cf, activation):
    layer, x, ids = fused_layer(router, cf, activation, T=48, seed=1)
    got = outputs_and_grads(layer, x, with_backend(layer, ids, BACKEND_FNS["fused"]))
    for backend in ("loop", "grouped"):
        want = outputs_and_grads(layer, x, with_backend(layer, ids, BACKEND_FNS[backend]))
        assert_all_close(got, want, 1e-5, 1e-5, backend)


@pytest.mark.parametrize("router", ["softk", "expert_choice"])
def test_plan_holds_each_kept_assignment_once_sorted_by_expert(router):
    """Kept assignments get rows expert by expert (capacity saves compute: a dropped one gets none), and
    the row tiles cover every expert's rows exactly once. Expert choice drops only in its prefix rule."""
    layer, x, _ = fused_layer(router, 0.75, "gelu", T=36, ec_eval="prefix")
    routing, _, _ = layer.train(router == "softk").router(x, None, 12)  # 3 sequences of 12
    plan = make_plan(routing, block_rows=4)
    kept = routing.keep_A.nonzero().squeeze(-1)
    n_kept = int(plan.ends_E[-1])
    assert n_kept == kept.numel() < routing.keep_A.numel()
    assert torch.equal(plan.row_A[~routing.keep_A], torch.full_like(plan.row_A[~routing.keep_A], plan.row_A.numel()))
    assert torch.equal(torch.sort(plan.row_A[kept]).values, torch.arange(n_kept))
    assert torch.equal(plan.assign_N[plan.row_A[kept]], kept)
    assert torch.equal(routing.expert_A[plan.assign_N[:n_kept]], torch.sort(routing.expert_A[kept]).values)
    covered = torch.zeros(n_kept, dtype=torch.long)
    for e, row in zip(plan.tile_expert_M.tolist(), plan.tile_row_M.tolist()):
        if e < routing.num_experts:
            covered[row:min(row + 4, int(plan.ends_E[e]))] += 1
    assert torch.equal(covered, torch.ones_like(covered))


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_fused_is_bitwise_deterministic_and_a_dropped_token_leaves_as_zero(activation):
    def run():
        layer, x, _ = fused_layer("softk", 0.5, activation, seed=3)
        layer.backend = "fused"
        x.requires_grad_(True)
        y, stats = layer(x)
        y.square().sum().backward()
        return y, x.grad, [p.grad for p in layer.parameters()], layer, x

    (y1, g1, p1, layer, x), (y2, g2, p2, _, _) = run(), run()
    assert torch.equal(y1, y2) and torch.equal(g1, g2) and all(torch.equal(a, b) for a, b in zip(p1, p2))
    routing, _, _ = layer.router(x, None)
    dropped_T = ~routing.keep_A.view(-1, layer.cfg.top_k).any(-1)
    assert dropped_T.any() and torch.equal(y1[dropped_T], torch.zeros_like(y1[dropped_T]))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_fused_under_torch_compile_is_one_graph_and_equals_eager(device, activation):
    """The fused steps are custom ops: torch.compile keeps the whole layer in one graph (fullgraph
    raises on a graph break), forward and backward, with the eager results; the op's stand-in outputs
    (GELU has no g) match the real ones (torch.library.opcheck, both ops)."""
    from moe_core.fused import function
    layer, x, _ = fused_layer("softk", 1.25, activation, T=24, D=16, F=24, device=device)
    routing = layer.router(x, None)[0]
    for pregather, epilogue in WAYS:
        args = function.op_args(x.clone().requires_grad_(True), routing, layer.experts, None, pregather, epilogue)
        torch.library.opcheck(function.fused_forward, args)
        x_TD, weight_A, w1, w3, w2, plan_tensors, block_rows, ops_name, _, _ = args
        y, h, g, a, o, xs = (t.detach() for t in function.fused_forward(*args))
        weights = [w.detach() if w is not None else None for w in (weight_A, w1, w3, w2)]  # no double backward
        torch.library.opcheck(function.fused_backward, (torch.randn_like(y), xs if pregather else x_TD.detach(),
                                                        *weights, h, g, a, o, plan_tensors, block_rows, ops_name,
                                                        pregather, epilogue,
                                                        [True, True, True, w3 is not None, True]))
    layer.backend = "fused"
    eager = outputs_and_grads(layer, x, lambda v: layer(v)[0])
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True)
    assert_all_close(outputs_and_grads(layer, x, lambda v: compiled(v)[0]), eager, 1e-5, 1e-6, "compiled")


# -- on a GPU: compiled kernels, bf16, sizes where the tiles are full ------------------------------------------
def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@needs_cuda
@pytest.mark.parametrize("router,cf,activation", CASES)
def test_fused_cuda_float32_matches_loop(router, cf, activation):
    """Every way: the gathers once before the GEMMs or in their loads, the activation in the epilogues or apart."""
    layer, x, ids = fused_layer(router, cf, activation, T=1024, D=256, F=384, E=8, device="cuda")
    want = outputs_and_grads(layer, x, with_backend(layer, ids, BACKEND_FNS["loop"]))
    for way in WAYS:
        got = outputs_and_grads(layer, x, with_backend(layer, ids, fused_with(None, *way)))
        for name in want:  # tl.dot in IEEE float32 unless torch allows TF32
            err = rel_err(got[name], want[name])
            assert err < 1e-4, f"(pregather, epilogue)={way} {name}: {err:.2e}"


@needs_cuda
@pytest.mark.parametrize("router,cf,activation", CASES)
def test_fused_cuda_bf16_autocast_within_tolerance_of_float64(router, cf, activation):
    """bf16 under autocast (the training dtype) against the float64 loop backend on the same routing:
    outputs and gradients within 2e-2 relative (the tolerance test_gpu.py holds every backend to)."""
    layer, x, ids = fused_layer(router, cf, activation, T=4096, D=512, F=1024, E=8, device="cuda")
    with torch.no_grad():  # one routing read by both graphs; the router's gradient is tested in float32
        routing, _, _ = layer.router(x, ids)
    x64 = x.double().requires_grad_(True)
    experts64 = MoEFeedForward(layer.cfg).cuda().double().experts
    experts64.load_state_dict(layer.experts.state_dict())
    dy = torch.randn_like(x)
    y64 = BACKEND_FNS["loop"](x64, routing, experts64)
    want = torch.autograd.grad(y64, [x64, *experts64.parameters()], dy.double())
    x32 = x.clone().requires_grad_(True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = BACKEND_FNS["fused"](x32, routing, layer.experts)
    got = torch.autograd.grad(y, [x32, *layer.experts.parameters()], dy.to(y.dtype))
    assert y.dtype == torch.bfloat16 and rel_err(y, y64) < 2e-2, f"y: {rel_err(y, y64):.2e}"
    for g, w in zip(got, want):
        assert rel_err(g, w) < 2e-2, f"grad: {rel_err(g, w):.2e}"


@needs_cuda
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
@pytest.mark.parametrize("E,k,F,cf", [(8, 2, 4096, 1.25), (64, 8, 1024, None)])
def test_fused_cuda_bf16_at_bench_shapes_matches_grouped_and_is_deterministic(activation, E, k, F, cf):
    """The layer bench's shapes (T=16k here, to spare memory): fused equals grouped to bf16 rounding,
    and two runs are bitwise equal."""
    layer, x, _ = fused_layer("softk", cf, activation, T=16384, D=1024, F=F, E=E, k=k, device="cuda",
                              dtype=torch.bfloat16)
    dy = torch.randn_like(x)

    def run(backend):
        layer.backend = backend
        xg = x.clone().requires_grad_(True)
        y, _ = layer(xg)
        return [y, *torch.autograd.grad(y, [xg, *layer.parameters()], dy)]

    first, again, grouped = run("fused"), run("fused"), run("grouped")
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    for a, b in zip(first, grouped):
        assert rel_err(a, b) < 2e-2, f"{rel_err(a, b):.2e}"


@pytest.mark.parametrize("router,cf", [("softk", 0.75), ("expert_choice", 1.0), ("topk_hard", None)])
def test_fused_dispatch_combine_equals_the_loop_backend_with_identity_experts(router, cf):
    """The capacity bench's dispatch cell for fused (its gather and combine kernels, no GEMMs) moves
    the same rows as the loop backend with identity experts, dropped assignments included."""
    from moe_core.bench.capacity import IdentityExperts
    from moe_core.fused import dispatch_combine
    layer, x, _ = fused_layer(router, cf, "gelu", T=40, D=40)
    with torch.no_grad():
        routing, _, _ = layer.router(x, None)
        want = BACKEND_FNS["loop"](x, routing, IdentityExperts())
        torch.testing.assert_close(dispatch_combine(x, routing), want, rtol=1e-6, atol=1e-6)
    assert router != "softk" or not bool(routing.keep_A.all()), "CF 0.75 must drop"


# -- the layer bench's fused and liger columns ----------------------------------------------------------------
def test_layer_bench_times_fused_and_notes_a_missing_liger_column(tmp_path, capsys):
    shape = {"tokens": 32, "dim": 16, "hidden": 16, "experts": 4, "top_k": 2, "activation": "swiglu",
             "capacity_factor": None}
    cfg = bench.LayerBenchConfig(device="cpu", shapes=[shape], backends=["fused", "liger"], warmup=1)
    df = bench.run_layer(cfg, tmp_path)
    fused, liger = df.to_dict("records")
    assert fused["status"] == "ok" and fused["moe_ms"] > 0 and fused["activation"] == "swiglu"
    assert liger["status"] == "unavailable" and liger["note"] == "liger-kernel's fused MoE needs CUDA"
    assert "no liger column at E=4 k=2 (none): liger-kernel's fused MoE needs CUDA" in capsys.readouterr().out


@pytest.mark.parametrize("setting", ["fused_epilogue", "fused_persistent"])
def test_layer_bench_times_the_fused_backends_other_ways(setting, tmp_path, monkeypatch):
    """``fused_epilogue: true`` runs the fused backend with the activation in its GEMMs' epilogues (by
    default: passes), ``fused_persistent: false`` its GEMMs one program per tile (by default: persistent
    where they can); neither setting outlives the bench."""
    from moe_core.fused import function
    if setting == "fused_persistent" and not HAS_TRITON:
        pytest.skip("triton is not installed")
    module, name = (function, "EPILOGUE") if setting == "fused_epilogue" else (function.ops_triton, "PERSISTENT")
    default, seen = getattr(module, name), []
    real = function.fused_forward
    monkeypatch.setattr(function, "fused_forward", lambda *args: seen.append(getattr(module, name)) or real(*args))
    # one call per timing instead of 3 warm-ups and 20 timed calls: the kernels run interpreted here
    monkeypatch.setattr(bench.layer, "time_median_ms", lambda fn, inputs, device, **_: fn(inputs[0]) or 1.0)
    shape = {"tokens": 32, "dim": 16, "hidden": 16, "experts": 4, "top_k": 2}
    for on in (True, False):
        cfg = bench.LayerBenchConfig(device="cpu", shapes=[shape], backends=["fused"], warmup=1, **{setting: on})
        assert bench.run_layer(cfg, tmp_path).loc[0, "status"] == "ok"
        assert seen and set(seen) == {on}
        seen.clear()
    assert getattr(module, name) is default


@pytest.mark.parametrize("config,kwargs,message", [
    ("LayerBenchConfig", {"backends": ["fused", "megablocks"]}, "LayerBenchConfig.backends: unknown ['megablocks']"),
    ("LayerBenchConfig", {"fused_epilogue": "yes"}, "LayerBenchConfig.fused_epilogue: must be true or false"),
    ("LayerBenchConfig", {"fused_persistent": 1}, "LayerBenchConfig.fused_persistent: must be true or false"),
    ("LayerBenchConfig", {"shapes": [{"tokens": 8, "dim": 8, "hidden": 8, "experts": 2, "top_k": 1, "act": "gelu"}]},
     "LayerBenchConfig.shapes: each shape maps"),
    ("LayerBenchConfig", {"shapes": [{"tokens": 8, "dim": 8, "hidden": 8, "experts": 2, "top_k": 1,
                                      "activation": "relu"}]}, "LayerBenchConfig.activation: unknown 'relu'"),
    ("CapacityBenchConfig", {"backend": "fuse"}, "CapacityBenchConfig.backend: unknown 'fuse'"),
    ("CapacityBenchConfig", {"host_ahead": "yes"}, "CapacityBenchConfig.host_ahead: must be true or false, got 'yes'"),
])
def test_bench_configs_name_the_bad_field(config, kwargs, message):
    with pytest.raises(ValueError) as err:
        getattr(bench, config)(device="cpu", **kwargs)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


# -- the tile bench (CUDA to time; its plumbing is checked here) --------------------------------------------
@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_fixed_tiles_launches_one_configuration_and_restores_the_autotuned_lists():
    import triton

    from moe_core.fused import ops_triton
    saved = {name: getattr(ops_triton, name) for name in ops_triton._LAUNCHERS}
    gemm = triton.Config({"BN": 64, "BK": 32}, num_warps=4, num_stages=2)
    tn = triton.Config({"BI": 64, "BJ": 64, "BR": 32}, num_warps=4, num_stages=2)
    with pytest.raises(RuntimeError, match="inside"), ops_triton.fixed_tiles(gemm, tn):
        for name in ops_triton._LAUNCHERS:
            (config,) = getattr(ops_triton, name).configs  # a GEMM's also sets its descriptors' block shapes
            assert config is tn if name == "_TN" else (config.kwargs, config.num_warps, config.num_stages,
                                                       config.pre_hook) == (gemm.kwargs, 4, 2, ops_triton._set_blocks)
        raise RuntimeError("inside")
    assert {name: getattr(ops_triton, name) for name in ops_triton._LAUNCHERS} == saved


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_tile_bench_gemms_have_the_fused_shapes_and_count_kept_rows(activation):
    from moe_core.bench import fused_tiles
    layer, x, _ = fused_layer("topk_hard", 1.0, activation, T=64, D=32, F=24, E=4, k=2)
    with torch.no_grad():
        calls = fused_tiles.gemms(ops_torch, layer, x, block_rows=16)
        kept = int(layer.router(x, None, x.shape[0])[0].keep_A.sum())
    assert 0 < kept < 64 * 2  # CF 1 drops some
    products = 2 if activation == "swiglu" else 1
    want = {"up": products, "down": 1, "act_grad": 1, "dx": products, "dw1": 1, "dw2": 1}
    want.update({f"{name}_pre": want[name] for name in ("up", "act_grad", "dw1", "dw2")}, gather_x=0, gather_dy=0,
                up_gemm_only=1, act_grad_gemm_only=1, up_apart=products, act_grad_apart=1, act=0, act_backward=0)
    assert {name: flops / (2 * kept * 32 * 24) for name, (_, flops) in calls.items()} == want
    steps = {step for steps in fused_tiles.STEPS.values() for step in steps}
    assert steps == set(want) - {"up_gemm_only", "act_grad_gemm_only", "act", "act_backward"}
    assert calls["up_gemm_only"][0]().shape == calls["act_grad_gemm_only"][0]().shape == (64 * 2, 24)
    # the activation apart: the same a and dh as in the epilogues
    torch.testing.assert_close(calls["up_apart"][0](), calls["up_pre"][0]()[2])
    torch.testing.assert_close(calls["act_grad_apart"][0](), calls["act_grad_pre"][0]())
    for name in ("dw1", "dw1_pre"):
        assert calls[name][0]().shape == (4, 32, 24) and calls[name.replace("1", "2")][0]().shape == (4, 24, 32)
    assert calls["down"][0]().shape == calls["dx"][0]().shape == calls["gather_dy"][0]().shape == (64 * 2, 32)
    assert calls["up"][0]()[0].shape == calls["up_pre"][0]()[0].shape == (64 * 2, 24)


@pytest.mark.skipif(CUDA, reason="checks the message a machine without CUDA gets")
def test_tile_bench_without_cuda_says_so_in_one_line(capsys):
    from moe_core.bench import fused_tiles
    assert fused_tiles.main([]) == 2
    assert capsys.readouterr().err.strip() == "fused_tiles: needs CUDA (the fused kernels compile for a GPU only)"


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_tile_bench_autotuned_tiles_are_the_autotune_lists():
    from moe_core.bench import fused_tiles
    from moe_core.fused import ops_triton
    gemm, tn = fused_tiles.autotuned_tiles()
    assert len(gemm) == len(ops_triton._GEMM_CONFIGS) and len(tn) == len(ops_triton._TN_CONFIGS)
    # in the bench's own tuple order: every autotuned tile is one of the bench's full list
    assert set(gemm) <= set(fused_tiles.GEMM_TILES) and set(tn) <= set(fused_tiles.TN_TILES)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_autotune_prunes_wide_tiles_for_small_problems_and_four_byte_operands():
    import triton

    from moe_core.fused import ops_triton
    gemm, tn = ops_triton._GEMM_CONFIGS, ops_triton._TN_CONFIGS
    bf16, fp32 = torch.empty(2, dtype=torch.bfloat16), torch.empty(2)
    assert ops_triton.prune_tiles(gemm, {"x_ptr": bf16, "F": 4096}) == gemm
    narrow = ops_triton.prune_tiles(gemm, {"a1_ptr": bf16, "N": 100})  # 128 columns at most
    assert narrow and {c.kwargs["BN"] for c in narrow} == {128}
    assert ops_triton.prune_tiles(gemm, {"a1_ptr": bf16, "N": 8}) == gemm[-1:]  # nothing fits: the narrowest
    assert ops_triton.prune_tiles(tn, {"left_ptr": bf16, "I": 1024, "J": 512}) == tn
    (small,) = ops_triton.prune_tiles(gemm, {"x_ptr": fp32, "F": 4096})
    assert isinstance(small, triton.Config) and small.kwargs == {"BN": 64, "BK": 32}
    assert ops_triton.prune_tiles(tn, {"left_ptr": fp32, "I": 64, "J": 64})[0].kwargs["BR"] == 32


def test_tile_bench_compare_is_the_after_over_before_time_of_configurations_timed_in_both(tmp_path, capsys):
    from moe_core.bench import fused_tiles
    rows = {"before": [("up", "a", 2.0), ("up", "b", 4.0), ("up", "c", 1.0), ("dw1", "a", 1.0)],
            "after": [("up", "a", 1.0), ("up", "b", 3.0), ("dw1", "a", 1.5), ("dw1", "z", 9.0)]}
    for name, entries in rows.items():
        with open(tmp_path / f"{name}.jsonl", "w") as f:
            for gemm, tiles, ms in entries:
                f.write(json.dumps({"shape": "s", "gemm": gemm, "tiles": tiles, "ms": ms}) + "\n")
            f.write(json.dumps({"shape": "s", "gemm": "up", "tiles": "x", "error": "OutOfResources"}) + "\n")
    table = fused_tiles.compare(tmp_path / "before.jsonl", tmp_path / "after.jsonl").set_index("gemm")
    assert table.loc["up", "count"] == 2 and table.loc["up", "median"] == pytest.approx((0.5 + 0.75) / 2)
    assert table.loc["dw1", "count"] == 1 and table.loc["dw1", "median"] == 1.5
    assert fused_tiles.main(["--compare", str(tmp_path / "before.jsonl"), str(tmp_path / "none.jsonl")]) == 2
    assert capsys.readouterr().err.strip().endswith("no such file: " + str(tmp_path / "none.jsonl"))


def test_tile_bench_best_adds_each_steps_best_time_for_both_ways_of_gathering(capsys):
    from moe_core.bench import fused_tiles
    rows = [{"shape": "s", "gemm": g, "tiles": tiles, "ms": ms, "tflops": 1.0}
            for g in ("up", "down", "act_grad", "dx", "dw1", "dw2", "up_pre", "act_grad_pre", "dw1_pre", "dw2_pre")
            for tiles, ms in (("a", 2.0), ("b", 1.0))]
    rows += [{"shape": "s", "gemm": g, "tiles": "-", "ms": 0.25, "tflops": 0.0} for g in ("gather_x", "gather_dy")]
    rows += [{"shape": "t", "gemm": "up", "tiles": "a", "ms": 5.0, "tflops": 1.0},  # a shape missing steps: no sum
             {"shape": "s", "gemm": "up", "tiles": "c", "error": "OutOfResources"}]
    fused_tiles.best(rows)
    sums = [line for line in capsys.readouterr().out.splitlines() if line.startswith("sum")]
    assert sums == ["sum  s                                6.000 ms, gathers in the GEMMs (the steps' best times added)",
                    "sum  s                                6.500 ms, gathers beforehand (the steps' best times added)"]
    fused_tiles.best(rows, only=["a"])  # the gathers have no tiles and stay
    assert "  12.000 ms, gathers in the GEMMs" in capsys.readouterr().out


@needs_interpreter
@pytest.mark.parametrize("router,cf,T,E", [("softk", 0.75, 150, 6), ("top1", 1.0, 100, 6), ("topk_hard", None, 90, 6),
                                           ("expert_choice", 1.0, 96, 6), ("hash", 0.75, 70, 6),
                                           ("softk", 1.0, 70, 37), ("topk_hard", None, 40, 71)])
def test_triton_plan_equals_make_plan(router, cf, T, E):
    """The plan's three kernels (chunks of 64 sorted positions under the interpreter, so several chunks
    here) give make_plan's tensors exactly: rows, tiles, the tail rows' assignment 0, the token order;
    some experts have no tile (E = 37, 71: the last too)."""
    from moe_core.fused import ops_triton
    expert_choice = router == "expert_choice"  # drops only under its prefix rule, in eval: sequences of 12
    layer, x, ids = fused_layer(router, cf, "gelu", T=T, E=E, **({"ec_eval": "prefix"} if expert_choice else {}))
    with torch.no_grad():
        routing, _, _ = layer.train(not expert_choice).router(x, ids, 12)
    assert E < 8 or bool((routing.counts_E == 0).any()) and (E < 71 or routing.counts_E[-1] == 0)
    want, got = make_plan(routing, ops_triton.BLOCK_ROWS), ops_triton.build_plan(routing)
    torch.library.opcheck(ops_triton._plan_rows, (routing.sorted_A, routing.keep_A, routing.token_A, routing.counts_E,
                                                  want.tile_expert_M.numel()))
    assert routing.expert_A.numel() > 64 and (cf is None) == bool(routing.keep_A.all())
    for name, value in vars(want).items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(getattr(got, name), value), name
        else:
            assert getattr(got, name) == value, name


# Pointer element types by argument name for lowering (others are 16-bit data; scalars are i32).
_POINTER_TYPES = {"*i64": {"token_ptr", "tile_expert_ptr", "tile_row_ptr", "ends_ptr", "left_idx_ptr", "right_idx_ptr",
                           "row_of_ptr", "offs_ptr", "assign_ptr", "sorted_ptr", "through_ptr", "counts_ptr", "row_ptr",
                           "token_n_ptr"},
                  "*i32": {"count_ptr"}, "*u8": {"keep_ptr"}, "*fp32": {"weight_ptr", "scale_ptr"}}
_BLOCKS = dict(BM=128, BN=128, BK=64, BI=128, BJ=128, BR=64, BD=512, BA=16, BLOCK=1024, BE=64, BT=128, BC=256,
               PROGRAMS=132)


def _arg_type(name: str, flag: dict, ops_triton) -> str:
    """A kernel argument's type in a signature: a GEMM operand is a tensor descriptor with PERSISTENT
    (block rows x reduction for A, and for B^T with B_T; else reduction x columns), a pointer otherwise."""
    operand = name in ops_triton._A_OPERANDS + ops_triton._B_OPERANDS
    if operand and flag.get("PERSISTENT"):
        rows = _BLOCKS["BM"] if name in ops_triton._A_OPERANDS else _BLOCKS["BN"] if flag["B_T"] else None
        shape = [rows, _BLOCKS["BK"]] if rows else [_BLOCKS["BK"], _BLOCKS["BN"]]
        return f"tensordesc<bf16{shape}>"
    if operand or name.endswith("_ptr"):
        return next((t for t, names in _POINTER_TYPES.items() if name in names), "*bf16")
    return "i32"


def lower_kernels() -> list[str]:
    """Every kernel of ``moe_core.fused.kernels`` and ``plan_kernels`` in each combination of its flags
    that ``ops_triton`` launches (PERSISTENT: the operands as tensor descriptors, never with GATHER; B_T
    only then), lowered to Triton IR for an sm_90 target (the compiler's front end: types, control flow;
    no GPU needed). Run in a process where triton is not interpreted. Returns one line per kernel and
    flags that fail."""
    import itertools

    import triton
    import triton._C.libtriton as libtriton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler.compiler import make_backend

    from moe_core.fused import kernels, ops_triton, plan_kernels
    assert not kernels.INTERPRETED
    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    options = backend.parse_options({})
    failures = []
    for name, fn in {**vars(kernels), **vars(plan_kernels)}.items():
        if not (name.endswith("_kernel") and isinstance(fn, triton.JITFunction)):
            continue
        constexprs = [p.name for p in fn.params if p.is_constexpr]
        flags = [c for c in constexprs if c not in _BLOCKS and c not in ("ACC", "PREC")]
        for values in itertools.product((False, True), repeat=len(flags)):
            flag = dict(zip(flags, values))
            if (flag.get("PERSISTENT") and flag.get("GATHER")) or (flag.get("B_T") and not flag.get("PERSISTENT")):
                continue
            signature = {p.name: "constexpr" if p.is_constexpr else _arg_type(p.name, flag, ops_triton)
                         for p in fn.params}
            fixed = {c: _BLOCKS[c] for c in constexprs if c in _BLOCKS} | flag
            fixed |= {c: v for c, v in (("ACC", tl.float32), ("PREC", None)) if c in constexprs}
            context = libtriton.ir.context()
            libtriton.ir.load_dialects(context)
            backend.load_dialects(context)
            try:
                ASTSource(fn, signature, constexprs=fixed).make_ir(
                    target, options, backend.get_codegen_implementation(options), backend.get_module_map(), context)
            except Exception as error:  # noqa: BLE001 - every failure is reported, with its kernel and flags
                failures.append(f"{name} {dict(zip(flags, values))}: {str(error).splitlines()[-1]}")
    return failures


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_every_kernel_lowers_to_triton_ir_for_a_hopper_gpu():
    """The interpreter runs kernels that the compiler rejects (a variable that changes type inside an
    ``if``, say); lowering each one to Triton IR catches that on a machine without a GPU."""
    import subprocess
    import sys
    script = ("import sys; sys.path.insert(0, 'tests'); from test_fused import lower_kernels; "
              "print(*lower_kernels(), sep='\\n')")
    env = {**__import__("os").environ, "TRITON_INTERPRET": "0"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "", done.stdout
