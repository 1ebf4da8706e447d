"""How ``forward_backward`` packs datums into forward passes: pure bookkeeping, no model.

Datums become validated ``Example`` rows (``prepare_example``). Rows that share a prefix of at
least ``MIN_SHARED_PREFIX`` tokens (GRPO's samples of one prompt) form a ``Cluster`` that runs the
prefix once (``prefix_clusters``); ``micro_batches`` packs clusters, and the rest longest first,
into passes of at most ``max_tokens`` tokens. ``padded_rows`` lays rows run alone out as
right-padded rows; ``packed_pass`` lays clusters out as one row without padding (every prefix,
then every suffix) and the mask that keeps them apart (trinity/engine/forward.py runs both).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from tinker import types

from trinity.engine.losses import LossFn

# Shorter common prefixes are not worth a second forward call per micro-batch.
MIN_SHARED_PREFIX = 16


@dataclass
class Example:
    """One datum, checked against the model and the loss: its tokens and per-token inputs."""

    index: int  # position in the forward_backward call, where its outputs go
    tokens: list[int]
    inputs: dict[str, torch.Tensor]  # loss_fn_inputs, one value per token, on the CPU

    @property
    def length(self) -> int:
        return len(self.tokens)


class Cluster(NamedTuple):
    """Examples whose first ``prefix`` tokens are the same and run once (0: no sharing)."""

    prefix: int
    members: list[Example]


def prepare_example(
    index: int, datum: types.Datum, loss: LossFn, vocab_size: int, max_context_length: int
) -> Example:
    """The datum as an ``Example``; a ValueError names the datum when it cannot run."""
    tokens = datum.model_input.to_ints()
    n = len(tokens)
    if n > max_context_length:
        raise ValueError(
            f"datum {index}: {n} tokens exceed the context length {max_context_length}"
        )
    missing = [key for key in loss.inputs if key not in datum.loss_fn_inputs]
    if missing:
        raise ValueError(
            f"datum {index}: loss_fn_inputs lacks {missing} "
            f"(this loss needs {', '.join(loss.inputs)})"
        )
    inputs = {}
    for key in (*loss.inputs, *loss.optional_inputs, *loss.input_defaults):
        if key not in datum.loss_fn_inputs:
            continue
        value = torch.from_numpy(np.asarray(datum.loss_fn_inputs[key].to_numpy()))
        if value.shape != (n,):
            raise ValueError(
                f"datum {index}: loss_fn_inputs[{key!r}] has shape "
                f"{tuple(value.shape)}, expected ({n},) like model_input"
            )
        inputs[key] = value.long() if key == "target_tokens" else value.float()
    for key, default in loss.input_defaults.items():
        inputs.setdefault(key, default(inputs))
    for name, ids in (
        ("model_input", torch.tensor(tokens, dtype=torch.long)),
        ("target_tokens", inputs["target_tokens"]),
    ):
        if n and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
            raise ValueError(f"datum {index}: {name} has token ids outside [0, {vocab_size})")
    return Example(index, tokens, inputs)


def prefix_clusters(examples: list[Example]) -> list[Cluster]:
    """Lexicographic neighbours join a cluster while that saves more prefix tokens than it gives
    up; a prefix leaves every member at least one token of its own and is 0 (no sharing) under
    ``MIN_SHARED_PREFIX`` or for a lone example."""
    clusters: list[tuple[list[int], list[Example]]] = []
    for example in sorted(examples, key=lambda e: e.tokens):
        tokens = example.tokens[: max(example.length - 1, 0)]
        if clusters:
            prefix, members = clusters[-1]
            joined = tokens[: len(os.path.commonprefix([prefix, tokens]))]
            if (
                len(joined) * len(members) >= len(prefix) * (len(members) - 1) + 1
                and len(joined) >= MIN_SHARED_PREFIX
            ):
                clusters[-1] = (joined, [*members, example])
                continue
        clusters.append((tokens, [example]))
    return [
        Cluster(
            len(prefix) if len(members) > 1 and len(prefix) >= MIN_SHARED_PREFIX else 0, members
        )
        for prefix, members in clusters
    ]


def micro_batches(
    examples: list[Example], max_tokens: int, share_prefixes: bool = True
) -> list[list[Cluster]]:
    """Forward passes, each a list of clusters within ``max_tokens`` tokens.

    Clusters with a shared prefix fill passes of their own, packed without padding (prefix +
    member suffixes; a cluster too big for one pass is split into chunks of members). The rest
    (everything, without ``share_prefixes``) go alone, longest first, rows x longest row within
    ``max_tokens``, as one cluster with prefix 0 per pass.
    """
    shared: list[list[Cluster]] = []
    alone: list[Example] = []
    cost = 0  # tokens of the pass being filled
    for prefix, members in prefix_clusters(examples) if share_prefixes else [(0, examples)]:
        if prefix == 0:
            alone.extend(members)
            continue
        chunks: list[list[Example]] = [[]]
        sizes = [prefix]  # each chunk's tokens, its prefix included
        for e in members:
            if chunks[-1] and sizes[-1] + e.length - prefix > max_tokens:
                chunks.append([])
                sizes.append(prefix)
            chunks[-1].append(e)
            sizes[-1] += e.length - prefix
        for chunk, size in zip(chunks, sizes, strict=True):
            if not shared or cost + size > max_tokens:
                shared.append([])
                cost = 0
            shared[-1].append(Cluster(prefix, chunk))
            cost += size
    packed: list[list[Example]] = []
    for example in sorted(alone, key=lambda e: -e.length):
        if packed and (len(packed[-1]) + 1) * packed[-1][0].length <= max_tokens:
            packed[-1].append(example)
        else:
            packed.append([example])
    return shared + [[Cluster(0, group)] for group in packed]


def batch_inputs(group: list[Example], config: dict[str, float]) -> dict[str, torch.Tensor]:
    """Per-token loss inputs, rows concatenated; a datum without an optional per-token input
    (clip thresholds) gets the config value. ``datum`` numbers each token's row in ``group``
    (sequence-level losses average within a datum)."""
    keys = {k for e in group for k in e.inputs}
    inputs = {
        k: torch.cat(
            [e.inputs[k] if k in e.inputs else torch.full((e.length,), config[k]) for e in group]
        )
        for k in keys
    }
    inputs["datum"] = torch.cat(
        [torch.full((e.length,), row, dtype=torch.long) for row, e in enumerate(group)]
    )
    return inputs


def padded_rows(group: list[Example], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids_BT, mask_BT): one right-padded row per example; the mask marks its real tokens."""
    width = max(e.length for e in group)
    ids_BT = torch.full((len(group), width), pad_token_id, dtype=torch.long)
    mask_BT = torch.zeros((len(group), width), dtype=torch.bool)
    for row, e in enumerate(group):
        ids_BT[row, : e.length] = torch.tensor(e.tokens, dtype=torch.long)
        mask_BT[row, : e.length] = True
    return ids_BT, mask_BT


@dataclass
class PackedPass:
    """Clusters as one row of tokens without padding: every cluster's prefix, then every
    member's suffix. A prefix token sees its prefix up to itself; a suffix token sees its
    cluster's prefix and its own suffix up to itself (within ``window`` positions, if set)."""

    ids_1N: torch.Tensor
    position_1N: torch.Tensor  # a suffix's positions continue its prefix's
    mask_11NN: torch.Tensor  # bool, [query, key]
    prefix_start_C: list[int]  # where each cluster's prefix starts in the row
    suffix_start_B: list[int]  # where each member's suffix starts, members in cluster order


def packed_pass(clusters: list[Cluster], window: int | None = None) -> PackedPass:
    """The ``PackedPass`` of clusters with nonzero prefixes."""
    ids, positions, segments, sees = [], [], [], []  # per token; sees: a suffix's prefix (or -1)
    prefix_start_C, suffix_start_B = [], []
    for c, (prefix, chunk) in enumerate(clusters):
        prefix_start_C.append(len(ids))
        ids += chunk[0].tokens[:prefix]
        positions += range(prefix)
        segments += [c] * prefix
        sees += [-1] * prefix
    for c, (prefix, chunk) in enumerate(clusters):
        for e in chunk:
            suffix_start_B.append(len(ids))
            ids += e.tokens[prefix:]
            positions += range(prefix, e.length)
            segments += [len(clusters) + len(suffix_start_B)] * (e.length - prefix)
            sees += [c] * (e.length - prefix)
    position_N = torch.tensor(positions)
    segment_N, sees_N = torch.tensor(segments), torch.tensor(sees)
    n = len(ids)
    causal_NN = torch.ones(n, n, dtype=torch.bool).tril_()
    mask_NN = (segment_N[:, None] == segment_N[None]) & causal_NN | (sees_N[:, None] == segment_N)
    if window is not None:
        mask_NN &= position_N[:, None] - position_N[None] < window
    return PackedPass(
        torch.tensor(ids)[None],
        position_N[None],
        mask_NN[None, None],
        prefix_start_C,
        suffix_start_B,
    )
