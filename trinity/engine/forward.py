"""The model side of ``forward_backward``: per-token logprobs of one packed forward pass.

A pass (trinity/engine/packing.py) is either rows run alone, right-padded (no attention mask:
right padding never precedes a real token), or clusters with a shared prefix packed into one row
without padding (every prefix, then every member's suffix) under a mask that lets a suffix see
its cluster's prefix: one decoder call (its norms and MLPs by trinity/engine/fused_layers.py's
native functions). Hidden states of the real tokens go through
``logprobs.target_logprobs`` (chunked, no full fp32 logits); gradients flow back through the
shared parts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from trinity.engine import fused_layers
from trinity.engine.logprobs import target_logprobs
from trinity.engine.packing import Cluster, Example, packed_pass, padded_rows


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 where the hardware computes it fast (AMX / AVX512-BF16, CUDA), else fp32;
    ``TRINITY_DTYPE=float32`` (or ``bfloat16``) overrides it, e.g. for fp32-exact logprobs on a
    bf16 machine.

    Without native bf16 (e.g. AVX2-only CPUs) bf16 matmuls fall back to slow reference loops,
    hundreds of times slower than fp32.
    """
    forced = os.environ.get("TRINITY_DTYPE")
    if forced:
        if forced not in ("float32", "bfloat16"):
            raise ValueError(f"TRINITY_DTYPE: expected float32 or bfloat16, got {forced!r}")
        return getattr(torch, forced)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device.type == "cpu":
        native = (
            getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
            or getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
        )
        return torch.bfloat16 if native else torch.float32
    return torch.float32


def packed_attention(config) -> tuple[bool, int | None]:
    """(whether one packed pass's mask serves every layer of the model, the sliding window it
    then applies): yes for full attention everywhere or one window everywhere (Mistral), no
    where layers differ (Gemma's alternating windows) or attend otherwise."""
    kinds = set(getattr(config, "layer_types", None) or ())
    window = getattr(config, "sliding_window", None)
    if not getattr(config, "use_sliding_window", True):
        window = None
    if kinds == {"full_attention"} or (not kinds and window is None):
        return True, None
    if kinds == {"sliding_attention"} or (not kinds and window is not None):
        return True, window
    return False, None


@dataclass(frozen=True)
class Forward:
    """Where and in which precision the engine computes: matmuls under ``autocast`` in ``dtype``
    (off for fp32), hidden states cast to ``dtype`` for the unembedding; ``window``: the sliding
    window of every layer (``packed_attention``) that a packed pass's mask applies."""

    device: torch.device
    dtype: torch.dtype
    pad_token_id: int
    window: int | None = None

    def autocast(self):
        return torch.autocast(
            self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32
        )

    def logprobs(
        self,
        module: nn.Module,
        adapter: str | None,
        clusters: list[Cluster],
        want_entropy: bool,
        entropy_grad: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(logprobs_N, entropy_N) over the real tokens of the pass, rows concatenated in
        cluster and member order; ``entropy_N`` is empty unless wanted, and differentiable
        unless ``entropy_grad`` is False (``logprobs.target_logprobs``).

        In a shared-prefix pass the prefix positions whose targets also agree go through the
        unembedding once per cluster.
        """
        if clusters[0].prefix == 0:
            return self._unshared(module, adapter, clusters[0].members, want_entropy, entropy_grad)
        inputs = packed_pass(clusters, self.window)
        decoder = module.get_decoder()
        with self.autocast(), fused_layers.fused(decoder):
            hidden_NH = decoder(
                input_ids=inputs.ids_1N.to(self.device),
                attention_mask=inputs.mask_11NN.to(self.device),
                position_ids=inputs.position_1N.to(self.device),
                use_cache=False,
            ).last_hidden_state[0]
        hidden_parts, target_parts, index_parts = [], [], []
        start, row = 0, 0
        for c, (prefix, chunk) in enumerate(clusters):
            targets = [e.inputs["target_tokens"].to(self.device) for e in chunk]
            # Positions [0, same) have one hidden state and one target for every member.
            same = min(
                prefix - 1, len(os.path.commonprefix([t.tolist()[:prefix] for t in targets]))
            )
            p0 = inputs.prefix_start_C[c]
            hidden_parts.append(hidden_NH[p0 : p0 + same])
            target_parts.append(targets[0][:same])
            common = torch.arange(start, start + same)
            start += same
            for e, target in zip(chunk, targets, strict=True):
                s0 = inputs.suffix_start_B[row]
                hidden_parts += [
                    hidden_NH[p0 + same : p0 + prefix],
                    hidden_NH[s0 : s0 + e.length - prefix],
                ]
                target_parts.append(target[same:])
                own = e.length - same
                index_parts += [common, torch.arange(start, start + own)]
                start += own
                row += 1
        logprobs_M, entropy_M = self._head_logprobs(
            module,
            adapter,
            torch.cat(hidden_parts).to(self.dtype),
            torch.cat(target_parts),
            want_entropy,
            entropy_grad,
        )
        index_N = torch.cat(index_parts).to(self.device)
        return logprobs_M[index_N], entropy_M[index_N] if want_entropy else entropy_M

    def _unshared(
        self,
        module: nn.Module,
        adapter: str | None,
        group: list[Example],
        want_entropy: bool,
        entropy_grad: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if max(e.length for e in group) == 0:
            empty = torch.zeros(0, device=self.device)
            return empty, empty
        ids_BT, mask_BT = padded_rows(group, self.pad_token_id)
        decoder = module.get_decoder()
        with self.autocast(), fused_layers.fused(decoder):
            hidden_BTH = decoder(
                input_ids=ids_BT.to(self.device), use_cache=False
            ).last_hidden_state
        if bool(mask_BT.all()):  # equal lengths: a view, no gather
            hidden_NH = hidden_BTH.flatten(0, 1).to(self.dtype)
        else:
            hidden_NH = hidden_BTH[mask_BT.to(self.device)].to(self.dtype)
        targets_N = torch.cat([e.inputs["target_tokens"] for e in group]).to(self.device)
        return self._head_logprobs(
            module, adapter, hidden_NH, targets_N, want_entropy, entropy_grad
        )

    def _head_logprobs(
        self,
        module: nn.Module,
        adapter: str | None,
        hidden_NH: torch.Tensor,
        targets_N: torch.Tensor,
        want_entropy: bool,
        entropy_grad: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Target logprobs through the unembedding of ``module``, with ``adapter``'s LoRA on it."""
        head = module.get_output_embeddings()
        weight_VH = getattr(head, "base_layer", head).weight.to(self.dtype)
        if adapter is None or not hasattr(head, "lora_A") or adapter not in head.lora_A:
            return target_logprobs(
                hidden_NH, weight_VH, targets_N, None, None, want_entropy, entropy_grad
            )
        # A LoRA on the unembedding adds (s * h A^T) B^T to the logits: the kernel takes the
        # low-rank term separately, so the frozen weight gets no gradient computed.
        a_RH = head.lora_A[adapter].weight.to(self.dtype)
        low_NR = head.scaling[adapter] * (hidden_NH @ a_RH.T)
        b_VR = head.lora_B[adapter].weight.to(self.dtype)
        return target_logprobs(
            hidden_NH, weight_VH, targets_N, low_NR, b_VR, want_entropy, entropy_grad
        )
