"""How every bench times a call: warm up, time ``repeats`` calls with inputs rotated among ``sets``
independent sets (so caches do not flatter), report the median. CUDA events on GPU (the device's
own timeline), perf_counter + synchronize elsewhere. Also the copy-bandwidth reference, the
forward + backward step and the compile helper that the layer bench and the profiles share.

Legend: T tokens, D model dim.
"""
from __future__ import annotations

import time
from statistics import median
from typing import Callable, Sequence

import torch

COPY_BYTES = {"cuda": 1 << 28, "cpu": 1 << 25}  # per buffer of the copy-bandwidth reference


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


HOST_PROBES = 5  # calls timed on the host after the timed ones, each from an idle device


def host_enqueue_ms(fn: Callable, inputs: Sequence, device: torch.device) -> float | None:
    """Median host milliseconds to issue one call of ``fn`` with the device idle (synchronised before, not
    after): what the host needs to launch the call's kernels. Near the call's event time the call is
    launch-bound and its event time follows the host's pace. None off CUDA, where the two are one."""
    if device.type != "cuda":
        return None
    times = []
    for i in range(HOST_PROBES):
        sync(device)
        t0 = time.perf_counter()
        fn(inputs[i % len(inputs)])
        times.append((time.perf_counter() - t0) * 1e3)
    sync(device)
    return median(times)


def time_median_ms(fn: Callable, inputs: Sequence, device: torch.device, *, warmup: int, repeats: int,
                   host_ahead: bool = False) -> float:
    """Median milliseconds of fn(inputs[i % len(inputs)]) over ``repeats`` calls after ``warmup`` calls.

    ``host_ahead`` (CUDA): before each timed call the GPU spins for longer than the host needs to issue
    the call, so all of its kernels are queued before its start event runs and the event time is the
    device's own, launch-bound or not (``host_enqueue_ms`` says what issuing it costs the host).
    Without it, a call whose kernels finish faster than the host issues them is timed at the host's
    pace, which moves with the host's load and clocks."""
    for i in range(warmup):
        fn(inputs[i % len(inputs)])
    sync(device)
    times = []
    if device.type == "cuda":
        spin = _spin_cycles(fn, inputs, device) if host_ahead else 0
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
        for i, (start, end) in enumerate(events):
            if spin:
                torch.cuda._sleep(spin)
            start.record()
            fn(inputs[i % len(inputs)])
            end.record()
        sync(device)
        times = [start.elapsed_time(end) for start, end in events]
    else:
        for i in range(repeats):
            t0 = time.perf_counter()
            fn(inputs[i % len(inputs)])
            sync(device)
            times.append((time.perf_counter() - t0) * 1e3)
    return median(times)


SPIN_PROBE_CYCLES = 10_000_000


def _spin_cycles(fn: Callable, inputs: Sequence, device: torch.device) -> int:
    """GPU spin cycles that outlast twice the host's time to issue one call (at least 0.1 ms): the
    cycles per millisecond are measured with a probe spin, the issue time with ``host_enqueue_ms``."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(SPIN_PROBE_CYCLES)
    end.record()
    sync(device)
    cycles_per_ms = SPIN_PROBE_CYCLES / start.elapsed_time(end)
    return int(cycles_per_ms * max(2 * host_enqueue_ms(fn, inputs, device), 0.1))


def copy_bandwidth(device: torch.device, dtype: torch.dtype, *, warmup: int, repeats: int, sets: int) -> float:
    """Bytes/s of ``torch.empty_like(x).copy_(x)`` on large buffers (bytes read + written): the
    device-to-device reference that achieved bandwidths are a fraction of."""
    numel = COPY_BYTES[device.type] // dtype.itemsize
    buffers = [torch.ones(numel, dtype=dtype, device=device) for _ in range(sets)]
    ms = time_median_ms(lambda x: torch.empty_like(x).copy_(x), buffers, device, warmup=warmup, repeats=repeats)
    return 2 * buffers[0].nbytes / (ms / 1e3)


def grad_inputs(num_tokens: int, dim: int, *, sets: int, seed: int, device: torch.device,
                dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``sets`` seeded pairs (x_TD requiring grad, dy_TD) on the device: the inputs of fwd_bwd."""
    gen = torch.Generator().manual_seed(seed)
    return [tuple(torch.randn(num_tokens, dim, generator=gen).to(device, dtype).requires_grad_(i == 0)
                  for i in range(2)) for _ in range(sets)]


def compiled(module: torch.nn.Module, mode: str) -> Callable:
    """``module`` itself for mode "none", else a fresh torch.compile of it (dynamo reset first, so a
    module whose backend changed is traced again)."""
    if mode == "none":
        return module
    torch._dynamo.reset()
    return torch.compile(module, mode=mode)


def fwd_bwd(module: torch.nn.Module) -> Callable:
    """A timed step on inputs (x, dy, *more): forward on x, then the gradients of y . dy with
    respect to x, ``more`` and every parameter (autograd.grad, so nothing accumulates between
    calls). The same call serves the MoE layer and the dense FFN."""
    params = list(module.parameters())

    def step(inputs):
        x_TD, dy_TD = inputs[:2]
        out = module(x_TD)
        y_TD = out[0] if isinstance(out, tuple) else out
        torch.autograd.grad(y_TD, [x_TD, *inputs[2:], *params], dy_TD, allow_unused=True)
    return step


def guarded(measure: Callable[[], dict]) -> dict:
    """Run one measurement; an out-of-memory leaves a row with status 'oom' instead of ending the run."""
    try:
        return {"status": "ok", **measure()}
    except torch.OutOfMemoryError:
        pass
    torch.cuda.empty_cache()  # out here, once the traceback no longer holds the failed call's tensors
    return {"status": "oom"}
