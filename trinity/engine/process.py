"""Process-wide settings the engine runs best under, applied by entry points, not by ``Engine``.

They change the whole process, so the program that owns it opts in once: the ``trinity`` CLI
(trinity/cli/main.py, trinity/cli/server.py), Ray rollout-model actors
(trinity/backends/ray_actors.py) and the scripts in bench/.

Thread budgets: PyTorch (and OpenMP / MKL in any subprocess) starts one compute thread per core
in every process. Two processes on one machine (``mode: explore`` beside ``mode: train``, Ray
actors beside the driver) then run twice as many spinning threads as cores, and a step took
10-20x longer. Each process gets its share, ``cores // processes``; ``TRINITY_NUM_THREADS``
overrides the computed share (it wins over ``OMP_NUM_THREADS``, which Ray sets to 1 in actors).
"""

from __future__ import annotations

import ctypes
import os
import sys
from dataclasses import dataclass

ENV_VAR = "TRINITY_NUM_THREADS"
# What OpenMP, MKL and OpenBLAS read at start: a subprocess (a judge, a tool) takes the same share.
SUBPROCESS_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


@dataclass(frozen=True)
class ThreadBudget:
    threads: int  # intra-op threads (torch.set_num_threads)
    interop: int  # inter-op threads (torch.set_num_interop_threads)
    why: str  # for the log: where the figure came from


def usable_cores() -> int:
    """Physical cores this process may run on (torch's own default counts physical cores:
    a second hyperthread per core slows matmuls down)."""
    try:
        allowed = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        allowed = os.cpu_count() or 1
    try:
        import psutil

        physical = psutil.cpu_count(logical=False) or allowed
    except ImportError:
        physical = allowed
    return max(1, min(allowed, physical))


def thread_budget(processes: int = 1, cores: int | None = None) -> ThreadBudget:
    """This process's share when ``processes`` compute-heavy processes share the machine."""
    override = os.environ.get(ENV_VAR, "").strip()
    if override:
        from trinity.config import ConfigError

        if not override.isdigit() or int(override) < 1:
            raise ConfigError(
                f"{ENV_VAR}: expected a whole number of threads >= 1, got {override!r}"
            )
        threads = int(override)
        return ThreadBudget(threads, min(threads, 2), f"{ENV_VAR}={threads}")
    cores = cores or usable_cores()
    processes = max(1, processes)
    threads = max(1, cores // processes)
    return ThreadBudget(threads, min(threads, 2), f"{cores} cores / {processes} process(es)")


def apply_thread_budget(budget: ThreadBudget) -> ThreadBudget:
    """Set torch's thread pools and the subprocess environment; returns ``budget``.

    The inter-op pool can only be sized before its first use; later calls keep its size (it runs
    only ``torch.jit.fork`` work, which the engine does not use).
    """
    import torch

    torch.set_num_threads(budget.threads)
    if torch.get_num_interop_threads() != budget.interop:
        try:
            torch.set_num_interop_threads(budget.interop)
        except RuntimeError:  # already started in this process
            pass
    for var in SUBPROCESS_ENV:
        os.environ[var] = str(budget.threads)
    return budget


def configure_process(processes: int | None = None) -> None:
    """Stop glibc from handing freed blocks of up to 32 MiB back to the OS; with ``processes``
    (or ``TRINITY_NUM_THREADS`` set) also apply the thread budget. Idempotent.

    By default every large tensor is a fresh ``mmap`` and its first touch page-faults; in VMs that
    made elementwise ops on new tensors 5-10x slower than on reused memory (a training step
    allocates thousands). The cost is that RSS stays at its peak.
    """
    if processes is not None or os.environ.get(ENV_VAR):
        apply_thread_budget(thread_budget(processes or 1))
    if sys.platform != "linux":
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc
        return
    libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD, glibc's maximum
    libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD
