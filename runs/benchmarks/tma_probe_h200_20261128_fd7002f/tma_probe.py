"""Probe: a grouped row GEMM with TMA descriptor loads vs the pointer-load rows_kernel vs cuBLAS."""
import sys
import torch, triton, triton.language as tl
from moe_core.config import MoEConfig
from moe_core.moe import MoEFeedForward
from moe_core.fused import make_plan, ops_triton
from moe_core.fused.kernels import _tile

triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))

CONFIGS = [triton.Config({"BN": bn, "BK": bk}, num_warps=w, num_stages=s)
           for bn, bk, w, s in [(256, 64, 8, 3), (256, 64, 8, 4), (128, 64, 8, 4), (128, 64, 4, 4), (128, 128, 8, 3),
                                (256, 128, 8, 3)]]


@triton.autotune(CONFIGS, key=["K", "N"])
@triton.jit
def rows_tma_kernel(a_ptr, b_ptr, out_ptr, tile_expert_ptr, tile_row_ptr, ends_ptr, E, K, N, R,
                    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    e, rows, row_ok, cols, col_ok = _tile(tile_expert_ptr, tile_row_ptr, ends_ptr, E, N, BM, BN)
    if e >= E:
        return
    a_desc = tl.make_tensor_descriptor(a_ptr, shape=[R, K], strides=[K, 1], block_shape=[BM, BK])
    b_desc = tl.make_tensor_descriptor(b_ptr, shape=[E * K, N], strides=[N, 1], block_shape=[BK, BN])
    row0 = tl.load(tile_row_ptr + tl.program_id(0) // tl.cdiv(N, BN)).to(tl.int32)
    col0 = (tl.program_id(0) % tl.cdiv(N, BN)) * BN
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        acc = tl.dot(a_desc.load([row0, k0]), b_desc.load([e.to(tl.int32) * K + k0, col0]), acc)
    tl.store(out_ptr + rows[:, None] * N + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


def rows_tma(a_NK, b_EKJ, plan):
    E, K, J = b_EKJ.shape
    out = a_NK.new_empty(a_NK.shape[0], J)
    tiles = plan.tile_expert_M.numel()
    rows_tma_kernel[lambda m: (tiles * triton.cdiv(J, m["BN"]),)](
        a_NK, b_EKJ, out, plan.tile_expert_M, plan.tile_row_M, plan.ends_E, E, K, J, a_NK.shape[0], BM=plan.block_rows)
    return out


def bench(fn):
    return triton.testing.do_bench(fn, warmup=50, rep=300)


torch.manual_seed(0)
for name, kw in [("gelu E8 F4096", dict(num_experts=8, top_k=2, hidden=4096)),
                 ("gelu E64 F1024", dict(num_experts=64, top_k=8, hidden=1024))]:
    layer = MoEFeedForward(MoEConfig(dim=1024, router="softk", capacity_factor=1.25, **kw)).cuda().bfloat16()
    x = torch.randn(32768, 1024, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        routing = layer.router(x, None, 32768)[0]
    plan = make_plan(routing, ops_triton.BLOCK_ROWS)
    N, kept = plan.assign_N.numel(), int(plan.ends_E[-1])
    Fh = kw["hidden"]
    for gemm, K, J in [("up", 1024, Fh), ("down", Fh, 1024)]:
        a = torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(kw["num_experts"], K, J, device="cuda", dtype=torch.bfloat16) / K ** 0.5
        ref, got = ops_triton.rows(a, b, plan), rows_tma(a, b, plan)
        err = (ref[:kept].float() - got[:kept].float()).abs().max().item()
        t_ptr, t_tma = bench(lambda: ops_triton.rows(a, b, plan)), bench(lambda: rows_tma(a, b, plan))
        a2, b2 = a[:kept], b[0]
        t_cublas = bench(lambda: a2 @ b2)
        print(f"{name} {gemm}: kept {kept} K {K} J {J}  ptr {t_ptr:.3f} ms  tma {t_tma:.3f} ms  cublas {t_cublas:.3f} ms"
              f"  tma/ptr {t_tma / t_ptr:.3f}  ptr/cublas {t_ptr / t_cublas:.3f}  tma/cublas {t_tma / t_cublas:.3f}"
              f"  maxerr {err:.2e}  best {rows_tma_kernel.best_config}", flush=True)
