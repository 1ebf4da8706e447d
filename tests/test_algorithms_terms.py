"""KL estimators, entropy helpers, loss aggregation scales and lr schedules."""

from __future__ import annotations

import math

import pytest
import torch

from trinity.algorithms import (
    KL_FNS,
    LOSS_AGG_MODES,
    adam_params_fn,
    aggregate,
    entropy_from_logits,
    kl,
    lr_at,
    lr_factor,
    original_entropy_estimate,
    sampled_entropy,
    token_scales,
)


def test_kl_estimators_by_hand():
    lp, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-2.0, -2.0])
    assert torch.allclose(kl("k1", lp, ref), torch.tensor([1.0, 0.0]))
    assert torch.allclose(kl("k2", lp, ref), torch.tensor([0.5, 0.0]))
    assert torch.allclose(kl("k3", lp, ref), torch.tensor([math.exp(-1.0), 0.0]))
    assert torch.allclose(kl("low_var_kl", lp, ref), torch.tensor([math.exp(-1.0), 0.0]))
    assert torch.allclose(kl("abs", lp, ref), torch.tensor([1.0, 0.0]))
    assert torch.equal(kl("none", lp, ref), torch.zeros(2))
    assert torch.allclose(kl("corrected_k3", lp, ref, lp), kl("k3", lp, ref))
    with pytest.raises(ValueError):
        kl("corrected_k3", lp, ref)


def test_k3_is_unbiased_for_kl_and_low_var_is_clamped():
    # exact KL(p || r) equals E_p[k1] and E_p[k3]
    p = torch.softmax(torch.tensor([0.3, -1.0, 2.0]), 0)
    r = torch.softmax(torch.tensor([0.0, 0.5, 1.0]), 0)
    exact = (p * (p.log() - r.log())).sum()
    for name in ("k1", "k3"):
        assert torch.allclose((p * kl(name, p.log(), r.log())).sum(), exact, atol=1e-6)
    assert float(kl("low_var_kl", torch.tensor([-50.0]), torch.tensor([0.0]))) == 10.0
    assert float(kl("k3", torch.tensor([0.3]), torch.tensor([-4.0]))) >= 0


def test_k2_gradient_is_the_log_ratio():
    lp = torch.tensor([-0.5, -3.0], requires_grad=True)
    ref = torch.tensor([-1.0, -1.0])
    kl("k2", lp, ref).sum().backward()
    assert torch.allclose(lp.grad, lp.detach() - ref)


def test_kl_registry_lists_the_original_names():
    assert set(KL_FNS.names()) >= {"none", "k1", "k2", "k3", "low_var_kl", "abs", "corrected_k3"}


def test_sampled_entropy_is_unbiased_in_value_and_gradient():
    theta = torch.tensor([0.5, -1.0, 2.0, 0.0, 1.0], requires_grad=True)
    logp = torch.log_softmax(theta, 0)
    exact = entropy_from_logits(theta)
    (grad_exact,) = torch.autograd.grad(exact, theta, retain_graph=True)
    p = logp.exp().detach()  # expectation over y ~ pi with the sampling distribution held fixed
    estimate = (p * sampled_entropy(logp)).sum()
    (grad_est,) = torch.autograd.grad(estimate, theta)
    assert torch.allclose(estimate, exact, atol=1e-6)
    assert torch.allclose(grad_est, grad_exact, atol=1e-6)
    # the original's -p log p of the sampled token is not an entropy estimate
    assert not torch.allclose((p * original_entropy_estimate(logp)).sum(), exact, atol=1e-3)


def _batch():
    torch.manual_seed(0)
    masks = [
        torch.tensor([1.0, 1.0, 0.0, 1.0]),
        torch.tensor([1.0, 1.0]),
        torch.tensor([0.0, 1.0, 1.0, 1.0, 1.0, 1.0]),
    ]
    losses = [torch.randn(m.numel()) for m in masks]
    return losses, masks


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_token_scales_reproduce_aggregation(mode):
    losses, masks = _batch()
    scales = token_scales(masks, mode)
    summed = sum((s * x).sum() for s, x in zip(scales, losses, strict=True))
    assert torch.allclose(summed, aggregate(losses, masks, mode), atol=1e-6)


def test_token_scales_by_hand():
    _, masks = _batch()  # 3 + 2 + 5 masked tokens, lengths 4, 2, 6
    assert torch.allclose(token_scales(masks, "token-mean")[0], masks[0] / 10)
    assert torch.allclose(token_scales(masks, "seq-mean-token-sum")[1], masks[1] / 3)
    assert torch.allclose(token_scales(masks, "seq-mean-token-mean")[2], masks[2] / 15)
    assert torch.allclose(token_scales(masks, "seq-mean-token-sum-norm")[0], masks[0] / 6)
    assert torch.allclose(token_scales(masks, "seq-mean-token-sum-norm", 100)[0], masks[0] / 100)
    empty = token_scales([torch.zeros(3)], "seq-mean-token-mean")
    assert torch.equal(empty[0], torch.zeros(3))
    with pytest.raises(ValueError, match="loss_agg_mode"):
        token_scales(masks, "token-sum")


def test_lr_constant_with_warmup_from_min_ratio():
    kw = dict(scheduler="constant", num_warmup_steps=10, min_lr_ratio=0.1)
    assert lr_factor(0, **kw) == pytest.approx(0.1)
    assert lr_factor(5, **kw) == pytest.approx(0.55)
    assert lr_factor(10, **kw) == 1.0
    assert lr_factor(1000, **kw) == 1.0


def test_lr_cosine_decays_to_min_ratio():
    kw = dict(scheduler="cosine", total_steps=110, num_warmup_steps=10, min_lr_ratio=0.1)
    assert lr_factor(10, **kw) == pytest.approx(1.0)
    assert lr_factor(60, **kw) == pytest.approx(0.55)
    assert lr_factor(110, **kw) == pytest.approx(0.1)
    assert lr_factor(500, **kw) == pytest.approx(0.1)
    assert lr_factor(5, scheduler="cosine", total_steps=None) == 1.0  # unknown total: no decay


def test_lr_at_from_config_keys():
    # lr_warmup_steps = -1 -> ratio * total_steps = 10 warmup steps
    assert lr_at(
        5, 1e-5, total_steps=100, lr_warmup_steps_ratio=0.1, min_lr_ratio=0.0
    ) == pytest.approx(5e-6)
    assert lr_at(3, 1e-5, lr_warmup_steps=4, min_lr_ratio=0.0) == pytest.approx(7.5e-6)
    assert lr_at(7, 2e-5) == 2e-5
    with pytest.raises(ValueError):
        lr_at(1, 1e-5, scheduler="linear")


def test_adam_params_fn_from_optimizer_section():
    params = adam_params_fn(
        {
            "lr": 1e-5,
            "lr_warmup_steps": 10,
            "min_lr_ratio": 0.0,
            "lr_scheduler_type": "cosine",
            "betas": [0.9, 0.95],
            "weight_decay": 0.1,
        },
        total_steps=110,
        grad_clip=1.0,
    )
    p5, p60 = params(5), params(60)
    assert p5.learning_rate == pytest.approx(5e-6) and p60.learning_rate == pytest.approx(5e-6)
    assert (p5.beta1, p5.beta2, p5.weight_decay, p5.grad_clip_norm) == (0.9, 0.95, 0.1, 1.0)
    assert adam_params_fn({})(3).learning_rate == 1e-6  # the original's defaults: constant 1e-6
    with pytest.raises(ValueError):
        adam_params_fn({"warmup_style": "linear"})
