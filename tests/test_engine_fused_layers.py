"""The native RMSNorm and SiLU MLP of training passes (trinity/engine/fused_layers.py) against
Hugging Face's Llama modules they replace.

Module level: outputs and every gradient (input, norm weight, the MLP's linears), fp32 to 1e-5
(fp32 sums in another order) and bf16 to a few bf16 roundings. Which modules are swapped: the
ones whose forward is Llama's code (Qwen2's copy included), not another norm's. Engine level: a
GRPO-shaped ``forward_backward`` on the tiny random Llama gives the same loss and gradients with
the swap as without it, LoRA and full fine-tuning, and runs the native functions for every norm
and MLP of the decoder.
"""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch
from tinker import types
from torch import nn
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm
from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

from tests.test_engine_lora_linear import datums  # GRPO-shaped, packed with shared prompts
from trinity.engine import Engine, LoraSpec, fused_layers, gemv

CONFIG = LlamaConfig(hidden_size=96, intermediate_size=160, hidden_act="silu", rms_norm_eps=1e-5)


@pytest.fixture(scope="module", autouse=True)
def native():
    gemv.build()
    assert gemv.kernels() is not None, "the native build does not load"


def tolerances(dtype: torch.dtype, reference: torch.Tensor) -> dict[str, float]:
    scale = float(reference.detach().abs().max())
    if dtype == torch.float32:
        return {"atol": 1e-5 * scale, "rtol": 1e-5}
    return {"atol": 2e-2 * scale, "rtol": 2e-2}  # a few bf16 roundings, in other places


def count_calls(monkeypatch) -> dict[str, int]:
    """Calls of the native functions, counted."""
    calls = {"norm": 0, "mlp": 0}
    for key, function in (("norm", fused_layers.RmsNorm), ("mlp", fused_layers.SiluMul)):
        real = function.apply

        def counted(*args, key=key, real=real):
            calls[key] += 1
            return real(*args)

        monkeypatch.setattr(function, "apply", counted)
    return calls


def forward_and_grads(module: nn.Module, x: torch.Tensor, fuse: bool) -> list[torch.Tensor]:
    """[y, grad x, grad of each trainable parameter] of ``sum(y * w)`` for a fixed random w."""
    module.zero_grad()
    x = x.detach().requires_grad_(True)
    with fused_layers.fused(module) if fuse else nullcontext():
        y = module(x)
    w = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y.dtype)
    (y * w).sum().backward()
    return [y, x.grad] + [p.grad for p in module.parameters() if p.requires_grad]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("module_kind", ["norm", "frozen norm", "mlp"])
def test_native_matches_the_llama_module(dtype, module_kind, monkeypatch):
    torch.manual_seed(0)
    if module_kind == "mlp":
        module = LlamaMLP(CONFIG)
    else:
        module = LlamaRMSNorm(CONFIG.hidden_size, eps=CONFIG.rms_norm_eps)
        nn.init.normal_(module.weight, 1.0, 0.3)
        module.weight.requires_grad_(module_kind == "norm")
    module.to(dtype)
    x = (2 * torch.randn(3, 37, CONFIG.hidden_size)).to(dtype)
    calls = count_calls(monkeypatch)
    got = forward_and_grads(module, x, fuse=True)
    assert sum(calls.values()) == 1, "the native function did not run"
    expected = forward_and_grads(module, x, fuse=False)
    assert sum(calls.values()) == 1
    assert "forward" not in module.__dict__  # the swap is undone
    assert len(got) == len(expected) == 2 + sum(p.requires_grad for p in module.parameters())
    for i, (g, e) in enumerate(zip(got, expected, strict=True)):
        assert g.dtype == e.dtype and g.shape == e.shape, i
        torch.testing.assert_close(g, e, **tolerances(dtype, e), msg=lambda m, i=i: f"#{i}: {m}")


class GemmaLikeNorm(LlamaRMSNorm):
    """Another norm's code (weight as 1 + w): must keep its own forward."""

    def forward(self, hidden_states):
        x = hidden_states.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return (x * (1.0 + self.weight.float())).type_as(hidden_states)


def test_only_llama_code_is_swapped():
    hooked = LlamaRMSNorm(8)
    hooked.forward = lambda x: x  # someone else's instance forward
    stack = nn.ModuleList([LlamaRMSNorm(8), Qwen2RMSNorm(8), GemmaLikeNorm(8), LlamaMLP(CONFIG)])
    stack.append(hooked)
    gelu = LlamaMLP(
        LlamaConfig(hidden_size=8, intermediate_size=16, hidden_act="gelu", num_attention_heads=2)
    )
    stack.append(gelu)
    with fused_layers.fused(stack):
        swapped = ["forward" in m.__dict__ for m in stack]
        assert hooked.forward(3) == 3
    assert swapped == [True, True, False, True, True, False]
    assert [("forward" in m.__dict__) for m in stack] == [False] * 4 + [True, False]


# ------------------------------------------------------------------ engine level


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_engine_pass_is_the_same_with_the_native_layers(tiny_model_dir, monkeypatch, lora):
    engine = Engine(str(tiny_model_dir), dtype=torch.float32)
    engine.create_model("m", LoraSpec(rank=4, seed=0) if lora else None)
    engine.forward_backward("m", datums(), "ppo")  # B away from 0, norms away from 1
    engine.optim_step("m", types.AdamParams(learning_rate=0.05))
    params = engine._models["m"].params
    calls = count_calls(monkeypatch)

    def loss_and_grads(enabled: bool):
        monkeypatch.setattr(fused_layers, "ENABLED", enabled)
        for p in params.values():
            p.grad = None
        out = engine.forward_backward("m", datums(), "ppo")
        return out.metrics["loss:sum"], {k: p.grad.clone() for k, p in params.items()}

    loss, grads = loss_and_grads(True)
    assert calls == {"norm": 2 * 2 + 1, "mlp": 2}  # every norm and MLP of the 2-layer decoder
    ref_loss, ref_grads = loss_and_grads(False)
    assert calls == {"norm": 5, "mlp": 2}
    assert loss == pytest.approx(ref_loss, rel=1e-5, abs=1e-6)
    assert grads.keys() == ref_grads.keys()
    if not lora:
        assert any("norm" in name for name in grads)  # the norms' weights train too
    for name, g in grads.items():
        e = ref_grads[name]
        atol = 2e-5 * max(1e-3, float(e.abs().max()))
        torch.testing.assert_close(g, e, atol=atol, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")
