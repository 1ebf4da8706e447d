"""Target-token logprobs through the unembedding, without materializing full-vocab logits.

``target_logprobs(hidden_NH, weight_VH, targets_N, low_NR, b_VR)`` equals
``log_softmax(hidden @ weight.T + low @ b.T).gather(targets)``; the optional low-rank term is a
LoRA on the unembedding (``low = scaling * hidden @ A.T``). It holds at most one chunk of fp32
logits at a time: the forward walks token chunks (logits -> logsumexp -> target logit, entropy on
request) and keeps only the per-token logsumexp (and entropy); the backward recomputes logits over *vocabulary*
chunks for all tokens at once, so each chunk yields its slice of the weight gradients complete
(no V x H accumulator) while the small N x H input gradients accumulate in fp32. Gradients are
computed only for inputs that need them: a frozen unembedding under LoRA costs no weight
gradient.

Matmuls run in the dtype of the inputs (bf16 where the hardware has it); softmax, logsumexp and
the gradient of the logits are fp32.
"""

from __future__ import annotations

import torch
from torch import Tensor

CHUNK_ELEMENTS = 1 << 22  # fp32 logits per chunk: 16 MiB, reused by malloc (process.py)


def _logits(hidden, weight, low, b, rows=slice(None), cols=slice(None)) -> Tensor:
    logits = hidden[rows] @ weight[cols].T
    if low.shape[-1]:
        logits += low[rows] @ b[cols].T
    return logits.float()


class _TargetLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden_NH, weight_VH, low_NR, b_VR, targets_N, want_entropy):
        n, vocab = hidden_NH.shape[0], weight_VH.shape[0]
        chunk = max(1, CHUNK_ELEMENTS // vocab)
        logprobs_N = hidden_NH.new_empty(n, dtype=torch.float32)
        lse_N = hidden_NH.new_empty(n, dtype=torch.float32)
        entropy_N = hidden_NH.new_empty(n if want_entropy else 0, dtype=torch.float32)
        for start in range(0, n, chunk):
            rows = slice(start, min(start + chunk, n))
            logits_CV = _logits(hidden_NH, weight_VH, low_NR, b_VR, rows=rows)
            lse_C = torch.logsumexp(logits_CV, dim=-1)
            lse_N[rows] = lse_C
            logprobs_N[rows] = logits_CV.gather(1, targets_N[rows, None]).squeeze(1) - lse_C
            if want_entropy:
                probs_CV = (logits_CV - lse_C[:, None]).exp_()
                entropy_N[rows] = lse_C - (probs_CV * logits_CV).sum(-1)
        ctx.save_for_backward(hidden_NH, weight_VH, low_NR, b_VR, targets_N, lse_N, entropy_N)
        ctx.set_materialize_grads(False)
        return logprobs_N, entropy_N

    @staticmethod
    def backward(ctx, grad_logprobs_N, grad_entropy_N):
        hidden_NH, weight_VH, low_NR, b_VR, targets_N, lse_N, entropy_N = ctx.saved_tensors
        need = ctx.needs_input_grad
        n, vocab = hidden_NH.shape[0], weight_VH.shape[0]
        grad_hidden = torch.zeros(hidden_NH.shape, device=hidden_NH.device) if need[0] else None
        grad_weight = torch.empty_like(weight_VH) if need[1] else None
        grad_low = torch.zeros(low_NR.shape, device=low_NR.device) if need[2] else None
        grad_b = torch.empty_like(b_VR) if need[3] else None
        chunk = max(1, CHUNK_ELEMENTS // max(n, 1))
        if grad_logprobs_N is None:
            grad_logprobs_N = lse_N.new_zeros(n)
        g_N1 = grad_logprobs_N.float()[:, None]
        use_entropy = grad_entropy_N is not None and entropy_N.numel() > 0
        rows_N = torch.arange(n, device=hidden_NH.device)
        for start in range(0, vocab, chunk):
            cols = slice(start, min(start + chunk, vocab))
            # d logprob_t / d logit_tv = 1[v == y_t] - p_tv, times the incoming gradient g_t;
            # d entropy_t / d logit_tv = -p_tv (log p_tv + H_t), times its gradient gH_t.
            grad_NC = _logits(hidden_NH, weight_VH, low_NR, b_VR, cols=cols)
            grad_NC.sub_(lse_N[:, None])
            if use_entropy:
                coef_NC = (grad_NC + entropy_N[:, None]).mul_(grad_entropy_N.float()[:, None])
                grad_NC.exp_().mul_(-(coef_NC.add_(g_N1)))
            else:
                grad_NC.exp_().mul_(-g_N1)
            hit_N = (targets_N >= cols.start) & (targets_N < cols.stop)
            grad_NC[rows_N[hit_N], targets_N[hit_N] - cols.start] += g_N1[hit_N, 0]
            grad_NC = grad_NC.to(hidden_NH.dtype)
            if grad_hidden is not None:
                grad_hidden += grad_NC @ weight_VH[cols]
            if grad_weight is not None:
                torch.mm(grad_NC.T, hidden_NH, out=grad_weight[cols])
            if grad_low is not None:
                grad_low += grad_NC @ b_VR[cols]
            if grad_b is not None:
                torch.mm(grad_NC.T, low_NR, out=grad_b[cols])
        if grad_hidden is not None:
            grad_hidden = grad_hidden.to(hidden_NH.dtype)
        if grad_low is not None:
            grad_low = grad_low.to(low_NR.dtype)
        return grad_hidden, grad_weight, grad_low, grad_b, None, None


def target_logprobs(
    hidden_NH: Tensor,
    weight_VH: Tensor,
    targets_N: Tensor,
    low_NR: Tensor | None = None,
    b_VR: Tensor | None = None,
    want_entropy: bool = False,
) -> tuple[Tensor, Tensor]:
    """(logprobs_N, entropy_N) in fp32; entropy (differentiable) is empty unless requested.

    ``low_NR`` / ``b_VR``: an optional low-rank logit term ``low @ b.T`` (both or neither).
    """
    if low_NR is None:
        low_NR = hidden_NH.new_zeros(hidden_NH.shape[0], 0)
        b_VR = weight_VH.new_zeros(weight_VH.shape[0], 0)
    return _TargetLogprobs.apply(hidden_NH, weight_VH, low_NR, b_VR, targets_N, want_entropy)
