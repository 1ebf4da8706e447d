"""The original's data_processor.task_pipeline: Data-Juicer's service-free operators over the
training taskset's rows, priority ordering and top_k; the rest refused at config check."""

from __future__ import annotations

import json

import pytest
import yaml

from trinity.buffer.task_pipeline import run_task_pipeline
from trinity.config import ConfigError, load_config
from trinity.launcher.launcher import _reader, _train_reader

ROWS = [
    {"question": "What is 1 + 1?", "answer": "2", "level": 1, "source": "easy"},
    {"question": "  What   is 12 * 12?  ", "answer": "144", "level": 3, "source": "hard"},
    {"question": "Hi?", "answer": "x", "level": 2, "source": "easy"},
    {"question": "What is 1 + 1?", "answer": "2", "level": 1, "source": "easy"},
    {"question": "What is 7 - 9 in this ring?", "answer": "-2", "level": 5, "source": "hard"},
]


def config(tmp_path, task_pipeline):
    data = tmp_path / "tasks.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    taskset = {
        "name": "t",
        "path": str(data),
        "format": {"prompt_key": "question", "response_key": "answer"},
    }
    path = tmp_path / "run.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "model": {"model_path": "demo", "max_prompt_tokens": 32, "max_response_tokens": 8},
                "checkpoint_root_dir": str(tmp_path),
                "buffer": {
                    "batch_size": 2,
                    "explorer_input": {
                        "taskset": taskset,
                        "eval_tasksets": [dict(taskset, name="e")],
                        "default_workflow_type": "math_workflow",
                    },
                },
                "data_processor": {"task_pipeline": task_pipeline},
            }
        )
    )
    return load_config(path)


def test_the_launcher_trains_on_the_processed_rows_and_evaluates_on_all(tmp_path):
    cfg = config(
        tmp_path,
        {
            "operators": [
                {"name": "whitespace_normalization_mapper"},
                {"name": "text_length_filter", "args": {"min_len": 5}},
                {"name": "document_deduplicator"},
            ],
            "priority_weights": {"level": 1.0},
            "top_k": 2,
        },
    )
    reader = _train_reader(cfg)
    assert [row["question"] for row in reader.rows] == [
        "What is 7 - 9 in this ring?",  # level 5 first
        "What is 12 * 12?",  # normalized, level 3
    ]
    assert reader.total_steps() == 1
    assert len(_reader(cfg, cfg.buffer.explorer_input.eval_tasksets[0], is_eval=True).rows) == 5


@pytest.mark.parametrize(
    ("operator", "questions"),
    [
        ({"name": "words_num_filter", "args": {"min_num": 4, "max_num": 5}}, [0, 1, 3]),
        (
            {
                "name": "specified_field_filter",
                "args": {"field_key": "source", "target_value": ["hard"]},
            },
            [1, 4],
        ),
        (
            {
                "name": "specified_numeric_field_filter",
                "args": {"field_key": "level", "min_value": 2, "max_value": 3},
            },
            [1, 2],
        ),
        ({"name": "document_deduplicator"}, [0, 1, 2, 4]),
    ],
)
def test_filters(operator, questions):
    kept = run_task_pipeline(ROWS, {"operators": [operator]}, "question")
    assert kept == [ROWS[i] for i in questions]


def test_mappers_edit_only_the_target_fields():
    rows = [{"question": "a◆ b", "answer": "c◆"}]
    out = run_task_pipeline(
        rows, {"operators": [{"name": "remove_specific_chars_mapper"}]}, "question"
    )
    assert out == [{"question": "a b", "answer": "c◆"}]
    both = {
        "operators": [{"name": "remove_specific_chars_mapper"}],
        "target_fields": ["question", "answer"],
    }
    assert run_task_pipeline(rows, both, "question") == [{"question": "a b", "answer": "c"}]


@pytest.mark.parametrize(
    ("pipeline", "message"),
    [
        (
            {"operators": [{"name": "llm_difficulty_score_filter"}]},
            "task_pipeline.operators[0].name: 'llm_difficulty_score_filter' needs Data-Juicer",
        ),
        ({"config_path": "dj.yaml"}, "task_pipeline.config_path: not supported here"),
        ({"inputs": ["raw.jsonl"]}, "task_pipeline.inputs: not supported here"),
        ({"top_k": 0}, "task_pipeline.top_k must be a positive integer or -1"),
        (
            {"operators": [{"name": "text_length_filter", "args": {"min_length": 3}}]},
            "task_pipeline.operators[0].args: text_length_filter:",
        ),
        ({"operatorz": []}, "task_pipeline.operatorz: unknown key"),
    ],
)
def test_refused_at_config_check(tmp_path, pipeline, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("*", r"\*")):
        config(tmp_path, pipeline)
