"""The one-row and small-M matmul kernels (trinity/engine/gemv.py, kernels.cpp) against
``F.linear``.

Shapes with a row length that is not a multiple of the kernel's 16 / 32-wide chunks and an output
count that does not split evenly over threads or 4-row tiles; fp32 to 1e-5 of the sums' size (only
the summation order differs), bf16 to one bf16 rounding of the output. The kernel must actually run (a C++ compiler is part of
this project's test environment), else these tests would only compare ``F.linear`` to itself.
The runtime path must never compile: without a build it is ``F.linear`` at once.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from trinity.engine import gemv

SHAPES = [(1, 1), (7, 64), (130, 576), (257, 1000), (4099, 96)]


@pytest.fixture(scope="module", autouse=True)
def kernel():
    """Build the kernel where this machine has none yet (minutes, once: it stays in the cache)."""
    gemv.build()
    assert gemv.available(), "the gemv kernel was built but does not load"


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gemv_equals_linear(shape, dtype):
    g = torch.Generator().manual_seed(sum(shape))
    weight = torch.randn(shape, generator=g).to(dtype)
    x = torch.randn(1, shape[1], generator=g).to(dtype)
    bias = torch.randn(shape[0], generator=g).to(dtype)
    for b in (None, bias):
        got, want = gemv.linear(x, weight, b), F.linear(x, weight, b)
        assert got.dtype == want.dtype and got.shape == want.shape
        if dtype == torch.float32:  # summation orders apart: ~1e-5 of a sum's size, sqrt(K)
            torch.testing.assert_close(got, want, atol=1e-5 * shape[1] ** 0.5, rtol=1e-5)
        else:  # one bf16 rounding apart (2^-8 relative), the fp32 sums agree to 1e-5
            torch.testing.assert_close(got.float(), want.float(), atol=1e-2, rtol=2**-7)


def small_m_rows():
    """Row counts for the small-M kernel: 2, a partial 4-row tile, 16 (a GRPO decode batch), and
    one past the last that ``linear`` sends to it."""
    return [1, 2, 5, 16, gemv.kernels().small_m + 1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [576, 100, 33, 32])
def test_small_mm_equals_linear(dtype, k):
    """``small_mm`` at every row count, K with and without a tail past the 16 / 32-wide chunks,
    O with a partial 4-row tile and not a multiple of the 64-column blocks; ``linear`` takes it
    where ``small_mm_wins`` (with the bias added after), F.linear elsewhere."""
    g = torch.Generator().manual_seed(k)
    for rows in small_m_rows():
        for out in (7, 960, 1001):
            weight = torch.randn(out, k, generator=g).to(dtype)
            x = torch.randn(rows, k, generator=g).to(dtype)
            bias = torch.randn(out, generator=g).to(dtype)
            want = F.linear(x.double(), weight.double())  # the exact sums
            got = gemv.kernels().small_mm(x, weight)
            assert got.dtype == dtype and got.shape == want.shape
            if dtype == torch.float32:
                torch.testing.assert_close(got.double(), want, atol=1e-5 * k**0.5, rtol=1e-5)
            else:  # the exact sum rounded once to bf16, up to fp32 summation order
                torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=2**-8)
            with torch.inference_mode():
                linear = gemv.linear(x, weight, bias)
            wins = gemv.kernels().small_mm_wins(rows, k, out)
            assert torch.equal(linear, got + bias) or not wins
            torch.testing.assert_close(linear, F.linear(x, weight, bias), atol=0.05, rtol=2**-7)


def test_small_mm_leaves_short_k_at_many_outputs_to_linear():
    """A LoRA B on the head (K = rank, 49152 outputs) goes to F.linear past one row; a decode
    step's base matmuls (K = hidden) and small LoRA Bs stay on the kernel."""
    wins = gemv.kernels().small_mm_wins
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert wins(1, 32, 49152) and not wins(4, 32, 49152) and not wins(16, 32, 49152)
        assert wins(16, 576, 49152) and wins(16, 96, 960) and wins(8, 64, 3072)
        assert not wins(16, 64, 3072)
    finally:
        torch.set_num_threads(threads)


def test_small_mm_empty():
    """No rows, or K = 0 (a sum of nothing: zeros), as F.linear."""
    kernel = gemv.kernels()
    assert kernel.small_mm(torch.randn(0, 5), torch.randn(7, 5)).shape == (0, 7)
    assert torch.equal(kernel.small_mm(torch.randn(3, 0), torch.randn(7, 0)), torch.zeros(3, 7))


def test_gemv_threads_split_rows_exactly():
    """The same result on 1 and 2 threads: each output is summed by one thread alone."""
    weight = torch.randn(1000, 576)
    threads = torch.get_num_threads()
    for x in (torch.randn(1, 576), torch.randn(16, 576)):
        try:
            torch.set_num_threads(1)
            one = gemv.linear(x, weight, None)
            torch.set_num_threads(2)
            two = gemv.linear(x, weight, None)
        finally:
            torch.set_num_threads(threads)
        assert torch.equal(one, two)


def test_gemv_leaves_other_calls_to_linear():
    """More rows than the small-M kernel takes, a transposed weight and autograd still give
    F.linear's results."""
    weight = torch.randn(33, 70, requires_grad=True)
    x = torch.randn(1, 70)
    out = gemv.linear(x, weight, None)
    out.sum().backward()  # autograd: F.linear, so there is a gradient
    torch.testing.assert_close(weight.grad, x.expand(33, 70))
    with torch.no_grad():
        rows = torch.randn(gemv.kernels().small_m + 1, 70)
        assert torch.equal(gemv.linear(rows, weight, None), F.linear(rows, weight))
        t = torch.randn(70, 33).t()
        assert torch.equal(gemv.linear(x, t, None), F.linear(x, t))


def test_build_dir_is_keyed_by_the_cpu(monkeypatch):
    """A cache shared by machines with other CPUs (-march=native binaries) keeps one build each."""
    here = gemv.build_dir()
    assert here.parent == gemv.cache_root() / "torch_extensions"
    monkeypatch.setattr(gemv, "_cpu_flags", lambda: "flags\t: fpu sse2")
    assert gemv.build_dir() != here


RUNTIME = """
import logging, time, torch, torch.nn.functional as F
logging.basicConfig(level=logging.INFO)
from trinity.engine import gemv
x, w = torch.randn(1, 64), torch.randn(8, 64)
start = time.perf_counter()
out = gemv.linear(x, w, None)
print(time.perf_counter() - start, gemv.available(), torch.equal(out, F.linear(x, w)))
gemv.linear(x, w, None)
"""


def test_runtime_never_compiles(tmp_path):
    """With no build in the cache, ``linear`` is F.linear at once: nothing compiled, nothing
    written to the cache, one INFO line saying how to build it (a fresh process: no loaded kernel)."""
    env = {**os.environ, "TRINITY_CACHE_DIR": str(tmp_path), "TRINITY_GEMV": "1"}
    done = subprocess.run(
        [sys.executable, "-c", RUNTIME], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    elapsed, available, same = done.stdout.split()
    assert float(elapsed) < 5 and available == "False" and same == "True"
    assert done.stderr.count("python -m trinity.engine") == 1, done.stderr
    assert list(tmp_path.iterdir()) == []
