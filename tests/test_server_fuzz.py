"""Property-based fuzzing of the wire: whatever a client sends, the answer is never a 5xx and
the server serves a normal call afterwards.

Hypothesis draws JSON bodies over the SDK's request schemas (the right field names with values
of any JSON type, NaN/Infinity literals, huge ints, deep nesting), raw bytes under every
``Content-Encoding``, ``ForwardBackwardRequest`` protobufs with arbitrary tensors (dtypes,
shapes, sparse layouts, token ids, seq_ids), and path/query parameters of the GET endpoints. The
normal run is bounded to a few seconds and draws the same cases every time; ``-m slow`` runs
many more, freshly drawn. ``TALLY`` counts what was sent and how it was answered (printed with
``-s``): the figures in docs/server.md come from there.
"""

from __future__ import annotations

import json
from collections import Counter

import httpx
import numpy as np
import pytest
import tinker
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_server_limits import LIMITS, PROTO, serves, start
from test_server_wire import VOCAB
from tinker import types
from tinker.proto import tinker_public_pb2 as pb

FAST, SLOW = 40, 1500
TALLY: Counter[str] = Counter()

JSON_ENDPOINTS = {
    "create_session": types.CreateSessionRequest,
    "create_model": types.CreateModelRequest,
    "optim_step": types.OptimStepRequest,
    "load_weights": types.LoadWeightsRequest,
    "save_weights": types.SaveWeightsRequest,
    "save_weights_for_sampler": types.SaveWeightsForSamplerRequest,
    "save_weights_external": types.SaveWeightsExternalRequest,
    "asample": types.SampleRequest,
    "create_sampling_session": types.CreateSamplingSessionRequest,
    "get_info": types.GetInfoRequest,
    "retrieve_future": types.FutureRetrieveRequest,
    "session_heartbeat": types.SessionHeartbeatRequest,
    "weights_info": None,
    "trinity/export_peft": None,
}
# Field names that nest, with the names found inside them.
NESTED = {
    "adam_params": ["learning_rate", "beta1", "beta2", "eps", "weight_decay", "grad_clip_norm"],
    "lora_config": ["rank", "seed", "train_unembed", "train_mlp", "train_attn"],
    "sampling_params": ["max_tokens", "seed", "stop", "temperature", "top_k", "top_p"],
    "prompt": ["chunks"],
    "optimizer_config": ["type"],
}

numbers = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, 1, -1, 2**31, 2**63, 1e308, 1e-320]),
)
scalars = st.one_of(st.none(), st.booleans(), numbers, st.text(max_size=40))
json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


@st.composite
def json_requests(draw) -> tuple[str, bytes]:
    path = draw(st.sampled_from(sorted(JSON_ENDPOINTS)))
    model = JSON_ENDPOINTS[path]
    names = list(model.model_fields) if model else ["tinker_path", "directory"]
    body = {}
    for name in draw(st.lists(st.sampled_from(names), max_size=len(names), unique=True)):
        if name in NESTED and draw(st.booleans()):
            inner = draw(st.lists(st.sampled_from(NESTED[name]), unique=True))
            body[name] = {k: draw(json_values) for k in inner}
        elif name == "prompt":
            tokens = draw(st.lists(st.integers(-5, VOCAB + 5), max_size=8))
            body[name] = {"chunks": [{"type": "encoded_text", "tokens": tokens}]}
        else:
            body[name] = draw(json_values)
    if draw(st.integers(0, 9)) == 0:  # now and then something that is not a request at all
        body = draw(json_values)
    return path, json.dumps(body, allow_nan=True).encode()


@st.composite
def raw_bodies(draw) -> tuple[str, bytes, dict[str, str]]:
    path = draw(st.sampled_from([*sorted(JSON_ENDPOINTS), "forward_backward"]))
    headers = {}
    encoding = draw(st.sampled_from([None, "gzip", "deflate", "zstd", "br", "gzip, zstd"]))
    if encoding:
        headers["Content-Encoding"] = encoding
    if path == "forward_backward" or draw(st.booleans()):
        headers["Content-Type"] = draw(
            st.sampled_from(["application/x-protobuf", "application/json", "text/plain"])
        )
    nest = draw(st.integers(0, 3000))
    body = draw(st.one_of(st.binary(max_size=200), st.just(b"[" * nest + b"]" * nest)))
    return path, body, headers


DTYPES = [pb.DTYPE_FLOAT32, pb.DTYPE_INT64, pb.DTYPE_INT32, pb.DTYPE_BFLOAT16, 99]
INPUT_NAMES = ["target_tokens", "weights", "logprobs", "advantages", "mask", "clip_low_threshold"]


@st.composite
def tensors(draw) -> pb.Tensor:
    tensor = pb.Tensor()
    tensor.dtype = draw(st.sampled_from(DTYPES))
    tensor.shape.extend(draw(st.lists(st.integers(0, 2**45), max_size=3)))
    if draw(st.booleans()):
        values = draw(st.lists(st.floats(width=32), max_size=8))
        if tensor.dtype == pb.DTYPE_FLOAT32:
            tensor.dense = np.asarray(values, dtype=np.float32).tobytes()
        else:
            tensor.dense = draw(st.binary(max_size=64))
    else:
        csr = tensor.sparse_csr
        csr.crow_indices = np.asarray(
            draw(st.lists(st.integers(-3, 10), max_size=4)), dtype=np.int64
        ).tobytes()
        csr.col_indices = np.asarray(
            draw(st.lists(st.integers(-3, 2**40), max_size=4)), dtype=np.int64
        ).tobytes()
        csr.values = draw(st.binary(max_size=32))
    return tensor


@st.composite
def forward_backward_bodies(draw, model_id: str) -> bytes:
    msg = pb.ForwardBackwardRequest()
    msg.model_id = draw(st.sampled_from([model_id, "", "nope:train:0"]))
    msg.seq_id = draw(st.integers(-(2**31), 2**31 - 1))
    msg.loss_fn = draw(st.sampled_from(["cross_entropy", "ppo", "importance_sampling", "", "x"]))
    msg.forward_only = draw(st.booleans())
    for key in draw(st.lists(st.sampled_from(["clip_low_threshold", "beta", "return_entropy"]))):
        msg.loss_fn_config[key] = draw(st.floats(width=32))
    for _ in range(draw(st.integers(0, 3))):
        datum = msg.data.add()
        chunk = datum.model_input.add()
        tokens = draw(st.lists(st.integers(-(2**31), 2**31 - 1), max_size=8))
        chunk.encoded_text.tokens = np.asarray(tokens, dtype=np.int32).tobytes()
        if draw(st.integers(0, 9)) == 0:
            chunk.encoded_text.tokens += b"\x01"  # not a whole int32
        for name in draw(st.lists(st.sampled_from(INPUT_NAMES), max_size=4, unique=True)):
            datum.loss_fn_inputs[name].CopyFrom(draw(tensors()))
    return msg.SerializeToString()


@st.composite
def get_requests(draw) -> tuple[str, dict]:
    part = st.text(max_size=30)
    run, ckpt = draw(part), draw(part)
    path = draw(
        st.sampled_from(
            [
                "training_runs",
                f"training_runs/{run}",
                f"training_runs/{run}/checkpoints",
                f"training_runs/{run}/checkpoints/{ckpt}/external_weights_urls",
                f"samplers/{run}",
                "checkpoints",
                "trinity/checkpoint_file",
            ]
        )
    )
    keys = ["limit", "offset", "tenant", "path", "file", "expires", "sig"]
    query = {
        k: draw(st.one_of(st.integers(-(2**70), 2**70).map(str), st.text(max_size=20)))
        for k in draw(st.lists(st.sampled_from(keys), unique=True))
    }
    return path, query


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = start(tmp_path_factory.mktemp("fuzz"), LIMITS)
    yield srv
    srv.stop()
    print(f"\nfuzz tally: {dict(TALLY)}")


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, headers={"X-API-Key": "tml-alice-key"}) as h:
        yield h


@pytest.fixture(scope="module")
def training(server):
    sc = tinker.ServiceClient(base_url=server.url, api_key="tml-alice-key")
    return sc.create_lora_training_client(base_model="fake-model", rank=4).result()


def answered(r: httpx.Response, what: str) -> None:
    """Count the answer; a 5xx fails with the request that caused it."""
    TALLY["tried"] += 1
    TALLY["refused (4xx)" if 400 <= r.status_code < 500 else "accepted (2xx)"] += 1
    assert r.status_code < 500, f"{what} -> {r.status_code}: {r.text[:300]}"


def fuzz(strategy, send, examples: int) -> None:
    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=examples <= FAST,  # the normal run: the same cases every time
        suppress_health_check=list(HealthCheck),
    )
    @given(strategy)
    def run(case) -> None:
        send(case)

    run()


def post_json(http: httpx.Client, case: tuple[str, bytes]) -> None:
    path, body = case
    r = http.post(f"/api/v1/{path}", content=body, headers={"Content-Type": "application/json"})
    answered(r, f"POST {path} {body[:200]!r}")


def post_raw(http: httpx.Client, case: tuple[str, bytes, dict]) -> None:
    path, body, headers = case
    answered(http.post(f"/api/v1/{path}", content=body, headers=headers), f"POST {path} {case}")


def post_proto(http: httpx.Client, body: bytes) -> None:
    r = http.post("/api/v1/forward_backward", content=body, headers=PROTO)
    answered(r, f"forward_backward {body[:200]!r}")


def get(http: httpx.Client, case: tuple[str, dict]) -> None:
    path, query = case
    try:
        r = http.get(f"/api/v1/{path}", params=query)
    except httpx.InvalidURL:  # a path httpx itself will not send
        return
    answered(r, f"GET {path} {query}")


def campaign(http, training, examples: int) -> None:
    fuzz(json_requests(), lambda case: post_json(http, case), examples)
    fuzz(raw_bodies(), lambda case: post_raw(http, case), examples)
    fuzz(forward_backward_bodies(training.model_id), lambda b: post_proto(http, b), examples)
    fuzz(get_requests(), lambda case: get(http, case), examples)


def test_fuzzed_requests_never_get_a_5xx_and_the_server_keeps_serving(server, http, training):
    campaign(http, training, FAST)
    fresh = tinker.ServiceClient(base_url=server.url, api_key="tml-alice-key")
    serves(fresh.create_lora_training_client(base_model="fake-model", rank=4).result())


@pytest.mark.slow
def test_fuzz_campaign_long(server, http, training):
    campaign(http, training, SLOW)
    fresh = tinker.ServiceClient(base_url=server.url, api_key="tml-alice-key")
    serves(fresh.create_lora_training_client(base_model="fake-model", rank=4).result())
