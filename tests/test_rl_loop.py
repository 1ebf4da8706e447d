"""The RL loop end to end on the local backend with a tiny random model.

Each run is a real ``trinity run``: config validation, taskset, workflows, explorer, buffer,
trainer, synchronizer, checkpoints and metrics, with the engine in-process.
"""

from __future__ import annotations

import functools
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from trinity.cli.main import main
from trinity.jobdir import JobDir
from trinity.monitor import read_metrics
from trinity.monitor.rollouts import RolloutStore

PLUGINS = Path(__file__).parent / "plugins"


def write_config(tmp_path: Path, model_dir: Path, name: str = "run", **sections) -> Path:
    """A small GRPO config; ``sections`` override top-level keys (dicts merge one level down)."""
    config = {
        "mode": "both",
        "project": "loop",
        "group": "tests",
        "name": name,
        "checkpoint_root_dir": str(tmp_path / "ckpt"),
        "algorithm": {"algorithm_type": "grpo", "repeat_times": 4, "optimizer": {"lr": 1e-3}},
        "model": {
            "model_path": str(model_dir),
            "max_prompt_tokens": 64,
            "max_response_tokens": 6,
            "tinker": {"rank": 4, "seed": 0},
        },
        "buffer": {
            "batch_size": 2,
            "total_steps": 3,
            "explorer_input": {
                "taskset": {
                    "name": "arith",
                    "path": "builtin:arithmetic",
                    "builtin_args": {"size": 64},
                    "format": {"prompt_key": "question", "response_key": "answer"},
                },
                "default_workflow_type": "simple_workflow",
                "default_reward_fn_type": "digit_share_reward",
            },
        },
        "explorer": {"runner_per_model": 4, "rollout_model": {"engine_num": 1, "seed": 7}},
        "trainer": {"save_interval": 2},
        "monitor": {"monitor_type": "none"},
        "synchronizer": {"sync_method": "memory", "sync_interval": 1, "sync_offset": 0},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def backend_model(tmp_path: Path, model_dir: Path, backend: str) -> dict:
    """The ``model`` section for ``local`` (engine in-process) or ``tinker`` (the official SDK
    against a ``trinity server`` the run starts on a loopback port)."""
    model = yaml.safe_load(write_config(tmp_path, model_dir).read_text())["model"]
    model["tinker"].update(enable=backend == "tinker", base_url="local")
    return model


def run_cli(config_path: Path) -> None:
    assert main(["run", "--config", str(config_path), "--plugin-dir", str(PLUGINS)]) == 0


def job_dir(tmp_path: Path, name: str = "run") -> Path:
    return tmp_path / "ckpt" / "loop" / "tests" / name


def trainer_records(job: Path) -> dict[int, dict]:
    """Per step, the merged metrics the trainer logged (the records carrying a loss)."""
    steps: dict[int, dict] = {}
    for record in read_metrics(job / "monitor" / "metrics.jsonl"):
        if "actor/final_loss" in record or "rollout/model_version" in record:
            steps.setdefault(record["step"], {}).update(record)
    return steps


@pytest.mark.parametrize(("offset", "backend"), [(0, "local"), (1, "local"), (1, "tinker")])
def test_grpo_three_steps_then_resume(tmp_path, tiny_model_dir, offset, backend):
    config = write_config(
        tmp_path,
        tiny_model_dir,
        synchronizer={"sync_interval": 1, "sync_offset": offset},
        model=backend_model(tmp_path, tiny_model_dir, backend),
    )
    run_cli(config)
    job = job_dir(tmp_path)
    steps = trainer_records(job)
    assert sorted(steps) == [1, 2, 3]
    for record in steps.values():
        assert record["actor/final_loss"] == pytest.approx(record["actor/final_loss"])  # not NaN
        assert 0.0 <= record["critic/rewards/mean"] <= 1.0
    # offset k: the explorer runs k steps ahead of the weights it samples with
    assert steps[3]["rollout/model_version"] == 2 - offset
    assert (job / "latest_checkpointed_iteration.txt").read_text() == "3"
    assert (job / "global_step_2" / "remote_checkpoint_path.txt").exists()
    assert (job / "global_step_3" / "remote_checkpoint_path.txt").exists()
    assert sorted(p.name for p in job.glob("global_step_*")) == ["global_step_2", "global_step_3"]
    assert (job / "final_adapter" / "adapter_config.json").exists()
    assert yaml.safe_load((job / "config.yaml").read_text())["buffer"]["total_steps"] == 3
    rollouts = RolloutStore(job / "monitor" / "rollouts.db")
    assert [(s["step"], s["count"]) for s in rollouts.steps()] == [(1, 8), (2, 8), (3, 8)]

    # the same config with more steps resumes after step 3 instead of starting over
    resumed = yaml.safe_load(config.read_text())
    resumed["buffer"]["total_steps"] = 5
    config.write_text(yaml.safe_dump(resumed))
    run_cli(config)
    steps = trainer_records(job)
    assert sorted(steps) == [1, 2, 3, 4, 5]
    logged_steps = [
        r["step"]
        for r in read_metrics(job / "monitor" / "metrics.jsonl")
        if "actor/final_loss" in r
    ]
    assert logged_steps == [1, 2, 3, 4, 5]
    assert steps[4]["rollout/model_version"] == 3  # resumed from the step-3 weights
    assert [s["step"] for s in rollouts.steps()] == [1, 2, 3, 4, 5]


def test_a_killed_run_resumes_with_each_step_logged_once(tmp_path, tiny_model_dir):
    config = write_config(tmp_path, tiny_model_dir)
    run_cli(config)
    job = job_dir(tmp_path)
    # as if killed after step 3 was explored, trained and logged, but before its checkpoint
    (job / "latest_checkpointed_iteration.txt").write_text("2")
    run_cli(config)
    records = read_metrics(job / "monitor" / "metrics.jsonl")
    for role, key in (("explorer", "rollout/reward/mean"), ("trainer", "actor/final_loss")):
        assert [r["step"] for r in records if r.get("role") == role and key in r] == [1, 2, 3]


@pytest.mark.parametrize("backend", ["local", "tinker"])
@pytest.mark.parametrize("algorithm", ["opmd", "rloo", "reinforceplusplus"])
def test_algorithm_runs_a_step(tmp_path, tiny_model_dir, algorithm, backend):
    config = write_config(
        tmp_path,
        tiny_model_dir,
        model=backend_model(tmp_path, tiny_model_dir, backend),
        algorithm={"algorithm_type": algorithm, "repeat_times": 4, "optimizer": {"lr": 1e-3}},
        buffer={
            **yaml.safe_load(write_config(tmp_path, tiny_model_dir).read_text())["buffer"],
            "total_steps": 1,
        },
    )
    run_cli(config)
    steps = trainer_records(job_dir(tmp_path))
    assert sorted(steps) == [1]
    assert steps[1]["actor/final_loss"] == pytest.approx(steps[1]["actor/final_loss"])


def test_the_loop_runs_with_the_set_up_objects_frozen(tmp_path, tiny_model_dir):
    """While the loop runs, what set-up made is out of the collector's generations (a full
    collection walked it all, ~0.25 s with the demo model); after the run it is back in them, so
    a finished run's cyclic garbage stays collectable."""
    from trinity.workflows import WORKFLOWS, SimpleWorkflow

    frozen = []

    @WORKFLOWS.register("freeze_probe_workflow")
    class Probe(SimpleWorkflow):
        async def run(self):
            frozen.append(gc.get_freeze_count())
            return await super().run()

    buffer = yaml.safe_load(write_config(tmp_path, tiny_model_dir).read_text())["buffer"]
    buffer["total_steps"] = 1
    buffer["explorer_input"]["default_workflow_type"] = "freeze_probe_workflow"
    run_cli(write_config(tmp_path, tiny_model_dir, buffer=buffer))
    assert frozen and min(frozen) > 10_000  # torch, transformers, the model
    assert gc.get_freeze_count() == 0


@pytest.mark.parametrize("backend", ["local", "tinker"])
def test_sft_trains_on_a_dataset(tmp_path, tiny_model_dir, backend):
    data = tmp_path / "chats.jsonl"
    rows = [{"prompt": f"What is {i} + {i}?", "response": str(2 * i)} for i in range(6)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = write_config(
        tmp_path,
        tiny_model_dir,
        mode="train",
        model=backend_model(tmp_path, tiny_model_dir, backend),
        algorithm={"algorithm_type": "sft", "optimizer": {"lr": 1e-2}},
        buffer={
            "batch_size": 3,
            "train_batch_size": 3,
            "total_epochs": 3,
            "total_steps": None,
            "trainer_input": {
                "experience_buffer": {"name": "sft", "storage_type": "file", "path": str(data)}
            },
        },
    )
    run_cli(config)
    steps = trainer_records(job_dir(tmp_path))
    assert sorted(steps) == [1, 2, 3, 4, 5, 6]  # 6 rows x 3 epochs / 3 per step
    losses = [steps[s]["actor/final_loss"] for s in sorted(steps)]
    assert losses[-1] < losses[0]  # a tiny model memorises six answers


def run_as_two_processes(
    tmp_path, tiny_model_dir, total_steps: int, *, trainer_first: bool = False
) -> None:
    """``trainer_first``: the explorer starts once the trainer has begun its run (it removed the
    earlier run's finished marker), so the trainer meets the earlier explorer's end marker."""
    commands = []
    for mode in ("explore", "train"):
        config = write_config(
            tmp_path,
            tiny_model_dir,
            name="split",
            mode=mode,
            synchronizer={
                "sync_method": "checkpoint",
                "sync_interval": 1,
                "sync_offset": 1,
                "sync_timeout": 300,
            },
        )
        text = yaml.safe_load(config.read_text())
        text["buffer"]["total_steps"] = total_steps
        config.write_text(yaml.safe_dump(text))
        config = config.rename(tmp_path / f"{mode}.yaml")
        commands.append(
            [
                sys.executable,
                "-m",
                "trinity.cli.main",
                "run",
                "--config",
                str(config),
                "--plugin-dir",
                str(PLUGINS),
            ]
        )
    # fp32: step 4 checks the sampler's logprobs equal the trainer's (ppo_kl < 1e-4), which bf16
    # roundings exceed on a real model (docs/benchmarks.md)
    popen = functools.partial(
        subprocess.Popen,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "TRINITY_DTYPE": "float32"},
    )
    if trainer_first:
        processes = [popen(commands[1])]
        marker = JobDir(job_dir(tmp_path, "split")).trainer_finished_file
        deadline = time.monotonic() + 120
        while marker.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1.0)  # the trainer reads the buffer now
        processes.append(popen(commands[0]))
    else:
        processes = [popen(cmd) for cmd in commands]
    for process in processes:
        _, stderr = process.communicate(timeout=600)
        assert process.returncode == 0, stderr[-3000:]


def test_explore_and_train_as_two_processes(tmp_path, tiny_model_dir):
    run_as_two_processes(tmp_path, tiny_model_dir, 3)
    steps = trainer_records(job_dir(tmp_path, "split"))
    assert sorted(steps) == [1, 2, 3]
    assert "actor/final_loss" in steps[3] and "rollout/model_version" in steps[3]
    assert (job_dir(tmp_path, "split") / "global_step_3" / "remote_checkpoint_path.txt").exists()
    # resumed, the explorer process samples from the trained weights, not from the base model:
    # the trainer's ratio to the sampler's logprobs stays 1 (ppo_kl 0); the trainer, started
    # first, waits for the new explorer past the end marker the first run's explorer left
    run_as_two_processes(tmp_path, tiny_model_dir, 4, trainer_first=True)
    step_4 = trainer_records(job_dir(tmp_path, "split"))[4]
    assert abs(step_4["actor/ppo_kl"]) < 1e-4, step_4["actor/ppo_kl"]


def test_bench_mode_evaluates_each_checkpoint(tmp_path, tiny_model_dir):
    eval_taskset = {
        "name": "heldout",
        "path": "builtin:arithmetic",
        "repeat_times": 2,
        "builtin_args": {"size": 4, "seed": 99},
        "format": {"prompt_key": "question", "response_key": "answer"},
    }
    base = yaml.safe_load(write_config(tmp_path, tiny_model_dir).read_text())
    buffer = {**base["buffer"], "total_steps": 2}
    run_cli(write_config(tmp_path, tiny_model_dir, buffer=buffer))
    buffer["explorer_input"] = {**buffer["explorer_input"], "eval_tasksets": [eval_taskset]}
    run_cli(write_config(tmp_path, tiny_model_dir, mode="bench", buffer=buffer))
    bench = [
        r
        for r in read_metrics(job_dir(tmp_path) / "monitor" / "metrics.jsonl")
        if any(k.startswith("bench/heldout/") for k in r)
    ]
    assert [r["step"] for r in bench] == [0, 2]
    assert all(0.0 <= r["bench/heldout/digit_share/mean@2"] <= 1.0 for r in bench)


def original_resume_reads(job: Path) -> tuple[int, str, int, str]:
    """What the original's Tinker trainer reads to resume a run directory (``prepare()``):
    ``latest_checkpointed_iteration.txt`` -> ``global_step_N/remote_checkpoint_path.txt`` (a
    ``.full_checkpoint`` beside it), ``latest_state_dict_iteration.txt`` ->
    ``global_step_M/remote_sampler_path.txt``; it fails on any file missing."""
    step = int((job / "latest_checkpointed_iteration.txt").read_text().strip())
    assert (job / f"global_step_{step}" / ".full_checkpoint").is_file()
    state = (job / f"global_step_{step}" / "remote_checkpoint_path.txt").read_text().strip()
    sampler_step = int((job / "latest_state_dict_iteration.txt").read_text().strip())
    sampler = (job / f"global_step_{sampler_step}" / "remote_sampler_path.txt").read_text()
    return step, state, sampler_step, sampler.strip()


ORIGINAL_FILES = {
    "latest_checkpointed_iteration.txt",
    "latest_state_dict_iteration.txt",
    "trainer_meta.json",
    "remote_checkpoint_path.txt",
    "remote_sampler_path.txt",
    ".full_checkpoint",
}


def test_tinker_run_directories_interchange_with_the_original_s(tmp_path, tiny_model_dir):
    """Ours -> the original: its resume finds every file it reads, naming states the service
    loads. The original's -> ours: a directory reduced to exactly what the original's Tinker
    backend writes (plus the service's own store) resumes after its last checkpoint."""
    import tinker

    from trinity.server import build_service
    from trinity.server.runner import ServerThread

    model = backend_model(tmp_path, tiny_model_dir, "tinker")
    config = write_config(tmp_path, tiny_model_dir, model=model)
    raw = yaml.safe_load(config.read_text())
    raw["buffer"]["total_steps"] = 2
    config.write_text(yaml.safe_dump(raw))
    run_cli(config)
    job = job_dir(tmp_path)
    step, state, sampler_step, sampler = original_resume_reads(job)
    assert (step, sampler_step) == (2, 2)

    service = build_service([str(tiny_model_dir)], job / "server", "tml-orig=local")
    server = ServerThread(service).start()
    try:
        client = tinker.ServiceClient(base_url=server.url, api_key="tml-orig")
        trainer = client.create_training_client_from_state_with_optimizer(state).result()
        assert trainer.get_info().model_data.model_name
        prompt = tinker.types.ModelInput.from_ints([1, 2, 3])
        params = tinker.types.SamplingParams(max_tokens=2, seed=0)
        sampling = client.create_sampling_client(model_path=sampler).result()
        assert len(sampling.sample(prompt, 1, params).result().sequences[0].tokens) == 2
    finally:
        server.stop()

    # keep exactly the original's layout (and the service's store, as the hosted service would)
    for path in sorted(job.rglob("*"), reverse=True):  # files before their directories
        if path.relative_to(job).parts[0] == "server" or path.name in ORIGINAL_FILES:
            continue
        if path.is_file():
            path.unlink()
        elif not any(path.iterdir()):
            path.rmdir()
    assert {p.name for p in job.iterdir()} == {
        "server",
        "global_step_2",
        "latest_checkpointed_iteration.txt",
        "latest_state_dict_iteration.txt",
        "trainer_meta.json",
    }
    raw["buffer"]["total_steps"] = 3
    config.write_text(yaml.safe_dump(raw))
    run_cli(config)
    assert sorted(trainer_records(job)) == [3]  # steps 1-2 came from the original's checkpoint
    step, _, sampler_step, _ = original_resume_reads(job)
    assert (step, sampler_step) == (3, 3)
