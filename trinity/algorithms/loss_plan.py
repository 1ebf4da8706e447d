"""The loss plan: how one ``algorithm:`` config trains through the Tinker API.

A ``LossPlan`` names the built-in loss that expresses the algorithm's objective (see
``policy_losses.py``), its ``loss_fn_config``, and builds the datums with the ``loss_agg_mode``
scale folded into the advantages / CE weights, so that the built-in's token sum is the original's
aggregated objective, value and gradient. It also gives the trainer its batch-advantage step
(REINFORCE++, before the datums) and the original's ``actor/*`` metrics.

Terms no built-in expresses switch the plan to ``custom_loss`` (``forward_backward_custom``, two
passes): a KL loss to the reference (kl_loss_fn != none and kl_coef != 0), an entropy bonus
(entropy_coef != 0; exact when the learner hands the loss each token's entropy, the
local engine, else estimated from sampled tokens, see ``kl.sampled_entropy``), PPO's dual clip
(only when ``clip_ratio_c`` is set explicitly: the original applies it by default with c = 3, but
it only bites when the ratio exceeds 3 on a negative-advantage token, and honouring it always would
cost every GRPO run the second pass), and CISPO's mask clip.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tinker import types
from torch import Tensor

from trinity.algorithms.advantages import set_batch_advantages
from trinity.algorithms.aggregation import token_scales
from trinity.algorithms.datums import (
    DatumBatch,
    DatumLayout,
    TokenInfo,
    info_from_datum,
    to_datum,
    to_datums,
)
from trinity.algorithms.kl import sampled_entropy
from trinity.algorithms.policy_losses import PolicyLoss, ppo_token_loss
from trinity.algorithms.spec import AlgorithmSettings, resolve_algorithm
from trinity.config.schema import AlgorithmConfig
from trinity.registry import BATCH_ADVANTAGE_FNS, KL_FNS, POLICY_LOSSES


@dataclass
class LossPlan:
    """How one algorithm config trains through the Tinker API.

    ``custom_loss`` is None when a built-in expresses the whole objective; otherwise the trainer
    calls ``forward_backward_custom(datums, custom_loss)`` and ``loss_fn`` is the surrogate CE.
    """

    settings: AlgorithmSettings
    policy: PolicyLoss
    loss_fn: str
    loss_fn_config: dict[str, float] | None
    needs_reference: bool
    custom_reasons: list[str] = field(default_factory=list)
    norm_length: int | None = None

    @property
    def custom_loss(
        self,
    ) -> Callable[[list[types.Datum], list[Tensor]], tuple[Tensor, dict]] | None:
        return self._custom_loss if self.custom_reasons else None

    @property
    def policy_args(self) -> dict[str, Any]:
        return self.settings.policy_loss_fn_args

    # -- the trainer's steps: batch advantages, then datums --------------------------------------

    def batch_advantages(
        self, batch: Sequence[Any], ref_logprobs: Sequence[Sequence[float]] | None = None
    ) -> bool:
        """Set ``exp.advantages`` of a batch-level ``advantage_fn`` (REINFORCE++) over the whole
        training batch, with the KL penalty against ``ref_logprobs`` when configured.

        The trainer runs it before ``to_datums``; returns False (and does nothing) for group-level
        functions, whose advantages the explorer already set.
        """
        st = self.settings
        if st.advantage_fn not in BATCH_ADVANTAGE_FNS:
            return False
        set_batch_advantages(
            batch,
            st.advantage_fn,
            st.advantage_fn_args,
            ref_logprobs,
            kl_penalty_fn=st.kl_penalty_fn,
            kl_coef=st.kl_penalty_coef,
        )
        return True

    @property
    def layout(self) -> DatumLayout:
        """The datums this plan trains on (derived on use: ``custom_reasons`` may grow)."""
        policy, args = self.policy, self.policy_args

        def builtin_inputs(info: TokenInfo) -> dict[str, Tensor]:
            sA = info.scale * info.advantages
            return policy.inputs(info.sampler_logprobs, sA, info.scale, args)

        return DatumLayout(
            builtin_inputs=None if self.custom_reasons else builtin_inputs,
            needs_logprobs=policy.builtin != "cross_entropy",
            needs_advantages=self.settings.policy_loss_fn != "sft",
            algorithm=self.settings.algorithm_type,
        )

    def to_datum(self, *trajectory: Any, **options: Any) -> tuple[types.Datum, TokenInfo]:
        """``datums.to_datum`` (same arguments: one trajectory) in this plan's layout."""
        return to_datum(self.layout, *trajectory, **options)

    def to_datums(
        self, batch: Sequence[Any], ref_logprobs: Sequence[Sequence[float]] | None = None
    ) -> DatumBatch:
        """Experiences -> datums with the batch's aggregation scales; the experiences are only
        read, so their advantages must already be set (``batch_advantages`` for REINFORCE++)."""
        masks = [exp.loss_mask for exp in batch]
        scales = token_scales(masks, self.settings.loss_agg_mode, self.norm_length)
        return to_datums(self.layout, batch, scales, ref_logprobs)

    # -- the objective ---------------------------------------------------------------------------

    def objective(
        self,
        lp: Tensor,
        info: TokenInfo,
        entropy: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """The original's aggregated terms for one datum (sum over datums = batch value).

        ``lp`` is target-aligned learner logprobs. Only masked tokens are evaluated, so prompt
        positions cannot turn 0 * inf into NaN and still get a (zero) gradient.
        """
        st = self.settings
        sel = info.mask != 0
        lp_s, q, A, s = lp[sel], info.sampler_logprobs[sel], info.advantages[sel], info.scale[sel]
        terms = {"pg_loss": (s * self.policy.token_loss(lp_s, q, A, self.policy_args)).sum()}
        if info.ref_logprobs is not None and st.kl_loss_fn != "none":
            kl_t = KL_FNS.get(st.kl_loss_fn)(lp_s, info.ref_logprobs[sel], q)
            terms["kl_loss"] = (s * kl_t).sum()
        if entropy is not None:
            terms["entropy_loss"] = (s * entropy[sel]).sum()
        elif st.entropy_coef:
            terms["entropy_loss"] = (s * sampled_entropy(lp_s)).sum()
        return terms

    def _final(self, terms: dict[str, Any]) -> Any:
        """pg + kl_coef * kl - entropy_coef * entropy (tensors or floats)."""
        st = self.settings
        final = terms["pg_loss"]
        if "kl_loss" in terms and st.kl_coef:
            final = final + st.kl_coef * terms["kl_loss"]
        if "entropy_loss" in terms and st.entropy_coef:
            final = final - st.entropy_coef * terms["entropy_loss"]
        return final

    def _custom_loss(
        self,
        data: list[types.Datum],
        logprobs_list: list[Tensor],
        entropy_list: list[Tensor] | None = None,
    ) -> tuple[Tensor, dict[str, float]]:
        """``forward_backward_custom``'s loss: the full objective from the custom datums' inputs.

        ``entropy_list``: each token's exact entropy, where the learner gives it (local engine);
        the entropy term then uses it instead of the sampled-token estimate."""
        total = torch.zeros(())
        sums: dict[str, float] = {}
        entropies = entropy_list or [None] * len(logprobs_list)
        for datum, lp, entropy in zip(data, logprobs_list, entropies, strict=True):
            info = info_from_datum(datum)
            if self.needs_reference and info.ref_logprobs is None:
                raise ValueError("this loss needs ref_logprobs in every datum")
            terms = self.objective(lp, info, entropy)
            total = total + self._final(terms)
            for key, value in terms.items():
                sums[key] = sums.get(key, 0.0) + float(value.detach())
        metrics = {f"{key}:sum": value for key, value in sums.items()}
        return total, metrics

    # -- metrics --------------------------------------------------------------------------------

    def metrics(self, datums: Sequence[types.Datum], output: Any) -> dict[str, float]:
        """The original's ``actor/*`` metrics from the learner's per-token logprobs.

        ``output`` is the ``ForwardBackwardOutput`` (its ``logprobs``, and ``entropy`` when the
        learner returns it) or a plain list of per-datum logprob tensors. pg_loss, kl_loss and
        entropy_loss are aggregated by ``loss_agg_mode``; pg_clipfrac and ppo_kl = mean(q - lp)
        are over all trained tokens of the batch.
        """
        infos = getattr(datums, "infos", None) or [info_from_datum(d) for d in datums]
        if isinstance(output, list | tuple):
            outputs = [
                {"logprobs": types.TensorData.from_torch(torch.as_tensor(x).detach())}
                for x in output
            ]
        else:
            outputs = output.loss_fn_outputs
        st = self.settings
        sums: dict[str, float] = {}
        clipped = clipped_lower = kl_sum = tokens = 0.0
        c = self.policy_args.get("clip_ratio_c") if self.policy.builtin == "ppo" else None
        for info, out in zip(infos, outputs, strict=True):
            lp = out["logprobs"].to_torch().reshape(-1).to(torch.float32)
            entropy = out["entropy"].to_torch().reshape(-1).float() if "entropy" in out else None
            with torch.no_grad():
                for key, value in self.objective(lp, info, entropy).items():
                    sums[key] = sums.get(key, 0.0) + float(value)
                sel = info.mask != 0
                lp_s, q, A = lp[sel], info.sampler_logprobs[sel], info.advantages[sel]
                tokens += float(sel.sum())
                kl_sum += float((q - lp_s).sum())
                if self.policy.clipped is not None:
                    clipped += float(self.policy.clipped(lp_s, q, A, self.policy_args).sum())
                if c is not None:
                    args_no_c = {**self.policy_args, "clip_ratio_c": None}
                    base = ppo_token_loss(lp_s, q, A, args_no_c)
                    clipped_lower += float(((A < 0) & (-A * float(c) < base)).sum())
        metrics = {f"actor/{key}": value for key, value in sums.items()}
        metrics["actor/final_loss"] = float(self._final(sums))
        if tokens and st.policy_loss_fn != "sft":  # SFT data has no sampler logprobs
            metrics["actor/ppo_kl"] = kl_sum / tokens
            if self.policy.clipped is not None:
                metrics["actor/pg_clipfrac"] = clipped / tokens
            if c is not None:
                metrics["actor/pg_clipfrac_lower"] = clipped_lower / tokens
        if "actor/kl_loss" in metrics:
            metrics["actor/kl_coef"] = st.kl_coef
        return metrics


LossPlan._custom_loss.takes_entropy = True  # the local backend hands it exact entropies


def build_loss_plan(
    config: AlgorithmConfig | AlgorithmSettings | Any, norm_length: int | None = None
) -> LossPlan:
    """The plan for an ``algorithm:`` section (see ``resolve_algorithm`` for what it accepts).

    ``norm_length`` is seq-mean-token-sum-norm's divisor (pass ``model.max_response_tokens``).
    """
    settings = resolve_algorithm(config)
    policy = POLICY_LOSSES.get(settings.policy_loss_fn)
    KL_FNS.get(settings.kl_loss_fn)
    KL_FNS.get(settings.kl_penalty_fn)
    token_scales([], settings.loss_agg_mode)  # validates the mode
    reasons = []
    plan = LossPlan(settings, policy, policy.builtin, None, False, reasons, norm_length)
    reason = policy.custom_reason(settings.policy_loss_fn_args, settings.explicit_policy_args)
    if reason:
        reasons.append(reason)
    if settings.kl_coef:
        reasons.append(f"KL loss ({settings.kl_loss_fn}, kl_coef={settings.kl_coef})")
    if settings.entropy_coef:
        reasons.append(f"entropy bonus (entropy_coef={settings.entropy_coef})")
    kl_in_reward = settings.advantage_fn in BATCH_ADVANTAGE_FNS and settings.kl_penalty_coef != 0
    plan.needs_reference = bool(settings.kl_coef) or kl_in_reward
    if reasons:
        plan.loss_fn = "cross_entropy"  # the SDK's surrogate for forward_backward_custom
    else:
        plan.loss_fn_config = policy.loss_fn_config(plan.policy_args)
    return plan
