"""Where the GPU time goes, kernel by kernel (torch.profiler): one MoE layer forward + backward next
to the dense FFN of equal active FLOPs (hidden k*F), or one training step of Experiment A's model.
The timed benches say how fast; these say why. CUDA only.

    python -m moe_core.bench.profile layer [backend] [experts] [top_k] [hidden] [compile_mode]
    python -m moe_core.bench.profile step [backend] [batch]
    python -m moe_core.bench.profile dispatch [backend] [experts] [top_k] [capacity_factor|none]

layer: T=32768, D=1024, CF 1.25, softk, bf16 weights and inputs (as the layer bench's GPU shapes);
compile_mode (default none) compiles both modules, as the layer bench's compile_modes axis does.
step: E=8, D=256, 4 layers, 4 heads, k=2, CF 1.25, seq 256, vocab 96, bf16 autocast,
torch.compile (default mode), fused AdamW. dispatch: the capacity bench's dispatch cell (the backend's
data movement with identity experts; fused's plan, gather and combine) at T=32768, D=1024, softk,
bf16. Each profile: 3 warm-up calls, 3 profiled; prints GPU ms per call and the costliest kernels.

Legend: T tokens, D model dim, B batch, S sequence length.
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

import torch
from torch.profiler import ProfilerActivity, profile

from ..config import ModelConfig, MoEConfig
from ..dispatch import BACKEND_FNS
from ..model import DenseFeedForward, TinyMoEModel
from ..moe import MoEFeedForward
from ..train import COMPILE_MODES
from .capacity import DISPATCH_FNS, IdentityExperts
from .timing import compiled, fwd_bwd

CALLS = 3  # warm-up calls, then profiled calls


def gpu_profile(fn: Callable[[], None], label: str, top: int) -> float:
    """GPU ms per call of ``fn`` (its CUDA kernels' self time), printed with its ``top`` costliest kernels."""
    for _ in range(CALLS):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(CALLS):
            fn()
        torch.cuda.synchronize()
    kernels = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    per_call_ms = 1e3 * CALLS  # profiler times are microseconds summed over the calls
    total = sum(e.self_device_time_total for e in kernels) / per_call_ms
    print(f"{label}: GPU ms/call {total:.3f}")
    for e in sorted(kernels, key=lambda e: -e.self_device_time_total)[:top]:
        print(f"{e.self_device_time_total / per_call_ms:7.3f} ms {e.count // CALLS:4d}x  {e.key[:130]}")
    return total


def profile_layer(backend: str = "grouped", experts: int = 8, top_k: int = 2, hidden: int = 4096,
                  compile_mode: str = "none", tokens: int = 32768, dim: int = 1024) -> float:
    """MoE layer and dense FFN forward + backward; returns the MoE / dense GPU time ratio."""
    torch.manual_seed(0)
    cfg = MoEConfig(dim=dim, hidden=hidden, num_experts=experts, top_k=top_k, router="softk",
                    capacity_factor=1.25, backend=backend)
    layer = compiled(MoEFeedForward(cfg).cuda().bfloat16(), compile_mode)
    dense = compiled(DenseFeedForward(dim, top_k * hidden, "gelu").cuda().bfloat16(), compile_mode)
    x_TD = torch.randn(tokens, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    inputs = [x_TD, torch.randn_like(x_TD)]
    moe_step, dense_step = fwd_bwd(layer), fwd_bwd(dense)  # the layer bench's timed step: no .grad accumulates

    moe = gpu_profile(lambda: moe_step(inputs), f"moe {backend} E={experts} k={top_k} F={hidden} compile={compile_mode}",
                      25)
    ref = gpu_profile(lambda: dense_step(inputs), "dense", 8)
    print(f"moe / dense GPU time: {moe / ref:.3f}")
    return moe / ref


def profile_step(backend: str = "padded", batch: int = 128, seq_len: int = 256, vocab_size: int = 96) -> float:
    """One compiled training step (forward, backward, AdamW) of Experiment A's model; returns GPU ms."""
    torch.manual_seed(0)
    moe = MoEConfig(dim=256, hidden=1024, num_experts=8, top_k=2, router="softk", capacity_factor=1.25,
                    backend=backend)
    model = TinyMoEModel(ModelConfig(vocab_size=vocab_size, seq_len=seq_len, dim=256, layers=4, heads=4,
                                     moe=moe)).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    idx_BS = torch.randint(0, vocab_size, (batch, seq_len), device="cuda")
    fwd = torch.compile(model)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = fwd(idx_BS, idx_BS)
            loss = out.loss + out.aux_loss + out.z_loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return gpu_profile(step, f"{backend} batch {batch}", 30)


def profile_dispatch(backend: str = "fused", experts: int = 8, top_k: int = 2, capacity_factor: float | None = 1.25,
                     tokens: int = 32768, dim: int = 1024) -> float:
    """The capacity bench's dispatch cell alone: which of its kernels take the time; returns GPU ms."""
    torch.manual_seed(0)
    cfg = MoEConfig(dim=dim, hidden=dim, num_experts=experts, top_k=top_k, router="softk",
                    capacity_factor=capacity_factor, backend=backend)
    router = MoEFeedForward(cfg).cuda().router
    x_TD = torch.randn(tokens, dim, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        routing = router(x_TD, None)[0]
    fn = DISPATCH_FNS.get(backend, BACKEND_FNS[backend])

    def dispatch():
        with torch.no_grad():
            fn(x_TD, routing, IdentityExperts())

    return gpu_profile(dispatch, f"dispatch {backend} E={experts} k={top_k} CF={capacity_factor}", 25)


def _capacity_factor(text: str) -> float | None:
    return None if text.lower() in ("none", "null", "dropless") else float(text)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moe_core.bench.profile", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    layer = sub.add_parser("layer", help="one MoE layer forward + backward next to the dense FFN")
    layer.add_argument("backend", nargs="?", default="grouped", choices=list(BACKEND_FNS))
    layer.add_argument("experts", nargs="?", type=int, default=8)
    layer.add_argument("top_k", nargs="?", type=int, default=2)
    layer.add_argument("hidden", nargs="?", type=int, default=4096)
    layer.add_argument("compile_mode", nargs="?", default="none", choices=["none", *COMPILE_MODES])
    step = sub.add_parser("step", help="one training step of Experiment A's model")
    step.add_argument("backend", nargs="?", default="padded", choices=list(BACKEND_FNS))
    step.add_argument("batch", nargs="?", type=int, default=128)
    dispatch = sub.add_parser("dispatch", help="the capacity bench's dispatch cell (identity experts)")
    dispatch.add_argument("backend", nargs="?", default="fused", choices=list(BACKEND_FNS))
    dispatch.add_argument("experts", nargs="?", type=int, default=8)
    dispatch.add_argument("top_k", nargs="?", type=int, default=2)
    dispatch.add_argument("capacity_factor", nargs="?", type=_capacity_factor, default=1.25)
    args = vars(parser.parse_args(argv))
    try:  # bad shapes and a missing GPU fail here, in one line, before any allocation
        command = args.pop("command")
        if command == "layer":
            MoEConfig(dim=1024, hidden=args["hidden"], num_experts=args["experts"], top_k=args["top_k"])
            run = profile_layer
        elif command == "dispatch":
            MoEConfig(dim=1024, hidden=1024, num_experts=args["experts"], top_k=args["top_k"],
                      capacity_factor=args["capacity_factor"])
            run = profile_dispatch
        else:
            if args["batch"] < 1:
                raise ValueError(f"batch: must be >= 1, got {args['batch']}")
            run = profile_step
        if not torch.cuda.is_available():
            raise ValueError("device: the kernel profiles need a CUDA device (torch.cuda.is_available() is False)")
    except ValueError as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 2
    run(**args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
