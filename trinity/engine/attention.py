"""The attention of the engine's Hugging Face forward passes: ``ATTENTION`` ("trinity_sdpa").

Why: PyTorch's CPU flash-attention kernel (what "sdpa" runs) computes its backward at a few
GFLOP/s in bf16: in ``forward_backward`` it took a seventh of the step at 128 tokens per row,
a fifth at 512 (docs/benchmarks.md, "Engine training"), and with a mask and few queries per row
(a GRPO pass's suffixes after their shared prompt: 16 rows of 45 queries over 83 keys) its
forward alone ran at ~6 GFLOP/s, an eighth of the whole step. A training pass (gradients on)
here runs per block of ``QUERY_BLOCK`` query positions: one batched matmul of the block's
queries with the keys (without a mask, the engine's right-padded rows, only up to the block's
last position: the masked upper triangle beyond it is never computed; with a boolean mask, a
packed pass of prompts and their responses, the keys any of the block's queries sees,
masked), softmax, one matmul with the values;
autograd differentiates these large matmuls at matmul speed. The query heads of a KV group are
stacked as rows of one matmul, so keys and values are never repeated. It keeps the block's
probabilities (2 bytes each in bf16) for the backward, so more keys per block than ``MAX_LENGTH``
(where its lead over the flash kernel also shrinks) and every other call (sampling, float
masks) go to "sdpa" unchanged.

Shape letters here: A query heads, K key-value heads, G = A / K query heads per KV head, D head
dimension, Q a block's query positions, R its rows (G x Q).
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

ATTENTION = "trinity_sdpa"
QUERY_BLOCK = 128  # of 64 / 128 / 256 / 512: fastest at 512 and 2048 tokens per row, bf16
MAX_LENGTH = 1024


def block_columns(mask_B1QT: Tensor) -> list[Tensor | None]:
    """Per block of ``QUERY_BLOCK`` queries, the key columns any of its queries sees (None: all).

    Why: in a packed pass (trinity/engine/packing.py) a block's queries see their prefixes and
    the suffix tokens just before them, a few hundred of the row's keys; scores, softmax and
    kept probabilities over every key would cost the whole row's length per query."""
    columns = []
    for start in range(0, mask_B1QT.shape[2], QUERY_BLOCK):
        seen_T = mask_B1QT[:, :, start : start + QUERY_BLOCK].flatten(0, 2).any(0)
        columns.append(None if bool(seen_T.all()) else seen_T.nonzero()[:, 0])
    return columns


_LAST: tuple = (None, None, None)  # (weakref to a mask's storage tensor, its view, its columns)


def _columns_of(mask_B1QT: Tensor) -> list[Tensor | None]:
    """``block_columns`` of the mask, computed once per pass: every layer gets the same mask,
    or a view of it (Mistral's), and computing them per layer cost 30 x ~0.4 ms for the demo
    model's 732-token GRPO pass. The same view means the same tensor still alive (a freed mask's
    address may be reused) at the same offset, shape and strides, unchanged since."""
    global _LAST
    base = mask_B1QT if mask_B1QT._base is None else mask_B1QT._base
    view = (mask_B1QT.data_ptr(), mask_B1QT.shape, mask_B1QT.stride(), mask_B1QT._version)
    ref, seen, columns = _LAST
    if ref is None or ref() is not base or seen != view:
        columns = block_columns(mask_B1QT)
        _LAST = (weakref.ref(base), view, columns)
    return columns


def causal_attention(
    q_BATD: Tensor,
    k_BKTD: Tensor,
    v_BKTD: Tensor,
    scale: float,
    mask_B1QT: Tensor | None = None,
    columns: list[Tensor | None] | None = None,
) -> Tensor:
    """``softmax(q k^T * scale + mask) v`` as [B, Q, A, D]: causal over the queries (Q = T) when
    ``mask_B1QT`` is None, else where the boolean mask is set (a query with no key set gets the
    mean of the values, not NaN: such rows are padding), each query block over its
    ``block_columns`` only."""
    length = q_BATD.shape[2]
    group = q_BATD.shape[1] // k_BKTD.shape[1]
    q_BKGTD = (q_BATD * scale).unflatten(1, (k_BKTD.shape[1], group))
    if mask_B1QT is not None and columns is None:
        columns = block_columns(mask_B1QT)
    blocks = []
    for i, start in enumerate(range(0, length, QUERY_BLOCK)):
        end = min(length, start + QUERY_BLOCK)
        q_BKRD = q_BKGTD[:, :, :, start:end].flatten(2, 3)  # rows: (group head, position)
        if mask_B1QT is None:
            k_BKCD, v_BKCD = k_BKTD[:, :, :end], v_BKTD[:, :, :end]
        else:
            seen_B1QC = mask_B1QT[:, :, start:end]
            k_BKCD, v_BKCD = k_BKTD, v_BKTD
            if columns[i] is not None:  # index_select: its backward (index_add) is ~1.5x
                k_BKCD = k_BKTD.index_select(2, columns[i])  # faster than indexing's
                v_BKCD = v_BKTD.index_select(2, columns[i])
                seen_B1QC = seen_B1QC.index_select(3, columns[i])
        scores_BKGQC = (q_BKRD @ k_BKCD.transpose(-1, -2)).unflatten(2, (group, end - start))
        if mask_B1QT is None:
            future_QC = torch.ones(end - start, end, dtype=torch.bool, device=q_BATD.device)
            scores_BKGQC = scores_BKGQC.masked_fill(future_QC.triu_(start + 1), float("-inf"))
        else:
            hidden_B11QC = ~seen_B1QC[:, None]
            scores_BKGQC = scores_BKGQC.masked_fill(hidden_B11QC, torch.finfo(q_BATD.dtype).min)
        probs_BKRC = torch.softmax(scores_BKGQC, dim=-1).flatten(2, 3)
        blocks.append((probs_BKRC @ v_BKCD).unflatten(2, (group, end - start)))
    out_BKGTD = torch.cat(blocks, dim=3)
    return out_BKGTD.flatten(1, 2).transpose(1, 2).contiguous()


def _attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers' attention interface: ``causal_attention`` for training passes."""
    length = query.shape[2]
    masked = attention_mask is not None and attention_mask.dtype == torch.bool
    columns = _columns_of(attention_mask) if masked and torch.is_grad_enabled() else None
    widest = max(key.shape[2] if c is None else c.numel() for c in columns or [None])
    if (
        torch.is_grad_enabled()
        and getattr(module, "is_causal", True)
        and (key.shape[2] == length if attention_mask is None else masked)
        and widest <= MAX_LENGTH
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
        mask = attention_mask if masked else None
        return causal_attention(query, key, value, scale, mask, columns), None
    return sdpa_attention_forward(
        module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
    )


AttentionInterface.register(ATTENTION, _attention)
AttentionMaskInterface.register(ATTENTION, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
