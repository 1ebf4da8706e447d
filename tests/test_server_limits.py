"""Hostile input at the wire: every bad number, size or string is a 4xx naming it, never a 500,
never an allocation the request did not pay for, and the server serves the next call normally.

Runs the real app over loopback with the official SDK (and raw httpx where the SDK would not send
the request) on the scripted stand-in engine of ``test_server_wire``.
"""

from __future__ import annotations

import gzip
import math
import re
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import tinker
import zstandard
from test_server_wire import KEYS, FakeEngine, client, datum
from tinker import types
from tinker.proto import tinker_public_pb2 as pb
from tinker.proto.request_conv import forward_backward_request_to_proto

from trinity.server import ServedModel, ServerThread, Service
from trinity.server.limits import Limits, MiB

LIMITS = Limits(max_body_bytes=1 * MiB, max_decoded_bytes=4 * MiB, max_lora_rank=32)
PROTO = {"Content-Type": "application/x-protobuf"}


def start(data_dir, limits: Limits = LIMITS, engine: FakeEngine | None = None) -> ServerThread:
    model = ServedModel("fake-model", data_dir / "model", engine or FakeEngine(), {"fake"})
    service = Service([model], data_dir, dict(KEYS), long_poll_s=2.0, limits=limits)
    return ServerThread(service).start()


@pytest.fixture
def server(tmp_path):
    srv = start(tmp_path)
    yield srv
    srv.stop()


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server.url, headers={"X-API-Key": "tml-alice-key"}) as h:
        yield h


def serves(tc: tinker.TrainingClient) -> None:
    """A normal call right after a bad one gets its normal answer."""
    out = tc.forward_backward([datum([1, 2, 3])], "cross_entropy").result()
    assert out.metrics["loss:sum"] == 1.0


def fb_body(model_id: str, seq_id: int, d: types.Datum) -> bytes:
    req = types.ForwardBackwardRequest(
        forward_backward_input=types.ForwardBackwardInput(data=[d], loss_fn="cross_entropy"),
        model_id=model_id,
        seq_id=seq_id,
    )
    return forward_backward_request_to_proto(req).SerializeToString()


@pytest.mark.parametrize(
    ("field", "value", "needle"),
    [
        ("learning_rate", 1e308, "learning_rate must be finite and in [0.0, 1.0]"),
        ("learning_rate", -1e-3, "learning_rate"),
        ("beta1", 1.0, "beta1 must be finite and in [0.0, 1.0)"),
        ("beta2", -0.1, "beta2"),
        ("eps", 0.0, "eps must be finite and in (0.0, 1.0]"),
        ("weight_decay", -1.0, "weight_decay"),
        ("grad_clip_norm", -1.0, "grad_clip_norm"),
    ],
)
def test_optimizer_params_must_be_finite_and_in_range(server, field, value, needle):
    tc = client(server).create_lora_training_client(base_model="fake-model", rank=4).result()
    engine = server.service.models[0].engine
    with pytest.raises(tinker.BadRequestError, match=re.escape(needle)):
        tc.optim_step(
            types.AdamParams(learning_rate=1e-3).model_copy(update={field: value})
        ).result()
    assert ("optim", tc.model_id) not in engine.calls
    serves(tc)
    assert tc.optim_step(types.AdamParams(learning_rate=1e-3)).result().metrics == {
        "grad_norm": 1.0
    }


@pytest.mark.parametrize("literal", [b"NaN", b"Infinity", b"-Infinity", b"1e400"])
def test_non_finite_json_numbers_are_refused(server, http, literal):
    """Python's JSON parser takes NaN/Infinity literals and overflows 1e400 to inf."""
    tc = client(server).create_lora_training_client(base_model="fake-model", rank=4).result()
    body = b'{"model_id": "%s", "seq_id": 1, "adam_params": {"learning_rate": %s}}'
    r = http.post("/api/v1/optim_step", content=body % (tc.model_id.encode(), literal))
    assert r.status_code == 400, r.text
    assert ("optim", tc.model_id) not in server.service.models[0].engine.calls
    serves(tc)


@pytest.mark.parametrize(
    ("name", "values", "needle"),
    [
        ("weights", [1.0, math.nan], "'weights'] holds NaN or infinite values"),
        ("advantages", [math.inf, 0.0], "'advantages'] holds NaN or infinite values"),
        ("logprobs", [-1.0, -math.inf], "'logprobs'] holds NaN or infinite values"),
        ("target_tokens", [2.0, math.nan], "'target_tokens'] holds NaN or infinite values"),
        ("target_tokens", [2.5, 3.0], "non-integer token ids"),
    ],
)
def test_non_finite_datum_values_are_refused(server, name, values, needle):
    tc = client(server).create_lora_training_client(base_model="fake-model", rank=4).result()
    inputs = {"target_tokens": [2, 3], "weights": [1.0, 1.0], "logprobs": [-1.0, -1.0]}
    inputs["advantages"] = [0.5, 0.5]
    inputs[name] = np.asarray(values, dtype=np.float32)
    bad = types.Datum(model_input=types.ModelInput.from_ints([1, 2]), loss_fn_inputs=inputs)
    with pytest.raises(tinker.BadRequestError, match=re.escape(needle)):
        tc.forward_backward([bad], "importance_sampling").result()
    serves(tc)


def test_a_sparse_tensor_declaring_a_huge_shape_is_refused_before_allocation(server, http):
    tc = client(server).create_lora_training_client(base_model="fake-model", rank=4).result()
    msg = pb.ForwardBackwardRequest()
    msg.ParseFromString(fb_body(tc.model_id, 1, datum([1, 2, 3])))
    weights = msg.data[0].loss_fn_inputs["weights"]
    weights.Clear()
    weights.dtype = pb.DTYPE_FLOAT32
    weights.shape.append(1 << 40)  # 4 TiB dense, from a few bytes
    weights.sparse_csr.crow_indices = np.array([0, 1], dtype=np.int64).tobytes()
    weights.sparse_csr.col_indices = np.array([0], dtype=np.int64).tobytes()
    weights.sparse_csr.values = np.array([1.0], dtype=np.float32).tobytes()
    started = time.monotonic()
    r = http.post("/api/v1/forward_backward", content=msg.SerializeToString(), headers=PROTO)
    assert r.status_code == 400 and "declares shape [1099511627776]" in r.json()["detail"]
    assert time.monotonic() - started < 5
    # The refused command used up seq_id 1: the model's next command runs.
    r = http.post(
        "/api/v1/forward_backward", content=fb_body(tc.model_id, 2, datum([1, 2, 3])), headers=PROTO
    )
    done = http.post("/api/v1/retrieve_future", json={"request_id": r.json()["request_id"]})
    assert done.status_code == 200 and done.headers["content-type"] == PROTO["Content-Type"]


def test_lora_rank_is_bounded_by_the_configured_maximum(server):
    sc = client(server)
    for rank in (10**9, 33, 0):
        with pytest.raises(tinker.BadRequestError, match=r"rank must be in \[1, 32\]"):
            sc.create_lora_training_client(base_model="fake-model", rank=rank).result()
    serves(sc.create_lora_training_client(base_model="fake-model", rank=32).result())


def test_body_and_decompression_limits_answer_413(server, http):
    tc = client(server).create_lora_training_client(base_model="fake-model", rank=4).result()
    big = b'{"x": "' + b"a" * (2 * MiB) + b'"}'
    r = http.post("/api/v1/create_session", content=big)
    assert r.status_code == 413 and "limit of 1048576 bytes" in r.json()["detail"]
    # ~10 KiB on the wire, 10 MiB decoded: refused without decoding past the 4 MiB cap.
    bomb = gzip.compress(b" " * (10 * MiB))
    assert len(bomb) < 64 * 1024
    r = http.post("/api/v1/create_session", content=bomb, headers={"Content-Encoding": "gzip"})
    assert r.status_code == 413 and "expands (gzip)" in r.json()["detail"]
    zbomb = zstandard.ZstdCompressor().compress(b"\0" * (10 * MiB))
    r = http.post(
        "/api/v1/forward_backward",
        content=zbomb,
        headers={**PROTO, "Content-Encoding": "zstd"},
    )
    assert r.status_code == 413 and "expands (zstd)" in r.json()["detail"]
    r = http.post(
        "/api/v1/create_session", content=b"\x1f\x8bnot gzip", headers={"Content-Encoding": "gzip"}
    )
    assert r.status_code == 400
    # Compressed requests within the limits work: a gzip JSON body and the SDK's zstd protobuf.
    body = b'{"tags": [], "sdk_version": "0.38", "user_metadata": null}'
    r = http.post(
        "/api/v1/create_session", content=gzip.compress(body), headers={"Content-Encoding": "gzip"}
    )
    assert r.status_code == 200, r.text
    fb = zstandard.ZstdCompressor().compress(fb_body(tc.model_id, 1, datum([1, 2, 3])))
    r = http.post(
        "/api/v1/forward_backward", content=fb, headers={**PROTO, "Content-Encoding": "zstd"}
    )
    assert r.status_code == 200, r.text
    serves(tc)


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        (b"[" * 100_000 + b"]" * 100_000, "nests deeper than 32"),
        (b'{"user_metadata": ' + b'{"a": ' * 40 + b"1" + b"}" * 41, "nests deeper than 32"),
        (b'{"tags": [], "n": NaN}', "NaN is not a number JSON allows"),
        (b'{"tags": [], "n": 1e999}', "overflows a 64-bit float"),
        (b'{"tags": [], "n": 100000000000000000000000000000}', "outside the 64-bit range"),
        (b"\xff\xfe{", "not valid JSON"),
    ],
)
def test_hostile_json_is_a_400(server, http, body, needle):
    r = http.post("/api/v1/create_session", content=body)
    assert r.status_code == 400 and needle in r.json()["detail"], r.text
    serves(client(server).create_lora_training_client(base_model="fake-model", rank=4).result())


def test_names_ttls_and_paths_are_bounded(server, http):
    sc = client(server)
    tc = sc.create_lora_training_client(base_model="fake-model", rank=4).result()
    with pytest.raises(tinker.BadRequestError, match="must be 1 to 128 letters"):
        tc.save_state("n" * 4000).result()
    for ttl in (10**18, -5):
        with pytest.raises(tinker.BadRequestError, match="ttl_seconds must be in"):
            tc.save_state("fine", ttl_seconds=ttl).result()
    r = http.post("/api/v1/weights_info", json={"tinker_path": "tinker://" + "r/" * 5000})
    assert r.status_code == 400 and "at most 1024" in r.json()["detail"]
    path = tc.save_state("fine", ttl_seconds=3600).result().path
    rest = tinker.RestClient(base_url=server.url, api_key="tml-alice-key")
    [ckpt] = rest.list_checkpoints(tc.model_id).result().checkpoints
    assert ckpt.tinker_path == path and ckpt.expires_at is not None
    serves(tc)


@pytest.mark.parametrize(
    ("update", "needle"),
    [
        ({"temperature": -1.0}, "temperature must be in [0, 100]"),
        ({"top_p": 0.0}, "top_p must be in (0, 1]"),
        ({"top_k": -7}, "top_k must be -1 or 0 (off) or positive"),
        ({"seed": -1}, "seed must be in [0, 2**63)"),
        ({"stop": ["x"] * 65}, "at most 64 allowed"),
        ({"stop": [10**6]}, "outside the vocabulary"),
    ],
)
def test_sampling_params_are_checked(server, update, needle):
    sc = client(server)
    sampler = sc.create_sampling_client(base_model="fake-model").result()
    prompt = types.ModelInput.from_ints([1, 2, 3])
    params = types.SamplingParams(max_tokens=2).model_copy(update=update)
    with pytest.raises(tinker.BadRequestError) as refused:
        sampler.sample(prompt, 1, params).result()
    assert needle in str(refused.value)
    ok = sampler.sample(prompt, 1, types.SamplingParams(max_tokens=2)).result()
    assert ok.sequences[0].tokens == [0, 0]


def test_limits_are_checked_when_configured():
    with pytest.raises(ValueError, match="max_lora_rank must be a positive integer"):
        Limits(max_lora_rank=0)
    with pytest.raises(ValueError, match="held_timeout_s must be a positive number"):
        Limits(held_timeout_s=math.nan)


def test_a_non_finite_grad_norm_never_goes_out_as_null(tmp_path):
    class NaNEngine(FakeEngine):
        def optim_step(self, model_id, params):
            return {"grad_norm": math.nan}

    srv = start(tmp_path, engine=NaNEngine())
    tc = client(srv).create_lora_training_client(base_model="fake-model", rank=4).result()
    with pytest.raises(tinker.RequestFailedError, match="non-finite metrics"):
        tc.optim_step(types.AdamParams(learning_rate=1e-3)).result()
    serves(tc)
    srv.stop()


def test_export_peft_writes_only_inside_the_callers_own_space(server, http, tmp_path):
    alice = client(server).create_lora_training_client(base_model="fake-model", rank=4).result()
    mine = alice.save_state("mine").result().path
    bob = client(server, "tml-bob-key").create_lora_training_client(base_model="fake-model", rank=4)
    bob_path = bob.result().save_state("theirs").result().path
    [bob_ckpt] = [c for c in server.service.store.checkpoints("bob", None)]
    bob_dir = Path(bob_ckpt["directory"])
    before = {f: f.read_bytes() for f in bob_dir.rglob("*") if f.is_file()}
    data_dir = server.service.data_dir
    escapes = [
        str(tmp_path / "abs"),  # absolute
        "../bob/x",  # another user's export space
        "../../checkpoints",  # the checkpoints of everyone
        "a/../../../escape",
        str(bob_dir),  # another user's checkpoint, by its absolute path
        "",
    ]
    for directory in escapes:
        r = http.post(
            "/api/v1/trinity/export_peft", json={"tinker_path": mine, "directory": directory}
        )
        assert r.status_code == 400, (directory, r.text)
    link = data_dir / "exports" / "alice" / "link"
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(bob_dir)
    r = http.post("/api/v1/trinity/export_peft", json={"tinker_path": mine, "directory": "link"})
    assert r.status_code == 400 and "outside your export space" in r.json()["detail"]
    assert {f: f.read_bytes() for f in bob_dir.rglob("*") if f.is_file()} == before
    assert not (tmp_path / "abs").exists()
    # Bob's checkpoint is not Alice's to export, wherever she would put it.
    r = http.post("/api/v1/trinity/export_peft", json={"tinker_path": bob_path, "directory": "b"})
    assert r.status_code == 404
    # An unusable directory (a file in the way) is the caller's problem: 400, not 500.
    (data_dir / "exports" / "alice" / "file").write_text("x")
    r = http.post(
        "/api/v1/trinity/export_peft", json={"tinker_path": mine, "directory": "file/sub"}
    )
    assert r.status_code == 400 and "cannot write" in r.json()["detail"], r.text
    r = http.post(
        "/api/v1/trinity/export_peft", json={"tinker_path": mine, "directory": "runs/one"}
    )
    assert r.status_code == 200, r.text
    written = Path(r.json()["directory"])
    assert written == (data_dir / "exports" / "alice" / "runs" / "one").resolve()
    assert (written / "adapter_config.json").is_file()


def test_offline_export_never_writes_over_the_state_dir_or_a_full_directory(tmp_path, capsys):
    """``trinity server export`` is refused (exit 2, before any model loads) for an OUT_DIR in
    the state dir outside ``exports/`` (a checkpoint, the SQLite file, the dir itself) or one
    that exists and is not empty; nothing there changes."""
    from trinity.cli.server import main
    from trinity.server.wire import offline_export_dir

    data_dir = tmp_path / "state"
    srv = start(data_dir)
    tc = client(srv).create_lora_training_client(base_model="fake-model", rank=4).result()
    path = tc.save_state("mine").result().path
    bob = client(srv, "tml-bob-key").create_lora_training_client(base_model="fake-model", rank=4)
    bob.result().save_state("theirs").result()
    [bob_ckpt] = srv.service.store.checkpoints("bob", None)
    srv.stop()
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("x")
    (tmp_path / "link").symlink_to(bob_ckpt["directory"])
    before = {f: f.read_bytes() for f in data_dir.rglob("*") if f.is_file()}
    for out in [
        bob_ckpt["directory"],
        str(data_dir),
        str(data_dir / "server.sqlite"),
        str(data_dir / "checkpoints" / "new"),
        str(tmp_path / "link"),  # a symlink into the state dir
        str(full),
    ]:
        assert main(["export", path, out, "--state-dir", str(data_dir)]) == 2, out
        assert "OUT_DIR" in capsys.readouterr().err
    assert {f: f.read_bytes() for f in data_dir.rglob("*") if f.is_file()} == before
    assert (full / "keep.txt").read_text() == "x" and len(list(full.iterdir())) == 1
    for fine in [tmp_path / "new", full.parent / "empty", data_dir / "exports" / "a"]:
        assert offline_export_dir(data_dir, str(fine)) == fine.resolve()


def test_overwrite_never_leaves_a_row_pointing_at_nothing(server):
    """A kill between writing the new copy and switching the row (simulated: the switch raises)
    leaves the old checkpoint loadable; after a completed overwrite the new one loads and the old
    copy is gone."""
    sc = client(server)
    tc = sc.create_lora_training_client(base_model="fake-model", rank=4).result()
    path = tc.save_state("ck").result().path  # step 0
    tc.forward_backward([datum([1, 2, 3])], "cross_entropy")
    tc.optim_step(types.AdamParams(learning_rate=1e-3)).result()  # step 1
    store = server.service.store
    switch = store.add_checkpoint

    def killed(*args, **kwargs):
        raise SystemExit("killed between writing the new copy and switching the row")

    store.add_checkpoint = killed
    try:
        with pytest.raises(tinker.RequestFailedError):
            tc.save_state("ck", overwrite=True).result()
    finally:
        store.add_checkpoint = switch
    [row] = store.checkpoints("alice", tc.model_id)
    assert Path(row["directory"]).is_dir()
    restored = sc.create_training_client_from_state(path).result()
    out = restored.forward([datum([1, 2, 3])], "cross_entropy").result()
    assert out.loss_fn_outputs[0]["logprobs"].tolist() == [-1.0, -1.0]  # the old step 0

    assert tc.save_state("ck", overwrite=True).result().path == path
    [new_row] = store.checkpoints("alice", tc.model_id)
    assert not Path(row["directory"]).exists() and Path(new_row["directory"]).is_dir()
    restored = sc.create_training_client_from_state(path).result()
    out = restored.forward([datum([1, 2, 3])], "cross_entropy").result()
    assert out.loss_fn_outputs[0]["logprobs"].tolist() == [-2.0, -2.0]  # the new step 1


def test_a_request_held_for_a_gap_that_never_fills_expires(tmp_path):
    srv = start(tmp_path, Limits(held_timeout_s=0.5, max_held_per_tenant=2))
    tc = client(srv).create_lora_training_client(base_model="fake-model", rank=4).result()
    with httpx.Client(base_url=srv.url, headers={"X-API-Key": "tml-alice-key"}) as http:
        far = [
            http.post(
                "/api/v1/forward_backward",
                content=fb_body(tc.model_id, seq, datum([1, 2, 3])),
                headers=PROTO,
            )
            for seq in (10**6, 10**6 + 1, 10**6 + 2)
        ]
        assert [r.status_code for r in far] == [200, 200, 429]
        assert "already wait" in far[2].json()["detail"]
        started = time.monotonic()
        r = http.post("/api/v1/retrieve_future", json={"request_id": far[0].json()["request_id"]})
        failure = r.json()
        assert "waited" in failure["error"] and "which never arrived" in failure["error"]
        assert time.monotonic() - started < 10
    assert srv.service.training._held["alice"] == 0  # nothing held any more
    serves(tc)
    srv.stop()


@pytest.mark.parametrize(
    ("flag", "value", "needle"),
    [
        ("--max-lora-rank", "0", "max_lora_rank must be a positive integer"),
        ("--held-timeout-s", "nan", "held_timeout_s must be a positive number"),
        ("--max-body-mb", "0", "max_body_bytes must be a positive integer"),
    ],
)
def test_bad_limit_flags_exit_2_before_loading_a_model(tmp_path, capsys, flag, value, needle):
    from trinity.cli.server import main

    argv = ["--model", str(tmp_path / "no-model"), "--state-dir", str(tmp_path), flag, value]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1


def test_a_training_command_that_fails_validation_still_uses_up_its_seq_id(server):
    """The SDK sends a NaN learning rate as null, which the request schema refuses; the next
    command must not wait for that seq_id forever."""
    tc = client(server).create_lora_training_client(base_model="fake-model", rank=4).result()
    with pytest.raises(tinker.BadRequestError, match="learning_rate"):
        tc.optim_step(types.AdamParams(learning_rate=math.nan)).result()
    serves(tc)


def test_a_download_signature_of_any_text_is_a_403(server, http):
    query = {"tenant": "alice", "path": "p", "file": "f", "expires": 1, "sig": "\u00e9\U000df3e2"}
    r = http.get("/api/v1/trinity/checkpoint_file", params=query)
    assert r.status_code == 403 and "invalid or expired" in r.json()["detail"]


def test_a_restart_removes_copies_a_kill_left_mid_overwrite(tmp_path):
    srv = start(tmp_path)
    tc = client(srv).create_lora_training_client(base_model="fake-model", rank=4).result()
    path = tc.save_state("ck").result().path
    tc.save_state("ck", overwrite=True).result()  # the row now points at ck@<hex>
    [row] = srv.service.store.checkpoints("alice", tc.model_id)
    srv.stop()
    kind_dir = next((tmp_path / "checkpoints").glob("*/*/weights"))
    orphans = [kind_dir / "ck@0123456789ab", kind_dir / "ck@ba9876543210.partial"]
    for orphan in orphans:
        orphan.mkdir()
        (orphan / "state.json").write_text("{}")
    srv = start(tmp_path)
    assert not any(o.exists() for o in orphans)
    assert "@" in row["directory"] and Path(row["directory"], "state.json").is_file()
    restored = client(srv).create_training_client_from_state(path).result()
    serves(restored)
    srv.stop()
