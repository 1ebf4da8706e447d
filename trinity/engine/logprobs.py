"""Target-token logprobs through the unembedding, without fp32 full-vocab logits.

``target_logprobs(hidden_NH, weight_VH, targets_N, low_NR, b_VR)`` equals
``log_softmax(hidden @ weight.T + low @ b.T).gather(targets)``; the optional low-rank term is a
LoRA on the unembedding (``low = scaling * hidden @ A.T``). The forward walks token chunks
(logits -> logsumexp -> target logit, entropy on request), holding one chunk of fp32 logits at a
time, and keeps the per-token logsumexp (and entropy) and, when gradients will be asked for, the
probabilities in the matmul dtype (N x V: 200 MB in bf16 for a 2048-token pass of a 49k
vocabulary), so the backward needs no second logits matmul (the kernel took 1.3x less time with
them; docs/benchmarks.md). An entropy only returned (``entropy_grad=False``: a logged metric) is
computed beside them; an entropy gradient, which needs log p, and a pass whose probabilities would
exceed ``KEEP_PROBS_BYTES`` recompute the logits instead.
The backward walks *vocabulary* chunks for all tokens at once, so each chunk yields its slice of
the weight gradients complete (no V x H accumulator) while the small N x H input gradients
accumulate in fp32. Gradients are computed only for inputs that need them: a frozen unembedding
under LoRA costs no weight gradient.

Matmuls run in the dtype of the inputs (bf16 where the hardware has it); softmax, logsumexp and
the gradient of the logits are fp32. Where the engine's native kernels are built (CPU, fp32 /
bf16), a chunk's logits go from the matmul straight into the kept probabilities' rows and one
kernel per chunk turns them into probabilities and per-row sums (``softmax_rows``), and one makes
the logits' gradient from the kept probabilities (``logit_grad``): the torch ops' chain of fp32
passes took a third of the unembedding's time (docs/benchmarks.md). Elsewhere the torch ops do it,
each chunk's in buffers reused over the chunks.
"""

from __future__ import annotations

import torch
from torch import Tensor

from trinity.engine import gemv, pool

CHUNK_ELEMENTS = 1 << 22  # fp32 logits per chunk: 16 MiB, reused by malloc (process.py)
# Kept probabilities per pass at most (2048 tokens x a 152k vocabulary in bf16: 0.6 GiB); a larger
# pass recomputes the logits in the backward instead.
KEEP_PROBS_BYTES = 1 << 30
# Logits per chunk in the native path (matmul dtype, no fp32 copy): up to 256 rows, whose matmul
# ran at 0.40 TFLOP/s where 85 rows ran at 0.33 (bf16, demo head), in at most 24 MiB, below
# glibc's mmap threshold (process.py), so the work buffer of a pass without kept probabilities
# is not mapped afresh each time.
NATIVE_CHUNK_ROWS, NATIVE_CHUNK_BYTES = 256, 24 << 20


def _logits_into(out, out_mm, hidden, weight, low, b, rows=slice(None), cols=slice(None)):
    """The logits of a chunk, written into ``out`` (through ``out_mm``, the matmul's output in
    the input dtype, where that is not ``out``'s)."""
    mm_out = out if out_mm is None else out_mm
    torch.mm(hidden[rows], weight[cols].T, out=mm_out)
    if low.shape[-1]:
        mm_out.addmm_(low[rows], b[cols].T)
    if out_mm is not None:
        out.copy_(out_mm)
    return out


def _workspace(hidden, rows: int, cols: int):
    """(fp32 buffer, buffer in the matmul dtype or None) for chunks of up to rows x cols."""
    out32 = hidden.new_empty(rows, cols, dtype=torch.float32)
    out16 = None if hidden.dtype == torch.float32 else hidden.new_empty(rows, cols)
    return out32, out16


def _native(hidden: Tensor):
    """The engine's native kernels (trinity/engine/kernels.cpp) where they serve this pass: on
    the CPU, in fp32 or bf16, where they are built."""
    if hidden.device.type != "cpu" or hidden.dtype not in (torch.float32, torch.bfloat16):
        return None
    return gemv.kernels()


def _softmax_rows(logits_CV, targets_C, probs_CV, logprobs_C, lse_C, entropy_C, shifted):
    """The torch ops' ``softmax_rows`` (the native kernel's): from fp32 logits (overwritten),
    each row's target logprob and log Z, the entropy where ``entropy_C`` has rows, the
    probabilities where ``probs_CV`` has rows; ``shifted``: fp32 room for the entropy's exps."""
    max_C = logits_CV.amax(dim=-1)
    target_C = logits_CV.gather(1, targets_C[:, None]).squeeze(1)
    # s = logits - max; lse = max + log sum exp(s); entropy = log Z - sum(e^s s) / Z
    s_CV = logits_CV.sub_(max_C[:, None])
    if entropy_C.numel():
        exp_CV = torch.exp(s_CV, out=shifted)
        z_C = exp_CV.sum(-1)
        if probs_CV.numel():
            torch.div(exp_CV, z_C[:, None], out=probs_CV)
        entropy_C.copy_(z_C.log() - exp_CV.mul_(s_CV).sum(-1) / z_C)
    else:
        z_C = s_CV.exp_().sum(-1)
        if probs_CV.numel():
            probs_CV.copy_(s_CV.div_(z_C[:, None]))
    lse_C.copy_(z_C.log_().add_(max_C))
    torch.sub(target_C, lse_C, out=logprobs_C)


class _TargetLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden_NH, weight_VH, low_NR, b_VR, targets_N, want_entropy, keep, fixed):
        n, vocab = hidden_NH.shape[0], weight_VH.shape[0]
        native = _native(hidden_NH)
        if native is not None:
            width = vocab * hidden_NH.element_size()
            chunk = max(1, min(NATIVE_CHUNK_ROWS, NATIVE_CHUNK_BYTES // width))
        else:
            chunk = max(1, CHUNK_ELEMENTS // vocab)
        logprobs_N = hidden_NH.new_empty(n, dtype=torch.float32)
        lse_N = hidden_NH.new_empty(n, dtype=torch.float32)
        entropy_N = hidden_NH.new_empty(n if want_entropy else 0, dtype=torch.float32)
        # Kept probabilities in a pooled buffer (trinity/engine/pool.py), given back by the
        # backward: at tens of MB, a fresh one per pass was thousands of page faults.
        ctx.pooled = (pool.free_list(), pool.take(n * vocab, hidden_NH)) if keep else None
        probs_NV = ctx.pooled[1][: n * vocab].view(n, vocab) if keep else hidden_NH.new_empty(0, 0)
        if native is not None:  # logits in the matmul dtype, into the probabilities' rows
            work = None if keep else hidden_NH.new_empty(min(chunk, n), vocab)
        else:
            work32, work16 = _workspace(hidden_NH, min(chunk, n), vocab)
            shifted = work32.new_empty(work32.shape) if want_entropy else None
        for start in range(0, n, chunk):
            rows = slice(start, min(start + chunk, n))
            size = rows.stop - start
            outs = (targets_N[rows], probs_NV[rows], logprobs_N[rows], lse_N[rows])
            if native is not None:
                logits_CV = probs_NV[rows] if keep else work[:size]
                _logits_into(logits_CV, None, hidden_NH, weight_VH, low_NR, b_VR, rows=rows)
                native.softmax_rows(logits_CV, *outs, entropy_N[rows])
            else:
                logits_CV = _logits_into(
                    work32[:size],
                    None if work16 is None else work16[:size],
                    hidden_NH,
                    weight_VH,
                    low_NR,
                    b_VR,
                    rows=rows,
                )
                extra = None if shifted is None else shifted[:size]
                _softmax_rows(logits_CV, *outs, entropy_N[rows], extra)
        ctx.save_for_backward(hidden_NH, weight_VH, low_NR, b_VR, targets_N, lse_N, entropy_N)
        # Held outside autograd's saved tensors: the buffer is the pool's once the backward has
        # given it back, and its next user's writes must not fail a later backward of this
        # graph (retain_graph), which recomputes instead.
        ctx.probs_NV = probs_NV
        ctx.set_materialize_grads(False)
        if fixed:  # returned, never differentiated: the kept probabilities have no log p
            ctx.mark_non_differentiable(entropy_N)
        return logprobs_N, entropy_N

    @staticmethod
    def backward(ctx, grad_logprobs_N, grad_entropy_N):
        hidden_NH, weight_VH, low_NR, b_VR, targets_N, lse_N, entropy_N = ctx.saved_tensors
        need = ctx.needs_input_grad
        n, vocab = hidden_NH.shape[0], weight_VH.shape[0]
        # None kept, or given back by an earlier backward: the logits are recomputed.
        probs_NV = ctx.probs_NV if ctx.pooled is not None else ctx.probs_NV[:0]
        if grad_logprobs_N is None:
            grad_logprobs_N = lse_N.new_zeros(n)
        use_entropy = grad_entropy_N is not None and entropy_N.numel() > 0
        # Rows with no incoming gradient add exact zeros (GRPO's prompt positions and its groups
        # of equal rewards have zero advantages): the backward runs over the others only.
        live_N = grad_logprobs_N != 0
        if use_entropy:
            live_N |= grad_entropy_N != 0
        full_n, keep_K = n, None
        if not bool(live_N.all()):
            keep_K = live_N.nonzero()[:, 0]
            hidden_NH, low_NR, targets_N, lse_N, grad_logprobs_N = (
                t[keep_K] for t in (hidden_NH, low_NR, targets_N, lse_N, grad_logprobs_N)
            )
            if use_entropy:
                entropy_N, grad_entropy_N = entropy_N[keep_K], grad_entropy_N[keep_K]
            n = len(keep_K)
        grad_hidden = torch.zeros(hidden_NH.shape, device=hidden_NH.device) if need[0] else None
        grad_weight = torch.empty_like(weight_VH) if need[1] else None
        grad_low = torch.zeros(low_NR.shape, device=low_NR.device) if need[2] else None
        grad_b = torch.empty_like(b_VR) if need[3] else None
        chunk = max(1, CHUNK_ELEMENTS // max(n, 1))
        g_N1 = grad_logprobs_N.float()[:, None]
        native = _native(hidden_NH) if probs_NV.numel() else None
        if native is not None:  # the logits' gradient straight from the kept probabilities
            work = hidden_NH.new_empty(n, min(chunk, vocab))
            rows_K = targets_N.new_empty(0) if keep_K is None else keep_K
            g_N = g_N1[:, 0].contiguous()
        else:
            rows_N = torch.arange(n, device=hidden_NH.device)
            work32, work16 = _workspace(hidden_NH, n, min(chunk, vocab))
            coef32 = work32.new_empty(work32.shape) if use_entropy else None
            neg_g_N1 = -g_N1
        product = hidden_NH.new_empty(hidden_NH.shape) if grad_hidden is not None else None
        for start in range(0, vocab, chunk):
            cols = slice(start, min(start + chunk, vocab))
            size = cols.stop - start
            # d logprob_t / d logit_tv = 1[v == y_t] - p_tv, times the incoming gradient g_t;
            # d entropy_t / d logit_tv = -p_tv (log p_tv + H_t), times its gradient gH_t.
            if native is not None:
                grad_NC = work[:, :size]
                native.logit_grad(probs_NV, rows_K, targets_N, g_N, start, grad_NC)
            else:
                if probs_NV.numel():  # the kept rows' chunk (the whole N x V is not copied)
                    probs_NC = probs_NV[:, cols] if keep_K is None else probs_NV[keep_K, cols]
                    grad_NC = torch.mul(probs_NC, neg_g_N1, out=work32[:, :size])
                else:
                    grad_NC = _logits_into(
                        work32[:, :size],
                        None if work16 is None else work16[:, :size],
                        hidden_NH,
                        weight_VH,
                        low_NR,
                        b_VR,
                        cols=cols,
                    )
                    grad_NC.sub_(lse_N[:, None])
                    if use_entropy:
                        coef_NC = torch.add(grad_NC, entropy_N[:, None], out=coef32[:, :size])
                        coef_NC.mul_(grad_entropy_N.float()[:, None]).add_(g_N1).neg_()
                        grad_NC.exp_().mul_(coef_NC)
                    else:
                        grad_NC.exp_().mul_(neg_g_N1)
                hit_N = (targets_N >= cols.start) & (targets_N < cols.stop)
                grad_NC[rows_N[hit_N], targets_N[hit_N] - cols.start] += g_N1[hit_N, 0]
                if work16 is not None:
                    grad_NC = work16[:, :size].copy_(grad_NC)
            if grad_hidden is not None:
                grad_hidden += torch.mm(grad_NC, weight_VH[cols], out=product)
            if grad_weight is not None:
                torch.mm(grad_NC.T, hidden_NH, out=grad_weight[cols])
            if grad_low is not None:
                grad_low += grad_NC @ b_VR[cols]
            if grad_b is not None:
                torch.mm(grad_NC.T, low_NR, out=grad_b[cols])
        if ctx.pooled is not None:  # the probabilities' last use
            pool.give_back(*ctx.pooled)
            ctx.pooled = None
        if grad_hidden is not None:
            grad_hidden = _rows_of(grad_hidden.to(hidden_NH.dtype), keep_K, full_n)
        if grad_low is not None:
            grad_low = _rows_of(grad_low.to(low_NR.dtype), keep_K, full_n)
        return grad_hidden, grad_weight, grad_low, grad_b, None, None, None, None


def _rows_of(part_KX: Tensor, keep_K: Tensor | None, n: int) -> Tensor:
    """The gradient of all ``n`` rows from that of the kept ones (zeros elsewhere)."""
    if keep_K is None:
        return part_KX
    return part_KX.new_zeros(n, part_KX.shape[1]).index_copy_(0, keep_K, part_KX)


def target_logprobs(
    hidden_NH: Tensor,
    weight_VH: Tensor,
    targets_N: Tensor,
    low_NR: Tensor | None = None,
    b_VR: Tensor | None = None,
    want_entropy: bool = False,
    entropy_grad: bool = True,
) -> tuple[Tensor, Tensor]:
    """(logprobs_N, entropy_N) in fp32; entropy is empty unless requested, and differentiable
    unless ``entropy_grad`` is False (then the backward keeps its probabilities: no second
    logits matmul).

    ``low_NR`` / ``b_VR``: an optional low-rank logit term ``low @ b.T`` (both or neither).
    """
    if low_NR is None:
        low_NR = hidden_NH.new_zeros(hidden_NH.shape[0], 0)
        b_VR = weight_VH.new_zeros(weight_VH.shape[0], 0)
    # Probabilities kept for the backward (N x V in the matmul dtype) when there will be one,
    # unless the entropy's gradient needs log p or they would be too big: then it recomputes.
    fixed = want_entropy and not entropy_grad
    keep = (
        torch.is_grad_enabled()
        and any(t.requires_grad for t in (hidden_NH, weight_VH, low_NR, b_VR))
        and (fixed or not want_entropy)
        and hidden_NH.shape[0] * weight_VH.shape[0] * hidden_NH.element_size() <= KEEP_PROBS_BYTES
    )
    return _TargetLogprobs.apply(
        hidden_NH, weight_VH, low_NR, b_VR, targets_N.contiguous(), want_entropy, keep, fixed
    )
