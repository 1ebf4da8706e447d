"""The training engine: model loading, LoRA, Tinker losses, AdamW, sampling, checkpoints."""

from trinity.engine.engine import Engine, LoraSpec
from trinity.engine.sampling import SampleRequest

__all__ = ["Engine", "LoraSpec", "SampleRequest"]
