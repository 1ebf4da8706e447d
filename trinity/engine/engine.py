"""The training engine: one base model in memory, Tinker's training and sampling calls on top.

- LoRA models are peft adapters on the shared base (trinity/engine/adapters.py).
- ``lora=None`` is full fine-tuning: the model gets its *own* fp32 copy of the base weights
  (loaded again from disk), so the base that samplers and LoRA models share stays untouched and
  several full fine-tunes can coexist, memory permitting (16 bytes / parameter with AdamW).
- Precision: frozen base weights in ``dtype`` (default: bf16 where the hardware has it, AMX /
  AVX512-BF16 / CUDA, else fp32: ``forward.default_dtype``), trainable parameters and optimizer
  state in fp32, matmuls under ``torch.autocast(dtype)``. Sampling runs under the same autocast
  so sampler and learner logprobs agree. ``dtype=torch.float32`` turns autocast off (the parity
  tests run that way).
- ``forward_backward`` packs datums into passes of at most ``micro_batch_tokens`` tokens,
  datums sharing a prompt running it once, without padding (trinity/engine/packing.py), and
  computes their logprobs (trinity/engine/forward.py). Losses are token sums (``losses.py``),
  gradients accumulate until ``optim_step``.
- Samplers are frozen snapshots (trinity/engine/samplers.py); ``sample`` decodes the requests
  on every model object in one batch.

Not thread-safe: callers serialize calls (docs/architecture.md, "Engine API").
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from tinker import types
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from trinity.engine import checkpoint, lora_linear, losses
from trinity.engine.adapters import Adapters, LoraSpec
from trinity.engine.attention import ATTENTION
from trinity.engine.demo_model import ALIASES as DEMO_ALIASES
from trinity.engine.demo_model import resolve_model_path
from trinity.engine.forward import Forward, default_dtype, packed_attention
from trinity.engine.optim import AdamW
from trinity.engine.packing import batch_inputs, micro_batches, prepare_example
from trinity.engine.samplers import SAMPLER_META, Sampler, Samplers
from trinity.engine.sampling import SampleRequest, sample_batch

DEMO_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


def with_rope(config, rope_scaling: dict | None = None, rope_theta: float | None = None):
    """``config`` with the original's ``rope_scaling`` (its ``type`` / ``rope_type``, ``factor``
    ...) and ``rope_theta`` merged into transformers' ``rope_parameters`` (one dict, or one per
    attention type)."""
    update = dict(rope_scaling or {})
    if "type" in update:
        update["rope_type"] = update.pop("type")
    if rope_theta is not None:
        update["rope_theta"] = float(rope_theta)
    params = config.rope_parameters or {}
    if params and all(isinstance(v, dict) for v in params.values()):
        config.rope_parameters = {kind: {**p, **update} for kind, p in params.items()}
    else:
        config.rope_parameters = {**params, **update}
    return config


def _backward(loss: torch.Tensor, outputs: list[torch.Tensor]) -> bool:
    """``loss.backward()`` in two stages: the loss's gradient on the pass's ``outputs`` (per-token
    logprobs, entropy), then through the model, unless that gradient is exactly zero everywhere
    (then every parameter's gradient would be exactly zero, at ~2/3 of the pass's cost).
    Whether the backward ran."""
    outputs = [o for o in outputs if o.requires_grad]
    grads = torch.autograd.grad(loss, outputs, allow_unused=True, retain_graph=True)
    kept = [(o, g) for o, g in zip(outputs, grads, strict=True) if g is not None]
    if not any(bool(g.any()) for _, g in kept):
        return False
    torch.autograd.backward([o for o, _ in kept], [g for _, g in kept])
    return True


@dataclass
class _Trainable(Sampler):
    """A model being trained, which can be sampled from too; ``module`` is the shared base
    (LoRA) or its own fp32 copy (full)."""

    params: dict[str, nn.Parameter]  # fp32, by checkpoint name
    optimizer: AdamW


# Tinker's module name for the unembedding (output projection) in exported adapters.
TINKER_UNEMBED = "model.unembed_tokens"


class Engine:
    """Tinker's training and sampling calls over one Hugging Face causal LM."""

    # Tokens per forward/backward pass (padded where rows run alone): bounds activation memory
    # (about 2 MB per token in fp32 for the 135M demo model, half in bf16) at no cost in CPU
    # matmul efficiency.
    micro_batch_tokens = 2048

    def __init__(
        self,
        model_path: str,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        compile_decode: bool = False,
        rope: dict | None = None,
    ):
        """``compile_decode``: run the fused decode step under ``torch.compile`` (off by default:
        on a CPU compilation costs more than it saves, see docs/benchmarks.md "Sampling speed").
        ``rope``: ``rope_scaling`` / ``rope_theta`` set on the model's config before loading
        (the original's ``model.rope_scaling`` / ``model.rope_theta``), e.g. to stretch the
        context with ``{"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}``."""
        name = str(model_path)
        self.compile_decode = compile_decode
        self.rope = {k: v for k, v in (rope or {}).items() if v is not None}
        self.model_name = DEMO_HUB_ID if name in DEMO_ALIASES else name
        self.path = Path(resolve_model_path(name))
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = dtype or default_dtype(self.device)
        if self.path.suffix == ".gguf":
            self.tokenizer = AutoTokenizer.from_pretrained(
                self.path.parent, gguf_file=self.path.name
            )
        else:
            self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        self.base = self._load_causal_lm(self.dtype)
        config = self.base.config
        for attr in ("final_logit_softcapping", "logit_scale", "logits_scaling"):
            if getattr(config, attr, None) not in (None, 1, 1.0):
                raise ValueError(f"{self.model_name}: {attr} is not supported by the engine")
        self.vocab_size = int(self.base.get_input_embeddings().num_embeddings)
        self.max_context_length = int(getattr(config, "max_position_embeddings", 4096))
        eos = self.base.generation_config.eos_token_id
        eos = list(eos) if isinstance(eos, list | tuple) else [eos]
        self.eos_token_ids = sorted(
            {e for e in [*eos, self.tokenizer.eos_token_id] if e is not None}
        )
        pad = self.tokenizer.pad_token_id
        self.pad_token_id = int(pad if pad is not None else self.eos_token_ids[0])
        self._share_prefixes, window = packed_attention(config)
        self._forward = Forward(self.device, self.dtype, self.pad_token_id, window)
        self._adapters = Adapters(self.base, self.model_name, self.dtype)
        self._models: dict[str, _Trainable] = {}
        self._samplers = Samplers(
            self._adapters, self.dtype, self.device, lambda: self._load_causal_lm(self.dtype)
        )

    # ------------------------------------------------------------------ loading
    def _load_causal_lm(self, dtype: torch.dtype) -> nn.Module:
        gguf = self.path.suffix == ".gguf"
        where = self.path.parent if gguf else self.path
        kwargs = {"gguf_file": self.path.name} if gguf else {}
        if self.rope:
            kwargs["config"] = with_rope(AutoConfig.from_pretrained(where, **kwargs), **self.rope)
        model = AutoModelForCausalLM.from_pretrained(
            where, dtype=dtype, attn_implementation=ATTENTION, **kwargs
        )
        if gguf:
            model.hf_quantizer = None  # dequantized already; lets save_pretrained work
            model.is_quantized = False
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
        head = model.get_output_embeddings()
        if not isinstance(head, nn.Linear) or head.bias is not None:
            raise ValueError(f"{self.model_name}: the engine needs a bias-free Linear lm_head")
        return model.to(self.device).eval().requires_grad_(False)

    # ------------------------------------------------------------------ models
    def create_model(self, model_id: str, lora: LoraSpec | None = None) -> None:
        """A new trainable model: a LoRA adapter on the base, or (``lora=None``) a full copy."""
        if model_id in self._models or self.has_sampler(model_id):
            raise ValueError(f"model_id {model_id!r} already exists")
        if lora is None:
            module = self._load_causal_lm(torch.float32).requires_grad_(True)
            params = dict(module.named_parameters())
            self._models[model_id] = _Trainable(None, None, module, params, AdamW(params))
            return
        if lora.rank <= 0:
            raise ValueError(f"LoRA rank must be positive, got {lora.rank}")
        adapter = self._adapters.add(lora, "t")
        params = self._adapters.params(adapter)
        for p in params.values():
            p.requires_grad_(True)
        self._models[model_id] = _Trainable(lora, adapter, self.base, params, AdamW(params))

    def load_adapter(self, model_id: str, directory: str) -> None:
        """Start LoRA model ``model_id`` from a peft adapter directory (the original's
        ``lora_configs[*].path``): its factors are copied into the model's; targets the
        directory does not adapt keep their zero ``lora_B`` (no change to the base)."""
        from peft import LoraConfig

        model = self._model(model_id)
        if model.spec is None:
            raise ValueError(f"model {model_id!r} is a full fine-tune: it has no adapter")
        saved = LoraConfig.from_pretrained(str(directory))
        if (saved.r, saved.lora_alpha) != (model.spec.rank, model.spec.alpha):
            raise ValueError(
                f"adapter {directory} has rank {saved.r} / alpha {saved.lora_alpha}, model "
                f"{model_id!r} rank {model.spec.rank} / alpha {model.spec.alpha}"
            )
        if saved.use_rslora or saved.use_dora:
            raise ValueError(f"adapter {directory}: rsLoRA / DoRA adapters are not supported")
        tensors = checkpoint.read_peft(directory)
        extra = sorted(set(tensors) - set(model.params))
        if extra:
            raise ValueError(
                f"adapter {directory} adapts {len(extra)} tensors model {model_id!r} has no LoRA "
                f"on (excluded or not a target), e.g. {extra[:3]}"
            )
        checkpoint.copy_into({k: model.params[k] for k in tensors}, tensors, f"adapter {directory}")

    def _model(self, model_id: str) -> _Trainable:
        if model_id not in self._models:
            raise ValueError(f"unknown model_id {model_id!r}")
        return self._models[model_id]

    def remove_model(self, model_id: str) -> None:
        model = self._model(model_id)
        del self._models[model_id]
        if model.adapter is not None:
            self._adapters.drop(model.adapter)

    def model_info(self, model_id: str) -> dict:
        model = self._model(model_id)
        spec = asdict(model.spec) if model.spec else {}
        return {
            "is_lora": model.spec is not None,
            **{key: spec.get(key) for key in ("rank", "alpha", "seed")},
            **{key: spec.get(key, True) for key in ("train_mlp", "train_attn", "train_unembed")},
            "step": model.optimizer.steps,
            "trainable_parameters": sum(p.numel() for p in model.params.values()),
        }

    # ------------------------------------------------------------------ training
    def forward_backward(
        self,
        model_id: str,
        datums: list[types.Datum],
        loss_fn: str,
        loss_fn_config: dict | None = None,
        forward_only: bool = False,
        return_entropy: bool = False,
    ) -> types.ForwardBackwardOutput:
        """Tinker's forward_backward (or forward): token-sum loss, gradients accumulate."""
        model = self._model(model_id)
        config = losses.resolve_config(loss_fn, loss_fn_config)
        loss_def = losses.get_loss(loss_fn)
        examples = [
            prepare_example(i, d, loss_def, self.vocab_size, self.max_context_length)
            for i, d in enumerate(datums)
        ]
        if model.adapter is not None:
            self._adapters.activate(model.adapter)
        outputs: list[dict[str, types.TensorData]] = [{} for _ in datums]
        total = 0.0
        # the decoder's LoRA linears of a training pass run fused (trinity/engine/lora_linear.py)
        train = model.adapter is not None and not forward_only
        fused = self._adapters.linears(model.adapter) if train else []
        # A datum whose loss is 0 whatever its logprobs (``losses.inert``: a GRPO group of equal
        # rewards) has no gradient: it runs in passes of its own that no backward follows (the
        # same fused forward, so its logprobs are computed alike), and the backward covers the
        # other datums' tokens alone. Where no backward runs at all, every parameter still gets
        # its exact zero gradient (the optimizer's step then moves it as after a backward).
        idle = {e.index for e in examples if not forward_only and losses.inert(loss_def, e.inputs)}
        backward = False
        for part, live in (
            ([e for e in examples if e.index not in idle], not forward_only),
            ([e for e in examples if e.index in idle], False),
        ):
            for clusters in micro_batches(part, self.micro_batch_tokens, self._share_prefixes):
                group = [e for _, members in clusters for e in members]
                # an entropy term (losses.ENTROPY_WEIGHTS) needs the entropy, with its gradient;
                # a returned one alone needs none (and the backward then keeps probabilities)
                weighted = any(
                    losses.ENTROPY_WEIGHTS in datums[e.index].loss_fn_inputs for e in group
                )
                with torch.set_grad_enabled(not forward_only), lora_linear.fused(fused):
                    logprobs_N, entropy_N = self._forward.logprobs(
                        model.module, model.adapter, clusters, return_entropy or weighted, weighted
                    )
                    inputs = {k: v.to(self.device) for k, v in batch_inputs(group, config).items()}
                    loss = losses.token_losses(loss_fn, logprobs_N, inputs, config).sum()
                    if weighted:
                        loss = loss + (inputs[losses.ENTROPY_WEIGHTS] * entropy_N).sum()
                    if live and loss.requires_grad:  # (False for empty datums only)
                        backward |= _backward(loss, [logprobs_N, entropy_N])
                total += loss.item()
                offsets = np.cumsum([0] + [e.length for e in group])
                logprobs_np = logprobs_N.detach().cpu().numpy()
                entropy_np = entropy_N.detach().cpu().numpy()
                for e, start, end in zip(group, offsets[:-1], offsets[1:], strict=True):
                    out = outputs[e.index]
                    out["logprobs"] = types.TensorData.from_numpy(logprobs_np[start:end].copy())
                    if return_entropy:
                        out["entropy"] = types.TensorData.from_numpy(entropy_np[start:end].copy())
        if not forward_only and not backward:
            for p in model.params.values():
                if p.requires_grad and p.grad is None:
                    p.grad = torch.zeros_like(p)
        return types.ForwardBackwardOutput(
            loss_fn_output_type="ArrayRecord", loss_fn_outputs=outputs, metrics={"loss:sum": total}
        )

    def optim_step(self, model_id: str, params: types.AdamParams) -> dict[str, float]:
        """AdamW step with Tinker's per-step hyperparameters; zeroes the gradients."""
        return self._model(model_id).optimizer.step(params)

    # ------------------------------------------------------------------ checkpoints
    def save_state(self, model_id: str, directory: str, optimizer: bool = True) -> None:
        model = self._model(model_id)
        meta = {
            "base_model": self.model_name,
            "lora": asdict(model.spec) if model.spec else None,
            "step": model.optimizer.steps,
        }
        checkpoint.write_state(
            directory,
            meta,
            dict(model.params),
            model.optimizer.state_tensors() if optimizer else None,
        )

    def load_state(self, model_id: str, directory: str, optimizer: bool = True) -> None:
        """Weights (and optimizer moments); ``model_id`` is created from the meta when new."""
        meta = checkpoint.read_state_meta(directory)
        spec = LoraSpec(**meta["lora"]) if meta["lora"] else None
        if model_id not in self._models:
            self.create_model(model_id, spec)
        model = self._models[model_id]
        if (spec is None) != (model.spec is None) or (spec and not spec.same_shape(model.spec)):
            raise ValueError(
                f"checkpoint {directory} holds {spec or 'a full fine-tune'}, "
                f"model {model_id!r} is {model.spec or 'a full fine-tune'}"
            )
        checkpoint.copy_into(
            model.params,
            checkpoint.read_tensors(directory, checkpoint.WEIGHTS),
            f"checkpoint {directory}",
        )
        for p in model.params.values():
            p.grad = None
        if not optimizer:
            model.optimizer.reset()
        elif not meta["optimizer"]:
            raise ValueError(f"checkpoint {directory} was saved without optimizer state")
        else:
            model.optimizer.load_state_tensors(
                checkpoint.read_tensors(directory, checkpoint.OPTIMIZER), int(meta["step"])
            )

    # ------------------------------------------------------------------ samplers
    def snapshot_sampler(self, model_id: str, name: str) -> None:
        """Freeze the current weights of ``model_id`` as sampler ``name`` (replacing one)."""
        model = self._model(model_id)
        if name in self._models:
            raise ValueError(f"sampler name {name!r} is a model_id")
        self._samplers.snapshot(name, model, model.params)

    def has_sampler(self, name: str) -> bool:
        return name in self._samplers.by_name

    def drop_sampler(self, name: str) -> None:
        self._samplers.drop(name)

    def save_sampler(self, name: str, directory: str) -> None:
        """A peft adapter dir (LoRA) or a merged HF dir (full), plus ``trinity_sampler.json``."""
        sampler = self._sampler(name)
        if sampler.adapter is not None:
            self.export_peft(name, directory)
        else:
            self.export_merged(name, directory)
        meta = {
            "base_model": self.model_name,
            "lora": asdict(sampler.spec) if sampler.spec else None,
        }
        (Path(directory) / SAMPLER_META).write_text(json.dumps(meta, indent=1))

    def load_sampler(self, name: str, directory: str, reuse: str | None = None) -> None:
        """Load a ``save_sampler`` dir, or any peft LoRA adapter dir for this base; ``reuse``:
        a sampler that is dropped next, whose adapter may take the new weights
        (``Samplers.load``)."""
        if name in self._models:
            raise ValueError(f"sampler name {name!r} is a model_id")
        self._samplers.load(name, directory, reuse)

    def _sampler(self, name: str) -> Sampler:
        if self.has_sampler(name):
            return self._samplers.by_name[name]
        if name in self._models:
            return self._models[name]
        raise ValueError(f"unknown model or sampler {name!r}")

    # ------------------------------------------------------------------ sampling
    def sample(self, requests: list[SampleRequest]) -> list[types.SampleResponse]:
        """One batch per model object: base and every LoRA adapter decode together; a batch on
        one sampler adapter alone (an RL rollout) may decode on a merged copy (``Samplers.merged``).
        """
        groups: dict[int, tuple[nn.Module, list[tuple[int, SampleRequest]]]] = {}
        for index, request in enumerate(requests):
            module, adapter = self._sampling_target(request.adapter)
            routed = replace(request, adapter=adapter)
            groups.setdefault(id(module), (module, []))[1].append((index, routed))
        responses: list[types.SampleResponse | None] = [None] * len(requests)
        for module, items in groups.values():
            adapters = {r.adapter for _, r in items}
            merged = None
            if module is self._adapters.peft and len(adapters) == 1:
                merged = self._samplers.merged(*adapters)
            if merged is not None:
                module = merged
                items = [(i, replace(r, adapter=None)) for i, r in items]
            with self._forward.autocast():
                out = sample_batch(
                    module,
                    [r for _, r in items],
                    eos_token_ids=self.eos_token_ids,
                    pad_token_id=self.pad_token_id,
                    device=self.device,
                    tokenizer=self.tokenizer,
                    max_context_length=self.max_context_length,
                    compiled=self.compile_decode,
                )
            for (index, _), response in zip(items, out, strict=True):
                responses[index] = response
        return responses

    def _sampling_target(self, name: str | None) -> tuple[nn.Module, str | None]:
        shared = self._adapters.shared_module()
        if name is None:
            return shared, None
        entry = self._sampler(name)
        return (shared, entry.adapter) if entry.adapter is not None else (entry.module, None)

    # ------------------------------------------------------------------ exports
    def export_peft(self, name: str, directory: str, tinker_names: bool = False) -> None:
        """A peft adapter directory for a LoRA model or sampler.

        ``tinker_names``: name the unembedding LoRA ``model.unembed_tokens`` as Tinker's exports
        do, so tinker-cookbook's ``weights.build_hf_model`` merges it (onto ``lm_head``, or onto
        the tied ``embed_tokens``); peft itself then no longer loads the directory as is.
        """
        entry = self._sampler(name)
        if entry.adapter is None:
            raise ValueError(f"{name!r} is a full fine-tune: it has no adapter (export_merged)")
        config = self._adapters.saved_config(entry.adapter)
        params = self._adapters.params(entry.adapter)
        if tinker_names:
            head = self._adapters.groups["unembed"][0]
            params = {
                TINKER_UNEMBED + k.removeprefix(head) if k.startswith(f"{head}.lora_") else k: v
                for k, v in params.items()
            }
            config.target_modules = {
                TINKER_UNEMBED.rsplit(".", 1)[-1] if m in (head, head.rsplit(".", 1)[-1]) else m
                for m in config.target_modules
            }
        checkpoint.write_peft(directory, config, params)

    def export_checkpoint(self, source: str, to: str, directory: str) -> None:
        """A saved training state or sampler directory of this base model as a merged Hugging Face
        model (``to="hf"``) or a peft adapter (``"peft"``), as it sampled."""
        name = f"export:{source}"
        if (Path(source) / checkpoint.STATE_META).is_file():
            self.load_state(name, source, optimizer=False)
        else:
            self.load_sampler(name, source)
        (self.export_peft if to == "peft" else self.export_merged)(name, directory)

    def export_merged(self, name: str, directory: str) -> None:
        """A Hugging Face model directory (``dtype`` weights) with the adapter merged in."""
        entry = self._sampler(name)
        if entry.adapter is None:
            merged = copy.deepcopy(entry.module).to(self.dtype)
        else:
            merged = self._load_causal_lm(self.dtype)
            self._adapters.merge_into(merged, entry.adapter)
        merged.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)
