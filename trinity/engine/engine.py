"""The training engine: one base model in memory, Tinker's training calls on top of it.

- LoRA models are peft adapters on the shared base (peft multi-adapter; the adapter name inside
  peft is internal, ``t3`` / ``s7``, because user names such as paths or ``session:sample:0`` are
  not valid module keys). Targets follow Tinker's ``LoraConfig``: ``train_attn`` = every Linear
  of the attention blocks, ``train_mlp`` = of the MLP blocks, ``train_unembed`` = the output
  projection (``lm_head``). With tied embeddings the unembedding LoRA adapts the output side only
  (the input embedding stays the base one); ``export_merged`` therefore unties the two.
  ``alpha`` defaults to 32 whatever the rank (Tinker's "LoRA without regret" parametrization:
  scaling alpha / rank keeps the best learning rate roughly rank-independent).
- ``lora=None`` is full fine-tuning: the model gets its *own* fp32 copy of the base weights
  (loaded again from disk), so the base that samplers and LoRA models share stays untouched and
  several full fine-tunes can coexist, memory permitting (16 bytes / parameter with AdamW).
- Precision: frozen base weights in ``dtype`` (default: bf16 where the hardware has it, AMX /
  AVX512-BF16 / CUDA, else fp32: see ``default_dtype``), trainable parameters and optimizer
  state in fp32, matmuls under ``torch.autocast(dtype)``. Sampling runs under the same autocast
  so sampler and learner logprobs agree. ``dtype=torch.float32`` turns autocast off (the parity
  tests run that way).
- ``forward_backward`` sorts datums by length and packs them into right-padded micro-batches of at
  most ``micro_batch_tokens`` (padded) tokens; no attention mask is needed since right padding
  never precedes a real token. Logprobs go through ``logprobs.target_logprobs`` (chunked, no full
  fp32 logits). Losses are token sums (``losses.py``), gradients accumulate until ``optim_step``.
- Datums sharing a prefix of at least ``MIN_SHARED_PREFIX`` tokens (GRPO's samples of one
  prompt) run it once per micro-batch: its cache feeds every member's suffix, and gradients flow
  back through the shared part (``_prefix_clusters``).
- Snapshots (``snapshot_sampler``) are frozen copies: a LoRA snapshot is another peft adapter, a
  full fine-tune snapshot a ``dtype`` copy of the whole model. In fp32, a sampling batch on one
  LoRA snapshot alone decodes on a merged plain copy of the model (one more copy of the weights
  in memory), rebuilt when the snapshot changes.

Not thread-safe: callers serialize calls (docs/architecture.md, "Engine API").
"""

from __future__ import annotations

import copy
import ctypes
import json
import os
import sys
import warnings
from dataclasses import asdict, dataclass, replace
from itertools import count
from pathlib import Path

import numpy as np
import torch
from tinker import types
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

from trinity.engine import checkpoint, losses
from trinity.engine.demo_model import ALIASES as DEMO_ALIASES
from trinity.engine.demo_model import resolve_model_path
from trinity.engine.logprobs import target_logprobs
from trinity.engine.optim import AdamW
from trinity.engine.sampling import SampleRequest, sample_batch

DEMO_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
SAMPLER_META = "trinity_sampler.json"
_ATTN_PARTS = ("attn", "attention")
_MLP_PARTS = ("mlp", "feed_forward", "ffn")
# Shorter common prefixes are not worth a second forward call per micro-batch.
MIN_SHARED_PREFIX = 16


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 where the hardware computes it fast (AMX / AVX512-BF16, CUDA), else fp32.

    Without native bf16 (e.g. AVX2-only CPUs) bf16 matmuls fall back to slow reference loops,
    hundreds of times slower than fp32.
    """
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device.type == "cpu":
        native = (getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
                  or getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)())
        return torch.bfloat16 if native else torch.float32
    return torch.float32


def keep_freed_memory() -> None:
    """Stop glibc from handing freed blocks of up to 32 MiB back to the OS.

    By default every large tensor is a fresh ``mmap`` and its first touch page-faults; in VMs that
    made elementwise ops on new tensors 5-10x slower than on reused memory (a training step
    allocates thousands). Process-wide; the cost is that RSS stays at its peak.
    """
    if sys.platform != "linux":
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc
        return
    libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD, glibc's maximum
    libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD


def _prefix_clusters(examples: list[dict]) -> list[tuple[int, list[dict]]]:
    """(shared prefix length, members): lexicographic neighbours join a cluster while that saves
    more prefix tokens than it gives up; a prefix leaves every member at least one token of its
    own and is 0 (no sharing) under ``MIN_SHARED_PREFIX`` or for a lone example."""
    clusters: list[tuple[list[int], list[dict]]] = []
    for example in sorted(examples, key=lambda e: e["tokens"]):
        tokens = example["tokens"][:max(example["length"] - 1, 0)]
        if clusters:
            prefix, members = clusters[-1]
            joined = tokens[:len(os.path.commonprefix([prefix, tokens]))]
            if len(joined) * len(members) >= len(prefix) * (len(members) - 1) + 1 \
                    and len(joined) >= MIN_SHARED_PREFIX:
                clusters[-1] = (joined, [*members, example])
                continue
        clusters.append((tokens, [example]))
    return [(len(prefix) if len(members) > 1 and len(prefix) >= MIN_SHARED_PREFIX else 0,
             members) for prefix, members in clusters]


@dataclass(frozen=True)
class LoraSpec:
    """Tinker's ``LoraConfig`` plus ``alpha`` (peft scaling alpha / rank)."""

    rank: int = 32
    seed: int | None = None
    train_mlp: bool = True
    train_attn: bool = True
    train_unembed: bool = True
    alpha: float = 32.0

    def same_shape(self, other: LoraSpec | None) -> bool:
        """Whether weights of one fit the other (the seed does not matter)."""
        if other is None:
            return False
        return asdict(self) | {"seed": None} == asdict(other) | {"seed": None}


@dataclass
class _Trainable:
    spec: LoraSpec | None
    adapter: str | None  # internal peft adapter name (LoRA)
    module: nn.Module  # the causal LM to run: the shared base (LoRA) or an own copy (full)
    params: dict[str, nn.Parameter]  # fp32, by checkpoint name
    optimizer: AdamW


@dataclass
class _Sampler:
    spec: LoraSpec | None
    adapter: str | None
    module: nn.Module


class Engine:
    """Tinker's training and sampling calls over one Hugging Face causal LM."""

    # Padded tokens per forward/backward pass: bounds activation memory (about 2 MB per token in
    # fp32 for the 135M demo model, half in bf16) at no cost in CPU matmul efficiency.
    micro_batch_tokens = 2048

    def __init__(self, model_path: str, *, device: str | torch.device | None = None,
                 dtype: torch.dtype | None = None):
        keep_freed_memory()
        name = str(model_path)
        self.model_name = DEMO_HUB_ID if name in DEMO_ALIASES else name
        self.path = Path(resolve_model_path(name))
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = dtype or default_dtype(self.device)
        if self.path.suffix == ".gguf":
            self.tokenizer = AutoTokenizer.from_pretrained(self.path.parent,
                                                           gguf_file=self.path.name)
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
        self.eos_token_ids = sorted({e for e in [*eos, self.tokenizer.eos_token_id]
                                     if e is not None})
        pad = self.tokenizer.pad_token_id
        self.pad_token_id = int(pad if pad is not None else self.eos_token_ids[0])
        self._module_groups = self._classify_linears()
        self._peft = None  # the PeftModel wrapping self.base, once a LoRA exists
        self._models: dict[str, _Trainable] = {}
        self._samplers: dict[str, _Sampler] = {}
        self._adapter_ids = count()
        # A plain copy of the model with one frozen sampler adapter merged in (fp32 only), and
        # that adapter's name while the merge is current.
        self._merged: nn.Module | None = None
        self._merged_adapter: str | None = None

    # ------------------------------------------------------------------ loading
    def _load_causal_lm(self, dtype: torch.dtype) -> nn.Module:
        if self.path.suffix == ".gguf":
            model = AutoModelForCausalLM.from_pretrained(
                self.path.parent, gguf_file=self.path.name, dtype=dtype)
            model.hf_quantizer = None  # dequantized already; lets save_pretrained work
            model.is_quantized = False
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
        else:
            model = AutoModelForCausalLM.from_pretrained(self.path, dtype=dtype)
        head = model.get_output_embeddings()
        if not isinstance(head, nn.Linear) or head.bias is not None:
            raise ValueError(f"{self.model_name}: the engine needs a bias-free Linear lm_head")
        return model.to(self.device).eval().requires_grad_(False)

    def _classify_linears(self) -> dict[str, list[str]]:
        """Linear module names of the base by Tinker target group: attn, mlp, unembed."""
        head = self.base.get_output_embeddings()
        groups: dict[str, list[str]] = {"attn": [], "mlp": [], "unembed": []}
        for name, module in self.base.named_modules():
            if module is head:
                groups["unembed"].append(name)
            elif isinstance(module, nn.Linear):
                parts = name.lower().split(".")
                if any(p in part for part in parts for p in _ATTN_PARTS):
                    groups["attn"].append(name)
                elif any(p in part for part in parts for p in _MLP_PARTS):
                    groups["mlp"].append(name)
        return groups

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype,
                              enabled=self.dtype != torch.float32)

    # ------------------------------------------------------------------ models
    def create_model(self, model_id: str, lora: LoraSpec | None = None) -> None:
        """A new trainable model: a LoRA adapter on the base, or (``lora=None``) a full copy."""
        if model_id in self._models or model_id in self._samplers:
            raise ValueError(f"model_id {model_id!r} already exists")
        if lora is None:
            module = self._load_causal_lm(torch.float32).requires_grad_(True)
            params = dict(module.named_parameters())
            self._models[model_id] = _Trainable(None, None, module, params, AdamW(params))
            return
        if lora.rank <= 0:
            raise ValueError(f"LoRA rank must be positive, got {lora.rank}")
        adapter = self._add_adapter(lora, "t")
        params = self._lora_params(adapter)
        for p in params.values():
            p.requires_grad_(True)
        self._models[model_id] = _Trainable(lora, adapter, self.base, params, AdamW(params))

    def _lora_config(self, spec: LoraSpec):
        from peft import LoraConfig

        names = [n for group, on in (("attn", spec.train_attn), ("mlp", spec.train_mlp),
                                     ("unembed", spec.train_unembed)) if on
                 for n in self._module_groups[group]]
        if not names:
            raise ValueError("LoRA needs at least one of train_attn / train_mlp / train_unembed")
        # Short names (q_proj, lm_head, ...) when they select exactly these modules: readable and
        # what other tools (vLLM, ...) expect; full module names otherwise.
        short = {n.rsplit(".", 1)[-1] for n in names}
        every = [n for group in self._module_groups.values() for n in group]
        selected = {n for n in every if n.rsplit(".", 1)[-1] in short}
        targets = sorted(short) if selected == set(names) else names
        return LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=0.0,
                          target_modules=targets, bias="none",
                          base_model_name_or_path=self.model_name)

    def _add_adapter(self, spec: LoraSpec, prefix: str, config=None) -> str:
        from peft import get_peft_model

        config = config or self._lora_config(spec)
        adapter = f"{prefix}{next(self._adapter_ids)}"
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            # Intended: an unembedding LoRA on a tied model adapts the output side only.
            warnings.filterwarnings("ignore", message=".*tie_word_embeddings.*")
            # peft reads transformers' deprecated property; nothing for a user to act on.
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
            if spec.seed is not None:
                torch.manual_seed(spec.seed)
            if self._peft is None:
                self._peft = get_peft_model(self.base, config, adapter_name=adapter)
            else:
                self._peft.add_adapter(adapter, config)
        for module in self._lora_layers():
            if adapter in module.lora_A:
                module.lora_A[adapter].float()
                module.lora_B[adapter].float()
                # Under autocast the input needs no cast to the fp32 adapter weights.
                module.cast_input_dtype_enabled = self.dtype == torch.float32
        self._fix_active_adapter()
        for p in self._lora_params(adapter).values():
            p.requires_grad_(False)
        return adapter

    def _drop_adapter(self, adapter: str) -> None:
        with warnings.catch_warnings():  # "adapter was active ...": _fix_active_adapter decides
            warnings.filterwarnings("ignore", message=".*was active which is now deleted.*")
            self._peft.delete_adapter(adapter)
        self._fix_active_adapter()

    def _fix_active_adapter(self) -> None:
        """peft keeps a deleted adapter 'active'; point it at a live one (or leave none)."""
        live = list(self._peft.peft_config)
        if live and self._peft.active_adapter not in live:
            self._peft.set_adapter(live[0])

    def _lora_layers(self):
        from peft.tuners.lora import LoraLayer

        return [m for m in self.base.modules() if isinstance(m, LoraLayer)]

    def _lora_params(self, adapter: str) -> dict[str, nn.Parameter]:
        out = {}
        for name, module in self.base.named_modules():
            if hasattr(module, "lora_A") and adapter in module.lora_A:
                out[f"{name}.lora_A.weight"] = module.lora_A[adapter].weight
                out[f"{name}.lora_B.weight"] = module.lora_B[adapter].weight
        return out

    def _model(self, model_id: str) -> _Trainable:
        if model_id not in self._models:
            raise ValueError(f"unknown model_id {model_id!r}")
        return self._models[model_id]

    def remove_model(self, model_id: str) -> None:
        model = self._model(model_id)
        del self._models[model_id]
        if model.adapter is not None:
            self._drop_adapter(model.adapter)

    def model_info(self, model_id: str) -> dict:
        model = self._model(model_id)
        spec = asdict(model.spec) if model.spec else {}
        return {"is_lora": model.spec is not None, "rank": spec.get("rank"),
                "alpha": spec.get("alpha"), "seed": spec.get("seed"),
                "train_mlp": spec.get("train_mlp", True),
                "train_attn": spec.get("train_attn", True),
                "train_unembed": spec.get("train_unembed", True),
                "step": model.optimizer.steps,
                "trainable_parameters": sum(p.numel() for p in model.params.values())}

    # ------------------------------------------------------------------ training
    def forward_backward(self, model_id: str, datums: list[types.Datum], loss_fn: str,
                         loss_fn_config: dict | None = None, forward_only: bool = False,
                         return_entropy: bool = False) -> types.ForwardBackwardOutput:
        """Tinker's forward_backward (or forward): token-sum loss, gradients accumulate."""
        model = self._model(model_id)
        config = losses.resolve_config(loss_fn, loss_fn_config)
        examples = [self._example(i, d, losses.get_loss(loss_fn)) for i, d in enumerate(datums)]
        if model.adapter is not None:
            self._peft.set_adapter(model.adapter)
        outputs: list[dict[str, types.TensorData]] = [{} for _ in datums]
        total = 0.0
        for clusters in self._micro_batches(examples):
            group = [e for _, members in clusters for e in members]
            with torch.set_grad_enabled(not forward_only):
                logprobs_N, entropy_N = self._logprobs(model, clusters, return_entropy)
                inputs = self._batch_inputs(group, config)
                loss = losses.token_losses(loss_fn, logprobs_N, inputs, config).sum()
                if not forward_only and loss.requires_grad:  # (False for empty datums only)
                    loss.backward()
            total += loss.item()
            offsets = np.cumsum([0] + [e["length"] for e in group])
            logprobs_np = logprobs_N.detach().cpu().numpy()
            entropy_np = entropy_N.cpu().numpy()
            for e, start, end in zip(group, offsets[:-1], offsets[1:], strict=True):
                out = outputs[e["index"]]
                out["logprobs"] = types.TensorData.from_numpy(logprobs_np[start:end].copy())
                if return_entropy:
                    out["entropy"] = types.TensorData.from_numpy(entropy_np[start:end].copy())
        return types.ForwardBackwardOutput(loss_fn_output_type="ArrayRecord",
                                           loss_fn_outputs=outputs, metrics={"loss:sum": total})

    def _example(self, index: int, datum: types.Datum, loss: losses.LossFn) -> dict:
        tokens = datum.model_input.to_ints()
        n = len(tokens)
        if n > self.max_context_length:
            raise ValueError(f"datum {index}: {n} tokens exceed the context length "
                             f"{self.max_context_length}")
        missing = [key for key in loss.inputs if key not in datum.loss_fn_inputs]
        if missing:
            raise ValueError(f"datum {index}: loss_fn_inputs lacks {missing} "
                             f"(this loss needs {', '.join(loss.inputs)})")
        inputs = {}
        for key in (*loss.inputs, *loss.optional_inputs):
            if key not in datum.loss_fn_inputs:
                continue
            value = torch.from_numpy(np.asarray(datum.loss_fn_inputs[key].to_numpy()))
            if value.shape != (n,):
                raise ValueError(f"datum {index}: loss_fn_inputs[{key!r}] has shape "
                                 f"{tuple(value.shape)}, expected ({n},) like model_input")
            inputs[key] = value.long() if key == "target_tokens" else value.float()
        for name, ids in (("model_input", torch.tensor(tokens, dtype=torch.long)),
                          ("target_tokens", inputs["target_tokens"])):
            if n and (int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size):
                raise ValueError(f"datum {index}: {name} has token ids outside "
                                 f"[0, {self.vocab_size})")
        return {"index": index, "tokens": tokens, "length": n, "inputs": inputs}

    def _batch_inputs(self, group: list[dict], config: dict[str, float]) -> dict:
        """Per-token inputs, rows concatenated; a datum without an optional per-token input
        (clip thresholds) gets the config value."""
        keys = {k for e in group for k in e["inputs"]}
        return {k: torch.cat([e["inputs"][k] if k in e["inputs"]
                              else torch.full((e["length"],), config[k]) for e in group])
                .to(self.device) for k in keys}

    def _micro_batches(self, examples: list[dict]) -> list[list[tuple[int, list[dict]]]]:
        """Forward passes as lists of (shared prefix length, members) clusters.

        Examples that share a long prefix (GRPO's samples of one prompt) run it once: a pass
        holds several such clusters (prefix rows + member suffix rows within micro_batch_tokens).
        The rest go alone, longest first, rows x longest row within micro_batch_tokens, as one
        cluster with prefix 0.
        """
        shared: list[list[tuple[int, list[dict]]]] = []
        alone: list[dict] = []
        cost = 0  # padded tokens of the pass being filled (an upper bound: every row at max width)
        for prefix, members in _prefix_clusters(examples):
            if prefix == 0:
                alone.extend(members)
                continue
            suffix = max(e["length"] - prefix for e in members)
            rows = max(1, (self.micro_batch_tokens - prefix) // suffix)
            for i in range(0, len(members), rows):
                chunk = members[i:i + rows]
                size = prefix + len(chunk) * suffix
                if not shared or cost + size > self.micro_batch_tokens:
                    shared.append([])
                    cost = 0
                shared[-1].append((prefix, chunk))
                cost += size
        packed: list[list[dict]] = []
        for example in sorted(alone, key=lambda e: -e["length"]):
            if packed and (len(packed[-1]) + 1) * packed[-1][0]["length"] \
                    <= self.micro_batch_tokens:
                packed[-1].append(example)
            else:
                packed.append([example])
        return shared + [[(0, group)] for group in packed]

    def _logprobs(self, model: _Trainable, clusters: list[tuple[int, list[dict]]],
                  want_entropy: bool):
        """(logprobs_N, entropy_N) over the real tokens of the micro-batch, rows concatenated.

        Clusters with a shared prefix: one pass over the prefixes (right-padded), then one over
        every member's suffix attending to its cluster's prefix cache (padding masked, positions
        continuing the prefix); the prefix positions whose targets also agree go through the
        unembedding once per cluster. Gradients flow back through the shared parts.
        """
        if clusters[0][0] == 0:
            return self._unshared_logprobs(model, clusters[0][1], want_entropy)
        prefix_C = torch.tensor([prefix for prefix, _ in clusters])
        members = [(c, e) for c, (_, chunk) in enumerate(clusters) for e in chunk]
        cluster_B = torch.tensor([c for c, _ in members])
        suffix_B = torch.tensor([e["length"] for _, e in members]) - prefix_C[cluster_B]
        width_p, width_s = int(prefix_C.max()), int(suffix_B.max())
        prefix_ids_CP = torch.full((len(clusters), width_p), self.pad_token_id, dtype=torch.long)
        for c, (prefix, chunk) in enumerate(clusters):
            prefix_ids_CP[c, :prefix] = torch.tensor(chunk[0]["tokens"][:prefix])
        suffix_ids_BS = torch.full((len(members), width_s), self.pad_token_id, dtype=torch.long)
        for row, (c, e) in enumerate(members):
            suffix_ids_BS[row, :suffix_B[row]] = torch.tensor(e["tokens"][int(prefix_C[c]):])
        # A suffix sees its own cluster's prefix only; right padding after real tokens needs no
        # mask (causal), so ones for every suffix position.
        mask_BK = torch.cat([torch.arange(width_p)[None] < prefix_C[cluster_B, None],
                             torch.ones(len(members), width_s, dtype=torch.bool)], dim=1)
        position_BS = prefix_C[cluster_B, None] + torch.arange(width_s)[None]
        decoder = model.module.get_decoder()
        cache = DynamicCache()
        with self._autocast():
            shared_CPH = decoder(input_ids=prefix_ids_CP.to(self.device), cache=cache,
                                 use_cache=True).last_hidden_state
            cache.batch_select_indices(cluster_B.to(self.device))
            hidden_BSH = decoder(input_ids=suffix_ids_BS.to(self.device),
                                 attention_mask=mask_BK.long().to(self.device),
                                 position_ids=position_BS.to(self.device), cache=cache,
                                 use_cache=True).last_hidden_state
        hidden_parts, target_parts, index_parts = [], [], []
        start, row = 0, 0
        for c, (prefix, chunk) in enumerate(clusters):
            targets = [e["inputs"]["target_tokens"].to(self.device) for e in chunk]
            # Positions [0, same) have one hidden state and one target for every member.
            same = min(prefix - 1,
                       len(os.path.commonprefix([t.tolist()[:prefix] for t in targets])))
            hidden_parts.append(shared_CPH[c, :same])
            target_parts.append(targets[0][:same])
            common = torch.arange(start, start + same)
            start += same
            for e, target in zip(chunk, targets, strict=True):
                hidden_parts += [shared_CPH[c, same:prefix], hidden_BSH[row, :e["length"] - prefix]]
                target_parts.append(target[same:])
                own = e["length"] - same
                index_parts += [common, torch.arange(start, start + own)]
                start += own
                row += 1
        logprobs_M, entropy_M = self._head_logprobs(
            model, torch.cat(hidden_parts).to(self.dtype), torch.cat(target_parts), want_entropy)
        index_N = torch.cat(index_parts).to(self.device)
        return logprobs_M[index_N], entropy_M[index_N] if want_entropy else entropy_M

    def _unshared_logprobs(self, model: _Trainable, group: list[dict], want_entropy: bool):
        width = max(e["length"] for e in group)
        if width == 0:
            empty = torch.zeros(0, device=self.device)
            return empty, empty
        ids_BT = torch.full((len(group), width), self.pad_token_id, dtype=torch.long)
        mask_BT = torch.zeros((len(group), width), dtype=torch.bool)
        for row, e in enumerate(group):
            ids_BT[row, :e["length"]] = torch.tensor(e["tokens"], dtype=torch.long)
            mask_BT[row, :e["length"]] = True
        with self._autocast():
            hidden_BTH = model.module.get_decoder()(input_ids=ids_BT.to(self.device),
                                                    use_cache=False).last_hidden_state
        if bool(mask_BT.all()):  # equal lengths: a view, no gather
            hidden_NH = hidden_BTH.flatten(0, 1).to(self.dtype)
        else:
            hidden_NH = hidden_BTH[mask_BT.to(self.device)].to(self.dtype)
        targets_N = torch.cat([e["inputs"]["target_tokens"] for e in group]).to(self.device)
        return self._head_logprobs(model, hidden_NH, targets_N, want_entropy)

    def _head_logprobs(self, model: _Trainable, hidden_NH: torch.Tensor, targets_N: torch.Tensor,
                       want_entropy: bool):
        head = model.module.get_output_embeddings()
        weight_VH = getattr(head, "base_layer", head).weight.to(self.dtype)
        adapter = model.adapter
        if adapter is None or not hasattr(head, "lora_A") or adapter not in head.lora_A:
            return target_logprobs(hidden_NH, weight_VH, targets_N, want_entropy=want_entropy)
        # A LoRA on the unembedding adds (s * h A^T) B^T to the logits: the kernel takes the
        # low-rank term separately, so the frozen weight gets no gradient computed.
        a_RH = head.lora_A[adapter].weight.to(self.dtype)
        low_NR = head.scaling[adapter] * (hidden_NH @ a_RH.T)
        b_VR = head.lora_B[adapter].weight.to(self.dtype)
        return target_logprobs(hidden_NH, weight_VH, targets_N, low_NR, b_VR, want_entropy)

    def optim_step(self, model_id: str, params: types.AdamParams) -> dict[str, float]:
        """AdamW step with Tinker's per-step hyperparameters; zeroes the gradients."""
        return self._model(model_id).optimizer.step(params)

    # ------------------------------------------------------------------ checkpoints
    def save_state(self, model_id: str, directory: str, optimizer: bool = True) -> None:
        model = self._model(model_id)
        meta = {"base_model": self.model_name,
                "lora": asdict(model.spec) if model.spec else None,
                "step": model.optimizer.steps}
        checkpoint.write_state(directory, meta, dict(model.params),
                               model.optimizer.state_tensors() if optimizer else None)

    def load_state(self, model_id: str, directory: str, optimizer: bool = True) -> None:
        """Weights (and optimizer moments); ``model_id`` is created from the meta when new."""
        meta = checkpoint.read_state_meta(directory)
        spec = LoraSpec(**meta["lora"]) if meta["lora"] else None
        if model_id not in self._models:
            self.create_model(model_id, spec)
        model = self._models[model_id]
        if (spec is None) != (model.spec is None) or (spec and not spec.same_shape(model.spec)):
            raise ValueError(f"checkpoint {directory} holds {spec or 'a full fine-tune'}, "
                             f"model {model_id!r} is {model.spec or 'a full fine-tune'}")
        checkpoint.copy_into(model.params, checkpoint.read_tensors(
            directory, checkpoint.WEIGHTS), f"checkpoint {directory}")
        for p in model.params.values():
            p.grad = None
        if not optimizer:
            model.optimizer.reset()
        elif not meta["optimizer"]:
            raise ValueError(f"checkpoint {directory} was saved without optimizer state")
        else:
            model.optimizer.load_state_tensors(
                checkpoint.read_tensors(directory, checkpoint.OPTIMIZER), int(meta["step"]))

    # ------------------------------------------------------------------ samplers
    def snapshot_sampler(self, model_id: str, name: str) -> None:
        """Freeze the current weights of ``model_id`` as sampler ``name`` (replacing one)."""
        model = self._model(model_id)
        if name in self._models:
            raise ValueError(f"sampler name {name!r} is a model_id")
        self._merged_adapter = None
        old = self._samplers.get(name)
        if model.adapter is not None and old is not None and old.adapter is not None \
                and model.spec.same_shape(old.spec):
            sampler = _Sampler(model.spec, old.adapter, self.base)
        else:
            if old is not None:
                self.drop_sampler(name)
            if model.adapter is None:
                frozen = copy.deepcopy(model.module).to(self.dtype).requires_grad_(False)
                self._samplers[name] = _Sampler(None, None, frozen)
                return
            sampler = _Sampler(model.spec, self._add_adapter(model.spec, "s"), self.base)
        with torch.no_grad():
            source = model.params
            for key, p in self._lora_params(sampler.adapter).items():
                p.copy_(source[key])
        self._samplers[name] = sampler

    def has_sampler(self, name: str) -> bool:
        return name in self._samplers

    def drop_sampler(self, name: str) -> None:
        sampler = self._samplers.pop(name, None)
        if sampler is None:
            raise ValueError(f"unknown sampler {name!r}")
        self._merged_adapter = None
        if sampler.adapter is not None:
            self._drop_adapter(sampler.adapter)

    def save_sampler(self, name: str, directory: str) -> None:
        """A peft adapter dir (LoRA) or a merged HF dir (full), plus ``trinity_sampler.json``."""
        sampler = self._sampler(name)
        if sampler.adapter is not None:
            self.export_peft(name, directory)
        else:
            self.export_merged(name, directory)
        meta = {"base_model": self.model_name,
                "lora": asdict(sampler.spec) if sampler.spec else None}
        (Path(directory) / SAMPLER_META).write_text(json.dumps(meta, indent=1))

    def load_sampler(self, name: str, directory: str) -> None:
        """Load a ``save_sampler`` dir, or any peft LoRA adapter dir for this base."""
        from peft import LoraConfig

        if name in self._models:
            raise ValueError(f"sampler name {name!r} is a model_id")
        if name in self._samplers:
            self.drop_sampler(name)
        self._merged_adapter = None
        directory = Path(directory)
        if not (directory / "adapter_config.json").is_file():
            module = AutoModelForCausalLM.from_pretrained(directory, dtype=self.dtype)
            self._samplers[name] = _Sampler(None, None, module.to(self.device).eval()
                                            .requires_grad_(False))
            return
        config = LoraConfig.from_pretrained(str(directory))
        meta_path = directory / SAMPLER_META
        saved = json.loads(meta_path.read_text())["lora"] if meta_path.is_file() else None
        spec = LoraSpec(**saved) if saved else LoraSpec(rank=config.r, alpha=config.lora_alpha)
        config.inference_mode = False
        adapter = self._add_adapter(spec, "s", config)
        try:
            checkpoint.copy_into(self._lora_params(adapter), checkpoint.read_peft(directory),
                                 f"adapter {directory}")
        except Exception:
            self._drop_adapter(adapter)
            raise
        self._samplers[name] = _Sampler(spec, adapter, self.base)

    def _sampler(self, name: str) -> _Sampler | _Trainable:
        if name in self._samplers:
            return self._samplers[name]
        if name in self._models:
            return self._models[name]
        raise ValueError(f"unknown model or sampler {name!r}")

    # ------------------------------------------------------------------ sampling
    def sample(self, requests: list[SampleRequest]) -> list[types.SampleResponse]:
        """One batch per model object: base and every LoRA adapter decode together.

        A batch on one frozen sampler adapter alone (an RL rollout) decodes on a merged copy
        instead: plain Linear layers, no per-layer LoRA matmuls or peft's per-adapter routing.
        """
        groups: dict[int, tuple[nn.Module, list[tuple[int, SampleRequest]]]] = {}
        for index, request in enumerate(requests):
            module, adapter = self._sampling_target(request.adapter)
            routed = replace(request, adapter=adapter)
            groups.setdefault(id(module), (module, []))[1].append((index, routed))
        responses: list[types.SampleResponse | None] = [None] * len(requests)
        for module, items in groups.values():
            adapters = {r.adapter for _, r in items}
            if module is self._peft and len(adapters) == 1 and self._mergeable(*adapters):
                module = self._merged_model(*adapters)
                items = [(i, replace(r, adapter=None)) for i, r in items]
            with self._autocast():
                out = sample_batch(module, [r for _, r in items], eos_token_ids=self.eos_token_ids,
                                   pad_token_id=self.pad_token_id, device=self.device,
                                   tokenizer=self.tokenizer,
                                   max_context_length=self.max_context_length)
            for (index, _), response in zip(items, out, strict=True):
                responses[index] = response
        return responses

    def _mergeable(self, adapter: str | None) -> bool:
        """Frozen sampler adapters, in fp32: merging into bf16 weights would round small LoRA
        deltas away, so the sampler would lag the trainer."""
        return (adapter is not None and self.dtype == torch.float32
                and any(s.adapter == adapter for s in self._samplers.values()))

    def _merged_model(self, adapter: str) -> nn.Module:
        if self._merged is None:
            self._merged = self._load_causal_lm(self.dtype)
        if self._merged_adapter != adapter:
            self._merge_into(self._merged, adapter)
            self._merged_adapter = adapter
        return self._merged

    def _sampling_target(self, name: str | None) -> tuple[nn.Module, str | None]:
        shared = self._peft if self._peft is not None and self._peft.peft_config else self.base
        if name is None:
            return shared, None
        entry = self._sampler(name)
        return (shared, entry.adapter) if entry.adapter is not None else (entry.module, None)

    # ------------------------------------------------------------------ exports
    def export_peft(self, name: str, directory: str) -> None:
        """A peft adapter directory for a LoRA model or sampler."""
        entry = self._sampler(name)
        if entry.adapter is None:
            raise ValueError(f"{name!r} is a full fine-tune: it has no adapter (export_merged)")
        config = copy.deepcopy(self._peft.peft_config[entry.adapter])
        config.inference_mode = True
        checkpoint.write_peft(directory, config, self._lora_params(entry.adapter))

    def export_merged(self, name: str, directory: str) -> None:
        """A Hugging Face model directory (``dtype`` weights) with the adapter merged in."""
        entry = self._sampler(name)
        if entry.adapter is None:
            merged = copy.deepcopy(entry.module).to(self.dtype)
        else:
            merged = self._load_causal_lm(self.dtype)
            self._merge_into(merged, entry.adapter)
        merged.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)

    @torch.no_grad()
    def _merge_into(self, model: nn.Module, adapter: str) -> None:
        """Every LoRA target of ``model`` := base + scaling * B @ A for ``adapter`` (the plain base
        weight where the adapter has no LoRA); an adapted tied head gets untied."""
        head_name = self._module_groups["unembed"][0]
        for name, module in self.base.named_modules():
            if not hasattr(module, "lora_A"):
                continue
            target = model.get_submodule(name)
            weight = module.base_layer.weight
            if adapter in module.lora_A:
                delta = module.scaling[adapter] * (module.lora_B[adapter].weight.float()
                                                   @ module.lora_A[adapter].weight.float())
                weight = (weight.float() + delta).to(target.weight.dtype)
                if name == head_name and model.config.tie_word_embeddings:
                    target.weight = nn.Parameter(weight, requires_grad=False)
                    model.config.tie_word_embeddings = False
                    continue
            target.weight.copy_(weight)
