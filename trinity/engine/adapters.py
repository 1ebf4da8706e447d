"""LoRA bookkeeping: peft adapters on the engine's one shared base model.

The adapter name inside peft is internal (``t3`` / ``s7``) because user names such as paths or
``session:sample:0`` are not valid module keys. Targets follow Tinker's ``LoraConfig``:
``train_attn`` = every Linear of the attention blocks, ``train_mlp`` = of the MLP blocks,
``train_unembed`` = the output projection (``lm_head``). With tied embeddings the unembedding LoRA
adapts the output side only (the input embedding stays the base one); ``merge_into`` therefore
unties the two. ``alpha`` defaults to 32 whatever the rank (Tinker's "LoRA without regret"
parametrization: scaling alpha / rank keeps the best learning rate roughly rank-independent).
``exclude_modules`` (the original's ``lora_configs[*].exclude_modules``) is peft's: a regex
matched against whole module names, or a list of names matched exactly or as a name suffix.
Adapter weights are fp32 whatever the base dtype.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import asdict, dataclass
from itertools import count

import torch
from torch import nn

_ATTN_PARTS = ("attn", "attention")
_MLP_PARTS = ("mlp", "feed_forward", "ffn")


@dataclass(frozen=True)
class LoraSpec:
    """Tinker's ``LoraConfig`` plus ``alpha`` (peft scaling alpha / rank)."""

    rank: int = 32
    seed: int | None = None
    train_mlp: bool = True
    train_attn: bool = True
    train_unembed: bool = True
    alpha: float = 32.0
    exclude_modules: str | tuple[str, ...] | None = None

    def __post_init__(self):
        if isinstance(self.exclude_modules, list):  # read back from JSON
            object.__setattr__(self, "exclude_modules", tuple(self.exclude_modules))

    def same_shape(self, other: LoraSpec | None) -> bool:
        """Whether weights of one fit the other (the seed does not matter)."""
        if other is None:
            return False
        return asdict(self) | {"seed": None} == asdict(other) | {"seed": None}


def classify_linears(base: nn.Module) -> dict[str, list[str]]:
    """Linear module names of ``base`` by Tinker target group: attn, mlp, unembed."""
    head = base.get_output_embeddings()
    groups: dict[str, list[str]] = {"attn": [], "mlp": [], "unembed": []}
    for name, module in base.named_modules():
        if module is head:
            groups["unembed"].append(name)
        elif isinstance(module, nn.Linear):
            parts = name.lower().split(".")
            if any(p in part for part in parts for p in _ATTN_PARTS):
                groups["attn"].append(name)
            elif any(p in part for part in parts for p in _MLP_PARTS):
                groups["mlp"].append(name)
    return groups


class Adapters:
    """The adapters on ``base``: peft wraps it in place (``peft``) when the first one is added.

    Added adapters start frozen; callers unfreeze the parameters they train.
    """

    def __init__(self, base: nn.Module, model_name: str, dtype: torch.dtype):
        self.base = base
        self.model_name = model_name  # recorded in exported adapter configs
        self.dtype = dtype
        self.groups = classify_linears(base)
        self.peft = None  # the PeftModel wrapping base, once an adapter exists
        self._ids = count()
        self._linears: dict[str, list[nn.Module]] = {}  # linears(), until an adapter comes or goes

    def add(self, spec: LoraSpec, prefix: str, config=None) -> str:
        """A new adapter (``config``: a peft ``LoraConfig`` read from disk); its internal name."""
        from peft import get_peft_model

        config = config or self._lora_config(spec)
        self._linears.clear()
        adapter = f"{prefix}{next(self._ids)}"
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            # Intended: an unembedding LoRA on a tied model adapts the output side only.
            warnings.filterwarnings("ignore", message=".*tie_word_embeddings.*")
            # peft reads transformers' deprecated property; nothing for a user to act on.
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
            if spec.seed is not None:
                torch.manual_seed(spec.seed)
            if self.peft is None:
                # peft's wrapper starts in training mode; the engine runs in eval mode (no
                # dropout: a datum's logprobs are the sampler's), and a sample call that found
                # it training would switch every module to training mode after it.
                self.peft = get_peft_model(self.base, config, adapter_name=adapter).eval()
            else:
                self.peft.add_adapter(adapter, config)
        for module in self._lora_layers():
            if adapter in module.lora_A:
                module.lora_A[adapter].float().eval()  # new modules start in training mode
                module.lora_B[adapter].float().eval()
                module.lora_dropout[adapter].eval()
                # Under autocast the input needs no cast to the fp32 adapter weights.
                module.cast_input_dtype_enabled = self.dtype == torch.float32
        self._fix_active_adapter()
        for p in self.params(adapter).values():
            p.requires_grad_(False)
        return adapter

    def drop(self, adapter: str) -> None:
        self._linears.clear()
        with warnings.catch_warnings():  # "adapter was active ...": _fix_active_adapter decides
            warnings.filterwarnings("ignore", message=".*was active which is now deleted.*")
            self.peft.delete_adapter(adapter)
        self._fix_active_adapter()

    def activate(self, adapter: str) -> None:
        """The adapter a plain forward pass of ``peft`` applies."""
        self.peft.set_adapter(adapter)

    def shared_module(self) -> nn.Module:
        """What runs the base and every adapter: ``peft`` while it holds one, else ``base``."""
        return self.peft if self.peft is not None and self.peft.peft_config else self.base

    def params(self, adapter: str) -> dict[str, nn.Parameter]:
        """The adapter's LoRA factors by checkpoint name (``MODULE.lora_A.weight``)."""
        out = {}
        for name, module in self.base.named_modules():
            if hasattr(module, "lora_A") and adapter in module.lora_A:
                out[f"{name}.lora_A.weight"] = module.lora_A[adapter].weight
                out[f"{name}.lora_B.weight"] = module.lora_B[adapter].weight
        return out

    def linears(self, adapter: str) -> list[nn.Module]:
        """The peft ``lora.Linear`` layers of the decoder that hold ``adapter`` (what
        ``lora_linear.fused`` swaps; the unembedding's LoRA runs in forward.py instead)."""
        from peft.tuners.lora import Linear

        if adapter not in self._linears:  # a walk over every module: ~2 ms for the demo model
            head = self.base.get_output_embeddings()
            self._linears[adapter] = [
                m
                for m in self._lora_layers()
                if type(m) is Linear and m is not head and adapter in m.lora_A
            ]
        return self._linears[adapter]

    def saved_config(self, adapter: str):
        """The adapter's peft ``LoraConfig`` as an exported adapter directory holds it."""
        config = copy.deepcopy(self.peft.peft_config[adapter])
        config.inference_mode = True
        return config

    @torch.no_grad()
    def merge_into(self, model: nn.Module, adapter: str) -> None:
        """Every LoRA target of ``model`` (a plain copy of the base) := base + scaling * B @ A for
        ``adapter`` (the plain base weight where the adapter has no LoRA); an adapted tied head
        gets untied."""
        head_name = self.groups["unembed"][0]
        for name, module in self.base.named_modules():
            if not hasattr(module, "lora_A"):
                continue
            target = model.get_submodule(name)
            weight = module.base_layer.weight
            if adapter in module.lora_A:
                delta = module.scaling[adapter] * (
                    module.lora_B[adapter].weight.float() @ module.lora_A[adapter].weight.float()
                )
                weight = (weight.float() + delta).to(target.weight.dtype)
                if name == head_name and model.config.tie_word_embeddings:
                    target.weight = nn.Parameter(weight, requires_grad=False)
                    model.config.tie_word_embeddings = False
                    continue
            target.weight.copy_(weight)

    def _lora_config(self, spec: LoraSpec):
        from peft import LoraConfig

        names = [
            n
            for group, on in (
                ("attn", spec.train_attn),
                ("mlp", spec.train_mlp),
                ("unembed", spec.train_unembed),
            )
            if on
            for n in self.groups[group]
        ]
        if not names:
            raise ValueError("LoRA needs at least one of train_attn / train_mlp / train_unembed")
        # Short names (q_proj, lm_head, ...) when they select exactly these modules: readable and
        # what other tools (vLLM, ...) expect; full module names otherwise.
        short = {n.rsplit(".", 1)[-1] for n in names}
        every = [n for group in self.groups.values() for n in group]
        selected = {n for n in every if n.rsplit(".", 1)[-1] in short}
        targets = sorted(short) if selected == set(names) else names
        return LoraConfig(
            r=spec.rank,
            lora_alpha=spec.alpha,
            lora_dropout=0.0,
            target_modules=targets,
            exclude_modules=_peft_exclude(spec.exclude_modules),
            bias="none",
            base_model_name_or_path=self.model_name,
        )

    def _fix_active_adapter(self) -> None:
        """peft keeps a deleted adapter 'active'; point it at a live one (or leave none)."""
        live = list(self.peft.peft_config)
        if live and self.peft.active_adapter not in live:
            self.peft.set_adapter(live[0])

    def _lora_layers(self):
        from peft.tuners.lora import LoraLayer

        return [m for m in self.base.modules() if isinstance(m, LoraLayer)]


def _peft_exclude(exclude: str | tuple[str, ...] | None) -> str | list[str] | None:
    return list(exclude) if isinstance(exclude, tuple) else exclude
