"""Several training tasksets on the original's schedule: every epoch covers each taskset's rows,
mixed in proportion to their sizes; resuming reads what the interrupted run would have."""

from __future__ import annotations

from collections import Counter

import yaml

from trinity.buffer.tasksets import TasksetReader, TasksetScheduler
from trinity.config import load_config
from trinity.launcher.launcher import _train_reader


def taskset(name: str, size: int, **extra) -> dict:
    return {
        "name": name,
        "path": "builtin:arithmetic",
        "builtin_args": {"size": size, "seed": len(name)},
        "format": {"prompt_key": "question", "response_key": "answer"},
        **extra,
    }


def scheduler(total_epochs: int = 2, **kwargs) -> TasksetScheduler:
    readers = [
        TasksetReader(ts, repeat_times=2, batch_size=4, default_workflow="math_workflow", **kwargs)
        for ts in (
            taskset("big", 6),
            taskset("small", 2, data_selector={"selector_type": "shuffle"}),
        )
    ]
    return TasksetScheduler(readers, batch_size=4, total_epochs=total_epochs, seed=3)


def test_each_epoch_covers_every_row_of_every_taskset():
    sched = scheduler()
    assert sched.total_steps() == 4  # 8 rows x 2 epochs / 4
    batches = list(iter(sched.read_batch, []))
    assert [len(b) for b in batches] == [4, 4, 4, 4]
    for epoch in (batches[:2], batches[2:]):
        tasks = [t for b in epoch for t in b]
        names = Counter(t.task_id.split("/")[0] for t in tasks)
        assert names == {"big": 6, "small": 2}
        assert sorted(t.row for t in tasks) == list(range(8))  # small's rows follow big's
    mixed = [{t.task_id.split("/")[0] for t in b} for b in batches]
    assert any(len(names) == 2 for names in mixed)  # shuffled together, not one after the other


def test_resume_reads_the_batches_the_interrupted_run_would_have():
    fresh = scheduler()
    expected = [[t.task_id for t in fresh.read_batch()] for _ in range(4)]
    resumed = scheduler()
    resumed.skip_batches(2)
    assert [[t.task_id for t in resumed.read_batch()] for _ in range(2)] == expected[2:]
    assert resumed.batches_read == 4 and resumed.read_batch() == []


def test_a_config_with_two_tasksets_trains_on_both(tmp_path):
    path = tmp_path / "two.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "model": {"model_path": "demo", "max_prompt_tokens": 32, "max_response_tokens": 8},
                "checkpoint_root_dir": str(tmp_path),
                "buffer": {
                    "batch_size": 2,
                    "explorer_input": {
                        "tasksets": [taskset("a", 4), taskset("b", 4)],
                        "default_workflow_type": "math_workflow",
                    },
                },
            }
        )
    )
    reader = _train_reader(load_config(path))
    assert isinstance(reader, TasksetScheduler) and [r.name for r in reader.readers] == ["a", "b"]
    assert reader.total_steps() == 4
