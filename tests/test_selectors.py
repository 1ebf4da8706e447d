"""Task selectors (``data_selector``): which rows each batch holds, for every selector type, how a
resumed reader continues, and how ``difficulty_based`` turns the pass rates the explorer measures
into its next batches."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
from loop_fakes import FakeSampler, explorer_for

from trinity.buffer.operators import build_pipeline
from trinity.buffer.selectors import DifficultyBased
from trinity.buffer.tasksets import TasksetError, TasksetReader
from trinity.config import ConfigError, load_config
from trinity.synchronizer.synchronizer import Synchronizer

SIZE = 10


@pytest.fixture
def rows_file(tmp_path):
    """Row i answers str(i % 4); its features: ``easy`` = i % 5, ``tie`` = i // 5,
    ``weak`` = ``strong`` = i / 9 (reference pass rates rising with i)."""
    path = tmp_path / "rows.jsonl"
    with path.open("w") as file:
        for i in range(SIZE):
            row = {
                "question": f"q{i}",
                "answer": str(i % 4),
                "easy": i % 5,
                "tie": i // 5,
                "weak": i / 9,
                "strong": i / 9,
            }
            file.write(json.dumps(row) + "\n")
    return path


def reader(path, selector: dict, **kwargs) -> TasksetReader:
    kwargs = {"repeat_times": 2, "batch_size": 4, "total_epochs": 2, **kwargs}
    return TasksetReader(
        {
            "name": "t",
            "path": str(path),
            "format": {"prompt_key": "question", "response_key": "answer"},
            "data_selector": selector,
        },
        default_workflow="simple_workflow",
        default_reward_fn="accuracy_reward",
        **kwargs,
    )


def served(r: TasksetReader) -> list[list[int]]:
    return [[task.row for task in batch] for batch in r]


def test_sequential_serves_file_order_and_wraps(rows_file):
    batches = served(reader(rows_file, {"selector_type": "sequential"}))
    assert batches == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 0, 1], [2, 3, 4, 5], [6, 7, 8, 9]]


def test_shuffle_permutes_each_epoch(rows_file):
    flat = sum(served(reader(rows_file, {"selector_type": "shuffle", "seed": 3})), [])
    first, second = flat[:SIZE], flat[SIZE:]
    assert sorted(first) == sorted(second) == list(range(SIZE))
    assert first != second and first != list(range(SIZE))


def test_random_draws_each_batch_afresh(rows_file):
    batches = served(reader(rows_file, {"selector_type": "random", "seed": 3}, total_epochs=6))
    assert all(len(set(b)) == len(b) == 4 for b in batches)  # no repeat inside a batch
    # no epochs: some row comes back before every row was served once
    first_epoch = sum(batches, [])[:SIZE]
    assert len(set(first_epoch)) < SIZE
    again = served(reader(rows_file, {"selector_type": "random", "seed": 3}, total_epochs=6))
    other = served(reader(rows_file, {"selector_type": "random", "seed": 4}, total_epochs=6))
    assert batches == again != other


def test_offline_easy2hard_serves_largest_features_first(rows_file):
    r = reader(rows_file, {"selector_type": "offline_easy2hard", "feature_keys": ["easy", "tie"]})
    flat = sum(served(r), [])
    # easy descending, then tie descending: (4,1)=9 (4,0)=4 (3,1)=8 (3,0)=3 ...
    assert flat[:SIZE] == [9, 4, 8, 3, 7, 2, 6, 1, 5, 0]
    assert flat[SIZE:] == flat[:SIZE]  # the same curriculum every epoch


@pytest.mark.parametrize(
    "selector",
    [
        {"selector_type": "shuffle"},
        {"selector_type": "random"},
        {"selector_type": "offline_easy2hard", "feature_keys": ["easy"]},
    ],
)
def test_a_resumed_reader_serves_what_the_interrupted_one_would_have(rows_file, selector):
    full = served(reader(rows_file, selector))
    resumed = reader(rows_file, selector)
    resumed.skip_batches(2)
    assert served(resumed) == full[2:]


def test_difficulty_based_prefers_rows_near_the_target_pass_rate(rows_file):
    def selector(**kwargs):
        return {
            "selector_type": "difficulty_based",
            "feature_keys": ["weak", "strong"],
            "kwargs": {"tau": 0, **kwargs},
        }

    r = reader(rows_file, selector())
    assert r.read_batch()[0].row == 0  # no evidence yet: every row scores the same
    r.feedback({0: 0.0, 1: 0.0})  # rows 0 and 1 failed; the references rank rows by i / 9
    assert [t.row for t in r.read_batch()] == [9, 8, 7, 6]  # target 1: the likeliest passes
    halfway = reader(rows_file, selector(target_reward=0.5))
    halfway.read_batch()
    halfway.feedback({0: 0.0, 1: 0.0})
    assert sorted(t.row for t in halfway.read_batch()) == [3, 4, 5, 6]  # pass rates near 0.5


def test_difficulty_based_beliefs_follow_the_measured_rates():
    features = np.full((4, 2), 0.5)
    selector = DifficultyBased(features, seed=0, m=16, lamb=0.2, rho=0.2)
    selector.feedback({0: 1.0, 1: 0.0})
    expected = selector.expected_pass_rates()
    # alpha = 0.8 + 0.2 + 0.8*16*r + 0.2*16*r, beta likewise with 1 - r; unseen rows: p~ = 0.5
    assert expected[0] == pytest.approx(17 / 18)
    assert expected[1] == pytest.approx(1 / 18)
    assert expected[2] == expected[3] == pytest.approx(0.5)
    sampled = DifficultyBased(features, seed=0, tau=0.05)
    sampled.feedback({0: 1.0, 1: 0.0})
    picks = [sampled.rows(b, b * 2, b * 2 + 2) for b in range(20)]
    assert all(len(set(p)) == 2 for p in picks)
    assert sum(0 in p for p in picks) == 20 and sum(1 in p for p in picks) < 3


def test_the_explorer_feeds_measured_pass_rates_to_the_selector(rows_file, tmp_path):
    """Step 1 serves rows 0-3 (no evidence yet); the sampler always answers "1", so only row 1
    passes; with target_reward 1 step 2 serves row 1 again and none of the failed rows."""
    task_reader = reader(
        rows_file,
        {
            "selector_type": "difficulty_based",
            "feature_keys": ["weak", "strong"],
            "kwargs": {"tau": 0, "rho": 0.0},
        },
    )
    explorer, buffer, _, _ = explorer_for(
        tmp_path,
        FakeSampler(["1"]),
        task_reader,
        synchronizer=Synchronizer(tmp_path, sync_interval=100),
        pipeline=build_pipeline(
            {"experience_pipeline": {"operators": [{"name": "pass_rate_calculator"}]}}
        ),
    )
    assert asyncio.run(explorer.run(0, 2)) == 2
    first, second = ({e.info["task_index"]["index"] for e in put} for put in buffer.puts)
    assert first == {0, 1, 2, 3}
    assert 1 in second and not second & {0, 2, 3}


def config_with(tmp_path, selector: str) -> str:
    path = tmp_path / "c.yaml"
    path.write_text(
        "model: {model_path: demo, max_prompt_tokens: 32, max_response_tokens: 8}\n"
        f"checkpoint_root_dir: {tmp_path}\n"
        "buffer:\n  total_steps: 1\n  explorer_input:\n"
        f"    taskset: {{path: 'builtin:arithmetic', data_selector: {selector}}}\n"
        "    default_workflow_type: math_workflow\n"
    )
    return str(path)


@pytest.mark.parametrize(
    ("selector", "message"),
    [
        ("{selector_type: shuffle, feature_keys: [a]}", "shuffle reads no features"),
        ("{selector_type: random, kwargs: {tau: 0}}", "only difficulty_based takes kwargs"),
        ("{selector_type: offline_easy2hard}", "offline_easy2hard sorts rows by feature columns"),
        (
            "{selector_type: difficulty_based, feature_keys: [a]}",
            "difficulty_based needs exactly 2",
        ),
        (
            "{selector_type: difficulty_based, feature_keys: [a, b], kwargs: {taux: 1}}",
            "kwargs.taux: unknown key (known: m, lamb, rho, adaptive_rho, do_sample, "
            "target_reward, tau) (did you mean 'tau'?)",
        ),
        ("{selector_type: easy2hard}", "did you mean 'offline_easy2hard'?"),
    ],
)
def test_bad_selectors_fail_the_config_check(tmp_path, selector, message):
    with pytest.raises(ConfigError) as info:
        load_config(config_with(tmp_path, selector))
    assert message in str(info.value)
    assert str(info.value).startswith("buffer.explorer_input.taskset.data_selector")


def test_feature_columns_are_checked_against_the_rows(rows_file):
    selector = {"selector_type": "offline_easy2hard", "feature_keys": ["missing"]}
    with pytest.raises(TasksetError, match="rows lack a value for 'missing'"):
        reader(rows_file, selector)
    with pytest.raises(TasksetError, match="column 'question' is not numeric"):
        reader(rows_file, {"selector_type": "offline_easy2hard", "feature_keys": ["question"]})
    with pytest.raises(TasksetError, match="cannot be combined with 'random'"):
        TasksetReader(
            {"path": str(rows_file), "shuffle": True, "data_selector": {"selector_type": "random"}},
            repeat_times=1,
            batch_size=2,
            default_workflow="simple_workflow",
        )
