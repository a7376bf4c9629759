"""The ``fused`` dispatch backend: Triton kernels for grouped expert GEMMs over expert-sorted rows, the
activation between them and the gate-weighted combine after the second (ScatterMoE's design; the token
gather is one pass before the GEMMs by default, or fused into their loads; the activation a pass of its
own by default, or the GEMMs' epilogues), forward and backward, deterministic; a PyTorch statement of
the same steps where the kernels cannot run.

Without a GPU, Triton runs only interpreted, and reads TRITON_INTERPRET when it is first imported:
so it is set here (unless already set), before the kernels import triton.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from .function import HAS_TRITON, dispatch_combine, epilogues, kernel_ops, persistent, run_fused  # noqa: E402
from .plan import FusedPlan, make_plan  # noqa: E402

__all__ = ["HAS_TRITON", "FusedPlan", "dispatch_combine", "epilogues", "kernel_ops", "make_plan", "persistent",
           "run_fused"]
