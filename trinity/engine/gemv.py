"""A one-row matmul (``x @ W.T`` with ``x`` of one row) that streams ``W`` at memory bandwidth.

Why: a batch-1 decode step is a chain of such gemvs over weights that do not fit in cache, so its
speed is how fast they read memory. PyTorch's own CPU paths fall short of that, measured on an
AMD EPYC (Zen 4, 1 thread): an fp32 ``F.linear`` over a decode step's weights read 8.7 GB/s
where a plain read of them reached 24 GB/s, and a bf16 one 4.3 GB/s (its bf16 gemv converts
element by element), so bf16 weights, half the bytes, decoded no faster than fp32.

The kernel: one weight row after another (a single sequential stream, which the hardware
prefetchers follow; reading four rows side by side was 1.6x slower), each a dot product
accumulated in fp32 (bf16 pairs by ``vdpbf16ps`` where the CPU has AVX512-BF16, else widened by a
shift), the output rounded to the input dtype as ``F.linear`` does; vectorized for the machine it
is built on (``-O3 -march=native``), rows split over torch's own intra-op threads
(``at::parallel_for``, no second thread pool).
Built at install time, never during a run (compiling takes ~1.5 min on 2 cores, which would
stall a sampling call): ``python -m trinity.engine`` (run by scripts/setup.sh when missing)
compiles it into ``$TRINITY_CACHE_DIR/torch_extensions/trinity_gemv-<key>`` (default
``~/.cache/trinity``), the key a hash of the CPU flags, torch / Python versions and the source, so
machines sharing the cache each get their own binary. At run time ``linear`` only loads a build;
without one (or with no C++ compiler at setup) it is ``F.linear``, said once in the log at INFO.
``TRINITY_GEMV=0`` turns it off.

The same build (one source, trinity/engine/kernels.cpp, one key) holds the fused decode-step
kernels that trinity/engine/fast_decode.py calls where it loads (``kernels()``): rmsnorm with the
residual add, rotary with the KV-cache write, one-query GQA attention, SiLU-and-multiply, and a
whole decode step in one call.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import platform
import shutil
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from trinity.engine.demo_model import cache_root

log = logging.getLogger(__name__)

_SOURCE = (Path(__file__).parent / "kernels.cpp").read_text()

_NAME = "trinity_gemv"
_CFLAGS = ["-O3", "-march=native", "-fopenmp"]  # at::parallel_for is OpenMP inline code
_KERNEL: object = None  # the loaded module; False once looked for and not there


def _cpu_flags() -> str:
    """The instruction-set extensions the binary may use (``-march=native``): the flags line of
    /proc/cpuinfo, else (no procfs) torch's coarser CPU capability and the architecture."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return f"{platform.machine()} {torch.backends.cpu.get_cpu_capability()}"


def build_dir() -> Path:
    """``$TRINITY_CACHE_DIR/torch_extensions/trinity_gemv-<key>``, the key a hash of what the
    binary depends on (CPU flags, torch and Python versions, source and compiler flags), so a
    cache shared between machines (an NFS home) never loads a binary built for another CPU."""
    parts = [_cpu_flags(), torch.__version__, sys.version, _SOURCE, *_CFLAGS]
    key = hashlib.sha256("\n".join(parts).encode()).hexdigest()[:12]
    return cache_root() / "torch_extensions" / f"{_NAME}-{key}"


def library_path() -> Path:
    """Where this machine's build of the kernel is (or will be)."""
    return build_dir() / f"{_NAME}.so"


def _load(path: Path):
    spec = importlib.util.spec_from_file_location(_NAME, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check_compiler() -> None:
    """Raise, in one line, where there is no C++ compiler to build the kernel with."""
    from torch.utils.cpp_extension import get_cxx_compiler

    if shutil.which(get_cxx_compiler()) is None:
        raise RuntimeError(f"no C++ compiler: {get_cxx_compiler()!r} ($CXX) is not on PATH")


def build() -> Path:
    """Compile the kernel for this machine into ``build_dir()`` unless it is there (minutes on
    a small machine: run by scripts/setup.sh, never by the engine), load it; its path. Built in
    a scratch directory renamed into place, so a run never loads a half-written binary."""
    global _KERNEL
    final, library = build_dir(), library_path()
    if library.exists():
        _KERNEL = _load(library)
        return library
    from torch.utils.cpp_extension import load_inline

    check_compiler()
    scratch = final.with_name(f"{final.name}.{os.getpid()}.tmp")
    scratch.mkdir(parents=True, exist_ok=True)
    try:
        module = load_inline(
            _NAME,
            _SOURCE,
            extra_cflags=_CFLAGS,
            extra_ldflags=["-fopenmp"],
            build_directory=str(scratch),
        )
        scratch.rename(final)
    except OSError:  # another build renamed its directory into place first: use that one
        if not library.exists():
            raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    _KERNEL = module
    return library


def kernels():
    """The built extension (``gemv``, the fused decode kernels, ``decode_step``), loaded on first
    use (never compiled here), or None where it is not built for this machine or turned off."""
    global _KERNEL
    if _KERNEL is None:
        _KERNEL = False
        library = library_path()
        if os.environ.get("TRINITY_GEMV", "1") == "0":
            return None
        if not library.exists():
            log.info(
                "gemv kernel not built for this machine: one-row matmuls use F.linear "
                "(build it once with `python -m trinity.engine`; scripts/setup.sh does)"
            )
            return None
        try:
            _KERNEL = _load(library)
        except ImportError as error:  # a binary that no longer matches (say, libtorch rebuilt)
            log.warning("gemv kernel %s does not load (%s); using F.linear", library, error)
    return _KERNEL or None


def available() -> bool:
    """Whether the kernel is built for this machine and loads (it is never compiled here)."""
    return kernels() is not None


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, through the kernel when ``x`` is one row of a CPU
    fp32 / bf16 matmul of matching dtypes (the batch-1 decode step), outside autograd, an
    fp32-weight autocast region (that would compute in the autocast dtype) and torch.compile
    (which traces ``F.linear``)."""
    if (
        torch.compiler.is_compiling()
        or x.dim() != 2
        or x.shape[0] != 1
        or x.device.type != "cpu"
        or weight.dtype not in (torch.float32, torch.bfloat16)
        or x.dtype != weight.dtype
        or not weight.is_contiguous()
        or (torch.is_grad_enabled() and weight.requires_grad)
        or (weight.dtype == torch.float32 and torch.is_autocast_enabled("cpu"))
        or (kernel := kernels()) is None
    ):
        return F.linear(x, weight, bias)
    out = kernel.gemv(x.contiguous(), weight)
    return out if bias is None else out + bias
