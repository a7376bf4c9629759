"""GPU time per training step by kernel (torch.profiler), for the BENCHMARKS.md history.

    python tools/profile_step.py [padded|grouped] [batch]

The issue-8 study model (E=8, D=256, 4 layers, 4 heads, k=2, CF 1.25, seq 256, vocab 96), bf16
autocast, torch.compile (default mode), fused AdamW; 3 warm-up steps, 3 profiled. Prints GPU
ms/step and the 30 costliest kernels.
"""
import sys

import torch
from profile_layer import gpu_profile  # tools/ is on sys.path when this file runs as a script

from moe_core import MoEConfig, ModelConfig, TinyMoEModel


def main(backend: str = "padded", batch: int = 128) -> None:
    torch.manual_seed(0)
    moe = MoEConfig(dim=256, hidden=1024, num_experts=8, top_k=2, router="softk", capacity_factor=1.25,
                    backend=backend)
    model = TinyMoEModel(ModelConfig(vocab_size=96, seq_len=256, dim=256, layers=4, heads=4, moe=moe)).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    idx = torch.randint(0, 96, (batch, 256), device="cuda")
    fwd = torch.compile(model)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = fwd(idx, idx)
            loss = out.loss + out.aux_loss + out.z_loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    gpu_profile(step, f"{backend} batch {batch}", 30)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "padded", int(sys.argv[2]) if len(sys.argv) > 2 else 128)
