"""What crosses the wire: requests decoded and checked, results encoded.

Every check of a request's own content lives here, so a bad request is a 4xx at submission with
a message that names the offending datum and field, and ``service.py`` only orchestrates; lookups
(an unknown model, session, checkpoint) stay with the state they look up. Protobuf goes through
the SDK's own generated module (``tinker_public_pb2``): ``ForwardBackwardRequest`` (optionally
zstd-compressed) becomes ``tinker.types.Datum``s with dense numpy ``TensorData`` (sparse CSR
inputs are densified here, so the engine only ever sees dense tensors); ``ForwardBackwardOutput``
and ``SampleResponse`` are written in the exact layout the SDK's ``response_conv`` reads back.

Extension: ``loss_fn_config={"return_entropy": 1}`` (a number, so the unmodified SDK carries it)
adds a per-token ``entropy`` field to every ``loss_fn_outputs`` entry, next to ``logprobs``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
from google.protobuf.message import DecodeError
from tinker import types
from tinker.proto import tinker_public_pb2 as pb
from tinker.proto.response_conv import _tensor_data_from_proto

from trinity.engine import losses
from trinity.server.futures import ServiceError

PROTO_CONTENT_TYPE = "application/x-protobuf"
_FLOAT_INPUTS = {
    "weights",
    "logprobs",
    "advantages",
    "clip_low_threshold",
    "clip_high_threshold",
    "sequence_ratio_mask",
}
# The kinds in a tinker:// path -> the SDK's ``Checkpoint.checkpoint_type``.
KINDS = {"weights": "training", "sampler_weights": "sampler", "external_weights": "external"}
_NAME_RE = re.compile(r"^[A-Za-z0-9_.\-]+$")
MAX_NAME_CHARS = 128  # a checkpoint name is one directory name (filesystems allow 255 bytes)
MAX_PATH_CHARS = 1024
MAX_TTL_S = 10 * 365 * 86400


class WireError(ServiceError):
    """A malformed or semantically invalid request: HTTP 400 with this message."""

    def __init__(self, message: str):
        super().__init__(400, message)


@dataclass
class FwdBwdRequest:
    model_id: str
    seq_id: int
    data: list[types.Datum]
    loss_fn: str
    loss_fn_config: dict[str, float | str]
    forward_only: bool
    return_entropy: bool  # our extension: loss_fn_config["return_entropy"] = 1
    problem: str | None = None  # why the content is refused, said in its turn (validate_request)


def decode_forward_backward(body: bytes, max_dense_bytes: int = 1 << 30) -> FwdBwdRequest:
    """Parse the SDK's protobuf ``/forward_backward`` body (structure only, not the model);
    ``body`` is already decompressed (``limits.read_body``). The datums' tensors, densified,
    may take at most ``max_dense_bytes`` together, estimated before any is allocated."""
    msg = pb.ForwardBackwardRequest()
    try:
        msg.ParseFromString(body)
    except DecodeError as exc:
        raise WireError(f"body is not a valid ForwardBackwardRequest protobuf: {exc}") from None
    if not msg.model_id:
        raise WireError("ForwardBackwardRequest.model_id is empty")
    if not msg.loss_fn:
        raise WireError("ForwardBackwardRequest.loss_fn is empty")
    config: dict[str, float | str] = {k: float(v) for k, v in msg.loss_fn_config.items()}
    for key, value in msg.loss_fn_config_v2.items():  # v2 wins where both are set
        kind = value.WhichOneof("value")
        config[key] = value.text if kind == "text" else float(value.number)
    # Bad content is refused once the command has its place, so it still uses up its seq_id.
    problem, data = None, []
    try:
        for key, value in config.items():
            if isinstance(value, float) and not math.isfinite(value):
                raise WireError(f"ForwardBackwardRequest.loss_fn_config[{key!r}] is {value}")
        budget = [max_dense_bytes]
        data = [_decode_datum(i, d, budget) for i, d in enumerate(msg.data)]
        if not data:
            raise WireError("ForwardBackwardRequest has no data")
    except WireError as exc:
        problem = exc.message
    entropy = bool(config.pop("return_entropy", 0))
    return FwdBwdRequest(
        msg.model_id, msg.seq_id, data, msg.loss_fn, config, msg.forward_only, entropy, problem
    )


def _decode_datum(index: int, d: pb.Datum, budget: list[int]) -> types.Datum:
    """One datum; ``budget[0]`` is what densifying its tensors may still allocate."""
    tokens: list[int] = []
    for chunk in d.model_input:
        kind = chunk.WhichOneof("chunk")
        if kind != "encoded_text":
            raise WireError(
                f"datum {index}: model_input chunk type {kind!r} is not supported "
                "(text tokens only)"
            )
        raw = chunk.encoded_text.tokens
        if len(raw) % 4:
            raise WireError(
                f"datum {index}: encoded_text.tokens is {len(raw)} bytes, "
                "not a whole number of int32"
            )
        tokens.extend(np.frombuffer(raw, dtype=np.int32).tolist())
    inputs: dict[str, types.TensorData] = {}
    for name, tensor in d.loss_fn_inputs.items():
        if not tensor.shape and tensor.WhichOneof("encoding") == "dense":
            tensor = _with_flat_shape(tensor)  # a shapeless dense tensor is 1-D
        where = f"datum {index}: loss_fn_inputs[{name!r}]"
        budget[0] -= _dense_bytes(tensor, where, budget[0])
        try:
            td = _tensor_data_from_proto(tensor)
            arr = td.to_numpy()
        except Exception as exc:  # noqa: BLE001 - any decode failure is the client's
            raise WireError(
                f"datum {index}: loss_fn_inputs[{name!r}] cannot be decoded: {exc}"
            ) from None
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise WireError(f"{where} holds NaN or infinite values")
        want = np.float32 if name in _FLOAT_INPUTS else None
        if name == "target_tokens":
            want = np.int64
            if arr.dtype.kind == "f" and not (arr == np.round(arr)).all():
                raise WireError(f"{where} holds non-integer token ids")
        if want is not None and arr.dtype != want:
            arr = arr.astype(want)
        inputs[name] = types.TensorData.from_numpy(np.ascontiguousarray(arr))
    return types.Datum(model_input=types.ModelInput.from_ints(tokens), loss_fn_inputs=inputs)


_ITEMSIZE = {pb.DTYPE_FLOAT32: 4, pb.DTYPE_INT64: 8, pb.DTYPE_INT32: 4, pb.DTYPE_BFLOAT16: 2}


def _dense_bytes(tensor: pb.Tensor, where: str, budget: int) -> int:
    """What the dense form of ``tensor`` takes, refused before allocation beyond ``budget``."""
    if any(dim < 0 for dim in tensor.shape):
        raise WireError(f"{where} has a negative dimension in shape {list(tensor.shape)}")
    size = _ITEMSIZE.get(tensor.dtype, 8)
    for dim in tensor.shape:
        size *= dim
        if size > budget:
            break
    if size > budget:
        raise WireError(
            f"{where} declares shape {list(tensor.shape)}, more than the {budget} bytes "
            "this request may still allocate"
        )
    return size


def _with_flat_shape(tensor: pb.Tensor) -> pb.Tensor:
    flat = pb.Tensor()
    flat.CopyFrom(tensor)
    size = _ITEMSIZE.get(tensor.dtype)
    if size:
        flat.shape.append(len(tensor.dense) // size)
    return flat


def validate_request(req: FwdBwdRequest, vocab_size: int, max_context: int | None) -> None:
    """Check loss, config, shapes and token ranges before anything reaches the engine, so a bad
    request is a 400 at submission rather than a failed future later."""
    if req.problem is not None:
        raise WireError(req.problem)
    if req.loss_fn not in losses.LOSSES:
        raise WireError(
            f"loss_fn {req.loss_fn!r} is not supported; this server implements "
            f"{', '.join(losses.LOSSES)} (client-side custom losses work via "
            "forward_backward_custom)"
        )
    try:
        losses.resolve_config(req.loss_fn, req.loss_fn_config)
    except ValueError as exc:
        raise WireError(str(exc)) from None
    loss_fn, loss = req.loss_fn, losses.LOSSES[req.loss_fn]
    required, per_token = loss.inputs, {*loss.inputs, *loss.optional_inputs, *loss.input_defaults}
    for i, datum in enumerate(req.data):
        tokens = np.asarray(datum.model_input.to_ints(), dtype=np.int64)
        n = len(tokens)
        if n == 0:
            raise WireError(f"datum {i}: model_input is empty")
        if max_context and n > max_context:
            raise WireError(
                f"datum {i}: model_input has {n} tokens, more than the model's "
                f"context length {max_context}"
            )
        _check_ids(tokens, vocab_size, f"datum {i}: model_input")
        missing = [k for k in required if k not in datum.loss_fn_inputs]
        if missing:
            raise WireError(
                f"datum {i}: loss_fn {loss_fn!r} needs loss_fn_inputs "
                f"{list(required)}; missing {missing}"
            )
        for name, td in datum.loss_fn_inputs.items():
            shape = list(td.to_numpy().shape)
            if name in per_token and shape != [n]:
                raise WireError(
                    f"datum {i}: loss_fn_inputs[{name!r}] has shape {shape}, "
                    f"expected [{n}] (one value per model_input token)"
                )
        _check_ids(
            datum.loss_fn_inputs["target_tokens"].to_numpy(),
            vocab_size,
            f"datum {i}: target_tokens",
        )


def _check_ids(ids: np.ndarray, vocab_size: int, where: str) -> None:
    if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        bad = int(ids.min()) if int(ids.min()) < 0 else int(ids.max())
        raise WireError(f"{where} has token id {bad}, outside the vocabulary [0, {vocab_size})")


MAX_SAMPLE_K = 1024
"""Bound on ``topk_sample_logprobs`` / ``prompt_alt_tokens_k``: their buffers are
(tokens x k), kept per row for the whole decode."""


def check_sample_request(
    req: types.SampleRequest, vocab_size: int, max_context: int | None
) -> tuple[list[int], types.SamplingParams]:
    """The prompt tokens and sampling params (``max_tokens`` filled in), or a 400."""
    tokens: list[int] = []
    for chunk in req.prompt.chunks:
        if chunk.type != "encoded_text":
            raise WireError(
                f"SampleRequest.prompt: chunk type {chunk.type!r} is not supported "
                "(encoded_text only)"
            )
        tokens.extend(chunk.tokens)
    if not tokens:
        raise WireError("SampleRequest.prompt is empty")
    bad = next((t for t in tokens if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise WireError(
            f"SampleRequest.prompt has token id {bad}, outside the vocabulary [0, {vocab_size})"
        )
    if not 1 <= req.num_samples <= 256:
        raise WireError(f"SampleRequest.num_samples must be in [1, 256], got {req.num_samples}")
    k = req.topk_prompt_logprobs
    if not 0 <= k <= vocab_size:
        raise WireError(f"SampleRequest.topk_prompt_logprobs must be in [0, {vocab_size}], got {k}")
    for name in ("topk_sample_logprobs", "prompt_alt_tokens_k"):
        k = getattr(req, name)
        if not 0 <= k <= min(vocab_size, MAX_SAMPLE_K):
            raise WireError(
                f"SampleRequest.{name} must be in [0, {min(vocab_size, MAX_SAMPLE_K)}], got {k}"
            )
    if req.target_prompt_logprobs:
        raise WireError("SampleRequest.target_prompt_logprobs is not supported by this server")
    params = req.sampling_params
    _check_sampling_params(params, vocab_size)
    if params.max_tokens is None:
        params = params.model_copy(
            update={"max_tokens": min(256, (max_context or 10**9) - len(tokens))}
        )
    if params.max_tokens < 1:
        raise WireError(
            f"SampleRequest.sampling_params.max_tokens must be >= 1, got {params.max_tokens}"
        )
    if max_context and len(tokens) + params.max_tokens > max_context:
        raise WireError(
            f"SampleRequest: prompt ({len(tokens)} tokens) + max_tokens "
            f"({params.max_tokens}) exceeds the context length {max_context}"
        )
    last_n = req.prompt_logprobs_last_n
    if last_n is not None and not 1 <= last_n <= len(tokens) - 1:
        raise WireError(
            f"SampleRequest.prompt_logprobs_last_n must be in [1, {len(tokens) - 1}], got {last_n}"
        )
    return tokens, params


MAX_STOPS, MAX_STOP_CHARS = 64, 1024


def _check_sampling_params(params: types.SamplingParams, vocab_size: int) -> None:
    """Finite, in-range sampling numbers and a bounded ``stop`` list."""
    where = "SampleRequest.sampling_params"
    if not (math.isfinite(params.temperature) and 0 <= params.temperature <= 100):
        raise WireError(f"{where}.temperature must be in [0, 100], got {params.temperature}")
    if not (math.isfinite(params.top_p) and 0 < params.top_p <= 1):
        raise WireError(f"{where}.top_p must be in (0, 1], got {params.top_p}")
    if params.top_k < -1:
        raise WireError(f"{where}.top_k must be -1 or 0 (off) or positive, got {params.top_k}")
    if params.seed is not None and not 0 <= params.seed < 2**63:
        raise WireError(f"{where}.seed must be in [0, 2**63), got {params.seed}")
    stops = [params.stop] if isinstance(params.stop, str) else list(params.stop or ())
    if len(stops) > MAX_STOPS:
        raise WireError(f"{where}.stop has {len(stops)} entries, at most {MAX_STOPS} allowed")
    for stop in stops:
        if isinstance(stop, str) and not 0 < len(stop) <= MAX_STOP_CHARS:
            raise WireError(f"{where}.stop strings must be 1 to {MAX_STOP_CHARS} characters")
        if isinstance(stop, int) and not 0 <= stop < vocab_size:
            raise WireError(
                f"{where}.stop has token id {stop}, outside the vocabulary [0, {vocab_size})"
            )


def check_create_model(req: types.CreateModelRequest, max_lora_rank: int) -> dict | None:
    """The LoRA config as a dict (None: full fine-tuning) once optimizer and rank check out."""
    if req.optimizer_config.type != "adamw":
        raise WireError(
            f"CreateModelRequest.optimizer_config.type "
            f"{req.optimizer_config.type!r} is not supported (adamw only)"
        )
    lora = req.lora_config.model_dump() if req.lora_config is not None else None
    if lora is not None and not 1 <= lora["rank"] <= max_lora_rank:
        raise WireError(
            f"CreateModelRequest.lora_config.rank must be in [1, {max_lora_rank}] "
            f"(this server's max_lora_rank), got {lora['rank']}"
        )
    return lora


# AdamParams field -> (lowest, highest, whether the lowest itself is allowed); all must be finite.
_ADAM_RANGES = {
    "learning_rate": (0.0, 1.0, True),
    "beta1": (0.0, 1.0, True),
    "beta2": (0.0, 1.0, True),
    "eps": (0.0, 1.0, False),
    "weight_decay": (0.0, 1e3, True),
    "grad_clip_norm": (0.0, math.inf, True),
}


def check_optim_step(req: types.OptimStepRequest) -> types.AdamParams:
    """Finite, in-range AdamW hyperparameters: one absurd step would poison the model for good
    (betas must be < 1, eps > 0, the learning rate at most 1, decay at most 1 per step)."""
    params = req.optim_params
    if not isinstance(params, types.AdamParams):
        raise WireError(
            f"OptimStepRequest: optimizer {params.type!r} is not supported (adam_params only)"
        )
    for name, (low, high, low_ok) in _ADAM_RANGES.items():
        value = getattr(params, name)
        upper_ok = name not in ("beta1", "beta2")
        inside = (value > low or (low_ok and value == low)) and (
            value < high or (upper_ok and value == high)
        )
        if not (math.isfinite(value) and inside):
            interval = f"{'[' if low_ok else '('}{low}, {high}{']' if upper_ok else ')'}"
            raise WireError(
                f"OptimStepRequest.adam_params.{name} must be finite and in {interval}, got {value}"
            )
    if params.learning_rate * params.weight_decay > 1:
        raise WireError(
            "OptimStepRequest.adam_params: learning_rate * weight_decay must be at most 1 "
            f"(it scales the weights by 1 - lr * wd), got {params.learning_rate * params.weight_decay}"
        )
    return params


def check_load_target(req: types.LoadWeightsRequest) -> None:
    """Into a model as its command ``seq_id``, or into a new model of a session."""
    if req.session_id is None and req.model_id is None:
        raise WireError("LoadWeightsRequest needs model_id+seq_id or session_id+model_seq_id")
    if req.session_id is not None and req.model_seq_id is None:
        raise WireError("LoadWeightsRequest with session_id needs model_seq_id")


def check_load_optimizer(req: types.LoadWeightsRequest, checkpoint_type: str) -> None:
    """Optimizer state only comes from a training checkpoint."""
    if req.optimizer and checkpoint_type != "training":
        raise WireError(
            f"LoadWeightsRequest.path {req.path!r} holds sampler weights, which "
            "carry no optimizer state; load a tinker://.../weights/... checkpoint"
        )


def check_same_lora(path: str, checkpoint_lora: dict | None, model_lora: dict | None) -> None:
    """Loading into an existing model needs the LoRA rank it was saved with."""
    if (model_lora or {}).get("rank") != (checkpoint_lora or {}).get("rank"):
        raise WireError(
            f"LoadWeightsRequest.path {path!r} has LoRA {checkpoint_lora}, the "
            f"model has {model_lora}"
        )


def check_same_base(path: str, trained_on: str, requested: str | None, same: bool) -> None:
    if not same:
        raise WireError(f"checkpoint {path!r} was trained on {trained_on!r}, not {requested!r}")


def check_save_for_sampler(req: types.SaveWeightsForSamplerRequest) -> None:
    if req.path is None and req.sampling_session_seq_id is None:
        raise WireError(
            "SaveWeightsForSamplerRequest needs a path (name) or a sampling_session_seq_id"
        )


def check_checkpoint_name(name: str | None) -> str:
    """``name`` becomes one directory: a non-empty plain file name."""
    if not name or len(name) > MAX_NAME_CHARS or not _NAME_RE.match(name) or name in (".", ".."):
        shown = name if name is None or len(name) <= 60 else f"{name[:60]}...({len(name)} chars)"
        raise WireError(
            f"checkpoint name {shown!r} must be 1 to {MAX_NAME_CHARS} letters, "
            "digits, '_', '-' and '.'"
        )
    return name


def check_ttl(ttl_seconds: int | None) -> int | None:
    """A checkpoint's time to live: at most ten years; 0 or null: kept until deleted."""
    if ttl_seconds is not None and not 0 <= ttl_seconds <= MAX_TTL_S:
        raise WireError(f"ttl_seconds must be in [0, {MAX_TTL_S}] or null, got {ttl_seconds}")
    return ttl_seconds


def confined_dir(root: Path, directory: str) -> Path:
    """``directory`` (a client's relative path) inside ``root``, the caller's own space; a 400
    for an absolute path, ``..``, or a symlink that leads out."""
    parts = PurePosixPath(directory).parts
    if not directory or len(directory) > MAX_PATH_CHARS or directory.startswith(("/", "\\")):
        raise WireError(
            f"directory {directory[:80]!r} must be a relative path of at most "
            f"{MAX_PATH_CHARS} characters, inside your own export space"
        )
    if ".." in parts or "\0" in directory:
        raise WireError(f"directory {directory[:80]!r} may not contain '..' or leave your space")
    target = (root / directory).resolve()
    if not target.is_relative_to(root.resolve()):
        raise WireError(f"directory {directory[:80]!r} leads outside your export space")
    return target


def offline_export_dir(state_dir: Path, out_dir: str) -> Path:
    """``trinity server export``'s ``OUT_DIR``: a new or empty directory, and inside the state
    dir only under ``exports/`` (elsewhere there it could overwrite checkpoints or SQLite)."""
    target, state = Path(out_dir).resolve(), Path(state_dir).resolve()
    if target.is_relative_to(state) and not target.is_relative_to(state / "exports"):
        raise WireError(
            f"OUT_DIR {out_dir!r} lies inside the state dir {str(state_dir)!r}; write outside "
            "it or under its exports/"
        )
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise WireError(f"OUT_DIR {out_dir!r} exists and is not an empty directory")
    return target


def check_new_checkpoint(checkpoint_id: str, run_id: str, overwrite: bool, exists: bool) -> None:
    if exists and not overwrite:
        raise WireError(
            f"checkpoint {checkpoint_id!r} already exists for run {run_id!r}; pass "
            "overwrite=True or another name"
        )


def parse_tinker_path(path: str) -> tuple[str, str, str]:
    """``tinker://RUN/KIND/NAME`` -> (run, kind, name); 400 on anything else."""
    if len(path) > MAX_PATH_CHARS:
        raise WireError(f"checkpoint path is {len(path)} characters, at most {MAX_PATH_CHARS}")
    parts = path.removeprefix("tinker://").split("/")
    if (
        not path.startswith("tinker://")
        or len(parts) != 3
        or parts[1] not in KINDS
        or not parts[0]
        or not parts[2]
    ):
        raise WireError(
            f"checkpoint path {path!r} is not tinker://<run>/weights/<name>, "
            "tinker://<run>/sampler_weights/<name> or "
            "tinker://<run>/external_weights/<name>"
        )
    return parts[0], parts[1], parts[2]


def check_loadable(path: str, kind: str) -> None:
    """Exports are for use elsewhere; only ``weights/`` and ``sampler_weights/`` load here."""
    if kind == "external_weights":
        raise WireError(
            f"{path!r} is an export for use elsewhere; load a weights/ or "
            "sampler_weights/ checkpoint instead"
        )


def check_optim_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """An optimizer step's metrics as floats; a non-finite one is a failed step, never a
    ``null`` in the JSON the SDK would then fail to parse."""
    out = {k: float(v) for k, v in metrics.items()}
    bad = {k: v for k, v in out.items() if not math.isfinite(v)}
    if bad:
        raise ValueError(f"optim_step produced non-finite metrics {bad}")
    return out


def check_metric_names(metrics: dict[str, float]) -> dict[str, float]:
    """The SDK splits every fwd/bwd metric key on ':' into ``name:reduction``; fix bare names."""
    out = {}
    for key, value in metrics.items():
        out[key if key.count(":") == 1 else f"{key.replace(':', '_')}:mean"] = float(value)
    return out


_NP_TO_PROTO = {
    np.dtype(np.float32): pb.DTYPE_FLOAT32,
    np.dtype(np.int64): pb.DTYPE_INT64,
    np.dtype(np.int32): pb.DTYPE_INT32,
}


def encode_forward_backward_output(out: types.ForwardBackwardOutput) -> bytes:
    """One ``ArrayRecord`` per run of datums whose fields share dtype and trailing shape."""
    msg = pb.ForwardBackwardOutput()
    msg.loss_fn_output_type = out.loss_fn_output_type or "ArrayRecord"
    for key, value in check_metric_names(dict(out.metrics)).items():
        msg.metrics[key] = value
    arrays = [{name: _as_array(td) for name, td in o.items()} for o in out.loss_fn_outputs]

    def signature(datum: dict[str, np.ndarray]) -> tuple:
        return tuple(sorted((k, a.dtype.str, a.shape[1:]) for k, a in datum.items()))

    runs: list[list[dict[str, np.ndarray]]] = []
    for datum in arrays:
        if runs and signature(runs[-1][0]) == signature(datum):
            runs[-1].append(datum)
        else:
            runs.append([datum])
    for run in runs:
        record = msg.loss_fn_outputs.add()
        record.type_tag = "ArrayRecord"
        record.num_datums = len(run)
        for name in run[0]:
            parts = [d[name] for d in run]
            bt = record.fields[name]
            bt.dtype = _NP_TO_PROTO[parts[0].dtype]
            bt.trailing_shape.extend(parts[0].shape[1:])
            offsets = np.zeros(len(parts) + 1, dtype=np.int64)
            offsets[1:] = np.cumsum([p.nbytes for p in parts])
            bt.offsets = offsets.tobytes()
            bt.data = b"".join(p.tobytes() for p in parts)
    return msg.SerializeToString()


def _as_array(td: types.TensorData) -> np.ndarray:
    arr = np.asarray(td.to_numpy())
    if arr.dtype.kind == "f":
        arr = arr.astype(np.float32)
    elif arr.dtype.kind in "iub":
        arr = arr.astype(np.int64)
    if arr.ndim == 0:
        arr = arr.reshape(1)
    return np.ascontiguousarray(arr)


def encode_sample_response(resp: types.SampleResponse) -> bytes:
    msg = pb.SampleResponse()
    for seq in resp.sequences:
        s = msg.sequences.add()
        length = seq.stop_reason == "length"
        s.stop_reason = pb.STOP_REASON_LENGTH if length else pb.STOP_REASON_STOP
        s.tokens = np.asarray(seq.tokens, dtype=np.int32).tobytes()
        if seq.logprobs is not None:
            s.logprobs = np.asarray(seq.logprobs, dtype=np.float32).tobytes()
        if seq.topk_logprobs_np is not None:
            _encode_topk(s.topk_sampled_logprobs, seq.topk_logprobs_np)
    prompt_lp = resp.prompt_logprobs
    if prompt_lp is not None:
        msg.prompt_logprobs = np.asarray(
            [math.nan if v is None else v for v in prompt_lp], dtype=np.float32
        ).tobytes()
    if resp.topk_prompt_logprobs_np is not None:
        _encode_topk(msg.topk_prompt_logprobs, resp.topk_prompt_logprobs_np)
    alt = resp.prompt_alt_tokens
    if alt is not None:
        _encode_dense(msg.prompt_alt_tokens.tokens, alt.tokens.to_numpy(), np.int64, pb.DTYPE_INT64)
        _encode_dense(
            msg.prompt_alt_tokens.logprobs, alt.logprobs.to_numpy(), np.float32, pb.DTYPE_FLOAT32
        )
    msg.prompt_cache_hit_tokens = int(resp.prompt_cache_hit_tokens or 0)
    return msg.SerializeToString()


def _encode_topk(msg: pb.TopkLogprobs, topk) -> None:
    msg.length, msg.k = topk.token_ids.shape
    msg.token_ids = np.asarray(topk.token_ids, dtype=np.int32).tobytes()
    msg.logprobs = np.asarray(topk.logprobs, dtype=np.float32).tobytes()


def _encode_dense(msg: pb.Tensor, array: np.ndarray, dtype, proto_dtype: int) -> None:
    msg.dtype = proto_dtype
    msg.shape.extend(array.shape)
    msg.dense = np.ascontiguousarray(array, dtype=dtype).tobytes()
