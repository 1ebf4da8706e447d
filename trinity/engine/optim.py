"""AdamW with Tinker's per-step hyperparameters (``tinker.types.AdamParams``).

Tinker documents its optimizer as ``torch.optim.AdamW`` (decoupled weight decay, bias-corrected
moments) with every hyperparameter given per ``optim_step`` call, plus a global gradient-norm
clip (``grad_clip_norm``; 0 = off) as ``torch.nn.utils.clip_grad_norm_`` applies it. So this is
``torch.optim.AdamW`` itself (the fused kernel where the device has one: one memory pass instead
of about ten, which is what an optimizer step over 100M+ parameters costs on a CPU), with the
param group rewritten every step and the state exposed by parameter *name*, so checkpoints
survive re-creating the model. As in torch, a parameter without a gradient is left alone.
A step whose gradient norm is NaN or inf is refused (``NonFiniteStepError``) before anything
changes: one such step would turn every weight and moment NaN for the rest of the run.
"""

from __future__ import annotations

import torch
from tinker import types


class NonFiniteStepError(ValueError):
    """A step whose gradients hold NaN or inf: applying it would poison the weights for good."""


class AdamW:
    """AdamW over named fp32 parameters; ``step`` also zeroes the gradients."""

    def __init__(self, params: dict[str, torch.nn.Parameter]):
        self.params = params
        self.steps = 0
        self._torch = torch.optim.AdamW(list(params.values()), lr=0.0, fused=_fused(params))

    @torch.no_grad()
    def step(self, hp: types.AdamParams) -> dict[str, float]:
        grads = [p.grad for p in self.params.values() if p.grad is not None]
        grad_norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
        if not torch.isfinite(grad_norm):
            self._torch.zero_grad(set_to_none=True)
            raise NonFiniteStepError(
                f"optim_step refused: the accumulated gradients are not finite (grad_norm "
                f"{float(grad_norm)}), e.g. from a loss that overflowed; weights and optimizer "
                "state are unchanged and the gradients were discarded"
            )
        if hp.grad_clip_norm > 0 and grads:
            torch.nn.utils.clip_grads_with_norm_(self.params.values(), hp.grad_clip_norm, grad_norm)
        for group in self._torch.param_groups:
            group.update(
                lr=hp.learning_rate,
                betas=(hp.beta1, hp.beta2),
                eps=hp.eps,
                weight_decay=hp.weight_decay,
            )
        stepped = [p for p in self.params.values() if p.grad is not None]
        self._torch.step()
        # The fused kernel updates the weights in place without bumping their version counters;
        # caches keyed on them (fast_decode.build's decode-layout weights) would go stale.
        torch.autograd.graph.increment_version(stepped)
        self._torch.zero_grad(set_to_none=True)
        self.steps += 1
        return {"grad_norm": float(grad_norm)}

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """``step/NAME``, ``exp_avg/NAME``, ``exp_avg_sq/NAME`` of the parameters with state."""
        out = {}
        for name, p in self.params.items():
            for key, value in self._torch.state.get(p, {}).items():
                out[f"{key}/{name}"] = value
        return out

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], steps: int) -> None:
        self.reset()
        for name, p in self.params.items():
            state = {
                key: tensors[f"{key}/{name}"].to(p.device)
                for key in ("step", "exp_avg", "exp_avg_sq")
                if f"{key}/{name}" in tensors
            }
            if state:
                if len(state) != 3:
                    raise ValueError(f"optimizer state of {name!r} is incomplete")
                self._torch.state[p] = state
        self.steps = steps

    def reset(self) -> None:
        self._torch.state.clear()
        self.steps = 0


def _fused(params: dict[str, torch.nn.Parameter]) -> bool | None:
    """Use the fused kernel when every parameter is a float on a device that has it."""
    devices = {p.device.type for p in params.values()}
    floats = all(p.dtype in (torch.float32, torch.float16, torch.bfloat16) for p in params.values())
    return True if floats and devices <= {"cpu", "cuda"} and params else None
