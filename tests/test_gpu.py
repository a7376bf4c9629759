"""The backends on CUDA, bf16 autocast (the fast path's dtype): skipped without a GPU.

CI has no GPU; these run on the lent H100 (`python -m pytest tests/test_gpu.py`) and their result
is recorded in BENCHMARKS.md. Reference: the loop backend in float64 on the same routing.
"""
import pytest
import torch

from moe_core import ROUTERS, MoEConfig, MoEFeedForward
from moe_core.dispatch import BACKEND_FNS

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("router", ROUTERS)
@pytest.mark.parametrize("cf", [1.0, None])
def test_backends_match_float64_reference_under_bf16_autocast(router, cf):
    if router == "expert_choice" and cf is None:
        pytest.skip("expert choice always has a capacity")
    torch.manual_seed(0)
    cfg = MoEConfig(dim=256, hidden=512, num_experts=8, top_k=1 if router == "top1" else 2, router=router,
                    capacity_factor=cf, hash_vocab_size=1000)
    layer = MoEFeedForward(cfg).cuda()
    x = torch.randn(4096, 256, device="cuda")
    ids = torch.randint(0, 1000, (4096,), device="cuda")
    routing, _, _ = layer.router(x, ids)
    ref = BACKEND_FNS["loop"](x.double(), routing, layer.experts.double())
    layer.experts.float()
    for backend in BACKEND_FNS:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = BACKEND_FNS[backend](x, routing, layer.experts)
        assert torch.isfinite(y).all()
        assert rel_err(y, ref) < 2e-2, f"{backend}: {rel_err(y, ref):.2e}"


def test_grouped_forward_is_bitwise_deterministic_on_cuda():
    torch.manual_seed(0)
    layer = MoEFeedForward(MoEConfig(dim=256, hidden=512, num_experts=8, top_k=2, backend="grouped")).cuda()
    x = torch.randn(4096, 256, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        a, b = layer(x)[0], layer(x)[0]
    assert torch.equal(a, b)
