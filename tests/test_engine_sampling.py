"""Sampling on the tiny random Llama in fp32: numerics against teacher forcing, stops, seeds, peft.

Every test runs on both decode paths: the Hugging Face forward ("reference") and the fused step on
a static cache ("fast", trinity/engine/fast_decode.py).
Tolerance: fp32 on CPU, batched + left-padded + KV-cached vs one unpadded forward: 1e-4 on logprobs.
"""

from __future__ import annotations

import pytest
import torch
from tinker import types
from transformers import AutoModelForCausalLM, AutoTokenizer

from trinity.engine import fast_decode
from trinity.engine.sampling import SampleRequest, sample_batch

ATOL = 1e-4


@pytest.fixture(scope="module", params=[False, True], ids=["reference", "fast"])
def tiny(tiny_model_dir, request):
    """(model, tokenizer, fast): ``fast`` is the ``sample_batch`` decode path under test."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    return model, tokenizer, request.param


def run(tiny, requests, model=None):
    base, tokenizer, fast = tiny
    return sample_batch(
        model or base,
        requests,
        eos_token_ids=[tokenizer.eos_token_id],
        pad_token_id=tokenizer.pad_token_id,
        tokenizer=tokenizer,
        fast=fast,
    )


def teacher_logprobs(model, tokens, adapter=None):
    """log p(tokens[i] | tokens[:i]) for i >= 1, from one plain forward pass."""
    kwargs = {"adapter_names": [adapter or "__base__"]} if hasattr(model, "peft_config") else {}
    with torch.no_grad():
        logits_TV = model(input_ids=torch.tensor([tokens]), **kwargs).logits[0].float()
    logprobs_TV = logits_TV[:-1].log_softmax(-1)
    return logprobs_TV.gather(1, torch.tensor(tokens[1:]).unsqueeze(1)).squeeze(1), logits_TV


PROMPTS = [[1, 520, 33, 918, 77], [1, 44, 2048], [1, 9000, 12, 13, 14, 15, 16, 17, 900]]


def params(**kw):
    kw.setdefault("max_tokens", 8)
    kw.setdefault("stop", [])
    return types.SamplingParams(**kw)


def test_sampled_logprobs_equal_teacher_forcing(tiny, monkeypatch):
    requests = [
        SampleRequest(prompt_tokens=p, num_samples=2, params=params(seed=i))
        for i, p in enumerate(PROMPTS)
    ]
    requests.append(SampleRequest(prompt_tokens=PROMPTS[0], params=params(seed=7)))
    batch_shapes, prefills = [], []
    prefill = fast_decode.prefill
    monkeypatch.setattr(
        fast_decode,
        "prefill",
        lambda *args: prefills.append(tuple(args[1].shape)) or prefill(*args),
    )
    hook = tiny[0].register_forward_pre_hook(
        lambda _, args, kwargs: batch_shapes.append(tuple(kwargs["input_ids"].shape)),
        with_kwargs=True,
    )
    try:
        responses = run(tiny, requests)
    finally:
        hook.remove()
    # One prefill row per distinct prompt (7 rows, 3 prompts), then 7 rows decode: through the
    # Hugging Face forward on the reference path, never on the fast one (its prefill too is
    # fast_decode.prefill: no prompt logprobs wanted).
    prefill_shape = (3, max(map(len, PROMPTS)))
    if tiny[2]:
        assert batch_shapes == [] and prefills == [prefill_shape]
    else:
        assert batch_shapes == [prefill_shape] + [(7, 1)] * 7 and prefills == []
    for request, response in zip(requests, responses, strict=True):
        assert len(response.sequences) == request.num_samples
        for seq in response.sequences:
            assert len(seq.tokens) == 8 and seq.stop_reason == "length"
            expected, _ = teacher_logprobs(tiny[0], request.prompt_tokens + seq.tokens)
            got = torch.tensor(seq.logprobs)
            torch.testing.assert_close(got, expected[-8:], atol=ATOL, rtol=0)


def test_greedy_is_teacher_forced_argmax_and_top_k_1(tiny):
    (greedy,) = run(tiny, [SampleRequest(prompt_tokens=PROMPTS[0], params=params(temperature=0))])
    tokens = greedy.sequences[0].tokens
    _, logits_TV = teacher_logprobs(tiny[0], PROMPTS[0] + tokens)
    n = len(PROMPTS[0])
    assert logits_TV[n - 1 : -1].argmax(-1).tolist() == tokens
    (top1,) = run(tiny, [SampleRequest(prompt_tokens=PROMPTS[0], params=params(top_k=1, seed=3))])
    assert top1.sequences[0].tokens == tokens


def test_mixed_lengths_batched_equal_one_at_a_time(tiny):
    requests = [SampleRequest(prompt_tokens=p, params=params(temperature=0)) for p in PROMPTS]
    batched = run(tiny, requests)
    for request, response in zip(requests, batched, strict=True):
        (alone,) = run(tiny, [request])
        assert alone.sequences[0].tokens == response.sequences[0].tokens
        torch.testing.assert_close(
            torch.tensor(alone.sequences[0].logprobs),
            torch.tensor(response.sequences[0].logprobs),
            atol=ATOL,
            rtol=0,
        )


def test_seed_reproduces_alone_and_batched(tiny):
    request = SampleRequest(
        prompt_tokens=PROMPTS[1],
        num_samples=2,
        params=params(seed=42, temperature=1.0, top_p=0.9, top_k=50),
    )
    (alone,) = run(tiny, [request])
    others = [
        SampleRequest(prompt_tokens=p, num_samples=3, params=params(temperature=1.0))
        for p in PROMPTS
    ]
    batched = run(tiny, [others[0], request, others[2]])[1]
    assert [s.tokens for s in alone.sequences] == [s.tokens for s in batched.sequences]
    assert alone.sequences[0].tokens != alone.sequences[1].tokens  # samples differ from each other
    (other_seed,) = run(
        tiny,
        [
            SampleRequest(
                prompt_tokens=PROMPTS[1], num_samples=2, params=params(seed=43, temperature=1.0)
            )
        ],
    )
    assert other_seed.sequences[0].tokens != alone.sequences[0].tokens


def test_top_k_restricts_to_k_most_likely(tiny):
    (response,) = run(
        tiny,
        [
            SampleRequest(
                prompt_tokens=PROMPTS[0],
                num_samples=4,
                params=params(top_k=3, seed=0, temperature=2.0),
            )
        ],
    )
    for seq in response.sequences:
        _, logits_TV = teacher_logprobs(tiny[0], PROMPTS[0] + seq.tokens)
        n = len(PROMPTS[0])
        top3_TK = logits_TV[n - 1 : -1].topk(3, dim=-1).indices
        assert all(t in row for t, row in zip(seq.tokens, top3_TK.tolist(), strict=True))


def test_stop_conditions(tiny):
    model, tokenizer, fast = tiny
    (free,) = run(tiny, [SampleRequest(prompt_tokens=PROMPTS[2], params=params(temperature=0))])
    tokens = free.sequences[0].tokens
    assert free.sequences[0].stop_reason == "length" and len(tokens) == 8

    # stop token id: stops at its first occurrence, keeping it.
    (by_id,) = run(
        tiny,
        [SampleRequest(prompt_tokens=PROMPTS[2], params=params(temperature=0, stop=[tokens[3]]))],
    )
    first = tokens.index(tokens[3])
    assert by_id.sequences[0].tokens == tokens[: first + 1]
    assert by_id.sequences[0].stop_reason == "stop"

    # stop string: the text of a generated token.
    piece = tokenizer.decode([tokens[4]])
    (by_str,) = run(
        tiny, [SampleRequest(prompt_tokens=PROMPTS[2], params=params(temperature=0, stop=piece))]
    )
    out = by_str.sequences[0]
    assert out.stop_reason == "stop" and piece in tokenizer.decode(out.tokens)
    assert out.tokens == tokens[: len(out.tokens)] and len(out.tokens) <= 5

    # EOS (default stop=None) vs stop=[]: make the greedy first token count as EOS.
    eos_is_first = sample_batch(
        model,
        [
            SampleRequest(
                prompt_tokens=PROMPTS[2], params=types.SamplingParams(max_tokens=8, temperature=0)
            )
        ],
        eos_token_ids=[tokens[0]],
        pad_token_id=tokenizer.pad_token_id,
        fast=fast,
    )[0].sequences[0]
    assert eos_is_first.tokens == tokens[:1] and eos_is_first.stop_reason == "stop"
    no_stops = sample_batch(
        model,
        [SampleRequest(prompt_tokens=PROMPTS[2], params=params(temperature=0, stop=[]))],
        eos_token_ids=[tokens[0]],
        pad_token_id=tokenizer.pad_token_id,
        fast=fast,
    )[0].sequences[0]
    assert no_stops.tokens == tokens and no_stops.stop_reason == "length"


def test_prompt_logprobs_equal_teacher_forcing(tiny):
    requests = [
        SampleRequest(prompt_tokens=p, params=params(max_tokens=1), prompt_logprobs=(i != 1))
        for i, p in enumerate(PROMPTS)
    ]
    responses = run(tiny, requests)
    assert responses[1].prompt_logprobs is None
    for i in (0, 2):
        got = responses[i].prompt_logprobs
        assert got[0] is None and len(got) == len(PROMPTS[i])
        expected, _ = teacher_logprobs(tiny[0], PROMPTS[i])
        torch.testing.assert_close(torch.tensor(got[1:]), expected, atol=ATOL, rtol=0)


def test_mixed_adapter_batch_equals_separate_runs(tiny_model_dir, tiny):
    from peft import LoraConfig, get_peft_model

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False
    )
    torch.manual_seed(1)
    model = get_peft_model(base, config, adapter_name="a")
    model.add_adapter("b", config)
    with torch.no_grad():  # make the adapters strong so they change greedy choices
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(50)
    model.eval()
    adapters = ["a", "b", None, "b", "a"]  # one prompt under a and b: prefills not shared
    requests = [
        SampleRequest(
            prompt_tokens=PROMPTS[i % 3],
            adapter=a,
            params=params(temperature=0),
            prompt_logprobs=True,
        )
        for i, a in enumerate(adapters)
    ]
    mixed = run(tiny, requests, model=model)
    separate = [run(tiny, [r], model=model)[0] for r in requests]
    outputs = {a: mixed[i].sequences[0].tokens for i, a in enumerate(adapters)}
    assert len({tuple(outputs[a]) for a in ("a", "b", None)}) >= 2  # adapters matter
    for request, m, s in zip(requests, mixed, separate, strict=True):
        assert m.sequences[0].tokens == s.sequences[0].tokens
        expected, _ = teacher_logprobs(
            model, request.prompt_tokens + m.sequences[0].tokens, adapter=request.adapter
        )
        torch.testing.assert_close(
            torch.tensor(m.sequences[0].logprobs), expected[-8:], atol=ATOL, rtol=0
        )
        torch.testing.assert_close(
            torch.tensor(m.prompt_logprobs[1:]),
            expected[: len(request.prompt_tokens) - 1],
            atol=ATOL,
            rtol=0,
        )
    with pytest.raises(ValueError, match="unknown adapters"):
        run(tiny, [SampleRequest(prompt_tokens=PROMPTS[0], adapter="zzz")], model=model)


def test_topk_sample_logprobs_through_compaction(tiny):
    """Per-row k (0 for a row that did not ask), kept right when short rows are compacted out."""
    requests = [
        SampleRequest(prompt_tokens=PROMPTS[0], params=params(max_tokens=2, seed=1)),
        SampleRequest(
            prompt_tokens=PROMPTS[1], params=params(max_tokens=2, seed=2), topk_sample_logprobs=3
        ),
        SampleRequest(
            prompt_tokens=PROMPTS[2], params=params(max_tokens=12, seed=3), topk_sample_logprobs=5
        ),
        SampleRequest(prompt_tokens=PROMPTS[0], params=params(max_tokens=12, seed=4)),
    ]
    responses = run(tiny, requests)
    assert responses[0].sequences[0].topk_logprobs is None
    assert responses[3].sequences[0].topk_logprobs is None
    for request, response in zip(requests[1:3], responses[1:3], strict=True):
        seq, k = response.sequences[0], request.topk_sample_logprobs
        _, logits_TV = teacher_logprobs(tiny[0], request.prompt_tokens + seq.tokens)
        n = len(request.prompt_tokens)
        values_NK, ids_NK = logits_TV[n - 1 : -1].log_softmax(-1).topk(k, dim=-1)
        assert seq.topk_logprobs_np.token_ids.tolist() == ids_NK.tolist()
        torch.testing.assert_close(
            torch.from_numpy(seq.topk_logprobs_np.logprobs), values_NK, atol=ATOL, rtol=0
        )


def test_prefill_unembeds_the_last_columns_in_one_matmul(tiny_model_dir, monkeypatch):
    """The Hugging Face prefill's head runs on the prompts' last hidden states as one 2-D matmul:
    the strided ``[:, -1:]`` slice made it a bmm over the unembedding expanded per prompt (in bf16
    a copy of it per prompt), with and without a LoRA adapter. (Without the decode layout, so that
    the HF prefill runs; fast_decode.prefill's head is a 2-D matmul by construction.)"""
    from torch.profiler import profile

    from trinity.engine import Engine, LoraSpec, sampling

    monkeypatch.setattr(sampling.fast_decode, "build", lambda model: None)

    engine = Engine(str(tiny_model_dir), dtype=torch.float32)
    engine.create_model("m", LoraSpec(rank=4, seed=0))
    engine.snapshot_sampler("m", "s")
    for adapter in (None, "s"):
        requests = [
            SampleRequest(prompt_tokens=p, adapter=adapter, params=params(max_tokens=1))
            for p in PROMPTS
        ]
        with profile(record_shapes=True) as prof:
            engine.sample(requests)
        head = [
            (e.name, e.input_shapes[0])
            for e in prof.events()
            if "mm" in e.name and engine.vocab_size in sum(map(list, e.input_shapes), [])
        ]
        assert ("aten::mm", [len(PROMPTS), engine.base.config.hidden_size]) in head, head
        assert not [name for name, _ in head if name == "aten::bmm"], head
