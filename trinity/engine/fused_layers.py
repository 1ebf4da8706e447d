"""Llama-family RMSNorm and SiLU MLP of a training pass as native kernels (kernels.cpp).

Why: as torch ops an RMSNorm is ~5 elementwise passes forward (casts to fp32 and back, pow,
mean, rsqrt, products) and more backward, and the MLP's ``silu(gate) * up`` three forward and
three backward; over a 900-token GRPO pass of the demo model (61 norms, 30 MLPs) they cost
~0.3 s. Here each is one autograd function whose forward and backward are one pass over the
rows, with the ops' roundings (the fp32 reductions in another order, SiLU's exp to ~1 ulp).

``fused(decoder)`` swaps these forwards in for the modules of a decoder whose forward is exactly
Hugging Face's Llama one (the same code: Llama, Mistral, Qwen2 / 3 and others copy it), for the
duration of a pass (``Forward``: training and forward-only passes alike). A call with inputs the
kernels do not take (not on the CPU, a dtype other than fp32 / bf16, a weight of another dtype
than the input) runs the module's own forward; without the native build nothing is swapped, nor
with ``TRINITY_FUSED_LAYERS=0`` (read once, at import).
"""

from __future__ import annotations

import os
import weakref
from contextlib import contextmanager

import torch
from torch import nn
from transformers.activations import SiLUActivation
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm

from trinity.engine import gemv
from trinity.engine.lora_linear import swapped_forwards

ENABLED = os.environ.get("TRINITY_FUSED_LAYERS", "1") != "0"
_KERNEL_DTYPES = (torch.float32, torch.bfloat16)


class RmsNorm(torch.autograd.Function):
    """``LlamaRMSNorm`` over 2-D ``x_NC``: w * (x * rsqrt(mean(x^2) + eps)) in x's dtype."""

    @staticmethod
    def forward(ctx, x_NC, weight_C, eps):
        y_NC, rstd_N = gemv.kernels().norm_forward(x_NC, weight_C, eps)
        ctx.save_for_backward(x_NC, weight_C, rstd_N)
        return y_NC

    @staticmethod
    def backward(ctx, dy_NC):
        x_NC, weight_C, rstd_N = ctx.saved_tensors
        dx_NC, dw_C = gemv.kernels().norm_backward(
            dy_NC.contiguous(), x_NC, weight_C, rstd_N, ctx.needs_input_grad[1]
        )
        return dx_NC, (dw_C if ctx.needs_input_grad[1] else None), None


class SiluMul(torch.autograd.Function):
    """silu(gate) * up over 2-D ``gate_NI`` and ``up_NI``, SiLU rounded to their dtype first."""

    @staticmethod
    def forward(ctx, gate_NI, up_NI):
        ctx.save_for_backward(gate_NI, up_NI)
        return gemv.kernels().swiglu_forward(gate_NI, up_NI)

    @staticmethod
    def backward(ctx, dz_NI):
        gate_NI, up_NI = ctx.saved_tensors
        return tuple(gemv.kernels().swiglu_backward(dz_NI.contiguous(), gate_NI, up_NI))


def _native(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype in _KERNEL_DTYPES


def _rms_norm(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    weight = module.weight
    if not _native(x) or weight.dtype != x.dtype or x.shape[-1] != weight.numel():
        return type(module).forward(module, x)
    y = RmsNorm.apply(x.reshape(-1, x.shape[-1]).contiguous(), weight, module.variance_epsilon)
    return y.view(x.shape)


def _mlp(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    gate, up = module.gate_proj(x), module.up_proj(x)
    if not _native(gate) or up.dtype != gate.dtype:
        return module.down_proj(module.act_fn(gate) * up)
    width = gate.shape[-1]
    act = SiluMul.apply(gate.reshape(-1, width), up.reshape(-1, width))
    return module.down_proj(act.view(gate.shape))


def _code(method) -> tuple | None:
    code = getattr(method, "__code__", None)
    return code and (code.co_code, code.co_consts, code.co_names)


_NORM_CODE, _MLP_CODE = _code(LlamaRMSNorm.forward), _code(LlamaMLP.forward)


def _swaps(decoder: nn.Module) -> list[tuple[nn.Module, object]]:
    swaps = []
    for module in decoder.modules():
        code = _code(type(module).forward)
        if code == _NORM_CODE and hasattr(module, "variance_epsilon"):
            swaps.append((module, _rms_norm))
        elif code == _MLP_CODE and isinstance(module.act_fn, SiLUActivation | nn.SiLU):
            swaps.append((module, _mlp))
    return swaps


_SWAPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # decoder -> its swaps


@contextmanager
def fused(decoder: nn.Module):
    """Within: ``decoder``'s Llama RMSNorm and SiLU MLP modules run the native functions (see
    the module docstring); modules that already carry an instance forward are left alone."""
    if not ENABLED or gemv.kernels() is None:
        yield
        return
    if decoder not in _SWAPS:
        _SWAPS[decoder] = _swaps(decoder)
    with swapped_forwards(_SWAPS[decoder]):
        yield
