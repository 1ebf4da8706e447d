"""``trinity run`` on a Ray cluster: a local cluster on loopback, started once for this module.

Each run goes through the real path (CLI, launcher, explorer, trainer); the launcher finds this
process already connected to Ray and puts the workflow runners (and the local backend's rollout
model) on actors. Skipped when ray is not installed (``pip install -e '.[ray]'``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys

import pytest
import yaml

from tests.test_rl_loop import PLUGINS, job_dir, run_cli, trainer_records, write_config
from trinity.config import ConfigError, load_config
from trinity.launcher import cluster as cluster_mod
from trinity.launcher import launcher
from trinity.plugins import load_plugins

ray = pytest.importorskip("ray")

RUNNERS = 2  # engine_num 1 x runner_per_model 2: few actors to start on two cores
BATCH = 2 * 4  # batch_size x repeat_times of write_config


@pytest.fixture(scope="module")
def ray_cluster():
    # a shared test machine can be short of memory; Ray's OOM killer would pick our actors
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_memory_monitor_refresh_ms", "0")
        ray.init(
            num_cpus=4,
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            object_store_memory=200 * 2**20,
            namespace="trinity-tests",
        )
    yield
    ray.shutdown()


def ray_config(
    tmp_path, model_dir, name: str, tinker: dict | None = None, explorer_overrides=None, **sections
):
    base = yaml.safe_load(write_config(tmp_path, model_dir).read_text())
    return write_config(
        tmp_path,
        model_dir,
        name=name,
        explorer={**base["explorer"], "runner_per_model": RUNNERS, **(explorer_overrides or {})},
        model={**base["model"], "tinker": {**base["model"]["tinker"], **(tinker or {})}},
        **sections,
    )


def assert_full_batches(steps: dict[int, dict]) -> None:
    assert sorted(steps) == [1, 2, 3]
    for record in steps.values():
        assert record["experience_pipeline/experience_count"] == BATCH
        assert record["rollout/finished_task_count"] == 2
        assert record["actor/final_loss"] == pytest.approx(record["actor/final_loss"])  # not NaN


def loaded_config(tmp_path, model_dir, **sections):
    load_plugins([str(PLUGINS)])  # the config names the test plugins' reward
    return load_config(write_config(tmp_path, model_dir, **sections))


def test_no_cluster_means_one_process(tmp_path, tiny_model_dir, monkeypatch, caplog):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(cluster_mod, "_answers", lambda address, timeout=2.0: False)
    config = loaded_config(tmp_path, tiny_model_dir)
    with caplog.at_level(logging.INFO, logger="trinity"):
        assert cluster_mod.connect(config, explore=True) is None
    assert "in-process mode" in caplog.text
    assert not ray.is_initialized()


def test_unreachable_address_is_a_config_error(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:9")  # discard port: nobody answers
    config = loaded_config(tmp_path, tiny_model_dir)
    with pytest.raises(ConfigError, match="RAY_ADDRESS: no Ray cluster answers at 127.0.0.1:9"):
        cluster_mod.connect(config, explore=True)


def test_actor_env_carries_keys_plugins_and_env_vars(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("TINKER_API_KEY", "tml-from-env")
    config = loaded_config(
        tmp_path, tiny_model_dir, explorer={"env_vars": {"JUDGE_URL": "http://j"}}
    )
    env = cluster_mod.runner_env(config, {"TRINITY_API_KEY": "tml-run"})
    assert env["TINKER_API_KEY"] == "tml-from-env"
    assert env["TRINITY_API_KEY"] == "tml-run"
    assert env["JUDGE_URL"] == "http://j"
    assert str(PLUGINS.resolve()) in env["TRINITY_PLUGIN_DIRS"].split(":")


def test_another_programs_private_cluster_is_not_joined(tmp_path, tiny_model_dir, ray_cluster):
    """This module's ``ray.init()`` cluster runs, but no ``ray start`` left an address: a run in
    another process stays in-process (before, it found the GCS process and joined)."""
    config = write_config(tmp_path, tiny_model_dir)
    probe = (
        "import sys; from trinity.config import load_config; from trinity.plugins import "
        "load_plugins; from trinity.launcher import cluster; load_plugins([sys.argv[2]]); "
        "print(cluster._connect(load_config(sys.argv[1]))[1])"
    )
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    out = subprocess.run(
        [sys.executable, "-c", probe, str(config), str(PLUGINS)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().startswith("no Ray cluster found"), out.stdout


def test_grpo_on_ray_local_backend(tmp_path, tiny_model_dir, ray_cluster, monkeypatch, caplog):
    with caplog.at_level(logging.INFO, logger="trinity"):
        run_cli(ray_config(tmp_path, tiny_model_dir, "local"))
    assert "Ray mode: this process is already connected to Ray" in caplog.text
    steps = trainer_records(job_dir(tmp_path, "local"))
    assert_full_batches(steps)
    assert steps[3]["rollout/model_version"] == 2  # synced through sampler weights on disk
    assert (job_dir(tmp_path, "local") / "global_step_3" / "remote_checkpoint_path.txt").exists()

    # the same run in one process: same seeds, same samples, same training
    monkeypatch.setattr(launcher, "connect", lambda config, explore: None)
    run_cli(ray_config(tmp_path, tiny_model_dir, "embedded"))
    embedded = trainer_records(job_dir(tmp_path, "embedded"))
    for step in (1, 2, 3):
        for key in ("critic/rewards/mean", "rollout/model_version"):
            assert steps[step][key] == embedded[step][key]
        assert steps[step]["actor/final_loss"] == pytest.approx(
            embedded[step]["actor/final_loss"], rel=1e-3, abs=1e-9
        )


def test_grpo_on_ray_tinker_backend(tmp_path, tiny_model_dir, ray_cluster):
    run_cli(ray_config(tmp_path, tiny_model_dir, "tinker", {"enable": True, "base_url": "local"}))
    steps = trainer_records(job_dir(tmp_path, "tinker"))
    assert_full_batches(steps)
    assert steps[3]["rollout/model_version"] == 2
    job = job_dir(tmp_path, "tinker")
    assert (
        (job / "global_step_3" / "remote_checkpoint_path.txt").read_text().startswith("tinker://")
    )


@pytest.mark.parametrize("backend", ["local", "tinker"])
def test_auxiliary_models_reach_the_ray_runners(tmp_path, tiny_model_dir, ray_cluster, backend):
    """A judge (``explorer.auxiliary_models``) scores inside runner actors: an engine actor of
    its own on the local backend, the embedded server through each runner's session on Tinker."""
    from tests.test_judges import build_judge, judge_run_config

    judge = build_judge(tmp_path / "judge", "Score: 7")
    run_cli(judge_run_config(tmp_path, tiny_model_dir, judge, backend, runner_per_model=RUNNERS))
    (step,) = trainer_records(job_dir(tmp_path, backend)).values()
    assert step["rollout/judge/mean"] == pytest.approx(0.7)
    assert step["experience_pipeline/experience_count"] == 4  # the 4 answers, all judged


def test_runner_failures_lose_nothing(tmp_path, tiny_model_dir, ray_cluster, monkeypatch, caplog):
    """Step 1: a judge hangs past max_timeout. Step 2: a runner is killed mid-task (ray.kill).
    Both runners are replaced, both tasks rerun, and every step trains on a full batch."""
    from trinity.explorer.runners import RunnerPool

    calls, killed = [], []
    dispatch = RunnerPool._call

    def call_then_kill(self, actor, task, seed):
        ref = dispatch(self, actor, task, seed)
        calls.append(task.task_id)
        if task.batch_id == 1 and not killed:  # step 2's first task, while its judge works
            killed.append(task.task_id)
            asyncio.get_running_loop().call_later(0.3, ray.kill, actor)
        return ref

    monkeypatch.setattr(RunnerPool, "_call", call_then_kill)
    base = yaml.safe_load(write_config(tmp_path, tiny_model_dir).read_text())
    taskset = {
        **base["buffer"]["explorer_input"]["taskset"],
        "reward_fn_args": {"delay": 0.1, "hang_once": str(tmp_path / "hung")},
    }
    inputs = {
        **base["buffer"]["explorer_input"],
        "taskset": taskset,
        "default_reward_fn_type": "slow_digit_share_reward",
    }
    config = ray_config(
        tmp_path,
        tiny_model_dir,
        "failures",
        buffer={**base["buffer"], "explorer_input": inputs},
        explorer_overrides={"max_timeout": 8, "max_retry_times": 2},
    )
    with caplog.at_level(logging.WARNING):
        run_cli(config)
    assert "timed out; replaced it with a new actor" in caplog.text
    assert "died (ActorDiedError); replaced it with a new actor" in caplog.text
    # the killed task ran again (a third time too if its rerun passed max_timeout on a slow machine)
    assert killed and calls.count(killed[0]) >= 2
    assert_full_batches(trainer_records(job_dir(tmp_path, "failures")))
