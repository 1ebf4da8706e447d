"""The attention of the engine's Hugging Face forward passes: ``ATTENTION`` ("trinity_sdpa").

Why: PyTorch's CPU flash-attention kernel (what "sdpa" runs) computes its backward at a few
GFLOP/s in bf16: in ``forward_backward`` it took a seventh of the step at 128 tokens per row,
a fifth at 512 (docs/benchmarks.md, "Engine training"), and with a mask and few queries per row
(a GRPO pass's suffixes after their shared prompt: 16 rows of 45 queries over 83 keys) its
forward alone ran at ~6 GFLOP/s, an eighth of the whole step. A training pass (gradients on)
here runs per block of ``QUERY_BLOCK`` query positions: one batched matmul of the block's
queries with the keys (without a mask, the engine's right-padded rows, only up to the block's
last position: the masked upper triangle beyond it is never computed; with a boolean mask, the
suffix pass over a prefix cache, all keys, masked), softmax, one matmul with the values;
autograd differentiates these large matmuls at matmul speed. The query heads of a KV group are
stacked as rows of one matmul, so keys and values are never repeated. It keeps the block's
probabilities (2 bytes each in bf16) for the backward, so keys longer than ``MAX_LENGTH``
(where its lead over the flash kernel also shrinks) and every other call (sampling, float
masks) go to "sdpa" unchanged.

Shape letters here: A query heads, K key-value heads, G = A / K query heads per KV head, D head
dimension, Q a block's query positions, R its rows (G x Q).
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

ATTENTION = "trinity_sdpa"
QUERY_BLOCK = 128  # of 64 / 128 / 256 / 512: fastest at 512 and 2048 tokens per row, bf16
MAX_LENGTH = 1024


def causal_attention(
    q_BATD: Tensor, k_BKTD: Tensor, v_BKTD: Tensor, scale: float, mask_B1QT: Tensor | None = None
) -> Tensor:
    """``softmax(q k^T * scale + mask) v`` as [B, Q, A, D]: causal over the queries (Q = T) when
    ``mask_B1QT`` is None, else where the boolean mask is set (a query with no key set gets the
    mean of the values, not NaN: such rows are padding)."""
    length = q_BATD.shape[2]
    group = q_BATD.shape[1] // k_BKTD.shape[1]
    q_BKGTD = (q_BATD * scale).unflatten(1, (k_BKTD.shape[1], group))
    blocks = []
    for start in range(0, length, QUERY_BLOCK):
        end = min(length, start + QUERY_BLOCK)
        keys = end if mask_B1QT is None else k_BKTD.shape[2]
        q_BKRD = q_BKGTD[:, :, :, start:end].flatten(2, 3)  # rows: (group head, position)
        scores_BKGQT = (q_BKRD @ k_BKTD[:, :, :keys].transpose(-1, -2)).unflatten(
            2, (group, end - start)
        )
        if mask_B1QT is None:
            future_QT = torch.ones(end - start, end, dtype=torch.bool, device=q_BATD.device)
            scores_BKGQT = scores_BKGQT.masked_fill(future_QT.triu_(start + 1), float("-inf"))
        else:
            hidden_B11QT = ~mask_B1QT[:, None, :, start:end]
            scores_BKGQT = scores_BKGQT.masked_fill(hidden_B11QT, torch.finfo(q_BATD.dtype).min)
        probs_BKRT = torch.softmax(scores_BKGQT, dim=-1).flatten(2, 3)
        blocks.append((probs_BKRT @ v_BKTD[:, :, :keys]).unflatten(2, (group, end - start)))
    out_BKGTD = torch.cat(blocks, dim=3)
    return out_BKGTD.flatten(1, 2).transpose(1, 2).contiguous()


def _attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers' attention interface: ``causal_attention`` for training passes."""
    length = query.shape[2]
    masked = attention_mask is not None and attention_mask.dtype == torch.bool
    if (
        torch.is_grad_enabled()
        and getattr(module, "is_causal", True)
        and (key.shape[2] == length if attention_mask is None else masked)
        and key.shape[2] <= MAX_LENGTH
        and dropout == 0.0
        and not kwargs.get("softcap")
        and kwargs.get("position_bias") is None
        and kwargs.get("s_aux") is None
    ):
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        device = query.device.type
        if torch.is_autocast_enabled(device):  # once here, not per block (a full fine-tune's
            dtype = torch.get_autocast_dtype(device)  # rotary leaves q and k in fp32)
            query, key, value = (x.to(dtype) for x in (query, key, value))
        return causal_attention(query, key, value, scale, attention_mask if masked else None), None
    return sdpa_attention_forward(
        module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
    )


AttentionInterface.register(ATTENTION, _attention)
AttentionMaskInterface.register(ATTENTION, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
