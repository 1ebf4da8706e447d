"""MIX / CHORD parity: the loss plan's mixed loss == a direct computation of the original's
``(1 - mu) * agg(ppo on usual rows) + mu * agg(sft on expert rows)``, values and gradients.

The reference is written here from the definitions (veRL's ``agg_loss`` on a padded batch, the PPO
clipped surrogate, -log p and CHORD-phi), independently of ``trinity/algorithms/mix.py``.
"""

from __future__ import annotations

import math

import pytest
import torch

from tests.test_algorithms_losses import verl_agg
from trinity.algorithms import build_loss_plan, resolve_algorithm
from trinity.algorithms.mix import chord_mu
from trinity.workflows.types import Experience

MODES = ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean"]


def ppo(lp, q, A, eps=0.2):
    ratio = torch.exp(lp - q)
    return torch.max(-A * ratio, -A * torch.clamp(ratio, 1 - eps, 1 + eps))


def batch(step: int, seed: int = 0) -> list[Experience]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i, (prompt, n, expert) in enumerate(
        [(3, 4, False), (2, 6, False), (4, 3, True), (2, 5, True)]
    ):
        mask = [1] * n
        mask[-1] = 0 if i == 1 else 1  # one masked-out token
        rows.append(
            Experience(
                tokens=list(range(1, prompt + n + 1)),
                prompt_length=prompt,
                logprobs=[0.0] * n if expert else (-torch.rand(n, generator=g) - 0.1).tolist(),
                loss_mask=mask,
                reward=0.0,
                advantages=[0.0] * n if expert else [float(torch.randn((), generator=g))] * n,
                info={"expert_mask": expert, "step": step},
            )
        )
    return rows


def learner_logprobs(rows, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(-torch.rand(len(r.tokens) - 1, generator=g) * 2 - 0.05).requires_grad_() for r in rows]


def reference(rows, lps, mu, grpo_mode, sft_mode, phi):
    usual, expert = [], []
    for row, lp in zip(rows, lps, strict=True):
        lp_r = lp[row.prompt_length - 1 :]
        mask = torch.tensor(row.loss_mask, dtype=torch.float32)
        if row.info["expert_mask"]:
            p = torch.exp(lp_r).detach()
            expert.append(((-(p * (1 - p)) * lp_r) if phi else -lp_r, mask))
        else:
            q, A = torch.tensor(row.logprobs), torch.tensor(row.advantages)
            usual.append((ppo(lp_r, q, A), mask))
    l_rl = verl_agg([x for x, _ in usual], [m for _, m in usual], grpo_mode)
    l_sft = verl_agg([x for x, _ in expert], [m for _, m in expert], sft_mode)
    return (1 - mu) * l_rl + mu * l_sft


def plan_loss(algorithm, rows, lps):
    plan = build_loss_plan(algorithm)
    assert plan.custom_loss is not None and plan.needs_reference is False
    loss, _ = plan.custom_loss(plan.to_datums(rows), lps)
    return loss, plan


@pytest.mark.parametrize("grpo_mode", MODES)
@pytest.mark.parametrize("sft_mode", MODES)
def test_mix_loss_matches_the_direct_computation(grpo_mode, sft_mode):
    args = {"mu": 0.3, "grpo_loss_agg_mode": grpo_mode, "sft_loss_agg_mode": sft_mode}
    algorithm = {"algorithm_type": "mix", "kl_loss_fn": "none", "policy_loss_fn_args": args}
    rows = batch(step=5)
    lps, ref_lps = learner_logprobs(rows), learner_logprobs(rows)
    loss, _ = plan_loss(algorithm, rows, lps)
    expected = reference(rows, ref_lps, 0.3, grpo_mode, sft_mode, phi=False)
    torch.testing.assert_close(loss, expected)
    loss.backward()
    expected.backward()
    for got, want in zip(lps, ref_lps, strict=True):
        torch.testing.assert_close(got.grad, want.grad)
    assert any(float(g.abs().sum()) > 0 for g in (lps[2].grad, lps[3].grad))  # SFT rows train


@pytest.mark.parametrize("step", [0, 2, 4, 6, 9])
@pytest.mark.parametrize("phi", [True, False])
def test_chord_loss_follows_the_mu_schedule(step, phi):
    args = {
        "mu_warmup_steps": 4,
        "mu_decay_steps": 4,
        "mu_peak": 0.5,
        "mu_valley": 0.1,
        "enable_phi_function": phi,
    }
    algorithm = {"algorithm_type": "mix_chord", "kl_loss_fn": "none", "policy_loss_fn_args": args}
    rows = batch(step=step, seed=step)
    lps, ref_lps = learner_logprobs(rows), learner_logprobs(rows)
    loss, _ = plan_loss(algorithm, rows, lps)
    if step < 4:
        mu = step / 4 * 0.5
    elif step >= 8:
        mu = 0.1
    else:
        mu = 0.1 + 0.4 * 0.5 * (1 + math.cos(math.pi * (step - 4) / 4))
    expected = reference(rows, ref_lps, mu, "token-mean", "token-mean", phi)
    torch.testing.assert_close(loss, expected)
    loss.backward()
    expected.backward()
    for got, want in zip(lps, ref_lps, strict=True):
        torch.testing.assert_close(got.grad, want.grad)


def test_chord_mu_values_and_the_algorithm_defaults():
    args = {"mu_warmup_steps": 4, "mu_decay_steps": 4, "mu_peak": 0.5, "mu_valley": 0.1}
    assert [round(chord_mu(s, args), 6) for s in (0, 2, 4, 6, 8, 20)] == [
        0.0,
        0.25,
        0.5,
        0.3,
        0.1,
        0.1,
    ]
    for name in ("mix", "mix_chord"):
        settings = resolve_algorithm({"algorithm_type": name})
        assert (settings.advantage_fn, settings.policy_loss_fn) == ("grpo", name)
        assert (settings.sample_strategy, settings.entropy_loss_fn) == ("mix", "mix")
        assert settings.repeat_times == 8


def test_metrics_leave_sft_rows_out_of_ppo_kl():
    rows = batch(step=1)
    plan = build_loss_plan({"algorithm_type": "mix", "kl_loss_fn": "none"})
    datums = plan.to_datums(rows)
    lps = [
        torch.tensor([0.0] * (r.prompt_length - 1) + list(r.logprobs)) for r in rows
    ]  # the learner equals the sampler on the RL rows
    metrics = plan.metrics(datums, lps)
    assert metrics["actor/ppo_kl"] == pytest.approx(0.0, abs=1e-7)
