"""The learner and sampler shapes the trainer and explorer program against.

Both backends (in-process engine, official Tinker SDK) implement these, so the RL loop is
backend-blind. Methods that start learner work return an awaitable immediately (the request is
already submitted), so a trainer can queue ``forward_backward`` and ``optim_step`` before awaiting
either, the way Tinker's clock cycles want it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from tinker import types

CustomLoss = Callable[[list[types.Datum], list[Any]], tuple[Any, dict[str, float]]]


class TrainerBackend(Protocol):
    tokenizer: Any

    def forward_backward(
        self, data: list[types.Datum], loss_fn: str, loss_fn_config: dict[str, float] | None = None
    ) -> Awaitable[types.ForwardBackwardOutput]: ...

    def forward_backward_custom(
        self, data: list[types.Datum], loss_fn: CustomLoss
    ) -> Awaitable[types.ForwardBackwardOutput]: ...

    def optim_step(self, params: types.AdamParams) -> Awaitable[Any]: ...

    async def save_state(self, name: str, directory: str) -> str:
        """Save weights + optimizer; returns a reference ``load_state`` accepts."""

    async def load_state(self, ref: str, optimizer: bool = True) -> None:
        """Load saved weights (and, with ``optimizer``, the optimizer state)."""

    async def delete_state(self, ref: str) -> None:
        """Free a saved state (``trainer.max_checkpoints_to_keep``)."""

    async def publish_sampler(self, name: str, directory: str) -> str:
        """Freeze the current weights for sampling; returns a reference samplers can load."""

    async def export_adapter(self, directory: str) -> str:
        """Write the trained weights as a peft adapter directory the user owns."""

    async def close(self) -> None: ...


class SamplerBackend(Protocol):
    tokenizer: Any
    ref: str | None  # which published weights it samples from; None = base model

    def sample(
        self, prompt_tokens: list[int], num_samples: int, params: types.SamplingParams
    ) -> Awaitable[types.SampleResponse]: ...

    async def compute_logprobs(self, tokens: list[int]) -> list[float | None]: ...

    async def switch(self, ref: str | None) -> None:
        """Sample from other published weights from now on (and let the old ones go)."""


def custom_loss_as_weights(
    data: list[types.Datum],
    logprobs_list: list[Any],
    loss_fn: CustomLoss,
    entropy_list: list[Any] | None = None,
) -> tuple[list[types.Datum], dict[str, float], float]:
    """Linearise a custom loss around the current logprobs: CE datums with weights = -dLoss/dlp.

    This is the SDK's ``forward_backward_custom`` recipe (a forward pass, then a weighted
    cross-entropy backward), used by the local backend so both give the same gradients. With
    ``entropy_list`` (each token's exact entropy) the loss also gets them, and the datums carry
    ``entropy_weights`` = dLoss/dH, which the engine's cross-entropy adds as sum(e * H).
    """
    import torch

    def leaf(values: Any) -> Any:
        return torch.as_tensor(values, dtype=torch.float32).clone().requires_grad_(True)

    leaves = [leaf(lp) for lp in logprobs_list]
    if entropy_list is None:
        loss, metrics = loss_fn(data, leaves)
        entropies = [None] * len(leaves)
    else:
        entropies = [leaf(h) for h in entropy_list]
        loss, metrics = loss_fn(data, leaves, entropies)
    loss.backward()
    linear = []
    for datum, lp, h in zip(data, leaves, entropies, strict=True):
        inputs = {
            "target_tokens": datum.loss_fn_inputs["target_tokens"],
            "weights": types.TensorData.from_torch(-lp.grad),
        }
        if h is not None and h.grad is not None:
            inputs["entropy_weights"] = types.TensorData.from_torch(h.grad)
        linear.append(types.Datum(model_input=datum.model_input, loss_fn_inputs=inputs))
    return linear, metrics, float(loss.detach())


def forward_datums(data: list[types.Datum]) -> list[types.Datum]:
    """A custom loss's datums as a ``cross_entropy`` forward pass takes them (its side inputs
    dropped, as the SDK's ``forward_backward_custom`` does)."""
    import torch

    out = []
    for d in data:
        targets = d.loss_fn_inputs["target_tokens"]
        zeros = torch.zeros(targets.to_torch().numel())
        inputs = {"target_tokens": targets, "weights": types.TensorData.from_torch(zeros)}
        out.append(types.Datum(model_input=d.model_input, loss_fn_inputs=inputs))
    return out


def custom_output(
    result: types.ForwardBackwardOutput, metrics: dict[str, float], loss_sum: float
) -> types.ForwardBackwardOutput:
    """The linearised backward's output reported as the custom loss's (``loss:sum`` its value,
    the surrogate's kept as ``surrogate_loss:sum``)."""
    result.metrics["surrogate_loss:sum"] = result.metrics.pop("loss:sum")
    result.metrics.update(metrics)
    result.metrics["loss:sum"] = loss_sum
    return result
