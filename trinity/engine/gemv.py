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
It is compiled once per machine into ``$TRINITY_CACHE_DIR/torch_extensions`` (default
``~/.cache/trinity``); where that fails (no C++ compiler) ``linear`` is ``F.linear``.
``TRINITY_GEMV=0`` turns it off.
"""

from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F

from trinity.engine.demo_model import cache_root

log = logging.getLogger(__name__)

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cstring>
#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

static inline float widen(uint16_t b) {
    uint32_t u = uint32_t(b) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

// One weight row after another (one sequential stream for the prefetchers), 64 partial sums
// per row so the compiler keeps several vector accumulators in flight.
static void rows_f32(const float* w, const float* x, float* y, int64_t n, int64_t b, int64_t e) {
    for (int64_t o = b; o < e; ++o) {
        const float* wr = w + o * n;
        float acc[64] = {0};
        int64_t i = 0;
        for (; i + 64 <= n; i += 64) {
#pragma omp simd
            for (int64_t j = 0; j < 64; ++j) acc[j] += wr[i + j] * x[i + j];
        }
        float a = 0;
        for (int64_t j = 0; j < 64; ++j) a += acc[j];
        for (; i < n; ++i) a += wr[i] * x[i];
        y[o] = a;
    }
}

// bf16 weights and input: with AVX512-BF16, pairs of bf16 products summed into fp32 lanes
// (vdpbf16ps); otherwise each bf16 widened to fp32 by a shift.
static void rows_bf16(const uint16_t* w, const uint16_t* x, float* y, int64_t n, int64_t b,
                      int64_t e) {
    for (int64_t o = b; o < e; ++o) {
        const uint16_t* wr = w + o * n;
        int64_t i = 0;
        float a = 0;
#if defined(__AVX512BF16__)
        __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
        for (; i + 64 <= n; i += 64) {
            acc0 = _mm512_dpbf16_ps(acc0, (__m512bh)_mm512_loadu_si512(wr + i),
                                    (__m512bh)_mm512_loadu_si512(x + i));
            acc1 = _mm512_dpbf16_ps(acc1, (__m512bh)_mm512_loadu_si512(wr + i + 32),
                                    (__m512bh)_mm512_loadu_si512(x + i + 32));
        }
        a = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
#else
        float acc[64] = {0};
        for (; i + 64 <= n; i += 64) {
#pragma omp simd
            for (int64_t j = 0; j < 64; ++j) acc[j] += widen(wr[i + j]) * widen(x[i + j]);
        }
        for (int64_t j = 0; j < 64; ++j) a += acc[j];
#endif
        for (; i < n; ++i) a += widen(wr[i]) * widen(x[i]);
        y[o] = a;
    }
}

// x [1, n] and w [out, n] contiguous, both fp32 or both bf16; returns x @ w.T in their dtype.
torch::Tensor gemv(torch::Tensor x, torch::Tensor w) {
    const int64_t n = w.size(1), out = w.size(0);
    auto y = torch::empty({1, out}, x.options().dtype(torch::kFloat32));
    float* yp = y.data_ptr<float>();
    // At least 64 rows per thread: smaller chunks cost more to hand out than they share.
    at::parallel_for(0, out, 64, [&](int64_t b, int64_t e) {
        if (w.scalar_type() == torch::kBFloat16)
            rows_bf16(reinterpret_cast<const uint16_t*>(w.data_ptr()),
                      reinterpret_cast<const uint16_t*>(x.data_ptr()), yp, n, b, e);
        else
            rows_f32(w.data_ptr<float>(), x.data_ptr<float>(), yp, n, b, e);
    });
    return w.scalar_type() == torch::kBFloat16 ? y.to(torch::kBFloat16) : y;
}
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("gemv", &gemv); }
"""

_KERNEL: object = None  # the compiled module; False once building it failed


def _kernel():
    global _KERNEL
    if _KERNEL is None:
        _KERNEL = False
        if os.environ.get("TRINITY_GEMV", "1") != "0":
            from torch.utils.cpp_extension import load_inline

            build = cache_root() / "torch_extensions" / "trinity_gemv"
            build.mkdir(parents=True, exist_ok=True)
            try:
                _KERNEL = load_inline(
                    "trinity_gemv",
                    _SOURCE,
                    functions=None,
                    extra_cflags=["-O3", "-march=native", "-fopenmp-simd"],
                    build_directory=str(build),
                )
            except Exception as error:  # no compiler, or one that rejects the flags
                log.warning("gemv kernel unavailable (%s); one-row matmuls use F.linear", error)
    return _KERNEL or None


def available() -> bool:
    """Whether the kernel is built (building it on first call)."""
    return _kernel() is not None


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
        or (kernel := _kernel()) is None
    ):
        return F.linear(x, weight, bias)
    out = kernel.gemv(x.contiguous(), weight)
    return out if bias is None else out + bias
