"""Random training data and a fixed probe for engine tests: the probe's logprobs through the
engine and through a plain transformers / peft forward pass, so tests can compare the two."""

from __future__ import annotations

import torch
from tinker import types

from trinity.engine import Engine


def datums(seed: int, count: int = 2, length: int = 12) -> list[types.Datum]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        seq = torch.randint(0, 49152, (length + 1,), generator=g).tolist()
        out.append(
            types.Datum(
                model_input=types.ModelInput.from_ints(seq[:-1]),
                loss_fn_inputs={"target_tokens": seq[1:], "weights": [1.0] * length},
            )
        )
    return out


PROBE = datums(99, count=3)


def logprobs(engine: Engine, model_id: str) -> torch.Tensor:
    out = engine.forward_backward(model_id, PROBE, "cross_entropy", forward_only=True)
    return torch.cat([o["logprobs"].to_torch() for o in out.loss_fn_outputs])


def plain_logprobs(model) -> torch.Tensor:
    """The same probe through an ordinary transformers / peft forward pass."""
    out = []
    with torch.no_grad():
        for datum in PROBE:
            tokens = datum.model_input.to_ints()
            targets = datum.loss_fn_inputs["target_tokens"].to_torch()
            logits = model(input_ids=torch.tensor([tokens])).logits[0].float()
            out.append(logits.log_softmax(-1).gather(1, targets[:, None]).squeeze(1))
    return torch.cat(out)
