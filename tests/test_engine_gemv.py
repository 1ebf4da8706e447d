"""The one-row matmul kernel (trinity/engine/gemv.py) against ``F.linear``.

Shapes with a row length that is not a multiple of the kernel's 64-wide blocks and an output
count that does not split evenly over threads; fp32 to 1e-5 (only the summation order differs),
bf16 to one bf16 rounding of the output. The kernel must actually run (a C++ compiler is part of
this project's test environment), else these tests would only compare ``F.linear`` to itself.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from trinity.engine import gemv

SHAPES = [(1, 1), (7, 64), (130, 576), (257, 1000), (4099, 96)]


@pytest.fixture(scope="module", autouse=True)
def kernel():
    assert gemv.available(), "the gemv kernel did not build (see the warning in the log)"


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
        if dtype == torch.float32:
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        else:  # one bf16 rounding apart (2^-8 relative), the fp32 sums agree to 1e-5
            torch.testing.assert_close(got.float(), want.float(), atol=1e-2, rtol=2**-7)


def test_gemv_threads_split_rows_exactly():
    """The same result on 1 and 2 threads: each output row is summed by one thread alone."""
    weight = torch.randn(1000, 576)
    x = torch.randn(1, 576)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = gemv.linear(x, weight, None)
        torch.set_num_threads(2)
        two = gemv.linear(x, weight, None)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


def test_gemv_leaves_other_calls_to_linear():
    """Several rows, a transposed weight and autograd still give F.linear's results."""
    weight = torch.randn(33, 70, requires_grad=True)
    x = torch.randn(1, 70)
    out = gemv.linear(x, weight, None)
    out.sum().backward()  # autograd: F.linear, so there is a gradient
    torch.testing.assert_close(weight.grad, x.expand(33, 70))
    with torch.no_grad():
        rows = torch.randn(3, 70)
        assert torch.equal(gemv.linear(rows, weight, None), F.linear(rows, weight))
        t = torch.randn(70, 33).t()
        assert torch.equal(gemv.linear(x, t, None), F.linear(x, t))
