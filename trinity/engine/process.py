"""Process-wide settings the engine runs best under, applied by entry points, not by ``Engine``.

They change the whole process, so the program that owns it opts in once: the ``trinity`` CLI
(trinity/cli/main.py, trinity/cli/server.py), Ray rollout-model actors
(trinity/backends/ray_actors.py) and the scripts in bench/.
"""

from __future__ import annotations

import ctypes
import sys


def configure_process() -> None:
    """Stop glibc from handing freed blocks of up to 32 MiB back to the OS.

    By default every large tensor is a fresh ``mmap`` and its first touch page-faults; in VMs that
    made elementwise ops on new tensors 5-10x slower than on reused memory (a training step
    allocates thousands). The cost is that RSS stays at its peak. Idempotent.
    """
    if sys.platform != "linux":
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc
        return
    libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD, glibc's maximum
    libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD
