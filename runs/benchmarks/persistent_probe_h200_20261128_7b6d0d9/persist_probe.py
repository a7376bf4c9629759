"""Probe: the fused backend's row GEMM as a persistent kernel (one program per SM looping over the tiles,
flattened so a tile's epilogue overlaps the next one's loads), with pointer or TMA loads, against the
current one-program-per-tile kernel (ops_triton.rows) and cuBLAS (torch.mm of the kept rows, the same
FLOPs). CUDA only; prints one line per (shape, GEMM)."""
import os
import sys

import torch
import triton
import triton.language as tl

from moe_core.config import MoEConfig
from moe_core.fused import make_plan, ops_triton
from moe_core.moe import MoEFeedForward

CONFIGS = [triton.Config({"BN": bn, "BK": bk}, num_warps=w, num_stages=s)
           for bn, bk, w, s in [(256, 64, 8, 3), (256, 64, 8, 4), (128, 64, 8, 4), (128, 64, 4, 4), (128, 128, 8, 3)]]


@triton.jit
def rows_persistent_kernel(a_ptr, b_ptr, out_ptr, tile_expert_ptr, tile_row_ptr, ends_ptr, E, K, N, R, M,
                           TMA: tl.constexpr, PROGRAMS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                           BK: tl.constexpr):
    column_tiles = tl.cdiv(N, BN)
    total = M * column_tiles
    if TMA:
        a_desc = tl.make_tensor_descriptor(a_ptr, shape=[R, K], strides=[K, 1], block_shape=[BM, BK])
        b_desc = tl.make_tensor_descriptor(b_ptr, shape=[E * K, N], strides=[N, 1], block_shape=[BK, BN])
    for p in tl.range(tl.program_id(0), total, PROGRAMS, flatten=True):
        m = p // column_tiles
        e = tl.load(tile_expert_ptr + m)
        e_c = tl.minimum(e, E - 1).to(tl.int32)
        row0 = tl.load(tile_row_ptr + m).to(tl.int32)
        rows = row0 + tl.arange(0, BM)
        row_ok = rows < tl.where(e < E, tl.load(ends_ptr + e_c), 0)
        col0 = (p % column_tiles) * BN
        cols = col0 + tl.arange(0, BN)
        col_ok = cols < N
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, K, BK):
            if TMA:
                a = a_desc.load([row0, k0])
                b = b_desc.load([e_c * K + k0, col0])
            else:
                ks = k0 + tl.arange(0, BK)
                a = tl.load(a_ptr + rows[:, None].to(tl.int64) * K + ks[None, :], mask=(rows < R)[:, None] & (ks < K)[None, :], other=0.0)
                b = tl.load(b_ptr + e_c.to(tl.int64) * K * N + ks[:, None] * N + cols[None, :], mask=(ks < K)[:, None] & col_ok[None, :],
                            other=0.0)
            acc = tl.dot(a, b, acc)
        tl.store(out_ptr + rows[:, None].to(tl.int64) * N + cols[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & col_ok[None, :])


TUNED = triton.autotune(CONFIGS, key=["K", "N", "TMA"])(rows_persistent_kernel)


def rows_persistent(a_NK, b_EKJ, plan, tma, programs, kernel=TUNED, **meta):
    E, K, J = b_EKJ.shape
    out = a_NK.new_empty(a_NK.shape[0], J)
    M = plan.tile_expert_M.numel()
    kernel[(programs,)](a_NK, b_EKJ, out, plan.tile_expert_M, plan.tile_row_M, plan.ends_E, E, K, J, a_NK.shape[0], M,
                        TMA=tma, PROGRAMS=programs, BM=plan.block_rows, **meta)
    return out


def main():
    torch.manual_seed(0)
    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    bench = lambda fn: triton.testing.do_bench(fn, warmup=50, rep=300)  # noqa: E731
    print(torch.cuda.get_device_name(), "SMs", sms, "torch", torch.__version__, "triton", triton.__version__, flush=True)
    for name, kw in [("gelu E8 F4096", dict(num_experts=8, top_k=2, hidden=4096)),
                     ("gelu E64 F1024", dict(num_experts=64, top_k=8, hidden=1024))]:
        layer = MoEFeedForward(MoEConfig(dim=1024, router="softk", capacity_factor=1.25, **kw)).cuda().bfloat16()
        x = torch.randn(32768, 1024, device="cuda", dtype=torch.bfloat16)
        with torch.no_grad():
            routing = layer.router(x, None, 32768)[0]
        plan = make_plan(routing, ops_triton.BLOCK_ROWS)
        N, kept, Fh = plan.assign_N.numel(), int(plan.ends_E[-1]), kw["hidden"]
        for gemm, K, J in [("up", 1024, Fh), ("down", Fh, 1024)]:
            a = torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
            b = torch.randn(kw["num_experts"], K, J, device="cuda", dtype=torch.bfloat16) / K ** 0.5
            ref = ops_triton.rows(a, b, plan)
            times = {"ptr": bench(lambda: ops_triton.rows(a, b, plan)), "cublas": bench(lambda: a[:kept] @ b[0])}
            for tma in (False, True):
                for programs in (sms, 2 * sms):
                    label = f"persist_{'tma' if tma else 'ptr'}_x{programs // sms}"
                    try:
                        got = rows_persistent(a, b, plan, tma, programs)
                        err = (ref[:kept].float() - got[:kept].float()).abs().max().item()
                        times[label] = bench(lambda: rows_persistent(a, b, plan, tma, programs))
                        times[label + "_err"] = err
                        times[label + "_cfg"] = str(TUNED.best_config).split(", num_ctas")[0]
                    except Exception as error:  # noqa: BLE001 - a probe: report and go on
                        times[label] = f"error {type(error).__name__}: {str(error).splitlines()[-1][:120]}"
            line = " ".join(f"{k} {v:.3f}" if isinstance(v, float) and not k.endswith("_err") else f"{k} {v}"
                            for k, v in times.items())
            ratios = " ".join(f"{k}/cublas {v / times['cublas']:.3f}" for k, v in times.items()
                              if isinstance(v, float) and not k.endswith("_err") and k != "cublas")
            print(f"{name} {gemm} kept {kept} K {K} J {J} | {ratios} | {line}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
