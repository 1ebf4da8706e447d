"""The SDK's wider surface against ``trinity server``: every loss it names, the cookbook's
``stable_reinforce`` datums (provenance spans, a sampler recording stability info), every route
the SDK and its CLI call."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import numpy as np
import pytest
import tinker
import torch
from tinker import types

from trinity.engine import Engine
from trinity.server import ServerThread, build_service
from trinity.server.control_plane import API, NOT_OFFERED
from trinity.server.runner import served_model

RANK = 4
TIMEOUT_S = 30


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    # fp32 as the plain forwards the tests compare with (a bf16 machine would pick bf16)
    engine = Engine(str(tiny_model_dir), dtype=torch.float32)
    model = served_model(str(tiny_model_dir), engine=engine)
    service = build_service([model], tmp_path_factory.mktemp("srv"), {})
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


def sdk_routes() -> set[tuple[str, str]]:
    """Every (method, path) the installed SDK and its CLI send, read from their source."""
    root = Path(tinker.__file__).parent
    calls = re.compile(r'[._](get|post|put|delete)\(\s*f?"(/api/v1/[^"]*)"')
    requests = re.compile(r'_request\(\s*"(GET|POST|PUT|DELETE)",\s*"(/api/v1/[^"]*)"')
    routes = set()
    for source in root.rglob("*.py"):
        if source.name.endswith("_test.py"):
            continue
        text = source.read_text()
        for method, path in [*calls.findall(text), *requests.findall(text)]:
            routes.add((method.upper(), path))
    return routes


PLACEHOLDERS = {
    "training_run_id": "run-x",
    "model_id": "run-x",
    "checkpoint_id": "weights/none",
    "session_id": "session-x",
    "sampler_id": "sampler-x",
    "sampling_session_id": "sampler-x",
}


def test_every_sdk_route_answers_meaningfully(server):
    """No 405, no bare 404, no 5xx on any route of the SDK: each is served, or refused with a
    message (a 404 names what it did not find; a feature not offered here says so)."""
    routes = sdk_routes()
    assert len(routes) >= 40, routes  # the scan works
    not_offered = {(m, API + p.replace(":path", "")) for m, p, _, _ in NOT_OFFERED}
    placeholder = re.compile(r"\{(\w+)\}")
    with httpx.Client(base_url=server.url, headers={"X-API-Key": "tml-compat"}) as http:
        for method, template in sorted(routes):
            path = placeholder.sub(lambda m: PLACEHOLDERS[m.group(1)], template)
            body = None if method in ("GET", "DELETE") else {}
            response = http.request(method, path, json=body)
            where = f"{method} {template}: {response.status_code} {response.text[:200]}"
            assert response.status_code not in (405, 501) and response.status_code < 500, where
            detail = response.json().get("detail") if response.status_code >= 400 else None
            assert detail != "Not Found", where
            if (method, template) in not_offered:
                assert response.status_code == 400 and "not offered" in detail, where


def test_sessions_storage_and_refusals_through_the_sdk(server):
    sc = client(server)
    tc = training_client(sc, server)
    tc.save_state("kept").result(TIMEOUT_S)
    session_id = tc.model_id.split(":train:")[0]
    rest = tinker.RestClient(base_url=server.url, api_key="tml-compat")
    assert session_id in rest.list_sessions(limit=100).result(TIMEOUT_S).sessions
    session = rest.get_session(session_id).result(TIMEOUT_S)
    assert session.training_run_ids == [tc.model_id]
    admin = tinker.AdminClient(base_url=server.url, api_key="tml-compat")
    (usage,) = admin.get_current_checkpoint_storage_usage().result(TIMEOUT_S).data
    listed = rest.list_user_checkpoints(limit=1000).result(TIMEOUT_S).checkpoints
    assert usage.checkpoint_count == len(listed) >= 1
    assert usage.size_bytes == sum(c.size_bytes for c in listed)
    path = f"tinker://{tc.model_id}/weights/kept"
    with pytest.raises(tinker.BadRequestError, match="publishing checkpoints is not offered"):
        rest.publish_checkpoint_from_tinker_path(path).result(TIMEOUT_S)
    with pytest.raises(tinker.BadRequestError, match="trace export .* not offered"):
        rest.export_session_trace(session_id).result(TIMEOUT_S)
    sc.close("success").result(TIMEOUT_S)


def test_topk_prompt_logprobs_match_a_plain_forward(server, tiny_model_dir):
    """The cookbook's self-distillation asks for the top-k tokens at every prompt position."""
    from transformers import AutoModelForCausalLM

    sc = client(server)
    sampler = sc.create_sampling_client(base_model=server.service.models[0].name).result(TIMEOUT_S)
    prompt = [5, 17, 42, 99, 3, 250, 8]
    k = 5
    params = types.SamplingParams(max_tokens=1, temperature=1.0, seed=0)
    response = sampler.sample(
        types.ModelInput.from_ints(prompt),
        1,
        params,
        include_prompt_logprobs=True,
        topk_prompt_logprobs=k,
    ).result(TIMEOUT_S)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logprobs_TV = model(input_ids=torch.tensor([prompt])).logits[0, :-1].log_softmax(-1)
    values_TK, ids_TK = logprobs_TV.topk(k, dim=-1)
    topk = response.topk_prompt_logprobs
    assert len(topk) == len(prompt) and topk[0] is None
    for position, row in enumerate(topk[1:]):
        assert [t for t, _ in row] == ids_TK[position].tolist()
        np.testing.assert_allclose([lp for _, lp in row], values_TK[position], atol=1e-4)
    expected = logprobs_TV.gather(1, torch.tensor(prompt[1:])[:, None])[:, 0]
    np.testing.assert_allclose(response.prompt_logprobs[1:], expected, atol=1e-4)

    last = sampler.sample(
        types.ModelInput.from_ints(prompt),
        1,
        params,
        include_prompt_logprobs=True,
        topk_prompt_logprobs=k,
        prompt_logprobs_last_n=2,
    ).result(TIMEOUT_S)
    assert last.topk_prompt_logprobs[:-2] == [None] * (len(prompt) - 2)
    assert last.topk_prompt_logprobs[-2:] == topk[-2:]
    with pytest.raises(tinker.BadRequestError, match="topk_prompt_logprobs must be in"):
        sampler.sample(
            types.ModelInput.from_ints(prompt), 1, params, topk_prompt_logprobs=10**7
        ).result(TIMEOUT_S)
    sc.close("success").result(TIMEOUT_S)


def cookbook_merge(base_dir: Path, adapter_dir: Path) -> dict:
    """tinker-cookbook's ``weights.build_hf_model`` for a dense model, written from its
    documented rules: strip ``base_model.model.``, map ``model.unembed_tokens`` onto
    ``lm_head`` or (tied embeddings, no ``lm_head.weight``) onto ``model.embed_tokens``, and add
    ``lora_alpha / r * B @ A`` to a weight that must exist with that shape."""
    from safetensors.torch import load_file

    state = load_file(str(base_dir / "model.safetensors"))
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    scaling = config["lora_alpha"] / config["r"]
    adapter = load_file(str(adapter_dir / "adapter_model.safetensors"))
    head = "lm_head" if "lm_head.weight" in state else "model.embed_tokens"
    for key in [k for k in adapter if ".lora_A" in k]:
        name = key.replace(".lora_A", "")
        target = name.replace("base_model.model.", "").replace("model.unembed_tokens", head)
        assert target in state, f"{key} maps to {target}, not in the base model"
        delta = scaling * adapter[key.replace("lora_A", "lora_B")].float() @ adapter[key].float()
        state[target] = state[target].float() + delta
    return state


def test_external_weights_merge_with_the_cookbooks_rules(server, tiny_model_dir, tmp_path):
    """A tied-embedding model trained with the default train_unembed=True: the downloaded
    export merges, and every merged weight is the engine's own merge (the unembedding delta
    lands on the tied embedding matrix, which is how the cookbook treats tied models)."""
    from safetensors.torch import load_file

    sc = client(server)
    tc = training_client(sc, server)
    datum = types.Datum(
        model_input=types.ModelInput.from_ints([5, 6, 7, 8, 9]),
        loss_fn_inputs={"target_tokens": [6, 7, 8, 9, 10], "weights": [1.0] * 5},
    )
    tc.forward_backward([datum], "cross_entropy").result(TIMEOUT_S)
    tc.optim_step(types.AdamParams(learning_rate=5e-2)).result(TIMEOUT_S)
    external = tc.save_weights_external("merge-me").result(TIMEOUT_S).path
    rest = tinker.RestClient(base_url=server.url, api_key="tml-compat")
    downloaded = tmp_path / "downloaded"
    downloaded.mkdir()
    for name, url in rest.get_external_weights_urls(external).result(TIMEOUT_S).urls.items():
        (downloaded / name).write_bytes(httpx.get(url).raise_for_status().content)
    assert any(
        "model.unembed_tokens.lora_B" in k
        for k in load_file(downloaded / "adapter_model.safetensors")
    )

    merged = cookbook_merge(tiny_model_dir, downloaded)
    engine = server.service.models[0].engine
    engine.export_merged(tc.model_id, str(tmp_path / "engine-merged"))
    ours = load_file(str(tmp_path / "engine-merged" / "model.safetensors"))
    assert set(merged) == set(ours) - {"lm_head.weight"}
    for key, tensor in merged.items():
        expected = ours["lm_head.weight" if key == "model.embed_tokens.weight" else key]
        torch.testing.assert_close(tensor, expected.float(), atol=1e-5, rtol=1e-5, msg=key)
    assert not torch.equal(
        merged["model.embed_tokens.weight"],
        load_file(str(tiny_model_dir / "model.safetensors"))["model.embed_tokens.weight"],
    )
    sc.close("success").result(TIMEOUT_S)


def test_age_encrypted_external_weights_round_trip(server, tmp_path):
    """What tinker-cookbook's weights.download asks for: every file as NAME.age, encrypted to
    the given recipient, decrypting to the plain export."""
    pyrage = pytest.importorskip("pyrage")
    from safetensors.torch import load_file

    sc = client(server)
    tc = training_client(sc, server)
    rest = tinker.RestClient(base_url=server.url, api_key="tml-compat")
    identity = pyrage.x25519.Identity.generate()

    def download(path: str, into: Path) -> dict[str, bytes]:
        into.mkdir()
        urls = rest.get_external_weights_urls(path).result(TIMEOUT_S).urls
        return {name: httpx.get(url).raise_for_status().content for name, url in urls.items()}

    plain = download(tc.save_weights_external("plain").result(TIMEOUT_S).path, tmp_path / "p")
    encrypted_path = (
        tc.save_weights_external("sealed", age_encryption_recipients=[str(identity.to_public())])
        .result(TIMEOUT_S)
        .path
    )
    sealed = download(encrypted_path, tmp_path / "s")
    assert set(sealed) == {f"{name}.age" for name in plain}
    for name, data in plain.items():
        assert sealed[f"{name}.age"] != data
        decrypted = pyrage.decrypt(sealed[f"{name}.age"], [identity])
        if name.endswith(".safetensors"):
            (tmp_path / "a.safetensors").write_bytes(decrypted)
            (tmp_path / "b.safetensors").write_bytes(data)
            a, b = load_file(tmp_path / "a.safetensors"), load_file(tmp_path / "b.safetensors")
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        else:
            assert decrypted == data
    with pytest.raises(pyrage.DecryptError):
        pyrage.decrypt(sealed["adapter_config.json.age"], [pyrage.x25519.Identity.generate()])
    with pytest.raises(tinker.BadRequestError, match="is not an age"):
        tc.save_weights_external("bad", age_encryption_recipients=["age1x"]).result(TIMEOUT_S)
    sc.close("success").result(TIMEOUT_S)


def test_cookbook_style_async_streaming_minibatches_match_the_engine(server, tiny_model_dir):
    """The cookbook's async RL step: minibatches of stable_reinforce datums submitted back to
    back with an optim_step behind them before anything is awaited, twice; the results and the
    trained weights equal the same calls on an in-process engine."""
    import asyncio

    from trinity.engine import Engine, LoraSpec

    rng = np.random.default_rng(3)

    def minibatch() -> list[types.Datum]:
        out = []
        for length in (6, 9):
            seq = rng.integers(5, 200, size=length + 1)
            out.append(
                types.Datum(
                    model_input=types.ModelInput.from_ints(seq[:-1].tolist()),
                    loss_fn_inputs={
                        "target_tokens": seq[1:].astype(np.int64),
                        # near the random model's ~log(1/vocab): ratios in and out of the band
                        "logprobs": (-10.8 + rng.normal(0, 0.5, size=length)).astype(np.float32),
                        "advantages": rng.normal(size=length).astype(np.float32),
                    },
                )
            )
        return out

    steps = [[minibatch() for _ in range(3)] for _ in range(2)]
    adam = types.AdamParams(learning_rate=1e-2)
    probe = [
        types.Datum(
            model_input=types.ModelInput.from_ints([5, 6, 7]),
            loss_fn_inputs={"target_tokens": [6, 7, 8], "weights": [1.0, 1.0, 1.0]},
        )
    ]

    async def remote() -> tuple[list[float], np.ndarray]:
        sc = client(server)
        tc = await sc.create_lora_training_client(
            base_model=server.service.models[0].name, rank=RANK, seed=11
        )
        losses = []
        for batches in steps:
            pending = [tc.forward_backward(b, "stable_reinforce") for b in batches]
            step = tc.optim_step(adam)
            losses += [(await f).metrics["loss:sum"] for f in pending]
            assert "grad_norm" in (await step).metrics
        after = (await tc.forward(probe, "cross_entropy")).loss_fn_outputs[0]["logprobs"]
        await sc.close("success")
        return losses, after.to_numpy()

    losses, after = asyncio.run(remote())
    engine = Engine(str(tiny_model_dir), dtype=torch.float32)
    engine.create_model("local", LoraSpec(rank=RANK, seed=11))
    expected = []
    for batches in steps:
        expected += [
            engine.forward_backward("local", b, "stable_reinforce").metrics["loss:sum"]
            for b in batches
        ]
        engine.optim_step("local", adam)
    assert all(abs(x) > 1e-3 for x in expected)
    np.testing.assert_allclose(losses, expected, rtol=1e-4, atol=1e-4)
    local_after = engine.forward_backward("local", probe, "cross_entropy", forward_only=True)
    np.testing.assert_allclose(
        after, local_after.loss_fn_outputs[0]["logprobs"].to_numpy(), rtol=1e-4, atol=1e-4
    )


def _plain_logprobs(model_dir, tokens: list[int]) -> torch.Tensor:
    """log p(. | tokens[:i + 1]) for each i, from a plain transformers forward."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor([tokens])).logits[0].log_softmax(-1)


def test_topk_sample_logprobs_match_a_plain_forward(server, tiny_model_dir):
    """Top-k of the model's log-softmax at each sampled position, for the rows that asked."""
    sc = client(server)
    sampler = sc.create_sampling_client(base_model=server.service.models[0].name).result(TIMEOUT_S)
    prompt = [5, 17, 42, 99, 3, 250, 8]
    k = 6
    params = types.SamplingParams(max_tokens=8, temperature=1.0, seed=3, stop=[])
    futures = [
        sampler.sample(types.ModelInput.from_ints(prompt), 2, params, topk_sample_logprobs=k),
        # Greedy (its token is always the top-1), with a smaller k, in the same batch.
        sampler.sample(
            types.ModelInput.from_ints(prompt),
            1,
            params.model_copy(update={"temperature": 0.0}),
            topk_sample_logprobs=2,
        ),
        # Shares the batch and asks for nothing: gets no top-k.
        sampler.sample(types.ModelInput.from_ints(prompt), 1, params),
    ]
    response, greedy, plain = (f.result(TIMEOUT_S) for f in futures)
    assert plain.sequences[0].topk_logprobs is None
    seen_in_topk = 0
    for seq, width in [(s, k) for s in response.sequences] + [(greedy.sequences[0], 2)]:
        tokens = seq.tokens
        assert len(tokens) == 8 and seq.topk_logprobs_np.token_ids.shape == (8, width)
        logprobs_NV = _plain_logprobs(tiny_model_dir, prompt + tokens)[len(prompt) - 1 : -1]
        values_NK, ids_NK = logprobs_NV.topk(width, dim=-1)
        np.testing.assert_array_equal(seq.topk_logprobs_np.token_ids, ids_NK.numpy())
        np.testing.assert_allclose(seq.topk_logprobs_np.logprobs, values_NK.numpy(), atol=1e-4)
        for token, logprob, row in zip(tokens, seq.logprobs, seq.topk_logprobs, strict=True):
            hits = [lp for t, lp in row if t == token]
            if hits:
                seen_in_topk += 1
                assert hits[0] == pytest.approx(logprob, abs=1e-5)
    assert greedy.sequences[0].tokens == [row[0][0] for row in greedy.sequences[0].topk_logprobs]
    assert seen_in_topk >= 8
    for bad in (-1, 10**7):
        with pytest.raises(tinker.BadRequestError, match=r"topk_sample_logprobs must be in \[0, "):
            sampler.sample(
                types.ModelInput.from_ints(prompt), 1, params, topk_sample_logprobs=bad
            ).result(TIMEOUT_S)
    sc.close("success").result(TIMEOUT_S)


def test_prompt_alt_tokens_draws_and_logprobs(server, tiny_model_dir):
    """k draws at every prompt position after the first, scored by the model's log-softmax."""
    sc = client(server)
    sampler = sc.create_sampling_client(base_model=server.service.models[0].name).result(TIMEOUT_S)
    prompt = [5, 17, 42, 99, 3, 250, 8]
    k = 4
    logprobs_TV = _plain_logprobs(tiny_model_dir, prompt)[:-1]
    vocab = logprobs_TV.shape[-1]
    params = types.SamplingParams(max_tokens=2, temperature=1.0, seed=7)
    response = sampler.sample(
        types.ModelInput.from_ints(prompt), 1, params, prompt_alt_tokens_k=k
    ).result(TIMEOUT_S)
    tokens_TK = response.prompt_alt_tokens.tokens.to_numpy()
    logprobs_TK = response.prompt_alt_tokens.logprobs.to_numpy()
    assert tokens_TK.shape == logprobs_TK.shape == (len(prompt) - 1, k)
    assert tokens_TK.dtype == np.int64 and logprobs_TK.dtype == np.float32
    assert ((tokens_TK >= 0) & (tokens_TK < vocab)).all()
    # A tiny random model is near-uniform: k independent draws differ, and are not the argmax.
    assert all(len(set(row)) > 1 for row in tokens_TK.tolist())
    assert (tokens_TK != logprobs_TV.argmax(-1)[:, None].numpy()).any()
    expected_TK = logprobs_TV.gather(1, torch.from_numpy(tokens_TK))
    np.testing.assert_allclose(logprobs_TK, expected_TK.numpy(), atol=1e-4)

    greedy = types.SamplingParams(max_tokens=1, temperature=1e-6, seed=7)
    response = sampler.sample(
        types.ModelInput.from_ints(prompt), 1, greedy, prompt_alt_tokens_k=k
    ).result(TIMEOUT_S)
    argmax_TK = logprobs_TV.argmax(-1)[:, None].expand(-1, k).numpy()
    np.testing.assert_array_equal(response.prompt_alt_tokens.tokens.to_numpy(), argmax_TK)
    with pytest.raises(tinker.BadRequestError, match=r"prompt_alt_tokens_k must be in \[0, "):
        sampler.sample(
            types.ModelInput.from_ints(prompt), 1, params, prompt_alt_tokens_k=10**7
        ).result(TIMEOUT_S)
    sc.close("success").result(TIMEOUT_S)
