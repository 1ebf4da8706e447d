"""The engine's training attention (trinity/engine/attention.py) against PyTorch's SDPA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from trinity.engine import attention


def attention_inputs(batch: int, length: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shapes = ((batch, 6, length, 16), (batch, 2, length, 16), (batch, 2, length, 16))
    return [torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for s in shapes]


def forward_backward(fn, inputs, grad_out):
    leaves = [x.detach().requires_grad_() for x in inputs]
    out = fn(*leaves)
    out.backward(grad_out)
    return [out, *(x.grad for x in leaves)]


@pytest.mark.parametrize("length", [1, 5, attention.QUERY_BLOCK, 2 * attention.QUERY_BLOCK + 37])
def test_causal_attention_matches_sdpa_values_and_gradients(length):
    """fp32 to 1e-5 over one block, several and a partial last one, with grouped KV heads."""
    inputs = attention_inputs(2, length, torch.float32)
    grad_out = torch.randn(2, length, 6, 16, generator=torch.Generator().manual_seed(1))

    def reference(q, k, v):
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True, scale=0.3)
        return out.transpose(1, 2)

    got = forward_backward(
        lambda q, k, v: attention.causal_attention(q, k, v, 0.3), inputs, grad_out
    )
    expected = forward_backward(reference, inputs, grad_out)
    for name, a, b in zip(("out", "grad q", "grad k", "grad v"), got, expected, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("queries", [3, attention.QUERY_BLOCK + 9])
def test_masked_attention_matches_sdpa_values_and_gradients(queries):
    """A boolean mask (a suffix pass over a shared prefix's cache: more keys than queries, some
    padded): fp32 to 1e-5 against SDPA with the same mask, values and gradients, on the queries
    that see a key; a query that sees none (padding) gets a finite output and no NaN gradient."""
    g = torch.Generator().manual_seed(2)
    keys = queries + 11
    q = torch.randn(2, 6, queries, 16, generator=g)
    k, v = (torch.randn(2, 2, keys, 16, generator=g) for _ in range(2))
    mask_B1QT = torch.ones(keys - queries, dtype=torch.bool).repeat(2, 1, queries, 1)
    mask_B1QT = torch.cat(
        [mask_B1QT, torch.ones(queries, queries).tril().bool()[None, None].repeat(2, 1, 1, 1)], -1
    )
    mask_B1QT[1, :, :, 3:7] = False  # a padded prefix
    mask_B1QT[1, :, -1] = False  # a query that sees nothing
    seen = torch.ones(2, queries, 6, 1, dtype=torch.bool)
    seen[1, -1] = False
    grad_out = torch.randn(2, queries, 6, 16, generator=g) * seen

    def reference(q, k, v):
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask_B1QT, enable_gqa=True, scale=0.3
        )
        return out.transpose(1, 2).nan_to_num() * seen

    got = forward_backward(
        lambda q, k, v: attention.causal_attention(q, k, v, 0.3, mask_B1QT) * seen,
        [q, k, v],
        grad_out,
    )
    expected = forward_backward(reference, [q, k, v], grad_out)
    for name, a, b in zip(("out", "grad q", "grad k", "grad v"), got, expected, strict=True):
        assert a.isfinite().all(), name
        torch.testing.assert_close(
            a, b.nan_to_num(), atol=1e-5, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}"
        )


def packed_mask(window: int | None = None) -> torch.Tensor:
    """A packed pass's mask: two prompts (40, 30 tokens), then their 3 and 2 responses: 300."""
    from trinity.engine.packing import Cluster, Example, packed_pass

    def member(prompt: list[int], n: int) -> Example:
        return Example(0, prompt + [7] * n, {})

    a, b = [1] * 40, [2] * 30
    clusters = [
        Cluster(40, [member(a, n) for n in (50, 20, 64)]),
        Cluster(30, [member(b, n) for n in (33, 63)]),
    ]
    return packed_pass(clusters, window).mask_11NN


@pytest.mark.parametrize("path", ["members", "blocks"])
def test_packed_pass_attention_matches_sdpa(path, monkeypatch):
    """A packed pass, one row of 300 tokens, by either path: members (each prompt and response
    padded to the longest, one batched matmul) or query blocks over the columns they see, far
    fewer than the row; values and gradients equal SDPA's over the whole row with the same mask
    (fp32, 1e-5)."""
    mask_11NN = packed_mask()
    length = mask_11NN.shape[-1]
    assert length == 300
    columns = attention.block_columns(mask_11NN)
    assert max(c.numel() for c in columns if c is not None) < length * 0.75
    taken = []
    if path == "blocks":
        monkeypatch.setattr(attention, "_members_of", lambda mask: None)
    else:
        real = attention._member_attention
        monkeypatch.setattr(attention, "_member_attention", lambda *a: taken.append(1) or real(*a))
    q, k, v = attention_inputs(1, length, torch.float32, seed=3)
    grad_out = torch.randn(1, length, 6, 16, generator=torch.Generator().manual_seed(4))

    def reference(q, k, v):
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask_11NN, enable_gqa=True)
        return out.transpose(1, 2)

    got = forward_backward(
        lambda q, k, v: attention.causal_attention(q, k, v, 0.25, mask_11NN), [q, k, v], grad_out
    )
    assert taken == ([1] if path == "members" else [])
    expected = forward_backward(reference, [q, k, v], grad_out)
    for name, x, y in zip(("out", "grad q", "grad k", "grad v"), got, expected, strict=True):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


def test_members_of_a_packed_pass_and_of_other_masks():
    """A packed pass's mask is its prompts and responses as members (each response's extra keys
    its prompt); a mask of any other shape is not members: a sliding window, a batch of two, a
    query seeing a later key, a response seeing two prompts."""
    mask_11NN = packed_mask()
    plan = attention.members(mask_11NN)
    starts = plan.query_MQ[:, 0].tolist()
    assert starts == [0, 40, 70, 120, 140, 204, 237]
    assert plan.key_MC[:, 0].tolist() == [0, 40, 0, 0, 0, 40, 40]  # its prompt, or its own
    assert plan.query_MQ.shape == (7, 64) and plan.key_MC.shape == (7, 40 + 64)
    assert sorted(plan.position_N.tolist()) == plan.position_N.tolist()  # members in order
    assert attention.members(packed_mask(window=16)) is None
    assert attention.members(mask_11NN.repeat(2, 1, 1, 1)) is None
    future = mask_11NN.clone()
    future[0, 0, 150, 151] = True
    assert attention.members(future) is None
    two = mask_11NN.clone()
    two[0, 0, 150, 40:70] = True
    assert attention.members(two) is None


def test_causal_attention_in_bf16_is_as_close_to_fp32_as_sdpa():
    """bf16 (the engine's dtype on bf16 hardware): no further from the fp32 result, values and
    gradients, than PyTorch's bf16 flash kernel is."""
    inputs = attention_inputs(2, 2 * attention.QUERY_BLOCK + 37, torch.bfloat16)
    grad_out = torch.randn(2, inputs[0].shape[2], 6, 16, generator=torch.Generator().manual_seed(1))

    def sdpa(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).transpose(
            1, 2
        )

    def ours(q, k, v):
        return attention.causal_attention(q, k, v, 0.25)

    exact = forward_backward(sdpa, [x.float() for x in inputs], grad_out)
    flash = forward_backward(sdpa, inputs, grad_out.bfloat16())
    got = forward_backward(ours, inputs, grad_out.bfloat16())
    for a, b, e in zip(got, flash, exact, strict=True):
        assert (a.float() - e).abs().max() <= 1.5 * (b.float() - e).abs().max()


def test_engine_models_train_through_it_and_match_sdpa(tiny_model_dir):
    """An engine-loaded model runs it for training passes (gradients on) only; logits and every
    gradient equal the plain "sdpa" model's."""
    from trinity.engine import Engine

    engine = Engine(str(tiny_model_dir), dtype=torch.float32)
    assert engine.base.config._attn_implementation == attention.ATTENTION
    model = engine._load_causal_lm(torch.float32).requires_grad_(True)
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    assert reference.config._attn_implementation == "sdpa"
    ids = torch.randint(0, 49152, (2, 150), generator=torch.Generator().manual_seed(0))
    got, expected = model(input_ids=ids).logits, reference(input_ids=ids).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    (got.logsumexp(-1).sum() + got[..., 7].sum()).backward()
    (expected.logsumexp(-1).sum() + expected[..., 7].sum()).backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        atol = 2e-5 * max(1.0, float(q.grad.abs().max()))
        torch.testing.assert_close(
            p.grad, q.grad, atol=atol, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}"
        )


def test_block_columns_are_reused_only_for_the_same_unchanged_mask():
    """Once per pass: the same mask (or the same view of it) reuses its columns; the mask
    changed in place, or another mask, gets its own."""
    mask = torch.zeros(1, 1, 300, 300, dtype=torch.bool)
    mask[..., :10] = True
    first = attention._columns_of(mask)
    biases, gather = attention._block_biases(mask, 3, torch.bfloat16), attention._gather_plan(mask)
    assert attention._columns_of(mask) is first
    assert attention._columns_of(mask[:, :, :, :]) is first  # a view with the same layout
    assert attention._block_biases(mask, 3, torch.bfloat16) is biases  # made once per pass
    assert attention._gather_plan(mask[:, :, :, :]) is gather
    mask[..., 200:, 150] = True  # in place: the last block now sees column 150
    changed = attention._columns_of(mask)
    assert changed is not first and 150 in changed[-1].tolist()
    assert attention._block_biases(mask, 3, torch.bfloat16) is not biases
    assert 150 in attention._gather_plan(mask)[0][-changed[-1].numel() :].tolist()
    other = mask.clone()
    assert attention._columns_of(other) is not changed
