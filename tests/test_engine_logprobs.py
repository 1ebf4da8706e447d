"""The chunked unembedding kernel (trinity/engine/logprobs.py) against a float64 log-softmax."""

from __future__ import annotations

import pytest
import torch

from trinity.engine import gemv, logprobs, pool

NATIVE = pytest.mark.skipif(not gemv.available(), reason="native kernels not built")
# Each test runs on the native kernels (trinity/engine/kernels.cpp) and on the torch ops.
PATHS = [pytest.param(True, id="native", marks=NATIVE), pytest.param(False, id="torch")]


@pytest.fixture(params=PATHS)
def path(request, monkeypatch):
    if not request.param:
        monkeypatch.setattr(logprobs, "_native", lambda hidden: None)
    return request.param


def kernel_inputs(n: int = 37, hidden: int = 24, vocab: int = 301, rank: int = 3):
    g = torch.Generator().manual_seed(0)
    hidden_NH = torch.randn(n, hidden, generator=g)
    weight_VH = torch.randn(vocab, hidden, generator=g) * 0.3
    low_NR = torch.randn(n, rank, generator=g)
    b_VR = torch.randn(vocab, rank, generator=g) * 0.3
    targets_N = torch.randint(0, vocab, (n,), generator=g)
    grad_N = torch.randn(n, generator=g)
    return (hidden_NH, weight_VH, low_NR, b_VR), targets_N, grad_N


def gradients(fn, leaves, grad_N):
    leaves = [x.detach().requires_grad_() for x in leaves]
    logprobs_N = fn(*leaves)
    logprobs_N.backward(grad_N)
    return [logprobs_N.detach(), *(x.grad for x in leaves)]


@pytest.mark.parametrize("keep_bytes", [logprobs.KEEP_PROBS_BYTES, 0])
def test_logprobs_and_every_gradient_match_log_softmax(monkeypatch, keep_bytes, path):
    """Both backwards (kept probabilities; logits recomputed when they would not fit), over
    several token and vocabulary chunks, with a low-rank logit term: fp32 to 1e-5."""
    monkeypatch.setattr(logprobs, "CHUNK_ELEMENTS", 1000)  # 3 tokens / 27 vocabulary columns
    monkeypatch.setattr(logprobs, "NATIVE_CHUNK_ROWS", 5)
    monkeypatch.setattr(logprobs, "KEEP_PROBS_BYTES", keep_bytes)
    leaves, targets_N, grad_N = kernel_inputs()

    def kernel(hidden, weight, low, b):
        return logprobs.target_logprobs(hidden, weight, targets_N, low, b)[0]

    def reference(hidden, weight, low, b):
        logits_NV = hidden @ weight.T + low @ b.T
        return logits_NV.log_softmax(-1).gather(1, targets_N[:, None]).squeeze(1)

    got = gradients(kernel, leaves, grad_N)
    expected = gradients(reference, [x.double() for x in leaves], grad_N.double())
    names = ("logprobs", "hidden", "weight", "low", "b")
    for name, a, e in zip(names, got, expected, strict=True):
        torch.testing.assert_close(
            a, e.float(), atol=1e-5, rtol=1e-5, msg=lambda m, name=name: f"{name}: {m}"
        )


class MatmulCount(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts aten.mm calls (the logits matmuls and their gradients) and their shapes."""

    def __init__(self):
        super().__init__()
        self.mm = 0
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.mm.default or func is torch.ops.aten.mm.out:
            self.mm += 1
            self.shapes.append((tuple(args[0].shape), tuple(args[1].shape)))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("keep_bytes", [logprobs.KEEP_PROBS_BYTES, 0])
@pytest.mark.parametrize("entropy_grad", [False, True])
def test_rows_without_gradient_are_left_out_of_the_backward(
    monkeypatch, keep_bytes, entropy_grad, path
):
    """Tokens whose incoming gradient is zero (a GRPO prompt, a group of equal rewards) add
    nothing: the backward's matmuls run over the other rows only, with the same gradients as the
    float64 reference; an entropy gradient keeps its rows in."""
    monkeypatch.setattr(logprobs, "CHUNK_ELEMENTS", 1000)
    monkeypatch.setattr(logprobs, "KEEP_PROBS_BYTES", keep_bytes)
    leaves, targets_N, grad_N = kernel_inputs(hidden=20)  # no size equal to a token count
    grad_N[::3] = 0.0
    grad_H = torch.zeros_like(grad_N)
    grad_H[0] = 0.5  # a row with a zero logprob gradient but an entropy one
    live = int((grad_N != 0).sum()) + entropy_grad

    def kernel(hidden, weight, low, b):
        lp, h = logprobs.target_logprobs(hidden, weight, targets_N, low, b, True, entropy_grad)
        return lp, h

    def reference(hidden, weight, low, b):
        logp_NV = (hidden @ weight.T + low @ b.T).log_softmax(-1)
        return logp_NV.gather(1, targets_N[:, None]).squeeze(1), -(logp_NV.exp() * logp_NV).sum(-1)

    got_leaves = [x.detach().requires_grad_() for x in leaves]
    lp, h = kernel(*got_leaves)
    with MatmulCount() as count:
        torch.autograd.backward(
            [lp, h] if entropy_grad else [lp], [grad_N, grad_H][: 1 + entropy_grad]
        )
    want_leaves = [x.double().detach().requires_grad_() for x in leaves]
    lp64, h64 = reference(*want_leaves)
    torch.autograd.backward(
        [lp64, h64] if entropy_grad else [lp64],
        [grad_N.double(), grad_H.double()][: 1 + entropy_grad],
    )
    for name, a, e in zip(("hidden", "weight", "low", "b"), got_leaves, want_leaves, strict=True):
        torch.testing.assert_close(
            a.grad, e.grad.float(), atol=1e-5, rtol=1e-5, msg=lambda m, name=name: f"{name}: {m}"
        )
    dims = [set(x) | set(y) for x, y in count.shapes]
    assert dims and all(live in d and len(grad_N) not in d for d in dims)


def test_a_returned_entropy_keeps_the_probabilities(monkeypatch, path):
    """An entropy returned without its gradient (a logged metric): the same entropy and
    gradients as the differentiable one, the backward on kept probabilities (as many matmuls
    as without any entropy: no logits recomputed), and no gradient path through it."""
    monkeypatch.setattr(logprobs, "CHUNK_ELEMENTS", 1000)
    leaves, targets_N, grad_N = kernel_inputs()
    results = {}
    for mode, (want, grad) in {"none": (False, True), "grad": (True, True)}.items():
        results[mode] = run_counted(leaves, targets_N, grad_N, want, grad)
    returned = run_counted(leaves, targets_N, grad_N, True, False)
    assert not returned["entropy"].requires_grad
    torch.testing.assert_close(returned["entropy"], results["grad"]["entropy"].detach())
    for key in ("logprobs", "grads"):
        torch.testing.assert_close(returned[key], results["grad"][key], atol=1e-5, rtol=1e-5)
    assert returned["backward_mm"] == results["none"]["backward_mm"]
    assert results["grad"]["backward_mm"] > returned["backward_mm"]  # it recomputes


def run_counted(leaves, targets_N, grad_N, want_entropy, entropy_grad):
    leaves = [x.detach().requires_grad_() for x in leaves]
    logprobs_N, entropy_N = logprobs.target_logprobs(
        *leaves[:2], targets_N, *leaves[2:], want_entropy, entropy_grad
    )
    with MatmulCount() as count:
        logprobs_N.backward(grad_N)
    return {
        "logprobs": logprobs_N.detach(),
        "entropy": entropy_N,
        "grads": torch.cat([x.grad.flatten() for x in leaves]),
        "backward_mm": count.mm,
    }


@NATIVE
@pytest.mark.parametrize("entropy_grad", [False, True])
def test_native_kernels_give_the_torch_ops_numbers_in_bf16(monkeypatch, entropy_grad):
    """In bf16 (probabilities kept in bf16, the logits' gradient rounded to it) the native
    kernels and the torch ops agree to fp32 rounding: the same formulas, only the summation
    order and exp's last bits differ."""
    leaves, targets_N, grad_N = kernel_inputs(n=40, hidden=32, vocab=3000)
    leaves = [x.bfloat16() for x in leaves]
    grad_N[::4] = 0.0
    results = {}
    for native in (True, False):
        if not native:
            monkeypatch.setattr(logprobs, "_native", lambda hidden: None)
        results[native] = run_counted(leaves, targets_N, grad_N, True, entropy_grad)
    for key in ("logprobs", "entropy"):
        torch.testing.assert_close(results[True][key], results[False][key], atol=2e-5, rtol=1e-5)
    grads, reference = results[True]["grads"].float(), results[False]["grads"].float()
    assert (grads - reference).abs().max() <= 0.01 * reference.abs().max()


def test_kept_probabilities_go_back_to_the_pool(path):
    """The probabilities' buffer is taken from the thread's pool and given back by the backward
    (the next pass reuses it: no fresh pages); a second backward of the same graph
    (retain_graph) recomputes the logits instead of reading a buffer already given back."""
    leaves, targets_N, grad_N = kernel_inputs(vocab=3001)
    pool.free_list().clear()
    leaves = [x.detach().requires_grad_() for x in leaves]
    logprobs_N, _ = logprobs.target_logprobs(*leaves[:2], targets_N, *leaves[2:])
    assert not pool.free_list()  # in use by the graph
    logprobs_N.backward(grad_N, retain_graph=True)
    (buffer,) = pool.free_list()
    first = [x.grad.clone() for x in leaves]
    buffer.fill_(float("nan"))  # another pass writing its probabilities there
    for x in leaves:
        x.grad = None
    logprobs_N.backward(grad_N)
    for a, b in zip(first, (x.grad for x in leaves), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    again, _ = logprobs.target_logprobs(*leaves[:2], targets_N, *leaves[2:])
    assert not pool.free_list()  # the next pass took the same buffer
    again.backward(grad_N)
    assert pool.free_list()[0].data_ptr() == buffer.data_ptr()


@NATIVE
def test_a_target_outside_the_vocabulary_is_an_error():
    leaves, targets_N, _ = kernel_inputs()
    targets_N[3] = 301
    with pytest.raises(RuntimeError, match="target token 301 outside the vocabulary of 301"):
        logprobs.target_logprobs(*leaves[:2], targets_N, *leaves[2:])
