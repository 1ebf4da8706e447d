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

import functools
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


_LAST: tuple = (None, None, None, None)  # (weakref to a mask's base, its view, columns, plans)


def _columns_of(mask_B1QT: Tensor) -> list[Tensor | None]:
    """``block_columns`` of the mask, computed once per pass: every layer gets the same mask,
    or a view of it (Mistral's), and computing them per layer cost 30 x ~0.4 ms for the demo
    model's 732-token GRPO pass. The same view means the same tensor still alive (a freed mask's
    address may be reused) at the same offset, shape and strides, unchanged since."""
    global _LAST
    base = mask_B1QT if mask_B1QT._base is None else mask_B1QT._base
    view = (mask_B1QT.data_ptr(), mask_B1QT.shape, mask_B1QT.stride(), mask_B1QT._version)
    ref, seen, columns, _ = _LAST
    if ref is None or ref() is not base or seen != view:
        columns = block_columns(mask_B1QT)
        _LAST = (weakref.ref(base), view, columns, {})
    return columns


def _block_biases(mask_B1QT: Tensor, group: int, dtype: torch.dtype) -> list[Tensor]:
    """Per query block, the additive mask of its scores, [B, Q G, C] in ``dtype`` over the
    block's ``block_columns`` (0 where seen, the dtype's lowest value elsewhere; rows ordered
    (position, group head)): the same for every layer, so made once per pass (``_LAST``)."""
    columns = _columns_of(mask_B1QT)
    plans = _LAST[3]
    if (group, dtype) not in plans:
        lowest = torch.finfo(dtype).min
        biases = []
        for i, start in enumerate(range(0, mask_B1QT.shape[2], QUERY_BLOCK)):
            seen_BQT = mask_B1QT[:, 0, start : start + QUERY_BLOCK]
            if columns[i] is not None:
                seen_BQT = seen_BQT.index_select(2, columns[i])
            bias_BQC = torch.zeros(seen_BQT.shape, dtype=dtype, device=seen_BQT.device)
            biases.append(bias_BQC.masked_fill_(~seen_BQT, lowest).repeat_interleave(group, 1))
        plans[(group, dtype)] = biases
    return plans[(group, dtype)]


def _gather_plan(mask_B1QT: Tensor) -> tuple[Tensor, list[int]]:
    """(every block's ``block_columns`` one after another, each block's count), once per pass
    (``_LAST``), for index_select (its backward, index_add, ran ~1.5x faster than indexing's)."""
    columns = _columns_of(mask_B1QT)
    plans = _LAST[3]
    if "gather" not in plans:
        whole = torch.arange(mask_B1QT.shape[3], device=mask_B1QT.device)
        parts = [whole if c is None else c for c in columns]
        plans["gather"] = torch.cat(parts), [len(c) for c in parts]
    return plans["gather"]


@functools.lru_cache(maxsize=16)
def _causal_bias(start: int, end: int, group: int, dtype: torch.dtype, device: torch.device):
    """The additive causal mask of a block of queries [start, end) over keys [0, end):
    [1, Q G, end], -inf past each query's position, rows ordered (position, group head)."""
    future_QC = torch.ones(end - start, end, dtype=torch.bool, device=device).triu_(start + 1)
    bias_QC = torch.zeros(future_QC.shape, dtype=dtype, device=device)
    return bias_QC.masked_fill_(future_QC, float("-inf")).repeat_interleave(group, 0)[None]


def causal_attention(
    q_BATD: Tensor,
    k_BKTD: Tensor,
    v_BKTD: Tensor,
    scale: float,
    mask_B1QT: Tensor | None = None,
) -> Tensor:
    """``softmax(q k^T * scale + mask) v`` as [B, Q, A, D]: causal over the queries (Q = T) when
    ``mask_B1QT`` is None, else where the boolean mask is set (a query with no key set gets the
    mean of the values, not NaN: such rows are padding), each query block over its
    ``block_columns`` only.

    The queries are laid out once as [B, K, T, G, D], so a block's rows (position, group head)
    are a view and its gradient comes back through one concatenation (``split``); the scale and
    the mask go into the scores' matmul (``baddbmm`` with an additive mask made once per pass).
    """
    batch, length = q_BATD.shape[0], q_BATD.shape[2]
    kv, dim = k_BKTD.shape[1], k_BKTD.shape[3]
    group = q_BATD.shape[1] // kv
    q_BKTGD = q_BATD.unflatten(1, (kv, group)).transpose(2, 3).contiguous()
    if mask_B1QT is not None:
        biases = _block_biases(mask_B1QT, group, q_BATD.dtype)
        # Every block's key columns gathered by one index_select each for K and V, then split:
        # the backward is one index_add into one zeroed gradient, not one per block.
        columns_C, sizes = _gather_plan(mask_B1QT)
        k_blocks = k_BKTD.index_select(2, columns_C).split(sizes, dim=2)
        v_blocks = v_BKTD.index_select(2, columns_C).split(sizes, dim=2)
    blocks = []
    for i, q_BKQGD in enumerate(q_BKTGD.split(QUERY_BLOCK, dim=2)):
        start = i * QUERY_BLOCK
        end = start + q_BKQGD.shape[2]
        q_NRD = q_BKQGD.flatten(0, 1).flatten(1, 2)  # N: (batch, KV head); R: (position, head)
        if mask_B1QT is None:
            k_BKCD, v_BKCD = k_BKTD[:, :, :end], v_BKTD[:, :, :end]
            bias_NRC = _causal_bias(start, end, group, q_BATD.dtype, q_BATD.device)
        else:
            k_BKCD, v_BKCD = k_blocks[i], v_blocks[i]
            bias_NRC = biases[i]
            if batch > 1:  # one mask per row of the batch, for each of its KV heads
                bias_NRC = bias_NRC.repeat_interleave(kv, 0)
        k_NCD, v_NCD = k_BKCD.flatten(0, 1), v_BKCD.flatten(0, 1)
        scores_NRC = torch.baddbmm(bias_NRC, q_NRD, k_NCD.transpose(1, 2), alpha=scale)
        probs_NRC = torch.softmax(scores_NRC, dim=-1)
        blocks.append((probs_NRC @ v_NCD).view(batch, kv, end - start, group, dim))
    out_BKTGD = torch.cat(blocks, dim=2)
    return out_BKTGD.permute(0, 2, 1, 3, 4).reshape(batch, length, kv * group, dim)


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
        return causal_attention(query, key, value, scale, mask), None
    return sdpa_attention_forward(
        module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
    )


AttentionInterface.register(ATTENTION, _attention)
AttentionMaskInterface.register(ATTENTION, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
