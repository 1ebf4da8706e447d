"""Exact entropy: the learner returns each token's entropy over the full vocabulary (local engine,
``trinity server``), and the trainer's entropy metric uses it instead of the sampled-token
estimate. Checked against the entropy computed directly from the tiny model's logits."""

from __future__ import annotations

import asyncio

import pytest
import torch

from trinity.algorithms import build_loss_plan
from trinity.backends.tinker_sdk import TinkerSession, TinkerTrainer, offers_exact_entropy
from trinity.workflows.types import Experience

TOKENS = [1, 520, 314, 2023, 4416, 28, 216, 33, 34, 35, 2, 1542, 17, 18]
PROMPT = 6


def direct_entropy(model_dir) -> torch.Tensor:
    """H at every position predicting tokens[1:], from the HF model's full logits."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([TOKENS[:-1]])).logits[0].float(), -1)
    return -(logp.exp() * logp).sum(-1)


def batch() -> list[Experience]:
    n = len(TOKENS) - PROMPT
    return [
        Experience(
            tokens=TOKENS,
            prompt_length=PROMPT,
            logprobs=[-2.0] * n,
            loss_mask=[1, 1, 0, 1, 1, 1, 1, 1][:n],
            reward=1.0,
            advantages=[0.5] * n,
        )
    ]


async def learner_step(trainer):
    plan = build_loss_plan(
        {"algorithm_type": "grpo", "kl_loss_fn": "none", "loss_agg_mode": "token-mean"}
    )
    datums = plan.to_datums(batch())
    output = await trainer.forward_backward(list(datums), plan.loss_fn, plan.loss_fn_config)
    return plan, datums, output


def check(output, plan, datums, expected: torch.Tensor) -> None:
    entropy = output.loss_fn_outputs[0]["entropy"].to_torch().float()
    torch.testing.assert_close(entropy, expected, atol=2e-4, rtol=1e-4)
    mask = torch.tensor(batch()[0].loss_mask, dtype=torch.float32)
    response = expected[PROMPT - 1 :]
    exact_mean = float((response * mask).sum() / mask.sum())  # token-mean over trained tokens
    metrics = plan.metrics(datums, output)
    assert metrics["actor/entropy_loss"] == pytest.approx(exact_mean, rel=1e-4)
    lp = output.loss_fn_outputs[0]["logprobs"].to_torch().float()[PROMPT - 1 :]
    estimate = float(((-lp) * mask).sum() / mask.sum())  # what the sampled-token estimate gives
    assert abs(metrics["actor/entropy_loss"] - estimate) > 1e-2


def test_local_engine_entropy_is_exact(tiny_model_dir):
    from trinity.backends.local import LocalRuntime, LocalTrainer
    from trinity.engine import LoraSpec

    runtime = LocalRuntime(str(tiny_model_dir))
    try:
        trainer = LocalTrainer(runtime, "policy", LoraSpec(rank=4, seed=0))
        assert trainer.exact_entropy
        plan, datums, output = asyncio.run(learner_step(trainer))
        check(output, plan, datums, direct_entropy(tiny_model_dir))
    finally:
        runtime.close()


async def server_trainer(url: str, path: str) -> TinkerTrainer:
    """A LoRA (rank 4, every group) training client of a ``trinity server`` on this machine."""
    session = TinkerSession(url, "tml-e")
    assert session.exact_entropy
    return await TinkerTrainer.create(
        session, path, rank=4, seed=0, train_mlp=True, train_attn=True, train_unembed=True
    )


def test_trinity_server_entropy_is_exact(tmp_path, tiny_model_dir):
    from trinity.server import build_service
    from trinity.server.runner import ServerThread

    path = str(tiny_model_dir.resolve())
    server = ServerThread(build_service([path], tmp_path / "server", "tml-e=local")).start()
    try:

        async def go():
            trainer = await server_trainer(server.url, path)
            return await learner_step(trainer)

        plan, datums, output = asyncio.run(go())
        check(output, plan, datums, direct_entropy(tiny_model_dir))
    finally:
        server.stop()


def test_exact_entropy_is_asked_of_a_service_that_announces_it(tmp_path, tiny_model_dir):
    """A trinity server says so at its extensions route, whatever its address; a service without
    the route (as the hosted one), an unreachable one, and the default get the estimate."""
    import http.server
    import threading

    from trinity.server import ServerThread, build_service

    srv = ServerThread(build_service([str(tiny_model_dir)], tmp_path / "srv", {})).start()
    other = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    threading.Thread(target=other.serve_forever, daemon=True).start()  # 501 to every GET
    try:
        assert offers_exact_entropy(srv.url)
        assert not offers_exact_entropy(f"http://127.0.0.1:{other.server_address[1]}")
    finally:
        other.shutdown()
        srv.stop()
    assert not offers_exact_entropy(f"http://127.0.0.1:{other.server_address[1]}")  # closed
    assert not offers_exact_entropy(None)


# ----------------------------------------------------------------------------- the loss term


def hf_logprobs_entropy(model, tokens):
    logp = torch.log_softmax(model(torch.tensor([tokens[:-1]])).logits[0].float(), -1)
    lp = logp.gather(1, torch.tensor(tokens[1:])[:, None]).squeeze(1)
    return lp, -(logp.exp() * logp).sum(-1)


def test_engine_entropy_weights_add_the_exact_entropy_with_its_gradient(tiny_model_dir):
    """cross_entropy + entropy_weights e: loss sum(-w lp) + sum(e H), gradients through the
    full-vocabulary entropy (full fine-tuning, against torch autograd on the HF model)."""
    from tinker import types
    from transformers import AutoModelForCausalLM

    from trinity.engine import Engine

    engine = Engine(str(tiny_model_dir), dtype=torch.float32)
    engine.create_model("full", None)
    g = torch.Generator().manual_seed(0)
    n = len(TOKENS) - 1
    w, e = torch.rand(n, generator=g), torch.randn(n, generator=g)
    datum = types.Datum(
        model_input=types.ModelInput.from_ints(TOKENS[:-1]),
        loss_fn_inputs={
            "target_tokens": TOKENS[1:],
            "weights": w.tolist(),
            "entropy_weights": types.TensorData.from_torch(e),
        },
    )
    out = engine.forward_backward("full", [datum], "cross_entropy")
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    lp, h = hf_logprobs_entropy(reference, TOKENS)
    total = (-w * lp).sum() + (e * h).sum()
    total.backward()
    assert out.metrics["loss:sum"] == pytest.approx(total.item(), rel=1e-5)
    got = engine._models["full"].params
    for name, param in reference.named_parameters():
        torch.testing.assert_close(got[name].grad, param.grad, atol=1e-5, rtol=1e-3)


def test_local_entropy_bonus_is_exact(tiny_model_dir):
    """GRPO with entropy_coef on the local engine: the custom loss's entropy term is the exact
    entropy (value and gradient), not the sampled-token estimate."""
    from transformers import AutoModelForCausalLM

    from trinity.backends.local import LocalRuntime, LocalTrainer

    coef = 0.5
    plan = build_loss_plan(
        {
            "algorithm_type": "grpo",
            "kl_loss_fn": "none",
            "loss_agg_mode": "token-mean",
            "entropy_loss_fn_args": {"entropy_coef": coef},
        }
    )
    assert plan.custom_loss is not None
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    lp, h = hf_logprobs_entropy(reference, TOKENS)
    exp = batch()[0]
    exp.logprobs = lp[PROMPT - 1 :].tolist()  # on-policy: ratio 1
    mask = torch.tensor(exp.loss_mask, dtype=torch.float32)
    runtime = LocalRuntime(str(tiny_model_dir), dtype=torch.float32)  # as the reference
    try:
        trainer = LocalTrainer(runtime, "policy", None)
        datums = plan.to_datums([exp])
        out = trainer.forward_backward_custom(list(datums), plan.custom_loss).result()
        A = torch.tensor(exp.advantages)
        lp_r, h_r = lp[PROMPT - 1 :], h[PROMPT - 1 :]
        ratio = torch.exp(lp_r - lp_r.detach())
        pg = torch.max(-A * ratio, -A * ratio.clamp(0.8, 1.2))
        total = ((pg - coef * h_r) * mask).sum() / mask.sum()
        total.backward()
        assert out.metrics["loss:sum"] == pytest.approx(total.item(), rel=1e-4)
        assert out.metrics["entropy_loss:sum"] == pytest.approx(
            float((h_r * mask).sum() / mask.sum()), rel=1e-4
        )
        got = runtime.engine._models["policy"].params
        for name, param in reference.named_parameters():
            torch.testing.assert_close(got[name].grad, param.grad, atol=1e-5, rtol=1e-3)
    finally:
        runtime.close()


def test_trinity_server_entropy_bonus_is_exact(tmp_path, tiny_model_dir):
    """The same GRPO + entropy_coef step through the SDK against a ``trinity server``: the
    parameter gradients on the server equal the local engine's exact bonus's (atol 1e-6,
    rtol 1e-4), and differ from the SDK recipe's (the estimate); an optimizer step queued right
    after the custom step runs after its backward."""
    from tinker import types
    from transformers import AutoModelForCausalLM

    from trinity.backends.local import LocalRuntime, LocalTrainer
    from trinity.server import build_service
    from trinity.server.runner import ServerThread

    plan = build_loss_plan(
        {
            "algorithm_type": "grpo",
            "kl_loss_fn": "none",
            "loss_agg_mode": "token-mean",
            "entropy_loss_fn_args": {"entropy_coef": 0.5},
        }
    )
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    lp, _ = hf_logprobs_entropy(reference, TOKENS)
    exp = batch()[0]
    exp.logprobs = lp[PROMPT - 1 :].tolist()
    path = str(tiny_model_dir.resolve())
    service = build_service([path], tmp_path / "server", "tml-e=local")
    (served,) = service.models
    engine = served.engine
    server = ServerThread(service).start()
    try:

        async def go():
            trainer = await server_trainer(server.url, path)
            (model,) = engine._models.values()
            grads, outs = {}, {}
            # ours, then the SDK's own recipe (logprobs only: the sampled-token estimate)
            for kind, client in (("exact", trainer), ("estimate", trainer.client)):
                outs[kind] = await client.forward_backward_custom(
                    plan.to_datums([exp]), plan.custom_loss
                )
                grads[kind] = {n: p.grad.clone() for n, p in model.params.items()}
                for p in model.params.values():
                    p.grad = None
            fwd_bwd = trainer.forward_backward_custom(plan.to_datums([exp]), plan.custom_loss)
            optim = trainer.optim_step(types.AdamParams(learning_rate=1e-2))
            await fwd_bwd
            await optim
            assert model.optimizer.steps == 1
            return model.spec, outs["exact"], grads

        spec, out, grads = asyncio.run(go())
    finally:
        server.stop()
    runtime = LocalRuntime(path)
    try:
        trainer = LocalTrainer(runtime, "policy", spec)
        local = trainer.forward_backward_custom(plan.to_datums([exp]), plan.custom_loss).result()
        local_grads = runtime.engine._models["policy"].params
        assert local.metrics["entropy_loss:sum"] > 0
        for key in ("loss:sum", "entropy_loss:sum"):
            assert out.metrics[key] == pytest.approx(local.metrics[key], rel=1e-5)
        for name, grad in grads["exact"].items():
            torch.testing.assert_close(grad, local_grads[name].grad, atol=1e-6, rtol=1e-4)
        assert any(
            (grads["exact"][name] - grads["estimate"][name]).abs().max() > 1e-4
            for name in grads["exact"]
        )
    finally:
        runtime.close()
