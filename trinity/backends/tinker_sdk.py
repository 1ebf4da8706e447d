"""The Tinker backend: the official SDK over HTTP, to Thinking Machines' service or `trinity server`.

Nothing here needs a GPU or model weights: the learner and sampler live behind ``base_url``.
Transient failures (timeouts, 5xx, connection resets, a restarting server) are retried with
exponential backoff and logged, so a run reports trouble instead of hanging silently.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx
import tinker
from tinker import types

from trinity.backends.base import (
    CustomLoss,
    custom_loss_as_weights,
    custom_output,
    forward_datums,
)
from trinity.config import ConfigError

log = logging.getLogger(__name__)
T = TypeVar("T")

RETRYABLE = (
    tinker.APIConnectionError,
    tinker.APITimeoutError,
    tinker.InternalServerError,
    tinker.RateLimitError,
    asyncio.TimeoutError,
    httpx.TransportError,
)


class TinkerBackendError(RuntimeError):
    """A Tinker request failed for good (after retries, or a non-retryable error)."""


async def with_retries(
    what: str, make: Callable[[], Awaitable[T]], attempts: int = 6, timeout: float | None = 600.0
) -> T:
    """Await ``make()`` with a timeout, retrying transient failures with exponential backoff."""
    for attempt in range(1, attempts + 1):
        try:
            return await asyncio.wait_for(make(), timeout)
        except RETRYABLE as exc:
            if attempt == attempts:
                raise TinkerBackendError(f"{what} failed after {attempts} attempts: {exc}") from exc
            delay = min(2.0**attempt, 30.0)
            log.warning(
                "%s failed (%s: %s); retry %d/%d in %.0fs",
                what,
                type(exc).__name__,
                exc,
                attempt,
                attempts - 1,
                delay,
            )
            await asyncio.sleep(delay)
    raise AssertionError("unreachable")


# trinity server's extension: each token's entropy over the full vocabulary (server/wire.py)
ENTROPY = {"return_entropy": 1}


EXTENSIONS_ROUTE = "/api/v1/trinity/extensions"  # trinity server's (server/app.py)


def offers_exact_entropy(base_url: str | None) -> bool:
    """Whether the service is a ``trinity server`` (on this machine or a team's host), which
    computes each token's entropy over the full vocabulary on request; Thinking Machines'
    service (``base_url`` None, or any service without the route) gets the estimate."""
    if not base_url:
        return False
    try:
        answer = httpx.get(base_url.rstrip("/") + EXTENSIONS_ROUTE, timeout=10.0)
        return answer.status_code == 200 and answer.json().get("return_entropy") is True
    except (httpx.HTTPError, ValueError, AttributeError):  # unreachable, not JSON, not a dict
        return False


class TinkerSession:
    """One ServiceClient (session) and RestClient for a run."""

    def __init__(self, base_url: str | None, api_key: str):
        # trinity server's extension: loss_fn_config["return_entropy"] = 1 (server/wire.py)
        self.exact_entropy = offers_exact_entropy(base_url)
        self.service = tinker.ServiceClient(base_url=base_url, api_key=api_key)
        self.rest = tinker.RestClient(base_url=base_url, api_key=api_key)
        self._tokenizer: Any = None
        self._background: set[asyncio.Task] = set()

    def supported_models(self) -> list[str]:
        caps = self.rest.get_server_capabilities().result()
        return [m.model_name for m in caps.supported_models if m.model_name]

    def check_model(self, base_model: str) -> None:
        """Fail before any work when the service does not serve ``base_model``."""
        supported = self.supported_models()
        if base_model not in supported:
            raise ConfigError(
                f"model.tinker.base_model '{base_model}' is not served by the Tinker service "
                f"(supported: {', '.join(supported) or 'none'})"
            )

    async def delete_checkpoint(self, path: str) -> None:
        """Free a checkpoint on the service; failing to is logged, never fatal (storage only)."""
        try:
            await self.rest.delete_checkpoint_from_tinker_path(path)
        except tinker.TinkerError as exc:
            log.warning("could not delete checkpoint %s: %s", path, exc)

    def delete_checkpoint_later(self, path: str) -> None:
        """Delete in the background: a far service's round trip must not hold up a step (the
        next step needs nothing from it). ``close`` waits for every deletion still running."""
        task = asyncio.get_running_loop().create_task(self.delete_checkpoint(path))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def close(self, status: str = "success", detail: str | None = None) -> None:
        """Finish the session on the service (status: success | errored | interrupted)."""
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        await asyncio.to_thread(lambda: self.service.close(status, detail).result())


class TinkerTrainer:
    def __init__(self, session: TinkerSession, client: Any):
        self.session = session
        self.client = client
        self.tokenizer = client.get_tokenizer()
        self.exact_entropy = session.exact_entropy
        self._pending: asyncio.Future | None = None  # an exact-entropy custom step in flight

    @classmethod
    async def create(
        cls,
        session: TinkerSession,
        base_model: str,
        *,
        rank: int,
        seed: int | None,
        train_mlp: bool,
        train_attn: bool,
        train_unembed: bool,
    ) -> TinkerTrainer:
        client = await with_retries(
            "create_lora_training_client",
            lambda: session.service.create_lora_training_client(
                base_model=base_model,
                rank=rank,
                seed=seed,
                train_mlp=train_mlp,
                train_attn=train_attn,
                train_unembed=train_unembed,
            ),
        )
        return cls(session, client)

    @classmethod
    async def from_state(
        cls, session: TinkerSession, ref: str, optimizer: bool = True
    ) -> TinkerTrainer:
        """A training client with the saved weights (and, with ``optimizer``, Adam's moments)."""
        if optimizer:
            client = await with_retries(
                "create_training_client_from_state_with_optimizer",
                lambda: session.service.create_training_client_from_state_with_optimizer(ref),
            )
        else:
            client = await with_retries(
                "create_training_client_from_state",
                lambda: session.service.create_training_client_from_state(ref),
            )
        return cls(session, client)

    def forward_backward(self, data, loss_fn, loss_fn_config=None):
        if self.exact_entropy:  # each token's entropy over the full vocabulary, for the metrics
            loss_fn_config = {**(loss_fn_config or {}), **ENTROPY}
        return self.client.forward_backward(data, loss_fn, loss_fn_config)

    def forward_backward_custom(self, data: list[types.Datum], loss_fn: CustomLoss):
        """The SDK's recipe, except against a ``trinity server`` with a loss that takes exact
        entropies (an entropy bonus): there the forward pass returns each token's entropy too,
        and the backward carries dLoss/dH as ``entropy_weights``, so the bonus's gradient flows
        through the full-vocabulary entropy on the server, as on the local engine."""
        if not (self.exact_entropy and getattr(loss_fn, "takes_entropy", False)):
            return self.client.forward_backward_custom(data, loss_fn)
        self._pending = asyncio.ensure_future(self._exact_custom(data, loss_fn))
        return self._pending

    async def _exact_custom(self, data: list[types.Datum], loss_fn: CustomLoss):
        forward = await self.client.forward(forward_datums(data), "cross_entropy", ENTROPY)
        outputs = forward.loss_fn_outputs
        linear, metrics, loss_sum = custom_loss_as_weights(
            data,
            [out["logprobs"].to_torch() for out in outputs],
            loss_fn,
            [out["entropy"].to_torch() for out in outputs],
        )
        result = await self.client.forward_backward(linear, "cross_entropy", ENTROPY)
        return custom_output(result, metrics, loss_sum)

    def optim_step(self, params: types.AdamParams):
        """Submitted at once, unless an exact-entropy custom step still has its backward to
        send: the step must follow it, as the SDK orders a custom loss's two requests."""
        pending = self._pending
        if pending is None or pending.done():
            return self.client.optim_step(params)

        async def after_pending():
            await pending
            return await self.client.optim_step(params)

        return asyncio.ensure_future(after_pending())

    async def save_state(self, name: str, directory: str) -> str:
        response = await with_retries("save_state", lambda: self.client.save_state(name))
        return response.path

    async def load_state(self, ref: str, optimizer: bool = True) -> None:
        fresh = await TinkerTrainer.from_state(self.session, ref, optimizer)
        self.client = fresh.client

    async def delete_state(self, ref: str) -> None:
        self.session.delete_checkpoint_later(ref)

    async def publish_sampler(self, name: str, directory: str) -> str:
        response = await with_retries(
            "save_weights_for_sampler", lambda: self.client.save_weights_for_sampler(name)
        )
        return response.path

    async def export_adapter(self, directory: str) -> str:
        """Save the weights in HF format on the service, then download every file."""
        name = "-".join(Path(directory).parts[-2:])  # unique per run and step: names are final
        saved = await with_retries(
            "save_weights_external", lambda: self.client.save_weights_external(name)
        )
        urls = await with_retries(
            "get_external_weights_urls",
            lambda: self.session.rest.get_external_weights_urls(saved.path),
        )
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        async with httpx.AsyncClient(timeout=600, follow_redirects=True) as http:
            for filename, url in urls.urls.items():
                response = await http.get(url)
                response.raise_for_status()
                (out / filename).write_bytes(response.content)
        peft_names(out)
        return str(out)

    async def close(self) -> None:
        return None


class TinkerSampler:
    def __init__(self, session: TinkerSession, client: Any, ref: str | None):
        self.session = session
        self.client = client
        self.ref = ref
        self.tokenizer = client.get_tokenizer()

    @classmethod
    async def create(
        cls, session: TinkerSession, base_model: str, ref: str | None = None
    ) -> TinkerSampler:
        client = await with_retries(
            "create_sampling_client",
            lambda: session.service.create_sampling_client(
                model_path=ref, base_model=None if ref else base_model
            ),
        )
        return cls(session, client, ref)

    def sample(self, prompt_tokens: list[int], num_samples: int, params: types.SamplingParams):
        prompt = types.ModelInput.from_ints(list(prompt_tokens))
        return with_retries("sample", lambda: self.client.sample(prompt, num_samples, params))

    async def compute_logprobs(self, tokens: list[int]) -> list[float | None]:
        prompt = types.ModelInput.from_ints(list(tokens))
        return await with_retries("compute_logprobs", lambda: self.client.compute_logprobs(prompt))

    async def switch(self, ref: str | None) -> None:
        old = self.ref
        fresh = await TinkerSampler.create(self.session, self.client.get_base_model(), ref)
        self.client, self.ref = fresh.client, ref
        if old is not None and old != ref:
            self.session.delete_checkpoint_later(old)


# Tinker's exports name the unembedding LoRA after a module no Hugging Face model has.
_TINKER_UNEMBED, _HF_HEAD = "model.unembed_tokens", "lm_head"


def peft_names(directory: Path) -> None:
    """Rename a downloaded Tinker adapter's ``model.unembed_tokens`` LoRA to ``lm_head``, so
    peft (and vLLM) load the directory as an adapter of the Hugging Face model."""
    import json

    from safetensors.torch import load_file, save_file

    weights_file, config_file = (
        directory / "adapter_model.safetensors",
        directory / "adapter_config.json",
    )
    if not weights_file.exists() or not config_file.exists():
        return
    weights = load_file(str(weights_file))
    if not any(f"{_TINKER_UNEMBED}.lora_" in k for k in weights):
        return
    save_file(
        {k.replace(_TINKER_UNEMBED, _HF_HEAD): v for k, v in weights.items()}, str(weights_file)
    )
    config = json.loads(config_file.read_text())
    modules = config.get("target_modules")
    if isinstance(modules, list):  # (a string is a regex over module names: left alone)
        config["target_modules"] = sorted(
            _HF_HEAD if m in (_TINKER_UNEMBED, "unembed_tokens") else m for m in modules
        )
    config_file.write_text(json.dumps(config, indent=2))
