"""PPO's value model: a causal LM's decoder with a scalar head, trained in this process.

The critic of ``algorithm_type: ppo`` (trinity/trainer/critic.py). Like veRL's critic (a token
classification model with one label) it reads the value of response token ``t`` from the hidden
state of the position before it, the state in which that token was chosen. The decoder is a copy
of ``model.critic_model_path`` with its own LoRA adapter (peft, the engine's target groups; the
unembedding is unused) or, with ``lora=None``, fully trained in fp32; the head ``H -> 1`` is fp32
and initialised like a Hugging Face classification head (normal, ``initializer_range``, zero bias).
It is separate from the policy's ``Engine`` on purpose: the policy may be remote (Tinker), and the
critic then runs here alone. Precision follows the engine (``forward.default_dtype``); the
optimizer is the engine's ``AdamW``; checkpoints use the engine's state format.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from tinker import types
from torch import Tensor, nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from trinity.engine import checkpoint
from trinity.engine.adapters import Adapters, LoraSpec
from trinity.engine.demo_model import resolve_model_path
from trinity.engine.forward import default_dtype
from trinity.engine.optim import AdamW

HEAD = "value_head"


@dataclasses.dataclass(frozen=True)
class ValueRow:
    """One sequence to value: its tokens and where its response starts (an ``Experience`` has
    both, and is accepted as it is)."""

    tokens: Sequence[int]
    prompt_length: int


class ValueModel:
    # Padded tokens per pass. Smaller than the engine's 2048: the critic's update overlaps the
    # policy's, and with the policy in this process too (local engine, an embedded server) both
    # passes' activations are alive at once.
    micro_batch_tokens = 512

    def __init__(
        self,
        model_path: str | Path,
        lora: LoraSpec | None,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        seed: int = 0,
    ):
        self.model_path = str(model_path)  # recorded in its checkpoints: a resume starts there
        path = Path(resolve_model_path(str(model_path)))
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = dtype or default_dtype(self.device)
        self.lora = dataclasses.replace(lora, train_unembed=False) if lora else None
        gguf = {"gguf_file": path.name} if path.suffix == ".gguf" else {}
        directory = path.parent if gguf else path
        self.tokenizer = AutoTokenizer.from_pretrained(directory, **gguf)
        base = AutoModelForCausalLM.from_pretrained(
            directory, dtype=torch.float32 if lora is None else self.dtype, **gguf
        )
        base = base.to(self.device).eval().requires_grad_(False)
        if self.lora is None:
            self.module = base.get_decoder().requires_grad_(True)
            params = dict(self.module.named_parameters())
        else:
            adapters = Adapters(base, str(path), self.dtype)
            adapters.activate(adapter := adapters.add(self.lora, "c"))
            self.module = base.get_decoder()
            params = adapters.params(adapter)
            for p in params.values():
                p.requires_grad_(True)
        self.head = nn.Linear(base.config.hidden_size, 1, device=self.device)
        std = float(getattr(base.config, "initializer_range", 0.02))
        with torch.no_grad():
            self.head.weight.copy_(
                torch.randn(self.head.weight.shape, generator=torch.Generator().manual_seed(seed))
                * std
            )
            self.head.bias.zero_()
        params.update({f"{HEAD}.{name}": p for name, p in self.head.named_parameters()})
        self.params = params
        self.optimizer = AdamW(params)
        self.pad_token_id = int(self.tokenizer.pad_token_id or 0)

    def _autocast(self):
        return torch.autocast(
            self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32
        )

    def _passes(self, rows: Sequence[ValueRow]) -> list[list[int]]:
        """Row indices per pass, longest first, at most ``micro_batch_tokens`` padded tokens."""
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i].tokens))
        passes: list[list[int]] = []
        for i in order:
            width = len(rows[passes[-1][0]].tokens) if passes else 0
            if passes and width * (len(passes[-1]) + 1) <= self.micro_batch_tokens:
                passes[-1].append(i)
            else:
                passes.append([i])
        return passes

    def _response_values(self, rows: list[ValueRow]) -> list[Tensor]:
        """Values of each row's response tokens (with the graph, when grad is enabled)."""
        width = max(len(r.tokens) for r in rows)
        ids_BT = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        for b, row in enumerate(rows):
            ids_BT[b, : len(row.tokens)] = torch.as_tensor(list(row.tokens), dtype=torch.long)
        with self._autocast():
            hidden_BTH = self.module(
                input_ids=ids_BT.to(self.device), use_cache=False
            ).last_hidden_state
        values_BT = self.head(hidden_BTH.float()).squeeze(-1)
        return [
            values_BT[b, row.prompt_length - 1 : len(row.tokens) - 1] for b, row in enumerate(rows)
        ]

    @torch.no_grad()
    def values(self, rows: Sequence[ValueRow]) -> list[Tensor]:
        """V for every response token of each row (CPU fp32)."""
        for row in rows:
            if row.prompt_length < 1:
                raise ValueError("a sequence to value needs at least one prompt token")
        out: list[Tensor] = [torch.zeros(0)] * len(rows)
        for chunk in self._passes(rows):
            for i, v in zip(chunk, self._response_values([rows[i] for i in chunk]), strict=True):
                out[i] = v.cpu()
        return out

    def forward_backward(
        self, rows: Sequence[ValueRow], loss_fn: Callable[[int, Tensor], Tensor]
    ) -> float:
        """Accumulate the gradient of ``sum_i loss_fn(i, V_i)`` over the rows, ``V_i`` the values
        of row ``i``'s response tokens (the critic passes the clipped value loss); returns the
        sum."""
        loss_sum = 0.0
        for chunk in self._passes(rows):
            vpreds = self._response_values([rows[i] for i in chunk])
            total = sum(
                (loss_fn(i, v) for i, v in zip(chunk, vpreds, strict=True)), torch.zeros(())
            )
            if total.requires_grad:
                total.backward()
            loss_sum += float(total.detach())
        return loss_sum

    def optim_step(self, params: types.AdamParams) -> dict[str, float]:
        return self.optimizer.step(params)

    def save_state(self, directory: str | Path) -> None:
        lora = dataclasses.asdict(self.lora) if self.lora else None
        meta = {"base_model": self.model_path, "lora": lora, "step": self.optimizer.steps}
        checkpoint.write_state(directory, meta, self.params, self.optimizer.state_tensors())

    def load_state(self, directory: str | Path) -> None:
        meta = checkpoint.read_state_meta(directory)
        checkpoint.copy_into(
            self.params,
            checkpoint.read_tensors(directory, checkpoint.WEIGHTS),
            f"critic checkpoint {directory}",
        )
        self.optimizer.load_state_tensors(
            checkpoint.read_tensors(directory, checkpoint.OPTIMIZER), int(meta["step"])
        )
