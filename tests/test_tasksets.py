"""Taskset reading: file formats, batching across epochs, seeded shuffling, resume, built-ins."""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from omegaconf import OmegaConf

from trinity.buffer import tasksets
from trinity.buffer.procedural import arithmetic, build_builtin, countdown
from trinity.buffer.tasksets import TasksetError, TasksetReader
from trinity.workflows.rewards import countdown_reward, eval_arithmetic

GSM8K_PATH = Path(__file__).parent / "data/gsm8k_sample.jsonl"
ROWS = [json.loads(line) for line in GSM8K_PATH.open()]
FORMAT = {"prompt_key": "question", "response_key": "answer"}


def taskset(path, **fields):
    cfg = dict(name="gsm8k", storage_type="file", path=str(path), split="train", format=FORMAT)
    cfg.update(fields)
    return SimpleNamespace(**cfg)


def reader(cfg, **kwargs):
    kwargs = {"repeat_times": 4, "batch_size": 8, "default_workflow": "math_workflow", **kwargs}
    return TasksetReader(cfg, **kwargs)


def questions(tasks):
    return [t.raw["question"] for t in tasks]


def test_jsonl_batches_and_task_fields():
    cfg = taskset(
        GSM8K_PATH, rollout_args={"temperature": 1.0, "max_tokens": 128}, workflow_args={"k": 1}
    )
    r = reader(cfg, default_reward_fn="math_reward")
    assert len(r) == 20 and r.total_steps() == 3
    batches = list(r)
    assert [len(b) for b in batches] == [8, 8, 4]
    assert r.read_batch() == []
    assert questions([t for b in batches for t in b]) == [row["question"] for row in ROWS]
    task = batches[1][0]
    assert task.raw == ROWS[8] and task.task_id == "gsm8k/0/8" and task.batch_id == 1
    assert task.workflow == "math_workflow" and task.reward_fn == "math_reward"
    assert task.repeat_times == 4 and task.format["prompt_key"] == "question"
    assert task.rollout_args == {"temperature": 1.0, "max_tokens": 128}
    assert task.workflow_args == {"k": 1} and not task.is_eval


def test_dataclass_config_with_enums():
    import dataclasses
    import enum

    class PromptType(enum.Enum):
        PLAINTEXT = "plaintext"

    @dataclasses.dataclass
    class Format:
        prompt_key: str = "question"
        response_key: str = "answer"
        prompt_type: PromptType = PromptType.PLAINTEXT
        system_prompt: str | None = None

    @dataclasses.dataclass
    class Taskset:
        name: str = "gsm8k"
        path: str = str(GSM8K_PATH)
        format: Format = dataclasses.field(default_factory=Format)
        rollout_args: dict = dataclasses.field(default_factory=dict)

    task = reader(Taskset()).read_batch()[0]
    assert task.format["prompt_type"] == "plaintext" and task.format["system_prompt"] is None


def test_omegaconf_config_and_taskset_defaults_win():
    cfg = OmegaConf.create(
        {
            "name": "gsm8k",
            "path": str(GSM8K_PATH),
            "format": FORMAT,
            "default_workflow_type": "math_boxed_workflow",
            "rollout_args": {"temperature": 0.5},
        }
    )
    task = reader(cfg, default_workflow="math_workflow").read_batch()[0]
    assert task.workflow == "math_boxed_workflow"
    assert task.rollout_args == {"temperature": 0.5} and task.reward_fn is None


@pytest.mark.parametrize("suffix", ["json", "parquet", "csv"])
def test_other_file_formats(tmp_path, suffix):
    import pandas as pd

    frame = pd.DataFrame(ROWS)
    path = tmp_path / f"gsm8k.{suffix}"
    if suffix == "json":
        path.write_text(json.dumps(ROWS))
    elif suffix == "parquet":
        frame.to_parquet(path)
    else:
        frame.to_csv(path, index=False)
    tasks = reader(taskset(path), batch_size=32).read_batch()
    assert [t.raw for t in tasks] == ROWS


def test_directory_with_splits(tmp_path):
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS[:15]))
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS[15:]))
    assert len(reader(taskset(tmp_path))) == 15
    evaluator = reader(taskset(tmp_path, split="test"), is_eval=True)
    assert [t.raw for t in evaluator.all_tasks()] == ROWS[15:]


def test_saved_dataset_directory(tmp_path):
    import datasets

    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "saved"))
    assert [t.raw for t in reader(taskset(tmp_path / "saved")).all_tasks()] == ROWS


def test_shuffle_is_seeded_per_epoch_and_covers_every_row():
    cfg = taskset(GSM8K_PATH, data_selector={"selector_type": "shuffle", "seed": 7})
    first = [questions(b) for b in reader(cfg, total_epochs=2, batch_size=5)]
    again = [questions(b) for b in reader(cfg, total_epochs=2, batch_size=5)]
    other = [questions(b) for b in reader(cfg, total_epochs=2, batch_size=5, seed=8)]
    assert first == again and first != other
    seeded = taskset(GSM8K_PATH, data_selector={"selector_type": "shuffle", "seed": 7}, seed=8)
    assert [questions(b) for b in reader(seeded, batch_size=5)] == other[
        :4
    ]  # the taskset's own seed key wins over data_selector.seed
    flat = [q for b in first for q in b]
    epoch0, epoch1 = flat[:20], flat[20:]
    assert sorted(epoch0) == sorted(epoch1) == sorted(r["question"] for r in ROWS)
    assert epoch0 != epoch1 and epoch0 != [r["question"] for r in ROWS]


def test_shuffle_flag_and_sequential_default():
    plain = questions(reader(taskset(GSM8K_PATH), batch_size=20).read_batch())
    shuffled = questions(reader(taskset(GSM8K_PATH, shuffle=True), batch_size=20).read_batch())
    assert plain == [r["question"] for r in ROWS]
    assert shuffled != plain and sorted(shuffled) == sorted(plain)


def test_epochs_and_total_steps():
    r = reader(taskset(GSM8K_PATH), total_epochs=3, batch_size=8)
    assert r.total_steps() == 8  # ceil(60 / 8)
    sizes = [len(b) for b in r]
    assert sizes == [8] * 7 + [4]
    capped = reader(taskset(GSM8K_PATH), total_epochs=1, total_steps=6, batch_size=8)
    batches = list(capped)
    assert len(batches) == 6 and all(len(b) == 8 for b in batches)  # cycles past one epoch
    ids = [t.task_id for b in batches for t in b]
    assert len(set(ids)) == len(ids)  # a row seen twice gets a different id per epoch


def test_batch_larger_than_the_taskset_keeps_group_ids_unique():
    small = reader(taskset(GSM8K_PATH), batch_size=30, total_steps=1).read_batch()
    assert len(small) == 30 and len({t.task_id for t in small}) == 30


def test_skip_batches_resumes_exactly():
    cfg = taskset(GSM8K_PATH, shuffle=True)
    full = [b for b in reader(cfg, batch_size=6, total_steps=9)]
    resumed = reader(cfg, batch_size=6, total_steps=9)
    resumed.skip_batches(4)
    rest = list(resumed)
    assert [[t.task_id for t in b] for b in rest] == [[t.task_id for t in b] for b in full[4:]]
    assert [[t.raw for t in b] for b in rest] == [[t.raw for t in b] for b in full[4:]]
    assert [b[0].batch_id for b in rest] == [4, 5, 6, 7, 8]
    done = reader(cfg, batch_size=6, total_steps=9)
    done.skip_batches(9)
    assert done.read_batch() == []


def test_eval_reader_reads_everything_once_in_order():
    r = reader(taskset(GSM8K_PATH, shuffle=True), is_eval=True, repeat_times=2)
    tasks = r.all_tasks()
    assert [t.raw for t in tasks] == ROWS
    assert all(t.is_eval and t.repeat_times == 2 for t in tasks)
    assert tasks[3].task_id == "gsm8k/3"


def test_per_row_workflow_and_reward_keys(tmp_path):
    path = tmp_path / "mixed.jsonl"
    rows = [
        {"question": "q1", "answer": "1", "wf": "math_boxed_workflow", "rf": "accuracy_reward"},
        {"question": "q2", "answer": "2"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = taskset(path, format={**FORMAT, "workflow_key": "wf", "reward_fn_key": "rf"})
    first, second = reader(cfg, default_reward_fn="math_reward").read_batch()
    assert (first.workflow, first.reward_fn) == ("math_boxed_workflow", "accuracy_reward")
    assert (second.workflow, second.reward_fn) == ("math_workflow", "math_reward")


def test_unknown_names_and_missing_workflow_fail_early():
    with pytest.raises(TasksetError, match="did you mean 'math_workflow'"):
        reader(taskset(GSM8K_PATH), default_workflow="math_wrkflow")
    with pytest.raises(TasksetError, match="unknown reward function 'nope'"):
        reader(taskset(GSM8K_PATH), default_reward_fn="nope")
    with pytest.raises(TasksetError, match="default_workflow_type"):
        reader(taskset(GSM8K_PATH), default_workflow=None)


def test_missing_file_and_unsupported_storage():
    with pytest.raises(TasksetError, match="not found: data/missing.jsonl"):
        reader(taskset("data/missing.jsonl"))
    with pytest.raises(TasksetError, match="storage_type 'queue' is not supported"):
        reader(taskset(GSM8K_PATH, storage_type="queue"))
    with pytest.raises(TasksetError, match="not a usable SQLAlchemy URL"):  # sql: tests/test_sql_*
        reader(taskset(GSM8K_PATH, storage_type="sql"))


def test_offline_hub_error_names_the_path_and_suggests_a_local_file():
    """Really tries the Hub: on this machine (no network) the probe fails and so does the cache."""
    if tasksets._hub_reachable():
        pytest.skip("the Hugging Face Hub is reachable here; the offline path is not exercised")
    started = time.monotonic()
    with pytest.raises(TasksetError) as err:
        reader(taskset("openai/gsm8k", subset_name="main"))
    message = str(err.value)
    assert "'openai/gsm8k'" in message and "subset=main" in message and "split=train" in message
    assert "unreachable" in message and "local file" in message
    assert "\n" not in message
    assert time.monotonic() - started < 15


def test_hub_failure_when_unreachable_is_reported_without_retries(monkeypatch):
    monkeypatch.setattr(tasksets, "_hub_reachable", lambda: False)
    with pytest.raises(TasksetError, match="'nobody/no-such-dataset'.*unreachable"):
        reader(taskset("nobody/no-such-dataset"))
    from huggingface_hub import constants

    assert constants.HF_HUB_OFFLINE is False  # the offline switch is restored


def test_builtin_arithmetic_is_deterministic_and_correct():
    rows = arithmetic(size=200, num_terms=3, max_operand=12, operators="+-*/", seed=5)
    assert rows == arithmetic(size=200, num_terms=3, max_operand=12, operators="+-*/", seed=5)
    assert rows != arithmetic(size=200, num_terms=3, max_operand=12, operators="+-*/", seed=6)
    assert arithmetic(size=50, seed=5)[:10] == arithmetic(
        size=10, seed=5
    )  # rows independent of size
    for row in rows:
        expression = row["question"].removeprefix("What is ").removesuffix("?")
        value = eval(expression)  # test only: the generator's own "a op b op c" strings
        assert value == int(row["answer"]) and value >= 0
    assert any(
        int(r["answer"]) < 0 for r in arithmetic(size=100, operators="-", allow_negative=True)
    )
    with pytest.raises(ValueError, match="operators"):
        arithmetic(operators="+^")


def test_builtin_countdown_rows_are_solvable():
    rows = countdown(size=100, num_numbers=4, seed=1)
    assert rows == countdown(size=100, num_numbers=4, seed=1)
    for row in rows:
        value, used = eval_arithmetic(row["answer"])
        assert value == row["target"] and sorted(used) == sorted(row["nums"])
        assert 0 < row["target"] <= 100 and str(row["target"]) in row["question"]
        truth = {"target": row["target"], "numbers": row["nums"]}
        assert countdown_reward(f"<answer>{row['answer']}</answer>", truth)["accuracy"] == 1.0


def test_builtin_taskset_through_the_reader():
    cfg = OmegaConf.create(
        {
            "name": "arithmetic",
            "path": "builtin:arithmetic",
            "builtin_args": {"num_terms": 2, "max_operand": 9, "size": 64, "seed": 3},
            "format": {"prompt_key": "question", "response_key": "answer"},
        }
    )
    r = reader(cfg, default_workflow="simple_workflow", default_reward_fn="accuracy_reward")
    assert len(r) == 64 and r.total_steps() == 8
    assert [t.raw for t in r.read_batch()] == build_builtin(
        "arithmetic", {"num_terms": 2, "max_operand": 9, "size": 64, "seed": 3}
    )[:8]
    with pytest.raises(TasksetError, match="unknown builtin taskset 'arithmetik'"):
        reader(taskset("builtin:arithmetik"))
    with pytest.raises(TasksetError, match="bad builtin_args"):
        reader(taskset("builtin:countdown", builtin_args={"bogus": 1}))


def test_example_arithmetic_file_is_the_builtin_set_in_gsm8k_form():
    """examples/data/arithmetic.jsonl (the seed Tinker config's local taskset here) is
    reproducible: builtin arithmetic, two one-digit operands, seed 1, answers as ``#### N``."""
    path = Path(__file__).parents[1] / "examples" / "data" / "arithmetic.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    expected = build_builtin(
        "arithmetic", {"num_terms": 2, "max_operand": 9, "size": 400, "seed": 1}
    )
    assert rows == [{"question": r["question"], "answer": f"#### {r['answer']}"} for r in expected]
