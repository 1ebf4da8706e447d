"""The original's remaining algorithm types: each new loss and advantage against a reference
written here from its formula (values and gradients, clip edges included), and the plan's path.

References take the response-aligned learner logprobs ``lp`` (a leaf per trajectory), the
sampler's ``q`` and the advantages ``A``; aggregation is veRL's ``agg_loss`` (``verl_agg``).
"""

from __future__ import annotations

import random

import pytest
import torch

from tests.test_algorithms_losses import (
    datums_for,
    grads,
    leaves,
    make_batch,
    response,
    verl_agg,
)
from trinity.algorithms import ALGORITHMS, build_loss_plan, compute_advantages
from trinity.algorithms.advantages import grpo_advantages, rec_advantages
from trinity.engine.losses import resolve_config, token_losses

# ----------------------------------------------------------------------------- references


def ref_gspo(lp, q, A, lo=3e-4, hi=4e-4):
    s = (lp - q).mean().detach()
    r = torch.exp(lp - lp.detach() + s)
    return torch.max(-A * r, -A * torch.clamp(r, 1 - lo, 1 + hi))


def ref_sapo(lp, q, A, tau_pos=1.0, tau_neg=1.05):
    r = torch.exp(lp - q).detach()
    out = []
    for i in range(lp.numel()):
        tau = tau_pos if A[i] > 0 else tau_neg
        f = 1 / (1 + torch.exp(-tau * (r[i] - 1))) * 4 / tau
        out.append(-A[i] * f * lp[i])
    return torch.stack(out)


def ref_topr(lp, q, A, threshold=0.0):
    r = torch.exp(lp - q).detach()
    alpha = torch.stack(
        [r[i].clamp(0, 1) if A[i] <= threshold else torch.tensor(1.0) for i in range(lp.numel())]
    )
    return -alpha * A * lp


def ref_sppo(lp, q, A, eps=0.3):
    r = torch.exp(lp - q).detach()
    inside = ((r >= 1 / (1 + eps)) & (r <= 1 + eps)).float()
    return -A * (lp - q) * inside


def ref_rec(lp, q, A, clip_mode="none", weight="none", regularizer="none", c=0.0, temp=1.0):
    el, eh, elp, ehp = 0.2, 0.2, 0.6, 2.0
    r = torch.exp(lp - q).detach()
    seq = torch.exp((lp - q).mean()).detach()
    keep = {
        "none": torch.ones_like(r),
        "two-side": ((r >= 1 - el) & (r <= 1 + eh)).float(),
        "one-side": (((A >= 0) & (r <= 1 + eh)) | ((A <= 0) & (r >= 1 - el))).float(),
        "gspo-one-side": (((A >= 0) & (seq <= 1 + eh)) | ((A <= 0) & (seq >= 1 - el))).float(),
        "ring": (
            ((r >= 1 - el) & (r <= 1 + eh))
            | ((A >= 0) & (r <= 1 - elp))
            | ((A <= 0) & (r >= 1 + ehp))
        ).float(),
    }[clip_mode]
    w = {
        "none": A,
        "importance_sampling": A * r,
        "gspo_importance_sampling": A * seq,
        "advantage": A * torch.exp(A / temp),
    }[weight]
    loss = -w * lp * keep
    if regularizer == "forward-kl":
        loss = loss - c * lp
    if regularizer == "k2":
        loss = loss + c * (lp - q) ** 2
    return loss


def reference(fn, lps, trajs, mode):
    """Aggregate ``fn(lp, q, A)`` over each trajectory's masked response tokens."""
    per_token, masks = [], []
    for lp, t in zip(lps, trajs, strict=True):
        m = torch.tensor(t.loss_mask, dtype=torch.float32)
        sel = m != 0
        x = response(lp, t)
        full = torch.zeros_like(x)
        full = full.masked_scatter(
            sel, fn(x[sel], torch.tensor(t.logprobs)[sel], torch.tensor(t.advantages)[sel])
        )
        per_token.append(full)
        masks.append(m)
    return verl_agg(per_token, masks, mode)


def edge_batch(seed=0):
    """make_batch with ratios pushed onto and across the clip edges: exactly 1 (inside GSPO's
    tiny band), 1 + 1e-4, 0.5, 0.74 (between SPPO's 1 - eps and 1 / (1 + eps)), 1.25 and 4.5,
    on tokens of both advantage signs."""
    trajs = make_batch(seed)
    for t, shifts in zip(
        trajs, ([0.0, 1e-4, 0.0, -0.69], [0.22, 1.5, -0.3, -0.69, 0.0], [0, 0.0, 0.22]), strict=True
    ):
        start = t.prompt_length - 1
        for k, d in enumerate(shifts):
            t.lp_full[start + k] = t.logprobs[k] + d
    return trajs


def run_plan(plan, trajs, with_ref=False):
    datums = datums_for(plan, trajs, with_ref)
    lps = leaves(trajs)
    if plan.custom_loss is not None:
        loss, _ = plan.custom_loss(datums, lps)
    else:
        loss = engine_builtin(plan, datums, lps)
    return loss, grads(loss, lps)


def engine_builtin(plan, datums, lps):
    """The engine's own built-in loss (trinity/engine/losses.py) over the plan's datums."""
    config = resolve_config(plan.loss_fn, plan.loss_fn_config)
    total = torch.zeros(())
    for datum, lp in zip(datums, lps, strict=True):
        inputs = {k: v.to_torch().float() for k, v in datum.loss_fn_inputs.items()}
        inputs["datum"] = torch.zeros(lp.numel(), dtype=torch.int64)
        total = total + token_losses(plan.loss_fn, lp, inputs, config).sum()
    return total


def check(loss, g, ref_fn, trajs, mode):
    lps = leaves(trajs)
    ref = reference(ref_fn, lps, trajs, mode)
    ref_g = grads(ref, lps)
    assert torch.allclose(loss, ref, atol=1e-6, rtol=1e-5), (float(loss), float(ref))
    for a, b in zip(g, ref_g, strict=True):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5), (a, b)
    assert any(x.abs().sum() > 0 for x in g)


# ----------------------------------------------------------------------------- losses

MODES = ["token-mean", "seq-mean-token-mean"]
A13 = float(torch.tensor(1.3))


@pytest.mark.parametrize("mode", MODES)
def test_gspo_is_the_builtin_gspo_with_the_original_defaults(mode):
    plan = build_loss_plan({"algorithm_type": "gspo", "kl_loss_fn": "none", "loss_agg_mode": mode})
    assert plan.custom_loss is None and plan.loss_fn == "gspo"
    assert plan.loss_fn_config == pytest.approx(
        {"clip_low_threshold": 1 - 3e-4, "clip_high_threshold": 1 + 4e-4}
    )
    trajs = edge_batch()
    loss, g = run_plan(plan, trajs)
    check(loss, g, ref_gspo, trajs, mode)


def test_a_user_clip_range_sets_both_sides_over_the_loss_defaults():
    """The original replaces the default args wholesale, so clip_range alone means both sides."""
    plan = build_loss_plan(
        {"algorithm_type": "gspo", "kl_loss_fn": "none", "policy_loss_fn_args": {"clip_range": 0.1}}
    )
    assert plan.loss_fn_config == pytest.approx(
        {"clip_low_threshold": 0.9, "clip_high_threshold": 1.1}
    )
    plan = build_loss_plan(
        {
            "algorithm_type": "gspo",
            "kl_loss_fn": "none",
            "policy_loss_fn_args": {"clip_range": 0.1, "clip_range_high": 0.3},
        }
    )
    assert plan.loss_fn_config == pytest.approx(
        {"clip_low_threshold": 0.9, "clip_high_threshold": 1.3}
    )


def test_gspo_clip_edges_bite():
    """Inside the band the gradient is the ratio's; outside (a sequence ratio above 1 + 4e-4 with
    A > 0) it is zero, as PPO's clip on the sequence ratio."""
    plan = build_loss_plan({"algorithm_type": "gspo", "kl_loss_fn": "none"})
    trajs = edge_batch()
    _, g = run_plan(plan, trajs)
    # trajectory 0 (A > 0): mean log-ratio (0 + 1e-4 - 0.69) / 3 < 0, ratio below the band, A > 0:
    # unclipped; trajectory 2 (A > 0): mean (0 + 0.22) / 2 > 4e-4: clipped, no gradient
    assert g[0].abs().sum() > 0
    assert g[2].abs().sum() == 0


@pytest.mark.parametrize(
    ("algorithm", "ref_fn", "args"),
    [
        ("sapo", ref_sapo, {}),
        ("sapo", lambda lp, q, A: ref_sapo(lp, q, A, 0.5, 2.0), {"tau_pos": 0.5, "tau_neg": 2.0}),
        ("topr", ref_topr, {}),
        ("topr", lambda lp, q, A: ref_topr(lp, q, A, 0.5), {"advantage_threshold": 0.5}),
        # a threshold equal to trajectory 0's advantage (1.3 in float32): A <= threshold
        ("topr", lambda lp, q, A: ref_topr(lp, q, A, A13), {"advantage_threshold": A13}),
        ("sppo", ref_sppo, {}),
        ("sppo", lambda lp, q, A: ref_sppo(lp, q, A, 0.1), {"epsilon": 0.1}),
    ],
)
@pytest.mark.parametrize("mode", MODES)
def test_custom_losses_match_their_formula(algorithm, ref_fn, args, mode):
    plan = build_loss_plan(
        {
            "algorithm_type": algorithm,
            "kl_loss_fn": "none",
            "loss_agg_mode": mode,
            "policy_loss_fn_args": args,
        }
    )
    assert plan.custom_loss is not None and plan.loss_fn == "cross_entropy"
    assert len(plan.custom_reasons) == 1 and not plan.needs_reference
    trajs = edge_batch()
    loss, g = run_plan(plan, trajs)
    check(loss, g, ref_fn, trajs, mode)


REC_CASES = [
    ({}, {}),
    ({"weight": "advantage", "temp": 0.5}, {"weight": "advantage", "temp": 0.5}),
    ({"clip_mode": "one-side"}, {"clip_mode": "one-side"}),
    (
        {"clip_mode": "two-side", "weight": "importance_sampling"},
        {"clip_mode": "two-side", "weight": "importance_sampling"},
    ),
    (
        {"clip_mode": "gspo-one-side", "weight": "gspo_importance_sampling"},
        {"clip_mode": "gspo-one-side", "weight": "gspo_importance_sampling"},
    ),
    ({"clip_mode": "ring"}, {"clip_mode": "ring"}),
    (
        {"regularizer": "forward-kl", "regularizer_coef": 0.1},
        {"regularizer": "forward-kl", "c": 0.1},
    ),
    ({"regularizer": "k2", "regularizer_coef": 0.1}, {"regularizer": "k2", "c": 0.1}),
]


@pytest.mark.parametrize(("args", "ref_args"), REC_CASES)
def test_rec_matches_its_formula_on_the_cheapest_path(args, ref_args):
    plan = build_loss_plan(
        {"algorithm_type": "rec", "kl_loss_fn": "none", "policy_loss_fn_args": args}
    )
    cheap = args.get("clip_mode", "none") == "none" and "regularizer" not in args
    assert (plan.custom_loss is None) == cheap
    if cheap:
        assert plan.loss_fn == "cross_entropy"
    trajs = edge_batch()
    loss, g = run_plan(plan, trajs)
    check(loss, g, lambda lp, q, A: ref_rec(lp, q, A, **ref_args), trajs, "token-mean")


def test_rec_clip_modes_drop_tokens():
    """The edge batch has tokens outside every window: each clip mode keeps fewer than none."""
    trajs = edge_batch()
    lps = leaves(trajs)
    full = reference(ref_rec, lps, trajs, "token-mean")
    for mode in ("one-side", "two-side", "ring"):
        clipped = reference(
            lambda lp, q, A, m=mode: ref_rec(lp, q, A, clip_mode=m), lps, trajs, "token-mean"
        )
        assert not torch.allclose(full, clipped)


def test_clip_edges_are_reached_by_the_edge_batch():
    """The edge batch puts ratios inside and outside each window (else the parity is vacuous)."""
    trajs = edge_batch()
    r = torch.cat(
        [
            torch.exp(response(t.lp_full, t) - torch.tensor(t.logprobs))[
                torch.tensor(t.loss_mask) != 0
            ]
            for t in trajs
        ]
    )
    assert (r > 1.3).any() and (r < 1 / 1.3).any() and ((r > 0.99) & (r < 1.01)).any()
    assert (r > 3.0).any()


# ----------------------------------------------------------------------------- DPO


def ref_dpo(lps, trajs, beta=0.1, ls=0.0):
    losses = []
    for i in range(0, len(trajs), 2):
        d = []
        for lp, t in ((lps[i], trajs[i]), (lps[i + 1], trajs[i + 1])):
            m = torch.tensor(t.loss_mask, dtype=torch.float32)
            d.append(((response(lp, t) - torch.tensor(t.ref)) * m).sum())
        x = beta * (d[0] - d[1])
        losses.append(-(1 - ls) * torch.log(torch.sigmoid(x)) - ls * torch.log(torch.sigmoid(-x)))
    return torch.stack(losses).mean()


@pytest.mark.parametrize(("beta", "ls"), [(0.1, 0.0), (0.5, 0.2)])
def test_dpo_matches_its_formula(beta, ls):
    plan = build_loss_plan(
        {
            "algorithm_type": "dpo",
            "kl_loss_fn": "none",
            "policy_loss_fn_args": {"beta": beta, "label_smoothing": ls},
        }
    )
    assert plan.custom_loss is not None and plan.needs_reference
    trajs = make_batch()
    trajs.append(make_batch(3)[0])  # four sequences: two pairs
    for t in trajs:
        t.logprobs = [0.0] * len(t.loss_mask)  # a dataset has no sampler logprobs
    datums = datums_for(plan, trajs, with_ref=True)
    lps = leaves(trajs)
    loss, metrics = plan.custom_loss(datums, lps)
    g = grads(loss, lps)
    lps2 = leaves(trajs)
    ref = ref_dpo(lps2, trajs, beta, ls)
    ref_g = grads(ref, lps2)
    assert torch.allclose(loss, ref, atol=1e-6)
    for a, b in zip(g, ref_g, strict=True):
        assert torch.allclose(a, b, atol=1e-6)
    margins = []
    for i in (0, 2):
        d = [
            float(
                (
                    (response(trajs[j].lp_full, trajs[j]) - torch.tensor(trajs[j].ref))
                    * torch.tensor(trajs[j].loss_mask)
                ).sum()
            )
            for j in (i, i + 1)
        ]
        margins.append(beta * (d[0] - d[1]))
    assert metrics["reward_margin:mean"] == pytest.approx(sum(margins) / 2, abs=1e-5)
    # the plan's metrics (from the learner's logprobs) report the same margin
    out = plan.metrics(datums, [t.lp_full for t in trajs])
    assert out["actor/reward_margin"] == pytest.approx(sum(margins) / 2, abs=1e-5)
    assert out["actor/pg_loss"] == pytest.approx(float(ref.detach()), abs=1e-6)


def test_dpo_with_the_original_k2_kl_adds_it():
    plan = build_loss_plan({"algorithm_type": "dpo"})
    assert plan.settings.kl_loss_fn == "k2" and plan.settings.kl_coef == 0.001
    trajs = make_batch()[:2]
    datums = datums_for(plan, trajs, with_ref=True)
    loss, metrics = plan.custom_loss(datums, leaves(trajs))
    assert metrics["kl_loss:sum"] > 0
    assert float(loss.detach()) == pytest.approx(
        metrics["pg_loss:sum"] + 0.001 * metrics["kl_loss:sum"]
    )


# ----------------------------------------------------------------------------- advantages


def test_rec_advantages():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 0.0])
    assert torch.allclose(rec_advantages(r), r - r.mean())
    normed = rec_advantages(r, std_normalize=True, epsilon=1e-6)
    assert torch.allclose(normed, (r - r.mean()) / (r.std(unbiased=False) + 1e-6))
    # balance: 4 negatives vs 2 positives -> 2 negatives dropped, stats over the kept 4
    a = rec_advantages(r, drop="balance", rng=random.Random(0))
    kept = a != 0
    assert int(kept.sum()) == 4 and bool(kept[0]) and bool(kept[4])
    mean = r[kept].mean()
    assert torch.allclose(a[kept], r[kept] - mean)
    assert float(mean) == 0.5
    assert float(rec_advantages(torch.tensor([3.0]))) == 0.0  # the original raises here


def test_rec_balance_draws_from_the_hook_rng():
    rewards = {"g": [1.0, 0.0, 0.0, 0.0, 0.0, 0.0]}
    first, _ = compute_advantages("rec", rewards, rng=random.Random(1), drop="balance")
    again, _ = compute_advantages("rec", rewards, rng=random.Random(1), drop="balance")
    assert torch.equal(first["g"], again["g"]) and int((first["g"] != 0).sum()) == 2


def test_grpo_verl_is_grpo():
    r = [1.0, 0.0, 0.5, 0.25]
    adv, _ = compute_advantages("grpo_verl", {"g": r})
    assert torch.allclose(adv["g"], grpo_advantages(r))


def test_new_algorithm_defaults_are_the_originals():
    expected = {
        "gspo": ("grpo", "gspo", "k2"),
        "sapo": ("grpo", "sapo", "k2"),
        "topr": ("reinforce", "topr", "k2"),
        "sppo": ("opmd", "sppo", "none"),
        "rec": ("rec", "rec", "k2"),
        "cpt": (None, "sft", "none"),
        "grpo_verl": ("grpo_verl", "ppo", "k2"),
        "dpo": (None, "dpo", "k2"),
    }
    for name, (adv, loss, kl) in expected.items():
        spec = ALGORITHMS.get(name)
        assert (spec.advantage_fn, spec.policy_loss_fn, spec.kl_loss_fn) == (adv, loss, kl), name
    assert ALGORITHMS.get("cpt").schema == "cpt" and ALGORITHMS.get("dpo").schema == "dpo"
