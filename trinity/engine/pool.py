"""Big buffers kept per thread and reused, instead of fresh pages from the kernel each time.

glibc maps every block over its mmap threshold (32 MB at most, process.py sets that) on its own
and unmaps it when freed, so each new one of those comes as fresh pages: a page fault per 4 KB,
~10 us each on a VM. A decode cache (tens of MB) made 10-30 thousand faults per GRPO sampling
call; the unembedding's kept probabilities (N x V: 72 MB for 732 tokens of a 49k vocabulary in
bf16) ~18 thousand per ``forward_backward``. Their owners take a buffer here and give it back
when done with it (fast_decode.StaticCache, logprobs._TargetLogprobs).
"""

from __future__ import annotations

import threading

import torch

_LOCAL = threading.local()
# Freed buffers larger than this are let go: a big model's long batches (gigabytes of cache)
# should not stay resident, and their page faults are a small part of the work that fills them.
MAX_BYTES = 256 << 20


def free_list() -> list[torch.Tensor]:
    """This thread's free buffers (an owner dropped in another thread still gives its buffer
    back to the list of the thread that took it: ``give_back`` is handed that list)."""
    if not hasattr(_LOCAL, "free"):
        _LOCAL.free = []
    return _LOCAL.free


def give_back(free: list[torch.Tensor], buffer: torch.Tensor) -> None:
    """Return ``buffer`` (from ``take``, no longer used by anyone) to ``free``."""
    if buffer.numel() * buffer.element_size() <= MAX_BYTES:
        free.append(buffer)


def take(numel: int, like: torch.Tensor) -> torch.Tensor:
    """A free flat buffer of ``like``'s dtype and device with at least ``numel`` elements, else a
    new one (the free ones that were too small are let go); uninitialized. Only a buffer made in
    inference mode serves inference mode (sampling) and only one made outside it serves outside
    it: torch allows no in-place write to an inference tensor outside inference mode."""
    free = free_list()
    inference = torch.is_inference_mode_enabled()

    def fits(buffer: torch.Tensor) -> bool:
        return (buffer.dtype, buffer.device, buffer.is_inference()) == (
            like.dtype,
            like.device,
            inference,
        )

    for i, buffer in enumerate(free):
        if fits(buffer) and buffer.numel() >= numel:
            return free.pop(i)
    free[:] = [b for b in free if not fits(b)]
    return like.new_empty(numel)
