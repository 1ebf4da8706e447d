"""Buffer features in a real ``trinity run`` (tiny random model, local engine): what the trainer
receives changes as configured."""

from __future__ import annotations

import json

import yaml
from test_rl_loop import job_dir, run_cli, trainer_records, write_config


def test_mix_chord_trains_on_rollouts_and_sft_rows(tmp_path, tiny_model_dir):
    data = tmp_path / "expert.jsonl"
    rows = [{"prompt": f"What is {i} + {i}?", "response": str(2 * i)} for i in range(5)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = yaml.safe_load(write_config(tmp_path, tiny_model_dir).read_text())
    config = write_config(
        tmp_path,
        tiny_model_dir,
        algorithm={
            "algorithm_type": "mix_chord",
            "repeat_times": 4,
            "optimizer": {"lr": 1e-3},
            "sample_strategy_args": {"expert_data_ratio": 0.34},
            "policy_loss_fn_args": {"mu_warmup_steps": 2, "mu_peak": 0.5},
        },
        buffer={
            **base["buffer"],
            "total_steps": 1,
            "train_batch_size": 12,  # 8 rollouts (2 tasks x 4) + ceil(0.34 * 12) = 5 SFT rows
            "trainer_input": {"auxiliary_buffers": {"sft_dataset": {"path": str(data)}}},
        },
    )
    run_cli(config)
    steps = trainer_records(job_dir(tmp_path))
    assert sorted(steps) == [1]
    assert steps[1]["sample/expert_count"] == 5.0  # beside 7 of the step's 8 rollouts
    assert steps[1]["actor/final_loss"] == steps[1]["actor/final_loss"]  # not NaN
