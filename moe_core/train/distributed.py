"""What a run needs from its processes and device: the torchrun process group (NCCL on GPUs, gloo on
CPU), the device of this rank, seeding, RNG state for checkpoints and peak memory."""

from __future__ import annotations

import os
import random
import resource
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from ..config import require


@dataclass
class Dist:
    """This process's place in the run: rank of world, its device, and whether it owns the group."""

    rank: int
    world: int
    device: torch.device
    owns_group: bool  # we initialised the process group, so we tear it down

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_reduce(self, t: torch.Tensor, op=None) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
        return t

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def setup_dist(device: str) -> Dist:
    """`device` is TrainConfig.device (auto | cpu | cuda | cuda:N); torchrun sets WORLD_SIZE, RANK
    and LOCAL_RANK, and under it each rank takes the GPU of its local rank."""
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if cuda:
        require(torch.cuda.is_available(), "TrainConfig.device",
                f"{device!r} asked for, but this torch ({torch.__version__}) sees no CUDA device; use cpu or auto")
        index = int(device.partition(":")[2] or 0)
        require(index < torch.cuda.device_count(), "TrainConfig.device",
                f"{device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    owns = world > 1 and not dist.is_initialized()
    if owns:
        dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank() if world > 1 else 0
    if not cuda:
        torch_device = torch.device("cpu")
    elif world > 1:
        torch_device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    else:  # set_device needs an index
        torch_device = torch.device(device if ":" in device else f"cuda:{torch.cuda.current_device()}")
    if cuda:
        torch.cuda.set_device(torch_device)
    return Dist(rank, world, torch_device, owns)


def cpu_threads() -> int | None:
    """Intra-op threads for a CPU run: the usable cores (CPU affinity) shared by this host's ranks,
    less one left to everything else (a notebook kernel's I/O, the sweep, the OS). The tiny models'
    many small ops each end at a barrier where libgomp's workers spin; one worker descheduled by
    anything else stalls the op, so on a busy 2-core box two threads trained 4-5x slower than one.
    None when OMP_NUM_THREADS is set: that choice stands."""
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1")) - 1)


def peak_memory_bytes(device: torch.device) -> tuple[int, str]:
    """(bytes, what was measured): the CUDA allocator's peak on GPU, the process's max RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "cuda_max_memory_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "cpu_max_rss"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # all CUDA devices too


def rng_state(device: torch.device) -> dict:
    """Every RNG's state as tensors and plain Python values, so that a checkpoint loads with
    torch.load(weights_only=True): numpy's key array is stored as a list of ints."""
    name, key, pos, has_gauss, gauss = np.random.get_state()
    return {"python": random.getstate(), "numpy": (name, key.tolist(), pos, has_gauss, gauss),
            "torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def set_rng_state(state: dict, device: torch.device) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"], device)
