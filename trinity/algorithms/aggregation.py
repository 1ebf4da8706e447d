"""``loss_agg_mode`` as per-token scale factors, so token-SUM losses aggregate like the original.

Tinker's built-in losses sum over tokens. Multiplying each token's advantage (or CE weight) by a
scale ``s_t >= 0`` turns that sum into any of veRL's aggregations, exactly, because every built-in
is positively homogeneous in its advantage/weight: ``min(r*sA, clip(r)*sA) = s*min(r*A, clip(r)*A)``.

Aggregation here is over the whole batch of one ``forward_backward`` call (veRL's global batch).
The original Tinker trainer averaged per sequence, so its ``token-mean`` behaved like
``seq-mean-token-mean``; this module implements the modes as named.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from trinity.registry import LOSS_AGG_MODES


def _masks(masks: Sequence[Tensor | Sequence[float]]) -> list[Tensor]:
    return [torch.as_tensor(m, dtype=torch.float32).reshape(-1) for m in masks]


def token_scales(
    masks: Sequence[Tensor | Sequence[float]], mode: str, norm_length: int | None = None
) -> list[Tensor]:
    """One scale per token of each sequence such that ``sum(scale * loss)`` is the aggregate.

    - token-mean: ``m / T``, T = masked tokens in the batch
    - seq-mean-token-sum: ``m / N``
    - seq-mean-token-mean: ``m / (N * len_i)``, len_i = masked tokens of sequence i
    - seq-mean-token-sum-norm: ``m / L`` (Dr. GRPO); veRL's L is the padded response length, here
      ``norm_length`` (pass ``max_response_tokens`` to keep it constant) or the longest response.
    Sequences (or batches) with no masked token get zero scale instead of a division by zero.
    """
    if mode not in LOSS_AGG_MODES:
        raise ValueError(LOSS_AGG_MODES.unknown_message(mode))
    return LOSS_AGG_MODES.get(mode)(_masks(masks), norm_length)


@LOSS_AGG_MODES.register("token-mean")
def _token_mean(ms: list[Tensor], norm_length: int | None) -> list[Tensor]:
    total = float(sum(m.sum() for m in ms))
    return [m / total if total > 0 else torch.zeros_like(m) for m in ms]


@LOSS_AGG_MODES.register("seq-mean-token-sum")
def _seq_mean_token_sum(ms: list[Tensor], norm_length: int | None) -> list[Tensor]:
    return [m / len(ms) for m in ms]


@LOSS_AGG_MODES.register("seq-mean-token-mean")
def _seq_mean_token_mean(ms: list[Tensor], norm_length: int | None) -> list[Tensor]:
    return [m / (len(ms) * float(m.sum())) if m.sum() > 0 else torch.zeros_like(m) for m in ms]


@LOSS_AGG_MODES.register("seq-mean-token-sum-norm")
def _seq_mean_token_sum_norm(ms: list[Tensor], norm_length: int | None) -> list[Tensor]:
    length = norm_length if norm_length is not None else max((m.numel() for m in ms), default=0)
    return [m / length if length > 0 else torch.zeros_like(m) for m in ms]


def aggregate(
    losses: Sequence[Tensor],
    masks: Sequence[Tensor | Sequence[float]],
    mode: str,
    norm_length: int | None = None,
) -> Tensor:
    """veRL's ``agg_loss`` on a right-padded [N, L] batch: the reference ``token_scales`` matches."""
    ms = _masks(masks)
    width = max([m.numel() for m in ms] + [norm_length or 0])
    loss_mat = torch.stack(
        [torch.nn.functional.pad(x.reshape(-1), (0, width - x.numel())) for x in losses]
    )
    mask_mat = torch.stack([torch.nn.functional.pad(m, (0, width - m.numel())) for m in ms])
    if mode == "token-mean":
        return (loss_mat * mask_mat).sum() / mask_mat.sum()
    if mode == "seq-mean-token-sum":
        return (loss_mat * mask_mat).sum(-1).mean()
    if mode == "seq-mean-token-mean":
        return ((loss_mat * mask_mat).sum(-1) / mask_mat.sum(-1)).mean()
    if mode == "seq-mean-token-sum-norm":
        return (loss_mat * mask_mat).sum() / mask_mat.shape[-1]
    raise ValueError(LOSS_AGG_MODES.unknown_message(mode))
