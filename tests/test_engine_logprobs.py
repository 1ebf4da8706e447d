"""The chunked unembedding kernel (trinity/engine/logprobs.py) against a float64 log-softmax."""

from __future__ import annotations

import pytest
import torch

from trinity.engine import logprobs


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
def test_logprobs_and_every_gradient_match_log_softmax(monkeypatch, keep_bytes):
    """Both backwards (kept probabilities; logits recomputed when they would not fit), over
    several token and vocabulary chunks, with a low-rank logit term: fp32 to 1e-5."""
    monkeypatch.setattr(logprobs, "CHUNK_ELEMENTS", 1000)  # 3 tokens / 27 vocabulary columns
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
    """Counts aten.mm calls (the logits matmuls and their gradients)."""

    def __init__(self):
        super().__init__()
        self.mm = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.mm += func is torch.ops.aten.mm.default or func is torch.ops.aten.mm.out
        return func(*args, **(kwargs or {}))


def test_a_returned_entropy_keeps_the_probabilities(monkeypatch):
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
