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
autograd differentiates these large matmuls at matmul speed. A packed pass whose mask is exactly
prompts and responses (``members``) runs instead, where that is fewer scores, as one padded
batch of them: each response over its prompt and itself, one matmul for all. The query heads of
a KV group are stacked as rows of one matmul, so keys and values are never repeated. It keeps the block's
probabilities (2 bytes each in bf16) for the backward, so more keys per block than ``MAX_LENGTH``
(where its lead over the flash kernel also shrinks) and every other call (sampling, float
masks) go to "sdpa" unchanged.

Shape letters here: A query heads, K key-value heads, G = A / K query heads per KV head, D head
dimension, Q a block's query positions, R its rows (G x Q).
"""

from __future__ import annotations

import functools
import weakref
from typing import NamedTuple

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


class Members(NamedTuple):
    """A one-row mask as members: query positions [start, start + length) of member m see the
    keys [extra, extra + extra_length) and their own member's positions up to themselves (a
    packed pass's prompt: no extra keys; a response: its prompt's). Padded to the longest member
    and the longest extra run: ``query_MQ``, ``key_MC`` (each member's query and key positions,
    on the CPU, padding repeating its first), ``seen_MQC`` (the keys each query sees; a padding
    query its own padding key), ``position_N`` (each position's row in the flattened
    [M Q] queries), ``work`` (M Q C scores)."""

    query_MQ: Tensor
    key_MC: Tensor
    seen_MQC: Tensor
    position_N: Tensor
    work: int


def members(mask_11QT: Tensor) -> Members | None:
    """The mask as ``Members``, or None where it is not exactly that (any batch > 1, sliding
    windows, keys beyond the queries). Why: in a GRPO pass the query blocks of 128 positions
    each see two prompts and several responses, a few hundred keys of which a query uses ~60;
    members padded to the longest one are one batched matmul over ~40 % fewer scores, and a
    layer's attention is a few ops where the blocks made ~70."""
    if mask_11QT.shape[0] != 1 or mask_11QT.shape[2] != mask_11QT.shape[3]:
        return None
    seen_NN = mask_11QT[0, 0].cpu()
    n = seen_NN.shape[0]
    if n == 0 or not bool(seen_NN.diagonal().all()):
        return None
    # position q continues q - 1's member when it sees what q - 1 sees and itself, nothing more
    grown = seen_NN[:-1].clone()
    grown[torch.arange(n - 1), torch.arange(1, n)] = True
    starts = [0] + (torch.nonzero(~(grown == seen_NN[1:]).all(1))[:, 0] + 1).tolist()
    start_M = torch.tensor(starts)
    length_M = torch.diff(start_M, append=torch.tensor([n]))
    # a member's extra keys: those its first row sees besides itself (checked to be one run
    # before the member, below, with the whole mask rebuilt from the members)
    first_MN = seen_NN[start_M].clone()
    first_MN[torch.arange(len(starts)), start_M] = False
    extra_length_M = first_MN.sum(1)
    extra_M = torch.where(extra_length_M > 0, first_MN.int().argmax(1), 0)
    member_N = torch.arange(len(starts)).repeat_interleave(length_M)
    columns_N = torch.arange(n)
    lo_N, hi_N = extra_M[member_N], (extra_M + extra_length_M)[member_N]
    rebuilt_NN = (columns_N >= lo_N[:, None]) & (columns_N < hi_N[:, None])
    rebuilt_NN |= (columns_N >= start_M[member_N][:, None]) & (columns_N <= columns_N[:, None])
    if not torch.equal(rebuilt_NN, seen_NN) or bool(((extra_M + extra_length_M) > start_M).any()):
        return None
    length, extra_length = int(length_M.max()), int(extra_length_M.max())
    steps_Q, steps_X = torch.arange(length), torch.arange(extra_length)
    own_MQ = steps_Q < length_M[:, None]
    query_MQ = start_M[:, None] + torch.where(own_MQ, steps_Q, 0)
    extra_MX = steps_X < extra_length_M[:, None]
    key_MC = torch.cat(
        [torch.where(extra_MX, extra_M[:, None] + steps_X, start_M[:, None]), query_MQ], 1
    )
    own_MQQ = own_MQ[:, None, :] & (steps_Q[None, :, None] >= steps_Q[None, None, :])
    own_MQQ |= torch.eye(length, dtype=torch.bool)  # a padding row sees its member's first key
    seen_MQC = torch.cat([extra_MX[:, None, :].expand(-1, length, -1), own_MQQ], 2)
    position_N = member_N * length + columns_N - start_M[member_N]
    return Members(query_MQ, key_MC, seen_MQC, position_N, seen_MQC.numel())


def _members_of(mask_B1QT: Tensor) -> Members | None:
    """``members`` of the mask, once per pass (``_LAST``), where its padded scores are fewer than
    the query blocks' over their ``block_columns``; else None."""
    columns = _columns_of(mask_B1QT)
    plans = _LAST[3]
    if "members" not in plans:
        plan = members(mask_B1QT)
        length = mask_B1QT.shape[2]
        blocks = sum(
            min(QUERY_BLOCK, length - start) * (mask_B1QT.shape[3] if c is None else c.numel())
            for start, c in zip(range(0, length, QUERY_BLOCK), columns, strict=True)
        )
        plans["members"] = plan if plan is not None and plan.work < blocks else None
    return plans["members"]


def _member_bias(plan: Members, kv: int, group: int, dtype: torch.dtype, device) -> Tensor:
    """The additive mask of the members' scores, [M K, Q G, C] (rows (position, group head)),
    once per pass (``_LAST``)."""
    plans = _LAST[3]
    key = ("member bias", group, dtype, device)
    if key not in plans:
        seen_MRC = plan.seen_MQC.repeat_interleave(group, 1).to(device)
        bias_MRC = torch.zeros(seen_MRC.shape, dtype=dtype, device=device)
        bias_MRC.masked_fill_(~seen_MRC, torch.finfo(dtype).min)
        plans[key] = bias_MRC.repeat_interleave(kv, 0)
    return plans[key]


def _member_attention(
    q_BATD: Tensor, k_BKTD: Tensor, v_BKTD: Tensor, scale: float, plan: Members
) -> Tensor:
    """``causal_attention`` over ``members``: every member's queries and keys gathered into one
    padded batch [M K, ...] (one index_select each), one masked matmul for the scores, one for
    the values, each position's output gathered back from its member's row."""
    length, kv, dim = q_BATD.shape[2], k_BKTD.shape[1], k_BKTD.shape[3]
    group = q_BATD.shape[1] // kv
    count, queries = plan.query_MQ.shape
    keys = plan.key_MC.shape[1]
    device = q_BATD.device
    q_KNGD = q_BATD[0].unflatten(0, (kv, group)).transpose(1, 2)
    q_KMQGD = q_KNGD.index_select(1, plan.query_MQ.flatten().to(device))
    q_NRD = q_KMQGD.view(kv, count, queries * group, dim).transpose(0, 1).flatten(0, 1)
    key_C = plan.key_MC.flatten().to(device)
    k_NCD, v_NCD = (
        x[0].index_select(1, key_C).view(kv, count, keys, dim).transpose(0, 1).flatten(0, 1)
        for x in (k_BKTD, v_BKTD)
    )
    bias_NRC = _member_bias(plan, kv, group, q_BATD.dtype, device)
    scores_NRC = torch.baddbmm(bias_NRC, q_NRD, k_NCD.transpose(1, 2), alpha=scale)
    out_NRD = torch.softmax(scores_NRC, dim=-1) @ v_NCD
    out_MQKGD = out_NRD.view(count, kv, queries, group, dim).transpose(1, 2)
    out_ND = out_MQKGD.reshape(count * queries, kv * group * dim)
    out_ND = out_ND.index_select(0, plan.position_N.to(device))
    return out_ND.view(1, length, kv * group, dim)


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
    ``block_columns`` only, or where the mask is ``members`` with fewer padded scores, over them.

    The queries are laid out once as [B, K, T, G, D], so a block's rows (position, group head)
    are a view and its gradient comes back through one concatenation (``split``); the scale and
    the mask go into the scores' matmul (``baddbmm`` with an additive mask made once per pass).
    """
    if mask_B1QT is not None and (plan := _members_of(mask_B1QT)) is not None:
        return _member_attention(q_BATD, k_BKTD, v_BKTD, scale, plan)
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
