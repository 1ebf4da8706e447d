"""Advantage functions against hand-computed values, the explorer hook, the trainer's batch step."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from trinity.algorithms import (
    ADVANTAGE_FNS,
    asymre_advantages,
    compute_advantages,
    group_advantage_fn,
    grpo_advantages,
    opmd_advantages,
    reinforce_plus_plus_advantages,
    rloo_advantages,
    set_batch_advantages,
)


def close(actual, expected, tol=1e-5):
    expected = torch.as_tensor(expected, dtype=torch.float32)
    assert torch.allclose(torch.as_tensor(actual), expected, atol=tol), (
        actual,
        expected,
    )


def test_grpo_normalizes_by_unbiased_std():
    # mean 0.5, unbiased std sqrt(1/3)
    a = 0.5 / (math.sqrt(1 / 3) + 1e-6)
    close(grpo_advantages([1.0, 0.0, 0.0, 1.0]), [a, -a, -a, a])


def test_grpo_lone_sample_keeps_reward():
    close(grpo_advantages([0.7]), [0.7])


def test_grpo_equal_rewards_give_zero():
    close(grpo_advantages([1.0, 1.0, 1.0]), [0.0, 0.0, 0.0])
    # -0.1 is not exact in float32: mean - r leaves ~1e-9, which (std + eps) used to blow up
    # to a constant 0.0074 advantage on every response of the group.
    assert grpo_advantages([-0.1] * 8).abs().max().item() == 0.0


def test_opmd_mean_and_logavgexp_baselines():
    close(opmd_advantages([1.0, 0.0, 0.0]), [2 / 3, -1 / 3, -1 / 3])
    b = math.log((math.e + 1) / 2)  # tau = 1
    close(opmd_advantages([1.0, 0.0], opmd_baseline="logavgexp"), [1 - b, -b])
    b2 = 0.5 * math.log((math.exp(2.0) + 1) / 2)  # tau = 0.5
    close(opmd_advantages([1.0, 0.0], opmd_baseline="logavgexp", tau=0.5), [1 - b2, -b2])
    close(opmd_advantages([0.3]), [0.3])
    with pytest.raises(ValueError):
        opmd_advantages([1.0, 0.0], opmd_baseline="median")


def test_rloo_leave_one_out():
    close(rloo_advantages([1.0, 0.0, 0.0, 1.0]), [2 / 3, -2 / 3, -2 / 3, 2 / 3])
    close(rloo_advantages([3.0, 1.0]), [2.0, -2.0])
    close(rloo_advantages([0.4]), [0.4])


def test_asymre_shifted_baseline():
    close(asymre_advantages([1.0, 0.0]), [0.6, -0.4])
    close(asymre_advantages([1.0, 0.0], baseline_shift=0.2), [0.3, -0.7])


def test_compute_advantages_dispatch_and_std_threshold():
    groups = {"a": [1.0, 1.0], "b": [1.0, 0.0], "c": [1.0]}
    adv, metrics = compute_advantages("grpo", groups)
    assert set(adv) == {"a", "b", "c"}
    adv, metrics = compute_advantages("grpo", groups, std_threshold=0.0)
    assert set(adv) == {"b"}
    assert metrics["group_advantages/filtered_count"] == 3.0
    close(metrics["group_advantages/reward_mean"], (1.0 + 0.5 + 1.0) / 3)
    adv, _ = compute_advantages("opmd", {"x": [1.0, 0.0]}, opmd_baseline="mean")
    close(adv["x"], [0.5, -0.5])
    adv, _ = compute_advantages("dapo", {"x": [1.0, 0.0]})  # an algorithm name: its advantage_fn
    close(adv["x"], grpo_advantages([1.0, 0.0]))
    with pytest.raises(KeyError, match="did you mean 'grpo'"):
        compute_advantages("grpoo", groups)


def test_plugins_can_register_advantage_fns():
    ADVANTAGE_FNS.register("test_double")(lambda r: torch.as_tensor(r) * 2)
    adv, _ = compute_advantages("test_double", {"g": [1.0, 2.0]})
    close(adv["g"], [2.0, 4.0])


def test_reinforce_plus_plus_whitens_over_batch_tokens():
    masks = [torch.ones(3), torch.ones(2)]
    adv, ret = reinforce_plus_plus_advantages([1.0, 0.0], masks)
    close(ret[0], [1.0, 1.0, 1.0])
    close(ret[1], [0.0, 0.0])
    # mean 0.6, unbiased var 1.2 / 4 = 0.3
    std = math.sqrt(0.3 + 1e-8)
    close(adv[0], [0.4 / std] * 3)
    close(adv[1], [-0.6 / std] * 2)


def test_reinforce_plus_plus_kl_penalty_discount_and_mask():
    _, ret = reinforce_plus_plus_advantages(
        [1.0], [torch.ones(2)], kl=[torch.tensor([0.1, 0.2])], kl_coef=0.5
    )
    close(ret[0], [0.85, 0.9])  # token rewards [-0.05, -0.1 + 1]
    _, ret = reinforce_plus_plus_advantages([1.0], [torch.ones(3)], gamma=0.5)
    close(ret[0], [0.25, 0.5, 1.0])
    # a masked token gets no KL penalty and no advantage, and is left out of the whitening
    adv, ret = reinforce_plus_plus_advantages(
        [1.0, 0.0],
        [torch.tensor([1.0, 0.0, 1.0]), torch.tensor([1.0])],
        kl=[torch.tensor([0.0, 5.0, 0.0]), torch.tensor([0.0])],
        kl_coef=1.0,
    )
    close(ret[0], [1.0, 1.0, 1.0])
    assert adv[0][1] == 0.0
    flat = torch.cat([adv[0][[0, 2]], adv[1]])
    close(flat.mean(), 0.0)
    close(flat.std(), 1.0, tol=1e-4)


def _exp(group, reward, mask=(1, 1, 0)):
    return SimpleNamespace(
        group_id=group, task_id=group, reward=reward, loss_mask=list(mask), advantages=None
    )


def test_group_advantage_fn_sets_token_advantages_in_place():
    exps = [_exp("a", 1.0), _exp("a", 0.0), _exp("b", 1.0), _exp("b", 1.0)]
    hook = group_advantage_fn("grpo", {"epsilon": 1e-6})
    metrics = hook(exps)
    a = 0.5 / (math.sqrt(0.5) + 1e-6)
    close(exps[0].advantages, [a, a, 0.0])
    close(exps[1].advantages, [-a, -a, 0.0])
    close(exps[2].advantages, [0.0, 0.0, 0.0])
    assert "group_advantages/reward_mean" in metrics


def test_group_advantage_fn_filters_and_duplicates():
    exps = [_exp("a", 1.0), _exp("a", 0.0), _exp("b", 1.0), _exp("b", 1.0)]
    group_advantage_fn("grpo", {"std_threshold": 0.0})(exps)
    assert [e.group_id for e in exps] == ["a", "a"]
    exps = [_exp("a", 1.0), _exp("a", 0.0), _exp("b", 1.0), _exp("b", 1.0)]
    group_advantage_fn("grpo", {"std_threshold": 0.0, "duplicate_experiences": True}, seed=0)(exps)
    assert len(exps) == 4 and [e.group_id for e in exps] == ["a"] * 4
    assert exps[2] is not exps[0]  # copies, not aliases


def test_group_advantage_fn_leaves_batch_level_to_the_plan():
    exps = [_exp("a", 1.0)]
    assert group_advantage_fn("reinforceplusplus")(exps) == {}
    assert exps[0].advantages is None


def test_set_batch_advantages_writes_the_batch_function_result():
    exps = [
        SimpleNamespace(
            reward=1.0, loss_mask=[1, 1, 0], logprobs=[-1.0, -2.0, -3.0], advantages=None
        ),
        SimpleNamespace(reward=0.0, loss_mask=[1, 1], logprobs=[-0.5, -0.5], advantages=None),
    ]
    refs = [[-1.5, -1.0, -3.0], [-0.5, -1.0]]
    masks = [torch.tensor(e.loss_mask, dtype=torch.float32) for e in exps]
    kl = [torch.tensor(e.logprobs) - torch.tensor(r) for e, r in zip(exps, refs, strict=True)]
    expected, _ = reinforce_plus_plus_advantages([1.0, 0.0], masks, kl=kl, kl_coef=0.1, gamma=0.9)
    returned = set_batch_advantages(
        exps, "reinforceplusplus", {"gamma": 0.9}, refs, kl_penalty_fn="k1", kl_coef=0.1
    )
    for exp, got, want in zip(exps, returned, expected, strict=True):
        assert torch.allclose(got, want)
        assert exp.advantages == pytest.approx(want.tolist())
    assert exps[0].advantages[2] == 0.0  # masked token
