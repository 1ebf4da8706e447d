"""The matmul of a decode step (``x @ W.T`` with ``x`` of a few rows: the batch), at the machine's
bounds where PyTorch's CPU paths fall far short of them.

Why: a decode step is a chain of such matmuls over weights that do not fit in cache. At one row
it is a gemv whose speed is how fast it reads memory: measured on an AMD EPYC (Zen 4, 1 thread),
an fp32 ``F.linear`` read 8.7 GB/s where a plain read reached 24 GB/s, a bf16 one 4.3 GB/s (its
bf16 gemv converts element by element). At a GRPO batch of 16 rows oneDNN's matmul ran at a third
of the bf16 peak (the demo model's [16, 576] x [576, 49152] head at 0.14 TFLOP/s on 2 threads)
and each small LoRA term cost 17-35 us of call overhead: 84 % of a batch-16 step was matmuls.

The kernel (``small_mm``, trinity/engine/kernels.cpp): tiles of 4 weight rows x 4 ``x`` rows of
fp32 accumulators (bf16 pairs by ``vdpbf16ps`` where the CPU has AVX512-BF16, else widened by a
shift), so each weight chunk read from memory serves every row of ``x``; the output rounded to
the input dtype as ``F.linear`` does; vectorized for the machine it is built on (``-O3
-march=native``), output columns split over torch's own intra-op threads (``at::parallel_for``,
no second thread pool). Where ``F.linear`` is faster (more than ``small_m`` rows; a LoRA B's
short K at more than a few rows) ``small_mm_wins`` says so and ``linear`` leaves it to it.

Built at install time, never during a run (compiling takes ~1.5 min on 2 cores, which would
stall a sampling call): ``python -m trinity.engine`` (run by scripts/setup.sh when missing)
compiles it into ``$TRINITY_CACHE_DIR/torch_extensions/trinity_gemv-<key>`` (default
``~/.cache/trinity``), the key a hash of the CPU flags, torch / Python versions and the source, so
machines sharing the cache each get their own binary. At run time ``linear`` only loads a build;
without one (or with no C++ compiler at setup) it is ``F.linear``, said once in the log at INFO.
``TRINITY_GEMV=0`` turns it off (the module keeps its first name, from when it was a gemv).

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
    """The built extension (``small_mm``, the fused decode kernels, ``decode_step``), loaded on first
    use (never compiled here), or None where it is not built for this machine or turned off."""
    global _KERNEL
    if _KERNEL is None:
        _KERNEL = False
        library = library_path()
        if os.environ.get("TRINITY_GEMV", "1") == "0":
            return None
        if not library.exists():
            log.info(
                "gemv kernel not built for this machine: decode matmuls use F.linear "
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
    """``F.linear(x, weight, bias)``, through the kernel where it wins (``small_mm_wins``: a few
    rows, a decode step's batch) on a CPU fp32 / bf16 matmul of matching dtypes, outside
    autograd, an fp32-weight autocast region (that would compute in the autocast dtype) and
    torch.compile (which traces ``F.linear``). The bias is added after the product's rounding."""
    if (
        torch.compiler.is_compiling()
        or x.dim() != 2
        or x.device.type != "cpu"
        or weight.dtype not in (torch.float32, torch.bfloat16)
        or x.dtype != weight.dtype
        or not weight.is_contiguous()
        or (torch.is_grad_enabled() and (weight.requires_grad or x.requires_grad))
        or (weight.dtype == torch.float32 and torch.is_autocast_enabled("cpu"))
        or (kernel := kernels()) is None
        or not kernel.small_mm_wins(x.shape[0], x.shape[1], weight.shape[0])
    ):
        return F.linear(x, weight, bias)
    out = kernel.small_mm(x.contiguous(), weight)
    return out if bias is None else out + bias
