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
cost every GRPO run the second pass), CISPO's mask clip, and the losses whose weight reads the
current ratio (SAPO, TOPR, SPPO, REC's clip modes) or that compare pairs of sequences (DPO, whose
reference logprobs the trainer fetches each step). docs/algorithms.md lists each algorithm's path.
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
from trinity.algorithms.mix import mix_scales
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
    def path(self) -> str:
        """The plan in words, as docs/algorithms.md lists it: the built-in in one pass, or the
        custom loss (``forward_backward_custom``: a forward, then the linearized backward), plus
        the reference model's forward when the loss reads reference logprobs."""
        core = "custom, 2 passes" if self.custom_reasons else f"`{self.loss_fn}`, 1 pass"
        return core + (" + ref" if self.needs_reference else "")

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

        rollouts = self.settings.schema == "experience"  # datasets carry no sampler logprobs
        return DatumLayout(
            builtin_inputs=None if self.custom_reasons else builtin_inputs,
            needs_logprobs=rollouts
            and (policy.builtin != "cross_entropy" or bool(self.custom_reasons)),
            needs_advantages=self.settings.policy_loss_fn != "sft" and policy.pair_loss is None,
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
        if self.policy.expert_token_loss is not None:  # MIX / CHORD: two parts, own aggregations
            infos = [getattr(exp, "info", {}) for exp in batch]
            experts = [bool(info.get("expert_mask")) for info in infos]
            step = int(infos[0].get("step", 0)) if infos else 0
            scales = mix_scales(masks, experts, step, self.policy_args, self.norm_length)
        else:
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
        expert = info.expert[sel] != 0 if info.expert is not None else None
        terms = {}
        if self.policy.pair_loss is None:  # a pair loss is the batch's (``batch_terms``)
            token_loss = self.policy.token_loss(lp_s, q, A, self.policy_args)
            if expert is not None and self.policy.expert_token_loss is not None:
                sft_loss = self.policy.expert_token_loss(lp_s, self.policy_args)
                token_loss = torch.where(expert, sft_loss, token_loss)
            terms["pg_loss"] = (s * token_loss).sum()
        if info.ref_logprobs is not None and st.kl_loss_fn != "none":
            kl_t = KL_FNS.get(st.kl_loss_fn)(lp_s, info.ref_logprobs[sel], q)
            terms["kl_loss"] = (s * kl_t).sum()
        s_rl = s if expert is None else torch.where(expert, 0.0, s)  # the original's "mix" entropy
        if entropy is not None:
            terms["entropy_loss"] = (s_rl * entropy[sel]).sum()
        elif st.entropy_coef:
            terms["entropy_loss"] = (s_rl * sampled_entropy(lp_s)).sum()
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
        infos = [info_from_datum(datum) for datum in data]
        if self.needs_reference and any(info.ref_logprobs is None for info in infos):
            raise ValueError("this loss needs ref_logprobs in every datum")
        terms, extra = self.batch_terms(logprobs_list, infos, entropy_list)
        metrics = {f"{key}:sum": float(value.detach()) for key, value in terms.items()}
        metrics.update({f"{key}:mean": value for key, value in extra.items()})
        return self._final(terms), metrics

    def batch_terms(
        self,
        logprobs_list: Sequence[Tensor],
        infos: Sequence[TokenInfo],
        entropies: Sequence[Tensor | None] | None = None,
    ) -> tuple[dict[str, Tensor], dict[str, float]]:
        """The batch's terms (sums of ``objective`` over datums, or a pair loss's mean over
        pairs) and the pair loss's own metrics."""
        entropies = entropies or [None] * len(infos)
        terms: dict[str, Tensor] = {}
        for lp, info, entropy in zip(logprobs_list, infos, entropies, strict=True):
            for key, value in self.objective(lp, info, entropy).items():
                terms[key] = terms[key] + value if key in terms else value
        if self.policy.pair_loss is None:
            return terms, {}
        if len(infos) % 2:
            raise ValueError(f"'{self.settings.algorithm_type}' needs (chosen, rejected) pairs")
        log_ratio_B = torch.stack(
            [
                ((lp - info.ref_logprobs) * (info.mask != 0)).sum()
                for lp, info in zip(logprobs_list, infos, strict=True)
            ]
        )
        terms["pg_loss"], extra = self.policy.pair_loss(
            log_ratio_B[0::2], log_ratio_B[1::2], self.policy_args
        )
        return terms, extra

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
        clipped = clipped_lower = kl_sum = tokens = 0.0
        c = self.policy_args.get("clip_ratio_c") if self.policy.builtin == "ppo" else None
        lps = [out["logprobs"].to_torch().reshape(-1).to(torch.float32) for out in outputs]
        entropies = [
            out["entropy"].to_torch().reshape(-1).float() if "entropy" in out else None
            for out in outputs
        ]
        with torch.no_grad():
            terms, extra = self.batch_terms(lps, infos, entropies)
        sums = {key: float(value) for key, value in terms.items()}
        for info, lp in zip(infos, lps, strict=True):
            with torch.no_grad():
                sel = info.mask != 0
                if info.expert is not None:  # SFT rows have no sampler logprobs
                    sel = sel & (info.expert == 0)
                lp_s, q, A = lp[sel], info.sampler_logprobs[sel], info.advantages[sel]
                tokens += float(sel.sum())
                kl_sum += float((q - lp_s).sum())
                if self.policy.clipped is not None:
                    clipped += float(self.policy.clipped(lp_s, q, A, self.policy_args).sum())
                if c is not None:
                    args_no_c = {**self.policy_args, "clip_ratio_c": None}
                    base = ppo_token_loss(lp_s, q, A, args_no_c)
                    clipped_lower += float(((A < 0) & (-A * float(c) < base)).sum())
        metrics = {f"actor/{key}": value for key, value in {**sums, **extra}.items()}
        metrics["actor/final_loss"] = float(self._final(sums))
        if tokens and st.schema == "experience" and st.policy_loss_fn != "sft":  # datasets: no q
            metrics["actor/ppo_kl"] = kl_sum / tokens
            if self.policy.clipped is not None:
                metrics["actor/pg_clipfrac"] = clipped / tokens
            if c is not None:
                metrics["actor/pg_clipfrac_lower"] = clipped_lower / tokens
        if "actor/kl_loss" in metrics:
            metrics["actor/kl_coef"] = st.kl_coef
        return metrics


LossPlan._custom_loss.takes_entropy = True  # the engine and trinity server hand it exact entropies


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
    plan.needs_reference = bool(settings.kl_coef) or kl_in_reward or policy.pair_loss is not None
    if reasons:
        plan.loss_fn = "cross_entropy"  # the SDK's surrogate for forward_backward_custom
    else:
        plan.loss_fn_config = policy.loss_fn_config(plan.policy_args)
    return plan
