"""PPO's critic in the trainer: values before the policy update, GAE, the value-model update.

Per step, as veRL's PPO trainer: the critic values every response token of the batch with its
current weights; GAE over those values (with the KL penalty in the token rewards when
``kl_penalty_fn`` is set) gives the advantages the policy trains on and the returns the critic
regresses to; the critic then takes ``ppo_epochs`` passes over the batch (one mini-batch, as the
original's ``ppo_mini_batch_size = train_batch_size``), each a clipped-value-loss
``forward_backward`` and an AdamW step with the critic's own optimizer settings. The value model
(``trinity/engine/value_head.py``) always runs in this process, whichever backend trains the
policy; its calls run in a worker thread, so they overlap a remote policy's.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from tinker import types
from torch import Tensor

from trinity.algorithms.aggregation import token_scales
from trinity.algorithms.gae import clipped_value_loss, gae_advantages
from trinity.algorithms.spec import AlgorithmSettings
from trinity.registry import KL_FNS


class Critic:
    def __init__(
        self,
        model: Any,  # engine.value_head.ValueModel (or anything with its methods)
        algorithm: AlgorithmSettings,
        adam_params: Callable[[int], types.AdamParams],
        *,
        cliprange_value: float = 0.5,
        ppo_epochs: int = 1,
        loss_agg_mode: str = "token-mean",
    ):
        self.model = model
        self.algorithm = algorithm
        self.adam_params = adam_params
        self.cliprange_value = cliprange_value
        self.ppo_epochs = ppo_epochs
        self.loss_agg_mode = loss_agg_mode
        # one thread: the value model is not thread-safe, and steps must not interleave
        self._lock = asyncio.Lock()

    async def values(self, batch: Sequence[Any]) -> list[Tensor]:
        async with self._lock:
            return await asyncio.to_thread(self.model.values, list(batch))

    def set_advantages(
        self,
        batch: Sequence[Any],
        values: Sequence[Tensor],
        ref_logprobs: Sequence[Sequence[float]] | None = None,
    ) -> list[Tensor]:
        """GAE advantages into ``exp.advantages``; returns the returns, one tensor per exp."""
        st = self.algorithm
        kl = None
        if st.kl_penalty_coef and ref_logprobs is not None:
            kl_fn = KL_FNS.get(st.kl_penalty_fn)
            kl = [
                kl_fn(torch.as_tensor(exp.logprobs), torch.as_tensor(ref, dtype=torch.float32))
                for exp, ref in zip(batch, ref_logprobs, strict=True)
            ]
        advantages, returns = gae_advantages(
            [float(exp.reward) for exp in batch],
            [exp.loss_mask for exp in batch],
            values,
            kl=kl,
            kl_coef=st.kl_penalty_coef,
            **st.advantage_fn_args,
        )
        for exp, adv in zip(batch, advantages, strict=True):
            exp.advantages = adv.tolist()
        return returns

    async def update(
        self,
        step: int,
        batch: Sequence[Any],
        old_values: Sequence[Tensor],
        returns: Sequence[Tensor],
    ) -> dict[str, float]:
        """``ppo_epochs`` clipped-value-loss steps on the batch; the original's ``critic/*``."""
        async with self._lock:
            return await asyncio.to_thread(self._update, step, batch, old_values, returns)

    def _update(self, step, batch, old_values, returns) -> dict[str, float]:
        started = time.monotonic()
        scales = token_scales([exp.loss_mask for exp in batch], self.loss_agg_mode)
        tokens = max(float(sum(float((s != 0).sum()) for s in scales)), 1.0)
        params = self.adam_params(step)
        metrics: dict[str, float] = {}
        for _ in range(self.ppo_epochs):
            sums = self._epoch(batch, scales, old_values, returns)
            optim = self.model.optim_step(params)
            metrics = {
                "critic/vf_loss": sums["loss"],
                "critic/vf_clipfrac": sums["clipped"] / tokens,
                "critic/vpred_mean": sums["vpred"] / tokens,
                "critic/grad_norm": float(optim.get("grad_norm", 0.0)),
            }
        metrics["critic/lr"] = params.learning_rate
        metrics["time/update_critic"] = time.monotonic() - started
        metrics.update(value_metrics(batch, old_values, returns))
        return metrics

    def _epoch(self, batch, scales, old_values, returns) -> dict[str, float]:
        """One clipped-value-loss ``forward_backward`` over the batch."""
        sums = {"clipped": 0.0, "vpred": 0.0}

        def loss(i: int, v: Tensor) -> Tensor:
            scale = scales[i].to(v.device)
            value, was_clipped = clipped_value_loss(
                v, old_values[i].to(v.device), returns[i].to(v.device), scale, self.cliprange_value
            )
            mask = scale != 0
            sums["clipped"] += float(was_clipped[mask].sum())
            sums["vpred"] += float(v.detach()[mask].sum())
            return value

        sums["loss"] = self.model.forward_backward(list(batch), loss)
        return sums

    async def save(self, directory: str | Path) -> None:
        async with self._lock:
            await asyncio.to_thread(self.model.save_state, directory)

    async def load(self, directory: str | Path) -> None:
        async with self._lock:
            await asyncio.to_thread(self.model.load_state, directory)


def value_metrics(
    batch: Sequence[Any], values: Sequence[Tensor], returns: Sequence[Tensor]
) -> dict[str, float]:
    """veRL's ``critic/values``, ``critic/returns`` (mean / max / min over masked tokens) and
    ``critic/vf_explained_var`` (1 - Var(R - V) / Var(R))."""
    masks = [torch.as_tensor(exp.loss_mask, dtype=torch.bool) for exp in batch]
    v = torch.cat([x[m] for x, m in zip(values, masks, strict=True)] or [torch.zeros(0)])
    r = torch.cat([x[m] for x, m in zip(returns, masks, strict=True)] or [torch.zeros(0)])
    if not v.numel():
        return {}
    metrics: dict[str, float] = {}
    for name, x in (("values", v), ("returns", r)):
        xs = x.tolist()
        metrics.update(
            {
                f"critic/{name}/mean": statistics.fmean(xs),
                f"critic/{name}/max": max(xs),
                f"critic/{name}/min": min(xs),
            }
        )
    var_r = float(r.var(unbiased=False))
    metrics["critic/vf_explained_var"] = 1.0 - float((r - v).var(unbiased=False)) / (var_r + 1e-5)
    return metrics
