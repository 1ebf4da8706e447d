"""Datums: trajectories -> Tinker ``Datum``s, plus the per-token side data the metrics need.

A pure conversion: it reads the experiences and never writes to them, so every advantage must be
set before (by the explorer's group step, or the trainer's batch step for REINFORCE++). What a
datum carries is the loss plan's ``DatumLayout``: a built-in loss gets only its own inputs, a
custom loss (``forward_backward_custom``) gets all the side data, since it sees nothing else.

Layout (Tinker's convention): input = tokens[:-1], target = tokens[1:], so position
``prompt_length - 1 + k`` predicts response token k; every per-token input is 0 on prompt
positions and on masked response tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tinker import types
from torch import Tensor


def _tensor(values: Any) -> Tensor:
    return torch.as_tensor(values if values is not None else [], dtype=torch.float32).reshape(-1)


def _place(response_values: Tensor, prompt_length: int) -> Tensor:
    """Response-indexed values -> target-aligned (zeros on the prompt_length - 1 prompt targets)."""
    return torch.cat([torch.zeros(prompt_length - 1), response_values])


def _td(x: Tensor) -> types.TensorData:
    return types.TensorData.from_torch(x.to(torch.float32).contiguous())


def _check_lengths(name: str, values: Tensor, response_length: int, allow_empty: bool) -> Tensor:
    if values.numel() == response_length:
        return values
    if allow_empty and values.numel() == 0:
        return torch.zeros(response_length)
    raise ValueError(f"{name} has {values.numel()} entries for {response_length} response tokens")


@dataclass
class TokenInfo:
    """Target-aligned per-token side data the built-in datum does not carry (for metrics)."""

    mask: Tensor
    scale: Tensor
    advantages: Tensor
    sampler_logprobs: Tensor
    ref_logprobs: Tensor | None = None
    expert: Tensor | None = None  # 1 on the tokens of an expert (SFT) row of a MIX batch


class DatumBatch(list):
    """A list of ``Datum`` with the per-token side data (``infos``) that metrics need."""

    def __init__(self, datums: Sequence[types.Datum] = (), infos: Sequence[TokenInfo] = ()):
        super().__init__(datums)
        self.infos = list(infos)


@dataclass(frozen=True)
class DatumLayout:
    """What a plan's datums carry and which trajectory fields they require.

    ``builtin_inputs`` maps a trajectory's ``TokenInfo`` to the built-in loss's per-token inputs;
    None means the custom layout (all side data). ``algorithm`` only names the plan in errors.
    """

    builtin_inputs: Callable[[TokenInfo], dict[str, Tensor]] | None
    needs_logprobs: bool
    needs_advantages: bool
    algorithm: str


def to_datum(
    layout: DatumLayout,
    tokens: Sequence[int],
    prompt_length: int,
    logprobs: Sequence[float] | Tensor | None,
    loss_mask: Sequence[float] | Tensor,
    advantages: Sequence[float] | Tensor | None,
    ref_logprobs: Sequence[float] | Tensor | None = None,
    scale: Sequence[float] | Tensor | None = None,
    *,
    expert: bool = False,
) -> tuple[types.Datum, TokenInfo]:
    """One trajectory -> a ``Datum`` (+ its side data). Per-token arguments are indexed by
    response position; ``scale`` is the aggregation scale (default: the mask, a token sum);
    ``expert`` marks an SFT row of a MIX batch."""
    if not 1 <= prompt_length < len(tokens):
        raise ValueError(
            f"need 1 <= prompt_length < len(tokens), got {prompt_length}, {len(tokens)}"
        )
    n = len(tokens) - prompt_length
    mask = _check_lengths("loss_mask", _tensor(loss_mask), n, False)
    q = _check_lengths("logprobs", _tensor(logprobs), n, not layout.needs_logprobs)
    adv = _check_lengths("advantages", _tensor(advantages), n, not layout.needs_advantages)
    s = mask.clone() if scale is None else _check_lengths("scale", _tensor(scale), n, False)
    s = s * (mask != 0)
    adv = adv * (mask != 0)
    ref = (
        None
        if ref_logprobs is None
        else _check_lengths("ref_logprobs", _tensor(ref_logprobs), n, False)
    )

    info = TokenInfo(
        mask=_place(mask, prompt_length),
        scale=_place(s, prompt_length),
        advantages=_place(adv, prompt_length),
        sampler_logprobs=_place(torch.where(mask != 0, q, 0.0), prompt_length),
        ref_logprobs=None
        if ref is None
        else _place(torch.where(mask != 0, ref, 0.0), prompt_length),
        expert=_place((mask != 0).float(), prompt_length) if expert else None,
    )
    target = torch.as_tensor(list(tokens[1:]), dtype=torch.int64)
    inputs: dict[str, types.TensorData] = {"target_tokens": types.TensorData.from_torch(target)}
    if layout.builtin_inputs is None:
        inputs["weights"] = _td(info.scale)  # only used by the SDK's forward pass
        inputs["logprobs"] = _td(info.sampler_logprobs)
        inputs["advantages"] = _td(info.advantages)
        inputs["mask"] = _td(info.mask)
        inputs["scale"] = _td(info.scale)
        if info.ref_logprobs is not None:
            inputs["ref_logprobs"] = _td(info.ref_logprobs)
        if info.expert is not None:
            inputs["expert_mask"] = _td(info.expert)
    else:
        inputs.update({key: _td(value) for key, value in layout.builtin_inputs(info).items()})
    datum = types.Datum(
        model_input=types.ModelInput.from_ints(list(tokens[:-1])), loss_fn_inputs=inputs
    )
    return datum, info


def to_datums(
    layout: DatumLayout,
    batch: Sequence[Any],
    scales: Sequence[Tensor],
    ref_logprobs: Sequence[Sequence[float]] | None = None,
) -> DatumBatch:
    """Experiences (duck-typed: tokens, prompt_length, logprobs, loss_mask, advantages) ->
    datums, with one aggregation scale per experience; the experiences are only read."""
    if ref_logprobs is not None and len(ref_logprobs) != len(batch):
        raise ValueError("need one ref_logprobs list per experience")
    datums, infos = [], []
    for i, exp in enumerate(batch):
        if exp.advantages is None and layout.needs_advantages:
            raise ValueError(
                f"experience {i} has no advantages: algorithm '{layout.algorithm}' needs the "
                "explorer's advantage_fn (batch-level ones: LossPlan.batch_advantages) first"
            )
        datum, info = to_datum(
            layout,
            exp.tokens,
            exp.prompt_length,
            exp.logprobs,
            exp.loss_mask,
            exp.advantages,
            None if ref_logprobs is None else ref_logprobs[i],
            scales[i],
            expert=bool(getattr(exp, "info", {}).get("expert_mask")),
        )
        datums.append(datum)
        infos.append(info)
    return DatumBatch(datums, infos)


def info_from_datum(datum: types.Datum) -> TokenInfo:
    """Side data from a datum's own inputs (custom datums carry all of it)."""
    inp = datum.loss_fn_inputs

    def get(key: str) -> Tensor | None:
        return inp[key].to_torch().reshape(-1).to(torch.float32) if key in inp else None

    zeros = torch.zeros(len(inp["target_tokens"].data))
    weights, advantages = get("weights"), get("advantages")
    mask = get("mask")
    if mask is None:  # a built-in datum: the nonzero advantages / weights are the trained tokens
        mask = ((advantages if advantages is not None else weights) != 0).float()
    scale = get("scale")
    return TokenInfo(
        mask=mask,
        scale=scale if scale is not None else mask,
        advantages=advantages if advantages is not None else zeros,
        sampler_logprobs=get("logprobs") if "logprobs" in inp else zeros,
        ref_logprobs=get("ref_logprobs"),
        expert=get("expert_mask"),
    )
