"""Packing datums into forward passes (trinity/engine/packing.py): pure bookkeeping, no model."""

from __future__ import annotations

import pytest
import torch
from tinker import types

from trinity.engine import losses
from trinity.engine.packing import (
    MIN_SHARED_PREFIX,
    Cluster,
    Example,
    batch_inputs,
    micro_batches,
    packed_pass,
    padded_rows,
    prefix_clusters,
    prepare_example,
)


def example(index: int, tokens: list[int]) -> Example:
    targets = torch.tensor([*tokens[1:], 0], dtype=torch.long)
    return Example(index, list(tokens), {"target_tokens": targets})


def prompt(length: int, start: int = 1000) -> list[int]:
    return list(range(start, start + length))


def grouped(clusters: list[Cluster]) -> list[tuple[int, list[int]]]:
    return [(prefix, sorted(e.index for e in members)) for prefix, members in clusters]


def datum(tokens: list[int], **inputs) -> types.Datum:
    inputs.setdefault("target_tokens", [*tokens[1:], 0])
    return types.Datum(model_input=types.ModelInput.from_ints(tokens), loss_fn_inputs=inputs)


# ---------------------------------------------------------------------------- prepare_example
def test_prepare_example_keeps_the_loss_inputs_typed():
    ce = losses.get_loss("cross_entropy")
    e = prepare_example(3, datum([5, 6, 7], weights=[1, 0, 1], advantages=[9, 9, 9]), ce, 10, 8)
    assert (e.index, e.tokens, e.length) == (3, [5, 6, 7], 3)
    # only what the loss reads; the optional entropy weights default to 0 (no entropy term)
    assert set(e.inputs) == {"target_tokens", "weights", "entropy_weights"}
    assert e.inputs["entropy_weights"].tolist() == [0.0, 0.0, 0.0]
    assert e.inputs["target_tokens"].dtype == torch.long
    assert e.inputs["weights"].dtype == torch.float32
    assert e.inputs["weights"].tolist() == [1.0, 0.0, 1.0]


def test_prepare_example_takes_optional_inputs_of_the_loss():
    ppo = losses.get_loss("ppo")
    e = prepare_example(
        0,
        datum([1, 2], logprobs=[0.0, 0.0], advantages=[1.0, 1.0], clip_low_threshold=[0.5, 0.5]),
        ppo,
        10,
        8,
    )
    assert "clip_low_threshold" in e.inputs and "clip_high_threshold" not in e.inputs


@pytest.mark.parametrize(
    ("tokens", "inputs", "match"),
    [
        ([1] * 9, {"weights": [1.0] * 9}, "datum 4: 9 tokens exceed the context length 8"),
        ([1, 2], {}, r"datum 4: loss_fn_inputs lacks \['weights'\]"),
        ([1, 2], {"weights": [1.0]}, r"loss_fn_inputs\['weights'\] has shape \(1,\)"),
        ([1, 10], {"weights": [1.0, 1.0]}, r"model_input has token ids outside \[0, 10\)"),
        ([1, 2], {"weights": [1.0, 1.0], "target_tokens": [1, -1]}, "target_tokens has token"),
    ],
)
def test_prepare_example_names_the_datum_that_cannot_run(tokens, inputs, match):
    with pytest.raises(ValueError, match=match):
        prepare_example(4, datum(tokens, **inputs), losses.get_loss("cross_entropy"), 10, 8)


def test_prepare_example_accepts_an_empty_datum():
    e = prepare_example(
        0, datum([], target_tokens=[], weights=[]), losses.get_loss("cross_entropy"), 10, 8
    )
    assert e.length == 0


# ---------------------------------------------------------------------------- prefix_clusters
def test_a_shared_prefix_of_the_minimum_length_forms_a_cluster():
    shared = prompt(MIN_SHARED_PREFIX)
    examples = [example(0, shared + [1, 2]), example(1, shared + [3])]
    assert grouped(prefix_clusters(examples)) == [(MIN_SHARED_PREFIX, [0, 1])]


def test_a_shared_prefix_below_the_minimum_is_not_shared():
    shared = prompt(MIN_SHARED_PREFIX - 1)
    examples = [example(0, shared + [1, 2]), example(1, shared + [3, 4])]
    assert grouped(prefix_clusters(examples)) == [(0, [0]), (0, [1])]


def test_a_lone_example_shares_nothing():
    assert grouped(prefix_clusters([example(0, prompt(40))])) == [(0, [0])]


def test_the_prefix_leaves_every_member_a_token_of_its_own():
    same = prompt(MIN_SHARED_PREFIX + 4)
    (cluster,) = prefix_clusters([example(0, same), example(1, same)])
    assert cluster.prefix == len(same) - 1
    assert all(e.length - cluster.prefix >= 1 for e in cluster.members)


def test_a_member_joins_only_when_the_shorter_prefix_saves_tokens():
    # Two members share 40 tokens (running them once saves 40); a third sharing k of them joins
    # (all three then share k, saving 2k) only if 2k > 40.
    base = prompt(40)
    pair = [example(0, base + [1]), example(1, base + [2])]
    for k, joins in ((20, False), (21, True)):
        third = example(2, base[:k] + [9999] * 30)  # sorts after the pair
        clusters = grouped(prefix_clusters([*pair, third]))
        assert clusters == ([(k, [0, 1, 2])] if joins else [(40, [0, 1]), (0, [2])])


def test_clusters_hold_every_example_once_and_separate_prompts():
    a, b = prompt(24, start=100), prompt(19, start=5000)
    examples = [
        example(0, a + [1, 2]),
        example(1, b + [3]),
        example(2, a + [4]),
        example(3, [9] * 15),
        example(4, b + [5, 6]),
    ]
    assert sorted(grouped(prefix_clusters(examples))) == [(0, [3]), (19, [1, 4]), (24, [0, 2])]


# ---------------------------------------------------------------------------- micro_batches
def pass_cost(clusters: list[Cluster]) -> int:
    """Tokens a pass runs: padded rows alone, or the packed prefixes and suffixes."""
    if clusters[0].prefix == 0:
        (cluster,) = clusters
        return len(cluster.members) * max(e.length for e in cluster.members)
    return sum(c.prefix + sum(e.length - c.prefix for e in c.members) for c in clusters)


def test_micro_batches_keep_within_the_token_bound_and_hold_every_example_once():
    examples = [example(i, prompt(30, start=100 * (i % 3)) + [i] * (1 + i % 5)) for i in range(12)]
    examples += [example(12 + i, [7 + i] * n) for i, n in enumerate((5, 40, 12, 33, 8))]
    for max_tokens in (40, 64, 100, 2048):
        passes = micro_batches(examples, max_tokens)
        indices = [e.index for clusters in passes for c in clusters for e in c.members]
        assert sorted(indices) == list(range(len(examples)))
        for clusters in passes:
            rows = sum(len(c.members) for c in clusters)
            assert pass_cost(clusters) <= max_tokens or rows == 1


def test_shared_passes_come_first_and_hold_several_prompts():
    a, b = prompt(24, start=100), prompt(19, start=5000)
    examples = [example(0, a + [1] * 6), example(1, a + [2] * 9), example(2, a + [3] * 3)]
    examples += [example(3, b + [4] * 4), example(4, b + [5] * 7), example(5, [9] * 15)]
    passes = micro_batches(examples, 2048)
    assert [sorted(c.prefix for c in clusters) for clusters in passes] == [[19, 24], [0]]


def test_a_cluster_too_big_for_one_pass_is_split_into_chunks_by_real_tokens():
    shared = prompt(20)
    examples = [example(i, shared + [i] * n) for i, n in enumerate((10, 25, 5, 10, 10, 10))]
    passes = micro_batches(examples, 50)  # 20 prefix + suffixes, no padding
    assert [[(c.prefix, len(c.members)) for c in clusters] for clusters in passes] == [
        [(20, 1)],  # 20 + 10, and the next 25 would not fit
        [(20, 2)],  # 20 + 25 + 5
        [(20, 3)],  # 20 + 3 x 10
    ]


def test_without_prefix_sharing_every_example_goes_alone():
    examples = [example(i, prompt(24) + [i] * 3) for i in range(4)]
    passes = micro_batches(examples, 2048, share_prefixes=False)
    assert [[(c.prefix, len(c.members)) for c in clusters] for clusters in passes] == [[(0, 4)]]


def test_unshared_rows_go_longest_first_within_the_bound():
    examples = [example(i, [i + 1] * n) for i, n in enumerate((3, 10, 6, 30, 5))]
    passes = micro_batches(examples, 20)
    assert [[e.length for e in clusters[0].members] for clusters in passes] == [
        [30],  # longer than the bound: a pass of its own
        [10, 6],
        [5, 3],
    ]
    assert all(clusters[0].prefix == 0 and len(clusters) == 1 for clusters in passes)


# ---------------------------------------------------------------------------- pass inputs
def test_batch_inputs_concatenate_rows_and_fill_missing_optional_inputs_from_the_config():
    a = Example(0, [1, 2], {"weights": torch.tensor([1.0, 2.0]), "clip": torch.tensor([5.0, 6.0])})
    b = Example(1, [3, 4, 5], {"weights": torch.tensor([3.0, 4.0, 5.0])})
    inputs = batch_inputs([a, b], {"clip": 0.5})
    assert inputs["weights"].tolist() == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert inputs["clip"].tolist() == [5.0, 6.0, 0.5, 0.5, 0.5]


def test_padded_rows_pad_on_the_right_and_mask_the_real_tokens():
    ids_BT, mask_BT = padded_rows([example(0, [4, 5, 6]), example(1, [7])], pad_token_id=0)
    assert ids_BT.tolist() == [[4, 5, 6], [7, 0, 0]]
    assert mask_BT.tolist() == [[True, True, True], [True, False, False]]


def test_packed_pass_lets_each_suffix_see_its_own_prefix_and_continue_its_positions():
    a, b = [1, 2, 3, 4], [5, 6]
    clusters = [
        Cluster(4, [example(0, a + [10, 11]), example(1, a + [12])]),
        Cluster(2, [example(2, b + [13, 14, 15])]),
    ]
    inputs = packed_pass(clusters)
    assert inputs.ids_1N.tolist() == [[1, 2, 3, 4, 5, 6, 10, 11, 12, 13, 14, 15]]
    assert inputs.position_1N.tolist() == [[0, 1, 2, 3, 0, 1, 4, 5, 4, 2, 3, 4]]
    assert inputs.prefix_start_C == [0, 4]
    assert inputs.suffix_start_B == [6, 8, 9]
    seen = [[int(x) for x in row] for row in inputs.mask_11NN[0, 0].tolist()]
    assert seen == [
        # 1 2 3 4 5 6 10 11 12 13 14 15
        [1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0],
        [0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0],
        [0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 0, 1, 0, 0, 0],
        [0, 0, 0, 0, 1, 1, 0, 0, 0, 1, 0, 0],
        [0, 0, 0, 0, 1, 1, 0, 0, 0, 1, 1, 0],
        [0, 0, 0, 0, 1, 1, 0, 0, 0, 1, 1, 1],
    ]


def test_packed_pass_applies_a_sliding_window_by_position():
    clusters = [Cluster(3, [example(0, [1, 2, 3, 10, 11])])]
    mask_NN = packed_pass(clusters, window=2).mask_11NN[0, 0]
    # positions 0 1 2 | 3 4: each token sees itself and the one before it
    assert mask_NN.int().tolist() == [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [0, 1, 1, 0, 0],
        [0, 0, 1, 1, 0],
        [0, 0, 0, 1, 1],
    ]
