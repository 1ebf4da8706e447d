"""Process-wide settings the engine runs best under, applied by entry points, not by ``Engine``.

They change the whole process, so the program that owns it opts in once: the ``trinity`` CLI
(trinity/cli/main.py, trinity/cli/server.py), Ray rollout-model actors
(trinity/backends/ray_actors.py) and the scripts in bench/.

Thread budgets: PyTorch (and OpenMP / MKL in any subprocess) starts one compute thread per core
in every process. Two processes on one machine (``mode: explore`` beside ``mode: train``, Ray
actors beside the driver) then run twice as many spinning threads as cores, and a step took
10-20x longer. Each process gets its share, ``cores // processes``; ``TRINITY_NUM_THREADS``
overrides the computed share (it wins over ``OMP_NUM_THREADS``, which Ray sets to 1 in actors).

CPU affinity: a thread count alone still lets the kernel move both processes' threads over all
cores, so they evict each other's caches and meet on one core while another idles. A computed
share therefore also pins the process to its own disjoint set of whole cores (slot ``i`` of
``processes`` takes the ``i``-th block of the cores this process may run on).
``TRINITY_CPU_AFFINITY`` overrides it: ``off`` leaves the process unpinned, a CPU list
(``0-3,8``) pins it there. An explicit ``TRINITY_NUM_THREADS`` turns automatic pinning off (the
process asked for its own count, which a block may not fit).
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass, replace

ENV_VAR = "TRINITY_NUM_THREADS"
AFFINITY_VAR = "TRINITY_CPU_AFFINITY"
# What OpenMP, MKL and OpenBLAS read at start: a subprocess (a judge, a tool) takes the same share.
SUBPROCESS_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


@dataclass(frozen=True)
class ThreadBudget:
    threads: int  # intra-op threads (torch.set_num_threads)
    interop: int  # inter-op threads (torch.set_num_interop_threads)
    why: str  # for the log: where the figure came from
    cpus: tuple[int, ...] | None = None  # pinned to these CPUs (None: left as it is)


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


def thread_budget(
    processes: int = 1, cores: int | None = None, slot: int | None = None
) -> ThreadBudget:
    """This process's share when ``processes`` compute-heavy processes share the machine; with
    ``slot`` (its index among them) also the CPUs it is pinned to (see the module docstring)."""
    override = os.environ.get(ENV_VAR, "").strip()
    if override:
        from trinity.config import ConfigError

        if not override.isdigit() or int(override) < 1:
            raise ConfigError(
                f"{ENV_VAR}: expected a whole number of threads >= 1, got {override!r}"
            )
        threads = int(override)
        budget = ThreadBudget(threads, min(threads, 2), f"{ENV_VAR}={threads}")
    else:
        cores = cores or usable_cores()
        processes = max(1, processes)
        threads = max(1, cores // processes)
        budget = ThreadBudget(threads, min(threads, 2), f"{cores} cores / {processes} process(es)")
    cpus = _pinned_cpus(processes, slot, computed=not override)
    if cpus is None:
        return budget
    if not override:  # an explicit list may hold fewer CPUs than the computed share
        threads = min(budget.threads, len(cpus))
        budget = replace(budget, threads=threads, interop=min(threads, 2))
    return replace(budget, cpus=cpus, why=f"{budget.why}, pinned to CPUs {_cpu_list(cpus)}")


def core_groups() -> list[tuple[int, ...]]:
    """The CPUs this process may run on, grouped by physical core (hyperthread siblings
    together), in CPU order: the units a share is cut from."""
    allowed = sorted(os.sched_getaffinity(0))
    groups: dict[tuple[str, str], list[int]] = {}
    for cpu in allowed:
        topology = f"/sys/devices/system/cpu/cpu{cpu}/topology/"
        try:
            with open(topology + "physical_package_id") as a, open(topology + "core_id") as b:
                key = (a.read().strip(), b.read().strip())
        except OSError:  # no sysfs topology: every CPU its own core
            key = ("", str(cpu))
        groups.setdefault(key, []).append(cpu)
    return [tuple(group) for group in groups.values()]


def cpu_share(processes: int, slot: int, groups: list[tuple[int, ...]]) -> tuple[int, ...] | None:
    """Slot ``slot``'s block of whole cores when ``processes`` split ``groups`` (None when there
    are fewer cores than processes: disjoint blocks cannot all be non-empty)."""
    if processes < 2 or len(groups) < processes or not 0 <= slot < processes:
        return None
    size = len(groups) // processes
    return tuple(cpu for group in groups[slot * size : (slot + 1) * size] for cpu in group)


def _pinned_cpus(processes: int, slot: int | None, computed: bool) -> tuple[int, ...] | None:
    setting = os.environ.get(AFFINITY_VAR, "").strip().lower()
    if setting in ("", "auto"):
        if not computed or slot is None or not hasattr(os, "sched_getaffinity"):
            return None
        return cpu_share(processes, slot, core_groups())
    if setting == "off":
        return None
    return _parse_cpu_list(setting)


def _parse_cpu_list(text: str) -> tuple[int, ...]:
    from trinity.config import ConfigError

    cpus: set[int] = set()
    try:
        for part in text.split(","):
            low, _, high = part.strip().partition("-")
            first, last = int(low), int(high or low)
            if first < 0 or last < first:
                raise ValueError
            cpus.update(range(first, last + 1))
    except ValueError:
        raise ConfigError(
            f"{AFFINITY_VAR}: expected 'auto', 'off' or a CPU list such as 0-3,8, got {text!r}"
        ) from None
    return tuple(sorted(cpus))


def _cpu_list(cpus: tuple[int, ...]) -> str:
    """``0-3,8`` for (0, 1, 2, 3, 8): the form ``taskset`` and the override take."""
    runs: list[list[int]] = []
    for cpu in cpus:
        if runs and cpu == runs[-1][1] + 1:
            runs[-1][1] = cpu
        else:
            runs.append([cpu, cpu])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


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
    if budget.cpus is not None:
        try:
            pin_threads(budget.cpus)
        except OSError as error:
            from trinity.config import ConfigError

            raise ConfigError(
                f"{AFFINITY_VAR}: cannot pin to CPUs {_cpu_list(budget.cpus)} ({error.strerror})"
            ) from None
    return budget


def pin_threads(cpus: Iterable[int]) -> None:
    """Every thread of this process, and those it starts later, on ``cpus``."""
    os.sched_setaffinity(0, cpus)  # this thread; threads started later inherit it
    for tid in _threads():  # torch's pools, asyncio's executor: already running
        try:
            os.sched_setaffinity(tid, cpus)
        except ProcessLookupError:  # ended meanwhile
            pass


def _threads() -> list[int]:
    try:
        return [int(tid) for tid in os.listdir("/proc/self/task")]
    except OSError:
        return []


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
