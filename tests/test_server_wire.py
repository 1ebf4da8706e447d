"""The server's wire layer with the official SDK over real HTTP, on a scripted stand-in engine.

The stand-in keeps these tests independent of model numerics (tests/test_server.py runs the real
engine): it returns logprobs that encode the model's step count, so ordering, idempotency, auth,
tenant isolation, persistence and protobuf round trips are all checked through what the SDK
hands back.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import numpy as np
import pytest
import tinker
from tinker import types

from trinity.server import ServedModel, ServerThread, Service, wire

VOCAB = 50


class FakeEngine:
    """Each model is a step counter; logprobs are -(step+1) so tests can read the order."""

    vocab_size = VOCAB
    max_context_length = 64
    model_name = "fake-model"

    def __init__(self) -> None:
        self.models: dict[str, dict] = {}
        self.samplers: dict[str, int] = {}
        self.calls: list[tuple] = []

    def create_model(self, model_id, lora):
        self.models[model_id] = {"step": 0, "rank": lora.rank, "fb": 0}

    def remove_model(self, model_id):
        self.models.pop(model_id, None)

    def forward_backward(
        self, model_id, data, loss_fn, config, forward_only=False, return_entropy=False
    ):
        m = self.models[model_id]
        self.calls.append(("fb", model_id, len(data), loss_fn, forward_only))
        outs = []
        for d in data:
            n = d.model_input.length
            out = {
                "logprobs": types.TensorData.from_numpy(
                    np.full(n, -(m["step"] + 1), dtype=np.float32)
                )
            }
            if return_entropy:
                out["entropy"] = types.TensorData.from_numpy(np.full(n, 0.5, dtype=np.float32))
            outs.append(out)
        if not forward_only:
            m["fb"] += 1
        return types.ForwardBackwardOutput(
            loss_fn_output_type="ArrayRecord",
            loss_fn_outputs=outs,
            metrics={"loss:sum": float(len(data))},
        )

    def optim_step(self, model_id, params):
        self.calls.append(("optim", model_id))
        self.models[model_id]["step"] += 1
        return {"grad_norm": 1.0}

    def save_state(self, model_id, directory, optimizer=True):
        Path(directory, "state.json").write_text(json.dumps(self.models[model_id]))

    def load_state(self, model_id, directory, optimizer=True):
        state = json.loads(Path(directory, "state.json").read_text())
        if not optimizer:
            state["fb"] = 0
        self.models[model_id] = state

    def snapshot_sampler(self, model_id, name):
        self.samplers[name] = self.models[model_id]["step"]

    def save_sampler(self, name, directory):
        Path(directory, "sampler.json").write_text(json.dumps(self.samplers[name]))

    def load_sampler(self, name, directory):
        self.samplers[name] = json.loads(Path(directory, "sampler.json").read_text())

    def drop_sampler(self, name):
        self.samplers.pop(name, None)

    def export_peft(
        self, name, directory, tinker_names=False
    ):  # a model or a sampler, as the engine allows
        step = self.models[name]["step"] if name in self.models else self.samplers[name]
        Path(directory).mkdir(parents=True, exist_ok=True)
        Path(directory, "adapter_config.json").write_text(json.dumps({"step": step}))

    def sample(self, requests):
        out = []
        for r in requests:
            step = 0 if r.adapter is None else self.samplers[r.adapter]
            seqs = [
                types.SampledSequence(
                    stop_reason="length",
                    sequence_id="",
                    _tokens_list=[step % VOCAB] * r.params.max_tokens,
                    _logprobs_list=[-0.5] * r.params.max_tokens,
                )
                for _ in range(r.num_samples)
            ]
            lp = [None] + [-1.0] * (len(r.prompt_tokens) - 1) if r.prompt_logprobs else None
            out.append(types.SampleResponse(sequences=seqs, _prompt_logprobs_list=lp))
        return out


KEYS = {"tml-alice-key": "alice", "tml-bob-key": "bob"}


def start(data_dir: Path, engine: FakeEngine | None = None) -> ServerThread:
    engine = engine or FakeEngine()
    model = ServedModel("fake-model", data_dir / "model", engine, {"fake"})
    return ServerThread(Service([model], data_dir, dict(KEYS), long_poll_s=2.0)).start()


@pytest.fixture
def server(tmp_path):
    srv = start(tmp_path)
    yield srv
    srv.stop()


def client(srv: ServerThread, key: str = "tml-alice-key") -> tinker.ServiceClient:
    return tinker.ServiceClient(base_url=srv.url, api_key=key)


def datum(tokens: list[int]) -> types.Datum:
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)},
    )


def test_training_round_trip_and_ordering(server):
    sc = client(server)
    tc = sc.create_lora_training_client(base_model="fake-model", rank=4).result()
    info = tc.get_info()
    assert info.model_id.endswith(":train:0") and info.lora_rank == 4
    assert info.model_data.model_name == "fake-model"
    # Submitted before awaiting: fwd/bwd must see step 0, the second forward step 1.
    f1 = tc.forward_backward([datum([1, 2, 3, 4]), datum([5, 6, 7])], "cross_entropy")
    o1 = tc.optim_step(types.AdamParams(learning_rate=1e-3))
    f2 = tc.forward([datum([1, 2, 3])], "cross_entropy", {"return_entropy": 1.0})
    r1, r2 = f1.result(), f2.result()
    assert o1.result().metrics == {"grad_norm": 1.0}
    assert [lo["logprobs"].tolist() for lo in r1.loss_fn_outputs] == [[-1.0] * 3, [-1.0] * 2]
    assert r1.metrics["loss:sum"] == 2.0
    assert r2.loss_fn_outputs[0]["logprobs"].tolist() == [-2.0, -2.0]
    assert r2.loss_fn_outputs[0]["entropy"].tolist() == [0.5, 0.5]
    sc.close("success").result()


def test_out_of_order_chunks_are_held_and_retries_deduplicated(server):
    """Seq ids 3, 2 then 1 (as parallel chunks arrive), and a retried seq id 2."""
    sc = client(server)
    tc = sc.create_lora_training_client(base_model="fake-model", rank=4).result()
    engine = server.service.models[0].engine
    http = httpx.Client(base_url=server.url, headers={"X-API-Key": "tml-alice-key"})

    def fb(seq: int) -> str:
        req = types.ForwardBackwardRequest(
            forward_backward_input=types.ForwardBackwardInput(
                data=[datum([1, 2, 3])], loss_fn="cross_entropy"
            ),
            model_id=tc.model_id,
            seq_id=seq,
        )
        from tinker.proto.request_conv import forward_backward_request_to_proto

        body = forward_backward_request_to_proto(req).SerializeToString()
        r = http.post(
            "/api/v1/forward_backward",
            content=body,
            headers={"Content-Type": "application/x-protobuf"},
        )
        assert r.status_code == 200, r.text
        return r.json()["request_id"]

    rid3, rid2 = fb(3), fb(2)
    assert engine.calls == []  # held: seq 1 has not arrived
    assert fb(2) == rid2  # retry of (model, 2) is the same future
    fb(1)
    r = http.post("/api/v1/retrieve_future", json={"request_id": rid3})
    out = wire_decode(r)
    assert len(engine.calls) == 3 and out.metrics["loss:sum"] == 1.0
    http.close()


def wire_decode(response: httpx.Response) -> types.ForwardBackwardOutput:
    from tinker.proto.response_conv import deserialize_forward_backward_output

    assert response.headers["content-type"] == wire.PROTO_CONTENT_TYPE
    return deserialize_forward_backward_output(response.content)


def test_sampling_paths_and_tokenizer_free_calls(server):
    sc = client(server)
    tc = sc.create_lora_training_client(base_model="fake-model", rank=4).result()
    tc.forward_backward([datum([1, 2, 3])], "cross_entropy")
    tc.optim_step(types.AdamParams(learning_rate=1e-3)).result()
    prompt = types.ModelInput.from_ints([1, 2, 3])
    params = types.SamplingParams(max_tokens=3, temperature=1.0)

    ephemeral = tc.save_weights_and_get_sampling_client().result()
    res = ephemeral.sample(prompt, 2, params).result()
    assert [s.tokens for s in res.sequences] == [[1, 1, 1]] * 2
    assert all(s.sequence_id for s in res.sequences)
    assert ephemeral.compute_logprobs(prompt).result() == [None, -1.0, -1.0]

    path = tc.save_weights_for_sampler("s1").result().path
    assert path == f"tinker://{tc.model_id}/sampler_weights/s1"
    named = sc.create_sampling_client(model_path=path).result()
    assert named.get_base_model() == "fake-model"
    assert named.sample(prompt, 1, params).result().sequences[0].tokens == [1, 1, 1]

    base = sc.create_sampling_client(base_model="fake-model").result()
    assert base.sample(prompt, 1, params).result().sequences[0].tokens == [0, 0, 0]
    caps = tinker.RestClient(base_url=server.url, api_key="tml-alice-key")
    models = caps.get_server_capabilities().result().supported_models
    assert [m.model_name for m in models] == ["fake-model"]


def test_state_rest_and_restart(tmp_path):
    srv = start(tmp_path)
    sc = client(srv)
    tc = sc.create_lora_training_client(base_model="fake-model", rank=4).result()
    tc.forward_backward([datum([1, 2, 3])], "cross_entropy")
    tc.optim_step(types.AdamParams(learning_rate=1e-3))
    path = tc.save_state("ckpt").result().path
    assert path == f"tinker://{tc.model_id}/weights/ckpt"
    rest = tinker.RestClient(base_url=srv.url, api_key="tml-alice-key")
    assert [c.checkpoint_id for c in rest.list_checkpoints(tc.model_id).result().checkpoints] == [
        "weights/ckpt"
    ]
    sc.close("success").result()
    srv.stop()

    srv = start(tmp_path)  # same data dir, fresh engine
    sc = client(srv)
    tc2 = sc.create_training_client_from_state_with_optimizer(path).result()
    assert tc2.get_info().lora_rank == 4 and tc2.model_id != tc.model_id
    out = tc2.forward([datum([1, 2, 3])], "cross_entropy").result()
    assert out.loss_fn_outputs[0]["logprobs"].tolist() == [-2.0, -2.0]  # step 1 restored
    rest = tinker.RestClient(base_url=srv.url, api_key="tml-alice-key")
    runs = rest.list_training_runs().result()
    assert {r.training_run_id for r in runs.training_runs} == {tc.model_id, tc2.model_id}
    assert rest.get_training_run(tc.model_id).result().last_checkpoint.tinker_path == path
    rest.delete_checkpoint(tc.model_id, "weights/ckpt").result()
    assert rest.list_checkpoints(tc.model_id).result().checkpoints == []
    srv.stop()


def test_auth_and_tenant_isolation(server):
    with pytest.raises(tinker.AuthenticationError):
        tinker.RestClient(base_url=server.url, api_key="tml-wrong").list_training_runs().result()
    r = httpx.get(f"{server.url}/api/v1/training_runs")
    assert r.status_code == 401 and "X-API-Key" in r.json()["detail"]

    alice = client(server)
    tc = alice.create_lora_training_client(base_model="fake-model", rank=4).result()
    path = tc.save_state("mine").result().path
    bob_rest = tinker.RestClient(base_url=server.url, api_key="tml-bob-key")
    assert bob_rest.list_training_runs().result().training_runs == []
    with pytest.raises(tinker.NotFoundError):
        bob_rest.get_training_run(tc.model_id).result()
    bob = client(server, "tml-bob-key")
    with pytest.raises(tinker.NotFoundError):
        bob.create_training_client_from_state(path).result()
    http = httpx.Client(base_url=server.url, headers={"X-API-Key": "tml-bob-key"})
    r = http.post(
        "/api/v1/optim_step",
        json={"model_id": tc.model_id, "seq_id": 2, "adam_params": {"learning_rate": 0.1}},
    )
    assert r.status_code == 404
    http.close()


def test_malformed_requests_get_4xx_and_server_keeps_serving(server):
    import itertools

    sc = client(server)
    tc = sc.create_lora_training_client(base_model="fake-model", rank=4).result()
    raw = sc.create_lora_training_client(base_model="fake-model", rank=4).result()
    http = httpx.Client(base_url=server.url, headers={"X-API-Key": "tml-alice-key"})
    proto = {"Content-Type": "application/x-protobuf"}
    raw_seq = itertools.count(1)  # a rejected command uses up its seq_id too

    def fb_body(
        d: types.Datum,
        loss: str = "cross_entropy",
        model_id: str | None = None,
        config: dict | None = None,
    ):
        from tinker.proto.request_conv import forward_backward_request_to_proto

        req = types.ForwardBackwardRequest(
            forward_backward_input=types.ForwardBackwardInput(
                data=[d], loss_fn=loss, loss_fn_config=config
            ),
            model_id=model_id or raw.model_id,
            seq_id=1 if model_id else next(raw_seq),
        )
        return forward_backward_request_to_proto(req).SerializeToString()

    cases = [
        (b"\xff\xff garbage", "protobuf"),
        (fb_body(datum([1, 2, 3, VOCAB + 5])), "outside the vocabulary"),
        (
            fb_body(
                types.Datum(
                    model_input=types.ModelInput.from_ints([1, 2]),
                    loss_fn_inputs={"target_tokens": [2, 3, 4], "weights": [1.0, 1.0, 1.0]},
                )
            ),
            "shape",
        ),
        (fb_body(datum([1, 2, 3]), "ppo"), "missing ['logprobs', 'advantages']"),
        (fb_body(datum([1, 2, 3]), "no_such_loss"), "not supported"),
        (fb_body(datum([1, 2, 3]), config={"clip": 1.0}), "unknown loss_fn_config keys"),
        (fb_body(datum([1, 2, 3]), model_id="nope:train:0"), "unknown model_id"),
    ]
    for body, needle in cases:
        r = http.post("/api/v1/forward_backward", content=body, headers=proto)
        assert 400 <= r.status_code < 500, (needle, r.status_code)
        assert needle in r.json()["detail"], (needle, r.json())
    r = http.post("/api/v1/create_model", json={"session_id": "x"})
    assert r.status_code == 400 and "base_model" in r.json()["detail"]
    r = http.post(
        "/api/v1/asample",
        json={
            "sampling_session_id": "nope",
            "num_samples": 1,
            "seq_id": 0,
            "prompt": {"chunks": [{"type": "encoded_text", "tokens": [1]}]},
            "sampling_params": {"max_tokens": 2},
        },
    )
    assert r.status_code == 404
    with pytest.raises(tinker.NotFoundError, match="unknown base_model"):
        sc.create_lora_training_client(base_model="no-such-model", rank=4).result()
    # The server still serves the same client normally, and the raw model's next command runs.
    out = tc.forward_backward([datum([1, 2, 3])], "cross_entropy").result()
    assert out.metrics["loss:sum"] == 1.0
    r = http.post("/api/v1/forward_backward", content=fb_body(datum([1, 2, 3])), headers=proto)
    done = http.post("/api/v1/retrieve_future", json={"request_id": r.json()["request_id"]})
    assert wire_decode(done).metrics["loss:sum"] == 1.0
    http.close()


def test_custom_loss_runs_client_side_over_forward_and_backward(server):
    sc = client(server)
    tc = sc.create_lora_training_client(base_model="fake-model", rank=4).result()

    def loss_fn(data, logprobs_list):
        loss = sum((lp**2).sum() for lp in logprobs_list)
        return loss, {"custom:sum": float(loss.detach())}

    out = tc.forward_backward_custom([datum([1, 2, 3, 4])], loss_fn).result()
    assert out.metrics["loss:sum"] == pytest.approx(3.0)  # three logprobs of -1, squared
    assert out.metrics["custom:sum"] == pytest.approx(3.0)
    # Backward pass sent weights = -dL/dlogprob = -2*lp = 2 per token, as cross_entropy.
    engine = server.service.models[0].engine
    assert [c[3:] for c in engine.calls] == [("cross_entropy", True), ("cross_entropy", False)]


def test_metric_names_are_made_reducible():
    assert wire.check_metric_names({"loss:sum": 1, "grad": 2, "a:b:c": 3}) == {
        "loss:sum": 1.0,
        "grad:mean": 2.0,
        "a_b_c:mean": 3.0,
    }


def test_tenants_with_different_ranks_share_sample_batches(tmp_path):
    import threading
    import time

    class SlowEngine(FakeEngine):
        def sample(self, requests):
            time.sleep(0.2)  # keeps the worker busy so concurrent requests queue up
            return super().sample(requests)

    srv = start(tmp_path, SlowEngine())
    samplers = {}
    for key, rank, steps in (("tml-alice-key", 4, 1), ("tml-bob-key", 8, 2)):
        tc = (
            client(srv, key)
            .create_lora_training_client(base_model="fake-model", rank=rank)
            .result()
        )
        assert tc.get_info().lora_rank == rank
        for _ in range(steps):
            tc.optim_step(types.AdamParams(learning_rate=1e-3)).result()
        samplers[key] = (tc.save_weights_and_get_sampling_client().result(), steps)
    results: dict[str, list] = {k: [] for k in samplers}

    def go(key: str) -> None:
        sc, _ = samplers[key]
        res = sc.sample(
            types.ModelInput.from_ints([1, 2]), 1, types.SamplingParams(max_tokens=2)
        ).result()
        results[key].append(res.sequences[0].tokens)

    threads = [threading.Thread(target=go, args=(k,)) for k in samplers for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for key, (_, steps) in samplers.items():
        assert results[key] == [[steps, steps]] * 3  # each tenant saw its own weights
    assert max(srv.service.models[0].worker.batch_sizes) > 1
    srv.stop()


def test_results_survive_restart_and_unfinished_requests_fail_cleanly(tmp_path):
    import threading

    gate = threading.Event()

    class GatedEngine(FakeEngine):
        def optim_step(self, model_id, params):
            gate.wait(10)
            return super().optim_step(model_id, params)

    srv = start(tmp_path, GatedEngine())
    sc = client(srv)
    tc = sc.create_lora_training_client(base_model="fake-model", rank=4).result()
    http = httpx.Client(base_url=srv.url, headers={"X-API-Key": "tml-alice-key"})
    done = http.post(
        "/api/v1/optim_step",
        json={"model_id": tc.model_id, "seq_id": 1, "adam_params": {"learning_rate": 0.1}},
    )
    stuck = http.post(
        "/api/v1/optim_step",
        json={"model_id": tc.model_id, "seq_id": 2, "adam_params": {"learning_rate": 0.1}},
    )
    gate.set()
    first = http.post("/api/v1/retrieve_future", json={"request_id": done.json()["request_id"]})
    assert first.json() == {"metrics": {"grad_norm": 1.0}}
    gate.clear()
    third = http.post(
        "/api/v1/optim_step",
        json={"model_id": tc.model_id, "seq_id": 3, "adam_params": {"learning_rate": 0.1}},
    )
    srv.server.should_exit = True  # stop HTTP while request 3 is still pending
    srv.thread.join()
    srv.service.store.close()
    gate.set()

    srv2 = start(tmp_path)
    http2 = httpx.Client(base_url=srv2.url, headers={"X-API-Key": "tml-alice-key"})
    again = http2.post("/api/v1/retrieve_future", json={"request_id": done.json()["request_id"]})
    assert again.json()["metrics"] == {"grad_norm": 1.0}  # kept until (and after) delivery
    assert stuck.json()["request_id"]
    lost = http2.post("/api/v1/retrieve_future", json={"request_id": third.json()["request_id"]})
    assert lost.json()["category"] == "server" and "restarted" in lost.json()["error"]
    other = httpx.post(
        f"{srv2.url}/api/v1/retrieve_future",
        json={"request_id": "x"},
        headers={"X-API-Key": "tml-bob-key"},
    )
    assert other.status_code == 404
    r = http2.post(
        "/api/v1/optim_step",
        json={"model_id": tc.model_id, "seq_id": 4, "adam_params": {"learning_rate": 0.1}},
    )
    assert r.status_code == 400 and "no longer loaded" in r.json()["detail"]
    http.close()
    http2.close()
    srv2.stop()


def test_finished_session_rejects_work_and_heartbeats(server):
    sc = client(server)
    tc = sc.create_lora_training_client(base_model="fake-model", rank=4).result()
    session_id = tc.model_id.split(":")[0]
    http = httpx.Client(base_url=server.url, headers={"X-API-Key": "tml-alice-key"})
    assert http.post("/api/v1/session_heartbeat", json={"session_id": session_id}).is_success
    sc.close("success").result()
    assert (
        http.post("/api/v1/session_heartbeat", json={"session_id": session_id}).status_code == 410
    )
    r = http.post(
        "/api/v1/optim_step",
        json={"model_id": tc.model_id, "seq_id": 1, "adam_params": {"learning_rate": 0.1}},
    )
    assert r.status_code == 400 and "is finished (success)" in r.json()["detail"]
    http.close()


def test_graceful_restart_is_transparent_to_a_running_client(tmp_path):
    """Stop saves live models; the same TrainingClient keeps going after a restart."""
    srv = start(tmp_path)
    port = srv.port
    sc = client(srv)
    tc = sc.create_lora_training_client(base_model="fake-model", rank=4).result()
    tc.forward_backward([datum([1, 2, 3])], "cross_entropy")
    tc.optim_step(types.AdamParams(learning_rate=1e-3)).result()
    srv.stop()

    model = ServedModel("fake-model", tmp_path / "model", FakeEngine(), {"fake"})
    srv = ServerThread(Service([model], tmp_path, dict(KEYS), long_poll_s=2.0), port=port).start()
    tc.optim_step(types.AdamParams(learning_rate=1e-3)).result()  # seq 3 continues
    out = tc.forward([datum([1, 2, 3])], "cross_entropy").result()
    assert out.loss_fn_outputs[0]["logprobs"].tolist() == [-3.0, -3.0]  # two steps taken
    srv.stop()


def test_external_weights_export_downloads_but_does_not_load(server, tmp_path):
    sc = client(server)
    tc = sc.create_lora_training_client(base_model="fake-model", rank=4).result()
    path = tc.save_weights_external("hf").result().path
    assert path == f"tinker://{tc.model_id}/external_weights/hf"
    rest = tinker.RestClient(base_url=server.url, api_key="tml-alice-key")
    [ckpt] = rest.list_checkpoints(tc.model_id).result().checkpoints
    assert ckpt.checkpoint_type == "external" and ckpt.size_bytes > 0
    # The files come back through signed URLs that need no API key.
    urls = rest.get_external_weights_urls(path).result().urls
    assert set(urls) == {"adapter_config.json"}
    assert json.loads(httpx.get(urls["adapter_config.json"]).content)["step"] == 0
    assert httpx.get(urls["adapter_config.json"].replace("sig=", "sig=0")).status_code == 403
    with pytest.raises(tinker.NotFoundError):
        tinker.RestClient(base_url=server.url, api_key="tml-bob-key").get_external_weights_urls(
            path
        ).result()
    with pytest.raises(tinker.BadRequestError, match="export for use elsewhere"):
        sc.create_sampling_client(model_path=path).result()


def test_engine_errors_come_back_as_failed_futures(tmp_path):
    """An error raised inside the engine reaches the SDK as RequestFailedError, category user."""

    class PickyEngine(FakeEngine):
        def forward_backward(self, model_id, data, *args, **kwargs):
            if len(data) > 1:
                raise ValueError("datum 1: something only the engine checks")
            return super().forward_backward(model_id, data, *args, **kwargs)

    srv = start(tmp_path, PickyEngine())
    tc = client(srv).create_lora_training_client(base_model="fake-model", rank=4).result()
    with pytest.raises(
        tinker.RequestFailedError, match="something only the engine checks"
    ) as failed:
        tc.forward_backward([datum([1, 2, 3]), datum([4, 5, 6])], "cross_entropy").result()
    assert failed.value.category == "user"
    assert (
        tc.forward_backward([datum([1, 2, 3])], "cross_entropy").result().metrics["loss:sum"] == 1.0
    )
    srv.stop()


def test_parallel_chunks_execute_in_seq_order(tmp_path):
    """Small chunks make the SDK send one call as 3 requests at once, first chunk last."""
    engine = FakeEngine()
    model = ServedModel("fake-model", tmp_path / "model", engine, {"fake"})
    service = Service([model], tmp_path, dict(KEYS), client_config={"fwdbwd_max_chunk_len": 2})
    with ServerThread(service) as srv:
        tc = client(srv).create_lora_training_client(base_model="fake-model", rank=4).result()
        data = [datum(list(range(1, n + 2))) for n in range(1, 6)]
        fb = tc.forward_backward(data, "cross_entropy")
        opt = tc.optim_step(types.AdamParams(learning_rate=1e-3))
        out = tc.forward(data[:1], "cross_entropy").result()
        res = fb.result()
        opt.result()
    assert [c[2] for c in engine.calls if c[0] == "fb"] == [2, 2, 1, 1]
    assert [len(o["logprobs"].tolist()) for o in res.loss_fn_outputs] == [1, 2, 3, 4, 5]
    assert res.metrics["loss:sum"] == 5.0  # chunk sums added by the SDK
    assert out.loss_fn_outputs[0]["logprobs"].tolist() == [-2.0]


def test_long_running_requests_answer_try_again_until_done(tmp_path, caplog):
    """A result slower than the long-poll window: the SDK gets try_again (HTTP 408) and polls on
    quietly; a 200 try_again would log a warning per poll."""
    import logging
    import time

    class SlowEngine(FakeEngine):
        def optim_step(self, model_id, params):
            time.sleep(0.6)
            return super().optim_step(model_id, params)

    model = ServedModel("fake-model", tmp_path / "model", SlowEngine(), {"fake"})
    with ServerThread(Service([model], tmp_path, dict(KEYS), long_poll_s=0.1)) as srv:
        tc = client(srv).create_lora_training_client(base_model="fake-model", rank=4).result()
        with caplog.at_level(logging.INFO):
            assert tc.optim_step(types.AdamParams(learning_rate=1e-3)).result().metrics == {
                "grad_norm": 1.0
            }
        # (heartbeats of other tests' sessions, whose servers are gone, are not this poll's)
        assert not [
            r
            for r in caplog.records
            if r.levelno >= logging.WARNING and "heartbeat" not in r.getMessage()
        ]
        http = httpx.Client(base_url=srv.url, headers={"X-API-Key": "tml-alice-key"})
        rid = http.post(
            "/api/v1/optim_step",
            json={"model_id": tc.model_id, "seq_id": 2, "adam_params": {"learning_rate": 0.1}},
        ).json()["request_id"]
        r = http.post("/api/v1/retrieve_future", json={"request_id": rid})
        assert r.status_code == 408
        assert r.json() == {"type": "try_again", "request_id": rid, "queue_state": "active"}
        http.close()


def test_sampler_weights_beyond_capacity_are_spilled_and_reloaded(tmp_path):
    """With room for one sampler in engine memory, three samplers still all answer correctly."""
    engine = FakeEngine()
    model = ServedModel("fake-model", tmp_path / "model", engine, {"fake"})
    with ServerThread(Service([model], tmp_path, dict(KEYS), resident_samplers=1)) as srv:
        sc = client(srv)
        tc = sc.create_lora_training_client(base_model="fake-model", rank=4).result()
        at_step0 = tc.save_weights_and_get_sampling_client().result()
        tc.optim_step(types.AdamParams(learning_rate=1e-3)).result()
        at_step1 = tc.save_weights_and_get_sampling_client().result()
        path = tc.save_weights_for_sampler("ckpt").result().path
        named = sc.create_sampling_client(model_path=path).result()
        prompt, params = types.ModelInput.from_ints([1, 2]), types.SamplingParams(max_tokens=2)
        for sampler, step in ((at_step0, 0), (at_step1, 1), (named, 1), (at_step0, 0)):
            assert sampler.sample(prompt, 1, params).result().sequences[0].tokens == [step] * 2
        assert len(engine.samplers) == 1
        rest = tinker.RestClient(base_url=srv.url, api_key="tml-alice-key")
        rest.delete_checkpoint_from_tinker_path(path).result()
        with pytest.raises(tinker.NotFoundError, match="not found"):
            named.sample(prompt, 1, params).result()
