"""No key of the original's schema is ignored in silence: those that do nothing here are named,
all of them, in one warning at load time (and by ``trinity config check``)."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest

from trinity.config import ConfigError, load_config

HERE = Path(__file__).parent
EVERY_KEY = HERE / "configs" / "every_key.yaml"
GPU_ROLLOUT_KEYS = [
    f"explorer.rollout_model.{key}"
    for key in (
        "data_parallel_size",
        "pipeline_parallel_size",
        "enable_expert_parallel",
        "extra_engine_args",
        "use_v1",
        "enforce_eager",
        "enable_prefix_caching",
        "enable_chunked_prefill",
        "gpu_memory_utilization",
        "weight_sync_buffer_size",
        "dtype",
    )
]
GPU_TRAINER_KEYS = [
    f"trainer.{key}"
    for key in (
        "trainer_strategy",
        "use_dynamic_bsz",
        "use_remove_padding",
        "balance_batch",
        "ulysses_sequence_parallel_size",
        "param_offload",
        "optimizer_offload",
        "grad_offload",
        "offload_policy",
        "save_strategy",
        "megatron",
    )
]


@pytest.fixture(autouse=True)
def _root(tmp_path, monkeypatch):
    monkeypatch.setenv("TRINITY_CHECKPOINT_ROOT_DIR", str(tmp_path))


def warnings_of(caplog, path, overrides=None) -> list[str]:
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="trinity.config"):
        load_config(path, overrides)
    return [r.getMessage() for r in caplog.records if "do nothing" in r.getMessage()]


def named_keys(message: str) -> set[str]:
    """The key paths a warning names (after each reason's colon)."""
    body = message.split("implementation: ", 1)[1]
    return {
        key.strip() for group in body.split("; ") for key in group.rsplit(": ", 1)[1].split(", ")
    }


def test_every_key_at_its_default_names_exactly_the_gpu_settings_and_missing_features(caplog):
    (message,) = warnings_of(caplog, EVERY_KEY)
    expected = {
        *GPU_ROLLOUT_KEYS,
        *GPU_TRAINER_KEYS,
        # an auxiliary model is served like the rollout model: the same engine knobs do nothing
        *(key.replace("rollout_model", "auxiliary_models[0]") for key in GPU_ROLLOUT_KEYS),
    }
    assert named_keys(message) == expected
    assert message.startswith(f"{len(expected)} config key(s)")


NOT_IMPLEMENTED = [
    "model.repetition_penalty=1.1",
    "explorer.rollout_model.enable_log_requests=true",
    "model.min_response_tokens=4",
    "log.group_by_node=true",
]


def test_features_not_implemented_are_refused_in_one_line_naming_them(caplog):
    with pytest.raises(ConfigError) as info:
        warnings_of(caplog, EVERY_KEY, NOT_IMPLEMENTED)
    message = str(info.value)
    assert "\n" not in message and message.endswith(
        "not implemented in this implementation "
        "(remove the key(s) or set them to the "
        "original's default)"
    )
    assert set(message.split(": ", 1)[0].split(", ")) == {o.split("=")[0] for o in NOT_IMPLEMENTED}


def test_features_switched_on_are_named_and_their_harmless_values_are_not(caplog):
    switched_on = [
        "data_processor.experience_pipeline.input_save_path=sqlite:///x.db",
        "explorer.rollout_model.gpu_memory_utilization=0.5",
    ]
    (message,) = warnings_of(caplog, EVERY_KEY, switched_on)
    named = named_keys(message)
    for override in switched_on:
        assert override.split("=")[0] in named
    harmless = [
        "algorithm.sample_strategy=staleness_control",  # works: trinity.buffer.strategies
        "buffer.trainer_input.experience_buffer.replay_buffer.enable=true",  # works: ReplayBuffer
        "explorer.over_rollout.ratio=0.5",  # works: Explorer.run_tasks
        "explorer.over_rollout.return_partial_tasks=true",
        "synchronizer.sync_style=explorer_driven",  # which over_rollout needs
        "explorer.dynamic_timeout.enable=true",  # works: Explorer.task_timeout
        "model.enable_thinking=false",  # works: handed to the chat template
        "model.rope_theta=500000.0",  # works: set on the model's config (test_model_keys.py)
        "model.rope_scaling={type: linear, factor: 2.0}",
        "explorer.rollout_model.enable_thinking=true",
        "model.repetition_penalty=1",
        "explorer.rollout_model.enable_log_requests=false",
        "buffer.explorer_input.taskset.data_selector.selector_type=SHUFFLE",
        "buffer.explorer_input.taskset.data_selector.selector_type=random",
    ]
    (message,) = warnings_of(caplog, EVERY_KEY, harmless)
    assert not {o.split("=")[0] for o in harmless} & named_keys(message)


def test_a_plain_config_warns_nothing_and_stage_keys_are_named_once_with_their_stage(
    caplog, tmp_path
):
    path = tmp_path / "staged.yaml"
    path.write_text(
        "model: {model_path: demo, max_prompt_tokens: 32, max_response_tokens: 8}\n"
        "buffer:\n  total_steps: 1\n  explorer_input:\n"
        "    taskset: {path: 'builtin:arithmetic'}\n    default_workflow_type: math_workflow\n"
        "stages:\n- stage_name: a\n  trainer: {ulysses_sequence_parallel_size: 2}\n"
        "- stage_name: b\n"
    )
    (message,) = warnings_of(caplog, path)
    assert named_keys(message) == {"stages[0].trainer.ulysses_sequence_parallel_size"}
    assert warnings_of(caplog, HERE.parent / "examples" / "grpo_demo.yaml") == []


def test_config_check_prints_the_same_warning():
    run = subprocess.run(
        [sys.executable, "-m", "trinity.cli.main", "config", "check", str(EVERY_KEY)],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    (line,) = [line for line in run.stderr.splitlines() if "do nothing" in line]
    assert "explorer.rollout_model.gpu_memory_utilization" in line


def test_config_check_refuses_a_feature_not_implemented_with_exit_2(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(
        EVERY_KEY.read_text().replace("repetition_penalty: 1.0", "repetition_penalty: 1.2")
    )
    run = subprocess.run(
        [sys.executable, "-m", "trinity.cli.main", "config", "check", str(path)],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 2
    (line,) = [line for line in run.stderr.splitlines() if "not implemented" in line]
    assert "model.repetition_penalty" in line
