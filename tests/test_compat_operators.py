"""Experience operators written for the original (its ``ExperienceOperator`` classes and
``register_module``) run unmodified from ``--plugin-dir`` in our experience pipeline."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from trinity.buffer.operators import build_pipeline
from trinity.plugins import load_plugins
from trinity.workflows import types

PLUGINS = Path(__file__).parent / "plugins_original_operators"


@pytest.fixture(scope="module", autouse=True)
def plugin():
    load_plugins([PLUGINS])


def exp(group: str, reward: float, response_length: int) -> types.Experience:
    return types.Experience(
        tokens=[1, 2] + [3] * response_length,
        prompt_length=2,
        logprobs=[-0.5] * response_length,
        loss_mask=[1] * response_length,
        reward=reward,
        task_id=f"{group}/t",
        group_id=group,
        info={"run": 1, "step": 0},
    )


def test_original_operators_filter_and_edit_our_experiences():
    pipeline = build_pipeline(
        {
            "experience_pipeline": {
                "operators": [
                    {"name": "keep_top_reward", "args": {"keep": 1}},
                    {"name": "async_length_penalty", "args": {"weight": 0.5}},
                ]
            }
        }
    )
    batch = [exp("a", 1.0, 2), exp("a", 3.0, 4), exp("b", 0.0, 1), exp("b", -1.0, 1)]
    kept, metrics = pipeline.process(batch)
    assert kept == [batch[1], batch[2]]  # our own objects, the best of each group
    assert [e.reward for e in kept] == [3.0 - 0.5 * 4, 0.0 - 0.5 * 1]
    assert kept[0].loss_mask == [1, 1, 1, 0] and kept[1].loss_mask == [0]
    assert kept[0].reward_components == {"length": 4.0}
    assert kept[0].info == {"run": 1, "step": 0, "rank": 0}
    assert metrics == {"dropped": 2.0, "prepared": 1.0}
    _, again = pipeline.process([exp("c", 1.0, 1)])
    assert again["prepared"] == 1.0  # prepare runs once


def test_config_check_finds_the_plugin_operators(tmp_path):
    config = {
        "model": {"model_path": "demo", "max_prompt_tokens": 32, "max_response_tokens": 8},
        "checkpoint_root_dir": str(tmp_path),
        "buffer": {
            "batch_size": 2,
            "explorer_input": {
                "taskset": {"path": "builtin:arithmetic"},
                "default_workflow_type": "math_workflow",
            },
        },
        "data_processor": {
            "experience_pipeline": {"operators": [{"name": "keep_top_reward", "args": {"keep": 2}}]}
        },
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    check = [sys.executable, "-m", "trinity.cli.main", "config", "check", str(path)]
    done = subprocess.run([*check, "--plugin-dir", str(PLUGINS)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    missing = subprocess.run(check, capture_output=True, text=True)
    assert missing.returncode == 2 and "keep_top_reward" in missing.stderr


@pytest.mark.parametrize("storage", ["file", "sqlite", "sql"])
def test_pipeline_output_also_gets_the_processed_experiences(tmp_path, storage):
    """``sql`` with a URL goes through SQLAlchemy, as a PostgreSQL or MySQL URL would."""
    path = tmp_path / "out.jsonl" if storage == "file" else tmp_path / "out.db"
    output = {"name": "processed", "storage_type": storage, "path": str(path)}
    if storage != "file":
        output["path"] = f"sqlite:///{path}"  # the original's form
    pipeline = build_pipeline(
        {
            "experience_pipeline": {
                "operators": [{"name": "reward_filter", "args": {"threshold": 0.5}}],
                "output": output,
            }
        }
    )
    writer = {"file": "function", "sqlite": "SqliteExperienceBuffer", "sql": "SqlExperienceBuffer"}
    assert type(getattr(pipeline.output, "__self__", pipeline.output)).__name__ == writer[storage]
    for step in range(2):
        kept, _ = pipeline.process([exp("a", 1.0 + step, 2), exp("a", 0.0, 1)])
        assert [e.reward for e in kept] == [1.0 + step]
    if storage == "file":
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        assert [row["reward"] for row in rows] == [1.0, 2.0]
        assert types.Experience.from_dict(rows[0]).tokens == [1, 2, 3, 3]
    else:
        with sqlite3.connect(path) as conn:
            rewards = [r for (r,) in conn.execute("SELECT reward FROM explorer_output ORDER BY id")]
        assert rewards == [1.0, 2.0]


@pytest.mark.parametrize(
    ("output", "message"),
    [
        ({"storage_type": "queue", "path": "x"}, "must be a mapping with a path"),
        ({"storage_type": "sqlite", "path": "postgresql://h/db"}, "needs storage_type 'sql'"),
    ],
)
def test_pipeline_output_refused_at_config_check(tmp_path, output, message):
    from trinity.config import ConfigError, load_config

    path = tmp_path / "run.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "model": {"model_path": "demo", "max_prompt_tokens": 8, "max_response_tokens": 8},
                "checkpoint_root_dir": str(tmp_path),
                "buffer": {"explorer_input": {"taskset": {"path": "builtin:arithmetic"}}},
                "data_processor": {"experience_pipeline": {"output": output}},
            }
        )
    )
    with pytest.raises(ConfigError, match=rf"experience_pipeline\.output.*{message}"):
        load_config(path)
