"""A fused LoRA linear for the engine's training passes: y = x W^T (+ bias) + s (x A^T) B^T.

Why: peft's ``lora.Linear.forward`` (base output, then ``lora_B(lora_A(x)) * scaling`` and an
add) costs a scale multiply and an add over every [N, out] output, dtype casts, and in the
backward a second full input gradient that autograd sums with the base one. In a GRPO-shaped
LoRA pass of the demo model that elementwise work was ~200 ms of the step. Here the low-rank
product goes into the base output with one ``addmm_`` (alpha = scaling), A and B are cast to the
compute dtype once, and the backward accumulates grad_x = g W + s (g B) A in one tensor; A and B
get their gradients in their own dtype (fp32), so accumulation across micro-batches is as before.
The frozen base weight and bias get none.

``fused(layers)`` swaps it in as the forward of peft ``lora.Linear`` layers for the duration of
a training pass (``Engine.forward_backward``); each call checks that it is exactly peft's
computation (``_fusable``) and otherwise runs peft's own forward. Sampling, the decode layout
(fast_decode reads ``lora_A`` / ``lora_B`` / ``scaling``) and checkpoints never see it.
``TRINITY_FUSED_LORA=0`` (read once, at import) turns it off.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch
from torch import nn

ENABLED = os.environ.get("TRINITY_FUSED_LORA", "1") != "0"


class LoraLinear(torch.autograd.Function):
    """x_NI W_OI^T (+ bias_O) + scaling (x A_RI^T) B_OR^T over 2-D ``x_NI`` in its dtype;
    gradients for x, A and B only (A and B in their own dtype)."""

    @staticmethod
    def forward(ctx, x_NI, weight_OI, bias_O, a_RI, b_OR, scaling):
        a_dRI, b_dOR = a_RI.to(x_NI.dtype), b_OR.to(x_NI.dtype)
        low_NR = x_NI @ a_dRI.T
        if bias_O is None:
            y_NO = x_NI @ weight_OI.T
        else:
            y_NO = torch.addmm(bias_O, x_NI, weight_OI.T)
        y_NO.addmm_(low_NR, b_dOR.T, alpha=scaling)
        ctx.save_for_backward(x_NI, weight_OI, a_dRI, b_dOR, low_NR)
        ctx.scaling = scaling
        ctx.param_dtypes = a_RI.dtype, b_OR.dtype
        return y_NO

    @staticmethod
    def backward(ctx, g_NO):
        x_NI, weight_OI, a_dRI, b_dOR, low_NR = ctx.saved_tensors
        s = ctx.scaling
        need_x, _, _, need_a, need_b, _ = ctx.needs_input_grad
        grad_x = grad_a = grad_b = None
        if need_x or need_a:
            gb_NR = g_NO @ b_dOR  # (g B), s applied by the consumers
        if need_x:
            grad_x = torch.mm(g_NO, weight_OI).addmm_(gb_NR, a_dRI, alpha=s)
        if need_a:
            grad_a = (gb_NR.T @ x_NI).to(ctx.param_dtypes[0]).mul_(s)
        if need_b:
            grad_b = (g_NO.T @ low_NR).to(ctx.param_dtypes[1]).mul_(s)
        return grad_x, None, None, grad_a, grad_b, None


def lora_linear(x, weight_OI, bias_O, a_RI, b_OR, scaling: float) -> torch.Tensor:
    """``LoraLinear`` over ``x`` [..., I] in the compute dtype: autocast's where it is on (as
    ``F.linear`` would cast), else ``x``'s."""
    kind = x.device.type
    dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype
    weight_OI = weight_OI.to(dtype)
    bias_O = None if bias_O is None else bias_O.to(dtype)
    y_NO = LoraLinear.apply(
        x.to(dtype).reshape(-1, x.shape[-1]), weight_OI, bias_O, a_RI, b_OR, scaling
    )
    return y_NO.view(*x.shape[:-1], weight_OI.shape[0])


def _fusable(layer, x: torch.Tensor, args, kwargs) -> str | None:
    """The one active adapter when ``layer``'s peft forward is plain LoRA on an ``nn.Linear``
    (no dropout, DoRA, LoRA bias or other variant, not merged or disabled, no extra arguments,
    frozen base, gradients on, dtypes peft would not reject), else None."""
    if args or kwargs or not torch.is_grad_enabled() or layer.disable_adapters or layer.merged:
        return None
    active = layer.active_adapters
    if len(active) != 1 or active[0] not in layer.lora_A:
        return None
    adapter = active[0]
    base = layer.base_layer
    if (
        type(base) is not nn.Linear
        or base.weight.requires_grad
        or (base.bias is not None and base.bias.requires_grad)
        or adapter in layer.lora_variant
        or layer.use_dora.get(adapter, False)
        or type(layer.lora_dropout[adapter]) is not nn.Identity
        or layer.lora_B[adapter].bias is not None
        or layer.lora_A[adapter].bias is not None
    ):
        return None
    if not torch.is_autocast_enabled(x.device.type) and not (
        x.dtype == base.weight.dtype == layer.lora_A[adapter].weight.dtype
    ):
        return None  # peft would cast (or fail); leave that to it
    return adapter


def _forward(layer, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    adapter = _fusable(layer, x, args, kwargs)
    if adapter is None:
        return type(layer).forward(layer, x, *args, **kwargs)
    base = layer.base_layer
    return lora_linear(
        x,
        base.weight,
        base.bias,
        layer.lora_A[adapter].weight,
        layer.lora_B[adapter].weight,
        layer.scaling[adapter],
    )


@contextmanager
def swapped_forwards(pairs):
    """Within: the module of each (module, function) pair runs ``function`` as its forward;
    a module that already carries an instance forward (someone else's hook) is left alone."""
    swapped = []
    for module, forward in pairs:
        if "forward" not in module.__dict__:
            module.forward = forward.__get__(module)
            swapped.append(module)
    try:
        yield
    finally:
        for module in swapped:
            del module.forward


def fused(layers):
    """Within: ``layers`` (peft ``lora.Linear`` modules) run ``_forward``."""
    return swapped_forwards([(layer, _forward) for layer in layers] if ENABLED else [])
