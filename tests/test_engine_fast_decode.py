"""The fast decode path (trinity/engine/fast_decode.py) against the reference path (the Hugging
Face forward), on the tiny random Llama in fp32, with and without LoRA adapters: the native step
(one C++ call, trinity/engine/kernels.cpp) and the torch ops it falls back to without a build.

Exactness: greedy tokens identical; logprobs within 1e-4 (fp32, the same tolerance as the
reference path against teacher forcing in tests/test_engine_sampling.py).
The compiled step is marked slow: compiling even the 2-layer model takes minutes on 2 shared cores.
"""

from __future__ import annotations

import copy

import pytest
import torch
from tinker import types
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

from trinity.engine import fast_decode, gemv, pool, sampling
from trinity.engine.sampling import SampleRequest, sample_batch

ATOL = 1e-4
PROMPTS = [[1, 520, 33, 918, 77], [1, 44, 2048], [1, 9000, 12, 13, 14, 15, 16, 17, 900]]


@pytest.fixture(scope="module")
def models(tiny_model_dir):
    """(plain model, peft model with adapters a (attn + mlp) and b (q, v, down, lm_head))."""
    from peft import LoraConfig, get_peft_model

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    torch.manual_seed(1)
    every = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft = get_peft_model(
        base, LoraConfig(r=4, lora_alpha=8, target_modules=every, init_lora_weights=False), "a"
    )
    some = ["q_proj", "v_proj", "down_proj", "lm_head"]
    peft.add_adapter(
        "b", LoraConfig(r=2, lora_alpha=8, target_modules=some, init_lora_weights=False)
    )
    with torch.no_grad():  # strong adapters, so that they change greedy choices
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.mul_(50)
    return plain, peft.eval(), tokenizer


def requests(adapters, temperature=0.0):
    """One request per adapter, max_tokens 1..12 so rows stop at different steps (compaction)."""
    return [
        SampleRequest(
            prompt_tokens=PROMPTS[i % 3],
            num_samples=2,
            adapter=a,
            params=types.SamplingParams(
                max_tokens=[12, 3, 7, 1, 9, 5][i % 6], temperature=temperature, stop=[], seed=i
            ),
        )
        for i, a in enumerate(adapters)
    ]


def decode(model, tokenizer, reqs, **kw):
    out = sample_batch(
        model,
        reqs,
        eos_token_ids=[tokenizer.eos_token_id],
        pad_token_id=tokenizer.pad_token_id,
        **kw,
    )
    return [(s.tokens, torch.tensor(s.logprobs), s.stop_reason) for r in out for s in r.sequences]


def assert_same(got, want):
    assert [t for t, _, _ in got] == [t for t, _, _ in want]
    assert [r for _, _, r in got] == [r for _, _, r in want]
    for (_, a, _), (_, b, _) in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


@pytest.fixture(scope="module")
def native():
    """The engine's native build (built here where this machine has none yet: minutes, once)."""
    gemv.build()
    return gemv.kernels()


@pytest.mark.parametrize("built", [True, False], ids=["native", "no build"])
@pytest.mark.parametrize("adapters", [[None] * 6, ["a", None, "b", "a", "b", None]])
def test_fast_equals_reference(models, native, adapters, built, monkeypatch):
    """With the native build, and without one (the torch ops and ``F.linear``)."""
    plain, peft, tokenizer = models
    model = peft if any(adapters) else plain
    reqs = requests(adapters)
    reference = decode(model, tokenizer, reqs, fast=False)
    calls = []
    monkeypatch.setattr(gemv, "_KERNEL", Counted(native, calls) if built else False)
    # A cache with room for 2 columns past the prompt: the steps must grow it, twice.
    monkeypatch.setattr(sampling._FastStepper, "room", 2)
    fast = decode(model, tokenizer, reqs, fast=True)
    assert_same(fast, reference)
    assert len({tuple(t) for t, _, _ in fast}) > 3  # prompts and adapters change the outputs
    # Sampled rows agree too: both paths draw from the same counter-based uniforms.
    assert_same(
        decode(model, tokenizer, requests(adapters, 1.0), fast=True),
        decode(model, tokenizer, requests(adapters, 1.0), fast=False),
    )
    # the path under test; small_mm: the prefill's matmuls (fast_decode.prefill)
    assert set(calls) == (
        {"decode_step", "sample", "small_mm", "small_mm_wins"} if built else set()
    )


class Counted:
    """The native build, recording the name of each function called on it."""

    def __init__(self, kernels, calls: list):
        self.kernels, self.calls = kernels, calls

    def __getattr__(self, name):
        def counted(*args):
            self.calls.append(name)
            return getattr(self.kernels, name)(*args)

        return counted


@pytest.mark.parametrize("fused", [True, False], ids=["native step", "torch ops"])
@pytest.mark.parametrize("adapter", [None, "b"])
def test_batch_one_equals_reference(models, native, adapter, fused, monkeypatch):
    """One row: the native step (one call per step, the native sampler), or the torch ops with
    every matmul the engine's kernel (trinity/engine/gemv.py), LoRA terms included."""
    plain, peft, tokenizer = models
    model = peft if adapter else plain
    calls = []
    monkeypatch.setattr(fast_decode, "FUSED", fused)
    for prompt in PROMPTS:
        reqs = [
            SampleRequest(
                prompt_tokens=prompt,
                num_samples=1,
                adapter=adapter,
                params=types.SamplingParams(max_tokens=10, temperature=0.0, stop=[]),
            )
        ]
        reference = decode(model, tokenizer, reqs, fast=False)
        monkeypatch.setattr(gemv, "_KERNEL", Counted(native, calls))
        assert_same(decode(model, tokenizer, reqs, fast=True), reference)
        monkeypatch.setattr(gemv, "_KERNEL", native)
    steps = len(PROMPTS) * 9  # 9 steps after the prefill, 10 tokens chosen
    layers = plain.config.num_hidden_layers
    if fused:  # one native call per step, one to choose each token
        assert calls.count("decode_step") == steps and calls.count("sample") == steps + 3
        prefills = [name for name in calls if name in ("small_mm", "small_mm_wins")]
        assert len(calls) - len(prefills) == 2 * steps + 3
        # fast_decode.prefill: every matmul through the kernel (one prompt's few rows)
        assert prefills.count("small_mm") >= len(PROMPTS) * (4 * layers + 1)
    else:
        matmuls = [name for name in calls if name != "small_mm_wins"]  # the routing asked
        assert set(matmuls) == {"small_mm"} and len(matmuls) >= steps * (4 * layers + 1)


def test_weights_rebuilt_after_an_in_place_update(models):
    plain, _, tokenizer = models
    reqs = requests([None] * 3)
    before = fast_decode.build(plain)
    assert fast_decode.build(plain) is before  # cached while the parameters are unchanged
    layer = plain.model.layers[0].self_attn.k_proj
    saved = layer.weight.detach().clone()
    try:
        with torch.no_grad():
            layer.weight.mul_(3.0)
        assert fast_decode.build(plain) is not before
        assert_same(decode(plain, tokenizer, reqs), decode(plain, tokenizer, reqs, fast=False))
    finally:
        with torch.no_grad():
            layer.weight.copy_(saved)


def test_only_the_adapter_terms_refreshed_after_a_lora_update(models):
    """An in-place update of LoRA factors alone (an optimizer step on an adapter) keeps the base
    weights' decode-layout copies and refreshes the adapters' terms: decoding still equals the
    reference. A base weight's update still rebuilds everything (the test above)."""
    _, peft, tokenizer = models
    reqs = requests(["a", None, "b"])
    before = fast_decode.build(peft)
    base_copy = before.layers[0][1].weight_OI
    lora_b = peft.base_model.model.model.layers[0].self_attn.q_proj.lora_B["a"].weight
    saved = lora_b.detach().clone()
    try:
        with torch.no_grad():
            lora_b.mul_(-2.0)
        after = fast_decode.build(peft)
        assert after is before and after.layers[0][1].weight_OI is base_copy
        rows = lora_b.shape[0]
        torch.testing.assert_close(
            after.layers[0][1].b_by["a"][:rows, : lora_b.shape[1]],
            lora_b * peft.base_model.model.model.layers[0].self_attn.q_proj.scaling["a"],
        )
        assert_same(decode(peft, tokenizer, reqs), decode(peft, tokenizer, reqs, fast=False))
    finally:
        with torch.no_grad():
            lora_b.copy_(saved)


def cache_layers(weights, rows=3, width=4, seed=0):
    """A prefill's (keys, values) per layer: random, [rows, Hkv, width, D]."""
    g = torch.Generator().manual_seed(seed)
    shape = (rows, weights.kv_heads, width, weights.head_dim)
    return [
        (torch.randn(shape, generator=g), torch.randn(shape, generator=g))
        for _ in range(weights.layers_n)
    ]


def test_static_cache_reuses_a_dropped_cache_buffer(models):
    """A decode cache's buffer goes back to the thread's pool when the cache is dropped or
    outgrown, and the next cache takes it (no fresh pages per sampling call); a live cache's
    buffer is never handed out twice."""
    weights = fast_decode.build(models[0])
    layers = cache_layers(weights)
    first = fast_decode.StaticCache.from_layers(weights, layers, 6)
    address = first.keys.data_ptr()
    torch.testing.assert_close(first.keys[1, :, :, :4], layers[1][0], rtol=0, atol=0)
    assert first.values[1, :, :, 4:].abs().sum() == 0  # zeroed past the prefill
    second = fast_decode.StaticCache.from_layers(weights, layers, 6)
    assert second.keys.data_ptr() != address  # the first is alive
    del second
    first.grow(12)  # outgrows its buffer: the dropped second one's is too small, so a new one
    grown = first.keys.data_ptr()
    assert grown != address
    torch.testing.assert_close(first.values[1, :, :, :4], layers[1][1], rtol=0, atol=0)
    again = fast_decode.StaticCache.from_layers(weights, layers, 6)
    assert again.keys.data_ptr() == address  # the buffer ``first`` outgrew
    del first
    last = fast_decode.StaticCache.from_layers(weights, layers, 12)
    assert last.keys.data_ptr() == grown


def test_static_cache_lets_a_big_buffer_go(models, monkeypatch):
    """A buffer over ``pool.MAX_BYTES`` is freed with its cache, not kept for the next one."""
    weights = fast_decode.build(models[0])
    layers = cache_layers(weights)
    pool.free_list().clear()  # earlier tests' buffers
    first = fast_decode.StaticCache.from_layers(weights, layers, 6)
    size = 2 * first.keys.numel() * first.keys.element_size()
    monkeypatch.setattr(pool, "MAX_BYTES", size - 1)
    del first
    assert not pool.free_list()
    monkeypatch.setattr(pool, "MAX_BYTES", size)
    second = fast_decode.StaticCache.from_layers(weights, layers, 6)
    address = second.keys.data_ptr()
    del second
    assert fast_decode.StaticCache.from_layers(weights, layers, 6).keys.data_ptr() == address


def test_cache_sized_to_the_longest_request(models, monkeypatch):
    """The cache has a column for each token a row may still generate, not a fixed 256."""
    plain, _, tokenizer = models
    capacities = []
    real = fast_decode.StaticCache.from_layers.__func__

    def recorded(cls, weights, layers, capacity):
        capacities.append(capacity)
        return real(cls, weights, layers, capacity)

    monkeypatch.setattr(fast_decode.StaticCache, "from_layers", classmethod(recorded))
    decode(plain, tokenizer, requests([None] * 3))  # max_tokens 12, 3, 7
    assert capacities == [max(len(p) for p in PROMPTS) + 12]


def test_static_cache_select_compacts_in_place(models):
    """Dropping rows moves the kept ones to the front of the cache's own buffer, any order."""
    weights = fast_decode.build(models[0])
    cache = fast_decode.StaticCache.from_layers(weights, cache_layers(weights, rows=5), 7)
    keys, values = cache.keys.clone(), cache.values.clone()
    start = cache.keys.data_ptr()
    index = torch.tensor([4, 1, 3])
    cache.select(index)
    assert cache.keys.data_ptr() == start and cache.keys.is_contiguous()
    torch.testing.assert_close(cache.keys, keys[:, index], rtol=0, atol=0)
    torch.testing.assert_close(cache.values, values[:, index], rtol=0, atol=0)


@pytest.mark.slow
def test_compiled_equals_reference(models):
    _, peft, tokenizer = models
    reqs = requests(["a", None, "b"])  # 6 rows: compacted to 4, 2, 1 (power-of-two buckets)
    assert_same(
        decode(peft, tokenizer, reqs, compiled=True), decode(peft, tokenizer, reqs, fast=False)
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_equals_hugging_face(models, native, dtype):
    """``fast_decode.prefill`` against the Hugging Face forward it replaces (sampling._forward on a
    DynamicCache): the last column's logits and every layer's keys and values at the real tokens,
    left-padded prompts of three lengths, adapters a, b and the base mixed per row.
    fp32: 1e-4 plus 1e-5 relative (the strong adapters make logits and keys ~200; measured 1e-4
    apart at most). bf16: the same ops with the same roundings, but the fused QKV / gate-up
    matmuls and SDPA may sum in other orders: within one bf16 rounding (2^-7 relative) plus 2^-5
    (measured: keys and values equal, logits 2^-10 apart) -- a wrong mask or position is O(1)."""
    _, peft, _ = models
    model = peft if dtype == torch.float32 else copy.deepcopy(peft).to(dtype)
    prompts = [*PROMPTS, PROMPTS[1]]
    adapters_U = ["a", sampling.BASE_ADAPTER, "b", "b"]
    width = max(map(len, prompts))
    ids_UT = torch.zeros(len(prompts), width, dtype=torch.long)
    mask_UT = torch.zeros(len(prompts), width, dtype=torch.long)
    for u, prompt in enumerate(prompts):
        ids_UT[u, width - len(prompt) :] = torch.tensor(prompt)
        mask_UT[u, width - len(prompt) :] = 1
    position_UT = (mask_UT.cumsum(dim=1) - 1).clamp(min=0)
    weights = fast_decode.build(model)
    with torch.inference_mode():
        cache = DynamicCache()
        want = sampling._forward(
            model, ids_UT, mask_UT, position_UT, cache, adapters_U, torch.tensor([width - 1])
        )[:, -1]
        got, layers = fast_decode.prefill(
            weights,
            ids_UT,
            mask_UT,
            position_UT,
            fast_decode.lora_inputs(weights, adapters_U, "cpu"),
        )
    tol = {"atol": ATOL, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2**-5, "rtol": 2**-7}
    assert got.dtype == dtype and got.shape == want.shape
    torch.testing.assert_close(got, want, **tol)
    assert len(layers) == len(cache.layers)
    for (keys, values), layer in zip(layers, cache.layers, strict=True):
        for u, prompt in enumerate(prompts):
            real = slice(width - len(prompt), width)
            torch.testing.assert_close(keys[u, :, real], layer.keys[u, :, real], **tol)
            torch.testing.assert_close(values[u, :, real], layer.values[u, :, real], **tol)
        assert keys.isfinite().all() and values.isfinite().all()  # padded columns too
