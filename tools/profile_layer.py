"""GPU time of one MoE layer forward+backward by kernel (torch.profiler), next to the dense FFN of
equal active FLOPs (hidden k*F), for the BENCHMARKS.md history.

    python tools/profile_layer.py [backend] [experts] [top_k] [hidden] [compile_mode]

T=32768, D=1024, CF 1.25, softk, bf16 weights and inputs (as `python -m moe_core.bench layer`).
compile_mode (default none): both modules under that torch.compile mode, as the layer bench's
compile_modes axis runs them.
"""
import sys

import torch
from torch.profiler import ProfilerActivity, profile

from moe_core import MoEConfig, MoEFeedForward
from moe_core.bench import compiled
from moe_core.model import DenseFeedForward


def gpu_profile(fn, label: str, top: int) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
    kernels = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    total = sum(e.self_device_time_total for e in kernels) / 3e3
    print(f"{label}: GPU ms/call {total:.3f}")
    for e in sorted(kernels, key=lambda e: -e.self_device_time_total)[:top]:
        print(f"{e.self_device_time_total / 3e3:7.3f} ms {e.count // 3:4d}x  {e.key[:130]}")
    return total


def main(backend="grouped", experts=8, top_k=2, hidden=4096, compile_mode="none", tokens=32768, dim=1024) -> None:
    torch.manual_seed(0)
    cfg = MoEConfig(dim=dim, hidden=hidden, num_experts=experts, top_k=top_k, router="softk",
                    capacity_factor=1.25, backend=backend)
    layer = MoEFeedForward(cfg).cuda().bfloat16()
    dense = DenseFeedForward(dim, top_k * hidden, "gelu").cuda().bfloat16()
    layer, dense = compiled(layer, compile_mode), compiled(dense, compile_mode)
    x = torch.randn(tokens, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn_like(x)

    def moe_step():
        layer(x)[0].backward(dy)

    def dense_step():
        dense(x).backward(dy)

    moe = gpu_profile(moe_step, f"moe {backend} E={experts} k={top_k} F={hidden} compile={compile_mode}", 25)
    ref = gpu_profile(dense_step, "dense", 8)
    print(f"moe / dense GPU time: {moe / ref:.3f}")


if __name__ == "__main__":
    args = sys.argv[1:]
    main(args[0] if args else "grouped", *(int(a) for a in args[1:4]), *args[4:5])
