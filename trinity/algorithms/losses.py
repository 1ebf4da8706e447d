"""Loss mapping: each algorithm's objective expressed as a Tinker built-in loss, or a custom loss.

The learner only knows Tinker's token-SUM built-ins (notes/tinker-api.md §1.6). A ``LossPlan``
names the built-in, its ``loss_fn_config``, and builds one ``Datum`` per trajectory with the
``loss_agg_mode`` scale folded into the advantages / CE weights, so that the built-in's sum is the
original's aggregated objective, value and gradient:

- ppo (GRPO, RLOO, REINFORCE++, DAPO)  -> ``ppo``, thresholds 1 - clip_range_low, 1 + clip_range_high
- importance_sampling                  -> ``importance_sampling`` (-r A)
- cispo                                -> ``cispo``, thresholds 1 - clip_range_low, 1 + clip_range_high
- opmd (OPMD, AsymRE)                  -> ``cross_entropy`` with w = s A / (1 + tau)  (-A log pi / (1 + tau))
- sft (SFT, RAFT)                      -> ``cross_entropy`` with w = s m

Terms no built-in expresses switch the plan to ``custom_loss`` (``forward_backward_custom``, two
passes): a KL loss to the reference (kl_loss_fn != none and kl_coef != 0), an entropy bonus
(entropy_coef != 0; estimated from sampled tokens, see ``kl.sampled_entropy``), PPO's dual clip
(only when ``clip_ratio_c`` is set explicitly: the original applies it by default with c = 3, but
it only bites when the ratio exceeds 3 on a negative-advantage token, and honouring it always would
cost every GRPO run the second pass), and CISPO's mask clip.

Datum layout (Tinker's convention): input = tokens[:-1], target = tokens[1:], so position
``prompt_length - 1 + k`` predicts response token k; every per-token input is 0 on prompt
positions and on masked response tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tinker import types
from torch import Tensor

from trinity.algorithms.advantages import reinforce_plus_plus_advantages
from trinity.algorithms.aggregation import token_scales
from trinity.algorithms.kl import sampled_entropy
from trinity.algorithms.spec import AlgorithmSettings, resolve_algorithm
from trinity.registry import BATCH_ADVANTAGE_FNS, KL_FNS, POLICY_LOSSES

LOG_RATIO_CLAMP = 20.0  # the original clamps log(pi / pi_old) before exp; Tinker's built-ins do not


# ---------------------------------------------------------------------------------------------
# Policy losses: the original per-token objective, and its Tinker built-in form.
# ---------------------------------------------------------------------------------------------


def _ratio(lp: Tensor, q: Tensor) -> Tensor:
    return torch.exp(torch.clamp(lp - q, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))


def _ppo_bounds(args: dict[str, Any]) -> tuple[float, float]:
    low = args.get("clip_range_low", args.get("clip_range"))
    high = args.get("clip_range_high", args.get("clip_range"))
    if low is None or high is None:
        raise ValueError("the ppo/cispo policy loss needs clip_range or clip_range_low/high")
    return 1.0 - float(low), 1.0 + float(high)


@dataclass(frozen=True)
class PolicyLoss:
    """A policy loss: its defaults, Tinker built-in, and the original per-token objective.

    ``token_loss(lp, q, A, args)`` is the unaggregated original objective (positively homogeneous
    in A, so scaling A by the aggregation scale scales the loss). ``inputs`` builds the built-in's
    per-token inputs from the already-scaled advantages ``sA`` and scale ``s`` (mask included).
    """

    builtin: str
    defaults: dict[str, Any]
    token_loss: Callable[[Tensor, Tensor, Tensor, dict[str, Any]], Tensor]
    inputs: Callable[[Tensor, Tensor, Tensor, dict[str, Any]], dict[str, Tensor]]
    loss_fn_config: Callable[[dict[str, Any]], dict[str, float] | None] = lambda args: None
    custom_reason: Callable[[dict[str, Any], frozenset[str]], str | None] = lambda a, e: None
    clipped: Callable[[Tensor, Tensor, Tensor, dict[str, Any]], Tensor] | None = None




def _rl_inputs(q: Tensor, sA: Tensor, s: Tensor, args: dict[str, Any]) -> dict[str, Tensor]:
    return {"logprobs": torch.where(s != 0, q, torch.zeros_like(q)), "advantages": sA}


def ppo_token_loss(lp: Tensor, q: Tensor, A: Tensor, args: dict[str, Any]) -> Tensor:
    """max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high)), and min(., -A c) for A < 0 (dual clip)."""
    lo, hi = _ppo_bounds(args)
    r = _ratio(lp, q)
    loss = torch.maximum(-A * r, -A * torch.clamp(r, lo, hi))
    c = args.get("clip_ratio_c")
    if c is not None:
        loss = torch.where(A < 0, torch.minimum(loss, -A * float(c)), loss)
    return loss


def _ppo_clipped(lp: Tensor, q: Tensor, A: Tensor, args: dict[str, Any]) -> Tensor:
    lo, hi = _ppo_bounds(args)
    r = _ratio(lp, q)
    return (-A * torch.clamp(r, lo, hi)) > (-A * r)


def _ppo_config(args: dict[str, Any]) -> dict[str, float]:
    lo, hi = _ppo_bounds(args)
    return {"clip_low_threshold": lo, "clip_high_threshold": hi}


def _ppo_custom_reason(args: dict[str, Any], explicit: frozenset[str]) -> str | None:
    # clip_ratio_c is not among the defaults, so it is present only when the user set it
    return "dual clip (clip_ratio_c)" if args.get("clip_ratio_c") is not None else None


def cispo_token_loss(lp: Tensor, q: Tensor, A: Tensor, args: dict[str, Any]) -> Tensor:
    """-A sg(clip(r, lo, hi)) log pi, optionally zeroed where the ratio left the mask range."""
    lo, hi = _ppo_bounds(args)
    r = _ratio(lp, q)
    loss = -A * torch.clamp(r, lo, hi).detach() * lp
    if args.get("enable_mask_clip"):
        m_lo = 1.0 - float(args.get("mask_clip_range_low", 1.0))
        m_hi = 1.0 + float(args.get("mask_clip_range_high", 0.28))
        drop = ((r > m_hi) & (A > 0)) | ((r < m_lo) & (A < 0))
        loss = torch.where(drop.detach(), torch.zeros_like(loss), loss)
    return loss


def _cispo_clipped(lp: Tensor, q: Tensor, A: Tensor, args: dict[str, Any]) -> Tensor:
    lo, hi = _ppo_bounds(args)
    r = _ratio(lp, q)
    return (r < lo) | (r > hi)


def opmd_token_loss(lp: Tensor, q: Tensor, A: Tensor, args: dict[str, Any]) -> Tensor:
    """-A log pi / (1 + tau): no ratio, no clip; the (1 + tau) is the original's regularizer."""
    return -A * lp / (1.0 + float(args.get("tau", 1.0)))


def sft_token_loss(lp: Tensor, q: Tensor, A: Tensor, args: dict[str, Any]) -> Tensor:
    return -lp


def is_token_loss(lp: Tensor, q: Tensor, A: Tensor, args: dict[str, Any]) -> Tensor:
    return -A * _ratio(lp, q)


POLICY_LOSSES.register("ppo")(
    PolicyLoss(
        "ppo",
        {"clip_range": 0.2},
        ppo_token_loss,
        _rl_inputs,
        _ppo_config,
        _ppo_custom_reason,
        _ppo_clipped,
    )
)
POLICY_LOSSES.register("cispo")(
    PolicyLoss(
        "cispo",
        {"clip_range_low": 1.0, "clip_range_high": 0.28, "enable_mask_clip": False},
        cispo_token_loss,
        _rl_inputs,
        _ppo_config,
        lambda args, explicit: "CISPO mask clip" if args.get("enable_mask_clip") else None,
        _cispo_clipped,
    )
)
POLICY_LOSSES.register("importance_sampling")(
    PolicyLoss("importance_sampling", {}, is_token_loss, _rl_inputs)
)
POLICY_LOSSES.register("opmd")(
    PolicyLoss(
        "cross_entropy",
        {"tau": 1.0},
        opmd_token_loss,
        lambda q, sA, s, args: {"weights": sA / (1.0 + float(args.get("tau", 1.0)))},
    )
)
POLICY_LOSSES.register("sft")(
    PolicyLoss("cross_entropy", {}, sft_token_loss, lambda q, sA, s, args: {"weights": s})
)


# ---------------------------------------------------------------------------------------------
# Tinker's built-in losses (notes/tinker-api.md §1.6), per token, for reporting metrics.
# ---------------------------------------------------------------------------------------------


def builtin_token_loss(
    loss_fn: str, lp: Tensor, inputs: dict[str, Tensor], config: dict[str, float] | None = None
) -> Tensor:
    """Per-token terms whose sum is the built-in's ``loss:sum``."""
    config = config or {}
    if loss_fn == "cross_entropy":
        return -inputs["weights"] * lp
    A, q = inputs["advantages"], inputs["logprobs"]
    r = torch.exp(lp - q)
    if loss_fn == "importance_sampling":
        return -r * A
    lo = config.get("clip_low_threshold", 0.8 if loss_fn == "ppo" else 0.0)
    hi = config.get("clip_high_threshold", 1.2 if loss_fn == "ppo" else 4.0)
    if loss_fn == "ppo":
        return -torch.minimum(r * A, torch.clamp(r, lo, hi) * A)
    if loss_fn == "cispo":
        return -torch.clamp(r, lo, hi).detach() * lp * A
    raise ValueError(f"no reference formula for built-in loss {loss_fn!r}")


# ---------------------------------------------------------------------------------------------
# Datums
# ---------------------------------------------------------------------------------------------


def _tensor(values: Any) -> Tensor:
    return torch.as_tensor(values if values is not None else [], dtype=torch.float32).reshape(-1)


def _place(response_values: Tensor, prompt_length: int) -> Tensor:
    """Response-indexed values -> target-aligned (zeros on the prompt_length - 1 prompt targets)."""
    return torch.cat([torch.zeros(prompt_length - 1), response_values])


def _td(x: Tensor) -> types.TensorData:
    return types.TensorData.from_torch(x.to(torch.float32).contiguous())


@dataclass
class TokenInfo:
    """Target-aligned per-token side data the built-in datum does not carry (for metrics)."""

    mask: Tensor
    scale: Tensor
    advantages: Tensor
    sampler_logprobs: Tensor
    ref_logprobs: Tensor | None = None


class DatumBatch(list):
    """A list of ``Datum`` with the per-token side data (``infos``) that metrics need."""

    def __init__(self, datums: Sequence[types.Datum] = (), infos: Sequence[TokenInfo] = ()):
        super().__init__(datums)
        self.infos = list(infos)


def _check_lengths(name: str, values: Tensor, response_length: int, allow_empty: bool) -> Tensor:
    if values.numel() == response_length:
        return values
    if allow_empty and values.numel() == 0:
        return torch.zeros(response_length)
    raise ValueError(f"{name} has {values.numel()} entries for {response_length} response tokens")


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

    # -- datums --------------------------------------------------------------------------------

    def to_datum(
        self,
        tokens: Sequence[int],
        prompt_length: int,
        logprobs: Sequence[float] | Tensor | None,
        loss_mask: Sequence[float] | Tensor,
        advantages: Sequence[float] | Tensor | None,
        ref_logprobs: Sequence[float] | Tensor | None = None,
        scale: Sequence[float] | Tensor | None = None,
    ) -> tuple[types.Datum, TokenInfo]:
        """One trajectory -> a ``Datum`` (+ its side data). Per-token arguments are indexed by
        response position; ``scale`` is the aggregation scale (default: the mask, a token sum)."""
        if not 1 <= prompt_length < len(tokens):
            raise ValueError(
                f"need 1 <= prompt_length < len(tokens), got {prompt_length}, {len(tokens)}"
            )
        n = len(tokens) - prompt_length
        is_ce = self.policy.builtin == "cross_entropy"
        mask = _check_lengths("loss_mask", _tensor(loss_mask), n, False)
        q = _check_lengths("logprobs", _tensor(logprobs), n, is_ce)
        adv = _check_lengths(
            "advantages", _tensor(advantages), n, self.settings.policy_loss_fn == "sft"
        )
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
        )
        target = torch.as_tensor(list(tokens[1:]), dtype=torch.int64)
        inputs: dict[str, types.TensorData] = {"target_tokens": types.TensorData.from_torch(target)}
        if self.custom_reasons:
            inputs["weights"] = _td(info.scale)  # only used by the SDK's forward pass
            inputs["logprobs"] = _td(info.sampler_logprobs)
            inputs["advantages"] = _td(info.advantages)
            inputs["mask"] = _td(info.mask)
            inputs["scale"] = _td(info.scale)
            if info.ref_logprobs is not None:
                inputs["ref_logprobs"] = _td(info.ref_logprobs)
        else:
            built = self.policy.inputs(
                info.sampler_logprobs, info.scale * info.advantages, info.scale, self.policy_args
            )
            inputs.update({key: _td(value) for key, value in built.items()})
        datum = types.Datum(
            model_input=types.ModelInput.from_ints(list(tokens[:-1])), loss_fn_inputs=inputs
        )
        return datum, info

    def to_datums(
        self, batch: Sequence[Any], ref_logprobs: Sequence[Sequence[float]] | None = None
    ) -> DatumBatch:
        """Experiences (duck-typed: tokens, prompt_length, logprobs, loss_mask, advantages,
        reward) -> datums, with the batch's aggregation scales. REINFORCE++ advantages are computed
        here over the batch (and written back to ``exp.advantages``)."""
        if ref_logprobs is not None and len(ref_logprobs) != len(batch):
            raise ValueError("need one ref_logprobs list per experience")
        masks = [_tensor(exp.loss_mask) for exp in batch]
        scales = token_scales(masks, self.settings.loss_agg_mode, self.norm_length)
        if self.settings.advantage_fn in BATCH_ADVANTAGE_FNS:
            self._batch_advantages(batch, masks, ref_logprobs)
        datums, infos = [], []
        for i, exp in enumerate(batch):
            if exp.advantages is None and self.settings.policy_loss_fn != "sft":
                raise ValueError(
                    f"experience {i} has no advantages: algorithm "
                    f"'{self.settings.algorithm_type}' needs the explorer's advantage_fn"
                )
            datum, info = self.to_datum(
                exp.tokens,
                exp.prompt_length,
                exp.logprobs,
                exp.loss_mask,
                exp.advantages,
                None if ref_logprobs is None else ref_logprobs[i],
                scales[i],
            )
            datums.append(datum)
            infos.append(info)
        return DatumBatch(datums, infos)

    def _batch_advantages(
        self, batch: Sequence[Any], masks: list[Tensor], ref_logprobs: Any
    ) -> None:
        st = self.settings
        kl = None
        if st.kl_penalty_coef and ref_logprobs is not None:
            kl = [
                KL_FNS.get(st.kl_penalty_fn)(_tensor(exp.logprobs), _tensor(ref))
                for exp, ref in zip(batch, ref_logprobs, strict=True)
            ]
        advantages, _ = reinforce_plus_plus_advantages(
            [float(exp.reward) for exp in batch],
            masks,
            kl=kl,
            kl_coef=st.kl_penalty_coef,
            gamma=float(st.advantage_fn_args.get("gamma", 1.0)),
        )
        for exp, adv in zip(batch, advantages, strict=True):
            exp.advantages = adv.tolist()

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
        self, data: list[types.Datum], logprobs_list: list[Tensor]
    ) -> tuple[Tensor, dict[str, float]]:
        """``forward_backward_custom``'s loss: the full objective from the custom datums' inputs."""
        total = torch.zeros(())
        sums: dict[str, float] = {}
        for datum, lp in zip(data, logprobs_list, strict=True):
            info = info_from_datum(datum)
            if self.needs_reference and info.ref_logprobs is None:
                raise ValueError("this loss needs ref_logprobs in every datum")
            terms = self.objective(lp, info)
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
    )


def build_loss_plan(config: Any, norm_length: int | None = None) -> LossPlan:
    """The plan for an ``algorithm:`` section (mapping, object or resolved ``AlgorithmSettings``).

    ``norm_length`` is seq-mean-token-sum-norm's divisor (pass ``model.max_response_tokens``).
    """
    settings = config if isinstance(config, AlgorithmSettings) else resolve_algorithm(config)
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
