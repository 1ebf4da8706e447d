"""The trainer's step with a fake learner: batch advantages are set before the datums are built."""

from __future__ import annotations

import asyncio

import torch

from trinity.algorithms import (
    adam_params_fn,
    build_loss_plan,
    reinforce_plus_plus_advantages,
    token_scales,
)
from trinity.trainer.trainer import Trainer
from trinity.workflows.types import Experience


class FakeLearner:
    def __init__(self):
        self.datums = None

    async def forward_backward(self, datums, loss_fn, loss_fn_config):
        self.datums = datums
        return [torch.zeros(len(d.model_input.to_ints())) for d in datums]

    async def optim_step(self, params):
        return {}


class FakeReference:
    """Base-model logprobs: -0.5 on every token (full sequence, as the sampler returns them)."""

    async def compute_logprobs(self, tokens):
        return [-0.5] * len(tokens)


def test_train_step_sets_reinforce_plus_plus_advantages_before_the_datums(tmp_path):
    plan = build_loss_plan(
        {
            "algorithm_type": "reinforceplusplus",
            "kl_loss_fn": "none",
            "kl_penalty_fn": "k1",
            "kl_penalty_fn_args": {"kl_coef": 0.1},
        }
    )
    batch = [
        Experience([1, 2, 3, 4, 5], 2, [-1.0, -2.0, -0.1], [1, 1, 1], reward=1.0, group_id="a"),
        Experience([1, 2, 6, 7], 2, [-0.3, -0.7], [1, 0], reward=0.0, group_id="a"),
    ]
    learner = FakeLearner()
    trainer = Trainer(
        backend=learner,
        plan=plan,
        buffer=None,
        synchronizer=None,
        monitor=None,
        job_dir=tmp_path,
        train_batch_size=2,
        adam_params=adam_params_fn({}),
        ref_sampler=FakeReference(),
    )
    metrics = asyncio.run(trainer.train_step(1, batch))

    masks = [torch.tensor(exp.loss_mask, dtype=torch.float32) for exp in batch]
    kl = [torch.tensor(exp.logprobs) + 0.5 for exp in batch]
    expected, _ = reinforce_plus_plus_advantages([1.0, 0.0], masks, kl=kl, kl_coef=0.1)
    scales = token_scales(masks, "token-mean")
    for exp, datum, want, s in zip(batch, learner.datums, expected, scales, strict=True):
        assert torch.allclose(torch.tensor(exp.advantages), want, atol=1e-6)
        got = datum.loss_fn_inputs["advantages"].to_torch()[exp.prompt_length - 1 :]
        assert torch.allclose(got, want * s, atol=1e-6)
    trained = torch.cat([a[m != 0] for a, m in zip(expected, masks, strict=True)])
    assert abs(metrics["critic/advantages/mean"] - float(trained.mean())) < 1e-6
