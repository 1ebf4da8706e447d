"""Loss mapping parity: the Tinker built-in applied to our datums == the original objective.

Both sides are written here from their definitions, independently of the code under test:
``tinker_loss`` is Tinker's built-in token sums (the formulas trinity/engine/losses.py lists),
``verl_agg`` is veRL's ``agg_loss`` on a
padded batch, and each ``original_*`` is the original Trinity per-token objective. For every
mapped algorithm and every ``loss_agg_mode`` we compare value and gradient w.r.t. the learner's
logprobs (torchtune-style numerical parity).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from tinker import types

from trinity.algorithms import (
    ALGORITHMS,
    AlgorithmSpec,
    DatumBatch,
    build_loss_plan,
    explorer_advantage_fn,
    reinforce_plus_plus_advantages,
    resolve_algorithm,
    token_scales,
)

MODES = ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]


# ----------------------------------------------------------------------------- references


def tinker_loss(loss_fn, lp_list, datums, config=None):
    """Tinker's built-in losses, token sums (as listed in trinity/engine/losses.py)."""
    config = config or {}
    total = torch.zeros(())
    for lp, datum in zip(lp_list, datums, strict=True):
        x = {k: v.to_torch().float() for k, v in datum.loss_fn_inputs.items()}
        if loss_fn == "cross_entropy":
            total = total - (x["weights"] * lp).sum()
            continue
        q, A = x["logprobs"], x["advantages"]
        r = torch.exp(lp - q)
        if loss_fn == "importance_sampling":
            total = total - (r * A).sum()
        elif loss_fn == "ppo":
            lo, hi = config.get("clip_low_threshold", 0.8), config.get("clip_high_threshold", 1.2)
            total = total - torch.minimum(r * A, torch.clamp(r, lo, hi) * A).sum()
        elif loss_fn == "cispo":
            lo, hi = config["clip_low_threshold"], config["clip_high_threshold"]
            total = total - (torch.clamp(r, lo, hi).detach() * lp * A).sum()
        else:
            raise AssertionError(loss_fn)
    return total


def verl_agg(per_token, masks, mode):
    """veRL agg_loss on a right-padded [N, L] batch (L = longest response)."""
    width = max(m.numel() for m in masks)
    loss = torch.stack([torch.nn.functional.pad(x, (0, width - x.numel())) for x in per_token])
    mask = torch.stack([torch.nn.functional.pad(m, (0, width - m.numel())) for m in masks])
    if mode == "token-mean":
        return (loss * mask).sum() / mask.sum()
    if mode == "seq-mean-token-sum":
        return (loss * mask).sum(-1).mean()
    if mode == "seq-mean-token-mean":
        return ((loss * mask).sum(-1) / mask.sum(-1)).mean()
    return (loss * mask).sum() / width


def original_ppo(lp, q, A, eps_low=0.2, eps_high=0.2, c=None):
    ratio = torch.exp(lp - q)
    loss = torch.max(-A * ratio, -A * torch.clamp(ratio, 1 - eps_low, 1 + eps_high))
    if c is not None:
        loss = torch.where(A < 0, torch.min(loss, -A * c), loss)
    return loss


def original_cispo(lp, q, A, eps_low=1.0, eps_high=0.28):
    ratio = torch.exp(lp - q)
    return -A * torch.clamp(ratio, 1 - eps_low, 1 + eps_high).detach() * lp


ORIGINAL = {
    "ppo": lambda lp, q, A: original_ppo(lp, q, A),
    "clip_higher": lambda lp, q, A: original_ppo(lp, q, A, 0.2, 0.28),
    "importance_sampling": lambda lp, q, A: -A * torch.exp(lp - q),
    "cispo": lambda lp, q, A: original_cispo(lp, q, A),
    "opmd": lambda lp, q, A: -A * lp,  # divided by (1 + tau) after aggregation, as the original
    "sft": lambda lp, q, A: -lp,
}


# ----------------------------------------------------------------------------- a batch


def make_batch(seed=0):
    """Three trajectories: prompt lengths 3, 1, 4; masked response tokens; mixed-sign A.

    Learner logprobs sit near the sampler's so some ratios fall inside the clip range and some
    outside (on both sides), with one token far above 3 for the dual clip.
    """
    g = torch.Generator().manual_seed(seed)
    specs = [(3, [1, 1, 0, 1], 1.3), (1, [1, 1, 1, 1, 0], -0.7), (4, [0, 1, 1], 0.4)]
    trajs = []
    for prompt_len, mask, adv in specs:
        n = len(mask)
        tokens = torch.randint(5, 100, (prompt_len + n,), generator=g).tolist()
        q = -torch.rand(n, generator=g) * 3 - 0.1
        lp_resp = q + torch.randn(n, generator=g) * 0.4
        lp_full = torch.cat([-torch.rand(prompt_len - 1, generator=g) * 5, lp_resp])
        trajs.append(
            SimpleNamespace(
                tokens=tokens,
                prompt_length=prompt_len,
                logprobs=q.tolist(),
                loss_mask=mask,
                advantages=[adv * m for m in mask],
                reward=adv,
                ref=(q + 0.3 * torch.randn(n, generator=g)).tolist(),
                lp_full=lp_full,
            )
        )
    trajs[1].lp_full[1] = trajs[1].logprobs[1] + 1.5  # ratio 4.5 on a negative-advantage token
    return trajs


def response(lp_full, traj):
    start = traj.prompt_length - 1
    return lp_full[start : start + len(traj.loss_mask)]


def datums_for(plan, trajs, with_ref=False):
    masks = [torch.tensor(t.loss_mask, dtype=torch.float32) for t in trajs]
    scales = token_scales(masks, plan.settings.loss_agg_mode)
    return [
        plan.to_datum(
            t.tokens,
            t.prompt_length,
            t.logprobs,
            t.loss_mask,
            t.advantages,
            t.ref if with_ref else None,
            scales[i],
        )[0]
        for i, t in enumerate(trajs)
    ]


def leaves(trajs):
    return [t.lp_full.clone().requires_grad_(True) for t in trajs]


def grads(loss, xs):
    return torch.autograd.grad(loss, xs, allow_unused=False)


def original_objective(kind, lps, trajs, mode, tau=1.0):
    per_token = [
        ORIGINAL[kind](response(lp, t), torch.tensor(t.logprobs), torch.tensor(t.advantages))
        for lp, t in zip(lps, trajs, strict=True)
    ]
    masks = [torch.tensor(t.loss_mask, dtype=torch.float32) for t in trajs]
    loss = verl_agg(per_token, masks, mode)
    return loss / (1 + tau) if kind == "opmd" else loss


# ----------------------------------------------------------------------------- parity


CASES = {
    # case: (algorithm config, reference objective, built-in expected)
    "grpo": ({"algorithm_type": "grpo", "kl_loss_fn": "none"}, "ppo", "ppo"),
    "grpo_clip_higher": (
        {
            "algorithm_type": "grpo",
            "kl_loss_fn_args": {"kl_coef": 0.0},
            "policy_loss_fn_args": {"clip_range_low": 0.2, "clip_range_high": 0.28},
        },
        "clip_higher",
        "ppo",
    ),
    "rloo": ({"algorithm_type": "rloo", "kl_loss_fn": "none"}, "ppo", "ppo"),
    "reinforceplusplus": (
        {"algorithm_type": "reinforceplusplus", "kl_loss_fn": "none"},
        "ppo",
        "ppo",
    ),
    "dapo": ({"algorithm_type": "dapo"}, "ppo", "ppo"),
    "importance_sampling": (
        {"algorithm_type": "grpo", "kl_loss_fn": "none", "policy_loss_fn": "importance_sampling"},
        "importance_sampling",
        "importance_sampling",
    ),
    "cispo": ({"algorithm_type": "cispo", "kl_loss_fn": "none"}, "cispo", "cispo"),
    "opmd": ({"algorithm_type": "opmd", "kl_loss_fn": "none"}, "opmd", "cross_entropy"),
    "asymre": ({"algorithm_type": "asymre"}, "opmd", "cross_entropy"),
    "sft": ({"algorithm_type": "sft"}, "sft", "cross_entropy"),
    "raft": ({"algorithm_type": "raft"}, "sft", "cross_entropy"),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", sorted(CASES))
def test_builtin_matches_original_objective(case, mode):
    config, kind, builtin = CASES[case]
    plan = build_loss_plan({**config, "loss_agg_mode": mode})
    assert plan.custom_loss is None and not plan.needs_reference
    assert plan.loss_fn == builtin
    trajs = make_batch()
    datums = datums_for(plan, trajs)

    lps = leaves(trajs)
    ours = tinker_loss(plan.loss_fn, lps, datums, plan.loss_fn_config)
    ours_grad = grads(ours, lps)
    lps2 = leaves(trajs)
    ref = original_objective(kind, lps2, trajs, mode)
    ref_grad = grads(ref, lps2)

    assert torch.allclose(ours, ref, atol=1e-5, rtol=1e-5), (float(ours), float(ref))
    for a, b in zip(ours_grad, ref_grad, strict=True):
        assert torch.allclose(a, b, atol=1e-6), (a, b)
    assert any(g.abs().sum() > 0 for g in ours_grad)


def test_opmd_tau_is_folded_into_weights():
    plan = build_loss_plan(
        {"algorithm_type": "opmd", "kl_loss_fn": "none", "policy_loss_fn_args": {"tau": 0.5}}
    )
    trajs = make_batch(1)
    lps, lps2 = leaves(trajs), leaves(trajs)
    ours = tinker_loss("cross_entropy", lps, datums_for(plan, trajs))
    ref = original_objective("opmd", lps2, trajs, "token-mean", tau=0.5)
    assert torch.allclose(ours, ref, atol=1e-6)
    for a, b in zip(grads(ours, lps), grads(ref, lps2), strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_ppo_thresholds_come_from_clip_ranges():
    plan = build_loss_plan(
        {
            "algorithm_type": "grpo",
            "kl_loss_fn": "none",
            "policy_loss_fn_args": {"clip_range_low": 0.1, "clip_range_high": 0.3},
        }
    )
    assert plan.loss_fn_config == pytest.approx(
        {"clip_low_threshold": 0.9, "clip_high_threshold": 1.3}
    )
    cispo = build_loss_plan({"algorithm_type": "cispo", "kl_loss_fn": "none"})
    assert cispo.loss_fn_config == pytest.approx(
        {"clip_low_threshold": 0.0, "clip_high_threshold": 1.28}
    )


# ----------------------------------------------------------------------------- custom path


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean"])
def test_custom_loss_matches_full_original_objective(mode):
    """PPO with dual clip + k2 KL loss + entropy bonus: value and gradient."""
    kl_coef, ent_coef, c = 0.05, 0.01, 3.0
    plan = build_loss_plan(
        {
            "algorithm_type": "grpo",
            "loss_agg_mode": mode,
            "policy_loss_fn_args": {"clip_range": 0.2, "clip_ratio_c": c},
            "kl_loss_fn": "k2",
            "kl_loss_fn_args": {"kl_coef": kl_coef},
            "entropy_loss_fn_args": {"entropy_coef": ent_coef},
        }
    )
    assert plan.custom_loss is not None and plan.needs_reference
    assert len(plan.custom_reasons) == 3
    trajs = make_batch()
    datums = datums_for(plan, trajs, with_ref=True)

    lps = leaves(trajs)
    loss, metrics = plan.custom_loss(datums, lps)
    ours_grad = grads(loss, lps)

    lps2 = leaves(trajs)
    masks = [torch.tensor(t.loss_mask, dtype=torch.float32) for t in trajs]
    resp = [response(lp, t) for lp, t in zip(lps2, trajs, strict=True)]
    pg = verl_agg(
        [
            original_ppo(x, torch.tensor(t.logprobs), torch.tensor(t.advantages), c=c)
            for x, t in zip(resp, trajs, strict=True)
        ],
        masks,
        mode,
    )
    kl = verl_agg(
        [0.5 * (x - torch.tensor(t.ref)) ** 2 for x, t in zip(resp, trajs, strict=True)],
        masks,
        mode,
    )
    # entropy estimate from sampled tokens: value -lp, gradient -lp * grad(lp)
    ent = verl_agg([-x.detach() - x.detach() * (x - x.detach()) for x in resp], masks, mode)
    ref = pg + kl_coef * kl - ent_coef * ent
    ref_grad = grads(ref, lps2)

    assert torch.allclose(loss, ref, atol=1e-6)
    for a, b in zip(ours_grad, ref_grad, strict=True):
        assert torch.allclose(a, b, atol=1e-6)
    # the dual clip must have been active: without it the objective differs
    no_dual = verl_agg(
        [
            original_ppo(x.detach(), torch.tensor(t.logprobs), torch.tensor(t.advantages))
            for x, t in zip(resp, trajs, strict=True)
        ],
        masks,
        mode,
    )
    assert not torch.allclose(pg.detach(), no_dual)
    assert metrics["pg_loss:sum"] == pytest.approx(float(pg.detach()), abs=1e-6)


def test_custom_loss_linearizes_through_the_sdk_recipe():
    """forward_backward_custom sends CE weights = -dL/dlp: that CE has the custom gradient."""
    from trinity.backends.base import custom_loss_as_weights

    plan = build_loss_plan({"algorithm_type": "grpo"})  # k2 KL loss, kl_coef 0.001 by default
    trajs = make_batch(2)
    datums = datums_for(plan, trajs, with_ref=True)
    linear, _, value = custom_loss_as_weights(datums, [t.lp_full for t in trajs], plan.custom_loss)
    lps = leaves(trajs)
    custom, _ = plan.custom_loss(datums, lps)
    lps2 = leaves(trajs)
    surrogate = tinker_loss("cross_entropy", lps2, linear)
    assert value == pytest.approx(float(custom.detach()), abs=1e-6)
    for a, b in zip(grads(custom, lps), grads(surrogate, lps2), strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_custom_loss_prompt_positions_stay_finite():
    plan = build_loss_plan({"algorithm_type": "grpo", "kl_loss_fn": "k3"})
    trajs = make_batch()
    for t in trajs:
        t.lp_full[: t.prompt_length - 1] = -200.0  # exp(ref - lp) would overflow there
    datums = datums_for(plan, trajs, with_ref=True)
    lps = leaves(trajs)
    loss, _ = plan.custom_loss(datums, lps)
    loss.backward()
    assert torch.isfinite(loss)
    for lp, t in zip(lps, trajs, strict=True):
        assert torch.isfinite(lp.grad).all()
        assert lp.grad[: t.prompt_length - 1].abs().sum() == 0


# ----------------------------------------------------------------------------- datum layout


@pytest.mark.parametrize("case", ["grpo", "opmd", "sft"])
def test_datum_layout(case):
    plan = build_loss_plan(CASES[case][0])
    tokens = [10, 11, 12, 13, 14, 15, 16]
    datum, info = plan.to_datum(
        tokens, 3, [-0.5, -1.0, -1.5, -2.0], [1, 0, 1, 1], [2.0, 2.0, 2.0, 2.0]
    )
    assert datum.model_input.to_ints() == tokens[:-1]
    x = {k: v.to_torch() for k, v in datum.loss_fn_inputs.items()}
    assert x["target_tokens"].tolist() == tokens[1:]
    assert x["target_tokens"].dtype == torch.int64
    for key, value in x.items():
        assert value.shape == (6,), key
    # input position i predicts target i: the first response token (13) is target 2
    assert x["target_tokens"][2] == tokens[3]
    keys = (
        {"target_tokens", "logprobs", "advantages"}
        if case == "grpo"
        else {"target_tokens", "weights"}
    )
    assert set(x) == keys
    if case == "grpo":
        assert x["logprobs"].tolist() == [0.0, 0.0, -0.5, 0.0, -1.5, -2.0]
        assert x["advantages"].tolist() == [0.0, 0.0, 2.0, 0.0, 2.0, 2.0]  # scale = mask (sum)
    elif case == "opmd":
        assert x["weights"].tolist() == [0.0, 0.0, 1.0, 0.0, 1.0, 1.0]  # A / (1 + tau)
    else:
        assert x["weights"].tolist() == [0.0, 0.0, 1.0, 0.0, 1.0, 1.0]
    assert info.mask.tolist() == [0.0, 0.0, 1.0, 0.0, 1.0, 1.0]


def test_custom_datum_carries_the_custom_inputs():
    plan = build_loss_plan({"algorithm_type": "grpo"})
    datum, _ = plan.to_datum([1, 2, 3, 4], 2, [-1.0, -2.0], [1, 1], [1.0, 1.0], [-1.5, -2.5])
    assert set(datum.loss_fn_inputs) == {
        "target_tokens",
        "weights",
        "logprobs",
        "advantages",
        "mask",
        "scale",
        "ref_logprobs",
    }
    assert datum.loss_fn_inputs["ref_logprobs"].to_torch().tolist() == [0.0, -1.5, -2.5]


def test_to_datum_validates():
    plan = build_loss_plan(CASES["grpo"][0])
    with pytest.raises(ValueError, match="prompt_length"):
        plan.to_datum([1, 2, 3], 0, [-1.0, -1.0, -1.0], [1, 1, 1], [1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="logprobs"):
        plan.to_datum([1, 2, 3], 1, [-1.0], [1, 1], [1.0, 1.0])
    with pytest.raises(ValueError, match="advantages"):
        plan.to_datum([1, 2, 3], 1, [-1.0, -1.0], [1, 1], None)
    sft = build_loss_plan({"algorithm_type": "sft"})
    datum, _ = sft.to_datum([1, 2, 3], 1, [], [1, 1], None)  # SFT needs neither
    assert datum.loss_fn_inputs["weights"].to_torch().tolist() == [1.0, 1.0]


# ----------------------------------------------------------------------------- to_datums


def test_to_datums_scales_over_the_batch():
    plan = build_loss_plan({"algorithm_type": "grpo", "kl_loss_fn": "none"})
    trajs = make_batch()
    datums = plan.to_datums(trajs)
    assert isinstance(datums, DatumBatch) and len(datums.infos) == 3
    # token-mean over 3 + 4 + 2 masked tokens
    adv = datums[0].loss_fn_inputs["advantages"].to_torch()
    assert adv[2].item() == pytest.approx(1.3 / 9)
    trajs[0].advantages = None
    with pytest.raises(ValueError, match="no advantages"):
        plan.to_datums(trajs)


def test_reinforce_plus_plus_advantages_computed_in_plan_with_kl_penalty():
    plan = build_loss_plan(
        {
            "algorithm_type": "reinforceplusplus",
            "kl_loss_fn": "none",
            "kl_penalty_fn": "k1",
            "kl_penalty_fn_args": {"kl_coef": 0.1},
        }
    )
    assert plan.needs_reference and plan.custom_loss is None and plan.loss_fn == "ppo"
    trajs = make_batch()
    for t in trajs:
        t.advantages = None  # the explorer's hook leaves them to the plan
    refs = [t.ref for t in trajs]
    assert plan.batch_advantages(trajs, refs)  # the trainer's step, before the datums
    datums = plan.to_datums(trajs, refs)
    masks = [torch.tensor(t.loss_mask, dtype=torch.float32) for t in trajs]
    kl = [torch.tensor(t.logprobs) - torch.tensor(t.ref) for t in trajs]
    expected, _ = reinforce_plus_plus_advantages(
        [t.reward for t in trajs], masks, kl=kl, kl_coef=0.1
    )
    scales = token_scales(masks, "token-mean")
    for t, d, e, s in zip(trajs, datums, expected, scales, strict=True):
        assert torch.allclose(torch.tensor(t.advantages), e, atol=1e-6)
        got = d.loss_fn_inputs["advantages"].to_torch()[t.prompt_length - 1 :]
        assert torch.allclose(got, e * s, atol=1e-6)


def test_to_datums_only_reads_the_experiences():
    plan = build_loss_plan({"algorithm_type": "reinforceplusplus", "kl_loss_fn": "none"})
    trajs = make_batch()
    given = [list(t.advantages) for t in trajs]
    datums = plan.to_datums(trajs)
    assert [t.advantages for t in trajs] == given  # no batch advantages written back
    got = datums[0].loss_fn_inputs["advantages"].to_torch()[trajs[0].prompt_length - 1 :]
    assert torch.allclose(got, torch.tensor(given[0]) / 9)  # token-mean over 9 masked tokens
    for t in trajs:
        t.advantages = None
    with pytest.raises(ValueError, match="no advantages"):
        plan.to_datums(trajs)
    assert all(t.advantages is None for t in trajs)


def test_batch_advantages_leave_group_advantages_alone():
    plan = build_loss_plan({"algorithm_type": "grpo", "kl_loss_fn": "none"})
    trajs = make_batch()
    given = [list(t.advantages) for t in trajs]
    assert not plan.batch_advantages(trajs, [t.ref for t in trajs])
    assert [t.advantages for t in trajs] == given


def test_batch_advantages_without_kl_penalty_ignore_the_reference():
    plan = build_loss_plan({"algorithm_type": "reinforceplusplus", "kl_loss_fn": "none"})
    trajs = make_batch()
    assert plan.batch_advantages(trajs, [t.ref for t in trajs])  # kl_penalty_fn none: no KL
    masks = [torch.tensor(t.loss_mask, dtype=torch.float32) for t in trajs]
    expected, _ = reinforce_plus_plus_advantages([t.reward for t in trajs], masks)
    for t, e in zip(trajs, expected, strict=True):
        assert torch.allclose(torch.tensor(t.advantages), e, atol=1e-6)


# ----------------------------------------------------------------------------- metrics


def fake_output(lps):
    return types.ForwardBackwardOutput(
        loss_fn_output_type="test",
        loss_fn_outputs=[{"logprobs": types.TensorData.from_torch(lp.detach())} for lp in lps],
        metrics={},
    )


def test_metrics_on_policy_and_clipped():
    plan = build_loss_plan({"algorithm_type": "grpo", "kl_loss_fn": "none"})
    trajs = make_batch()
    datums = plan.to_datums(trajs)
    # on-policy: ratio 1 everywhere
    on_policy = [
        torch.cat([t.lp_full[: t.prompt_length - 1], torch.tensor(t.logprobs)]) for t in trajs
    ]
    m = plan.metrics(datums, fake_output(on_policy))
    assert m["actor/pg_clipfrac"] == 0.0 and m["actor/ppo_kl"] == pytest.approx(0.0, abs=1e-7)
    expected_pg = -(3 * 1.3 + 4 * -0.7 + 2 * 0.4) / 9
    assert m["actor/pg_loss"] == pytest.approx(expected_pg, abs=1e-6)
    assert m["actor/final_loss"] == m["actor/pg_loss"]
    # off-policy: same numbers as the built-in loss and a hand count of clipped tokens
    lps = [t.lp_full for t in trajs]
    m = plan.metrics(datums, fake_output(lps))
    assert m["actor/pg_loss"] == pytest.approx(
        float(tinker_loss("ppo", lps, datums, plan.loss_fn_config)), abs=1e-6
    )
    clipped = tokens = 0
    kl_sum = 0.0
    for t in trajs:
        q, A = torch.tensor(t.logprobs), torch.tensor(t.advantages)
        r = torch.exp(response(t.lp_full, t) - q)
        mask = torch.tensor(t.loss_mask) == 1
        clipped += int(((-A * torch.clamp(r, 0.8, 1.2) > -A * r) & mask).sum())
        tokens += int(mask.sum())
        kl_sum += float(((q - response(t.lp_full, t)) * mask).sum())
    assert clipped > 0
    assert m["actor/pg_clipfrac"] == pytest.approx(clipped / tokens)
    assert m["actor/ppo_kl"] == pytest.approx(kl_sum / tokens, abs=1e-6)
    assert plan.metrics(datums, lps) == pytest.approx(m)  # plain logprob lists work too
    sft = build_loss_plan({"algorithm_type": "sft"})
    m = sft.metrics(sft.to_datums(trajs), lps)
    assert "actor/ppo_kl" not in m and "actor/pg_clipfrac" not in m
    masks = [torch.tensor(t.loss_mask, dtype=torch.float32) for t in trajs]
    nll = verl_agg([-response(t.lp_full, t) for t in trajs], masks, "token-mean")
    assert m["actor/pg_loss"] == pytest.approx(float(nll), abs=1e-6)


def test_metrics_custom_path_report_kl_and_final_loss():
    plan = build_loss_plan({"algorithm_type": "grpo", "kl_loss_fn_args": {"kl_coef": 0.1}})
    trajs = make_batch()
    datums = plan.to_datums(trajs, [t.ref for t in trajs])
    lps = [t.lp_full for t in trajs]
    loss, _ = plan.custom_loss(datums, [lp.clone().requires_grad_(True) for lp in lps])
    m = plan.metrics(datums, fake_output(lps))
    assert m["actor/final_loss"] == pytest.approx(float(loss.detach()), abs=1e-6)
    assert m["actor/final_loss"] == pytest.approx(m["actor/pg_loss"] + 0.1 * m["actor/kl_loss"])
    assert m["actor/kl_coef"] == 0.1 and m["actor/kl_loss"] > 0
    # metrics from bare datums (no side data) agree for custom datums
    m2 = plan.metrics(list(datums), fake_output(lps))
    assert m2["actor/final_loss"] == pytest.approx(m["actor/final_loss"], abs=1e-6)


def test_metrics_use_exact_entropy_when_the_learner_returns_it():
    plan = build_loss_plan(
        {
            "algorithm_type": "grpo",
            "kl_loss_fn": "none",
            "entropy_loss_fn_args": {"entropy_coef": 0.5},
        }
    )
    trajs = make_batch()
    datums = plan.to_datums(trajs)
    out = fake_output([t.lp_full for t in trajs])
    for o, t in zip(out.loss_fn_outputs, trajs, strict=True):
        o["entropy"] = types.TensorData.from_torch(torch.full_like(t.lp_full, 2.0))
    m = plan.metrics(datums, out)
    assert m["actor/entropy_loss"] == pytest.approx(2.0)  # token-mean of a constant
    assert m["actor/final_loss"] == pytest.approx(m["actor/pg_loss"] - 0.5 * 2.0)


# ----------------------------------------------------------------------------- registry / config


def test_resolve_defaults_follow_the_original():
    grpo = resolve_algorithm({"algorithm_type": "grpo"})
    assert grpo.repeat_times == 2 and grpo.advantage_fn == "grpo"
    assert grpo.kl_loss_fn == "k2" and grpo.kl_coef == 0.001
    assert grpo.policy_loss_fn_args == {"clip_range": 0.2}
    assert grpo.loss_agg_mode == "token-mean" and grpo.entropy_coef == 0.0
    opmd = resolve_algorithm(SimpleNamespace(algorithm_type="opmd", repeat_times=8))
    assert opmd.repeat_times == 8 and opmd.advantage_fn_args == {
        "opmd_baseline": "mean",
        "tau": 1.0,
    }
    assert resolve_algorithm({"algorithm_type": "dapo"}).repeat_times == 16
    assert set(ALGORITHMS.names()) >= {
        "grpo",
        "opmd",
        "sft",
        "rloo",
        "reinforceplusplus",
        "dapo",
        "cispo",
        "asymre",
        "raft",
    }
    with pytest.raises(KeyError, match="did you mean 'opmd'"):
        resolve_algorithm({"algorithm_type": "opmdd"})
    with pytest.raises(ValueError, match="adaptive"):
        resolve_algorithm({"algorithm_type": "grpo", "kl_loss_fn_args": {"adaptive": True}})


def test_reference_only_fetched_when_used():
    assert build_loss_plan({"algorithm_type": "grpo"}).needs_reference  # k2, 0.001
    seed_like = build_loss_plan({"algorithm_type": "grpo", "kl_loss_fn_args": {"kl_coef": 0.0}})
    assert not seed_like.needs_reference and seed_like.custom_loss is None
    assert not build_loss_plan(
        {"algorithm_type": "reinforceplusplus", "kl_loss_fn": "none"}
    ).needs_reference


def test_plugin_algorithm_and_explorer_hook():
    ALGORITHMS.register("test_rloo_opmd")(AlgorithmSpec("rloo", "opmd", kl_loss_fn="none"))
    plan = build_loss_plan({"algorithm_type": "test_rloo_opmd"})
    assert plan.loss_fn == "cross_entropy" and plan.custom_loss is None
    hook = explorer_advantage_fn({"algorithm_type": "test_rloo_opmd"})
    exps = [
        SimpleNamespace(group_id="g", task_id="g", reward=r, loss_mask=[1], advantages=None)
        for r in (3.0, 1.0)
    ]
    hook(exps)
    assert [e.advantages for e in exps] == [[2.0], [-2.0]]
    assert explorer_advantage_fn({"algorithm_type": "sft"})(exps) == {}
