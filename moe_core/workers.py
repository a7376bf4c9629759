"""The sweep's workers: each executes its runs' notebooks one after another in a Jupyter kernel it
keeps, so that imports, the CUDA context and compiled code (dynamo's and Inductor's in-process
caches) are paid once per worker and configuration, not once per run.

Before each run a kept kernel is reset (``%reset -f``: the notebook's globals and output history go,
so names from the previous run cannot leak into the next one's parameters), its garbage collected,
and told when the run began (MOE_CORE_RUN_T0, the start of its time breakdown). What survives the
collection (modules, their caches, compiled code) is then frozen (``gc.freeze``), so that the next
reset's collections scan only what one run made: with torch imported a full collection costs about
0.3 s, and a reset made two of them. What survives a reset is what a process
keeps for itself: imported modules and their caches, the CUDA context, compiled code, which dynamo's
guards re-check for every call. A kernel that died is started again; after a run that raised, the
kernel is replaced (a CUDA error can leave its context unusable). ``fresh=True`` starts a new kernel
for every run instead, as papermill does on its own.
"""
from __future__ import annotations

import os

from jupyter_client.manager import AsyncKernelManager
from jupyter_core.utils import run_sync

from .train.measure import RUN_T0_ENV

KERNEL = "python3"
# The kernel's own log (e.g. its warning that local TCP is unencrypted) is nothing a user can act on;
# errors still show, and the notebook's outputs, warnings included, are in the executed notebook.
QUIET_KERNEL = ["--IPKernelApp.log_level=ERROR"]
TIMEOUT_S = 120  # kernel start-up and reset
RESET = "%reset -f\nimport gc, os\ngc.collect()\ngc.freeze()\n"


class _Manager(AsyncKernelManager):
    """A kernel manager that remembers the clients it hands out: papermill opens one per notebook and,
    on a kernel it does not own, leaves it open; close_clients closes them after each run."""

    def client(self, **kwargs):
        client = super().client(**kwargs)
        self.open_clients.append(client)
        return client

    def close_clients(self) -> None:
        while self.open_clients:
            self.open_clients.pop().stop_channels()


class WorkerKernel:
    """One worker's kernel: started with the worker's environment (``env`` over os.environ: its GPU,
    the concurrency, the shared Inductor cache) in ``cwd``, kept across runs unless ``fresh``."""

    def __init__(self, env: dict[str, str], cwd: str, fresh: bool = False):
        self.env, self.cwd, self.fresh = env, cwd, fresh
        self.km: _Manager | None = None

    def ready(self, t0: float, run_env: dict[str, str] | None = None) -> AsyncKernelManager:
        """The kernel for a run that began at ``t0`` (time.time()), its environment ``run_env`` set
        (e.g. the run's claim token), as a new kernel would be but for what its process keeps; pass it
        to papermill as ``km``."""
        run_env = {RUN_T0_ENV: repr(t0), **(run_env or {})}
        if self.km is not None and (self.fresh or not run_sync(self.km.is_alive)()):
            self.shutdown()
        if self.km is None:
            km = _Manager(kernel_name=KERNEL)
            km.open_clients = []
            run_sync(km.start_kernel)(extra_arguments=QUIET_KERNEL, cwd=self.cwd,
                                      env={**os.environ, **self.env, **run_env})
            self.km = km
        else:
            self._execute(RESET + "".join(f"os.environ[{k!r}] = {v!r}\n" for k, v in run_env.items()))
        return self.km

    def done(self, raised: bool) -> None:
        """After a run: its clients closed; the kernel shut down if the run raised or kernels are fresh."""
        if self.km is not None:
            self.km.close_clients()
        if raised or self.fresh:
            self.shutdown()

    def shutdown(self) -> None:
        if self.km is None:
            return
        km, self.km = self.km, None
        km.close_clients()
        run_sync(km.shutdown_kernel)(now=True)

    def _execute(self, code: str) -> None:
        client = self.km.client()
        client.start_channels()
        try:
            run_sync(client.wait_for_ready)(timeout=TIMEOUT_S)
            reply = run_sync(client.execute_interactive)(code, timeout=TIMEOUT_S, output_hook=lambda msg: None)
        finally:
            self.km.close_clients()
        if reply["content"]["status"] != "ok":
            raise RuntimeError(f"resetting the kept kernel failed: {reply['content'].get('evalue')}")
