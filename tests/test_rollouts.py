"""The rollout store: what the explorer keeps of each step, and what the studio reads back.

Checked here: every field of an experience survives the round trip; the size bound drops whole
oldest steps (and trims a newest step that alone is too big); a step written again replaces what
followed it (a resumed run); the queries filter, sort and page; a file that is not a rollouts
database is one clear error; the explorer writes each step through the writer it is given.
"""

from __future__ import annotations

import asyncio
import sqlite3

import pytest
from loop_fakes import FakeSampler
from test_explorer import explorer_for, reader

from trinity.monitor.rollouts import RolloutStore, RolloutStoreError
from trinity.synchronizer.synchronizer import Synchronizer
from trinity.workflows.types import Experience


def experience(step: int, i: int, *, prompt: str | None = None, reward: float = 0.5) -> Experience:
    return Experience(
        tokens=list(range(10 + i)),
        prompt_length=8,
        logprobs=[-0.1] * (2 + i),
        loss_mask=[1] * (2 + i),
        reward=reward,
        reward_components={"accuracy": reward, "format": 1.0},
        task_id=f"arith/0/{i}",
        group_id=f"{step}/arith/0/{i}",
        model_version=step - 1,
        prompt_text=prompt or f"What is {i} + {i}?",
        response_text=f"answer {2 * i} at step {step}",
        truncated=i % 2 == 1,
        advantages=[0.25] * (2 + i),
    )


def test_round_trip_keeps_every_field(tmp_path):
    store = RolloutStore(tmp_path / "monitor" / "rollouts.db")
    store.write(3, [experience(3, 0, reward=1.0), experience(3, 1, reward=0.0)])
    total, rows = store.query()
    assert total == 2
    first = rows[0]
    assert first["step"] == 3 and first["task_id"] == "arith/0/0"
    assert first["group_id"] == "3/arith/0/0" and first["model_version"] == 2
    assert first["prompt"] == "What is 0 + 0?" and first["response"] == "answer 0 at step 3"
    assert first["reward"] == 1.0
    assert first["reward_components"] == {"accuracy": 1.0, "format": 1.0}
    assert first["advantage"] == 0.25 and first["response_length"] == 2
    assert first["truncated"] is False and rows[1]["truncated"] is True
    assert store.steps() == [{"step": 3, "count": 2, "reward": 0.5}]


def test_bound_drops_whole_oldest_steps(tmp_path):
    store = RolloutStore(tmp_path / "rollouts.db", max_rows=7)
    for step in range(1, 5):
        store.write(step, [experience(step, i) for i in range(3)])
    # 12 written, 7 allowed: steps 1 and 2 go whole, not one row of step 2 is left behind
    assert [s["step"] for s in store.steps()] == [3, 4]
    store.write(5, [experience(5, i) for i in range(9)])  # a step larger than the bound alone
    assert store.steps() == [{"step": 5, "count": 7, "reward": 0.5}]


def test_a_step_written_again_replaces_it_and_what_followed(tmp_path):
    store = RolloutStore(tmp_path / "rollouts.db")
    for step in (1, 2, 3):
        store.write(step, [experience(step, 0)])
    store.write(2, [experience(2, 0, reward=1.0), experience(2, 1, reward=1.0)])
    assert store.steps() == [
        {"step": 1, "count": 1, "reward": 0.5},
        {"step": 2, "count": 2, "reward": 1.0},
    ]


def test_queries_filter_sort_and_page(tmp_path):
    store = RolloutStore(tmp_path / "rollouts.db")
    same = "What is 7 + 7?"
    store.write(1, [experience(1, 0, prompt=same, reward=0.0), experience(1, 1, reward=0.2)])
    store.write(2, [experience(2, 2, reward=0.9)])
    store.write(3, [experience(3, 0, prompt=same, reward=1.0), experience(3, 3, reward=0.4)])
    assert store.query(step=3)[0] == 2
    total, rows = store.query(min_reward=0.3, sort="-reward")
    assert total == 3 and [r["reward"] for r in rows] == [1.0, 0.9, 0.4]
    total, rows = store.query(max_reward=0.3, sort="reward", limit=1, offset=1)
    assert total == 2 and rows[0]["reward"] == 0.2
    assert [r["step"] for r in store.query(prompt=same)[1]] == [1, 3]
    assert store.query(search="answer 4")[1][0]["task_id"] == "arith/0/2"
    assert store.tasks() == [
        {"prompt": same, "task_id": "arith/0/0", "steps": 2, "first_step": 1, "last_step": 3}
    ]
    with pytest.raises(ValueError, match="sort must be one of"):
        store.query(sort="length")


def test_unreadable_files_are_one_clear_error(tmp_path):
    with pytest.raises(RolloutStoreError, match="no rollouts recorded"):
        RolloutStore(tmp_path / "missing.db").steps()
    junk = tmp_path / "junk.db"
    junk.write_text("this is not sqlite " * 100)
    with pytest.raises(RolloutStoreError, match="not a rollouts database"):
        RolloutStore(junk).query()
    other = tmp_path / "other.db"
    sqlite3.connect(other).execute("CREATE TABLE t (x)").connection.close()
    with pytest.raises(RolloutStoreError, match="not a rollouts database"):
        RolloutStore(other).tasks()


def test_the_explorer_writes_each_step_through_its_writer(tmp_path):
    store = RolloutStore(tmp_path / "rollouts.db")
    explorer, buffer, _, _ = explorer_for(
        tmp_path,
        FakeSampler(["2", "7"]),
        reader(),
        rollouts=store,
        synchronizer=Synchronizer(tmp_path, sync_offset=2),  # no weights to wait for
    )
    assert asyncio.run(explorer.run(0, 2)) == 2
    total, rows = store.query(limit=100)
    assert total == sum(len(put) for put in buffer.puts) == 16
    assert [s["step"] for s in store.steps()] == [1, 2]
    assert {r["response"] for r in rows} == {"2", "7"}
    assert all(r["prompt"] and r["group_id"].startswith(f"{r['step']}/") for r in rows)
