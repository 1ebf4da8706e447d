"""On-policy distillation and JSD: advantages and losses against the formulas, and real runs.

The references are written here from the original's definitions (per token, plain ``math``):
on_policy_distill A = kl_coef (t - s) m; jsd with s, t divided by the temperature and
beta = lambda_coef, log M = log((1 - beta) e^s + beta e^t), j = beta (t - log M) + (1 - beta)(s - log M)
(j = s - t at beta 0, t - s at beta 1), A = -kl_coef j m.
"""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from tests.test_algorithms_losses import (
    ORIGINAL,
    datums_for,
    grads,
    leaves,
    make_batch,
    response,
    tinker_loss,
    verl_agg,
)
from tests.test_rl_loop import backend_model, job_dir, run_cli, write_config
from trinity.algorithms import build_loss_plan, explorer_advantage_fn, resolve_algorithm
from trinity.algorithms.distill import jsd_advantages, on_policy_distill_advantages


def ref_distill(s, t, m, kl_coef=1.0):
    return [kl_coef * (ti - si) * mi for si, ti, mi in zip(s, t, m, strict=True)]


def ref_jsd(s, t, m, kl_coef=1.0, lambda_coef=0.5, temperature=1.0):
    out = []
    for si, ti, mi in zip(s, t, m, strict=True):
        si, ti, beta = si / temperature, ti / temperature, lambda_coef
        if beta == 0:
            j = si - ti
        elif beta == 1:
            j = ti - si
        else:
            log_m = math.log((1 - beta) * math.exp(si) + beta * math.exp(ti))
            j = beta * (ti - log_m) + (1 - beta) * (si - log_m)
        out.append(-kl_coef * j * mi)
    return out


def _tokens(seed=0, n=7):
    g = torch.Generator().manual_seed(seed)
    s = (-torch.rand(n, generator=g) * 4).tolist()
    t = (-torch.rand(n, generator=g) * 4).tolist()
    return s, t, [1, 1, 0, 1, 1, 1, 0][:n]


@pytest.mark.parametrize("kl_coef", [1.0, 0.3])
def test_on_policy_distill_advantages_match_the_formula(kl_coef):
    s, t, m = _tokens()
    ours = on_policy_distill_advantages(s, t, m, kl_coef=kl_coef)
    assert ours.tolist() == pytest.approx(ref_distill(s, t, m, kl_coef), abs=1e-6)


@pytest.mark.parametrize(
    ("lambda_coef", "temperature", "kl_coef"),
    [(0.5, 1.0, 1.0), (0.0, 1.0, 1.0), (1.0, 1.0, 2.0), (0.2, 0.7, 1.0), (0.9, 2.0, 0.5)],
)
def test_jsd_advantages_match_the_formula(lambda_coef, temperature, kl_coef):
    s, t, m = _tokens(1)
    ours = jsd_advantages(s, t, m, kl_coef, lambda_coef, temperature)
    ref = ref_jsd(s, t, m, kl_coef, lambda_coef, temperature)
    assert ours.tolist() == pytest.approx(ref, abs=1e-6)
    if lambda_coef == 0.0:  # beta 0 is on-policy distillation
        assert ours.tolist() == pytest.approx(ref_distill(s, t, m, kl_coef), abs=1e-6)
    with pytest.raises(ValueError, match="lambda_coef must be in"):
        jsd_advantages(s, t, m, lambda_coef=1.5)


def test_defaults_follow_the_original():
    for name, args in (
        ("on_policy_distill", {"kl_coef": 1.0}),
        ("jsd", {"kl_coef": 1.0, "lambda_coef": 0.5, "temperature": 1.0, "chunk_size": None}),
    ):
        st = resolve_algorithm({"algorithm_type": name})
        assert (st.advantage_fn, st.policy_loss_fn, st.repeat_times) == (name, "ppo", 8)
        assert (st.kl_loss_fn, st.entropy_loss_fn, st.use_reference) == ("none", "none", False)
        assert st.advantage_fn_args == args
        plan = build_loss_plan({"algorithm_type": name})
        assert plan.custom_loss is None and plan.loss_fn == "ppo"  # one built-in pass


CASES = {
    "on_policy_distill": ({"algorithm_type": "on_policy_distill"}, "ppo", ref_distill, {}),
    "on_policy_distill_is": (
        {"algorithm_type": "on_policy_distill", "policy_loss_fn": "importance_sampling"},
        "importance_sampling",
        ref_distill,
        {},
    ),
    "jsd": (
        {"algorithm_type": "jsd", "advantage_fn_args": {"lambda_coef": 0.3, "temperature": 1.5}},
        "ppo",
        ref_jsd,
        {"lambda_coef": 0.3, "temperature": 1.5},
    ),
}


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_loss_matches_the_original_objective(case, mode):
    """Hook -> datums -> the built-in loss == agg(policy loss with the reference advantages),
    value and gradient w.r.t. the learner's logprobs (ratios inside and outside the clip)."""
    config, kind, ref_fn, ref_args = CASES[case]
    plan = build_loss_plan({**config, "loss_agg_mode": mode})
    assert plan.custom_loss is None and plan.loss_fn == kind
    trajs = make_batch()
    g = torch.Generator().manual_seed(3)
    for traj in trajs:
        traj.teacher_logprobs = (-torch.rand(len(traj.loss_mask), generator=g) * 4).tolist()
    metrics = explorer_advantage_fn(config)(trajs)
    gaps = [
        (s - t) * m
        for tr in trajs
        for s, t, m in zip(tr.logprobs, tr.teacher_logprobs, tr.loss_mask, strict=True)
    ]
    assert metrics["distill/reverse_kl"] == pytest.approx(
        sum(gaps) / sum(sum(tr.loss_mask) for tr in trajs)
    )
    datums = datums_for(plan, trajs)
    lps = leaves(trajs)
    ours = tinker_loss(plan.loss_fn, lps, datums, plan.loss_fn_config)
    ours_grad = grads(ours, lps)

    lps2 = leaves(trajs)
    per_token = [
        ORIGINAL[kind](
            response(lp, tr),
            torch.tensor(tr.logprobs),
            torch.tensor(ref_fn(tr.logprobs, tr.teacher_logprobs, tr.loss_mask, **ref_args)),
        )
        for lp, tr in zip(lps2, trajs, strict=True)
    ]
    masks = [torch.tensor(tr.loss_mask, dtype=torch.float32) for tr in trajs]
    ref = verl_agg(per_token, masks, mode)
    ref_grad = grads(ref, lps2)
    assert torch.allclose(ours, ref, atol=1e-5, rtol=1e-5), (float(ours), float(ref))
    for a, b in zip(ours_grad, ref_grad, strict=True):
        assert torch.allclose(a, b, atol=1e-6)
    assert any(gr.abs().sum() > 0 for gr in ours_grad)


def test_hook_refuses_experiences_without_teacher_logprobs():
    exp = SimpleNamespace(logprobs=[-1.0], loss_mask=[1], teacher_logprobs=None)
    with pytest.raises(ValueError, match="on_policy_distill_workflow"):
        explorer_advantage_fn({"algorithm_type": "on_policy_distill"})([exp])


# ----------------------------------------------------------------------------- real runs

PROMPTS = [f"What is {a} + {b}?" for a, b in ((3, 4), (12, 7), (25, 16), (8, 9))]


def exact_reverse_kl(student: Path, teacher: Path, adapter: Path | None) -> float:
    """KL(student || teacher) of the first response token after fixed chat prompts (mean over
    the prompts), exact over the vocabulary from both models' logits (the student with its
    trained adapter merged)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(student)
    s_model = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        s_model = PeftModel.from_pretrained(s_model, str(adapter)).merge_and_unload()
    t_model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32)
    kls = []
    with torch.no_grad():
        for prompt in PROMPTS:
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
            ids = torch.tensor([tokenizer.encode(text, add_special_tokens=False)])
            ls = torch.log_softmax(s_model(ids).logits[0, -1].float(), -1)
            lt = torch.log_softmax(t_model(ids).logits[0, -1].float(), -1)
            kls.append((ls.exp() * (ls - lt)).sum())
    return float(torch.stack(kls).mean())


def sharpened_copy(model_dir: Path, out: Path, factor: float) -> Path:
    """The tiny model with its final norm scaled: logits times ``factor`` (a random tiny model's
    next-token distributions are near uniform; a student must sample tokens it can learn on)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        model.model.norm.weight.mul_(factor)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out)
    return out


@pytest.mark.parametrize("backend", ["local", "tinker"])
def test_distillation_moves_the_student_toward_the_teacher(tmp_path, tiny_model_dir, backend):
    """A peaked student (logits x8) learns from a flatter teacher (the same network, logits x2):
    the exact reverse KL on fixed prompts falls."""
    student = sharpened_copy(tiny_model_dir, tmp_path / "student", 8.0)
    teacher = sharpened_copy(tiny_model_dir, tmp_path / "teacher", 2.0)
    config_path = write_config(tmp_path, student)
    config = yaml.safe_load(config_path.read_text())
    config["model"] = backend_model(tmp_path, student, backend)
    config["algorithm"] = {
        "algorithm_type": "on_policy_distill",
        "repeat_times": 8,
        "optimizer": {"lr": 1e-3},
    }
    config["buffer"]["total_steps"] = 4
    config["buffer"]["explorer_input"]["default_workflow_type"] = "on_policy_distill_workflow"
    config["explorer"]["auxiliary_models"] = [{"model_path": str(teacher)}]
    config_path.write_text(yaml.safe_dump(config))
    run_cli(config_path)

    before = exact_reverse_kl(student, teacher, None)
    after = exact_reverse_kl(student, teacher, job_dir(tmp_path) / "final_adapter")
    assert after < 0.85 * before, (before, after)
