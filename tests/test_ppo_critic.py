"""PPO with a learned critic: GAE and the clipped value loss against references written from the
formulas, the value model learning on a fixed batch, ``algorithm_type: ppo`` end to end on both
backends, and the original's ppo config section."""

from __future__ import annotations

import asyncio
import math

import pytest
import torch
import yaml

from trinity.algorithms import adam_params_fn, clipped_value_loss, gae_advantages, resolve_algorithm
from trinity.algorithms.aggregation import aggregate, token_scales
from trinity.config import load_config
from trinity.config.critic import critic_config
from trinity.engine import LoraSpec
from trinity.engine.value_head import ValueModel
from trinity.monitor import read_metrics
from trinity.trainer.critic import Critic
from trinity.workflows.types import Experience

# ---- GAE ---------------------------------------------------------------------------------------


def reference_gae(rewards, masks, values, gamma, lam, kl=None, kl_coef=0.0):
    """From the definitions: A_t = sum_l (gamma lam)^l delta_{t+l}, whitened over the batch."""
    raw, rets = [], []
    for i, (reward, m) in enumerate(zip(rewards, masks, strict=True)):
        n = len(m)
        v = [values[i][t] * m[t] for t in range(n)]
        r = [(-kl_coef * kl[i][t] * m[t] if kl else 0.0) for t in range(n)]
        r[-1] += reward
        delta = [r[t] + gamma * (v[t + 1] if t + 1 < n else 0.0) - v[t] for t in range(n)]
        adv = [sum((gamma * lam) ** k * delta[t + k] for k in range(n - t)) for t in range(n)]
        raw.append(adv)
        rets.append([a + b for a, b in zip(adv, v, strict=True)])
    flat = [a for adv, m in zip(raw, masks, strict=True) for a, k in zip(adv, m, strict=True) if k]
    mean = sum(flat) / len(flat)
    var = sum((a - mean) ** 2 for a in flat) / (len(flat) - 1)
    whitened = [
        [(a - mean) / math.sqrt(var + 1e-8) * k for a, k in zip(adv, m, strict=True)]
        for adv, m in zip(raw, masks, strict=True)
    ]
    return whitened, rets


@pytest.mark.parametrize(
    ("gamma", "lam"), [(1.0, 1.0), (0.9, 0.95), (1.0, 0.0), (0.0, 0.7), (0.5, 1.0)]
)
@pytest.mark.parametrize("with_kl", [False, True])
def test_gae_equals_the_definition(gamma, lam, with_kl):
    gen = torch.Generator().manual_seed(1)
    lengths = [5, 3, 7, 1]
    masks = [[1, 1, 0, 0, 1], [1, 1, 1], [1, 0, 1, 1, 1, 1, 1], [1]]
    rewards = [1.0, -0.5, 0.25, 2.0]
    values = [torch.randn(n, generator=gen).tolist() for n in lengths]
    kl = [torch.rand(n, generator=gen).tolist() for n in lengths] if with_kl else None
    kl_coef = 0.1 if with_kl else 0.0
    advantages, returns = gae_advantages(
        rewards,
        masks,
        values,
        kl=[torch.tensor(x) for x in kl] if kl else None,
        kl_coef=kl_coef,
        gamma=gamma,
        lam=lam,
    )
    want_adv, want_ret = reference_gae(rewards, masks, values, gamma, lam, kl, kl_coef)
    for got, want in zip(advantages, want_adv, strict=True):
        assert got.tolist() == pytest.approx(want, abs=1e-5)
    for got, want in zip(returns, want_ret, strict=True):
        assert got.tolist() == pytest.approx(want, abs=1e-5)


def test_gae_edges_by_hand():
    # gamma = lam = 1: the raw advantage is the Monte-Carlo return minus the value
    values = [[0.5, 0.25, -1.0]]
    _, returns = gae_advantages([2.0], [[1, 1, 1]], values, gamma=1.0, lam=1.0)
    assert returns[0].tolist() == pytest.approx([2.0, 2.0, 2.0])  # R = A + V = sum of rewards
    # lam = 0: one-step TD, R_t = r_t + gamma V_{t+1}
    _, returns = gae_advantages([2.0], [[1, 1, 1]], values, gamma=0.5, lam=0.0)
    assert returns[0].tolist() == pytest.approx([0.125, -0.5, 2.0])
    with pytest.raises(ValueError, match="critic's values"):
        gae_advantages([1.0], [[1]])


# ---- the clipped value loss --------------------------------------------------------------------


def reference_value_loss(vpreds, old, returns, masks, c, mode):
    """veRL's compute_value_loss on a padded batch: clip_by_value = max(min(x, hi), lo)."""
    losses = []
    for v, o, r in zip(vpreds, old, returns, strict=True):
        clipped = torch.max(torch.min(v, o + c), o - c)
        losses.append(torch.max((v - r) ** 2, (clipped - r) ** 2))
    return 0.5 * aggregate(losses, masks, mode)


@pytest.mark.parametrize("c", [0.0, 0.05, 0.2, 100.0])
@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_clipped_value_loss_equals_the_reference(c, mode):
    gen = torch.Generator().manual_seed(3)
    lengths, masks = [4, 2, 5], [[1, 1, 0, 1], [1, 1], [0, 1, 1, 1, 1]]
    old = [torch.randn(n, generator=gen) for n in lengths]
    # distinct from old everywhere, so no point sits on a clip boundary or a tie
    vpreds = [
        (o + 0.3 * torch.randn(n, generator=gen) + 0.011).requires_grad_(True)
        for o, n in zip(old, lengths, strict=True)
    ]
    returns = [torch.randn(n, generator=gen) for n in lengths]
    scales = token_scales(masks, mode)
    got = sum(
        clipped_value_loss(v, o, r, s, c)[0]
        for v, o, r, s in zip(vpreds, old, returns, scales, strict=True)
    )
    grads_got = torch.autograd.grad(got, vpreds)
    ref_inputs = [v.detach().clone().requires_grad_(True) for v in vpreds]
    want = reference_value_loss(ref_inputs, old, returns, masks, c, mode)
    grads_want = torch.autograd.grad(want, ref_inputs)
    assert float(got.detach()) == pytest.approx(float(want.detach()), rel=1e-6)
    for a, b in zip(grads_got, grads_want, strict=True):
        assert torch.allclose(a, b, atol=1e-7)
    if c == 0.0:  # every prediction is clipped back to V_old: only the unclipped side moves
        for v, o, r, g, m in zip(vpreds, old, returns, grads_got, masks, strict=True):
            keep = ((v - r) ** 2 < (o - r) ** 2) & torch.tensor(m, dtype=torch.bool)
            assert bool((g[keep] == 0).all())


def test_value_loss_at_a_tie_has_the_squared_error_gradient():
    """On the first pass V == V_old: the loss and its gradient are the plain 0.5 (V - R)^2."""
    v = torch.tensor([0.3, -1.0, 2.0], requires_grad=True)
    r = torch.tensor([1.0, -1.5, 0.0])
    scale = torch.full((3,), 1 / 3)
    loss, clipped = clipped_value_loss(v, v.detach().clone(), r, scale, 0.2)
    (grad,) = torch.autograd.grad(loss, v)
    assert float(loss.detach()) == pytest.approx(float(0.5 * ((v.detach() - r) ** 2).mean()))
    assert grad.tolist() == pytest.approx(((v - r) / 3).tolist())
    assert clipped.sum() == 0


# ---- the value model ---------------------------------------------------------------------------


def fixed_batch() -> list[Experience]:
    def exp(tokens, prompt, reward, mask=None):
        n = len(tokens) - prompt
        return Experience(tokens, prompt, [-0.5] * n, mask or [1] * n, reward=reward)

    return [
        exp([1, 5, 9, 14, 22, 30], 2, 1.0),
        exp([2, 6, 11, 40, 41], 3, 0.0),
        exp([3, 7, 70, 71, 72, 73, 74], 2, 1.0, [1, 1, 0, 1, 1]),
        exp([4, 8, 80], 2, -1.0),
    ]


@pytest.mark.parametrize("lora", [LoraSpec(rank=4, seed=0), None], ids=["lora", "full"])
def test_value_loss_falls_on_a_fixed_batch(tiny_model_dir, lora):
    model = ValueModel(tiny_model_dir, lora, device="cpu", dtype=torch.float32, seed=0)
    algorithm = resolve_algorithm({"algorithm_type": "ppo"})
    critic = Critic(model, algorithm, adam_params_fn({"lr": 1e-2}), cliprange_value=0.5)
    batch = fixed_batch()

    async def steps(n):
        losses = []
        for step in range(1, n + 1):
            values = await critic.values(batch)
            returns = critic.set_advantages(batch, values)
            metrics = await critic.update(step, batch, values, returns)
            losses.append(metrics["critic/vf_loss"])
        return losses, metrics

    losses, metrics = asyncio.run(steps(12))
    assert losses[-1] < 0.2 * losses[0], losses
    assert {"critic/vf_clipfrac", "critic/values/mean", "critic/returns/mean"} <= set(metrics)
    # values: one per response token, read at the position before each token
    values = model.values(batch)
    assert [len(v) for v in values] == [e.response_length for e in batch]
    assert all(len(e.advantages) == e.response_length for e in batch)


def test_value_model_state_round_trips(tiny_model_dir, tmp_path):
    kwargs = dict(device="cpu", dtype=torch.float32, seed=0)
    model = ValueModel(tiny_model_dir, LoraSpec(rank=4, seed=0), **kwargs)
    critic = Critic(
        model, resolve_algorithm({"algorithm_type": "ppo"}), adam_params_fn({"lr": 1e-2})
    )
    batch = fixed_batch()

    async def train_and_save():
        values = await critic.values(batch)
        await critic.update(1, batch, values, critic.set_advantages(batch, values))
        await critic.save(tmp_path / "critic")

    asyncio.run(train_and_save())
    other = ValueModel(tiny_model_dir, LoraSpec(rank=4, seed=1), **{**kwargs, "seed": 5})
    assert not torch.allclose(torch.cat(other.values(batch)), torch.cat(model.values(batch)))
    other.load_state(tmp_path / "critic")
    assert torch.allclose(torch.cat(other.values(batch)), torch.cat(model.values(batch)))
    assert other.optimizer.steps == 1


# ---- config ------------------------------------------------------------------------------------

ORIGINAL_PPO = """
project: Trinity-RFT-ppo
name: qwen-ppo
checkpoint_root_dir: {root}
algorithm:
  algorithm_type: ppo
  repeat_times: 1
  advantage_fn_args:
    gamma: 1.0
    lam: 1.0
  optimizer:
    lr: 1e-6
model:
  model_path: demo
  max_response_tokens: 16
  max_model_len: 144
buffer:
  batch_size: 4
  total_epochs: 1
  explorer_input:
    taskset:
      path: builtin:arithmetic
    default_workflow_type: math_workflow
trainer:
  critic_warmup: 0
  trainer_config:
    critic:
      ppo_micro_batch_size_per_gpu: 8
      cliprange_value: 0.5
      ppo_epochs: 1
      optim:
        lr: 1e-5
        lr_warmup_steps_ratio: 0.0
        weight_decay: 0.01
    algorithm:
      gamma: 1.0
"""


def test_the_originals_ppo_section_loads(tmp_path, caplog):
    config = load_config(_write(tmp_path, ORIGINAL_PPO.format(root=tmp_path)))
    settings = resolve_algorithm(config.algorithm)
    assert (settings.advantage_fn, settings.policy_loss_fn) == ("ppo", "ppo")
    assert settings.use_critic and settings.repeat_times == 1
    assert settings.advantage_fn_args == {"gamma": 1.0, "lam": 1.0}
    critic = critic_config(config.trainer.trainer_config)
    assert (critic.optim.lr, critic.cliprange_value, critic.ppo_epochs) == (1e-5, 0.5, 1)
    assert config.model.critic_model_path == "demo"  # defaults to model_path
    warning = " ".join(r.getMessage() for r in caplog.records)
    assert "trainer.trainer_config.critic.ppo_micro_batch_size_per_gpu" in warning
    assert "trainer.trainer_config.algorithm" in warning
    assert "critic.cliprange_value" not in warning and "critic.optim.lr" not in warning


def test_a_hosted_policy_takes_a_local_critic(tmp_path, tiny_model_dir):
    """The refusal (tests/configs/broken/ppo_critic_on_hosted_tinker.yaml) names its way out."""
    text = ORIGINAL_PPO.format(root=tmp_path).replace(
        "  model_path: demo\n",
        f"  model_path: Qwen/Qwen3-4B-Instruct-2507\n  critic_model_path: {tiny_model_dir}\n"
        "  tinker:\n    enable: true\n",
    )
    config = load_config(_write(tmp_path, text))
    assert config.model.tinker.enable and config.model.critic_model_path == str(tiny_model_dir)


def test_ppo_defaults():
    settings = resolve_algorithm({"algorithm_type": "ppo"})
    assert settings.advantage_fn_args == {"gamma": 1.0, "lam": 1.0}
    critic = critic_config({})
    assert (critic.optim.lr, critic.optim.weight_decay, critic.cliprange_value) == (1e-6, 0.01, 0.5)
    assert (critic.ppo_epochs, critic.loss_agg_mode, critic.grad_clip) == (1, "token-mean", None)


def _write(tmp_path, text):
    path = tmp_path / "ppo.yaml"
    path.write_text(text)
    return path


# ---- end to end --------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["local", "tinker"])
def test_ppo_runs_steps_on_both_backends(tmp_path, tiny_model_dir, backend):
    from test_rl_loop import backend_model, job_dir, run_cli, write_config

    base = yaml.safe_load(write_config(tmp_path, tiny_model_dir).read_text())
    config = write_config(
        tmp_path,
        tiny_model_dir,
        model=backend_model(tmp_path, tiny_model_dir, backend),
        algorithm={"algorithm_type": "ppo", "repeat_times": 2, "optimizer": {"lr": 1e-3}},
        buffer={**base["buffer"], "total_steps": 2},
        trainer={
            "save_interval": 1,
            "critic_warmup": 2,
            "trainer_config": {"critic": {"optim": {"lr": 1e-2}}},
        },
    )
    run_cli(config)
    job = job_dir(tmp_path)
    trainer = [r for r in read_metrics(job / "monitor" / "metrics.jsonl") if "critic/vf_loss" in r]
    assert [r["step"] for r in trainer] == [1, 2]
    assert "actor/final_loss" not in trainer[0]  # critic_warmup: the policy waits one step
    assert trainer[1]["actor/final_loss"] == pytest.approx(trainer[1]["actor/final_loss"])
    for record in trainer:
        assert math.isfinite(record["critic/vf_loss"])
        assert "critic/values/mean" in record and "critic/advantages/mean" in record
    assert (job / "global_step_2" / "critic" / "weights.safetensors").exists()
    if backend == "local":  # a resumed run continues from the saved critic
        more = yaml.safe_load(config.read_text())
        more["buffer"]["total_steps"] = 3
        config.write_text(yaml.safe_dump(more))
        run_cli(config)
        trainer = [
            r for r in read_metrics(job / "monitor" / "metrics.jsonl") if "critic/vf_loss" in r
        ]
        assert [r["step"] for r in trainer] == [1, 2, 3]
        assert (job / "global_step_3" / "critic" / "trinity_state.json").exists()


def test_a_critic_with_another_vocabulary_is_refused(tmp_path, tiny_model_dir):
    from trinity.config import ConfigError
    from trinity.launcher.backends import build_critic

    config = load_config(
        _write(tmp_path, ORIGINAL_PPO.format(root=tmp_path).replace("demo", str(tiny_model_dir)))
    )
    from transformers import AutoTokenizer

    critic = build_critic(config, 4, AutoTokenizer.from_pretrained(tiny_model_dir))
    assert critic.cliprange_value == 0.5 and critic.model.lora.rank == config.model.tinker.rank

    class OtherTokenizer:
        def get_vocab(self):
            return {"a": 0, "b": 1}

    with pytest.raises(ConfigError, match="model.critic_model_path: .* another tokenizer"):
        build_critic(config, 4, OtherTokenizer())
