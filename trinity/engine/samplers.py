"""Samplers: named frozen weights to sample from, apart from the models being trained.

A LoRA sampler is another peft adapter on the shared base (trinity/engine/adapters.py); a full
fine-tune's a ``dtype`` copy of the whole model. A snapshot copies a model's weights at that
moment, so training it further leaves the sampler as it was. In fp32, a sampling batch on one LoRA
sampler alone decodes on a merged plain copy of the model (``merged``: one more copy of the
weights in memory, no per-layer LoRA matmuls or peft's per-adapter routing), rebuilt when the
sampler changes.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM

from trinity.engine import checkpoint
from trinity.engine.adapters import Adapters, LoraSpec

SAMPLER_META = "trinity_sampler.json"


@dataclass
class Sampler:
    """Weights to sample from: an adapter on the shared base, or a whole model of its own."""

    spec: LoraSpec | None
    adapter: str | None  # internal peft adapter name (LoRA)
    module: nn.Module  # the causal LM to run: the shared base (LoRA) or a frozen copy (full)


class Samplers:
    """Samplers by name (``by_name``), their adapters on ``adapters``; ``load_plain`` loads a
    plain copy of the base model in ``dtype`` (for ``merged``)."""

    def __init__(
        self,
        adapters: Adapters,
        dtype: torch.dtype,
        device: torch.device,
        load_plain: Callable[[], nn.Module],
    ):
        self.adapters = adapters
        self.dtype = dtype
        self.device = device
        self.by_name: dict[str, Sampler] = {}
        self._load_plain = load_plain
        self._merged: nn.Module | None = None
        self.merged_adapter: str | None = None  # the adapter in _merged while it is current
        # The last dropped LoRA sampler (or the one built beside the first, ``snapshot``), whose
        # adapter the next sampler of its shape takes over:
        # peft builds an adapter in ~0.25 s for the demo model, on the critical path of every
        # weight sync (a new sampler per step, the previous one dropped after it), while copying
        # the weights in takes milliseconds.
        self._spare: Sampler | None = None

    def snapshot(self, name: str, model: Sampler, params: dict[str, nn.Parameter]) -> None:
        """Freeze the current weights of a trained ``model`` (``params``: its LoRA factors) as
        ``name``, replacing a sampler of that name (in place for LoRAs of one shape)."""
        self.merged_adapter = None
        old = self.by_name.get(name)
        if (
            model.adapter is not None
            and old is not None
            and old.adapter is not None
            and model.spec.same_shape(old.spec)
        ):
            sampler = Sampler(model.spec, old.adapter, self.adapters.base)
        else:
            if old is not None:
                self.drop(name)
            if model.adapter is None:
                frozen = copy.deepcopy(model.module).to(self.dtype).requires_grad_(False)
                self.by_name[name] = Sampler(None, None, frozen)
                return
            adapter = self._take_spare(lambda spare: model.spec.same_shape(spare.spec))
            if adapter is None:
                first = not any(s.adapter is not None for s in self.by_name.values())
                adapter = self.adapters.add(model.spec, "s")
                if first and self._spare is None:
                    # Each weight sync makes the next sampler while this one may still be
                    # sampling, so a second adapter is needed from the second sync on; built
                    # now, at the first, it is not built inside a later step (peft: ~0.3 s).
                    spare = self.adapters.add(model.spec, "s")
                    self._spare = Sampler(model.spec, spare, self.adapters.base)
            sampler = Sampler(model.spec, adapter, self.adapters.base)
        with torch.no_grad():
            for key, p in self.adapters.params(sampler.adapter).items():
                p.copy_(params[key])
        self.by_name[name] = sampler

    def _fits(self, adapter: str, config) -> bool:
        """Whether weights saved with peft ``config`` fill ``adapter`` exactly."""
        have = self.adapters.peft.peft_config[adapter]
        keys = ("r", "lora_alpha", "target_modules", "use_rslora", "use_dora", "bias")
        return all(getattr(have, k, None) == getattr(config, k, None) for k in keys)

    def drop(self, name: str) -> None:
        sampler = self.by_name.pop(name, None)
        if sampler is None:
            raise ValueError(f"unknown sampler {name!r}")
        self.merged_adapter = None
        if sampler.adapter is not None:
            if self._spare is not None:
                self.adapters.drop(self._spare.adapter)
            self._spare = sampler

    def _take_spare(self, fits: Callable[[Sampler], bool]) -> str | None:
        """The spare sampler's adapter, if ``fits`` it (it is then no longer spare)."""
        spare = self._spare
        if spare is None or not fits(spare):
            return None
        self._spare = None
        return spare.adapter

    def load(self, name: str, directory: str | Path, reuse: str | None = None) -> None:
        """A ``save_sampler`` dir (peft adapter or HF model, plus ``SAMPLER_META``), or any peft
        LoRA adapter dir for this base, as ``name`` (replacing one).

        ``reuse``: a sampler the caller drops next (the weights it switches away from). A LoRA of
        the same shape and targets takes over its adapter and only the weights are copied: peft
        builds a new adapter in about a second for a 135 M model, on the critical path of every
        weight sync, while the copy takes milliseconds.
        """
        from peft import LoraConfig

        if name in self.by_name:
            self.drop(name)
        self.merged_adapter = None
        directory = Path(directory)
        if not (directory / "adapter_config.json").is_file():
            module = AutoModelForCausalLM.from_pretrained(directory, dtype=self.dtype)
            module = module.to(self.device).eval().requires_grad_(False)
            self.by_name[name] = Sampler(None, None, module)
            return
        config = LoraConfig.from_pretrained(str(directory))
        meta_path = directory / SAMPLER_META
        saved = json.loads(meta_path.read_text())["lora"] if meta_path.is_file() else None
        spec = LoraSpec(**saved) if saved else LoraSpec(rank=config.r, alpha=config.lora_alpha)
        config.inference_mode = False
        old = self.by_name.get(reuse) if reuse is not None else None
        if old is not None and old.adapter is not None and self._fits(old.adapter, config):
            del self.by_name[reuse]
            adapter = old.adapter
        else:
            adapter = self._take_spare(lambda spare: self._fits(spare.adapter, config))
            adapter = adapter or self.adapters.add(spec, "s", config)
        try:
            checkpoint.copy_into(
                self.adapters.params(adapter),
                checkpoint.read_peft(directory),
                f"adapter {directory}",
            )
        except Exception:
            self.adapters.drop(adapter)
            raise
        self.by_name[name] = Sampler(spec, adapter, self.adapters.base)

    def merged(self, adapter: str | None) -> nn.Module | None:
        """The merged copy for a batch on ``adapter`` alone, if it is a sampler's (frozen) and
        the engine computes in fp32 (merging into bf16 weights would round small LoRA deltas
        away, so the sampler would lag the trainer); else None."""
        if (
            adapter is None
            or self.dtype != torch.float32
            or not any(s.adapter == adapter for s in self.by_name.values())
        ):
            return None
        if self._merged is None:
            self._merged = self._load_plain()
        if self.merged_adapter != adapter:
            self.adapters.merge_into(self._merged, adapter)
            self.merged_adapter = adapter
        return self._merged
