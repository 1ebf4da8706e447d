"""The fused LoRA linear (trinity/engine/lora_linear.py) against peft's ``lora.Linear.forward``.

Layer level: outputs and the gradients of x, A and B, fp32 (tolerances: fp32 sums in another
order) and bf16 under autocast (tolerances: a few bf16 roundings, ~1 % of the largest entry).
Engine level: ``forward_backward`` on the tiny random Llama gives the same loss and adapter
gradients fused as with peft's forward, the fused path is taken for every decoder LoRA linear,
and an adapter with dropout falls back to peft.
"""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import Linear as PeftLinear
from tinker import types
from torch import nn

from trinity.engine import Engine, LoraSpec, lora_linear

IN, OUT, RANK, ALPHA = 48, 80, 4, 8.0


class Tiny(nn.Module):
    def __init__(self, bias: bool):
        super().__init__()
        self.proj = nn.Linear(IN, OUT, bias=bias)

    def forward(self, x):
        return self.proj(x)


def peft_layer(bias: bool, base_dtype: torch.dtype) -> PeftLinear:
    """A peft ``lora.Linear`` set up as the engine sets its layers (adapters.py): frozen base in
    ``base_dtype``, fp32 factors, B random so the low-rank term matters."""
    torch.manual_seed(0)
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["proj"], lora_dropout=0.0)
    model = get_peft_model(Tiny(bias), config).eval()
    layer = model.base_model.model.proj
    layer.base_layer.to(base_dtype).requires_grad_(False)
    nn.init.normal_(layer.lora_B["default"].weight, std=0.5)
    layer.cast_input_dtype_enabled = base_dtype == torch.float32
    return layer


def run(layer: PeftLinear, x: torch.Tensor, fuse: bool, autocast: bool):
    """(y, grad x, grad A, grad B) of ``sum(y * w)`` for a fixed random ``w``."""
    layer.zero_grad()
    x = x.detach().requires_grad_(True)
    with (
        lora_linear.fused([layer] if fuse else []),
        torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast),
    ):
        y = layer(x)
    w = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y.dtype)
    (y * w).sum().backward()
    return y, x.grad, layer.lora_A["default"].weight.grad, layer.lora_B["default"].weight.grad


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_fused_matches_peft_forward_and_gradients(bias, precision, monkeypatch):
    monkeypatch.setattr(lora_linear, "ENABLED", True)
    bf16 = precision == "bf16"
    layer = peft_layer(bias, torch.bfloat16 if bf16 else torch.float32)
    x = torch.randn(1, 37, IN, generator=torch.Generator().manual_seed(2))
    x = x.to(torch.bfloat16) if bf16 else x
    calls = []
    real = lora_linear.lora_linear
    monkeypatch.setattr(lora_linear, "lora_linear", lambda *a: calls.append(1) or real(*a))
    got = run(layer, x, fuse=True, autocast=bf16)
    assert len(calls) == 1, "the fused path was not taken"
    expected = run(layer, x, fuse=False, autocast=bf16)
    assert len(calls) == 1
    assert "forward" not in layer.__dict__  # the swap is undone
    for name, g, e in zip(("y", "grad x", "grad A", "grad B"), got, expected, strict=True):
        assert g.dtype == e.dtype and g.shape == e.shape, name
        scale = float(e.detach().abs().max())
        if bf16:  # each side rounds to bf16 a few times, in different places
            tol = {"atol": 1.5e-2 * scale, "rtol": 2e-2}
        else:
            tol = {"atol": 1e-5 * scale, "rtol": 1e-5}
        torch.testing.assert_close(g, e, **tol, msg=lambda m, n=name: f"{n}: {m}")
    assert got[2].dtype == got[3].dtype == torch.float32  # fp32 factor gradients


def test_no_gradient_for_an_input_that_needs_none():
    """The first decoder layer's input needs no gradient: only A and B get one."""
    layer = peft_layer(False, torch.float32)
    x = torch.randn(1, 5, IN)
    with lora_linear.fused([layer]):
        y = layer(x)
    y.sum().backward()
    assert layer.lora_A["default"].weight.grad is not None
    assert layer.base_layer.weight.grad is None


# ------------------------------------------------------------------ engine level


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return Engine(str(tiny_model_dir), dtype=torch.float32)


def datums(seed: int = 0) -> list[types.Datum]:
    """GRPO-shaped: two prompts of four samples each (packed with a shared prefix)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(2):
        prompt = torch.randint(0, 49152, (12,), generator=g).tolist()
        for s in range(4):
            seq = prompt + torch.randint(0, 49152, (5 + 3 * s,), generator=g).tolist()
            m = len(seq) - 1
            adv = [0.0] * 11 + [0.5 if s % 2 else -0.5] * (m - 11)
            out.append(
                types.Datum(
                    model_input=types.ModelInput.from_ints(seq[:-1]),
                    loss_fn_inputs={
                        "target_tokens": seq[1:],
                        "logprobs": [-11.0] * m,
                        "advantages": adv,
                    },
                )
            )
    return out


def count_paths(monkeypatch) -> dict[str, int]:
    """Calls of the fused path and of peft's own forward, counted."""
    counts = {"fused": 0, "peft": 0}
    fused, peft_forward = lora_linear.lora_linear, PeftLinear.forward

    def counted_fused(*args):
        counts["fused"] += 1
        return fused(*args)

    def counted_peft(self, *args, **kwargs):
        counts["peft"] += 1
        return peft_forward(self, *args, **kwargs)

    monkeypatch.setattr(lora_linear, "lora_linear", counted_fused)
    monkeypatch.setattr(PeftLinear, "forward", counted_peft)
    return counts


def loss_and_grads(engine: Engine, model_id: str) -> tuple[float, dict[str, torch.Tensor]]:
    params = engine._models[model_id].params
    for p in params.values():
        p.grad = None
    config = {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}
    out = engine.forward_backward(model_id, datums(), "ppo", config)
    return out.metrics["loss:sum"], {k: p.grad.clone() for k, p in params.items()}


def trained(engine: Engine, model_id: str) -> None:
    """A LoRA on every target whose B moved away from 0 (so every factor gets a gradient)."""
    engine.create_model(model_id, LoraSpec(rank=4, seed=0))
    engine.forward_backward(model_id, datums(7), "ppo")
    engine.optim_step(model_id, types.AdamParams(learning_rate=0.05))


def test_engine_fused_matches_peft_path(engine, monkeypatch):
    trained(engine, "fused")
    linears = engine._adapters.linears(engine._models["fused"].adapter)
    assert len(linears) == 2 * 7  # q k v o gate up down per layer; lm_head is not one of them
    counts = count_paths(monkeypatch)
    monkeypatch.setattr(lora_linear, "ENABLED", True)
    loss, grads = loss_and_grads(engine, "fused")
    assert counts["peft"] == 0 and counts["fused"] > 0
    assert counts["fused"] % len(linears) == 0  # every decoder LoRA linear, every pass
    assert all("forward" not in m.__dict__ for m in linears)  # sampling sees peft's forward

    monkeypatch.setattr(lora_linear, "ENABLED", False)
    fused_calls = counts["fused"]
    ref_loss, ref_grads = loss_and_grads(engine, "fused")
    assert counts["fused"] == fused_calls and counts["peft"] == fused_calls

    assert abs(loss - ref_loss) <= 1e-5 * max(1.0, abs(ref_loss))
    assert grads.keys() == ref_grads.keys()
    for name, g in grads.items():  # fp32: sums in another order
        e = ref_grads[name]
        atol = 2e-5 * max(1e-3, float(e.abs().max()))
        torch.testing.assert_close(g, e, atol=atol, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")
    # gradient accumulation across calls works as before (fp32 .grad, summed)
    engine.forward_backward("fused", datums(), "ppo")
    monkeypatch.setattr(lora_linear, "ENABLED", True)
    engine.forward_backward("fused", datums(), "ppo")
    for name, p in engine._models["fused"].params.items():
        assert p.grad.dtype == torch.float32
        torch.testing.assert_close(p.grad, 3 * ref_grads[name], atol=1e-4, rtol=1e-3)
    engine.remove_model("fused")


def test_engine_dropout_adapter_falls_back_to_peft(engine, monkeypatch):
    trained(engine, "dropout")
    adapter = engine._models["dropout"].adapter
    linears = engine._adapters.linears(adapter)
    monkeypatch.setattr(lora_linear, "ENABLED", False)
    ref_loss, _ = loss_and_grads(engine, "dropout")
    for m in linears:  # eval mode: dropout computes nothing, but it is not peft's plain path
        m.lora_dropout[adapter] = nn.Dropout(0.1).eval()
    counts = count_paths(monkeypatch)
    monkeypatch.setattr(lora_linear, "ENABLED", True)
    loss, _ = loss_and_grads(engine, "dropout")
    assert counts["fused"] == 0 and counts["peft"] > 0
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    engine.remove_model("dropout")


def test_engine_forward_only_uses_peft(engine, monkeypatch):
    trained(engine, "plain")
    counts = count_paths(monkeypatch)
    monkeypatch.setattr(lora_linear, "ENABLED", True)
    engine.forward_backward("plain", datums(), "ppo", forward_only=True)
    assert counts["fused"] == 0 and counts["peft"] > 0
    engine.remove_model("plain")


def test_engine_bf16_fused_is_as_close_to_fp32_as_peft(tiny_model_dir, monkeypatch):
    """The engine's own setting (bf16 under autocast): fused and peft round differently (peft
    rounds the low-rank term to bf16 before adding it), so both are held to an fp32 engine on the
    same bf16-rounded base weights: fused must be no further from it than peft's path, by loss
    and by the worst adapter gradient (relative norm error). In this setup fused: loss 0.008
    off, gradients 10 %; peft: 0.019, 24 % (a random 2-layer model in bf16 is noisy)."""
    monkeypatch.setattr(lora_linear, "ENABLED", False)  # the reference is peft's in fp32
    e16 = Engine(str(tiny_model_dir), dtype=torch.bfloat16)
    e32 = Engine(str(tiny_model_dir), dtype=torch.float32)
    for p in e32.base.parameters():
        p.data.copy_(p.data.bfloat16().float())
    trained(e16, "m")
    e32.create_model("m", LoraSpec(rank=4, seed=0))
    for name, p in e32._models["m"].params.items():
        p.data.copy_(e16._models["m"].params[name].data)
    ref_loss, ref = loss_and_grads(e32, "m")

    def errors(enabled: bool) -> tuple[float, float]:
        monkeypatch.setattr(lora_linear, "ENABLED", enabled)
        loss, grads = loss_and_grads(e16, "m")
        worst = max(float((grads[k] - ref[k]).norm() / ref[k].norm()) for k in ref)
        return abs(loss - ref_loss), worst

    counts = count_paths(monkeypatch)
    fused_loss, fused_grads = errors(True)
    assert counts["fused"] > 0 and counts["peft"] == 0
    peft_loss, peft_grads = errors(False)
    assert fused_loss <= 1.5 * peft_loss + 1e-3
    assert fused_grads <= 1.5 * peft_grads
