"""End to end: the official SDK over loopback HTTP against ``trinity server`` on the real engine.

The tiny random Llama (``tiny_model_dir``) keeps every call fast. The server is compared with
the engine used in-process on the same datums, so a wire or ordering bug shows up as a number.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest
import tinker
from tinker import types

from trinity.server import ServerThread, build_service

KEYS = {"tml-alice": "alice", "tml-bob": "bob"}
RANK = 4


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    service = build_service([str(tiny_model_dir)], tmp_path_factory.mktemp("srv"), dict(KEYS))
    srv = ServerThread(service).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def local_engine(tiny_model_dir):
    from trinity.engine import Engine

    return Engine(str(tiny_model_dir))


def client(srv: ServerThread, key: str = "tml-alice") -> tinker.ServiceClient:
    return tinker.ServiceClient(base_url=srv.url, api_key=key)


def rl_datums(seed: int = 0, n: int = 3) -> list[types.Datum]:
    rng = np.random.default_rng(seed)
    out = []
    for length in range(6, 6 + n):
        seq = rng.integers(5, 200, size=length + 1)
        out.append(
            types.Datum(
                model_input=types.ModelInput.from_ints(seq[:-1].tolist()),
                loss_fn_inputs={
                    "target_tokens": seq[1:].astype(np.int64),
                    "weights": np.r_[np.zeros(2), np.ones(length - 2)].astype(np.float32),
                    "logprobs": (-rng.uniform(2, 8, size=length)).astype(np.float32),
                    "advantages": np.r_[np.zeros(2), rng.normal(size=length - 2)].astype(
                        np.float32
                    ),
                },
            )
        )
    return out


def only(data: list[types.Datum], keys: tuple[str, ...]) -> list[types.Datum]:
    return [
        types.Datum(
            model_input=d.model_input, loss_fn_inputs={k: d.loss_fn_inputs[k] for k in keys}
        )
        for d in data
    ]


def assert_outputs_close(a: types.ForwardBackwardOutput, b: types.ForwardBackwardOutput) -> None:
    assert a.metrics["loss:sum"] == pytest.approx(b.metrics["loss:sum"], rel=1e-4, abs=1e-4)
    for x, y in zip(a.loss_fn_outputs, b.loss_fn_outputs, strict=True):
        np.testing.assert_allclose(
            x["logprobs"].to_numpy(), y["logprobs"].to_numpy(), rtol=1e-4, atol=1e-4
        )


LOSSES = {
    "cross_entropy": (("target_tokens", "weights"), None),
    "importance_sampling": (("target_tokens", "logprobs", "advantages"), None),
    "ppo": (
        ("target_tokens", "logprobs", "advantages"),
        {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2},
    ),
    "cispo": (
        ("target_tokens", "logprobs", "advantages"),
        {"clip_low_threshold": 0.0, "clip_high_threshold": 4.0},
    ),
    "dro": (("target_tokens", "logprobs", "advantages"), {"beta": 0.05}),
    "gspo": (("target_tokens", "logprobs", "advantages"), {"clip_high_threshold": 1.5}),
    "stable_reinforce": (("target_tokens", "logprobs", "advantages"), None),
}


def test_forward_backward_matches_engine_in_process(server, local_engine):
    """Every built-in loss, then an optimizer step, through the server == in-process."""
    from trinity.engine import LoraSpec

    sc = client(server)
    tc = sc.create_lora_training_client(
        base_model=server.service.models[0].name, rank=RANK, seed=7
    ).result()
    local_engine.create_model("parity", LoraSpec(rank=RANK, seed=7))
    data = rl_datums()
    for loss, (keys, config) in LOSSES.items():
        remote = tc.forward_backward(only(data, keys), loss, config).result()
        local = local_engine.forward_backward("parity", only(data, keys), loss, config)
        assert_outputs_close(remote, local)
    adam = types.AdamParams(learning_rate=1e-2)
    tc.optim_step(adam).result()
    local_engine.optim_step("parity", adam)
    after = tc.forward(only(data, LOSSES["cross_entropy"][0]), "cross_entropy").result()
    local_after = local_engine.forward_backward(
        "parity", only(data, LOSSES["cross_entropy"][0]), "cross_entropy", None, forward_only=True
    )
    assert_outputs_close(after, local_after)
    local_engine.remove_model("parity")
    sc.close("success").result()


def test_entropy_extension_and_chunked_calls(server):
    sc = client(server)
    tc = sc.create_lora_training_client(
        base_model=server.service.models[0].name, rank=RANK
    ).result()
    data = only(rl_datums(1, 4), ("target_tokens", "weights"))
    out = tc.forward(data, "cross_entropy", {"return_entropy": 1.0}).result()
    for d, o in zip(data, out.loss_fn_outputs, strict=True):
        ent = o["entropy"].to_numpy()
        assert ent.shape == (d.model_input.length,) and (ent >= 0).all()
    # A custom loss runs client-side: forward, then cross_entropy with weights = -dL/dlogp.
    custom = tc.forward_backward_custom(
        data, lambda ds, lps: (sum(-lp.sum() for lp in lps), {})
    ).result()
    plain = tc.forward(data, "cross_entropy").result()
    total = -sum(float(o["logprobs"].to_numpy().sum()) for o in plain.loss_fn_outputs)
    assert custom.metrics["loss:sum"] == pytest.approx(total, rel=1e-4)
    sc.close("success").result()


def test_sampling_and_tokenizer_from_local_files(server, tiny_model_dir, monkeypatch):
    from transformers import AutoTokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    sc = client(server)
    name = server.service.models[0].name
    tc = sc.create_lora_training_client(base_model=name, rank=RANK).result()
    ref = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    tok = tc.get_tokenizer()
    assert tok.encode("hello world") == ref.encode("hello world")
    prompt = types.ModelInput.from_ints(ref.encode("The answer is"))
    params = types.SamplingParams(max_tokens=5, temperature=1.0, seed=3, stop=[])

    sampler = tc.save_weights_and_get_sampling_client().result()
    assert sampler.get_tokenizer().encode("hi") == ref.encode("hi")
    res = sampler.sample(prompt, 2, params).result()
    assert len(res.sequences) == 2
    for seq in res.sequences:
        assert len(seq.tokens) == 5 and len(seq.logprobs) == 5
        assert seq.stop_reason == "length" and seq.sequence_id
    # The sampler's prompt logprobs agree with the learner's forward pass on the same tokens.
    full = prompt.to_ints() + res.sequences[0].tokens
    lps = sampler.compute_logprobs(types.ModelInput.from_ints(full)).result()
    fwd = tc.forward(
        [
            types.Datum(
                model_input=types.ModelInput.from_ints(full[:-1]),
                loss_fn_inputs={"target_tokens": full[1:], "weights": [1.0] * (len(full) - 1)},
            )
        ],
        "cross_entropy",
    ).result()
    assert lps[0] is None
    np.testing.assert_allclose(lps[1:], fwd.loss_fn_outputs[0]["logprobs"].to_numpy(), atol=2e-2)

    path = tc.save_weights_for_sampler("s0").result().path
    named = sc.create_sampling_client(model_path=path).result()
    assert named.get_base_model() == name
    again = named.sample(prompt, 1, params).result().sequences[0]
    assert len(again.tokens) == 5
    base = sc.create_sampling_client(base_model=name).result()
    assert len(base.sample(prompt, 1, params).result().sequences[0].tokens) == 5
    caps = tinker.RestClient(base_url=server.url, api_key="tml-alice")
    assert caps.get_server_capabilities().result().supported_models[0].model_name == name
    sc.close("success").result()


def test_concurrent_clients_train_like_sequential_and_share_sample_batches(server, local_engine):
    """Two tenants (LoRA ranks 4 and 8) train at once on one base model: each gets exactly the
    losses of its run alone in-process; then their samplers' requests decode in one batch, each
    on its own weights."""
    from trinity.engine import LoraSpec

    name = server.service.models[0].name
    keys, config = LOSSES["ppo"]
    data = only(rl_datums(3), keys)
    adam = types.AdamParams(learning_rate=1e-2)
    runs = {"tml-alice": (4, 11), "tml-bob": (8, 12)}
    results: dict[str, tuple] = {}

    def train(key: str) -> None:
        rank, seed = runs[key]
        tc = (
            client(server, key)
            .create_lora_training_client(base_model=name, rank=rank, seed=seed)
            .result()
        )
        losses = []
        for _ in range(2):  # both submitted before either is awaited, as the cookbook does
            fb, op = tc.forward_backward(data, "ppo", config), tc.optim_step(adam)
            losses.append(fb.result().metrics["loss:sum"])
            op.result()
        results[key] = (tc, losses)

    threads = [threading.Thread(target=train, args=(k,)) for k in runs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for key, (rank, seed) in runs.items():
        local_engine.create_model(key, LoraSpec(rank=rank, seed=seed))
        expected = []
        for _ in range(2):
            expected.append(
                local_engine.forward_backward(key, data, "ppo", config).metrics["loss:sum"]
            )
            local_engine.optim_step(key, adam)
        local_engine.remove_model(key)
        assert results[key][1] == pytest.approx(expected, rel=1e-4, abs=1e-4)

    full = data[0].model_input.to_ints() + [
        int(data[0].loss_fn_inputs["target_tokens"].to_numpy()[-1])
    ]
    samplers = {
        k: tc.save_weights_and_get_sampling_client().result() for k, (tc, _) in results.items()
    }
    worker = server.service.models[0].worker
    busy = worker.call(time.sleep, 1.0)  # hold the engine so both requests queue up
    logprobs: dict[str, list] = {}
    threads = [
        threading.Thread(
            target=lambda k=k: logprobs.__setitem__(
                k, samplers[k].compute_logprobs(types.ModelInput.from_ints(full)).result()
            )
        )
        for k in samplers
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    busy.result()
    assert max(worker.batch_sizes[-3:]) >= 2
    for key, (tc, _) in results.items():
        learner = tc.forward([data[0]], "ppo", config).result()
        np.testing.assert_allclose(
            logprobs[key][1:], learner.loss_fn_outputs[0]["logprobs"].to_numpy(), atol=2e-2
        )
    assert not np.allclose(logprobs["tml-alice"][1:], logprobs["tml-bob"][1:], atol=1e-3)


def test_restart_continues_from_state_with_optimizer(tiny_model_dir, tmp_path):
    data = only(rl_datums(2), ("target_tokens", "weights"))
    adam = types.AdamParams(learning_rate=1e-2)

    def step(tc: tinker.TrainingClient) -> None:
        tc.forward_backward(data, "cross_entropy")
        tc.optim_step(adam).result()

    srv = ServerThread(build_service([str(tiny_model_dir)], tmp_path, dict(KEYS))).start()
    name = srv.service.models[0].name
    sc = client(srv)
    tc = sc.create_lora_training_client(base_model=name, rank=RANK, seed=1).result()
    step(tc)
    path = tc.save_state("step1").result().path
    before = tc.forward(data, "cross_entropy").result()
    step(tc)  # the reference: an uninterrupted second step
    expected = tc.forward(data, "cross_entropy").result()
    srv.stop()

    srv = ServerThread(build_service([str(tiny_model_dir)], tmp_path, dict(KEYS))).start()
    sc = client(srv)
    resumed = sc.create_training_client_from_state_with_optimizer(path).result()
    assert resumed.get_info().lora_rank == RANK
    assert_outputs_close(resumed.forward(data, "cross_entropy").result(), before)
    step(resumed)
    assert_outputs_close(resumed.forward(data, "cross_entropy").result(), expected)
    weights_only = sc.create_training_client_from_state(path).result()
    assert_outputs_close(weights_only.forward(data, "cross_entropy").result(), before)
    fresh = sc.create_lora_training_client(base_model=name, rank=RANK).result()
    with pytest.warns(FutureWarning, match="deprecated"):  # the older TrainingClient call
        fresh.load_state_with_optimizer(path).result()
    step(fresh)
    assert_outputs_close(fresh.forward(data, "cross_entropy").result(), expected)
    rest = tinker.RestClient(base_url=srv.url, api_key="tml-alice")
    run_ids = {r.training_run_id for r in rest.list_training_runs().result().training_runs}
    assert {tc.model_id, resumed.model_id} <= run_ids
    assert [c.tinker_path for c in rest.list_checkpoints(tc.model_id).result().checkpoints] == [
        path
    ]
    srv.stop()


def test_tenants_isolated_and_malformed_requests_rejected(server):
    name = server.service.models[0].name
    alice = client(server)
    tc = alice.create_lora_training_client(base_model=name, rank=RANK).result()
    path = tc.save_state("private").result().path
    bob = client(server, "tml-bob")
    with pytest.raises(tinker.NotFoundError):
        bob.create_sampling_client(model_path=path).result()
    bob_tc = bob.create_lora_training_client(base_model=name, rank=8).result()
    assert bob_tc.get_info().lora_rank == 8
    assert tc.model_id not in {
        r.training_run_id
        for r in tinker.RestClient(base_url=server.url, api_key="tml-bob")
        .list_training_runs()
        .result()
        .training_runs
    }
    with pytest.raises(tinker.AuthenticationError):
        tinker.ServiceClient(
            base_url=server.url, api_key="tml-mallory"
        ).create_lora_training_client(base_model=name, rank=RANK).result()

    vocab = server.service.models[0].vocab_size
    bad = types.Datum(
        model_input=types.ModelInput.from_ints([1, 2, vocab]),
        loss_fn_inputs={"target_tokens": [2, 3, 4], "weights": [1.0] * 3},
    )
    with pytest.raises(tinker.BadRequestError, match="outside the vocabulary"):
        tc.forward_backward([bad], "cross_entropy").result()
    http = httpx.Client(base_url=server.url, headers={"X-API-Key": "tml-bob"})
    r = http.post(
        "/api/v1/forward_backward",
        content=b"not a protobuf",
        headers={"Content-Type": "application/x-protobuf"},
    )
    assert r.status_code == 400 and "protobuf" in r.json()["detail"]
    http.close()
    ok = bob_tc.forward(only(rl_datums(), ("target_tokens", "weights")), "cross_entropy").result()
    assert len(ok.loss_fn_outputs) == 3


def test_cli_serves_and_exports_peft(tiny_model_dir, tmp_path):
    """``trinity server`` as a subprocess; the trained adapter leaves it as a peft directory
    twice: downloaded by the SDK (``save_weights_external``, Tinker's names) and by ``trinity
    server export`` (peft's names)."""
    from trinity.server.runner import free_port

    port, data_dir = free_port(), tmp_path / "data"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "trinity.cli.server",
            "--model",
            str(tiny_model_dir),
            "--port",
            str(port),
            "--state-dir",
            str(data_dir),
            "--api-key",
            "tml-cli=team",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/api/v1/healthz").is_success:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline
            time.sleep(0.2)
        sc = tinker.ServiceClient(base_url=url, api_key="tml-cli")
        tc = sc.create_lora_training_client(base_model=str(tiny_model_dir), rank=RANK).result()
        tc.forward_backward(only(rl_datums(), ("target_tokens", "weights")), "cross_entropy")
        tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()
        path = tc.save_state("final").result().path
        external = tc.save_weights_external("final").result().path
        urls = (
            tinker.RestClient(base_url=url, api_key="tml-cli")
            .get_external_weights_urls(external)
            .result()
            .urls
        )
        downloaded = tmp_path / "downloaded"
        downloaded.mkdir()
        for name, file_url in urls.items():
            (downloaded / name).write_bytes(httpx.get(file_url).raise_for_status().content)
        sc.close("success").result()
    finally:
        proc.terminate()
        proc.wait(30)

    from trinity.cli.server import main

    exported = tmp_path / "exported"
    assert main(["export", path, str(exported), "--state-dir", str(data_dir)]) == 0
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), exported
    )
    assert model.peft_config["default"].r == RANK
    # the SDK's download carries Tinker's names (tests/test_server_compat.py merges it)
    assert json.loads((downloaded / "adapter_config.json").read_text())["r"] == RANK


TIMEOUT_S = 20  # far beyond a call on the tiny model; a hung call fails the test instead


def _rejected(tc: tinker.TrainingClient, sc: tinker.ServiceClient, case: str) -> None:
    """Make ``tc`` send one ordered call that the server answers with a 4xx."""
    data = only(rl_datums(), ("target_tokens", "weights"))
    bad_token = types.Datum(
        model_input=types.ModelInput.from_ints([1, 2, 10**6]),
        loss_fn_inputs={"target_tokens": [2, 3, 4], "weights": [1.0] * 3},
    )
    if case == "unknown loss_fn":
        with pytest.raises(tinker.BadRequestError, match="'no_such_loss'.*stable_reinforce"):
            tc.forward_backward(data, "no_such_loss").result(TIMEOUT_S)
    elif case == "token outside the vocabulary":
        with pytest.raises(tinker.BadRequestError, match="outside the vocabulary"):
            tc.forward([bad_token], "cross_entropy").result(TIMEOUT_S)
    elif case == "negative learning rate":
        with pytest.raises(tinker.BadRequestError, match="learning_rate"):
            tc.optim_step(types.AdamParams(learning_rate=-1.0)).result(TIMEOUT_S)
    elif case == "save_state twice with one name":
        tc.save_state("twice").result(TIMEOUT_S)
        with pytest.raises(tinker.BadRequestError, match="already exists"):
            tc.save_state("twice").result(TIMEOUT_S)
    elif case == "bad checkpoint name":
        with pytest.raises(tinker.BadRequestError, match="checkpoint name"):
            tc.save_weights_for_sampler("no/slash").result(TIMEOUT_S)
    elif case == "load_state of a malformed path":
        with pytest.raises(tinker.BadRequestError, match="is not tinker://"):
            tc.load_state("s3://bucket/ckpt").result(TIMEOUT_S)
    elif case == "load_state of an unknown checkpoint":
        with pytest.raises(tinker.NotFoundError, match="not found"):
            tc.load_state(f"tinker://{tc.model_id}/weights/never-saved").result(TIMEOUT_S)
    elif case == "optimizer state from sampler weights":
        path = tc.save_weights_for_sampler("weights-only").result(TIMEOUT_S).path
        with pytest.raises(tinker.BadRequestError, match="no optimizer state"):
            tc.load_state_with_optimizer(path).result(TIMEOUT_S)
    elif case == "load_state of another LoRA rank":
        other = sc.create_lora_training_client(
            base_model=tc.get_info().model_data.model_name, rank=RANK * 2
        ).result(TIMEOUT_S)
        path = other.save_state("rank8").result(TIMEOUT_S).path
        with pytest.raises(tinker.BadRequestError, match="has LoRA"):
            tc.load_state(path).result(TIMEOUT_S)
    elif case == "encrypted external weights":
        with pytest.raises(tinker.BadRequestError, match="age_encryption_recipients"):
            tc.save_weights_external("enc", age_encryption_recipients=["age1x"]).result(TIMEOUT_S)
    elif case == "load_state of external weights":
        path = tc.save_weights_external("hf").result(TIMEOUT_S).path
        with pytest.raises(tinker.BadRequestError, match="export for use elsewhere"):
            tc.load_state(path).result(TIMEOUT_S)
    else:
        raise AssertionError(case)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # TrainingClient.load_state* are deprecated
@pytest.mark.parametrize(
    "case",
    [
        "unknown loss_fn",
        "token outside the vocabulary",
        "negative learning rate",
        "save_state twice with one name",
        "bad checkpoint name",
        "load_state of a malformed path",
        "load_state of an unknown checkpoint",
        "optimizer state from sampler weights",
        "load_state of another LoRA rank",
        "encrypted external weights",
        "load_state of external weights",
    ],
)
def test_a_rejected_training_call_does_not_hold_up_the_next(server, case):
    """A training call answered with a 4xx still uses up its seq_id: the client's next calls
    run (they used to wait for it in the ordering queue, polled with 408s forever)."""
    sc = client(server)
    tc = sc.create_lora_training_client(base_model=server.service.models[0].name, rank=RANK).result(
        TIMEOUT_S
    )
    data = only(rl_datums(), ("target_tokens", "weights"))
    _rejected(tc, sc, case)
    fb = tc.forward_backward(data, "cross_entropy")
    step = tc.optim_step(types.AdamParams(learning_rate=1e-2))
    assert fb.result(TIMEOUT_S).metrics["loss:sum"] > 0
    assert "grad_norm" in step.result(TIMEOUT_S).metrics
    assert tc.save_state("after").result(TIMEOUT_S).path.endswith("/weights/after")
    sc.close("success").result(TIMEOUT_S)
