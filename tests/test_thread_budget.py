"""Thread budgets: each compute process gets its share of the cores (trinity.engine.process)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from trinity.config import ConfigError, load_config
from trinity.engine.process import AFFINITY_VAR, ENV_VAR, cpu_share, thread_budget
from trinity.launcher.launcher import compute_processes, process_slot

ROOT = Path(__file__).resolve().parents[1]


def test_each_process_gets_its_share(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert thread_budget(1, cores=16).threads == 16
    assert thread_budget(2, cores=16).threads == 8
    assert thread_budget(3, cores=16).threads == 5
    assert thread_budget(4, cores=2).threads == 1  # never zero
    assert "16 cores / 2 process" in thread_budget(2, cores=16).why


def test_env_var_overrides_the_share(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "3")
    budget = thread_budget(2, cores=16)
    assert budget.threads == 3 and ENV_VAR in budget.why


@pytest.mark.parametrize("bad", ["0", "two", "-1", "1.5"])
def test_bad_env_var_is_one_line_config_error(monkeypatch, bad):
    monkeypatch.setenv(ENV_VAR, bad)
    with pytest.raises(ConfigError, match=rf"^{ENV_VAR}: expected a whole number") as info:
        thread_budget(2)
    assert "\n" not in str(info.value)


def _config(tmp_path: Path, mode: str):
    from tests.test_rl_loop import PLUGINS, write_config
    from trinity.plugins import load_plugins

    load_plugins([str(PLUGINS)])
    return load_config(write_config(tmp_path, Path("demo"), name=mode, mode=mode))


@pytest.mark.parametrize(("mode", "processes"), [("both", 1), ("explore", 2), ("train", 2)])
def test_modes_count_the_processes_beside_them(tmp_path, mode, processes):
    assert compute_processes(_config(tmp_path, mode)) == processes


def test_training_on_a_dataset_runs_alone(tmp_path):
    """``mode: train`` on an SFT dataset has no explorer beside it: the whole machine, unpinned
    (before, it took half the cores, and kept them pinned in the calling process)."""
    config = _config(tmp_path, "train")
    config.algorithm.algorithm_type = "sft"
    assert compute_processes(config) == 1 and process_slot(config) is None


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs to pin to one")
def test_a_pinned_run_gives_its_cpus_back_to_the_calling_process(tmp_path):
    from trinity.engine.process import pin_threads
    from trinity.launcher.launcher import _owned
    from trinity.monitor import build_monitors

    before = os.sched_getaffinity(0)

    async def run() -> set[int]:
        async with _owned(build_monitors("none", job_dir=tmp_path)):
            pin_threads({min(before)})  # what apply_thread_budget does for a pinned slot
            return os.sched_getaffinity(0)

    assert asyncio.run(run()) == {min(before)}
    assert os.sched_getaffinity(0) == before


class _Cluster:
    def actors_per_node(self) -> int:
        return 3


def test_ray_rollout_models_share_the_node_with_the_driver(tmp_path):
    config = _config(tmp_path, "both")
    assert compute_processes(config, _Cluster()) == 4
    config.model.tinker.enable = True  # the models are remote: nothing computes beside us
    assert compute_processes(config, _Cluster()) == 1


PROBE = """
import json, os, torch
from trinity.engine import configure_process
configure_process({processes})
print(json.dumps({{"torch": torch.get_num_threads(), "interop": torch.get_num_interop_threads(),
                  "omp": os.environ.get("OMP_NUM_THREADS"), "mkl": os.environ.get("MKL_NUM_THREADS")}}))
"""


def _probe(processes, env_value: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in (ENV_VAR, "OMP_NUM_THREADS")}
    env["PYTHONPATH"] = str(ROOT)
    if env_value is not None:
        env[ENV_VAR] = env_value
    out = subprocess.run(
        [sys.executable, "-c", PROBE.format(processes=processes)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout)


def test_budget_is_applied_to_torch_and_subprocess_env():
    """Real processes: torch's pools and what OpenMP / MKL in a subprocess would read."""
    seen = _probe(None, "3")
    assert seen == {"torch": 3, "interop": 2, "omp": "3", "mkl": "3"}
    seen = _probe(64, None)  # more processes than cores: one thread each
    assert seen == {"torch": 1, "interop": 1, "omp": "1", "mkl": "1"}


def test_shares_are_disjoint_blocks_of_whole_cores():
    cores = [(0,), (1,), (2,), (3,), (4,)]
    shares = [cpu_share(2, slot, cores) for slot in (0, 1)]
    assert shares == [(0, 1), (2, 3)]  # the odd core is left to neither
    siblings = [(0, 4), (1, 5), (2, 6), (3, 7)]  # hyperthreads stay with their core
    assert [cpu_share(2, slot, siblings) for slot in (0, 1)] == [(0, 4, 1, 5), (2, 6, 3, 7)]
    assert cpu_share(3, 0, [(0,), (1,)]) is None  # fewer cores than processes: no pinning
    assert cpu_share(1, 0, cores) is None


def test_affinity_override(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.setenv(AFFINITY_VAR, "0-2,5")
    budget = thread_budget(1, cores=16)
    assert budget.cpus == (0, 1, 2, 5) and budget.threads == 4  # no more threads than CPUs
    assert "pinned to CPUs 0-2,5" in budget.why
    monkeypatch.setenv(AFFINITY_VAR, "off")
    assert thread_budget(2, cores=16, slot=1).cpus is None
    monkeypatch.setenv(AFFINITY_VAR, "auto")
    monkeypatch.setenv(ENV_VAR, "3")  # an explicit thread count: not pinned automatically
    assert thread_budget(2, cores=16, slot=1).cpus is None
    for bad in ("3-1", "zero", "1,,2", "-1"):
        monkeypatch.setenv(AFFINITY_VAR, bad)
        with pytest.raises(ConfigError, match=rf"^{AFFINITY_VAR}: expected 'auto', 'off'"):
            thread_budget(1)


@pytest.mark.parametrize(
    ("mode", "slot"), [("both", None), ("explore", 0), ("serve", 0), ("train", 1)]
)
def test_modes_take_their_slot(tmp_path, mode, slot):
    config = _config(tmp_path, mode)
    assert process_slot(config) == slot
    assert process_slot(config, _Cluster()) is None  # Ray rollout models are not pinned
    config.model.tinker.enable = True
    assert process_slot(config) is None


PAIR_PROBE = """
import json, os, threading, torch
from trinity.config import load_config
from trinity.engine.process import apply_thread_budget, thread_budget
from trinity.launcher.launcher import compute_processes, process_slot
from trinity.plugins import load_plugins
load_plugins([{plugins!r}])
torch.set_num_threads(4)
torch.ones(512, 512) @ torch.ones(512, 512)  # torch's pool is running before the budget
config = load_config({config!r})
budget = apply_thread_budget(thread_budget(compute_processes(config), slot=process_slot(config)))
later = []
thread = threading.Thread(target=lambda: later.append(sorted(os.sched_getaffinity(0))))
thread.start(); thread.join()
tasks = sorted(
    sorted(os.sched_getaffinity(int(tid))) for tid in os.listdir("/proc/self/task")
)
print(json.dumps({{"cpus": budget.cpus, "tasks": tasks, "later": later[0],
                  "threads": torch.get_num_threads()}}))
"""


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 CPUs to split")
def test_explore_and_train_processes_are_pinned_to_disjoint_cores(tmp_path):
    """Real processes, the launcher's own choice: every thread of the explore process (torch's
    pool started before, threads started after) runs on one block, the train process's on the
    other; together they cover the cores the parent may use."""
    from tests.test_rl_loop import PLUGINS, write_config
    from trinity.engine.process import core_groups, usable_cores

    env = {k: v for k, v in os.environ.items() if k not in (ENV_VAR, AFFINITY_VAR)}
    env["PYTHONPATH"] = str(ROOT)
    seen = {}
    for mode in ("explore", "train"):
        config = write_config(tmp_path, Path("demo"), name=mode, mode=mode)
        code = PAIR_PROBE.format(plugins=str(PLUGINS), config=str(config))
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        )
        seen[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    explore, train = (set(seen[mode]["cpus"]) for mode in ("explore", "train"))
    assert explore and train and not explore & train
    groups = core_groups()
    half = len(groups) // 2
    assert explore | train == {cpu for group in groups[: 2 * half] for cpu in group}
    for mode, cpus in (("explore", explore), ("train", train)):
        assert all(set(task) == cpus for task in seen[mode]["tasks"])
        assert set(seen[mode]["later"]) == cpus
        assert seen[mode]["threads"] == usable_cores() // 2


def test_trinity_run_applies_the_budget_of_its_mode(tmp_path, tiny_model_dir, monkeypatch, capsys):
    """``mode: explore`` (one half of a pair) runs on half the cores; a bad override is refused."""
    import torch

    from tests.test_rl_loop import run_cli, write_config
    from trinity.cli.main import main
    from trinity.engine.process import _cpu_list, core_groups, usable_cores

    config = write_config(
        tmp_path,
        tiny_model_dir,
        mode="explore",
        buffer={"total_steps": 1, "batch_size": 1},
        synchronizer={"sync_method": "checkpoint", "sync_interval": 1, "sync_offset": 1},
    )
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        monkeypatch.setenv(var, "")  # restored after the test, as are torch's threads below
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.delenv(AFFINITY_VAR, raising=False)
    threads = torch.get_num_threads()
    cores = usable_cores()
    allowed = os.sched_getaffinity(0)
    torch.set_num_threads(cores)  # what a process starts with
    try:
        run_cli(config)
        share = max(1, cores // 2)
        assert torch.get_num_threads() == share and os.environ["OMP_NUM_THREADS"] == str(share)
        assert os.sched_getaffinity(0) == allowed  # the run gave its pinned CPUs back
    finally:  # this test's process, not a run's: give every thread its cores back
        torch.set_num_threads(threads)
        for tid in os.listdir("/proc/self/task"):
            with contextlib.suppress(ProcessLookupError):
                os.sched_setaffinity(int(tid), allowed)
    log = next((tmp_path / "ckpt").rglob("trinity.log")).read_text()
    assert f"{share} compute threads per process ({cores} cores / 2 process(es)" in log
    if cores >= 2:  # the explore process takes the first block
        pinned = cpu_share(2, 0, core_groups())
        assert f"pinned to CPUs {_cpu_list(tuple(sorted(pinned)))})" in log
    monkeypatch.setenv(ENV_VAR, "zero")
    assert main(["run", "--config", str(config)]) == 2
    assert (
        capsys.readouterr().err.strip().splitlines()[-1].startswith(f"trinity: error: {ENV_VAR}:")
    )
