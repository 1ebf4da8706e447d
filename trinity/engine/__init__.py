"""The training engine: model loading, LoRA, Tinker losses, AdamW, sampling, checkpoints.

Modules: ``engine`` (the ``Engine`` facade: loading, Tinker's calls), ``adapters`` (peft LoRA
bookkeeping), ``packing`` (datums into forward passes, no model), ``forward`` (a pass's
logprobs), ``attention`` (the models' attention: blocked matmuls for training passes),
``logprobs`` (the chunked unembedding kernel), ``losses``, ``optim``, ``sampling``
(decoding; ``fast_decode`` its fused step, ``gemv`` its one-row matmul kernel, built by
``python -m trinity.engine``), ``checkpoint``, ``demo_model``, ``worker`` (the thread that owns an
engine), ``process`` (``configure_process``, for entry points). Only ``config`` is below this
layer.

Tensor names end in their shape, one letter per dimension (``hidden_NH``: N x H):

- N: real tokens of every row of a pass, rows concatenated (one per target token)
- M: the unembedding's rows in a shared-prefix pass: N with shared positions counted once
- B: rows of a batch (a pass's sequences; in ``sampling`` the rows still decoding)
- T: token positions of a row (padded where rows differ in length)
- C: clusters of a shared-prefix pass (``logprobs``: a chunk of tokens or vocabulary entries)
- P, S: prefix and suffix positions of a shared-prefix pass, each padded; K = P + S, the
  positions a suffix attends to (``sampling``: K = the rows that keep decoding)
- H: hidden size; V: vocabulary size; R: LoRA rank
- ``sampling`` only: U = distinct prompts (one prefill row each), S = rows that sample rather
  than decode greedily, F = those of them with top-k / top-p filtering
- G: a task's group of samples (``trinity.algorithms``); 1: a broadcast dimension of size 1
- ``attention`` only: A query heads, K key-value heads, G query heads per KV head, D head
  dimension, Q a block's query positions, R its rows
"""

import importlib

# Imported on first use (PEP 562), so that ``python -m trinity.engine`` and a lone submodule such
# as ``gemv`` do not pay for transformers (seconds): scripts/setup.sh runs the former every time.
_EXPORTS = {
    "Engine": "engine",
    "LoraSpec": "adapters",
    "SampleRequest": "sampling",
    "configure_process": "process",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
