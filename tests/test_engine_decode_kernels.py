"""The fused decode kernels (trinity/engine/kernels.cpp) against the torch ops they replace in
trinity/engine/fast_decode.py, and the native step against the op-by-op step.

The kernels round every intermediate that the torch ops round, so in bf16 rmsnorm and rotary
agree to the bit or to one bf16 rounding (the fp32 statistics' summation order), SiLU to one
rounding (exp's last bits); fp32 to 1e-5. Attention is fp32 throughout, so it is checked against
SDPA in fp32 on the same (upcast) inputs, to one bf16 rounding of the output in bf16.
The kernels must actually run (a C++ compiler is part of this project's test environment).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from tests.conftest import demo_tokenizer, tiny_llama
from trinity.engine import fast_decode, gemv
from trinity.engine.sampling import BASE_ADAPTER

DTYPES = [torch.float32, torch.bfloat16]
EPS = 1e-5


@pytest.fixture(scope="module")
def native():
    """The built extension (built here where this machine has none yet: minutes, once)."""
    gemv.build()
    kernels = gemv.kernels()
    assert kernels is not None, "the native build does not load"
    return kernels


def assert_near(got, want, dtype):
    """fp32: 1e-5; bf16: one bf16 rounding (2^-8 relative) apart."""
    assert got.dtype == dtype and got.shape == want.shape
    if dtype == torch.float32:
        torch.testing.assert_close(got, want.to(dtype), atol=1e-5, rtol=1e-5)
    else:
        torch.testing.assert_close(got.float(), want.float(), atol=1e-6, rtol=2**-7)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", [1, 5])
def test_rms_norm_and_residual_add(native, dtype, batch):
    g = torch.Generator().manual_seed(batch)
    x = (3 * torch.randn(batch, 200, generator=g)).to(dtype)
    delta = torch.randn(batch, 200, generator=g).to(dtype)
    w = torch.randn(200, generator=g).to(dtype)
    assert_near(native.rms_norm(x, w, EPS), fast_decode._rms_norm(x, w, EPS), dtype)
    summed = x.clone()
    normed = native.add_rms_norm(summed, delta, w, EPS)
    assert torch.equal(summed, x + delta)  # the residual add, in place, rounded as torch's
    assert_near(normed, fast_decode._rms_norm(x + delta, w, EPS), dtype)


def rotary_reference(qkv, cos_BD, sin_BD, keys, values, column, heads, kv, d):
    """fast_decode.decode_step's torch ops: rotary on q and k, the two cache writes."""
    batch = qkv.shape[0]
    qk = qkv[:, : (heads + kv) * d].view(batch, heads + kv, d)
    first, second = qk[..., : d // 2], qk[..., d // 2 :]
    qk = qk * cos_BD[:, None] + torch.cat((-second, first), -1) * sin_BD[:, None]
    column_1 = torch.tensor([column])
    keys.index_copy_(2, column_1, qk[:, heads:, None])
    values.index_copy_(2, column_1, qkv[:, (heads + kv) * d :].view(batch, kv, 1, d))
    return qk[:, :heads].reshape(batch, heads * d)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", [1, 4])
def test_rope_write(native, dtype, batch):
    heads, kv, d, capacity, column = 6, 2, 16, 9, 5
    g = torch.Generator().manual_seed(batch)
    qkv = torch.randn(batch, (heads + 2 * kv) * d, generator=g).to(dtype)
    cos = torch.randn(batch, d, generator=g).to(dtype)
    sin = torch.randn(batch, d, generator=g).to(dtype)
    # A layer of the 5-d cache, as decode_step passes it (strided over the layer dimension).
    keys = torch.randn(2, batch, kv, capacity, d, generator=g).to(dtype)
    values = torch.randn(2, batch, kv, capacity, d, generator=g).to(dtype)
    want_keys, want_values = keys[1].clone(), values[1].clone()
    want_q = rotary_reference(qkv, cos, sin, want_keys, want_values, column, heads, kv, d)
    got = qkv.clone()
    native.rope_write(got, cos, sin, keys[1], values[1], column, heads)
    assert torch.equal(values[1], want_values)  # a copy: exact, and only at the column
    if dtype == torch.bfloat16:  # the same roundings: to the bit
        assert torch.equal(got[:, : heads * d], want_q) and torch.equal(keys[1], want_keys)
    else:
        assert_near(got[:, : heads * d], want_q, dtype)
        assert_near(keys[1], want_keys, dtype)
    assert torch.equal(got[:, heads * d :], qkv[:, heads * d :])  # k, v inputs left as they were


def left_padded_mask(batch, valid, width, capacity):
    """[B, capacity] bool, row b valid from column pad_b to ``valid`` (left padding, as a prompt
    batch has), set past ``width`` too: the kernel must only look at the first ``width``."""
    mask = torch.ones(batch, capacity, dtype=torch.bool)
    for b in range(batch):
        mask[b, : min(b, valid - 1)] = False
    mask[:, valid:width] = False
    return mask


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("valid", [1, 7, 70])
@pytest.mark.parametrize(("heads", "kv", "d"), [(6, 2, 64), (4, 4, 128), (4, 2, 24)])
def test_attend_equals_sdpa(native, dtype, batch, valid, heads, kv, d):
    """Head sizes 64 and 128 (compiled for), and 24 (run-time size, not a multiple of 16)."""
    capacity = 96
    width = valid + 3  # columns past ``valid`` that the mask leaves out
    g = torch.Generator().manual_seed(valid * batch + heads)
    # q as decode_step passes it: the first heads x d columns of each qkv row.
    qkv = torch.randn(batch, (heads + 2 * kv) * d, generator=g).to(dtype)
    keys = torch.randn(batch, kv, capacity, d, generator=g).to(dtype)
    values = torch.randn(batch, kv, capacity, d, generator=g).to(dtype)
    mask = left_padded_mask(batch, valid, width, capacity)
    got = native.attend(qkv, keys, values, mask[:, :width], width, heads)
    q = qkv[:, : heads * d].float().view(batch, kv, heads // kv, d)
    want = F.scaled_dot_product_attention(
        q,
        keys[:, :, :width].float(),
        values[:, :, :width].float(),
        attn_mask=mask[:, None, None, :width],
    )
    assert_near(got, want.reshape(batch, heads * d), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", [1, 3])
def test_silu_mul(native, dtype, batch):
    g = torch.Generator().manual_seed(batch)
    gate_up = (4 * torch.randn(batch, 2 * 300, generator=g)).to(dtype)
    gate_up[0, :4] = torch.tensor([-100.0, 100.0, 0.0, -0.0])  # exp's clamped ends
    want = F.silu(gate_up[:, :300]) * gate_up[:, 300:]
    assert_near(native.silu_mul(gate_up), want, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("rows", "rank", "outputs"), [(1, 2, 5), (3, 32, 960), (17, 64, 100)])
def test_low_rank_add(native, dtype, rows, rank, outputs):
    """y += low @ b.T from b packed in pairs (bf16) or transposed (fp32): torch's product
    rounded to the dtype and added, to fp32 summation order; row and output counts that leave
    partial tiles and vectors."""
    g = torch.Generator().manual_seed(rows)
    y = torch.randn(rows, outputs, generator=g).to(dtype)
    low = torch.randn(rows, rank, generator=g).to(dtype)
    b = torch.randn(outputs, rank, generator=g).to(dtype)
    pair = 2 if dtype == torch.bfloat16 else 1
    got = y.clone()
    native.low_rank_add(got, low, b.view(outputs, -1, pair).transpose(0, 1).contiguous())
    assert_near(got, y + F.linear(low, b).to(dtype), dtype)


@pytest.fixture(scope="module")
def models(tiny_model_dir):
    """The tiny Llama in fp32 and bf16, each as a peft model with two adapters."""
    from peft import LoraConfig, get_peft_model

    out = {}
    for dtype in DTYPES:
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=dtype)
        torch.manual_seed(1)
        every = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        peft = get_peft_model(
            base, LoraConfig(r=4, target_modules=every, init_lora_weights=False), "a"
        )
        peft.add_adapter(
            "b",
            LoraConfig(r=2, target_modules=["q_proj", "down_proj"], init_lora_weights=False),
        )
        # an odd rank: in bf16 the native kernel's pairs take it padded with zeros
        peft.add_adapter(
            "c", LoraConfig(r=3, target_modules=["o_proj", "up_proj"], init_lora_weights=False)
        )
        out[dtype] = peft.to(dtype).eval()
    return out


def run_steps(weights, keys, values, mask, lora, steps):
    """decode_step calls (fixed tokens) after a 4-column prompt in the cache; their logits."""
    batch, width = mask.shape[0], 4
    position = mask[:, :width].sum(1)
    logits = []
    for step in range(steps):
        column = width + step
        mask[:, column] = True
        out = fast_decode.decode_step(
            weights,
            keys,
            values,
            torch.arange(batch) * 7 + 100 + 31 * step,
            position + step,
            mask[:, : column + 1],
            torch.tensor([column]),
            lora,
        )
        logits.append(out.float())
    return logits


@pytest.fixture(scope="module")
def biased():
    """A tiny Llama with biases on every projection (as Qwen2 has on q, k, v), fp32 and bf16."""
    torch.manual_seed(2)
    model = tiny_llama(demo_tokenizer(), attention_bias=True, mlp_bias=True).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_()
    return {dtype: copy.deepcopy(model).to(dtype) for dtype in DTYPES}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "adapters",
    [
        None,
        ["a"],
        ["a", BASE_ADAPTER, "b"],
        ["c", "a"],
        ["a"] * 9,
        ["a", "b", BASE_ADAPTER, "c", "a", "a", "b", "a", "c"],
        "biased",
    ],
)
def test_native_step_equals_op_step(native, models, biased, dtype, adapters, monkeypatch):
    """The native step (one C++ call) against the torch ops, on the same cache and tokens: the
    same logits (fp32 1e-4; bf16: two layers of bf16 roundings apart) and the same cache; batch 1
    to 9 (9: the B products added by rows in several tasks, one adapter's by B's blocks), with
    LoRA adapters (a mix of them and the base per row, an odd rank) and with biases."""
    model = biased[dtype] if adapters == "biased" else models[dtype]
    batch = 2 if adapters == "biased" else 1 if adapters is None else len(adapters)
    adapters = None if adapters == "biased" else adapters
    weights = fast_decode.build(model)
    assert weights.flat_dtype == dtype
    lora = fast_decode.lora_inputs(weights, adapters, "cpu")
    g = torch.Generator().manual_seed(batch)
    shape = (weights.layers_n, batch, weights.kv_heads, 12, weights.head_dim)
    keys = torch.zeros(shape, dtype=dtype)
    keys[..., :4, :] = torch.randn(*shape[:3], 4, shape[4], generator=g)
    values = torch.zeros(shape, dtype=dtype)
    values[..., :4, :] = torch.randn(*shape[:3], 4, shape[4], generator=g)
    mask = torch.zeros(batch, 12, dtype=torch.bool)
    mask[:, :4] = True
    mask[1:, 0] = False  # left padding on every row but the first
    with torch.inference_mode():
        states = [(keys.clone(), values.clone(), mask.clone()) for _ in range(2)]
        calls = []
        decode = native.decode_step
        monkeypatch.setattr(native, "decode_step", lambda *a: calls.append(1) or decode(*a))
        fused = run_steps(weights, *states[0], lora, 6)
        assert len(calls) == 6  # the native step ran
        monkeypatch.setattr(fast_decode, "FUSED", False)
        ops = run_steps(weights, *states[1], lora, 6)
    assert len(calls) == 6
    tolerance = {"atol": 1e-4, "rtol": 0} if dtype == torch.float32 else {"atol": 0.1, "rtol": 0}
    for got, want in zip(fused, ops, strict=True):
        torch.testing.assert_close(got.log_softmax(-1), want.log_softmax(-1), **tolerance)
    torch.testing.assert_close(states[0][0].float(), states[1][0].float(), **tolerance)
    torch.testing.assert_close(states[0][1].float(), states[1][1].float(), **tolerance)


@pytest.mark.parametrize("vocab", [7, 5000])
def test_sample_draws_by_the_exact_inverse_cdf(native, vocab):
    """Greedy rows (temperature 0) take the argmax; sampled rows the token whose interval of the
    exact (fp64) CDF of softmax(logits / T) holds u, to 1e-5 of the mass (vocab 5000: the
    search crosses 1024-wide blocks); every logprob is log_softmax(logits)[token]."""
    g = torch.Generator().manual_seed(vocab)
    logits = 3 * torch.randn(40, vocab, generator=g)
    temperature = 0.2 + 2 * torch.rand(40, generator=g)
    temperature[:8] = 0
    uniform = torch.rand(40, generator=g, dtype=torch.float64)
    uniform[8], uniform[9] = 0.0, 1 - 2.0**-22  # the ends
    tokens, logprobs = native.sample(logits, temperature, uniform)
    want = logits.log_softmax(-1).gather(1, tokens[:, None]).squeeze(1)
    torch.testing.assert_close(logprobs, want, atol=1e-5, rtol=0)
    assert torch.equal(tokens[:8], logits[:8].argmax(-1))
    cdf = (logits[8:].double() / temperature[8:, None].double()).softmax(-1).cumsum(-1)
    rows, chosen = torch.arange(32), tokens[8:]
    below = torch.where(chosen > 0, cdf[rows, (chosen - 1).clamp(min=0)], 0.0)
    u = uniform[8:]
    assert ((below - 1e-5 <= u) & (u <= cdf[rows, chosen] + 1e-5)).all()
    assert len(set(chosen.tolist())) > 5  # not one token whatever u
