"""On-disk formats of the engine: training state, peft adapters, merged Hugging Face models.

Training state (``save_state``), one directory:
- ``trinity_state.json``: ``{"format", "base_model", "lora" (LoraSpec fields or null), "step",
  "optimizer" (bool)}``;
- ``weights.safetensors``: the trainable fp32 tensors by name (LoRA: ``MODULE.lora_A.weight`` /
  ``MODULE.lora_B.weight``, module names relative to the causal LM; full fine-tuning: the
  model's ``named_parameters``, tied weights once);
- ``optimizer.safetensors`` (when saved): ``exp_avg/NAME`` and ``exp_avg_sq/NAME``.

Peft adapter (``export_peft``): ``adapter_config.json`` + ``adapter_model.safetensors`` with keys
``base_model.model.MODULE.lora_A.weight``, what ``PeftModel.from_pretrained`` reads.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

STATE_FORMAT = "trinity-engine-state/1"
STATE_META = "trinity_state.json"
WEIGHTS = "weights.safetensors"
OPTIMIZER = "optimizer.safetensors"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


def _save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path))


def write_state(
    directory: str | Path,
    meta: dict,
    weights: dict[str, torch.Tensor],
    optimizer: dict[str, torch.Tensor] | None,
) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _save(weights, directory / WEIGHTS)
    if optimizer is not None:
        _save(optimizer, directory / OPTIMIZER)
    (directory / STATE_META).write_text(
        json.dumps({"format": STATE_FORMAT, **meta, "optimizer": optimizer is not None}, indent=1)
    )


def read_state_meta(directory: str | Path) -> dict:
    path = Path(directory) / STATE_META
    if not path.is_file():
        raise ValueError(f"{directory} is not an engine training state (no {STATE_META})")
    meta = json.loads(path.read_text())
    if meta.get("format") != STATE_FORMAT:
        raise ValueError(f"{path}: unsupported format {meta.get('format')!r}")
    return meta


def read_tensors(directory: str | Path, name: str) -> dict[str, torch.Tensor]:
    path = Path(directory) / name
    if not path.is_file():
        raise ValueError(f"{path} is missing")
    return load_file(str(path))


def write_peft(directory: str | Path, config, lora: dict[str, torch.Tensor]) -> None:
    """``lora``: ``MODULE.lora_A.weight``-style names; ``config``: a peft ``LoraConfig``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _save({PEFT_PREFIX + k: v for k, v in lora.items()}, directory / PEFT_WEIGHTS)
    config.save_pretrained(str(directory))


def read_peft(directory: str | Path) -> dict[str, torch.Tensor]:
    tensors = read_tensors(directory, PEFT_WEIGHTS)
    return {k.removeprefix(PEFT_PREFIX): v for k, v in tensors.items()}


def copy_into(
    params: dict[str, torch.nn.Parameter], tensors: dict[str, torch.Tensor], what: str
) -> None:
    """Copy tensors into same-named parameters; names or shapes that differ raise ValueError."""
    missing = sorted(set(params) - set(tensors))
    if missing:
        raise ValueError(f"{what} lacks {len(missing)} tensors, e.g. {missing[:3]}")
    with torch.no_grad():
        for name, param in params.items():
            tensor = tensors[name]
            if tensor.shape != param.shape:
                raise ValueError(
                    f"{what}: {name} has shape {tuple(tensor.shape)}, "
                    f"the model expects {tuple(param.shape)}"
                )
            param.copy_(tensor)
