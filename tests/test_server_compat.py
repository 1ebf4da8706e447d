"""The SDK's wider surface against ``trinity server``: every loss it names, the cookbook's
``stable_reinforce`` datums (provenance spans, a sampler recording stability info)."""

from __future__ import annotations

import numpy as np
import pytest
import tinker
from tinker import types

from trinity.server import ServerThread, build_service

RANK = 4
TIMEOUT_S = 30


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    service = build_service([str(tiny_model_dir)], tmp_path_factory.mktemp("srv"), {})
    srv = ServerThread(service).start()
    yield srv
    srv.stop()


def client(srv: ServerThread) -> tinker.ServiceClient:
    return tinker.ServiceClient(base_url=srv.url, api_key="tml-compat")


def training_client(sc: tinker.ServiceClient, srv: ServerThread) -> tinker.TrainingClient:
    name = srv.service.models[0].name
    return sc.create_lora_training_client(base_model=name, rank=RANK).result(TIMEOUT_S)


def test_every_sdk_loss_is_accepted_or_refused_by_name(server):
    """Each name in the SDK's LossFnType trains here, except ``custom`` (server-side traced
    losses), which is refused with the accepted set."""
    sc = client(server)
    tc = training_client(sc, server)
    rng = np.random.default_rng(0)
    seq = rng.integers(5, 200, size=9)
    datum = types.Datum(
        model_input=types.ModelInput.from_ints(seq[:-1].tolist()),
        loss_fn_inputs={
            "target_tokens": seq[1:].astype(np.int64),
            "weights": np.ones(8, dtype=np.float32),
            "logprobs": np.full(8, -5.0, dtype=np.float32),
            "advantages": np.r_[np.zeros(3), np.ones(5)].astype(np.float32),
        },
    )
    configs = {"dro": {"beta": 0.05}}
    for loss in types.LossFnType.__args__:
        if loss == "custom":
            with pytest.raises(tinker.BadRequestError, match="'custom'.*gspo.*stable_reinforce"):
                tc.forward_backward([datum], loss).result(TIMEOUT_S)
            continue
        out = tc.forward_backward([datum], loss, configs.get(loss)).result(TIMEOUT_S)
        assert np.isfinite(out.metrics["loss:sum"]), loss
    sc.close("success").result(TIMEOUT_S)


def test_stable_reinforce_with_provenance_as_the_cookbook_sends_it(server):
    """rl_loop's shape: a sampler made with record_stability_info, datums naming the sampled
    sequence in provenance spans, loss_fn stable_reinforce, then an optimizer step."""
    sc = client(server)
    tc = training_client(sc, server)
    sampler = tc.save_weights_and_get_sampling_client(record_stability_info=True).result(TIMEOUT_S)
    prompt = [5, 6, 7, 8]
    params = types.SamplingParams(max_tokens=6, temperature=1.0, seed=1, stop=[])
    response = sampler.sample(types.ModelInput.from_ints(prompt), 2, params).result(TIMEOUT_S)
    data = []
    for seq, adv in zip(response.sequences, (1.0, -1.0), strict=True):
        full = prompt + list(seq.tokens)
        n_prompt, n_sampled = len(prompt), len(seq.tokens)
        datum = types.Datum(
            model_input=types.ModelInput.from_ints(full[:-1]),
            loss_fn_inputs={
                "target_tokens": np.asarray(full[1:], dtype=np.int64),
                "logprobs": np.r_[np.zeros(n_prompt - 1), seq.logprobs].astype(np.float32),
                "advantages": np.r_[np.zeros(n_prompt - 1), np.full(n_sampled, adv)].astype(
                    np.float32
                ),
            },
        )
        sid = seq.sequence_id
        data.append(
            datum.with_provenance(
                model_input=[
                    types.PromptProvenanceSpan(sequence_id=sid, length=n_prompt),
                    types.SampledProvenanceSpan(sequence_id=sid, length=n_sampled - 1),
                ],
                loss_fn_inputs=[
                    types.PromptProvenanceSpan(sequence_id=sid, offset=1, length=n_prompt - 1),
                    types.SampledProvenanceSpan(sequence_id=sid, length=n_sampled),
                ],
            )
        )
    out = tc.forward_backward(data, "stable_reinforce").result(TIMEOUT_S)
    # on-policy: every ratio is ~1, so the loss is -sum(lp * A) over the sampled tokens
    expected = sum(
        -float(np.sum(o["logprobs"].to_numpy()[len(prompt) - 1 :]) * adv)
        for o, adv in zip(out.loss_fn_outputs, (1.0, -1.0), strict=True)
    )
    assert out.metrics["loss:sum"] == pytest.approx(expected, rel=1e-3, abs=1e-3)
    assert (
        "grad_norm" in tc.optim_step(types.AdamParams(learning_rate=1e-3)).result(TIMEOUT_S).metrics
    )
    sc.close("success").result(TIMEOUT_S)
